//! Applying layers: entry types, metadata, whiteouts, opaque dirs, digests, compressions.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;

use strata_overlay::archive::{Entry, Kind};
use strata_overlay::compress::{Compression, Encoder};
use strata_overlay::{ApplyOptions, Digest, Error, apply};

use crate::support::{self, Prereq, Tar, require, scratch, snapshot, xattr_get};

fn compress(data: &[u8], kind: Compression) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new(), kind, 0).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn rich_layer() -> Vec<u8> {
    let mut setuid = Entry::new("usr/bin/su", Kind::File);
    setuid.mode = 0o4755;
    setuid.uid = 0;
    setuid.size = 4;
    setuid.mtime = 1_600_000_000;
    setuid.mtime_nsec = 250;
    setuid.xattrs = vec![
        (
            b"security.capability".to_vec(),
            b"\x01\x00\x00\x02\n\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                .to_vec(),
        ),
        (b"user.note".to_vec(), b"line1\nline2=\x00x".to_vec()),
    ];
    let mut owned = Entry::new("home/user/file", Kind::File);
    owned.mode = 0o640;
    owned.uid = 1000;
    owned.gid = 1001;
    owned.size = 2;
    let mut sticky = Entry::new("tmp/", Kind::Dir);
    sticky.mode = 0o1777;
    sticky.mtime = 1_500_000_000;
    let mut dev = Entry::new("dev/null", Kind::Char);
    dev.mode = 0o666;
    dev.dev_major = 1;
    dev.dev_minor = 3;
    let mut blk = Entry::new("dev/loop9", Kind::Block);
    blk.mode = 0o660;
    blk.dev_major = 7;
    blk.dev_minor = 9;
    let mut fifo = Entry::new("run/fifo", Kind::Fifo);
    fifo.mode = 0o600;
    let long = format!("deep/{}/file", "d".repeat(200));
    let mut etc = Entry::new("etc/", Kind::Dir);
    etc.mode = 0o755;
    etc.mtime = 1_400_000_000;
    Tar::new()
        .entry(etc, b"")
        .file("etc/passwd", b"root:x:0:0\n")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .entry(setuid, b"\x7fELF")
        .dir("home/", 0o755)
        .dir("home/user/", 0o700)
        .entry(owned, b"hi")
        .entry(sticky, b"")
        .dir("dev/", 0o755)
        .entry(dev, b"")
        .entry(blk, b"")
        .dir("run/", 0o755)
        .entry(fifo, b"")
        .link(Kind::Symlink, "etc/link", "../usr/bin/su")
        .link(Kind::HardLink, "etc/passwd-", "etc/passwd")
        .file(&long, b"long")
        .file("gone/.wh.file", b"")
        .dir("opaque/", 0o755)
        .file("opaque/.wh..wh..opq", b"")
        .file("opaque/kept", b"k")
        .bytes()
}

#[test]
fn applies_every_entry_type_with_metadata() {
    require(Prereq::Root);
    let t = scratch();
    let target = t.path().join("layer");
    let blob = rich_layer();
    let r = apply(&blob[..], &target, &ApplyOptions::default()).unwrap();
    assert_eq!(r.compression, Compression::None);
    assert_eq!(r.diff_id, Digest::of(&blob));
    assert_eq!(r.digest, Digest::of(&blob));
    let m = |p: &str| std::fs::symlink_metadata(target.join(p)).unwrap();
    assert_eq!(m("usr/bin/su").mode() & 0o7777, 0o4755);
    assert_eq!(m("usr/bin/su").mtime_nsec(), 250);
    assert_eq!(
        xattr_get(&target.join("usr/bin/su"), "user.note"),
        b"line1\nline2=\x00x"
    );
    assert_eq!(
        xattr_get(&target.join("usr/bin/su"), "security.capability").len(),
        20
    );
    assert_eq!(
        (m("home/user/file").uid(), m("home/user/file").gid()),
        (1000, 1001)
    );
    assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(
        m("tmp").mtime(),
        1_500_000_000,
        "directory times are set after their children"
    );
    assert_eq!(m("etc").mtime(), 1_400_000_000);
    assert!(m("dev/null").file_type().is_char_device());
    assert_eq!(m("dev/null").rdev(), nix::sys::stat::makedev(1, 3));
    assert!(m("dev/loop9").file_type().is_block_device());
    assert!(m("run/fifo").file_type().is_fifo());
    assert_eq!(
        std::fs::read_link(target.join("etc/link"))
            .unwrap()
            .to_str()
            .unwrap(),
        "../usr/bin/su"
    );
    assert_eq!(
        m("etc/passwd").ino(),
        m("etc/passwd-").ino(),
        "hard link kept"
    );
    assert_eq!(
        std::fs::read(target.join(format!("deep/{}/file", "d".repeat(200)))).unwrap(),
        b"long"
    );
    let wh = m("gone/file");
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is char 0:0"
    );
    assert_eq!(
        xattr_get(&target.join("opaque"), "trusted.overlay.opaque"),
        b"y"
    );
    assert!(!target.join("opaque/.wh..wh..opq").exists());
    assert_eq!(std::fs::read(target.join("opaque/kept")).unwrap(), b"k");
}

