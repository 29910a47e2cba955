//! `strata system check`: what it finds and repairs, and the crash loop that uses it as the
//! oracle: `strata` killed with SIGKILL at random instants of import, load, commit, rm, rmi,
//! prune and pull, then checked (and repaired) each time; nothing committed may be lost and
//! nothing may leak.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use strata_snapshotter::{Mode, Snapshotter};

use crate::registry::Registry;
use crate::support::{fails, loaded, ok, require_root, run, scratch, st};

fn check(root: &Path, repair: bool) -> Output {
    let mut c = st(root);
    c.args(["system", "check"]);
    if repair {
        c.arg("--repair");
    }
    run(&mut c)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn numeric_dirs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .count()
}

#[test]
fn system_check_finds_and_repairs_what_it_can() {
    require_root();
    let t = scratch();
    let root = loaded(t.path());
    let o = check(&root, false);
    assert!(
        o.status.success() && text(&o).contains("no problems"),
        "{}",
        text(&o)
    );

    // A lost layer snapshot (blob still here), a writable layer no container owns and a
    // container directory without its config.
    let inspect = ok(st(&root).args(["inspect", "localhost/img:latest"]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let diffs: Vec<String> = v[0]["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(diffs.len(), 2);
    let chain1 = diffs[0].clone();
    let chain2 =
        strata_runtime::image::chain_id(Some(&chain1.parse().unwrap()), &diffs[1].parse().unwrap())
            .to_string();
    {
        let snap = Snapshotter::open(&root.join("snapshotter"), Mode::Overlay).unwrap();
        snap.remove(&chain2).unwrap();
        snap.prepare(
            &format!("ctr-{}", "0".repeat(64)),
            &chain1,
            Default::default(),
        )
        .unwrap();
    }
    std::fs::create_dir_all(root.join("containers").join("1".repeat(64))).unwrap();
    let o = check(&root, false);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("layer snapshot(s) missing"), "{out}");
    assert!(out.contains("belongs to no container"), "{out}");
    assert!(out.contains("without config.json"), "{out}");
    assert!(out.contains("run `strata system check --repair`"), "{out}");
    let o = check(&root, true);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("all repaired"), "{}", text(&o));
    let o = check(&root, false);
    assert!(text(&o).contains("no problems"), "{}", text(&o));
    assert_eq!(
        ok(st(&root).args([
            "run",
            "--rm",
            "localhost/img:latest",
            "cat",
            "/etc/upper-file"
        ])),
        "from the upper layer\n",
        "the re-unpacked layer is whole"
    );

    // A corrupt blob: removed by the repair; the image still runs from its snapshots, but the
    // missing blob is reported until the image is loaded again.
    let layer_blob = std::fs::read_dir(root.join("content/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 100_000)
        .expect("a layer blob");
    let mut data = std::fs::read(&layer_blob).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&layer_blob, &data).unwrap();
    let o = check(&root, false);
    assert!(text(&o).contains("is corrupt"), "{}", text(&o));
    let o = check(&root, true);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cannot fix"), "{}", text(&o));
    assert!(!layer_blob.exists(), "the corrupt blob was kept");
    ok(st(&root).args(["run", "--rm", "localhost/img:latest", "true"]));
    fails(
        st(&root)
            .args(["save", "-o"])
            .arg(t.path().join("s.tar"))
            .arg("localhost/img:latest"),
        "blob",
    );
    ok(st(&root).args(["load", "-i"]).arg(t.path().join("img.tar")));
    let o = check(&root, false);
    assert!(text(&o).contains("no problems"), "{}", text(&o));
}

/// A tiny xorshift, seeded from the clock and printed, so a failing run can be replayed with
/// `STRATA_CRASH_SEED`.
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

#[test]
fn kill_nine_during_store_commands_loses_nothing_and_leaks_nothing() {
    require_root();
    let kills: usize = std::env::var("STRATA_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = std::env::var("STRATA_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash loop: {kills} kills, STRATA_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let t = scratch();
    let reg = Registry::start(t.path(), None);
    let root = loaded(t.path());
    let remote = reg.name("crash/img:v1");
    ok(st(&root).args(["tag", "localhost/img:latest", &remote]));
    ok(st(&root).args(["push", &remote]));
    ok(st(&root).args(["rmi", &remote]));
    // Material for imports: a few small trees.
    for i in 0..3 {
        let d = t.path().join(format!("tree{i}"));
        std::fs::create_dir_all(d.join("data")).unwrap();
        for j in 0..50 {
            std::fs::write(
                d.join(format!("data/f{j}")),
                format!("{i}.{j}\n").repeat(200),
            )
            .unwrap();
        }
        ok(Command::new("tar")
            .arg("-C")
            .arg(&d)
            .arg("-czf")
            .arg(t.path().join(format!("tree{i}.tgz")))
            .arg("."));
    }
    let archive = t.path().join("img.tar");
    let mut container = 0usize;
    for n in 0..kills {
        let op = rng.below(8);
        let mut c = st(&root);
        match op {
            0 => {
                c.arg("import")
                    .arg(t.path().join(format!("tree{}.tgz", rng.below(3))))
                    .arg(format!("localhost/imp:{}", rng.below(4)));
            }
            1 => {
                c.arg("load").arg("-i").arg(&archive);
            }
            2 => {
                // A container with changes, then its commit is what gets killed.
                container += 1;
                let name = format!("c{container}");
                ok(st(&root).args([
                    "run",
                    "--name",
                    &name,
                    "localhost/img:latest",
                    "sh",
                    "-c",
                    "mkdir -p /work && for i in 1 2 3 4 5 6 7 8; do echo $i > /work/$i; done; rm /etc/from-lower",
                ]));
                c.args([
                    "commit",
                    &name,
                    &format!("localhost/committed:{}", rng.below(3)),
                ]);
            }
            3 => {
                let ps = ok(st(&root).args(["ps", "-aq"]));
                let Some(id) = ps.lines().next() else {
                    continue;
                };
                c.args(["rm", "-f", id]);
            }
            4 => {
                c.args(["rmi", &format!("localhost/imp:{}", rng.below(4))]);
            }
            5 => {
                c.args(["image", "prune"]);
            }
            6 => {
                c.args(["pull", "-q", &remote]);
            }
            _ => {
                c.args(["rmi", &remote]);
            }
        }
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        let _ = child.kill();
        let _ = child.wait();
        let o = check(&root, true);
        assert!(
            o.status.success(),
            "after kill {n} (op {op}, STRATA_CRASH_SEED={seed}) the store has a problem repair cannot fix:\n{}",
            text(&o)
        );
        if n % 25 == 0 {
            assert_eq!(
                ok(st(&root).args([
                    "run",
                    "--rm",
                    "localhost/img:latest",
                    "cat",
                    "/etc/from-lower"
                ])),
                "from the lower layer\n",
                "the loaded image changed (kill {n}, STRATA_CRASH_SEED={seed})"
            );
        }
    }
    // Nothing committed was lost: the loaded image and every image listed still run or at
    // least check clean; nothing leaked: once everything but the loaded image is removed, the
    // store holds just that image.
    assert_eq!(
        ok(st(&root).args([
            "run",
            "--rm",
            "localhost/img:latest",
            "cat",
            "/etc/from-lower"
        ])),
        "from the lower layer\n"
    );
    for id in ok(st(&root).args(["ps", "-aq"])).lines() {
        ok(st(&root).args(["rm", "-f", id]));
    }
    let images = ok(st(&root).args(["images", "--format", "json"]));
    for line in images.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = format!(
            "{}:{}",
            v["Repository"].as_str().unwrap_or(""),
            v["Tag"].as_str().unwrap_or("")
        );
        if name != "localhost/img:latest" && !name.contains("<none>") {
            ok(st(&root).args(["rmi", &name]));
        }
    }
    ok(st(&root).args(["image", "prune"]));
    let o = check(&root, false);
    assert!(text(&o).contains("no problems"), "{}", text(&o));
    let blobs = std::fs::read_dir(root.join("content/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(
        blobs, 4,
        "the loaded image's manifest, config and two layers, nothing else"
    );
    let ingest = std::fs::read_dir(root.join("content/ingest"))
        .unwrap()
        .count();
    assert_eq!(ingest, 0, "ingest files leaked");
    let dirs = numeric_dirs(&root.join("snapshotter/snapshots"));
    assert!(
        (2..=3).contains(&dirs),
        "two layers and at most the image's init layer, found {dirs} snapshot dirs"
    );
}
