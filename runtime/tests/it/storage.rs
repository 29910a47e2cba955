//! The storage side of containers through the real binary: volumes, binds and tmpfs; commit
//! (adopting the upper dir), export, cp; import; image and system prune, system df. Every
//! failure path leaves the store as it was.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::{fails, loaded, ok, require_command, require_root, run, scratch, st};

const IMG: &str = "localhost/img:latest";

fn inspect(root: &Path, name: &str) -> Value {
    serde_json::from_str::<Value>(&ok(st(root).args(["inspect", name]))).unwrap()[0].clone()
}

fn sh(root: &Path, args: &[&str], script: &str) -> String {
    let mut c = st(root);
    c.args(["run", "--rm"])
        .args(args)
        .args([IMG, "/bin/sh", "-c", script]);
    ok(&mut c)
}

/// Every file in a tree (relative paths, sorted), for comparing stores.
fn tree(dir: &Path) -> Vec<String> {
    let out = ok(Command::new("find")
        .arg(dir)
        .arg("-printf")
        .arg("%P %y %m\n"));
    let mut v: Vec<String> = out.lines().map(String::from).collect();
    v.sort();
    v
}

#[test]
fn volumes_binds_and_tmpfs() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    // An empty named volume mounted over image content is filled from it; data persists.
    let out = sh(
        &root,
        &["-v", "conf:/etc"],
        "cat /etc/from-lower; echo mine > /etc/added",
    );
    assert_eq!(out, "from the lower layer\n");
    let out = sh(
        &root,
        &["-v", "conf:/data:ro"],
        "cat /data/added /data/upper-file; touch /data/x 2>&1 || echo refused",
    );
    assert!(
        out.starts_with("mine\nfrom the upper layer\n") && out.contains("Read-only"),
        "{out}"
    );
    assert!(
        ok(st(&root).args(["volume", "ls", "-q"]))
            .lines()
            .any(|l| l == "conf")
    );
    let v: Value =
        serde_json::from_str(&ok(st(&root).args(["volume", "inspect", "conf"]))).unwrap();
    assert_eq!(v[0]["Driver"], "local");
    assert!(
        Path::new(v[0]["Mountpoint"].as_str().unwrap())
            .join("added")
            .is_file()
    );
    // In use: refused; the container's rm leaves a named volume alone.
    ok(st(&root).args(["run", "--name", "user", "-v", "conf:/c", IMG, "true"]));
    fails(st(&root).args(["volume", "rm", "conf"]), "in use");
    ok(st(&root).args(["rm", "-v", "user"]));
    assert!(ok(st(&root).args(["volume", "ls", "-q"])).contains("conf"));
    // Anonymous volumes: made for -v /path, removed by rm -v (and by --rm).
    ok(st(&root).args([
        "run",
        "--name",
        "anon",
        "-v",
        "/scratch",
        IMG,
        "/bin/sh",
        "-c",
        "echo x > /scratch/f",
    ]));
    let mounts = inspect(&root, "anon")["Mounts"].clone();
    let anon = mounts[0]["Name"].as_str().unwrap().to_string();
    assert_eq!(
        (anon.len(), mounts[0]["Destination"].as_str()),
        (64, Some("/scratch"))
    );
    ok(st(&root).args(["rm", "-v", "anon"]));
    assert!(!ok(st(&root).args(["volume", "ls", "-q"])).contains(&anon));
    // Binds (read-only and not) and tmpfs, -v and --mount.
    let host = t.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("in"), "from host\n").unwrap();
    let out = sh(
        &root,
        &[
            "-v",
            &format!("{}:/h", host.display()),
            "--mount",
            &format!("type=bind,source={},target=/hro,readonly", host.display()),
            "--tmpfs",
            "/run:size=1m",
            "--mount",
            "type=tmpfs,target=/t2",
        ],
        "cat /h/in; echo out > /h/out; touch /hro/no 2>/dev/null || echo ro; grep -E ' /(run|t2) ' /proc/mounts | cut -d' ' -f1-3 | sort",
    );
    assert_eq!(out, "from host\nro\ntmpfs /run tmpfs\ntmpfs /t2 tmpfs\n");
    assert_eq!(std::fs::read_to_string(host.join("out")).unwrap(), "out\n");
    // A symlink in the image cannot lead a mount out of the container.
    let out = sh(&root, &[], "ln -s / /escape; echo ok");
    assert_eq!(out, "ok\n");
    // Bad specs are refused before anything is made.
    let before = tree(&root);
    fails(
        st(&root).args(["run", "-v", "x:relative", IMG, "true"]),
        "must be absolute",
    );
    fails(
        st(&root).args([
            "run",
            "--mount",
            "type=bind,source=/no/such/dir,target=/x",
            IMG,
            "true",
        ]),
        "does not exist",
    );
    fails(
        st(&root).args(["run", "--mount", "type=nfs,target=/x", IMG, "true"]),
        "unknown type",
    );
    fails(
        st(&root).args(["run", "-v", "aa:/x", "-v", "bb:/x", IMG, "true"]),
        "duplicate mount point",
    );
    fails(
        st(&root).args(["run", "-v", "!bad:/x", IMG, "true"]),
        "invalid volume name",
    );
    assert_eq!(tree(&root), before, "a refused run changes nothing");
    // Prune: unused anonymous volumes only; -a takes named ones too.
    ok(st(&root).args(["volume", "create", "keep"]));
    ok(st(&root).args(["run", "--name", "a2", "-v", "/anon", IMG, "true"]));
    ok(st(&root).args(["rm", "a2"]));
    let pruned = ok(st(&root).args(["volume", "prune", "-f"]));
    assert!(
        pruned.contains("Deleted Volumes:") && !pruned.contains("keep"),
        "{pruned}"
    );
    ok(st(&root).args(["volume", "prune", "-a", "-f"]));
    assert_eq!(ok(st(&root).args(["volume", "ls", "-q"])), "");
}

