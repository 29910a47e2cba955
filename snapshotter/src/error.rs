//! Errors of the snapshotter, and their mapping to containerd's gRPC codes (in one place).

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a snapshot operation. The first four are containerd's error kinds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot (or its parent) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A snapshot with that key or name exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The snapshot is in the wrong state (e.g. has children, is not active).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed (bad filter, immutable field, oversized label).
    #[error("{0}")]
    InvalidArgument(String),
    /// A mode this build cannot serve.
    #[error("{0}")]
    Unsupported(String),
    /// A FUSE mount could not be made.
    #[error("{0}")]
    Fuse(String),
    /// Another process holds the store (a server owns its root exclusively).
    #[error("the snapshot store at {} is in use by another process (a strata snapshotter serving it?)", root.display())]
    InUse {
        /// The store's root.
        root: PathBuf,
    },
    /// The metadata store failed.
    #[error("metadata {op}: {err}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The SQLite error.
        err: rusqlite::Error,
    },
    /// A filesystem operation failed.
    #[error("{op} {}: {err}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        err: io::Error,
    },
    /// The layer format crate failed.
    #[error(transparent)]
    Overlay(#[from] strata_overlay::Error),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, err: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            err,
        }
    }

    pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
        move |err| Error::Db { op, err }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::Unsupported(_) => tonic::Status::unimplemented(msg),
            Error::Db { .. }
            | Error::Io { .. }
            | Error::Overlay(_)
            | Error::Fuse(_)
            | Error::InUse { .. } => tonic::Status::internal(msg),
        }
    }
}
