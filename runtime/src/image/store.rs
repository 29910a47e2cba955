//! The image store: a content store of blobs by sha256, image and tag records in SQLite, and
//! layers unpacked once into snapshots named by chain ID, shared by every image that has them
//! (as containerd does).
//!
//! ```text
//! ROOT/content/blobs/sha256/<hex>   blobs (manifests, configs, layers), immutable
//! ROOT/content/ingest/              blobs being written (renamed into blobs/ once verified)
//! ROOT/images.db                    images(manifest, config, created, size), tags(name, manifest),
//!                                   layers(chain, diff_id, size)
//! ROOT/snapshotter/                 the snapshot store (strata-snapshotter), one committed
//!                                   snapshot per chain ID
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use strata_overlay::Digest;
use strata_overlay::digest::HashWriter;

use super::Reference;
use crate::{Error, Result};

/// An image as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Digest of the manifest (what identifies the image content).
    pub manifest: Digest,
    /// Digest of the config (Docker's image ID).
    pub config: Digest,
    /// `created` of the config, RFC 3339, if any.
    pub created: Option<String>,
    /// Unpacked size: the sum of the layers' uncompressed sizes.
    pub size: u64,
    /// Tags pointing at it (normalized).
    pub tags: Vec<Reference>,
}

/// The image store below a root directory.
pub struct Store {
    root: PathBuf,
    db: Connection,
}

/// A chain ID: `diff_id` for the bottom layer, `sha256(parent + " " + diff_id)` above.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => *diff_id,
        Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
    }
}

