//! The snapshotter's API directly.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use strata_snapshotter::meta::Kind;
use strata_snapshotter::{Error, Mode, Snapshotter};

use crate::support::{Mounted, open, require_root, scratch};

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn usage_of_active_and_committed_snapshots() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    let m = s.prepare("a", "", no_labels()).unwrap();
    let empty = s.usage("a").unwrap();
    {
        let mnt = Mounted::new(&m, t.path().join("m"));
        std::fs::write(mnt.0.join("big"), vec![7u8; 1 << 20]).unwrap();
        for i in 0..10 {
            std::fs::write(mnt.0.join(format!("f{i}")), b"x").unwrap();
        }
        std::fs::hard_link(mnt.0.join("big"), mnt.0.join("big-link")).unwrap();
    }
    let active = s.usage("a").unwrap();
    assert_eq!(
        active.inodes,
        empty.inodes + 11,
        "hard links are counted once"
    );
    assert!(
        active.size >= (1 << 20) + empty.size && active.size < (1 << 20) + 200 * 1024,
        "{active:?}"
    );
    s.commit("c", "a", no_labels(), None).unwrap();
    assert_eq!(s.usage("c").unwrap(), active);
    assert!(matches!(s.usage("a"), Err(Error::NotFound(_))));
}

#[test]
fn cleanup_removes_only_what_no_record_owns() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    s.prepare("keep", "", no_labels()).unwrap();
    let live = s.id_of("keep").unwrap();
    let snaps = t.path().join("root/snapshots");
    for junk in ["9999", "new-1-2", "rm-77", "stray"] {
        std::fs::create_dir_all(snaps.join(junk).join("fs/deep")).unwrap();
    }
    s.cleanup().unwrap();
    // The reaper deletes off the request path; wait for it.
    for _ in 0..100 {
        let names: Vec<String> = std::fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if names == vec![live.to_string()] {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!(
        "orphans left: {:?}",
        std::fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_restarted_store_keeps_snapshots_labels_and_times() {
    require_root();
    let t = scratch();
    let before = {
        let s = open(t.path());
        s.prepare("base-a", "", labels(&[("containerd.io/gc.root", "1")]))
            .unwrap();
        s.commit("base", "base-a", labels(&[("l", "v")]), None)
            .unwrap();
        s.prepare("child", "base", labels(&[("x", "y")])).unwrap();
        s.view("v", "base", no_labels()).unwrap();
        s.list(&[]).unwrap()
    };
    let s = open(t.path());
    assert_eq!(s.list(&[]).unwrap(), before);
    let child = s.stat("child").unwrap();
    assert_eq!((child.parent.as_str(), child.kind), ("base", Kind::Active));
    assert_eq!(child.labels, labels(&[("x", "y")]));
    s.remove("child").unwrap();
    s.remove("v").unwrap();
    s.remove("base").unwrap();
    assert!(s.list(&[]).unwrap().is_empty());
}

#[test]
fn special_files_and_xattrs_survive_commit_and_views() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    let m = s.prepare("b", "", no_labels()).unwrap();
    {
        let mnt = Mounted::new(&m, t.path().join("m1"));
        let r = &mnt.0;
        std::fs::write(r.join("file"), b"data").unwrap();
        std::fs::set_permissions(r.join("file"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("file", r.join("link")).unwrap();
        nix::unistd::mkfifo(
            &r.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        nix::sys::stat::mknod(
            &r.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        std::fs::hard_link(r.join("file"), r.join("file2")).unwrap();
        let f = std::fs::File::create(r.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        std::process::Command::new("setfattr")
            .args(["-n", "user.k", "-v", "v1"])
            .arg(r.join("file"))
            .status()
            .unwrap();
    }
    s.commit("base", "b", no_labels(), None).unwrap();
    let m = s.prepare("c", "base", no_labels()).unwrap();
    {
        let mnt = Mounted::new(&m, t.path().join("m2"));
        std::fs::set_permissions(mnt.0.join("file"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::remove_file(mnt.0.join("link")).unwrap();
        std::fs::create_dir(mnt.0.join("newdir")).unwrap();
    }
    s.commit("top", "c", no_labels(), None).unwrap();
    let v = s.view("view", "top", no_labels()).unwrap();
    let mnt = Mounted::new(&v, t.path().join("m3"));
    let r = &mnt.0;
    let meta = |p: &str| std::fs::symlink_metadata(r.join(p)).unwrap();
    assert_eq!(
        meta("file").mode() & 0o7777,
        0o700,
        "chmod in the upper (metacopy where supported)"
    );
    assert_eq!(
        std::fs::read(r.join("file")).unwrap(),
        b"data",
        "data of a metadata-only copy-up"
    );
    assert!(!r.join("link").exists() && std::fs::symlink_metadata(r.join("link")).is_err());
    assert!(meta("fifo").file_type().is_fifo());
    assert!(meta("null").file_type().is_char_device());
    assert_eq!(meta("file2").nlink(), 2, "the lower hard link is intact");
    assert!(meta("sparse").len() == 1 << 30 && meta("sparse").blocks() < 64);
    assert!(meta("newdir").is_dir());
    let x = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.k"])
        .arg(r.join("file"))
        .output()
        .unwrap();
    assert_eq!(x.stdout, b"v1");
    assert!(
        std::fs::write(r.join("nope"), b"x").is_err(),
        "a view is read-only"
    );
}

#[test]
fn error_kinds_match_containerd() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    assert!(matches!(
        s.prepare("a", "missing", no_labels()),
        Err(Error::NotFound(_))
    ));
    s.prepare("a", "", no_labels()).unwrap();
    assert!(matches!(
        s.prepare("a", "", no_labels()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        s.view("a", "", no_labels()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(
        matches!(
            s.prepare("b", "a", no_labels()),
            Err(Error::InvalidArgument(_))
        ),
        "parent not committed"
    );
    s.view("v", "", no_labels()).unwrap();
    assert!(
        matches!(
            s.commit("x", "v", no_labels(), None),
            Err(Error::FailedPrecondition(_))
        ),
        "commit of a view"
    );
    assert!(matches!(
        s.commit("x", "nope", no_labels(), None),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(s.remove("nope"), Err(Error::NotFound(_))));
    s.commit("c", "a", no_labels(), None).unwrap();
    assert!(
        matches!(
            s.commit("c", "c", no_labels(), None),
            Err(Error::FailedPrecondition(_))
        ),
        "commit of a committed"
    );
    s.prepare("child", "c", no_labels()).unwrap();
    let e = s.remove("c").unwrap_err();
    assert!(
        matches!(e, Error::FailedPrecondition(_)) && e.to_string().contains("remove"),
        "{e}"
    );
    assert!(matches!(
        s.list(&["kind==".into()]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.prepare("", "", no_labels()),
        Err(Error::InvalidArgument(_))
    ));
    let big = labels(&[("k", &"v".repeat(5000))]);
    assert!(matches!(
        s.prepare("big", "", big),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(s.mounts("c"), Err(Error::FailedPrecondition(_))));
    assert!(matches!(s.mounts("nope"), Err(Error::NotFound(_))));
}

#[test]
fn list_filters_and_update_masks() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    s.prepare(
        "a",
        "",
        labels(&[("containerd.io/gc.root", "1"), ("l", "x")]),
    )
    .unwrap();
    s.commit(
        "ca",
        "a",
        labels(&[("containerd.io/gc.root", "1"), ("l", "x")]),
        None,
    )
    .unwrap();
    s.prepare("b", "ca", labels(&[("l", "y")])).unwrap();
    s.view("v", "ca", no_labels()).unwrap();
    let names = |f: &[&str]| -> Vec<String> {
        s.list(&f.iter().map(|x| x.to_string()).collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect()
    };
    assert_eq!(names(&[]), vec!["b", "ca", "v"]);
    assert_eq!(names(&["kind==committed"]), vec!["ca"]);
    assert_eq!(names(&["parent==ca"]), vec!["b", "v"]);
    assert_eq!(names(&["labels.\"containerd.io/gc.root\""]), vec!["ca"]);
    assert_eq!(names(&["labels.l==y", "kind==view"]), vec!["b", "v"]);
    assert_eq!(names(&["labels.l!=y,kind!=view"]), vec!["ca"]);
    assert_eq!(names(&["name~=^[bv]$,parent==ca"]), vec!["b", "v"]);

    let mut want = s.stat("b").unwrap();
    let created = want.created;
    want.labels = labels(&[("l", "z"), ("new", "1")]);
    want.parent = "ignored".into();
    let got = s.update(&want, &["labels.new".into()]).unwrap();
    assert_eq!(got.labels, labels(&[("l", "y"), ("new", "1")]));
    assert_eq!(got.parent, "ca");
    assert_eq!(got.created, created);
    assert!(got.updated > created);
    let got = s.update(&want, &[]).unwrap();
    assert_eq!(got.labels, want.labels);
    want.labels = labels(&[]);
    let got = s.update(&want, &["labels.l".into()]).unwrap();
    assert_eq!(got.labels, labels(&[("new", "1")]));
    assert!(matches!(
        s.update(&want, &["parent".into()]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.update(&want, &["name".into()]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn commit_can_rebase_onto_another_parent() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    s.prepare("p1a", "", no_labels()).unwrap();
    s.commit("p1", "p1a", no_labels(), None).unwrap();
    s.prepare("p2a", "", no_labels()).unwrap();
    s.commit("p2", "p2a", no_labels(), None).unwrap();
    s.prepare("x", "p1", no_labels()).unwrap();
    s.commit("xc", "x", no_labels(), Some("p2")).unwrap();
    assert_eq!(s.stat("xc").unwrap().parent, "p2");
    s.remove("p1").unwrap();
    assert!(s.remove("p2").is_err(), "p2 now has a child");
    s.prepare("y", "p2", no_labels()).unwrap();
    assert!(
        matches!(
            s.commit("yc", "y", no_labels(), Some("y")),
            Err(Error::InvalidArgument(_))
        ),
        "rebase onto an active"
    );
}

#[test]
fn volatile_label_mounts_without_syncs_and_is_discarded_after_a_reboot() {
    require_root();
    let t = scratch();
    let root = t.path().join("root");
    let s = Snapshotter::open_at_boot(&root, Mode::Overlay, "boot-1".into()).unwrap();
    s.prepare("base-a", "", no_labels()).unwrap();
    s.commit("base", "base-a", no_labels(), None).unwrap();
    let vol = labels(&[("containerd.io/snapshot/strata.volatile", "true")]);
    let m = s.prepare("ctr", "base", vol.clone()).unwrap();
    assert!(m[0].options.iter().any(|o| o == "volatile"), "{m:?}");
    let mut unpack = vol.clone();
    unpack.insert("containerd.io/snapshot.ref".into(), "sha256:x".into());
    let m2 = s.prepare("unpack", "base", unpack).unwrap();
    assert!(
        !m2[0].options.iter().any(|o| o == "volatile"),
        "never for unpack: {m2:?}"
    );
    {
        let _mnt = Mounted::new(&m, t.path().join("m"));
        std::fs::write(_mnt.0.join("f"), b"x").unwrap();
    }
    // Within one boot it mounts again (the kernel's marker is cleared).
    let again = s.mounts("ctr").unwrap();
    drop(Mounted::new(&again, t.path().join("m")));
    drop(s);
    let same = Snapshotter::open_at_boot(&root, Mode::Overlay, "boot-1".into()).unwrap();
    assert!(same.stat("ctr").is_ok(), "same boot: kept");
    drop(same);
    let after = Snapshotter::open_at_boot(&root, Mode::Overlay, "boot-2".into()).unwrap();
    assert!(
        matches!(after.stat("ctr"), Err(Error::NotFound(_))),
        "after a reboot: discarded"
    );
    assert!(after.stat("unpack").is_ok() && after.stat("base").is_ok());
}

#[test]
fn adopt_hands_the_upper_over_without_copying() {
    require_root();
    let t = scratch();
    let s = open(t.path());
    s.prepare("base-a", "", no_labels()).unwrap();
    std::fs::write(s.layer_dirs("base-a").unwrap().0.join("old"), b"1").unwrap();
    s.commit("base", "base-a", no_labels(), None).unwrap();
    let m = s.prepare("ctr", "base", labels(&[("keep", "me")])).unwrap();
    {
        let mnt = Mounted::new(&m, t.path().join("m"));
        std::fs::write(mnt.0.join("new"), b"2").unwrap();
        std::fs::remove_file(mnt.0.join("old")).unwrap();
    }
    let (upper, _) = s.layer_dirs("ctr").unwrap();
    let ino = std::fs::metadata(upper.join("new")).unwrap().ino();
    // A name that exists is refused and changes nothing.
    assert!(matches!(
        s.adopt("ctr", "base", "base", no_labels()),
        Err(Error::AlreadyExists(_))
    ));
    s.adopt("ctr", "layer", "base", labels(&[("l", "1")]))
        .unwrap();
    let layer_fs = s.fs_dir(s.id_of("layer").unwrap());
    assert_eq!(
        std::fs::metadata(layer_fs.join("new")).unwrap().ino(),
        ino,
        "the committed snapshot owns the very same files"
    );
    assert!(
        std::fs::symlink_metadata(layer_fs.join("old"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    let info = s.stat("layer").unwrap();
    assert_eq!((info.kind, info.parent.as_str()), (Kind::Committed, "base"));
    assert_eq!(info.labels, labels(&[("l", "1")]));
    // The active snapshot goes on empty, with its own labels, on its old parent...
    let (upper, parents) = s.layer_dirs("ctr").unwrap();
    assert_eq!(std::fs::read_dir(&upper).unwrap().count(), 0);
    assert_eq!(s.stat("ctr").unwrap().labels, labels(&[("keep", "me")]));
    assert_eq!(parents.len(), 1);
    // ... until it is rebased onto the adopted layer, where it sees the changes again.
    s.rebase("ctr", "layer").unwrap();
    assert_eq!(s.stat("ctr").unwrap().parent, "layer");
    let m = s.mounts("ctr").unwrap();
    let mnt = Mounted::new(&m, t.path().join("m2"));
    assert_eq!(std::fs::read(mnt.0.join("new")).unwrap(), b"2");
    assert!(!mnt.0.join("old").exists());
    drop(mnt);
    assert!(matches!(
        s.remove("layer"),
        Err(Error::FailedPrecondition(_))
    ));
    s.remove("ctr").unwrap();
    s.remove("layer").unwrap();
    // A fresh store sees the same records (nothing lives only in memory).
    drop(s);
    let s = Snapshotter::open(&t.path().join("root"), Mode::Overlay).unwrap();
    assert_eq!(s.list(&[]).unwrap().len(), 1);
}

/// A store opened as `strata snapshotter serve` opens it.
fn open_served(root: &std::path::Path) -> strata_snapshotter::Result<Snapshotter> {
    Snapshotter::open_with(
        root,
        strata_snapshotter::Config {
            exclusive: true,
            ready_dirs: 2,
            ..strata_snapshotter::Config::new(Mode::Overlay)
        },
    )
}

/// The ids of the ready dirs under `snapshots`, once `n` are made (they are made in the
/// background).
fn ready_ids(snapshots: &std::path::Path, records: &[i64], n: usize) -> Vec<i64> {
    for _ in 0..250 {
        let mut ids: Vec<i64> = std::fs::read_dir(snapshots)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
            .filter(|id| !records.contains(id))
            .filter(|id| strata_snapshotter::store::is_ready_dir(&snapshots.join(id.to_string())))
            .collect();
        if ids.len() == n {
            ids.sort();
            return ids;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{n} ready dirs were not made");
}

#[test]
fn a_served_store_is_its_servers_alone_and_keeps_ready_dirs_across_restarts() {
    require_root();
    let t = scratch();
    let root = t.path().join("root");
    let snaps = root.join("snapshots");
    let s = open_served(&root).unwrap();
    // Another process (or a second open here) is refused at once, naming the store.
    match open_served(&root) {
        Err(e @ Error::InUse { .. }) => {
            assert!(e.to_string().contains(&root.display().to_string()), "{e}")
        }
        Err(e) => panic!("a second server got {e}"),
        Ok(_) => panic!("a second server opened a served store"),
    }
    // The WAL is as large as its checkpoint cycle from the start (commits overwrite).
    let wal = std::fs::metadata(root.join("metadata.db-wal"))
        .unwrap()
        .len();
    assert!(wal >= 1000 * 4096, "WAL of {wal} bytes");
    let ready = ready_ids(&snaps, &[], 2);
    // Prepare records a ready dir as it is: the snapshot gets its id.
    s.prepare("a", "", no_labels()).unwrap();
    let a = s.id_of("a").unwrap();
    assert!(ready.contains(&a), "{a} not one of {ready:?}");
    // Written to, then committed: the content is there (the upper is synced as usual).
    std::fs::write(snaps.join(format!("{a}/fs/f")), b"data").unwrap();
    s.commit("c", "a", no_labels(), None).unwrap();
    assert_eq!(s.usage("c").unwrap().inodes, 2);
    // Untouched, then committed: an empty layer.
    s.prepare("b", "c", no_labels()).unwrap();
    s.commit("d", "b", no_labels(), None).unwrap();
    assert_eq!(s.usage("d").unwrap().inodes, 1);
    let records = [a, s.id_of("d").unwrap()];
    ready_ids(&snaps, &records, 2);
    drop(s);
    // Closed cleanly, a server leaves nothing but its records' dirs.
    assert!(ready_ids(&snaps, &records, 0).is_empty());
    // A killed server's ready dirs (complete ones, above every id used) are taken back at the
    // next start, and Prepare uses them.
    let left = records[1] + 10;
    std::fs::create_dir(snaps.join(left.to_string())).unwrap();
    std::fs::create_dir(snaps.join(format!("{left}/fs"))).unwrap();
    std::fs::set_permissions(
        snaps.join(format!("{left}/fs")),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir(snaps.join(format!("{left}/work"))).unwrap();
    let s = open_served(&root).unwrap();
    assert!(ready_ids(&snaps, &records, 2).contains(&left));
    s.prepare("e", "d", no_labels()).unwrap();
    s.prepare("f", "d", no_labels()).unwrap();
    let used = [s.id_of("e").unwrap(), s.id_of("f").unwrap()];
    assert!(used.contains(&left), "{used:?}");
    assert_eq!(
        std::fs::read(snaps.join(format!("{a}/fs/f"))).unwrap(),
        b"data"
    );
    drop(s);
    // The CLI shares a store: one left by a killed server is a leftover to it, swept at open.
    std::fs::create_dir_all(snaps.join("999/fs")).unwrap();
    std::fs::create_dir(snaps.join("999/work")).unwrap();
    let _s = Snapshotter::open(&root, Mode::Overlay).unwrap();
    assert!(!snaps.join("999").exists());
}
