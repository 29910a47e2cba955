//! Layer apply and diff throughput, with GNU tar on the same tree and disk as the reference.
//!
//! Two trees: 10,000 small files (files/s) and 32 MiB in 32 files (MB/s). For each:
//! `strata apply` of the tar vs `tar -x` of the same tar, and the native diff of the applied
//! dir vs `tar -c` of it. Neither side syncs. Run with `cargo bench -p strata-benches --bench
//! layer`; set `STRATA_BENCH_DIR` to choose the disk (default `/var/tmp`).
// criterion_group! and criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use strata_overlay::diff::{self, DiffOptions};
use strata_overlay::{ApplyOptions, Compression, apply_file};

struct Tree {
    name: &'static str,
    src: PathBuf,
    tar: PathBuf,
    files: u64,
    bytes: u64,
}

fn base_dir() -> PathBuf {
    PathBuf::from(std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
}

fn make_tree(root: &Path, name: &'static str, dirs: usize, per_dir: usize, size: usize) -> Tree {
    let src = root.join(format!("{name}-src"));
    let mut bytes = 0;
    for d in 0..dirs {
        let dir = src.join(format!("dir{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 + f + d) as u8).collect();
            std::fs::write(dir.join(format!("file{f:04}")), &data).unwrap();
            bytes += size as u64;
        }
    }
    let tar = root.join(format!("{name}.tar"));
    let st = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "GNU tar is needed as the reference");
    Tree {
        name,
        src,
        tar,
        files: (dirs * per_dir) as u64,
        bytes,
    }
}

/// A directory removed when dropped (outside the measured time).
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bench(c: &mut Criterion) {
    let root = base_dir().join(format!("strata-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let _cleanup = Scratch(root.clone());
    let trees = [
        make_tree(&root, "10k-small-files", 100, 100, 512),
        make_tree(&root, "32MiB", 4, 8, 1 << 20),
    ];
    let mut n = 0u64;
    let mut fresh = || {
        n += 1;
        root.join(format!("t{n}"))
    };
    for t in &trees {
        let mut g = c.benchmark_group(format!("apply/{}", t.name));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(20))
            .warm_up_time(Duration::from_secs(2));
        g.throughput(if t.files > 1000 {
            Throughput::Elements(t.files)
        } else {
            Throughput::Bytes(t.bytes)
        });
        let opts = ApplyOptions {
            sync: false,
            parents: Some(vec![]),
            ..Default::default()
        };
        g.bench_function("strata", |b| {
            b.iter_batched(
                &mut fresh,
                |target| {
                    apply_file(&t.tar, &target, &opts).unwrap();
                    Scratch(target)
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function("tar -x", |b| {
            b.iter_batched(
                &mut fresh,
                |target| {
                    std::fs::create_dir(&target).unwrap();
                    let st = Command::new("tar")
                        .arg("-C")
                        .arg(&target)
                        .arg("-xpf")
                        .arg(&t.tar)
                        .status()
                        .unwrap();
                    assert!(st.success());
                    Scratch(target)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();

        let mut g = c.benchmark_group(format!("diff/{}", t.name));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(15))
            .warm_up_time(Duration::from_secs(2));
        g.throughput(if t.files > 1000 {
            Throughput::Elements(t.files)
        } else {
            Throughput::Bytes(t.bytes)
        });
        let dopts = DiffOptions {
            compression: Compression::None,
            ..Default::default()
        };
        let out = root.join(format!("{}-diff.tar", t.name));
        g.bench_function("strata native diff", |b| {
            b.iter(|| {
                diff::native(
                    &t.src,
                    std::io::BufWriter::new(std::fs::File::create(&out).unwrap()),
                    &dopts,
                )
                .unwrap()
            })
        });
        g.bench_function("tar -c", |b| {
            b.iter(|| {
                let st = Command::new("tar")
                    .arg("-C")
                    .arg(&t.src)
                    .arg("-cf")
                    .arg(&out)
                    .arg(".")
                    .status()
                    .unwrap();
                assert!(st.success());
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
