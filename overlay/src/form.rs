//! The three on-disk forms a layer directory can keep its deletions and opaque directories in,
//! and conversion between them, so one store serves rootful, rootless and FUSE mounts:
//!
//! | form | whiteout of NAME | opaque directory | other overlay metadata |
//! |---|---|---|---|
//! | `kernel` | char device 0:0 `NAME` | `trusted.overlay.opaque=y` | `trusted.overlay.*` |
//! | `userxattr` | char device 0:0 `NAME` | `user.overlay.opaque=y` | `user.overlay.*` |
//! | `wh` (OCI) | empty file `.wh.NAME` | a `.wh..wh..opq` file inside | none can be expressed |
//!
//! Kernel overlay mounts the first form as root and the second with `userxattr` in a user
//! namespace; Strata's FUSE filesystem reads all three. [`check`] counts what a tree holds
//! and lists what keeps it from mounting in a form; [`convert`] rewrites it in place, one entry
//! at a time, new form first: an interrupted conversion leaves entries in both forms, which mean
//! the same, and running it again finishes it. A tree whose metadata cannot be expressed in the
//! target (a `redirect` or `metacopy` in the `wh` form) is refused before anything changes.

use std::ffi::{CStr, CString, OsStr};

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::whiteout::{OPAQUE_MARKER, OPAQUE_VALUE, WHITEOUT_PREFIX, XattrNs};
use crate::{Error, Result, sys};

/// A form of deletions and opaque directories on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Char 0:0 whiteouts, `trusted.overlay.*` xattrs: kernel overlay as root.
    Kernel,
    /// Char 0:0 whiteouts, `user.overlay.*` xattrs: kernel overlay with `userxattr`.
    UserXattr,
    /// `.wh.NAME` files and `.wh..wh..opq` markers: the OCI layer form.
    Wh,
}

impl std::str::FromStr for Form {
    type Err = Error;
    fn from_str(s: &str) -> Result<Form> {
        match s {
            "kernel" => Ok(Form::Kernel),
            "userxattr" => Ok(Form::UserXattr),
            "wh" => Ok(Form::Wh),
            o => Err(Error::Invalid(format!(
                "unknown form {o:?}: expected kernel, userxattr or wh"
            ))),
        }
    }
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Form::Kernel => "kernel",
            Form::UserXattr => "userxattr",
            Form::Wh => "wh",
        })
    }
}

/// The form layers in `dir`'s filesystem can be written in, by someone writing opaque xattrs in
/// `ns`: a char 0:0 and an opaque xattr are tried there (and removed). The kernel's form
/// ([`Form::Kernel`], or [`Form::UserXattr`] for `user.`) if both can be made, the `.wh.` form
/// otherwise (an overlayfs refuses to make char 0:0 on itself; some filesystems take no
/// xattrs).
pub fn writable(dir: &Path, ns: XattrNs) -> Form {
    let Ok(d) = std::fs::File::open(dir) else {
        return Form::Wh;
    };
    let d: OwnedFd = d.into();
    let pid = std::process::id();
    let (dev, sub) = (
        CString::new(format!("probe-form-{pid}-wh")).expect("no NUL"),
        CString::new(format!("probe-form-{pid}-dir")).expect("no NUL"),
    );
    let whiteout = sys::mknodat(d.as_fd(), &dev, libc::S_IFCHR, 0).is_ok();
    let opaque = sys::mkdirat(d.as_fd(), &sub, 0o700).is_ok()
        && sys::lsetxattr(d.as_fd(), &sub, ns.opaque(), OPAQUE_VALUE).is_ok();
    let _ = sys::unlinkat(d.as_fd(), &dev, 0);
    let _ = sys::unlinkat(d.as_fd(), &sub, libc::AT_REMOVEDIR);
    match (whiteout && opaque, ns) {
        (false, _) => Form::Wh,
        (true, XattrNs::Trusted) => Form::Kernel,
        (true, XattrNs::User) => Form::UserXattr,
    }
}

