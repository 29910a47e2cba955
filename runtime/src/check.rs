//! `strata system check`: every record against the disk and every blob against its digest.
//!
//! What it looks at, and what `--repair` does about it:
//!
//! | finding | repair |
//! |---|---|
//! | a blob whose content does not hash to its name | removed (images needing it are then reported) |
//! | a blob an image needs is missing | none: pull or load the image again |
//! | an image's manifest or config missing or unparsable | none |
//! | an image layer without its snapshot, blob present | unpacked again from the blob |
//! | an image layer without its snapshot or blob | none |
//! | a layer record without its snapshot | forgotten |
//! | a snapshot record without its directory | removed when nothing sits on it |
//! | a snapshot directory no record owns | removed (the snapshotter's Cleanup) |
//! | a container's writable snapshot missing | none: `strata rm` it |
//! | a `ctr-*` snapshot with no container, a container dir without config | removed |
//! | what a killed pull, load or import left (`pull-PID-*` snapshots, ingest files) | swept when the store opens, reported as repaired |

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use strata_overlay::Digest;

use crate::image::{Images, Store, chain_id};
use crate::{Error, Result};

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What is wrong.
    pub what: String,
    /// Whether `--repair` fixed it.
    pub repaired: bool,
}

/// What a check looked at and found.
#[derive(Debug, Default)]
pub struct Report {
    /// Blobs hashed.
    pub blobs: usize,
    /// Images checked.
    pub images: usize,
    /// Snapshot records checked.
    pub snapshots: usize,
    /// Containers checked.
    pub containers: usize,
    /// The problems.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Problems not repaired.
    pub fn remaining(&self) -> usize {
        self.findings.iter().filter(|f| !f.repaired).count()
    }

    fn found(&mut self, what: String, repaired: bool) {
        self.findings.push(Finding { what, repaired });
    }
}

fn hex_name(p: &Path) -> Option<String> {
    let n = p.file_name()?.to_str()?;
    (n.len() == 64
        && n.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| n.to_string())
}

