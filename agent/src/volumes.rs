//! The pdisk calls agentd makes, behind [`VolumeClient`], so that the guest
//! service's logic around them (export before launch, unexport on every way
//! out, image bases and clones) is unit-tested with an in-memory pdisk.
//!
//! The trait speaks pdisk's own wire messages and answers with pdisk's own
//! `tonic::Status`: callers tell "already gone" (NotFound) and "someone else
//! made it" (AlreadyExists) apart, and name their step when they turn a
//! status into our error ([`PdiskServer::error`], which names the server).
//! [`PdiskVolumes`] is the real client over gRPC.
//!
//! An agent talks to any number of named pdisk servers ([`PdiskServers`]);
//! every call goes to the server of the disk it is for, so a storage host
//! that is down fails only its own guests' operations. Each server keeps
//! the last failure seen on it, for GetHost.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::spec::ServerName;
use stratus_core::error::{Error, Result};

/// One pdisk server, as the guest service uses it.
pub trait VolumeClient: Send + Sync {
    /// The volume `volume` names in `project` ("" = any project).
    fn get_volume(
        &self,
        volume: String,
        project: String,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>>;

    fn list_volumes(
        &self,
        req: pdpb::ListVolumesRequest,
    ) -> BoxFuture<'_, Result<Vec<pdpb::Volume>, Status>>;

    fn export_volume(
        &self,
        req: pdpb::ExportVolumeRequest,
    ) -> BoxFuture<'_, Result<pdpb::Export, Status>>;

    fn unexport_volume(
        &self,
        req: pdpb::UnexportVolumeRequest,
    ) -> BoxFuture<'_, Result<(), Status>>;

    fn clone_volume(
        &self,
        req: pdpb::CloneVolumeRequest,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>>;

    fn delete_volume(&self, volume: String) -> BoxFuture<'_, Result<(), Status>>;

    /// Grows volume `volume` (its UUID) of `project` to `size` bytes.
    fn resize_volume(
        &self,
        volume: String,
        size: u64,
        project: String,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>>;

    /// Imports the image file at `path` (streamed) as a new volume.
    fn upload_volume(
        &self,
        header: pdpb::UploadHeader,
        path: PathBuf,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>>;

    fn create_snapshot(
        &self,
        req: pdpb::CreateSnapshotRequest,
    ) -> BoxFuture<'_, Result<pdpb::Snapshot, Status>>;

    fn delete_snapshot(&self, snapshot: String) -> BoxFuture<'_, Result<(), Status>>;

    fn checksum_volume(
        &self,
        req: pdpb::ChecksumVolumeRequest,
    ) -> BoxFuture<'_, Result<String, Status>>;

    /// Progress of the long operation started with `request_id`; an empty
    /// stream when pdisk cannot tell.
    fn watch_progress(
        &self,
        request_id: String,
    ) -> BoxFuture<'_, BoxStream<'static, pdpb::Progress>>;
}

/// The real pdisk: a lazily connected tonic client.
#[derive(Clone)]
pub struct PdiskVolumes {
    client: VolumeServiceClient<Channel>,
}

impl PdiskVolumes {
    /// A client of pdiskd at `url` (mTLS with `tls` for https://); it
    /// connects on first use.
    pub fn connect_lazy(url: &str, tls: Option<&stratus_pki::TlsFiles>) -> Result<PdiskVolumes> {
        let dialer = stratus_pki::Dialer::from_address(url, tls)
            .map_err(|e| Error::invalid(format!("pdisk address {url}: {e:#}")))?
            .with_request_timeout(Duration::from_secs(600));
        Ok(PdiskVolumes {
            client: VolumeServiceClient::new(dialer.connect_lazy()),
        })
    }
}

impl VolumeClient for PdiskVolumes {
    fn resize_volume(
        &self,
        volume: String,
        size: u64,
        project: String,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>> {
        let req = pdpb::ResizeVolumeRequest {
            volume,
            size_bytes: size,
            project,
            request_id: new_request_id("resize"),
        };
        let c = self.client.clone();
        Box::pin(once(move || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { Ok(c.resize_volume(req).await?.into_inner()) }
        }))
    }

    fn get_volume(
        &self,
        volume: String,
        project: String,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>> {
        let mut c = self.client.clone();
        Box::pin(async move {
            Ok(c.get_volume(pdpb::GetVolumeRequest { volume, project })
                .await?
                .into_inner())
        })
    }

    fn list_volumes(
        &self,
        req: pdpb::ListVolumesRequest,
    ) -> BoxFuture<'_, Result<Vec<pdpb::Volume>, Status>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.list_volumes(req).await?.into_inner().volumes) })
    }

    fn export_volume(
        &self,
        req: pdpb::ExportVolumeRequest,
    ) -> BoxFuture<'_, Result<pdpb::Export, Status>> {
        let req = pdpb::ExportVolumeRequest {
            request_id: with_id(req.request_id, "export"),
            ..req
        };
        let c = self.client.clone();
        Box::pin(once(move || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { Ok(c.export_volume(req).await?.into_inner()) }
        }))
    }

    fn unexport_volume(
        &self,
        req: pdpb::UnexportVolumeRequest,
    ) -> BoxFuture<'_, Result<(), Status>> {
        let req = pdpb::UnexportVolumeRequest {
            request_id: with_id(req.request_id, "unexport"),
            ..req
        };
        let c = self.client.clone();
        Box::pin(once(move || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.unexport_volume(req).await.map(|_| ()) }
        }))
    }

    fn clone_volume(
        &self,
        req: pdpb::CloneVolumeRequest,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.clone_volume(req).await?.into_inner()) })
    }

    fn delete_volume(&self, volume: String) -> BoxFuture<'_, Result<(), Status>> {
        let req = pdpb::DeleteVolumeRequest {
            now: false,
            volume,
            project: String::new(),
            request_id: new_request_id("delete"),
        };
        let c = self.client.clone();
        Box::pin(once(move || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.delete_volume(req).await.map(|_| ()) }
        }))
    }

    fn upload_volume(
        &self,
        header: pdpb::UploadHeader,
        path: PathBuf,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>> {
        let mut c = self.client.clone();
        let stream = async_stream::stream! {
            use tokio::io::AsyncReadExt;
            yield pdpb::UploadVolumeRequest {
                part: Some(pdpb::upload_volume_request::Part::Header(header)),
            };
            let Ok(mut f) = tokio::fs::File::open(&path).await else {
                return;
            };
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                yield pdpb::UploadVolumeRequest {
                    part: Some(pdpb::upload_volume_request::Part::Data(buf[..n].to_vec())),
                };
            }
        };
        Box::pin(async move { Ok(c.upload_volume(stream).await?.into_inner()) })
    }

    fn create_snapshot(
        &self,
        req: pdpb::CreateSnapshotRequest,
    ) -> BoxFuture<'_, Result<pdpb::Snapshot, Status>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.create_snapshot(req).await?.into_inner()) })
    }

    fn delete_snapshot(&self, snapshot: String) -> BoxFuture<'_, Result<(), Status>> {
        let req = pdpb::DeleteSnapshotRequest {
            snapshot,
            project: String::new(),
            request_id: new_request_id("delete-snapshot"),
        };
        let c = self.client.clone();
        Box::pin(once(move || {
            let (mut c, req) = (c.clone(), req.clone());
            async move { c.delete_snapshot(req).await.map(|_| ()) }
        }))
    }

    fn checksum_volume(
        &self,
        req: pdpb::ChecksumVolumeRequest,
    ) -> BoxFuture<'_, Result<String, Status>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.checksum_volume(req).await?.into_inner().sha256) })
    }

    fn watch_progress(
        &self,
        request_id: String,
    ) -> BoxFuture<'_, BoxStream<'static, pdpb::Progress>> {
        let mut c = self.client.clone();
        Box::pin(async move {
            let Ok(s) = c
                .watch_progress(pdpb::WatchProgressRequest {
                    request_id,
                    // As the checksum it follows (agentd's calls naming no
                    // project): request ids are per project.
                    project: String::new(),
                })
                .await
            else {
                return Box::pin(futures::stream::empty()) as BoxStream<'static, pdpb::Progress>;
            };
            let mut s = s.into_inner();
            Box::pin(async_stream::stream! {
                while let Ok(Some(p)) = s.message().await {
                    yield p;
                }
            })
        })
    }
}