/// What a layer directory holds, by kind, with a few example paths of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Char 0:0 whiteouts.
    pub char_whiteouts: Vec<PathBuf>,
    /// `.wh.NAME` whiteout files.
    pub wh_whiteouts: Vec<PathBuf>,
    /// Directories opaque by `trusted.overlay.opaque`.
    pub opaque_trusted: Vec<PathBuf>,
    /// Directories opaque by `user.overlay.opaque`.
    pub opaque_user: Vec<PathBuf>,
    /// Directories opaque by a `.wh..wh..opq` marker.
    pub opaque_marker: Vec<PathBuf>,
    /// Entries with `trusted.overlay.*` metadata that gives them their meaning (redirect,
    /// metacopy, xattr whiteouts). Hints the kernel does without (origin, impure, nlink) are
    /// not counted, and stay where they are.
    pub meta_trusted: Vec<PathBuf>,
    /// The same in `user.overlay.*`.
    pub meta_user: Vec<PathBuf>,
    /// `.wh.NAME` beside a real NAME: the layer both deletes and holds it.
    pub conflicts: Vec<PathBuf>,
}

impl Report {
    /// Why the tree would not mount as it is in `form` (empty: it would).
    pub fn problems(&self, form: Form) -> Vec<String> {
        let mut out = Vec::new();
        let mut say = |what: &str, v: &[PathBuf]| {
            if let Some(first) = v.first() {
                out.push(format!("{} {what} (first: {})", v.len(), first.display()));
            }
        };
        say(
            "names both deleted and present in this layer",
            &self.conflicts,
        );
        match form {
            Form::Kernel | Form::UserXattr => {
                say(
                    ".wh. whiteout file(s), which kernel overlay shows as plain files",
                    &self.wh_whiteouts,
                );
                say(
                    ".wh..wh..opq marker(s), which kernel overlay ignores",
                    &self.opaque_marker,
                );
                if form == Form::Kernel {
                    say(
                        "user.overlay.opaque dir(s), which kernel overlay reads only with userxattr",
                        &self.opaque_user,
                    );
                    say(
                        "entries with user.overlay.* metadata, read only with userxattr",
                        &self.meta_user,
                    );
                } else {
                    say(
                        "trusted.overlay.opaque dir(s), which a userxattr mount ignores",
                        &self.opaque_trusted,
                    );
                    say(
                        "entries with trusted.overlay.* metadata, which a userxattr mount ignores",
                        &self.meta_trusted,
                    );
                }
            }
            Form::Wh => {
                say(
                    "char 0:0 whiteout(s), which OCI tools read as devices",
                    &self.char_whiteouts,
                );
                say("xattr-opaque dir(s) (trusted)", &self.opaque_trusted);
                say("xattr-opaque dir(s) (user)", &self.opaque_user);
                say(
                    "entries with trusted.overlay.* metadata (redirect, metacopy, ...), which the wh form cannot express",
                    &self.meta_trusted,
                );
                say(
                    "entries with user.overlay.* metadata, which the wh form cannot express",
                    &self.meta_user,
                );
            }
        }
        out
    }

    /// One line of counts.
    pub fn summary(&self) -> String {
        format!(
            "whiteouts: {} char 0:0, {} .wh. files; opaque dirs: {} trusted, {} user, {} .wh..wh..opq; \
             other overlay metadata: {} trusted, {} user; conflicts: {}",
            self.char_whiteouts.len(),
            self.wh_whiteouts.len(),
            self.opaque_trusted.len(),
            self.opaque_user.len(),
            self.opaque_marker.len(),
            self.meta_trusted.len(),
            self.meta_user.len(),
            self.conflicts.len()
        )
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |err| Error::Io {
        op,
        path: path.to_path_buf(),
        err,
    }
}

fn name_c(n: &[u8], at: &Path) -> Result<CString> {
    sys::cstr(n).map_err(io("name", at))
}

/// The overlay xattrs (besides opaque) on entry `name` of `dir`, by namespace.
/// The overlay metadata of an entry that gives it its meaning: `redirect` (a renamed lower
/// directory), `metacopy` (data in a lower file), `whiteout`/`whiteouts` (xattr whiteouts).
fn meta_xattrs(dir: BorrowedFd<'_>, name: &CStr, at: &Path) -> Result<Vec<Vec<u8>>> {
    const MEANING: [&[u8]; 4] = [b"redirect", b"metacopy", b"whiteout", b"whiteouts"];
    let list = sys::llistxattr(dir, name).map_err(io("list xattrs", at))?;
    Ok(list
        .into_iter()
        .filter(|x| {
            XattrNs::ALL.iter().any(|ns| {
                x.strip_prefix(ns.prefix())
                    .is_some_and(|rest| MEANING.contains(&rest))
            })
        })
        .collect())
}

/// A visitor of [`walk`]: `(dir_fd, rel_dir, name, lstat)`.
type Visit<'a> = dyn FnMut(BorrowedFd<'_>, &Path, &[u8], &libc::stat) -> Result<()> + 'a;

