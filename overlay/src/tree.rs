//! Copying a directory tree with everything a layer needs kept: owners, modes (setuid and
//! sticky bits too), atime and mtime, every xattr (overlay's own included, so an upper dir's
//! whiteouts, opaque markers, redirects and metacopy stay valid), devices, fifos, sockets,
//! symlinks, and hard links as hard links. Data moves with `copy_file_range(2)`, which the
//! kernel turns into a reflink where the filesystem has them, and holes stay holes.
//!
//! Used to adopt a running container's upper dir as a new layer, to pre-fill volumes, and by
//! `strata cp`. Nothing is followed: symlinks are copied as symlinks, and every name is
//! resolved relative to its parent's fd.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::{Error, Result, sys};

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyReport {
    /// Entries made (directories, files, links, ...), the top directory excluded.
    pub entries: u64,
    /// Bytes of file data copied (holes not counted).
    pub bytes: u64,
}

struct Copier {
    src_root: PathBuf,
    dst_root: OwnedFd,
    /// (dev, ino) of a multiply-linked source file -> its first copy, relative to `dst_root`.
    links: HashMap<(u64, u64), CString>,
    report: CopyReport,
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |err| Error::Io { op, path, err }
}

const DIR_FLAGS: i32 = libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Copies the tree `src` (a directory) to `dst`, which must be missing or an empty directory;
/// `dst` takes `src`'s owner, mode, xattrs and times. On error the partial copy is left for the
/// caller to remove (copy into a temp dir and rename it for atomicity).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyReport> {
    let src_fd = std::fs::File::open(src)
        .map(OwnedFd::from)
        .map_err(io_err("open", src))?;
    if !sys::lstatat(src_fd.as_fd(), c"")
        .map_err(io_err("stat", src))?
        .st_mode
        & libc::S_IFMT
        == libc::S_IFDIR
    {
        return Err(Error::Io {
            op: "copy",
            path: src.into(),
            err: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    match std::fs::create_dir(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let mut it = std::fs::read_dir(dst).map_err(io_err("read dir", dst))?;
            if it.next().is_some() {
                return Err(Error::Target {
                    path: dst.into(),
                    reason: "not empty".into(),
                });
            }
        }
        Err(e) => return Err(io_err("create", dst)(e)),
    }
    let dst_fd = std::fs::File::open(dst)
        .map(OwnedFd::from)
        .map_err(io_err("open", dst))?;
    let mut c = Copier {
        src_root: src.into(),
        dst_root: dst_fd.try_clone().map_err(io_err("dup", dst))?,
        links: HashMap::new(),
        report: CopyReport::default(),
    };
    c.dir(src_fd.as_fd(), dst_fd.as_fd(), &mut Vec::new())?;
    let st = sys::lstatat(src_fd.as_fd(), c"").map_err(io_err("stat", src))?;
    c.meta(src_fd.as_fd(), c"", dst_fd.as_fd(), c"", &st, src)?;
    Ok(c.report)
}

impl Copier {
    fn path(&self, rel: &[u8]) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        self.src_root.join(std::ffi::OsStr::from_bytes(rel))
    }

    fn dir(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, rel: &mut Vec<u8>) -> Result<()> {
        let mut names = sys::read_dir(src).map_err(|e| io_err("read dir", self.path(rel))(e))?;
        names.sort();
        for (name, _) in names {
            let len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&name);
            let r = self.entry(src, dst, &name, rel);
            rel.truncate(len);
            r?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        sdir: BorrowedFd<'_>,
        ddir: BorrowedFd<'_>,
        name: &[u8],
        rel: &mut Vec<u8>,
    ) -> Result<()> {
        let path = self.path(rel);
        let cname = sys::cstr(name).map_err(io_err("name", &path))?;
        let st = sys::lstatat(sdir, &cname).map_err(io_err("stat", &path))?;
        let kind = st.st_mode & libc::S_IFMT;
        self.report.entries += 1;
        if kind != libc::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                return sys::linkat(self.dst_root.as_fd(), first, ddir, &cname)
                    .map_err(io_err("hard link", &path));
            }
            let rel_c = sys::cstr(rel).map_err(io_err("name", &path))?;
            self.links.insert(key, rel_c);
        }
        match kind {
            libc::S_IFDIR => {
                sys::mkdirat(ddir, &cname, 0o700).map_err(io_err("create dir", &path))?;
                let s = sys::openat(sdir, &cname, DIR_FLAGS, 0).map_err(io_err("open", &path))?;
                let d = sys::openat(ddir, &cname, DIR_FLAGS, 0).map_err(io_err("open", &path))?;
                self.dir(s.as_fd(), d.as_fd(), rel)?;
                self.meta(s.as_fd(), c"", d.as_fd(), c"", &st, &path)
            }
            libc::S_IFREG => {
                let s = sys::openat(sdir, &cname, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                    .map(std::fs::File::from)
                    .map_err(io_err("open", &path))?;
                let d = sys::openat(
                    ddir,
                    &cname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map(std::fs::File::from)
                .map_err(io_err("create", &path))?;
                self.report.bytes += copy_sparse(&s, &d).map_err(io_err("copy data of", &path))?;
                self.meta(s.as_fd(), c"", d.as_fd(), c"", &st, &path)
            }
            libc::S_IFLNK => {
                let target = sys::readlinkat(sdir, &cname).map_err(io_err("read link", &path))?;
                let t = sys::cstr(&target).map_err(io_err("link target", &path))?;
                sys::symlinkat(&t, ddir, &cname).map_err(io_err("create symlink", &path))?;
                self.meta(sdir, &cname, ddir, &cname, &st, &path)
            }
            _ => {
                sys::mknodat(ddir, &cname, kind | 0o600, st.st_rdev)
                    .map_err(io_err("create node", &path))?;
                self.meta(sdir, &cname, ddir, &cname, &st, &path)
            }
        }
    }

    /// Owner, xattrs, mode, then times (in that order: chown clears setuid bits, and the
    /// xattr and mode changes would touch ctime only). With an empty name the fds are the
    /// files themselves.
    fn meta(
        &self,
        sdir: BorrowedFd<'_>,
        sname: &CStr,
        ddir: BorrowedFd<'_>,
        dname: &CStr,
        st: &libc::stat,
        path: &Path,
    ) -> Result<()> {
        sys::lchownat(ddir, dname, st.st_uid, st.st_gid).map_err(io_err("chown", path))?;
        for attr in sys::llistxattr(sdir, sname).map_err(io_err("list xattrs of", path))? {
            let a = sys::cstr(&attr).map_err(io_err("xattr name", path))?;
            if let Some(v) =
                sys::lgetxattr(sdir, sname, &a).map_err(io_err("read xattr of", path))?
            {
                sys::lsetxattr(ddir, dname, &a, &v).map_err(io_err("set xattr on", path))?;
            }
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFLNK {
            let mode = st.st_mode & 0o7777;
            if dname.is_empty() {
                sys::fchmod(ddir, mode).map_err(io_err("chmod", path))?;
            } else {
                sys::fchmodat(ddir, dname, mode).map_err(io_err("chmod", path))?;
            }
        }
        sys::lutimes2(
            ddir,
            dname,
            (st.st_atime, st.st_atime_nsec as u32),
            (st.st_mtime, st.st_mtime_nsec as u32),
        )
        .map_err(io_err("set times of", path))
    }
}

/// Copies the data of `src` into the new, empty file `dst`, keeping holes, as kernel
/// overlay's copy-up does: only the ranges `SEEK_DATA` finds are copied, by
/// `copy_file_range` (a reflink where the filesystem has them; read and write where the
/// kernel can't), and `dst` is then sized as `src`, so a sparse file stays sparse. Where the
/// filesystem reports no holes, the whole file is data. Returns the bytes copied.
pub fn copy_sparse(src: &std::fs::File, dst: &std::fs::File) -> io::Result<u64> {
    use nix::errno::Errno;
    use nix::unistd::{Whence, lseek};
    let len = src.metadata()?.len();
    let (mut off, mut copied) = (0u64, 0u64);
    while off < len {
        let data = match lseek(src, off as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => break, // a hole to the end
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => off,
            Err(e) => return Err(e.into()),
        };
        let end = match lseek(src, data as i64, Whence::SeekHole) {
            Ok(h) if h as u64 > data => (h as u64).min(len),
            Ok(_) | Err(Errno::EINVAL | Errno::EOPNOTSUPP) => len,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let n = copy_range(src, dst, data, end - data)?;
        copied += n;
        off = data + n;
        if n < end - data {
            break; // the source got shorter
        }
    }
    // Ends in a hole (or is empty): the copy's length is not written by any data.
    if off < len {
        dst.set_len(len)?;
    }
    Ok(copied)
}

/// Copies `len` bytes at `at` from `src` to the same place in `dst`: `copy_file_range` (a
/// reflink or an in-kernel copy), or read and write where the two filesystems can't do that
/// (different kinds). Returns the bytes copied, fewer at the source's end.
fn copy_range(src: &std::fs::File, dst: &std::fs::File, at: u64, len: u64) -> io::Result<u64> {
    use nix::errno::Errno;
    use std::os::unix::fs::FileExt;
    let (mut i, mut o) = (at as i64, at as i64);
    let mut left = len;
    while left > 0 {
        let want = left.min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut i), dst, Some(&mut o), want) {
            Ok(0) => return Ok(len - left),
            Ok(n) => left -= n as u64,
            Err(Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL) => {
                let mut buf = vec![0u8; left.min(1 << 20) as usize];
                while left > 0 {
                    let want = left.min(buf.len() as u64) as usize;
                    let n = src.read_at(&mut buf[..want], i as u64)?;
                    if n == 0 {
                        return Ok(len - left);
                    }
                    dst.write_all_at(&buf[..n], o as u64)?;
                    (i, o, left) = (i + n as i64, o + n as i64, left - n as u64);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(len)
}

/// Bytes used by the files below `dir` (regular file sizes, each hard-linked file once), as
/// `du --apparent-size` counts them, and the number of entries.
pub fn usage(dir: &Path) -> Result<(u64, u64)> {
    fn walk(
        fd: BorrowedFd<'_>,
        path: &Path,
        seen: &mut std::collections::HashSet<(u64, u64)>,
        acc: &mut (u64, u64),
    ) -> Result<()> {
        for (name, _) in sys::read_dir(fd).map_err(io_err("read dir", path))? {
            let c = sys::cstr(&name).map_err(io_err("name", path))?;
            let p = path.join(std::ffi::OsStr::new(&*String::from_utf8_lossy(&name)));
            let st = sys::lstatat(fd, &c).map_err(io_err("stat", &p))?;
            acc.1 += 1;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    let d = sys::openat(fd, &c, DIR_FLAGS, 0).map_err(io_err("open", &p))?;
                    walk(d.as_fd(), &p, seen, acc)?;
                }
                libc::S_IFREG if st.st_nlink > 1 && !seen.insert((st.st_dev, st.st_ino)) => {}
                libc::S_IFREG | libc::S_IFLNK => acc.0 += st.st_size as u64,
                _ => {}
            }
        }
        Ok(())
    }
    let fd = std::fs::File::open(dir)
        .map(OwnedFd::from)
        .map_err(io_err("open", dir))?;
    let mut acc = (0, 0);
    walk(fd.as_fd(), dir, &mut Default::default(), &mut acc)?;
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn copies_keep_holes() {
        use std::os::unix::fs::FileExt;
        // On disk: tmpfs may be /tmp, and both keep holes, but a disk is what layers are on.
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let src = t.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        drop(f);
        let r = copy_tree(&src, &t.path().join("dst")).unwrap();
        assert!(r.bytes < 1 << 20, "{} bytes copied", r.bytes);
        let (a, b) = (
            std::fs::read(src.join("sparse")).unwrap(),
            std::fs::read(t.path().join("dst/sparse")).unwrap(),
        );
        assert!(a == b, "same content");
        let m = std::fs::metadata(t.path().join("dst/sparse")).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() < 2048,
            "{} blocks of 512 bytes allocated",
            m.blocks()
        );
    }

    #[test]
    fn copies_across_filesystems_and_up_to_the_last_byte() {
        use std::os::unix::fs::FileExt;
        // tmpfs to disk: copy_file_range refuses (EXDEV), so bytes are read and written.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let disk = tempfile::tempdir_in("/var/tmp").unwrap();
        for (name, len) in [("ends-in-data", 5 << 20), ("small", 4096), ("empty", 0)] {
            let p = shm.path().join(name);
            let f = std::fs::File::create(&p).unwrap();
            if len > 0 {
                f.write_all_at(b"head", 0).unwrap();
                f.write_all_at(&vec![9u8; 4096], len - 4096).unwrap();
            }
            drop(f);
            let s = std::fs::File::open(&p).unwrap();
            let d = std::fs::File::create(disk.path().join(name)).unwrap();
            copy_sparse(&s, &d).unwrap();
            drop(d);
            let (a, b) = (
                std::fs::read(&p).unwrap(),
                std::fs::read(disk.path().join(name)).unwrap(),
            );
            assert_eq!(a.len() as u64, len, "{name}");
            assert!(a == b, "{name}: same bytes");
        }
    }

    #[test]
    fn copies_metadata_links_and_data() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::fs::write(src.join("d/f"), vec![7u8; 300_000]).unwrap();
        std::fs::hard_link(src.join("d/f"), src.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", src.join("l")).unwrap();
        std::fs::set_permissions(src.join("d/e"), std::fs::Permissions::from_mode(0o1751)).unwrap();
        nix::unistd::mkfifo(
            &src.join("p"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        let dst = t.path().join("dst");
        let r = copy_tree(&src, &dst).unwrap();
        assert_eq!(r.entries, 6);
        assert_eq!(r.bytes, 300_000);
        assert_eq!(std::fs::read(dst.join("g")).unwrap(), vec![7u8; 300_000]);
        let (a, b) = (
            std::fs::metadata(dst.join("d/f")).unwrap(),
            std::fs::metadata(dst.join("g")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "hard links stay hard links");
        assert_eq!(std::fs::read_link(dst.join("l")).unwrap(), Path::new("d/f"));
        let e = std::fs::metadata(dst.join("d/e")).unwrap();
        assert_eq!(e.mode() & 0o7777, 0o1751);
        assert_eq!(
            e.mtime(),
            std::fs::metadata(src.join("d/e")).unwrap().mtime()
        );
        assert_eq!(
            std::fs::metadata(dst.join("p")).unwrap().mode() & 0o777,
            0o640
        );
        assert_eq!(usage(&dst).unwrap(), (300_000 + 3, 6));
        // A non-empty target is refused.
        assert!(matches!(copy_tree(&src, &dst), Err(Error::Target { .. })));
    }
}
