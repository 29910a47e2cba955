//! `strata run`, `ps` and `rm` through the real binary: a container sees its image's layers
//! (lower files, upper whiteouts), runs as pid 1 in its own namespaces with Docker's default
//! capabilities and no_new_privs, loopback only, and its exit code, options and cleanup
//! behave as in Docker.

use crate::support::{loaded, ok, require_root, run, scratch, st};

#[test]
fn run_isolates_and_reports_like_docker() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    let img = "localhost/img:latest";
    let script = "echo pid=$$; cat /etc/from-lower; test ! -e /etc/to-delete && echo whiteout-ok; cat /etc/upper-file; \
                  grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status; ls /sys/class/net; ls /; cat /proc/1/cmdline | tr '\\0' ' '; echo";
    let out = ok(st(&root).args(["run", "--rm", img, "/bin/sh", "-c", script]));
    let want = [
        "pid=1",
        "from the lower layer",
        "whiteout-ok",
        "from the upper layer",
        "CapBnd:\t00000000a80425fb",
        "NoNewPrivs:\t1",
    ];
    for w in want {
        assert!(out.lines().any(|l| l == w), "missing {w:?} in:\n{out}");
    }
    let net: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("NoNewPrivs"))
        .skip(1)
        .take(1)
        .collect();
    assert_eq!(net, vec!["lo"], "loopback only:\n{out}");
    assert!(
        !out.lines()
            .any(|l| l == "work" || l == "home" || l == "root"),
        "host paths visible:\n{out}"
    );
    assert!(out.contains("/bin/sh -c"), "pid 1 is the command:\n{out}");

    // --env-file (comments and blanks skipped, -e wins), --entrypoint, --network host.
    let envf = t.path().join("env");
    std::fs::write(&envf, "# a comment\n\nA=from-file\nB=also\n").unwrap();
    let out = ok(st(&root)
        .args(["run", "--rm", "--env-file"])
        .arg(&envf)
        .args([
            "-e",
            "B=flag",
            "--entrypoint",
            "/bin/sh",
            img,
            "-c",
            "echo $A $B",
        ]));
    assert_eq!(out, "from-file flag\n");
    let bad = t.path().join("bad-env");
    std::fs::write(&bad, "=nokey\n").unwrap();
    let out = run(st(&root)
        .args(["run", "--rm", "--env-file"])
        .arg(&bad)
        .args([img, "true"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid variable"));
    let host_ifaces = std::fs::read_dir("/sys/class/net").unwrap().count();
    let out = ok(st(&root).args([
        "run",
        "--rm",
        "--network",
        "host",
        img,
        "ls",
        "/sys/class/net",
    ]));
    assert_eq!(
        out.lines().count(),
        host_ifaces,
        "the host's interfaces:\n{out}"
    );

    // Options, exit codes, names.
    let out = run(st(&root).args([
        "run",
        "--name",
        "c1",
        "-e",
        "FOO=bar",
        "-w",
        "/tmp/work",
        "--hostname",
        "box",
        img,
        "/bin/sh",
        "-c",
        "echo $FOO $(pwd) $(hostname); echo data > /written; exit 3",
    ]));
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bar /tmp/work box\n");
    let out = run(st(&root).args(["run", "--name", "c1", img, "true"]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ps = ok(st(&root).args(["ps", "-a", "-s"]));
    assert!(
        ps.contains("Exited (3)") && ps.contains("c1") && ps.contains("(virtual"),
        "{ps}"
    );
    assert_eq!(
        ok(st(&root).arg("ps")).lines().count(),
        1,
        "nothing is running"
    );
    assert_eq!(
        run(st(&root).args(["run", "--rm", img, "/nonexistent"]))
            .status
            .code(),
        Some(127)
    );
    let out = run(st(&root).args([
        "run",
        "--rm",
        "--read-only",
        img,
        "/bin/sh",
        "-c",
        "echo x > /f",
    ]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ok(st(&root).args([
        "run",
        "--rm",
        "-u",
        "1000:1000",
        img,
        "/bin/sh",
        "-c",
        "grep ^Uid /proc/self/status",
    ]));
    assert!(out.starts_with("Uid:\t1000\t1000"), "{out}");
    let out = run(st(&root).args(["run", "--rm", "nosuch:image", "true"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such image"));

    // An image a container uses is not removed.
    let out = run(st(&root).args(["rmi", img]));
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("being used by container"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        ok(st(&root).arg("images")).contains("localhost/img"),
        "the tag stays"
    );
    // docker diff: the container wrote /written and created /tmp/work (-w).
    let diff = ok(st(&root).args(["diff", "c1"]));
    for line in ["A /written", "C /tmp", "A /tmp/work"] {
        assert!(
            diff.lines().any(|l| l == line),
            "missing {line:?} in:\n{diff}"
        );
    }
    assert!(
        !diff.contains("/etc/from-lower"),
        "unchanged lower files are not listed:\n{diff}"
    );
    ok(st(&root).args(["rm", "c1"]));
    let out = run(st(&root).args(["rm", "c1"]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such container"));
    assert_eq!(
        std::fs::read_dir(root.join("containers")).unwrap().count(),
        0,
        "containers left"
    );
    let snaps = || -> Vec<String> {
        std::fs::read_dir(root.join("snapshotter/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    // The image's two layers and their shared init layer stay; removing the image clears all.
    assert_eq!(snaps().len(), 3, "{:?}", snaps());
    ok(st(&root).args(["rmi", img]));
    assert!(snaps().is_empty(), "left: {:?}", snaps());
    assert_eq!(
        std::fs::read_dir(root.join("content/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}
