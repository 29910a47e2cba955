//! Hostile archives: each class fails with a clear error naming the problem, nothing appears
//! outside the target, and the target is not created.

use std::io::Write;
use std::path::Path;

use strata_overlay::archive::{Entry, Kind};
use strata_overlay::compress::{Compression, Encoder};
use strata_overlay::{ApplyOptions, apply};

use crate::support::{Prereq, Tar, require, scratch, siblings};

/// Applies `blob` into `dir/target` with a sentinel beside it, and checks the failure.
fn refused(blob: &[u8], opts: &ApplyOptions, want: &str) {
    refused_any(blob, opts, &[want]);
}

/// As [`refused`], for failures that may surface in more than one way.
fn refused_any(blob: &[u8], opts: &ApplyOptions, wants: &[&str]) {
    require(Prereq::Root);
    let t = scratch();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"keep").unwrap();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let target = work.join("target");
    let err = apply(blob, &target, opts).expect_err("hostile layer applied");
    let msg = err.to_string();
    assert!(
        wants.iter().any(|w| msg.contains(w)),
        "error {msg:?} does not say any of {wants:?}"
    );
    assert!(!target.exists(), "target created");
    assert!(
        siblings(&work).is_empty(),
        "left behind: {:?}",
        siblings(&work)
    );
    assert_eq!(siblings(&outside), vec!["sentinel"]);
    assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), b"keep");
    assert_eq!(siblings(t.path()), vec!["outside", "work"]);
    assert!(!Path::new("/evil").exists() && !Path::new("/tmp/evil").exists());
}

fn d() -> ApplyOptions {
    ApplyOptions::default()
}

#[test]
fn absolute_path() {
    refused(
        &Tar::new().file("/tmp/evil", b"x").bytes(),
        &d(),
        "absolute path",
    );
}

#[test]
fn dot_dot_in_every_position() {
    for p in [
        "../evil",
        "a/../../evil",
        "a/b/../../../evil",
        "..",
        "./../evil",
    ] {
        refused(
            &Tar::new().dir("a/", 0o755).file(p, b"x").bytes(),
            &d(),
            "'..'",
        );
    }
}

#[test]
fn write_through_symlink_created_in_the_same_layer() {
    // Escaping symlinks, absolute and relative, then an entry written through them.
    refused(
        &Tar::new()
            .link(Kind::Symlink, "esc", "../../outside")
            .file("esc/evil", b"x")
            .bytes(),
        &d(),
        "symlink",
    );
    refused(
        &Tar::new()
            .link(Kind::Symlink, "esc", "/tmp")
            .file("esc/evil", b"x")
            .bytes(),
        &d(),
        "symlink",
    );
    // Even a symlink to a directory inside the layer is never followed.
    refused(
        &Tar::new()
            .dir("real/", 0o755)
            .link(Kind::Symlink, "alias", "real")
            .file("alias/f", b"x")
            .bytes(),
        &d(),
        "symlink",
    );
    // A whiteout or opaque marker through a symlink.
    refused(
        &Tar::new()
            .link(Kind::Symlink, "esc", "/tmp")
            .file("esc/.wh.evil", b"")
            .bytes(),
        &d(),
        "symlink",
    );
    refused(
        &Tar::new()
            .link(Kind::Symlink, "esc", "/tmp")
            .file("esc/.wh..wh..opq", b"")
            .bytes(),
        &d(),
        "symlink",
    );
}

#[test]
fn hardlink_escapes() {
    refused(
        &Tar::new()
            .link(Kind::HardLink, "h", "../../outside/sentinel")
            .bytes(),
        &d(),
        "'..'",
    );
    refused(
        &Tar::new().link(Kind::HardLink, "h", "/etc/passwd").bytes(),
        &d(),
        "absolute path",
    );
    refused(
        &Tar::new().link(Kind::HardLink, "h", "etc/passwd").bytes(),
        &d(),
        "not in this layer",
    );
    refused(
        &Tar::new()
            .link(Kind::Symlink, "esc", "/etc")
            .link(Kind::HardLink, "h", "esc/passwd")
            .bytes(),
        &d(),
        "symlink",
    );
    refused(
        &Tar::new()
            .dir("d/", 0o755)
            .link(Kind::HardLink, "h", "d")
            .bytes(),
        &d(),
        "directory",
    );
}

