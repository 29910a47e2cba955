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
//! ROOT/snapshots/<id>         with no record, `id` above every recorded one: a ready dir (a
//!                             server only: see `background`), which Prepare records as is
//! ROOT/snapshots/rm-*         an orphan's dirs, being deleted off the request path
//! ```
//! Every change is one SQLite transaction. A new snapshot's directories are created under a
//! temp name and renamed into place before its transaction commits (or were made ahead, as a
//! ready dir); a removed snapshot's are deleted after its transaction commits. Either way a kill
//! at any instant leaves the old or the new state plus, at worst, a directory no record owns,
//! which is removed at start and by `cleanup`.
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

use strata_overlay::form::Form;
use strata_overlay::mount::{Mount, Options, Overlay};

use crate::background::{self, Activity, Changed, Chore, Ready, ReadyDirs};
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

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Overlay => "overlay",
            Mode::Fuse => "fuse",
            Mode::Auto => "auto",
        })
    }
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
    /// This process is the store's only user while it has it open (a server): SQLite locks
    /// the database once, not per statement, and another process opening the store fails
    /// with [`Error::InUse`]. The CLI shares its store between processes, so it does not.
    pub exclusive: bool,
    /// How many durable, empty active-snapshot dirs to keep ready under the ids they will get,
    /// made in idle moments so Prepare does no filesystem work (see `background`). Only an
    /// `exclusive` store keeps them (it hands out ids itself); they outlive the process.
    pub ready_dirs: usize,
}

impl Config {
    /// `mode` with the defaults.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            fuse_helper: None,
            boot_id: None,
            exclusive: false,
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
    /// The form layers are written in here (see [`Snapshotter::layer_form`]).
    form: Form,
    /// Serializes making the FUSE mount of one snapshot (never across snapshots).
    mount_locks: Mutex<HashMap<i64, Arc<Mutex<()>>>>,
    boot_id: String,
    /// The background thread's queue: deletions, and ready dirs to make.
    chores: Mutex<Option<mpsc::Sender<Chore>>>,
    chores_thread: Option<std::thread::JoinHandle<()>>,
    /// Operations running, so chores wait for a gap.
    activity: Arc<Activity>,
    /// Ready dirs (see `background`).
    ready: Arc<Mutex<ReadyDirs>>,
    /// [`Config::ready_dirs`] (0 unless exclusive).
    ready_dirs: usize,
    /// The next id to hand out, in an exclusive store (`None`: SQLite's AUTOINCREMENT picks).
    next_id: Option<std::sync::atomic::AtomicI64>,
    /// Active snapshots made from a ready dir (durable, empty), not committed yet, with their
    /// upper root's change time then: if it is still unchanged at commit, nothing to sync.
    pristine: Mutex<HashMap<i64, Changed>>,
    /// Parent chains of active snapshots and views (see `remember_chain`).
    chains: Mutex<HashMap<i64, Vec<i64>>>,
    counter: AtomicU64,
}

