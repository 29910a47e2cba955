//! Layer diffs: from an overlay upper directory (native) or between two trees (generic), out to
//! an OCI layer blob, plus `docker diff`-style change lists.
//!
//! Entries are written in tree order (each directory before its children, siblings sorted by
//! their bytes) with the deterministic [`crate::archive::Writer`], so the same change always
//! gives the same blob and digests. The uncompressed stream is hashed (diffID) and the
//! compressed stream is hashed (digest) while it is written: one pass over the data.

mod changes;
mod entry;
mod generic;
mod lower;
mod native;

use std::io::Write;
use std::path::PathBuf;

use crate::archive::Writer;
use crate::compress::{Compression, Encoder};
use crate::digest::{Digest, HashWriter};
use crate::{Error, Result};

pub use changes::{Change, ChangeKind, changes_generic, changes_native};
pub use generic::generic;
pub use lower::LowerView;
pub use native::native;

/// How to write a diff.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Compression of the blob.
    pub compression: Compression,
    /// zstd worker threads (0 or 1: single-threaded).
    pub threads: u32,
    /// Lower layers of the upper (top first), for native diffs of uppers that use `redirect_dir`
    /// or `metacopy`.
    pub lowers: Vec<PathBuf>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            compression: Compression::Gzip,
            threads: 0,
            lowers: Vec::new(),
        }
    }
}

/// What a diff wrote.
#[derive(Debug, Clone)]
pub struct DiffReport {
    /// Compression of the blob.
    pub compression: Compression,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// sha256 of the blob.
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Size of the uncompressed tar.
    pub uncompressed: u64,
    /// Tar entries written.
    pub entries: u64,
}

/// The writer stack: tar -> diffID hash -> compressor -> digest hash -> out.
pub(crate) struct Sink<W: Write> {
    pub(crate) tar: Writer<HashWriter<Encoder<HashWriter<W>>>>,
    compression: Compression,
    pub(crate) entries: u64,
}

impl<W: Write> Sink<W> {
    pub(crate) fn new(out: W, opts: &DiffOptions) -> Result<Self> {
        // A plain tar's digest is its diffID: hash it once.
        let out = if opts.compression == Compression::None {
            HashWriter::counting(out)
        } else {
            HashWriter::new(out)
        };
        let enc = Encoder::new(out, opts.compression, opts.threads).map_err(Error::Stream)?;
        Ok(Sink {
            tar: Writer::new(HashWriter::new(enc)),
            compression: opts.compression,
            entries: 0,
        })
    }

    pub(crate) fn finish(self) -> Result<(DiffReport, W)> {
        let w = |e| Error::Stream(e);
        let plain = self.tar.finish().map_err(w)?;
        let (diff_id, uncompressed, enc) = plain.finish();
        let hashed = enc.finish().map_err(w)?;
        let (digest, size, mut out) = hashed.finish();
        let diff_id = diff_id.expect("the tar stream is hashed");
        let digest = digest.unwrap_or(diff_id);
        out.flush().map_err(w)?;
        Ok((
            DiffReport {
                compression: self.compression,
                diff_id,
                digest,
                size,
                uncompressed,
                entries: self.entries,
            },
            out,
        ))
    }
}
