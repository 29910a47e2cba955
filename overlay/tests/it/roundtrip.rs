//! The union-semantics property test: random operations through a real kernel overlay mount,
//! then diff -> apply -> mount again must show exactly the merged view the operations left.
//!
//! Four configurations: the native diff of an upper mounted with containerd's options, the
//! native diff of an upper mounted with `redirect_dir=on,metacopy=on` (renamed lower dirs and
//! metadata-only copy-ups), the generic diff between the lower and the merged view, and the
//! OCI `.wh.` form end to end (the upper converted to it before the native diff, the layer
//! applied in it and converted back to the kernel's form to mount). The result is checked by
//! mounting the applied layer over the base (`lowerdir=new:base`), which is how a committed
//! layer is used.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use strata_overlay::diff::{self, DiffOptions};
use strata_overlay::mount::{Options, Overlay};
use strata_overlay::{ApplyOptions, Compression, apply};

use crate::support::{Mounted, Prereq, require, scratch, snapshot, xattr_set};

/// One operation on the merged view; indices pick among the paths present at the time.
#[derive(Debug, Clone)]
enum Op {
    Create(usize, u8, Vec<u8>),
    Overwrite(usize, Vec<u8>),
    Append(usize, Vec<u8>),
    Truncate(usize, u16),
    Delete(usize),
    Mkdir(usize, u8),
    Rmdir(usize),
    DirToFile(usize),
    FileToDir(usize),
    Rename(usize, usize, u8),
    Chmod(usize, u16),
    Chown(usize, u8, u8),
    Xattr(usize, u8, Vec<u8>),
    Hardlink(usize, usize, u8),
    Symlink(usize, u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    let i = 0usize..64;
    let data = prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (i.clone(), 0u8..8, data.clone()).prop_map(|(a, n, d)| Op::Create(a, n, d)),
        (i.clone(), data.clone()).prop_map(|(a, d)| Op::Overwrite(a, d)),
        (i.clone(), data.clone()).prop_map(|(a, d)| Op::Append(a, d)),
        (i.clone(), 0u16..400).prop_map(|(a, n)| Op::Truncate(a, n)),
        i.clone().prop_map(Op::Delete),
        (i.clone(), 0u8..8).prop_map(|(a, n)| Op::Mkdir(a, n)),
        i.clone().prop_map(Op::Rmdir),
        i.clone().prop_map(Op::DirToFile),
        i.clone().prop_map(Op::FileToDir),
        (i.clone(), i.clone(), 0u8..8).prop_map(|(a, b, n)| Op::Rename(a, b, n)),
        (i.clone(), 0u16..0o7777).prop_map(|(a, m)| Op::Chmod(a, m)),
        (i.clone(), 0u8..3, 0u8..3).prop_map(|(a, u, g)| Op::Chown(a, u, g)),
        (i.clone(), 0u8..3, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(a, n, v)| Op::Xattr(a, n, v)),
        (i.clone(), i.clone(), 0u8..8).prop_map(|(a, b, n)| Op::Hardlink(a, b, n)),
        (i, 0u8..8, 0u8..4).prop_map(|(a, n, t)| Op::Symlink(a, n, t)),
    ]
}

/// A small deterministic PRNG for the base tree.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random base tree: nested dirs, files of several sizes, a hard-link pair, symlinks,
/// xattrs, odd modes and owners.
fn build_base(root: &Path, seed: u64) {
    let mut r = Rng(seed | 1);
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..(4 + r.below(6)) {
        let parent = dirs[r.below(dirs.len() as u64) as usize].clone();
        let d = parent.join(format!("d{i}"));
        std::fs::create_dir(&d).unwrap();
        dirs.push(d);
    }
    let mut files = Vec::new();
    for i in 0..(6 + r.below(10)) {
        let parent = &dirs[r.below(dirs.len() as u64) as usize];
        let f = parent.join(format!("f{i}"));
        let len = [0, 1, 100, 5000][r.below(4) as usize];
        let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ seed) as u8).collect();
        std::fs::write(&f, data).unwrap();
        std::fs::set_permissions(
            &f,
            std::fs::Permissions::from_mode([0o644, 0o600, 0o755, 0o4755][r.below(4) as usize]),
        )
        .unwrap();
        if r.below(4) == 0 {
            std::os::unix::fs::chown(&f, Some(r.below(3) as u32), Some(r.below(3) as u32)).unwrap();
        }
        if r.below(3) == 0 {
            xattr_set(&f, "user.base", &seed.to_le_bytes()).unwrap();
        }
        files.push(f);
    }
    let a = &files[0];
    std::fs::hard_link(a, a.with_file_name("hl")).unwrap_or(());
    std::os::unix::fs::symlink("f0", dirs[0].join("sl")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", dirs[dirs.len() - 1].join("dangling"))
        .unwrap();
}

