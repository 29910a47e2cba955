//! The generic diff: compares two plain trees (a lower view and an upper view) and writes what
//! turns the first into the second, for FUSE and non-overlay cases.
//!
//! Entries are compared by type, mode, owner, device, size, mtime (to the nanosecond), xattrs
//! and link target; file content is compared as well when the mtimes carry no nanoseconds (a
//! file system or archive that truncates times could hide a same-size rewrite otherwise).
//! Hard-link groups that form or split are caught by comparing each path's link group in both
//! trees; a changed group is written whole, so its links resolve inside the layer.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::{DiffOptions, DiffReport, Sink, entry};
use crate::archive::{Entry, Kind};
use crate::{Error, Result, sys};

/// Kind of a change between two trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    /// Only in the upper tree.
    Added,
    /// In both, different.
    Modified,
    /// Only in the lower tree.
    Deleted,
}

/// A path as components; ordering is tree order (a directory before its children).
pub(crate) type Key = Vec<Vec<u8>>;

/// The changes between `lower` and `upper`, in tree order.
pub(crate) fn compute(lower: &Path, upper: &Path) -> Result<BTreeMap<Key, ChangeKind>> {
    let lfd: OwnedFd = File::open(lower)
        .map_err(|e| Error::io("open lower tree", lower, e))?
        .into();
    let ufd: OwnedFd = File::open(upper)
        .map_err(|e| Error::io("open upper tree", upper, e))?
        .into();
    let mut w = Walk {
        upper,
        lower,
        changes: BTreeMap::new(),
        upper_ino: HashMap::new(),
        lower_ino: HashMap::new(),
    };
    w.dir(Some(lfd.as_fd()), ufd.as_fd(), &Vec::new())?;
    w.fix_links();
    Ok(w.changes)
}

struct Walk<'a> {
    upper: &'a Path,
    lower: &'a Path,
    changes: BTreeMap<Key, ChangeKind>,
    /// Upper path -> inode, for entries with links or whose lower had links.
    upper_ino: HashMap<Key, (u64, u64)>,
    /// Upper path -> inode of the lower entry at the same path, when that had links.
    lower_ino: HashMap<Key, (u64, u64)>,
}

fn key_str(k: &Key) -> Vec<u8> {
    k.join(&b'/')
}

