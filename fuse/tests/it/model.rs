//! The layer model and the FUSE mount against the kernel: for random stacks of layers (files, directories,
//! whiteouts and opaque directories in the kernel's form), the merged view `Stack` computes is
//! the one kernel overlayfs mounts, name for name, type and mode, content; and Strata's FUSE
//! filesystem mounted over the same layers shows exactly that too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use strata_fuse::layer::{Layer, LayerKind, Resolved, Stack};
use strata_overlay::mount::{Options, Overlay, unmount};

/// One entry a layer may hold at a path.
#[derive(Debug, Clone)]
enum Item {
    File(u8),
    Dir,
    OpaqueDir,
    Whiteout,
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        4 => any::<u8>().prop_map(Item::File),
        3 => Just(Item::Dir),
        1 => Just(Item::OpaqueDir),
        2 => Just(Item::Whiteout),
    ]
}

/// Paths from a small alphabet, so layers collide often.
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..4).prop_map(|v| v.join("/"))
}

fn layer() -> impl Strategy<Value = Vec<(String, Item)>> {
    prop::collection::vec((path(), item()), 0..8)
}

/// Writes `items` into `root`, in the kernel's form (parents made as plain dirs).
fn build(root: &Path, items: &[(String, Item)]) {
    std::fs::create_dir_all(root).unwrap();
    for (p, it) in items {
        let full = root.join(p);
        let parent = full.parent().unwrap();
        if std::fs::create_dir_all(parent).is_err() {
            continue; // a file is in the way: skip, as a layer can't hold both
        }
        if std::fs::symlink_metadata(&full).is_ok() {
            continue;
        }
        match it {
            Item::File(b) => std::fs::write(&full, [*b]).unwrap(),
            Item::Dir => std::fs::create_dir(&full).unwrap(),
            Item::OpaqueDir => {
                std::fs::create_dir(&full).unwrap();
                set_opaque(&full);
            }
            Item::Whiteout => nix::sys::stat::mknod(
                &full,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                0,
            )
            .unwrap(),
        }
    }
}

/// `trusted.overlay.opaque=y`, as the layer format writes it (setfattr, from Debian's attr).
fn set_opaque(dir: &Path) {
    let ok = std::process::Command::new("setfattr")
        .args(["-n", "trusted.overlay.opaque", "-v", "y"])
        .arg(dir)
        .status()
        .expect("setfattr (Debian's attr package; scripts/test-all.sh installs it)")
        .success();
    assert!(ok, "setfattr on {}", dir.display());
}

/// The tree under `root` as path -> (type, content byte).
fn walk_fs(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, (char, Option<u8>, u32)>) {
    let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        let p = rel.join(&n);
        // The kernel lists a whiteout in a directory that merges with nothing below (it reads
        // such a directory straight through) although the name can't be looked up; what counts
        // is what resolves, so such names are left out, as the model leaves them out.
        let Ok(m) = std::fs::symlink_metadata(root.join(&p)) else {
            continue;
        };
        let mode = std::os::unix::fs::MetadataExt::mode(&m);
        if m.is_dir() {
            out.insert(p.clone(), ('d', None, mode));
            walk_fs(root, &p, out);
        } else if m.file_type().is_symlink() {
            let target = std::fs::read_link(root.join(&p)).unwrap();
            let first = target.as_os_str().as_encoded_bytes().first().copied();
            out.insert(p.clone(), ('l', first, mode));
        } else {
            let data = std::fs::read(root.join(&p))
                .unwrap_or_else(|e| panic!("reading {}: {e}", root.join(&p).display()));
            out.insert(p.clone(), ('f', data.first().copied(), mode));
        }
    }
}

