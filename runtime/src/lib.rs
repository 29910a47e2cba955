//! # strata-runtime: the daemonless runtime and the `strata` CLI
//!
//! This crate owns the `strata` command line. Today it drives the layer format (apply, diff,
//! change lists), kernel overlay mounts and feature probing, plus the `demo` walk through a
//! layer's lifecycle; the image store, containers and volumes come with the runtime issue.
//!
//! # Layout
//! - `cli/`: clap definitions, turned into validated options before anything is touched.
//! - [`demo`]: the main job on an embedded default image.
//! - `main.rs`: dispatch, errors with context (anyhow).
#![deny(unsafe_code)]

pub mod container;
pub mod demo;
mod error;
pub mod image;
pub mod layer_demo;
pub mod rootless;
pub mod time;
pub mod volume;

pub use error::{Error, Result};

mod sys;

/// Restores the default SIGPIPE action, so `strata images | head` ends quietly as other Unix
/// tools do (Rust ignores SIGPIPE, which turns a closed pipe into a panic in `println!`).
pub fn default_sigpipe() {
    sys::default_signals(&[libc::SIGPIPE]);
}