/// All paths below `root` (sorted), for choosing operands.
fn paths(root: &Path) -> Vec<PathBuf> {
    snapshot(root).into_keys().map(|k| root.join(k)).collect()
}

fn pick(v: &[PathBuf], i: usize) -> Option<PathBuf> {
    if v.is_empty() {
        None
    } else {
        Some(v[i % v.len()].clone())
    }
}

fn dir_of(root: &Path, v: &[PathBuf], i: usize) -> PathBuf {
    let dirs: Vec<PathBuf> = std::iter::once(root.to_path_buf())
        .chain(v.iter().filter(|p| p.is_dir() && !p.is_symlink()).cloned())
        .collect();
    dirs[i % dirs.len()].clone()
}

fn run_op(root: &Path, op: &Op) {
    let v = paths(root);
    let is_file = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
    let is_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    // Failures are part of the game (rmdir of a non-empty dir, ...): the final state is what
    // gets compared.
    let _ = (|| -> std::io::Result<()> {
        match op {
            Op::Create(d, n, data) => {
                std::fs::write(dir_of(root, &v, *d).join(format!("n{n}")), data)
            }
            Op::Overwrite(i, data) => match pick(&v, *i) {
                Some(p) if is_file(&p) => std::fs::write(p, data),
                _ => Ok(()),
            },
            Op::Append(i, data) => match pick(&v, *i) {
                Some(p) if is_file(&p) => {
                    use std::io::Write;
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(p)?
                        .write_all(data)
                }
                _ => Ok(()),
            },
            Op::Truncate(i, n) => match pick(&v, *i) {
                Some(p) if is_file(&p) => std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)?
                    .set_len(*n as u64),
                _ => Ok(()),
            },
            Op::Delete(i) | Op::Rmdir(i) => match pick(&v, *i) {
                Some(p) if is_dir(&p) => std::fs::remove_dir_all(p),
                Some(p) => std::fs::remove_file(p),
                None => Ok(()),
            },
            Op::Mkdir(d, n) => std::fs::create_dir(dir_of(root, &v, *d).join(format!("m{n}"))),
            Op::DirToFile(i) => match pick(&v, *i) {
                Some(p) if is_dir(&p) => {
                    std::fs::remove_dir_all(&p)?;
                    std::fs::write(p, b"was a dir")
                }
                _ => Ok(()),
            },
            Op::FileToDir(i) => match pick(&v, *i) {
                Some(p) if is_file(&p) => {
                    std::fs::remove_file(&p)?;
                    std::fs::create_dir(&p)?;
                    std::fs::write(p.join("inside"), b"new")
                }
                _ => Ok(()),
            },
            Op::Rename(i, d, n) => match pick(&v, *i) {
                Some(p) => {
                    let to = dir_of(root, &v, *d).join(format!("r{n}"));
                    if to.starts_with(&p) {
                        Ok(())
                    } else {
                        std::fs::rename(p, to)
                    }
                }
                None => Ok(()),
            },
            Op::Chmod(i, m) => match pick(&v, *i) {
                Some(p) if !p.is_symlink() => {
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(*m as u32 | 0o700))
                }
                _ => Ok(()),
            },
            Op::Chown(i, u, g) => match pick(&v, *i) {
                Some(p) => std::os::unix::fs::lchown(p, Some(*u as u32), Some(*g as u32)),
                None => Ok(()),
            },
            Op::Xattr(i, n, val) => match pick(&v, *i) {
                Some(p) if !p.is_symlink() => xattr_set(&p, &format!("user.x{n}"), val),
                _ => Ok(()),
            },
            Op::Hardlink(i, d, n) => match pick(&v, *i) {
                Some(p) if is_file(&p) => {
                    std::fs::hard_link(p, dir_of(root, &v, *d).join(format!("h{n}")))
                }
                _ => Ok(()),
            },
            Op::Symlink(d, n, t) => {
                let target = ["f0", "../d0", "/etc/passwd", "nowhere"][*t as usize];
                std::os::unix::fs::symlink(target, dir_of(root, &v, *d).join(format!("s{n}")))
            }
        }
    })();
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Native diff, containerd's mount options.
    Native,
    /// Native diff, redirect_dir=on and metacopy=on.
    NativeRedirect,
    /// Generic diff of lower vs merged view.
    Generic,
    /// Native diff of the upper converted to the `.wh.` form, applied in that form.
    NativeWh,
}

