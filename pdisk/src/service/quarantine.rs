//! Quarantine: a deleted volume's data is kept for the quarantine period
//! (`--quarantine-period`), so a tenant's wrong delete can be undone.
//!
//! - Entering: a delete of a ready volume (not exported, no snapshots, not
//!   an image base: those can be imported again) turns its record
//!   `quarantined` with its purge time and frees its name, in one store
//!   transaction with VOLUME_QUARANTINED. Nothing moves in the pool.
//! - While there: NotFound to every call but RestoreVolume, ListVolumes
//!   with `quarantined` and an admin's delete `now` by UUID; counted in its
//!   project's bytes, not its volumes; its name may be taken by a new volume.
//! - Restore: under its name (AlreadyExists when taken meanwhile) or a new
//!   one; the name check, the project's volume quota and the record change
//!   in one transaction, with VOLUME_RESTORED.
//! - Purge: [`PoolService::watch_quarantine`] (a task of pdiskd's) purges
//!   each volume once its purge time has passed. The purge is an ordinary
//!   delete: the record turns `deleting` first (keeping its `quarantine`),
//!   then the data goes, then the record, with VOLUME_DELETED. A crash in
//!   between leaves a `deleting` record that reconciliation finishes at the
//!   next start (and reports); the purge time lives in the store, so a
//!   restart neither forgets nor delays a purge.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::backend::ObjectId;
use crate::error::{Error, Result};
use crate::events::{NewPoolEvent, PoolEventKind};
use crate::store::{NameScope, Quarantine, VolumeRecord, VolumeState};
use crate::types::VolumeName;

use super::{is_image_base, now, PoolService, VolumeInfo};

