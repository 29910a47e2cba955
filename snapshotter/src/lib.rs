//! # strata-snapshotter: containerd's snapshot model
//!
//! This crate owns containerd's snapshot model (prepare, view, commit, remove, stat, update,
//! usage, mounts, walk, cleanup) over Strata's layer directories, with crash-safe SQLite
//! metadata, served over containerd's gRPC snapshots API so a real containerd uses it as a
//! proxy plugin (`[proxy_plugins.strata] type = "snapshot"`).
//!
//! # Layout
//! - [`store`]: the snapshotter (synchronous): directory layout, mount rules, transactions.
//! - [`meta`]: the SQLite metadata store.
//! - `background`: deletions and ready dirs for Prepare, done in the gaps between requests.
//! - [`fuse`]: FUSE mode's mounts, one FUSE server process per union snapshot.
//! - [`filter`]: containerd's filter syntax for `List`.
//! - [`service`]: the gRPC service and [`serve`] (tokio lives only here).
//! - [`api`]: the generated protobuf types (containerd's .proto files, in `proto/`).
#![deny(unsafe_code)]

mod background;
mod error;
pub mod filter;
pub mod fuse;
pub mod meta;
pub mod service;
pub mod store;

/// Generated from containerd's snapshots and mount .proto files.
#[allow(missing_docs, clippy::all)]
pub mod api {
    /// `containerd.*`
    pub mod containerd {
        /// `containerd.types`
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// `containerd.services.*`
        pub mod services {
            /// `containerd.services.snapshots`
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}

pub use error::{Error, Result};
pub use fuse::FuseHelper;
pub use service::{connect, connect_channel, serve};
pub use store::{Config, Info, Mode, Snapshotter, Usage};
pub use strata_overlay::{Mount, Overlay};
