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
        } else {
            let first = std::fs::read(root.join(&p)).unwrap().first().copied();
            out.insert(p.clone(), ('f', first, mode));
        }
    }
}

fn walk_model(
    s: &Stack,
    layers: &[usize],
    rel: &Path,
    out: &mut BTreeMap<PathBuf, (char, Option<u8>, u32)>,
) {
    for (name, _) in s.read_dir(layers, rel).unwrap() {
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_model_merges_as_kernel_overlay_does(stack in prop::collection::vec(layer(), 2..4)) {
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
        let session = fuser::spawn_mount2(strata_fuse::Union::new(s.clone()), &fuse_at, &strata_fuse::fs::config("strata-test", 2)).unwrap();
        let mut fused = BTreeMap::new();
        walk_fs(&fuse_at, Path::new(""), &mut fused);
        session.umount_and_join().unwrap();
        prop_assert_eq!(&fused, &kernel, "FUSE view differs from kernel overlay");
        let Some(Resolved::Dir { layers, .. }) = s.root() else { panic!("no root") };
        let mut model = BTreeMap::new();
        walk_model(&s, &layers, Path::new(""), &mut model);
        prop_assert_eq!(model, kernel);
    }
}
