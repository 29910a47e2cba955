//! Work the store does off the request path, in the gaps between requests: deleting removed
//! snapshots' directories and making ready dirs for Prepare.
//!
//! A **ready dir** is an active snapshot's directory made ahead under the id it will get,
//! `snapshots/<id>/{fs,work}` with `fs` 0755, and made durable (each directory synced, then
//! renamed into place, then `snapshots/` synced). Prepare then only records it: no filesystem
//! work on the request path, and a snapshot whose upper stays untouched needs no sync at
//! Commit. Only a store opened exclusively (a server) keeps ready dirs, as only it can hand
//! out ids without asking SQLite. After a restart, a numbered directory above every id
//! recorded, with both dirs present and empty, is taken back as a ready dir; anything else no
//! record owns is swept as before.
//!
//! Deleting a tree issues discards on some filesystems, and syncing ready dirs flushes the
//! disk cache: both would slow the next request's metadata sync if they ran beside it. So
//! chores wait until no operation has run for [`QUIET`], unless [`BACKLOG`] of them pile up.

use std::collections::VecDeque;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::fuse;

/// How long the store must have been idle before a chore runs: longer than a client takes to
/// send its next request after an answer, shorter than most gaps between bursts.
pub(crate) const QUIET: Duration = Duration::from_micros(500);

/// Chores pending beyond this run at once, idle or not (a store never idle must still delete).
pub(crate) const BACKLOG: usize = 64;

/// Work for the background thread.
pub(crate) enum Chore {
    /// Delete a removed snapshot's dirs (unmounting anything below first).
    Delete(PathBuf),
    /// Make ready dir `id`.
    Ready(i64),
}