/// Walks `root`, calling `each(dir_fd, rel_dir, name, lstat)` for every entry.
fn walk(root: &Path, each: &mut Visit<'_>) -> Result<()> {
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let at = root.join(&rel);
        let fd: OwnedFd = std::fs::File::open(&at).map_err(io("open", &at))?.into();
        let entries = sys::read_dir(fd.as_fd()).map_err(io("read dir", &at))?;
        for (name, _) in entries {
            let c = name_c(&name, &at)?;
            let st = sys::lstatat(fd.as_fd(), &c)
                .map_err(io("stat", &at.join(OsStr::from_bytes(&name))))?;
            each(fd.as_fd(), &rel, &name, &st)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                todo.push(rel.join(OsStr::from_bytes(&name)));
            }
        }
    }
    Ok(())
}

/// Counts the deletions, opaque directories and overlay metadata of the tree at `root`.
pub fn check(root: &Path) -> Result<Report> {
    let mut r = Report::default();
    // The root itself can be opaque.
    classify_dir(&mut r, root, Path::new(""))?;
    walk(root, &mut |dir, rel, name, st| {
        let path = rel.join(OsStr::from_bytes(name));
        let c = name_c(name, &path)?;
        if crate::whiteout::is_whiteout_stat(st) {
            r.char_whiteouts.push(path.clone());
        } else if name == OPAQUE_MARKER {
            r.opaque_marker.push(rel.to_path_buf());
        } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            r.wh_whiteouts.push(path.clone());
            let t = name_c(target, &path)?;
            if sys::lstatat(dir, &t).is_ok() {
                r.conflicts.push(rel.join(OsStr::from_bytes(target)));
            }
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            for ns in XattrNs::ALL {
                if sys::lgetxattr(dir, &c, ns.opaque())
                    .map_err(io("read xattr", &path))?
                    .is_some_and(|v| v == OPAQUE_VALUE)
                {
                    match ns {
                        XattrNs::Trusted => r.opaque_trusted.push(path.clone()),
                        XattrNs::User => r.opaque_user.push(path.clone()),
                    }
                }
            }
        }
        for x in meta_xattrs(dir, &c, &path)? {
            if x.starts_with(XattrNs::Trusted.prefix()) {
                r.meta_trusted.push(path.clone());
            } else {
                r.meta_user.push(path.clone());
            }
        }
        Ok(())
    })?;
    for v in [&mut r.meta_trusted, &mut r.meta_user] {
        v.dedup();
    }
    Ok(r)
}

fn classify_dir(r: &mut Report, root: &Path, rel: &Path) -> Result<()> {
    let fd: OwnedFd = std::fs::File::open(root).map_err(io("open", root))?.into();
    for ns in XattrNs::ALL {
        if sys::fgetxattr(fd.as_fd(), ns.opaque())
            .map_err(io("read xattr", root))?
            .is_some_and(|v| v == OPAQUE_VALUE)
        {
            match ns {
                XattrNs::Trusted => r.opaque_trusted.push(rel.to_path_buf()),
                XattrNs::User => r.opaque_user.push(rel.to_path_buf()),
            }
        }
    }
    Ok(())
}