#[test]
fn compressions_give_the_same_tree_and_digests() {
    require(Prereq::Root);
    let t = scratch();
    let plain = rich_layer();
    let want = Digest::of(&plain);
    let mut trees = Vec::new();
    for kind in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let blob = compress(&plain, kind);
        let target = t.path().join(kind.to_string());
        let opts = ApplyOptions {
            expected_diff_id: Some(want),
            expected_digest: Some(Digest::of(&blob)),
            ..Default::default()
        };
        let r = apply(&blob[..], &target, &opts).unwrap();
        assert_eq!(r.compression, kind);
        assert_eq!(r.diff_id, want);
        trees.push(snapshot(&target));
    }
    assert_eq!(trees[0], trees[1]);
    assert_eq!(trees[0], trees[2]);
}

#[test]
fn digest_mismatch_leaves_nothing() {
    require(Prereq::Root);
    let t = scratch();
    let blob = compress(&rich_layer(), Compression::Gzip);
    let target = t.path().join("layer");
    let wrong = Digest::of(b"something else");
    for opts in [
        ApplyOptions {
            expected_digest: Some(wrong),
            ..Default::default()
        },
        ApplyOptions {
            expected_diff_id: Some(wrong),
            ..Default::default()
        },
    ] {
        let err = apply(&blob[..], &target, &opts).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("mismatch"), "{err}");
        assert!(!target.exists());
        assert!(
            support::siblings(t.path()).is_empty(),
            "temp dir left behind: {:?}",
            support::siblings(t.path())
        );
    }
}

#[test]
fn whiteout_removes_an_earlier_entry_of_the_same_layer_and_later_entries_replace_it() {
    require(Prereq::Root);
    let t = scratch();
    let target = t.path().join("layer");
    let blob = Tar::new()
        .dir("a/", 0o755)
        .file("a/f", b"1")
        .dir("a/sub/", 0o755)
        .file("a/sub/x", b"x")
        .file("a/.wh.f", b"")
        .file("a/.wh.sub", b"")
        .file("b", b"first")
        .file("b", b"second")
        .file("c/.wh.d", b"")
        .file("c/d", b"back")
        .bytes();
    apply(&blob[..], &target, &ApplyOptions::default()).unwrap();
    for p in ["a/f", "a/sub"] {
        let m = std::fs::symlink_metadata(target.join(p)).unwrap();
        assert!(
            m.file_type().is_char_device() && m.rdev() == 0,
            "{p} is a whiteout"
        );
    }
    assert_eq!(std::fs::read(target.join("b")).unwrap(), b"second");
    assert_eq!(std::fs::read(target.join("c/d")).unwrap(), b"back");
}

#[test]
fn rootless_form_uses_user_xattrs_and_skips_devices() {
    require(Prereq::Root);
    let t = scratch();
    let target = t.path().join("layer");
    let r = apply(&rich_layer()[..], &target, &ApplyOptions::rootless()).unwrap();
    assert_eq!(
        xattr_get(&target.join("opaque"), "user.overlay.opaque"),
        b"y"
    );
    assert!(xattr_get(&target.join("opaque"), "trusted.overlay.opaque").is_empty());
    assert!(!target.join("dev/null").exists() && !target.join("dev/loop9").exists());
    assert!(target.join("run/fifo").exists(), "fifos need no privilege");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("dev/null") && w.contains("skipped")),
        "{:?}",
        r.warnings
    );
}

