//! The node table at scale: inode numbers that outlive copy-up and the kernel's caches, nodes
//! forgotten when the kernel forgets them, and a walk over a large tree kept under the table's
//! cap (memory bounded while the kernel would cache every entry it met).

use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::posix::Union;

/// Asks the kernel to drop its unused dentries and inodes, which FORGETs their nodes.
fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// Waits up to 10 s for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

#[test]
fn inode_numbers_outlive_copy_up_and_the_kernels_caches() {
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("d")).unwrap();
        std::fs::write(l.join("f"), b"f").unwrap();
        std::fs::write(l.join("d/g"), b"g").unwrap();
        std::fs::hard_link(l.join("f"), l.join("h")).unwrap();
    });
    let names = ["f", "h", "d", "d/g"];
    let before: Vec<u64> = names.iter().map(|n| ino(&u.p(n))).collect();
    assert_eq!(before[0], before[1], "hard links share a number");
    assert_eq!(
        before[0],
        ino(&u.lower.join("f")),
        "the backing file's number"
    );
    for e in std::fs::read_dir(&u.at).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.ino(), ino(&e.path()), "readdir agrees with stat");
    }
    // Copy-ups: a chmod of a hard-linked file, a new file in a lower directory.
    std::fs::set_permissions(u.p("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(u.p("d/new"), b"n").unwrap();
    assert!(u.upper.join("f").exists() && u.upper.join("d").exists());
    assert_ne!(
        ino(&u.upper.join("f")),
        before[0],
        "the copy is another file"
    );
    let after: Vec<u64> = names.iter().map(|n| ino(&u.p(n))).collect();
    assert_eq!(after, before, "copied up, the numbers stay");
    // The kernel forgets every node; looked up again, they come back with the same numbers.
    drop_caches();
    eventually("the kernel forgets the nodes", || u.stats.nodes() <= 2);
    let again: Vec<u64> = names.iter().map(|n| ino(&u.p(n))).collect();
    assert_eq!(
        again, before,
        "the same numbers after the kernel forgot them"
    );
    assert_eq!(u.stats.origins(), 2, "the copies of f (and h) and of d");
    // A deleted copy's number is not shown by whatever file gets its upper inode next.
    std::fs::remove_file(u.p("f")).unwrap();
    std::fs::remove_file(u.p("h")).unwrap();
    assert_eq!(u.stats.origins(), 1);
    for i in 0..20 {
        let p = u.p(&format!("new{i}"));
        std::fs::write(&p, b"x").unwrap();
        assert_ne!(
            ino(&p),
            before[0],
            "a new file shows a deleted file's number"
        );
    }
}

#[test]
fn nodes_go_when_the_kernel_forgets_them() {
    let u = Union::new(|l| {
        std::fs::create_dir(l.join("d")).unwrap();
        for i in 0..2000 {
            std::fs::write(l.join(format!("d/f{i}")), b"").unwrap();
        }
    });
    for e in std::fs::read_dir(u.p("d")).unwrap() {
        std::fs::symlink_metadata(e.unwrap().path()).unwrap();
    }
    assert!(u.stats.nodes() > 2000, "{} nodes", u.stats.nodes());
    let held = std::fs::File::open(u.p("d/f7")).unwrap();
    drop_caches();
    // Only what is in use stays: the root, d and the open file.
    eventually("the kernel forgets the nodes", || u.stats.nodes() <= 3);
    drop(held);
}

/// The process's resident memory (the server runs in this process), in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_walk_of_a_million_entries_stays_under_the_node_cap() {
    const DIRS: usize = 1000;
    const FILES: usize = 1000;
    const CAP: usize = 20_000;
    let u = Union::with_cap(
        |l| {
            for d in 0..DIRS {
                let dir = l.join(format!("d{d}"));
                std::fs::create_dir(&dir).unwrap();
                for f in 0..FILES {
                    std::fs::File::create(dir.join(format!("f{f}"))).unwrap();
                }
            }
        },
        CAP,
    );
    let rss0 = rss_kib();
    let (mut seen, mut most) = (0usize, 0usize);
    for d in 0..DIRS {
        for e in std::fs::read_dir(u.p(&format!("d{d}"))).unwrap() {
            std::fs::symlink_metadata(e.unwrap().path()).unwrap();
            seen += 1;
        }
        most = most.max(u.stats.nodes());
    }
    let grew = rss_kib().saturating_sub(rss0);
    eprintln!(
        "walked {seen} entries: at most {most} nodes (cap {CAP}), resident memory +{grew} KiB"
    );
    assert_eq!(seen, DIRS * FILES);
    // Eviction runs beside the walk, so the table may pass the cap by what one listing adds
    // while a round is under way.
    assert!(
        most <= CAP + 2 * FILES + 64,
        "{most} nodes for a cap of {CAP}"
    );
    // One node per entry would be over 200 MiB here.
    assert!(grew < 64 * 1024, "resident memory grew by {grew} KiB");
}
