//! Image archives: `load` of an OCI image layout archive (what `skopeo copy ... oci-archive:`
//! writes) or a `docker save` archive, and `save` as an OCI image layout archive.
//!
//! Load reads the archive once: every blob goes through the content store's ingest dir and is
//! checked against its digest (OCI) or hashed (docker's layer files); manifests and configs are
//! checked against their descriptors; layers are verified again (digest and diffID) while they
//! are applied. Anything fails: the blobs and snapshots this load added are removed and no tag
//! moves, so the store is as before.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use strata_overlay::Digest;
use strata_overlay::archive::{Entry, Kind, Reader, Writer};

use super::{Image, Images, Parsed, Reference, digest_of};
use crate::{Error, Result};

const MAX_JSON: u64 = 16 << 20;
const MANIFEST_V1: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_V1: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Archive {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// What one pass over the archive found.
#[derive(Default)]
struct Pass {
    /// Small JSON files by path (index.json, manifest.json, ...).
    json: HashMap<String, Vec<u8>>,
    /// Every other regular file by path -> its digest in the content store.
    files: HashMap<String, Digest>,
    /// Symlinks (docker save links duplicate layers).
    links: HashMap<String, String>,
    /// Blobs this load added to the store (removed again on failure).
    added: Vec<Digest>,
}

fn clean(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    s.trim_start_matches("./").trim_end_matches('/').to_string()
}

fn read_pass(images: &Images, path: &Path, pass: &mut Pass) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let (_, plain) =
        strata_overlay::compress::decoder(std::io::BufReader::with_capacity(1 << 20, f))
            .map_err(|e| Error::io("read", path, e))?;
    let mut tar = Reader::new(plain);
    while let Some(e) = tar.next_entry().map_err(|e| bad(path, e.to_string()))? {
        let name = clean(&e.path);
        match e.kind {
            Kind::File => {}
            Kind::Symlink | Kind::HardLink => {
                let target = String::from_utf8_lossy(&e.link).to_string();
                let base = Path::new(&name)
                    .parent()
                    .map(|p| p.join(&target))
                    .unwrap_or_else(|| target.clone().into());
                let resolved = if e.kind == Kind::HardLink {
                    target
                } else {
                    normalize(&base.to_string_lossy())
                };
                pass.links.insert(name, resolved);
                continue;
            }
            _ => continue,
        }
        let is_json = matches!(
            name.as_str(),
            "index.json" | "oci-layout" | "manifest.json" | "repositories"
        );
        if is_json {
            if e.size > MAX_JSON {
                return Err(bad(
                    path,
                    format!("{name} is {} bytes, larger than {MAX_JSON}", e.size),
                ));
            }
            let mut data = Vec::new();
            tar.data()
                .read_to_end(&mut data)
                .map_err(|err| bad(path, format!("{name}: {err}")))?;
            pass.json.insert(name, data);
            continue;
        }
        let expected: Option<Digest> = name
            .strip_prefix("blobs/sha256/")
            .map(|hex| format!("sha256:{hex}").parse())
            .transpose()
            .map_err(|_| bad(path, format!("{name}: not a sha256 blob name")))?;
        let (digest, size, new) = images
            .store
            .put_blob(&mut tar.data(), expected.as_ref())
            .map_err(|err| match err {
                Error::Archive { reason, .. } => bad(path, format!("{name}: {reason}")),
                other => other,
            })?;
        if size != e.size {
            return Err(bad(
                path,
                format!("{name}: truncated ({size} of {} bytes)", e.size),
            ));
        }
        if new {
            pass.added.push(digest);
        }
        pass.files.insert(name, digest);
    }
    Ok(())
}

