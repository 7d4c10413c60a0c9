//! Snapshots (create, list, delete) and whole-object checksums.

use uuid::Uuid;

use crate::backend::checksum::sha256_sparse;
use crate::backend::ObjectId;
use crate::error::{Error, Result};
use crate::store::{SnapshotRecord, VolumeState};
use crate::types::VolumeName;

use super::{now, require_ready, Checksum, PoolService, SnapshotInfo};
use crate::events::{NewPoolEvent, PoolEventKind};

impl PoolService {
    pub async fn create_snapshot(
        &self,
        volume: &str,
        name: VolumeName,
        request_id: &str,
    ) -> Result<SnapshotInfo> {
        let op = self.progress.start(request_id)?;
        let started = std::time::Instant::now();
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
            // The new snapshot's own lock, held until it is complete: from
            // the insert on, a delete (or a clone, a checksum) can find it by
            // name, and must wait for it rather than remove it half-made (a
            // delete between the insert and the commit left the file without
            // a record, or the commit put back a record without its file).
            let _own = self.locks.lock(rec.uuid).await;
            self.store.insert_snapshot(&rec)?;
            crate::failpoints::crash_point("service::snapshot::after_intent");
            if let Err(e) = self
                .backend
                .snapshot(ObjectId::Volume(vol.uuid), rec.uuid, op.reporter())
                .await
            {
                let _ = self.backend.delete(ObjectId::Snapshot(rec.uuid)).await;
                let _ = self.store.remove_snapshot(rec.uuid, &[]);
                return Err(e.context(format!("snapshot {} of {}", rec.name, vol.name)));
            }
            crate::failpoints::crash_point("service::snapshot::before_commit");
            rec.complete = true;
            self.store.update_snapshot(
                &rec,
                &[NewPoolEvent::volume(PoolEventKind::SnapshotCreated, &vol)
                    .object(rec.uuid, rec.name.to_string())],
            )?;
            tracing::info!(snapshot = %rec.name, volume = %vol.name, "snapshot created");
            let allocated = self
                .backend
                .allocated(ObjectId::Snapshot(rec.uuid))
                .await
                .unwrap_or(0);
            self.snapshot_info(rec, allocated)
        }
        .await;
        self.ops
            .observe(crate::metrics::Op::Snapshot, &result, started);
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
        self.store.update_snapshot(&s, &[])?;
        crate::failpoints::crash_point("service::delete_snapshot::after_intent");
        self.backend.delete(ObjectId::Snapshot(s.uuid)).await?;
        let deleted: Vec<NewPoolEvent> = self
            .store
            .volume(s.volume)?
            .iter()
            .map(|v| {
                NewPoolEvent::volume(PoolEventKind::SnapshotDeleted, v)
                    .object(s.uuid, s.name.to_string())
            })
            .collect();
        self.store.remove_snapshot(s.uuid, &deleted)?;
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
            if let Some(streamed) = self.backend.checksum(id, size, report.clone()) {
                let sha256 = streamed.await?;
                tracing::info!(object = %what, %sha256, size, "checksum computed");
                return Ok(Checksum { sha256, size });
            }
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
}
