//! A migration's journal after an agentd restart ([`Agent::reconcile_migration`]):
//! which side keeps the guest, from the record and QEMU's `query-migrate`.

use std::sync::Arc;
use std::time::Duration;

use super::status_of;
use crate::migration_tls;
use crate::service::Agent;
use crate::spec::{Cause, EventType, VmState};
use crate::store::{MigrationDirection, MigrationPhase, NewEvent, VmRecord};
use stratus_core::error::Result;

impl Agent {
    /// Reconciles a guest whose record holds a migration. Some(line) when
    /// it is done with it; None when the guest is left to the usual
    /// reconciliation (its migration undone, the guest this host's).
    pub(in crate::service) async fn reconcile_migration(
        self: &Arc<Self>,
        mut vm: VmRecord,
    ) -> Result<Option<String>> {
        let Some(m) = vm.migration.clone() else {
            return Ok(None);
        };
        let id = vm.uuid;
        // TLS files written for a QEMU just before a crash (they are
        // removed once loaded).
        migration_tls::remove(&self.vm_dir(id));
        let name = vm.spec.name.to_string();
        let rt = vm.runtime.clone().unwrap_or_default();
        let alive = rt.pid != 0 && self.vmm.is_our_qemu(rt.pid, id);
        let qmp = if alive {
            self.vmm
                .connect_qmp(&rt.qmp_socket, Duration::from_secs(10))
                .await
                .ok()
        } else {
            None
        };
        match m.direction {
            MigrationDirection::Incoming => {
                let Some((qmp, events)) = qmp else {
                    self.migration_exit(&mut vm, true).await?;
                    return Ok(Some(format!(
                        "{name}: incoming migration from {} undone (its QEMU is gone)",
                        m.peer
                    )));
                };
                let running = qmp.query_status().await?.running;
                self.qmp.lock().unwrap().insert(id, qmp);
                let line = if running {
                    self.update(
                        id,
                        |v| {
                            v.migration = None;
                            v.state = VmState::Running;
                        },
                        &[NewEvent::new(
                            EventType::Migrated,
                            Cause::Reconciliation,
                            format!("running here, from {}", m.peer),
                        )],
                    )?;
                    format!("{name}: incoming migration finished; the guest runs here")
                } else {
                    // Its source may have gone meanwhile: undone unless its
                    // stream connects within STREAM_GRACE.
                    self.watch_incoming(id);
                    format!("{name}: incoming migration still waits; followed")
                };
                self.spawn_monitor(id, rt.pid, events);
                let _ = self
                    .vmm
                    .follow_console(
                        &self.vm_dir(id),
                        self.settings.console_log_max,
                        name.clone(),
                    )
                    .await;
                Ok(Some(line))
            }
            MigrationDirection::Outgoing => {
                let mut client = self.peer(&m.peer)?;
                let Some((qmp, _events)) = qmp else {
                    if m.phase == MigrationPhase::Completed {
                        self.drop_migrated(&mut vm, Cause::Reconciliation).await?;
                        return Ok(Some(format!("{name}: migrated to {}; dropped", m.peer)));
                    }
                    self.update(
                        id,
                        |v| v.migration = None,
                        &[NewEvent::new(
                            EventType::MigrationFailed,
                            Cause::Reconciliation,
                            "the guest's QEMU ended during its migration",
                        )],
                    )?;
                    return Ok(None);
                };
                let info = qmp.execute("query-migrate", None).await?;
                let completed = status_of(&info) == "completed"
                    || self
                        .cancel_outgoing(
                            id,
                            qmp.as_ref(),
                            &mut client,
                            "interrupted by an agent restart",
                            Cause::Reconciliation,
                        )
                        .await?
                        .is_some();
                if !completed {
                    // The guest stays here: adopted as usual, on a new
                    // QMP connection.
                    drop(qmp);
                    return Ok(None);
                }
                let _ = qmp.quit().await;
                self.finish_outgoing(id, None, &mut client, Cause::Reconciliation)
                    .await?;
                Ok(Some(format!("{name}: migrated to {}; dropped", m.peer)))
            }
        }
    }
}
