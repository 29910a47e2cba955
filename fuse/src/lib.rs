//! # strata-fuse: the FUSE union filesystem (not built yet)
//!
//! This crate will own Strata's FUSE union filesystem: the same semantics as kernel overlayfs
//! over the same on-disk layer format (`strata-overlay`), for rootless use and wherever kernel
//! overlay cannot serve. It is planned in the FUSE issue; today it only reexports the on-disk
//! format it will read, so the dependency direction `overlay <- fuse <- snapshotter` holds.
#![deny(unsafe_code)]

pub use strata_overlay::whiteout;
