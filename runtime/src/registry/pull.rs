//! `strata pull`: manifest (or index, then the platform's manifest), config, then the layers,
//! several at once.
//!
//! Each missing layer goes from the socket through a tee: one branch is the content store's
//! ingest file (the blob, kept for `save` and `push`), the other the applier, which hashes the
//! stream (blob digest and diffID) as it unpacks it into the layer's own snapshot. One pass over
//! the data. Layers unpack side by side, before the layers below them exist, so what depends on
//! the lowers (whiteouts hiding nothing, implied directories) is settled afterwards, bottom up,
//! as each snapshot is committed onto its parent chain. A layer whose snapshot exists is
//! skipped; one whose blob is here but not its snapshot is unpacked from the blob.
//!
//! Any failure removes every snapshot and blob this pull added: the store is as before. A pull
//! killed outright leaves its `pull-PID-*` snapshots and ingest files, swept by the next
//! command that opens the store ([`Images::sweep_stale`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use strata_overlay::{ApplyOptions, ApplyReport, Digest};

use super::client::{Body, Client, Options};
use crate::image::{Image, Images, Ingest, Reference, chain_id};
use crate::{Error, Result};

/// Media types a manifest request accepts, most wanted first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and configs above this are refused (registries cap manifests at 4 MiB).
const MANIFEST_LIMIT: u64 = 4 << 20;
const CONFIG_LIMIT: u64 = 16 << 20;

/// An OS/architecture to pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`.
    pub arch: String,
    /// e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// This machine's platform.
    pub fn host() -> Platform {
        Platform {
            os: "linux".into(),
            arch: crate::image::host_arch().into(),
            variant: None,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.into(),
                arch: arch.into(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.into(),
                arch: arch.into(),
                variant: Some(v.into()),
            }),
            _ => Err(Error::Invalid(format!(
                "invalid platform {s:?}: want os/arch[/variant], e.g. linux/amd64"
            ))),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    /// The image recorded.
    pub image: Image,
    /// The digest the reference resolved to (the index's, for a multi-platform image).
    pub digest: Digest,
    /// Layers downloaded.
    pub downloaded: usize,
    /// Layers already present.
    pub present: usize,
    /// Bytes downloaded (layer blobs).
    pub bytes: u64,
}

/// A manifest as fetched.
pub struct Fetched {
    /// The raw bytes (what the digest covers).
    pub bytes: Vec<u8>,
    /// Its digest.
    pub digest: Digest,
    /// Its media type (header, else the document's own field).
    pub media_type: String,
}

/// GETs manifest `reference` (tag or digest) of the client's repository, verified: against the
/// digest when `reference` is one, else against the registry's `Docker-Content-Digest`.
pub fn fetch_manifest(client: &Client, reference: &str) -> Result<Fetched> {
    let path = format!("/v2/{}/manifests/{reference}", client.repo());
    let r = client.expect(
        "GET",
        &path,
        &[("Accept", MANIFEST_ACCEPT)],
        Body::Empty,
        &[200],
    )?;
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
    };
    let content_type = header("content-type");
    let said = header("docker-content-digest");
    let bytes = client.read_small(r, MANIFEST_LIMIT)?;
    let digest = Digest::of(&bytes);
    let bad =
        |why: String| Error::Registry(format!("{}: manifest {reference}: {why}", client.host()));
    if reference.starts_with("sha256:") && reference != digest.to_string() {
        return Err(bad(format!("content has digest {digest}")));
    }
    if let Some(s) = said.filter(|s| s.starts_with("sha256:")) {
        if s != digest.to_string() {
            return Err(bad(format!(
                "the registry says its digest is {s}, its content has {digest}"
            )));
        }
    }
    let media_type = classify_manifest(&bytes, content_type.as_deref()).map_err(bad)?;
    Ok(Fetched {
        bytes,
        digest,
        media_type,
    })
}

