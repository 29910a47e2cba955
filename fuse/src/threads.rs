//! Where the request threads run: by default one per CPU, each kept on its own CPU.
//!
//! A request through a FUSE mount is a round trip: the caller's thread queues it and sleeps, a
//! server thread wakes, answers, and wakes the caller. When the server thread sleeps on
//! another CPU, each wake-up is an inter-processor interrupt and an idle CPU coming back,
//! which on a virtual machine costs more than the work itself. With one thread kept on each
//! CPU, a thread always waits on the caller's CPU and the scheduler does not spread the pair
//! apart (libfuse's io_uring transport keeps its queue threads on their CPUs for the same
//! reason).
//!
//! Threads are kept on CPUs only when there is exactly one per CPU this process may run on: a
//! different count (`--threads`) leaves placement to the scheduler, as fewer threads than CPUs
//! kept apart would force callers on the other CPUs to cross over.
//!
//! The exception is a wait for the disk (an fsync, the sync of a copy-up): that is several
//! sleeps and wake-ups inside the kernel, each of which would have to bring the thread's own
//! CPU back from idle. For those a `DiskWait` lets the thread off its CPU; it goes back on
//! it afterwards, without being moved there.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The most request threads started by default, whatever the CPU count.
pub const MAX_DEFAULT_THREADS: usize = 16;

/// The CPUs the calling thread may run on, in order.
pub fn cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The default number of request threads: one per CPU the caller may run on, at least 2 (one
/// may wait for the disk while another answers), at most [`MAX_DEFAULT_THREADS`].
pub fn default_threads() -> usize {
    cpus().len().clamp(2, MAX_DEFAULT_THREADS)
}

/// The ids of this process's threads.
pub(crate) fn tasks() -> BTreeSet<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn name(tid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

/// Keeps the `n` request threads a session started after `before` was taken (fuser names
/// them `fuser-0` and on) each on its own CPU, when `n` is the number of CPUs the caller may
/// run on. Waits up to a second for them to appear; leaves them where they are if they do not,
/// or if other threads of those names appeared too (another session started at the same time).
pub(crate) fn place(before: &BTreeSet<i32>, n: usize) {
    let cpus = cpus();
    if n < 2 || cpus.len() != n {
        tracing::debug!(
            threads = n,
            cpus = cpus.len(),
            "request threads left to the scheduler"
        );
        return;
    }
    let started = Instant::now();
    let found = loop {
        let mut found: Vec<(usize, i32)> = tasks()
            .difference(before)
            .filter_map(|&tid| {
                let i = name(tid)?.strip_prefix("fuser-")?.parse().ok()?;
                Some((i, tid))
            })
            .collect();
        found.sort();
        if found.len() >= n || started.elapsed() > Duration::from_secs(1) {
            break found;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !found.iter().map(|(i, _)| *i).eq(0..n) {
        tracing::warn!(
            threads = n,
            found = found.len(),
            "request threads not found as expected: left to the scheduler"
        );
        return;
    }
    for ((i, tid), &cpu) in found.into_iter().zip(&cpus) {
        let kept = set_of(&[cpu]).ok_or(nix::Error::EINVAL);
        if let Err(e) = kept.and_then(|set| sched_setaffinity(Pid::from_raw(tid), &set)) {
            tracing::warn!(thread = i, cpu, error = %e, "keeping a request thread on its CPU");
        }
    }
    let _ = SPREAD.set(cpus);
    tracing::debug!(threads = n, "one request thread kept on each CPU");
}

/// The CPUs the request threads were kept apart on, once [`place`] has done so.
static SPREAD: OnceLock<Vec<usize>> = OnceLock::new();

thread_local! {
    /// This thread's own CPU, while a [`DiskWait`] has let it off it.
    static AWAY: Cell<Option<usize>> = const { Cell::new(None) };
}

fn set_of(cpus: &[usize]) -> Option<CpuSet> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).ok()?;
    }
    Some(set)
}

/// A request thread kept on its CPU is let off it while it waits for the disk (an fsync, a
/// copy-up): such a wait is several sleeps and wake-ups (the data written, then the journal),
/// and each wake-up can then run on whichever CPU is awake instead of bringing the thread's
/// own CPU back from idle. The thread goes back to its CPU when the guard drops, if it is
/// already there (no migration); otherwise at the next guard that finds it there.
pub(crate) struct DiskWait(Option<usize>);

impl DiskWait {
    pub(crate) fn begin() -> DiskWait {
        let Some(all) = SPREAD.get() else {
            return DiskWait(None);
        };
        if let Some(home) = AWAY.with(Cell::get) {
            return DiskWait(Some(home)); // still off its CPU since the last wait
        }
        let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
            return DiskWait(None);
        };
        let mut on = all.iter().filter(|&&c| set.is_set(c).unwrap_or(false));
        let (Some(&home), None) = (on.next(), on.next()) else {
            return DiskWait(None); // not kept on one CPU
        };
        match set_of(all) {
            Some(all) if sched_setaffinity(Pid::from_raw(0), &all).is_ok() => {
                AWAY.with(|a| a.set(Some(home)));
                DiskWait(Some(home))
            }
            _ => DiskWait(None),
        }
    }
}

/// Puts a thread a [`DiskWait`] left off its CPU back on it, if it is there now (a thread
/// local read while it is not away).
pub(crate) fn home_again() {
    let Some(home) = AWAY.with(Cell::get) else {
        return;
    };
    if nix::sched::sched_getcpu().ok() == Some(home)
        && set_of(&[home]).is_some_and(|set| sched_setaffinity(Pid::from_raw(0), &set).is_ok())
    {
        AWAY.with(|a| a.set(None));
    }
}

impl Drop for DiskWait {
    fn drop(&mut self) {
        if self.0.is_some() {
            home_again();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_one_thread_per_cpu_within_bounds() {
        let n = cpus().len();
        assert!(n >= 1, "sched_getaffinity gave no CPU");
        assert_eq!(default_threads(), n.clamp(2, MAX_DEFAULT_THREADS));
    }

    fn affinity() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .collect()
    }

    #[test]
    fn a_disk_wait_lets_a_kept_thread_off_its_cpu_and_back_on() {
        let all = cpus();
        assert!(all.len() >= 2, "this test needs two CPUs");
        std::thread::spawn(move || {
            let _ = SPREAD.set(all.clone());
            let spread = SPREAD.get().unwrap().clone();
            let home = spread[1];
            sched_setaffinity(Pid::from_raw(0), &set_of(&[home]).unwrap()).unwrap();
            let wait = DiskWait::begin();
            assert_eq!(affinity(), spread, "off its CPU while it waits");
            drop(wait);
            // Back on it at once when it is still there, else at the next chance.
            let t = Instant::now();
            while affinity() != [home] {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "never back on its CPU"
                );
                std::thread::yield_now();
                home_again();
            }
            // A thread nobody kept on a CPU is left as it is.
            sched_setaffinity(Pid::from_raw(0), &set_of(&spread).unwrap()).unwrap();
            drop(DiskWait::begin());
            assert_eq!(affinity(), spread);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn this_process_threads_are_listed() {
        let me = nix::unistd::gettid().as_raw();
        assert!(tasks().contains(&me));
        assert!(name(me).is_some());
    }
}