fn normalize(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

/// Loads an image archive into the store; returns the images loaded and their tags.
pub fn load(images: &mut Images, path: &Path) -> Result<Vec<(Image, Vec<Reference>)>> {
    let mut pass = Pass::default();
    let mut created_chains = Vec::new();
    let result = (|| -> Result<Vec<(Image, Vec<Reference>)>> {
        read_pass(images, path, &mut pass)?;
        let found = if let Some(index) = pass.json.get("index.json").cloned() {
            oci_images(images, path, &index)?
        } else if let Some(manifest) = pass.json.get("manifest.json").cloned() {
            docker_images(images, path, &manifest, &mut pass)?
        } else {
            return Err(bad(
                path,
                "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
            ));
        };
        if found.is_empty() {
            return Err(bad(path, "the archive holds no image"));
        }
        let mut out = Vec::new();
        for (manifest, config, refs) in found {
            let img = Image {
                manifest,
                config,
                created: None,
                size: 0,
                tags: Vec::new(),
            };
            let parsed = images.parse(&img)?;
            for l in parsed.manifest.layers() {
                let d = digest_of(l.digest())?;
                if !images.store.has_blob(&d) {
                    return Err(bad(path, format!("layer {d} is missing from the archive")));
                }
            }
            let (chains, size) = images.unpack(&parsed)?;
            created_chains.extend(chains);
            let created = parsed.config.created().clone();
            out.push((
                Image {
                    size,
                    created,
                    ..img
                },
                refs,
            ));
        }
        images.store.record(&out)?;
        // What the archive carried but no loaded image references (docker's per-layer json and
        // VERSION files, other platforms' manifests) is not kept: it was new to the store, so
        // nothing else uses it.
        let mut used = std::collections::HashSet::new();
        for (img, _) in &out {
            used.insert(img.manifest);
            used.insert(img.config);
            for l in images.parse(img)?.manifest.layers() {
                used.insert(digest_of(l.digest())?);
            }
        }
        for d in pass.added.iter().filter(|d| !used.contains(*d)) {
            images.store.remove_blob(d);
        }
        Ok(out)
    })();
    if result.is_err() {
        images.drop_chains(&created_chains);
        for d in &pass.added {
            images.store.remove_blob(d);
        }
    }
    result
}

/// The manifests an OCI layout names: (manifest, config, tags).
fn oci_images(
    images: &Images,
    path: &Path,
    index: &[u8],
) -> Result<Vec<(Digest, Digest, Vec<Reference>)>> {
    let index =
        ImageIndex::from_reader(index).map_err(|e| bad(path, format!("index.json: {e}")))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "image".into());
    let mut out = Vec::new();
    for m in index.manifests() {
        let ann = m.annotations().clone().unwrap_or_default();
        let name = ann.get("io.containerd.image.name").cloned().or_else(|| {
            ann.get("org.opencontainers.image.ref.name").map(|r| {
                // A bare tag (as umoci writes) names a tag of a repository named after the file.
                if r.contains('/') || (r.contains(':') && !r.starts_with(':')) {
                    r.clone()
                } else {
                    format!("localhost/{stem}:{r}")
                }
            })
        });
        let refs = match name {
            Some(n) => vec![
                n.parse::<Reference>()
                    .map_err(|e| bad(path, format!("index.json: {e}")))?,
            ],
            None => Vec::new(),
        };
        let digest = digest_of(m.digest())?;
        let manifest = resolve_manifest(images, path, digest, m.media_type().as_ref())?;
        let config = check_manifest(images, path, &manifest)?;
        out.push((manifest, config, refs));
    }
    Ok(out)
}

/// Follows an image index to the linux/amd64 manifest; checks the manifest blob is present.
fn resolve_manifest(
    images: &Images,
    path: &Path,
    digest: Digest,
    media_type: &str,
) -> Result<Digest> {
    if !images.store.has_blob(&digest) {
        return Err(bad(
            path,
            format!("manifest {digest} is missing from the archive"),
        ));
    }
    if media_type != INDEX_V1 && media_type != DOCKER_LIST {
        return Ok(digest);
    }
    let data = images.store.read_blob(&digest)?;
    let index = ImageIndex::from_reader(&data[..])
        .map_err(|e| bad(path, format!("index {digest}: {e}")))?;
    let pick = index
        .manifests()
        .iter()
        .find(|m| {
            m.platform().as_ref().is_some_and(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
            })
        })
        .or_else(|| index.manifests().first())
        .ok_or_else(|| bad(path, format!("index {digest} lists no manifest")))?;
    resolve_manifest(
        images,
        path,
        digest_of(pick.digest())?,
        pick.media_type().as_ref(),
    )
}

