//! Exports: intent stored, then applied to the exporter; unexports commit
//! first; `restore_exports` re-applies stored intent and `watch_exports`
//! does so every `export_check_interval` (the watchdog).

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::backend::ObjectId;
use crate::error::{Error, ErrorKind, Result};
use crate::export::{ExportSpec, RestoreReport};
use crate::store::ExportRecord;
use crate::types::{Chap, Iqn};

use super::{refuse_if_image_base, require_ready, ExportBy, ExportInfo, PoolService};
use crate::events::{NewPoolEvent, PoolEventKind};

impl PoolService {
    pub(super) fn export_spec(&self, e: &ExportRecord) -> ExportSpec {
        ExportSpec {
            target_iqn: e.target_iqn.clone(),
            backing_path: self.backend.device_path(ObjectId::Volume(e.volume)),
            initiators: e.initiators.clone(),
            chap: e.chap.clone(),
        }
    }

    /// Adds `initiators` to the volume's export (creating it), and sets its
    /// CHAP account when `chap` is given. Initiators and CHAP are parsed at
    /// the edge (gRPC, CLI), which also fences an agent to its own IQN.
    ///
    /// Export fencing: every export is read-write, so an initiator added to
    /// an ACL that holds (or would hold) another is a second host on the
    /// same blocks; that needs `by.multi_attach` and a volume that allows it
    /// (FailedPrecondition otherwise), or `by.migration`: a live migration's
    /// destination, the one second host of an export that holds exactly
    /// one, until one of the two is unexported (see
    /// [`crate::store::ExportMigration`]). An existing CHAP account is
    /// replaced only by whoever set it, an admin, or a migration's
    /// destination (PermissionDenied otherwise).
    pub async fn export_volume(
        &self,
        volume: &str,
        initiators: &[Iqn],
        chap: Option<Chap>,
        by: &ExportBy,
    ) -> Result<ExportInfo> {
        let started = std::time::Instant::now();
        let result = self.export_volume_now(volume, initiators, chap, by).await;
        self.ops
            .observe(crate::metrics::Op::Export, &result, started);
        result
    }

