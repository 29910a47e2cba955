//! Rootless: running without root through a user namespace.
//!
//! A command that mounts or changes the store enters a new user namespace (and mount
//! namespace) first, mapping the caller's uid and gid to 0 there (a single-id map, like
//! `unshare -r`): it then has the capabilities it needs inside, overlay mounts take `userxattr`,
//! layers are applied in the rootless form. Containers started from such a command live in that
//! user namespace; `exec` and `cp` later join it from the caller's own namespace, which owns it.
//!
//! Limits (as Podman's rootless mode without subordinate ids): only uid/gid 0 exists inside,
//! so `-u` to another user fails with a clear error, and files of other owners in an image
//! are owned by the caller.

use std::path::Path;

use nix::sched::{CloneFlags, setns, unshare};

use crate::{Error, Result};

/// True when this process is not root and not yet in a user namespace of its own.
pub fn needed() -> bool {
    !nix::unistd::geteuid().is_root() && !strata_overlay::probe::in_user_namespace()
}

/// True when layers must be applied in the rootless form (not root on the host).
pub fn rootless_layers() -> bool {
    !nix::unistd::geteuid().is_root() || strata_overlay::probe::in_user_namespace()
}

/// Enters a new user and mount namespace with the caller mapped to root. Must run while the
/// process is single-threaded.
pub fn enter() -> Result<()> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(|e| {
        Error::io(
            "enter a user namespace (rootless; is kernel.unprivileged_userns_clone on?)",
            "/proc/self/ns/user",
            e.into(),
        )
    })?;
    let write = |f: &str, s: String| {
        std::fs::write(format!("/proc/self/{f}"), s)
            .map_err(|e| Error::io("write", format!("/proc/self/{f}"), e))
    };
    write("uid_map", format!("0 {uid} 1\n"))?;
    write("setgroups", "deny\n".into())?;
    write("gid_map", format!("0 {gid} 1\n"))?;
    Ok(())
}

/// Joins the user namespace of process `pid` if it is not this process's own (a rootless
/// container's, from the caller's namespace that owns it).
pub fn join_user_ns_of(pid: i64) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let target = format!("/proc/{pid}/ns/user");
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
    let (mine, theirs) = (
        ino("/proc/self/ns/user").map_err(|e| Error::io("stat", "/proc/self/ns/user", e))?,
        ino(&target).map_err(|e| Error::io("stat", &target, e))?,
    );
    if mine == theirs {
        return Ok(());
    }
    let f = std::fs::File::open(&target).map_err(|e| Error::io("open", &target, e))?;
    setns(std::os::fd::AsFd::as_fd(&f), CloneFlags::CLONE_NEWUSER)
        .map_err(|e| Error::io("join the user namespace", Path::new(&target), e.into()))
}