impl Store {
    /// Opens (or creates) the store at `root`.
    pub fn open(root: &Path) -> Result<Store> {
        std::fs::create_dir_all(root).map_err(|e| Error::io("create", root, e))?;
        // Other users see nothing of the store (Docker keeps its root 0710, containerd 0711):
        // layers, logs and configs may hold secrets.
        let mode = std::fs::metadata(root)
            .map_err(|e| Error::io("stat", root, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("chmod 700", root, e))?;
        }
        for d in ["content/blobs/sha256", "content/ingest"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(|e| Error::io("create", root.join(d), e))?;
        }
        let db = Connection::open(root.join("images.db")).map_err(Error::db("open"))?;
        db.pragma_update(None, "journal_mode", "WAL")
            .map_err(Error::db("enable WAL"))?;
        db.pragma_update(None, "synchronous", "FULL")
            .map_err(Error::db("set synchronous"))?;
        db.pragma_update(None, "foreign_keys", "ON")
            .map_err(Error::db("enable foreign keys"))?;
        let v: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(Error::db("read version"))?;
        if v < 1 {
            db.execute_batch(
                "BEGIN;
                 CREATE TABLE images (manifest TEXT PRIMARY KEY, config TEXT NOT NULL, created TEXT, size INTEGER NOT NULL, loaded INTEGER NOT NULL);
                 CREATE TABLE tags (name TEXT PRIMARY KEY, manifest TEXT NOT NULL REFERENCES images(manifest) ON DELETE CASCADE);
                 CREATE TABLE layers (chain TEXT PRIMARY KEY, diff_id TEXT NOT NULL, size INTEGER NOT NULL);
                 PRAGMA user_version = 1;
                 COMMIT;",
            )
            .map_err(Error::db("create schema"))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            db,
        })
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `d` lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("content/blobs/sha256").join(d.hex())
    }

    /// True when blob `d` is present.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).exists()
    }

    /// Reads blob `d` whole (manifests and configs), checking its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        let data = std::fs::read(&p).map_err(|e| Error::io("read blob", &p, e))?;
        if Digest::of(&data) != *d {
            return Err(Error::Archive {
                path: p,
                reason: format!("blob content does not match its digest {d}"),
            });
        }
        Ok(data)
    }

    /// The sha256 of the file at `p`, streamed (a blob of any size, named or not).
    pub fn hash_file(p: &Path) -> Result<Digest> {
        let f = std::fs::File::open(p).map_err(|e| Error::io("open", p, e))?;
        let r =
            strata_overlay::digest::HashReader::new(std::io::BufReader::with_capacity(1 << 20, f));
        let (d, _) = r.finish().map_err(|e| Error::io("read", p, e))?;
        Ok(d.expect("HashReader::finish hashes"))
    }

    /// A new blob being written into the ingest dir (see [`Ingest`]).
    pub fn ingest(&self) -> Result<Ingest> {
        Ingest::new(&self.root)
    }

    /// Writes a blob from `r` through the ingest dir; with `expected`, a mismatch is an error
    /// and nothing is kept. Returns the digest, size, and whether the blob is new to the store.
    pub fn put_blob(
        &self,
        r: &mut dyn Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64, bool)> {
        let mut w = self.ingest()?;
        std::io::copy(r, &mut w).map_err(|e| Error::io("write blob", &w.tmp, e))?;
        w.finish(expected)
    }

    /// Writes a blob produced by `f` into the ingest dir, hashing it on the way, and stores it
    /// under its digest once `f` succeeds (nothing is kept otherwise); says whether the blob is
    /// new to the store. For blobs made here,
    /// like a committed layer, which are streamed once straight into the store.
    pub fn put_with<T>(
        &self,
        f: impl FnOnce(&mut dyn Write) -> Result<T>,
    ) -> Result<(Digest, u64, bool, T)> {
        let mut w = self.ingest()?;
        let v = f(&mut w)?;
        let (digest, size, new) = w.finish(None)?;
        Ok((digest, size, new, v))
    }

    /// Writes bytes as a blob.
    pub fn put_bytes(&self, data: &[u8]) -> Result<(Digest, bool)> {
        let (d, _, new) = self.put_blob(&mut &data[..], None)?;
        Ok((d, new))
    }

    /// Removes blob `d` (a no-op when absent).
    pub fn remove_blob(&self, d: &Digest) {
        let _ = std::fs::remove_file(self.blob_path(d));
    }

    /// Records a layer's chain and unpacked size.
    pub fn record_layer(&self, chain: &Digest, diff_id: &Digest, size: u64) -> Result<()> {
        self.db
            .execute(
                "INSERT OR REPLACE INTO layers (chain, diff_id, size) VALUES (?1, ?2, ?3)",
                params![chain.to_string(), diff_id.to_string(), size as i64],
            )
            .map_err(Error::db("record layer"))?;
        Ok(())
    }

    /// The unpacked size of layer `chain`, if recorded.
    pub fn layer_size(&self, chain: &Digest) -> Result<Option<u64>> {
        self.db
            .query_row(
                "SELECT size FROM layers WHERE chain = ?1",
                [chain.to_string()],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|o| o.map(|v| v as u64))
            .map_err(Error::db("read layer"))
    }

    /// Every recorded layer chain.
    pub fn layer_chains(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .db
            .prepare("SELECT chain FROM layers ORDER BY chain")
            .map_err(Error::db("list layers"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(Error::db("list layers"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::db("list layers"))
    }

    /// Forgets layer `chain`.
    pub fn forget_layer(&self, chain: &Digest) -> Result<()> {
        self.db
            .execute("DELETE FROM layers WHERE chain = ?1", [chain.to_string()])
            .map_err(Error::db("forget layer"))
            .map(drop)
    }

    /// Records images and points tags at them, in one transaction. A tag that pointed at
    /// another image moves, leaving that image untagged (dangling), as in Docker.
    pub fn record(&mut self, images: &[(Image, Vec<Reference>)]) -> Result<()> {
        let tx = self.db.transaction().map_err(Error::db("begin"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        for (img, refs) in images {
            tx.execute(
                "INSERT OR IGNORE INTO images (manifest, config, created, size, loaded) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![img.manifest.to_string(), img.config.to_string(), img.created, img.size as i64, now],
            )
            .map_err(Error::db("record image"))?;
            for r in refs {
                tx.execute(
                    "INSERT OR REPLACE INTO tags (name, manifest) VALUES (?1, ?2)",
                    params![r.to_string(), img.manifest.to_string()],
                )
                .map_err(Error::db("record tag"))?;
            }
        }
        tx.commit().map_err(Error::db("commit"))
    }

    /// Every image with its tags, newest first.
    pub fn images(&self) -> Result<Vec<Image>> {
        let mut tags: BTreeMap<String, Vec<Reference>> = BTreeMap::new();
        let mut stmt = self
            .db
            .prepare("SELECT name, manifest FROM tags ORDER BY name")
            .map_err(Error::db("list tags"))?;
        for row in stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(Error::db("list tags"))?
        {
            let (name, m) = row.map_err(Error::db("list tags"))?;
            tags.entry(m).or_default().push(name.parse()?);
        }
        let mut stmt = self.db.prepare("SELECT manifest, config, created, size FROM images ORDER BY loaded DESC, created DESC").map_err(Error::db("list images"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(Error::db("list images"))?;
        let mut out = Vec::new();
        for row in rows {
            let (m, c, created, size) = row.map_err(Error::db("list images"))?;
            let t = tags.remove(&m).unwrap_or_default();
            out.push(Image {
                manifest: m.parse()?,
                config: c.parse()?,
                created,
                size: size as u64,
                tags: t,
            });
        }
        Ok(out)
    }

    /// Finds an image by reference (`name:tag`), by image ID (a prefix of the config digest,
    /// with or without `sha256:`), or by manifest digest. Several records with one config (the
    /// same image from different archives) are one image ID: the tagged one comes first.
    pub fn resolve(&self, what: &str) -> Result<Image> {
        let images = self.images()?;
        let hex = what.strip_prefix("sha256:").unwrap_or(what);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut found: Vec<&Image> = images
                .iter()
                .filter(|i| i.config.hex().starts_with(hex) || i.manifest.hex() == hex)
                .collect();
            found.sort_by_key(|i| i.tags.is_empty());
            if let Some(first) = found.first() {
                if found.iter().any(|i| i.config != first.config) {
                    return Err(Error::Invalid(format!("image ID {what:?} is ambiguous")));
                }
                return Ok((*first).clone());
            }
        }
        let r: Reference = what
            .parse()
            .map_err(|_| Error::NotFound(format!("no such image: {what}")))?;
        images
            .into_iter()
            .find(|i| i.tags.contains(&r))
            .ok_or_else(|| Error::NotFound(format!("no such image: {}", r.familiar())))
    }

    /// Every record with the same config as `img` (one image ID), `img` included.
    pub fn same_id(&self, img: &Image) -> Result<Vec<Image>> {
        Ok(self
            .images()?
            .into_iter()
            .filter(|i| i.config == img.config)
            .collect())
    }

    /// Points `target` at image `img` (moving it from any other image).
    pub fn tag(&mut self, img: &Image, target: &Reference) -> Result<()> {
        self.record(&[(img.clone(), vec![target.clone()])])
    }

    /// Removes tag `r`; true if it existed.
    pub fn untag(&self, r: &Reference) -> Result<bool> {
        let n = self
            .db
            .execute("DELETE FROM tags WHERE name = ?1", [r.to_string()])
            .map_err(Error::db("untag"))?;
        Ok(n > 0)
    }

    /// Deletes image record `img` (and its tags).
    pub fn delete(&self, img: &Image) -> Result<()> {
        self.db
            .execute(
                "DELETE FROM images WHERE manifest = ?1",
                [img.manifest.to_string()],
            )
            .map_err(Error::db("delete image"))
            .map(drop)
    }
}

/// A blob being written: a file in `content/ingest` named by the writing process, hashed as
/// it is written, stored under its digest by [`finish`](Self::finish) once complete and
/// verified, removed if dropped before. Needs no database, so download threads write their own.
pub struct Ingest {
    tmp: PathBuf,
    blobs: PathBuf,
    w: Option<HashWriter<std::io::BufWriter<File>>>,
}

impl Ingest {
    /// Starts a blob in the store at `root`.
    pub fn new(root: &Path) -> Result<Ingest> {
        let tmp =
            root.join("content/ingest")
                .join(format!("{}-{}", std::process::id(), rand_suffix()));
        let f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        Ok(Ingest {
            tmp,
            blobs: root.join("content/blobs/sha256"),
            w: Some(HashWriter::new(std::io::BufWriter::with_capacity(
                1 << 20,
                f,
            ))),
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.w.as_ref().map_or(0, |w| w.count())
    }

    /// Flushes, checks the digest against `expected` (if any), syncs and renames the blob into
    /// place. Returns its digest, its size, and whether it is new to the store.
    pub fn finish(mut self, expected: Option<&Digest>) -> Result<(Digest, u64, bool)> {
        let mut w = self.w.take().expect("finished once");
        w.flush()
            .map_err(|e| Error::io("write blob", &self.tmp, e))?;
        let (digest, size, inner) = w.finish();
        let digest = digest.expect("blobs are hashed");
        if let Some(want) = expected {
            if *want != digest {
                return Err(Error::Archive {
                    path: self.tmp.clone(),
                    reason: format!("digest mismatch: expected {want}, got {digest}"),
                });
            }
        }
        let f = inner
            .into_inner()
            .map_err(|e| Error::io("write blob", &self.tmp, e.into_error()))?;
        f.sync_all()
            .map_err(|e| Error::io("sync blob", &self.tmp, e))?;
        let dst = self.blobs.join(digest.hex());
        if dst.exists() {
            return Ok((digest, size, false));
        }
        std::fs::rename(&self.tmp, &dst).map_err(|e| Error::io("store blob", &dst, e))?;
        Ok((digest, size, true))
    }
}

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.as_mut().expect("not finished").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.as_mut().expect("not finished").flush()
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // Gone already when finish renamed it.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}",
        t.as_nanos(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(chain_id(None, &a), a);
        assert_eq!(
            chain_id(Some(&a), &b),
            Digest::of(format!("{a} {b}").as_bytes())
        );
    }

    #[test]
    fn blobs_verify_and_failed_puts_leave_nothing() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(t.path()).unwrap();
        let (d, new) = s.put_bytes(b"hello").unwrap();
        assert!(new && s.has_blob(&d));
        assert!(!s.put_bytes(b"hello").unwrap().1, "second put is not new");
        let wrong = Digest::of(b"other");
        assert!(s.put_blob(&mut &b"data"[..], Some(&wrong)).is_err());
        assert!(!s.has_blob(&Digest::of(b"data")));
        assert_eq!(
            std::fs::read_dir(t.path().join("content/ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
