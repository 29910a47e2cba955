//! End-to-end tests of the `strata` binary.

mod bench;
mod check;
mod containerd;
mod crash;
mod images;
mod layer;
mod lifecycle;
mod pjdfstest;
mod registry;
mod rootless;
mod run;
mod security;
mod storage;
mod storage_mode;
mod support;
