//! # strata-snapshotter: containerd's snapshot model (not built yet)
//!
//! This crate will own containerd's snapshot model (prepare, view, commit, remove, stat, update,
//! usage, mounts, walk, cleanup) over Strata's layer directories, with crash-safe metadata,
//! served over containerd's gRPC snapshots API as a proxy plugin. It is planned in the
//! snapshotter issue; today it only reexports the mount types it will hand out.
#![deny(unsafe_code)]

pub use strata_overlay::{Mount, Overlay};