/// The media type of a manifest document (its own `mediaType`, else the `Content-Type` it came
/// with, else guessed from its shape); refuses what is not JSON and Docker's schema 1.
pub fn classify_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<String, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    if !doc.is_object() {
        return Err("not a JSON object".into());
    }
    if doc["schemaVersion"].as_i64() == Some(1) {
        return Err(
            "Docker schema 1 manifests are deprecated and not supported: push the \
                    image again with a current client"
                .into(),
        );
    }
    Ok(doc["mediaType"]
        .as_str()
        .map(String::from)
        .or(content_type
            .filter(|c| c.starts_with("application/vnd."))
            .map(String::from))
        .unwrap_or_else(|| {
            if doc.get("manifests").is_some() {
                "application/vnd.oci.image.index.v1+json".into()
            } else {
                "application/vnd.oci.image.manifest.v1+json".into()
            }
        }))
}

/// True for an index / manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type.ends_with("image.index.v1+json") || media_type.ends_with("manifest.list.v2+json")
}

/// The manifest of `platform` in an index: its digest and size, or an error naming the
/// platforms the index has.
pub fn choose_platform(
    index: &ImageIndex,
    platform: &Platform,
    what: &str,
) -> Result<(Digest, u64)> {
    let mut seen = Vec::new();
    for m in index.manifests() {
        let Some(p) = m.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        seen.push(format!(
            "{os}/{arch}{}",
            p.variant()
                .as_ref()
                .map(|v| format!("/{v}"))
                .unwrap_or_default()
        ));
        let variant_ok = match (&platform.variant, p.variant()) {
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if os == platform.os && arch == platform.arch && variant_ok {
            let d: Digest = m
                .digest()
                .to_string()
                .parse()
                .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))?;
            return Ok((d, m.size()));
        }
    }
    Err(Error::NotFound(format!(
        "{what}: no image for {platform} (the index has: {})",
        if seen.is_empty() {
            "no platforms".to_string()
        } else {
            seen.join(", ")
        }
    )))
}

fn parse_digest(d: &oci_spec::image::Digest) -> Result<Digest> {
    d.to_string()
        .parse()
        .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))
}

/// GETs a small blob (config) whole, verified against `digest`.
fn fetch_small_blob(client: &Client, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
    let path = format!("/v2/{}/blobs/{digest}", client.repo());
    let r = client.expect("GET", &path, &[], Body::Empty, &[200])?;
    let bytes = client.read_small(r, limit)?;
    if Digest::of(&bytes) != *digest {
        return Err(Error::Registry(format!(
            "{}: blob {digest} arrived with digest {}",
            client.host(),
            Digest::of(&bytes)
        )));
    }
    Ok(bytes)
}

/// How to get one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Snapshot and blob are here.
    Skip,
    /// The snapshot is here, the blob is not: download it into the content store.
    BlobOnly,
    /// Neither: download and unpack in one pass.
    Fetch,
    /// The blob is here, the snapshot is not: unpack from the blob.
    Unpack,
}

struct Job {
    blob: Digest,
    size: u64,
    diff_id: Digest,
    chain: Digest,
    action: Action,
    /// The snapshot key and its upper dir, for the unpacking actions.
    target: Option<(String, PathBuf)>,
}

/// What one job did.
#[derive(Default)]
struct Done {
    report: Option<ApplyReport>,
    blob_new: bool,
    bytes: u64,
}

/// A reader that writes everything it reads into the ingest file, stops when the pull is
/// cancelled, refuses to read past the size the descriptor gave, and moves a progress bar.
struct Tee<'a, R> {
    inner: R,
    ingest: Ingest,
    cancel: &'a AtomicBool,
    /// The size the descriptor gave; the ingest file counts what has come.
    size: u64,
    bar: Option<&'a indicatif::ProgressBar>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: readers retry those.
            return Err(std::io::Error::other("cancelled: another layer failed"));
        }
        let n = self.inner.read(buf)?;
        if self.ingest.written() + n as u64 > self.size {
            return Err(std::io::Error::other(
                "the blob is larger than its descriptor says",
            ));
        }
        std::io::Write::write_all(&mut self.ingest, &buf[..n])?;
        if let Some(b) = self.bar {
            b.inc(n as u64);
        }
        Ok(n)
    }
}

fn is_cancel(e: &Error) -> bool {
    e.to_string().contains("cancelled: another layer failed")
}