/// The purge task looks again at least this often (a purge that failed is
/// retried then).
const PURGE_RECHECK: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PoolService {
    /// Whether a delete of `v` goes to quarantine: there is a quarantine
    /// period and the volume is ready and not an image base (a base is the
    /// image, imported again when needed; a volume in error has no whole
    /// data to keep).
    pub(super) fn quarantines(&self, v: &VolumeRecord) -> bool {
        !self.settings.quarantine_period.is_zero()
            && v.state == VolumeState::Ready
            && !is_image_base(v)
    }

    /// Puts `rec` (locked, checked by the delete) in quarantine; returns its
    /// purge time (RFC 3339).
    pub(super) fn quarantine_locked(&self, mut rec: VolumeRecord) -> Result<String> {
        let period = self.settings.quarantine_period.as_millis() as u64;
        let q = Quarantine {
            deleted_at: now(),
            purge_at_ms: now_ms().saturating_add(period),
        };
        let purge_at = q.purge_at();
        rec.state = VolumeState::Quarantined;
        rec.state_reason = format!("deleted; restorable until {purge_at}");
        rec.quarantine = Some(q);
        let event = NewPoolEvent::volume(PoolEventKind::VolumeQuarantined, &rec)
            .detail(format!("purge at {purge_at}"));
        self.store.quarantine_volume(&rec, &[event])?;
        self.quarantined.notify_one();
        tracing::info!(volume = %rec.name, uuid = %rec.uuid, purge_at = %purge_at, "volume quarantined");
        Ok(purge_at)
    }

    /// Destroys a quarantined volume's data and drops its record (`rec`
    /// locked), as a delete does: intent first, so a crash leaves a
    /// `deleting` record reconciliation finishes.
    pub(super) async fn purge_locked(&self, mut rec: VolumeRecord, why: &str) -> Result<()> {
        self.wait_for_flatten(rec.uuid).await;
        rec.state = VolumeState::Deleting;
        rec.state_reason = format!("being purged: {why}");
        self.store.update_volume(&rec, &[])?;
        crate::failpoints::crash_point("service::purge::after_intent");
        self.backend
            .delete(ObjectId::Volume(rec.uuid))
            .await
            .map_err(|e| e.context(format!("purging quarantined volume {}", rec.name)))?;
        crate::failpoints::crash_point("service::purge::after_backend");
        self.store.remove_volume(
            rec.uuid,
            &[NewPoolEvent::volume(PoolEventKind::VolumeDeleted, &rec).detail(why)],
        )?;
        self.locks.forget(rec.uuid);
        tracing::info!(volume = %rec.name, uuid = %rec.uuid, why, "quarantined volume purged");
        Ok(())
    }

    /// The volumes in quarantine (also those being purged), by name.
    pub async fn list_quarantined(&self) -> Result<Vec<VolumeInfo>> {
        let allocated = self.allocations().await;
        self.store
            .quarantined_volumes()?
            .into_iter()
            .map(|v| {
                let a = allocated
                    .get(&ObjectId::Volume(v.uuid))
                    .copied()
                    .unwrap_or(0);
                self.volume_info_with(v, a)
            })
            .collect()
    }

    /// Brings quarantined volume `r` (its UUID, or a name only one
    /// quarantined volume has) back, ready, as `new_name` or its own name.
    pub async fn restore_volume(
        &self,
        r: &str,
        new_name: Option<VolumeName>,
    ) -> Result<VolumeInfo> {
        let found = self.store.find_quarantined_in(NameScope::All, r)?;
        let _g = self.locks.lock(found.uuid).await;
        let rec = self
            .store
            .volume(found.uuid)?
            .filter(VolumeRecord::is_quarantined)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "volume {} ({}) is no longer in quarantine",
                    found.name, found.uuid
                ))
            })?;
        let mut restored = rec.clone();
        restored.state = VolumeState::Ready;
        restored.state_reason.clear();
        restored.quarantine = None;
        let mut event = NewPoolEvent::volume(PoolEventKind::VolumeRestored, &restored);
        if let Some(n) = new_name {
            event = NewPoolEvent::volume(
                PoolEventKind::VolumeRestored,
                &VolumeRecord {
                    name: n.clone(),
                    ..restored.clone()
                },
            )
            .detail(format!("deleted as {}", rec.name));
            restored.name = n;
        }
        self.store.restore_volume(&restored, &[event])?;
        tracing::info!(volume = %restored.name, uuid = %restored.uuid, "volume restored from quarantine");
        self.volume_info(restored).await
    }

    /// Purges every quarantined volume whose purge time is `now_ms` or
    /// earlier, and retries purges that failed; returns the names purged.
    /// A volume restored meanwhile is left alone (each is re-read under its
    /// lock).
    pub async fn purge_due(&self, now_ms: u64) -> Result<Vec<String>> {
        let mut purged = Vec::new();
        for v in self.store.quarantined_volumes()? {
            let due = |v: &VolumeRecord| {
                v.state == VolumeState::Deleting
                    || v.quarantine
                        .as_ref()
                        .is_some_and(|q| q.purge_at_ms <= now_ms)
            };
            if !due(&v) {
                continue;
            }
            let _g = self.locks.lock(v.uuid).await;
            let Some(v) = self.store.volume(v.uuid)? else {
                continue;
            };
            if v.quarantine.is_none() || !due(&v) {
                continue;
            }
            let name = v.name.to_string();
            match self.purge_locked(v, "purged: its quarantine ended").await {
                Ok(()) => purged.push(name),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "purge failed; retried later")
                }
            }
        }
        Ok(purged)
    }

    /// pdiskd's purge task: purges what is due now, then sleeps until the
    /// next purge time (at most [`PURGE_RECHECK`]), woken early when a
    /// volume enters quarantine. Ends with `shutdown`.
    pub async fn watch_quarantine(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            if let Err(e) = self.purge_due(now_ms()).await {
                tracing::warn!(error = %e, "quarantine purge failed; retried later");
            }
            let next = self.store.quarantined_volumes().ok().and_then(|vs| {
                // Failed purges (`deleting`) wait for the recheck.
                vs.iter()
                    .filter(|v| v.is_quarantined())
                    .filter_map(|v| v.quarantine.as_ref().map(|q| q.purge_at_ms))
                    .min()
            });
            let wait = next
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
                .unwrap_or(PURGE_RECHECK)
                .clamp(Duration::from_millis(200), PURGE_RECHECK);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.quarantined.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
