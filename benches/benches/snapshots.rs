//! Snapshot operation latency over gRPC: `strata snapshotter serve` against containerd's own
//! overlayfs snapshotter served by containerd's `contrib/snapshotservice` (the conformance
//! harness's `refserver`), through the same tonic client, interleaved op by op, on the same
//! disk. Prints p50 and p99 per operation and the ratio Strata / containerd. Every other round
//! writes a 4 KiB file into the active snapshot's upper dir before Commit (the
//! `commit (written)` row), so Commit is timed with data to make durable as well as untouched.
//! The `no-op` row calls a method neither server has: the floor of one call through this
//! client, transport and framework, with no snapshot work at all.
//!
//! `cargo build --release -p strata-runtime && bash ../shared/conformance/setup.sh` first (or
//! set `STRATA_BIN` and `REFSERVER`), then `cargo bench -p strata-benches --bench snapshots`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use strata_snapshotter::api::containerd::services::snapshots::v1 as pb;
use tonic::transport::Channel;

type Client = pb::snapshots_client::SnapshotsClient<Channel>;

/// One server's clients: the snapshots service, and raw gRPC on the same channel (no-op).
struct Conn {
    snap: Client,
    raw: tonic::client::Grpc<Channel>,
}

fn find(env: &str, default: PathBuf, how: &str) -> PathBuf {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    assert!(
        p.exists(),
        "{} not found: {how} (or set {env})",
        p.display()
    );
    p
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(cmd: &mut Command, socket: &Path) -> Proc {
    let child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{cmd:?} did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Proc(child)
}

async fn client(socket: PathBuf) -> Conn {
    let ch = strata_snapshotter::connect_channel(&socket).await.unwrap();
    Conn {
        snap: Client::new(ch.clone()),
        raw: tonic::client::Grpc::new(ch),
    }
}

/// Calls a method no server implements and checks it was answered Unimplemented.
async fn no_op(g: &mut tonic::client::Grpc<Channel>) {
    use tonic::codegen::http::uri::PathAndQuery;
    g.ready().await.unwrap();
    let r = g
        .unary::<(), (), _>(
            tonic::Request::new(()),
            PathAndQuery::from_static("/containerd.services.snapshots.v1.Snapshots/NoSuchMethod"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(
        r.expect_err("no server has this method").code(),
        tonic::Code::Unimplemented
    );
}

const OPS: [&str; 8] = [
    "prepare",
    "mounts",
    "stat",
    "commit",
    "commit (written)",
    "remove",
    "stat (missing key)",
    "no-op (unknown method)",
];

/// The `upperdir=` of an overlay mount.
fn upperdir(m: &strata_snapshotter::api::containerd::types::Mount) -> PathBuf {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .expect("an active snapshot on a parent is an overlay with an upper dir")
}

async fn round(conn: &mut Conn, i: usize, out: &mut [Vec<Duration>; 8]) {
    let c = &mut conn.snap;
    let key = format!("active-{i}");
    let name = format!("committed-{i}");
    let t = Instant::now();
    c.prepare(pb::PrepareSnapshotRequest {
        key: key.clone(),
        parent: "base".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    out[0].push(t.elapsed());
    let t = Instant::now();
    let m = c
        .mounts(pb::MountsRequest {
            key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    out[1].push(t.elapsed());
    // Not `i % 2`: rounds alternate which server goes first on that, and each row needs both.
    let written = (i / 2) % 2 == 1;
    if written {
        std::fs::write(upperdir(&m.mounts[0]).join("f"), vec![7u8; 4096]).unwrap();
    }
    let t = Instant::now();
    c.stat(pb::StatSnapshotRequest {
        key: key.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    out[2].push(t.elapsed());
    let t = Instant::now();
    c.commit(pb::CommitSnapshotRequest {
        name: name.clone(),
        key,
        ..Default::default()
    })
    .await
    .unwrap();
    out[if written { 4 } else { 3 }].push(t.elapsed());
    let t = Instant::now();
    c.remove(pb::RemoveSnapshotRequest {
        key: name,
        ..Default::default()
    })
    .await
    .unwrap();
    out[5].push(t.elapsed());
    let t = Instant::now();
    let _ = c
        .stat(pb::StatSnapshotRequest {
            key: "no-such-key".into(),
            ..Default::default()
        })
        .await;
    out[6].push(t.elapsed());
    let t = Instant::now();
    no_op(&mut conn.raw).await;
    out[7].push(t.elapsed());
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let strata = find(
        "STRATA_BIN",
        ws.join("target/release/strata"),
        "cargo build --release -p strata-runtime",
    );
    let refserver = find(
        "REFSERVER",
        ws.join("target/conformance/bin/refserver"),
        "CONFORMANCE_BUILD=target/conformance bash ../shared/conformance/setup.sh",
    );
    let iters: usize = std::env::var("STRATA_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let base =
        PathBuf::from(std::env::var("STRATA_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .join(format!("snapbench-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let (ss, cs) = (base.join("strata.sock"), base.join("ctrd.sock"));
    let _s = start(
        Command::new(&strata)
            .args(["snapshotter", "serve", "--root"])
            .arg(base.join("strata"))
            .arg("--address")
            .arg(&ss),
        &ss,
    );
    let _c = start(
        Command::new(&refserver)
            .arg("--root")
            .arg(base.join("ctrd"))
            .arg("--address")
            .arg(&cs)
            .args(["--snapshotter", "overlayfs"]),
        &cs,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut a, mut b) =
        rt.block_on(async { (client(ss.clone()).await, client(cs.clone()).await) });
    let mut sa: [Vec<Duration>; 8] = Default::default();
    let mut sb: [Vec<Duration>; 8] = Default::default();
    rt.block_on(async {
        for c in [&mut a.snap, &mut b.snap] {
            c.prepare(pb::PrepareSnapshotRequest {
                key: "base-a".into(),
                ..Default::default()
            })
            .await
            .unwrap();
            c.commit(pb::CommitSnapshotRequest {
                name: "base".into(),
                key: "base-a".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        // Warm-up, then interleaved rounds so both see the same machine noise.
        let mut sink: [Vec<Duration>; 8] = Default::default();
        for i in 0..20 {
            round(&mut a, 1_000_000 + i, &mut sink).await;
            round(&mut b, 1_000_000 + i, &mut sink).await;
        }
        for i in 0..iters {
            if i % 2 == 0 {
                round(&mut a, i, &mut sa).await;
                round(&mut b, i, &mut sb).await;
            } else {
                round(&mut b, i, &mut sb).await;
                round(&mut a, i, &mut sa).await;
            }
        }
    });
    println!("snapshot operations over gRPC, {iters} interleaved rounds (µs)");
    println!(
        "| op | strata p50 | containerd p50 | p50 ratio | strata p99 | containerd p99 | p99 ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (k, op) in OPS.iter().enumerate() {
        let (a50, b50, a99, b99) = (
            pct(&mut sa[k], 0.5),
            pct(&mut sb[k], 0.5),
            pct(&mut sa[k], 0.99),
            pct(&mut sb[k], 0.99),
        );
        println!(
            "| {op} | {a50:.0} | {b50:.0} | {:.2} | {a99:.0} | {b99:.0} | {:.2} |",
            a50 / b50,
            a99 / b99
        );
    }
    drop(rt);
    drop(_s);
    drop(_c);
    let _ = Command::new("umount").arg("-R").arg(&base).status();
    let _ = std::fs::remove_dir_all(&base);
}
