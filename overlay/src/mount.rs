//! Kernel overlay and bind mounts.
//!
//! [`Mount`] is containerd's description of a mount (type, source, options), the shape the
//! snapshotter hands out. [`Overlay`] builds one from a layer stack and mounts it with the new
//! mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`), passing each lower with `lowerdir+`
//! so hundreds of layers mount without the one-page limit of the old option string. The
//! kernel's own messages from the filesystem context are part of every mount error.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result, sys};

/// A mount: what containerd's `Mount` message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `overlay` or `bind`.
    pub kind: String,
    /// Source: `overlay` or the bind source path.
    pub source: String,
    /// Options such as `lowerdir=...`, `ro`, `rbind`.
    pub options: Vec<String>,
}

/// Overlay mount options beyond the layer dirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `userxattr`: use `user.overlay.*` (user namespaces).
    pub userxattr: bool,
    /// `index=off`, as containerd sets whenever the kernel has the index feature.
    pub index_off: bool,
    /// `metacopy=on`: chmod/chown of a lower file copies up metadata only.
    pub metacopy: bool,
    /// `redirect_dir=on`: renaming a lower directory records a redirect instead of EXDEV.
    pub redirect_dir: bool,
    /// `volatile`: no syncs to the upper; discarded after an unclean shutdown.
    pub volatile: bool,
    /// Read-only mount.
    pub readonly: bool,
}

/// An overlay of lower layers (top first) with an optional upper and work dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// The upper dir; `None` for a read-only view.
    pub upper: Option<PathBuf>,
    /// The work dir (same filesystem as the upper).
    pub work: Option<PathBuf>,
    /// Extra options.
    pub options: Options,
}

impl Overlay {
    fn check(&self) -> Result<()> {
        if self.lowers.is_empty() {
            return Err(Error::Invalid(
                "an overlay needs at least one lower dir".into(),
            ));
        }
        if self.upper.is_some() != self.work.is_some() {
            return Err(Error::Invalid("upper and work dirs go together".into()));
        }
        Ok(())
    }

