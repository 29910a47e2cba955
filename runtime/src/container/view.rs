//! `strata export` and `strata cp`: reading and writing a container's files from the host.
//!
//! The work happens in a helper, `strata __view DIR` (request in `STRATA_VIEW`), that sees the
//! container's root at `DIR/rootfs` in a mount namespace of its own: for a running container it
//! joins the mount namespace its root is mounted in (where the container's overlay is mounted and host paths
//! are still the host's), for a stopped one it mounts the container's snapshot privately. So
//! nothing is ever mounted in the host's namespace, and a copy into a running container is seen
//! by it at once. Paths in the container resolve as the container would resolve them (symlinks
//! stay inside its root), and paths under a volume or bind mount go to the mounted directory.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use serde_json::{Value, json};
use strata_overlay::Compression;
use strata_overlay::diff::DiffOptions;

use super::{Container, Status, read_json};
use crate::{Error, Result};

fn helper(c: &Container, req: Value) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find own binary", &c.dir, e))?;
    let out = Command::new(exe)
        .arg("__view")
        .arg(&c.dir)
        .env("STRATA_VIEW", req.to_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|ch| ch.wait_with_output())
        .map_err(|e| Error::io("start the view helper", &c.dir, e))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Invalid(
            msg.trim().trim_start_matches("strata: ").to_string(),
        ));
    }
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| Error::io("find the current dir", ".", e))?;
    Ok(cwd.join(p))
}

/// `strata export`: the container's whole filesystem as one tar to `out` (`None`: stdout).
pub fn export(c: &Container, out: Option<&Path>) -> Result<()> {
    let out = out.map(absolute).transpose()?;
    helper(c, json!({ "Op": "export", "Dst": out }))
}

/// `strata cp CONTAINER:SRC DST`.
pub fn copy_out(c: &Container, src: &str, dst: &Path) -> Result<()> {
    helper(c, json!({ "Op": "out", "Src": src, "Dst": absolute(dst)? }))
}

/// `strata cp SRC CONTAINER:DST`.
pub fn copy_in(c: &Container, src: &Path, dst: &str) -> Result<()> {
    let src = absolute(src)?;
    if std::fs::symlink_metadata(&src).is_err() {
        return Err(Error::NotFound(format!(
            "could not find the file {} on the host",
            src.display()
        )));
    }
    helper(c, json!({ "Op": "in", "Src": src, "Dst": dst }))
}

/// Where container path `p` is, from the helper's namespace: under a bind or volume mount's
/// source, or in the root (resolved in it).
fn locate(cfg: &Value, rootfs: &Path, p: &str) -> Result<PathBuf> {
    let clean = format!(
        "/{}",
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect::<Vec<_>>()
            .join("/")
    );
    let mut best: Option<(&str, &str)> = None;
    for b in cfg["Binds"].as_array().into_iter().flatten() {
        let (Some(d), Some(s)) = (b["Destination"].as_str(), b["Source"].as_str()) else {
            continue;
        };
        if b["Type"] == "tmpfs" {
            continue;
        }
        let under = clean == d || clean.starts_with(&format!("{d}/"));
        if under && best.is_none_or(|(bd, _)| d.len() > bd.len()) {
            best = Some((d, s));
        }
    }
    match best {
        Some((d, s)) => super::init::resolve_in_root(Path::new(s), &clean[d.len()..]),
        None => super::init::resolve_in_root(rootfs, &clean),
    }
}

fn copy_any(src: &Path, dst: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(src).map_err(|e| Error::io("stat", src, e))?;
    // `cp -a` rules: into an existing directory under the source's name, else to the name.
    let dst = if dst.is_dir() {
        dst.join(src.file_name().unwrap_or_default())
    } else {
        dst.to_path_buf()
    };
    if m.is_dir() {
        strata_overlay::tree::copy_tree(src, &dst)?;
    } else if m.file_type().is_symlink() {
        let t = std::fs::read_link(src).map_err(|e| Error::io("read link", src, e))?;
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(t, &dst).map_err(|e| Error::io("create symlink", &dst, e))?;
    } else {
        std::fs::copy(src, &dst).map_err(|e| Error::io("copy to", &dst, e))?;
        let _ = std::os::unix::fs::lchown(
            &dst,
            Some(std::os::unix::fs::MetadataExt::uid(&m)),
            Some(std::os::unix::fs::MetadataExt::gid(&m)),
        );
    }
    Ok(())
}

