//! The pool service: every volume, snapshot and export operation, in domain
//! terms. The gRPC layer ([`crate::grpc`]) only converts messages.
//!
//! This file holds `PoolService`, its request and answer types, and the
//! helpers every operation shares (per-object locks, re-reads, views,
//! capacity, the pool's figures). The operations live beside it:
//! - `volumes.rs`: get, list, create (empty, import, upload, clone), delete,
//!   resize;
//! - `snapshots.rs`: snapshots and checksums;
//! - `exports.rs`: export intent, unexport, restore and the export watchdog;
//! - `quarantine.rs`: deleted volumes kept until their purge time: restore,
//!   listing, the purge task;
//! - `reconcile.rs`: reconciliation at start;
//! - `flatten.rs`: the background flatten of clones past the maximum clone
//!   depth (rbd);
//! - `service_tests.rs`: their unit suite.
//!
//! Ordering rules that make crashes safe:
//! - create (empty, import, upload, clone): the record is stored as
//!   `creating` (reserving the name) before any data is written, and becomes
//!   `ready` only after the backend has published the object; only then is
//!   the create acknowledged. A `creating` record found at start was never
//!   acknowledged: it is rolled back (data and staging removed, record
//!   dropped) and reported as `rolled back`.
//! - snapshot: the same with `complete: false` as the intent.
//! - a clone past the backend's maximum clone depth is committed `ready`
//!   with `flatten_pending` in the same transaction; the background flatten
//!   runs, then clears the mark with VOLUME_FLATTENED (a failed attempt
//!   journals VOLUME_FLATTEN_FAILED and keeps it). A mark found at start
//!   is flattened again (`flatten.rs`).
//! - delete: the record turns `deleting` before data is removed, and is
//!   dropped after. A `deleting` record found at start is finished.
//! - delete with a quarantine period (`quarantine.rs`): one transaction
//!   turns the record `quarantined` with its purge time and frees its name;
//!   no data moves. The purge is a delete as above (the record keeps its
//!   `quarantine` while `deleting`, so reconciliation knows it holds no
//!   name and reports an interrupted purge as such).
//! - export: the intent is stored first, then applied to the exporter; the
//!   reconciler re-applies stored intent at start and whenever the exporter
//!   loses targets (tgtd restart). Unexport commits first (the smaller ACL,
//!   or the record marked `unexporting`), then changes the exporter, then
//!   drops the record: a crash in between never gives a revoked initiator
//!   its access back, because reconciliation applies the stored revocation.
//!
//! Concurrency: operations on one volume or snapshot are serialized by a
//! per-UUID lock; operations on different objects run in parallel. Clones
//! of a snapshot or of an image base share their source's lock (it never
//! changes), so they run in parallel too; anything else waits for them. Export
//! changes and the export watchdog also share one lock, so the watchdog never
//! re-creates a target that an unexport is removing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard};
use uuid::Uuid;

use crate::backend::{Backend, ImageFormat, ObjectId, ThinUsage};
use crate::error::{Error, Result};
use crate::export::Exporter;
use crate::progress::ProgressHub;
use crate::runner::CommandRunner;
use crate::store::{ExportRecord, SnapshotRecord, Store, VolumeRecord, VolumeState};
use crate::types::{ByteSize, Iqn, Labels, VolumeName};

pub use flatten::FlattenProgress;

/// Settings the service needs beyond its parts.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Provisioned bytes may reach capacity times this (thin provisioning).
    pub max_overcommit: f64,
    /// Server-side image paths must lie inside one of these directories.
    pub import_dirs: Vec<PathBuf>,
    /// How long a deleted volume stays in quarantine, restorable, before
    /// its data is destroyed; zero deletes at once. pdiskd's default is
    /// 24h; the service's (unit tests) is zero.
    pub quarantine_period: std::time::Duration,
    /// This storage host's id (pdiskd --host-id, default /etc/machine-id):
    /// an export asked for by an agent with the same id is answered with
    /// a local attachment and no target. None: always a target.
    pub host_id: Option<String>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            max_overcommit: 20.0,
            import_dirs: Vec::new(),
            quarantine_period: std::time::Duration::ZERO,
            host_id: None,
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
    /// See [`VolumeRecord::allow_multi_attach`].
    pub allow_multi_attach: bool,
}

/// Who asks for an export, and how: decided at the edge from the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportBy {
    /// The caller (`agent/compute-7`, `admin/local:root`): recorded as the
    /// setter of a CHAP account.
    pub caller: String,
    /// Admins may replace anyone's CHAP account.
    pub admin: bool,
    /// The request accepts a second host on the volume (the volume must
    /// allow it too).
    pub multi_attach: bool,
    /// The request is a live migration's destination: with `multi_attach`
    /// it may be the one second host of a volume that does not allow
    /// multi-attach, until one of the two is unexported
    /// ([`crate::store::ExportMigration`]).
    pub migration: bool,
    /// The requesting host's id (ExportVolumeRequest.host_id): chooses a
    /// local attachment when it is this storage host's; nothing else.
    pub host_id: Option<String>,
}