#[test]
fn nul_in_names() {
    let mut e = Entry::new(
        format!("{}\0evil", "a".repeat(120)).into_bytes(),
        Kind::File,
    );
    e.mode = 0o644;
    refused(&Tar::new().entry(e, b"").bytes(), &d(), "NUL");
    let mut l = Entry::new("link", Kind::Symlink);
    l.link = format!("{}\0x", "t".repeat(120)).into_bytes();
    refused(&Tar::new().entry(l, b"").bytes(), &d(), "NUL");
}

#[test]
fn whiteout_of_dot_or_dot_dot() {
    refused(&Tar::new().file(".wh..", b"").bytes(), &d(), "whiteout of");
    refused(
        &Tar::new().file("a/.wh...", b"").bytes(),
        &d(),
        "whiteout of",
    );
    refused(&Tar::new().file(".wh.", b"").bytes(), &d(), "whiteout of");
}

#[test]
fn overlay_xattrs_smuggled_in_pax() {
    for attr in [
        "trusted.overlay.redirect",
        "trusted.overlay.metacopy",
        "user.overlay.opaque",
        "trusted.overlay.origin",
    ] {
        let mut e = Entry::new("d/", Kind::Dir);
        e.mode = 0o755;
        e.xattrs = vec![(attr.as_bytes().to_vec(), b"/etc".to_vec())];
        refused(&Tar::new().entry(e, b"").bytes(), &d(), attr);
    }
}

#[test]
fn char_device_zero_zero_is_refused() {
    let mut e = Entry::new("fake-whiteout", Kind::Char);
    e.mode = 0o600;
    refused(&Tar::new().entry(e, b"").bytes(), &d(), "whiteout");
}

#[test]
fn truncated_streams() {
    let full = Tar::new().file("a", &[7u8; 5000]).file("b", b"x").bytes();
    refused(&full[..1500], &d(), "truncated");
    refused(&full[..700], &d(), "truncated");
    // Cut inside a header block.
    refused(&full[..512 + 5120 + 100], &d(), "truncated");
    let gz = gz(&full);
    refused_any(&gz[..gz.len() / 2], &d(), &["truncated", "layer stream"]);
}

#[test]
fn corrupt_streams() {
    refused(&vec![0x55u8; 4096], &d(), "checksum");
    let mut bad = Tar::new().file("a", b"hello").bytes();
    bad[0] ^= 0xff;
    refused(&bad, &d(), "checksum");
    let mut z = gz(&Tar::new().file("a", &[1u8; 10000]).bytes());
    let mid = z.len() / 2;
    z[mid] ^= 0xff;
    z[mid + 1] ^= 0xff;
    // Depending on where the damage falls, the decompressor or the tar reader notices first.
    refused_any(&z, &d(), &["layer stream", "checksum", "corrupt"]);
}

#[test]
fn decompression_bombs_hit_the_cap() {
    let bomb = Tar::new().file("zeros", &vec![0u8; 64 << 20]).bytes();
    let opts = ApplyOptions {
        max_size: 8 << 20,
        ..Default::default()
    };
    let g = gz(&bomb);
    assert!(
        g.len() < 1 << 20,
        "a real bomb: {} bytes compressed",
        g.len()
    );
    refused(&g, &opts, "size cap");
    let mut z = Encoder::new(Vec::new(), Compression::Zstd, 0).unwrap();
    z.write_all(&bomb).unwrap();
    refused(&z.finish().unwrap(), &opts, "size cap");
}

#[test]
fn oversized_extension_headers() {
    // A PAX header claiming 100 MiB of records.
    let mut bytes = Tar::new().file("x", b"").bytes();
    bytes[156] = b'x';
    bytes[124..136].copy_from_slice(b"00620000000\0");
    bytes[148..156].fill(b' ');
    let sum: u32 = bytes[..512].iter().map(|&b| b as u32).sum();
    bytes[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    refused(&bytes, &d(), "exceeds");
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new(), Compression::Gzip, 0).unwrap();
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Applies `blob` expecting success; nothing may appear outside the target.
fn contained(blob: &[u8], opts: &ApplyOptions) -> tempfile::TempDir {
    require(Prereq::Root);
    let t = scratch();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"keep").unwrap();
    let target = t.path().join("target");
    apply(blob, &target, opts).unwrap();
    assert_eq!(siblings(&outside), vec!["sentinel"]);
    assert_eq!(siblings(t.path()), vec!["outside", "target"]);
    t
}