/// Pulls `reference` into `images`. `platform` picks from an index; `show` draws a progress bar
/// per layer on a terminal.
pub fn pull(
    images: &mut Images,
    reference: &Reference,
    platform: &Platform,
    opts: &Options,
    show: bool,
) -> Result<Pulled> {
    let client = Client::connect(&reference.domain, &reference.path, "pull", opts)?;
    let wanted = reference
        .digest
        .clone()
        .or_else(|| reference.tag.clone())
        .unwrap_or_else(|| "latest".into());
    let top = fetch_manifest(&client, &wanted)?;
    let top_digest = top.digest;
    let manifest = if is_index(&top.media_type) {
        let index = ImageIndex::from_reader(&top.bytes[..])
            .map_err(|e| Error::Registry(format!("{}: index {wanted}: {e}", client.host())))?;
        let (d, _) = choose_platform(&index, platform, &reference.familiar())?;
        let m = fetch_manifest(&client, &d.to_string())?;
        if is_index(&m.media_type) {
            return Err(Error::Registry(format!(
                "{}: {d}: an index inside an index is not supported",
                client.host()
            )));
        }
        m
    } else {
        top
    };
    let parsed = ImageManifest::from_reader(&manifest.bytes[..]).map_err(|e| {
        Error::Registry(format!(
            "{}: manifest {}: {e}",
            client.host(),
            manifest.digest
        ))
    })?;
    let config_digest = parse_digest(parsed.config().digest())?;
    let config_bytes = fetch_small_blob(&client, &config_digest, CONFIG_LIMIT)?;
    let config = ImageConfiguration::from_reader(&config_bytes[..])
        .map_err(|e| Error::Registry(format!("{}: config {config_digest}: {e}", client.host())))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != parsed.layers().len() {
        return Err(Error::Registry(format!(
            "{}: image has {} layers but its config {} diffIDs",
            client.host(),
            parsed.layers().len(),
            diff_ids.len()
        )));
    }
    let mut jobs = Vec::new();
    let mut parent: Option<Digest> = None;
    {
        let (store, snap) = images.parts()?;
        for (layer, diff) in parsed.layers().iter().zip(diff_ids) {
            if layer.urls().as_ref().is_some_and(|u| !u.is_empty()) {
                return Err(Error::Registry(format!(
                    "layer {} is a foreign layer (fetched from {:?}): not supported",
                    layer.digest(),
                    layer.urls()
                )));
            }
            let diff_id: Digest = diff
                .parse()
                .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))?;
            let chain = chain_id(parent.as_ref(), &diff_id);
            let blob = parse_digest(layer.digest())?;
            let have_snap = snap.stat(&chain.to_string()).is_ok();
            let have_blob = store.has_blob(&blob);
            let action = match (have_snap, have_blob) {
                (true, true) => Action::Skip,
                (true, false) => Action::BlobOnly,
                (false, false) => Action::Fetch,
                (false, true) => Action::Unpack,
            };
            jobs.push(Job {
                blob,
                size: layer.size(),
                diff_id,
                chain,
                action,
                target: None,
            });
            parent = Some(chain);
        }
    }
    let mut added_blobs: Vec<Digest> = Vec::new();
    let mut created: Vec<Digest> = Vec::new();
    let parallel = if opts.parallel == 0 { 3 } else { opts.parallel };
    let result = fetch_and_unpack(
        images,
        &client,
        &mut jobs,
        &mut added_blobs,
        &mut created,
        parallel,
        show,
    )
    .and_then(|(downloaded, bytes, size)| {
        for bytes in [&config_bytes, &manifest.bytes] {
            let (d, new) = images.store.put_bytes(bytes)?;
            if new {
                added_blobs.push(d);
            }
        }
        let refs = if reference.tag.is_some() {
            vec![Reference {
                digest: None,
                ..reference.clone()
            }]
        } else {
            vec![reference.clone()]
        };
        let image = Image {
            manifest: manifest.digest,
            config: config_digest,
            created: config.created().clone(),
            size,
            tags: refs.clone(),
        };
        images.store.record(&[(image.clone(), refs)])?;
        Ok(Pulled {
            image,
            digest: top_digest,
            downloaded,
            present: jobs.iter().filter(|j| j.action == Action::Skip).count(),
            bytes,
        })
    });
    match result {
        Ok(p) => Ok(p),
        Err(e) => {
            if let Ok(snap) = images.snapshotter() {
                for j in &jobs {
                    if let Some((key, _)) = &j.target {
                        let _ = snap.remove(key);
                    }
                }
            }
            images.drop_chains(&created);
            for d in &added_blobs {
                images.store.remove_blob(d);
            }
            Err(e)
        }
    }
}

