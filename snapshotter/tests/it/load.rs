//! Load: 16 gRPC clients at once, each a fixed number of mixed operations (prepare, view,
//! commit, stat, mounts, usage, update, list, remove; and removals that must be refused) on
//! its own keys over shared parents. No unexpected error, a final state equal to the model each
//! client kept, directories equal to records after Cleanup; p50/p99 per operation printed
//! (`cargo test -p strata-snapshotter --test it load -- --nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_snapshotter::api::containerd::services::snapshots::v1 as pb;
use strata_snapshotter::{Config, Mode, Snapshotter, connect, serve};
use tonic::Code;

use crate::support::{require_root, scratch};

const CLIENTS: usize = 16;
const OPS: usize = 120;

type Lat = Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_clients_of_mixed_operations_leave_a_consistent_store() {
    require_root();
    let t = scratch();
    let root = t.path().join("root");
    // As `strata snapshotter serve` opens it: exclusive, with ready dirs for Prepare.
    let config = Config {
        exclusive: true,
        ready_dirs: 4,
        ..Config::new(Mode::Overlay)
    };
    let snap = Arc::new(Snapshotter::open_with(&root, config).unwrap());
    let socket = t.path().join("snap.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let socket = socket.clone();
        let snap = snap.clone();
        async move {
            serve(snap, &socket, async {
                stopped.await.ok();
            })
            .await
        }
    });
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = connect(&socket).await.unwrap();
    let s = || "strata".to_string();
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: s(),
        key: "base-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: s(),
        name: "base".into(),
        key: "base-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let lat: Lat = Default::default();
    let mut tasks = Vec::new();
    for w in 0..CLIENTS {
        let socket = socket.clone();
        let lat = lat.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&socket).await.unwrap();
            let mut x: u64 = 0x2545f4914f6cdd1d ^ (w as u64 + 1).wrapping_mul(0x9e3779b97f4a7c15);
            let mut rnd = move |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            // The model: this client's active keys and committed names (with their parents).
            let mut active: Vec<String> = Vec::new();
            let mut views: Vec<String> = Vec::new();
            let mut committed: Vec<String> = Vec::new();
            let mut children: BTreeMap<String, usize> = BTreeMap::new();
            let mut parent_of: BTreeMap<String, String> = BTreeMap::new();
            let mut seq = 0;
            let s = || "strata".to_string();
            for _ in 0..OPS {
                let op = rnd(10);
                let t0 = Instant::now();
                let name: &'static str = match op {
                    0 | 1 => {
                        seq += 1;
                        let key = format!("w{w}-a{seq}");
                        let parent = if committed.is_empty() || rnd(2) == 0 {
                            "base".to_string()
                        } else {
                            committed[rnd(committed.len() as u64) as usize].clone()
                        };
                        c.prepare(pb::PrepareSnapshotRequest {
                            snapshotter: s(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: Default::default(),
                        })
                        .await
                        .unwrap();
                        *children.entry(parent.clone()).or_default() += 1;
                        parent_of.insert(key.clone(), parent);
                        active.push(key);
                        "prepare"
                    }
                    2 if !active.is_empty() => {
                        let key = active.remove(rnd(active.len() as u64) as usize);
                        let name = format!("{key}-c");
                        c.commit(pb::CommitSnapshotRequest {
                            snapshotter: s(),
                            name: name.clone(),
                            key: key.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                        let p = parent_of.remove(&key).unwrap();
                        parent_of.insert(name.clone(), p);
                        committed.push(name);
                        "commit"
                    }
                    3 if !committed.is_empty() => {
                        let parent = committed[rnd(committed.len() as u64) as usize].clone();
                        seq += 1;
                        let key = format!("w{w}-v{seq}");
                        c.view(pb::ViewSnapshotRequest {
                            snapshotter: s(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: Default::default(),
                        })
                        .await
                        .unwrap();
                        *children.entry(parent.clone()).or_default() += 1;
                        parent_of.insert(key.clone(), parent);
                        views.push(key);
                        "view"
                    }
                    4 if !active.is_empty() => {
                        let key = active[rnd(active.len() as u64) as usize].clone();
                        c.mounts(pb::MountsRequest {
                            snapshotter: s(),
                            key,
                        })
                        .await
                        .unwrap();
                        "mounts"
                    }
                    5 => {
                        let key = active
                            .iter()
                            .chain(&committed)
                            .nth(rnd((active.len() + committed.len()).max(1) as u64) as usize)
                            .cloned()
                            .unwrap_or_else(|| "base".into());
                        c.stat(pb::StatSnapshotRequest {
                            snapshotter: s(),
                            key,
                        })
                        .await
                        .unwrap();
                        "stat"
                    }
                    6 if !committed.is_empty() => {
                        let key = committed[rnd(committed.len() as u64) as usize].clone();
                        c.usage(pb::UsageRequest {
                            snapshotter: s(),
                            key,
                        })
                        .await
                        .unwrap();
                        "usage"
                    }
                    7 if !committed.is_empty() => {
                        let key = committed[rnd(committed.len() as u64) as usize].clone();
                        let mut labels = std::collections::HashMap::new();
                        labels.insert("load/worker".to_string(), w.to_string());
                        c.update(pb::UpdateSnapshotRequest {
                            snapshotter: s(),
                            info: Some(pb::Info {
                                name: key,
                                labels,
                                ..Default::default()
                            }),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["labels.load/worker".into()],
                            }),
                        })
                        .await
                        .unwrap();
                        "update"
                    }
                    8 => {
                        let mut st = c
                            .list(pb::ListSnapshotsRequest {
                                snapshotter: s(),
                                filters: vec![format!("parent==base")],
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        while st.message().await.unwrap().is_some() {}
                        "list"
                    }
                    _ => {
                        // Remove: an active key, or a committed one without children; a
                        // committed one with children must be refused.
                        let pick = rnd(3);
                        if pick == 0 && !(active.is_empty() && views.is_empty()) {
                            let from = if views.is_empty() || (!active.is_empty() && rnd(2) == 0) {
                                &mut active
                            } else {
                                &mut views
                            };
                            let key = from.remove(rnd(from.len() as u64) as usize);
                            c.remove(pb::RemoveSnapshotRequest {
                                snapshotter: s(),
                                key: key.clone(),
                            })
                            .await
                            .unwrap();
                            let p = parent_of.remove(&key).unwrap();
                            *children.get_mut(&p).unwrap() -= 1;
                        } else if let Some(i) = committed
                            .iter()
                            .position(|n| children.get(n).copied().unwrap_or(0) > 0)
                            .filter(|_| pick == 1)
                        {
                            let e = c
                                .remove(pb::RemoveSnapshotRequest {
                                    snapshotter: s(),
                                    key: committed[i].clone(),
                                })
                                .await
                                .unwrap_err();
                            assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
                        } else if let Some(i) = committed
                            .iter()
                            .position(|n| children.get(n).copied().unwrap_or(0) == 0)
                        {
                            let key = committed.remove(i);
                            c.remove(pb::RemoveSnapshotRequest {
                                snapshotter: s(),
                                key: key.clone(),
                            })
                            .await
                            .unwrap();
                            let p = parent_of.remove(&key).unwrap();
                            *children.get_mut(&p).unwrap() -= 1;
                        } else {
                            continue;
                        }
                        "remove"
                    }
                };
                lat.lock()
                    .unwrap()
                    .entry(name)
                    .or_default()
                    .push(t0.elapsed());
            }
            parent_of
        }));
    }
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    expected.insert("base".into(), String::new());
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    // The final state is the union of the clients' models, parents included.
    let mut st = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: s(),
            filters: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut actual: BTreeMap<String, String> = BTreeMap::new();
    while let Some(b) = st.message().await.unwrap() {
        for i in b.info {
            actual.insert(i.name, i.parent);
        }
    }
    assert_eq!(
        actual, expected,
        "the store does not match what the clients did"
    );
    c.cleanup(pb::CleanupRequest { snapshotter: s() })
        .await
        .unwrap();
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    drop(c);
    let ids: BTreeSet<i64> = expected.keys().map(|k| snap.id_of(k).unwrap()).collect();
    crate::support::assert_dirs_are_records(&root.join("snapshots"), &ids, 4);

    let lat = lat.lock().unwrap();
    let mut total = 0;
    eprintln!("{CLIENTS} clients x {OPS} mixed operations: latency per operation (ms)");
    eprintln!("| op | count | p50 | p99 | max |");
    eprintln!("|---|---|---|---|---|");
    for (op, v) in lat.iter() {
        let mut v = v.clone();
        v.sort();
        total += v.len();
        let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
        eprintln!(
            "| {op} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            q(0.5),
            q(0.99),
            q(1.0)
        );
    }
    assert!(total >= CLIENTS * OPS / 2, "only {total} operations ran");
}
