//! The `fuser::Filesystem` glue: each request is turned into a call on the [`Stack`] model, the
//! inode table and the upper's operations (`ops`), and its result or errno is sent back.
//! Without an upper the union is read-only and changes answer `EROFS`.
//!
//! Requests are served by several threads (fuser's `n_threads`); nothing holds a lock across
//! I/O: the inode table's lock covers map updates only, and open files live in a handle table
//! whose lock is held just long enough to clone an `Arc<File>`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};
use nix::sys::stat::FileStat;
use strata_overlay::whiteout::is_overlay_xattr;

use crate::evict::Evict;
use crate::ino::Inos;
use crate::layer::{Resolved, Stack};
use crate::node::{Nodes, ROOT};

/// How long the kernel may cache entries and attributes. The union has its layers to itself:
/// lowers never change under a mount, and every change to the upper goes through this mount,
/// where the kernel updates or drops what it caches (changing layers under a mount is
/// undefined on kernel overlay too). So an hour: a name looked up again later costs no round
/// trip, where a second's TTL had every path walk after a pause revalidate each component.
const TTL: Duration = Duration::from_secs(3600);

/// Directories kept resolved at most (the cache is dropped whole beyond; memory stays bounded).
const DIR_CACHE: usize = 65_536;

/// A change in progress (see [`Union::upper`]): the merged paths it touches are noted, and when
/// it ends their cached resolutions are dropped.
struct Writing<'a> {
    union: &'a Union,
    touched: Vec<PathBuf>,
}

impl Writing<'_> {
    /// The change alters the merged entry at `rel` (or what is below it), and may copy up
    /// its parents.
    fn touch(&mut self, rel: &Path) {
        self.touched.push(rel.to_path_buf());
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.union.invalidate(&self.touched);
    }
}

/// What an open handle refers to.
enum Handle {
    /// An open file and its node, so an unlinked open file still answers `getattr`.
    File(u64, Arc<File>),
}

/// How the kernel does a file's I/O (see [`Union::io_mode`]).
enum Io {
    /// Through its page cache and this server.
    Cached,
    /// Straight on the backing file, which the kernel holds by this id.
    Passthrough(Arc<fuser::BackingId>),
}

/// How a node's open files do their I/O: the kernel wants all opens of an inode alike, and
/// passing through to one backing file.
struct NodeIo {
    /// The backing file's `(st_dev, st_ino)` and the kernel's id for it; `None`: cached.
    pass: Option<((u64, u64), Arc<fuser::BackingId>)>,
    opens: usize,
}

/// A directory's listing, as a reader started it: the directory's node and path, "." and ".."
/// with their inode numbers, and the merged entries (whose attributes are read when
/// readdirplus sends them).
struct Listing {
    ino: u64,
    dir: PathBuf,
    dots: [u64; 2],
    merged: crate::layer::MergedDir,
}

impl Listing {
    /// Its entries, "." and ".." included.
    fn len(&self) -> usize {
        2 + self.merged.entries.len()
    }

    /// The name of its `i`th entry.
    fn name(&self, i: usize) -> Option<&OsStr> {
        match i {
            0 => Some(OsStr::new(".")),
            1 => Some(OsStr::new("..")),
            _ => self.merged.entries.get(i - 2).map(|(n, _)| n.as_os_str()),
        }
    }

    /// Entries from the `start`th on, each with the offset of the one after it in listing
    /// `number` (see [`Offset`]): "." and ".." first (with their numbers), then the merged
    /// ones.
    fn from(&self, number: u64, start: usize) -> impl Iterator<Item = (u64, &OsStr, Listed<'_>)> {
        let dots = [(".", self.dots[0]), ("..", self.dots[1])]
            .into_iter()
            .map(|(n, ino)| (OsStr::new(n), Listed::Dot(ino)));
        let merged = self
            .merged
            .entries
            .iter()
            .map(|(n, e)| (n.as_os_str(), Listed::Merged(e)));
        dots.chain(merged)
            .enumerate()
            .skip(start)
            .map(move |(i, (n, e))| (Offset::at(number, self, i + 1).0, n, e))
    }

    /// Where a reader at `o` goes on in this listing: at its index if the name there is the
    /// one the offset was made for; else (a listing read again) at the nearest entry of that
    /// name's hash, so names before it are not listed twice; else at the index.
    fn resume(&self, o: Offset) -> usize {
        let (i, h) = (o.index(), o.hash());
        if i >= self.len() || self.name(i).map(name_hash) == Some(h) {
            return i.min(self.len());
        }
        (0..self.len())
            .filter(|&j| self.name(j).map(name_hash) == Some(h))
            .min_by_key(|&j| j.abs_diff(i))
            .unwrap_or(i)
    }
}

/// A listing offset, as handed to the kernel: the listing's number (16 bits, see
/// [`Listings`]), the index of the entry to go on at (26 bits) and a 21-bit hash of that
/// entry's name, so a reader whose listing is gone goes on at the same name, not just the same
/// index. Offsets stay positive (the kernel keeps them as `loff_t`); 0 is the start.
#[derive(Clone, Copy)]
struct Offset(u64);

impl Offset {
    const INDEX_BITS: u32 = 26;
    const HASH_BITS: u32 = 21;

    /// The offset of entry `i` of listing `number`, `l`.
    fn at(number: u64, l: &Listing, i: usize) -> Offset {
        let h = l.name(i).map(name_hash).unwrap_or(0);
        let i = (i as u64).min((1 << Self::INDEX_BITS) - 1);
        Offset((number << (Self::INDEX_BITS + Self::HASH_BITS)) | (i << Self::HASH_BITS) | h)
    }

    fn number(self) -> u64 {
        self.0 >> (Self::INDEX_BITS + Self::HASH_BITS)
    }

    fn index(self) -> usize {
        ((self.0 >> Self::HASH_BITS) & ((1 << Self::INDEX_BITS) - 1)) as usize
    }

    fn hash(self) -> u64 {
        self.0 & ((1 << Self::HASH_BITS) - 1)
    }
}

/// FNV-1a of a name, cut to [`Offset::HASH_BITS`].
fn name_hash(n: &OsStr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in n.as_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h & ((1 << Offset::HASH_BITS) - 1)
}

/// Listings being read. The kernel is told the union has no OPENDIR, so it sends neither
/// OPENDIR nor RELEASEDIR (a round trip less per listing; it then keeps listings cached as if
/// every open asked it to). A listing is read at offset 0 and numbered, and each offset handed
/// out names it (see [`Offset`]), so a reader goes on in the listing it started, whoever else
/// starts one meanwhile, as with a listing per open directory. A listing goes once read to its
/// end, or when more than [`LISTINGS_KEPT`] are waiting (readers that stopped early). A reader
/// coming back to a listing gone gets the directory read again and goes on at the name it had
/// reached; only if that very name was deleted meanwhile may it see a name again or miss one.
#[derive(Default)]
struct Listings {
    next: AtomicU64,
    kept: Mutex<std::collections::VecDeque<(u64, Arc<Listing>)>>,
}

/// How many unfinished listings are kept (each holds its layers' directories open).
const LISTINGS_KEPT: usize = 32;