/// Checks the store at `root`; with `repair`, fixes what can be fixed (see the module doc).
pub fn check(root: &Path, repair: bool) -> Result<Report> {
    let mut report = Report::default();
    let mut images = Images::open(root)?;
    // Opening the snapshot store sweeps what killed pulls, loads and imports left.
    images.snapshotter()?;
    let swept = images.swept();
    if swept > 0 {
        report.found(
            format!("{swept} leftover(s) of an interrupted pull, load or import (swept)"),
            true,
        );
    }

    // Blobs against their names.
    let blob_dir = root.join("content/blobs/sha256");
    let mut present: HashSet<String> = HashSet::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&blob_dir)
        .map_err(|e| Error::io("read dir", &blob_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        report.blobs += 1;
        let Some(hex) = hex_name(&p) else {
            let fixed = repair && std::fs::remove_file(&p).is_ok();
            report.found(
                format!("{}: not named by a sha256 digest", p.display()),
                fixed,
            );
            continue;
        };
        let actual = Store::hash_file(&p)?;
        if actual.hex() != hex {
            let fixed = repair && std::fs::remove_file(&p).is_ok();
            report.found(
                format!("blob sha256:{hex} is corrupt (its content hashes to {actual})"),
                fixed,
            );
            if !fixed {
                present.insert(hex);
            }
        } else {
            present.insert(hex);
        }
    }

    // Images: their documents, blobs and layer snapshots.
    let mut needed_chains: HashSet<String> = HashSet::new();
    let mut needed_blobs: HashSet<String> = HashSet::new();
    let mut unreadable = false;
    for img in images.store.images()? {
        report.images += 1;
        let name = img
            .tags
            .first()
            .map(|t| t.familiar())
            .unwrap_or_else(|| img.config.hex()[..12].to_string());
        needed_blobs.insert(img.manifest.hex().to_string());
        needed_blobs.insert(img.config.hex().to_string());
        let parsed = match images.parse(&img) {
            Ok(p) => p,
            Err(e) => {
                report.found(format!("image {name}: {e}"), false);
                unreadable = true;
                continue;
            }
        };
        let diff_ids = parsed.config.rootfs().diff_ids().clone();
        let mut parent: Option<Digest> = None;
        let mut missing_snapshot = false;
        for (layer, diff) in parsed.manifest.layers().iter().zip(&diff_ids) {
            let blob = layer.digest().to_string();
            let Ok(diff_id) = diff.parse::<Digest>() else {
                report.found(
                    format!("image {name}: diffID {diff} is not a digest"),
                    false,
                );
                break;
            };
            let chain = chain_id(parent.as_ref(), &diff_id);
            needed_chains.insert(chain.to_string());
            if let Some(h) = blob.strip_prefix("sha256:") {
                needed_blobs.insert(h.to_string());
            }
            let blob_here = blob
                .strip_prefix("sha256:")
                .is_some_and(|h| present.contains(h));
            if !blob_here {
                report.found(
                    format!(
                        "image {name}: layer blob {blob} is missing (running it works while its \
                         snapshot is here; save and push need it: pull or load it again)"
                    ),
                    false,
                );
            }
            if images.snapshotter()?.stat(&chain.to_string()).is_err() {
                missing_snapshot = true;
                if !blob_here {
                    report.found(
                        format!("image {name}: layer {chain} has neither snapshot nor blob"),
                        false,
                    );
                }
            }
            parent = Some(chain);
        }
        if missing_snapshot {
            let fixed = repair && images.unpack(&parsed).is_ok();
            report.found(
                format!("image {name}: layer snapshot(s) missing (unpacked again from the blobs when repaired)"),
                fixed,
            );
        }
    }

    // What no image references: blobs, and layer snapshots nothing sits on (left by a commit,
    // import, pull or rmi killed between its steps). Not judged while an image is unreadable.
    if !unreadable {
        let mut unused: Vec<&String> = present
            .iter()
            .filter(|h| !needed_blobs.contains(*h))
            .collect();
        unused.sort();
        if !unused.is_empty() {
            let mut fixed = repair;
            for h in &unused {
                fixed &= std::fs::remove_file(blob_dir.join(h)).is_ok();
            }
            report.found(
                format!("{} blob(s) no image references", unused.len()),
                fixed,
            );
        }
        let (store, snap) = images.parts()?;
        let mut unused_layers = 0;
        let mut fixed = repair;
        // Top down: removing a layer can leave the one below it unused.
        loop {
            let infos = snap.list(&[])?;
            let childless: Vec<&strata_snapshotter::Info> = infos
                .iter()
                .filter(|i| i.kind == strata_snapshotter::meta::Kind::Committed)
                .filter(|i| !infos.iter().any(|o| o.parent == i.name))
                .filter(|i| {
                    let chain = i.name.strip_prefix("init-").map(|h| format!("sha256:{h}"));
                    let needs = chain.as_deref().unwrap_or(&i.name);
                    (i.name.starts_with("sha256:") || i.name.starts_with("init-"))
                        && !needed_chains.contains(needs)
                })
                .collect();
            if childless.is_empty() {
                break;
            }
            unused_layers += childless.len();
            if !repair {
                break;
            }
            for i in childless {
                fixed &= snap.remove(&i.name).is_ok();
                if let Ok(c) = i.name.parse::<Digest>() {
                    let _ = store.forget_layer(&c);
                }
            }
            if !fixed {
                break;
            }
        }
        if unused_layers > 0 {
            report.found(
                format!("{unused_layers} layer snapshot(s) no image uses"),
                fixed,
            );
        }
    }

    // Snapshot records against their directories; directories against records.
    let (store, snap) = images.parts()?;
    let infos = snap.list(&[])?;
    let mut ids = HashSet::new();
    let names: HashSet<String> = infos.iter().map(|i| i.name.clone()).collect();
    let mut layer_rows_gone = Vec::new();
    for info in &infos {
        report.snapshots += 1;
        let id = snap.id_of(&info.name)?;
        ids.insert(id);
        let fs = snap.fs_dir(id);
        if !fs.is_dir() {
            let has_children = infos.iter().any(|o| o.parent == info.name);
            let fixed = repair && !has_children && snap.remove(&info.name).is_ok();
            report.found(
                format!("snapshot {} has no directory {}", info.name, fs.display()),
                fixed,
            );
        }
    }
    let snapdir = root.join("snapshotter/snapshots");
    let mut orphans = 0;
    if let Ok(rd) = std::fs::read_dir(&snapdir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.parse::<i64>().is_ok_and(|id| !ids.contains(&id)) || n.starts_with("new-") {
                orphans += 1;
            }
        }
    }
    if orphans > 0 {
        let fixed = repair && snap.cleanup().is_ok();
        report.found(
            format!("{orphans} snapshot director(ies) no record owns"),
            fixed,
        );
    }
    for chain in store.layer_chains()? {
        if !names.contains(&chain) {
            layer_rows_gone.push(chain);
        }
    }
    for chain in layer_rows_gone {
        let fixed = repair
            && chain
                .parse::<Digest>()
                .is_ok_and(|c| store.forget_layer(&c).is_ok());
        report.found(format!("layer record {chain} has no snapshot"), fixed);
    }

    // Containers against their snapshots.
    let containers = crate::container::list(root)?;
    let mut keys = HashSet::new();
    for c in &containers {
        report.containers += 1;
        keys.insert(c.snapshot_key());
        if snap.stat(&c.snapshot_key()).is_err() {
            report.found(
                format!(
                    "container {}: its writable layer {} is missing: `strata rm` it",
                    &c.id[..12],
                    c.snapshot_key()
                ),
                false,
            );
        }
    }
    for info in &infos {
        if info.name.starts_with("ctr-") && !keys.contains(&info.name) {
            let fixed = repair && snap.remove(&info.name).is_ok();
            report.found(
                format!("snapshot {} belongs to no container", info.name),
                fixed,
            );
        }
    }
    let cdir = root.join("containers");
    if let Ok(rd) = std::fs::read_dir(&cdir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.join("config.json").exists() {
                let fixed = repair && std::fs::remove_dir_all(&p).is_ok();
                report.found(
                    format!("{}: a container directory without config.json", p.display()),
                    fixed,
                );
            }
        }
    }
    Ok(report)
}