/// Every path of a merged view of lowers (keys as `snapshot` makes them).
fn view_paths(view: &diff::LowerView, rel: &[u8], out: &mut Vec<String>) {
    for (name, found) in view.read_dir(rel).unwrap() {
        let path = if rel.is_empty() {
            name.clone()
        } else {
            [rel, b"/", &name].concat()
        };
        out.push(String::from_utf8(path.clone()).unwrap());
        if found.st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            view_paths(view, &path, out);
        }
    }
}

/// The change list of `upper` over `base`, sorted.
fn changes(upper: &Path, base: &Path) -> Vec<(String, String)> {
    let mut c: Vec<(String, String)> =
        diff::changes_native(upper, &diff::LowerView::new(vec![base.to_path_buf()]))
            .unwrap()
            .into_iter()
            .map(|c| (c.path, format!("{:?}", c.kind)))
            .collect();
    c.sort();
    c
}

fn round_trip(seed: u64, ops: &[Op], mode: Mode) -> Result<(), TestCaseError> {
    let t = scratch();
    let root = t.path();
    let base = root.join("base");
    std::fs::create_dir(&base).unwrap();
    build_base(&base, seed);
    let (upper, work, merged) = (root.join("upper"), root.join("work"), root.join("merged"));
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let redirect = matches!(mode, Mode::NativeRedirect);
    let options = Options {
        index_off: true,
        metacopy: redirect,
        redirect_dir: redirect,
        ..Default::default()
    };
    Overlay {
        lowers: vec![base.clone()],
        upper: Some(upper.clone()),
        work: Some(work),
        options,
    }
    .mount(&merged)
    .unwrap();
    let merged_mount = Mounted(merged.clone());
    for op in ops {
        run_op(&merged, op);
    }
    let want = snapshot(&merged);
    let blob_path = root.join("layer.tar.zst");
    let out = std::fs::File::create(&blob_path).unwrap();
    let dopts = DiffOptions {
        compression: Compression::Zstd,
        threads: 0,
        lowers: vec![base.clone()],
    };
    let wh = matches!(mode, Mode::NativeWh);
    let diffed = match mode {
        Mode::Generic => {
            let d = diff::generic(&base, &merged, out, &dopts);
            merged_mount.unmount();
            d
        }
        _ => {
            merged_mount.unmount();
            if wh {
                let kernel_form = changes(&upper, &base);
                strata_overlay::form::convert(&upper, strata_overlay::form::Form::Wh)
                    .map_err(|e| TestCaseError::fail(format!("convert to wh: {e}")))?;
                prop_assert_eq!(
                    changes(&upper, &base),
                    kernel_form,
                    "changes of the .wh. form"
                );
            }
            diff::native(&upper, out, &dopts)
        }
    };
    let (report, _) = diffed.map_err(|e| TestCaseError::fail(format!("diff: {e}")))?;
    let layer = root.join("layer");
    let aopts = ApplyOptions {
        expected_digest: Some(report.digest),
        expected_diff_id: Some(report.diff_id),
        sync: false,
        wh,
        ..Default::default()
    };
    apply(std::fs::File::open(&blob_path).unwrap(), &layer, &aopts)
        .map_err(|e| TestCaseError::fail(format!("apply: {e}")))?;
    if wh {
        let r = strata_overlay::form::check(&layer).unwrap();
        prop_assert!(
            r.char_whiteouts.is_empty() && r.opaque_trusted.is_empty(),
            "the kernel's form in a .wh. apply: {}",
            r.summary()
        );
        // The applied layer read as a lower, in its .wh. form: what the mount will show.
        let mut paths = Vec::new();
        view_paths(
            &diff::LowerView::new(vec![layer.clone(), base.clone()]),
            b"",
            &mut paths,
        );
        paths.sort();
        let want_paths: Vec<String> = want.keys().cloned().collect();
        prop_assert_eq!(paths, want_paths, "a .wh. layer read as a lower");
        strata_overlay::form::convert(&layer, strata_overlay::form::Form::Kernel)
            .map_err(|e| TestCaseError::fail(format!("convert to kernel: {e}")))?;
    }
    let view = root.join("view");
    std::fs::create_dir(&view).unwrap();
    let ro = Overlay {
        lowers: vec![layer, base],
        upper: None,
        work: None,
        options: Options {
            index_off: true,
            readonly: true,
            ..Default::default()
        },
    };
    ro.mount(&view).unwrap();
    let view_mount = Mounted(view.clone());
    let got = snapshot(&view);
    view_mount.unmount();
    for (k, v) in &want {
        prop_assert_eq!(got.get(k), Some(v), "path {} differs", k);
    }
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    prop_assert!(extra.is_empty(), "extra paths after apply: {:?}", extra);
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("STRATA_PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn native_diff_round_trips(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..25)) {
        require(Prereq::Root);
        round_trip(seed, &ops, Mode::Native)?;
    }

    #[test]
    fn native_diff_round_trips_with_redirect_and_metacopy(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..25)) {
        require(Prereq::Root);
        round_trip(seed, &ops, Mode::NativeRedirect)?;
    }

    #[test]
    fn native_diff_round_trips_in_the_wh_form(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..25)) {
        require(Prereq::Root);
        round_trip(seed, &ops, Mode::NativeWh)?;
    }

    #[test]
    fn generic_diff_round_trips(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..25)) {
        require(Prereq::Root);
        round_trip(seed, &ops, Mode::Generic)?;
    }
}

