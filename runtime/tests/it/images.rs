//! Images through the real binary: archives written by skopeo (OCI and docker) load, images
//! list, tag/rmi behave as in Docker, saved archives are read by skopeo and unpacked by umoci
//! to the same tree, and a corrupt archive is refused with the store left as it was.

use std::path::Path;
use std::process::Command;

use crate::support::{build_image, ok, require_command, require_root, run, scratch, st};

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn tree(dir: &Path) -> String {
    ok(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . -printf '%p %y %m %s\\n' | sort",
        dir.display()
    )))
}

/// Copies the OCI layout's `latest` to `transport:dir/file:name` with skopeo; returns the file.
fn skopeo_archive(
    layout: &Path,
    dir: &Path,
    file: &str,
    transport: &str,
    name: &str,
) -> std::path::PathBuf {
    let out = dir.join(file);
    ok(Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("{transport}:{}:{name}", out.display())));
    out
}

#[test]
fn load_list_tag_save_and_remove_images() {
    require_root();
    require_command("skopeo");
    let t = scratch();
    let d = t.path();
    let layout = build_image(d);
    let oci = skopeo_archive(&layout, d, "oci.tar", "oci-archive", "localhost/test:v1");
    let dock = skopeo_archive(
        &layout,
        d,
        "dock.tar",
        "docker-archive",
        "localhost/dock:v2",
    );
    let root = d.join("root");
    assert_eq!(
        ok(st(&root).arg("load").arg("-i").arg(&oci)),
        "Loaded image: localhost/test:v1\n"
    );
    assert_eq!(
        ok(st(&root).arg("load").arg("-i").arg(&dock)),
        "Loaded image: localhost/dock:v2\n"
    );
    let list = ok(st(&root).arg("images"));
    let lines: Vec<&str> = list.lines().collect();
    assert!(
        lines[0].starts_with("REPOSITORY")
            && lines[0].contains("IMAGE ID")
            && lines[0].ends_with("SIZE"),
        "{list}"
    );
    assert!(
        list.contains("localhost/test") && list.contains("localhost/dock"),
        "{list}"
    );
    // Both run: the image skopeo wrote as a docker archive too.
    assert_eq!(
        ok(st(&root).args(["run", "--rm", "localhost/dock:v2", "cat", "/etc/upper-file"])),
        "from the upper layer\n"
    );
    // Layers are unpacked once, shared by both images (same chain IDs); the container's
    // init layer is the third snapshot.
    assert_eq!(count(&root.join("snapshotter/snapshots")), 3);
    let ids = ok(st(&root).args(["images", "-q"]));
    assert_eq!(ids.lines().count(), 1, "one image ID for both: {ids}");
    let json = ok(st(&root).args(["images", "--format", "json"]));
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["ID"].as_str().unwrap(), ids.trim());

    let history = ok(st(&root).args(["history", "localhost/test:v1"]));
    assert!(
        history.contains("umoci repack") && history.lines().count() == 4,
        "{history}"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(st(&root).args(["inspect", "localhost/test:v1"]))).unwrap();
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(inspect[0]["Config"]["Cmd"][0], "/bin/sh");

    // Save: skopeo reads it, umoci unpacks it to the same tree as the original.
    let saved = d.join("saved.tar");
    ok(st(&root)
        .args(["save", "-o"])
        .arg(&saved)
        .arg("localhost/test:v1"));
    let ins: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", saved.display()))))
    .unwrap();
    let orig: serde_json::Value = serde_json::from_str(&ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:latest", layout.display()))))
    .unwrap();
    assert_eq!(ins["Layers"], orig["Layers"]);
    let out = d.join("saved-layout");
    std::fs::create_dir(&out).unwrap();
    ok(Command::new("tar")
        .arg("-C")
        .arg(&out)
        .arg("-xf")
        .arg(&saved));
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", out.display()))
        .arg(d.join("b1")));
    ok(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout.display()))
        .arg(d.join("b2")));
    assert_eq!(tree(&d.join("b1/rootfs")), tree(&d.join("b2/rootfs")));

    // Tag and remove, as Docker does.
    ok(st(&root).args(["tag", "localhost/test:v1", "myapp:1.0"]));
    assert!(ok(st(&root).arg("images")).contains("myapp"));
    let id = ids.trim().to_string();
    let out = run(st(&root).args(["rmi", &id]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("must be forced")
    );
    assert_eq!(
        ok(st(&root).args(["rmi", "myapp:1.0"])),
        "Untagged: myapp:1.0\n"
    );
    assert_eq!(
        ok(st(&root).args(["rmi", "localhost/dock:v2"]))
            .lines()
            .next()
            .unwrap(),
        "Untagged: localhost/dock:v2"
    );
    let out = ok(st(&root).args(["rmi", "localhost/test:v1"]));
    assert!(
        out.starts_with("Untagged: localhost/test:v1\nDeleted: sha256:"),
        "{out}"
    );
    assert_eq!(ok(st(&root).args(["images", "-q"])), "");
    assert_eq!(count(&root.join("content/blobs/sha256")), 0, "blobs left");
    for _ in 0..100 {
        if count(&root.join("snapshotter/snapshots")) == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        count(&root.join("snapshotter/snapshots")),
        0,
        "snapshots left"
    );
}

