//! `strata layer demo`: the layer lifecycle on an embedded base layer, printed step by step.
//!
//! Needs no download and nothing installed: the base layer is built in memory from embedded
//! files. It applies the layer, mounts it with kernel overlayfs, changes files in the merged
//! view (write, delete, rename a lower directory, chmod a lower file), lists the changes, takes
//! the native diff, applies that diff as a new layer and checks the new two-layer stack shows
//! exactly the tree the container saw.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use strata_overlay::archive::{Entry, Kind, Writer};
use strata_overlay::compress::{Compression, Encoder};
use strata_overlay::diff::{self, DiffOptions, LowerView};
use strata_overlay::mount::{Overlay, unmount};
use strata_overlay::{ApplyOptions, apply, probe};

const FILES: &[(&str, &str, u32)] = &[
    ("etc/os-release", "NAME=\"Strata demo\"\nID=strata\n", 0o644),
    ("etc/motd", "Welcome to the base layer.\n", 0o644),
    (
        "usr/share/doc/README",
        "Documentation that the container deletes.\n",
        0o644,
    ),
    (
        "usr/bin/greet",
        "#!/bin/sh\necho hello from a lower layer\n",
        0o755,
    ),
    ("var/lib/app/data-1", "one\n", 0o600),
    ("var/lib/app/data-2", "two\n", 0o600),
];

/// Builds the embedded base layer as a tar+gzip blob.
pub fn base_layer() -> Result<Vec<u8>> {
    let mut w = Writer::new(Encoder::new(Vec::new(), Compression::Gzip, 0)?);
    let mut dirs: Vec<String> = Vec::new();
    for (path, _, _) in FILES {
        let mut acc = String::new();
        for comp in Path::new(path).parent().into_iter().flat_map(|p| p.iter()) {
            acc = if acc.is_empty() {
                comp.to_string_lossy().into()
            } else {
                format!("{acc}/{}", comp.to_string_lossy())
            };
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
            }
        }
    }
    for d in &dirs {
        let mut e = Entry::new(format!("{d}/"), Kind::Dir);
        e.mode = 0o755;
        e.mtime = 1_700_000_000;
        w.append(&e, &mut std::io::empty())?;
    }
    for (path, content, mode) in FILES {
        let mut e = Entry::new(*path, Kind::File);
        e.mode = *mode;
        e.size = content.len() as u64;
        e.mtime = 1_700_000_000;
        w.append(&e, &mut content.as_bytes())?;
    }
    Ok(w.finish()?.finish()?)
}

/// Runs the demo, printing each step to `out`.
pub fn run(keep: bool, out: &mut dyn Write) -> Result<()> {
    let base_dir = std::env::temp_dir().join(format!("strata-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base_dir)?;
    let result = steps(&base_dir, out);
    let merged = base_dir.join("merged");
    let view = base_dir.join("view");
    for m in [&merged, &view] {
        let _ = unmount(m, true);
    }
    if keep {
        writeln!(out, "kept {}", base_dir.display())?;
    } else {
        let _ = std::fs::remove_dir_all(&base_dir);
    }
    result
}

fn steps(dir: &Path, out: &mut dyn Write) -> Result<()> {
    let features = probe::probe(dir);
    writeln!(
        out,
        "== 1. kernel overlay features on {} ({})",
        dir.display(),
        features.backing_fs
    )?;
    if !features.overlay {
        bail!(
            "kernel overlayfs cannot mount here: {} (run as root, or inside `unshare -Ur`)",
            features.error.unwrap_or_default()
        );
    }
    let opts = features.options();
    writeln!(
        out,
        "   metacopy={} redirect_dir={} userxattr={} index=off:{}",
        opts.metacopy, opts.redirect_dir, opts.userxattr, opts.index_off
    )?;

    let blob = base_layer()?;
    let base = dir.join("layers/base");
    std::fs::create_dir_all(dir.join("layers"))?;
    let mut aopts = if features.in_userns {
        ApplyOptions::rootless()
    } else {
        ApplyOptions::default()
    };
    aopts.sync = false;
    aopts.parents = Some(Vec::new());
    let r = apply(&blob[..], &base, &aopts).context("applying the base layer")?;
    writeln!(
        out,
        "== 2. applied the embedded base layer ({} bytes, {}): {} entries",
        r.size, r.compression, r.entries
    )?;
    writeln!(out, "   diffID {}\n   digest {}", r.diff_id, r.digest)?;

    let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d)?;
    }
    let ov = Overlay {
        lowers: vec![base.clone()],
        upper: Some(upper.clone()),
        work: Some(work),
        options: opts,
    };
    ov.mount(&merged)
        .context("mounting the container's overlay")?;
    writeln!(
        out,
        "== 3. mounted overlay: {}",
        ov.to_mount().options.join(",")
    )?;

    std::fs::write(merged.join("etc/motd"), "Changed by the container.\n")?;
    std::fs::remove_file(merged.join("usr/share/doc/README"))?;
    std::fs::write(merged.join("etc/new-file"), "added\n")?;
    std::fs::rename(
        merged.join("var/lib/app"),
        merged.join("var/lib/app-renamed"),
    )
    .context("renaming a lower directory")?;
    std::fs::set_permissions(
        merged.join("usr/bin/greet"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    writeln!(
        out,
        "== 4. in the container: rewrote etc/motd, deleted usr/share/doc/README, added etc/new-file,"
    )?;
    writeln!(
        out,
        "      renamed var/lib/app (a lower dir) and chmod 700 usr/bin/greet (a lower file)"
    )?;

    let seen = diff::changes_generic(&base, &merged)?;
    unmount(&merged, false)?;
    writeln!(out, "== 5. changes (strata layer changes):")?;
    for c in diff::changes_native(&upper, &LowerView::new(vec![base.clone()]))? {
        writeln!(out, "   {c}")?;
    }

    let dopts = DiffOptions {
        compression: Compression::Zstd,
        threads: 0,
        lowers: vec![base.clone()],
    };
    let (d, blob2) = diff::native(&upper, Vec::new(), &dopts)?;
    writeln!(
        out,
        "== 6. native diff of the upper: {} entries, {} bytes zstd",
        d.entries, d.size
    )?;
    writeln!(out, "   diffID {}\n   digest {}", d.diff_id, d.digest)?;

    let layer2 = dir.join("layers/l2");
    let r2 = apply(
        &blob2[..],
        &layer2,
        &ApplyOptions {
            expected_digest: Some(d.digest),
            expected_diff_id: Some(d.diff_id),
            parents: Some(vec![base.clone()]),
            ..aopts
        },
    )?;
    let view = dir.join("view");
    std::fs::create_dir_all(&view)?;
    let ro = Overlay {
        lowers: vec![layer2, base.clone()],
        upper: None,
        work: None,
        options: strata_overlay::mount::Options {
            readonly: true,
            ..opts
        },
    };
    ro.mount(&view)?;
    let now = diff::changes_generic(&base, &view);
    let greet = std::fs::read_to_string(view.join("usr/bin/greet"));
    unmount(&view, false)?;
    let now = now?;
    writeln!(
        out,
        "== 7. applied the diff as a new layer ({} entries, digests verified) and mounted base+new read-only",
        r2.entries
    )?;
    ensure!(
        now == seen,
        "the new layer stack differs from the container's view:\n{now:?}\nvs\n{seen:?}"
    );
    ensure!(
        greet?.contains("hello from a lower layer"),
        "metacopy data lost"
    );
    writeln!(
        out,
        "   the stack shows exactly the container's tree ({} changed paths, same as in the container)",
        now.len()
    )?;
    writeln!(out, "== done")?;
    Ok(())
}