impl Listings {
    /// Keeps `l`, returning its number (1 to 2^16 - 1).
    fn add(&self, l: Arc<Listing>) -> u64 {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % ((1 << 16) - 1) + 1;
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(m, _)| *m != n);
        if kept.len() >= LISTINGS_KEPT {
            kept.pop_front();
        }
        kept.push_back((n, l));
        n
    }

    /// Listing `n` of directory node `ino`, if kept.
    fn get(&self, n: u64, ino: u64) -> Option<Arc<Listing>> {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter()
            .find(|(m, l)| *m == n && l.ino == ino)
            .map(|(_, l)| l.clone())
    }

    /// Listing `n` was read to its end.
    fn done(&self, n: u64) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|(m, _)| *m != n);
    }
}

/// One entry of a [`Listing`].
enum Listed<'a> {
    Dot(u64),
    Merged(&'a crate::layer::DirEntry),
}

/// The union filesystem served over FUSE.
pub struct Union {
    stack: Stack,
    /// Resolved directories of the merged view. A change drops the entries of the paths it
    /// touches (see [`Writing`]); `generation` counts changes, so a resolution that raced
    /// with one is not cached.
    dirs: std::sync::RwLock<crate::pathmap::PathMap<Resolved>>,
    generation: AtomicU64,
    upper: Option<crate::ops::Upper>,
    /// The nodes the kernel holds, numbered by `inos`, kept under a cap by `evict`.
    nodes: Arc<Nodes>,
    inos: Arc<Inos>,
    evict: Arc<Evict>,
    handles: Mutex<HashMap<u64, Handle>>,
    listings: Listings,
    next_fh: AtomicU64,
    /// The kernel caches writes (FUSE's writeback cache, asked for at init when writable):
    /// it may read through a handle opened write-only and writes at offsets it computes, so
    /// files open read-write and never append here.
    writeback: bool,
    /// The kernel passes file I/O straight to the backing files (FUSE passthrough, kernel 6.9+,
    /// as root): reads and writes at the backing filesystem's speed.
    passthrough: std::sync::atomic::AtomicBool,
    /// The kernel leaves clearing set-user-ID and set-group-ID bits on write and truncate to
    /// this server (`FUSE_HANDLE_KILLPRIV_V2`, asked with passthrough): otherwise it asks for
    /// `security.capability` before every write, a round trip each. See [`Union::kill_suid`].
    killpriv: std::sync::atomic::AtomicBool,
    /// This server runs as root: it gives each new entry to its creator (see [`Union::own`]).
    root: bool,
    /// Filesystems (`st_dev`) whose files the kernel refused to pass through to (stacked too
    /// deep): their files are cached.
    refused: Mutex<std::collections::HashSet<u64>>,
    /// Nodes with open files: how they do their I/O.
    node_io: Mutex<HashMap<u64, NodeIo>>,
    counts: Arc<Counts>,
}

/// What the server did, for [`Stats`].
#[derive(Default)]
struct Counts {
    /// Opens answered with a backing file the kernel passes through to.
    passed: AtomicU64,
    /// Reads served here (not passed through).
    reads: AtomicU64,
    /// Entries of listings with attributes answered from remembered lower attributes.
    remembered: AtomicU64,
    /// LOOKUPs answered.
    lookups: AtomicU64,
}

use crate::ops::{errno, nix_errno};

/// The longest name a component may have (NAME_MAX of ext4, xfs, btrfs and tmpfs). Checked
/// here because a longer one would otherwise read as absent: the `.wh.` probe of the layers
/// fails and the lookup answers ENOENT, where kernel overlay answers ENAMETOOLONG.
const NAME_MAX: usize = 255;

fn check_name(name: &OsStr) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
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

