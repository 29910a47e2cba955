//! Integration tests of the snapshotter: what containerd's conformance suite does not cover
//! (usage, cleanup, restart, special files, error kinds, filters, update masks, rebase,
//! volatile, concurrent gRPC clients).

mod fuse;
mod grpc;
mod load;
mod store;
mod support;
