//! Snapshot metadata in SQLite: WAL journal, `synchronous=FULL`, one transaction per operation,
//! schema versioned with `PRAGMA user_version`. A server opens its store exclusively
//! (`locking_mode=EXCLUSIVE`): it is the only user, so SQLite keeps its WAL index in memory and
//! takes no file lock per statement, and a second process is refused at once.
//!
//! Keys and names share one namespace, as in containerd: a committed snapshot's key is its
//! name. Snapshot ids come from `AUTOINCREMENT`, so an id is never reused and a directory left
//! by a removed snapshot can never be mistaken for a new one.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

/// Reads and writes take a connection: a [`Transaction`] derefs to one, and reads made under
/// the store's lock (the only user of the database) need no transaction of their own.
pub type Conn = Connection;

use crate::{Error, Result};

/// containerd's snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A read-only view of a committed snapshot.
    View = 1,
    /// A writable snapshot.
    Active = 2,
    /// An immutable snapshot, usable as a parent.
    Committed = 3,
}

impl Kind {
    fn from_i64(v: i64) -> Result<Kind> {
        match v {
            1 => Ok(Kind::View),
            2 => Ok(Kind::Active),
            3 => Ok(Kind::Committed),
            other => Err(Error::Db {
                op: "read kind",
                err: rusqlite::Error::IntegralValueOutOfRange(0, other),
            }),
        }
    }

    /// containerd's name of the kind (`view`, `active`, `committed`), as filters use it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot's record.
#[derive(Debug, Clone)]
pub struct Row {
    /// Internal id: the directory `snapshots/<id>`.
    pub id: i64,
    /// Key (or name, once committed).
    pub key: String,
    /// Parent's id.
    pub parent_id: Option<i64>,
    /// Parent's name ("" for none).
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Creation time, ns since the epoch.
    pub created: i64,
    /// Last update, ns since the epoch.
    pub updated: i64,
    /// Bytes used (committed snapshots).
    pub size: i64,
    /// Inodes used (committed snapshots).
    pub inodes: i64,
    /// Boot id when the snapshot was created (for volatile snapshots).
    pub boot_id: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

const SCHEMA_VERSION: i64 = 1;

/// The metadata store.
pub struct Meta {
    conn: Connection,
}

impl Meta {
    /// Opens (creating or migrating) the store at `path`. `exclusive`: this process is the
    /// store's only user until it closes it; another one holding it is [`Error::InUse`].
    pub fn open(path: &Path, exclusive: bool) -> Result<Meta> {
        let conn = Connection::open(path).map_err(Error::db("open"))?;
        if exclusive {
            // Before WAL is entered, so the WAL index lives in heap memory (no -shm file).
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
                .map_err(Error::db("set exclusive locking"))?;
            // A store another process holds is refused at once (rusqlite waits 5 s by default).
            conn.busy_timeout(std::time::Duration::ZERO)
                .map_err(Error::db("set busy timeout"))?;
        } else {
            conn.busy_timeout(std::time::Duration::from_secs(10))
                .map_err(Error::db("set busy timeout"))?;
        }
        let in_use = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Error::InUse {
                    root: path.parent().unwrap_or(path).to_path_buf(),
                }
            }
            _ => Error::Db {
                op: "enable WAL",
                err: e,
            },
        };
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(in_use)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(Error::db("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(Error::db("enable foreign keys"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(Error::db("read schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(Error::InvalidArgument(format!(
                "{}: schema version {version} is newer than this strata ({SCHEMA_VERSION})",
                path.display()
            )));
        }
        if version < 1 {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE snapshots (
                     id INTEGER PRIMARY KEY AUTOINCREMENT,
                     key TEXT NOT NULL UNIQUE,
                     parent_id INTEGER REFERENCES snapshots(id),
                     kind INTEGER NOT NULL,
                     created INTEGER NOT NULL,
                     updated INTEGER NOT NULL,
                     size INTEGER NOT NULL DEFAULT 0,
                     inodes INTEGER NOT NULL DEFAULT 0,
                     boot_id TEXT
                 );
                 CREATE INDEX snapshots_parent ON snapshots(parent_id);
                 CREATE TABLE labels (
                     snapshot INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
                     name TEXT NOT NULL,
                     value TEXT NOT NULL,
                     PRIMARY KEY (snapshot, name)
                 );
                 PRAGMA user_version = 1;
                 COMMIT;",
            )
            .map_err(Error::db("create schema"))?;
        }
        if exclusive {
            // Takes the exclusive lock now (kept until the connection closes), so a second
            // server on this root fails at its start, not at its first write.
            conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;")
                .map_err(in_use)?;
            let page: i64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(Error::db("read page size"))?;
            let wal = wal_path(path);
            presize_wal(&wal, page as u64).map_err(|e| Error::Io {
                op: "pre-size the WAL",
                path: wal,
                err: e,
            })?;
        }
        Ok(Meta { conn })
    }