impl Walk<'_> {
    fn err(&self, op: &'static str, upper: bool, k: &Key, e: std::io::Error) -> Error {
        let base = if upper { self.upper } else { self.lower };
        Error::io(
            op,
            base.join(String::from_utf8_lossy(&key_str(k)).as_ref()),
            e,
        )
    }

    fn dir(&mut self, l: Option<BorrowedFd<'_>>, u: BorrowedFd<'_>, rel: &Key) -> Result<()> {
        let mut unames = sys::read_dir(u).map_err(|e| self.err("read dir", true, rel, e))?;
        unames.sort();
        let mut lnames = match l {
            Some(l) => sys::read_dir(l).map_err(|e| self.err("read dir", false, rel, e))?,
            None => Vec::new(),
        };
        lnames.sort();
        let (mut i, mut j) = (0, 0);
        while i < unames.len() || j < lnames.len() {
            let order = match (unames.get(i), lnames.get(j)) {
                (Some(a), Some(b)) => a.0.cmp(&b.0),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            let mut key = rel.clone();
            match order {
                std::cmp::Ordering::Greater => {
                    key.push(lnames[j].0.clone());
                    j += 1;
                    self.changes.insert(key, ChangeKind::Deleted);
                }
                std::cmp::Ordering::Less => {
                    key.push(unames[i].0.clone());
                    i += 1;
                    self.added(u, key)?;
                }
                std::cmp::Ordering::Equal => {
                    key.push(unames[i].0.clone());
                    i += 1;
                    j += 1;
                    self.both(l.expect("lower names come from a lower dir"), u, key)?;
                }
            }
        }
        Ok(())
    }

    fn open_dir(
        &self,
        dir: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        upper: bool,
        k: &Key,
    ) -> Result<OwnedFd> {
        sys::openat(
            dir,
            name,
            libc::O_DIRECTORY | libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| self.err("open dir", upper, k, e))
    }

    fn added(&mut self, u: BorrowedFd<'_>, key: Key) -> Result<()> {
        let name = sys::cstr(key.last().expect("non-empty key"))
            .map_err(|e| self.err("name", true, &key, e))?;
        let st = sys::lstatat(u, &name).map_err(|e| self.err("lstat", true, &key, e))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let sub = self.open_dir(u, &name, true, &key)?;
            self.changes.insert(key.clone(), ChangeKind::Added);
            return self.dir(None, sub.as_fd(), &key);
        }
        if st.st_nlink > 1 {
            self.upper_ino.insert(key.clone(), (st.st_dev, st.st_ino));
        }
        self.changes.insert(key, ChangeKind::Added);
        Ok(())
    }

    fn both(&mut self, l: BorrowedFd<'_>, u: BorrowedFd<'_>, key: Key) -> Result<()> {
        let name = sys::cstr(key.last().expect("non-empty key"))
            .map_err(|e| self.err("name", true, &key, e))?;
        let ust = sys::lstatat(u, &name).map_err(|e| self.err("lstat", true, &key, e))?;
        let lst = sys::lstatat(l, &name).map_err(|e| self.err("lstat", false, &key, e))?;
        let (ut, lt) = (ust.st_mode & libc::S_IFMT, lst.st_mode & libc::S_IFMT);
        if ut == libc::S_IFDIR && lt == libc::S_IFDIR {
            if self.differs(l, u, &name, &lst, &ust, &key)? {
                self.changes.insert(key.clone(), ChangeKind::Modified);
            }
            let lsub = self.open_dir(l, &name, false, &key)?;
            let usub = self.open_dir(u, &name, true, &key)?;
            return self.dir(Some(lsub.as_fd()), usub.as_fd(), &key);
        }
        if ut != lt {
            self.changes.insert(key.clone(), ChangeKind::Modified);
            if ut == libc::S_IFDIR {
                let usub = self.open_dir(u, &name, true, &key)?;
                return self.dir(None, usub.as_fd(), &key);
            }
        } else if self.differs(l, u, &name, &lst, &ust, &key)? {
            self.changes.insert(key.clone(), ChangeKind::Modified);
        }
        if ust.st_nlink > 1 || lst.st_nlink > 1 {
            self.upper_ino.insert(key.clone(), (ust.st_dev, ust.st_ino));
        }
        if lst.st_nlink > 1 && ut != libc::S_IFDIR {
            self.lower_ino.insert(key, (lst.st_dev, lst.st_ino));
        }
        Ok(())
    }

    fn differs(
        &self,
        l: BorrowedFd<'_>,
        u: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        lst: &libc::stat,
        ust: &libc::stat,
        key: &Key,
    ) -> Result<bool> {
        if lst.st_mode != ust.st_mode
            || lst.st_uid != ust.st_uid
            || lst.st_gid != ust.st_gid
            || lst.st_rdev != ust.st_rdev
            || lst.st_mtime != ust.st_mtime
            || lst.st_mtime_nsec != ust.st_mtime_nsec
        {
            return Ok(true);
        }
        let ty = ust.st_mode & libc::S_IFMT;
        if ty == libc::S_IFREG && lst.st_size != ust.st_size {
            return Ok(true);
        }
        if entry::xattrs(l, name).map_err(|e| self.err("list xattrs", false, key, e))?
            != entry::xattrs(u, name).map_err(|e| self.err("list xattrs", true, key, e))?
        {
            return Ok(true);
        }
        if ty == libc::S_IFLNK {
            let a = sys::readlinkat(l, name).map_err(|e| self.err("readlink", false, key, e))?;
            let b = sys::readlinkat(u, name).map_err(|e| self.err("readlink", true, key, e))?;
            return Ok(a != b);
        }
        if ty == libc::S_IFREG && ust.st_mtime_nsec == 0 && ust.st_size > 0 {
            let a = entry::open(l, name).map_err(|e| self.err("open", false, key, e))?;
            let b = entry::open(u, name).map_err(|e| self.err("open", true, key, e))?;
            return same_content(a, b)
                .map(|same| !same)
                .map_err(|e| self.err("compare", true, key, e));
        }
        Ok(false)
    }

    /// Marks every member of a link group that formed, split or changed, so groups are written
    /// whole.
    fn fix_links(&mut self) {
        let mut ugroups: HashMap<(u64, u64), Vec<Key>> = HashMap::new();
        for (k, ino) in &self.upper_ino {
            ugroups.entry(*ino).or_default().push(k.clone());
        }
        let mut lgroups: HashMap<(u64, u64), Vec<Key>> = HashMap::new();
        for (k, ino) in &self.lower_ino {
            lgroups.entry(*ino).or_default().push(k.clone());
        }
        let mut mark = Vec::new();
        for members in ugroups.values() {
            let mut sorted = members.clone();
            sorted.sort();
            let changed = members.iter().any(|k| self.changes.contains_key(k));
            let regrouped = members.iter().any(|k| {
                let mut lower: Vec<Key> = match self.lower_ino.get(k) {
                    Some(ino) => lgroups[ino].clone(),
                    None => vec![k.clone()],
                };
                lower.sort();
                lower != sorted
            });
            if changed || regrouped {
                mark.extend(members.iter().cloned());
            }
        }
        for k in mark {
            self.changes.entry(k).or_insert(ChangeKind::Modified);
        }
    }
}

