//! Reading one filesystem entry into a tar entry.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::archive::{Entry, Kind};
use crate::sys;
use crate::whiteout;

/// The tar entry for the file `name` in `dir`, whose `lstat` is `st`; `None` for sockets, which
/// a tar cannot hold. Overlay xattrs are left out; the others are sorted by name.
pub(crate) fn read(
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    path: Vec<u8>,
) -> std::io::Result<Option<Entry>> {
    let Some(mut e) = read_meta(dir, name, st, path)? else {
        return Ok(None);
    };
    e.xattrs = xattrs(dir, name)?;
    Ok(Some(e))
}

/// The tar entry without xattrs.
fn read_meta(
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    path: Vec<u8>,
) -> std::io::Result<Option<Entry>> {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFCHR => Kind::Char,
        libc::S_IFBLK => Kind::Block,
        libc::S_IFIFO => Kind::Fifo,
        _ => return Ok(None),
    };
    let mut e = Entry::new(path, kind);
    e.mode = st.st_mode & 0o7777;
    e.uid = st.st_uid;
    e.gid = st.st_gid;
    e.mtime = st.st_mtime;
    e.mtime_nsec = st.st_mtime_nsec as u32;
    if kind == Kind::File {
        e.size = st.st_size as u64;
    }
    if kind == Kind::Symlink {
        e.link = sys::readlinkat(dir, name)?;
    }
    if matches!(kind, Kind::Char | Kind::Block) {
        e.dev_major = sys::major(st.st_rdev);
        e.dev_minor = sys::minor(st.st_rdev);
    }
    Ok(Some(e))
}

/// The xattrs of `name` in `dir` other than overlay's own, sorted by name.
pub(crate) fn xattrs(dir: BorrowedFd<'_>, name: &CStr) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for attr in sys::llistxattr(dir, name)? {
        if whiteout::is_overlay_xattr(&attr) {
            continue;
        }
        let cattr = sys::cstr(&attr)?;
        if let Some(v) = sys::lgetxattr(dir, name, &cattr)? {
            out.push((attr, v));
        }
    }
    out.sort();
    Ok(out)
}

/// The value of overlay xattr `attr` (in either namespace) on `name` in `dir`.
pub(crate) fn overlay_xattr(
    dir: BorrowedFd<'_>,
    name: &CStr,
    pick: fn(whiteout::XattrNs) -> &'static CStr,
) -> std::io::Result<Option<Vec<u8>>> {
    for ns in whiteout::XattrNs::ALL {
        match sys::lgetxattr(dir, name, pick(ns)) {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Opens regular file `name` in `dir` for reading, never following a symlink.
pub(crate) fn open(dir: BorrowedFd<'_>, name: &CStr) -> std::io::Result<File> {
    sys::openat(dir, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0).map(File::from)
}

/// Joins a relative tree path and a name.
pub(crate) fn child(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        [rel, b"/", name].concat()
    }
}

/// The tar entry deleting `name` in directory `rel`.
pub(crate) fn whiteout(rel: &[u8], name: &[u8]) -> Entry {
    let mut e = Entry::new(
        child(rel, &[whiteout::WHITEOUT_PREFIX, name].concat()),
        Kind::File,
    );
    e.mode = 0o644;
    e
}

/// The tar entry marking directory `rel` opaque.
pub(crate) fn opaque(rel: &[u8]) -> Entry {
    let mut e = Entry::new(child(rel, whiteout::OPAQUE_MARKER), Kind::File);
    e.mode = 0o644;
    e
}

/// The overlay metadata of an upper entry.
#[derive(Debug, Default)]
pub(crate) struct OverlayMeta {
    /// The opaque xattr is `y`.
    pub(crate) opaque: bool,
    /// The redirect xattr's value.
    pub(crate) redirect: Option<Vec<u8>>,
    /// The metacopy xattr is present.
    pub(crate) metacopy: bool,
}

/// An entry read with one xattr listing: the tar entry, its overlay metadata, and for regular
/// files and directories the fd opened to read them (data, or children).
pub(crate) struct Read {
    pub(crate) entry: Entry,
    pub(crate) overlay: OverlayMeta,
    pub(crate) fd: Option<OwnedFd>,
}

/// Reads `name` in `dir` (whose `lstat` is `st`) for the native diff; `None` for sockets.
/// Files and directories are opened (never following a symlink) and their xattrs read through
/// the fd, which spares a path lookup per xattr call.
pub(crate) fn read_native(
    dir: BorrowedFd<'_>,
    name: &CStr,
    st: &libc::stat,
    path: Vec<u8>,
) -> std::io::Result<Option<Read>> {
    let fmt = st.st_mode & libc::S_IFMT;
    let fd = match fmt {
        libc::S_IFREG => Some(sys::openat(
            dir,
            name,
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )?),
        libc::S_IFDIR => Some(sys::openat(
            dir,
            name,
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )?),
        _ => None,
    };
    let Some(mut e) = read_meta(dir, name, st, path)? else {
        return Ok(None);
    };
    let names = match &fd {
        Some(fd) => sys::flistxattr(fd.as_fd())?,
        None => sys::llistxattr(dir, name)?,
    };
    let mut overlay = OverlayMeta::default();
    for attr in names {
        let cattr = sys::cstr(&attr)?;
        let value = match &fd {
            Some(fd) => sys::fgetxattr(fd.as_fd(), &cattr)?,
            None => sys::lgetxattr(dir, name, &cattr)?,
        };
        let Some(value) = value else { continue };
        if whiteout::is_overlay_xattr(&attr) {
            let key = whiteout::XattrNs::ALL
                .iter()
                .find_map(|ns| attr.strip_prefix(ns.prefix()))
                .unwrap_or(b"");
            match key {
                b"opaque" => overlay.opaque = value == whiteout::OPAQUE_VALUE,
                b"redirect" => overlay.redirect = Some(value),
                b"metacopy" => overlay.metacopy = true,
                _ => {}
            }
        } else {
            e.xattrs.push((attr, value));
        }
    }
    e.xattrs.sort();
    Ok(Some(Read {
        entry: e,
        overlay,
        fd,
    }))
}
