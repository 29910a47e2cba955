//! `strata commit`, and what `diff` and `ps -s` need to see a container's changes.
//!
//! A commit streams the native diff of the container's upper dir once, straight into the
//! content store (gzip, hashed on the way: diffID and blob digest in the one pass). The new
//! layer's snapshot is not unpacked from that tar again, as Docker and containerd do:
//! - a stopped container's upper dir is **adopted**: the snapshotter hands the directory to the
//!   new committed snapshot in one transaction, and the container goes on with an empty upper
//!   on (an init layer over) that snapshot, so it sees the same files;
//! - a running container's upper dir is copied (`copy_file_range`, a reflink where the
//!   filesystem has them), as it keeps changing.
//!
//! Adopted layers are listed in the container's config (`Layers`), so `diff` and `ps -s` still
//! report every change since the image, as in Docker, and a later commit stacks on them.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::{Value, json};
use strata_overlay::diff::{Change, ChangeKind, DiffOptions, LowerView};
use strata_overlay::{Compression, Digest};

use super::{Container, Status};
use crate::image::{Image, Images, Reference, chain_id};
use crate::{Error, Result};

/// What `strata commit` was asked for.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The new image's name.
    pub reference: Option<Reference>,
    /// Commit message (the history entry's comment).
    pub message: Option<String>,
    /// Author.
    pub author: Option<String>,
    /// Dockerfile instructions applied to the config (`CMD ["sh"]`, `ENV A=1`, ...).
    pub changes: Vec<String>,
}

/// How a commit made the new layer's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// The stopped container's upper dir became the layer.
    Moved,
    /// The running container's upper dir was copied.
    Copied,
    /// An identical layer existed already.
    Shared,
}

/// The result of a commit.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The new image.
    pub image: Image,
    /// The new layer's diffID.
    pub diff_id: Digest,
    /// The new layer's blob size (compressed).
    pub blob_size: u64,
    /// How its snapshot was made.
    pub adoption: Adoption,
}

fn split_words(s: &str) -> Result<Vec<String>> {
    if s.trim_start().starts_with('[') {
        return serde_json::from_str::<Vec<String>>(s.trim())
            .map_err(|e| Error::Invalid(format!("{s:?}: not a JSON string array: {e}")));
    }
    Ok(vec!["/bin/sh".into(), "-c".into(), s.trim().into()])
}

/// Applies one Dockerfile instruction to an image config's `config` object.
pub(crate) fn apply_change(cfg: &mut Value, change: &str) -> Result<()> {
    let (op, arg) = change
        .trim()
        .split_once(char::is_whitespace)
        .map(|(o, a)| (o.to_ascii_uppercase(), a.trim()))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "invalid change {change:?}: expected INSTRUCTION ARGS"
            ))
        })?;
    let pairs = |arg: &str| -> Vec<(String, String)> {
        if !arg.contains('=') {
            return arg
                .split_once(char::is_whitespace)
                .map(|(k, v)| vec![(k.to_string(), v.trim().to_string())])
                .unwrap_or_default();
        }
        arg.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    };
    match op.as_str() {
        "CMD" => cfg["Cmd"] = json!(split_words(arg)?),
        "ENTRYPOINT" => cfg["Entrypoint"] = json!(split_words(arg)?),
        "WORKDIR" => cfg["WorkingDir"] = json!(arg),
        "USER" => cfg["User"] = json!(arg),
        "STOPSIGNAL" => cfg["StopSignal"] = json!(arg),
        "ENV" => {
            let mut env: Vec<String> = super::strings(&cfg["Env"]);
            for (k, v) in pairs(arg) {
                env.retain(|e| e.split('=').next() != Some(k.as_str()));
                env.push(format!("{k}={v}"));
            }
            cfg["Env"] = json!(env);
        }
        "LABEL" => {
            if !cfg["Labels"].is_object() {
                cfg["Labels"] = json!({});
            }
            for (k, v) in pairs(arg) {
                cfg["Labels"][k] = json!(v);
            }
        }
        "EXPOSE" => {
            if !cfg["ExposedPorts"].is_object() {
                cfg["ExposedPorts"] = json!({});
            }
            for p in arg.split_whitespace() {
                let p = if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                };
                cfg["ExposedPorts"][p] = json!({});
            }
        }
        "VOLUME" => {
            if !cfg["Volumes"].is_object() {
                cfg["Volumes"] = json!({});
            }
            let list = if arg.starts_with('[') {
                split_words(arg)?
            } else {
                arg.split_whitespace().map(String::from).collect()
            };
            for v in list {
                cfg["Volumes"][v] = json!({});
            }
        }
        other => {
            return Err(Error::Invalid(format!(
                "invalid change {change:?}: {other} is not one of CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR"
            )));
        }
    }
    Ok(())
}

