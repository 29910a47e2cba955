//! Volumes: named and anonymous directories that live outside the copy-on-write layers and
//! outlive the containers that mount them.
//!
//! ```text
//! ROOT/volumes/<name>/_data        the volume's contents (mounted into containers)
//! ROOT/volumes/<name>/volume.json  name, creation time, labels, anonymous or not
//! ```
//! Anonymous volumes (from `-v /path` or an image's `Volumes`) get a random 64-hex name and
//! go with `rm -v` of their container, as in Docker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::container::{read_json, write_json};
use crate::{Error, Result};

/// One volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Its name.
    pub name: String,
    /// Its directory (`_data` holds the contents).
    pub dir: PathBuf,
    /// Its record.
    pub meta: Value,
}

impl Volume {
    /// The directory mounted into containers.
    pub fn data(&self) -> PathBuf {
        self.dir.join("_data")
    }

    /// True for an anonymous volume.
    pub fn anonymous(&self) -> bool {
        self.meta["Anonymous"].as_bool().unwrap_or(false)
    }

    /// Bytes used by its contents.
    pub fn size(&self) -> u64 {
        strata_overlay::tree::usage(&self.data())
            .map(|(b, _)| b)
            .unwrap_or(0)
    }

    /// Docker's `volume inspect` document.
    pub fn inspect(&self) -> Value {
        json!({
            "CreatedAt": self.meta["CreatedAt"], "Driver": "local", "Labels": self.meta["Labels"],
            "Mountpoint": self.data(), "Name": self.name, "Options": {}, "Scope": "local",
            "Anonymous": self.anonymous(),
        })
    }
}

fn dir(root: &Path) -> PathBuf {
    root.join("volumes")
}

/// Checks a volume name as Docker does: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn check_name(name: &str) -> Result<()> {
    if crate::container::create::is_docker_name(name) && name.len() >= 2 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid volume name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at least 2 characters"
        )))
    }
}

/// The volume `name`.
pub fn get(root: &Path, name: &str) -> Result<Volume> {
    let d = dir(root).join(name);
    if check_name(name).is_err() || !d.join("volume.json").is_file() {
        return Err(Error::NotFound(format!("no such volume: {name}")));
    }
    Ok(Volume {
        name: name.into(),
        meta: read_json(&d.join("volume.json"))?,
        dir: d,
    })
}

/// Creates volume `name` (a random name when `None`, for anonymous volumes); an existing
/// named volume is returned as it is, as `docker volume create` does.
pub fn create(root: &Path, name: Option<&str>, labels: BTreeMap<String, String>) -> Result<Volume> {
    let anonymous = name.is_none();
    let name = match name {
        Some(n) => {
            check_name(n)?;
            if let Ok(v) = get(root, n) {
                return Ok(v);
            }
            n.to_string()
        }
        None => crate::container::create::random_id()?,
    };
    let base = dir(root);
    std::fs::create_dir_all(&base).map_err(|e| Error::io("create", &base, e))?;
    // Made in a temp dir and renamed into place: a volume either exists whole or not at all.
    let tmp = base.join(format!(".new-{name}-{}", std::process::id()));
    let made = (|| -> Result<()> {
        std::fs::create_dir_all(tmp.join("_data")).map_err(|e| Error::io("create", &tmp, e))?;
        write_json(
            &tmp.join("volume.json"),
            &json!({ "Name": name, "CreatedAt": crate::time::now(), "Labels": labels, "Anonymous": anonymous }),
        )?;
        match std::fs::rename(&tmp, base.join(&name)) {
            Ok(()) => Ok(()),
            // Made by someone else meanwhile: theirs stands.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    || e.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io("rename into place", base.join(&name), e)),
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    made?;
    get(root, &name)
}

/// Every volume.
pub fn list(root: &Path) -> Result<Vec<Volume>> {
    let d = dir(root);
    let mut out = Vec::new();
    match std::fs::read_dir(&d) {
        Ok(it) => {
            for e in it {
                let e = e.map_err(|e| Error::io("read dir", &d, e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if let Ok(v) = get(root, &name) {
                    out.push(v);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("read dir", &d, e)),
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The containers (ids) whose config mounts volume `name`.
pub fn users(root: &Path, name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for c in crate::container::list(root)? {
        let cfg = c.config()?;
        let uses = cfg["Binds"]
            .as_array()
            .is_some_and(|b| b.iter().any(|m| m["Type"] == "volume" && m["Name"] == name));
        if uses {
            out.push(c.id);
        }
    }
    Ok(out)
}

/// Removes volume `name`; refused while a container (running or not) uses it. With `force` a
/// missing volume is no error (as `docker volume rm -f`).
pub fn remove(root: &Path, name: &str, force: bool) -> Result<()> {
    let v = match get(root, name) {
        Ok(v) => v,
        Err(Error::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e),
    };
    let users = users(root, name)?;
    if !users.is_empty() {
        return Err(Error::Conflict(format!(
            "remove {name}: volume is in use - [{}]",
            users.join(", ")
        )));
    }
    // Renamed away first, so a crash mid-delete never leaves a half volume under its name.
    let gone = dir(root).join(format!(".rm-{name}-{}", std::process::id()));
    std::fs::rename(&v.dir, &gone).map_err(|e| Error::io("remove", &v.dir, e))?;
    std::fs::remove_dir_all(&gone).map_err(|e| Error::io("remove", &gone, e))
}

/// Removes volumes no container uses: anonymous ones, or all with `all`. Returns the names
/// and the bytes reclaimed.
pub fn prune(root: &Path, all: bool) -> Result<(Vec<String>, u64)> {
    let mut names = Vec::new();
    let mut bytes = 0;
    for v in list(root)? {
        if (all || v.anonymous()) && users(root, &v.name)?.is_empty() {
            bytes += v.size();
            remove(root, &v.name, false)?;
            names.push(v.name);
        }
    }
    Ok((names, bytes))
}
