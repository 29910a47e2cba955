//! `strata bench`: the same workloads on a volume (a plain directory on the host file system,
//! as a bind mount gives), tmpfs, a kernel overlay snapshot, Strata's FUSE union and
//! fuse-overlayfs 1.10 and its Rust rewrite 2.0 (each when installed), interleaved rounds, median with min and max, written as
//! `report.md`, `report.json` and `report.svg` (grouped bars: speed relative to the volume).
//!
//! Each round sets up every backend afresh on the same lower content (a copy of it for the
//! volume and tmpfs, the lower of a union otherwise), then runs each workload on every backend
//! (in an order that rotates by workload and round) before the next workload, so neighbouring
//! figures share the machine's noise; the destructive workloads come last. Files are deleted
//! between rounds only (a deletion's discards slow whatever writes next on a VM disk). Page
//! caches are dropped before each run of the cold-read row.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Sizes of one run.
#[derive(Clone, Copy)]
struct Sizes {
    seq: u64,
    rand_file: u64,
    rand_ops: usize,
    small_files: usize,
    medium: u64,
    large: u64,
    rename_files: usize,
    /// Names of the merged directory, half in the lower, half in the upper.
    merged_files: usize,
    extract: u64,
    inserts: usize,
    /// Lower 4 KiB files, each copied up once (one copy-up is too short to time alone).
    small_copies: usize,
}

const QUICK: Sizes = Sizes {
    seq: 64 << 20,
    rand_file: 64 << 20,
    rand_ops: 4000,
    small_files: 2000,
    medium: 4 << 20,
    large: 64 << 20,
    rename_files: 200,
    merged_files: 2000,
    extract: 12 << 20,
    inserts: 100,
    small_copies: 50,
};

const FULL: Sizes = Sizes {
    seq: 1 << 30,
    rand_file: 256 << 20,
    rand_ops: 20000,
    small_files: 10000,
    medium: 64 << 20,
    large: 1 << 30,
    rename_files: 1000,
    merged_files: 10000,
    extract: 100 << 20,
    inserts: 1000,
    small_copies: 200,
};

const BACKENDS: [&str; 6] = [
    "volume",
    "tmpfs",
    "overlay",
    "strata-fuse",
    "fuse-overlayfs",
    "fuse-overlayfs-rs",
];

/// fuse-overlayfs 2.0, the Rust rewrite (`cargo install --root /opt/strata-peers
/// fuse-overlayfs@2.0.0`: its binary has the C one's name, so it lives off the PATH).
fn fuse_overlayfs_rs() -> PathBuf {
    std::env::var_os("STRATA_FUSE_OVERLAYFS_RS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/strata-peers/bin/fuse-overlayfs"))
}

struct Workload {
    name: String,
    run: fn(&Path, &Path, &Sizes) -> Result<()>,
    prep: Prep,
}

