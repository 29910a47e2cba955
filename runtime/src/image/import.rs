//! `strata import`: a one-layer image from a root filesystem tarball (plain, gzip or zstd).
//!
//! The tarball is applied once into a new snapshot (verified, whiteouts of a bottom layer
//! dropped), which gives its diffID and digest in the same pass; the file itself is then stored
//! as the layer blob, checked against that digest. Any failure removes both, so the store is as
//! before.

use std::path::Path;

use serde_json::json;
use strata_overlay::Compression;

use super::{Image, Images, Reference, chain_id};
use crate::{Error, Result};

fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// The OCI name of this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Imports `file` as a new image named `reference` (dangling when `None`).
pub fn import(
    images: &mut Images,
    file: &Path,
    reference: Option<Reference>,
    message: Option<String>,
    changes: &[String],
) -> Result<Image> {
    let mut inner = json!({});
    for ch in changes {
        crate::container::commit::apply_change(&mut inner, ch)?;
    }
    let key = format!("import-{}-{}", std::process::id(), crate::time::now_secs());
    images
        .snapshotter()?
        .prepare(&key, "", Default::default())?;
    let applied = (|| {
        let snap = images.snapshotter()?;
        let (upper, _) = snap.layer_dirs(&key)?;
        let mut opts = super::apply_options(snap);
        opts.parents = Some(Vec::new());
        Ok::<_, Error>(strata_overlay::apply_file(file, &upper, &opts)?)
    })();
    let report = match applied {
        Ok(r) => r,
        Err(e) => {
            let _ = images.snapshotter()?.remove(&key);
            return Err(e);
        }
    };
    let now = crate::time::now();
    let chain = chain_id(None, &report.diff_id);
    let result = (|| -> Result<Image> {
        let mut f = std::fs::File::open(file).map_err(|e| Error::io("open", file, e))?;
        let (blob, size, _) = images.store.put_blob(&mut f, Some(&report.digest))?;
        let mut history =
            json!({ "created": now, "created_by": format!("strata import {}", file.display()) });
        if let Some(m) = &message {
            history["comment"] = json!(m);
        }
        let config = json!({
            "created": now, "architecture": host_arch(), "os": "linux", "config": inner,
            "rootfs": { "type": "layers", "diff_ids": [report.diff_id.to_string()] },
            "history": [history],
        });
        let config_bytes = serde_json::to_vec(&config).expect("JSON serializes");
        let (config_digest, _) = images.store.put_bytes(&config_bytes)?;
        let manifest = json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_bytes.len() },
            "layers": [{ "mediaType": media_type(report.compression), "digest": blob.to_string(), "size": size }],
        });
        let (manifest_digest, _) = images
            .store
            .put_bytes(&serde_json::to_vec(&manifest).expect("JSON serializes"))?;
        let snap = images.snapshotter()?;
        let name = chain.to_string();
        if snap.stat(&name).is_ok() {
            snap.remove(&key)?;
        } else {
            snap.commit(&name, &key, Default::default(), None)?;
        }
        images
            .store
            .record_layer(&chain, &report.diff_id, report.uncompressed)?;
        let image = Image {
            manifest: manifest_digest,
            config: config_digest,
            created: Some(now.clone()),
            size: report.uncompressed,
            tags: reference.iter().cloned().collect(),
        };
        images
            .store
            .record(&[(image.clone(), reference.iter().cloned().collect())])?;
        Ok(image)
    })();
    if result.is_err() {
        if let Ok(s) = images.snapshotter() {
            let _ = s.remove(&key);
        }
    }
    result
}
