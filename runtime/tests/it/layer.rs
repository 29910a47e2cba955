//! `strata layer`, `mount`, `umount`, `info` and `demo` through the real binary, success and
//! failure paths, as root and rootless (uid 65534 in a user namespace).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{ok, require_root, run, scratch, strata};

fn fails(cmd: &mut Command, want: &str) -> Output {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{cmd:?} succeeded");
    assert!(
        err.contains("strata: error:") && err.contains(want),
        "{cmd:?}: stderr {err:?} does not say {want:?}"
    );
    out
}

fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {out}"))
        .to_string()
}

/// A gzip layer made by GNU tar from a small tree.
fn gnu_layer(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("app/data")).unwrap();
    std::fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(src.join("app/data/one"), b"1").unwrap();
    std::fs::write(src.join("app/run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        src.join("app/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let blob = dir.join("base.tar.gz");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-czf")
        .arg(&blob)
        .arg("."));
    blob
}

fn sha256(p: &Path) -> String {
    let out = ok(Command::new("sha256sum").arg(p));
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

#[test]
fn apply_mount_change_diff_and_apply_again() {
    require_root();
    let t = scratch();
    let d = t.path();
    let blob = gnu_layer(d);
    let base = d.join("base");
    let out = ok(strata()
        .args(["layer", "apply", "--bottom"])
        .arg(&blob)
        .arg(&base));
    assert_eq!(field(&out, "digest"), sha256(&blob));
    // Expected digests are checked.
    let again = d.join("again");
    ok(strata()
        .args(["layer", "apply"])
        .arg(&blob)
        .arg(&again)
        .args([
            "--digest",
            &field(&out, "digest"),
            "--diff-id",
            &field(&out, "diffID"),
        ]));

    let (upper, work, merged) = (d.join("upper"), d.join("work"), d.join("merged"));
    for p in [&upper, &work, &merged] {
        std::fs::create_dir(p).unwrap();
    }
    ok(strata()
        .arg("mount")
        .arg("--lower")
        .arg(&base)
        .arg("--upper")
        .arg(&upper)
        .arg("--work")
        .arg(&work)
        .arg(&merged));
    std::fs::write(merged.join("etc/hosts"), b"changed\n").unwrap();
    std::fs::remove_file(merged.join("app/run.sh")).unwrap();
    std::fs::rename(merged.join("app/data"), merged.join("app/moved")).unwrap();
    std::fs::write(merged.join("new"), b"n").unwrap();
    ok(strata().arg("umount").arg(&merged));

    let changes = ok(strata()
        .args(["layer", "changes"])
        .arg(&upper)
        .arg("--lowers")
        .arg(&base));
    for line in [
        "C /etc",
        "C /etc/hosts",
        "D /app/run.sh",
        "D /app/data",
        "A /app/moved",
        "A /new",
    ] {
        assert!(
            changes.lines().any(|l| l == line),
            "missing {line:?} in:\n{changes}"
        );
    }

    let layer = d.join("layer.tar.zst");
    let out = ok(strata()
        .args(["layer", "diff"])
        .arg(&upper)
        .arg("-o")
        .arg(&layer)
        .args(["--compress", "zstd", "--threads", "2", "--lowers"])
        .arg(&base));
    assert_eq!(field(&out, "digest"), sha256(&layer));
    let l2 = d.join("l2");
    ok(strata()
        .args(["layer", "apply"])
        .arg(&layer)
        .arg(&l2)
        .arg("--parents")
        .arg(&base)
        .args(["--digest", &field(&out, "digest")]));
    let view = d.join("view");
    std::fs::create_dir(&view).unwrap();
    ok(strata()
        .arg("mount")
        .arg("--ro")
        .arg("--lower")
        .arg(format!("{}:{}", l2.display(), base.display()))
        .arg(&view));
    let hosts = std::fs::read(view.join("etc/hosts"));
    let moved = std::fs::read(view.join("app/moved/one"));
    let gone = view.join("app/run.sh").exists() || view.join("app/data").exists();
    let generic_out = d.join("generic.tar");
    let g = strata()
        .args(["layer", "diff", "--lower"])
        .arg(&base)
        .arg("--upper")
        .arg(&view)
        .arg("-o")
        .arg(&generic_out)
        .args(["--compress", "none"])
        .output()
        .unwrap();
    let gchanges = strata()
        .args(["layer", "changes", "--lower"])
        .arg(&base)
        .arg("--upper")
        .arg(&view)
        .output()
        .unwrap();
    ok(strata().arg("umount").arg(&view));
    assert_eq!(hosts.unwrap(), b"changed\n");
    assert_eq!(moved.unwrap(), b"1");
    assert!(!gone);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let gchanges = String::from_utf8(gchanges.stdout).unwrap();
    assert!(
        gchanges.lines().any(|l| l == "D /app/run.sh")
            && gchanges.lines().any(|l| l == "A /app/moved/one"),
        "{gchanges}"
    );
    // The generic diff applies over the base to the same result.
    let l3 = d.join("l3");
    ok(strata()
        .args(["layer", "apply"])
        .arg(&generic_out)
        .arg(&l3)
        .arg("--parents")
        .arg(&base));
    assert_eq!(std::fs::read(l3.join("etc/hosts")).unwrap(), b"changed\n");
}

#[test]
fn failures_are_clear_and_leave_nothing() {
    require_root();
    let t = scratch();
    let d = t.path();
    let junk = d.join("junk.tar");
    std::fs::write(&junk, vec![0x42u8; 2048]).unwrap();
    fails(
        strata()
            .args(["layer", "apply"])
            .arg(&junk)
            .arg(d.join("x")),
        "checksum",
    );
    fails(
        strata()
            .args(["layer", "apply"])
            .arg(d.join("missing.tar"))
            .arg(d.join("x")),
        "missing.tar",
    );
    let blob = gnu_layer(d);
    fails(
        strata()
            .args(["layer", "apply"])
            .arg(&blob)
            .arg(d.join("x"))
            .args(["--digest", "sha256:1234"]),
        "invalid digest",
    );
    let wrong = format!("sha256:{}", "0".repeat(64));
    fails(
        strata()
            .args(["layer", "apply"])
            .arg(&blob)
            .arg(d.join("x"))
            .args(["--digest", &wrong]),
        "digest mismatch",
    );
    assert!(!d.join("x").exists());
    std::fs::create_dir(d.join("full")).unwrap();
    std::fs::write(d.join("full/keep"), b"k").unwrap();
    fails(
        strata()
            .args(["layer", "apply"])
            .arg(&blob)
            .arg(d.join("full")),
        "not empty",
    );
    fails(
        strata()
            .args(["layer", "diff"])
            .arg(d.join("nope"))
            .arg("-o")
            .arg(d.join("out.tar")),
        "nope",
    );
    assert!(!d.join("out.tar").exists());
    fails(
        strata()
            .args(["layer", "diff"])
            .arg(d.join("src"))
            .arg("-o")
            .arg(d.join("o.tar"))
            .args(["--compress", "lz4"]),
        "unknown compression",
    );
    std::fs::create_dir(d.join("m")).unwrap();
    fails(
        strata()
            .arg("mount")
            .arg("--lower")
            .arg(d.join("no-such-lower"))
            .arg(d.join("m")),
        "no-such-lower",
    );
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["base.tar.gz", "full", "junk.tar", "m", "src"],
        "something was left behind"
    );
}

