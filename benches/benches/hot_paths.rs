//! Hot paths under criterion: digesting (sha256 through `HashReader`, MB/s), the snapshot
//! metadata store (prepare+commit and stat on a `Snapshotter` in process, no gRPC), and FUSE
//! lookup/getattr and read on a cold dentry and page cache, with kernel overlay on the same
//! lowers beside it. Run as root: `cargo bench -p strata-benches --bench hot_paths`
//! (`STRATA_BENCH_DIR` picks the disk, default `/var/tmp`).
// criterion_group! and criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use strata_overlay::digest::HashReader;
use strata_overlay::mount::{Options, Overlay, unmount};
use strata_snapshotter::{Mode, Snapshotter};

fn base_dir() -> PathBuf {
    PathBuf::from(std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
}

fn drop_caches(what: &str) {
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", what);
}

fn digest(c: &mut Criterion) {
    let data: Vec<u8> = (0..64usize << 20).map(|i| (i * 131 + 7) as u8).collect();
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("sha256 64 MiB via HashReader", |b| {
        b.iter(|| {
            let mut r = HashReader::new(&data[..]);
            std::io::copy(&mut r, &mut std::io::sink()).unwrap();
            r.finish().unwrap()
        })
    });
    g.finish();
}

fn metadata(c: &mut Criterion) {
    let t = tempfile::tempdir_in(base_dir()).unwrap();
    let snap = Snapshotter::open(&t.path().join("root"), Mode::Overlay).unwrap();
    snap.prepare("base-a", "", Default::default()).unwrap();
    snap.commit("base", "base-a", Default::default(), None)
        .unwrap();
    let mut g = c.benchmark_group("metadata");
    g.sample_size(30);
    let mut n = 0u64;
    g.bench_function("prepare + commit + remove", |b| {
        b.iter(|| {
            n += 1;
            let (k, name) = (format!("k{n}"), format!("c{n}"));
            snap.prepare(&k, "base", Default::default()).unwrap();
            snap.commit(&name, &k, Default::default(), None).unwrap();
            snap.remove(&name).unwrap();
        })
    });
    g.bench_function("stat", |b| b.iter(|| snap.stat("base").unwrap()));
    g.finish();
}

/// A union over `lower` mounted at `m`: Strata's FUSE server on a thread, or kernel overlay.
enum Union {
    Fuse(std::thread::JoinHandle<()>),
    Kernel,
}

fn mount(kind: &str, lower: &Path, dir: &Path) -> (PathBuf, Union) {
    let (u, w, m) = (dir.join("u"), dir.join("w"), dir.join("m"));
    for d in [&u, &w, &m] {
        std::fs::create_dir_all(d).unwrap();
    }
    if kind == "overlay" {
        Overlay {
            lowers: vec![lower.to_path_buf()],
            upper: Some(u),
            work: Some(w),
            options: Options::default(),
        }
        .mount(&m)
        .unwrap();
        return (m, Union::Kernel);
    }
    use strata_fuse::layer::{Layer, LayerKind, Stack};
    let stack = Stack::new(vec![
        Layer {
            root: u,
            kind: LayerKind::Upper,
        },
        Layer {
            root: lower.to_path_buf(),
            kind: LayerKind::Lower,
        },
    ]);
    let union = strata_fuse::Union::writable(stack, w);
    let config = strata_fuse::fs::config("strata-bench", 4, false);
    let mp = m.clone();
    let h = std::thread::spawn(move || {
        let _ = strata_fuse::fs::serve(union, &mp, &config);
    });
    let start = Instant::now();
    while !strata_fuse::mounts::is_fuse_mount(&m) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "FUSE mount did not come up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (m, Union::Fuse(h))
}

fn fuse(c: &mut Criterion) {
    let t = tempfile::tempdir_in(base_dir()).unwrap();
    let lower = t.path().join("lower");
    for d in 0..10 {
        std::fs::create_dir_all(lower.join(format!("d{d}"))).unwrap();
        for f in 0..100 {
            std::fs::write(lower.join(format!("d{d}/f{f}")), b"x").unwrap();
        }
    }
    let data: Vec<u8> = (0..16usize << 20).map(|i| (i * 17) as u8).collect();
    std::fs::write(lower.join("file"), &data).unwrap();
    let mut g = c.benchmark_group("union");
    g.sample_size(10);
    for kind in ["strata-fuse", "overlay"] {
        let dir = t.path().join(kind);
        let (m, union) = mount(kind, &lower, &dir);
        g.bench_function(
            format!("{kind}: lookup+getattr of 1,000 lower files, cold"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        drop_caches("2");
                        let t0 = Instant::now();
                        for d in 0..10 {
                            for f in 0..100 {
                                std::fs::symlink_metadata(m.join(format!("d{d}/f{f}"))).unwrap();
                            }
                        }
                        total += t0.elapsed();
                    }
                    total
                })
            },
        );
        g.bench_function(format!("{kind}: read 16 MiB lower file, cold"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut buf = vec![0u8; 1 << 20];
                for _ in 0..iters {
                    drop_caches("3");
                    let t0 = Instant::now();
                    let mut f = std::fs::File::open(m.join("file")).unwrap();
                    while f.read(&mut buf).unwrap() > 0 {}
                    total += t0.elapsed();
                }
                total
            })
        });
        unmount(&m, false).unwrap();
        if let Union::Fuse(h) = union {
            h.join().unwrap();
        }
    }
    g.finish();
}

criterion_group!(benches, digest, metadata, fuse);
criterion_main!(benches);