fn walk_model(
    s: &Stack,
    layers: &[usize],
    rel: &Path,
    out: &mut BTreeMap<PathBuf, (char, Option<u8>, u32)>,
) {
    for (name, _) in s.read_dir(layers, rel).unwrap().entries {
        let p = rel.join(&name);
        match s.lookup(layers, rel, &name).expect("listed names resolve") {
            Resolved::Dir { layers: sub, stat } => {
                out.insert(p.clone(), ('d', None, stat.st_mode));
                walk_model(s, &sub, &p, out);
            }
            Resolved::File { layer, stat } => {
                let first = std::fs::read(s.path(layer, &p)).unwrap().first().copied();
                out.insert(p.clone(), ('f', first, stat.st_mode));
            }
        }
    }
}

/// The property tests mount and unmount many filesystems; run one at a time, so a child a
/// test forks (cp, setfattr) never holds a descriptor another test's unmount waits on.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_model_merges_as_kernel_overlay_does(stack in prop::collection::vec(layer(), 2..4)) {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        assert!(nix::unistd::geteuid().is_root(), "this test mounts kernel overlay: run as root");
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let roots: Vec<PathBuf> = (0..stack.len()).map(|i| t.path().join(format!("l{i}"))).collect();
        for (r, items) in roots.iter().zip(&stack) {
            build(r, items);
        }
        let merged = t.path().join("m");
        std::fs::create_dir(&merged).unwrap();
        let ov = Overlay { lowers: roots.clone(), upper: None, work: None, options: Options { readonly: true, ..Options::default() } };
        ov.mount(&merged).unwrap();
        let mut kernel = BTreeMap::new();
        walk_fs(&merged, Path::new(""), &mut kernel);
        unmount(&merged, false).unwrap();
        // The same layers through Strata's FUSE filesystem.
        let s = Stack::new(roots.iter().map(|r| Layer { root: r.clone(), kind: LayerKind::Lower }).collect());
        let fuse_at = t.path().join("f");
        std::fs::create_dir(&fuse_at).unwrap();
        let session = strata_fuse::fs::spawn(strata_fuse::Union::new(s.clone()), &fuse_at, &strata_fuse::fs::config("strata-test", 2, true)).unwrap();
        let mut fused = BTreeMap::new();
        walk_fs(&fuse_at, Path::new(""), &mut fused);
        crate::end(session, &fuse_at);
        prop_assert_eq!(&fused, &kernel, "FUSE view differs from kernel overlay");
        let Some(Resolved::Dir { layers, .. }) = s.root() else { panic!("no root") };
        let mut model = BTreeMap::new();
        walk_model(&s, &layers, Path::new(""), &mut model);
        prop_assert_eq!(model, kernel);
    }
}

