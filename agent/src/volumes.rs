//! The pdisk calls agentd makes, behind [`VolumeClient`], so that the guest
//! service's logic around them (export before launch, unexport on every way
//! out, image bases and clones) is unit-tested with an in-memory pdisk.
//!
//! The trait speaks pdisk's own wire messages and answers with pdisk's own
//! `tonic::Status`: callers tell "already gone" (NotFound) and "someone else
//! made it" (AlreadyExists) apart, and name their step when they turn a
//! status into our error ([`status_error`]). [`PdiskVolumes`] is the real
//! client over gRPC.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;
use tonic::Status;

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
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.export_volume(req).await?.into_inner()) })
    }

    fn unexport_volume(
        &self,
        req: pdpb::UnexportVolumeRequest,
    ) -> BoxFuture<'_, Result<(), Status>> {
        let mut c = self.client.clone();
        Box::pin(async move { c.unexport_volume(req).await.map(|_| ()) })
    }

    fn clone_volume(
        &self,
        req: pdpb::CloneVolumeRequest,
    ) -> BoxFuture<'_, Result<pdpb::Volume, Status>> {
        let mut c = self.client.clone();
        Box::pin(async move { Ok(c.clone_volume(req).await?.into_inner()) })
    }

    fn delete_volume(&self, volume: String) -> BoxFuture<'_, Result<(), Status>> {
        let mut c = self.client.clone();
        Box::pin(async move {
            c.delete_volume(pdpb::DeleteVolumeRequest {
                now: false,
                volume,
                project: String::new(),
            })
            .await
            .map(|_| ())
        })
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
        let mut c = self.client.clone();
        Box::pin(async move {
            c.delete_snapshot(pdpb::DeleteSnapshotRequest {
                snapshot,
                project: String::new(),
            })
            .await
            .map(|_| ())
        })
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

/// A status pdisk answered to the step `what`, as our error (the map is
/// stratus-core's [`Error::from_status`]).
pub(crate) fn status_error(s: Status, what: &str) -> Error {
    Error::from_status(s, "pdisk", what)
}