#[test]
fn commit_adopts_the_upper_and_keeps_the_container_whole() {
    require_root();
    require_command("skopeo");
    let t = scratch();
    let root = loaded(t.path());
    ok(st(&root).args([
        "run",
        "--name",
        "c",
        "-e",
        "MODE=test",
        IMG,
        "/bin/sh",
        "-c",
        "echo new > /new; rm /etc/from-lower; mkdir -p /etc/d; echo y > /etc/d/y; echo big > /big",
    ]));
    let diff_before = ok(st(&root).args(["diff", "c"]));
    for l in ["A /new", "D /etc/from-lower", "A /etc/d/y", "C /etc"] {
        assert!(
            diff_before.lines().any(|x| x == l),
            "missing {l}:\n{diff_before}"
        );
    }
    let upper = inspect(&root, "c")["GraphDriver"]["Data"]["UpperDir"]
        .as_str()
        .unwrap()
        .to_string();
    let ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(Path::new(&upper).join("new")).unwrap(),
    );
    let id = ok(st(&root).args([
        "commit",
        "-m",
        "first",
        "-a",
        "me",
        "-c",
        "CMD [\"cat\", \"/new\"]",
        "c",
        "local/committed:1",
    ]));
    assert!(id.trim().starts_with("sha256:"), "{id}");
    // Adopted, not copied: the new layer's snapshot holds the very same inode.
    let snaps = root.join("snapshotter/snapshots");
    let found = std::fs::read_dir(&snaps).unwrap().any(|e| {
        let p = e.unwrap().path().join("fs/new");
        std::fs::metadata(&p).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
    });
    assert!(found, "the committed layer owns the container's file");
    // The container is unchanged to its user: same diff, same files.
    assert_eq!(ok(st(&root).args(["diff", "c"])), diff_before);
    assert!(ok(st(&root).args(["ps", "-a", "-s"])).contains("(virtual"));
    // The image: the container's config baked in, -c applied, history with message and author.
    assert_eq!(
        ok(st(&root).args(["run", "--rm", "local/committed:1"])),
        "new\n"
    );
    let img: Value = serde_json::from_str(&ok(st(&root).args([
        "inspect",
        "--type",
        "image",
        "local/committed:1",
    ])))
    .unwrap();
    assert!(
        img[0]["Config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "MODE=test")
    );
    assert_eq!(img[0]["RootFS"]["Layers"].as_array().unwrap().len(), 3);
    assert_eq!(img[0]["Author"], "me");
    let hist = ok(st(&root).args(["history", "local/committed:1"]));
    assert!(hist.lines().nth(1).unwrap().contains("first"), "{hist}");
    let out = sh(&root, &[], "true");
    assert_eq!(out, "");
    assert_eq!(
        ok(st(&root).args([
            "run",
            "--rm",
            "local/committed:1",
            "/bin/sh",
            "-c",
            "cat /etc/d/y; test -e /etc/from-lower || echo gone"
        ])),
        "y\ngone\n"
    );
    // Started again, the container sees its files; a second commit stacks on the first.
    assert_eq!(ok(st(&root).args(["start", "-a", "c"])).as_str(), "");
    ok(st(&root).args([
        "run",
        "-d",
        "--name",
        "live",
        "local/committed:1",
        "/bin/sh",
        "-c",
        "echo more > /more; sleep 300",
    ]));
    crate::support::eventually("the running container wrote", || {
        run(st(&root).args(["exec", "live", "test", "-e", "/more"]))
            .status
            .success()
    });
    // Committing a running container copies its upper (it keeps changing).
    ok(st(&root).args(["commit", "live", "local/committed:2"]));
    assert_eq!(
        ok(st(&root).args(["run", "--rm", "local/committed:2", "cat", "/more", "/new"])),
        "more\nnew\n"
    );
    ok(st(&root).args(["rm", "-f", "live"]));
    // The committed image saves as an OCI archive skopeo reads.
    let out = t.path().join("c.tar");
    ok(st(&root)
        .args(["save", "-o"])
        .arg(&out)
        .arg("local/committed:2"));
    let info = ok(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", out.display())));
    assert!(info.contains("\"Layers\""), "{info}");
    // A commit with a bad change is refused and adds nothing.
    let before = ok(st(&root).args(["images", "-q"]));
    fails(
        st(&root).args(["commit", "-c", "RUN rm -rf /", "c", "x:y"]),
        "RUN is not one of",
    );
    assert_eq!(ok(st(&root).args(["images", "-q"])), before);
    fails(st(&root).args(["commit", "nosuch"]), "no such container");
    // A layer a container stands on cannot go (and the tag stays); after rm it can.
    ok(st(&root).args(["rmi", "local/committed:2"]));
    fails(
        st(&root).args(["rmi", "local/committed:1"]),
        "is used by container",
    );
    assert!(
        ok(st(&root).arg("images")).contains("local/committed"),
        "the tag stays"
    );
    // Forced, the name goes and the image stays, dangling, for the container.
    assert_eq!(
        ok(st(&root).args(["rmi", "-f", "local/committed:1"])),
        "Untagged: local/committed:1\n"
    );
    let dangling = ok(st(&root).args(["images", "-q", "--filter", "dangling=true"]));
    assert_eq!(dangling.lines().count(), 1, "{dangling}");
    ok(st(&root).args(["rm", "c"]));
    ok(st(&root).args(["image", "prune"]));
    ok(st(&root).args(["rmi", IMG]));
    assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
}

#[test]
fn export_cp_and_import() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    ok(st(&root).args([
        "run",
        "--name",
        "c",
        "-v",
        "data:/data",
        IMG,
        "/bin/sh",
        "-c",
        "echo in-ctr > /etc/mine; ln -s /etc /tmp/etc-link; echo v > /data/v",
    ]));
    // export: the flattened filesystem, whiteouts applied.
    let tarball = t.path().join("exp.tar");
    ok(st(&root).args(["export", "-o"]).arg(&tarball).arg("c"));
    let names = ok(Command::new("tar").arg("tf").arg(&tarball));
    assert!(
        names.lines().any(|l| l.trim_end_matches('/') == "etc/mine"),
        "{names}"
    );
    assert!(!names.contains("to-delete"), "{names}");
    assert!(!names.contains(".wh."), "{names}");
    // cp out and in, stopped: a symlink inside resolves inside the container, never on the host.
    let got = t.path().join("got");
    ok(st(&root).args(["cp", "c:/etc/mine"]).arg(&got));
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "in-ctr\n");
    let src = t.path().join("hostfile");
    std::fs::write(&src, "from host\n").unwrap();
    ok(st(&root).arg("cp").arg(&src).arg("c:/tmp/etc-link/copied"));
    assert!(
        !Path::new("/etc/copied").exists(),
        "cp followed a container symlink onto the host"
    );
    assert_eq!(ok(st(&root).args(["start", "-a", "c"])), "");
    // Paths under a volume go to the volume.
    ok(st(&root).args(["cp", "c:/data/v"]).arg(t.path().join("v")));
    assert_eq!(std::fs::read_to_string(t.path().join("v")).unwrap(), "v\n");
    // Running: the container sees a copied file at once.
    ok(st(&root).args(["run", "-d", "--name", "r", IMG, "sleep", "300"]));
    ok(st(&root).arg("cp").arg(&src).arg("r:/"));
    assert_eq!(
        ok(st(&root).args(["exec", "r", "cat", "/hostfile"])),
        "from host\n"
    );
    ok(st(&root)
        .args(["cp", "r:/etc"])
        .arg(t.path().join("etc-out")));
    assert!(t.path().join("etc-out/from-lower").is_file());
    fails(
        st(&root).args(["cp", "r:/no/such"]).arg(t.path().join("x")),
        "could not find",
    );
    ok(st(&root).args(["rm", "-f", "r"]));
    // import: a rootfs tarball becomes a one-layer image that runs.
    let id = ok(st(&root).arg("import").arg(&tarball).args([
        "local/imported",
        "-c",
        "CMD [\"cat\", \"/etc/mine\"]",
    ]));
    assert!(id.starts_with("sha256:"));
    assert_eq!(
        ok(st(&root).args(["run", "--rm", "local/imported"])),
        "in-ctr\n"
    );
    assert!(ok(st(&root).args(["history", "local/imported"])).contains("strata import"));
    // A corrupt tarball is refused and leaves the store as it was.
    let bad = t.path().join("bad.tar");
    let mut bytes = std::fs::read(&tarball).unwrap();
    bytes.truncate(bytes.len() / 2);
    bytes[600] ^= 0xff;
    std::fs::write(&bad, &bytes).unwrap();
    let before = tree(&root);
    fails(
        st(&root).arg("import").arg(&bad).arg("local/bad"),
        "importing",
    );
    fails(
        st(&root).arg("import").arg(t.path().join("missing.tar")),
        "missing.tar",
    );
    assert_eq!(tree(&root), before, "a failed import changes nothing");
    ok(st(&root).args(["rm", "-v", "c"]));
}