/// The renames that need `redirect_dir`, pinned: a lower dir renamed twice, a file moved out of
/// a renamed dir, and a chmod of a file inside a renamed dir (metacopy under a redirect).
#[test]
fn pinned_renames_of_lower_dirs() {
    require(Prereq::Root);
    let ops = vec![
        Op::Rename(0, 0, 1),
        Op::Chmod(3, 0o700),
        Op::Rename(2, 1, 2),
        Op::Create(1, 3, b"new".to_vec()),
        Op::Chown(4, 1, 2),
    ];
    for seed in [1, 2, 3, 0xdead_beef] {
        round_trip(seed, &ops, Mode::NativeRedirect).unwrap();
        round_trip(seed, &ops, Mode::Native).unwrap();
        round_trip(seed, &ops, Mode::Generic).unwrap();
    }
}

/// The same change gives the same bytes.
#[test]
fn diffs_are_deterministic() {
    require(Prereq::Root);
    let t = scratch();
    let up = t.path().join("u");
    std::fs::create_dir(&up).unwrap();
    build_base(&up, 42);
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let opts = DiffOptions {
            compression,
            threads: 0,
            lowers: vec![],
        };
        let (a, _) = diff::native(&up, Vec::new(), &opts).unwrap();
        let (b, _) = diff::native(&up, Vec::new(), &opts).unwrap();
        assert_eq!(a.digest, b.digest, "{compression}");
        assert_eq!(a.diff_id, b.diff_id);
    }
}