    /// Starts a write transaction (taking the write lock at once).
    pub fn write(&mut self) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(Error::db("begin"))
    }

    /// The connection, for reads: the caller holds the store's lock, so no write can
    /// interleave and single reads need no transaction.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}

fn wal_path(db: &Path) -> std::path::PathBuf {
    let mut p = db.as_os_str().to_os_string();
    p.push("-wal");
    p.into()
}

/// Zero-fills the WAL up to the size it cycles within (SQLite restarts it from the beginning
/// after each automatic checkpoint, every 1000 pages), so a commit overwrites blocks the file
/// already has and its sync flushes the data only, not the file's growth: about 70 µs less per
/// write transaction on ext4 here. SQLite never truncates the WAL when it restarts it, and reads
/// one only as far as its frames are valid (checksums and salts), so the zeros are never taken
/// for frames. Done when a server opens the store, before any write; frames a crashed server
/// left are below the end and untouched.
fn presize_wal(wal: &Path, page_size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let want = 32 + 1_100 * (24 + page_size);
    let f = match std::fs::OpenOptions::new().write(true).open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut at = f.metadata()?.len();
    if at >= want {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    while at < want {
        let n = (want - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()
}

macro_rules! select {
    ($tail:literal) => {
        concat!(
            // The parent's key by a scalar subquery, not a LEFT JOIN: SQLite (with STAT4)
            // re-prepares a cached LEFT JOIN statement on every new binding, which was half
            // the cost of a Stat.
            "SELECT s.id, s.key, s.parent_id, COALESCE((SELECT p.key FROM snapshots p WHERE p.id = s.parent_id), ''), ",
            "s.kind, s.created, s.updated, s.size, s.inodes, s.boot_id FROM snapshots s ",
            $tail
        )
    };
}

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Row, i64)> {
    Ok((
        Row {
            id: r.get(0)?,
            key: r.get(1)?,
            parent_id: r.get(2)?,
            parent: r.get(3)?,
            kind: Kind::View,
            created: r.get(5)?,
            updated: r.get(6)?,
            size: r.get(7)?,
            inodes: r.get(8)?,
            boot_id: r.get(9)?,
            labels: BTreeMap::new(),
        },
        r.get(4)?,
    ))
}

fn finish(tx: &Conn, (mut row, kind): (Row, i64)) -> Result<Row> {
    row.kind = Kind::from_i64(kind)?;
    row.labels = labels(tx, row.id)?;
    Ok(row)
}

/// The snapshot with key `key`.
pub fn get(tx: &Conn, key: &str) -> Result<Option<Row>> {
    let mut stmt = tx
        .prepare_cached(select!("WHERE s.key = ?1"))
        .map_err(Error::db("get snapshot"))?;
    let r = stmt
        .query_row([key], row_of)
        .optional()
        .map_err(Error::db("get snapshot"))?;
    r.map(|r| finish(tx, r)).transpose()
}

/// Every snapshot, ordered by key.
pub fn all(tx: &Conn) -> Result<Vec<Row>> {
    let mut stmt = tx
        .prepare_cached(select!("ORDER BY s.key"))
        .map_err(Error::db("list snapshots"))?;
    let rows: Vec<(Row, i64)> = stmt
        .query_map([], row_of)
        .map_err(Error::db("list snapshots"))?
        .collect::<rusqlite::Result<_>>()
        .map_err(Error::db("list snapshots"))?;
    let mut all_labels: std::collections::HashMap<i64, BTreeMap<String, String>> =
        Default::default();
    let mut l = tx
        .prepare("SELECT snapshot, name, value FROM labels")
        .map_err(Error::db("list labels"))?;
    for r in l
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .map_err(Error::db("list labels"))?
    {
        let (id, k, v) = r.map_err(Error::db("list labels"))?;
        all_labels.entry(id).or_default().insert(k, v);
    }
    rows.into_iter()
        .map(|(mut row, kind)| {
            row.kind = Kind::from_i64(kind)?;
            row.labels = all_labels.remove(&row.id).unwrap_or_default();
            Ok(row)
        })
        .collect()
}

/// The labels of snapshot `id`.
pub fn labels(tx: &Conn, id: i64) -> Result<BTreeMap<String, String>> {
    let mut stmt = tx
        .prepare_cached("SELECT name, value FROM labels WHERE snapshot = ?1")
        .map_err(Error::db("get labels"))?;
    let it = stmt
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(Error::db("get labels"))?;
    it.collect::<rusqlite::Result<_>>()
        .map_err(Error::db("get labels"))
}

/// The highest snapshot id ever handed out (0 for none): ids above it are unused.
pub fn max_id(tx: &Conn) -> Result<i64> {
    tx.query_row(
        "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'), 0),
                    COALESCE((SELECT MAX(id) FROM snapshots), 0))",
        [],
        |r| r.get(0),
    )
    .map_err(Error::db("read the highest id"))
}

/// Replaces the labels of snapshot `id`.
pub fn set_labels(tx: &Conn, id: i64, labels: &BTreeMap<String, String>) -> Result<()> {
    tx.prepare_cached("DELETE FROM labels WHERE snapshot = ?1")
        .and_then(|mut s| s.execute([id]))
        .map_err(Error::db("clear labels"))?;
    let mut stmt = tx
        .prepare_cached("INSERT INTO labels (snapshot, name, value) VALUES (?1, ?2, ?3)")
        .map_err(Error::db("set labels"))?;
    for (k, v) in labels {
        stmt.execute(params![id, k, v])
            .map_err(Error::db("set labels"))?;
    }
    Ok(())
}

/// Inserts a new snapshot and returns its id: `id` when given (it must be above every id used
/// so far, see [`max_id`]), the next one otherwise.
#[allow(clippy::too_many_arguments)]
pub fn insert(
    tx: &Conn,
    id: Option<i64>,
    key: &str,
    parent_id: Option<i64>,
    kind: Kind,
    now: i64,
    boot_id: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<i64> {
    tx.prepare_cached(
        "INSERT INTO snapshots (id, key, parent_id, kind, created, updated, boot_id) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
    )
    .and_then(|mut s| s.execute(params![id, key, parent_id, kind as i64, now, boot_id]))
    .map_err(Error::db("insert snapshot"))?;
    let id = tx.last_insert_rowid();
    set_labels(tx, id, labels)?;
    Ok(id)
}

/// Turns active snapshot `id` into committed snapshot `name`.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    tx: &Conn,
    id: i64,
    name: &str,
    parent_id: Option<i64>,
    now: i64,
    size: i64,
    inodes: i64,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE snapshots SET key = ?2, parent_id = ?3, kind = ?4, created = ?5, updated = ?5, size = ?6, inodes = ?7, boot_id = NULL WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id, name, parent_id, Kind::Committed as i64, now, size, inodes]))
    .map_err(Error::db("commit snapshot"))?;
    set_labels(tx, id, labels)
}

