//! Volumes: get, list, create (empty, server-side import, upload, clone of a
//! volume or snapshot), delete (at once, or into quarantine:
//! `quarantine.rs`) and resize; the create's rollback.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::backend::ProgressFn;
use crate::backend::{image, ImageFormat, ObjectId};
use crate::error::{Error, Result};
use crate::events::{NewPoolEvent, PoolEventKind};
use crate::metrics::Op;
use crate::store::{NameScope, Source, VolumeRecord, VolumeState};
use crate::types::{validate_labels, ByteSize, Labels, VolumeName};

use super::{
    is_image_base, now, refuse_if_image_base, require_ready, Deleted, Held, NewVolume,
    NewVolumeSource, Owner, PoolService, VolumeInfo,
};

impl PoolService {
    pub async fn get_volume(&self, r: &str) -> Result<VolumeInfo> {
        let rec = self.store.find_volume(r)?;
        self.volume_info(rec).await
    }

    pub async fn list_volumes(&self, selector: &Labels) -> Result<Vec<VolumeInfo>> {
        let allocated = self.allocations().await;
        self.store
            .volumes()?
            .into_iter()
            .filter(|v| v.quarantine.is_none())
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
        let started = std::time::Instant::now();
        let kind = match &req.source {
            NewVolumeSource::Empty => Op::Create,
            NewVolumeSource::Volume(_) | NewVolumeSource::Snapshot(_) => Op::Clone,
            NewVolumeSource::ImageFile { .. } | NewVolumeSource::Upload { .. } => Op::Import,
        };
        let result = self.create_volume_inner(req, &op).await;
        self.ops.observe(kind, &result, started);
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
        // Fail early, before any work, when the name is taken (in the
        // project: names are unique per project).
        if self.store.volume_name_taken(&req.owner.project, name)? {
            return Err(Error::exists(format!("volume {name} already exists")));
        }
        let progress = op.reporter();

        // Resolve the source and hold its lock for the whole copy (shared
        // when the source never changes, see `ObjectLocks`).
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
                // An image base is never written (its labels never change
                // either): its clones share its lock and run at once.
                let g = if is_image_base(&src) {
                    Held::Shared(self.locks.share(src.uuid).await)
                } else {
                    Held::Exclusive(self.locks.lock(src.uuid).await)
                };
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
                // A snapshot never changes: its clones run at once.
                let g = Held::Shared(self.locks.share(s.uuid).await);
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
            allow_multi_attach: req.allow_multi_attach,
            quarantine: None,
            flatten_pending: false,
        };
        self.store.insert_volume(&rec)?;
        crate::failpoints::crash_point("service::create::after_intent");
        let _own = self.locks.lock(rec.uuid).await;
        let is_import = matches!(plan, Plan::Image(..));
        let progress = if is_import {
            self.import_progress(&rec, progress)
        } else {
            progress
        };
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
                let started = std::time::Instant::now();
                let r = self
                    .backend
                    .import(rec.uuid, &path, format, size.0, progress)
                    .await;
                if r.is_ok() {
                    self.ops.imported(written, started);
                }
                r
            }
        };
        if let Err(e) = built {
            if is_import {
                let failed = NewPoolEvent::volume(PoolEventKind::ImportFailed, &rec)
                    .detail(format!("{}: {e}", rec.source.describe()));
                if let Err(e) = self.store.record(&[failed]) {
                    tracing::warn!(volume = %rec.name, error = %e, "could not journal a failed import");
                }
            }
            self.roll_back_create(&rec).await;
            return Err(e.context(format!("creating volume {}", rec.name)));
        }
        if is_image_base(&rec) {
            if let Err(e) = self.backend.set_read_only(ObjectId::Volume(rec.uuid)).await {
                self.roll_back_create(&rec).await;
                return Err(e.context(format!("volume {}", rec.name)));
            }
        }
        // A clone past the backend's maximum clone depth is published now
        // and flattened in the background (`flatten.rs`); when the depth
        // cannot be read, it is marked anyway (flattening a flat volume
        // does nothing).
        if matches!(rec.source, Source::Volume(_) | Source::Snapshot(_)) {
            rec.flatten_pending = match self.backend.wants_flatten(ObjectId::Volume(rec.uuid)).await
            {
                Ok(wants) => wants,
                Err(e) => {
                    tracing::warn!(volume = %rec.name, error = %e, "clone depth not read; marked for flattening");
                    true
                }
            };
        }
        crate::failpoints::crash_point("service::create::before_commit");
        rec.state = VolumeState::Ready;
        let appeared = match &rec.source {
            Source::Empty => NewPoolEvent::volume(PoolEventKind::VolumeCreated, &rec),
            Source::Volume(u) | Source::Snapshot(u) => {
                let source_name = match &rec.source {
                    Source::Volume(_) => self.store.volume(*u)?.map(|v| v.name.to_string()),
                    _ => self.store.snapshot(*u)?.map(|s| s.name.to_string()),
                };
                NewPoolEvent::volume(PoolEventKind::VolumeCloned, &rec)
                    .object(u, source_name.unwrap_or_default())
            }
            Source::Image(_) => NewPoolEvent::volume(PoolEventKind::ImportFinished, &rec)
                .detail(rec.source.describe()),
        };
        self.store.update_volume(&rec, &[appeared])?;
        if rec.flatten_pending {
            self.flatten_wanted.notify_one();
        }
        tracing::info!(volume = %rec.name, uuid = %rec.uuid, size = rec.size.0, source = %rec.source.describe(),
            flatten_pending = rec.flatten_pending, "volume created");
        self.volume_info(rec).await
    }

    /// The import's progress reporter, also journaling IMPORT_PROGRESS at
    /// each tenth done (the journal is no progress bar; WatchProgress is).
    fn import_progress(&self, rec: &VolumeRecord, inner: ProgressFn) -> ProgressFn {
        use std::sync::atomic::{AtomicU64, Ordering};
        let store = self.store.clone();
        let base = NewPoolEvent::volume(PoolEventKind::ImportProgress, rec);
        let next_tenth = AtomicU64::new(1);
        std::sync::Arc::new(move |phase: &str, done: u64, total: u64| {
            inner(phase, done, total);
            if total == 0 {
                return;
            }
            let tenth = done.saturating_mul(10) / total;
            if tenth < 10 && tenth >= next_tenth.load(Ordering::Relaxed) {
                next_tenth.store(tenth + 1, Ordering::Relaxed);
                let e = base.clone().progress(done, total).detail(phase);
                if let Err(err) = store.record(&[e]) {
                    tracing::warn!(volume = %base.volume_name, error = %err, "could not journal import progress");
                }
            }
        })
    }

    /// Undoes a create that failed before it was acknowledged: its data
    /// (published or staged) and its record go. When the data cannot be
    /// removed the record stays, as `deleting`, for reconciliation or the
    /// next DeleteVolume to finish.
    async fn roll_back_create(&self, rec: &VolumeRecord) {
        let gone = self.backend.delete(ObjectId::Volume(rec.uuid)).await;
        let dropped = match gone {
            Ok(()) => self.store.remove_volume(rec.uuid, &[]),
            Err(e) => {
                tracing::error!(volume = %rec.name, error = %e, "could not remove the data of a failed create; left as deleting");
                let mut r = rec.clone();
                r.state = VolumeState::Deleting;
                r.state_reason = format!("create failed and its data could not be removed: {e}");
                self.store.update_volume(&r, &[])
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
            allow_multi_attach: false,
            name,
            size,
            labels,
            source,
            request_id: request_id.to_owned(),
            owner: Owner::default(),
        })
        .await
    }

    /// Deletes a volume as the settings say: into quarantine when there is
    /// a quarantine period (see [`PoolService::quarantines`]), else at once.
    pub async fn delete_volume(&self, r: &str) -> Result<Deleted> {
        self.delete_volume_as(r, false).await
    }

    /// [`PoolService::delete_volume`]; with `at_once`, the data is
    /// destroyed now whatever the quarantine period (the edge lets only
    /// admins ask), and `r` may name a volume already in quarantine (by
    /// UUID), which is then purged.
    pub async fn delete_volume_as(&self, r: &str, at_once: bool) -> Result<Deleted> {
        let started = std::time::Instant::now();
        let result = self.delete_volume_locked(r, at_once).await;
        self.ops.observe(Op::Delete, &result, started);
        result
    }

    async fn delete_volume_locked(&self, r: &str, at_once: bool) -> Result<Deleted> {
        let rec = match self.store.find_volume(r) {
            Err(e) if at_once && e.kind() == crate::error::ErrorKind::NotFound => self
                .store
                .find_quarantined_in(NameScope::All, r)
                .map_err(|_| e)?,
            found => found?,
        };
        let _g = self.locks.lock(rec.uuid).await;
        let gone = || Error::not_found(format!("volume {} ({}) not found", rec.name, rec.uuid));
        let mut rec = self.store.volume(rec.uuid)?.ok_or_else(gone)?;
        if rec.quarantine.is_some() {
            // Put in quarantine (or purged) while this call waited, or
            // named in quarantine by an admin's delete --now.
            if !(at_once && rec.is_quarantined()) {
                return Err(gone());
            }
            self.purge_locked(rec, "purged from quarantine at once by an admin's delete")
                .await?;
            return Ok(Deleted::Gone);
        }
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
        if !at_once && self.quarantines(&rec) {
            let purge_at = self.quarantine_locked(rec)?;
            return Ok(Deleted::Quarantined { purge_at });
        }
        // A background flatten of it ends first (see `flatten.rs`).
        self.wait_for_flatten(rec.uuid).await;
        rec.state = VolumeState::Deleting;
        self.store.update_volume(&rec, &[])?;
        crate::failpoints::crash_point("service::delete::after_intent");
        self.backend.delete(ObjectId::Volume(rec.uuid)).await?;
        crate::failpoints::crash_point("service::delete::after_backend");
        self.store.remove_volume(
            rec.uuid,
            &[NewPoolEvent::volume(PoolEventKind::VolumeDeleted, &rec)],
        )?;
        self.locks.forget(rec.uuid);
        tracing::info!(volume = %rec.name, uuid = %rec.uuid, "volume deleted");
        Ok(Deleted::Gone)
    }

    /// Makes a clone independent of its parent (see the Backend's
    /// `flatten`), under the volume's lock, with progress as "flatten".
    pub async fn flatten_volume(&self, r: &str, request_id: &str) -> Result<VolumeInfo> {
        let op = self.progress.start(request_id)?;
        let result = async {
            let rec = self.store.find_volume(r)?;
            let _g = self.locks.lock(rec.uuid).await;
            let mut rec = self.reread_volume(&rec)?;
            require_ready(&rec)?;
            // One flatten at a time: a background one of it ends first.
            self.wait_for_flatten(rec.uuid).await;
            let flattened = self
                .backend
                .flatten(ObjectId::Volume(rec.uuid), op.reporter())
                .await
                .map_err(|e| e.context(format!("volume {}", rec.name)))?;
            if rec.flatten_pending {
                rec.flatten_pending = false;
                let done = NewPoolEvent::volume(PoolEventKind::VolumeFlattened, &rec);
                self.store.update_volume(&rec, &[done])?;
            }
            tracing::info!(volume = %rec.name, flattened, "flatten");
            self.volume_info(rec).await
        }
        .await;
        op.finish(&result);
        result
    }

    pub async fn resize_volume(&self, r: &str, size: u64) -> Result<VolumeInfo> {
        let started = std::time::Instant::now();
        let result = self.resize_volume_now(r, size).await;
        self.ops.observe(Op::Resize, &result, started);
        result
    }

    async fn resize_volume_now(&self, r: &str, size: u64) -> Result<VolumeInfo> {
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
        self.store.update_volume(
            &rec,
            &[NewPoolEvent::volume(PoolEventKind::VolumeResized, &rec)],
        )?;
        crate::failpoints::crash_point("service::resize::after_commit");
        if let Some(exp) = self.store.export(rec.uuid)?.filter(|e| !e.local) {
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
}