/// One named pdisk server: its client (what it derefs to) and what the
/// last calls said about it.
pub struct PdiskServer {
    name: ServerName,
    url: String,
    client: Arc<dyn VolumeClient>,
    last_error: Mutex<Option<(SystemTime, String)>>,
}

/// A server's state as GetHost and ListImages report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    pub name: ServerName,
    pub url: String,
    pub reachable: bool,
    /// The last failure to reach it (empty: none since agentd started),
    /// and when (RFC 3339).
    pub last_error: String,
    pub last_error_at: String,
}

impl std::ops::Deref for PdiskServer {
    type Target = dyn VolumeClient;
    fn deref(&self) -> &Self::Target {
        self.client.as_ref()
    }
}

impl PdiskServer {
    pub fn name(&self) -> &ServerName {
        &self.name
    }

    /// A status this server answered to the step `what`, as our error (the
    /// map is stratus-core's [`Error::from_status`]); an Unavailable one
    /// names the server and is remembered as its last error.
    pub fn error(&self, s: Status, what: &str) -> Error {
        let peer = format!("pdisk server {}", self.name);
        if unreachable(&s) {
            self.note_failure(&format!("{}: {}", what, s.message()));
        }
        Error::from_status(s, &peer, what)
    }

    fn note_failure(&self, why: &str) {
        *self.last_error.lock().unwrap() = Some((SystemTime::now(), why.to_owned()));
    }