/// `strata __view DIR`.
pub fn view_main(dir: &Path) -> Result<()> {
    let req: Value = serde_json::from_str(&std::env::var("STRATA_VIEW").unwrap_or_default())
        .map_err(|e| Error::Invalid(format!("STRATA_VIEW: {e}")))?;
    let cfg = read_json(&dir.join("config.json"))?;
    let c = Container {
        id: cfg["Id"].as_str().unwrap_or_default().to_string(),
        dir: dir.to_path_buf(),
    };
    let rootfs = dir.join("rootfs");
    let monitor = c.state()?["NsPid"].as_i64().unwrap_or(0);
    if c.status()? == Status::Running && monitor > 0 {
        crate::rootless::join_user_ns_of(monitor)?;
        let p = format!("/proc/{monitor}/ns/mnt");
        let f = File::open(&p).map_err(|e| Error::io("open namespace", &p, e))?;
        setns(f.as_fd(), CloneFlags::CLONE_NEWNS)
            .map_err(|e| Error::io("join namespace", &p, e.into()))?;
    } else {
        if crate::rootless::needed() {
            crate::rootless::enter()?;
        }
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(|e| Error::io("unshare the mount namespace", dir, e.into()))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| Error::io("make mounts private", "/", e.into()))?;
        for m in cfg["Mounts"].as_array().into_iter().flatten() {
            strata_overlay::Mount {
                kind: m["Type"].as_str().unwrap_or_default().into(),
                source: m["Source"].as_str().unwrap_or_default().into(),
                options: super::strings(&m["Options"]),
            }
            .mount(&rootfs)?;
        }
    }
    match req["Op"].as_str() {
        Some("export") => {
            let empty = dir.join(format!("export-{}", std::process::id()));
            std::fs::create_dir_all(&empty).map_err(|e| Error::io("create", &empty, e))?;
            let opts = DiffOptions {
                compression: Compression::None,
                threads: 0,
                lowers: Vec::new(),
            };
            let r = match req["Dst"].as_str() {
                Some(p) => {
                    let tmp = PathBuf::from(format!("{p}.partial-{}", std::process::id()));
                    let f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
                    let w = std::io::BufWriter::with_capacity(1 << 20, f);
                    let r = strata_overlay::diff::generic(&empty, &rootfs, w, &opts)
                        .map_err(Error::from)
                        .and_then(|(_, mut w)| {
                            w.flush().map_err(|e| Error::io("write", &tmp, e))?;
                            std::fs::rename(&tmp, p)
                                .map_err(|e| Error::io("rename into place", p, e))
                        });
                    if r.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    r
                }
                None => {
                    let w = std::io::BufWriter::new(std::io::stdout().lock());
                    strata_overlay::diff::generic(&empty, &rootfs, w, &opts)
                        .map(drop)
                        .map_err(Error::from)
                }
            };
            let _ = std::fs::remove_dir(&empty);
            r
        }
        Some("out") => {
            let src = req["Src"].as_str().unwrap_or("/");
            let from = locate(&cfg, &rootfs, src)?;
            if std::fs::symlink_metadata(&from).is_err() {
                return Err(Error::NotFound(format!(
                    "could not find the file {src} in container {}",
                    c.name()
                )));
            }
            copy_any(&from, Path::new(req["Dst"].as_str().unwrap_or(".")))
        }
        Some("in") => {
            let dst = req["Dst"].as_str().unwrap_or("/");
            let to = locate(&cfg, &rootfs, dst)?;
            let parent_ok = to.parent().is_some_and(Path::is_dir);
            if !parent_ok {
                return Err(Error::NotFound(format!(
                    "could not find the directory {} in container {}",
                    Path::new(dst).parent().unwrap_or(Path::new("/")).display(),
                    c.name()
                )));
            }
            copy_any(Path::new(req["Src"].as_str().unwrap_or_default()), &to)
        }
        _ => Err(Error::Invalid("STRATA_VIEW: unknown operation".into())),
    }
}
