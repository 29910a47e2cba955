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

use std::collections::BTreeSet;
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
    for ((i, tid), cpu) in found.into_iter().zip(cpus) {
        let mut set = CpuSet::new();
        if let Err(e) = set
            .set(cpu)
            .and_then(|()| sched_setaffinity(Pid::from_raw(tid), &set))
        {
            tracing::warn!(thread = i, cpu, error = %e, "keeping a request thread on its CPU");
        }
    }
    tracing::debug!(threads = n, "one request thread kept on each CPU");
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

    #[test]
    fn this_process_threads_are_listed() {
        let me = nix::unistd::gettid().as_raw();
        assert!(tasks().contains(&me));
        assert!(name(me).is_some());
    }
}
