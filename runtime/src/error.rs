//! Errors of the runtime library.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the image store and runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such image, tag or container.
    #[error("{0}")]
    NotFound(String),
    /// The operation conflicts with the store's state (e.g. an image in use).
    #[error("{0}")]
    Conflict(String),
    /// A malformed argument (reference, option).
    #[error("{0}")]
    Invalid(String),
    /// An image archive is malformed or does not verify.
    #[error("{}: {reason}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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
    /// The image metadata store failed.
    #[error("image metadata {op}: {err}")]
    Db {
        /// What was being done.
        op: &'static str,
        /// The SQLite error.
        err: rusqlite::Error,
    },
    /// A registry failed or refused a request.
    #[error("{0}")]
    Registry(String),
    /// A registry wants credentials it did not get or refused them.
    #[error("{0}")]
    Unauthorized(String),
    /// The layer format crate failed.
    #[error(transparent)]
    Overlay(#[from] strata_overlay::Error),
    /// The snapshotter failed.
    #[error(transparent)]
    Snapshot(#[from] strata_snapshotter::Error),
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
