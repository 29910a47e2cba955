//! `strata run`: a container from an image, in the foreground.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use super::{Container, find, new_state, write_json};
use crate::image::Images;
use crate::{Error, Result};

/// What `strata run` was asked for.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Image reference or ID.
    pub image: String,
    /// Command and arguments (replacing the image's Cmd).
    pub cmd: Vec<String>,
    /// Container name.
    pub name: Option<String>,
    /// Remove the container when it exits.
    pub rm: bool,
    /// `KEY=VALUE` (or `KEY`, taken from this environment).
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Entrypoint override.
    pub entrypoint: Option<String>,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// `uid[:gid]` or a user name from the image's /etc/passwd.
    pub user: Option<String>,
}

fn random_id() -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("read", "/dev/urandom", e))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// Runs a container in the foreground and returns its exit code (128 + signal when killed).
pub fn run(images: &mut Images, root: &Path, o: &RunOptions) -> Result<i32> {
    let img = images.store.resolve(&o.image)?;
    let parsed = images.parse(&img)?;
    let chains = Images::chains(&parsed)?;
    let top = chains
        .last()
        .ok_or_else(|| Error::Invalid(format!("image {} has no layers", o.image)))?
        .to_string();
    if let Some(name) = &o.name {
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            || name.is_empty()
        {
            return Err(Error::Invalid(format!(
                "invalid container name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )));
        }
        if let Ok(c) = find(root, name) {
            return Err(Error::Conflict(format!(
                "the container name {name:?} is already in use by container {}: remove it or pick another name",
                c.id
            )));
        }
    }
    let cfg = parsed.config.config().clone().unwrap_or_default();
    let entrypoint: Vec<String> = match &o.entrypoint {
        Some(e) => vec![e.clone()],
        None => cfg.entrypoint().clone().unwrap_or_default(),
    };
    let cmd: Vec<String> = if !o.cmd.is_empty() {
        o.cmd.clone()
    } else if o.entrypoint.is_some() {
        Vec::new()
    } else {
        cfg.cmd().clone().unwrap_or_default()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(Error::Invalid(
            "no command specified: the image has neither Entrypoint nor Cmd".into(),
        ));
    }
    let id = random_id()?;
    let hostname = o.hostname.clone().unwrap_or_else(|| id[..12].to_string());
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    for e in cfg
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(o.env.iter().cloned())
    {
        match e.split_once('=') {
            Some((k, v)) => {
                env.insert(k.into(), v.into());
            }
            None => {
                if let Ok(v) = std::env::var(&e) {
                    env.insert(e, v);
                }
            }
        }
    }
    env.insert("HOSTNAME".into(), hostname.clone());
    let workdir = o
        .workdir
        .clone()
        .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    let user = o
        .user
        .clone()
        .or_else(|| cfg.user().clone().filter(|u| !u.is_empty()));

    let dir = root.join("containers").join(&id);
    std::fs::create_dir_all(dir.join("rootfs")).map_err(|e| Error::io("create", &dir, e))?;
    let c = Container {
        id: id.clone(),
        dir: dir.clone(),
    };
    let result = (|| -> Result<i32> {
        std::fs::write(dir.join("hostname"), format!("{hostname}\n"))
            .map_err(|e| Error::io("write", dir.join("hostname"), e))?;
        std::fs::write(dir.join("hosts"), format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"))
            .map_err(|e| Error::io("write", dir.join("hosts"), e))?;
        let snap = images.snapshotter()?;
        // A read-only root is mounted read-write first (the mount points for /proc, /dev and
        // /sys may need creating) and remounted read-only before pivot_root, as runc does.
        let init = init_layer(snap, &c, &top)?;
        let mounts = snap.prepare(&c.snapshot_key(), &init, Default::default())?;
        let mounts_json: Vec<_> = mounts
            .iter()
            .map(|m| json!({ "Type": m.kind, "Source": m.source, "Options": m.options }))
            .collect();
        let name = o
            .name
            .clone()
            .unwrap_or_else(|| format!("strata_{}", &id[..8]));
        write_json(
            &dir.join("config.json"),
            &json!({
                "Id": id, "Name": name, "Image": o.image, "ImageId": img.config.to_string(), "Args": args, "Env": env,
                "WorkingDir": workdir, "Hostname": hostname, "User": user, "ReadOnly": o.read_only, "Rm": o.rm,
                "Mounts": mounts_json, "Created": now(),
            }),
        )?;
        c.set_state(&new_state("created"))?;
        let exe = std::env::current_exe()
            .map_err(|e| Error::io("find own binary", "/proc/self/exe", e))?;
        let mut child = Command::new(exe)
            .arg("__init")
            .arg(&dir)
            .spawn()
            .map_err(|e| Error::io("start container", &dir, e))?;
        let mut st = new_state("running");
        st["Pid"] = json!(child.id());
        st["StartedAt"] = json!(now());
        c.set_state(&st)?;
        let status = child
            .wait()
            .map_err(|e| Error::io("wait for container", &dir, e))?;
        let code = super::exit_code(status);
        st["Status"] = json!("exited");
        st["ExitCode"] = json!(code);
        st["FinishedAt"] = json!(now());
        c.set_state(&st)?;
        Ok(code)
    })();
    if o.rm || result.is_err() {
        remove(images, &c)?;
    }
    result
}

/// Docker's init layer: the mount points a container needs (`/proc`, `/sys`, `/dev`,
/// `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`) are made in a layer of their own between
/// the image and the container's writable layer, so they never show in `diff`, `commit` or
/// `ps -s`. They are made through a mounted view, so directories copied up keep the image's
/// metadata. The layer depends only on the image, so one per image top layer
/// (`init-<chain>`) serves every container of it; it is made on first use.
fn init_layer(
    snap: &strata_snapshotter::Snapshotter,
    c: &Container,
    image_top: &str,
) -> Result<String> {
    let name = format!("init-{}", image_top.trim_start_matches("sha256:"));
    if snap.stat(&name).is_ok() {
        return Ok(name);
    }
    let key = format!("{}-init-active", c.snapshot_key());
    let mounts = snap.prepare(&key, image_top, Default::default())?;
    let at = c.dir.join("init");
    let made = (|| -> Result<()> {
        std::fs::create_dir_all(&at).map_err(|e| Error::io("create", &at, e))?;
        mounts[0].mount(&at)?;
        let populate = (|| -> std::io::Result<()> {
            for d in ["proc", "sys", "dev"] {
                if std::fs::symlink_metadata(at.join(d)).is_err() {
                    std::fs::create_dir(at.join(d))?;
                }
            }
            if at.join("etc").is_dir() && !at.join("etc").is_symlink() {
                for f in ["hostname", "hosts", "resolv.conf"] {
                    if std::fs::symlink_metadata(at.join("etc").join(f)).is_err() {
                        std::fs::write(at.join("etc").join(f), b"")?;
                    }
                }
            }
            Ok(())
        })();
        strata_overlay::mount::unmount(&at, false)?;
        populate.map_err(|e| Error::io("create mount points", &at, e))?;
        match snap.commit(&name, &key, Default::default(), None) {
            // Another run made it meanwhile: use theirs.
            Err(strata_snapshotter::Error::AlreadyExists(_)) => {
                let _ = snap.remove(&key);
                Ok(())
            }
            r => r.map_err(Error::from),
        }
    })();
    let _ = std::fs::remove_dir(&at);
    if let Err(e) = made {
        let _ = snap.remove(&key);
        return Err(e);
    }
    Ok(name)
}

/// Removes a container that is not running: its snapshot and its directory.
pub fn remove(images: &mut Images, c: &Container) -> Result<()> {
    let _ = strata_overlay::mount::unmount(&c.dir.join("rootfs"), true);
    let snap = images.snapshotter()?;
    for key in [
        c.snapshot_key(),
        format!("{}-init", c.snapshot_key()),
        format!("{}-init-active", c.snapshot_key()),
    ] {
        match snap.remove(&key) {
            Ok(()) | Err(strata_snapshotter::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::remove_dir_all(&c.dir).map_err(|e| Error::io("remove", &c.dir, e))
}
