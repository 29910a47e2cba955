//! The two stages inside a container, run by re-executing `strata`:
//!
//! - `__init DIR` enters new mount, UTS, IPC and network namespaces, unshares the PID
//!   namespace for its children, makes every mount private, mounts the snapshot on `rootfs`,
//!   sets the hostname, brings up loopback, starts `__child` and waits for it;
//! - `__child DIR`, pid 1 of the new PID namespace, mounts `/proc`, a minimal `/dev` and
//!   `/sys` (read-only), binds `/etc/hostname` and `/etc/hosts`, `pivot_root`s into the
//!   rootfs, drops capabilities to Docker's default set, sets no_new_privs, changes user and
//!   directory, and execs the command.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

use super::{DEFAULT_CAPS, read_json};
use crate::{Error, Result, sys};

fn nix_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> Error + 'a {
    move |e| Error::io(op, path, e.into())
}

/// `strata __init DIR`: returns the container's exit code.
pub fn init_main(dir: &Path) -> Result<i32> {
    let cfg = read_json(&dir.join("config.json"))?;
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID,
    )
    .map_err(nix_err("unshare namespaces", dir))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(nix_err("make mounts private", Path::new("/")))?;
    let rootfs = dir.join("rootfs");
    for m in cfg["Mounts"].as_array().cloned().unwrap_or_default() {
        let mnt = strata_overlay::Mount {
            kind: m["Type"].as_str().unwrap_or_default().into(),
            source: m["Source"].as_str().unwrap_or_default().into(),
            options: m["Options"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        };
        mnt.mount(&rootfs)?;
    }
    nix::unistd::sethostname(cfg["Hostname"].as_str().unwrap_or("strata"))
        .map_err(nix_err("set hostname", dir))?;
    sys::loopback_up().map_err(|e| Error::io("bring up loopback", dir, e))?;
    let exe = std::env::current_exe().map_err(|e| Error::io("find own binary", dir, e))?;
    let status = Command::new(exe)
        .arg("__child")
        .arg(dir)
        .status()
        .map_err(|e| Error::io("start pid 1", dir, e))?;
    Ok(super::exit_code(status))
}

fn bind_file(src: &Path, dst: &Path) -> Result<()> {
    if !dst.exists() {
        std::fs::write(dst, b"").map_err(|e| Error::io("create mount point", dst, e))?;
    }
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(nix_err("bind mount", dst))
}

fn user_ids(rootfs: &Path, user: &str) -> Result<(u32, u32)> {
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let find = |text: &str, name: &str, field: usize| {
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name))
                .then(|| f.get(field).and_then(|v| v.parse::<u32>().ok()))
                .flatten()
        })
    };
    let uid = u
        .parse::<u32>()
        .ok()
        .or_else(|| find(&passwd, u, 2))
        .ok_or_else(|| {
            Error::NotFound(format!(
                "unable to find user {u}: no matching entries in passwd file"
            ))
        })?;
    let gid = match g {
        Some(g) => g
            .parse::<u32>()
            .ok()
            .or_else(|| find(&group, g, 2))
            .ok_or_else(|| Error::NotFound(format!("unable to find group {g}")))?,
        None => passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.get(2).and_then(|v| v.parse::<u32>().ok()) == Some(uid))
                    .then(|| f.get(3).and_then(|v| v.parse().ok()))
                    .flatten()
            })
            .unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// `strata __child DIR`: sets up the root and execs the command; returns only on error.
pub fn child_main(dir: &Path) -> Error {
    match child_setup(dir) {
        Ok(cmd) => {
            let mut cmd = cmd;
            let e = cmd.exec();
            Error::io("exec", Path::new(cmd.get_program()), e)
        }
        Err(e) => e,
    }
}

fn child_setup(dir: &Path) -> Result<Command> {
    let cfg = read_json(&dir.join("config.json"))?;
    let rootfs = dir.join("rootfs");
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| Error::io("create", p, e));
    let proc_dir = rootfs.join("proc");
    mkdir(&proc_dir)?;
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount(Some("proc"), &proc_dir, Some("proc"), nodev, None::<&str>)
        .map_err(nix_err("mount /proc", &proc_dir))?;
    let sys_dir = rootfs.join("sys");
    mkdir(&sys_dir)?;
    mount(
        Some("sysfs"),
        &sys_dir,
        Some("sysfs"),
        nodev | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(nix_err("mount /sys", &sys_dir))?;
    let dev = rootfs.join("dev");
    mkdir(&dev)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(nix_err("mount /dev", &dev))?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        bind_file(&Path::new("/dev").join(n), &dev.join(n))?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(nix_err("mount /dev/pts", &pts))?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        nodev,
        Some("mode=1777,size=65536k"),
    )
    .map_err(nix_err("mount /dev/shm", &shm))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(|e| Error::io("create", dev.join(link), e))?;
    }
    let read_only = cfg["ReadOnly"].as_bool().unwrap_or(false);
    if rootfs.join("etc").is_dir() {
        bind_file(&dir.join("hostname"), &rootfs.join("etc/hostname"))?;
        bind_file(&dir.join("hosts"), &rootfs.join("etc/hosts"))?;
    }
    if read_only {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        mount(None::<&str>, &rootfs, None::<&str>, flags, None::<&str>)
            .map_err(nix_err("remount the root read-only", &rootfs))?;
    }
    // pivot_root(".", "."): the old root is stacked under the new one, then detached.
    nix::unistd::chdir(&rootfs).map_err(nix_err("chdir", &rootfs))?;
    nix::unistd::pivot_root(".", ".").map_err(nix_err("pivot_root", &rootfs))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(nix_err("detach the old root", Path::new("/")))?;
    nix::unistd::chdir("/").map_err(nix_err("chdir", Path::new("/")))?;
    let workdir = cfg["WorkingDir"].as_str().unwrap_or("/").to_string();
    if !read_only {
        // Docker creates a missing working directory.
        let _ = std::fs::create_dir_all(&workdir);
    }
    let (uid, gid) = match cfg["User"].as_str() {
        Some(u) => user_ids(Path::new("/"), u)?,
        None => (0, 0),
    };
    for cap in 0..=sys::last_cap() {
        if !DEFAULT_CAPS.contains(&cap) {
            sys::drop_bounding(cap).map_err(|e| Error::io("drop capability", Path::new("/"), e))?;
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(nix_err("set no_new_privs", Path::new("/")))?;
    let args: Vec<String> = cfg["Args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]).env_clear().current_dir(&workdir);
    if let Some(env) = cfg["Env"].as_object() {
        for (k, v) in env {
            cmd.env(k, v.as_str().unwrap_or_default());
        }
    }
    if (uid, gid) != (0, 0) {
        nix::unistd::setgroups(&[]).map_err(nix_err("setgroups", Path::new("/")))?;
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}
