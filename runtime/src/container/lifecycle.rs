//! Starting, stopping, signalling, waiting for and removing containers.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Container, Status};
use crate::image::Images;
use crate::{Error, Result, volume};

/// Starts container `c`. Attached, it runs in the foreground with the terminal's stdio and
/// the container's exit code is returned; detached, this returns once the container runs
/// (`None`), or with the error that kept it from starting. A running container is left as is.
pub fn start(c: &Container, attach: bool) -> Result<Option<i32>> {
    if c.status()? == Status::Running {
        return Ok(None);
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("find own binary", &c.dir, e))?;
    let mut cmd = Command::new(exe);
    if attach {
        cmd.arg("__init").arg(&c.dir);
        let status = cmd
            .status()
            .map_err(|e| Error::io("start the container monitor", &c.dir, e))?;
        return Ok(Some(super::exit_code(status)));
    }
    cmd.arg("__start")
        .arg(&c.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("start the container monitor", &c.dir, e))?;
    // The monitor closes its stderr once the container runs, or dies saying why it can't.
    let mut said = String::new();
    let _ = child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut said);
    // Said something and not running: it failed to start (the state says "created").
    if !said.trim().is_empty() && c.status()? == Status::Created {
        let _ = child.wait();
        return Err(Error::Invalid(
            said.trim().trim_start_matches("strata: ").to_string(),
        ));
    }
    Ok(None)
}

fn signal(pid: i64, sig: Signal) -> Result<()> {
    match nix::sys::signal::kill(Pid::from_raw(pid as i32), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(Error::io("signal", format!("pid {pid}"), e.into())),
    }
}

/// Waits until `c` no longer runs, up to `limit`; true if it stopped.
fn wait_stopped(c: &Container, limit: Duration) -> Result<bool> {
    let t = Instant::now();
    loop {
        if c.status()? != Status::Running {
            return Ok(true);
        }
        if t.elapsed() >= limit {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `strata stop`: SIGTERM (or the image's StopSignal), then SIGKILL after `timeout`. A container
/// that is not running is no error, as in Docker.
pub fn stop(c: &Container, timeout: Duration) -> Result<()> {
    let Some(pid) = c.pid()? else {
        return Ok(());
    };
    signal(pid, Signal::SIGTERM)?;
    if !wait_stopped(c, timeout)? {
        if let Some(pid) = c.pid()? {
            signal(pid, Signal::SIGKILL)?;
        }
        if !wait_stopped(c, Duration::from_secs(10))? {
            return Err(Error::Conflict(format!(
                "container {} did not stop after SIGKILL",
                c.name()
            )));
        }
    }
    // The monitor records the exit just after the process is gone: give it that moment.
    let t = Instant::now();
    while c.state()?["Status"] == "running" && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `strata kill`: sends `sig` (a name like `KILL`/`SIGTERM` or a number) to the container.
pub fn kill(c: &Container, sig: &str) -> Result<()> {
    let s = parse_signal(sig)?;
    let Some(pid) = c.pid()? else {
        return Err(Error::Conflict(format!(
            "cannot kill container {}: container is not running",
            c.name()
        )));
    };
    signal(pid, s)
}

/// A signal by name (`KILL`, `SIGKILL`) or number.
pub fn parse_signal(s: &str) -> Result<Signal> {
    let bad = || Error::Invalid(format!("invalid signal: {s}"));
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<Signal>().map_err(|_| bad())
}

/// `strata wait`: blocks until `c` has run and exited; returns its exit code.
pub fn wait(c: &Container) -> Result<i64> {
    let mut gone_since: Option<Instant> = None;
    loop {
        let st = c.state()?;
        if let Status::Exited(code) = super::status_of(&st) {
            // The process is gone; the monitor records the exit a moment later, unless it
            // was killed itself (then the code is SIGKILL's).
            if st["Status"] == "exited"
                || gone_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2)
            {
                return Ok(code);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a container being removed by this process goes: `ROOT/containers/.removing-PID-ID`.
fn removing_dir(root: &Path, id: &str) -> std::path::PathBuf {
    root.join("containers")
        .join(format!(".removing-{}-{id}", std::process::id()))
}

/// Removes what is left of container `id` once its directory was renamed to `gone`: its
/// snapshots, then the directory.
pub fn finish_removal(images: &mut Images, id: &str, gone: &Path) -> Result<()> {
    let snap = images.snapshotter()?;
    for key in [format!("ctr-{id}"), format!("ctr-{id}-init-active")] {
        match snap.remove(&key) {
            Ok(()) | Err(strata_snapshotter::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::remove_dir_all(gone).map_err(|e| Error::io("remove", gone, e))
}

/// Removes container `c`: refused while it runs unless `force` (then it is killed first).
/// With `volumes`, its anonymous volumes go too.
pub fn remove(
    images: &mut Images,
    root: &Path,
    c: &Container,
    force: bool,
    volumes: bool,
) -> Result<()> {
    if c.status()? == Status::Running {
        if !force {
            return Err(Error::Conflict(format!(
                "cannot remove container \"/{}\": container is running: stop the container before removing or force remove",
                c.name()
            )));
        }
        if let Some(pid) = c.pid()? {
            signal(pid, Signal::SIGKILL)?;
        }
        if !wait_stopped(c, Duration::from_secs(10))? {
            return Err(Error::Conflict(format!(
                "container {} did not stop after SIGKILL",
                c.name()
            )));
        }
    }
    let cfg = c.config().unwrap_or_default();
    let _ = strata_overlay::mount::unmount(&c.dir.join("rootfs"), true);
    // The container disappears first, in one rename: a kill from here on leaves a
    // `.removing-PID-ID` dir that the next command finishes removing (Images::sweep_stale),
    // never a container whose writable layer is gone.
    let gone = removing_dir(root, &c.id);
    std::fs::rename(&c.dir, &gone).map_err(|e| Error::io("rename away", &c.dir, e))?;
    finish_removal(images, &c.id, &gone)?;
    if volumes {
        for b in cfg["Binds"].as_array().cloned().unwrap_or_default() {
            if b["Type"] == "volume" && b["Anonymous"].as_bool().unwrap_or(false) {
                if let Some(name) = b["Name"].as_str() {
                    // In use by another container (--volumes-from style sharing): it stays.
                    let _ = volume::remove(root, name, true);
                }
            }
        }
    }
    Ok(())
}