impl ExportBy {
    /// An admin's single-host export (the CLI on the local socket, tests).
    pub fn admin(name: &str) -> ExportBy {
        ExportBy {
            caller: format!("admin/{name}"),
            admin: true,
            multi_attach: false,
            migration: false,
            host_id: None,
        }
    }

    /// The same request, as a live migration's destination.
    pub fn migration(mut self) -> ExportBy {
        self.multi_attach = true;
        self.migration = true;
        self
    }

    /// The same request, accepting a second host.
    pub fn multi_attach(mut self) -> ExportBy {
        self.multi_attach = true;
        self
    }

    /// The same request, from the host with id `id`.
    pub fn on_host(mut self, id: &str) -> ExportBy {
        self.host_id = Some(id.to_string());
        self
    }
}

/// Who a new volume belongs to and who made it.
#[derive(Debug, Clone, Default)]
pub struct Owner {
    /// "" = no project (admin-only).
    pub project: String,
    /// None only for volumes pdiskd makes without a caller (tests).
    pub creator: Option<stratus_pki::tenancy::Creator>,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// The data is destroyed.
    Gone,
    /// Kept in quarantine, restorable until `purge_at` (RFC 3339).
    Quarantined { purge_at: String },
}

/// A volume with the facts computed from the live pool.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub allocated: u64,
    pub exported: bool,
    pub snapshot_count: u32,
    pub device_path: PathBuf,
    /// Some while the volume is marked `flatten_pending` (`flatten.rs`).
    pub flatten: Option<FlattenProgress>,
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
    /// How a client opens the volume itself when no target serves it (the
    /// rbd backend); None for iSCSI exports.
    pub rbd: Option<crate::backend::rbd::RbdAccess>,
    /// The volume's own file or device, for a caller on this host (issue
    /// 16); None for iSCSI (and rbd) exports.
    pub local: Option<LocalAccess>,
}

/// A volume opened on the storage host itself: its backing path, raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAccess {
    pub path: PathBuf,
    pub block_device: bool,
}

impl ExportInfo {
    /// `iscsi://PORTAL/TARGET/LUN`, `nvme+tcp://PORTAL/NQN/NSID`, or
    /// `rbd:POOL/IMAGE`.
    pub fn url(&self) -> String {
        if let Some(r) = &self.rbd {
            return format!("rbd:{}/{}", r.pool, r.image);
        }
        if let Some(l) = &self.local {
            return format!("file:{}", l.path.display());
        }
        if self.exporter == "nvmet" {
            // The subsystem NQN (see `Iqn::to_nqn`) and namespace 1.
            if let Ok(nqn) = self.record.target_iqn.to_nqn() {
                return format!(
                    "nvme+tcp://{}/{nqn}/{}",
                    self.portal,
                    crate::export::nvmet::NSID
                );
            }
        }
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
    /// An RBD image that is not ours or has no record (`rbd` backend).
    Image,
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
            DriftKind::Image => "image",
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
    /// Live volumes; those in quarantine are `quarantined`.
    pub volumes: u64,
    pub snapshots: u64,
    pub exports: u64,
    pub quarantined: u64,
    /// The sizes of the quarantined volumes (in `provisioned`).
    pub quarantined_bytes: u64,
    pub capabilities: Vec<String>,
    pub drift: Vec<Drift>,
    pub last_reconciled_at: String,
    pub exporter_status: String,
    pub max_overcommit: f64,
    /// Thin pools: data and metadata fill, and the refusal threshold.
    pub thin: Option<ThinUsage>,
}

/// One lock per volume or snapshot UUID. Whatever changes an object, or
/// must see it unchanged while it works, holds it exclusively; a clone of
/// an object that never changes (a snapshot, an image base) holds it
/// shared, so clones of one base run at once (the boot storm) while a
/// delete still waits for all of them and they for it.
#[derive(Default)]
struct ObjectLocks {
    map: Mutex<HashMap<Uuid, Arc<tokio::sync::RwLock<()>>>>,
}

/// A held object lock (see [`ObjectLocks`]); released when dropped.
enum Held {
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
}

impl ObjectLocks {
    fn entry(&self, id: Uuid) -> Arc<tokio::sync::RwLock<()>> {
        self.map.lock().unwrap().entry(id).or_default().clone()
    }

    async fn lock(&self, id: Uuid) -> OwnedRwLockWriteGuard<()> {
        self.entry(id).write_owned().await
    }