/// What comes before a workload's timed run on a backend, so that every backend starts it
/// from the same state whatever ran just before on the others (they share the lower).
#[derive(Clone, Copy)]
enum Prep {
    Nothing,
    /// Every page cache dropped: the data comes from the disk.
    DropCaches,
    /// The workload run once untimed first: its data is cached wherever the backend caches.
    Twice,
    /// The lower's tree of small files (and the dir to rename) stat'ed directly, untimed: its
    /// metadata is in the host's caches, the union's own caches are as the backend left them.
    Tree,
    /// This lower file (or every file in this lower directory) read directly, untimed.
    File(&'static str),
}

fn workloads(s: &Sizes) -> Vec<Workload> {
    let mib = |b: u64| b >> 20;
    let w = |name: String, run: fn(&Path, &Path, &Sizes) -> Result<()>, prep| Workload {
        name,
        run,
        prep,
    };
    vec![
        w(
            format!("seq read {} MiB (cold)", mib(s.seq)),
            seq_read,
            Prep::DropCaches,
        ),
        w(
            format!("seq read {} MiB (warm)", mib(s.seq)),
            seq_read,
            Prep::Twice,
        ),
        w(
            format!("4k rand read x{} (psync)", s.rand_ops),
            rand_read,
            Prep::DropCaches,
        ),
        w(
            format!("4k rand read x{} (16 deep)", s.rand_ops),
            rand_read_deep,
            Prep::DropCaches,
        ),
        w(
            format!("stat {} lower files", s.small_files),
            stat_all,
            Prep::Tree,
        ),
        w(
            format!("readdir {} entries", s.small_files),
            readdir_all,
            Prep::Tree,
        ),
        w(
            format!("readdir {}-entry merged dir", s.merged_files),
            readdir_merged,
            Prep::Tree,
        ),
        w(
            format!("seq write {} MiB + fsync", mib(s.seq)),
            seq_write,
            Prep::Nothing,
        ),
        w(
            format!("4k rand write x{} + fsync", s.rand_ops / 4),
            rand_write,
            Prep::Nothing,
        ),
        w(
            format!("4k rand write x{} (16 deep) + fsync", s.rand_ops / 4),
            rand_write_deep,
            Prep::Nothing,
        ),
        w(
            format!("create {} files", s.small_files),
            create_many,
            Prep::Nothing,
        ),
        w(
            format!("copy-up 4 KiB file x{}", s.small_copies),
            |m, _, s| {
                (0..s.small_copies).try_for_each(|i| append_byte(&m.join(format!("small-4k/f{i}"))))
            },
            Prep::File("small-4k"),
        ),
        w(
            format!("copy-up {} MiB file", mib(s.medium)),
            |m, _, _| append_byte(&m.join("medium")),
            Prep::File("medium"),
        ),
        w(
            format!("copy-up {} MiB file", mib(s.large)),
            |m, _, _| append_byte(&m.join("large")),
            Prep::File("large"),
        ),
        w(
            format!("rename lower dir of {} files", s.rename_files),
            rename_dir,
            Prep::Tree,
        ),
        w(
            format!("extract {} MiB tree", mib(s.extract)),
            extract,
            Prep::Nothing,
        ),
        w(
            format!("sqlite {} inserts, fsync each", s.inserts),
            sqlite,
            Prep::Nothing,
        ),
        w(
            format!("unlink {} lower files", s.small_files),
            unlink_all,
            Prep::Tree,
        ),
    ]
}

fn err(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> anyhow::Error {
    let msg = format!("{what} {}", p.display());
    move |e| anyhow::Error::new(e).context(msg)
}

fn seq_read(m: &Path, _: &Path, _: &Sizes) -> Result<()> {
    let p = m.join("seq");
    let mut f = File::open(&p).map_err(err("open", &p))?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf).map_err(err("read", &p))? > 0 {}
    Ok(())
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn rand_reads(f: &File, ops: usize, size: u64, seed: u64) -> std::io::Result<()> {
    let mut x = seed | 1;
    let mut buf = [0u8; 4096];
    for _ in 0..ops {
        let off = (xorshift(&mut x) % (size / 4096)) * 4096;
        f.read_exact_at(&mut buf, off)?;
    }
    Ok(())
}

fn rand_read(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let p = m.join("rand");
    let f = File::open(&p).map_err(err("open", &p))?;
    rand_reads(&f, s.rand_ops, s.rand_file, 7).map_err(err("pread", &p))
}

fn rand_read_deep(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let p = m.join("rand");
    let f = File::open(&p).map_err(err("open", &p))?;
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..16)
            .map(|i| {
                let f = &f;
                sc.spawn(move || rand_reads(f, s.rand_ops / 16, s.rand_file, 11 + i))
            })
            .collect();
        for h in hs {
            h.join().expect("reader thread").map_err(err("pread", &p))?;
        }
        Ok(())
    })
}

fn stat_all(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    for i in 0..s.small_files {
        let p = m.join(format!("tree/d{}/f{i}", i % 100));
        std::fs::symlink_metadata(&p).map_err(err("stat", &p))?;
    }
    Ok(())
}

fn readdir_all(m: &Path, _: &Path, _: &Sizes) -> Result<()> {
    for d in 0..100 {
        let p = m.join(format!("tree/d{d}"));
        for e in std::fs::read_dir(&p).map_err(err("read dir", &p))? {
            e.map_err(err("read dir", &p))?;
        }
    }
    Ok(())
}

/// One listing of a directory whose names come half from the lower, half from the upper.
fn readdir_merged(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let p = m.join("merged");
    let mut n = 0;
    for e in std::fs::read_dir(&p).map_err(err("read dir", &p))? {
        e.map_err(err("read dir", &p))?;
        n += 1;
    }
    if n != s.merged_files {
        bail!("{} lists {n} names, not {}", p.display(), s.merged_files);
    }
    Ok(())
}

