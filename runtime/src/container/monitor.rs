//! The container monitor, `strata __init DIR` (attached) or `strata __start DIR` (detached):
//! what containerd's shim or Podman's conmon is to their containers.
//!
//! It enters new mount, UTS, IPC and network namespaces (the network one unless
//! `--network host`), unshares the PID namespace for its children, mounts the snapshot on
//! `rootfs`, sets the hostname and brings up loopback. Then it starts `__child` (pid 1 of the
//! new PID namespace, see `init.rs`) on pipes or a pseudo-terminal, records the container as
//! running, copies its output into the json-file log (and to the terminal when attached),
//! waits for it, records its exit code, and removes the container if it was run with `--rm`.
//!
//! Detached, it starts a session of its own and reports start-up errors on stderr, which the
//! CLI reads until the monitor closes it once the container runs.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use serde_json::{Value, json};

use super::stdio::{Echo, Log, RawMode, file_of, forward, pump, recv_fd, socket_pair};
use super::{Container, read_json};
use crate::{Error, Result, sys};

fn nix_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> Error + 'a {
    move |e| Error::io(op, path, e.into())
}

/// The mounts of the container's root recorded at creation.
fn root_mounts(cfg: &Value) -> Vec<strata_overlay::Mount> {
    cfg["Mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| strata_overlay::Mount {
            kind: m["Type"].as_str().unwrap_or_default().into(),
            source: m["Source"].as_str().unwrap_or_default().into(),
            options: super::strings(&m["Options"]),
        })
        .collect()
}

/// Runs the monitor; returns the process's exit code (the container's, or 125 when it could
/// not be started).
pub fn monitor_main(dir: &Path, detached: bool) -> i32 {
    let c = Container {
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: dir.to_path_buf(),
    };
    if detached {
        let _ = nix::unistd::setsid();
    }
    // ^C at an attached terminal goes to the container (and stops the CLI); the monitor stays
    // to record the exit.
    sys::ignore_signals(&[libc::SIGINT, libc::SIGQUIT, libc::SIGHUP]);
    let code = match run(&c, detached) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "strata: starting container {}: {e}",
                &c.id[..12.min(c.id.len())]
            );
            if let Ok(mut st) = c.state() {
                st["Error"] = json!(e.to_string());
                let _ = c.set_state(&st);
            }
            125
        }
    };
    let rm = c
        .config()
        .ok()
        .and_then(|v| v["Rm"].as_bool())
        .unwrap_or(false);
    if rm {
        let _ = strata_overlay::mount::unmount(&dir.join("rootfs"), true);
        let root = dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"));
        let removed = crate::image::Images::open(root)
            .and_then(|mut images| super::lifecycle::remove(&mut images, root, &c, true, true));
        if let Err(e) = removed {
            eprintln!("strata: removing container {}: {e}", c.id);
        }
    }
    code
}

/// `strata __ns DIR`: enters the container's namespaces, mounts its root and starts its
/// first process (which inherits this process's stdio); records that process's host pid in
/// `DIR/pid` for the monitor, and exits with its exit code. A process of its own because a
/// process that unshared its PID namespace cannot start threads, and the monitor needs them.
pub fn ns_main(dir: &Path) -> Result<i32> {
    let cfg = read_json(&dir.join("config.json"))?;
    let host_net = cfg["Network"] == "host";
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID;
    if !host_net {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(nix_err("unshare namespaces", dir))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(nix_err("make mounts private", Path::new("/")))?;
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| Error::io("create", &rootfs, e))?;
    for m in root_mounts(&cfg) {
        m.mount(&rootfs)?;
    }
    nix::unistd::sethostname(cfg["Hostname"].as_str().unwrap_or("strata"))
        .map_err(nix_err("set hostname", dir))?;
    if !host_net {
        sys::loopback_up().map_err(|e| Error::io("bring up loopback", dir, e))?;
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("find own binary", dir, e))?;
    let mut child = Command::new(exe)
        .arg("__child")
        .arg(dir)
        .spawn()
        .map_err(|e| Error::io("start the container's process", dir, e))?;
    let pid_file = dir.join("pid");
    let tmp = dir.join("pid.tmp");
    std::fs::write(&tmp, child.id().to_string())
        .and_then(|()| std::fs::rename(&tmp, &pid_file))
        .map_err(|e| Error::io("write", &pid_file, e))?;
    let status = child
        .wait()
        .map_err(|e| Error::io("wait for the container", dir, e))?;
    Ok(super::exit_code(status))
}

