//! `strata exec`: a new process in a running container.
//!
//! The CLI re-executes itself as `strata __exec DIR` with the request in `STRATA_EXEC`; that
//! process joins the container's namespaces with `setns(2)` (mount last, which also moves it to
//! the container's root), drops the same capabilities as the container's first process, sets
//! no_new_privs, and runs the command as its child, so it is inside the PID namespace too.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::sched::{CloneFlags, setns};
use serde_json::{Value, json};

use super::stdio::{RawMode, file_of, forward, recv_fd, socket_pair};
use super::{Container, DEFAULT_CAPS, Status, read_json};
use crate::{Error, Result, sys};

/// What `strata exec` was asked for.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Command and arguments.
    pub cmd: Vec<String>,
    /// Extra `KEY=VALUE` variables.
    pub env: Vec<String>,
    /// Working directory (default: the container's).
    pub workdir: Option<String>,
    /// User (default: the container's).
    pub user: Option<String>,
    /// Keep stdin open.
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    pub tty: bool,
}

/// Runs `o.cmd` in running container `c` with this process's stdio; returns its exit code.
pub fn exec(c: &Container, o: &ExecOptions) -> Result<i32> {
    if c.status()? != Status::Running {
        return Err(Error::Conflict(format!(
            "container {} is not running",
            c.name()
        )));
    }
    if o.cmd.is_empty() {
        return Err(Error::Invalid("exec needs a command".into()));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("find own binary", &c.dir, e))?;
    let req = json!({ "Cmd": o.cmd, "Env": o.env, "WorkingDir": o.workdir, "User": o.user, "Interactive": o.interactive, "Tty": o.tty });
    let mut cmd = Command::new(exe);
    cmd.arg("__exec")
        .arg(&c.dir)
        .env("STRATA_EXEC", req.to_string());
    if !o.tty {
        if !o.interactive {
            cmd.stdin(std::process::Stdio::null());
        }
        let status = cmd
            .status()
            .map_err(|e| Error::io("start exec", &c.dir, e))?;
        return Ok(super::exit_code(status));
    }
    // The helper opens a terminal in the container and sends us its master (see `monitor`).
    let (ours, theirs) = socket_pair()?;
    cmd.stdin(File::from(theirs));
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("start exec", &c.dir, e))?;
    drop(cmd);
    if let Some(master) = recv_fd(&ours)? {
        let stdin = std::io::stdin();
        if let Some(ws) = sys::window_size(stdin.as_fd()) {
            let _ = sys::set_window_size(master.as_fd(), &ws);
        }
        let _raw = o
            .interactive
            .then(|| RawMode::enter(stdin.as_fd()))
            .flatten();
        if o.interactive {
            forward(file_of(stdin.as_fd())?, file_of(&master)?);
        }
        let _ = std::io::copy(&mut File::from(master), &mut std::io::stdout());
    }
    let status = child
        .wait()
        .map_err(|e| Error::io("wait for exec", &c.dir, e))?;
    Ok(super::exit_code(status))
}

/// `strata __exec DIR`: returns the exit code of the command (126/127 when it can't start).
pub fn exec_main(dir: &Path) -> Result<i32> {
    let req: Value = serde_json::from_str(&std::env::var("STRATA_EXEC").unwrap_or_default())
        .map_err(|e| Error::Invalid(format!("STRATA_EXEC: {e}")))?;
    let cfg = read_json(&dir.join("config.json"))?;
    let c = Container {
        id: cfg["Id"].as_str().unwrap_or_default().to_string(),
        dir: dir.to_path_buf(),
    };
    let pid = c
        .pid()?
        .ok_or_else(|| Error::Conflict(format!("container {} is not running", c.name())))?;
    // A rootless container's namespaces belong to its user namespace: join that first.
    crate::rootless::join_user_ns_of(pid)?;
    // Opened before joining any: /proc is the host's until the mount namespace changes.
    let mut kinds = vec![
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
    ];
    if cfg["Network"] != "host" {
        kinds.push(("net", CloneFlags::CLONE_NEWNET));
    }
    kinds.push(("mnt", CloneFlags::CLONE_NEWNS));
    let mut fds = Vec::new();
    for (name, flag) in kinds {
        let p = format!("/proc/{pid}/ns/{name}");
        let f = File::open(&p).map_err(|e| Error::io("open namespace", &p, e))?;
        fds.push((p, f, flag));
    }
    for (p, f, flag) in &fds {
        setns(f.as_fd(), *flag).map_err(|e| Error::io("join namespace", p, e.into()))?;
    }
    drop(fds);
    let workdir = req["WorkingDir"]
        .as_str()
        .or(cfg["WorkingDir"].as_str())
        .unwrap_or("/")
        .to_string();
    let user = req["User"]
        .as_str()
        .or(cfg["User"].as_str())
        .map(str::to_string);
    let (uid, gid) = match user {
        Some(u) => super::init::user_ids(Path::new("/"), &u)?,
        None => (0, 0),
    };
    for cap in 0..=sys::last_cap() {
        if !DEFAULT_CAPS.contains(&cap) {
            sys::drop_bounding(cap).map_err(|e| Error::io("drop capability", "/", e))?;
        }
    }
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| Error::io("set no_new_privs", "/", e.into()))?;
    let args = super::strings(&req["Cmd"]);
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]).env_clear().current_dir(&workdir);
    for e in super::strings(&cfg["Env"])
        .into_iter()
        .chain(super::strings(&req["Env"]))
    {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if (uid, gid) != (0, 0) {
        cmd.uid(uid).gid(gid);
    }
    sys::default_signals(&[libc::SIGINT, libc::SIGQUIT, libc::SIGHUP]);
    let tty = req["Tty"].as_bool().unwrap_or(false);
    let spawn_err = |e: std::io::Error| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        eprintln!("strata: exec {}: {e}", args[0]);
        code
    };
    if !tty {
        return Ok(match cmd.status() {
            Ok(s) => super::exit_code(s),
            Err(e) => spawn_err(e),
        });
    }
    let (master, slave) = super::stdio::open_pty()?;
    super::stdio::send_fd(std::io::stdin(), &master)?;
    drop(master);
    cmd.stdin(file_of(&slave)?)
        .stdout(file_of(&slave)?)
        .stderr(file_of(&slave)?);
    sys::spawn_on_terminal(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ok(spawn_err(e)),
    };
    drop(cmd);
    drop(slave);
    let status = child
        .wait()
        .map_err(|e| Error::io("wait for exec", dir, e))?;
    Ok(super::exit_code(status))
}