/// Which operations are running, and when the last one ended.
#[derive(Default)]
pub(crate) struct Activity {
    busy: AtomicUsize,
    /// When the last operation ended, in µs since `epoch`.
    last: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

/// An operation in progress (see [`Activity::begin`]).
pub(crate) struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.last.store(self.0.now(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn now(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_micros() as u64
    }

    /// Marks an operation as running until the guard drops.
    pub(crate) fn begin(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }

    /// True when nothing runs and nothing has for [`QUIET`].
    fn idle(&self) -> bool {
        self.until_idle().is_zero()
    }

    /// How long until the store is idle, if nothing starts meanwhile: zero when it is; while
    /// an operation runs, [`QUIET`] (its end can't be told).
    fn until_idle(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) != 0 {
            return QUIET;
        }
        let since = self.now().saturating_sub(self.last.load(Ordering::Relaxed));
        QUIET.saturating_sub(Duration::from_micros(since))
    }
}

/// A directory's change time, as `stat` gives it: the upper root's, taken when its ready dir
/// was made durable. Any later change to the directory (an entry added or removed, chmod,
/// chown, an xattr) moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Changed(i64, i64);

impl Changed {
    pub(crate) fn of(m: &std::fs::Metadata) -> Changed {
        Changed(m.ctime(), m.ctime_nsec())
    }
}

/// A ready dir: its id and its upper root's change time once durable.
pub(crate) type Ready = (i64, Changed);

/// A store's ready dirs: those made, and the ids of every one ordered and not taken yet (made
/// or still being made). Those ids are the store's own: Cleanup leaves their dirs alone.
#[derive(Default)]
pub(crate) struct ReadyDirs {
    pub(crate) made: Vec<Ready>,
    pub(crate) reserved: std::collections::HashSet<i64>,
}

/// Makes ready dir `id` under `snapshots` (see the module doc).
pub(crate) fn make_ready(snapshots: &Path, id: i64) -> std::io::Result<Ready> {
    let tmp = snapshots.join(format!("new-ready-{}-{id}", std::process::id()));
    let made = (|| {
        make_active_dirs(&tmp)?;
        sync_ready(&tmp)?;
        let changed = Changed::of(&std::fs::symlink_metadata(tmp.join("fs"))?);
        std::fs::rename(&tmp, snapshots.join(id.to_string()))?;
        std::fs::File::open(snapshots)?.sync_all()?;
        Ok((id, changed))
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    made
}

/// Syncs a ready dir's directories (not the directory holding it).
pub(crate) fn sync_ready(dir: &Path) -> std::io::Result<()> {
    for d in [dir.join("fs"), dir.join("work"), dir.to_path_buf()] {
        std::fs::File::open(&d)?.sync_all()?;
    }
    Ok(())
}

/// Makes an active snapshot's dirs (`fs/` 0755, `work/`) under `dir`.
pub(crate) fn make_active_dirs(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::create_dir(dir.join("fs"))?;
    // Explicitly, so the umask cannot change it (containerd relies on the umask).
    std::fs::set_permissions(dir.join("fs"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir(dir.join("work"))
}

/// True when `dir` is a ready dir as [`make_ready`] leaves it: `fs` (0755) and `work`, both
/// empty, nothing else.
pub(crate) fn is_ready(dir: &Path) -> bool {
    let empty_dir = |p: &Path| {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
            && std::fs::read_dir(p).is_ok_and(|mut r| r.next().is_none())
    };
    let names: Option<Vec<_>> = std::fs::read_dir(dir)
        .ok()
        .map(|r| r.flatten().map(|e| e.file_name()).collect());
    let mut names = names.unwrap_or_default();
    names.sort();
    names == ["fs", "work"]
        && empty_dir(&dir.join("fs"))
        && empty_dir(&dir.join("work"))
        && std::fs::symlink_metadata(dir.join("fs")).is_ok_and(|m| m.mode() & 0o7777 == 0o755)
}

/// The background thread: runs chores in the store's idle gaps; ready dirs made go to
/// `ready`. Ends when the sending side is dropped, after finishing the deletions (ready dirs
/// still queued are not made then).
pub(crate) fn spawn(
    root: &Path,
    rx: mpsc::Receiver<Chore>,
    activity: Arc<Activity>,
    ready: Arc<Mutex<ReadyDirs>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let snapshots = root.join("snapshots");
    std::thread::Builder::new()
        .name("strata-chores".into())
        .spawn(move || {
            let mut pending: VecDeque<Chore> = VecDeque::new();
            loop {
                // With work pending, wake when the store would next be idle, not on a tick.
                let next = if pending.is_empty() {
                    rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
                } else {
                    rx.recv_timeout(activity.until_idle().max(QUIET / 8))
                };
                match next {
                    Ok(c) => pending.push_back(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        for c in pending.drain(..) {
                            if let Chore::Delete(p) = c {
                                delete(&p);
                            }
                        }
                        return;
                    }
                }
                while !pending.is_empty() && (activity.idle() || pending.len() > BACKLOG) {
                    match pending.pop_front().expect("not empty") {
                        Chore::Delete(p) => delete(&p),
                        Chore::Ready(id) => {
                            let made = make_ready(&snapshots, id);
                            let mut r = ready
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            match made {
                                Ok(m) => r.made.push(m),
                                Err(e) => {
                                    r.reserved.remove(&id);
                                    tracing::warn!(id, %e, "making a ready snapshot dir");
                                }
                            }
                        }
                    }
                }
            }
        })
}

/// Deletes a removed snapshot's directory, after detaching any FUSE mount left below it.
pub(crate) fn delete(p: &Path) {
    if let Err(e) = fuse::unmount_below(p) {
        tracing::error!(path = %p.display(), %e, "unmounting below a deleted snapshot's directory; not deleting it");
        return;
    }
    // A dir can be queued twice (Remove, then a Cleanup that saw it): gone is fine.
    match std::fs::remove_dir_all(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(path = %p.display(), %e, "removing a deleted snapshot's directory")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_dir_is_recognised_until_it_is_used() {
        let t = tempfile::tempdir().unwrap();
        let (id, changed) = make_ready(t.path(), 7).unwrap();
        assert_eq!(id, 7);
        let d = t.path().join("7");
        assert!(is_ready(&d));
        let m = std::fs::metadata(d.join("fs")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!(Changed::of(&m), changed, "untouched since made");
        // Later than its making, on a coarse clock too.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(d.join("fs/f"), b"x").unwrap();
        std::fs::remove_file(d.join("fs/f")).unwrap();
        assert_ne!(
            Changed::of(&std::fs::metadata(d.join("fs")).unwrap()),
            changed
        );
        std::fs::write(d.join("fs/f"), b"x").unwrap();
        assert!(!is_ready(&d), "a used one is not");
        std::fs::create_dir(t.path().join("8")).unwrap();
        std::fs::create_dir(t.path().join("8/fs")).unwrap();
        assert!(!is_ready(&t.path().join("8")), "a view's dir is not");
    }

    #[test]
    fn chores_wait_for_a_quiet_store_unless_they_pile_up() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("snapshots")).unwrap();
        let activity = Arc::new(Activity::default());
        let ready = Arc::new(Mutex::new(ReadyDirs::default()));
        let (tx, rx) = mpsc::channel();
        let th = spawn(t.path(), rx, activity.clone(), ready.clone()).unwrap();
        let busy = activity.begin();
        let gone = t.path().join("snapshots/rm-1");
        std::fs::create_dir(&gone).unwrap();
        tx.send(Chore::Delete(gone.clone())).unwrap();
        tx.send(Chore::Ready(5)).unwrap();
        std::thread::sleep(QUIET * 10);
        assert!(gone.exists(), "nothing runs beside an operation");
        drop(busy);
        let t0 = Instant::now();
        while ready.lock().unwrap().made.is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "chores ran once idle"
            );
            std::thread::sleep(QUIET);
        }
        assert!(!gone.exists());
        assert!(is_ready(&t.path().join("snapshots/5")));
        let _busy = activity.begin();
        for i in 0..=BACKLOG {
            let p = t.path().join(format!("snapshots/rm-x{i}"));
            std::fs::create_dir(&p).unwrap();
            tx.send(Chore::Delete(p)).unwrap();
        }
        let t0 = Instant::now();
        while t.path().join("snapshots/rm-x0").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "a backlog runs while busy"
            );
            std::thread::sleep(QUIET);
        }
        drop(tx);
        th.join().unwrap();
    }
}