/// What readdirplus sends with "." and "..": a directory's number and kind (the kernel
/// uses nothing else of them).
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Union {
    /// A read-only union over `stack`.
    pub fn new(stack: Stack) -> Union {
        Union {
            inos: Arc::new(Inos::new(&stack)),
            stack,
            dirs: Default::default(),
            generation: AtomicU64::new(0),
            upper: None,
            nodes: Arc::new(Nodes::new()),
            evict: Arc::new(Evict::new(crate::evict::DEFAULT_CAP)),
            handles: Mutex::new(HashMap::new()),
            listings: Listings::default(),
            next_fh: AtomicU64::new(1),
            writeback: false,
            passthrough: std::sync::atomic::AtomicBool::new(false),
            refused: Mutex::new(std::collections::HashSet::new()),
            killpriv: std::sync::atomic::AtomicBool::new(false),
            root: nix::unistd::geteuid().is_root(),
            node_io: Mutex::new(HashMap::new()),
            counts: Arc::default(),
        }
    }

    /// A writable union: `stack`'s first layer is the upper, `work` its work dir (same
    /// filesystem).
    pub fn writable(stack: Stack, work: PathBuf) -> Union {
        let upper = stack.layers()[0].root.clone();
        stack.scan_upper_markers();
        let markers = stack.upper_markers();
        let mut u = Union::new(stack);
        u.upper = Some(crate::ops::Upper::new(upper, work, u.inos.clone(), markers));
        u
    }

    /// Syncs nothing, as kernel overlay's `volatile` option: copy-ups are not synced before
    /// they are renamed into the upper, and fsync returns at once. Mounting leaves the mark
    /// kernel overlay leaves (see [`strata_overlay::mount::volatile_marker`]). No effect without an upper.
    pub fn volatile(mut self) -> Union {
        if let Some(u) = &mut self.upper {
            u.volatile = true;
        }
        self
    }

    /// Keeps at most about `cap` nodes: past it, the kernel is asked to drop its least recently
    /// used entries (see [`crate::evict`]). Takes effect when served with [`spawn`].
    pub fn with_node_cap(mut self, cap: usize) -> Union {
        self.evict = Arc::new(Evict::new(cap));
        self
    }

    /// What the union holds, readable while it is served.
    pub fn stats(&self) -> Stats {
        Stats {
            nodes: self.nodes.clone(),
            inos: self.inos.clone(),
            counts: self.counts.clone(),
        }
    }

    /// The kernel was answered with node `id` for `path`: one more reference, and the cap
    /// checked.
    fn looked_up(&self, path: &Path, id: u64) {
        self.nodes.looked_up(path, id);
        self.evict.check(self.nodes.len());
    }

    /// The attributes of node `id` from `st`: its inode number is its id, but for the root's
    /// (node 1 to the kernel, numbered after its directory to everyone else).
    fn attr_for(&self, id: u64, st: &FileStat) -> FileAttr {
        attr(if id == ROOT { self.inos.of(st) } else { id }, st)
    }

    /// The upper, for a change: the returned guard notes the paths the change touches, and
    /// drops what the directory cache holds of them when it ends.
    fn upper(&self) -> Result<(&crate::ops::Upper, Writing<'_>), Errno> {
        let up = self.upper.as_ref().ok_or(Errno::EROFS)?;
        Ok((
            up,
            Writing {
                union: self,
                touched: Vec::new(),
            },
        ))
    }

    /// Drops the cached resolutions a change of `touched` may have made wrong: each touched
    /// path's subtree (renamed, removed, made opaque or copied up) and its ancestors not yet
    /// in the upper (a change copies them up). Ancestors already in the upper keep their
    /// layers; their attributes are read afresh where they are answered (`getattr`). With
    /// nothing noted, everything goes.
    fn invalidate(&self, touched: &[PathBuf]) {
        let mut c = self.dirs.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        if touched.is_empty() {
            c.clear();
            return;
        }
        for t in touched {
            c.remove_subtree(t);
            for a in t.ancestors().skip(1) {
                if c.get(a).is_some_and(|r| r.layer() != 0) {
                    c.remove(a);
                }
            }
        }
    }

    /// What `path` is in the merged view: directories come from the cache, or are resolved
    /// from their (cached) parent and cached; a non-directory is looked up in its parent.
    fn resolve_path(&self, path: &Path) -> Result<Resolved, Errno> {
        if let Some(r) = self
            .dirs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
        {
            return Ok(r.clone());
        }
        let at_gen = self.generation.load(Ordering::SeqCst);
        let r = match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => match self.resolve_path(parent)? {
                Resolved::Dir { layers, .. } => self.stack.lookup(&layers, parent, name),
                Resolved::File { .. } => None,
            },
            _ => self.stack.root(),
        }
        .ok_or(Errno::ENOENT)?;
        if matches!(r, Resolved::Dir { .. }) {
            let mut c = self.dirs.write().unwrap_or_else(|p| p.into_inner());
            if self.generation.load(Ordering::SeqCst) == at_gen {
                if c.len() >= DIR_CACHE {
                    c.clear();
                }
                c.insert(path, r.clone());
            }
        }
        Ok(r)
    }

    /// What `rel` is now, during a change: looked up afresh in its parent when the cache has
    /// the parent in the upper (a change through this mount cannot have altered that parent's
    /// layers unnoted), else resolved afresh from the root.
    fn fresh(&self, rel: &Path) -> Option<Resolved> {
        if let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) {
            if let Some(layers) = self.upper_dir_layers(parent) {
                return self.stack.lookup(&layers, parent, name);
            }
        }
        self.stack.resolve(rel)
    }

    /// The layers of directory `dir`, from the directory cache, when the upper holds it (so
    /// the cached answer can't have been changed by a copy-up since).
    fn upper_dir_layers(&self, dir: &Path) -> Option<Vec<usize>> {
        match self.dirs.read().unwrap_or_else(|p| p.into_inner()).get(dir) {
            Some(Resolved::Dir { layers, .. }) if layers[0] == 0 => Some(layers.clone()),
            _ => None,
        }
    }

    /// The path of `name` in directory node `parent`, which must be a directory.
    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        check_name(name)?;
        if crate::layer::is_marker(name) {
            return Err(Errno::EPERM);
        }
        let (ppath, p) = self.resolve(parent)?;
        let Resolved::Dir { .. } = p else {
            return Err(Errno::ENOTDIR);
        };
        Ok(ppath.join(name))
    }

    /// Prepares a new name in the upper: it must not exist in the merged view; its parent is
    /// copied up; a whiteout there is removed (true if there was one).
    fn new_name(&self, parent: u64, name: &OsStr) -> Result<(PathBuf, bool), Errno> {
        let (up, mut w) = self.upper()?;
        let rel = self.child(parent, name)?;
        w.touch(&rel);
        if let Some(had) = self.vacant_in_upper(up, &rel)? {
            return Ok((rel, had));
        }
        if self.fresh(&rel).is_some() {
            return Err(Errno::EEXIST);
        }
        if let Some(p) = rel.parent() {
            up.ensure_dir(&self.stack, p)?;
        }
        let had = up.clear_whiteout(&rel)?;
        Ok((rel, had))
    }

    /// [`Union::new_name`]'s quick way, for a name in a directory the upper holds (known from
    /// the directory cache): the upper's entry decides, unless it has none and layers below
    /// merge in. Then `None`, and the whole lookup decides. A whiteout found is removed;
    /// `Some(true)` says there was one.
    fn vacant_in_upper(&self, up: &crate::ops::Upper, rel: &Path) -> Result<Option<bool>, Errno> {
        let Some(layers) = rel.parent().and_then(|p| self.upper_dir_layers(p)) else {
            return Ok(None);
        };
        let merges_below = layers.len() > 1;
        match nix::sys::stat::lstat(&up.root.join(rel)) {
            Ok(st) if crate::layer::is_whiteout(&st) => up.drop_whiteout(rel).map(|()| Some(true)),
            Ok(_) => Err(Errno::EEXIST),
            Err(nix::errno::Errno::ENOENT) if !merges_below => up.clear_oci_whiteout(rel).map(Some),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(nix_errno(e)),
        }
    }

    /// Gives the upper entry `real`, just made by this server and `made` as made, to the
    /// requesting user, as the kernel gives a new file to its creator: the caller's user, and
    /// the caller's group unless the directory holding it is set-group-ID (the backing
    /// filesystem then gave it that directory's group, and a directory the bit, already).
    /// Only as root: rootless, the user namespace maps ids. chown drops the set-user-ID and
    /// set-group-ID bits of what is not a directory; the mode it was made with is put back.
    /// Returns whether the entry changed (its `made` is stale then). Nothing to do, the
    /// common case of root making files in a plain directory, costs no system call.
    fn own(&self, req: &Request, real: &Path, made: &FileStat) -> Result<bool, Errno> {
        use nix::sys::stat::lstat;
        if !self.root {
            return Ok(false);
        }
        let uid = (made.st_uid != req.uid()).then_some(req.uid());
        let gid = (made.st_gid != req.gid()
            && !real
                .parent()
                .is_some_and(|d| lstat(d).is_ok_and(|st| st.st_mode & libc::S_ISGID != 0)))
        .then_some(req.gid());
        if uid.is_none() && gid.is_none() {
            return Ok(false);
        }
        std::os::unix::fs::lchown(real, uid, gid).map_err(errno)?;
        let kept = made.st_mode & 0o7777;
        if made.st_mode & libc::S_IFMT != libc::S_IFLNK
            && lstat(real).map_err(nix_errno)?.st_mode & 0o7777 != kept
        {
            // Not a symbolic link: nothing to follow.
            std::fs::set_permissions(real, std::os::unix::fs::PermissionsExt::from_mode(kept))
                .map_err(errno)?;
        }
        Ok(true)
    }

    /// `f` is written or truncated by `req`'s caller: its set-user-ID bit goes, and its
    /// set-group-ID bit where the group may execute or the caller is not of the file's group,
    /// as the kernel's own rule has it for a caller without `CAP_FSETID` (root here is taken to
    /// have it). Only where the kernel left this to the server (`killpriv`): a write asks for
    /// it (`FUSE_WRITE_KILL_SUIDGID`), and an open for writing clears the bits at once where
    /// files pass through, as their writes never reach the server.
    fn kill_suid(&self, req: &Request, f: &File) -> Result<(), Errno> {
        if !self.killpriv.load(Ordering::Relaxed) || req.uid() == 0 {
            return Ok(());
        }
        let st = nix::sys::stat::fstat(f).map_err(nix_errno)?;
        let mode = st.st_mode & 0o7777;
        let mut keep = mode & !libc::S_ISUID;
        if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || req.gid() != st.st_gid) {
            keep &= !libc::S_ISGID;
        }
        if keep != mode {
            nix::sys::stat::fchmod(f, nix::sys::stat::Mode::from_bits_truncate(keep))
                .map_err(nix_errno)?;
        }
        Ok(())
    }

    /// The entry reply for `rel`, just made in the upper by a change.
    fn entry_of(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let st = self.upper_entry(rel)?;
        Ok(self.entry_from(rel, &st))
    }

    /// [`Union::entry_of`] with the entry's stat in hand.
    fn entry_from(&self, rel: &Path, st: &FileStat) -> FileAttr {
        let id = self.inos.of(st);
        self.looked_up(rel, id);
        attr(id, st)
    }

    /// [`Union::entry_of`] for `rel`, just made as `made`, then [`Union::own`]ed: stated again
    /// only if owning it changed it.
    fn entry_made(&self, req: &Request, rel: &Path, made: &FileStat) -> Result<FileAttr, Errno> {
        let up = self.upper.as_ref().ok_or(Errno::EROFS)?;
        if self.own(req, &up.root.join(rel), made)? {
            return self.entry_of(rel);
        }
        if crate::layer::is_whiteout(made) {
            return Err(Errno::ENOENT);
        }
        Ok(self.entry_from(rel, made))
    }

    /// The `lstat` of `rel`, just made in the upper: the top layer, so what the merged view
    /// shows, unless it is a char 0:0, which is a whiteout there (as on kernel overlay).
    fn upper_entry(&self, rel: &Path) -> Result<FileStat, Errno> {
        let up = self.upper.as_ref().ok_or(Errno::EROFS)?;
        let st = nix::sys::stat::lstat(&up.root.join(rel)).map_err(nix_errno)?;
        if crate::layer::is_whiteout(&st) {
            return Err(Errno::ENOENT);
        }
        Ok(st)
    }

    /// `renameat2(RENAME_EXCHANGE)`: the two names swap what they name, atomically. Both are
    /// copied up first (a directory any lower layer contributes to as a complete tree, as a
    /// rename does, so the exchange never fails with EXDEV where kernel overlay's may), then
    /// swapped in the upper; a directory is marked opaque where it lands, so nothing of the
    /// lower shows through it there.
    fn exchange(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<(), Errno> {
        let (up, mut w) = self.upper()?;
        let a = self.child(parent, name)?;
        let b = self.child(newparent, newname)?;
        w.touch(&a);
        w.touch(&b);
        let ra = self.fresh(&a).ok_or(Errno::ENOENT)?;
        let rb = self.fresh(&b).ok_or(Errno::ENOENT)?;
        if a == b {
            return Ok(());
        }
        if a.starts_with(&b) || b.starts_with(&a) {
            return Err(Errno::EINVAL);
        }
        self.copy_up_whole(up, &a, &ra)?;
        self.copy_up_whole(up, &b, &rb)?;
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &up.root.join(&a),
            nix::fcntl::AT_FDCWD,
            &up.root.join(&b),
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(nix_errno)?;
        for (rel, was) in [(&a, &rb), (&b, &ra)] {
            if matches!(was, Resolved::Dir { .. }) {
                up.set_opaque(&up.root.join(rel))?;
            }
        }
        // The node table swaps the two subtrees, through a name no path can have.
        let aside = Path::new("\0exchange");
        self.nodes.rename(&a, aside);
        self.nodes.rename(&b, &a);
        self.nodes.rename(aside, &b);
        Ok(())
    }

    /// The merged view's entry for node `ino`: its path and what it is now.
    fn resolve(&self, ino: u64) -> Result<(PathBuf, Resolved), Errno> {
        let path = self.nodes.path(ino).ok_or(Errno::ESTALE)?;
        let r = self.resolve_path(&path)?;
        Ok((path, r))
    }

    /// The attributes of node `ino` resolved as `r`: a directory's are read afresh (the cache
    /// keeps its layers, not its times and link count, which change with its entries).
    fn attr_of(&self, ino: u64, path: &Path, r: &Resolved) -> Result<FileAttr, Errno> {
        match r {
            Resolved::Dir { .. } => {
                let st = nix::sys::stat::lstat(&self.real(path, r)).map_err(nix_errno)?;
                Ok(self.attr_for(ino, &st))
            }
            Resolved::File { stat, .. } => Ok(self.attr_for(ino, stat)),
        }
    }

    /// Copies `path`, resolved as `r`, into the upper whole, as a rename needs it: a directory
    /// that any lower layer contributes to as a complete, opaque tree (so no rename ever fails
    /// with EXDEV), anything else as a copy-up does.
    fn copy_up_whole(
        &self,
        up: &crate::ops::Upper,
        path: &Path,
        r: &Resolved,
    ) -> Result<(), Errno> {
        if matches!(r, Resolved::Dir { layers, .. } if layers[..] != [0]) {
            up.copy_up_tree(&self.stack, path)
        } else {
            self.copy_up(up, path)
        }
    }

    /// Copies `path` up (its inode number stays, see [`crate::ino`]).
    fn copy_up(&self, up: &crate::ops::Upper, path: &Path) -> Result<(), Errno> {
        up.copy_up(&self.stack, path)
    }

    /// The upper entry `st` describes is about to be deleted: if it is its file's last link,
    /// its inode number may go to a new file, which must not show the copy's origin.
    fn deleting(&self, st: &FileStat) {
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR || st.st_nlink <= 1 {
            self.inos.gone(st.st_dev, st.st_ino);
        }
    }

    /// The real path holding `path` in the merged view.
    fn real(&self, path: &Path, r: &Resolved) -> PathBuf {
        self.stack.path(r.layer(), path)
    }

    /// How the kernel is to do the I/O of `f`, just opened for node `ino`. As root, where the
    /// kernel can, every regular file passes through to its backing file, lower or upper:
    /// reads, writes, fsyncs and mmaps run at the backing filesystem's speed, the server sees
    /// only open and release.
    ///
    /// The kernel takes one backing file per inode for as long as any of its opens passes
    /// through, and refuses any other kind of open of it meanwhile. A node is its inode, and a
    /// copy-up gives a node a new file (keeping its number, see [`crate::ino`]): an open of the
    /// copy while the lower file is still open through the node cannot be served by that
    /// inode. The copy is then given a number of its own, and the open is answered `ESTALE`,
    /// which makes the kernel look the name up again (`LOOKUP_REVAL`) and open the copy
    /// under its new node. The files still open on the lower file go on reading it, as
    /// fuse-overlayfs's do (kernel overlay has them follow the copy).
    fn io_mode(
        &self,
        ino: u64,
        f: &File,
        known: Option<(u64, u64)>,
        open_backing: impl FnOnce(&File) -> std::io::Result<fuser::BackingId>,
    ) -> Result<Io, Errno> {
        let pass = self.passthrough.load(Ordering::SeqCst);
        // The backing file's identity (`known` when the caller has just stat'ed `f`), asked
        // only where it matters (the kernel opens regular files only).
        let identity = || match known {
            Some(file) => Ok(file),
            None => nix::sys::stat::fstat(f)
                .map(|st| (st.st_dev, st.st_ino))
                .map_err(nix_errno),
        };
        let mut all = self.node_io.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = all.get_mut(&ino) {
            let io = match &x.pass {
                None => Io::Cached,
                Some((file, id)) => {
                    let now = identity()?;
                    if *file != now {
                        self.inos.renumber(now.0, now.1);
                        tracing::debug!(ino, "copied up under an open file: renumbered");
                        return Err(Errno::ESTALE);
                    }
                    self.counts.passed.fetch_add(1, Ordering::Relaxed);
                    Io::Passthrough(id.clone())
                }
            };
            x.opens += 1;
            return Ok(io);
        }
        let pass = match pass {
            true => {
                let file = identity()?;
                let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
                match refused.contains(&file.0) {
                    true => None,
                    false => {
                        drop(refused);
                        match open_backing(f) {
                            Ok(id) => Some((file, Arc::new(id))),
                            Err(e) => {
                                // A backing filesystem the kernel does not pass through to
                                // (stacked too deep, say): its files are cached from now on.
                                tracing::warn!(error = %e, dev = file.0,
                                    "FUSE passthrough refused: cached I/O for this filesystem");
                                self.refused
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(file.0);
                                None
                            }
                        }
                    }
                }
            }
            false => None,
        };
        let io = match &pass {
            Some((_, id)) => {
                self.counts.passed.fetch_add(1, Ordering::Relaxed);
                Io::Passthrough(id.clone())
            }
            None => Io::Cached,
        };
        all.insert(ino, NodeIo { pass, opens: 1 });
        Ok(io)
    }

    /// An open file's handle is gone; with a node's last one goes its I/O mode (and backing).
    fn close_file(&self, fh: u64) {
        let h = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        if let Some(Handle::File(ino, _)) = h {
            let mut all = self.node_io.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(x) = all.get_mut(&ino) {
                x.opens -= 1;
                if x.opens == 0 {
                    all.remove(&ino);
                }
            }
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, h);
        fh
    }

    /// An open handle's file for node `ino`, if it has one.
    fn open_file_of(&self, ino: u64) -> Option<Arc<File>> {
        let handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        handles.values().find_map(|h| match h {
            Handle::File(i, f) if *i == ino => Some(f.clone()),
            Handle::File(..) => None,
        })
    }

    fn file(&self, fh: u64) -> Option<Arc<File>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .map(|Handle::File(_, f)| f.clone())
    }

    /// The listing of directory node `ino` to read at `offset`, its number and the index to
    /// start at: read now at offset 0 (a reader starting over sees the directory as it is),
    /// else the one the offset names (see [`Listings`]).
    fn listing(&self, ino: u64, offset: u64) -> Result<(Arc<Listing>, u64, usize), Errno> {
        let o = Offset(offset);
        let kept = (offset != 0)
            .then(|| self.listings.get(o.number(), ino))
            .flatten();
        let (l, n) = match kept {
            Some(l) => (l, o.number()),
            None => {
                let l = Arc::new(self.read_listing(ino)?);
                let n = self.listings.add(l.clone());
                (l, n)
            }
        };
        let i = if offset == 0 { 0 } else { l.resume(o) };
        if i >= l.len() {
            self.listings.done(n); // read to its end
        }
        Ok((l, n, i))
    }

    /// The merged listing of directory node `ino`, each entry numbered (hard links alike).
    fn read_listing(&self, ino: u64) -> Result<Listing, Errno> {
        let (path, r) = self.resolve(ino)?;
        let Resolved::Dir { layers, stat } = &r else {
            return Err(Errno::ENOTDIR);
        };
        let merged = self.stack.read_dir(layers, &path).map_err(errno)?;
        let here = if ino == ROOT { self.inos.of(stat) } else { ino };
        // The root's ".." is itself.
        let parent = match path.parent() {
            Some(p) => self.resolve_path(p).map(|r| self.inos.of(r.stat()))?,
            None => here,
        };
        Ok(Listing {
            ino,
            dir: path,
            dots: [here, parent],
            merged,
        })
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
    /// Asks the kernel for what makes a union fast: readdirplus (attributes with the listing,
    /// used when the kernel sees lookups follow a readdir), parallel lookups in one directory,
    /// more requests in flight, and the largest reads ahead it allows.
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags as F;
        let mut want = F::FUSE_DO_READDIRPLUS | F::FUSE_READDIRPLUS_AUTO | F::FUSE_PARALLEL_DIROPS;
        // POSIX ACLs count in permission checks, as on kernel overlay: the kernel reads them
        // (`system.posix_acl_access`, which the layers hold) and checks them itself. New
        // entries get the caller's umask or the directory's default ACL from the backing
        // filesystem: the kernel sends the mode unmasked and the umask beside it.
        want |= F::FUSE_POSIX_ACL | F::FUSE_DONT_MASK;
        // Writes land in the kernel's page cache and reach us in large batches: every change
        // to a file goes through this mount, so the cache is never stale.
        // As root, passthrough does better still: the kernel does file I/O on the backing
        // files itself. It excludes the writeback cache.
        let pass = crate::privileged()
            && config.capabilities().contains(F::FUSE_PASSTHROUGH)
            && config.set_max_stack_depth(1).is_ok();
        if pass {
            want |= F::FUSE_PASSTHROUGH;
        } else if self.upper.is_some() {
            want |= F::FUSE_WRITEBACK_CACHE;
        }
        // Clearing set-ID bits on a write is left to this server, which then frees the kernel
        // from asking for `security.capability` before every write (it marks the filesystem
        // `SB_NOSEC`): with the writeback cache that question was a round trip per write(2).
        // Writes reach the backing file through this server or the kernel's passthrough,
        // where the backing filesystem drops a capability as it always does.
        want |= F::FUSE_HANDLE_KILLPRIV_V2;
        let want = want & config.capabilities();
        self.passthrough
            .store(want.contains(F::FUSE_PASSTHROUGH), Ordering::SeqCst);
        self.writeback = want.contains(F::FUSE_WRITEBACK_CACHE);
        self.killpriv
            .store(want.contains(F::FUSE_HANDLE_KILLPRIV_V2), Ordering::SeqCst);
        let _ = config.add_capabilities(want);
        let _ = config.set_max_background(64);
        let _ = config
            .set_max_readahead(u32::MAX)
            .or_else(|max| config.set_max_readahead(max));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::threads::home_again();
        self.counts.lookups.fetch_add(1, Ordering::Relaxed);
        let r = (|| {
            check_name(name)?;
            let (ppath, p) = self.resolve(parent.0)?;
            let Resolved::Dir { layers, .. } = p else {
                return Err(Errno::ENOTDIR);
            };
            let Some(child) = self.stack.lookup(&layers, &ppath, name) else {
                // Absent: node 0, which the kernel keeps as a negative entry for the TTL (a
                // name created through the mount replaces it), so a program probing the same
                // missing names again (a journal, a library path) needs no round trip.
                return Ok(dot_attr(0));
            };
            let id = self.inos.of(child.stat());
            self.looked_up(&ppath.join(name), id);
            if let Resolved::File { layer, stat } = &child {
                if Some(*layer) != self.stack.upper() {
                    self.nodes.remember_lower(id, stat);
                }
            }
            Ok(attr(id, child.stat()))
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::threads::home_again();
        // An open file answers for itself, even unlinked.
        if let Some(f) = fh.and_then(|fh| self.file(fh.0)) {
            return match nix::sys::stat::fstat(&*f) {
                Ok(st) => reply.attr(&TTL, &self.attr_for(ino.0, &st)),
                Err(e) => reply.error(Errno::from_i32(e as i32)),
            };
        }
        match self.resolve(ino.0) {
            Ok((p, r)) => match self.attr_of(ino.0, &p, &r) {
                Ok(a) => reply.attr(&TTL, &a),
                Err(e) => reply.error(e),
            },
            // fstat of an open, unlinked file comes without its handle: any open handle of
            // the node answers (link count 0, as on kernel overlay).
            Err(e) => match self.open_file_of(ino.0) {
                Some(f) => match nix::sys::stat::fstat(&*f) {
                    Ok(st) => reply.attr(&TTL, &self.attr_for(ino.0, &st)),
                    Err(e) => reply.error(Errno::from_i32(e as i32)),
                },
                None => reply.error(e),
            },
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

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let (path, r) = self.resolve(ino.0)?;
            let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
            let trunc = flags.0 & libc::O_TRUNC != 0;
            let real = if write || trunc {
                let (up, mut w) = self.upper()?;
                w.touch(&path);
                up.copy_up_known(&self.stack, &path, r)?;
                up.root.join(&path)
            } else {
                self.real(&path, &r)
            };
            let readable = flags.acc_mode() != OpenAccMode::O_WRONLY;
            let mut o = std::fs::OpenOptions::new();
            o.read(readable || (write && self.writeback))
                .write(write)
                .append(flags.0 & libc::O_APPEND != 0 && !self.writeback)
                .truncate(trunc && write);
            o.custom_flags(libc::O_NOFOLLOW);
            let f = match o.open(&real) {
                // A write-only file: the kernel then writes whole pages only where it has them.
                Err(e) if e.raw_os_error() == Some(libc::EACCES) && !readable => {
                    o.read(false).open(real).map_err(errno)
                }
                r => r.map_err(errno),
            }?;
            // Truncation drops them now; writes, when the first one comes (it reaches this
            // server), unless files pass through, whose writes never reach it.
            if trunc || (write && self.passthrough.load(Ordering::SeqCst)) {
                self.kill_suid(req, &f)?;
            }
            Ok(f)
        })();
        let f = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let io = match self.io_mode(ino.0, &f, None, |f| reply.open_backing(f)) {
            Ok(io) => io,
            Err(e) => return reply.error(e),
        };
        let fh = self.add_handle(Handle::File(ino.0, Arc::new(f)));
        match io {
            Io::Passthrough(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id)
            }
            // The kernel may keep this inode's cached pages across opens: every change to a
            // file goes through this mount (lowers are immutable, the upper is ours), so the
            // cache cannot go stale; a copy-up copies the same bytes.
            Io::Cached => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
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
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
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
        self.close_file(fh.0);
        reply.ok();
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let (up, mut w) = self.upper()?;
            let path = self.nodes.path(ino.0).ok_or(Errno::ESTALE)?;
            w.touch(&path);
            self.copy_up(up, &path)?;
            let real = up.root.join(&path);
            if let Some(m) = mode {
                std::fs::set_permissions(
                    &real,
                    std::os::unix::fs::PermissionsExt::from_mode(m & 0o7777),
                )
                .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&real, uid, gid).map_err(errno)?;
            }
            if let Some(sz) = size {
                let f = match fh.and_then(|fh| self.file(fh.0)) {
                    Some(f) => f,
                    None => Arc::new(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&real)
                            .map_err(errno)?,
                    ),
                };
                f.set_len(sz).map_err(errno)?;
                if mode.is_none() {
                    self.kill_suid(req, &f)?;
                }
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<fuser::TimeOrNow>| match t {
                    None => nix::sys::time::TimeSpec::new(0, libc::UTIME_OMIT),
                    Some(fuser::TimeOrNow::Now) => {
                        nix::sys::time::TimeSpec::new(0, libc::UTIME_NOW)
                    }
                    Some(fuser::TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        nix::sys::time::TimeSpec::new(d.as_secs() as i64, d.subsec_nanos() as i64)
                    }
                };
                nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &real,
                    &ts(atime),
                    &ts(mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(nix_errno)?;
            }
            let st = nix::sys::stat::lstat(&real).map_err(nix_errno)?;
            Ok(self.attr_for(ino.0, &st))
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let (rel, _) = self.new_name(parent.0, name)?;
            let (up, mut w) = self.upper()?;
            w.touch(&rel);
            let real = up.root.join(&rel);
            crate::sys::with_umask(umask, || {
                nix::sys::stat::mknod(
                    &real,
                    nix::sys::stat::SFlag::from_bits_truncate(mode & libc::S_IFMT),
                    nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777),
                    rdev as u64,
                )
            })
            .map_err(errno)?
            .map_err(nix_errno)?;
            let made = nix::sys::stat::lstat(&real).map_err(nix_errno)?;
            self.entry_made(req, &rel, &made)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let (rel, had_whiteout) = self.new_name(parent.0, name)?;
            let (up, mut w) = self.upper()?;
            w.touch(&rel);
            let real = up.root.join(&rel);
            crate::sys::with_umask(umask, || {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().mode(mode & 0o7777).create(&real)
            })
            .map_err(errno)?
            .map_err(errno)?;
            // Where a deleted directory was, the new one must not show the old one's entries.
            if had_whiteout {
                up.set_opaque(&real)?;
            }
            let made = nix::sys::stat::lstat(&real).map_err(nix_errno)?;
            self.entry_made(req, &rel, &made)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let (up, mut w) = self.upper()?;
            let rel = self.child(parent.0, name)?;
            w.touch(&rel);
            let r = self.fresh(&rel).ok_or(Errno::ENOENT)?;
            if let Resolved::Dir { .. } = r {
                return Err(Errno::EISDIR);
            }
            if r.layer() == 0 {
                self.deleting(r.stat());
                std::fs::remove_file(up.root.join(&rel)).map_err(errno)?;
            }
            if self.fresh(&rel).is_some() {
                if let Some(p) = rel.parent() {
                    up.ensure_dir(&self.stack, p)?;
                }
                up.whiteout(&rel)?;
            }
            self.nodes.forget_path(&rel);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            let (up, mut w) = self.upper()?;
            let rel = self.child(parent.0, name)?;
            w.touch(&rel);
            let Resolved::Dir { layers, stat } = self.fresh(&rel).ok_or(Errno::ENOENT)? else {
                return Err(Errno::ENOTDIR);
            };
            if !self
                .stack
                .read_dir(&layers, &rel)
                .map_err(errno)?
                .is_empty()
            {
                return Err(Errno::ENOTEMPTY);
            }
            if layers[0] == 0 {
                self.deleting(&stat);
                up.remove_dir(&up.root.join(&rel))?;
            }
            if self.fresh(&rel).is_some() {
                if let Some(p) = rel.parent() {
                    up.ensure_dir(&self.stack, p)?;
                }
                up.whiteout(&rel)?;
            }
            self.nodes.forget_path(&rel);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let (rel, _) = self.new_name(parent.0, link_name)?;
            let (up, mut w) = self.upper()?;
            w.touch(&rel);
            let real = up.root.join(&rel);
            std::os::unix::fs::symlink(target, &real).map_err(errno)?;
            let made = nix::sys::stat::lstat(&real).map_err(nix_errno)?;
            self.entry_made(req, &rel, &made)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if flags.contains(fuser::RenameFlags::RENAME_EXCHANGE) {
                return self.exchange(parent.0, name, newparent.0, newname);
            }
            let (up, mut w) = self.upper()?;
            let from = self.child(parent.0, name)?;
            let to = self.child(newparent.0, newname)?;
            w.touch(&from);
            w.touch(&to);
            let src = self.fresh(&from).ok_or(Errno::ENOENT)?;
            let is_dir = matches!(src, Resolved::Dir { .. });
            if from == to {
                return Ok(());
            }
            if is_dir && to.starts_with(&from) {
                return Err(Errno::EINVAL);
            }
            let dst = self.fresh(&to);
            if let Some(d) = &dst {
                if flags.contains(fuser::RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                match (is_dir, d) {
                    (false, Resolved::Dir { .. }) => return Err(Errno::EISDIR),
                    (true, Resolved::File { .. }) => return Err(Errno::ENOTDIR),
                    (true, Resolved::Dir { layers, .. })
                        if !self.stack.read_dir(layers, &to).map_err(errno)?.is_empty() =>
                    {
                        return Err(Errno::ENOTEMPTY);
                    }
                    _ => {}
                }
            }
            self.copy_up_whole(up, &from, &src)?;
            if let Some(p) = to.parent() {
                up.ensure_dir(&self.stack, p)?;
            }
            let had_whiteout = up.clear_whiteout(&to)?;
            let real_to = up.root.join(&to);
            match &dst {
                Some(d @ Resolved::Dir { layers, .. }) if layers[0] == 0 => {
                    self.deleting(d.stat());
                    up.remove_dir(&real_to)?;
                }
                // Replaced by the rename below.
                Some(d @ Resolved::File { layer: 0, .. }) => self.deleting(d.stat()),
                _ => {}
            }
            std::fs::rename(up.root.join(&from), &real_to).map_err(errno)?;
            // A directory now standing where lower content is must hide it.
            if is_dir && (had_whiteout || dst.is_some()) {
                up.set_opaque(&real_to)?;
            }
            if self.fresh(&from).is_some() {
                up.whiteout(&from)?;
            }
            self.nodes.rename(&from, &to);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            let (up, mut w) = self.upper()?;
            let path = self.nodes.path(ino.0).ok_or(Errno::ESTALE)?;
            w.touch(&path);
            self.copy_up(up, &path)?;
            let (rel, _) = self.new_name(newparent.0, newname)?;
            w.touch(&rel);
            std::fs::hard_link(up.root.join(&path), up.root.join(&rel)).map_err(errno)?;
            let m = self.upper_entry(&rel)?;
            // Both names are one inode, whose number the copy-up kept: the linked node's.
            self.looked_up(&rel, ino.0);
            Ok(attr(ino.0, &m))
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        let r = (|| {
            let (rel, _) = self.new_name(parent.0, name)?;
            let (up, mut w) = self.upper()?;
            w.touch(&rel);
            let real = up.root.join(&rel);
            let mut o = std::fs::OpenOptions::new();
            o.read(flags & libc::O_ACCMODE != libc::O_WRONLY || self.writeback)
                .write(true)
                .create_new(true)
                .append(flags & libc::O_APPEND != 0 && !self.writeback)
                .mode(mode & 0o7777);
            let f = crate::sys::with_umask(umask, || o.open(&real))
                .map_err(errno)?
                .map_err(errno)?;
            let made = nix::sys::stat::fstat(&f).map_err(nix_errno)?;
            let a = self.entry_made(req, &rel, &made)?;
            Ok((a, f, (made.st_dev, made.st_ino)))
        })();
        let (a, f, file) = match r {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let io = match self.io_mode(a.ino.0, &f, Some(file), |f| reply.open_backing(f)) {
            Ok(io) => io,
            Err(e) => return reply.error(e),
        };
        let fh = FileHandle(self.add_handle(Handle::File(a.ino.0, Arc::new(f))));
        match io {
            Io::Passthrough(id) => {
                let flags = FopenFlags::FOPEN_NOFLUSH;
                reply.created_passthrough(&TTL, &a, Generation(0), fh, flags, &id);
            }
            Io::Cached => {
                let flags = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH;
                reply.created(&TTL, &a, Generation(0), fh, flags)
            }
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        let Some(f) = self.file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if write_flags.contains(fuser::WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            if let Err(e) = self.kill_suid(req, &f) {
                return reply.error(e);
            }
        }
        match f.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.upper.as_ref().is_some_and(|u| u.volatile) {
            return reply.ok();
        }
        let _off = crate::threads::DiskWait::begin();
        let r = match self.file(fh.0) {
            Some(f) if datasync => f.sync_data().map_err(errno),
            Some(f) => f.sync_all().map_err(errno),
            None => Ok(()),
        };
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// fsync of a directory syncs its copy in the upper, as kernel overlay's does (a directory
    /// only in lowers has nothing of this mount's to sync). Without this the kernel, told
    /// ENOSYS once, would answer every later directory fsync with success and sync nothing:
    /// a program's fsync of a directory after a create or rename would not make it durable.
    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(up) = self.upper.as_ref().filter(|u| !u.volatile) else {
            return reply.ok();
        };
        let r = (|| {
            let path = self.nodes.path(ino.0).ok_or(Errno::ESTALE)?;
            let dir = match std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(up.root.join(&path))
            {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(errno(e)),
            };
            let _off = crate::threads::DiskWait::begin();
            if datasync {
                dir.sync_data().map_err(errno)
            } else {
                dir.sync_all().map_err(errno)
            }
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if is_overlay_xattr(name.as_bytes()) {
                return Err(Errno::EPERM);
            }
            let (up, mut w) = self.upper()?;
            let path = self.nodes.path(ino.0).ok_or(Errno::ESTALE)?;
            w.touch(&path);
            self.copy_up(up, &path)?;
            crate::sys::lsetxattr(&up.root.join(&path), name, value).map_err(errno)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = (|| {
            if is_overlay_xattr(name.as_bytes()) {
                return Err(Errno::EPERM);
            }
            let (up, mut w) = self.upper()?;
            let path = self.nodes.path(ino.0).ok_or(Errno::ESTALE)?;
            w.touch(&path);
            self.copy_up(up, &path)?;
            crate::sys::lremovexattr(&up.root.join(&path), name).map_err(errno)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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

    /// No OPENDIR (see `Listings`): the kernel then opens directories by itself and keeps
    /// their listings cached (every change to a directory goes through this mount, and the
    /// kernel drops its copy of a directory it sees change).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (list, number, start) = match self.listing(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (next, name, e) in list.from(number, start) {
            let (n, kind) = match e {
                Listed::Dot(n) => (n, FileType::Directory),
                Listed::Merged(e) => (self.inos.of_file(e.file.0, e.file.1), file_type(e.kind())),
            };
            if reply.add(INodeNo(n), next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// readdir with each entry's attributes: `ls -l`, `find` and `stat` over a listing need no
    /// lookup per entry. "." and ".." are listed as readdir lists them, their attributes unused.
    /// The kernel takes a reference to every other entry sent, as for a lookup.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (list, number, start) = match self.listing(ino.0, offset) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        for (next, name, e) in list.from(number, start) {
            let e = match e {
                // Listed for the reader with their numbers; the kernel takes no reference for
                // them and reads none of their attributes.
                Listed::Dot(n) => {
                    let a = dot_attr(n);
                    if reply.add(INodeNo(n), next, name, &Duration::ZERO, &a, Generation(0)) {
                        break;
                    }
                    continue;
                }
                Listed::Merged(e) => e,
            };
            // A lower file the kernel holds: its attributes are remembered (lower layers do
            // not change while mounted), so the listing costs no lstat for it.
            let lower = Some(e.layer) != self.stack.upper();
            let n = self.inos.of_file(e.file.0, e.file.1);
            let (n, st) = match lower
                .then(|| self.nodes.lower_attrs_in(&list.dir, name, n, e.file))
                .flatten()
            {
                // Remembered for this very backing file, so `n` is its number.
                Some(st) => {
                    self.counts.remembered.fetch_add(1, Ordering::Relaxed);
                    (n, st)
                }
                None => {
                    let Some(st) = list.merged.stat(name, e) else {
                        continue; // gone since the listing was read
                    };
                    let n = self.inos.of(&st);
                    self.nodes.looked_up_in(&list.dir, name, n);
                    if lower {
                        self.nodes.remember_lower(n, &st);
                    }
                    self.evict.check(self.nodes.len());
                    (n, st)
                }
            };
            if reply.add(INodeNo(n), next, name, &TTL, &attr(n, &st), Generation(0)) {
                // Did not fit: not sent, so not a reference.
                self.nodes.forget(n, 1);
                break;
            }
        }
        reply.ok();
    }

    /// (fuser's `batch_forget` calls this for each node.)
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.nodes.forget(ino.0, nlookup);
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel does the other seeks itself), answered by the
    /// backing file: a sparse file shows its holes, as on kernel overlay, so `cp` and `tar`
    /// keep it sparse. Without this the kernel takes the whole file for data. Only where
    /// writes reach the backing file at once (passthrough, or no writeback cache).
    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        use nix::unistd::Whence;
        // With the writeback cache the kernel may hold written data the backing file has not
        // got yet, where the backing file would show a hole: ENOSYS has the kernel take the
        // whole file for data from then on (safe, as before).
        if self.writeback {
            return reply.error(Errno::ENOSYS);
        }
        let Some(f) = self.file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let whence = match whence {
            libc::SEEK_DATA => Whence::SeekData,
            libc::SEEK_HOLE => Whence::SeekHole,
            _ => return reply.error(Errno::EINVAL),
        };
        // The server reads and writes at offsets, never at the descriptor's position.
        match nix::unistd::lseek(&*f, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(nix_errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.file(fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let r = nix::fcntl::fallocate(
            &*f,
            nix::fcntl::FallocateFlags::from_bits_truncate(mode),
            offset as i64,
            length as i64,
        );
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
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

/// Mount options: read-only without an upper, the kernel checking permissions from the
/// attributes we report (as kernel overlay does), `allow_other`, `suid` and `dev` when root (so
/// every user sees, runs and opens what kernel overlay would let them), `fsname` as given.
pub fn config(fsname: &str, threads: usize, read_only: bool) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::FSName(fsname.into()),
        fuser::MountOption::Subtype("strata".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if read_only {
        c.mount_options.push(fuser::MountOption::RO);
    }
    if nix::unistd::geteuid().is_root() {
        c.acl = fuser::SessionACL::All;
        // As kernel overlay mounts: set-ID programs and device files of an image work in a
        // container whose root is this mount (fuser's own default is nosuid,nodev; an
        // unprivileged mount through fusermount3 gets them whatever is asked).
        c.mount_options
            .extend([fuser::MountOption::Suid, fuser::MountOption::Dev]);
    }
    c.n_threads = Some(threads.max(1));
    c.clone_fd = true;
    c
}

/// Raises this process's open-file limit to its hard limit, returning the limit now in force.
/// The server holds a descriptor for every file open through the mount (passthrough needs
/// one), so a container with a thousand files open would otherwise meet EMFILE at the usual
/// soft limit of 1024. A server calls this before serving.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Turns off set-ID programs (`nosuid`) and device files (`nodev`) on a mount `config`
/// describes, as asked.
pub fn restrict(config: &mut fuser::Config, nosuid: bool, nodev: bool) {
    use fuser::MountOption as O;
    for (asked, off, on) in [(nosuid, O::NoSuid, O::Suid), (nodev, O::NoDev, O::Dev)] {
        if asked {
            config.mount_options.retain(|o| *o != on);
            config.mount_options.push(off);
        }
    }
}

/// Serves `union` at `mountpoint` until it is unmounted (`umount`, `fusermount3 -u`).
pub fn serve(union: Union, mountpoint: &Path, config: &fuser::Config) -> std::io::Result<()> {
    serve_with(union, mountpoint, config, || {})
}

/// [`serve`], calling `mounted` once the mount exists (before any request is answered): a
/// detached server lets go of its starter there. Meant to be a server process's last work:
/// the ended session's descriptors are not closed.
pub fn serve_with(
    union: Union,
    mountpoint: &Path,
    config: &fuser::Config,
    mounted: impl FnOnce(),
) -> std::io::Result<()> {
    let mut session = spawn(union, mountpoint, config)?;
    mounted();
    // Not `session.join()`: that drops fuser's mount guard, which unmounts the mount point
    // again even after an `umount` ended the session (fuser 0.17 takes the ended connection
    // for a live mount), and so unmounted whatever had been mounted there since: a new
    // server's mount on the same path. The session's thread is joined instead and the guard
    // forgotten; the process ends with the session anyway.
    let guard = std::mem::replace(&mut session.guard, std::thread::spawn(|| Ok(())));
    let r = guard
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the FUSE session's thread panicked")));
    std::mem::forget(session);
    let r = ended(r);
    // A session that failed leaves its mount dead (every access ENOTCONN): not left behind.
    if r.is_err() && crate::mounts::is_dead(mountpoint) {
        let _ = crate::mounts::unmount(mountpoint, true);
    }
    r
}

/// Mounts `union` at `mountpoint` and serves it from background threads until it is unmounted
/// or the returned session is dropped; the node table's cap is kept from here on, and the
/// request threads are placed as [`crate::threads`] says.
pub fn spawn(
    union: Union,
    mountpoint: &Path,
    config: &fuser::Config,
) -> std::io::Result<fuser::BackgroundSession> {
    if let Some(upper) = &union.upper {
        upper.prepare()?;
    }
    let (evict, nodes) = (union.evict.clone(), union.nodes.clone());
    let session = fuser::Session::new(union, mountpoint, config)?;
    evict.start(nodes, session.notifier());
    let before = crate::threads::tasks();
    let session = session.spawn()?;
    crate::threads::place(&before, config.n_threads.unwrap_or(1));
    Ok(session)
}

impl Drop for Union {
    fn drop(&mut self) {
        self.evict.close();
    }
}

/// What a served union holds ([`Union::stats`]).
#[derive(Clone)]
pub struct Stats {
    nodes: Arc<Nodes>,
    inos: Arc<Inos>,
    counts: Arc<Counts>,
}

impl Stats {
    /// Nodes the kernel holds (the root included).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Opens the kernel was told to pass through to their backing file.
    pub fn passthrough_opens(&self) -> u64 {
        self.counts.passed.load(Ordering::Relaxed)
    }

    /// Reads this server answered (the kernel did not pass them through).
    pub fn reads_served(&self) -> u64 {
        self.counts.reads.load(Ordering::Relaxed)
    }

    /// Entries of listings with attributes (readdirplus) answered from the remembered
    /// attributes of lower files, without an `lstat`.
    pub fn remembered_attrs(&self) -> u64 {
        self.counts.remembered.load(Ordering::Relaxed)
    }

    /// LOOKUPs the kernel sent (names it did not have cached, present or absent).
    pub fn lookups(&self) -> u64 {
        self.counts.lookups.load(Ordering::Relaxed)
    }

    /// Copied-up files and dirs that keep their origin's inode number.
    pub fn origins(&self) -> usize {
        self.inos.origins()
    }
}

/// A session's end: with several threads, the kernel aborts the connection of the ones still
/// reading when the filesystem is unmounted; that is a normal end, not an error.
pub fn ended(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e)
            if e.kind() == std::io::ErrorKind::ConnectionAborted
                || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(())
        }
        r => r,
    }
}