fn same_content(mut a: File, mut b: File) -> std::io::Result<bool> {
    let mut ba = vec![0u8; 64 << 10];
    let mut bb = vec![0u8; 64 << 10];
    loop {
        let n = read_full(&mut a, &mut ba)?;
        let m = read_full(&mut b, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Writes the diff that turns tree `lower` into tree `upper` to `out`.
pub fn generic<W: Write>(
    lower: &Path,
    upper: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<(DiffReport, W)> {
    let changes = compute(lower, upper)?;
    let root: OwnedFd = File::open(upper)
        .map_err(|e| Error::io("open upper tree", upper, e))?
        .into();
    let mut sink = Sink::new(out, opts)?;
    let mut emitted: Vec<Key> = Vec::new();
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let werr = |k: &Key, e: std::io::Error| {
        Error::io(
            "write diff entry",
            upper.join(String::from_utf8_lossy(&key_str(k)).as_ref()),
            e,
        )
    };
    let rerr = |k: &Key, e: std::io::Error| {
        Error::io(
            "read",
            upper.join(String::from_utf8_lossy(&key_str(k)).as_ref()),
            e,
        )
    };
    for (key, kind) in &changes {
        // Parent directories of every change are written first, from the upper tree.
        let parent = &key[..key.len() - 1];
        while emitted.last().is_some_and(|top| !parent.starts_with(top)) {
            emitted.pop();
        }
        for depth in emitted.last().map_or(0, Vec::len)..parent.len() {
            // An ancestor that is itself a change was written (and pushed) already.
            let anc: Key = parent[..=depth].to_vec();
            let (dir, st) = open_parent(root.as_fd(), &anc).map_err(|e| rerr(&anc, e))?;
            let name = sys::cstr(anc.last().expect("ancestor")).map_err(|e| rerr(&anc, e))?;
            if let Some(e) =
                entry::read(dir.as_fd(), &name, &st, key_str(&anc)).map_err(|e| rerr(&anc, e))?
            {
                sink.tar
                    .append(&e, &mut std::io::empty())
                    .map_err(|e| werr(&anc, e))?;
                sink.entries += 1;
            }
            emitted.push(anc);
        }
        if *kind == ChangeKind::Deleted {
            let e = entry::whiteout(&parent.join(&b'/'), key.last().expect("key"));
            sink.tar
                .append(&e, &mut std::io::empty())
                .map_err(|e| werr(key, e))?;
            sink.entries += 1;
            continue;
        }
        let (dir, st) = open_parent(root.as_fd(), key).map_err(|e| rerr(key, e))?;
        let name = sys::cstr(key.last().expect("key")).map_err(|e| rerr(key, e))?;
        let Some(mut e) =
            entry::read(dir.as_fd(), &name, &st, key_str(key)).map_err(|e| rerr(key, e))?
        else {
            continue;
        };
        if e.kind == Kind::Dir {
            emitted.push(key.clone());
        }
        if e.kind != Kind::Dir && st.st_nlink > 1 {
            if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
                e = Entry {
                    kind: Kind::HardLink,
                    link: first.clone(),
                    size: 0,
                    xattrs: Vec::new(),
                    ..e
                };
                sink.tar
                    .append(&e, &mut std::io::empty())
                    .map_err(|err| werr(key, err))?;
                sink.entries += 1;
                continue;
            }
            links.insert((st.st_dev, st.st_ino), e.path.clone());
        }
        if e.kind == Kind::File {
            let f = entry::open(dir.as_fd(), &name).map_err(|e| rerr(key, e))?;
            sink.tar.append(&e, &mut &f).map_err(|err| werr(key, err))?;
        } else {
            sink.tar
                .append(&e, &mut std::io::empty())
                .map_err(|err| werr(key, err))?;
        }
        sink.entries += 1;
    }
    sink.finish()
}

/// Opens the parent directory of `key` below `root` (no symlinks) and stats the entry.
fn open_parent(root: BorrowedFd<'_>, key: &Key) -> std::io::Result<(OwnedFd, libc::stat)> {
    let parent = &key[..key.len() - 1];
    let dir = if parent.is_empty() {
        root.try_clone_to_owned()?
    } else {
        sys::open_beneath(
            root,
            &sys::cstr(&parent.join(&b'/'))?,
            libc::O_DIRECTORY | libc::O_RDONLY,
            0,
        )?
    };
    let st = sys::lstatat(dir.as_fd(), &sys::cstr(key.last().expect("key"))?)?;
    Ok((dir, st))
}
