//! # strata-fuse: the FUSE union filesystem (in progress)
//!
//! This crate owns Strata's FUSE union filesystem: the same semantics as kernel overlayfs
//! over the same on-disk layer format (`strata-overlay`), for rootless use and wherever kernel
//! overlay cannot serve.
//!
//! # Layout
//! - [`layer`]: the model of a stack of layer directories: lookup and merged listings with
//!   overlayfs' rules, whiteouts and opaque directories in both the kernel and the OCI form.
//! - `sys`: the raw syscalls nix does not wrap; the only module with `unsafe`.
//!
//! The FUSE request handling (inode table, copy-up, the `fuser::Filesystem` glue) and the
//! `strata mount --fuse` command come next; until then nothing mounts through this crate.
#![deny(unsafe_code)]

pub mod layer;
mod sys;

pub use strata_overlay::whiteout;