#[test]
fn implied_parents_take_metadata_from_the_lowers() {
    require(Prereq::Root);
    let t = scratch();
    let lower = t.path().join("lower");
    std::fs::create_dir_all(lower.join("etc/app")).unwrap();
    std::fs::set_permissions(
        lower.join("etc/app"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::chown(lower.join("etc/app"), Some(7), Some(8)).unwrap();
    let target = t.path().join("layer");
    let blob = Tar::new().file("etc/app/conf", b"c").bytes();
    let opts = ApplyOptions {
        parents: Some(vec![lower]),
        ..Default::default()
    };
    apply(&blob[..], &target, &opts).unwrap();
    let m = std::fs::metadata(target.join("etc/app")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o750, 7, 8));
    assert_eq!(
        std::fs::metadata(target.join("etc")).unwrap().mode() & 0o7777,
        0o755
    );
}

#[test]
fn target_must_be_new_or_empty() {
    require(Prereq::Root);
    let t = scratch();
    let target = t.path().join("layer");
    std::fs::create_dir(&target).unwrap();
    apply(
        &Tar::new().file("f", b"1").bytes()[..],
        &target,
        &ApplyOptions::default(),
    )
    .unwrap();
    let err = apply(
        &Tar::new().file("g", b"2").bytes()[..],
        &target,
        &ApplyOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(support::listing(&target), vec!["f"]);
}

/// GNU tar's sparse formats (old GNU, PAX 0.0, 0.1 and 1.0) apply with their holes kept.
#[test]
fn sparse_files_from_gnu_tar_keep_holes() {
    require(Prereq::Root);
    require(Prereq::Command("tar"));
    let t = scratch();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("sparse")).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"middle", 20 << 20).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    drop(f);
    let want = std::fs::read(src.join("sparse")).unwrap();
    for (name, args) in [
        ("gnu", vec!["--format=gnu"]),
        ("pax00", vec!["--format=posix", "--sparse-version=0.0"]),
        ("pax01", vec!["--format=posix", "--sparse-version=0.1"]),
        ("pax10", vec!["--format=posix", "--sparse-version=1.0"]),
    ] {
        let tarball = t.path().join(format!("{name}.tar"));
        let st = Command::new("tar")
            .args(&args)
            .arg("--sparse")
            .arg("-cf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("sparse")
            .status()
            .unwrap();
        assert!(st.success());
        let target = t.path().join(name);
        apply(
            std::fs::File::open(&tarball).unwrap(),
            &target,
            &ApplyOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = target.join("sparse");
        assert_eq!(std::fs::read(&got).unwrap(), want, "{name}: content");
        let blocks = std::fs::metadata(&got).unwrap().blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "{name}: holes were filled ({} KiB allocated)",
            blocks / 2
        );
    }
}

/// A layer from the tar crate (an independent writer, GNU long names) applies the same.
#[test]
fn tar_crate_layers_apply() {
    require(Prereq::Root);
    let t = scratch();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(3);
    let long = format!("x/{}", "y".repeat(150));
    b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
    let blob = b.into_inner().unwrap();
    let target = t.path().join("layer");
    apply(&blob[..], &target, &ApplyOptions::default()).unwrap();
    assert_eq!(std::fs::read(target.join(&long)).unwrap(), b"abc");
}

#[test]
fn whiteouts_with_nothing_below_are_dropped_when_the_lowers_are_known() {
    require(Prereq::Root);
    let t = scratch();
    let lower = t.path().join("lower");
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::write(lower.join("etc/present"), b"p").unwrap();
    let blob = Tar::new()
        .file("etc/.wh.present", b"")
        .file("etc/.wh.absent", b"")
        .bytes();
    let known = t.path().join("known");
    apply(
        &blob[..],
        &known,
        &ApplyOptions {
            parents: Some(vec![lower]),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        std::fs::symlink_metadata(known.join("etc/present"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(
        std::fs::symlink_metadata(known.join("etc/absent")).is_err(),
        "a whiteout hiding nothing was kept"
    );
    let bottom = t.path().join("bottom");
    apply(
        &blob[..],
        &bottom,
        &ApplyOptions {
            parents: Some(vec![]),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(support::listing(&bottom), vec!["etc"]);
    let unknown = t.path().join("unknown");
    apply(&blob[..], &unknown, &ApplyOptions::default()).unwrap();
    assert_eq!(
        support::listing(&unknown),
        vec!["etc", "etc/absent", "etc/present"]
    );
}

/// A pull applies layers before their lowers exist (`defer_lowers`); `settle_lowers` then
/// leaves exactly what an apply with the lowers known would have: whiteouts hiding nothing
/// gone, implied directories with the lower's mode and owner, directory times kept.
#[test]
fn deferred_apply_settles_to_what_known_lowers_give() {
    require(Prereq::Root);
    let t = scratch();
    let lower = t.path().join("lower");
    std::fs::create_dir_all(lower.join("etc/app")).unwrap();
    std::fs::write(lower.join("etc/present"), b"p").unwrap();
    std::fs::set_permissions(
        lower.join("etc/app"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::chown(lower.join("etc/app"), Some(7), Some(8)).unwrap();
    let blob = Tar::new()
        .dir("etc", 0o755)
        .file("etc/.wh.present", b"")
        .file("etc/.wh.absent", b"")
        .file("etc/app/conf", b"c")
        .file("new/.wh.gone", b"")
        .bytes();
    let known = t.path().join("known");
    apply(
        &blob[..],
        &known,
        &ApplyOptions {
            parents: Some(vec![lower.clone()]),
            ..Default::default()
        },
    )
    .unwrap();
    let deferred = t.path().join("deferred");
    let r = apply(
        &blob[..],
        &deferred,
        &ApplyOptions {
            defer_lowers: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.deferred.whiteouts.len(), 3, "{:?}", r.deferred);
    assert_eq!(
        r.deferred.implied_dirs,
        vec![b"etc/app".to_vec(), b"new".to_vec()],
        "etc is in the tar, so only etc/app and new are implied"
    );
    // Before settling the whiteouts are all there.
    assert!(deferred.join("etc/absent").symlink_metadata().is_ok());
    strata_overlay::apply::settle_lowers(&deferred, &[lower], &r.deferred, false).unwrap();
    assert_eq!(support::snapshot(&deferred), support::snapshot(&known));
    let m = std::fs::metadata(deferred.join("etc/app")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o750, 7, 8));
}