    /// Asks the server something cheap (image bases with a checksum no
    /// image has), within `limit`: its state now.
    pub async fn probe(&self, limit: Duration) -> ServerState {
        let ask = self.client.list_volumes(pdpb::ListVolumesRequest {
            label_selector: std::collections::HashMap::from([(
                stratus_core::types::LABEL_IMAGE_SHA256.to_string(),
                "probe".to_string(),
            )]),
            ..Default::default()
        });
        let reachable = match tokio::time::timeout(limit, ask).await {
            Ok(Ok(_)) => true,
            Ok(Err(s)) if unreachable(&s) => {
                self.note_failure(&format!("probe: {}", s.message()));
                false
            }
            // It answered, if only with a refusal.
            Ok(Err(_)) => true,
            Err(_) => {
                self.note_failure(&format!("probe: no answer within {limit:?}"));
                false
            }
        };
        let (last_error_at, last_error) = match self.last_error.lock().unwrap().clone() {
            Some((at, why)) => (humantime::format_rfc3339_seconds(at).to_string(), why),
            None => (String::new(), String::new()),
        };
        ServerState {
            name: self.name.clone(),
            url: self.url.clone(),
            reachable,
            last_error,
            last_error_at,
        }
    }
}

/// A request id of its own for one operation of agentd's on pdisk.
fn new_request_id(kind: &str) -> String {
    format!("agentd-{kind}-{}", uuid::Uuid::new_v4().simple())
}

/// `id`, or a new one when the caller set none.
fn with_id(id: String, kind: &str) -> String {
    if id.is_empty() {
        new_request_id(kind)
    } else {
        id
    }
}

/// The pauses before the retries of a call whose answer was lost.
const LOST_ANSWER_RETRIES: [Duration; 2] = [Duration::from_millis(300), Duration::from_secs(1)];