/// Rewrites the tree at `root` in `to`'s form and returns what it holds afterwards. Refused,
/// with nothing changed, when the tree has what `to` cannot express or a name both deleted and
/// present.
pub fn convert(root: &Path, to: Form) -> Result<Report> {
    let before = check(root)?;
    if !before.conflicts.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: {}",
            root.display(),
            before.problems(to).join("; ")
        )));
    }
    if to == Form::Wh && !(before.meta_trusted.is_empty() && before.meta_user.is_empty()) {
        return Err(Error::Invalid(format!(
            "{}: {} entries carry overlay metadata (redirect, metacopy, ...) the wh form cannot express (first: {}); \
             write the layer out with `strata layer diff` and apply it instead",
            root.display(),
            before.meta_trusted.len() + before.meta_user.len(),
            before
                .meta_trusted
                .first()
                .or(before.meta_user.first())
                .expect("one of them")
                .display()
        )));
    }
    let ns_to = match to {
        Form::UserXattr => Some(XattrNs::User),
        Form::Kernel => Some(XattrNs::Trusted),
        Form::Wh => None,
    };
    // The root directory's own opaque mark.
    let root_fd: OwnedFd = std::fs::File::open(root).map_err(io("open", root))?.into();
    redo_dir(root_fd.as_fd(), root, ns_to)?;
    walk(root, &mut |dir, rel, name, st| {
        let path = root.join(rel).join(OsStr::from_bytes(name));
        let c = name_c(name, &path)?;
        // Other overlay metadata moves to the target namespace (kernel <-> userxattr).
        if let Some(ns) = ns_to {
            for x in meta_xattrs(dir, &c, &path)? {
                if x.starts_with(ns.prefix()) {
                    continue;
                }
                let other = XattrNs::ALL
                    .into_iter()
                    .find(|o| x.starts_with(o.prefix()))
                    .expect("an overlay xattr");
                let mut new = ns.prefix().to_vec();
                new.extend_from_slice(&x[other.prefix().len()..]);
                let (old_c, new_c) = (name_c(&x, &path)?, name_c(&new, &path)?);
                if let Some(v) = sys::lgetxattr(dir, &c, &old_c).map_err(io("read xattr", &path))? {
                    sys::lsetxattr(dir, &c, &new_c, &v).map_err(io("write xattr", &path))?;
                    sys::lremovexattr(dir, &c, &old_c).map_err(io("remove xattr", &path))?;
                }
            }
        }
        if crate::whiteout::is_whiteout_stat(st) && to == Form::Wh {
            let mut wh = WHITEOUT_PREFIX.to_vec();
            wh.extend_from_slice(name);
            let w = name_c(&wh, &path)?;
            let fd = sys::openat(
                dir,
                &w,
                libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW,
                0o644,
            )
            .map_err(io("create", &path))?;
            drop(fd);
            sys::unlinkat(dir, &c, 0).map_err(io("remove", &path))?;
        } else if let Some(target) = name
            .strip_prefix(WHITEOUT_PREFIX)
            .filter(|_| name != OPAQUE_MARKER)
        {
            if to != Form::Wh {
                let t = name_c(target, &path)?;
                sys::mknodat(dir, &t, libc::S_IFCHR, 0).map_err(io("make whiteout", &path))?;
                sys::unlinkat(dir, &c, 0).map_err(io("remove", &path))?;
            }
        } else if name == OPAQUE_MARKER {
            if to != Form::Wh {
                // The xattr was set with the directory (below, parents first); now the marker goes.
                sys::unlinkat(dir, &c, 0).map_err(io("remove", &path))?;
            }
        } else if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let sub = sys::openat(
                dir,
                &c,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(io("open", &path))?;
            redo_dir(sub.as_fd(), &path, ns_to)?;
        }
        Ok(())
    })?;
    check(root)
}

/// Puts directory `fd`'s opaque mark (if it has one, in any form) in the target form: the
/// `ns_to` xattr, or (None) a `.wh..wh..opq` marker inside; the other forms go.
fn redo_dir(fd: BorrowedFd<'_>, path: &Path, ns_to: Option<XattrNs>) -> Result<()> {
    let marker = c".wh..wh..opq";
    let has_marker = sys::lstatat(fd, marker).is_ok();
    let mut opaque = has_marker;
    for ns in XattrNs::ALL {
        opaque |= sys::fgetxattr(fd, ns.opaque())
            .map_err(io("read xattr", path))?
            .is_some_and(|v| v == OPAQUE_VALUE);
    }
    if !opaque {
        return Ok(());
    }
    match ns_to {
        Some(ns) => {
            sys::fsetxattr(fd, ns.opaque(), OPAQUE_VALUE).map_err(io("write xattr", path))?;
            for other in XattrNs::ALL.into_iter().filter(|o| *o != ns) {
                sys::fremovexattr(fd, other.opaque()).map_err(io("remove xattr", path))?;
            }
            // The marker file itself is removed when the walk reaches it.
        }
        None => {
            if !has_marker {
                let m = sys::openat(
                    fd,
                    marker,
                    libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW,
                    0o644,
                )
                .map_err(io("create", path))?;
                drop(m);
            }
            for ns in XattrNs::ALL {
                sys::fremovexattr(fd, ns.opaque()).map_err(io("remove xattr", path))?;
            }
        }
    }
    Ok(())
}
