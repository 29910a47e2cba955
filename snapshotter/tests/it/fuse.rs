//! FUSE mode: union snapshots are FUSE mounts made by a helper with fuse-overlayfs' command
//! line, handed out as bind mounts. Here the helper is fuse-overlayfs itself (the crate cannot
//! run the `strata` binary, which sits above it); the runtime's tests and CI's conformance run
//! drive the same code with Strata's own `strata-fuse`.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use strata_snapshotter::{Config, FuseHelper, Mode, Snapshotter};

use crate::support::{Mounted, require_root, scratch};

fn helper() -> FuseHelper {
    let program = PathBuf::from("/usr/bin/fuse-overlayfs");
    assert!(
        program.exists(),
        "fuse-overlayfs is missing: apt-get install fuse-overlayfs (scripts/test-all.sh does)"
    );
    FuseHelper {
        program,
        arg0: None,
    }
}

fn open_fuse(dir: &Path) -> Snapshotter {
    Snapshotter::open_with(
        &dir.join("root"),
        Config {
            fuse_helper: Some(helper()),
            ..Config::new(Mode::Fuse)
        },
    )
    .unwrap()
}

fn fuse_mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap();
    strata_overlay::mount::mount_table()
        .unwrap()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && m.target.starts_with(&dir))
        .map(|m| m.target)
        .collect()
}

fn server_of(merged: &Path) -> Option<i32> {
    let want = merged.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        cmd.split(|&b| b == 0).any(|a| a == want).then_some(pid)
    })
}

#[test]
fn fuse_mode_serves_unions_and_cleans_up() {
    require_root();
    let t = scratch();
    let s = open_fuse(t.path());
    assert!(s.is_fuse(), "{}", s.backend());
    let none = BTreeMap::new;

    // No parent: a plain bind mount, as in overlay mode.
    let m = s.prepare("base-a", "", none()).unwrap();
    assert_eq!(m[0].kind, "bind");
    {
        let mnt = Mounted::new(&m, t.path().join("m0"));
        std::fs::write(mnt.0.join("kept"), b"lower").unwrap();
        std::fs::write(mnt.0.join("gone"), b"deleted above").unwrap();
    }
    s.commit("base", "base-a", none(), None).unwrap();

    // On a parent: the snapshot's own FUSE union, bound.
    let m = s.prepare("top-a", "base", none()).unwrap();
    let merged = t.path().canonicalize().unwrap().join(format!(
        "root/snapshots/{}/merged",
        s.id_of("top-a").unwrap()
    ));
    assert_eq!(m[0].kind, "bind");
    assert_eq!(Path::new(&m[0].source), merged);
    assert_eq!(fuse_mounts_below(t.path()), vec![merged.clone()]);
    {
        let mnt = Mounted::new(&m, t.path().join("m1"));
        assert_eq!(std::fs::read(mnt.0.join("kept")).unwrap(), b"lower");
        std::fs::remove_file(mnt.0.join("gone")).unwrap();
        std::fs::write(mnt.0.join("new"), b"upper").unwrap();
    }
    // The server dies: Mounts notices and mounts again.
    let pid = server_of(&merged).expect("the FUSE server's process");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let t0 = std::time::Instant::now();
    while !strata_fuse::mounts::is_dead(&merged) {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the killed server's mount stayed alive"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let m2 = s.mounts("top-a").unwrap();
    assert_eq!(m2, m);
    assert_eq!(
        std::fs::read(merged.join("new")).unwrap(),
        b"upper",
        "remounted over the same upper"
    );
    assert!(!merged.join("gone").exists());

    // Commit unmounts and records the upper, in overlay's format.
    s.commit("top", "top-a", none(), None).unwrap();
    assert!(fuse_mounts_below(t.path()).is_empty());
    let upper = s.fs_dir(s.id_of("top").unwrap());
    assert_eq!(std::fs::read(upper.join("new")).unwrap(), b"upper");
    let wh = std::fs::symlink_metadata(upper.join("gone"));
    let wh_file = upper.join(".wh.gone").exists();
    assert!(
        wh.is_ok_and(|m| m.file_type().is_char_device()) || wh_file,
        "the delete is a whiteout in the upper"
    );

    // A view over two layers is a read-only union.
    let v = s.view("v", "top", none()).unwrap();
    {
        let mnt = Mounted::new(&v, t.path().join("mv"));
        assert_eq!(std::fs::read(mnt.0.join("new")).unwrap(), b"upper");
        assert_eq!(std::fs::read(mnt.0.join("kept")).unwrap(), b"lower");
        assert!(!mnt.0.join("gone").exists());
        let err = std::fs::write(mnt.0.join("x"), b"no").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    }
    assert_eq!(fuse_mounts_below(t.path()).len(), 1);
    s.remove("v").unwrap();
    assert!(fuse_mounts_below(t.path()).is_empty(), "remove unmounts");

    // An active snapshot left mounted, then a restart: the mount is reused, and a clean
    // shutdown's unmount_all ends it.
    s.prepare("c", "top", none()).unwrap();
    drop(s);
    assert_eq!(
        fuse_mounts_below(t.path()).len(),
        1,
        "mounts outlive the snapshotter"
    );
    let s = open_fuse(t.path());
    let m = s.mounts("c").unwrap();
    assert_eq!(
        fuse_mounts_below(t.path()),
        vec![PathBuf::from(&m[0].source)]
    );
    s.unmount_all().unwrap();
    assert!(fuse_mounts_below(t.path()).is_empty());
    s.remove("c").unwrap();
}

/// The volatile label reaches the FUSE server as `volatile` (a container snapshot only, as in
/// overlay mode), and a remount in the same boot clears the mark a volatile mount leaves.
#[test]
fn volatile_label_reaches_the_fuse_server() {
    require_root();
    let t = scratch();
    let s = open_fuse(t.path());
    s.prepare("a", "", BTreeMap::new()).unwrap();
    s.commit("base", "a", BTreeMap::new(), None).unwrap();
    let vol: BTreeMap<String, String> = [(
        "containerd.io/snapshot/strata.volatile".into(),
        "true".into(),
    )]
    .into();
    let mut unpack = vol.clone();
    unpack.insert("containerd.io/snapshot.ref".into(), "sha256:x".into());
    let args_of = |key: &str| {
        let merged = s.fs_dir(s.id_of(key).unwrap()).with_file_name("merged");
        let pid = server_of(&merged).expect("the FUSE server's process");
        String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap()).unwrap()
    };
    s.prepare("ctr", "base", vol).unwrap();
    s.prepare("unpack", "base", unpack).unwrap();
    assert!(args_of("ctr").contains(",volatile"), "{}", args_of("ctr"));
    assert!(
        !args_of("unpack").contains("volatile"),
        "{}",
        args_of("unpack")
    );
    let mark = s
        .fs_dir(s.id_of("ctr").unwrap())
        .with_file_name("work/work/incompat/volatile");
    std::fs::create_dir_all(&mark).unwrap();
    s.unmount_all().unwrap();
    let m = s.mounts("ctr").unwrap();
    assert!(
        !mark.exists(),
        "the same boot's mark is cleared before mounting again"
    );
    let mnt = Mounted::new(&m, t.path().join("m"));
    std::fs::write(mnt.0.join("f"), b"x").unwrap();
    drop(mnt);
    s.unmount_all().unwrap();
}

