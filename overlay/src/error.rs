//! Errors of the layer format crate.
//!
//! Messages carry their cause inline (no `source()` chain), so a CLI prints each cause once.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong applying, diffing, digesting or mounting a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a path.
    #[error("{op} {}: {err}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        err: io::Error,
    },
    /// The layer stream is not a valid tar archive.
    #[error("corrupt layer at byte {offset}: {reason}")]
    Corrupt {
        /// Offset into the uncompressed tar stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The layer stream could not be read or decompressed.
    #[error("reading layer stream: {0}")]
    Stream(io::Error),
    /// An entry is refused because it is unsafe or not allowed in a layer.
    #[error("entry {entry:?}: {reason}")]
    Refused {
        /// The entry's path as written in the tar.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// An entry could not be written.
    #[error("entry {entry:?}: {op}: {err}")]
    Entry {
        /// The entry's path as written in the tar.
        entry: String,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        err: io::Error,
    },
    /// The uncompressed stream is larger than the configured cap.
    #[error("layer exceeds the size cap of {cap} bytes uncompressed (decompression bomb?)")]
    TooLarge {
        /// The cap in bytes.
        cap: u64,
    },
    /// A computed digest differs from the expected one.
    #[error("{what} mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// "diffID" or "digest".
        what: &'static str,
        /// The expected digest.
        expected: String,
        /// The computed digest.
        actual: String,
    },
    /// A digest string does not parse.
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    /// The apply target is not usable.
    #[error("target {}: {reason}", path.display())]
    Target {
        /// The target directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A lower layer holds overlay metadata the diff cannot follow.
    #[error("lower {}: holds overlay xattr {xattr}; take a generic diff of the mounted views instead", path.display())]
    LowerOverlayXattr {
        /// The lower path holding it.
        path: PathBuf,
        /// The xattr name.
        xattr: String,
    },
    /// The upper needs its lower layers to be diffed (redirect or metacopy).
    #[error("upper {}: uses overlay {feature}; pass the lower layers to diff it", path.display())]
    NeedLowers {
        /// The path in the upper.
        path: PathBuf,
        /// "redirect" or "metacopy".
        feature: &'static str,
    },
    /// A mount or unmount failed.
    #[error("{op} {}: {err}{}", target.display(), if kernel.is_empty() { String::new() } else { format!(" ({kernel})") })]
    Mount {
        /// The syscall or step.
        op: &'static str,
        /// The mount point.
        target: PathBuf,
        /// What the kernel said in the filesystem context, or else the option that failed.
        kernel: String,
        /// The underlying error.
        err: io::Error,
    },
    /// An invalid argument given by the caller.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            err: source,
        }
    }

    pub(crate) fn refused(entry: &[u8], reason: impl Into<String>) -> Self {
        Error::Refused {
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    pub(crate) fn entry(entry: &[u8], op: &'static str, source: io::Error) -> Self {
        Error::Entry {
            entry: String::from_utf8_lossy(entry).into_owned(),
            op,
            err: source,
        }
    }
}
