//! The snapshotter: containerd's snapshot model over layer directories.
//!
//! Layout below the root (containerd's overlay snapshotter's):
//! ```text
//! ROOT/metadata.db            SQLite (WAL): snapshots, labels
//! ROOT/features               kernel overlay features probed at this boot (a cache)
//! ROOT/snapshots/<id>/fs      the layer (upper dir while active)
//! ROOT/snapshots/<id>/work    overlay's work dir (active snapshots)
//! ROOT/snapshots/<id>/merged  FUSE mode: where the snapshot's union is mounted (handed out as
//!                             a bind mount)
//! ROOT/snapshots/new-*        a snapshot being created (temp; renamed to <id> in its transaction)
//! ROOT/snapshots/rm-<id>      a removed snapshot's dirs, being deleted off the request path
//! ROOT/snapshots/stock-*      empty active-snapshot dirs (fs/ 0755, work/) made ahead, off the
//!                             request path; Prepare renames one into place
//! ```
//! Every change is one SQLite transaction. A new snapshot's directories are created under a
//! temp name and renamed into place before its transaction commits; a removed snapshot's are
//! renamed away after its transaction commits. Either way a kill at any instant leaves the old
//! or the new state plus, at worst, a directory no record owns, which is removed at start and
//! by `cleanup`.
//!
//! In FUSE mode ([`Mode::Fuse`], or [`Mode::Auto`] where kernel overlay cannot mount) a
//! snapshot that needs a union is mounted by its own FUSE server when it is created (see
//! [`crate::fuse`]), remounted by `mounts` if that server has gone, and unmounted by `commit`
//! and `remove`; the on-disk layout is the same, so a store moves between modes freely.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use strata_overlay::mount::{Mount, Options, Overlay};

use crate::filter::{self, Fields, Filter};
use crate::fuse::{self, FuseHelper};
use crate::meta::{self, Kind, Meta, Row};
use crate::{Error, Result};

/// The label that asks for a volatile (no-sync) overlay for a container's snapshot.
pub const VOLATILE_LABEL: &str = "containerd.io/snapshot/strata.volatile";
/// The label containerd's unpacker puts on the snapshots it applies layers into.
pub const UNPACK_LABEL: &str = "containerd.io/snapshot.ref";
/// containerd's limit on one label's key plus value.
const MAX_LABEL: usize = 4096;

/// How the snapshotter mounts layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kernel overlayfs.
    Overlay,
    /// Strata's FUSE filesystem.
    Fuse,
    /// Kernel overlay where it works here, FUSE otherwise.
    Auto,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "overlay" => Ok(Mode::Overlay),
            "fuse" => Ok(Mode::Fuse),
            "auto" => Ok(Mode::Auto),
            other => Err(Error::InvalidArgument(format!(
                "unknown mode {other:?}: expected overlay, fuse or auto"
            ))),
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct Config {
    /// How layers are mounted.
    pub mode: Mode,
    /// FUSE mode's mount program (fuse-overlayfs' command line); `None`: this executable as
    /// `strata-fuse`.
    pub fuse_helper: Option<FuseHelper>,
    /// The machine's boot id; `None`: the running kernel's. Tests simulate a reboot with it.
    pub boot_id: Option<String>,
    /// How many empty active-snapshot dirs to keep ready, made off the request path so
    /// Prepare only renames one (0: none; a long-running server wants a few). They are
    /// deleted when the store is closed.
    pub ready_dirs: usize,
}

impl Config {
    /// `mode` with the defaults.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            fuse_helper: None,
            boot_id: None,
            ready_dirs: 0,
        }
    }
}

/// A snapshot as containerd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key or name.
    pub name: String,
    /// Parent's name, "" for none.
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Creation time.
    pub created: SystemTime,
    /// Last update.
    pub updated: SystemTime,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// Disk usage of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of disk used (blocks, hard links counted once).
    pub size: i64,
    /// Inodes used.
    pub inodes: i64,
}

fn to_time(ns: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64)
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl From<&Row> for Info {
    fn from(r: &Row) -> Info {
        Info {
            name: r.key.clone(),
            parent: r.parent.clone(),
            kind: r.kind,
            created: to_time(r.created),
            updated: to_time(r.updated),
            labels: r.labels.clone(),
        }
    }
}

impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("name") if path.len() == 1 => Some(self.name.clone()),
            Some("parent") if path.len() == 1 => Some(self.parent.clone()),
            Some("kind") if path.len() == 1 => Some(self.kind.name().to_string()),
            Some("labels") if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