    /// Shared with other holders of `share`, never with `lock`.
    async fn share(&self, id: Uuid) -> OwnedRwLockReadGuard<()> {
        self.entry(id).read_owned().await
    }

    fn forget(&self, id: Uuid) {
        self.map.lock().unwrap().remove(&id);
    }
}

pub struct PoolService {
    store: Arc<Store>,
    backend: Arc<dyn Backend>,
    exporter: Arc<dyn Exporter>,
    runner: Arc<dyn CommandRunner>,
    settings: ServiceSettings,
    locks: ObjectLocks,
    export_lock: tokio::sync::Mutex<()>,
    pub progress: ProgressHub,
    last_reconcile: Mutex<ReconcileReport>,
    /// Operation timings for `/metrics` (`crate::metrics`).
    ops: crate::metrics::Operations,
    /// Woken when a volume enters quarantine: the purge task looks again
    /// at the next purge time.
    quarantined: tokio::sync::Notify,
    /// Storage accounting (`crate::usage`).
    usage: crate::usage::UsageBook,
    /// The background flatten running now (`flatten.rs`).
    flattening: flatten::Flattening,
    /// Woken when a clone is marked `flatten_pending`.
    flatten_wanted: tokio::sync::Notify,
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

/// Whether the volume's data is whole in the pool (its allocation is
/// worth asking for): ready, or kept in quarantine.
fn has_data(v: &VolumeRecord) -> bool {
    matches!(v.state, VolumeState::Ready | VolumeState::Quarantined)
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
    /// A volume put in quarantine meanwhile is gone too.
    fn reread_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord> {
        self.store
            .volume(rec.uuid)?
            .filter(|v| v.quarantine.is_none())
            .ok_or_else(|| {
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
        let store = Arc::new(store);
        PoolService {
            usage: crate::usage::UsageBook::new(store.clone()),
            store,
            backend,
            exporter,
            runner,
            settings,
            locks: ObjectLocks::default(),
            export_lock: tokio::sync::Mutex::new(()),
            progress: ProgressHub::default(),
            last_reconcile: Mutex::new(ReconcileReport::default()),
            ops: crate::metrics::Operations::default(),
            quarantined: tokio::sync::Notify::new(),
            flattening: flatten::Flattening::default(),
            flatten_wanted: tokio::sync::Notify::new(),
        }
    }

    /// The operation timings `/metrics` shows.
    pub fn operations(&self) -> &crate::metrics::Operations {
        &self.ops
    }

    /// Storage accounting: samples, records, the usage outbox.
    pub fn usage(&self) -> &crate::usage::UsageBook {
        &self.usage
    }

    /// The metadata store, for the gRPC edge's project checks.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The metadata store, shared: its event journal is WatchEvents' and
    /// the NATS publisher's source.
    pub fn shared_store(&self) -> Arc<Store> {
        self.store.clone()
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
        let allocated = if has_data(&record) {
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
        let allocated = if has_data(&record) { allocated } else { 0 };
        let exported = self.live_export(record.uuid)?.is_some();
        let snapshot_count = self
            .store
            .snapshots()?
            .iter()
            .filter(|s| s.volume == record.uuid)
            .count() as u32;
        Ok(VolumeInfo {
            flatten: self.flatten_progress(record.uuid, record.flatten_pending),
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
        let local = record.local;
        self.export_info_for(record, local)
    }

    /// The export as answered to a caller; `local`: one on this host,
    /// answered with the volume's own path.
    fn export_info_for(&self, record: ExportRecord, local: bool) -> Result<ExportInfo> {
        let (volume_name, project) = self.volume_name(record.volume)?;
        let local = local.then(|| {
            let path = self
                .backend
                .device_path(crate::backend::ObjectId::Volume(record.volume));
            let block_device = std::fs::metadata(&path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
            LocalAccess { path, block_device }
        });
        Ok(ExportInfo {
            volume_name,
            project,
            portal: self.exporter.portal(),
            exporter: if record.local {
                "local".to_string()
            } else {
                self.exporter.kind().to_string()
            },
            local,
            rbd: self
                .backend
                .native_access(crate::backend::ObjectId::Volume(record.volume))
                .filter(|_| self.exporter.native_client()),
            record,
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
            volumes: vols.iter().filter(|v| v.quarantine.is_none()).count() as u64,
            quarantined: vols.iter().filter(|v| v.quarantine.is_some()).count() as u64,
            quarantined_bytes: vols
                .iter()
                .filter(|v| v.quarantine.is_some())
                .map(|v| v.size.0)
                .sum(),
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
}

mod exports;
mod flatten;
mod quarantine;
mod reconcile;
mod snapshots;
mod volumes;

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
