//! `strata demo`: the image and container lifecycle on a base image built from this machine,
//! printed step by step.
//!
//! Needs no download and nothing installed: the base image is made from the host's own
//! `/bin/sh` and a few core utilities plus the shared libraries `ldd` names for them, written
//! as an OCI image layout archive. Then, in a store of its own, the demo loads it, runs a
//! container that writes and deletes files, lists the changes (`diff`), commits them as a new
//! image (adopting the container's upper dir), runs that image, shows `ps -s` sizes, shows a
//! volume outliving its container, and removes everything again.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use strata_overlay::Compression;
use strata_overlay::archive::{Entry, Kind, Writer};
use strata_overlay::diff::DiffOptions;

use crate::container::{self, RunOptions, commit::CommitOptions};
use crate::image::{Images, load};

/// The utilities copied into the base image (those found on this machine).
const TOOLS: &[&str] = &[
    "sh", "ls", "cat", "echo", "rm", "mkdir", "touch", "mv", "wc", "id", "hostname", "sleep",
    "head", "test",
];

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/bin", "/usr/bin", "/sbin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The shared libraries (and loader) `bin` needs, as `ldd` lists them.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd on {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn copy_in(rootfs: &Path, host: &Path, inside: &Path) -> Result<()> {
    let dst = rootfs.join(inside.strip_prefix("/").unwrap_or(inside));
    if dst.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dst.parent().expect("has a parent"))?;
    // Symlinks (sh -> dash, lib names) are resolved: the image holds the real files.
    std::fs::copy(host, &dst).with_context(|| format!("copying {}", host.display()))?;
    Ok(())
}

/// Builds the base rootfs from the host's tools under `rootfs`; returns the tools found.
fn build_rootfs(rootfs: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for t in TOOLS {
        let Some(host) = find_tool(t) else { continue };
        copy_in(rootfs, &host, &Path::new("/bin").join(t))?;
        for lib in libraries(&host)? {
            copy_in(rootfs, &lib, &lib)?;
        }
        found.push(t.to_string());
    }
    ensure!(
        found.iter().any(|t| t == "sh"),
        "no /bin/sh on this machine to build the demo image from"
    );
    for d in ["etc", "tmp", "root", "data"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::write(
        rootfs.join("etc/motd"),
        "Welcome to the Strata demo image.\n",
    )?;
    std::fs::write(rootfs.join("data/seed"), "seeded by the image\n")?;
    Ok(found)
}

/// Writes `rootfs` as a one-layer OCI image layout archive at `out`, tagged `name`.
fn write_archive(rootfs: &Path, out: &Path, name: &str, tmp: &Path) -> Result<()> {
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty)?;
    let opts = DiffOptions {
        compression: Compression::Gzip,
        threads: 0,
        lowers: Vec::new(),
    };
    let (report, layer) = strata_overlay::diff::generic(&empty, rootfs, Vec::new(), &opts)?;
    let config = serde_json::to_vec(&json!({
        "created": crate::time::now(), "architecture": crate::image::host_arch(), "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "Volumes": {} },
        "rootfs": { "type": "layers", "diff_ids": [report.diff_id.to_string()] },
        "history": [{ "created": crate::time::now(), "created_by": "strata demo: the host's /bin/sh and core utilities" }],
    }))?;
    let config_d = strata_overlay::Digest::of(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d.to_string(), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": report.digest.to_string(), "size": layer.len() }],
    }))?;
    let manifest_d = strata_overlay::Digest::of(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_d.to_string(), "size": manifest.len(),
                        "annotations": { "org.opencontainers.image.ref.name": name } }],
    }))?;
    let mut w = Writer::new(std::io::BufWriter::new(std::fs::File::create(out)?));
    let mut put = |path: String, data: &[u8]| -> Result<()> {
        let mut e = Entry::new(path, Kind::File);
        e.mode = 0o644;
        e.size = data.len() as u64;
        w.append(&e, &mut &data[..])?;
        Ok(())
    };
    put("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    put("index.json".into(), &index)?;
    for (d, data) in [
        (config_d, &config),
        (manifest_d, &manifest),
        (report.digest, &layer),
    ] {
        put(format!("blobs/sha256/{}", d.hex()), data)?;
    }
    w.finish()?.flush()?;
    Ok(())
}

