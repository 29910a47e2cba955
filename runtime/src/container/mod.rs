//! Containers: their records on disk, and `run`, which starts one in its own namespaces on a
//! snapshot of its image.
//!
//! ```text
//! ROOT/containers/<id>/config.json   what was asked: image, command, env, name, options
//! ROOT/containers/<id>/state.json    status, pid, exit code, times
//! ROOT/containers/<id>/rootfs/       the mount point of the container's snapshot
//! ROOT/containers/<id>/hostname, hosts   bind-mounted as /etc/hostname and /etc/hosts
//! ```
//! The writable layer of container `<id>` is the active snapshot `ctr-<id>`, on the committed
//! init layer `init-<chain>` (the mount points, shared by the image's containers), on the
//! image's top layer.

mod init;
pub mod run;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub use init::{child_main, init_main};
pub use run::{RunOptions, run};

use crate::{Error, Result};

/// Docker's default capability set (moby `oci/caps/defaults.go`): these stay in the bounding
/// set, all others are dropped.
pub const DEFAULT_CAPS: &[u32] = &[0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

/// One container's directory.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its id (64 hex digits).
    pub id: String,
    /// Its directory.
    pub dir: PathBuf,
}

impl Container {
    /// The snapshot key of the container's writable layer.
    pub fn snapshot_key(&self) -> String {
        format!("ctr-{}", self.id)
    }

    /// The config written at creation.
    pub fn config(&self) -> Result<Value> {
        read_json(&self.dir.join("config.json"))
    }

    /// The current state.
    pub fn state(&self) -> Result<Value> {
        read_json(&self.dir.join("state.json"))
    }

    /// Replaces the state (atomically: temp file + rename).
    pub fn set_state(&self, v: &Value) -> Result<()> {
        write_json(&self.dir.join("state.json"), v)
    }
}

pub(crate) fn read_json(p: &Path) -> Result<Value> {
    let data = std::fs::read(p).map_err(|e| Error::io("read", p, e))?;
    serde_json::from_slice(&data).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
}

pub(crate) fn write_json(p: &Path, v: &Value) -> Result<()> {
    let tmp = p.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(v).expect("JSON values serialize"),
    )
    .map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io("rename into place", p, e))
}

/// All containers below `root`.
pub fn list(root: &Path) -> Result<Vec<Container>> {
    let dir = root.join("containers");
    let mut out = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(it) => {
            for e in it {
                let e = e.map_err(|e| Error::io("read dir", &dir, e))?;
                let id = e.file_name().to_string_lossy().into_owned();
                if id.len() == 64 && e.path().join("config.json").exists() {
                    out.push(Container { id, dir: e.path() });
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("read dir", &dir, e)),
    }
    Ok(out)
}

/// The container named `what` (name, full id or id prefix).
pub fn find(root: &Path, what: &str) -> Result<Container> {
    let all = list(root)?;
    if let Some(c) = all.iter().find(|c| {
        c.config()
            .ok()
            .and_then(|v| v["Name"].as_str().map(str::to_string))
            .as_deref()
            == Some(what)
    }) {
        return Ok(c.clone());
    }
    let by_id: Vec<&Container> = all
        .iter()
        .filter(|c| what.len() >= 3 && c.id.starts_with(what))
        .collect();
    match by_id.len() {
        1 => Ok(by_id[0].clone()),
        0 => Err(Error::NotFound(format!("no such container: {what}"))),
        _ => Err(Error::Invalid(format!(
            "container id {what:?} is ambiguous"
        ))),
    }
}

/// True when process `pid` exists (and is not a zombie we reaped).
pub fn alive(pid: i64) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// "exited (0)" style status, as `ps` shows: `Up`/`Exited (N)`; a running record whose
/// process is gone is reported as exited (it did not shut down cleanly).
pub fn status(state: &Value) -> (String, Option<i64>) {
    let pid = state["Pid"].as_i64().unwrap_or(0);
    match state["Status"].as_str() {
        Some("running") if alive(pid) => ("running".into(), None),
        Some("running") => ("exited".into(), Some(137)),
        Some(s) => (s.into(), state["ExitCode"].as_i64()),
        None => ("unknown".into(), None),
    }
}

/// A process's exit code as a shell reports it: its code, or 128 + the signal that killed it.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 255,
    }
}

/// A fresh state document.
pub fn new_state(status: &str) -> Value {
    json!({ "Status": status, "Pid": 0, "ExitCode": Value::Null, "StartedAt": Value::Null, "FinishedAt": Value::Null })
}
