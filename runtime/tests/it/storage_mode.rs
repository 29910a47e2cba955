//! `--storage-mode`: a store whose root is on kernel overlayfs (nested overlay, which the kernel
//! refuses as an upper). Overlay mode says why it cannot serve; auto picks Strata's FUSE union,
//! says why in `strata info`, and the whole lifecycle works through it.

use std::path::{Path, PathBuf};

use crate::support::{fails, image_archive, ok, require_root, scratch, st};

const IMG: &str = "localhost/img:latest";

/// An overlay mount at `dir/m`, unmounted (lazily, with whatever is mounted below) on drop.
struct Outer(PathBuf);

impl Outer {
    fn new(dir: &Path) -> Outer {
        for d in ["l", "u", "w", "m"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        strata_overlay::Overlay {
            lowers: vec![dir.join("l")],
            upper: Some(dir.join("u")),
            work: Some(dir.join("w")),
            options: Default::default(),
        }
        .mount(&dir.join("m"))
        .unwrap();
        Outer(dir.join("m"))
    }
}

impl Drop for Outer {
    fn drop(&mut self) {
        for m in strata_overlay::mount::mounts_below(&self.0).unwrap_or_default() {
            let _ = strata_overlay::mount::unmount(&m, true);
        }
        let _ = strata_overlay::mount::unmount(&self.0, true);
    }
}

fn fuse_mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains(" - fuse") && l.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn auto_mode_runs_containers_through_fuse_where_kernel_overlay_cannot_mount() {
    require_root();
    let t = scratch();
    let base = t.path().canonicalize().unwrap();
    let archive = image_archive(&base, "img.tar");
    let outer = Outer::new(&base);
    let root = outer.0.join("strata");

    // Overlay mode cannot serve here, and says why and what would.
    let err = fails(
        st(&root)
            .args(["--storage-mode", "overlay", "load", "-i"])
            .arg(&archive),
        "kernel overlayfs cannot mount",
    );
    assert!(err.contains("fuse or auto mode"), "{err}");

    // auto (the default) falls back to FUSE and says why.
    ok(st(&root).arg("load").arg("-i").arg(&archive));
    let info = ok(st(&root).arg("info"));
    assert!(info.contains("Storage Mode: auto (from default)"), "{info}");
    assert!(
        info.contains("Backend: fuse (kernel overlayfs cannot mount on"),
        "{info}"
    );
    // An overlayfs makes no char 0:0 on itself: the layers keep deletions as `.wh.` files.
    assert!(info.contains("Layer Form: wh"), "{info}");
    let found = ok(std::process::Command::new("find")
        .arg(root.join("snapshotter/snapshots"))
        .args(["-name", ".wh.to-delete", "-o", "-type", "c", "-print"]));
    assert!(found.is_empty(), "char devices in the layers: {found}");
    let wh = ok(std::process::Command::new("find")
        .arg(root.join("snapshotter/snapshots"))
        .args(["-name", ".wh.to-delete"]));
    assert_eq!(wh.lines().count(), 1, "the image's deletion: {wh}");

    // Lower layers read through FUSE, a deletion by an upper layer holds.
    let out = ok(st(&root).args([
        "run",
        "--rm",
        IMG,
        "/bin/sh",
        "-c",
        "cat /etc/from-lower /etc/upper-file; test ! -e /etc/to-delete && echo gone",
    ]));
    assert_eq!(out, "from the lower layer\nfrom the upper layer\ngone\n");

    // A container's changes: diff, commit, and the committed image run again.
    ok(st(&root).args([
        "run",
        "--name",
        "c",
        IMG,
        "/bin/sh",
        "-c",
        "echo new > /etc/new && rm /etc/from-lower && echo more >> /etc/upper-file",
    ]));
    let diff = ok(st(&root).args(["diff", "c"]));
    for line in ["A /etc/new", "D /etc/from-lower", "C /etc/upper-file"] {
        assert!(
            diff.lines().any(|l| l == line),
            "{line} missing in:\n{diff}"
        );
    }
    ok(st(&root).args(["commit", "c", "localhost/committed:latest"]));
    let out = ok(st(&root).args([
        "run",
        "--rm",
        "localhost/committed:latest",
        "/bin/sh",
        "-c",
        "cat /etc/new /etc/upper-file; test ! -e /etc/from-lower && echo gone",
    ]));
    assert_eq!(out, "new\nfrom the upper layer\nmore\ngone\n");
    ok(st(&root).args(["rm", "c"]));
    assert!(
        fuse_mounts_below(&base).is_empty(),
        "FUSE mounts left: {:?}",
        fuse_mounts_below(&base)
    );
    // Explicitly FUSE: the same.
    let out = ok(st(&root).args([
        "--storage-mode",
        "fuse",
        "run",
        "--rm",
        IMG,
        "cat",
        "/etc/from-lower",
    ]));
    assert_eq!(out, "from the lower layer\n");
    drop(outer);
}

#[test]
fn the_storage_mode_comes_from_the_flag_the_environment_or_the_config_file() {
    let t = scratch();
    let (root, config) = (t.path().join("none-yet"), t.path().join("config"));
    std::fs::create_dir_all(config.join("strata")).unwrap();
    let info = |args: &[&str], env: Option<&str>| {
        let mut c = st(&root);
        c.env("XDG_CONFIG_HOME", &config)
            .env_remove("STRATA_STORAGE_MODE");
        if let Some(v) = env {
            c.env("STRATA_STORAGE_MODE", v);
        }
        ok(c.args(args).arg("info"))
    };
    assert!(info(&[], None).contains("Storage Mode: auto (from default)"));
    std::fs::write(
        config.join("strata/config.json"),
        r#"{"storage-mode": "fuse"}"#,
    )
    .unwrap();
    assert!(info(&[], None).contains("Storage Mode: fuse (from "));
    assert!(
        info(&[], Some("overlay")).contains("Storage Mode: overlay (from STRATA_STORAGE_MODE)")
    );
    assert!(
        info(&["--storage-mode", "auto"], Some("overlay"))
            .contains("Storage Mode: auto (from --storage-mode)")
    );
    assert!(!root.exists(), "info creates no store");
    let mut bad = st(&root);
    bad.env("XDG_CONFIG_HOME", &config)
        .env("STRATA_STORAGE_MODE", "zfs")
        .arg("info");
    fails(&mut bad, "STRATA_STORAGE_MODE");
    std::fs::write(config.join("strata/config.json"), r#"{"storage-mode": 3}"#).unwrap();
    let mut bad = st(&root);
    bad.env("XDG_CONFIG_HOME", &config)
        .env_remove("STRATA_STORAGE_MODE")
        .arg("info");
    fails(&mut bad, "storage-mode must be a string");
}
