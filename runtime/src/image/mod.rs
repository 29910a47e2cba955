//! Images: the content store, references, archives (load/save), and unpacking layers into
//! shared snapshots by chain ID.

mod archive;
mod import;
mod reference;
mod store;

use std::path::{Path, PathBuf};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use strata_overlay::{ApplyOptions, Digest};
use strata_snapshotter::Snapshotter;

pub use archive::{load, save};
pub use import::{host_arch, import};
pub use reference::Reference;
pub use store::{Image, Ingest, Store, chain_id};

use crate::{Error, Result};

/// The label containerd's unpacker puts on extraction snapshots (never made volatile).
pub(crate) const UNPACK_LABEL: &str = "containerd.io/snapshot.ref";

/// The image store plus the snapshot store its layers live in.
pub struct Images {
    /// The image and content store.
    pub store: Store,
    snap_root: PathBuf,
    snap: Option<Snapshotter>,
    swept: usize,
}

/// A parsed image: its manifest and config.
pub struct Parsed {
    /// The manifest.
    pub manifest: ImageManifest,
    /// The config.
    pub config: ImageConfiguration,
}

/// How layers are applied straight into `snap`'s snapshots: in the rootless form where this is
/// not root on the host, and with deletions in the form the store's filesystem takes
/// ([`Snapshotter::layer_form`]).
pub(crate) fn apply_options(snap: &Snapshotter) -> ApplyOptions {
    let mut o = if crate::rootless::rootless_layers() {
        ApplyOptions::rootless()
    } else {
        ApplyOptions::default()
    };
    o.wh = snap.layer_form() == strata_overlay::form::Form::Wh;
    o
}

fn digest_of(d: &oci_spec::image::Digest) -> Result<Digest> {
    d.to_string()
        .parse()
        .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))
}

impl Images {
    /// Opens the stores below `root`.
    pub fn open(root: &Path) -> Result<Images> {
        Ok(Images {
            store: Store::open(root)?,
            snap_root: root.join("snapshotter"),
            snap: None,
            swept: 0,
        })
    }

    /// The snapshot store, opened on first use (it probes the kernel). Opening it sweeps what
    /// killed pulls, loads and imports left ([`sweep_stale`](Self::sweep_stale)).
    pub fn snapshotter(&mut self) -> Result<&Snapshotter> {
        if self.snap.is_none() {
            let (mode, _) = crate::storage::mode()?;
            self.snap = Some(Snapshotter::open(&self.snap_root, mode)?);
            let swept = self.sweep_stale()?;
            self.swept = swept;
            if swept > 0 {
                tracing::info!(
                    swept,
                    "removed what interrupted pulls, loads or imports left"
                );
            }
        }
        Ok(self.snap.as_ref().expect("just opened"))
    }

    /// What opening the snapshot store swept (see [`sweep_stale`](Self::sweep_stale)).
    pub fn swept(&self) -> usize {
        self.swept
    }