/// Checks a manifest and its config; returns the config digest.
fn check_manifest(images: &Images, path: &Path, manifest: &Digest) -> Result<Digest> {
    let data = images.store.read_blob(manifest)?;
    let m = ImageManifest::from_reader(&data[..])
        .map_err(|e| bad(path, format!("manifest {manifest}: {e}")))?;
    let config = digest_of(m.config().digest())?;
    if !images.store.has_blob(&config) {
        return Err(bad(
            path,
            format!("config {config} is missing from the archive"),
        ));
    }
    let c = images.store.read_blob(&config)?;
    if c.len() as u64 != m.config().size() {
        return Err(bad(
            path,
            format!(
                "config {config}: {} bytes, the manifest says {}",
                c.len(),
                m.config().size()
            ),
        ));
    }
    let parsed = ImageConfiguration::from_reader(&c[..])
        .map_err(|e| bad(path, format!("config {config}: {e}")))?;
    if parsed.rootfs().diff_ids().len() != m.layers().len() {
        return Err(bad(
            path,
            format!(
                "manifest {manifest} has {} layers, its config {} diffIDs",
                m.layers().len(),
                parsed.rootfs().diff_ids().len()
            ),
        ));
    }
    for l in m.layers() {
        let d = digest_of(l.digest())?;
        let size = std::fs::metadata(images.store.blob_path(&d))
            .map(|m| m.len())
            .ok();
        if size.is_some_and(|s| s != l.size()) {
            return Err(bad(
                path,
                format!("layer {d}: size differs from its descriptor"),
            ));
        }
    }
    Ok(config)
}

/// `docker save` archives: manifest.json lists configs, tags and layer files. Each image gets
/// an OCI manifest written into the store.
fn docker_images(
    images: &Images,
    path: &Path,
    manifest: &[u8],
    pass: &mut Pass,
) -> Result<Vec<(Digest, Digest, Vec<Reference>)>> {
    let list: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| bad(path, format!("manifest.json: {e}")))?;
    let entries = list
        .as_array()
        .ok_or_else(|| bad(path, "manifest.json is not a list"))?;
    let lookup = |pass: &Pass, name: &str| -> Result<Digest> {
        let mut n = normalize(name);
        for _ in 0..8 {
            if let Some(d) = pass.files.get(&n) {
                return Ok(*d);
            }
            match pass.links.get(&n) {
                Some(t) => n = t.clone(),
                None => break,
            }
        }
        Err(bad(
            path,
            format!("manifest.json names {name}, which the archive lacks"),
        ))
    };
    let mut out = Vec::new();
    for e in entries {
        let config_name = e["Config"]
            .as_str()
            .ok_or_else(|| bad(path, "manifest.json entry without Config"))?;
        let config = lookup(pass, config_name)?;
        let cdata = images.store.read_blob(&config)?;
        let parsed = ImageConfiguration::from_reader(&cdata[..])
            .map_err(|err| bad(path, format!("{config_name}: {err}")))?;
        let layer_names = e["Layers"]
            .as_array()
            .ok_or_else(|| bad(path, "manifest.json entry without Layers"))?;
        let mut layers = Vec::new();
        for (i, l) in layer_names.iter().enumerate() {
            let name = l
                .as_str()
                .ok_or_else(|| bad(path, "a layer name is not a string"))?;
            let d = lookup(pass, name)?;
            let blob = images.store.blob_path(&d);
            let size = std::fs::metadata(&blob)
                .map_err(|err| Error::io("stat", &blob, err))?
                .len();
            let mut head = [0u8; 4];
            let n = std::fs::File::open(&blob)
                .and_then(|mut f| f.read(&mut head))
                .unwrap_or(0);
            let media = strata_overlay::Compression::detect(&head[..n]).media_type();
            if parsed.rootfs().diff_ids().get(i).is_none() {
                return Err(bad(
                    path,
                    format!("{config_name}: fewer diffIDs than layers"),
                ));
            }
            layers.push(
                serde_json::json!({ "mediaType": media, "digest": d.to_string(), "size": size }),
            );
        }
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_V1,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": cdata.len() },
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&m).map_err(|err| bad(path, err.to_string()))?;
        let (md, new) = images.store.put_bytes(&bytes)?;
        if new {
            pass.added.push(md);
        }
        let mut refs = Vec::new();
        for t in e["RepoTags"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let t = t
                .as_str()
                .ok_or_else(|| bad(path, "a RepoTag is not a string"))?;
            refs.push(
                t.parse::<Reference>()
                    .map_err(|err| bad(path, format!("RepoTags: {err}")))?,
            );
        }
        out.push((md, config, refs));
    }
    Ok(out)
}

