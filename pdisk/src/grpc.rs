//! The gRPC face of the pool service: converts `pdisk.v1` messages to and
//! from the domain, and nothing else. Errors become statuses through
//! `From<Error> for tonic::Status` only.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::backend::{copy, ImageFormat};
use crate::error::Error;
use crate::events::{event_pb, PoolEventFilter};
use crate::service::{Deleted, ExportBy, NewVolume, NewVolumeSource, PoolService};
use crate::store::{NameScope, QuotaLimits, QuotaUsage};
use crate::tenancy::Call;
use crate::types::{ByteSize, Chap, Iqn, VolumeName};
use stratus_core::quota;
use stratus_core::requests::{Attempt, RequestLog};
use stratus_pki::{Identity, Role};

mod convert;
mod requests;
use convert::{export_pb, pool_pb, quota_pb, snapshot_pb, volume_pb};
use requests::{caller_key, gone_since};

pub struct Api {
    svc: Arc<PoolService>,
    /// Outcomes of recent creates, clones, imports, snapshots, deletes,
    /// exports, unexports and resizes by `request_id`, for retries
    /// (`grpc/requests.rs`); kept in the metadata store too, so a retry
    /// after a restart gets the first answer.
    requests: RequestLog,
}

impl Api {
    pub fn new(svc: Arc<PoolService>) -> Self {
        let requests = RequestLog::default().with_durable(svc.shared_store());
        Api { svc, requests }
    }
}

/// CHAP credentials as a request carries them, validated; with `target`,
/// mutual.
fn chap_from_pb(c: pb::ChapCredentials) -> Result<Chap, Error> {
    let chap = Chap::new(&c.user, &c.secret)?;
    match c.target {
        Some(t) => chap.with_mutual(Chap::new(&t.user, &t.secret)?),
        None => Ok(chap),
    }
}

/// Initiator IQNs as a request carries them, parsed.
fn iqns(initiators: &[String]) -> Result<Vec<Iqn>, Error> {
    initiators.iter().map(|i| i.parse()).collect()
}

/// The initiator IQN an agent's certificate is bound to (SAN URI
/// `stratus://iqn/IQN`, `stratus-pki issue --iqn`).
fn own_iqn(identity: &Identity) -> Result<Iqn, Status> {
    identity
        .iqn
        .as_deref()
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| {
            Status::permission_denied(format!(
                "{identity}: an agent certificate without an initiator IQN \
                 (stratus-pki issue --iqn) may not export or unexport"
            ))
        })
}

/// Export fencing: an `agent` caller names only its own host's initiator,
/// so a compromised or buggy host can neither give a volume to another
/// host nor take another host's access away.
fn fence_to_own_iqn(identity: &Identity, initiators: &[Iqn]) -> Result<(), Status> {
    if identity.role != Role::Agent {
        return Ok(());
    }
    let own = own_iqn(identity)?;
    match initiators.iter().find(|i| **i != own) {
        Some(other) => Err(Status::permission_denied(format!(
            "{identity} may export only to its own initiator {own}, not {other}"
        ))),
        None => Ok(()),
    }
}

/// An agent grows the disks of its own guests (agentd's ResizeDisk): a
/// volume exported to the initiator its certificate binds, and no other
/// (PermissionDenied). Shrinking is refused for every caller, and the
/// project's byte quota holds for agents as for everyone (the service
/// checks both).
fn agent_may_resize(
    identity: &Identity,
    svc: &PoolService,
    v: &crate::store::VolumeRecord,
) -> crate::error::Result<()> {
    let own = own_iqn(identity).map_err(|s| Error::denied(s.message()))?;
    let exported_here = svc
        .store()
        .export(v.uuid)?
        .is_some_and(|e| !e.unexporting && e.initiators.contains(&own));
    if exported_here {
        Ok(())
    } else {
        Err(Error::denied(format!(
            "{identity} may resize only a volume exported to its own initiator {own}; \
             volume {} is not",
            v.name
        )))
    }
}