/// A change made through a mount.
#[derive(Debug, Clone)]
enum Op {
    Write(String, u8),
    Append(String, u8),
    Mkdir(String),
    Remove(String),
    RemoveTree(String),
    Rename(String, String),
    Chmod(String, u32),
    Symlink(String, String),
    Truncate(String, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (path(), any::<u8>()).prop_map(|(p, b)| Op::Write(p, b)),
        1 => (path(), any::<u8>()).prop_map(|(p, b)| Op::Append(p, b)),
        2 => path().prop_map(Op::Mkdir),
        2 => path().prop_map(Op::Remove),
        1 => path().prop_map(Op::RemoveTree),
        2 => (path(), path()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (path(), prop::sample::select(vec![0o600u32, 0o755, 0o640])).prop_map(|(p, m)| Op::Chmod(p, m)),
        1 => (path(), path()).prop_map(|(p, t)| Op::Symlink(p, t)),
        1 => (path(), 0u64..3).prop_map(|(p, n)| Op::Truncate(p, n)),
    ]
}

/// Applies `op` under `root`; the errno if it failed.
fn apply(root: &Path, op: &Op) -> Option<i32> {
    use std::io::Write;
    let r = match op {
        Op::Write(p, b) => std::fs::write(root.join(p), [*b]),
        Op::Append(p, b) => std::fs::OpenOptions::new()
            .append(true)
            .open(root.join(p))
            .and_then(|mut f| f.write_all(&[*b])),
        Op::Mkdir(p) => std::fs::create_dir(root.join(p)),
        Op::Remove(p) => std::fs::remove_file(root.join(p)),
        Op::RemoveTree(p) => std::fs::remove_dir_all(root.join(p)),
        Op::Rename(a, b) => std::fs::rename(root.join(a), root.join(b)),
        Op::Chmod(p, m) => std::fs::set_permissions(
            root.join(p),
            std::os::unix::fs::PermissionsExt::from_mode(*m),
        ),
        Op::Symlink(p, t) => std::os::unix::fs::symlink(t, root.join(p)),
        Op::Truncate(p, n) => std::fs::OpenOptions::new()
            .write(true)
            .open(root.join(p))
            .and_then(|f| f.set_len(*n)),
    };
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// Copies a tree as `cp -a` does (the lowers of the two mounts must not be shared).
fn cp_a(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// The same changes through kernel overlay and through Strata's FUSE mount, on the same
    /// lowers: each succeeds or fails alike, the merged views end equal, and the upper FUSE
    /// wrote mounts under kernel overlay to that same view (one on-disk format).
    #[test]
    fn changes_through_fuse_match_kernel_overlay(stack in prop::collection::vec(layer(), 1..3), ops in prop::collection::vec(op(), 1..12)) {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        assert!(nix::unistd::geteuid().is_root(), "this test mounts kernel overlay: run as root");
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let mk = |name: &str| { let p = t.path().join(name); std::fs::create_dir_all(&p).unwrap(); p };
        let lowers: Vec<PathBuf> = (0..stack.len()).map(|i| t.path().join(format!("l{i}"))).collect();
        for (r, items) in lowers.iter().zip(&stack) {
            build(r, items);
        }
        // Kernel overlay, with its own upper.
        let (ku, kw, km) = (mk("ku"), mk("kw"), mk("km"));
        // redirect_dir=on, as Strata mounts it: the kernel then renames lower directories too,
        // instead of answering EXDEV (FUSE never does).
        let ov = Overlay { lowers: lowers.clone(), upper: Some(ku.clone()), work: Some(kw.clone()), options: Options { redirect_dir: true, index_off: true, ..Options::default() } };
        ov.mount(&km).unwrap();
        // FUSE, on copies of the same lowers, with its own upper.
        let flowers: Vec<PathBuf> = lowers.iter().enumerate().map(|(i, l)| { let d = t.path().join(format!("fl{i}")); cp_a(l, &d); d }).collect();
        let (fu, fw, fm) = (mk("fu"), mk("fw"), mk("fm"));
        let mut layers = vec![Layer { root: fu.clone(), kind: LayerKind::Upper }];
        layers.extend(flowers.iter().map(|r| Layer { root: r.clone(), kind: LayerKind::Lower }));
        let session = strata_fuse::fs::spawn(strata_fuse::Union::writable(Stack::new(layers), fw.clone()), &fm, &strata_fuse::fs::config("strata-test", 2, false)).unwrap();
        for o in &ops {
            let (k, f) = (apply(&km, o), apply(&fm, o));
            if std::env::var_os("STRATA_FUSE_TRACE").is_some() {
                eprintln!("{o:?}: kernel {k:?} fuse {f:?}");
            }
            prop_assert_eq!(k, f, "{:?}: kernel and FUSE disagree", o);
        }
        let (mut kview, mut fview) = (BTreeMap::new(), BTreeMap::new());
        walk_fs(&km, Path::new(""), &mut kview);
        walk_fs(&fm, Path::new(""), &mut fview);
        crate::end(session, &fm);
        unmount(&km, false).unwrap();
        prop_assert_eq!(&fview, &kview, "merged views differ after {:?}", ops);
        // FUSE's upper under kernel overlay.
        let again = mk("again");
        let mut all = vec![fu.clone()];
        all.extend(flowers.iter().cloned());
        Overlay { lowers: all, upper: None, work: None, options: Options { readonly: true, ..Options::default() } }.mount(&again).unwrap();
        let mut kfview = BTreeMap::new();
        walk_fs(&again, Path::new(""), &mut kfview);
        unmount(&again, false).unwrap();
        prop_assert_eq!(&kfview, &kview, "kernel overlay reads FUSE's upper differently");
    }
}