    async fn export_volume_now(
        &self,
        volume: &str,
        initiators: &[Iqn],
        chap: Option<Chap>,
        by: &ExportBy,
    ) -> Result<ExportInfo> {
        if initiators.is_empty() {
            return Err(Error::invalid(format!(
                "export of {volume}: at least one initiator IQN is required"
            )));
        }
        if by.migration && (!by.multi_attach || initiators.len() != 1) {
            return Err(Error::invalid(format!(
                "export of {volume}: a migration's export is one second host: \
                 it needs multi_attach and exactly one initiator"
            )));
        }
        // With no target (rbd), or one that can't check it (nvmet without
        // DH-HMAC-CHAP), there is no CHAP to check: not kept.
        if chap.is_some() && !self.exporter.authenticates() {
            tracing::warn!(
                volume,
                exporter = self.exporter.kind(),
                "export: CHAP dropped, this exporter can't authenticate initiators \
                 (the initiator list is the only access control)"
            );
        }
        let chap = chap.filter(|_| !self.exporter.native_client() && self.exporter.authenticates());
        // An agent on this storage host opens the volume itself (issue 16).
        let here = self.is_this_host(by);
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
                chap_set_by: None,
                unexporting: false,
                local: here,
                migration: None,
            });
        // A host elsewhere needs a target, from now on.
        if !here {
            rec.local = false;
        }
        let mut added = Vec::new();
        for i in initiators {
            if !rec.initiators.contains(i) && !added.contains(i) {
                added.push(i.clone());
            }
        }
        // A migration's destination joining the source: bounded to the two.
        let migrating = by.migration
            && added.len() == 1
            && rec.initiators.len() == 1
            && rec.migration.is_none();
        if !added.is_empty() && rec.initiators.len() + added.len() > 1 {
            let hosts: Vec<&str> = rec
                .initiators
                .iter()
                .chain(&added)
                .map(Iqn::as_str)
                .collect();
            if by.migration && !migrating && !vol.allow_multi_attach {
                return Err(Error::precondition(format!(
                    "volume {} would be exported read-write to {} hosts ({}): \
                     a migration adds one second host to an export held by one",
                    vol.name,
                    hosts.len(),
                    hosts.join(", ")
                )));
            }
            if !by.multi_attach {
                return Err(Error::precondition(format!(
                    "volume {} would be exported read-write to {} hosts ({}): \
                     a second host needs multi_attach on a volume that allows it",
                    vol.name,
                    hosts.len(),
                    hosts.join(", ")
                )));
            }
            if !vol.allow_multi_attach && !migrating {
                return Err(Error::precondition(format!(
                    "volume {} does not allow multi-attach (create it with \
                     allow_multi_attach); it cannot be exported to {} hosts",
                    vol.name,
                    hosts.len()
                )));
            }
        }
        if migrating {
            rec.migration = Some(crate::store::ExportMigration {
                incoming: added[0].clone(),
                previous_chap: rec.chap.clone(),
                previous_chap_set_by: rec.chap_set_by.clone(),
            });
        }
        if let Some(new) = &chap {
            let owned_elsewhere = rec.chap.as_ref().is_some_and(|old| old != new)
                && !by.admin
                && !migrating
                && rec
                    .chap_set_by
                    .as_deref()
                    .is_some_and(|setter| setter != by.caller);
            if owned_elsewhere {
                return Err(Error::denied(format!(
                    "volume {}: its export's CHAP account was set by {}; only that caller \
                     or an admin may replace it",
                    vol.name,
                    rec.chap_set_by.as_deref().unwrap_or("?")
                )));
            }
            rec.chap_set_by = Some(by.caller.clone());
        }
        rec.initiators.extend(added);
        if chap.is_some() {
            rec.chap = chap;
        }
        // Announced with the intent: from here on reconciliation makes the
        // export exist, and a failed exporter call below is announced undone.
        self.store.put_export(
            &rec,
            &[NewPoolEvent::volume(PoolEventKind::ExportAdded, &vol)
                .detail(initiators_detail(&rec))],
        )?;
        crate::failpoints::crash_point("service::export::after_intent");
        let served = if rec.local {
            Ok(())
        } else {
            self.exporter.export(&self.export_spec(&rec)).await
        };
        if let Err(e) = served {
            // Put the intent back as it was: nothing changed.
            let why = format!("the exporter failed: {e}");
            match &previous {
                Some(p) => self.store.put_export(
                    p,
                    &[NewPoolEvent::volume(PoolEventKind::ExportAdded, &vol)
                        .detail(format!("{}; restored ({why})", initiators_detail(p)))],
                )?,
                None => {
                    self.store.remove_export(
                        vol.uuid,
                        &[NewPoolEvent::volume(PoolEventKind::ExportRemoved, &vol).detail(why)],
                    )?;
                }
            }
            return Err(e.context(format!("exporting volume {}", vol.name)));
        }
        crate::failpoints::crash_point("service::export::after_exporter");
        tracing::info!(volume = %vol.name, target = %rec.target_iqn,
            initiators = ?rec.initiators.iter().map(Iqn::as_str).collect::<Vec<_>>(),
            chap = rec.chap.is_some(), local = here, "volume exported");
        self.export_info_for(rec, here)
    }

    /// True when `by` runs on this storage host (the same host id) and the
    /// volumes are files or devices here (not rbd, which has no path).
    fn is_this_host(&self, by: &ExportBy) -> bool {
        !self.exporter.native_client()
            && self.settings.host_id.is_some()
            && by.host_id == self.settings.host_id
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
        // A migration ends with either host's unexport: the source's
        // leaves the destination's account; the destination's (a failed
        // migration) puts the source's back.
        if rec.initiators.len() <= 1 {
            if let Some(m) = rec.migration.take() {
                if !rec.initiators.contains(&m.incoming) {
                    rec.chap = m.previous_chap;
                    rec.chap_set_by = m.previous_chap_set_by;
                }
            }
        }
        // The revocation is committed before the exporter changes: if the
        // exporter fails or pdiskd dies now, reconciliation and the watchdog
        // apply the stored revocation, never the old ACL.
        if remove.is_empty() || rec.initiators.is_empty() {
            rec.unexporting = true;
            self.store.put_export(
                &rec,
                &[NewPoolEvent::volume(PoolEventKind::ExportRemoved, &vol)],
            )?;
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
        self.store.put_export(
            &rec,
            &[NewPoolEvent::volume(PoolEventKind::ExportAdded, &vol)
                .detail(initiators_detail(&rec))],
        )?;
        crate::failpoints::crash_point("service::unexport_initiators::after_commit");
        let served = if rec.local {
            Ok(())
        } else {
            self.exporter.export(&self.export_spec(&rec)).await
        };
        served.map_err(|e| {
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
    pub(super) async fn finish_unexport(&self, rec: &ExportRecord) -> Result<()> {
        if !rec.local {
            self.exporter.unexport(&rec.target_iqn).await?;
        }
        crate::failpoints::crash_point("service::unexport::after_exporter");
        self.store.remove_export(rec.volume, &[])?;
        Ok(())
    }

    /// The export of `volume` unless none or its unexport is committed.
    pub(super) fn live_export(&self, volume: Uuid) -> Result<Option<ExportRecord>> {
        Ok(self.store.export(volume)?.filter(|e| !e.unexporting))
    }

    /// Every export but those whose unexport is committed.
    pub(super) fn live_exports(&self) -> Result<Vec<ExportRecord>> {
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

    /// Finishes committed unexports, then re-applies every stored export
    /// whose target is missing or different.
    pub async fn restore_exports(&self) -> Result<RestoreReport> {
        Ok(self.restore_exports_reporting().await?.1)
    }

    /// [`Self::restore_exports`], also naming the targets of the unexports
    /// it finished.
    pub(super) async fn restore_exports_reporting(&self) -> Result<(Vec<String>, RestoreReport)> {
        let _e = self.export_lock.lock().await;
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        let mut specs = Vec::new();
        for e in self.store.exports()? {
            if e.local && !e.unexporting {
                // No target to make: its agent opens the volume here.
                continue;
            }
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

/// `initiators=a,b` of an export, for its events.
fn initiators_detail(rec: &ExportRecord) -> String {
    let names: Vec<&str> = rec.initiators.iter().map(Iqn::as_str).collect();
    format!("initiators={}", names.join(","))
}