/// Runs the jobs on `opts.parallel` threads, then settles and commits the new layers bottom
/// up. Returns the layers downloaded, the bytes downloaded and the image's unpacked size.
fn fetch_and_unpack(
    images: &mut Images,
    client: &Client,
    jobs: &mut [Job],
    added_blobs: &mut Vec<Digest>,
    created: &mut Vec<Digest>,
    parallel: usize,
    show: bool,
) -> Result<(usize, u64, u64)> {
    let rootless = crate::rootless::rootless_layers();
    let pid = std::process::id();
    let base_opts = crate::image::apply_options(images.snapshotter()?);
    {
        let snap = images.snapshotter()?;
        for j in jobs.iter_mut() {
            if matches!(j.action, Action::Fetch | Action::Unpack) {
                let key = format!("pull-{pid}-{}", j.chain.hex());
                let mut labels = BTreeMap::new();
                labels.insert(crate::image::UNPACK_LABEL.to_string(), j.chain.to_string());
                snap.prepare(&key, "", labels)?;
                j.target = Some((key.clone(), snap.layer_dirs(&key)?.0));
            }
        }
    }
    let root = images.store.root().to_path_buf();
    let bars = super::blob_bars(show, jobs.iter().map(|j| (j.blob, j.size)));
    for (b, j) in bars.iter().zip(jobs.iter()) {
        match (b, j.action) {
            (Some(b), Action::Skip) => b.finish_with_message("exists"),
            (Some(b), Action::Unpack) => b.set_message("unpacking"),
            _ => {}
        }
    }
    let cancel = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Done>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let workers = parallel.min(jobs.len()).max(1);
    let jobs_ref: &[Job] = jobs;
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs_ref.get(i) else { break };
                    let bar = bars[i].as_ref();
                    let r = run_job(client, &root, job, &base_opts, &cancel, bar);
                    if let Some(b) = bar {
                        match &r {
                            Ok(_) if job.action == Action::Skip => {}
                            Ok(_) => b.finish_with_message("done"),
                            Err(_) => b.abandon_with_message("failed"),
                        }
                    }
                    if r.is_err() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                    results.lock().expect("results lock")[i] = Some(r);
                }
            });
        }
    });
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for r in results.into_inner().expect("results lock") {
        match r.expect("every job ran") {
            Ok(d) => done.push(Some(d)),
            Err(e) => {
                done.push(None);
                errors.push(e);
            }
        }
    }
    // Blobs stored by jobs are this pull's to remove on failure.
    for (j, d) in jobs.iter().zip(&done) {
        if d.as_ref().is_some_and(|d| d.blob_new) {
            added_blobs.push(j.blob);
        }
    }
    // The first real failure, not a layer stopped because of it.
    if !errors.is_empty() {
        let first = errors.iter().position(|e| !is_cancel(e)).unwrap_or(0);
        return Err(errors.swap_remove(first));
    }
    let mut size = 0;
    let mut downloaded = 0;
    let mut bytes = 0;
    let (store, snap) = images.parts()?;
    let mut below: Option<Digest> = None;
    for (j, d) in jobs.iter().zip(done) {
        let d = d.expect("no error, so every job is done");
        if matches!(j.action, Action::Fetch | Action::BlobOnly) {
            downloaded += 1;
            bytes += d.bytes;
        }
        if let (Some((key, upper)), Some(report)) = (&j.target, &d.report) {
            let lowers = match &below {
                Some(b) => snap.layer_stack(&b.to_string())?,
                None => Vec::new(),
            };
            strata_overlay::apply::settle_lowers(upper, &lowers, &report.deferred, rootless)?;
            let parent = below.map(|b| b.to_string());
            snap.commit(
                &j.chain.to_string(),
                key,
                Default::default(),
                parent.as_deref(),
            )?;
            store.record_layer(&j.chain, &j.diff_id, report.uncompressed)?;
            created.push(j.chain);
            size += report.uncompressed;
        } else {
            size += store.layer_size(&j.chain)?.unwrap_or(0);
        }
        below = Some(j.chain);
    }
    Ok((downloaded, bytes, size))
}

