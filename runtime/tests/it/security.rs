//! What a container must not do to the host or the store: reach host paths outside its mounts
//! (`..`, /proc/self/root, /proc/1/root, symlinks planted in a volume), gain privileges (no
//! capabilities beyond Docker's default set, no_new_privs), change its image's lower layers
//! (hashed before and after); and the store and the snapshotter socket are closed to other
//! users. (The capability bounding set and no_new_privs are also checked in run.rs.)

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use strata_snapshotter::{Mode, Snapshotter};

use crate::support::{Server, loaded, ok, require_root, scratch, st};

/// Every entry below `dir`: type, mode, owner, size, content digest or link target.
fn hash_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(base: &Path, p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(p).unwrap() {
            let path = e.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_file() {
                format!(
                    "file {}",
                    strata_overlay::Digest::of(&std::fs::read(&path).unwrap())
                )
            } else {
                "other".into()
            };
            out.insert(
                path.strip_prefix(base).unwrap().to_path_buf(),
                format!(
                    "{what} {:o} {}:{} {} {}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.len(),
                    m.mtime()
                ),
            );
            if m.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The layer directories of the loaded image, top first.
fn image_layers(root: &Path) -> Vec<PathBuf> {
    let inspect = ok(st(root).args(["inspect", "localhost/img:latest"]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let diffs: Vec<strata_overlay::Digest> = v[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    let mut chain = None;
    for d in &diffs {
        chain = Some(strata_runtime::image::chain_id(chain.as_ref(), d));
    }
    let snap = Snapshotter::open(&root.join("snapshotter"), Mode::Overlay).unwrap();
    snap.layer_stack(&chain.unwrap().to_string()).unwrap()
}

#[test]
fn a_container_cannot_reach_the_host_or_change_its_lower_layers() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    let secret = t.path().join("host-secret");
    std::fs::write(&secret, "host only\n").unwrap();
    let layers = image_layers(&root);
    assert_eq!(layers.len(), 2);
    let before: Vec<_> = layers.iter().map(|l| hash_tree(l)).collect();

    let s = secret.display();
    let script = format!(
        "for p in {s} /..{s} /../../../..{s} /proc/self/root{s} /proc/1/root{s} \
                  /proc/self/cwd/../../..{s} /proc/self/root/../..{s}; do \
           test -e $p && echo REACHED $p; done; \
         cd / && cd ../../.. && pwd; \
         grep -E '^(CapEff|CapPrm|NoNewPrivs)' /proc/self/status; \
         rm -rf /etc/from-lower /bin/ls; echo overwritten > /etc/upper-file; \
         chmod 700 /etc /bin/busybox; touch /etc/new; ln -sf / /hostlink; \
         mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; \
         echo finished"
    );
    let out = ok(st(&root).args(["run", "--rm", "localhost/img:latest", "sh", "-c", &script]));
    assert!(
        !out.contains("REACHED"),
        "a host path was reachable:\n{out}"
    );
    assert!(
        !out.contains("MOUNTED"),
        "the container could mount:\n{out}"
    );
    assert!(out.lines().any(|l| l == "/"), "cd .. left the root:\n{out}");
    // Docker's default set: the same as the bounding set run.rs checks.
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("finished"), "{out}");
    assert!(
        !Path::new("/hostlink").exists()
            && std::fs::read_to_string(&secret).unwrap() == "host only\n"
    );
    let after: Vec<_> = layers.iter().map(|l| hash_tree(l)).collect();
    assert_eq!(before, after, "the container changed a lower layer");

    // A volume that a first container filled with symlinks to the root and upwards: a second
    // container following them stays inside its own root.
    ok(st(&root).args([
        "run",
        "--rm",
        "-v",
        "trap:/data",
        "localhost/img:latest",
        "sh",
        "-c",
        "ln -s / /data/root && ln -s ../../../../../.. /data/up && ln -s /proc/1/root /data/p1",
    ]));
    let probe = format!(
        "for p in /data/root{s} /data/up{s} /data/p1{s}; do test -e $p && echo REACHED $p; done; echo checked"
    );
    let out = ok(st(&root).args([
        "run",
        "--rm",
        "-v",
        "trap:/data",
        "localhost/img:latest",
        "sh",
        "-c",
        &probe,
    ]));
    assert!(!out.contains("REACHED") && out.contains("checked"), "{out}");
    // Mounting a volume path that is a symlink out of the volume does not follow it on the host.
    let vol = root.join("volumes/trap/_data");
    assert!(
        std::fs::symlink_metadata(vol.join("root"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let out = ok(st(&root).args([
        "run",
        "--rm",
        "--mount",
        &format!("type=bind,source={},target=/mnt", vol.display()),
        "localhost/img:latest",
        "sh",
        "-c",
        &format!("test -e /mnt/root{s} && echo REACHED; echo checked"),
    ]));
    assert!(!out.contains("REACHED"), "{out}");
}

#[test]
fn the_store_and_the_socket_are_closed_to_other_users() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    ok(st(&root).args(["run", "--rm", "localhost/img:latest", "true"]));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root) & 0o077, 0, "store root {:o}", mode(&root));
    assert_eq!(mode(&root.join("snapshotter")) & 0o077, 0);
    let sroot = t.path().join("snaproot");
    let socket = t.path().join("s.sock");
    let server = Server::start(&sroot, &socket);
    assert_eq!(mode(&socket) & 0o007, 0, "socket {:o}", mode(&socket));
    assert_eq!(
        mode(&sroot) & 0o077,
        0,
        "snapshotter root {:o}",
        mode(&sroot)
    );
    assert!(server.stop().success());
    // An existing root another user could read is closed when the store opens it.
    let open = t.path().join("open-root");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(st(&open).arg("images"));
    assert_eq!(mode(&open), 0o700);
}