#[test]
fn orphan_with_a_live_mount_is_unmounted_before_it_is_deleted() {
    require_root();
    let t = scratch();
    let s = open_fuse(t.path());
    s.prepare("a", "", BTreeMap::new()).unwrap();
    s.commit("base", "a", BTreeMap::new(), None).unwrap();
    s.prepare("b", "base", BTreeMap::new()).unwrap();
    let lower = s.fs_dir(s.id_of("base").unwrap());
    std::fs::write(lower.join("precious"), b"x").unwrap();
    let dir = s.fs_dir(s.id_of("b").unwrap());
    let dir = dir.parent().unwrap().to_path_buf();
    drop(s);
    // A crash between Remove's commit and its unmount leaves a live union in an orphan dir;
    // move the dir out of the id namespace to stand for it.
    let orphan = dir.with_file_name("9999");
    std::fs::rename(&dir, &orphan).unwrap();
    let s = open_fuse(t.path());
    drop(s); // the reaper finishes before drop returns
    assert!(!orphan.exists() && !dir.exists());
    assert!(fuse_mounts_below(t.path()).is_empty());
    assert_eq!(
        std::fs::read(lower.join("precious")).unwrap(),
        b"x",
        "the lower is untouched"
    );
}

/// A root on kernel overlay (nested overlay, which the kernel refuses as an upper): overlay
/// mode says why and what to do; auto mode falls back to FUSE, says why, and works.
#[test]
fn auto_mode_falls_back_to_fuse_where_kernel_overlay_cannot_mount() {
    require_root();
    let t = scratch();
    let base = t.path().canonicalize().unwrap();
    for d in ["l", "u", "w", "m"] {
        std::fs::create_dir(base.join(d)).unwrap();
    }
    strata_overlay::Overlay {
        lowers: vec![base.join("l")],
        upper: Some(base.join("u")),
        work: Some(base.join("w")),
        options: Default::default(),
    }
    .mount(&base.join("m"))
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = strata_overlay::mount::unmount(&self.0, true);
        }
    }
    let _outer = Unmount(base.join("m"));
    let root = base.join("m/root");

    let e = Snapshotter::open(&root, Mode::Overlay)
        .err()
        .expect("overlay mode opened");
    let msg = e.to_string();
    assert!(
        msg.contains("not supported as upperdir") && msg.contains("fuse or auto mode"),
        "{msg}"
    );

    let s = Snapshotter::open_with(
        &root,
        Config {
            fuse_helper: Some(helper()),
            ..Config::new(Mode::Auto)
        },
    )
    .unwrap();
    assert!(s.is_fuse());
    assert!(
        s.backend().contains("kernel overlayfs cannot mount"),
        "{}",
        s.backend()
    );
    let m = s.prepare("a", "", BTreeMap::new()).unwrap();
    {
        let mnt = Mounted::new(&m, base.join("m0"));
        std::fs::write(mnt.0.join("f"), b"1").unwrap();
    }
    s.commit("base", "a", BTreeMap::new(), None).unwrap();
    let m = s.prepare("b", "base", BTreeMap::new()).unwrap();
    {
        let mnt = Mounted::new(&m, base.join("m1"));
        assert_eq!(std::fs::read(mnt.0.join("f")).unwrap(), b"1");
        std::fs::write(mnt.0.join("f"), b"2").unwrap();
    }
    s.commit("top", "b", BTreeMap::new(), None).unwrap();
    assert_eq!(
        std::fs::read(s.fs_dir(s.id_of("top").unwrap()).join("f")).unwrap(),
        b"2"
    );
    assert!(fuse_mounts_below(&base).is_empty());
}
