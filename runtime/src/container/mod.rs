//! Containers: their records on disk and their lifecycle (create, start, stop, kill, wait,
//! exec, remove), which survives the CLI exiting.
//!
//! ```text
//! ROOT/containers/<id>/config.json   what was asked: image, command, env, name, mounts
//! ROOT/containers/<id>/state.json    status, pids, exit code, times (written by the monitor)
//! ROOT/containers/<id>/<id>-json.log stdout and stderr, in Docker's json-file format
//! ROOT/containers/<id>/rootfs/       the mount point of the container's snapshot
//! ROOT/containers/<id>/hostname, hosts   bind-mounted as /etc/hostname and /etc/hosts
//! ```
//! The writable layer of container `<id>` is the active snapshot `ctr-<id>`, on the committed
//! init layer `init-<chain>` (the mount points, shared by the image's containers), on the
//! image's top layer (or the top layer `strata commit` adopted from this container).
//!
//! Every started container has a monitor process (`strata __init`, see [`monitor`]): like
//! containerd's shim or Podman's conmon it outlives the CLI, owns the container's namespaces
//! and mounts, copies its output into the log and records its exit.

pub mod commit;
pub mod create;
mod exec;
mod init;
pub mod lifecycle;
pub mod monitor;
mod stdio;
pub mod view;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub use create::{RunOptions, create};
pub use exec::{ExecOptions, exec, exec_main};
pub use init::child_main;
pub use lifecycle::{kill, remove, start, stop, wait};
pub use monitor::{monitor_main, ns_main};
pub use strings as strings_of;

use crate::{Error, Result, sys};

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

/// What `ps` and `inspect` say a container is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Made, never started.
    Created,
    /// Its process runs.
    Running,
    /// It ran and exited with this code (128 + signal when killed).
    Exited(i64),
}

impl Status {
    /// Docker's word for it.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Exited(_) => "exited",
        }
    }
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

    /// Replaces the config (atomically).
    pub fn set_config(&self, v: &Value) -> Result<()> {
        write_json(&self.dir.join("config.json"), v)
    }

    /// The current state document.
    pub fn state(&self) -> Result<Value> {
        read_json(&self.dir.join("state.json"))
    }

    /// Replaces the state (atomically: temp file + rename).
    pub fn set_state(&self, v: &Value) -> Result<()> {
        write_json(&self.dir.join("state.json"), v)
    }

    /// The container's name.
    pub fn name(&self) -> String {
        self.config()
            .ok()
            .and_then(|c| c["Name"].as_str().map(str::to_string))
            .unwrap_or_else(|| self.id[..12].to_string())
    }

    /// The log file (Docker's json-file format).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}-json.log", self.id))
    }

    /// Its status, checked against the process table: a record that says "running" whose
    /// process is gone (the monitor was killed) is reported as exited by SIGKILL.
    pub fn status(&self) -> Result<Status> {
        Ok(status_of(&self.state()?))
    }

    /// The host pid of the container's first process while it runs.
    pub fn pid(&self) -> Result<Option<i64>> {
        let st = self.state()?;
        let pid = st["Pid"].as_i64().unwrap_or(0);
        let alive = pid > 0
            && sys::process_start(pid)
                .is_some_and(|s| st["PidStart"].as_u64().is_none_or(|t| t == s));
        Ok((status_of(&st) == Status::Running && alive).then_some(pid))
    }
}

/// The status a state document describes (see [`Container::status`]). A record that says
/// "running" stays running while its process, or its monitor (about to record the exit),
/// lives; with both gone the container died with its monitor: exited by SIGKILL.
pub fn status_of(state: &Value) -> Status {
    let alive = |pid: &str, start: &str| {
        let pid = state[pid].as_i64().unwrap_or(0);
        let start = state[start].as_u64();
        pid > 0 && sys::process_start(pid).is_some_and(|s| start.is_none_or(|t| t == s))
    };
    match state["Status"].as_str() {
        Some("running") if alive("Pid", "PidStart") || alive("MonitorPid", "MonitorStart") => {
            Status::Running
        }
        Some("running") => Status::Exited(137),
        Some("exited") => Status::Exited(state["ExitCode"].as_i64().unwrap_or(0)),
        _ => Status::Created,
    }
}

pub(crate) fn read_json(p: &Path) -> Result<Value> {
    let data = std::fs::read(p).map_err(|e| Error::io("read", p, e))?;
    serde_json::from_slice(&data).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
}

pub(crate) fn write_json(p: &Path, v: &Value) -> Result<()> {
    let tmp = p.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(v).expect("JSON values serialize"),
    )
    .map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io("rename into place", p, e))
}

/// All containers below `root`, oldest first.
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
    let mut keyed: Vec<(String, Container)> = out
        .into_iter()
        .map(|c| {
            let created = c
                .config()
                .ok()
                .and_then(|v| v["Created"].as_str().map(str::to_string))
                .unwrap_or_default();
            (created, c)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keyed.into_iter().map(|(_, c)| c).collect())
}

/// The container named `what` (name, full id or unique id prefix).
pub fn find(root: &Path, what: &str) -> Result<Container> {
    let all = list(root)?;
    let what = what.strip_prefix('/').unwrap_or(what);
    if let Some(c) = all.iter().find(|c| c.name() == what || c.id == what) {
        return Ok(c.clone());
    }
    let by_id: Vec<&Container> = all
        .iter()
        .filter(|c| !what.is_empty() && c.id.starts_with(what))
        .collect();
    match by_id.len() {
        1 => Ok(by_id[0].clone()),
        0 => Err(Error::NotFound(format!("no such container: {what}"))),
        _ => Err(Error::Invalid(format!(
            "container id {what:?} is ambiguous: give more digits"
        ))),
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
    json!({
        "Status": status, "Pid": 0, "MonitorPid": 0, "ExitCode": Value::Null, "Error": "",
        "StartedAt": Value::Null, "FinishedAt": Value::Null,
    })
}

/// A string list of a JSON config (`Args`, `Env`, ...).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Prints `c`'s log (see `docker logs`): the last `tail` lines or all, with times if asked,
/// following it while the container runs.
pub fn stdio_log(c: &Container, tail: Option<usize>, timestamps: bool, follow: bool) -> Result<()> {
    stdio::print_log(&c.log_path(), tail, timestamps, follow, || {
        c.status().is_ok_and(|s| s == Status::Running)
    })
}