/// Runs the demo, printing each step to `out`. `keep` leaves the demo's store in place.
pub fn run(keep: bool, out: &mut dyn Write) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo runs containers with kernel overlay mounts: run it as root (sudo)");
    }
    let base = std::env::temp_dir().join(format!("strata-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let result = steps(&base, out);
    if keep {
        writeln!(out, "kept {}", base.display())?;
    } else {
        let _ = std::fs::remove_dir_all(&base);
    }
    result
}

fn steps(base: &Path, out: &mut dyn Write) -> Result<()> {
    let root = base.join("store");
    let rootfs = base.join("rootfs");
    let archive = base.join("base.tar");
    let tools = build_rootfs(&rootfs)?;
    write_archive(&rootfs, &archive, "demo/base:latest", base)?;
    writeln!(
        out,
        "== 1. built a base image from this machine: {} and their shared libraries ({} bytes, OCI archive)",
        tools.join(" "),
        std::fs::metadata(&archive)?.len()
    )?;
    let mut images = Images::open(&root)?;
    let loaded = load(&mut images, &archive)?;
    let img = &loaded[0].0;
    writeln!(
        out,
        "== 2. strata load -i base.tar: image {} ({} bytes unpacked)",
        &img.config.hex()[..12],
        img.size
    )?;

    let sh = |script: &str, name: Option<&str>, volumes: Vec<String>, image: &str| RunOptions {
        image: image.into(),
        cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
        name: name.map(String::from),
        volumes,
        ..Default::default()
    };
    let run = |images: &mut Images, o: RunOptions| -> Result<(container::Container, i32)> {
        let c = container::create(images, &root, &o)?;
        let code = container::start(&c, true)?.unwrap_or(0);
        Ok((c, code))
    };
    writeln!(
        out,
        "== 3. strata run --name demo demo/base sh -c '...': write, delete, change"
    )?;
    let (c, code) = run(
        &mut images,
        sh(
            "echo hello from the container > /greeting; rm /etc/motd; echo more >> /data/seed; mkdir -p /srv/app; echo ok > /srv/app/state; echo '   (in the container) hostname' $(hostname)",
            Some("demo"),
            Vec::new(),
            "demo/base:latest",
        ),
    )?;
    ensure!(code == 0, "the container exited with {code}");
    writeln!(out, "== 4. strata diff demo:")?;
    let changes = container::commit::changes(&mut images, &c)?;
    for ch in &changes {
        writeln!(out, "   {ch}")?;
    }
    ensure!(
        changes.iter().any(|c| c.to_string() == "A /greeting")
            && changes.iter().any(|c| c.to_string() == "D /etc/motd"),
        "diff misses the container's changes"
    );
    let rw = container::commit::rw_size(&mut images, &c)?;
    writeln!(
        out,
        "== 5. strata ps -a -s: demo  SIZE {rw}B (virtual {}B)",
        rw + img.size
    )?;
    let done = container::commit::commit(
        &mut images,
        &c,
        &CommitOptions {
            reference: Some("demo/committed:v1".parse()?),
            message: Some("the demo's changes".into()),
            changes: vec!["CMD [\"cat\", \"/greeting\", \"/srv/app/state\"]".into()],
            ..Default::default()
        },
    )?;
    writeln!(
        out,
        "== 6. strata commit demo demo/committed:v1: image {} with layer {} ({} bytes gzip); snapshot {:?} (not unpacked again)",
        &done.image.config.hex()[..12],
        done.diff_id,
        done.blob_size,
        done.adoption
    )?;
    ensure!(
        container::commit::changes(&mut images, &c)? == changes,
        "the container changed through commit"
    );
    writeln!(
        out,
        "== 7. strata run --rm demo/committed:v1 (its CMD cats the committed files):"
    )?;
    let (c2, code) = run(
        &mut images,
        RunOptions {
            image: "demo/committed:v1".into(),
            ..Default::default()
        },
    )?;
    ensure!(
        code == 0,
        "the committed image's container exited with {code}"
    );
    container::remove(&mut images, &root, &c2, false, true)?;
    writeln!(out, "== 8. volumes: a named volume outlives its container")?;
    let (v1, code) = run(
        &mut images,
        sh(
            "echo '   (first) the empty volume was filled from the image:' $(head -1 /data/seed); echo kept > /data/note",
            None,
            vec!["demo-data:/data".into()],
            "demo/base:latest",
        ),
    )?;
    ensure!(code == 0, "the volume writer exited with {code}");
    container::remove(&mut images, &root, &v1, false, true)?;
    let (v2, code) = run(
        &mut images,
        sh(
            "echo '   (second) reads:' $(cat /data/note)",
            None,
            vec!["demo-data:/data".into()],
            "demo/base:latest",
        ),
    )?;
    ensure!(code == 0, "the volume reader exited with {code}");
    container::remove(&mut images, &root, &v2, false, true)?;
    writeln!(
        out,
        "== 9. cleanup: rm demo, rmi both images, volume rm demo-data"
    )?;
    container::remove(&mut images, &root, &c, false, true)?;
    crate::volume::remove(&root, "demo-data", false)?;
    for name in ["demo/committed:v1", "demo/base:latest"] {
        let img = images.store.resolve(name)?;
        images.delete(&img)?;
    }
    drop(images);
    let left = std::fs::read_dir(root.join("snapshotter/snapshots"))?.count();
    ensure!(left == 0, "{left} snapshots left after cleanup");
    writeln!(out, "== done: the store is empty again")?;
    Ok(())
}