/// The upper half of the merged directory, in `dir` (an upper, or a volume's copy).
fn make_merged_upper(dir: &Path, s: &Sizes) -> Result<()> {
    let d = dir.join("merged");
    std::fs::create_dir_all(&d).map_err(err("create", &d))?;
    for i in 0..s.merged_files / 2 {
        let p = d.join(format!("u{i}"));
        std::fs::write(&p, format!("{i}\n")).map_err(err("create", &p))?;
    }
    Ok(())
}

fn seq_write(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let p = m.join("written");
    let mut f = File::create(&p).map_err(err("create", &p))?;
    let buf = vec![0x5au8; 1 << 20];
    for _ in 0..(s.seq >> 20) {
        f.write_all(&buf).map_err(err("write", &p))?;
    }
    f.sync_all().map_err(err("fsync", &p))
}

fn rand_write(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    // The target is made in the writable layer first (setup, not timed), so this times the
    // write path, not a copy-up.
    let p = m.join("rw");
    let f = File::options()
        .write(true)
        .open(&p)
        .map_err(err("open", &p))?;
    let mut x = 3u64;
    let buf = [0xa5u8; 4096];
    for _ in 0..s.rand_ops / 4 {
        let off = (xorshift(&mut x) % (s.rand_file / 4096)) * 4096;
        f.write_all_at(&buf, off).map_err(err("pwrite", &p))?;
    }
    f.sync_all().map_err(err("fsync", &p))
}