/// The snapshotter over one root directory.
pub struct Snapshotter {
    root: PathBuf,
    meta: Mutex<Meta>,
    options: Options,
    /// FUSE mode's mount program; `None` in overlay mode.
    fuse: Option<FuseHelper>,
    /// Which backend was chosen and why (for logs and `strata info`).
    backend: String,
    /// Serializes making the FUSE mount of one snapshot (never across snapshots).
    mount_locks: Mutex<HashMap<i64, Arc<Mutex<()>>>>,
    boot_id: String,
    /// The background thread's queue: deletions, and restocking of `stock`.
    reaper: Mutex<Option<mpsc::Sender<Chore>>>,
    reaper_thread: Option<std::thread::JoinHandle<()>>,
    /// Ready-made active-snapshot dirs.
    stock: Arc<Mutex<Vec<PathBuf>>>,
    /// Set at drop: restocking stops, deletions still finish.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// [`Config::ready_dirs`].
    ready_dirs: usize,
    counter: AtomicU64,
}

impl Drop for Snapshotter {
    /// Finishes the deletions still queued, so a short-lived user (the CLI) leaves nothing.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        self.reaper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = self.reaper_thread.take() {
            let _ = t.join();
        }
        for p in self
            .stock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Work for the background thread.
enum Chore {
    /// Delete a removed snapshot's dirs (unmounting anything below first).
    Delete(PathBuf),
    /// Make one more ready dir for Prepare.
    Stock,
}

/// Makes an active snapshot's dirs (`fs/` 0755, `work/`) under `tmp`.
fn make_active_dirs(tmp: &Path) -> std::io::Result<()> {
    std::fs::create_dir(tmp)?;
    std::fs::create_dir(tmp.join("fs"))?;
    // Explicitly, so the umask cannot change it (containerd relies on the umask).
    std::fs::set_permissions(tmp.join("fs"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir(tmp.join("work"))
}

/// One ready dir: made under a temp name, renamed to `stock-*` only when complete.
fn restock(snapshots: &Path, n: u64, stock: &Mutex<Vec<PathBuf>>) {
    let pid = std::process::id();
    let (tmp, done) = (
        snapshots.join(format!("stock-new-{pid}-{n}")),
        snapshots.join(format!("stock-{pid}-{n}")),
    );
    let made = make_active_dirs(&tmp).and_then(|()| std::fs::rename(&tmp, &done));
    match made {
        Ok(()) => stock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(done),
        Err(e) => {
            tracing::warn!(path = %tmp.display(), %e, "making a ready snapshot dir");
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL {
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL} bytes), key: {}",
                k.len() + v.len(),
                &k[..k.len().min(64)]
            )));
        }
    }
    Ok(())
}

/// Makes the layer at `path` durable before it is recorded as committed, and measures it. A
/// small layer (the common container commit) has each file and directory synced; a large one
/// is flushed with one `syncfs`, which would otherwise also wait for every unrelated dirty
/// inode on the file system.
fn settle(path: &Path) -> Result<Usage> {
    const ONE_BY_ONE: usize = 256;
    let mut sync = Some(Vec::new());
    let usage = walk(path, &mut |p, m| {
        if let Some(list) = &mut sync {
            if m.is_dir() || m.is_file() {
                list.push((p.to_path_buf(), m.is_dir()));
            }
            if list.len() > ONE_BY_ONE {
                sync = None;
            }
        }
    })?;
    match sync {
        Some(list) => {
            // Files first, then directories deepest first, so every entry is durable before
            // the directory naming it.
            for (p, is_dir) in list
                .iter()
                .filter(|e| !e.1)
                .chain(list.iter().rev().filter(|e| e.1))
            {
                let f = std::fs::File::open(p).map_err(|e| Error::io("open", p, e))?;
                let r = if *is_dir { f.sync_all() } else { f.sync_data() };
                r.map_err(|e| Error::io("fsync", p, e))?;
            }
        }
        None => {
            let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
            nix::unistd::syncfs(&f).map_err(|e| Error::io("syncfs", path, e.into()))?;
        }
    }
    Ok(usage)
}

fn du(path: &Path) -> Result<Usage> {
    walk(path, &mut |_, _| {})
}

/// Disk usage of the tree at `path`, calling `each` on every entry (hard links once).
fn walk(path: &Path, each: &mut dyn FnMut(&Path, &std::fs::Metadata)) -> Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += (m.blocks() * 512) as i64;
        each(&p, &m);
        if m.is_dir() {
            for e in std::fs::read_dir(&p).map_err(|e| Error::io("read dir", &p, e))? {
                stack.push(e.map_err(|e| Error::io("read dir", &p, e))?.path());
            }
        }
    }
    Ok(usage)
}