fn image_format(f: i32) -> Result<Option<ImageFormat>, Status> {
    match pb::ImageFormat::try_from(f) {
        Ok(pb::ImageFormat::Unspecified) => Ok(None),
        Ok(pb::ImageFormat::Raw) => Ok(Some(ImageFormat::Raw)),
        Ok(pb::ImageFormat::Qcow2) => Ok(Some(ImageFormat::Qcow2)),
        Err(_) => Err(Error::invalid(format!("unknown image format {f}")).into()),
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// Removes a staged upload however the request ends.
struct StagedUpload(std::path::PathBuf);

impl Drop for StagedUpload {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a mutating operation as a task owned by pdiskd, not by the request:
/// tonic drops a handler's future when its client disconnects or its
/// deadline passes, which would stop the operation between two steps (a
/// volume left `creating` until the next start). The spawned task runs to
/// its end whatever the caller does; its outcome stays visible through
/// Get/List.
async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    Ok(stratus_core::requests::detached(op).await?)
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::Progress, Status>> + Send>>;
type PoolEventStream = Pin<Box<dyn Stream<Item = Result<pb::PoolEvent, Status>> + Send>>;

#[tonic::async_trait]
impl VolumeService for Api {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let request_id = r.request_id.clone();
        let asked = pb::CreateVolumeRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let labels = labels(r.labels);
        call.check_labels(&labels)?;
        call.note(format!("volume {}", r.name));
        let source = match r.source {
            None => NewVolumeSource::Empty,
            Some(pb::create_volume_request::Source::FromVolume(v)) => {
                NewVolumeSource::Volume(call.source_volume(&self.svc, &v)?.uuid.to_string())
            }
            Some(pb::create_volume_request::Source::FromSnapshot(s)) => {
                NewVolumeSource::Snapshot(call.snapshot(&self.svc, &s)?.uuid.to_string())
            }
            Some(pb::create_volume_request::Source::FromImage(i)) => NewVolumeSource::ImageFile {
                path: i.path.into(),
                format: image_format(i.format)?,
            },
        };
        let new = NewVolume {
            allow_multi_attach: r.allow_multi_attach,
            name: r.name.parse()?,
            size: r.size_bytes,
            labels,
            source,
            request_id: call.progress_key(&r.request_id)?,
            owner: call.owner(),
        };
        let svc = self.svc.clone();
        let v = self
            .once(&call, "CreateVolume", &request_id, &asked, async move {
                svc.create_volume(new).await.map(volume_pb)
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn upload_volume(
        &self,
        req: Request<Streaming<pb::UploadVolumeRequest>>,
    ) -> Result<Response<pb::Volume>, Status> {
        use pb::upload_volume_request::Part;
        let caller = stratus_pki::gate::caller(&req)?.clone();
        let note = stratus_pki::audit::note(&req);
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadVolumeRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => return Err(Error::invalid("upload: the first message must be the header").into()),
        };
        // Check what can be checked before accepting any data.
        let call = Call::new(&caller, &header.project)?;
        if let Some(n) = note {
            n.set_project(call.scope.project());
            n.set_object(format!("volume {}", header.name));
        }
        let request_id = header.request_id.clone();
        let asked = pb::UploadHeader {
            request_id: String::new(),
            ..header.clone()
        };
        let name: VolumeName = header.name.parse()?;
        crate::types::validate_labels(header.labels.iter())?;
        let header_labels = labels(header.labels);
        call.check_labels(&header_labels)?;
        let format = image_format(header.format)?;
        // A retry of a finished upload is answered below, not refused here.
        let retry = self.requests.knows(&caller_key(&call), &request_id);
        if !retry
            && self
                .svc
                .store()
                .volume_name_taken(call.scope.project(), &name)?
        {
            return Err(Error::exists(format!("volume {name} already exists")).into());
        }
        // The provisioned-bytes quota holds for the stream too: what the
        // header declares must fit now, and the data may never pass the
        // project's room (the volume is at least as large as its raw data),
        // so a tenant cannot fill the pool's staging area past its quota
        // before the import's own check.
        let project = call.scope.project().to_owned();
        let store = self.svc.store();
        let declared = header.size_bytes.max(header.content_length);
        store
            .check_quota_now(
                &project,
                QuotaUsage {
                    volumes: 1,
                    snapshots: 0,
                    bytes: declared,
                },
            )
            .map_err(|e| e.context(format!("upload of {name}")))?;
        let room = store.bytes_room(&project)?;
        let staged = StagedUpload(
            self.svc
                .backend()
                .staging_dir()
                .join(format!("{}.upload", Uuid::new_v4())),
        );
        let file =
            std::fs::File::create_new(&staged.0).map_err(|e| Error::io(staged.0.display(), e))?;
        let mut offset = 0u64;
        let total = header.content_length;
        while let Some(msg) = stream.message().await? {
            let Some(Part::Data(data)) = msg.part else {
                return Err(Error::invalid("upload: only data may follow the header").into());
            };
            if total > 0 && offset + data.len() as u64 > total {
                return Err(Error::invalid(format!(
                    "upload of {name}: more data than the announced {total} bytes"
                ))
                .into());
            }
            let end = offset + data.len() as u64;
            if let Some((room, used, limit)) = room.filter(|(room, ..)| end > *room) {
                return Err(Error::exhausted(format!(
                    "upload of {name}: project {project}: byte quota exceeded: \
                     more than {} streamed, {} of {} provisioned",
                    ByteSize(room),
                    ByteSize(used),
                    ByteSize(limit)
                ))
                .into());
            }
            let at = offset;
            tokio::task::block_in_place(|| copy::write_nonzero_runs(&file, &data, at))
                .map_err(|e| Error::io(format!("upload of {name}"), e))?;
            offset += data.len() as u64;
        }
        if total > 0 && offset != total {
            return Err(Error::invalid(format!(
                "upload of {name}: received {offset} of the announced {total} bytes"
            ))
            .into());
        }
        if offset == 0 {
            return Err(Error::invalid(format!("upload of {name}: no data")).into());
        }
        file.set_len(offset)
            .map_err(|e| Error::io(staged.0.display(), e))?;
        drop(file);
        let new = NewVolume {
            allow_multi_attach: false,
            name,
            size: header.size_bytes,
            labels: header_labels,
            source: NewVolumeSource::Upload {
                path: staged.0.clone(),
                format,
            },
            request_id: call.progress_key(&header.request_id)?,
            owner: call.owner(),
        };
        // Once all data is in, the import is pdiskd's; the staged file goes
        // with the task.
        let svc = self.svc.clone();
        let v = self
            .once(&call, "UploadVolume", &request_id, &asked, async move {
                let _staged = staged;
                svc.create_volume(new).await.map(volume_pb)
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let v = call.volume(&self.svc, &r.volume)?;
        Ok(Response::new(volume_pb(
            self.svc.get_volume(&v.uuid.to_string()).await?,
        )))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let sel = labels(r.label_selector);
        let listed = if r.quarantined {
            self.svc.list_quarantined().await?
        } else {
            self.svc.list_volumes(&sel).await?
        };
        let volumes = listed
            .into_iter()
            .filter(|v| {
                sel.iter()
                    .all(|(k, val)| v.record.labels.get(k) == Some(val))
            })
            .filter(|v| call.sees_volume(&v.record))
            .map(volume_pb)
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        // Skipping quarantine destroys what a tenant might still want back:
        // the storage admin's call, whoever else may delete.
        if r.now && call.identity.role != Role::Admin {
            return Err(Status::permission_denied(format!(
                "{}: only admins may delete without quarantine (now)",
                call.identity
            )));
        }
        let request_id = r.request_id.clone();
        let asked = pb::DeleteVolumeRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let svc = self.svc.clone();
        let done = self
            .once_resolved(&call, "DeleteVolume", &request_id, &asked, |attempt| {
                let found = match call.volume(&svc, &r.volume) {
                    // An admin's delete --now may name a quarantined volume: purged.
                    Err(e) if r.now && e.kind() == crate::error::ErrorKind::NotFound => {
                        call.quarantined_volume(&svc, &r.volume).map_err(|_| e)
                    }
                    found => found,
                };
                let interrupted = gone_since(&attempt, &found);
                let target = match (&attempt, interrupted) {
                    (Attempt::AfterRestart { target }, true) => target.clone(),
                    _ => found?.uuid.to_string(),
                };
                let (now, uuid) = (r.now, target.clone());
                Ok((target, async move {
                    let done = if interrupted {
                        // The interrupted delete went through: quarantined
                        // (waiting for its purge) or gone.
                        match svc.store().find_quarantined_in(NameScope::All, &uuid) {
                            Ok(v) => Deleted::Quarantined {
                                purge_at: v.quarantine.map(|q| q.purge_at()).unwrap_or_default(),
                            },
                            Err(_) => Deleted::Gone,
                        }
                    } else {
                        svc.delete_volume_as(&uuid, now).await?
                    };
                    Ok(pb::DeleteVolumeResponse {
                        purge_at: match done {
                            Deleted::Gone => String::new(),
                            Deleted::Quarantined { purge_at } => purge_at,
                        },
                    })
                }))
            })
            .await?;
        Ok(Response::new(done))
    }

    async fn restore_volume(
        &self,
        req: Request<pb::RestoreVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let new_name: Option<VolumeName> = if r.new_name.is_empty() {
            None
        } else {
            Some(r.new_name.parse()?)
        };
        let volume = call.quarantined_volume(&self.svc, &r.volume)?;
        let uuid = volume.uuid.to_string();
        let svc = self.svc.clone();
        let v = detached(async move { svc.restore_volume(&uuid, new_name).await }).await?;
        Ok(Response::new(volume_pb(v)))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let request_id = r.request_id.clone();
        let asked = pb::ResizeVolumeRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let svc = self.svc.clone();
        // Growing is idempotent: a retry after a restart runs again.
        let v = self
            .once_resolved(&call, "ResizeVolume", &request_id, &asked, |_| {
                let v = call.volume(&svc, &r.volume)?;
                if call.identity.role == Role::Agent {
                    agent_may_resize(&call.identity, &svc, &v)?;
                }
                let volume = v.uuid.to_string();
                Ok((volume.clone(), async move {
                    svc.resize_volume(&volume, r.size_bytes)
                        .await
                        .map(volume_pb)
                }))
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn flatten_volume(
        &self,
        req: Request<pb::FlattenVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let volume = call.volume(&self.svc, &r.volume)?.uuid.to_string();
        let request_id = call.progress_key(&r.request_id)?;
        let svc = self.svc.clone();
        let v = detached(async move { svc.flatten_volume(&volume, &request_id).await }).await?;
        Ok(Response::new(volume_pb(v)))
    }

    async fn clone_volume(
        &self,
        req: Request<pb::CloneVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let request_id = r.request_id.clone();
        let asked = pb::CloneVolumeRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let name = r.name.parse()?;
        let labels = labels(r.labels);
        call.check_labels(&labels)?;
        let source = if r.source_is_snapshot {
            NewVolumeSource::Snapshot(call.snapshot(&self.svc, &r.source)?.uuid.to_string())
        } else {
            NewVolumeSource::Volume(call.source_volume(&self.svc, &r.source)?.uuid.to_string())
        };
        call.note(format!("volume {name} (clone of {})", r.source));
        let new = NewVolume {
            allow_multi_attach: false,
            name,
            size: r.size_bytes,
            labels,
            source,
            request_id: call.progress_key(&r.request_id)?,
            owner: call.owner(),
        };
        let svc = self.svc.clone();
        let v = self
            .once(&call, "CloneVolume", &request_id, &asked, async move {
                svc.create_volume(new).await.map(volume_pb)
            })
            .await?;
        Ok(Response::new(v))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let name: VolumeName = r.name.parse()?;
        let volume = call.volume(&self.svc, &r.volume)?.uuid.to_string();
        call.note(format!("snapshot {name} of volume {}", r.volume));
        let progress_key = call.progress_key(&r.request_id)?;
        let request_id = r.request_id.clone();
        let asked = pb::CreateSnapshotRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let svc = self.svc.clone();
        let s = self
            .once(&call, "CreateSnapshot", &request_id, &asked, async move {
                svc.create_snapshot(&volume, name, &progress_key)
                    .await
                    .map(snapshot_pb)
            })
            .await?;
        Ok(Response::new(s))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let volume = if r.volume.is_empty() {
            String::new()
        } else {
            call.volume(&self.svc, &r.volume)?.uuid.to_string()
        };
        let mut snapshots = Vec::new();
        for s in self.svc.list_snapshots(&volume).await? {
            if call.sees_project_of(&self.svc, s.record.volume)? {
                snapshots.push(snapshot_pb(s));
            }
        }
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let request_id = r.request_id.clone();
        let asked = pb::DeleteSnapshotRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let svc = self.svc.clone();
        let done = self
            .once_resolved(&call, "DeleteSnapshot", &request_id, &asked, |attempt| {
                let found = call.snapshot(&svc, &r.snapshot);
                if gone_since(&attempt, &found) {
                    // The delete a restart interrupted went through.
                    return Ok((
                        String::new(),
                        futures::future::Either::Left(async { Ok(pb::DeleteSnapshotResponse {}) }),
                    ));
                }
                let snapshot = found?.uuid.to_string();
                Ok((
                    snapshot.clone(),
                    futures::future::Either::Right(async move {
                        svc.delete_snapshot(&snapshot).await?;
                        Ok(pb::DeleteSnapshotResponse {})
                    }),
                ))
            })
            .await?;
        Ok(Response::new(done))
    }

    async fn export_volume(
        &self,
        req: Request<pb::ExportVolumeRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let request_id = r.request_id.clone();
        let asked = pb::ExportVolumeRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let initiators = iqns(&r.initiators)?;
        fence_to_own_iqn(&call.identity, &initiators)?;
        let chap = r.chap.map(chap_from_pb).transpose()?;
        let by = ExportBy {
            caller: format!("{}/{}", call.identity.role, call.identity.name),
            admin: call.identity.role == Role::Admin,
            multi_attach: r.multi_attach,
            migration: r.migration,
            host_id: Some(r.host_id).filter(|h| !h.is_empty()),
        };
        let svc = self.svc.clone();
        // Exporting again the same initiators with the same CHAP is
        // idempotent: a retry after a restart runs again. (The kept
        // fingerprint covers the CHAP secret, as the export's own record
        // in the same store holds it.)
        let e = self
            .once_resolved(&call, "ExportVolume", &request_id, &asked, |_| {
                let volume = call.volume(&svc, &r.volume)?.uuid.to_string();
                Ok((volume.clone(), async move {
                    svc.export_volume(&volume, &initiators, chap, &by)
                        .await
                        .map(export_pb)
                }))
            })
            .await?;
        Ok(Response::new(e))
    }

    async fn unexport_volume(
        &self,
        req: Request<pb::UnexportVolumeRequest>,
    ) -> Result<Response<pb::UnexportVolumeResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let request_id = r.request_id.clone();
        let asked = pb::UnexportVolumeRequest {
            request_id: String::new(),
            ..r.clone()
        };
        let mut initiators = iqns(&r.initiators)?;
        if call.identity.role == Role::Agent && initiators.is_empty() {
            // An agent's "the whole export" is its own host's access only.
            initiators = vec![own_iqn(&call.identity)?];
        }
        fence_to_own_iqn(&call.identity, &initiators)?;
        let svc = self.svc.clone();
        // Removing initiators already removed is idempotent: a retry after
        // a restart runs again.
        let done = self
            .once_resolved(&call, "UnexportVolume", &request_id, &asked, |_| {
                let volume = call.volume(&svc, &r.volume)?.uuid.to_string();
                Ok((volume.clone(), async move {
                    let remaining = svc.unexport_volume(&volume, &initiators).await?;
                    Ok(pb::UnexportVolumeResponse {
                        remaining: remaining.map(export_pb),
                    })
                }))
            })
            .await?;
        Ok(Response::new(done))
    }

    async fn list_exports(
        &self,
        req: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        let (call, _) = Call::split(req, |r| &r.project)?;
        let mut exports = Vec::new();
        for e in self.svc.list_exports()? {
            if call.sees_project_of(&self.svc, e.record.volume)? {
                exports.push(export_pb(e));
            }
        }
        Ok(Response::new(pb::ListExportsResponse { exports }))
    }

    async fn checksum_volume(
        &self,
        req: Request<pb::ChecksumVolumeRequest>,
    ) -> Result<Response<pb::ChecksumVolumeResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let object = if r.is_snapshot {
            call.snapshot(&self.svc, &r.volume)?.uuid
        } else {
            call.volume(&self.svc, &r.volume)?.uuid
        };
        let c = self
            .svc
            .checksum(
                &object.to_string(),
                r.is_snapshot,
                &call.progress_key(&r.request_id)?,
            )
            .await?;
        Ok(Response::new(pb::ChecksumVolumeResponse {
            sha256: c.sha256,
            size_bytes: c.size,
        }))
    }

    async fn get_pool(
        &self,
        _req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Ok(Response::new(pool_pb(self.svc.pool().await?)))
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (project, limits, usage) = quota::set(self.svc.store(), req, |r| {
            let l = r.limits.unwrap_or_default();
            quota::Change {
                project: r.project,
                set: QuotaLimits {
                    volumes: l.volumes,
                    snapshots: l.snapshots,
                    bytes: l.bytes,
                },
                unlimited: r.unlimited,
            }
        })?;
        Ok(Response::new(quota_pb(project, limits, usage)))
    }

    async fn get_quota(
        &self,
        req: Request<pb::GetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (call, _) = Call::split(req, |r| &r.project)?;
        let (project, limits, usage) = quota::get(self.svc.store(), call.scope)?;
        Ok(Response::new(quota_pb(project, limits, usage)))
    }

    async fn list_quotas(
        &self,
        _req: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        let quotas = quota::all(self.svc.store())?
            .into_iter()
            .map(|(p, limits, usage)| quota_pb(p, limits, usage))
            .collect();
        Ok(Response::new(pb::ListQuotasResponse { quotas }))
    }

    /// The records of the caller's project (admins naming none: every
    /// project's, and those of volumes of no project).
    async fn list_storage_usage(
        &self,
        req: Request<pb::ListStorageUsageRequest>,
    ) -> Result<Response<pb::ListStorageUsageResponse>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        if r.until != 0 && r.until < r.since {
            return Err(Error::invalid(format!(
                "until ({}) is before since ({})",
                r.until, r.since
            ))
            .into());
        }
        let until = (r.until != 0).then_some(r.until);
        let records = self
            .svc
            .storage_usage(r.since, until, |p| call.scope.sees(p))
            .await?;
        Ok(Response::new(pb::ListStorageUsageResponse {
            records: records.iter().map(pb::StorageUsageRecord::from).collect(),
        }))
    }

    type WatchProgressStream = ProgressStream;
    type WatchEventsStream = PoolEventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let (call, r) = Call::split(req, |r| &r.project)?;
        let mut filter = PoolEventFilter::default();
        if !r.volume.is_empty() {
            filter.volume = Some(match self.svc.store().find_volume(&r.volume) {
                Ok(v) if call.sees_volume(&v) => v.uuid.to_string(),
                Ok(_) => {
                    return Err(Error::not_found(format!("volume {} not found", r.volume)).into())
                }
                // A deleted volume's events stay in the journal under its
                // name and UUID (each carries its project, checked below).
                Err(_) => r.volume.clone(),
            });
        }
        // A call acting in one project sees only its volumes' events (not
        // the pool's own, which belong to no project).
        if let stratus_pki::tenancy::Scope::Project(p) = &call.scope {
            filter.project = Some(p.clone());
        }
        let events = stratus_core::journal::follow(
            self.svc.shared_store(),
            r.since_seq,
            move |e| filter.matches(e),
            !r.no_follow,
        );
        let stream =
            futures::StreamExt::map(events, |r| r.map(|e| event_pb(&e)).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn watch_progress(
        &self,
        req: Request<pb::WatchProgressRequest>,
    ) -> Result<Response<Self::WatchProgressStream>, Status> {
        // Request ids are per project: the watcher sees the operation of
        // this id only when its call acted in the same project, so another
        // project's progress (or its existence) never shows.
        let (call, r) = Call::split(req, |r| &r.project)?;
        let id = r.request_id;
        if id.is_empty() {
            crate::progress::validate_request_id(&id)?;
        }
        let mut rx = self.svc.progress.watch(&call.progress_key(&id)?)?;
        let stream = async_stream::stream! {
            loop {
                let s = rx.borrow_and_update().clone();
                let finished = s.finished;
                yield Ok(pb::Progress {
                    request_id: id.clone(),
                    phase: s.phase,
                    done_bytes: s.done,
                    total_bytes: s.total,
                    finished: s.finished,
                    error: s.error.unwrap_or_default(),
                });
                if finished {
                    break;
                }
                // An operation that reports nothing for a minute (or never
                // starts) ends the stream; the operation's own call still
                // carries its result.
                match tokio::time::timeout(Duration::from_secs(60), rx.changed()).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