fn rand_write_deep(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let p = m.join("rw");
    let f = File::options()
        .write(true)
        .open(&p)
        .map_err(err("open", &p))?;
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..16u64)
            .map(|i| {
                let f = &f;
                sc.spawn(move || -> std::io::Result<()> {
                    let mut x = 5 + i;
                    let buf = [0x3cu8; 4096];
                    for _ in 0..s.rand_ops / 4 / 16 {
                        let off = (xorshift(&mut x) % (s.rand_file / 4096)) * 4096;
                        f.write_all_at(&buf, off)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .expect("writer thread")
                .map_err(err("pwrite", &p))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    f.sync_all().map_err(err("fsync", &p))
}

fn create_many(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let d = m.join("created");
    std::fs::create_dir(&d).map_err(err("mkdir", &d))?;
    for i in 0..s.small_files {
        let p = d.join(format!("n{i}"));
        File::create(&p).map_err(err("create", &p))?;
    }
    Ok(())
}

fn append_byte(p: &Path) -> Result<()> {
    let mut f = File::options()
        .append(true)
        .open(p)
        .map_err(err("open", p))?;
    f.write_all(b"x").map_err(err("write", p))?;
    f.sync_all().map_err(err("fsync", p))
}

fn rename_dir(m: &Path, _: &Path, _: &Sizes) -> Result<()> {
    let (a, b) = (m.join("renameme"), m.join("renamed"));
    match std::fs::rename(&a, &b) {
        Ok(()) => Ok(()),
        // A union that cannot rename a lower directory (fuse-overlayfs 1.10, kernel overlay
        // without redirect_dir) makes `mv` copy it and delete the original: timed as that.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            EXDEV_SEEN.store(true, std::sync::atomic::Ordering::Relaxed);
            strata_overlay::tree::copy_tree(&a, &b)?;
            std::fs::remove_dir_all(&a).map_err(err("remove", &a))
        }
        Err(e) => Err(err("rename", &a)(e)),
    }
}

/// Set when a rename answered EXDEV (reported per backend).
static EXDEV_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn extract(m: &Path, scratch: &Path, _: &Sizes) -> Result<()> {
    let target = m.join("extracted");
    let opts = strata_overlay::ApplyOptions {
        sync: false,
        ..Default::default()
    };
    strata_overlay::apply_file(&scratch.join("tree.tar"), &target, &opts)
        .with_context(|| format!("extracting into {}", target.display()))?;
    Ok(())
}

fn sqlite(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    let p = m.join("bench.db");
    let db = rusqlite::Connection::open(&p).with_context(|| format!("open {}", p.display()))?;
    db.pragma_update(None, "journal_mode", "DELETE")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", [])?;
    for i in 0..s.inserts {
        db.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])?;
    }
    Ok(())
}

fn unlink_all(m: &Path, _: &Path, s: &Sizes) -> Result<()> {
    for i in 0..s.small_files {
        let p = m.join(format!("tree/d{}/f{i}", i % 100));
        std::fs::remove_file(&p).map_err(err("unlink", &p))?;
    }
    Ok(())
}

/// Reads `p`, or every file in directory `p`, to the end.
fn read_all(p: &Path) -> Result<()> {
    if p.is_dir() {
        for e in std::fs::read_dir(p).map_err(err("list", p))? {
            read_all(&e.map_err(err("list", p))?.path())?;
        }
        return Ok(());
    }
    std::io::copy(
        &mut File::open(p).map_err(err("open", p))?,
        &mut std::io::sink(),
    )
    .map_err(err("read", p))?;
    Ok(())
}

/// The lower content every backend starts from.
fn make_lower(dir: &Path, s: &Sizes) -> Result<()> {
    let fill = |p: &Path, size: u64, seed: u64| -> Result<()> {
        let mut f = std::io::BufWriter::new(File::create(p).map_err(err("create", p))?);
        let mut x = seed | 1;
        let mut chunk = vec![0u8; 1 << 16];
        let mut left = size;
        while left > 0 {
            for c in chunk.chunks_mut(8) {
                c.copy_from_slice(&xorshift(&mut x).to_le_bytes());
            }
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).map_err(err("write", p))?;
            left -= n as u64;
        }
        f.flush().map_err(err("write", p))
    };
    std::fs::create_dir_all(dir).map_err(err("create", dir))?;
    fill(&dir.join("seq"), s.seq, 1)?;
    fill(&dir.join("rand"), s.rand_file, 2)?;
    std::fs::create_dir_all(dir.join("small-4k"))?;
    for i in 0..s.small_copies {
        fill(&dir.join(format!("small-4k/f{i}")), 4096, 3 + 16 * i as u64)?;
    }
    fill(&dir.join("medium"), s.medium, 4)?;
    fill(&dir.join("large"), s.large, 5)?;
    for d in 0..100 {
        std::fs::create_dir_all(dir.join(format!("tree/d{d}")))?;
    }
    for i in 0..s.small_files {
        std::fs::write(
            dir.join(format!("tree/d{}/f{i}", i % 100)),
            format!("{i}\n"),
        )?;
    }
    std::fs::create_dir_all(dir.join("merged"))?;
    for i in 0..s.merged_files - s.merged_files / 2 {
        std::fs::write(dir.join(format!("merged/l{i}")), format!("{i}\n"))?;
    }
    std::fs::create_dir_all(dir.join("renameme"))?;
    for i in 0..s.rename_files {
        std::fs::write(dir.join(format!("renameme/f{i}")), format!("{i}\n"))?;
    }
    Ok(())
}