fn run_job(
    client: &Client,
    root: &Path,
    job: &Job,
    base_opts: &ApplyOptions,
    cancel: &AtomicBool,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<Done> {
    let mut opts = base_opts.clone();
    opts.expected_digest = Some(job.blob);
    opts.expected_diff_id = Some(job.diff_id);
    opts.defer_lowers = true;
    match job.action {
        Action::Skip => Ok(Done::default()),
        Action::Unpack => {
            let (_, upper) = job.target.as_ref().expect("prepared");
            let blob = root.join("content/blobs/sha256").join(job.blob.hex());
            let report = strata_overlay::apply_file(&blob, upper, &opts)?;
            Ok(Done {
                report: Some(report),
                ..Default::default()
            })
        }
        Action::Fetch | Action::BlobOnly => {
            if let Some(b) = bar {
                b.set_message("downloading");
            }
            let path = format!("/v2/{}/blobs/{}", client.repo(), job.blob);
            let r = client.expect("GET", &path, &[], Body::Empty, &[200])?;
            let mut tee = Tee {
                inner: Client::reader(r),
                ingest: Ingest::new(root)?,
                cancel,
                size: job.size,
                bar,
            };
            let report = if job.action == Action::Fetch {
                let (_, upper) = job.target.as_ref().expect("prepared");
                let reader = std::io::BufReader::with_capacity(256 << 10, &mut tee);
                Some(
                    strata_overlay::apply(reader, upper, &opts)
                        .map_err(|e| Error::Registry(format!("layer {}: {e}", job.blob)))?,
                )
            } else {
                std::io::copy(&mut tee, &mut std::io::sink())
                    .map_err(|e| Error::Registry(format!("layer {}: {e}", job.blob)))?;
                None
            };
            let bytes = tee.ingest.written();
            if bytes != job.size {
                return Err(Error::Registry(format!(
                    "layer {}: {} bytes short of the {} its descriptor says",
                    job.blob,
                    job.size - bytes,
                    job.size
                )));
            }
            let (_, _, blob_new) = tee.ingest.finish(Some(&job.blob))?;
            Ok(Done {
                report,
                blob_new,
                bytes,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cancelled tee fails its reader at once: std's readers retry `Interrupted` forever, which
    /// once left a layer spinning after another had failed.
    #[test]
    fn a_cancelled_tee_ends_its_reader() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("content/ingest")).unwrap();
        let cancel = AtomicBool::new(true);
        let mut tee = Tee {
            inner: &b"data that will never be read"[..],
            ingest: Ingest::new(t.path()).unwrap(),
            cancel: &cancel,
            size: 100,
            bar: None,
        };
        let mut out = Vec::new();
        let e = std::io::BufReader::new(&mut tee)
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(e.to_string().contains("cancelled"), "{e}");
    }

    #[test]
    fn platforms_parse() {
        assert_eq!(
            "linux/arm64/v8".parse::<Platform>().unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//".parse::<Platform>().is_err());
    }

    #[test]
    fn the_host_platform_is_chosen_from_an_index() {
        let index = ImageIndex::from_reader(
            &br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":10,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":20,"platform":{"os":"linux","architecture":"amd64"}}]}"#[..],
        )
        .unwrap();
        let amd = Platform {
            os: "linux".into(),
            arch: "amd64".into(),
            variant: None,
        };
        assert_eq!(choose_platform(&index, &amd, "x").unwrap().1, 20);
        let arm: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(choose_platform(&index, &arm, "x").unwrap().1, 10);
        let e = choose_platform(&index, &"linux/s390x".parse().unwrap(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux/arm64/v8, linux/amd64"), "{e}");
    }
}
