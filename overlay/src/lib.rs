//! # strata-overlay: the layer format
//!
//! This crate owns Strata's on-disk layer format, which is overlayfs' own: a layer is a directory
//! whose deletions are character devices 0:0 (whiteouts) and whose opaque directories carry the
//! `trusted.overlay.opaque` (or, rootless, `user.overlay.opaque`) xattr. It converts between that
//! form and OCI layer tarballs in both directions, computes their digests, and mounts stacks of
//! layers with kernel overlayfs.
//!
//! # Layout
//! - [`archive`]: a strict streaming tar reader and a deterministic tar writer.
//! - [`mod@apply`]: OCI layer blob (tar, gzip, zstd) -> layer directory, safely and atomically.
//! - [`diff`]: layer directory (native) or two trees (generic) -> OCI layer blob; change lists.
//! - [`form`]: the kernel, userxattr and `.wh.` forms of deletions and opaque dirs; check and convert.
//! - [`whiteout`]: the OCI and overlayfs encodings of deletions, with their specs.
//! - [`digest`], [`compress`]: sha256 digests and compression.
//! - [`mount`], [`probe`]: kernel overlay mounts and feature probing.
//! - [`tree`]: copying trees with every attribute, and measuring them.
//! - `sys`: the raw syscall wrappers; the only module with `unsafe`.
#![deny(unsafe_code)]

pub mod apply;
pub mod archive;
pub mod compress;
pub mod diff;
pub mod digest;
mod error;
pub mod form;
pub mod mount;
pub mod probe;
mod sys;
pub mod tree;
pub mod whiteout;

pub use apply::{ApplyOptions, ApplyReport, apply, apply_file};
pub use compress::Compression;
pub use digest::Digest;
pub use error::{Error, Result};
pub use mount::{Mount, Overlay};
pub use whiteout::XattrNs;