/// Sets the update time of `id`.
pub fn touch(tx: &Conn, id: i64, now: i64) -> Result<()> {
    tx.prepare_cached("UPDATE snapshots SET updated = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, now]))
        .map_err(Error::db("update snapshot"))
        .map(drop)
}

/// True when some snapshot has `id` as its parent.
pub fn has_children(tx: &Conn, id: i64) -> Result<bool> {
    tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM snapshots WHERE parent_id = ?1)")
        .and_then(|mut s| s.query_row([id], |r| r.get(0)))
        .map_err(Error::db("find children"))
}

/// Deletes snapshot `id` and its labels.
pub fn delete(tx: &Conn, id: i64) -> Result<()> {
    tx.prepare_cached("DELETE FROM snapshots WHERE id = ?1")
        .and_then(|mut s| s.execute([id]))
        .map_err(Error::db("delete snapshot"))
        .map(drop)
}

/// The ids of `id`'s ancestors, nearest first.
pub fn chain(tx: &Conn, id: i64) -> Result<Vec<i64>> {
    let mut stmt = tx
        .prepare_cached(
            "WITH RECURSIVE up(id, parent_id, depth) AS (
                 SELECT id, parent_id, 0 FROM snapshots WHERE id = ?1
                 UNION ALL SELECT s.id, s.parent_id, up.depth + 1 FROM snapshots s JOIN up ON s.id = up.parent_id
             ) SELECT id FROM up WHERE depth > 0 ORDER BY depth",
        )
        .map_err(Error::db("walk parents"))?;
    let it = stmt
        .query_map([id], |r| r.get(0))
        .map_err(Error::db("walk parents"))?;
    it.collect::<rusqlite::Result<_>>()
        .map_err(Error::db("walk parents"))
}

