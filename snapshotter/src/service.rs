//! containerd's `containerd.services.snapshots.v1.Snapshots` gRPC service over a
//! [`Snapshotter`], and [`serve`] on a unix socket.
//!
//! Requests run the synchronous snapshotter on tokio's blocking pool, so slow filesystem work
//! never stalls the reactor and unrelated requests proceed in parallel. Stat and Mounts, a few
//! tens of microseconds of metadata reads, are answered inline when the store's lock is free
//! and go to the pool only when a write holds it.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::containerd::services::snapshots::v1 as pb;
use crate::api::containerd::types::Mount as PbMount;
use crate::meta::Kind;
use crate::store::{Info, Snapshotter};
use crate::{Error, Result};

use pb::snapshots_server::{Snapshots, SnapshotsServer};

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    snap: Arc<Snapshotter>,
}

impl Service {
    /// A service over `snap`.
    pub fn new(snap: Arc<Snapshotter>) -> Self {
        Service { snap }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let snap = self.snap.clone();
        tokio::task::spawn_blocking(move || f(&snap))
            .await
            .map_err(|e| Status::internal(format!("worker failed: {e}")))?
            .map_err(|e| {
                tracing::debug!(%e, "request failed");
                Status::from(e)
            })
    }
}

fn mounts(ms: Vec<strata_overlay::Mount>) -> Vec<PbMount> {
    ms.into_iter()
        .map(|m| PbMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn kind(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn info(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: kind(i.kind) as i32,
        created_at: Some(ts(i.created)),
        updated_at: Some(ts(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let ms = self
            .run(move |s| s.prepare(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn view(
        &self,
        r: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let ms = self
            .run(move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn mounts(
        &self,
        r: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = r.into_inner();
        let ms = match self.snap.try_mounts(&r.key) {
            Some(done) => done.map_err(Status::from)?,
            None => self.run(move |s| s.mounts(&r.key)).await?,
        };
        Ok(Response::new(pb::MountsResponse { mounts: mounts(ms) }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run(move |s| s.commit(&r.name, &r.key, labels(r.labels), Some(r.parent.as_str())))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = match self.snap.try_stat(&r.key) {
            Some(done) => done.map_err(Status::from)?,
            None => self.run(move |s| s.stat(&r.key)).await?,
        };
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let want = Info {
            name: i.name,
            parent: i.parent,
            kind: Kind::Active,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels(i.labels),
        };
        let got = self.run(move |s| s.update(&want, &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(got)),
        }))
    }

    type ListStream =
        Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send + 'static>>;

    async fn list(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = r.into_inner();
        let all = self.run(move |s| s.list(&r.filters)).await?;
        // Batches of 100, as containerd's service sends.
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| {
                Ok(pb::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        r: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = r.into_inner();
        let u = self.run(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serves `snap` on unix socket `socket` (mode 0660) until `shutdown` resolves, then lets
/// in-flight requests finish and removes the socket.
pub async fn serve(
    snap: Arc<Snapshotter>,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create socket dir", dir, e))?;
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => {
            return Err(Error::AlreadyExists(format!(
                "{}: a server is already listening there",
                socket.display()
            )));
        }
        Err(_) => {
            let _ = std::fs::remove_file(socket);
        }
    }
    // Bound and listening under a temporary name, then renamed into place: the path appears
    // only once it takes connections. Between bind and listen a connect is refused, and a
    // client that waits for the path to appear (a supervisor, a test) may come in that gap.
    let mut name = std::ffi::OsString::from(".");
    name.push(socket.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = socket.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let listener =
        tokio::net::UnixListener::bind(&tmp).map_err(|e| Error::io("listen", &tmp, e))?;
    let placed =
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o660))
            .map_err(|e| Error::io("chmod", &tmp, e))
            .and_then(|()| {
                std::fs::rename(&tmp, socket).map_err(|e| Error::io("rename", socket, e))
            });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    tracing::info!(socket = %socket.display(), "serving containerd.services.snapshots.v1.Snapshots");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service::new(snap)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(socket);
    result.map_err(|e| Error::io("serve", socket, std::io::Error::other(e.to_string())))
}

/// A client of the snapshots service listening on unix socket `socket` (as containerd dials a
/// proxy plugin).
pub async fn connect(
    socket: &Path,
) -> Result<pb::snapshots_client::SnapshotsClient<tonic::transport::Channel>> {
    Ok(pb::snapshots_client::SnapshotsClient::new(
        connect_channel(socket).await?,
    ))
}

/// A gRPC channel to the unix socket `socket`, for any service served there.
pub async fn connect_channel(socket: &Path) -> Result<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::]:0")
        .map_err(|e| Error::io("connect", socket, std::io::Error::other(e.to_string())))?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| Error::io("connect", socket, std::io::Error::other(with_causes(&e))))
}

/// `e` and the errors under it ("transport error" alone does not say what failed), each
/// message once (a wrapper often repeats the error it wraps).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut last = s.clone();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if m != last {
            s.push_str(": ");
            s.push_str(&m);
            last = m;
        }
        cause = c.source();
    }
    s
}