impl Snapshotter {
    /// Opens (or creates) the store at `root`, sweeps directories no record points to, and
    /// discards volatile snapshots that did not survive a restart of the machine.
    pub fn open(root: &Path, mode: Mode) -> Result<Snapshotter> {
        Self::open_with(root, Config::new(mode))
    }

    /// [`Snapshotter::open`] as if the machine's boot id were `boot_id`: tests and tools use it
    /// to simulate a reboot.
    pub fn open_at_boot(root: &Path, mode: Mode, boot_id: String) -> Result<Snapshotter> {
        Self::open_with(
            root,
            Config {
                boot_id: Some(boot_id),
                ..Config::new(mode)
            },
        )
    }

    /// [`Snapshotter::open`] with every choice spelled out.
    pub fn open_with(root: &Path, config: Config) -> Result<Snapshotter> {
        let boot_id = config.boot_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap_or_default()
                .trim()
                .to_string()
        });
        std::fs::create_dir_all(root.join("snapshots"))
            .map_err(|e| Error::io("create", root.join("snapshots"), e))?;
        let mode = config.mode;
        let mut fuse_reason = None;
        let mut options = Options::default();
        if mode != Mode::Fuse {
            let f = strata_overlay::probe::probe_cached(root, &root.join("features"));
            if f.overlay {
                tracing::info!(backing_fs = %f.backing_fs, metacopy = f.metacopy, redirect_dir = f.redirect_dir, userxattr = f.in_userns, "kernel overlay chosen");
                options = f.options();
            } else {
                let why = format!(
                    "kernel overlayfs cannot mount on {} ({}): {}",
                    root.display(),
                    f.backing_fs,
                    f.error.clone().unwrap_or_default()
                );
                if mode == Mode::Overlay {
                    return Err(Error::Unsupported(format!(
                        "{why}; --mode fuse or auto would use Strata's FUSE filesystem"
                    )));
                }
                fuse_reason = Some(why);
            }
        } else {
            fuse_reason = Some("--mode fuse".into());
        }
        let (fuse, backend) = match fuse_reason {
            None => (
                None,
                format!(
                    "overlay (kernel{}{}{})",
                    if options.metacopy { ", metacopy" } else { "" },
                    if options.redirect_dir {
                        ", redirect_dir"
                    } else {
                        ""
                    },
                    if options.userxattr { ", userxattr" } else { "" }
                ),
            ),
            Some(why) => {
                if !Path::new("/dev/fuse").exists() {
                    return Err(Error::Unsupported(format!(
                        "FUSE mode ({why}) needs /dev/fuse, which this machine lacks"
                    )));
                }
                let helper = match config.fuse_helper.clone() {
                    Some(h) => h,
                    None => FuseHelper::this_exe()?,
                };
                tracing::info!(reason = %why, helper = %helper.program.display(), "FUSE mode chosen");
                (Some(helper), format!("fuse ({why})"))
            }
        };
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod", root, e))?;
        let meta = Meta::open(&root.join("metadata.db"))?;
        let (tx, rx) = mpsc::channel::<Chore>();
        let stock = Arc::new(Mutex::new(Vec::new()));
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (snapshots, stocked, closed) = (root.join("snapshots"), stock.clone(), closing.clone());
        let reaper_thread = std::thread::Builder::new()
            .name("strata-reaper".into())
            .spawn(move || {
                let mut n = 0;
                for chore in rx {
                    let p = match chore {
                        Chore::Delete(p) => p,
                        Chore::Stock => {
                            if !closed.load(Ordering::Relaxed) {
                                n += 1;
                                restock(&snapshots, n, &stocked);
                            }
                            continue;
                        }
                    };
                    if let Err(e) = fuse::unmount_below(&p) {
                        tracing::error!(path = %p.display(), %e, "unmounting below a deleted snapshot's directory; not deleting it");
                        continue;
                    }
                    // A dir can be queued twice (Remove, then a Cleanup that saw it): gone is fine.
                    if let Err(e) = std::fs::remove_dir_all(&p).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }) {
                        tracing::error!(path = %p.display(), %e, "removing a deleted snapshot's directory");
                    }
                }
            })
            .map_err(|e| Error::io("spawn reaper", root, e))?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            meta: Mutex::new(meta),
            options,
            fuse,
            backend,
            mount_locks: Mutex::new(HashMap::new()),
            boot_id,
            reaper: Mutex::new(Some(tx)),
            reaper_thread: Some(reaper_thread),
            stock,
            closing,
            ready_dirs: config.ready_dirs,
            counter: AtomicU64::new(0),
        };
        s.discard_stale_volatile()?;
        s.cleanup()?;
        s.take_over_stock()?;
        Ok(s)
    }

    /// The overlay options every overlay mount gets here.
    pub fn options(&self) -> Options {
        self.options
    }

    /// The backend this store mounts with and why: `overlay (kernel, ...)` or `fuse (REASON)`.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Whether union snapshots are served by FUSE mounts.
    pub fn is_fuse(&self) -> bool {
        self.fuse.is_some()
    }

    fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir(&self, id: i64) -> PathBuf {
        self.snapshots().join(id.to_string())
    }

    /// The layer directory of snapshot `id`.
    pub fn fs_dir(&self, id: i64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reap(&self, p: PathBuf) {
        if let Some(Chore::Delete(p)) = self.chore(Chore::Delete(p)) {
            let _ = std::fs::remove_dir_all(p);
        }
    }

    /// Queues `c` for the background thread; gives it back if that thread is gone.
    fn chore(&self, c: Chore) -> Option<Chore> {
        let tx = self
            .reaper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match tx.as_ref() {
            Some(tx) => tx.send(c).err().map(|mpsc::SendError(c)| c),
            None => Some(c),
        }
    }

    /// Takes the ready dirs a previous process left (complete ones only: they are renamed
    /// into their name last) and tops the stock up.
    fn take_over_stock(&self) -> Result<()> {
        let dir = self.snapshots();
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("read dir", &dir, e))? {
            let e = e.map_err(|e| Error::io("read dir", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("stock-") && !name.starts_with("stock-new-") {
                found.push(e.path());
            }
        }
        // A kill between Prepare taking a dir and renaming it into place, with its replacement
        // already made, leaves one more than the stock holds: extras go.
        while found.len() > self.ready_dirs {
            self.reap(found.pop().expect("longer than ready_dirs"));
        }
        let missing = self.ready_dirs - found.len();
        self.stock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(found);
        for _ in 0..missing {
            self.chore(Chore::Stock);
        }
        Ok(())
    }

    /// A ready-made active snapshot dir, if one is waiting (and a new one is ordered).
    fn stocked_dir(&self) -> Option<PathBuf> {
        let p = self
            .stock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()?;
        self.chore(Chore::Stock);
        Some(p)
    }

    /// Creates an active snapshot `key` on `parent` ("" for none) and returns its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view `key` of `parent` and returns its mounts.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        validate_labels(&labels)?;
        let volatile = kind == Kind::Active
            && labels.get(VOLATILE_LABEL).is_some_and(|v| v == "true")
            && !labels.contains_key(UNPACK_LABEL);
        let mut meta = self.lock();
        let stocked = if kind == Kind::Active {
            self.stocked_dir()
        } else {
            None
        };
        let tmp = match stocked {
            Some(ready) => ready,
            None => {
                // Made under the lock, so `cleanup` never mistakes it for a leftover.
                let tmp = self.snapshots().join(format!(
                    "new-{}-{}",
                    std::process::id(),
                    self.counter.fetch_add(1, Ordering::Relaxed)
                ));
                let made = if kind == Kind::Active {
                    make_active_dirs(&tmp)
                } else {
                    std::fs::create_dir(&tmp)
                        .and_then(|()| std::fs::create_dir(tmp.join("fs")))
                        .and_then(|()| {
                            std::fs::set_permissions(
                                tmp.join("fs"),
                                std::fs::Permissions::from_mode(0o755),
                            )
                        })
                };
                if let Err(e) = made {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(Error::io("create snapshot dir", &tmp, e));
                }
                tmp
            }
        };
        let tx = match meta.write() {
            Ok(tx) => tx,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let result = (|| -> Result<(i64, Vec<i64>)> {
            if meta::get(&tx, key)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {key:?} already exists"
                )));
            }
            let parent_id = if parent.is_empty() {
                None
            } else {
                let p = meta::get(&tx, parent)?.ok_or_else(|| {
                    Error::NotFound(format!("parent snapshot {parent:?} does not exist"))
                })?;
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
                Some(p.id)
            };
            let boot = volatile.then_some(self.boot_id.as_str());
            let id = meta::insert(&tx, key, parent_id, kind, now_ns(), boot, &labels)?;
            let chain = meta::chain(&tx, id)?;
            std::fs::rename(&tmp, self.dir(id))
                .map_err(|e| Error::io("rename into place", self.dir(id), e))?;
            Ok((id, chain))
        })();
        let (id, chain) = match result {
            Ok(v) => v,
            Err(e) => {
                drop(tx);
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = tx.commit() {
            let _ = std::fs::remove_dir_all(self.dir(id));
            return Err(Error::Db {
                op: "commit",
                err: e,
            });
        }
        drop(meta);
        tracing::debug!(key, parent, ?kind, id, "created snapshot");
        match self.mounts_of(id, kind, &chain, volatile) {
            Ok(m) => Ok(m),
            Err(e) => {
                // A snapshot nobody can mount is not handed out: undone, so a retry works.
                if let Err(undo) = self.remove(key) {
                    tracing::error!(key, %undo, "removing a snapshot whose mount failed");
                }
                Err(e)
            }
        }
    }

    /// containerd's mount rules: a bind mount without parents or for a one-layer view, an
    /// overlay otherwise; read-only views have no upper.
    fn mounts_of(&self, id: i64, kind: Kind, chain: &[i64], volatile: bool) -> Result<Vec<Mount>> {
        if chain.is_empty() {
            return Ok(vec![Mount::bind(&self.fs_dir(id), kind == Kind::View)]);
        }
        if kind == Kind::View && chain.len() == 1 {
            return Ok(vec![Mount::bind(&self.fs_dir(chain[0]), true)]);
        }
        if let Some(helper) = &self.fuse {
            return self.fuse_mount(helper, id, kind, chain).map(|m| vec![m]);
        }
        let lowers = chain.iter().map(|&p| self.fs_dir(p)).collect();
        let (upper, work) = if kind == Kind::Active {
            (Some(self.fs_dir(id)), Some(self.dir(id).join("work")))
        } else {
            (None, None)
        };
        let mut options = self.options;
        options.volatile = volatile;
        if volatile {
            // The kernel leaves work/work/incompat/volatile after a volatile mount and refuses
            // to mount over it again. Within one boot nothing was lost, so it may go (the
            // restart case is handled at start).
            let _ = std::fs::remove_dir_all(self.dir(id).join("work/work/incompat/volatile"));
        }
        Ok(vec![
            Overlay {
                lowers,
                upper,
                work,
                options,
            }
            .to_mount(),
        ])
    }

    fn merged_dir(&self, id: i64) -> PathBuf {
        self.dir(id).join("merged")
    }

    fn mount_lock(&self, id: i64) -> Arc<Mutex<()>> {
        self.mount_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id)
            .or_default()
            .clone()
    }

    /// The union of snapshot `id` as a live FUSE mount on its `merged` dir (made now if there
    /// is none or its server has gone), handed out as a bind mount.
    fn fuse_mount(&self, helper: &FuseHelper, id: i64, kind: Kind, chain: &[i64]) -> Result<Mount> {
        let merged = self.merged_dir(id);
        let lock = self.mount_lock(id);
        let _one = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if strata_fuse::mounts::is_fuse_mount(&merged) {
            if !strata_fuse::mounts::is_dead(&merged) {
                return Ok(Mount::bind(&merged, kind == Kind::View));
            }
            tracing::warn!(
                id,
                "the FUSE server of this snapshot has gone: mounting it again"
            );
            strata_fuse::mounts::unmount(&merged, true)
                .map_err(|e| Error::io("unmount", &merged, e))?;
        }
        match std::fs::create_dir(&merged) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create", &merged, e)),
        }
        let lowers: Vec<PathBuf> = chain.iter().map(|&p| self.fs_dir(p)).collect();
        let (upper, work) = (self.fs_dir(id), self.dir(id).join("work"));
        let upper_work = (kind == Kind::Active).then_some((upper.as_path(), work.as_path()));
        helper.mount(&lowers, upper_work, "strata", &merged)?;
        tracing::debug!(id, layers = lowers.len(), "FUSE union mounted");
        Ok(Mount::bind(&merged, kind == Kind::View))
    }

    /// Ends snapshot `id`'s FUSE mount, if it has one (whatever mode made it).
    fn end_fuse_mount(&self, id: i64) -> Result<()> {
        let merged = self.merged_dir(id);
        match std::fs::symlink_metadata(&merged) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            _ => {
                let lock = self.mount_lock(id);
                let _one = lock
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                fuse::unmount(&merged)
            }
        }
    }

    /// Unmounts every FUSE mount of this store (a clean shutdown that does not keep them).
    pub fn unmount_all(&self) -> Result<()> {
        let ids = {
            let meta = self.lock();
            meta::ids(meta.conn())?
        };
        for id in ids {
            if let Err(e) = self.end_fuse_mount(id) {
                tracing::error!(id, %e, "unmounting a snapshot's FUSE mount");
            }
        }
        Ok(())
    }

    /// The mounts of an existing active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        self.mounts_with(key, true).expect("waiting never gives up")
    }

    /// [`Snapshotter::mounts`], or `None` at once when the store is busy with a write: the
    /// gRPC layer answers quick reads inline and sends only contended ones to the blocking pool.
    pub fn try_mounts(&self, key: &str) -> Option<Result<Vec<Mount>>> {
        self.mounts_with(key, false)
    }

    fn mounts_with(&self, key: &str, wait: bool) -> Option<Result<Vec<Mount>>> {
        if !wait && self.fuse.is_some() {
            return None; // may have to start a FUSE server: not on the caller's thread
        }
        let meta = self.lock_or_skip(wait)?;
        let found = (|| {
            let db = meta.conn();
            let row = meta::get(db, key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
            if row.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: mount it through a view or an active child"
                )));
            }
            let chain = meta::chain(db, row.id)?;
            Ok((row, chain))
        })();
        drop(meta);
        Some(found.and_then(|(row, chain)| {
            self.mounts_of(row.id, row.kind, &chain, row.boot_id.is_some())
        }))
    }

    fn lock_or_skip(&self, wait: bool) -> Option<std::sync::MutexGuard<'_, Meta>> {
        if wait {
            return Some(self.lock());
        }
        match self.meta.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Commits active snapshot `key` as `name`; `parent` rebases it onto another committed
    /// snapshot. The upper is synced first, so an acknowledged commit survives a crash.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        parent: Option<&str>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        validate_labels(&labels)?;
        let row = {
            let meta = self.lock();
            let db = meta.conn();
            meta::get(db, key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?
        };
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        // The container is done with it; a FUSE server must not write behind the commit.
        self.end_fuse_mount(row.id)?;
        let fs = self.fs_dir(row.id);
        let usage = settle(&fs)?;
        let mut meta = self.lock();
        let tx = meta.write()?;
        let now = meta::get(&tx, key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        if now.id != row.id || now.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} changed during commit"
            )));
        }
        if meta::get(&tx, name)?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let parent_id = match parent.filter(|p| !p.is_empty()) {
            None => row.parent_id,
            Some(p) => self.committed_parent(&tx, p)?,
        };
        meta::commit(
            &tx,
            row.id,
            name,
            parent_id,
            now_ns(),
            usage.size,
            usage.inodes,
            &labels,
        )?;
        tx.commit().map_err(Error::db("commit"))?;
        tracing::debug!(name, key, id = row.id, "committed snapshot");
        Ok(())
    }

    /// Turns the current contents of active snapshot `key` into a new committed snapshot
    /// `name` on `parent` **without copying**: the committed snapshot takes over `key`'s
    /// directory, and `key` goes on with a fresh, empty upper on its old parent (its root dir
    /// keeps the old upper root's owner and mode). One transaction: a crash leaves either the
    /// old state or the new one. The caller must make sure `key` is not mounted, and will
    /// normally [`rebase`](Self::rebase) `key` onto `name` next.
    pub fn adopt(
        &self,
        key: &str,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        validate_labels(&labels)?;
        let row = self.active_row(key)?;
        self.end_fuse_mount(row.id)?;
        let fs = self.fs_dir(row.id);
        let usage = settle(&fs)?;
        let root_meta = std::fs::metadata(&fs).map_err(|e| Error::io("stat", &fs, e))?;
        let mut meta = self.lock();
        let tmp = self.snapshots().join(format!(
            "new-{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir(&tmp)?;
            std::fs::create_dir(tmp.join("fs"))?;
            std::fs::create_dir(tmp.join("work"))?;
            std::os::unix::fs::chown(tmp.join("fs"), Some(root_meta.uid()), Some(root_meta.gid()))?;
            std::fs::set_permissions(tmp.join("fs"), root_meta.permissions())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io("create snapshot dir", &tmp, e));
        }
        let result = (|| -> Result<i64> {
            let tx = meta.write()?;
            let now = meta::get(&tx, key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
            if now.id != row.id || now.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} changed during commit"
                )));
            }
            if meta::get(&tx, name)?.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists"
                )));
            }
            let parent_id = self.committed_parent(&tx, parent)?;
            let fresh = meta::hand_over(
                &tx,
                row.id,
                name,
                parent_id,
                now_ns(),
                usage.size,
                usage.inodes,
                &labels,
            )?;
            std::fs::rename(&tmp, self.dir(fresh))
                .map_err(|e| Error::io("rename into place", self.dir(fresh), e))?;
            if let Err(e) = tx.commit() {
                let _ = std::fs::rename(self.dir(fresh), &tmp);
                return Err(Error::Db {
                    op: "commit",
                    err: e,
                });
            }
            Ok(fresh)
        })();
        match result {
            Ok(fresh) => {
                tracing::debug!(
                    key,
                    name,
                    id = row.id,
                    fresh,
                    "adopted an upper dir as a committed snapshot"
                );
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Puts active snapshot `key` on another committed parent (`""` for none). Meant for an
    /// active snapshot whose upper is empty, as [`adopt`](Self::adopt) leaves it: a non-empty
    /// upper would now be seen over different lowers.
    pub fn rebase(&self, key: &str, parent: &str) -> Result<()> {
        let mut meta = self.lock();
        let tx = meta.write()?;
        let row = meta::get(&tx, key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let parent_id = self.committed_parent(&tx, parent)?;
        meta::set_parent(&tx, row.id, parent_id, now_ns())?;
        tx.commit().map_err(Error::db("commit"))
    }

    fn active_row(&self, key: &str) -> Result<meta::Row> {
        let meta = self.lock();
        let row = meta::get(meta.conn(), key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        Ok(row)
    }

    fn committed_parent(&self, tx: &meta::Conn, parent: &str) -> Result<Option<i64>> {
        if parent.is_empty() {
            return Ok(None);
        }
        let p = meta::get(tx, parent)?
            .ok_or_else(|| Error::NotFound(format!("parent snapshot {parent:?} does not exist")))?;
        if p.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        Ok(Some(p.id))
    }

    /// Removes snapshot `key`, which must have no children. Its directories are renamed away in
    /// the transaction and deleted off the request path.
    pub fn remove(&self, key: &str) -> Result<()> {
        let mut meta = self.lock();
        let tx = meta.write()?;
        let row = meta::get(&tx, key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        if meta::has_children(&tx, row.id)? {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?}: it has dependent snapshots"
            )));
        }
        meta::delete(&tx, row.id)?;
        tx.commit().map_err(Error::db("commit"))?;
        // Only after the commit: a kill before it leaves the record and its directory as they
        // were; a kill after it leaves a directory no record owns, which the sweep removes.
        let (dir, gone) = (
            self.dir(row.id),
            self.snapshots().join(format!("rm-{}", row.id)),
        );
        if let Err(e) = self.end_fuse_mount(row.id) {
            // The reaper detaches whatever is still mounted before it deletes.
            tracing::warn!(key, %e, "unmounting a removed snapshot's FUSE mount");
        }
        self.mount_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&row.id);
        match std::fs::rename(&dir, &gone) {
            Ok(()) => {
                drop(meta);
                self.reap(gone);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                // The record is gone; the directory is an orphan the next sweep removes.
                tracing::error!(dir = %dir.display(), %e, "renaming a removed snapshot's directory away");
            }
        }
        tracing::debug!(key, id = row.id, "removed snapshot");
        Ok(())
    }

    /// The snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.stat_with(key, true).expect("waiting never gives up")
    }

    /// [`Snapshotter::stat`], or `None` at once when the store is busy with a write.
    pub fn try_stat(&self, key: &str) -> Option<Result<Info>> {
        self.stat_with(key, false)
    }

    fn stat_with(&self, key: &str, wait: bool) -> Option<Result<Info>> {
        let meta = self.lock_or_skip(wait)?;
        let row = meta::get(meta.conn(), key).and_then(|r| {
            r.ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))
        });
        Some(row.map(|r| Info::from(&r)))
    }

    /// Updates the labels of `info.name`: all of them with no field paths, or those named by
    /// `labels` / `labels.KEY` paths. Other fields are immutable.
    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        let mut meta = self.lock();
        let tx = meta.write()?;
        let row = meta::get(&tx, &info.name)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {:?} does not exist", info.name)))?;
        let mut labels = row.labels.clone();
        if paths.is_empty() {
            labels = info.labels.clone();
        }
        for p in paths {
            if p == "labels" {
                labels = info.labels.clone();
            } else if let Some(k) = p.strip_prefix("labels.") {
                match info.labels.get(k) {
                    Some(v) => labels.insert(k.to_string(), v.clone()),
                    None => labels.remove(k),
                };
            } else {
                return Err(Error::InvalidArgument(format!(
                    "cannot update {p:?} field on snapshot {:?}",
                    info.name
                )));
            }
        }
        validate_labels(&labels)?;
        meta::set_labels(&tx, row.id, &labels)?;
        meta::touch(&tx, row.id, now_ns())?;
        let updated = meta::get(&tx, &info.name)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {:?} does not exist", info.name)))?;
        tx.commit().map_err(Error::db("commit"))?;
        Ok(Info::from(&updated))
    }

    /// Every snapshot that matches any of `filters` (all when empty), by key.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let parsed: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<_>>()?;
        let rows = {
            let meta = self.lock();
            let db = meta.conn();
            meta::all(db)?
        };
        Ok(rows
            .iter()
            .map(Info::from)
            .filter(|i| filter::any_matches(&parsed, i))
            .collect())
    }

    /// Disk usage: measured now for an active snapshot, recorded at commit otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let row = {
            let meta = self.lock();
            let db = meta.conn();
            meta::get(db, key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?
        };
        match row.kind {
            Kind::Active => du(&self.fs_dir(row.id)),
            _ => Ok(Usage {
                size: row.size,
                inodes: row.inodes,
            }),
        }
    }

    /// Removes every directory under `snapshots/` that no record points to (leftovers of a
    /// crash, removed snapshots not yet deleted).
    pub fn cleanup(&self) -> Result<()> {
        let meta = &mut *self.lock();
        let ids = {
            let db = meta.conn();
            meta::ids(db)?
        };
        let dir = self.snapshots();
        let mut orphans = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("read dir", &dir, e))? {
            let e = e.map_err(|e| Error::io("read dir", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<i64>().is_ok_and(|id| ids.contains(&id)) {
                continue;
            }
            // Ready dirs are not leftovers, nor is one this process is making; one a previous
            // process was making when it died is.
            let ours = format!("stock-new-{}-", std::process::id());
            if name.starts_with("stock-")
                && (!name.starts_with("stock-new-") || name.starts_with(&ours))
            {
                continue;
            }
            orphans.push(e.path());
        }
        for p in orphans {
            tracing::info!(path = %p.display(), "removing a directory no snapshot owns");
            // Renamed out of the id namespace first, so a half-deleted orphan never looks live.
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let target = if name.starts_with("rm-") {
                p.clone()
            } else {
                dir.join(format!("rm-orphan-{name}"))
            };
            fuse::unmount_below(&p)?;
            if target != p {
                std::fs::rename(&p, &target).map_err(|e| Error::io("rename away", &p, e))?;
            }
            self.reap(target);
        }
        Ok(())
    }

    /// Volatile snapshots created before the machine last booted may have lost writes: the
    /// kernel asks that they be thrown away. They are reported and removed.
    fn discard_stale_volatile(&self) -> Result<()> {
        let stale: Vec<Row> = {
            let meta = self.lock();
            let db = meta.conn();
            meta::all(db)?
                .into_iter()
                .filter(|r| {
                    r.kind == Kind::Active
                        && r.boot_id.as_deref().is_some_and(|b| b != self.boot_id)
                })
                .collect()
        };
        for r in stale {
            tracing::warn!(key = %r.key, "discarding volatile snapshot: the machine restarted since it was mounted without syncs");
            self.remove(&r.key)?;
        }
        Ok(())
    }

    /// The layer directory of active snapshot `key` (its upper dir), and the layer directories
    /// of its parents, nearest first: what an in-process applier writes into and sits on.
    pub fn layer_dirs(&self, key: &str) -> Result<(PathBuf, Vec<PathBuf>)> {
        let meta = self.lock();
        let db = meta.conn();
        let row = meta::get(db, key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?;
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        let parents = meta::chain(db, row.id)?
            .into_iter()
            .map(|id| self.fs_dir(id))
            .collect();
        Ok((self.fs_dir(row.id), parents))
    }

    /// The layer directory of snapshot `name` (any kind) followed by its parents', nearest
    /// first: the lowers of a layer that will sit on `name`.
    pub fn layer_stack(&self, name: &str) -> Result<Vec<PathBuf>> {
        let meta = self.lock();
        let db = meta.conn();
        let row = meta::get(db, name)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {name:?} does not exist")))?;
        let mut out = vec![self.fs_dir(row.id)];
        out.extend(
            meta::chain(db, row.id)?
                .into_iter()
                .map(|id| self.fs_dir(id)),
        );
        Ok(out)
    }

    /// The id of `key` (for tests and tools).
    pub fn id_of(&self, key: &str) -> Result<i64> {
        let meta = self.lock();
        let db = meta.conn();
        Ok(meta::get(db, key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?
            .id)
    }
}