#[test]
fn info_reports_the_kernel_features() {
    require_root();
    let t = scratch();
    let out = ok(strata().arg("info").arg("--dir").arg(t.path()));
    for want in [
        "Storage Driver: strata",
        "Backing Filesystem:",
        "Supports d_type: true",
        "Kernel Overlay: true",
        "metacopy: true",
        "Native Diff: true",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
}

#[test]
fn demo_runs_to_the_end() {
    require_root();
    // The main job: the image and container lifecycle on an image built from this machine.
    let out = ok(strata().arg("demo"));
    for step in [
        "== 1. built a base image from this machine",
        "A /greeting",
        "D /etc/motd",
        "snapshot Moved",
        "hello from the container",
        "filled from the image: seeded by the image",
        "(second) reads: kept",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
    assert!(
        out.trim_end().ends_with("the store is empty again"),
        "{out}"
    );
    // The layer walk.
    let out = ok(strata().args(["layer", "demo"]));
    assert!(
        out.contains("the stack shows exactly the container's tree")
            && out.trim_end().ends_with("== done"),
        "{out}"
    );
}

/// A copy of the strata binary in `d`, which uid 65534 can run (the build's may sit below a
/// directory it cannot enter, as a clone in a private temp dir does).
fn strata_for_nobody(d: &Path) -> PathBuf {
    let bin = d.join("strata");
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// Runs `script` with `sh` as uid 65534 in a user and mount namespace of its own, where it is
/// root; panics with its output if it fails, returns its stdout.
fn as_nobody_in_a_user_namespace(script: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "unshare",
            "-Urm",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "run in a user namespace failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The FUSE union run as root of a user namespace (as rootless Podman runs its mount program)
/// writes its opaque directories in the form kernel overlay's `userxattr` mounts read
/// (`user.overlay.opaque`; `trusted.` is not settable there), so the upper mounts either way:
/// a lower directory deleted and made again stays empty under kernel overlay.
#[test]
fn fuse_in_a_user_namespace_leaves_an_upper_kernel_overlay_reads() {
    require_root();
    let t = scratch();
    let d = t.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    for sub in ["l/d", "u", "w", "m"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("l/d/old"), b"x").unwrap();
    std::fs::write(d.join("l/gone"), b"x").unwrap();
    // Owned by the user the namespace maps to root: others' files show as unmapped there.
    ok(Command::new("chown").arg("-R").arg("65534:65534").arg(d));
    let bin = strata_for_nobody(d);
    let script = format!(
        "set -e; cd {d}; {bin} mount --fuse --lower l --upper u --work w m; \
         rm -r m/d m/gone; mkdir m/d; echo new > m/d/new; {bin} umount m; \
         mount -t overlay overlay -o userxattr,lowerdir=l,upperdir=u,workdir=w m; \
         ls -A m/d; ls -A m; umount m",
        d = d.display(),
        bin = bin.display()
    );
    let stdout = as_nobody_in_a_user_namespace(&script);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["new", "d"],
        "kernel overlay's view of the FUSE union's upper"
    );
    let opaque = Command::new("getfattr")
        .args(["--only-values", "-n", "user.overlay.opaque"])
        .arg(d.join("u/d"))
        .output()
        .unwrap();
    assert_eq!(opaque.stdout, b"y", "opaque in the user. namespace");
    assert!(
        !d.join("u/d/.wh..wh..opq").exists(),
        "no OCI marker, which kernel overlay would show as a file"
    );
}

/// Rootless: uid 65534 in its own user and mount namespace applies a layer in the rootless
/// form and mounts it with kernel overlay (userxattr chosen automatically).
#[test]
fn rootless_apply_and_userxattr_mount_as_nobody() {
    require_root();
    let t = scratch();
    let d = t.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let src = d.join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::create_dir_all(src.join("opq")).unwrap();
    std::fs::write(src.join("etc/f"), b"hi").unwrap();
    std::fs::write(src.join("opq/.wh..wh..opq"), b"").unwrap();
    let blob = d.join("l.tar");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&blob)
        .arg("."));
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin = strata_for_nobody(d);
    let bin = bin.display();
    let script = format!(
        "set -e; cd {d}; {bin} layer apply --rootless --bottom l.tar base; mkdir u w m; {bin} mount --lower base --upper u --work w m; \
         rm m/etc/f; echo new > m/etc/g; {bin} umount m; {bin} info --dir {d} | grep -q 'User Namespace: true'",
        d = d.display()
    );
    as_nobody_in_a_user_namespace(&script);
    let opaque = Command::new("getfattr")
        .args(["--only-values", "-n", "user.overlay.opaque"])
        .arg(d.join("base/opq"))
        .output()
        .unwrap();
    assert_eq!(opaque.stdout, b"y", "opaque dir in rootless form");
    let wh = std::fs::symlink_metadata(d.join("u/etc/f")).unwrap();
    assert!(
        wh.file_type().is_char_device(),
        "the kernel wrote a whiteout in the upper"
    );
    assert_eq!(std::fs::read(d.join("u/etc/g")).unwrap(), b"new\n");
}

/// `strata mount --fuse`: unions through Strata's FUSE filesystem, read-only and writable,
/// detached and live when the command returns, as root and as uid 65534 (through fusermount3).
#[test]
fn fuse_mount_serves_unions() {
    require_root();
    let t = scratch();
    let d = t.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    for (p, data) in [
        ("l2/d/a", "low"),
        ("l2/d/b", "gone"),
        ("l1/d/a", "top"),
        ("l1/d/.wh.b", ""),
    ] {
        let p = d.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    std::fs::create_dir(d.join("m")).unwrap();
    let lower = format!("{}:{}", d.join("l1").display(), d.join("l2").display());
    ok(strata()
        .args(["mount", "--fuse", "--lower", &lower])
        .arg(d.join("m")));
    assert_eq!(std::fs::read_to_string(d.join("m/d/a")).unwrap(), "top");
    let names: Vec<String> = std::fs::read_dir(d.join("m/d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["a"],
        "whiteouts (OCI form too) hide, markers never show"
    );
    let err = std::fs::write(d.join("m/d/new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&*d.join("m").to_string_lossy()) && l.contains(" fuse")),
        "{mounts}"
    );
    ok(strata().arg("umount").arg(d.join("m")));
    assert!(!d.join("m/d").exists(), "unmounted");
    // Writable: changes land in the upper in overlayfs' form, which kernel overlay then reads.
    for dir in ["u", "w"] {
        std::fs::create_dir(d.join(dir)).unwrap();
    }
    ok(strata()
        .args(["mount", "--fuse", "--lower", &lower, "--upper"])
        .arg(d.join("u"))
        .arg("--work")
        .arg(d.join("w"))
        .arg(d.join("m")));
    std::fs::write(d.join("m/d/new"), "made").unwrap();
    std::fs::remove_file(d.join("m/d/a")).unwrap();
    ok(strata().arg("umount").arg(d.join("m")));
    assert!(
        std::fs::symlink_metadata(d.join("u/d/a"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(std::fs::read_to_string(d.join("u/d/new")).unwrap(), "made");
    let all = format!("{}:{lower}", d.join("u").display());
    ok(strata()
        .args(["mount", "--ro", "--lower", &all])
        .arg(d.join("m")));
    let names: Vec<String> = std::fs::read_dir(d.join("m/d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // (The lower's `.wh.b` is the OCI form, which only FUSE reads: kernel overlay shows b.)
    assert!(
        names.contains(&"new".to_string()) && !names.contains(&"a".to_string()),
        "kernel overlay reads the FUSE upper's file and whiteout: {names:?}"
    );
    ok(strata().arg("umount").arg(d.join("m")));
    // Refused clearly: missing layers.
    let out = run(strata()
        .args(["mount", "--fuse", "--lower", "/no/such/layer"])
        .arg(d.join("m")));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
    // Rootless: uid 65534 mounts and unmounts through fusermount3.
    let bin = d.join("strata");
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), &bin).unwrap();
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
    std::os::unix::fs::chown(d.join("m"), Some(65534), Some(65534)).unwrap();
    let script = format!(
        "set -e; cd {d}; {bin} mount --fuse --lower {lower} m; cat m/d/a; {bin} umount m",
        d = d.display(),
        bin = bin.display()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout == b"top",
        "rootless FUSE mount:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `strata-fuse`, fuse-overlayfs' command line (a link to the binary): relative layers from the
/// start dir, read-only without upperdir, `nosuid`/`nodev`/`ro` honoured, unknown options
/// ignored, live when it returns.
#[test]
fn strata_fuse_takes_fuse_overlayfs_arguments() {
    require_root();
    let t = scratch();
    let d = t.path();
    for p in ["l/d", "u", "w", "m"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    std::fs::write(d.join("l/d/f"), "lower").unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_strata"), d.join("strata-fuse")).unwrap();
    let fo = || {
        let mut c = Command::new(d.join("strata-fuse"));
        c.current_dir(d);
        c
    };
    ok(fo().args([
        "-o",
        "lowerdir=l,upperdir=u,workdir=w,allow_other,squash_to_root",
        "m",
    ]));
    assert_eq!(std::fs::read_to_string(d.join("m/d/f")).unwrap(), "lower");
    let flags = || nix::sys::statvfs::statvfs(&d.join("m")).unwrap().flags();
    use nix::sys::statvfs::FsFlags;
    assert!(
        !flags().intersects(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
        "as root, set-ID bits and devices work, as on kernel overlay: {:?}",
        flags()
    );
    std::fs::write(d.join("m/d/f"), "changed").unwrap();
    ok(Command::new("umount").arg(d.join("m")));
    // Podman passes its mount options (storage.conf's `mountopt`, `nodev` by default) along.
    ok(fo().args(["-o", "lowerdir=l,upperdir=u,workdir=w,nodev,nosuid,ro", "m"]));
    assert!(
        flags().contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_RDONLY),
        "{:?}",
        flags()
    );
    ok(Command::new("umount").arg(d.join("m")));
    assert_eq!(std::fs::read_to_string(d.join("u/d/f")).unwrap(), "changed");
    assert_eq!(
        std::fs::read_to_string(d.join("l/d/f")).unwrap(),
        "lower",
        "lowers untouched"
    );
    ok(fo().args(["-o", "lowerdir=u:l", "m"]));
    let err = std::fs::write(d.join("m/x"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "read-only without upperdir"
    );
    ok(Command::new("umount").arg(d.join("m")));
    let out = run(fo().arg("m"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("lowerdir"));
}

/// A FUSE server started with the usual soft open-file limit (1024, here 256) serves more
/// open files than that: it raises its limit, as it keeps a descriptor per open file.
#[test]
fn a_fuse_server_serves_more_open_files_than_its_starting_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    require_root();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= 4096,
        "the test needs a hard open-file limit of 4096, not {hard}"
    );
    if soft < 4096 {
        setrlimit(Resource::RLIMIT_NOFILE, 4096, hard).unwrap();
    }
    let t = scratch();
    let d = t.path();
    for p in ["l", "u", "w", "m"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    for i in 0..600 {
        std::fs::write(d.join(format!("l/f{i}")), "lower").unwrap();
    }
    let exe = env!("CARGO_BIN_EXE_strata");
    ok(Command::new("sh").arg("-c").arg(format!(
        "ulimit -Sn 256 && exec {exe} mount --fuse --lower {0}/l --upper {0}/u --work {0}/w {0}/m",
        d.display()
    )));
    let opened: std::io::Result<Vec<std::fs::File>> = (0..600)
        .map(|i| std::fs::File::open(d.join(format!("m/f{i}"))))
        .chain((0..600).map(|i| std::fs::File::create(d.join(format!("m/n{i}")))))
        .collect();
    let n = opened.map(|files| files.len());
    ok(Command::new("umount").arg(d.join("m")));
    assert_eq!(
        n.unwrap(),
        1200,
        "1,200 files open at once through the mount"
    );
}

/// `strata mount --fuse` of `d`'s `l` under upper `u` (work dir `w`) on `m`.
fn mount_union(d: &Path) -> Command {
    let mut c = strata();
    c.args(["mount", "--fuse", "--lower"])
        .arg(d.join("l"))
        .arg("--upper")
        .arg(d.join("u"))
        .arg("--work")
        .arg(d.join("w"))
        .arg(d.join("m"));
    c
}

/// A FUSE server ended by `umount` leaves the mount point alone: mounted again at once, the
/// new mount stays (fuser's own end of session unmounted the path a second time, taking a new
/// server's mount with it in about one try in ten).
#[test]
fn a_mount_point_takes_a_new_fuse_mount_right_after_umount() {
    require_root();
    let t = scratch();
    let d = t.path();
    for p in ["l", "u", "w", "m"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    std::fs::write(d.join("l/f"), "lower").unwrap();
    for i in 0..50 {
        ok(&mut mount_union(d));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            std::fs::read_to_string(d.join("m/f")).ok().as_deref(),
            Some("lower"),
            "mount {i} is still there"
        );
        ok(Command::new("umount").arg(d.join("m")));
    }
}

/// The CPUs in a `Cpus_allowed_list` line: `0-1`, `0,2`, `3`.
fn cpu_list(s: &str) -> Vec<usize> {
    s.trim()
        .split(',')
        .flat_map(|r| match r.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![r.parse().unwrap()],
        })
        .collect()
}

/// The request threads (`fuser-N`) of the FUSE server serving `merged`, in order, each with the
/// CPUs it may run on.
type Threads = Vec<(String, Vec<usize>)>;

fn request_threads(merged: &Path) -> Threads {
    let want = merged.as_os_str().as_encoded_bytes();
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmd.split(|&b| b == 0);
            (args.clone().any(|a| a == b"--foreground") && args.any(|a| a == want)).then_some(pid)
        })
        .expect("the FUSE server's process");
    let mut threads: Threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let comm = comm.trim().to_string();
            comm.starts_with("fuser-").then_some(())?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let list = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some((comm, cpu_list(list)))
        })
        .filter(|(c, _)| c != "fuser-bg")
        .collect();
    threads.sort();
    threads
}

/// `strata mount --fuse` serves with one request thread per CPU it may run on, each kept on its
/// own CPU (so a request is answered on the caller's CPU); with another `--threads` count they
/// are left to the scheduler.
#[test]
fn fuse_request_threads_are_kept_one_per_cpu() {
    require_root();
    let cpus = strata_fuse::threads::cpus();
    assert!(
        cpus.len() >= 2,
        "the test needs 2 CPUs; this machine gives {cpus:?}"
    );
    let t = scratch();
    let d = t.path();
    for p in ["l", "m"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    // The server runs on two CPUs whatever the machine has.
    let two = format!("{},{}", cpus[0], cpus[1]);
    // The threads as they are once placed (the mount is live before the server has started
    // them), or after 5 s.
    let mount = |extra: &[&str], placed: &dyn Fn(&Threads) -> bool| {
        ok(Command::new("taskset")
            .args(["-c", &two])
            .arg(env!("CARGO_BIN_EXE_strata"))
            .args(["mount", "--fuse", "--lower"])
            .arg(d.join("l"))
            .args(extra)
            .arg(d.join("m")));
        let t0 = std::time::Instant::now();
        let mut threads = request_threads(&d.join("m"));
        while !placed(&threads) && t0.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            threads = request_threads(&d.join("m"));
        }
        ok(Command::new("umount").arg(d.join("m")));
        threads
    };
    let kept = vec![
        ("fuser-0".to_string(), vec![cpus[0]]),
        ("fuser-1".to_string(), vec![cpus[1]]),
    ];
    assert_eq!(mount(&[], &|t| *t == kept), kept);
    let three = mount(&["--threads", "3"], &|t| t.len() == 3);
    assert_eq!(three.len(), 3, "{three:?}");
    assert!(
        three.iter().all(|(_, c)| *c == cpus[..2]),
        "left to the scheduler: {three:?}"
    );
}

/// The syncs (`fsync`, `fdatasync`, `syncfs`) a `strata mount --fuse -f --upper u` server
/// over `d/l` makes while `work` runs on its mount `d/m`, as strace logs them (`-y`: each
/// descriptor with its path).
fn traced_syncs(d: &Path, extra: &[&str], work: impl FnOnce(&Path)) -> Vec<String> {
    let log = d.join("strace.log");
    let mut server = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,fdatasync,syncfs",
            "-o",
        ])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_strata"))
        .args(["mount", "--fuse", "-f", "--lower"])
        .arg(d.join("l"))
        .arg("--upper")
        .arg(d.join("u"))
        .arg("--work")
        .arg(d.join("w"))
        .args(extra)
        .arg(d.join("m"))
        .spawn()
        .expect("strace is missing: apt-get install strace (scripts/test-all.sh does)");
    let t0 = std::time::Instant::now();
    while !strata_fuse::mounts::is_fuse_mount(&d.join("m")) {
        assert!(t0.elapsed().as_secs() < 20, "the server did not mount");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    work(&d.join("m"));
    ok(Command::new("umount").arg(d.join("m")));
    assert!(server.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    text.lines()
        .filter(|l| {
            ["fsync(", "fdatasync(", "syncfs("]
                .iter()
                .any(|c| l.contains(c))
        })
        .map(str::to_owned)
        .collect()
}

/// How many syncs the server makes while a lower file is appended to and fsynced and a lower
/// directory is renamed through its mount.
fn server_syncs(d: &Path, extra: &[&str]) -> usize {
    traced_syncs(d, extra, |m| {
        let mut f = std::fs::File::options()
            .append(true)
            .open(m.join("f"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"+").unwrap();
        f.sync_all().expect("fsync through the mount succeeds");
        drop(f);
        std::fs::rename(m.join("dir"), m.join("moved")).unwrap();
        std::fs::rename(m.join("moved"), m.join("dir")).unwrap();
    })
    .len()
}

/// fsync of a directory through the union syncs the directory's copy in the upper, every
/// time (the kernel stops asking a server that once answered ENOSYS, and then syncs
/// nothing); a directory only in lowers has nothing to sync and is fine too.
#[test]
fn fsync_of_a_directory_syncs_its_upper_copy() {
    require_root();
    let t = scratch();
    let d = t.path();
    for p in ["l/dir", "l/only-lower", "u", "w", "m"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    let fsync_dir = |p: &Path| {
        std::fs::File::open(p)
            .unwrap()
            .sync_all()
            .unwrap_or_else(|e| panic!("fsync of {}: {e}", p.display()))
    };
    let syncs = traced_syncs(d, &[], |m| {
        fsync_dir(&m.join("only-lower"));
        for i in 0..3 {
            std::fs::write(m.join(format!("dir/new{i}")), "x").unwrap();
            fsync_dir(&m.join("dir"));
        }
    });
    let upper_dir = format!("<{}>)", d.join("u/dir").display());
    let of_dir: Vec<_> = syncs
        .iter()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(&upper_dir))
        .collect();
    assert_eq!(of_dir.len(), 3, "one sync of u/dir per fsync: {syncs:#?}");
    assert!(
        !syncs.iter().any(|l| l.contains("only-lower")),
        "{syncs:#?}"
    );
}

/// `--fuse --volatile` (the drop-in's `volatile` or `fsync=0`, which Podman and containerd's
/// FUSE-mode snapshotter pass): the server syncs nothing, where a durable mount syncs its
/// copy-ups; it leaves kernel overlay's mark in the work dir, and neither the FUSE union nor
/// kernel overlay mounts that upper again until the mark is removed.
#[test]
fn volatile_fuse_mounts_sync_nothing_and_leave_the_kernel_mark() {
    require_root();
    let t = scratch();
    let d = t.path();
    for p in ["l/dir", "u", "w", "m"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    std::fs::write(d.join("l/f"), "lower").unwrap();
    std::fs::write(d.join("l/dir/a"), "in a lower dir").unwrap();
    let durable = server_syncs(d, &[]);
    assert!(durable > 0, "a durable mount syncs its copy-ups");
    for p in ["u", "w"] {
        std::fs::remove_dir_all(d.join(p)).unwrap();
        std::fs::create_dir(d.join(p)).unwrap();
    }
    assert_eq!(
        server_syncs(d, &["--volatile"]),
        0,
        "volatile: no sync at all"
    );
    assert_eq!(std::fs::read_to_string(d.join("u/f")).unwrap(), "lower+");

    let mark = d.join("w/work/incompat/volatile");
    assert!(mark.is_dir(), "kernel overlay's mark is left");
    fails(&mut mount_union(d), "incompat/volatile");
    let kernel = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            d.join("l").display(),
            d.join("u").display(),
            d.join("w").display()
        ))
        .arg(d.join("m"))
        .output()
        .unwrap();
    assert!(
        !kernel.status.success(),
        "kernel overlay refuses the same mark"
    );
    std::fs::remove_dir(&mark).unwrap();
    ok(&mut mount_union(d));
    assert_eq!(
        std::fs::read_to_string(d.join("m/f")).unwrap(),
        "lower+",
        "once the mark is removed, the upper mounts again"
    );
    ok(Command::new("umount").arg(d.join("m")));

    // The drop-in takes fuse-overlayfs' spellings.
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_strata"), d.join("strata-fuse")).unwrap();
    ok(Command::new(d.join("strata-fuse")).current_dir(d).args([
        "-o",
        "lowerdir=l,upperdir=u,workdir=w,fsync=0",
        "m",
    ]));
    ok(Command::new("umount").arg(d.join("m")));
    assert!(mark.is_dir(), "fsync=0 is volatile too");
}

/// `layer check`: a tree in the OCI `.wh.` form is reported as not kernel-mountable, converts
/// to the kernel form (then kernel overlay hides what it deletes), to userxattr (mounts with
/// `userxattr`), and back to `.wh.`; a tree with a redirect is refused for `.wh.`, unchanged.
#[test]
fn layer_check_converts_between_the_three_forms() {
    require_root();
    let t = scratch();
    let d = t.path();
    let (lower, top) = (d.join("lower"), d.join("top"));
    for p in ["lower/gone", "lower/dir/old", "lower/keep"] {
        std::fs::create_dir_all(d.join(p).parent().unwrap()).unwrap();
        std::fs::write(d.join(p), "lower\n").unwrap();
    }
    std::fs::create_dir_all(top.join("dir")).unwrap();
    std::fs::write(top.join(".wh.gone"), "").unwrap();
    std::fs::write(top.join("dir/.wh..wh..opq"), "").unwrap();
    std::fs::write(top.join("dir/new"), "top\n").unwrap();
    let check = |args: &[&str]| {
        let mut c = strata();
        c.args(["layer", "check"]).arg(&top).args(args);
        run(&mut c)
    };
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("1 .wh. whiteout file(s)") && text.contains("1 .wh..wh..opq marker(s)"),
        "{text}"
    );

    let mount_view = |opts: &str| -> Vec<String> {
        let m = d.join("m");
        let _ = std::fs::create_dir(&m);
        ok(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "ro,lowerdir={}:{}{opts}",
                top.display(),
                lower.display()
            ))
            .arg(&m));
        let mut names: Vec<String> = walkdir(&m);
        names.sort();
        ok(Command::new("umount").arg(&m));
        names
    };
    let want = vec!["dir".to_string(), "dir/new".into(), "keep".into()];

    let out = ok(strata()
        .args(["layer", "check"])
        .arg(&top)
        .args(["--to", "kernel"]));
    assert!(out.contains("mountable in the kernel form"), "{out}");
    assert!(
        std::fs::symlink_metadata(top.join("gone"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(!top.join(".wh.gone").exists() && !top.join("dir/.wh..wh..opq").exists());
    assert_eq!(
        mount_view(""),
        want,
        "kernel overlay hides what the layer deletes"
    );

    ok(strata()
        .args(["layer", "check"])
        .arg(&top)
        .args(["--to", "userxattr"]));
    let out = check(&["--for", "kernel"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "user.overlay.opaque is not the kernel form"
    );
    assert!(check(&["--for", "userxattr"]).status.success());
    assert_eq!(mount_view(",userxattr"), want);

    ok(strata()
        .args(["layer", "check"])
        .arg(&top)
        .args(["--to", "wh"]));
    assert!(top.join(".wh.gone").exists() && top.join("dir/.wh..wh..opq").exists());
    assert!(!top.join("gone").exists());
    assert!(check(&["--for", "wh"]).status.success());

    // A redirect cannot be written in the wh form: refused, nothing changed.
    ok(strata()
        .args(["layer", "check"])
        .arg(&top)
        .args(["--to", "kernel"]));
    ok(Command::new("setfattr")
        .args(["-n", "trusted.overlay.redirect", "-v", "/elsewhere"])
        .arg(top.join("dir")));
    let before = walkdir(&top);
    fails(
        strata()
            .args(["layer", "check"])
            .arg(&top)
            .args(["--to", "wh"]),
        "cannot express",
    );
    assert_eq!(walkdir(&top), before);
    assert!(
        std::fs::symlink_metadata(top.join("gone"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
}

fn walkdir(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                todo.push(r.clone());
            }
            out.push(r.display().to_string());
        }
    }
    out.sort();
    out
}
