//! `strata push`: the blobs the registry lacks, then the manifest.
//!
//! For each blob (layers, then the config): `HEAD` says whether the repository has it; if not,
//! a cross-repository mount is asked for from every other repository of the same registry the
//! image is tagged in (`POST .../uploads/?mount=D&from=REPO`: 201 is done, 202 opens an upload
//! instead); else an upload: monolithic (`POST`, then `PUT ?digest=` with the whole blob) up to
//! [`CHUNK`], chunked above (`PATCH` per chunk with its `Content-Range`, then the closing `PUT`).
//! Blobs go up several at once. The manifest is `PUT` last, with its own media type, and the
//! digest the registry answers must be ours.

use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use strata_overlay::Digest;

use super::auth::query_escape;
use super::client::{Body, Client, Options};
use crate::image::{Image, Images, Reference};
use crate::{Error, Result};

/// Blobs above this size are uploaded in chunks of this size.
pub const CHUNK: u64 = 64 << 20;

/// What a push did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// The manifest's digest.
    pub digest: Option<Digest>,
    /// The manifest's size.
    pub size: usize,
    /// Blobs uploaded.
    pub uploaded: usize,
    /// Blobs the registry had.
    pub existed: usize,
    /// Blobs mounted from another repository.
    pub mounted: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Existed,
    Mounted,
    Uploaded(u64),
}

/// Pushes `img` as `target` (`target.tag`, or its digest when it has none).
pub fn push(
    images: &Images,
    img: &Image,
    target: &Reference,
    opts: &Options,
    show: bool,
) -> Result<Pushed> {
    let client = Client::connect(&target.domain, &target.path, "pull,push", opts)?;
    let manifest = images.store.read_blob(&img.manifest)?;
    let parsed = images.parse(img)?;
    let mut blobs: Vec<(Digest, u64, std::path::PathBuf)> = Vec::new();
    for l in parsed.manifest.layers() {
        let d = digest_of(l.digest())?;
        blobs.push((d, l.size(), images.store.blob_path(&d)));
    }
    let c = img.config;
    blobs.push((
        c,
        parsed.manifest.config().size(),
        images.store.blob_path(&c),
    ));
    for (d, _, _) in &blobs {
        if !images.store.has_blob(d) {
            return Err(Error::NotFound(format!(
                "blob {d} of image {} is not in the store: pull or load the image again",
                img.config
            )));
        }
    }
    let sources: Vec<String> = img
        .tags
        .iter()
        .filter(|t| t.domain == target.domain && t.path != target.path)
        .map(|t| t.path.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let bars = super::blob_bars(show, blobs.iter().map(|(d, size, _)| (*d, *size)));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Outcome>>>> =
        Mutex::new((0..blobs.len()).map(|_| None).collect());
    let workers = opts.parallel.max(1).min(blobs.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((d, _, path)) = blobs.get(i) else {
                        break;
                    };
                    let bar = bars[i].as_ref();
                    let r = push_blob(&client, d, path, &sources, bar);
                    if let Some(b) = bar {
                        match &r {
                            Ok(Outcome::Existed) => b.finish_with_message("exists"),
                            Ok(Outcome::Mounted) => b.finish_with_message("mounted"),
                            Ok(Outcome::Uploaded(_)) => b.finish_with_message("pushed"),
                            Err(_) => b.abandon_with_message("failed"),
                        }
                    }
                    results.lock().expect("results lock")[i] = Some(r);
                }
            });
        }
    });
    let mut out = Pushed::default();
    for r in results.into_inner().expect("results lock") {
        match r.expect("every blob ran")? {
            Outcome::Existed => out.existed += 1,
            Outcome::Mounted => out.mounted += 1,
            Outcome::Uploaded(n) => {
                out.uploaded += 1;
                out.bytes += n;
            }
        }
    }
    let media_type = serde_json::from_slice::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(String::from))
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
    let reference = target
        .tag
        .clone()
        .unwrap_or_else(|| img.manifest.to_string());
    let path = format!("/v2/{}/manifests/{reference}", client.repo());
    let r = client.expect(
        "PUT",
        &path,
        &[("Content-Type", &media_type)],
        Body::Bytes(&manifest),
        &[200, 201],
    )?;
    if let Some(said) = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        if said != img.manifest.to_string() {
            return Err(Error::Registry(format!(
                "{}: the registry stored the manifest as {said}, not {}",
                client.host(),
                img.manifest
            )));
        }
    }
    out.digest = Some(img.manifest);
    out.size = manifest.len();
    Ok(out)
}