fn run(c: &Container, detached: bool) -> Result<i32> {
    let cfg = read_json(&c.dir.join("config.json"))?;
    let tty = cfg["Tty"].as_bool().unwrap_or(false);
    let interactive = cfg["OpenStdin"].as_bool().unwrap_or(false) && !detached;
    let log = Log::open(&c.log_path())?;
    let exe = std::env::current_exe().map_err(|e| Error::io("find own binary", &c.dir, e))?;
    let pid_file = c.dir.join("pid");
    let start_error = c.dir.join("start-error");
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_file(&start_error);
    let mut cmd = Command::new(exe);
    cmd.arg("__ns").arg(&c.dir);
    let stdin = std::io::stdin();
    let mut pumps = Vec::new();
    let mut _raw = None;
    // With -t the container's first process opens a terminal of its own devpts and sends us
    // the master over this socket (its stdin until then), as runc's console socket does.
    let tty_sock = if tty {
        let (ours, theirs) = socket_pair()?;
        cmd.stdin(File::from(theirs));
        Some(ours)
    } else {
        cmd.stdin(if interactive {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        None
    };
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut ns = cmd
        .spawn()
        .map_err(|e| Error::io("start the container's namespaces", &c.dir, e))?;
    drop(cmd);
    // Detached, start-up errors go to the CLI through our stderr; once the container runs
    // that echo is switched off (see below).
    let err_echo = Echo::new(file_of(std::io::stderr().as_fd()).ok());
    let out_echo = Echo::new(
        (!detached)
            .then(|| file_of(std::io::stdout().as_fd()).ok())
            .flatten(),
    );
    let out = ns.stdout.take().expect("piped");
    let err = ns.stderr.take().expect("piped");
    pumps.push(pump(
        File::from(std::os::fd::OwnedFd::from(err)),
        log.clone(),
        "stderr",
        err_echo.clone(),
    ));
    pumps.push(pump(
        File::from(std::os::fd::OwnedFd::from(out)),
        log.clone(),
        "stdout",
        out_echo.clone(),
    ));
    if let Some(sock) = tty_sock {
        if let Some(m) = recv_fd(&sock)? {
            if let Some(ws) = sys::window_size(stdin.as_fd()).filter(|_| !detached) {
                let _ = sys::set_window_size(m.as_fd(), &ws);
            }
            if interactive {
                _raw = RawMode::enter(stdin.as_fd());
                forward(file_of(stdin.as_fd())?, file_of(&m)?);
            }
            pumps.push(pump(File::from(m), log.clone(), "stdout", out_echo.clone()));
        }
    }
    // The container's pid 1, once the namespace process has started it.
    let mut st = super::new_state("running");
    let started = loop {
        if let Ok(p) = std::fs::read_to_string(&pid_file) {
            break p.trim().parse::<i64>().ok();
        }
        if ns
            .try_wait()
            .map_err(|e| Error::io("wait for the container", &c.dir, e))?
            .is_some()
        {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    };
    // Detached, the CLI must learn whether the command could be started at all: wait until
    // the process is no longer this binary (it exec'd the command) or is gone.
    let mut execd = false;
    if let (Some(pid), true) = (started, detached) {
        let me = std::fs::metadata("/proc/self/exe").ok();
        execd = loop {
            match std::fs::metadata(format!("/proc/{pid}/exe")) {
                Ok(m)
                    if me
                        .as_ref()
                        .is_some_and(|me| (me.dev(), me.ino()) == (m.dev(), m.ino())) =>
                {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Ok(_) => break true,
                Err(_) => break false,
            }
        };
    }
    if let Some(pid) = started {
        st["Pid"] = json!(pid);
        st["PidStart"] = json!(sys::process_start(pid));
        st["NsPid"] = json!(ns.id());
        st["MonitorPid"] = json!(std::process::id());
        st["MonitorStart"] = json!(sys::process_start(std::process::id() as i64));
        st["StartedAt"] = json!(crate::time::now());
        c.set_state(&st)?;
        if execd {
            // The CLI waits for this: the container runs, and nothing more will be said.
            err_echo.off();
            if let Ok(null) = File::options().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stderr(null.as_fd());
            }
        }
    }
    let status = ns
        .wait()
        .map_err(|e| Error::io("wait for the container", &c.dir, e))?;
    for p in pumps {
        let _ = p.join();
    }
    drop(_raw);
    let code = super::exit_code(status);
    if let Ok(msg) = std::fs::read_to_string(&start_error) {
        let mut st = super::new_state("created");
        st["Error"] = json!(msg);
        st["ExitCode"] = json!(code);
        c.set_state(&st)?;
        // The first process said why on stderr already.
        return Ok(code);
    }
    if started.is_none() {
        return Err(Error::Invalid(format!(
            "the container's namespaces could not be set up (exit code {code}); see its log"
        )));
    }
    st["Status"] = json!("exited");
    st["ExitCode"] = json!(code);
    st["FinishedAt"] = json!(crate::time::now());
    c.set_state(&st)?;
    Ok(code)
}