#[test]
fn prune_and_disk_usage() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    ok(st(&root).args([
        "run",
        "--name",
        "stopped",
        IMG,
        "/bin/sh",
        "-c",
        "echo x > /x",
    ]));
    ok(st(&root).args(["commit", "stopped"]));
    let df = ok(st(&root).args(["system", "df"]));
    let row = |name: &str| {
        df.lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .skip(if name == "Local" { 2 } else { 1 })
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row("Images"), "2 1", "{df}");
    assert_eq!(row("Containers"), "1 0", "{df}");
    assert!(ok(st(&root).args(["system", "df", "-v"])).contains("stopped"));
    let info = ok(st(&root).arg("info"));
    for l in [
        "Containers: 1",
        " Stopped: 1",
        "Images: 2",
        "Storage Driver: strata",
        "Backing Filesystem:",
        "Supports d_type: true",
    ] {
        assert!(info.contains(l), "missing {l:?} in:\n{info}");
    }
    // The dangling commit is used by nothing once the container is gone... but image prune
    // keeps images a container stands on.
    let out = ok(st(&root).args(["image", "prune", "-f"]));
    assert!(out.contains("Total reclaimed space"), "{out}");
    assert_eq!(
        ok(st(&root).args(["images", "-q"])).lines().count(),
        2,
        "the container's image stays"
    );
    let out = ok(st(&root).args(["system", "prune", "-a", "-f"]));
    assert!(
        out.contains("Deleted Containers:") && out.contains("Deleted Images:"),
        "{out}"
    );
    assert_eq!(ok(st(&root).args(["images", "-q"])), "");
    assert_eq!(
        std::fs::read_dir(root.join("snapshotter/snapshots"))
            .unwrap()
            .count(),
        0
    );
}