    /// The mount as containerd describes it (`lowerdir=a:b,upperdir=...`).
    pub fn to_mount(&self) -> Mount {
        let mut options = Vec::new();
        if self.options.index_off {
            options.push("index=off".to_string());
        }
        if self.options.userxattr {
            options.push("userxattr".to_string());
        }
        if let (Some(u), Some(w)) = (&self.upper, &self.work) {
            options.push(format!("workdir={}", w.display()));
            options.push(format!("upperdir={}", u.display()));
        }
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        options.push(format!("lowerdir={}", lowers.join(":")));
        if self.options.metacopy {
            options.push("metacopy=on".to_string());
        }
        if self.options.redirect_dir {
            options.push("redirect_dir=on".to_string());
        }
        if self.options.volatile {
            options.push("volatile".to_string());
        }
        if self.options.readonly || self.upper.is_none() {
            options.push("ro".to_string());
        }
        Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }
    }

    /// Mounts the overlay on `target` with the new mount API.
    pub fn mount(&self, target: &Path) -> Result<()> {
        self.check()?;
        let merr = |op, kernel: String, source| Error::Mount {
            op,
            target: target.into(),
            kernel,
            err: source,
        };
        let fs = sys::fsopen(c"overlay").map_err(|e| merr("fsopen overlay", String::new(), e))?;
        let set = |key: &std::ffi::CStr, value: &Path| -> Result<()> {
            let v =
                sys::os_cstr(value.as_os_str()).map_err(|e| merr("fsconfig", String::new(), e))?;
            sys::fsconfig_string(fs.as_fd_ref(), key, &v).map_err(|e| {
                let mut said = sys::fs_messages(fs.as_fd_ref());
                if said.is_empty() {
                    said = format!("{}={}", key.to_string_lossy(), value.display());
                }
                merr("fsconfig", said, e)
            })
        };
        let mut appended = true;
        for (i, l) in self.lowers.iter().enumerate() {
            match set(c"lowerdir+", l) {
                Ok(()) => {}
                Err(Error::Mount { err, .. })
                    if i == 0 && err.raw_os_error() == Some(libc::EINVAL) =>
                {
                    appended = false;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !appended {
            // Kernels before 6.8 have no `lowerdir+`: fall back to one option string.
            let joined: Vec<&std::ffi::OsStr> = self.lowers.iter().map(|p| p.as_os_str()).collect();
            let joined = joined.join(std::ffi::OsStr::new(":"));
            set(c"lowerdir", Path::new(&joined))?;
        }
        if let (Some(u), Some(w)) = (&self.upper, &self.work) {
            set(c"upperdir", u)?;
            set(c"workdir", w)?;
        }
        let flag = |key: &std::ffi::CStr| {
            sys::fsconfig_flag(fs.as_fd_ref(), key)
                .map_err(|e| merr("fsconfig", sys::fs_messages(fs.as_fd_ref()), e))
        };
        let string = |key: &std::ffi::CStr, v: &std::ffi::CStr| {
            sys::fsconfig_string(fs.as_fd_ref(), key, v)
                .map_err(|e| merr("fsconfig", sys::fs_messages(fs.as_fd_ref()), e))
        };
        if self.options.userxattr {
            flag(c"userxattr")?;
        }
        if self.options.index_off {
            string(c"index", c"off")?;
        }
        if self.options.metacopy {
            string(c"metacopy", c"on")?;
        }
        if self.options.redirect_dir {
            string(c"redirect_dir", c"on")?;
        }
        if self.options.volatile {
            flag(c"volatile")?;
        }
        let log = KernelLog::here();
        sys::fsconfig_create(fs.as_fd_ref()).map_err(|e| {
            let mut said = sys::fs_messages(fs.as_fd_ref());
            if said.is_empty() {
                said = log.overlay_lines();
            }
            merr("create overlay", said, e)
        })?;
        let readonly = self.options.readonly || self.upper.is_none();
        let mnt = sys::fsmount(fs.as_fd_ref(), readonly)
            .map_err(|e| merr("fsmount", sys::fs_messages(fs.as_fd_ref()), e))?;
        let t =
            sys::os_cstr(target.as_os_str()).map_err(|e| merr("move_mount", String::new(), e))?;
        sys::move_mount(mnt.as_fd_ref(), &t).map_err(|e| merr("move_mount", String::new(), e))?;
        tracing::debug!(target = %target.display(), lowers = self.lowers.len(), "mounted overlay");
        Ok(())
    }
}

trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl AsFdRef for std::os::fd::OwnedFd {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

impl Mount {
    /// A recursive bind mount of `source`, read-only when asked.
    pub fn bind(source: &Path, readonly: bool) -> Mount {
        Mount {
            kind: "bind".into(),
            source: source.display().to_string(),
            options: vec![if readonly { "ro" } else { "rw" }.into(), "rbind".into()],
        }
    }

    /// Parses a containerd overlay mount back into an [`Overlay`].
    pub fn to_overlay(&self) -> Result<Overlay> {
        if self.kind != "overlay" {
            return Err(Error::Invalid(format!(
                "mount type {:?} is not overlay",
                self.kind
            )));
        }
        let mut o = Overlay {
            lowers: Vec::new(),
            upper: None,
            work: None,
            options: Options::default(),
        };
        for opt in &self.options {
            match opt.split_once('=') {
                Some(("lowerdir", v)) => o.lowers = v.split(':').map(PathBuf::from).collect(),
                Some(("upperdir", v)) => o.upper = Some(v.into()),
                Some(("workdir", v)) => o.work = Some(v.into()),
                Some(("index", "off")) => o.options.index_off = true,
                Some(("metacopy", "on")) => o.options.metacopy = true,
                Some(("redirect_dir", "on")) => o.options.redirect_dir = true,
                None if opt == "userxattr" => o.options.userxattr = true,
                None if opt == "volatile" => o.options.volatile = true,
                None if opt == "ro" => o.options.readonly = true,
                None if opt == "rw" => {}
                _ => {
                    return Err(Error::Invalid(format!(
                        "unsupported overlay option {opt:?}"
                    )));
                }
            }
        }
        Ok(o)
    }

    /// Performs this mount on `target`.
    pub fn mount(&self, target: &Path) -> Result<()> {
        match self.kind.as_str() {
            "overlay" => self.to_overlay()?.mount(target),
            "bind" => {
                let merr = |op, source| Error::Mount {
                    op,
                    target: target.into(),
                    kernel: String::new(),
                    err: source,
                };
                let src = sys::cstr(self.source.as_bytes()).map_err(|e| merr("bind", e))?;
                let t = sys::os_cstr(target.as_os_str()).map_err(|e| merr("bind", e))?;
                let flags = libc::MS_BIND | libc::MS_REC;
                sys::mount(&src, &t, None, flags, None).map_err(|e| merr("bind mount", e))?;
                if self.options.iter().any(|o| o == "ro") {
                    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                    if let Err(e) = sys::mount(c"none", &t, None, ro, None) {
                        let _ = sys::umount(&t, true);
                        return Err(merr("remount read-only", e));
                    }
                }
                Ok(())
            }
            other => Err(Error::Invalid(format!("unsupported mount type {other:?}"))),
        }
    }
}

/// Where a `volatile` overlay mount leaves its mark under work dir `work`. While it is there
/// the kernel refuses to mount over that work dir (after a crash the upper may have lost
/// writes); Strata's FUSE union keeps the same mark and the same rule.
pub fn volatile_marker(work: &Path) -> PathBuf {
    work.join("work/incompat/volatile")
}

/// Unmounts `target` (lazily with `detach`).
pub fn unmount(target: &Path, detach: bool) -> Result<()> {
    let t = sys::os_cstr(target.as_os_str()).map_err(|e| Error::io("umount", target, e))?;
    sys::umount(&t, detach).map_err(|e| Error::Mount {
        op: "umount",
        target: target.into(),
        kernel: String::new(),
        err: e,
    })
}

/// One mount of this process's mount namespace, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// Where it is mounted.
    pub target: PathBuf,
    /// Filesystem type, such as `overlay` or `fuse.strata`.
    pub fstype: String,
}

/// The mounts of this process's mount namespace, in mount order.
pub fn mount_table() -> Result<Vec<MountPoint>> {
    use std::io::Read;
    let path = Path::new("/proc/self/mountinfo");
    // procfs gives no size: from an empty buffer std would grow it from 32 bytes, a read each
    // time, and every read makes the kernel walk the table again.
    let mut text = String::with_capacity(64 * 1024);
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| Error::io("read", path, e))?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo lines (`ID PARENT MAJ:MIN ROOT TARGET OPTS [TAGS] - FSTYPE SOURCE SUPER`);
/// the kernel escapes space, tab, newline and backslash in paths as `\ooo`.
fn parse_mountinfo(text: &str) -> Vec<MountPoint> {
    text.lines()
        .filter_map(|l| {
            let target = l.split(' ').nth(4)?;
            let fstype = l.split(" - ").nth(1)?.split(' ').next()?;
            Some(MountPoint {
                target: PathBuf::from(std::ffi::OsString::from_vec(unescape(target))),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether `path` is itself a mount point whose type starts with `fstype_prefix`.
pub fn is_mount_point(path: &Path, fstype_prefix: &str) -> Result<bool> {
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(mount_table()?
        .iter()
        .any(|m| m.target == want && m.fstype.starts_with(fstype_prefix)))
}

/// The mount points strictly below `dir`, deepest first (the order to unmount them in).
pub fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut below: Vec<PathBuf> = mount_table()?
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t != &dir && t.starts_with(&dir))
        .collect();
    below.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    below.dedup();
    Ok(below)
}

/// A position in the kernel log (`/dev/kmsg`), to collect what overlayfs logs during a mount:
/// most of its refusals go there (`pr_err`) rather than into the filesystem context.
struct KernelLog(Option<std::fs::File>);

impl KernelLog {
    /// Opens the log at its current end; `None` inside (when not readable, as for non-root).
    fn here() -> Self {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg");
        KernelLog(
            f.ok()
                .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)).ok().map(|_| f)),
        )
    }

    /// The overlayfs lines logged since [`KernelLog::here`].
    fn overlay_lines(self) -> String {
        use std::io::Read;
        let Some(mut f) = self.0 else {
            return String::new();
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        // Each read returns one record; EAGAIN at the end. Bounded in case of a log flood.
        for _ in 0..256 {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        let msg = msg.lines().next().unwrap_or("").trim();
                        if msg.starts_with("overlayfs:") || msg.starts_with("overlay:") {
                            out.push(msg.to_string());
                        }
                    }
                }
            }
        }
        out.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:45 / /var/x rw shared:2 master:3 - fuse.strata strata rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m,
            vec![
                MountPoint {
                    target: "/mnt two".into(),
                    fstype: "ext3".into()
                },
                MountPoint {
                    target: "/var/x".into(),
                    fstype: "fuse.strata".into()
                },
            ]
        );
        assert_eq!(unescape("a\\134b\\0"), b"a\\b\\0");
    }

    #[test]
    fn options_round_trip() {
        let o = Overlay {
            lowers: vec!["/l1".into(), "/l2".into()],
            upper: Some("/u".into()),
            work: Some("/w".into()),
            options: Options {
                userxattr: true,
                index_off: true,
                metacopy: true,
                redirect_dir: true,
                volatile: true,
                readonly: false,
            },
        };
        let m = o.to_mount();
        assert!(m.options.contains(&"lowerdir=/l1:/l2".to_string()));
        assert_eq!(m.to_overlay().unwrap(), o);
        assert!(
            Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["bogus".into()]
            }
            .to_overlay()
            .is_err()
        );
    }
}