impl Drop for Snapshotter {
    /// Finishes the deletions still queued, so a short-lived user (the CLI) leaves nothing.
    fn drop(&mut self) {
        // Deletions still queued finish; ready dirs still to make are not made, and those made
        // go: a store closed cleanly holds nothing but its records' dirs. (A killed server's
        // are taken back at the next start.)
        self.chores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = self.chores_thread.take() {
            let _ = t.join();
        }
        for (id, _) in std::mem::take(&mut self.ready_dirs().made) {
            let _ = std::fs::remove_dir_all(self.dir(id));
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
/// inode on the file system. `durable`: the directory was synced when it had this change time
/// (a ready dir); if it is still empty and unchanged there is nothing to sync.
fn settle(path: &Path, durable: Option<Changed>) -> Result<Usage> {
    const ONE_BY_ONE: usize = 256;
    if let Some(then) = durable {
        let m = std::fs::symlink_metadata(path).map_err(|e| Error::io("stat", path, e))?;
        let empty = std::fs::read_dir(path)
            .map_err(|e| Error::io("read dir", path, e))?
            .next()
            .is_none();
        if empty && Changed::of(&m) == then {
            return Ok(Usage {
                size: (m.blocks() * 512) as i64,
                inodes: 1,
            });
        }
    }
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

/// True when `dir` (a `snapshots/<id>` directory no record owns) is a ready dir as a server
/// leaves it for Prepare: an empty `fs/` (0755) and an empty `work/`, nothing else.
pub fn is_ready_dir(dir: &Path) -> bool {
    background::is_ready(dir)
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
                        "{why}; the fuse or auto mode would use Strata's FUSE filesystem"
                    )));
                }
                fuse_reason = Some(why);
            }
        } else {
            fuse_reason = Some("FUSE mode asked for".into());
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
        let form = if fuse.is_none() {
            if options.userxattr {
                Form::UserXattr
            } else {
                Form::Kernel
            }
        } else {
            let ns = if nix::unistd::geteuid().is_root()
                && !strata_overlay::probe::in_user_namespace()
            {
                strata_overlay::XattrNs::Trusted
            } else {
                strata_overlay::XattrNs::User
            };
            let form = strata_overlay::form::writable(&root.join("snapshots"), ns);
            tracing::info!(%form, "layers are written in this form");
            form
        };
        let meta = Meta::open(&root.join("metadata.db"), config.exclusive)?;
        let (tx, rx) = mpsc::channel::<Chore>();
        let activity = Arc::new(Activity::default());
        let ready = Arc::new(Mutex::new(ReadyDirs::default()));
        let chores_thread = background::spawn(root, rx, activity.clone(), ready.clone())
            .map_err(|e| Error::io("spawn the background thread", root, e))?;
        let mut s = Snapshotter {
            root: root.to_path_buf(),
            meta: Mutex::new(meta),
            options,
            fuse,
            backend,
            form,
            mount_locks: Mutex::new(HashMap::new()),
            boot_id,
            chores: Mutex::new(Some(tx)),
            chores_thread: Some(chores_thread),
            activity,
            ready,
            ready_dirs: if config.exclusive {
                config.ready_dirs
            } else {
                0
            },
            next_id: None,
            pristine: Mutex::new(HashMap::new()),
            chains: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        };
        s.discard_stale_volatile()?;
        s.take_over_ready_dirs()?;
        s.cleanup()?;
        if config.exclusive {
            let above = {
                let meta = s.lock();
                meta::max_id(meta.conn())?
            };
            let highest_ready = s.ready_dirs().reserved.iter().max().copied().unwrap_or(0);
            s.next_id = Some(std::sync::atomic::AtomicI64::new(
                above.max(highest_ready) + 1,
            ));
            s.restock();
        }
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

    /// The form whiteouts and opaque directories are written in when a layer is applied
    /// straight into a snapshot (see `strata_overlay::form`): the kernel's, with the xattrs its
    /// mounts read (`user.` with `userxattr`), wherever kernel overlay mounts or, in FUSE mode,
    /// wherever the filesystem takes char 0:0 devices and overlay xattrs (so the store can move
    /// to kernel overlay later); the OCI `.wh.` form where it does not (a store on an
    /// overlayfs, inside a container), which only the FUSE union reads.
    pub fn layer_form(&self) -> Form {
        self.form
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
            background::delete(&p);
        }
    }

    /// Queues `c` for the background thread; gives it back if that thread is gone.
    fn chore(&self, c: Chore) -> Option<Chore> {
        let tx = self
            .chores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match tx.as_ref() {
            Some(tx) => tx.send(c).err().map(|mpsc::SendError(c)| c),
            None => Some(c),
        }
    }

    fn ready_dirs(&self) -> std::sync::MutexGuard<'_, ReadyDirs> {
        self.ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A fresh id: the next above all in an exclusive store, `None` (SQLite's pick) otherwise.
    fn new_id(&self) -> Option<i64> {
        self.next_id
            .as_ref()
            .map(|n| n.fetch_add(1, Ordering::Relaxed))
    }

    /// Orders ready dirs until `ready_dirs` are made or on their way.
    fn restock(&self) {
        let have = self.ready_dirs().reserved.len();
        for _ in have..self.ready_dirs {
            self.restock_one();
        }
    }

    /// Takes back the ready dirs a previous server left: numbered dirs above every recorded id
    /// that are still exactly as made (an exclusive store only; anything else is swept).
    fn take_over_ready_dirs(&self) -> Result<()> {
        if self.ready_dirs == 0 {
            return Ok(());
        }
        let above = {
            let meta = self.lock();
            meta::max_id(meta.conn())?
        };
        let dir = self.snapshots();
        let mut found: Vec<i64> = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("read dir", &dir, e))? {
            let e = e.map_err(|e| Error::io("read dir", &dir, e))?;
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<i64>().ok()) else {
                continue;
            };
            if id > above && background::is_ready(&e.path()) {
                found.push(id);
            }
        }
        found.sort_unstable();
        found.truncate(self.ready_dirs);
        // Made durable again: a crash may have come between their making and their syncs.
        let mut taken = Vec::new();
        for id in found {
            let d = self.dir(id);
            let changed = background::sync_ready(&d)
                .and_then(|()| std::fs::symlink_metadata(d.join("fs")))
                .map_err(|e| Error::io("sync", &d, e))?;
            taken.push((id, Changed::of(&changed)));
        }
        if !taken.is_empty() {
            std::fs::File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("sync", &dir, e))?;
        }
        let mut r = self.ready_dirs();
        r.reserved.extend(taken.iter().map(|t| t.0));
        r.made.extend(taken);
        Ok(())
    }

    /// A ready dir, if one is waiting (and another is ordered).
    /// A ready dir, if one is waiting (and another is ordered). The caller holds the store's
    /// lock until the dir has a record or is given back, so Cleanup cannot see it unowned.
    fn take_ready(&self) -> Option<Ready> {
        let taken = {
            let mut r = self.ready_dirs();
            let t = r.made.pop()?;
            r.reserved.remove(&t.0);
            t
        };
        self.restock_one();
        Some(taken)
    }

    fn restock_one(&self) {
        if let Some(id) = self.new_id() {
            self.ready_dirs().reserved.insert(id);
            self.chore(Chore::Ready(id));
        }
    }

    /// Gives back a ready dir that a failed Prepare took.
    fn untake_ready(&self, t: Ready) {
        let mut r = self.ready_dirs();
        r.reserved.insert(t.0);
        r.made.push(t);
    }

    /// Creates an active snapshot `key` on `parent` ("" for none) and returns its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, &labels)
    }

    /// Creates a read-only view `key` of `parent` and returns its mounts.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, &labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        validate_labels(labels)?;
        let volatile = kind == Kind::Active
            && labels.get(VOLATILE_LABEL).is_some_and(|v| v == "true")
            && !labels.contains_key(UNPACK_LABEL);
        let _busy = self.activity.begin();
        let mut meta = self.lock();
        let made = self.create_locked(&mut meta, kind, key, parent, labels, volatile);
        drop(meta);
        let (id, chain) = made?;
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

    fn create_locked(
        &self,
        meta: &mut std::sync::MutexGuard<'_, Meta>,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        volatile: bool,
    ) -> Result<(i64, Vec<i64>)> {
        // An active snapshot takes a ready dir (already in place under its id) when there is
        // one; otherwise its dirs are made now under a temp name, under the lock, so `cleanup`
        // never mistakes them for a leftover.
        let ready = if kind == Kind::Active {
            self.take_ready()
        } else {
            None
        };
        let tmp = match ready {
            Some(_) => None,
            None => {
                let tmp = self.snapshots().join(format!(
                    "new-{}-{}",
                    std::process::id(),
                    self.counter.fetch_add(1, Ordering::Relaxed)
                ));
                let made = if kind == Kind::Active {
                    background::make_active_dirs(&tmp)
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
                Some(tmp)
            }
        };
        // Undoes the directory side of a create that did not happen.
        let undo = |placed: Option<i64>| match (&tmp, ready) {
            (_, Some(r)) => self.untake_ready(r),
            (Some(t), None) => {
                let _ =
                    std::fs::remove_dir_all(placed.map_or_else(|| t.clone(), |id| self.dir(id)));
            }
            (None, None) => {}
        };
        let tx = match meta.write() {
            Ok(tx) => tx,
            Err(e) => {
                undo(None);
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
            let want = ready.map(|r| r.0).or_else(|| self.new_id());
            let id = meta::insert(&tx, want, key, parent_id, kind, now_ns(), boot, labels)?;
            let chain = meta::chain(&tx, id)?;
            if let Some(tmp) = &tmp {
                std::fs::rename(tmp, self.dir(id))
                    .map_err(|e| Error::io("rename into place", self.dir(id), e))?;
            }
            Ok((id, chain))
        })();
        let (id, chain) = match result {
            Ok(v) => v,
            Err(e) => {
                drop(tx);
                undo(None);
                return Err(e);
            }
        };
        if let Err(e) = tx.commit() {
            undo(Some(id));
            return Err(Error::Db {
                op: "commit",
                err: e,
            });
        }
        if let Some((_, changed)) = ready {
            self.pristine
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, changed);
        }
        self.remember_chain(id, &chain);
        Ok((id, chain))
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
        if volatile {
            // A volatile mount (kernel overlay or FUSE) leaves work/work/incompat/volatile and
            // neither mounts over it again. Within one boot nothing was lost, so it may go (the
            // restart case is handled at start).
            let mark = strata_overlay::mount::volatile_marker(&self.dir(id).join("work"));
            let _ = std::fs::remove_dir_all(mark);
        }
        if let Some(helper) = &self.fuse {
            return self
                .fuse_mount(helper, id, kind, chain, volatile)
                .map(|m| vec![m]);
        }
        let lowers = chain.iter().map(|&p| self.fs_dir(p)).collect();
        let (upper, work) = if kind == Kind::Active {
            (Some(self.fs_dir(id)), Some(self.dir(id).join("work")))
        } else {
            (None, None)
        };
        let mut options = self.options;
        options.volatile = volatile;
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
    fn fuse_mount(
        &self,
        helper: &FuseHelper,
        id: i64,
        kind: Kind,
        chain: &[i64],
        volatile: bool,
    ) -> Result<Mount> {
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
        helper.mount(&lowers, upper_work, volatile, "strata", &merged)?;
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
        let _busy = self.activity.begin();
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
            let chain = self.chain_of(db, row.id)?;
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
        let _busy = self.activity.begin();
        let row = {
            let meta = self.lock();
            meta::get(meta.conn(), key)?
                .ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))?
        };
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        // The container is done with it; a FUSE server must not write behind the commit.
        self.end_fuse_mount(row.id)?;
        let usage = settle(&self.fs_dir(row.id), self.pristine_since(row.id))?;
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
        self.forget_pristine(row.id);
        self.forget_chain(row.id);
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
        let _busy = self.activity.begin();
        let row = self.active_row(key)?;
        self.end_fuse_mount(row.id)?;
        let fs = self.fs_dir(row.id);
        let usage = settle(&fs, self.pristine_since(row.id))?;
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
                self.new_id(),
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
                self.forget_pristine(row.id);
                self.forget_chain(row.id);
                self.forget_chain(fresh);
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
        tx.commit().map_err(Error::db("commit"))?;
        self.forget_chain(row.id);
        Ok(())
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

    /// Removes snapshot `key`, which must have no children. Its directories are deleted off
    /// the request path once the transaction has committed.
    pub fn remove(&self, key: &str) -> Result<()> {
        let _busy = self.activity.begin();
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
        drop(meta);
        // Only after the commit: a kill before it leaves the record and its directory as they
        // were; a kill after it leaves a directory no record owns (its id is below every new
        // one, so it never passes for a ready dir), which the sweep at start removes.
        self.forget_pristine(row.id);
        self.forget_chain(row.id);
        if let Err(e) = self.end_fuse_mount(row.id) {
            // The background thread detaches whatever is still mounted before it deletes.
            tracing::warn!(key, %e, "unmounting a removed snapshot's FUSE mount");
        }
        self.mount_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&row.id);
        self.reap(self.dir(row.id));
        tracing::debug!(key, id = row.id, "removed snapshot");
        Ok(())
    }

    /// The change time of `id`'s upper root when it was made durable, for a snapshot made
    /// from a ready dir.
    fn pristine_since(&self, id: i64) -> Option<Changed> {
        self.pristine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    /// Notes the parent chain of active snapshot or view `id` (fixed until it is committed,
    /// rebased or removed), so Mounts need not walk it again.
    fn remember_chain(&self, id: i64, chain: &[i64]) {
        let mut c = self
            .chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.len() >= 4096 {
            c.clear();
        }
        c.insert(id, chain.to_vec());
    }

    fn forget_chain(&self, id: i64) {
        self.chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    /// The parent chain of `id`, nearest first: remembered, or read (and remembered).
    fn chain_of(&self, db: &meta::Conn, id: i64) -> Result<Vec<i64>> {
        if let Some(c) = self
            .chains
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return Ok(c.clone());
        }
        let c = meta::chain(db, id)?;
        self.remember_chain(id, &c);
        Ok(c)
    }

    fn forget_pristine(&self, id: i64) {
        self.pristine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
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
        let _busy = self.activity.begin();
        let meta = self.lock_or_skip(wait)?;
        let row = meta::get(meta.conn(), key).and_then(|r| {
            r.ok_or_else(|| Error::NotFound(format!("snapshot {key:?} does not exist")))
        });
        Some(row.map(|r| Info::from(&r)))
    }

    /// Updates the labels of `info.name`: all of them with no field paths, or those named by
    /// `labels` / `labels.KEY` paths. Other fields are immutable.
    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        let _busy = self.activity.begin();
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
        let reserved = self.ready_dirs().reserved.clone();
        let dir = self.snapshots();
        let mut orphans = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("read dir", &dir, e))? {
            let e = e.map_err(|e| Error::io("read dir", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name
                .parse::<i64>()
                .is_ok_and(|id| ids.contains(&id) || reserved.contains(&id))
            {
                continue;
            }
            // A ready dir this process is making is not a leftover; one a previous process
            // was making when it died is.
            if name.starts_with(&format!("new-ready-{}-", std::process::id())) {
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
                match std::fs::rename(&p, &target) {
                    Ok(()) => {}
                    // A removed snapshot's dir the background thread deleted meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io("rename away", &p, e)),
                }
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
