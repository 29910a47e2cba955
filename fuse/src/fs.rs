//! The `fuser::Filesystem` glue: each request is turned into a call on the [`Stack`] model and
//! the inode table, and its result or errno is sent back. This first increment serves a
//! read-only union (lookup, getattr, readlink, open/read, readdir, statfs, xattrs); writes
//! answer `EROFS`.
//!
//! Requests are served by several threads (fuser's `n_threads`); nothing holds a lock across
//! I/O: the inode table's lock covers map updates only, and open files live in a handle table
//! whose lock is held just long enough to clone an `Arc<File>`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use nix::sys::stat::FileStat;
use strata_overlay::whiteout::is_overlay_xattr;

use crate::layer::{Resolved, Stack};
use crate::node::Nodes;

/// How long the kernel may cache entries and attributes: the lower layers never change under a
/// mount, so a second is safe and saves most repeated lookups.
const TTL: Duration = Duration::from_secs(1);

/// What an open handle refers to.
enum Handle {
    File(Arc<File>),
    /// A directory's merged listing, taken at opendir: (name, node, type).
    Dir(Arc<Vec<(std::ffi::OsString, u64, FileType)>>),
}

/// The union filesystem served over FUSE.
pub struct Union {
    stack: Stack,
    nodes: Nodes,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, st: &FileStat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

impl Union {
    /// A union over `stack`.
    pub fn new(stack: Stack) -> Union {
        Union {
            stack,
            nodes: Nodes::new(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The merged view's entry for node `ino`: its path and what it is now.
    fn resolve(&self, ino: u64) -> Result<(PathBuf, Resolved), Errno> {
        let path = self.nodes.path(ino).ok_or(Errno::ESTALE)?;
        let r = self.stack.resolve(&path).ok_or(Errno::ENOENT)?;
        Ok((path, r))
    }

    /// The real path holding `path` in the merged view.
    fn real(&self, path: &Path, r: &Resolved) -> PathBuf {
        self.stack.path(r.layer(), path)
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, h);
        fh
    }

    fn file(&self, fh: u64) -> Option<Arc<File>> {
        match self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
        {
            Some(Handle::File(f)) => Some(f.clone()),
            _ => None,
        }
    }

    fn listing(&self, fh: u64) -> Option<Arc<Vec<(std::ffi::OsString, u64, FileType)>>> {
        match self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
        {
            Some(Handle::Dir(d)) => Some(d.clone()),
            _ => None,
        }
    }

    fn xattr_names(&self, real: &Path) -> std::io::Result<Vec<u8>> {
        let list = crate::sys::llistxattr(real)?;
        let mut out = Vec::new();
        for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            // overlayfs keeps its own xattrs out of the merged view.
            if !is_overlay_xattr(name) {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        Ok(out)
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl fuser::Filesystem for Union {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = (|| {
            let (ppath, p) = self.resolve(parent.0)?;
            let Resolved::Dir { layers, .. } = p else {
                return Err(Errno::ENOTDIR);
            };
            let child = self
                .stack
                .lookup(&layers, &ppath, name)
                .ok_or(Errno::ENOENT)?;
            let path = ppath.join(name);
            let ino = self.nodes.number(&path);
            Ok(attr(ino, child.stat()))
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.resolve(ino.0) {
            Ok((_, r)) => reply.attr(&TTL, &attr(ino.0, r.stat())),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .resolve(ino.0)
            .and_then(|(p, r)| std::fs::read_link(self.real(&p, &r)).map_err(errno))
        {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let r = self
            .resolve(ino.0)
            .and_then(|(p, r)| File::open(self.real(&p, &r)).map_err(errno));
        match r {
            Ok(f) => reply.opened(
                FileHandle(self.add_handle(Handle::File(Arc::new(f)))),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(errno(e)),
            }
        }
        reply.data(&buf[..done]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        // Read-only: nothing is buffered here.
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let (path, r) = self.resolve(ino.0)?;
            let Resolved::Dir { layers, .. } = r else {
                return Err(Errno::ENOTDIR);
            };
            let names = self.stack.read_dir(&layers, &path).map_err(errno)?;
            let parent = path
                .parent()
                .map_or(crate::node::ROOT, |p| self.nodes.number(p));
            let mut list = vec![
                (".".into(), ino.0, FileType::Directory),
                ("..".into(), parent, FileType::Directory),
            ];
            for (name, e) in names {
                let n = self.nodes.number(&path.join(&name));
                list.push((name, n, file_type(e.kind)));
            }
            Ok(self.add_handle(Handle::Dir(Arc::new(list))))
        })();
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(list) = self.listing(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (name, n, kind)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*n), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: fuser::ReplyEmpty,
    ) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let top = &self.stack.layers()[0].root;
        match nix::sys::statvfs::statvfs(top) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if is_overlay_xattr(name.as_bytes()) {
            return reply.error(Errno::NO_XATTR);
        }
        match self
            .resolve(ino.0)
            .and_then(|(p, r)| crate::sys::lgetxattr(&self.real(&p, &r), name).map_err(errno))
        {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self
            .resolve(ino.0)
            .and_then(|(p, r)| self.xattr_names(&self.real(&p, &r)).map_err(errno))
        {
            Ok(v) => reply_xattr(reply, size, &v),
            Err(e) => reply.error(e),
        }
    }
}

/// Mount options: read-only, the kernel checking permissions from the attributes we report
/// (as kernel overlay does), `allow_other` when root (so every user sees what kernel overlay
/// would let them see), `fsname` as given.
pub fn config(fsname: &str, threads: usize) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::FSName(fsname.into()),
        fuser::MountOption::Subtype("strata".into()),
        fuser::MountOption::RO,
        fuser::MountOption::DefaultPermissions,
    ];
    if nix::unistd::geteuid().is_root() {
        c.acl = fuser::SessionACL::All;
    }
    c.n_threads = Some(threads.max(1));
    c.clone_fd = true;
    c
}

/// Serves `union` at `mountpoint` until it is unmounted (`umount`, `fusermount3 -u`).
pub fn serve(union: Union, mountpoint: &Path, config: &fuser::Config) -> std::io::Result<()> {
    fuser::mount2(union, mountpoint, config)
}
