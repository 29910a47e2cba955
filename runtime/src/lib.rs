//! # strata-runtime: the daemonless runtime and the `strata` CLI
//!
//! This crate owns the `strata` command line and everything it runs on top of the snapshotter:
//! the image store (content-addressed blobs, tags, load/save/import), containers (records,
//! a monitor process per container, namespaces, exec, logs, terminals), commit/export/cp,
//! volumes, rootless operation through a user namespace, and the demos.
//!
//! # Layout
//! - `cli/`: clap definitions, turned into validated options before anything is touched.
//! - [`image`]: the image store, archives, import, unpacking by chain ID.
//! - [`container`]: create/start/stop/exec/commit/view and the processes of a container.
//! - [`check`]: `system check`, every record against the disk, every blob against its digest.
//! - [`registry`]: pull, push and login over the OCI distribution API.
//! - [`storage`]: which backend layers mount with (`--storage-mode overlay|fuse|auto`).
//! - [`volume`], [`rootless`], [`time`].
//! - [`demo`] (the main job on a base image built from the host), [`layer_demo`].
//! - `sys`: the raw syscalls nix does not wrap; the only module with `unsafe`.
//! - `main.rs`: dispatch, errors with context (anyhow).
#![deny(unsafe_code)]

pub mod check;
pub mod container;
pub mod demo;
mod error;
pub mod image;
pub mod layer_demo;
pub mod registry;
pub mod rootless;
pub mod storage;
pub mod time;
pub mod volume;

pub use error::{Error, Result};

mod sys;

/// Restores the default SIGPIPE action, so `strata images | head` ends quietly as other Unix
/// tools do (Rust ignores SIGPIPE, which turns a closed pipe into a panic in `println!`).
pub fn default_sigpipe() {
    sys::default_signals(&[libc::SIGPIPE]);
}

/// A detached server's stdio once it is up: its starter has gone (or is about to), and a
/// write to the pipe the starter read errors from would fail (making the logger panic).
/// stdin and stdout become /dev/null, stderr `log_file` (appended) or /dev/null.
pub fn let_go_of_stdio(log_file: Option<&std::path::Path>) {
    use std::os::fd::AsFd;
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    let log = log_file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let err = log.as_ref().map_or(null.as_fd(), |l| l.as_fd());
    for (from, to) in [(null.as_fd(), 0), (null.as_fd(), 1), (err, 2)] {
        let _ = sys::replace_stdio(from, to);
    }
}