/// The layers `commit` adopted from this container earlier, bottom first.
fn adopted(cfg: &Value) -> Vec<Value> {
    cfg["Layers"].as_array().cloned().unwrap_or_default()
}

/// Commits container `c` as a new image (see the module doc).
pub fn commit(images: &mut Images, c: &Container, o: &CommitOptions) -> Result<Committed> {
    let mut ccfg = c.config()?;
    let base = images
        .store
        .resolve(ccfg["ImageId"].as_str().unwrap_or_default())?;
    let parsed = images.parse(&base)?;
    let mut chains = Images::chains(&parsed)?;
    let layers_before = adopted(&ccfg);
    let mut config: Value = serde_json::from_slice(&images.store.read_blob(&base.config)?)
        .map_err(|e| Error::Invalid(format!("image config: {e}")))?;
    let mut manifest: Value = serde_json::from_slice(&images.store.read_blob(&base.manifest)?)
        .map_err(|e| Error::Invalid(format!("image manifest: {e}")))?;
    // Docker bakes the container's own settings into the image.
    let inner = &mut config["config"];
    if !inner.is_object() {
        *inner = json!({});
    }
    inner["Env"] = ccfg["Env"].clone();
    inner["Cmd"] = ccfg["Cmd"].clone();
    inner["Entrypoint"] = if super::strings(&ccfg["Entrypoint"]).is_empty() {
        Value::Null
    } else {
        ccfg["Entrypoint"].clone()
    };
    inner["WorkingDir"] = ccfg["WorkingDir"].clone();
    if let Some(u) = ccfg["User"].as_str() {
        inner["User"] = json!(u);
    }
    for ch in &o.changes {
        apply_change(inner, ch)?;
    }
    let now = crate::time::now();
    let mut history: Vec<Value> = config["history"].as_array().cloned().unwrap_or_default();
    let mut diff_ids: Vec<Value> = config["rootfs"]["diff_ids"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut mlayers: Vec<Value> = manifest["layers"].as_array().cloned().unwrap_or_default();
    let mut size = base.size;
    for l in &layers_before {
        history.push(l["History"].clone());
        diff_ids.push(l["DiffId"].clone());
        mlayers.push(l["Descriptor"].clone());
        size += l["Size"].as_u64().unwrap_or(0);
        let d: Digest = l["DiffId"].as_str().unwrap_or_default().parse()?;
        chains.push(chain_id(chains.last(), &d));
    }
    let parent_chain = *chains.last().expect("images have layers");

    let snap = images.snapshotter()?;
    let key = c.snapshot_key();
    let (upper, lowers) = snap.layer_dirs(&key)?;
    let opts = DiffOptions {
        compression: Compression::Gzip,
        threads: 0,
        lowers: lowers.clone(),
    };
    let (blob, blob_size, blob_new, report) = images.store.put_with(|w: &mut dyn Write| {
        let (report, _) = strata_overlay::diff::native(&upper, w, &opts)?;
        Ok(report)
    })?;
    let diff_id = report.diff_id;
    let chain = chain_id(Some(&parent_chain), &diff_id);
    let created_by = format!("strata commit {}", super::strings(&ccfg["Args"]).join(" "));
    let mut entry = json!({ "created": now, "created_by": created_by });
    if let Some(a) = &o.author {
        entry["author"] = json!(a);
        config["author"] = json!(a);
    }
    if let Some(m) = &o.message {
        entry["comment"] = json!(m);
    }
    let descriptor = json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": blob.to_string(), "size": blob_size,
    });
    history.push(entry.clone());
    diff_ids.push(json!(diff_id.to_string()));
    mlayers.push(descriptor.clone());
    size += report.uncompressed;
    config["created"] = json!(now);
    config["history"] = json!(history);
    config["rootfs"] = json!({ "type": "layers", "diff_ids": diff_ids });
    let config_bytes = serde_json::to_vec(&config).expect("JSON serializes");
    let (config_digest, config_new) = images.store.put_bytes(&config_bytes)?;
    manifest["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
    manifest["config"] = json!({
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": config_digest.to_string(), "size": config_bytes.len(),
    });
    manifest["layers"] = json!(mlayers);
    if let Some(a) = manifest.get_mut("annotations") {
        *a = json!({});
    }
    let (manifest_digest, manifest_new) = images
        .store
        .put_bytes(&serde_json::to_vec(&manifest).expect("JSON serializes"))?;
    let image = Image {
        manifest: manifest_digest,
        config: config_digest,
        created: Some(now.clone()),
        size,
        tags: o.reference.iter().cloned().collect(),
    };
    // What this commit added goes again if it fails before the container's upper is handed
    // over, so a failed commit leaves the store as it was.
    let new_blobs: Vec<Digest> = [
        (blob, blob_new),
        (config_digest, config_new),
        (manifest_digest, manifest_new),
    ]
    .into_iter()
    .filter_map(|(d, new)| new.then_some(d))
    .collect();
    // The image the new name pointed at before, if any: it gets the name back on undo.
    let before: Option<(Reference, Option<Image>)> = o
        .reference
        .as_ref()
        .map(|r| (r.clone(), images.store.resolve(&r.to_string()).ok()));
    let undo = |images: &mut Images| {
        if let Some((r, prev)) = &before {
            let _ = match prev {
                Some(p) => images.store.tag(p, r).map(drop),
                None => images.store.untag(r).map(drop),
            };
        }
        let _ = images.store.delete(&image);
        for d in &new_blobs {
            images.store.remove_blob(d);
        }
    };
    // The image is recorded before its snapshot is made: once the upper is handed over, the
    // image (whose layer also unpacks from the blob) holds the container's changes.
    if let Err(e) = images
        .store
        .record(&[(image.clone(), o.reference.iter().cloned().collect())])
    {
        undo(images);
        return Err(e);
    }
    let snap = images.snapshotter()?;
    let name = chain.to_string();
    let adoption = if snap.stat(&name).is_ok() {
        Adoption::Shared
    } else if c.status()? == Status::Running {
        let tmp = format!("commit-{}-{}", std::process::id(), chain.hex());
        let copied = (|| -> Result<()> {
            snap.prepare(&tmp, &parent_chain.to_string(), Default::default())?;
            let (dst, _) = snap.layer_dirs(&tmp)?;
            strata_overlay::tree::copy_tree(&upper, &dst)?;
            snap.commit(&name, &tmp, Default::default(), None)?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = snap.remove(&tmp);
            undo(images);
            return Err(e);
        }
        Adoption::Copied
    } else {
        if let Err(e) = snap.adopt(&key, &name, &parent_chain.to_string(), BTreeMap::new()) {
            undo(images);
            return Err(e.into());
        }
        let mut layers = layers_before.clone();
        layers.push(json!({
            "Chain": name, "DiffId": diff_id.to_string(), "Descriptor": descriptor,
            "History": entry, "Size": report.uncompressed,
        }));
        ccfg["Layers"] = json!(layers);
        ccfg["ImageTop"] = json!(name);
        // Recorded at once: from here on the container's changes live in that layer. Should
        // the rebase below fail, `settle` finishes it on the container's next start.
        c.set_config(&ccfg)?;
        settle(images, c)?;
        Adoption::Moved
    };
    images
        .store
        .record_layer(&chain, &diff_id, report.uncompressed)?;
    Ok(Committed {
        image,
        diff_id,
        blob_size,
        adoption,
    })
}

/// Puts a container whose upper was adopted onto the adopted layer (through its init layer)
/// and records its new root mounts. Idempotent: also finishes a commit that stopped between
/// adopting and rebasing.
pub fn settle(images: &mut Images, c: &Container) -> Result<()> {
    let mut ccfg = c.config()?;
    let Some(top) = adopted(&ccfg)
        .last()
        .and_then(|l| l["Chain"].as_str().map(String::from))
    else {
        return Ok(());
    };
    let snap = images.snapshotter()?;
    let init = super::create::init_layer(snap, c, &top)?;
    let key = c.snapshot_key();
    if snap.stat(&key)?.parent != init {
        snap.rebase(&key, &init)?;
    }
    let mounts = snap.mounts(&key)?;
    let mounts_json: Vec<_> = mounts
        .iter()
        .map(|m| json!({ "Type": m.kind, "Source": m.source, "Options": m.options }))
        .collect();
    if ccfg["Mounts"] != json!(mounts_json) {
        ccfg["Mounts"] = json!(mounts_json);
        c.set_config(&ccfg)?;
    }
    Ok(())
}

/// The container's changes since its image, as `docker diff` lists them: its upper dir over
/// the layers commit adopted from it, merged.
pub fn changes(images: &mut Images, c: &Container) -> Result<Vec<Change>> {
    let ccfg = c.config()?;
    let n = adopted(&ccfg).len();
    let snap = images.snapshotter()?;
    let (upper, lowers) = snap.layer_dirs(&c.snapshot_key())?;
    // lowers: [init, adopted top .. adopted bottom, image layers..] when something was adopted.
    let mut stack: Vec<(std::path::PathBuf, Vec<std::path::PathBuf>)> = Vec::new();
    if n > 0 {
        for i in (1..=n).rev() {
            stack.push((lowers[i].clone(), lowers[i + 1..].to_vec()));
        }
    }
    stack.push((upper, lowers));
    let mut state: BTreeMap<String, ChangeKind> = BTreeMap::new();
    for (dir, below) in stack {
        for ch in strata_overlay::diff::changes_native(&dir, &LowerView::new(below))? {
            let prev = state.get(&ch.path).copied();
            match ch.kind {
                ChangeKind::Deleted => {
                    let prefix = format!("{}/", ch.path);
                    state.retain(|p, _| !p.starts_with(&prefix));
                    if prev == Some(ChangeKind::Added) {
                        state.remove(&ch.path);
                    } else {
                        state.insert(ch.path, ChangeKind::Deleted);
                    }
                }
                ChangeKind::Added => {
                    let kind = if prev == Some(ChangeKind::Deleted) {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Added
                    };
                    state.insert(ch.path, kind);
                }
                ChangeKind::Modified => {
                    if prev != Some(ChangeKind::Added) {
                        state.insert(ch.path, ChangeKind::Modified);
                    }
                }
            }
        }
    }
    Ok(state
        .into_iter()
        .map(|(path, kind)| Change { path, kind })
        .collect())
}

/// Bytes the container's changes take: its upper dir plus the layers adopted from it (what
/// Docker's `ps -s` SIZE shows).
pub fn rw_size(images: &mut Images, c: &Container) -> Result<u64> {
    let ccfg = c.config()?;
    let snap = images.snapshotter()?;
    let mut n = snap.usage(&c.snapshot_key())?.size.max(0) as u64;
    for l in adopted(&ccfg) {
        n += l["Size"].as_u64().unwrap_or(0);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_changes_apply_to_the_config() {
        let mut c = json!({ "Env": ["A=1", "B=2"] });
        apply_change(&mut c, "CMD [\"sh\", \"-c\", \"echo hi\"]").unwrap();
        apply_change(&mut c, "ENTRYPOINT /bin/app --flag").unwrap();
        apply_change(&mut c, "ENV A=3 C=4").unwrap();
        apply_change(&mut c, "env D five").unwrap();
        apply_change(&mut c, "LABEL version=1.0").unwrap();
        apply_change(&mut c, "EXPOSE 80 53/udp").unwrap();
        apply_change(&mut c, "VOLUME /data").unwrap();
        apply_change(&mut c, "WORKDIR /srv").unwrap();
        assert_eq!(c["Cmd"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(c["Entrypoint"], json!(["/bin/sh", "-c", "/bin/app --flag"]));
        assert_eq!(c["Env"], json!(["B=2", "A=3", "C=4", "D=five"]));
        assert_eq!(c["Labels"]["version"], "1.0");
        assert!(c["ExposedPorts"]["53/udp"].is_object() && c["ExposedPorts"]["80/tcp"].is_object());
        assert!(c["Volumes"]["/data"].is_object());
        assert_eq!(c["WorkingDir"], "/srv");
        assert!(apply_change(&mut c, "RUN rm -rf /").is_err());
        assert!(apply_change(&mut c, "CMD [broken").is_err());
        assert!(apply_change(&mut c, "CMD").is_err());
    }
}
