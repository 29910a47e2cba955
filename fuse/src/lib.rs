//! # strata-fuse: the FUSE union filesystem (in progress)
//!
//! This crate owns Strata's FUSE union filesystem: the same semantics as kernel overlayfs
//! over the same on-disk layer format (`strata-overlay`), for rootless use and wherever kernel
//! overlay cannot serve.
//!
//! # Layout
//! - [`layer`]: the model of a stack of layer directories: lookup and merged listings with
//!   overlayfs' rules, whiteouts and opaque directories in both the kernel and the OCI form.
//! - [`ino`]: the inode numbers shown (the backing files', a copy keeping its origin's), which
//!   are also the FUSE node ids.
//! - [`node`]: the node table: what the kernel holds, forgotten when the kernel forgets it.
//! - [`evict`]: keeps the node table under a cap by asking the kernel to drop cold entries.
//! - `pathmap`: maps keyed by merged-view paths, a subtree being one range.
//! - [`ops`]: the upper's changes: copy-up through the work dir, whiteouts, opaque dirs.
//! - [`fs`]: the `fuser::Filesystem` glue (read-only without an upper): resolved directories
//!   cached until a change touches them, listings the kernel may cache, and file I/O done by
//!   the kernel itself where it can: every file passes through to its backing file as root
//!   of the initial user namespace ([`privileged`]; FUSE passthrough), writes go through the
//!   kernel's writeback cache otherwise.
//! - [`threads`]: how many request threads, each kept on its own CPU.
//! - [`mounts`]: finding and unmounting FUSE mounts (with `fusermount3` when unprivileged).
//! - `sys`: the raw syscalls nix does not wrap; the only module with `unsafe`.
#![deny(unsafe_code)]

pub mod evict;
pub mod fs;
pub mod ino;
pub mod layer;
pub mod mounts;
pub mod node;
pub mod ops;
mod pathmap;
mod sys;
pub mod threads;

pub use fs::Union;

/// True when this server runs as root of the initial user namespace: it may then pass files
/// through to the kernel (`FUSE_DEV_IOC_BACKING_OPEN` needs `CAP_SYS_ADMIN` there) and set
/// `trusted.` xattrs. Root of a user namespace (`unshare -Ur`, rootless Podman) may do neither.
pub fn privileged() -> bool {
    static PRIVILEGED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRIVILEGED.get_or_init(|| {
        nix::unistd::geteuid().is_root() && !strata_overlay::probe::in_user_namespace()
    })
}

pub use strata_overlay::whiteout;
