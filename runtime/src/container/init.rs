//! `strata __child DIR`: pid 1 of the container's PID namespace, started by the monitor.
//!
//! In a mount namespace of its own (so `pivot_root` leaves the monitor's root alone) it mounts
//! `/proc`, a minimal `/dev` and `/sys` (read-only), the container's volumes, binds and tmpfs
//! mounts, and `/etc/hostname` and `/etc/hosts`; then it `pivot_root`s into the rootfs, drops
//! capabilities to Docker's default set, sets no_new_privs, changes user and directory, and
//! execs the command.

use std::os::fd::AsFd;
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

fn bind_file(src: &Path, dst: &Path) -> Result<()> {
    if !dst.exists() {
        std::fs::write(dst, b"").map_err(|e| Error::io("create mount point", dst, e))?;
    }
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(nix_err("bind mount", dst))
}

pub(super) fn user_ids(rootfs: &Path, user: &str) -> Result<(u32, u32)> {
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
///
/// A failure before the command runs is also written to `DIR/start-error` (through a dir fd
/// opened before `pivot_root` hides `DIR`), so the monitor can tell "could not start" from
/// "ran and exited".
pub fn child_main(dir: &Path) -> Error {
    let dir_fd = std::fs::File::open(dir).ok();
    let e = match child_setup(dir) {
        Ok(cmd) => {
            let mut cmd = cmd;
            let e = cmd.exec();
            Error::io("exec", Path::new(cmd.get_program()), e)
        }
        Err(e) => e,
    };
    if let Some(d) = dir_fd {
        use std::os::fd::AsRawFd;
        // /proc/self/fd/N reaches DIR whatever the root is now.
        let p = format!("/proc/self/fd/{}/start-error", d.as_raw_fd());
        if std::fs::write(&p, e.to_string()).is_err() {
            // /proc may be the container's now; that one shows this process too.
            let _ = std::fs::write(
                format!(
                    "/proc/{}/fd/{}/start-error",
                    std::process::id(),
                    d.as_raw_fd()
                ),
                e.to_string(),
            );
        }
    }
    e
}

/// The path `inside` (absolute, in the container) resolved below `rootfs` the way the
/// container will see it: symlinks are followed but can never leave `rootfs` (an absolute
/// target restarts at `rootfs`, `..` stops there). The result holds no symlink, so creating
/// directories along it cannot touch the host. Missing components are kept as given.
pub(super) fn resolve_in_root(rootfs: &Path, inside: &str) -> Result<std::path::PathBuf> {
    let mut todo: Vec<String> = inside
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .rev()
        .map(String::from)
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(comp) = todo.pop() {
        if comp == ".." {
            done.pop();
            continue;
        }
        let here: std::path::PathBuf = done
            .iter()
            .fold(rootfs.to_path_buf(), |p, c| p.join(c))
            .join(&comp);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(Error::io(
                        "resolve",
                        &here,
                        std::io::Error::from_raw_os_error(libc::ELOOP),
                    ));
                }
                let target =
                    std::fs::read_link(&here).map_err(|e| Error::io("read link", &here, e))?;
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    done.clear();
                }
                todo.extend(
                    t.split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .rev()
                        .map(String::from),
                );
            }
            _ => done.push(comp),
        }
    }
    Ok(done.iter().fold(rootfs.to_path_buf(), |p, c| p.join(c)))
}

/// True when `dir` is an empty directory (or missing).
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut it| it.next().is_none())
}

