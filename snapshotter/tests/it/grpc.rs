//! The gRPC service through a real tonic client on the unix socket.

use std::sync::Arc;

use strata_snapshotter::api::containerd::services::snapshots::v1 as pb;
use strata_snapshotter::{Mode, Snapshotter, connect, serve};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{require_root, scratch};

use pb::snapshots_client::SnapshotsClient;

async fn client(socket: std::path::PathBuf) -> SnapshotsClient<Channel> {
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    connect(&socket).await.unwrap()
}

fn prepare(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
    pb::PrepareSnapshotRequest {
        snapshotter: "strata".into(),
        key: key.into(),
        parent: parent.into(),
        labels: Default::default(),
    }
}

fn commit(name: &str, key: &str) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        snapshotter: "strata".into(),
        name: name.into(),
        key: key.into(),
        labels: Default::default(),
        parent: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_error_codes_and_streaming_list() {
    require_root();
    let t = scratch();
    let snap = Arc::new(Snapshotter::open(&t.path().join("root"), Mode::Overlay).unwrap());
    let socket = t.path().join("snap.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let socket = socket.clone();
        async move {
            serve(snap, &socket, async {
                stopped.await.ok();
            })
            .await
        }
    });
    let mut c = client(socket.clone()).await;
    let mode = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o660, "socket mode");

    c.prepare(prepare("base-a", "")).await.unwrap();
    c.commit(commit("base", "base-a")).await.unwrap();
    // Eight clients at once, each with its own keys: prepare, stat, mounts, commit, remove.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = client(socket.clone()).await;
        tasks.push(tokio::spawn(async move {
            for j in 0..25 {
                let key = format!("c{i}-{j}");
                let m = c.prepare(prepare(&key, "base")).await.unwrap().into_inner();
                assert_eq!(m.mounts[0].r#type, "overlay");
                let st = c
                    .stat(pb::StatSnapshotRequest {
                        snapshotter: "strata".into(),
                        key: key.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(st.info.unwrap().kind, pb::Kind::Active as i32);
                c.mounts(pb::MountsRequest {
                    snapshotter: "strata".into(),
                    key: key.clone(),
                })
                .await
                .unwrap();
                if j % 2 == 0 {
                    c.commit(commit(&format!("{key}-done"), &key))
                        .await
                        .unwrap();
                    c.remove(pb::RemoveSnapshotRequest {
                        snapshotter: "strata".into(),
                        key: format!("{key}-done"),
                    })
                    .await
                    .unwrap();
                } else {
                    c.remove(pb::RemoveSnapshotRequest {
                        snapshotter: "strata".into(),
                        key,
                    })
                    .await
                    .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let code = |r: Result<tonic::Response<_>, tonic::Status>| {
        r.map(|_: tonic::Response<pb::PrepareSnapshotResponse>| ())
            .unwrap_err()
            .code()
    };
    assert_eq!(
        code(c.prepare(prepare("x", "missing")).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prepare("base", "")).await),
        Code::AlreadyExists
    );
    c.prepare(prepare("child", "base")).await.unwrap();
    let e = c
        .remove(pb::RemoveSnapshotRequest {
            snapshotter: "strata".into(),
            key: "base".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "strata".into(),
            filters: vec!["kind==".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "strata".into(),
            info: Some(pb::Info {
                name: "child".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let u = c
        .usage(pb::UsageRequest {
            snapshotter: "strata".into(),
            key: "base".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(u.inodes >= 1);
    c.cleanup(pb::CleanupRequest {
        snapshotter: "strata".into(),
    })
    .await
    .unwrap();

    // 250 snapshots come back in several streamed batches, all of them.
    for i in 0..250 {
        c.prepare(prepare(&format!("many-{i:03}"), "base"))
            .await
            .unwrap();
    }
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "strata".into(),
            filters: vec!["parent==base".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let (mut batches, mut names) = (0, Vec::new());
    while let Some(batch) = stream.message().await.unwrap() {
        batches += 1;
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    assert_eq!(names.len(), 251, "250 + child");
    assert!(batches >= 3);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");
}
