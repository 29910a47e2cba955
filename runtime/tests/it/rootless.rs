//! Rootless containers through the real binary: uid 65534, no user namespace given, runs the
//! whole lifecycle in a store under its own HOME. Strata enters a user namespace for the
//! commands that need one; `exec` joins the container's from outside.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::support::{image_archive, require_command, require_root, scratch};

/// Runs `strata ARGS` as uid 65534 with HOME in `d`.
fn nobody(d: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "env"])
        .args(["-u", "XDG_DATA_HOME", "-u", "STRATA_ROOT"])
        .arg(format!("HOME={}", d.display()))
        .arg(d.join("strata"))
        .args(args)
        .current_dir(d)
        .output()
        .unwrap()
}

fn ok(d: &Path, args: &[&str]) -> String {
    let out = nobody(d, args);
    assert!(
        out.status.success(),
        "strata {args:?} as nobody failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rootless_lifecycle_as_nobody() {
    require_root();
    require_command("setpriv");
    let t = scratch();
    let d = t.path();
    let archive = image_archive(d, "img.tar");
    // The binary may sit below a directory uid 65534 cannot enter: run a copy from here.
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), d.join("strata")).unwrap();
    for p in [d.to_path_buf(), archive.clone()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    assert!(ok(d, &["load", "-i", "img.tar"]).contains("localhost/img:latest"));
    // The store is the user's own, under $HOME/.local/share.
    assert!(d.join(".local/share/strata/images.db").exists());
    let out = ok(
        d,
        &[
            "run",
            "--rm",
            "localhost/img",
            "/bin/sh",
            "-c",
            "grep ^Uid /proc/self/status; cat /proc/self/uid_map; cat /etc/upper-file; echo w > /w",
        ],
    );
    let mut l = out.lines();
    assert!(l.next().unwrap().starts_with("Uid:\t0"), "{out}");
    assert_eq!(
        l.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["0", "65534", "1"],
        "{out}"
    );
    assert_eq!(l.next(), Some("from the upper layer"), "{out}");
    // Detached, exec from outside, stop, commit, run the commit.
    assert_eq!(
        ok(
            d,
            &[
                "run",
                "-d",
                "--name",
                "bg",
                "localhost/img",
                "/bin/sh",
                "-c",
                "echo data > /d; exec sleep 300"
            ]
        )
        .trim()
        .len(),
        64
    );
    crate::support::eventually("exec sees the file", || {
        nobody(d, &["exec", "bg", "cat", "/d"]).stdout == b"data\n"
    });
    let pid1 = ok(
        d,
        &[
            "exec",
            "bg",
            "/bin/sh",
            "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '",
        ],
    );
    assert_eq!(pid1, "sleep 300 ");
    ok(d, &["stop", "-t", "1", "bg"]);
    ok(d, &["commit", "bg", "mine:1"]);
    assert_eq!(ok(d, &["run", "--rm", "mine:1", "cat", "/d"]), "data\n");
    assert!(ok(d, &["diff", "bg"]).lines().any(|l| l == "A /d"));
    // Volumes persist; a user that is not mapped is a clear error.
    ok(
        d,
        &[
            "run",
            "--rm",
            "-v",
            "vol:/data",
            "localhost/img",
            "/bin/sh",
            "-c",
            "echo kept > /data/f",
        ],
    );
    assert_eq!(
        ok(
            d,
            &[
                "run",
                "--rm",
                "-v",
                "vol:/data",
                "localhost/img",
                "cat",
                "/data/f"
            ]
        ),
        "kept\n"
    );
    let out = nobody(d, &["run", "--rm", "-u", "1000", "localhost/img", "true"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("rootless"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = ok(d, &["info"]);
    assert!(
        info.contains("User Namespace: true") && info.contains("Rootless: true"),
        "{info}"
    );
    ok(d, &["rm", "bg"]);
    ok(d, &["system", "prune", "-a", "--volumes", "-f"]);
    ok(d, &["volume", "rm", "vol"]);
    assert_eq!(ok(d, &["images", "-q"]), "");
}
