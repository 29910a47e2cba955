//! Crash consistency of the snapshotter: rounds of load, each ended by SIGKILL at a random
//! instant, then a restart and checks: every acknowledged commit is there with its content,
//! every acknowledged remove stays gone, every parent exists, and after Cleanup the directories
//! are exactly the records.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_snapshotter::api::containerd::services::snapshots::v1 as pb;

use crate::support::{Server, client, require_root, scratch};

#[derive(Default)]
struct Acked {
    /// Committed name -> the content written before the commit was acknowledged.
    commits: BTreeMap<String, String>,
    /// Removed names (acknowledged).
    removed: Vec<String>,
}

/// Load until the server dies: prepare (bind mount, so the test writes straight into the
/// layer), write, commit, sometimes remove an older commit.
async fn load(socket: PathBuf, round: usize, worker: usize, acked: Arc<Mutex<Acked>>) {
    // The server may be killed before this worker even connects: then nothing was acknowledged.
    let Ok(mut c) = strata_snapshotter::connect(&socket).await else {
        return;
    };
    for n in 0.. {
        let key = format!("a-{round}-{worker}-{n}");
        let Ok(r) = c
            .prepare(pb::PrepareSnapshotRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
        else {
            return;
        };
        let m = &r.into_inner().mounts[0];
        assert_eq!(m.r#type, "bind");
        let content = format!("{round}/{worker}/{n}");
        if std::fs::write(PathBuf::from(&m.source).join("content"), &content).is_err() {
            return;
        }
        let name = format!("c-{round}-{worker}-{n}");
        if c.commit(pb::CommitSnapshotRequest {
            name: name.clone(),
            key: key.clone(),
            ..Default::default()
        })
        .await
        .is_err()
        {
            return;
        }
        acked.lock().unwrap().commits.insert(name.clone(), content);
        if n % 3 == 2 {
            let old = format!("c-{round}-{worker}-{}", n - 1);
            // In flight, the remove may or may not happen: the old commit is no longer checked.
            if acked.lock().unwrap().commits.remove(&old).is_none() {
                continue;
            }
            if c.remove(pb::RemoveSnapshotRequest {
                key: old.clone(),
                ..Default::default()
            })
            .await
            .is_err()
            {
                return;
            }
            acked.lock().unwrap().removed.push(old);
        }
    }
}

async fn check(socket: PathBuf, acked: &Acked, snapdir: &std::path::Path) {
    let mut c = client(socket).await;
    let mut stream = c
        .list(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut all = BTreeMap::new();
    while let Some(b) = stream.message().await.unwrap() {
        for i in b.info {
            all.insert(i.name.clone(), i);
        }
    }
    for (name, i) in &all {
        assert!(
            i.parent.is_empty() || all.contains_key(&i.parent),
            "{name}: parent {} is missing",
            i.parent
        );
    }
    for (name, content) in &acked.commits {
        let i = all
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged commit {name} was lost"));
        assert_eq!(i.kind, pb::Kind::Committed as i32);
        let view = format!("check-{name}");
        let v = c
            .view(pb::ViewSnapshotRequest {
                key: view.clone(),
                parent: name.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got =
            std::fs::read_to_string(PathBuf::from(&v.mounts[0].source).join("content")).unwrap();
        assert_eq!(&got, content, "{name}: committed content changed");
        c.remove(pb::RemoveSnapshotRequest {
            key: view,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for name in &acked.removed {
        assert!(
            !all.contains_key(name),
            "acknowledged remove of {name} came back"
        );
    }
    c.cleanup(pb::CleanupRequest::default()).await.unwrap();
    // Directories are exactly the records (the reaper deletes in the background).
    let live = all.len() - all.keys().filter(|k| k.starts_with("check-")).count();
    let mut dirs = Vec::new();
    for _ in 0..200 {
        dirs = std::fs::read_dir(snapdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // Besides the records' dirs, the server keeps up to 4 ready for Prepare, numbered
        // with the ids they will get, each as made (an empty fs/ and work/); half-made ones are
        // swept. (Records' dirs may look the same: actives the load never wrote to.)
        let ids: Vec<&String> = dirs.iter().filter(|d| d.parse::<i64>().is_ok()).collect();
        let ready = ids.len().saturating_sub(live);
        let look_ready = ids
            .iter()
            .filter(|id| strata_snapshotter::store::is_ready_dir(&snapdir.join(id)))
            .count();
        if ids.len() == dirs.len() && ids.len() >= live && ready <= 4 && look_ready >= ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} records but dirs {dirs:?}", live);
}

#[test]
fn kill_nine_at_random_instants_loses_nothing_acknowledged() {
    require_root();
    let t = scratch();
    let root = t.path().join("root");
    let socket = t.path().join("s.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let rounds: usize = std::env::var("STRATA_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..rounds {
        let server = Server::start(&root, &socket);
        let workers: Vec<_> = (0..4)
            .map(|w| rt.spawn(load(socket.clone(), round, w, acked.clone())))
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(10 + seed % 90));
        server.kill();
        for w in workers {
            rt.block_on(w).unwrap();
        }
        let server = Server::start(&root, &socket);
        rt.block_on(check(
            socket.clone(),
            &acked.lock().unwrap(),
            &root.join("snapshots"),
        ));
        drop(server);
    }
    let a = acked.lock().unwrap();
    assert!(
        a.commits.len() > rounds,
        "the load did too little to test anything: {} commits",
        a.commits.len()
    );
}