fn digest_of(d: &oci_spec::image::Digest) -> Result<Digest> {
    d.to_string()
        .parse()
        .map_err(|e: strata_overlay::Error| Error::Invalid(e.to_string()))
}

/// The `Location` of an upload response, as a URL or path the client takes.
fn location(client: &Client, r: &ureq::http::Response<ureq::Body>) -> Result<String> {
    let l = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Error::Registry(format!(
                "{}: an upload answer without a Location",
                client.host()
            ))
        })?;
    if l.starts_with("http://") || l.starts_with("https://") || l.starts_with('/') {
        Ok(l.to_string())
    } else {
        Err(Error::Registry(format!(
            "{}: upload Location {l:?} is neither a URL nor a path",
            client.host()
        )))
    }
}

fn with_digest(loc: &str, d: &Digest) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={}", query_escape(&d.to_string()))
}

fn push_blob(
    client: &Client,
    d: &Digest,
    file: &std::path::Path,
    sources: &[String],
    bar: Option<&indicatif::ProgressBar>,
) -> Result<Outcome> {
    let repo = client.repo();
    let head = client.send("HEAD", &format!("/v2/{repo}/blobs/{d}"), &[], Body::Empty)?;
    match head.status().as_u16() {
        200 => return Ok(Outcome::Existed),
        404 => {}
        _ => return Err(client.failure("HEAD", &format!("/v2/{repo}/blobs/{d}"), head)),
    }
    let mut session = None;
    for from in sources {
        let path = format!(
            "/v2/{repo}/blobs/uploads/?mount={}&from={}",
            query_escape(&d.to_string()),
            query_escape(from)
        );
        let r = client.send("POST", &path, &[], Body::Empty)?;
        match r.status().as_u16() {
            201 => return Ok(Outcome::Mounted),
            // Not mounted: the registry opened an upload instead.
            202 => {
                session = Some(location(client, &r)?);
                break;
            }
            // No access to the other repository: upload.
            401 | 403 | 404 => {}
            _ => return Err(client.failure("POST", &path, r)),
        }
    }
    let loc = match session {
        Some(l) => l,
        None => {
            let path = format!("/v2/{repo}/blobs/uploads/");
            let r = client.expect("POST", &path, &[], Body::Empty, &[202])?;
            location(client, &r)?
        }
    };
    if let Some(b) = bar {
        b.set_message("pushing");
    }
    let f = std::fs::File::open(file).map_err(|e| Error::io("open", file, e))?;
    let size = f.metadata().map_err(|e| Error::io("stat", file, e))?.len();
    let octets = ("Content-Type", "application/octet-stream");
    let done = if size <= CHUNK {
        let r = client.expect(
            "PUT",
            &with_digest(&loc, d),
            &[octets],
            Body::File(&f),
            &[201],
        )?;
        if let Some(b) = bar {
            b.inc(size);
        }
        r
    } else {
        let mut loc = loc;
        let mut start = 0u64;
        let mut buf = Vec::with_capacity(CHUNK as usize);
        let mut reader = &f;
        loop {
            buf.clear();
            (&mut reader)
                .take(CHUNK)
                .read_to_end(&mut buf)
                .map_err(|e| Error::io("read", file, e))?;
            if buf.is_empty() {
                break;
            }
            let end = start + buf.len() as u64 - 1;
            let range = format!("{start}-{end}");
            let r = client.expect(
                "PATCH",
                &loc,
                &[octets, ("Content-Range", &range)],
                Body::Bytes(&buf),
                &[202],
            )?;
            loc = location(client, &r)?;
            start = end + 1;
            if let Some(b) = bar {
                b.inc(buf.len() as u64);
            }
        }
        client.expect("PUT", &with_digest(&loc, d), &[], Body::Empty, &[201])?
    };
    if let Some(said) = done
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
    {
        if said != d.to_string() {
            return Err(Error::Registry(format!(
                "{}: blob {d} was stored as {said}",
                client.host()
            )));
        }
    }
    Ok(Outcome::Uploaded(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_join_upload_locations() {
        let d = Digest::of(b"x");
        assert_eq!(
            with_digest("/v2/a/blobs/uploads/u?_state=s", &d),
            format!("/v2/a/blobs/uploads/u?_state=s&digest=sha256%3A{}", d.hex())
        );
        assert!(with_digest("/v2/a/blobs/uploads/u", &d).contains("u?digest="));
    }
}