#[test]
fn a_corrupt_or_foreign_archive_leaves_the_store_unchanged() {
    require_root();
    require_command("skopeo");
    let t = scratch();
    let d = t.path();
    let layout = build_image(d);
    let oci = skopeo_archive(&layout, d, "oci.tar", "oci-archive", "localhost/test:v1");
    let root = d.join("root");
    ok(st(&root).arg("load").arg("-i").arg(&oci));
    let before = (
        ok(st(&root).args(["images", "-q"])),
        count(&root.join("content/blobs/sha256")),
        count(&root.join("snapshotter/snapshots")),
    );

    // The second image shares nothing; one of its layer blobs is damaged in the archive.
    let d2 = d.join("two");
    std::fs::create_dir(&d2).unwrap();
    let layout2 = build_image(&d2);
    std::fs::write(d2.join("bundle/rootfs/etc/extra"), "other image\n").unwrap();
    ok(Command::new("umoci")
        .args(["repack", "--image"])
        .arg(format!("{}:latest", layout2.display()))
        .arg(d2.join("bundle")));
    let big = std::fs::read_dir(layout2.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut data = std::fs::read(&big).unwrap();
    let n = data.len() / 2;
    data[n] ^= 0xff;
    std::fs::write(&big, data).unwrap();
    let bad = d.join("bad.tar");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&layout2)
        .arg("-cf")
        .arg(&bad)
        .arg("."));
    let out = run(st(&root).arg("load").arg("-i").arg(&bad));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("digest mismatch"),
        "{err}"
    );
    let after = (
        ok(st(&root).args(["images", "-q"])),
        count(&root.join("content/blobs/sha256")),
        count(&root.join("snapshotter/snapshots")),
    );
    assert_eq!(before, after, "a failed load changed the store");

    let junk = d.join("junk.tar");
    ok(Command::new("tar")
        .arg("-C")
        .arg(d)
        .arg("-cf")
        .arg(&junk)
        .arg("layout/oci-layout"));
    let out = run(st(&root).arg("load").arg("-i").arg(&junk));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither an OCI image layout"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for args in [
        vec!["rmi", "nosuch:tag"],
        vec!["history", "nosuch"],
        vec!["save", "-o", "/tmp/x.tar", "nosuch"],
        vec!["tag", "nosuch", "x"],
    ] {
        let out = run(st(&root).args(&args));
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no such image"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(st(&root).args(["tag", "localhost/test:v1", "Bad:Ref"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid reference"));
    assert_eq!(ok(st(&root).args(["images", "-q"])), before.0);
}