/// Saves images as an OCI image layout archive at `out` (written to a temp file, renamed into
/// place on success). Each image is named by `io.containerd.image.name` (the full reference)
/// and `org.opencontainers.image.ref.name` (its tag), as containerd writes them.
pub fn save(images: &Images, refs: &[(Image, Option<Reference>)], out: &Path) -> Result<()> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", out.display())))?;
    let tmp = out.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = Writer::new(std::io::BufWriter::with_capacity(1 << 20, f));
        let werr = |e: std::io::Error| Error::io("write", &tmp, e);
        let file = |w: &mut Writer<_>, p: &str, data: &[u8]| -> Result<()> {
            let mut e = Entry::new(p, Kind::File);
            e.mode = 0o644;
            e.size = data.len() as u64;
            w.append(&e, &mut &data[..]).map_err(werr)
        };
        let dir = |w: &mut Writer<_>, p: &str| -> Result<()> {
            let mut e = Entry::new(p, Kind::Dir);
            e.mode = 0o755;
            w.append(&e, &mut std::io::empty()).map_err(werr)
        };
        file(&mut w, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut manifests = Vec::new();
        let mut blobs: Vec<Digest> = Vec::new();
        for (img, r) in refs {
            let Parsed { manifest, .. } = images.parse(img)?;
            let msize = std::fs::metadata(images.store.blob_path(&img.manifest))
                .map_err(|e| Error::io("stat", images.store.blob_path(&img.manifest), e))?
                .len();
            let mut ann = serde_json::Map::new();
            if let Some(r) = r {
                ann.insert("io.containerd.image.name".into(), r.to_string().into());
                if let Some(t) = &r.tag {
                    ann.insert("org.opencontainers.image.ref.name".into(), t.clone().into());
                }
            }
            manifests.push(serde_json::json!({ "mediaType": MANIFEST_V1, "digest": img.manifest.to_string(), "size": msize, "annotations": ann }));
            for d in std::iter::once(img.manifest)
                .chain(std::iter::once(img.config))
                .chain(
                    manifest
                        .layers()
                        .iter()
                        .filter_map(|l| digest_of(l.digest()).ok()),
                )
            {
                if !blobs.contains(&d) {
                    blobs.push(d);
                }
            }
        }
        let index = serde_json::json!({ "schemaVersion": 2, "mediaType": INDEX_V1, "manifests": manifests });
        file(
            &mut w,
            "index.json",
            &serde_json::to_vec(&index).map_err(|e| Error::Invalid(e.to_string()))?,
        )?;
        dir(&mut w, "blobs/")?;
        dir(&mut w, "blobs/sha256/")?;
        for d in blobs {
            let p = images.store.blob_path(&d);
            let f = std::fs::File::open(&p).map_err(|e| Error::io("open blob", &p, e))?;
            let mut e = Entry::new(format!("blobs/sha256/{}", d.hex()), Kind::File);
            e.mode = 0o644;
            e.size = f.metadata().map_err(|e| Error::io("stat", &p, e))?.len();
            w.append(&e, &mut std::io::BufReader::new(f))
                .map_err(werr)?;
        }
        let f = w
            .finish()
            .map_err(werr)?
            .into_inner()
            .map_err(|e| Error::io("write", &tmp, e.into_error()))?;
        f.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io("rename into place", out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