/// The container's volumes, binds and tmpfs mounts, parents before children.
fn mount_binds(cfg: &serde_json::Value, rootfs: &Path) -> Result<()> {
    let mut binds = cfg["Binds"].as_array().cloned().unwrap_or_default();
    binds.sort_by_key(|b| {
        b["Destination"]
            .as_str()
            .map_or(0, |d| d.matches('/').count())
    });
    for b in binds {
        let kind = b["Type"].as_str().unwrap_or_default();
        let dest = b["Destination"].as_str().unwrap_or_default();
        let source = Path::new(b["Source"].as_str().unwrap_or_default());
        let target = resolve_in_root(rootfs, dest)?;
        let file_bind = kind == "bind" && !source.is_dir();
        if file_bind {
            if let Some(p) = target.parent() {
                std::fs::create_dir_all(p).map_err(|e| Error::io("create mount point", p, e))?;
            }
            if !target.exists() {
                std::fs::write(&target, b"")
                    .map_err(|e| Error::io("create mount point", &target, e))?;
            }
        } else {
            // An empty volume mounted over image content is filled from it first (Docker).
            if kind == "volume"
                && !b["NoCopy"].as_bool().unwrap_or(false)
                && target.is_dir()
                && !is_empty_dir(&target)
                && is_empty_dir(source)
            {
                strata_overlay::tree::copy_tree(&target, source)?;
            }
            std::fs::create_dir_all(&target)
                .map_err(|e| Error::io("create mount point", &target, e))?;
        }
        let ro = b["ReadOnly"].as_bool().unwrap_or(false);
        if kind == "tmpfs" {
            let opts = b["Options"].as_str().unwrap_or_default();
            let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            let mut data = Vec::new();
            for o in opts.split(',').filter(|o| !o.is_empty()) {
                match o {
                    "exec" => flags.remove(MsFlags::MS_NOEXEC),
                    "suid" => flags.remove(MsFlags::MS_NOSUID),
                    "dev" => flags.remove(MsFlags::MS_NODEV),
                    "noexec" | "nosuid" | "nodev" | "rw" => {}
                    "ro" => flags |= MsFlags::MS_RDONLY,
                    other => data.push(other),
                }
            }
            if ro {
                flags |= MsFlags::MS_RDONLY;
            }
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                flags,
                Some(data.join(",").as_str()),
            )
            .map_err(nix_err("mount tmpfs", &target))?;
            continue;
        }
        mount(
            Some(source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(nix_err("bind mount", &target))?;
        if ro {
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
            mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
                .map_err(nix_err("remount read-only", &target))?;
        }
    }
    Ok(())
}

fn child_setup(dir: &Path) -> Result<Command> {
    let cfg = read_json(&dir.join("config.json"))?;
    let rootfs = dir.join("rootfs");
    // A mount namespace of its own: pivot_root moves every process of a namespace that sits
    // at its root, and the monitor must keep the host's.
    unshare(CloneFlags::CLONE_NEWNS).map_err(nix_err("unshare the mount namespace", dir))?;
    sys::default_signals(&[libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGPIPE]);
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| Error::io("create", p, e));
    let proc_dir = rootfs.join("proc");
    mkdir(&proc_dir)?;
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount(Some("proc"), &proc_dir, Some("proc"), nodev, None::<&str>)
        .map_err(nix_err("mount /proc", &proc_dir))?;
    let sys_dir = rootfs.join("sys");
    mkdir(&sys_dir)?;
    match mount(
        Some("sysfs"),
        &sys_dir,
        Some("sysfs"),
        nodev | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        // Rootless with the host's network: sysfs needs a network namespace of our own, so
        // the host's /sys is bound instead (read-only), as rootless runc does.
        Err(nix::errno::Errno::EPERM) => {
            mount(
                Some("/sys"),
                &sys_dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(nix_err("bind /sys", &sys_dir))?;
            let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | nodev;
            let _ = mount(None::<&str>, &sys_dir, None::<&str>, flags, None::<&str>);
        }
        r => r.map_err(nix_err("mount /sys", &sys_dir))?,
    }
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
    mount_binds(&cfg, &rootfs)?;
    let etc = resolve_in_root(&rootfs, "/etc")?;
    if etc.is_dir() {
        // Resolved in the root: an image's /etc/hosts may be a symlink, which must not lead
        // the bind mount out of the container.
        bind_file(
            &dir.join("hostname"),
            &resolve_in_root(&rootfs, "/etc/hostname")?,
        )?;
        bind_file(&dir.join("hosts"), &resolve_in_root(&rootfs, "/etc/hosts")?)?;
        if cfg["Network"] == "host" && Path::new("/etc/resolv.conf").exists() {
            bind_file(
                Path::new("/etc/resolv.conf"),
                &resolve_in_root(&rootfs, "/etc/resolv.conf")?,
            )?;
        }
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
    if cfg["Tty"].as_bool().unwrap_or(false) {
        // A terminal of the container's own devpts (so it exists by name inside), its master
        // handed to the monitor over stdin, the slave made our stdio and controlling terminal.
        let (master, slave) = super::stdio::open_pty()?;
        super::stdio::send_fd(std::io::stdin(), &master)?;
        drop(master);
        let err = |e: nix::Error| Error::io("attach the terminal", Path::new("/dev/pts"), e.into());
        nix::unistd::dup2_stdin(&slave).map_err(err)?;
        nix::unistd::dup2_stdout(&slave).map_err(err)?;
        nix::unistd::dup2_stderr(&slave).map_err(err)?;
        drop(slave);
        nix::unistd::setsid().map_err(nix_err("start a session", dir))?;
        sys::set_controlling_tty(std::io::stdin().as_fd())
            .map_err(|e| Error::io("set the controlling terminal", dir, e))?;
    }
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
    let args = super::strings(&cfg["Args"]);
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]).env_clear().current_dir(&workdir);
    for e in super::strings(&cfg["Env"]) {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if (uid, gid) != (0, 0) {
        match nix::unistd::setgroups(&[]) {
            Err(nix::errno::Errno::EPERM) if strata_overlay::probe::in_user_namespace() => {
                return Err(Error::Invalid(format!(
                    "user {uid}:{gid} does not exist in this rootless container: only root (the caller's own id) is mapped"
                )));
            }
            r => r.map_err(nix_err("setgroups", Path::new("/")))?,
        }
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}