/// A source-like tree of about `bytes` (files of 1-64 KiB in nested dirs), tarred.
fn make_tree_tar(scratch: &Path, bytes: u64) -> Result<()> {
    let src = scratch.join("tree-src");
    let mut x = 9u64;
    let mut total = 0;
    let mut n = 0;
    while total < bytes {
        let d = src.join(format!("m{}/s{}", n % 20, n % 7));
        std::fs::create_dir_all(&d)?;
        let size = 1024 + xorshift(&mut x) % (63 << 10);
        let line = format!("fn item_{n}() {{ /* generated */ }}\n");
        let body = line.repeat((size as usize / line.len()).max(1));
        std::fs::write(d.join(format!("f{n}.rs")), &body)?;
        total += body.len() as u64;
        n += 1;
    }
    let out = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-cf")
        .arg(scratch.join("tree.tar"))
        .arg(".")
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!("tar failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_dir_all(&src)?;
    Ok(())
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One backend set up on the lower: the directory the workloads run in.
struct Env {
    kind: &'static str,
    dir: PathBuf,
    mounted: bool,
}

impl Env {
    fn up(kind: &'static str, scratch: &Path, round: usize, s: &Sizes) -> Result<Env> {
        let base = scratch.join(format!("r{round}-{kind}"));
        let lower = scratch.join("lower");
        let m = base.join("m");
        std::fs::create_dir_all(&m)?;
        let exe = std::env::current_exe().context("finding the strata binary")?;
        let union = |cmd: &mut Command| -> Result<()> {
            std::fs::create_dir_all(base.join("u"))?;
            std::fs::create_dir_all(base.join("w"))?;
            make_merged_upper(&base.join("u"), s)?;
            sh(cmd)
        };
        let (u, w) = (base.join("u"), base.join("w"));
        let mounted = match kind {
            "volume" => {
                strata_overlay::tree::copy_tree(&lower, &m.join("v"))?;
                make_merged_upper(&m.join("v"), s)?;
                false
            }
            "tmpfs" => {
                sh(Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=80%", "bench"])
                    .arg(&m))?;
                strata_overlay::tree::copy_tree(&lower, &m.join("v"))?;
                make_merged_upper(&m.join("v"), s)?;
                true
            }
            "overlay" => {
                union(
                    Command::new(&exe)
                        .arg("mount")
                        .arg("--lower")
                        .arg(&lower)
                        .arg("--upper")
                        .arg(&u)
                        .arg("--work")
                        .arg(&w)
                        .arg(&m),
                )?;
                true
            }
            "strata-fuse" => {
                union(
                    Command::new(&exe)
                        .args(["mount", "--fuse", "--lower"])
                        .arg(&lower)
                        .arg("--upper")
                        .arg(&u)
                        .arg("--work")
                        .arg(&w)
                        .arg(&m),
                )?;
                true
            }
            _ => {
                let prog = if kind == "fuse-overlayfs" {
                    PathBuf::from("fuse-overlayfs")
                } else {
                    fuse_overlayfs_rs()
                };
                union(
                    Command::new(prog)
                        .arg("-o")
                        .arg(format!(
                            "lowerdir={},upperdir={},workdir={}",
                            lower.display(),
                            u.display(),
                            w.display()
                        ))
                        .arg(&m),
                )?;
                true
            }
        };
        let dir = if matches!(kind, "volume" | "tmpfs") {
            m.join("v")
        } else {
            m.clone()
        };
        // The random-write target lives in the writable layer already.
        let rw = dir.join("rw");
        let f = File::create(&rw).map_err(err("create", &rw))?;
        f.set_len(256 << 20).map_err(err("truncate", &rw))?;
        Ok(Env { kind, dir, mounted })
    }

    fn down(self, scratch: &Path, round: usize) -> Result<()> {
        let base = scratch.join(format!("r{round}-{}", self.kind));
        if self.mounted {
            let m = base.join("m");
            let mut ok = false;
            for _ in 0..50 {
                if Command::new("umount")
                    .arg(&m)
                    .output()
                    .is_ok_and(|o| o.status.success())
                {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                sh(Command::new("umount").arg("-l").arg(&m))?;
            }
        }
        std::fs::remove_dir_all(&base).with_context(|| format!("removing {}", base.display()))
    }
}

/// Stats the lower's tree of small files and the dir to rename, directly (see [`Prep::Tree`]).
fn prime_tree(lower: &Path) -> Result<()> {
    for top in ["tree", "renameme", "merged"] {
        let top = lower.join(top);
        if !top.exists() {
            continue; // renamed or deleted by an earlier workload
        }
        for d in std::iter::once(top.clone()).chain(
            std::fs::read_dir(&top)
                .map_err(err("read dir", &top))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        ) {
            for e in std::fs::read_dir(&d).map_err(err("read dir", &d))? {
                let e = e.map_err(err("read dir", &d))?;
                std::fs::symlink_metadata(e.path()).map_err(err("stat", &e.path()))?;
            }
        }
    }
    Ok(())
}

fn drop_caches() {
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// The figures of one workload on one backend.
#[derive(Clone, Debug)]
struct Cell {
    runs: Vec<f64>,
}

impl Cell {
    fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.runs.iter().copied().fold(0.0, f64::max)
    }
}

/// Runs the benchmark; writes the report into `out`.
pub fn run(quick: bool, rounds: usize, out: &Path, dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("strata bench mounts overlays and tmpfs: run it as root");
    }
    let sizes = if quick { QUICK } else { FULL };
    let rounds = rounds.max(1);
    let runs = |p: &Path| Command::new(p).arg("--version").output().is_ok();
    let have_c = runs(Path::new("fuse-overlayfs"));
    let have_rs = runs(&fuse_overlayfs_rs());
    let backends: Vec<&'static str> = BACKENDS
        .iter()
        .copied()
        .filter(|b| match *b {
            "fuse-overlayfs" => have_c,
            "fuse-overlayfs-rs" => have_rs,
            _ => true,
        })
        .collect();
    std::fs::create_dir_all(dir).map_err(err("create", dir))?;
    let scratch = tempfile_in(dir)?;
    let result = (|| -> Result<()> {
        eprintln!(
            "strata bench: preparing the lower content in {}",
            scratch.display()
        );
        make_lower(&scratch.join("lower"), &sizes)?;
        make_tree_tar(&scratch, sizes.extract)?;
        let ws = workloads(&sizes);
        let mut cells = vec![vec![Cell { runs: Vec::new() }; backends.len()]; ws.len()];
        let started = Instant::now();
        let mut notes: Vec<String> = Vec::new();
        // Every backend is set up for the whole round and the workloads interleave: each
        // workload runs on every backend (in an order that rotates) before the next one, so
        // they share the machine's noise. Files are deleted between rounds only: a deletion
        // discards blocks on this kind of disk, which slows whatever writes next.
        for round in 0..rounds {
            eprintln!("strata bench: round {}/{rounds}", round + 1);
            let mut envs = Vec::new();
            for kind in &backends {
                envs.push(Env::up(kind, &scratch, round, &sizes)?);
            }
            for (w, wl) in ws.iter().enumerate() {
                for i in 0..backends.len() {
                    let b = (i + round + w) % backends.len();
                    let env = &envs[b];
                    // What the backend's workloads see as the lower: its own copy for the
                    // volume and tmpfs.
                    let lower = match env.kind {
                        "volume" | "tmpfs" => env.dir.clone(),
                        _ => scratch.join("lower"),
                    };
                    match wl.prep {
                        Prep::Nothing => {}
                        Prep::DropCaches => drop_caches(),
                        Prep::Twice => (wl.run)(&env.dir, &scratch, &sizes)
                            .with_context(|| format!("{} on {}", wl.name, env.kind))?,
                        Prep::Tree => prime_tree(&lower)?,
                        Prep::File(f) => read_all(&lower.join(f))?,
                    }
                    EXDEV_SEEN.store(false, std::sync::atomic::Ordering::Relaxed);
                    let t = Instant::now();
                    (wl.run)(&env.dir, &scratch, &sizes)
                        .with_context(|| format!("{} on {}", wl.name, env.kind))?;
                    cells[w][b].runs.push(t.elapsed().as_secs_f64() * 1e3);
                    if EXDEV_SEEN.load(std::sync::atomic::Ordering::Relaxed) {
                        let note = format!(
                            "{}: renaming a lower directory failed with EXDEV; timed as mv does it (copy, then delete)",
                            env.kind
                        );
                        if !notes.contains(&note) {
                            notes.push(note);
                        }
                    }
                }
            }
            for env in envs {
                env.down(&scratch, round)?;
            }
            // Let the deletions' discards drain before the next round.
            nix::unistd::sync();
            std::thread::sleep(Duration::from_secs(2));
        }
        let report = Report {
            quick,
            rounds,
            seconds: started.elapsed().as_secs_f64(),
            backends: backends.clone(),
            workloads: ws.iter().map(|w| w.name.clone()).collect(),
            cells,
            notes,
        };
        std::fs::create_dir_all(out).map_err(err("create", out))?;
        let md = report.markdown();
        print!("{md}");
        std::fs::write(out.join("report.md"), &md).map_err(err("write", out))?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_vec_pretty(&report.json()).expect("JSON serializes"),
        )
        .map_err(err("write", out))?;
        std::fs::write(out.join("report.svg"), report.svg()).map_err(err("write", out))?;
        eprintln!(
            "strata bench: report.md, report.json and report.svg in {}",
            out.display()
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn tempfile_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!("strata-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(err("create", &p))?;
    Ok(p)
}

struct Report {
    quick: bool,
    rounds: usize,
    seconds: f64,
    backends: Vec<&'static str>,
    workloads: Vec<String>,
    /// Indexed by workload, then backend.
    cells: Vec<Vec<Cell>>,
    notes: Vec<String>,
}

impl Report {
    /// Speed relative to the volume: volume time / this time (higher is faster).
    fn ratio(&self, w: usize, b: usize) -> f64 {
        self.cells[w][0].median() / self.cells[w][b].median().max(1e-6)
    }

    fn markdown(&self) -> String {
        let mut s = format!(
            "# strata bench{}\n\n{} interleaved round(s), {:.0} s. Each cell: median ms (min-max), and speed relative to the volume (higher is faster). Kernel {}.\n\n",
            if self.quick { " --quick" } else { "" },
            self.rounds,
            self.seconds,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        s.push_str("| workload |");
        for b in &self.backends {
            s.push_str(&format!(" {b} |"));
        }
        s.push_str("\n|---|");
        for _ in &self.backends {
            s.push_str("---|");
        }
        s.push('\n');
        for (w, name) in self.workloads.iter().enumerate() {
            s.push_str(&format!("| {name} |"));
            for b in 0..self.backends.len() {
                let c = &self.cells[w][b];
                s.push_str(&format!(
                    " {:.1} ({:.1}-{:.1}) x{:.2} |",
                    c.median(),
                    c.min(),
                    c.max(),
                    self.ratio(w, b)
                ));
            }
            s.push('\n');
        }
        for n in &self.notes {
            s.push_str(&format!("\n- {n}"));
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        s
    }

    fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .workloads
            .iter()
            .enumerate()
            .map(|(w, name)| {
                let mut results = serde_json::Map::new();
                for (b, backend) in self.backends.iter().enumerate() {
                    let c = &self.cells[w][b];
                    results.insert(
                        backend.to_string(),
                        serde_json::json!({
                            "median_ms": c.median(), "min_ms": c.min(), "max_ms": c.max(),
                            "runs_ms": c.runs, "speed_vs_volume": self.ratio(w, b),
                        }),
                    );
                }
                serde_json::json!({ "workload": name, "results": results })
            })
            .collect();
        serde_json::json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "backends": self.backends,
            "workloads": rows,
            "notes": self.notes,
        })
    }

    /// Grouped bars, one group per workload, one colour per backend; the axis is speed relative
    /// to the volume on a log scale (1 = as fast as the volume).
    fn svg(&self) -> String {
        let colours = [
            "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd",
        ];
        let (bar, gap, left, top, h) = (14.0, 18.0, 260.0, 40.0, 300.0);
        let group = bar * self.backends.len() as f64 + gap;
        let height = top + group * self.workloads.len() as f64 + 60.0;
        let width = left + h + 180.0;
        // x: log2(ratio) from -4 (1/16) to +4 (16).
        let x = |r: f64| left + (r.clamp(1.0 / 16.0, 16.0).log2() + 4.0) / 8.0 * h;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">strata bench: speed relative to a volume (log scale; right is faster)</text>\n"
        );
        for t in [-4i32, -2, 0, 2, 4] {
            let r = 2f64.powi(t);
            let xx = x(r);
            s.push_str(&format!(
                "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"{}\"/>\n<text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">x{}</text>\n",
                height - 50.0,
                if t == 0 { "#000" } else { "#ddd" },
                height - 36.0,
                if t >= 0 { format!("{}", r) } else { format!("1/{}", 1 << (-t)) }
            ));
        }
        for (w, name) in self.workloads.iter().enumerate() {
            let y0 = top + group * w as f64;
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                left - 6.0,
                y0 + group / 2.0,
                xml(name)
            ));
            for b in 0..self.backends.len() {
                let r = self.ratio(w, b);
                let (x0, x1) = (x(1.0), x(r));
                let y = y0 + bar * b as f64;
                s.push_str(&format!(
                    "<rect class=\"bar\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: x{r:.2}</title></rect>\n",
                    x0.min(x1),
                    (x1 - x0).abs().max(1.0),
                    bar - 2.0,
                    colours[b % colours.len()],
                    xml(name),
                    self.backends[b]
                ));
            }
        }
        for (b, name) in self.backends.iter().enumerate() {
            let y = top + 16.0 * b as f64;
            s.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
                left + h + 20.0,
                colours[b % colours.len()],
                left + h + 38.0,
                y + 10.0
            ));
        }
        s.push_str("</svg>\n");
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
