//! Interop with the real tools: umoci writes layers Strata applies with umoci's digests, and a
//! layer Strata diffs is taken by `umoci raw add-layer`, unpacked by umoci to the same tree, and
//! copied (digests verified) by skopeo.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use strata_overlay::diff::{self, DiffOptions};
use strata_overlay::mount::{Options, Overlay, unmount};
use strata_overlay::{ApplyOptions, Compression, Digest, apply_file};

use crate::support::{Prereq, require, scratch, snapshot, xattr_set};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> std::path::PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

/// (manifest, config) of tag `tag` in an OCI layout.
fn image(layout: &Path, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let index = json(&layout.join("index.json"));
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let manifest = json(&blob(layout, m["digest"].as_str().unwrap()));
    let config = json(&blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    (manifest, config)
}

fn fill(root: &Path) {
    std::fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    std::fs::write(root.join("etc/hostname"), b"umoci\n").unwrap();
    std::fs::write(root.join("etc/conf.d/a"), vec![b'a'; 10_000]).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("tool", root.join("usr/bin/link")).unwrap();
    std::os::unix::fs::chown(root.join("etc/conf.d/a"), Some(33), Some(44)).unwrap();
    xattr_set(&root.join("etc/hostname"), "user.origin", b"umoci").unwrap();
}

#[test]
fn umoci_layers_apply_and_strata_layers_unpack_with_umoci_and_copy_with_skopeo() {
    require(Prereq::Root);
    require(Prereq::Command("umoci"));
    require(Prereq::Command("skopeo"));
    let t = scratch();
    let layout = t.path().join("layout");
    let bundle = t.path().join("bundle");
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout));
    run(Command::new("umoci")
        .args(["new", "--image"])
        .arg(format!("{}:base", layout.display())));
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:base", layout.display()))
        .arg(&bundle));
    fill(&bundle.join("rootfs"));
    run(Command::new("umoci")
        .args(["repack", "--image"])
        .arg(format!("{}:base", layout.display()))
        .arg(&bundle));

    // umoci -> Strata: the layer applies, with umoci's digests checked, to the same tree.
    let (manifest, config) = image(&layout, "base");
    let layer = &manifest["layers"][0];
    let digest: Digest = layer["digest"].as_str().unwrap().parse().unwrap();
    let diff_id: Digest = config["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let base = t.path().join("base");
    let opts = ApplyOptions {
        expected_digest: Some(digest),
        expected_diff_id: Some(diff_id),
        ..Default::default()
    };
    apply_file(&blob(&layout, &digest.to_string()), &base, &opts).unwrap();
    assert_eq!(snapshot(&base), snapshot(&bundle.join("rootfs")));

    // Strata -> umoci: change the tree through kernel overlay, diff natively, add the layer
    // with umoci, unpack with umoci and compare with Strata's own view of the stack.
    let (upper, work, merged) = (t.path().join("u"), t.path().join("w"), t.path().join("m"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    Overlay {
        lowers: vec![base.clone()],
        upper: Some(upper.clone()),
        work: Some(work),
        options: Options {
            index_off: true,
            ..Default::default()
        },
    }
    .mount(&merged)
    .unwrap();
    std::fs::remove_file(merged.join("etc/hostname")).unwrap();
    std::fs::remove_dir_all(merged.join("etc/conf.d")).unwrap();
    std::fs::create_dir(merged.join("etc/conf.d")).unwrap();
    std::fs::write(merged.join("etc/conf.d/b"), b"new").unwrap();
    std::fs::write(merged.join("usr/bin/tool"), b"#!/bin/sh\necho v2\n").unwrap();
    let want = snapshot(&merged);
    unmount(&merged, false).unwrap();
    let tarball = t.path().join("strata-layer.tar");
    let (report, _) = diff::native(
        &upper,
        std::fs::File::create(&tarball).unwrap(),
        &DiffOptions {
            compression: Compression::None,
            ..Default::default()
        },
    )
    .unwrap();
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image"])
        .arg(format!("{}:base", layout.display()))
        .args(["--tag", "next"])
        .arg(&tarball));
    let (_, config) = image(&layout, "next");
    assert_eq!(
        config["rootfs"]["diff_ids"][1].as_str().unwrap(),
        report.diff_id.to_string(),
        "umoci computed the same diffID"
    );
    let bundle2 = t.path().join("bundle2");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:next", layout.display()))
        .arg(&bundle2));
    assert_eq!(snapshot(&bundle2.join("rootfs")), want);

    // skopeo copies the image (verifying every blob) and reports the same layers.
    let copy = t.path().join("copy");
    run(Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:next", layout.display()))
        .arg(format!("oci:{}:next", copy.display())));
    let inspect = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:next", copy.display())));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["Layers"][0].as_str().unwrap(), digest.to_string());
}