    /// Removes the active snapshots (`pull-PID-*`, `extract-PID-*`, `import-PID-*`) and the
    /// ingest files (`PID-*`) of processes that are gone: what a pull, load or import killed
    /// midway leaves. Nothing committed is touched. Returns how many were removed.
    pub fn sweep_stale(&mut self) -> Result<usize> {
        fn dead(pid: &str) -> bool {
            let Ok(pid) = pid.parse::<i32>() else {
                return false;
            };
            pid > 0
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH)
        }
        let mut n = 0;
        let ingest = self.store.root().join("content/ingest");
        if let Ok(rd) = std::fs::read_dir(&ingest) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.split('-').next().is_some_and(dead)
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    n += 1;
                }
            }
        }
        // Containers a killed `rm` had renamed away: their snapshots, then the directory.
        let cdir = self.store.root().join("containers");
        let mut removing = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&cdir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some((pid, id)) = name
                    .strip_prefix(".removing-")
                    .and_then(|r| r.split_once('-'))
                {
                    if dead(pid) {
                        removing.push((id.to_string(), e.path()));
                    }
                }
            }
        }
        if self.snap.is_none() {
            return Ok(n);
        }
        for (id, dir) in removing {
            crate::container::lifecycle::finish_removal(self, &id, &dir)?;
            n += 1;
        }
        let Some(snap) = self.snap.as_ref() else {
            return Ok(n);
        };
        for info in snap.list(&["kind==active".to_string()])? {
            let mut parts = info.name.splitn(3, '-');
            let (Some(kind), Some(pid)) = (parts.next(), parts.next()) else {
                continue;
            };
            if matches!(kind, "pull" | "extract" | "import") && dead(pid) {
                match snap.remove(&info.name) {
                    Ok(()) | Err(strata_snapshotter::Error::NotFound(_)) => n += 1,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(n)
    }

    /// The image store and the snapshot store together (the latter opened on first use).
    pub fn parts(&mut self) -> Result<(&Store, &Snapshotter)> {
        self.snapshotter()?;
        Ok((&self.store, self.snap.as_ref().expect("opened above")))
    }

    /// Reads and parses the manifest and config of `img`.
    pub fn parse(&self, img: &Image) -> Result<Parsed> {
        let m = self.store.read_blob(&img.manifest)?;
        let manifest = ImageManifest::from_reader(&m[..])
            .map_err(|e| Error::Invalid(format!("manifest {}: {e}", img.manifest)))?;
        let c = self.store.read_blob(&img.config)?;
        let config = ImageConfiguration::from_reader(&c[..])
            .map_err(|e| Error::Invalid(format!("config {}: {e}", img.config)))?;
        Ok(Parsed { manifest, config })
    }

    /// The chain IDs of an image's layers, bottom first.
    pub fn chains(parsed: &Parsed) -> Result<Vec<Digest>> {
        let mut out: Vec<Digest> = Vec::new();
        for d in parsed.config.rootfs().diff_ids() {
            let diff: Digest = d
                .parse()
                .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))?;
            out.push(chain_id(out.last(), &diff));
        }
        Ok(out)
    }

    /// Unpacks every layer of `parsed` not yet present, each verified against its digest and
    /// diffID while it is applied. Returns the chains it created (for rollback) and the image's
    /// unpacked size.
    pub fn unpack(&mut self, parsed: &Parsed) -> Result<(Vec<Digest>, u64)> {
        let diff_ids = parsed.config.rootfs().diff_ids().clone();
        let layers = parsed.manifest.layers().clone();
        if diff_ids.len() != layers.len() {
            return Err(Error::Invalid(format!(
                "image has {} layers but {} diffIDs",
                layers.len(),
                diff_ids.len()
            )));
        }
        let base_opts = apply_options(self.snapshotter()?);
        let mut created = Vec::new();
        let mut size = 0;
        let mut parent: Option<Digest> = None;
        self.snapshotter()?;
        let (store, snap) = (&self.store, self.snap.as_ref().expect("opened above"));
        let result = (|| -> Result<()> {
            for (layer, diff) in layers.iter().zip(&diff_ids) {
                let diff_id: Digest = diff
                    .parse()
                    .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))?;
                let blob = digest_of(layer.digest())?;
                let chain = chain_id(parent.as_ref(), &diff_id);
                let name = chain.to_string();
                if snap.stat(&name).is_ok() {
                    size += store.layer_size(&chain)?.unwrap_or(0);
                    parent = Some(chain);
                    continue;
                }
                let key = format!("extract-{}-{}", std::process::id(), chain.hex());
                let mut labels = std::collections::BTreeMap::new();
                labels.insert(UNPACK_LABEL.to_string(), name.clone());
                let parent_name = parent.map(|p| p.to_string()).unwrap_or_default();
                snap.prepare(&key, &parent_name, labels)?;
                let applied = (|| -> Result<u64> {
                    let (upper, parents) = snap.layer_dirs(&key)?;
                    let mut opts = base_opts.clone();
                    opts.expected_digest = Some(blob);
                    opts.expected_diff_id = Some(diff_id);
                    opts.parents = Some(parents);
                    let r = strata_overlay::apply_file(&store.blob_path(&blob), &upper, &opts)?;
                    snap.commit(&name, &key, Default::default(), None)?;
                    Ok(r.uncompressed)
                })();
                match applied {
                    Ok(n) => {
                        store.record_layer(&chain, &diff_id, n)?;
                        size += n;
                        created.push(chain);
                    }
                    Err(e) => {
                        let _ = snap.remove(&key);
                        return Err(e);
                    }
                }
                parent = Some(chain);
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok((created, size)),
            Err(e) => {
                self.drop_chains(&created);
                Err(e)
            }
        }
    }

    /// Removes the given layer snapshots, top first (best effort: used for rollback).
    pub fn drop_chains(&mut self, chains: &[Digest]) {
        for c in chains.iter().rev() {
            if let Ok(s) = self.snapshotter() {
                let _ = s.remove(&c.to_string());
            }
            let _ = self.store.forget_layer(c);
        }
    }

    /// The layers (chains, top first) and blobs that deleting `img` would remove: those no
    /// other image uses.
    fn deletion_plan(
        &self,
        img: &Image,
    ) -> Result<(Parsed, Vec<Digest>, std::collections::HashSet<Digest>)> {
        let parsed = self.parse(img)?;
        let mine = Self::chains(&parsed)?;
        let mut keep_chains = std::collections::HashSet::new();
        let mut keep_blobs = std::collections::HashSet::new();
        for other in self
            .store
            .images()?
            .into_iter()
            .filter(|o| o.manifest != img.manifest)
        {
            let p = self.parse(&other)?;
            keep_chains.extend(Self::chains(&p)?);
            keep_blobs.insert(other.manifest);
            keep_blobs.insert(other.config);
            for l in p.manifest.layers() {
                keep_blobs.insert(digest_of(l.digest())?);
            }
        }
        let gone: Vec<Digest> = mine
            .iter()
            .rev()
            .take_while(|c| !keep_chains.contains(*c))
            .copied()
            .collect();
        Ok((parsed, gone, keep_blobs))
    }

    /// Fails with [`Error::Conflict`] if deleting `img` would pull a layer from under a
    /// container (one run from it, or one whose changes `commit` adopted into it). Changes
    /// nothing.
    pub fn check_delete(&mut self, img: &Image) -> Result<()> {
        let (_, gone, _) = self.deletion_plan(img)?;
        let snap = self.snapshotter()?;
        for c in &gone {
            let init = format!("init-{}", c.hex());
            let mut users = snap.list(&[format!("parent=={init}")])?;
            users.extend(
                snap.list(&[format!("parent=={c}")])?
                    .into_iter()
                    .filter(|i| i.name != init && !gone.iter().any(|g| g.to_string() == i.name)),
            );
            if let Some(u) = users.first() {
                let who = u
                    .name
                    .strip_prefix("ctr-")
                    .map(|id| format!("container {}", &id[..12.min(id.len())]))
                    .unwrap_or_else(|| format!("snapshot {}", u.name));
                return Err(Error::Conflict(format!(
                    "image {} is used by {who} (its layer {c}): remove the container first",
                    img.config
                )));
            }
        }
        Ok(())
    }

    /// Deletes image `img`: its record, the layer snapshots and blobs no other image uses.
    /// Returns the chains removed. Fails with [`Error::Conflict`], changing nothing, while a
    /// container sits on one of those layers.
    pub fn delete(&mut self, img: &Image) -> Result<Vec<Digest>> {
        self.check_delete(img)?;
        let (parsed, gone, keep_blobs) = self.deletion_plan(img)?;
        // The containers' shared init layers on these chains go first.
        for c in &gone {
            match self.snapshotter()?.remove(&format!("init-{}", c.hex())) {
                Ok(()) | Err(strata_snapshotter::Error::NotFound(_)) => {}
                Err(strata_snapshotter::Error::FailedPrecondition(_)) => {
                    return Err(Error::Conflict(format!(
                        "image {} is used by a container: remove the container first",
                        img.config
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.store.delete(img)?;
        for c in &gone {
            match self.snapshotter()?.remove(&c.to_string()) {
                Ok(()) | Err(strata_snapshotter::Error::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            self.store.forget_layer(c)?;
        }
        let mut blobs = vec![img.manifest, img.config];
        for l in parsed.manifest.layers() {
            blobs.push(digest_of(l.digest())?);
        }
        for b in blobs {
            if !keep_blobs.contains(&b) {
                self.store.remove_blob(&b);
            }
        }
        Ok(gone)
    }
}
