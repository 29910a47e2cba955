//! Keeps the node table under its cap. The kernel holds an inode (and so a node here) for every
//! entry in its dentry cache, which it shrinks only under memory pressure: a walk over a large
//! tree would otherwise leave one node per entry seen. When the table passes its cap, a thread
//! asks the kernel to drop the least recently looked-up entries (`FUSE_NOTIFY_INVAL_ENTRY`);
//! the kernel lets go of those not in use (no open file, no working directory) and forgets
//! their nodes, down to nine tenths of the cap.
//!
//! The notifications go from a thread of their own, never from a request's: the kernel takes
//! the parent directory's lock to drop an entry, which a request in flight may be holding.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuser::INodeNo;

use crate::node::{Nodes, ROOT};

/// Nodes kept at most, by default: about 25 MiB of table.
pub const DEFAULT_CAP: usize = 100_000;

/// How long a round waits for the kernel's FORGETs before it takes the entries it asked the
/// kernel to drop as in use (and pauses).
const FORGETS_WAIT: Duration = Duration::from_millis(100);

/// The cap and the evicting thread's wake-up.
pub struct Evict {
    cap: usize,
    wake: Mutex<bool>,
    cv: Condvar,
    closed: AtomicBool,
}

impl Evict {
    /// A cap of `cap` nodes (at least 16).
    pub fn new(cap: usize) -> Evict {
        Evict {
            cap: cap.max(16),
            wake: Mutex::new(false),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// The table holds `len` nodes: past the cap, the thread is woken.
    pub fn check(&self, len: usize) {
        if len > self.cap {
            *self.wake.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.cv.notify_one();
        }
    }

    /// Ends the thread (the union is going).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        *self.wake.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_one();
    }

    /// Starts the thread that keeps `nodes` under the cap, dropping entries through `notifier`.
    pub fn start(self: &Arc<Self>, nodes: Arc<Nodes>, notifier: fuser::Notifier) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("strata-fuse-evict".into())
            .spawn(move || me.run(&nodes, |parent, name| drop_entry(&notifier, parent, name)));
        if let Err(e) = spawned {
            tracing::warn!(%e, "no thread to cap the node table: it grows with what the kernel caches");
        }
    }

    /// The thread's loop: rounds of asking `drop` (the kernel) to let go of the coldest
    /// entries, named by parent node and name, until the table is under the low mark.
    fn run(&self, nodes: &Nodes, drop: impl Fn(u64, &OsStr)) {
        let low = self.cap * 9 / 10;
        loop {
            {
                let mut w = self.wake.lock().unwrap_or_else(|p| p.into_inner());
                while !*w {
                    w = self.cv.wait(w).unwrap_or_else(|p| p.into_inner());
                }
                *w = false;
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            // Rounds until under the low mark; a round that frees nothing (entries in use)
            // waits a while before the next.
            while !self.closed.load(Ordering::SeqCst) {
                let Some(ask) = nodes.len().checked_sub(low).filter(|&n| n > 0) else {
                    break;
                };
                let gone = nodes.forgotten();
                for path in nodes.coldest(ask) {
                    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                        continue;
                    };
                    let parent = if parent.as_os_str().is_empty() {
                        Some(ROOT)
                    } else {
                        nodes.id(parent)
                    };
                    if let Some(parent) = parent {
                        drop(parent, name);
                    }
                }
                // The kernel's FORGETs come back through the request threads, later on a busy
                // machine. Progress is counted in FORGETs, not in the table's size: lookups
                // beside the round grow the table while it shrinks.
                let asked = std::time::Instant::now();
                let freed = || nodes.forgotten() - gone;
                while freed() < ask.div_ceil(2) as u64 && asked.elapsed() < FORGETS_WAIT {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if freed() == 0 {
                    // Every entry asked for is in use: wait before asking again.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

fn drop_entry(notifier: &fuser::Notifier, parent: u64, name: &OsStr) {
    if let Err(e) = notifier.inval_entry(INodeNo(parent), name) {
        // Gone already (ENOENT is absorbed by fuser), or the connection is ending.
        tracing::debug!(parent, ?name, %e, "dropping a cached entry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    /// A walk adds nodes while the evicting thread runs and the "kernel" forgets each dropped
    /// entry at once: the table must stay near its cap. Growth beside a round once made a
    /// round look fruitless, and the pause that followed let the walk run far past the cap.
    #[test]
    fn a_walk_beside_the_rounds_stays_near_the_cap() {
        const CAP: usize = 2_000;
        let nodes = Arc::new(Nodes::new());
        let evict = Arc::new(Evict::new(CAP));
        let by_name = |parent: u64, name: &OsStr| {
            assert_eq!(parent, ROOT);
            name.to_str().unwrap()[1..].parse::<u64>().unwrap()
        };
        let thread = {
            let (evict, nodes) = (evict.clone(), nodes.clone());
            std::thread::spawn(move || {
                evict.run(&nodes, |parent, name| {
                    nodes.forget(by_name(parent, name), 1)
                })
            })
        };
        let most = AtomicUsize::new(0);
        for i in 2..200_000u64 {
            nodes.looked_up(&PathBuf::from(format!("f{i}")), i);
            let len = nodes.len();
            most.fetch_max(len, Ordering::Relaxed);
            evict.check(len);
            if i % 64 == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        evict.close();
        thread.join().unwrap();
        let most = most.into_inner();
        assert!(most <= CAP * 2, "{most} nodes for a cap of {CAP}");
    }
}
