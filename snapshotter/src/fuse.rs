//! FUSE mode: every snapshot that needs a union gets its own FUSE server process, started with
//! fuse-overlayfs' command line (`PROG -o lowerdir=A:B[,upperdir=U,workdir=W],fsname=N MERGED`,
//! which returns once the mount is live). Strata's own `strata-fuse` serves it by default;
//! fuse-overlayfs itself can too. containerd gets a bind mount of `MERGED`, as remote
//! snapshotters hand out. The server is a process of its own, so running containers keep
//! their root file system while the snapshotter restarts.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The program that makes a FUSE union mount, with fuse-overlayfs' command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseHelper {
    /// The executable.
    pub program: PathBuf,
    /// `argv[0]`, when it selects the behaviour (Strata's binary is `strata-fuse` by that name).
    pub arg0: Option<OsString>,
}

impl FuseHelper {
    /// This executable called as `strata-fuse` (for the `strata` binary, which serves the
    /// snapshotter too).
    pub fn this_exe() -> Result<FuseHelper> {
        let program = std::env::current_exe()
            .map_err(|e| Error::io("find the running executable", "/proc/self/exe", e))?;
        Ok(FuseHelper {
            program,
            arg0: Some("strata-fuse".into()),
        })
    }

    /// Mounts the union of `lowers` (top first), with `upper_work` on top when writable, on
    /// `target`, and returns once it is live; `volatile`: with no syncs to the upper.
    pub fn mount(
        &self,
        lowers: &[PathBuf],
        upper_work: Option<(&Path, &Path)>,
        volatile: bool,
        fsname: &str,
        target: &Path,
    ) -> Result<()> {
        let mut dirs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        dirs.extend(upper_work.iter().flat_map(|(u, w)| [*u, *w]));
        if let Some(bad) = dirs.iter().find(|d| {
            let s = d.as_os_str().as_encoded_bytes();
            s.contains(&b',') || s.contains(&b':')
        }) {
            return Err(Error::InvalidArgument(format!(
                "{} holds ',' or ':', which a FUSE mount's lowerdir= option cannot carry: use a store root without them",
                bad.display()
            )));
        }
        let join = |v: &[&Path]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        let mut opts = format!("lowerdir={}", join(&dirs[..lowers.len()]));
        if let Some((u, w)) = upper_work {
            opts.push_str(&format!(
                ",upperdir={},workdir={}",
                u.display(),
                w.display()
            ));
        }
        if volatile && upper_work.is_some() {
            opts.push_str(",volatile");
        }
        opts.push_str(&format!(",fsname={fsname}"));
        let mut cmd = std::process::Command::new(&self.program);
        if let Some(a) = &self.arg0 {
            cmd.arg0(a);
        }
        let out = cmd
            .arg("-o")
            .arg(&opts)
            .arg(target)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .output()
            .map_err(|e| Error::io("start the FUSE server", &self.program, e))?;
        if !out.status.success() {
            return Err(Error::Fuse(format!(
                "{} -o {opts} {} failed ({}): {}",
                self.program.display(),
                target.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // A helper that daemonizes before the mount is live would leave a gap here.
        let t = std::time::Instant::now();
        while !strata_fuse::mounts::is_fuse_mount(target) {
            if t.elapsed() > std::time::Duration::from_secs(10) {
                return Err(Error::Fuse(format!(
                    "{} returned but no FUSE mount appeared on {}",
                    self.program.display(),
                    target.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }
}

/// Ends the FUSE mount on `target` if there is one: a plain unmount, detached when busy.
pub fn unmount(target: &Path) -> Result<()> {
    if !strata_fuse::mounts::is_fuse_mount(target) {
        return Ok(());
    }
    let r = strata_fuse::mounts::unmount(target, false).or_else(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            strata_fuse::mounts::unmount(target, true)
        } else {
            Err(e)
        }
    });
    r.map_err(|e| Error::io("unmount", target, e))
}

/// Detaches every mount below `dir` (deepest first): a directory about to be deleted must not
/// have a union mounted inside it, or the deletion would go through the union.
pub fn unmount_below(dir: &Path) -> Result<()> {
    for m in strata_overlay::mount::mounts_below(dir)? {
        if let Err(e) = strata_fuse::mounts::unmount(&m, true) {
            return Err(Error::io("unmount", m, e));
        }
    }
    Ok(())
}
