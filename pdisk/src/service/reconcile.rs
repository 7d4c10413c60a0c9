//! Reconciliation at start: the store against the pool and the exporter
//! (see the module's ordering rules and ARCHITECTURE.md's crash invariants).

use crate::backend::ObjectId;
use crate::error::Result;
use crate::store::VolumeState;

use super::{now, Drift, DriftKind, PoolService, ReconcileReport};
use crate::events::{NewPoolEvent, PoolEventKind};

impl PoolService {
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
                // A purge of a quarantined volume is a delete too.
                VolumeState::Deleting => {
                    let what = if v.quarantine.is_some() {
                        "purge"
                    } else {
                        "delete"
                    };
                    match self.backend.delete(id).await {
                        Ok(()) => {
                            self.store.remove_volume(
                                v.uuid,
                                &[NewPoolEvent::volume(PoolEventKind::VolumeDeleted, &v)
                                    .detail(format!("an interrupted {what} finished at start"))],
                            )?;
                            report.actions.push(if v.quarantine.is_some() {
                                format!(
                                    "finished the interrupted purge of quarantined volume {} ({})",
                                    v.name, v.uuid
                                )
                            } else {
                                format!("finished the interrupted delete of volume {}", v.name)
                            });
                        }
                        Err(e) => report.drift.push(Drift {
                            kind: DriftKind::Volume,
                            object: v.name.to_string(),
                            detail: format!("interrupted {what} could not be finished: {e}"),
                        }),
                    }
                }
                // Never acknowledged (a create answers only once `ready`
                // is stored): roll it back. The intent to remove is stored
                // first, so a failure here is retried like any delete.
                VolumeState::Creating => {
                    v.state = VolumeState::Deleting;
                    v.state_reason = "rolling back an interrupted create".into();
                    self.store.update_volume(&v, &[])?;
                    match self.backend.delete(id).await {
                        Ok(()) => {
                            self.store.remove_volume(v.uuid, &[])?;
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
                    self.store.update_volume(&v, &[])?;
                    report.drift.push(Drift {
                        kind: DriftKind::Volume,
                        object: v.name.to_string(),
                        detail: v.state_reason.clone(),
                    });
                }
                VolumeState::Quarantined if !present.contains(&id) => {
                    report.drift.push(Drift {
                        kind: DriftKind::Volume,
                        object: v.name.to_string(),
                        detail: format!(
                            "quarantined ({}), but its backing data is missing: {}",
                            v.uuid,
                            self.backend.device_path(id).display()
                        ),
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
                        self.store.remove_snapshot(s.uuid, &[])?;
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
            "rbd" => DriftKind::Image,
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
        let drift: Vec<NewPoolEvent> = report
            .drift
            .iter()
            .map(|d| {
                let mut e = NewPoolEvent::drift(None, format!("{}: {}", d.kind, d.detail));
                e.object_name = d.object.clone();
                e
            })
            .collect();
        self.store.record(&drift)?;
        tracing::info!(
            actions = report.actions.len(),
            drift = report.drift.len(),
            "reconciled store with pool and exporter"
        );
        *self.last_reconcile.lock().unwrap() = report.clone();
        Ok(report)
    }
}
