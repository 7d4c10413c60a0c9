//! The pool service: every volume, snapshot and export operation, in domain
//! terms. The gRPC layer ([`crate::grpc`]) only converts messages.
//!
//! Why one file of ~1,300 lines: the operations on volumes, snapshots and
//! exports, reconciliation and the watchdog share `PoolService`'s private
//! helpers (locks, re-reads, capacity, export specs). The next split is
//! `service/{volumes,snapshots,exports,reconcile}.rs` (issue 10); its tests
//! are already apart, in `service_tests.rs`.
//!
//! Ordering rules that make crashes safe:
//! - create (empty, import, upload, clone): the record is stored as
//!   `creating` (reserving the name) before any data is written, and becomes
//!   `ready` only after the backend has published the object; only then is
//!   the create acknowledged. A `creating` record found at start was never
//!   acknowledged: it is rolled back (data and staging removed, record
//!   dropped) and reported as `rolled back`.
//! - snapshot: the same with `complete: false` as the intent.
//! - delete: the record turns `deleting` before data is removed, and is
//!   dropped after. A `deleting` record found at start is finished.
//! - export: the intent is stored first, then applied to the exporter; the
//!   reconciler re-applies stored intent at start and whenever the exporter
//!   loses targets (tgtd restart). Unexport commits first (the smaller ACL,
//!   or the record marked `unexporting`), then changes the exporter, then
//!   drops the record: a crash in between never gives a revoked initiator
//!   its access back, because reconciliation applies the stored revocation.
//!
//! Concurrency: operations on one volume or snapshot are serialized by a
//! per-UUID lock; operations on different objects run in parallel. Export
//! changes and the export watchdog also share one lock, so the watchdog never
//! re-creates a target that an unexport is removing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::backend::checksum::sha256_sparse;
use crate::backend::{image, Backend, ImageFormat, ObjectId, ThinUsage};
use crate::error::{Error, ErrorKind, Result};
use crate::export::{ExportSpec, Exporter, RestoreReport};
use crate::progress::ProgressHub;
use crate::runner::CommandRunner;
use crate::store::{ExportRecord, SnapshotRecord, Source, Store, VolumeRecord, VolumeState};
use crate::types::{validate_labels, ByteSize, Chap, Iqn, Labels, VolumeName};

/// Settings the service needs beyond its parts.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Provisioned bytes may reach capacity times this (thin provisioning).
    pub max_overcommit: f64,
    /// Server-side image paths must lie inside one of these directories.
    pub import_dirs: Vec<PathBuf>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            max_overcommit: 20.0,
            import_dirs: Vec::new(),
        }
    }
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone)]
pub enum NewVolumeSource {
    Empty,
    Volume(String),
    Snapshot(String),
    /// A path on this host, inside an import directory.
    ImageFile {
        path: PathBuf,
        format: Option<ImageFormat>,
    },
    /// A file the gRPC layer staged from an upload (already inside the pool).
    Upload {
        path: PathBuf,
        format: Option<ImageFormat>,
    },
}

/// A request for a new volume, its name parsed at the edge (gRPC).
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: VolumeName,
    /// 0: the source's size.
    pub size: u64,
    pub labels: Labels,
    pub source: NewVolumeSource,
    pub request_id: String,
    /// Its project and creator, decided at the edge from the caller.
    pub owner: Owner,
}

/// Who a new volume belongs to and who made it.
#[derive(Debug, Clone, Default)]
pub struct Owner {
    /// "" = no project (admin-only).
    pub project: String,
    /// None only for volumes pdiskd makes without a caller (tests).
    pub creator: Option<stratus_pki::tenancy::Creator>,
}

/// A volume with the facts computed from the live pool.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub allocated: u64,
    pub exported: bool,
    pub snapshot_count: u32,
    pub device_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub record: SnapshotRecord,
    pub volume_name: String,
    /// Its volume's project.
    pub project: String,
    pub allocated: u64,
}

/// The content checksum of a volume or snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// SHA-256 of every byte (holes as zeros), lowercase hex.
    pub sha256: String,
    /// Bytes hashed: the object's size.
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub record: ExportRecord,
    pub volume_name: String,
    /// Its volume's project.
    pub project: String,
    pub portal: String,
    pub exporter: String,
}

impl ExportInfo {
    pub fn url(&self) -> String {
        format!(
            "iscsi://{}/{}/{}",
            self.portal,
            self.record.target_iqn,
            crate::export::VOLUME_LUN
        )
    }
}

/// One difference between intent and live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub kind: DriftKind,
    pub object: String,
    pub detail: String,
}

/// What a [`Drift`] is about. The API shows it as a lowercase word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftKind {
    /// A volume record whose data is missing, or that could not be checked.
    Volume,
    /// A snapshot record whose data is missing, or that could not be checked.
    Snapshot,
    /// A stored export that could not be restored, or exports not checked.
    Export,
    /// A live target with our prefix and no export record.
    Target,
    /// A file in the pool that is not ours or has no record (`file` backend).
    File,
    /// A logical volume that is not ours or has no record (`lvm` backend).
    Lv,
}

impl DriftKind {
    /// The word the API and the logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Volume => "volume",
            DriftKind::Snapshot => "snapshot",
            DriftKind::Export => "export",
            DriftKind::Target => "target",
            DriftKind::File => "file",
            DriftKind::Lv => "lv",
        }
    }
}

impl std::fmt::Display for DriftKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    pub drift: Vec<Drift>,
    pub at: String,
    /// Human lines describing what was done.
    pub actions: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PoolInfo {
    pub backend: String,
    pub exporter: String,
    pub location: String,
    pub capacity: u64,
    pub used: u64,
    pub provisioned: u64,
    pub allocated: u64,
    pub volumes: u64,
    pub snapshots: u64,
    pub exports: u64,
    pub capabilities: Vec<String>,
    pub drift: Vec<Drift>,
    pub last_reconciled_at: String,
    pub exporter_status: String,
    pub max_overcommit: f64,
    /// Thin pools: data and metadata fill, and the refusal threshold.
    pub thin: Option<ThinUsage>,
}

