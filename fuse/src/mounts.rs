//! Finding and ending FUSE mounts: `umount2` when this process may, `fusermount3 -u` (the
//! setuid helper FUSE mounts of unprivileged users are made with) when it may not.

use std::io;
use std::path::Path;

/// Whether `path` is a live or dead FUSE mount point (dead: its server is gone, so every
/// access fails with `ENOTCONN`).
pub fn is_fuse_mount(path: &Path) -> bool {
    strata_overlay::mount::is_mount_point(path, "fuse").unwrap_or(false)
}

/// Whether the FUSE mount at `path` has lost its server.
pub fn is_dead(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Unmounts the FUSE mount at `path`; `lazy` detaches it even while it is busy. The server
/// sees the connection end and exits.
///
/// A plain unmount first pushes the writes the kernel still caches for the mount (its
/// writeback cache) to the server, so the upper dir holds them even if the mount turns out
/// busy and is detached next.
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    if !lazy && !is_dead(path) {
        if let Ok(d) = std::fs::File::open(path) {
            let _ = nix::unistd::syncfs(&d);
        }
    }
    match strata_overlay::mount::unmount(path, lazy) {
        Ok(()) => Ok(()),
        Err(strata_overlay::Error::Mount { err, .. })
            if err.raw_os_error() == Some(libc::EPERM) && is_fuse_mount(path) =>
        {
            let out = std::process::Command::new("fusermount3")
                .arg("-u")
                .args(lazy.then_some("-z"))
                .arg(path)
                .stdout(std::process::Stdio::null())
                .output()
                .map_err(|e| io::Error::new(e.kind(), format!("running fusermount3 -u: {e}")))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "fusermount3 -u {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
        Err(strata_overlay::Error::Mount { err, .. }) => Err(err),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}
