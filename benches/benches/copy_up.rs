//! Copy-up cost: Strata's overlay options (`metacopy=on,redirect_dir=on`) against
//! containerd's (`index=off` only), on the same lowers in the same run, cold cache.
//!
//! - chmod 600 of a 1 GiB lower file: containerd's options copy the whole file up; with
//!   metacopy only the metadata is copied.
//! - `mv` of a lower directory holding 1,000 files: without redirect_dir the kernel answers
//!   EXDEV and `mv` copies the tree; with it the rename is recorded.
//!
//! Run as root: `cargo bench -p strata-benches --bench copy_up`. Rounds alternate the two
//! option sets; the median of 5 is printed with min and max.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use strata_overlay::mount::{Options, Overlay, unmount};

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn median(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[0]), ms(v[v.len() - 1]))
}

fn one(lower: &Path, dir: &Path, options: Options) -> (Duration, Duration) {
    let (u, w, m) = (dir.join("u"), dir.join("w"), dir.join("m"));
    for d in [&u, &w, &m] {
        std::fs::create_dir_all(d).unwrap();
    }
    Overlay {
        lowers: vec![lower.to_path_buf()],
        upper: Some(u.clone()),
        work: Some(w.clone()),
        options,
    }
    .mount(&m)
    .unwrap();
    drop_caches();
    let t = Instant::now();
    std::fs::set_permissions(
        m.join("big"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let chmod = t.elapsed();
    drop_caches();
    let t = Instant::now();
    let st = Command::new("mv")
        .arg(m.join("tree"))
        .arg(m.join("tree-moved"))
        .status()
        .unwrap();
    assert!(st.success());
    let mv = t.elapsed();
    assert!(m.join("tree-moved/f0999").exists());
    unmount(&m, false).unwrap();
    for d in [&u, &w, &m] {
        std::fs::remove_dir_all(d).unwrap();
    }
    (chmod, mv)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "copy_up mounts overlays: run as root"
    );
    let base =
        PathBuf::from(std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .join(format!("copyup-{}", std::process::id()));
    let lower = base.join("lower");
    std::fs::create_dir_all(lower.join("tree")).unwrap();
    let mut f = std::fs::File::create(lower.join("big")).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..1024 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    for i in 0..1000 {
        std::fs::write(lower.join(format!("tree/f{i:04}")), &chunk[..4096]).unwrap();
    }
    let strata = strata_overlay::probe::probe(&base).options();
    assert!(
        strata.metacopy && strata.redirect_dir,
        "this kernel lacks metacopy or redirect_dir: nothing to compare"
    );
    let containerd = Options {
        index_off: true,
        ..Default::default()
    };
    let (mut sc, mut sm, mut cc, mut cm) = (vec![], vec![], vec![], vec![]);
    for round in 0..5 {
        let order: [(bool, Options); 2] = if round % 2 == 0 {
            [(true, strata), (false, containerd)]
        } else {
            [(false, containerd), (true, strata)]
        };
        for (is_strata, o) in order {
            let (c, m) = one(&lower, &base.join("run"), o);
            if is_strata {
                sc.push(c);
                sm.push(m);
            } else {
                cc.push(c);
                cm.push(m);
            }
        }
    }
    println!("copy-up, cold cache, 5 interleaved rounds: median (min-max) ms");
    println!("| operation | strata (metacopy, redirect_dir) | containerd's options | ratio |");
    println!("|---|---|---|---|");
    for (name, a, b) in [
        ("chmod 600 of a 1 GiB lower file", &mut sc, &mut cc),
        ("mv of a 1,000-file lower dir", &mut sm, &mut cm),
    ] {
        let (am, alo, ahi) = median(a);
        let (bm, blo, bhi) = median(b);
        println!(
            "| {name} | {am:.1} ({alo:.1}-{ahi:.1}) | {bm:.1} ({blo:.1}-{bhi:.1}) | {:.4} |",
            am / bm
        );
    }
    let _ = std::fs::remove_dir_all(&base);
}