/// Every snapshot id.
pub fn ids(tx: &Conn) -> Result<HashSet<i64>> {
    let mut stmt = tx
        .prepare("SELECT id FROM snapshots")
        .map_err(Error::db("list ids"))?;
    let it = stmt
        .query_map([], |r| r.get(0))
        .map_err(Error::db("list ids"))?;
    it.collect::<rusqlite::Result<_>>()
        .map_err(Error::db("list ids"))
}

/// Moves active snapshot `id` to a fresh id (`fresh`, or the next one; returned) and gives `id`
/// to a new committed snapshot `name`, so the committed one owns the directory `id` had. Labels
/// follow the active snapshot; the committed one gets `labels`.
#[allow(clippy::too_many_arguments)]
pub fn hand_over(
    tx: &Conn,
    id: i64,
    fresh: Option<i64>,
    name: &str,
    parent_id: Option<i64>,
    now: i64,
    size: i64,
    inodes: i64,
    labels: &BTreeMap<String, String>,
) -> Result<i64> {
    let err = Error::db("hand over a snapshot's directory");
    let fresh = match fresh {
        Some(f) => f,
        None => max_id(tx)? + 1,
    };
    let kept = self::labels(tx, id)?;
    tx.execute("DELETE FROM labels WHERE snapshot = ?1", [id])
        .map_err(Error::db("hand over a snapshot's directory"))?;
    tx.execute(
        "UPDATE snapshots SET id = ?2, updated = ?3 WHERE id = ?1",
        params![id, fresh, now],
    )
    .map_err(Error::db("hand over a snapshot's directory"))?;
    tx.execute(
        "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'snapshots'",
        [fresh],
    )
    .map_err(Error::db("hand over a snapshot's directory"))?;
    set_labels(tx, fresh, &kept)?;
    tx.execute(
        "INSERT INTO snapshots (id, key, parent_id, kind, created, updated, size, inodes) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
        params![id, name, parent_id, Kind::Committed as i64, now, size, inodes],
    )
    .map_err(err)?;
    set_labels(tx, id, labels)?;
    Ok(fresh)
}

/// Sets the parent of `id`.
pub fn set_parent(tx: &Conn, id: i64, parent_id: Option<i64>, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE snapshots SET parent_id = ?2, updated = ?3 WHERE id = ?1",
        params![id, parent_id, now],
    )
    .map_err(Error::db("set parent"))
    .map(drop)
}