#[derive(Default)]
struct ObjectLocks {
    map: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl ObjectLocks {
    async fn lock(&self, id: Uuid) -> OwnedMutexGuard<()> {
        let m = self.map.lock().unwrap().entry(id).or_default().clone();
        m.lock_owned().await
    }

    fn forget(&self, id: Uuid) {
        self.map.lock().unwrap().remove(&id);
    }
}

pub struct PoolService {
    store: Store,
    backend: Arc<dyn Backend>,
    exporter: Arc<dyn Exporter>,
    runner: Arc<dyn CommandRunner>,
    settings: ServiceSettings,
    locks: ObjectLocks,
    export_lock: tokio::sync::Mutex<()>,
    pub progress: ProgressHub,
    last_reconcile: Mutex<ReconcileReport>,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Image base volumes (labelled with an image checksum, not a guest's clone,
/// made by an agent or an admin) are read-only: clones are made from them,
/// nothing writes them. A volume anyone else made is never an image base,
/// whatever its labels say, so a tenant cannot forge one.
pub(crate) fn is_image_base(v: &VolumeRecord) -> bool {
    v.labels.contains_key(crate::types::LABEL_IMAGE_SHA256)
        && !v.labels.contains_key(crate::types::LABEL_VM)
        && v.created_by.as_ref().is_none_or(|c| c.is_trusted())
}

fn refuse_if_image_base(v: &VolumeRecord, what: &str) -> Result<()> {
    if is_image_base(v) {
        return Err(Error::precondition(format!(
            "volume {} is an image base and read-only: {what} a clone of it instead",
            v.name
        )));
    }
    Ok(())
}

/// FailedPrecondition unless the volume is ready.
fn require_ready(v: &VolumeRecord) -> Result<()> {
    if v.state != VolumeState::Ready {
        return Err(Error::precondition(format!(
            "volume {} is {:?}",
            v.name, v.state
        )));
    }
    Ok(())
}

impl PoolService {
    /// Reads `rec`'s volume again, by its UUID, after waiting for its lock:
    /// it may have changed or gone meanwhile. Never by name or by the UUID
    /// as text: a volume may be named like another volume's UUID.
    fn reread_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord> {
        self.store.volume(rec.uuid)?.ok_or_else(|| {
            Error::not_found(format!("volume {} ({}) not found", rec.name, rec.uuid))
        })
    }

    /// [`Self::reread_volume`] for snapshots.
    fn reread_snapshot(&self, rec: &SnapshotRecord) -> Result<SnapshotRecord> {
        self.store.snapshot(rec.uuid)?.ok_or_else(|| {
            Error::not_found(format!("snapshot {} ({}) not found", rec.name, rec.uuid))
        })
    }

    pub fn new(
        store: Store,
        backend: Arc<dyn Backend>,
        exporter: Arc<dyn Exporter>,
        runner: Arc<dyn CommandRunner>,
        settings: ServiceSettings,
    ) -> Self {
        PoolService {
            store,
            backend,
            exporter,
            runner,
            settings,
            locks: ObjectLocks::default(),
            export_lock: tokio::sync::Mutex::new(()),
            progress: ProgressHub::default(),
            last_reconcile: Mutex::new(ReconcileReport::default()),
        }
    }

    /// The metadata store, for the gRPC edge's project checks.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn exporter(&self) -> &dyn Exporter {
        self.exporter.as_ref()
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    fn target_iqn(&self, volume: Uuid) -> Iqn {
        format!("{}:{volume}", self.exporter.iqn_prefix())
            .parse()
            .expect("prefix validated at start")
    }

    // ---------- views ----------

    /// The volume with its allocation asked of the pool.
    async fn volume_info(&self, record: VolumeRecord) -> Result<VolumeInfo> {
        let allocated = if record.state == VolumeState::Ready {
            self.backend
                .allocated(ObjectId::Volume(record.uuid))
                .await
                .unwrap_or(0)
        } else {
            0
        };
        self.volume_info_with(record, allocated)
    }

    fn volume_info_with(&self, record: VolumeRecord, allocated: u64) -> Result<VolumeInfo> {
        let id = ObjectId::Volume(record.uuid);
        let allocated = if record.state == VolumeState::Ready {
            allocated
        } else {
            0
        };
        let exported = self.live_export(record.uuid)?.is_some();
        let snapshot_count = self
            .store
            .snapshots()?
            .iter()
            .filter(|s| s.volume == record.uuid)
            .count() as u32;
        Ok(VolumeInfo {
            device_path: self.backend.device_path(id),
            record,
            allocated,
            exported,
            snapshot_count,
        })
    }

    /// The name and project of volume `uuid`, or "" when it is gone.
    fn volume_name(&self, uuid: Uuid) -> Result<(String, String)> {
        Ok(self
            .store
            .volume(uuid)?
            .map(|v| (v.name.to_string(), v.project))
            .unwrap_or_default())
    }

    fn snapshot_info(&self, record: SnapshotRecord, allocated: u64) -> Result<SnapshotInfo> {
        let (volume_name, project) = self.volume_name(record.volume)?;
        Ok(SnapshotInfo {
            allocated,
            volume_name,
            project,
            record,
        })
    }

    /// Allocation of every object, from one look at the pool; empty (all
    /// reported as 0) when the pool cannot be read, so listings still work.
    async fn allocations(&self) -> std::collections::BTreeMap<ObjectId, u64> {
        match self.backend.list().await {
            Ok(l) => l.allocated,
            Err(e) => {
                tracing::warn!(error = %e, "pool not readable; allocations reported as 0");
                Default::default()
            }
        }
    }

    fn export_info(&self, record: ExportRecord) -> Result<ExportInfo> {
        let (volume_name, project) = self.volume_name(record.volume)?;
        Ok(ExportInfo {
            record,
            volume_name,
            project,
            portal: self.exporter.portal(),
            exporter: self.exporter.kind().to_string(),
        })
    }

    // ---------- capacity ----------

    fn provisioned(&self) -> Result<u64> {
        let v: u64 = self.store.volumes()?.iter().map(|v| v.size.0).sum();
        let s: u64 = self.store.snapshots()?.iter().map(|s| s.size.0).sum();
        Ok(v + s)
    }

    /// A requested size rounded up to whole MiB and to the backend's
    /// granularity (an LVM extent), so records match what the pool holds.
    fn volume_size(&self, bytes: u64) -> Result<ByteSize> {
        let s = ByteSize::volume_size(bytes)?;
        let g = self.backend.size_granularity().max(1);
        let aligned =
            s.0.checked_next_multiple_of(g)
                .ok_or_else(|| Error::invalid(format!("size {bytes} is too large")))?;
        ByteSize::volume_size(aligned)
    }

    /// Refuses to provision `extra` more bytes past capacity x overcommit,
    /// and (thin pools) anything once the pool's data or metadata usage,
    /// with `written` more bytes of data, would pass its threshold. One
    /// look at the pool.
    async fn check_capacity(&self, what: &str, extra: u64, written: u64) -> Result<()> {
        let usage = self.backend.usage().await?;
        usage.check_room(what, written)?;
        let limit = (usage.capacity as f64 * self.settings.max_overcommit) as u64;
        let provisioned = self.provisioned()?;
        if provisioned.saturating_add(extra) > limit {
            return Err(Error::exhausted(format!(
                "{what}: pool is full: {} provisioned + {} requested exceeds {} ({}x the pool's {})",
                ByteSize(provisioned),
                ByteSize(extra),
                ByteSize(limit),
                self.settings.max_overcommit,
                ByteSize(usage.capacity)
            )));
        }
        Ok(())
    }

    // ---------- volumes ----------

    pub async fn get_volume(&self, r: &str) -> Result<VolumeInfo> {
        let rec = self.store.find_volume(r)?;
        self.volume_info(rec).await
    }

    pub async fn list_volumes(&self, selector: &Labels) -> Result<Vec<VolumeInfo>> {
        let allocated = self.allocations().await;
        self.store
            .volumes()?
            .into_iter()
            .filter(|v| selector.iter().all(|(k, val)| v.labels.get(k) == Some(val)))
            .map(|v| {
                let a = allocated
                    .get(&ObjectId::Volume(v.uuid))
                    .copied()
                    .unwrap_or(0);
                self.volume_info_with(v, a)
            })
            .collect()
    }

    /// Resolves a server-side image path: it must exist, be a regular file,
    /// and lie inside an import directory once symlinks are resolved.
    fn resolve_import_path(&self, p: &Path) -> Result<PathBuf> {
        if !p.is_absolute() {
            return Err(Error::invalid(format!(
                "image path {} must be absolute",
                p.display()
            )));
        }
        let real = p.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::not_found(format!("image {} not found", p.display()))
            }
            _ => Error::invalid(format!("image {}: {e}", p.display())),
        })?;
        let inside = self.settings.import_dirs.iter().any(|d| {
            d.canonicalize()
                .map(|d| real.starts_with(d))
                .unwrap_or(false)
        });
        if !inside {
            return Err(Error::invalid(format!(
                "image {} is outside the import directories ({})",
                p.display(),
                self.settings
                    .import_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !real.is_file() {
            return Err(Error::invalid(format!(
                "image {} is not a regular file",
                p.display()
            )));
        }
        Ok(real)
    }

    pub async fn create_volume(&self, req: NewVolume) -> Result<VolumeInfo> {
        let op = self.progress.start(&req.request_id)?;
        let result = self.create_volume_inner(req, &op).await;
        op.finish(&result);
        result
    }

    async fn create_volume_inner(
        &self,
        req: NewVolume,
        op: &crate::progress::Operation,
    ) -> Result<VolumeInfo> {
        let name = &req.name;
        let labels = validate_labels(req.labels.iter())?;
        if req.size > 0 {
            ByteSize::volume_size(req.size)?;
        }
        // Fail early, before any work, when the name is taken.
        if self.store.find_volume(name.as_str()).is_ok() {
            return Err(Error::exists(format!("volume {name} already exists")));
        }
        let progress = op.reporter();

        // Resolve the source and hold its lock for the whole copy.
        enum Plan {
            Empty,
            Copy(ObjectId, Source),
            Image(PathBuf, ImageFormat, Source),
        }
        let (plan, source_size, _guard) = match &req.source {
            NewVolumeSource::Empty => {
                if req.size == 0 {
                    return Err(Error::invalid(format!(
                        "volume {name}: a size is required for an empty volume"
                    )));
                }
                (Plan::Empty, 0, None)
            }
            NewVolumeSource::Volume(r) => {
                let src = self.store.find_volume(r)?;
                let g = self.locks.lock(src.uuid).await;
                let src = self.reread_volume(&src)?;
                if src.state != VolumeState::Ready {
                    return Err(Error::precondition(format!(
                        "source volume {} is {:?}",
                        src.name, src.state
                    )));
                }
                (
                    Plan::Copy(ObjectId::Volume(src.uuid), Source::Volume(src.uuid)),
                    src.size.0,
                    Some(g),
                )
            }
            NewVolumeSource::Snapshot(r) => {
                let s = self.store.find_snapshot(r)?;
                let g = self.locks.lock(s.uuid).await;
                let s = self.reread_snapshot(&s)?;
                if !s.complete {
                    return Err(Error::precondition(format!(
                        "snapshot {} is incomplete",
                        s.name
                    )));
                }
                (
                    Plan::Copy(ObjectId::Snapshot(s.uuid), Source::Snapshot(s.uuid)),
                    s.size.0,
                    Some(g),
                )
            }
            NewVolumeSource::ImageFile { path, format } => {
                let real = self.resolve_import_path(path)?;
                let format = match format {
                    Some(f) => *f,
                    None => image::detect_format(&real)?,
                };
                let info = image::inspect(self.runner.as_ref(), &real, format).await?;
                (
                    Plan::Image(
                        real,
                        format,
                        Source::Image(format!("file:{}", path.display())),
                    ),
                    info.virtual_size,
                    None,
                )
            }
            NewVolumeSource::Upload { path, format } => {
                let format = match format {
                    Some(f) => *f,
                    None => image::detect_format(path)?,
                };
                let info = image::inspect(self.runner.as_ref(), path, format).await?;
                (
                    Plan::Image(path.clone(), format, Source::Image("upload".into())),
                    info.virtual_size,
                    None,
                )
            }
        };
        if req.size > 0 && req.size < source_size {
            return Err(Error::invalid(format!(
                "volume {name}: size {} is smaller than its source ({})",
                ByteSize(req.size),
                ByteSize(source_size)
            )));
        }
        let size = self.volume_size(req.size.max(source_size))?;
        // Thin pools: an import writes about the image's allocated bytes at
        // once; a new empty volume or a clone writes nothing yet.
        let written = match &plan {
            Plan::Image(path, _, _) => crate::backend::copy::allocated_bytes(path).unwrap_or(0),
            Plan::Empty | Plan::Copy(..) => 0,
        };
        self.check_capacity(&format!("volume {name}"), size.0, written)
            .await?;

        let source = match &plan {
            Plan::Empty => Source::Empty,
            Plan::Copy(_, s) | Plan::Image(_, _, s) => s.clone(),
        };
        let mut rec = VolumeRecord {
            uuid: Uuid::new_v4(),
            name: name.clone(),
            size,
            labels,
            state: VolumeState::Creating,
            state_reason: String::new(),
            source,
            created_at: now(),
            project: req.owner.project.clone(),
            created_by: req.owner.creator.clone(),
        };
        self.store.insert_volume(&rec)?;
        crate::failpoints::crash_point("service::create::after_intent");
        let _own = self.locks.lock(rec.uuid).await;
        let built = match plan {
            Plan::Empty => {
                self.backend
                    .create(ObjectId::Volume(rec.uuid), size.0)
                    .await
            }
            Plan::Copy(src, _) => {
                self.backend
                    .clone_object(src, rec.uuid, size.0, progress)
                    .await
            }
            Plan::Image(path, format, _) => {
                self.backend
                    .import(rec.uuid, &path, format, size.0, progress)
                    .await
            }
        };
        if let Err(e) = built {
            self.roll_back_create(&rec).await;
            return Err(e.context(format!("creating volume {}", rec.name)));
        }
        if is_image_base(&rec) {
            if let Err(e) = self.backend.set_read_only(ObjectId::Volume(rec.uuid)).await {
                self.roll_back_create(&rec).await;
                return Err(e.context(format!("volume {}", rec.name)));
            }
        }
        crate::failpoints::crash_point("service::create::before_commit");
        rec.state = VolumeState::Ready;
        self.store.update_volume(&rec)?;
        tracing::info!(volume = %rec.name, uuid = %rec.uuid, size = rec.size.0, source = %rec.source.describe(), "volume created");
        self.volume_info(rec).await
    }

    /// Undoes a create that failed before it was acknowledged: its data
    /// (published or staged) and its record go. When the data cannot be
    /// removed the record stays, as `deleting`, for reconciliation or the
    /// next DeleteVolume to finish.
    async fn roll_back_create(&self, rec: &VolumeRecord) {
        let gone = self.backend.delete(ObjectId::Volume(rec.uuid)).await;
        let dropped = match gone {
            Ok(()) => self.store.remove_volume(rec.uuid),
            Err(e) => {
                tracing::error!(volume = %rec.name, error = %e, "could not remove the data of a failed create; left as deleting");
                let mut r = rec.clone();
                r.state = VolumeState::Deleting;
                r.state_reason = format!("create failed and its data could not be removed: {e}");
                self.store.update_volume(&r)
            }
        };
        if let Err(e) = dropped {
            tracing::error!(volume = %rec.name, error = %e, "could not drop the record of a failed create");
        }
    }

    pub async fn clone_volume(
        &self,
        source: &str,
        source_is_snapshot: bool,
        name: VolumeName,
        labels: Labels,
        size: u64,
        request_id: &str,
    ) -> Result<VolumeInfo> {
        let source = if source_is_snapshot {
            NewVolumeSource::Snapshot(source.to_owned())
        } else {
            NewVolumeSource::Volume(source.to_owned())
        };
        self.create_volume(NewVolume {
            name,
            size,
            labels,
            source,
            request_id: request_id.to_owned(),
            owner: Owner::default(),
        })
        .await
    }

    pub async fn delete_volume(&self, r: &str) -> Result<()> {
        let rec = self.store.find_volume(r)?;
        let _g = self.locks.lock(rec.uuid).await;
        let mut rec = self.reread_volume(&rec)?;
        if rec.state == VolumeState::Creating {
            return Err(Error::precondition(format!(
                "volume {} is being created",
                rec.name
            )));
        }
        if self.live_export(rec.uuid)?.is_some() {
            return Err(Error::precondition(format!(
                "volume {} is exported; unexport it first",
                rec.name
            )));
        }
        // An unexport committed but not yet applied: finish it first, so no
        // target outlives its data.
        if let Some(pending) = self.store.export(rec.uuid)? {
            let _e = self.export_lock.lock().await;
            self.finish_unexport(&pending)
                .await
                .map_err(|e| e.context(format!("volume {}: finishing its unexport", rec.name)))?;
        }
        let snaps: Vec<String> = self
            .store
            .snapshots()?
            .into_iter()
            .filter(|s| s.volume == rec.uuid)
            .map(|s| s.name.to_string())
            .collect();
        if !snaps.is_empty() {
            return Err(Error::precondition(format!(
                "volume {} has snapshots ({}); delete them first",
                rec.name,
                snaps.join(", ")
            )));
        }
        rec.state = VolumeState::Deleting;
        self.store.update_volume(&rec)?;
        crate::failpoints::crash_point("service::delete::after_intent");
        self.backend.delete(ObjectId::Volume(rec.uuid)).await?;
        crate::failpoints::crash_point("service::delete::after_backend");
        self.store.remove_volume(rec.uuid)?;
        self.locks.forget(rec.uuid);
        tracing::info!(volume = %rec.name, uuid = %rec.uuid, "volume deleted");
        Ok(())
    }

    pub async fn resize_volume(&self, r: &str, size: u64) -> Result<VolumeInfo> {
        let new = self.volume_size(size)?;
        let rec = self.store.find_volume(r)?;
        let _g = self.locks.lock(rec.uuid).await;
        let mut rec = self.reread_volume(&rec)?;
        require_ready(&rec)?;
        refuse_if_image_base(&rec, "resize")?;
        if new < rec.size {
            return Err(Error::invalid(format!(
                "volume {} is {}; shrinking to {} is refused",
                rec.name, rec.size, new
            )));
        }
        if new == rec.size {
            return self.volume_info(rec).await;
        }
        self.check_capacity(&format!("volume {}", rec.name), new.0 - rec.size.0, 0)
            .await?;
        // Refused before the data grows; the store checks again, atomically,
        // when the record grows.
        self.store.check_growth(&rec, new)?;
        // Growing is idempotent and the record follows the data: a crash
        // between leaves a record smaller than its data, which a retry of
        // the resize fixes (no data is lost, nothing shrinks).
        crate::failpoints::crash_point("service::resize::before_backend");
        self.backend
            .resize(ObjectId::Volume(rec.uuid), new.0)
            .await?;
        crate::failpoints::crash_point("service::resize::after_backend");
        rec.size = new;
        self.store.update_volume(&rec)?;
        crate::failpoints::crash_point("service::resize::after_commit");
        if let Some(exp) = self.store.export(rec.uuid)? {
            let spec = self.export_spec(&exp);
            self.exporter.refresh_size(&spec).await.map_err(|e| {
                e.context(format!(
                    "volume {} grew to {new}, but its export still shows the old size",
                    rec.name
                ))
            })?;
        }
        tracing::info!(volume = %rec.name, size = new.0, "volume resized");
        self.volume_info(rec).await
    }

    // ---------- snapshots ----------

    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: VolumeName,
        request_id: &str,
    ) -> Result<SnapshotInfo> {
        let op = self.progress.start(request_id)?;
        let result = async {
            let vol = self.store.find_volume(volume)?;
            let _g = self.locks.lock(vol.uuid).await;
            let vol = self.reread_volume(&vol)?;
            require_ready(&vol)?;
            self.check_capacity(&format!("snapshot {name}"), vol.size.0, 0)
                .await?;
            let mut rec = SnapshotRecord {
                uuid: Uuid::new_v4(),
                name,
                volume: vol.uuid,
                size: vol.size,
                complete: false,
                created_at: now(),
            };
            self.store.insert_snapshot(&rec)?;
            crate::failpoints::crash_point("service::snapshot::after_intent");
            if let Err(e) = self
                .backend
                .snapshot(ObjectId::Volume(vol.uuid), rec.uuid, op.reporter())
                .await
            {
                let _ = self.backend.delete(ObjectId::Snapshot(rec.uuid)).await;
                let _ = self.store.remove_snapshot(rec.uuid);
                return Err(e.context(format!("snapshot {} of {}", rec.name, vol.name)));
            }
            crate::failpoints::crash_point("service::snapshot::before_commit");
            rec.complete = true;
            self.store.update_snapshot(&rec)?;
            tracing::info!(snapshot = %rec.name, volume = %vol.name, "snapshot created");
            let allocated = self
                .backend
                .allocated(ObjectId::Snapshot(rec.uuid))
                .await
                .unwrap_or(0);
            self.snapshot_info(rec, allocated)
        }
        .await;
        op.finish(&result);
        result
    }

    pub async fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let filter = if volume.is_empty() {
            None
        } else {
            Some(self.store.find_volume(volume)?.uuid)
        };
        let allocated = self.allocations().await;
        self.store
            .snapshots()?
            .into_iter()
            .filter(|s| filter.is_none_or(|u| s.volume == u))
            .map(|s| {
                let a = allocated
                    .get(&ObjectId::Snapshot(s.uuid))
                    .copied()
                    .unwrap_or(0);
                self.snapshot_info(s, a)
            })
            .collect()
    }

    pub async fn delete_snapshot(&self, r: &str) -> Result<()> {
        let s = self.store.find_snapshot(r)?;
        let _g = self.locks.lock(s.uuid).await;
        let mut s = self.reread_snapshot(&s)?;
        // Intent first: an incomplete snapshot is removed at start, so a
        // crash mid-delete never leaves a record without data.
        s.complete = false;
        self.store.update_snapshot(&s)?;
        crate::failpoints::crash_point("service::delete_snapshot::after_intent");
        self.backend.delete(ObjectId::Snapshot(s.uuid)).await?;
        self.store.remove_snapshot(s.uuid)?;
        self.locks.forget(s.uuid);
        tracing::info!(snapshot = %s.name, "snapshot deleted");
        Ok(())
    }

    // ---------- checksums ----------

    /// The SHA-256 of a volume's (or, with `is_snapshot`, a snapshot's) whole
    /// content, holes read as zeros: what `sha256sum` of its backing file
    /// prints. The object's lock is held throughout, so no pdisk operation
    /// changes it meanwhile (writes through an export still can: checksum a
    /// volume whose user is stopped). Progress is reported as "checksum".
    pub async fn checksum(&self, r: &str, is_snapshot: bool, request_id: &str) -> Result<Checksum> {
        let op = self.progress.start(request_id)?;
        let result = async {
            let (id, what, _g) = if is_snapshot {
                let s = self.store.find_snapshot(r)?;
                let g = self.locks.lock(s.uuid).await;
                let s = self.reread_snapshot(&s)?;
                if !s.complete {
                    return Err(Error::precondition(format!(
                        "snapshot {} is incomplete",
                        s.name
                    )));
                }
                (
                    ObjectId::Snapshot(s.uuid),
                    format!("snapshot {}", s.name),
                    g,
                )
            } else {
                let v = self.store.find_volume(r)?;
                let g = self.locks.lock(v.uuid).await;
                let v = self.reread_volume(&v)?;
                if v.state != VolumeState::Ready {
                    return Err(Error::precondition(format!(
                        "volume {} is {:?}",
                        v.name, v.state
                    )));
                }
                (ObjectId::Volume(v.uuid), format!("volume {}", v.name), g)
            };
            let size = self.backend.size(id).await.map_err(|e| e.context(&what))?;
            let path = self.backend.device_path(id);
            let report = op.reporter();
            report("checksum", 0, size);
            let sha256 = tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path).map_err(|e| Error::io(path.display(), e))?;
                sha256_sparse(&f, size, |done| report("checksum", done, size))
                    .map_err(|e| Error::io(path.display(), e))
            })
            .await
            .map_err(|e| Error::internal(format!("checksum task failed: {e}")))?
            .map_err(|e| e.context(format!("checksum of {what}")))?;
            tracing::info!(object = %what, %sha256, size, "checksum computed");
            Ok(Checksum { sha256, size })
        }
        .await;
        op.finish(&result);
        result
    }

    // ---------- exports ----------

    fn export_spec(&self, e: &ExportRecord) -> ExportSpec {
        ExportSpec {
            target_iqn: e.target_iqn.clone(),
            backing_path: self.backend.device_path(ObjectId::Volume(e.volume)),
            initiators: e.initiators.clone(),
            chap: e.chap.clone(),
        }
    }

    /// Adds `initiators` to the volume's export (creating it), and sets its
    /// CHAP account when `chap` is given. Initiators and CHAP are parsed at
    /// the edge (gRPC, CLI).
    pub async fn export_volume(
        &self,
        volume: &str,
        initiators: &[Iqn],
        chap: Option<Chap>,
    ) -> Result<ExportInfo> {
        if initiators.is_empty() {
            return Err(Error::invalid(format!(
                "export of {volume}: at least one initiator IQN is required"
            )));
        }
        let vol = self.store.find_volume(volume)?;
        let _g = self.locks.lock(vol.uuid).await;
        let vol = self.reread_volume(&vol)?;
        require_ready(&vol)?;
        refuse_if_image_base(&vol, "export")?;
        let _e = self.export_lock.lock().await;
        let previous = self.store.export(vol.uuid)?;
        // A pending unexport's initiators are revoked: never carried over.
        let mut rec = previous
            .clone()
            .filter(|p| !p.unexporting)
            .unwrap_or(ExportRecord {
                volume: vol.uuid,
                target_iqn: self.target_iqn(vol.uuid),
                initiators: Vec::new(),
                chap: None,
                unexporting: false,
            });
        for i in initiators {
            if !rec.initiators.contains(i) {
                rec.initiators.push(i.clone());
            }
        }
        if chap.is_some() {
            rec.chap = chap;
        }
        self.store.put_export(&rec)?;
        crate::failpoints::crash_point("service::export::after_intent");
        if let Err(e) = self.exporter.export(&self.export_spec(&rec)).await {
            // Put the intent back as it was: nothing changed.
            match &previous {
                Some(p) => self.store.put_export(p)?,
                None => {
                    self.store.remove_export(vol.uuid)?;
                }
            }
            return Err(e.context(format!("exporting volume {}", vol.name)));
        }
        crate::failpoints::crash_point("service::export::after_exporter");
        tracing::info!(volume = %vol.name, target = %rec.target_iqn,
            initiators = ?rec.initiators.iter().map(Iqn::as_str).collect::<Vec<_>>(),
            chap = rec.chap.is_some(), "volume exported");
        self.export_info(rec)
    }

    /// Removes the initiators in `remove`, or the whole export when it is empty.
    /// Returns what remains of the export.
    pub async fn unexport_volume(
        &self,
        volume: &str,
        remove: &[Iqn],
    ) -> Result<Option<ExportInfo>> {
        let vol = self.store.find_volume(volume)?;
        let _g = self.locks.lock(vol.uuid).await;
        let _e = self.export_lock.lock().await;
        let Some(mut rec) = self.store.export(vol.uuid)? else {
            return Err(Error::not_found(format!(
                "volume {} is not exported",
                vol.name
            )));
        };
        if rec.unexporting {
            // Already revoked; its target may still need removing.
            if !remove.is_empty() {
                return Err(Error::not_found(format!(
                    "volume {} is not exported",
                    vol.name
                )));
            }
            self.finish_unexport(&rec)
                .await
                .map_err(|e| e.context(format!("unexporting volume {}", vol.name)))?;
            return Ok(None);
        }
        for i in remove {
            if !rec.initiators.contains(i) {
                return Err(Error::not_found(format!(
                    "initiator {i} is not in the ACL of volume {}",
                    vol.name
                )));
            }
        }
        rec.initiators.retain(|i| !remove.contains(i));
        // The revocation is committed before the exporter changes: if the
        // exporter fails or pdiskd dies now, reconciliation and the watchdog
        // apply the stored revocation, never the old ACL.
        if remove.is_empty() || rec.initiators.is_empty() {
            rec.unexporting = true;
            self.store.put_export(&rec)?;
            crate::failpoints::crash_point("service::unexport::after_commit");
            self.finish_unexport(&rec).await.map_err(|e| {
                e.context(format!(
                    "unexporting volume {} (revoked in the store; the target is removed when the exporter answers)",
                    vol.name
                ))
            })?;
            tracing::info!(volume = %vol.name, "volume unexported");
            return Ok(None);
        }
        self.store.put_export(&rec)?;
        crate::failpoints::crash_point("service::unexport_initiators::after_commit");
        self.exporter
            .export(&self.export_spec(&rec))
            .await
            .map_err(|e| {
                e.context(format!(
                    "updating the ACL of volume {} (revoked in the store; applied when the exporter answers)",
                    vol.name
                ))
            })?;
        tracing::info!(volume = %vol.name, removed = remove.len(), "initiators removed from export");
        Ok(Some(self.export_info(rec)?))
    }

    /// Removes the target of a committed unexport, then its record. The
    /// caller holds the export lock.
    async fn finish_unexport(&self, rec: &ExportRecord) -> Result<()> {
        self.exporter.unexport(&rec.target_iqn).await?;
        crate::failpoints::crash_point("service::unexport::after_exporter");
        self.store.remove_export(rec.volume)?;
        Ok(())
    }

    /// The export of `volume` unless none or its unexport is committed.
    fn live_export(&self, volume: Uuid) -> Result<Option<ExportRecord>> {
        Ok(self.store.export(volume)?.filter(|e| !e.unexporting))
    }

    /// Every export but those whose unexport is committed.
    fn live_exports(&self) -> Result<Vec<ExportRecord>> {
        Ok(self
            .store
            .exports()?
            .into_iter()
            .filter(|e| !e.unexporting)
            .collect())
    }

    pub fn list_exports(&self) -> Result<Vec<ExportInfo>> {
        let mut out: Vec<ExportInfo> = self
            .live_exports()?
            .into_iter()
            .map(|e| self.export_info(e))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.volume_name.cmp(&b.volume_name));
        Ok(out)
    }

    // ---------- pool ----------

    pub async fn pool(&self) -> Result<PoolInfo> {
        let listing = self.backend.list().await?;
        let usage = listing.usage;
        let vols = self.store.volumes()?;
        let snaps = self.store.snapshots()?;
        let get = |id| listing.allocated.get(&id).copied().unwrap_or(0);
        let allocated: u64 = vols
            .iter()
            .map(|v| get(ObjectId::Volume(v.uuid)))
            .chain(snaps.iter().map(|s| get(ObjectId::Snapshot(s.uuid))))
            .sum();
        let exporter_status = match self.exporter.check().await {
            Ok(()) => "up".to_string(),
            Err(e) => format!("down: {e}"),
        };
        let rec = self.last_reconcile.lock().unwrap().clone();
        Ok(PoolInfo {
            backend: self.backend.kind().to_string(),
            exporter: self.exporter.kind().to_string(),
            location: self.backend.location(),
            capacity: usage.capacity,
            used: usage.used,
            provisioned: vols.iter().map(|v| v.size.0).sum::<u64>()
                + snaps.iter().map(|s| s.size.0).sum::<u64>(),
            allocated,
            volumes: vols.len() as u64,
            snapshots: snaps.len() as u64,
            exports: self.live_exports()?.len() as u64,
            capabilities: self.backend.capabilities(),
            drift: rec.drift,
            last_reconciled_at: rec.at,
            exporter_status,
            max_overcommit: self.settings.max_overcommit,
            thin: usage.thin,
        })
    }

    // ---------- reconciliation ----------

    /// Compares the store with the pool and the exporter, finishes
    /// interrupted deletes, marks interrupted creates as errors, re-creates
    /// lost exports, and records every difference as drift. Deletes nothing
    /// it does not own an intent for.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport {
            at: now(),
            ..Default::default()
        };
        let listing = self.backend.list().await?;
        let present: std::collections::BTreeSet<ObjectId> =
            listing.objects.iter().copied().collect();
        let mut known = std::collections::BTreeSet::new();

        for mut v in self.store.volumes()? {
            let id = ObjectId::Volume(v.uuid);
            known.insert(id);
            match v.state {
                // A delete that fails again (an LV still held open, say)
                // must not keep pdiskd from starting: it is reported and
                // retried at the next start or by the next DeleteVolume.
                VolumeState::Deleting => match self.backend.delete(id).await {
                    Ok(()) => {
                        self.store.remove_volume(v.uuid)?;
                        report.actions.push(format!(
                            "finished the interrupted delete of volume {}",
                            v.name
                        ));
                    }
                    Err(e) => report.drift.push(Drift {
                        kind: DriftKind::Volume,
                        object: v.name.to_string(),
                        detail: format!("interrupted delete could not be finished: {e}"),
                    }),
                },
                // Never acknowledged (a create answers only once `ready`
                // is stored): roll it back. The intent to remove is stored
                // first, so a failure here is retried like any delete.
                VolumeState::Creating => {
                    v.state = VolumeState::Deleting;
                    v.state_reason = "rolling back an interrupted create".into();
                    self.store.update_volume(&v)?;
                    match self.backend.delete(id).await {
                        Ok(()) => {
                            self.store.remove_volume(v.uuid)?;
                            report.actions.push(format!(
                                "rolled back the interrupted create of volume {} ({}): never acknowledged",
                                v.name, v.uuid
                            ));
                            report.drift.push(Drift {
                                kind: DriftKind::Volume,
                                object: v.name.to_string(),
                                detail: "rolled back: its create was interrupted before it answered"
                                    .into(),
                            });
                        }
                        Err(e) => report.drift.push(Drift {
                            kind: DriftKind::Volume,
                            object: v.name.to_string(),
                            detail: format!(
                                "interrupted create could not be rolled back (retried at the next start or by DeleteVolume): {e}"
                            ),
                        }),
                    }
                }
                VolumeState::Ready if !present.contains(&id) => {
                    v.state = VolumeState::Error;
                    v.state_reason = format!(
                        "backing data missing: {}",
                        self.backend.device_path(id).display()
                    );
                    self.store.update_volume(&v)?;
                    report.drift.push(Drift {
                        kind: DriftKind::Volume,
                        object: v.name.to_string(),
                        detail: v.state_reason.clone(),
                    });
                }
                VolumeState::Error if !present.contains(&id) => {
                    report.drift.push(Drift {
                        kind: DriftKind::Volume,
                        object: v.name.to_string(),
                        detail: v.state_reason.clone(),
                    });
                }
                _ => {}
            }
        }
        for s in self.store.snapshots()? {
            let id = ObjectId::Snapshot(s.uuid);
            known.insert(id);
            if !s.complete {
                match self.backend.delete(id).await {
                    Ok(()) => {
                        self.store.remove_snapshot(s.uuid)?;
                        report.actions.push(format!(
                            "rolled back the interrupted snapshot {} ({}): never acknowledged",
                            s.name, s.uuid
                        ));
                        report.drift.push(Drift {
                            kind: DriftKind::Snapshot,
                            object: s.name.to_string(),
                            detail: "rolled back: it was interrupted before it answered".into(),
                        });
                    }
                    Err(e) => report.drift.push(Drift {
                        kind: DriftKind::Snapshot,
                        object: s.name.to_string(),
                        detail: format!("interrupted snapshot could not be removed: {e}"),
                    }),
                }
            } else if !present.contains(&id) {
                report.drift.push(Drift {
                    kind: DriftKind::Snapshot,
                    object: s.name.to_string(),
                    detail: format!(
                        "backing data missing: {}",
                        self.backend.device_path(id).display()
                    ),
                });
            }
        }
        // What an object lives in, for drift reports: a file or an LV.
        let unit = match self.backend.kind() {
            "lvm" => DriftKind::Lv,
            _ => DriftKind::File,
        };
        for id in present.difference(&known) {
            report.drift.push(Drift {
                kind: unit,
                object: self.backend.device_path(*id).display().to_string(),
                detail: format!("{id} has data in the pool but no record; left in place"),
            });
        }
        for f in listing.foreign {
            report.drift.push(Drift {
                kind: unit,
                object: f,
                detail: "not a pdisk object; left in place".into(),
            });
        }

        match self.restore_exports_reporting().await {
            Ok((finished, r)) => {
                for t in &finished {
                    report
                        .actions
                        .push(format!("finished the interrupted unexport of {t}"));
                }
                for t in &r.restored {
                    report.actions.push(format!("re-created export {t}"));
                }
                for (t, why) in &r.failed {
                    report.drift.push(Drift {
                        kind: DriftKind::Export,
                        object: t.clone(),
                        detail: format!("could not be restored: {why}"),
                    });
                }
                for t in &r.unknown {
                    report.drift.push(Drift {
                        kind: DriftKind::Target,
                        object: t.clone(),
                        detail:
                            "live target with pdisk's prefix but no export record; left in place"
                                .into(),
                    });
                }
            }
            Err(e) => report.drift.push(Drift {
                kind: DriftKind::Export,
                object: self.exporter.kind().into(),
                detail: format!("exports not checked: {e}"),
            }),
        }
        for a in &report.actions {
            tracing::info!(action = %a, "reconcile");
        }
        for d in &report.drift {
            tracing::warn!(kind = %d.kind, object = %d.object, detail = %d.detail, "drift");
        }
        tracing::info!(
            actions = report.actions.len(),
            drift = report.drift.len(),
            "reconciled store with pool and exporter"
        );
        *self.last_reconcile.lock().unwrap() = report.clone();
        Ok(report)
    }

    /// Finishes committed unexports, then re-applies every stored export
    /// whose target is missing or different.
    pub async fn restore_exports(&self) -> Result<RestoreReport> {
        Ok(self.restore_exports_reporting().await?.1)
    }

    /// [`Self::restore_exports`], also naming the targets of the unexports
    /// it finished.
    async fn restore_exports_reporting(&self) -> Result<(Vec<String>, RestoreReport)> {
        let _e = self.export_lock.lock().await;
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        let mut specs = Vec::new();
        for e in self.store.exports()? {
            if !e.unexporting {
                specs.push(self.export_spec(&e));
                continue;
            }
            match self.finish_unexport(&e).await {
                Ok(()) => {
                    tracing::info!(target = %e.target_iqn, "finished an interrupted unexport");
                    finished.push(e.target_iqn.to_string());
                }
                Err(err) if err.kind() == ErrorKind::Unavailable => return Err(err),
                Err(err) => failed.push((e.target_iqn.to_string(), err.to_string())),
            }
        }
        let mut report = self.exporter.restore(&specs).await?;
        report.failed.extend(failed);
        Ok((finished, report))
    }

    /// Watches the exporter and restores exports it lost (tgtd restarted),
    /// until `shutdown` fires.
    pub async fn watch_exports(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut was_down = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            match self.restore_exports().await {
                Ok(r) => {
                    if was_down {
                        tracing::info!(exporter = self.exporter.kind(), "exporter is back");
                    }
                    was_down = false;
                    if !r.restored.is_empty() {
                        tracing::warn!(restored = ?r.restored, "exporter had lost exports; re-created them");
                    }
                    for (t, why) in r.failed {
                        tracing::error!(target = %t, error = %why, "could not restore export");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Unavailable => {
                    if !was_down {
                        tracing::warn!(error = %e, "exporter unavailable; exports will be restored when it returns");
                    }
                    was_down = true;
                }
                Err(e) => tracing::error!(error = %e, "export watchdog"),
            }
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
