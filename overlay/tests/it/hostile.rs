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