/// Runs `call`, one operation on pdisk with its request id set, and again
/// (the same request, the same id) when its answer was lost on the way
/// (the connection dropped: Unavailable, Cancelled, Unknown), so pdisk
/// answers a retry of what it did with its first answer instead of doing
/// it twice, or, when the first attempt never arrived, does it now. A
/// refusal pdisk answered is returned as it is.
pub(crate) async fn once<T, F, Fut>(call: F) -> Result<T, Status>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut retries = LOST_ANSWER_RETRIES.iter();
    loop {
        match call().await {
            Err(s) if answer_lost(&s) => match retries.next() {
                Some(pause) => {
                    tracing::debug!(code = ?s.code(), error = %s.message(),
                        "pdisk call's answer lost; retrying with the same request id");
                    tokio::time::sleep(*pause).await;
                }
                None => return Err(s),
            },
            answered => return answered,
        }
    }
}

/// Whether a call's answer was lost on the way (the call may have
/// happened). Not DeadlineExceeded: the call waited its full time.
fn answer_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}

/// The answers that say the server could not be reached (or did not
/// answer in time), as opposed to a refusal it answered with.
fn unreachable(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// The pdisk servers an agent talks to, by name.
#[derive(Default)]
pub struct PdiskServers(BTreeMap<ServerName, PdiskServer>);

impl PdiskServers {
    /// `clients` by name, each with its address (for GetHost; "" when not
    /// known, as with the unit tests' in-memory servers).
    pub fn new(
        clients: BTreeMap<ServerName, Arc<dyn VolumeClient>>,
        url_of: impl Fn(&ServerName) -> String,
    ) -> PdiskServers {
        PdiskServers(
            clients
                .into_iter()
                .map(|(name, client)| {
                    let server = PdiskServer {
                        url: url_of(&name),
                        name: name.clone(),
                        client,
                        last_error: Mutex::new(None),
                    };
                    (name, server)
                })
                .collect(),
        )
    }

    /// The server named `name`: FailedPrecondition when the agent has no
    /// pdisk server at all, InvalidArgument for a name it does not know.
    pub fn get(&self, name: &ServerName) -> Result<&PdiskServer> {
        if self.0.is_empty() {
            return Err(Error::precondition(
                "this agent has no pdisk server configured (--pdisk URL or --pdisk NAME=URL)",
            ));
        }
        self.0.get(name).ok_or_else(|| {
            Error::invalid(format!(
                "no pdisk server named {name} on this host (it has {})",
                self.names().join(", ")
            ))
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.0.keys().map(|n| n.to_string()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &PdiskServer> {
        self.0.values()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A pdisk call whose first answer is lost is sent again with the same
    /// request id; a refusal is not retried; ids are new per operation.
    #[tokio::test]
    async fn a_lost_answer_is_retried_with_the_same_request_id() {
        let sent = Mutex::new(Vec::new());
        let req = pdpb::DeleteVolumeRequest {
            volume: "v".into(),
            request_id: new_request_id("delete"),
            ..Default::default()
        };
        let answer = once(|| {
            sent.lock().unwrap().push(req.request_id.clone());
            let n = sent.lock().unwrap().len();
            async move {
                match n {
                    1 => Err(Status::unavailable("connection reset")),
                    _ => Ok(n),
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), 2);
        let sent = sent.into_inner().unwrap();
        assert_eq!(sent, vec![req.request_id.clone(), req.request_id.clone()]);
        assert!(sent[0].starts_with("agentd-delete-"), "{sent:?}");
        assert_ne!(new_request_id("delete"), req.request_id);

        // Refusals are answers: one call.
        let calls = Mutex::new(0);
        let refused: Result<(), Status> = once(|| {
            *calls.lock().unwrap() += 1;
            async { Err(Status::not_found("no volume v")) }
        })
        .await;
        assert_eq!(refused.unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(*calls.lock().unwrap(), 1);

        // A server that stays away: tried three times, then Unavailable.
        let calls = Mutex::new(0);
        let away: Result<(), Status> = once(|| {
            *calls.lock().unwrap() += 1;
            async { Err(Status::unavailable("connection refused")) }
        })
        .await;
        assert_eq!(away.unwrap_err().code(), tonic::Code::Unavailable);
        assert_eq!(*calls.lock().unwrap(), 3);
        // A caller's own id is kept.
        assert_eq!(with_id("mine".into(), "export"), "mine");
        assert!(with_id(String::new(), "export").starts_with("agentd-export-"));
    }
}
