//! The POSIX suite pjdfstest 0.2.2 (`cargo install --locked pjdfstest --version 0.2.2`, which
//! needs Debian's libacl1-dev; scripts/test-all.sh installs both) against Strata's FUSE union
//! (`strata mount --fuse`) and against kernel overlay, in the same run: the FUSE mount must
//! fail no case that kernel overlay passes. Kernel overlay fails the `::char` cases by design
//! (a char device 0:0 is a whiteout). Run as root, and as uid 65534 inside `unshare -Urm`
//! (kernel overlay with `userxattr` there), where the cases that switch users fail on both.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{require_command, require_root, scratch};

/// The pjdfstest binary: `$PJDFSTEST`, the PATH, or cargo's bin dir.
fn pjdfstest() -> PathBuf {
    let found = std::env::var_os("PJDFSTEST")
        .map(PathBuf::from)
        .or_else(|| {
            let out = Command::new("sh")
                .args(["-c", "command -v pjdfstest"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .or_else(|| {
            let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/pjdfstest");
            p.exists().then_some(p)
        });
    found.unwrap_or_else(|| {
        panic!(
            "pjdfstest not found: `cargo install --locked pjdfstest --version 0.2.2` (needs \
             libacl1-dev; scripts/test-all.sh installs it), or set PJDFSTEST"
        )
    })
}

/// What one run of the suite gave.
#[derive(Debug)]
struct Outcome {
    failed: BTreeSet<String>,
    passed: usize,
    total: usize,
}

fn parse(log: &str) -> Outcome {
    let failed = log
        .lines()
        .filter(|l| l.trim_end().ends_with(" FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let summary = log
        .lines()
        .find(|l| l.starts_with("Summary: "))
        .unwrap_or_else(|| panic!("pjdfstest printed no summary (did it crash?):\n{log}"));
    // "Summary: 41 failed, 16 skipped, 341 passed, 0 expected failures, 398 total"
    let count = |what: &str| -> usize {
        summary
            .split(", ")
            .find_map(|part| part.trim_start_matches("Summary: ").strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} count in {summary:?}"))
    };
    Outcome {
        failed,
        passed: count(" passed"),
        total: count(" total"),
    }
}

/// The suite's config: the opt-in features Linux has, users `nobody` and `tests`.
fn config(d: &Path) -> PathBuf {
    let ok = Command::new("id").arg("tests").output().unwrap();
    assert!(
        ok.status.success(),
        "pjdfstest switches to user `tests`: `useradd -M -U tests` (scripts/test-all.sh does)"
    );
    let p = d.join("pjdfstest.toml");
    std::fs::write(
        &p,
        "[features]\nposix_fallocate = {}\nutimensat = {}\nutime_now = {}\nrename_ctime = {}\n\
         [settings]\nnaptime = 0.01\nallow_remount = false\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"tests\", \"tests\"]]\n",
    )
    .unwrap();
    p
}

/// Strata's failures beyond kernel overlay's, after checking both runs are whole and alike.
fn compare(kernel: &Outcome, fuse: &Outcome) -> Vec<String> {
    assert!(kernel.total >= 390, "a short run: {kernel:?}");
    assert_eq!(kernel.total, fuse.total, "the runs differ in size");
    fuse.failed.difference(&kernel.failed).cloned().collect()
}

/// The shell steps for both mounts, run in `dir` (as root, or inside the user namespace).
const SCRIPT: &str = r#"set -e
cd "$1"
mkdir -p k/l k/u k/w k/m s/l s/u s/w s/m
mount -t overlay overlay -o "lowerdir=k/l,upperdir=k/u,workdir=k/w$2" k/m
(cd k/m && "$3" -c ../../pjdfstest.toml -p "$1/k/m" > ../../kernel.log 2>&1) || true
umount k/m
"$4" mount --fuse --lower s/l --upper s/u --work s/w s/m
(cd s/m && "$3" -c ../../pjdfstest.toml -p "$1/s/m" > ../../fuse.log 2>&1) || true
"$4" umount s/m
"#;

fn run_both(d: &Path, wrap: &[&str], overlay_opts: &str, pjd: &Path, strata: &Path) {
    let out = Command::new(wrap[0])
        .args(&wrap[1..])
        .args(["sh", "-c", SCRIPT, "sh"])
        .arg(d)
        .arg(overlay_opts)
        .arg(pjd)
        .arg(strata)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the pjdfstest runs failed to set up:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn outcomes(d: &Path) -> (Outcome, Outcome) {
    let read = |n: &str| parse(&std::fs::read_to_string(d.join(n)).unwrap());
    (read("kernel.log"), read("fuse.log"))
}

#[test]
fn pjdfstest_fuse_fails_nothing_kernel_overlay_passes_as_root() {
    require_root();
    let t = scratch();
    let d = t.path();
    config(d);
    let (pjd, strata) = (pjdfstest(), PathBuf::from(env!("CARGO_BIN_EXE_strata")));
    run_both(d, &["env"], "", &pjd, &strata);
    let (kernel, fuse) = outcomes(d);
    let extra = compare(&kernel, &fuse);
    assert!(
        extra.is_empty(),
        "Strata's FUSE mount fails {} case(s) kernel overlay passes: {extra:?}",
        extra.len()
    );
    // As root, kernel overlay fails only the char-device cases (0:0 is a whiteout).
    let odd: Vec<_> = kernel
        .failed
        .iter()
        .filter(|n| !n.contains("char"))
        .collect();
    assert!(
        odd.is_empty(),
        "kernel overlay failed {odd:?}: is the machine set up as CI's?"
    );
    eprintln!(
        "pjdfstest as root: kernel overlay {} passed / {} failed, strata fuse {} passed / {} failed, of {}",
        kernel.passed,
        kernel.failed.len(),
        fuse.passed,
        fuse.failed.len(),
        kernel.total
    );
}

#[test]
fn pjdfstest_fuse_fails_nothing_kernel_overlay_passes_rootless() {
    require_root();
    require_command("setpriv");
    require_command("unshare");
    let t = scratch();
    let d = t.path();
    config(d);
    // Both binaries may sit below directories uid 65534 cannot enter: copies run from here.
    let (pjd, strata) = (d.join("pjdfstest"), d.join("strata"));
    std::fs::copy(pjdfstest(), &pjd).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), &strata).unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Rootless FUSE needs /dev/fuse open to everyone (it is 0600 on these machines).
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
    run_both(
        d,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "unshare",
            "-Urm",
        ],
        ",userxattr",
        &pjd,
        &strata,
    );
    let (kernel, fuse) = outcomes(d);
    let extra = compare(&kernel, &fuse);
    assert!(
        extra.is_empty(),
        "rootless, Strata's FUSE mount fails {} case(s) kernel overlay passes: {extra:?}",
        extra.len()
    );
    assert!(
        kernel.passed > 200,
        "too few cases ran rootless: {kernel:?}"
    );
    eprintln!(
        "pjdfstest rootless: kernel overlay {} passed / {} failed, strata fuse {} passed / {} failed, of {}",
        kernel.passed,
        kernel.failed.len(),
        fuse.passed,
        fuse.failed.len(),
        kernel.total
    );
}

#[test]
fn the_summary_parser_reads_pjdfstest_output() {
    let log = "chmod::eperm::char                         FAILED\n\tcalled unwrap\n\
               chmod::ok                                       ok\n\
               Summary: 1 failed, 0 skipped, 1 passed, 0 expected failures, 2 total\n";
    let o = parse(log);
    assert_eq!(o.failed.iter().collect::<Vec<_>>(), ["chmod::eperm::char"]);
    assert_eq!((o.passed, o.total), (1, 2));
}