#[test]
fn giant_declared_sizes() {
    // A header claiming two terabytes with ten bytes behind it (a small entry with its size
    // field patched: the writer will not write a lie).
    let mut bytes = Tar::new().file("huge", b"0123456789").bytes();
    bytes[124..136].copy_from_slice(b"20000000000\0");
    bytes[148..156].fill(b' ');
    let sum: u32 = bytes[..512].iter().map(|&b| b as u32).sum();
    bytes[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    refused_any(&bytes, &d(), &["truncated", "size cap"]);
    // Under the cap, declared sizes beyond it are refused before any data is read.
    let opts = ApplyOptions {
        max_size: 1 << 20,
        ..Default::default()
    };
    refused(&bytes, &opts, "size cap");
}

#[test]
fn duplicate_and_conflicting_entries_resolve_inside_the_target() {
    // The same path as a file, a directory, a symlink and a file again: the last one wins, as
    // in every OCI applier, and nothing is written through the symlink while it stands.
    let blob = Tar::new()
        .file("x", b"first")
        .dir("x", 0o755)
        .file("x/inner", b"in dir")
        .link(Kind::Symlink, "x", "../outside")
        .file("x", b"last")
        .file("y", b"one")
        .file("y", b"two")
        .bytes();
    let t = contained(&blob, &d());
    let target = t.path().join("target");
    assert_eq!(std::fs::read(target.join("x")).unwrap(), b"last");
    assert_eq!(std::fs::read(target.join("y")).unwrap(), b"two");
    // A hard link to a name replaced later keeps the content it linked to.
    let blob = Tar::new()
        .file("a", b"old")
        .link(Kind::HardLink, "b", "a")
        .file("a", b"new")
        .bytes();
    let t = contained(&blob, &d());
    let target = t.path().join("target");
    assert_eq!(std::fs::read(target.join("b")).unwrap(), b"old");
    assert_eq!(std::fs::read(target.join("a")).unwrap(), b"new");
}

#[test]
fn whiteouts_under_a_file_or_a_symlink_are_refused() {
    // A whiteout whose parent is a regular file of the same layer.
    refused_any(
        &Tar::new().file("f", b"x").file("f/.wh.g", b"").bytes(),
        &d(),
        &["not a directory", "Not a directory", "parent"],
    );
    // A whiteout whose parent is a symlink out of the target.
    refused_any(
        &Tar::new()
            .link(Kind::Symlink, "l", "../outside")
            .file("l/.wh.sentinel", b"")
            .bytes(),
        &d(),
        &["symlink", "escape", "outside"],
    );
    // An opaque marker under a symlink.
    refused_any(
        &Tar::new()
            .link(Kind::Symlink, "l", "/")
            .file("l/.wh..wh..opq", b"")
            .bytes(),
        &d(),
        &["symlink", "escape", "outside"],
    );
}

#[test]
fn non_utf8_names_apply_byte_for_byte() {
    use std::os::unix::ffi::OsStrExt;
    let name = b"caf\xe9-\xff\xfe";
    let mut e = Entry::new("x", Kind::File);
    e.path = name.to_vec();
    e.mode = 0o644;
    e.size = 2;
    let t = contained(&Tar::new().entry(e, b"ok").bytes(), &d());
    let names: Vec<Vec<u8>> = std::fs::read_dir(t.path().join("target"))
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert_eq!(names, vec![name.to_vec()]);
}

#[test]
fn paths_past_path_max_are_refused_and_long_ones_apply() {
    // 20 components of 200 bytes: 4,020 bytes, under PATH_MAX: applies.
    let long: Vec<String> = (0..20)
        .map(|i| format!("{i:03}{}", "d".repeat(197)))
        .collect();
    let path = format!("{}/f", long.join("/"));
    assert!(path.len() < 4096);
    let t = contained(&Tar::new().file(&path, b"deep").bytes(), &d());
    assert_eq!(
        std::fs::read(t.path().join("target").join(&path)).unwrap(),
        b"deep"
    );
    // 30 components: past PATH_MAX (4,096): a clear refusal, nothing left.
    let longer: Vec<String> = (0..30)
        .map(|i| format!("{i:03}{}", "d".repeat(197)))
        .collect();
    let path = format!("{}/f", longer.join("/"));
    refused_any(
        &Tar::new().file(&path, b"deep").bytes(),
        &d(),
        &["too long", "File name too long", "PATH_MAX"],
    );
    // A single component past NAME_MAX (255).
    refused_any(
        &Tar::new().file(&"n".repeat(300), b"x").bytes(),
        &d(),
        &["too long", "File name too long", "NAME_MAX"],
    );
}
