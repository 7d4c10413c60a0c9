//! One monitor task per running guest: QEMU's QMP events become journal
//! events (and the guest's state) as they come, and when QEMU goes away the
//! monitor records how it ended and undoes the guest's attachments.
//!
//! QMP event → journal: STOP → PAUSED, RESUME → RESUMED, RESET → REBOOTED,
//! BLOCK_IO_ERROR → DISK_IO_ERROR; SHUTDOWN and GUEST_PANICKED are kept and
//! decide, at the close, between STOPPED (cause api, guest or host) and
//! CRASHED (guest panic, or QEMU gone without a shutdown). WatchEvents
//! streams the journal ([`crate::journal::EventJournal::follow`]).

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::Agent;
use crate::qmp::{QmpEventKind, QmpEvents};
use crate::spec::{Cause, EventType, VmState};
use crate::store::NewEvent;
use stratus_core::error::Result;

impl Agent {
    /// Starts the monitor of guest `id`, whose QEMU is `pid`.
    pub(super) fn spawn_monitor(self: &Arc<Self>, id: Uuid, pid: u32, events: QmpEvents) {
        let _task = tokio::spawn(self.clone().monitor(id, pid, events));
        #[cfg(test)]
        self.monitors.lock().unwrap().push(_task.abort_handle());
    }

    /// Follows one QEMU's QMP events until it exits, then records how it
    /// ended and undoes its attachments.
    async fn monitor(self: Arc<Self>, id: Uuid, pid: u32, mut events: QmpEvents) {
        let mut shutdown: Option<(bool, String)> = None;
        let mut panicked = false;
        while let Some(ev) = events.recv().await {
            let r = match ev.kind {
                QmpEventKind::Closed => break,
                QmpEventKind::Shutdown { guest, reason } => {
                    shutdown = Some((guest, reason.to_string()));
                    Ok(())
                }
                QmpEventKind::GuestPanicked { .. } => {
                    panicked = true;
                    Ok(())
                }
                QmpEventKind::Stop => {
                    self.transition(id, VmState::Paused, EventType::Paused, Cause::Api, "")
                        .await
                }
                QmpEventKind::Resume => {
                    self.transition(id, VmState::Running, EventType::Resumed, Cause::Api, "")
                        .await
                }
                QmpEventKind::Reset { guest, reason } => {
                    let cause = if guest { Cause::Guest } else { Cause::Api };
                    self.transition(
                        id,
                        VmState::Running,
                        EventType::Rebooted,
                        cause,
                        reason.as_str(),
                    )
                    .await
                }
                QmpEventKind::BlockIoError {
                    device,
                    node_name,
                    operation,
                    action,
                    reason,
                    ..
                } => {
                    self.note(
                        id,
                        EventType::DiskIoError,
                        Cause::Qemu,
                        format!(
                            "{} {operation} failed ({reason}); QEMU will {action}",
                            node_name.unwrap_or(device)
                        ),
                    )
                    .await
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::error!(vm = %id, error = %e, "recording a QEMU event");
            }
        }
        // The QMP socket closed: QEMU is exiting. Give it a moment, then
        // make sure it is gone.
        if !self.vmm.wait_gone(pid, id, Duration::from_secs(10)).await {
            self.vmm.kill(pid);
            self.vmm.wait_gone(pid, id, Duration::from_secs(5)).await;
        }
        if let Err(e) = self.record_exit(id, shutdown, panicked, false).await {
            tracing::error!(vm = %id, error = %e, "recording a guest's exit");
        }
    }

    /// Commits a state change caused by QEMU, unless the guest is stopping
    /// (a STOP during shutdown is not a pause).
    async fn transition(
        &self,
        id: Uuid,
        state: VmState,
        kind: EventType,
        cause: Cause,
        detail: &str,
    ) -> Result<()> {
        let Some(mut vm) = self.store.vm(id)? else {
            return Ok(());
        };
        if let Some(m) = &vm.migration {
            // The destination's QEMU resumes the guest after the
            // switchover: from here on it is this host's.
            if vm.is_incoming() && kind == EventType::Resumed {
                self.crash_point("incoming.resumed");
                let detail = format!("running here, from {}", m.peer);
                vm.migration = None;
                vm.state = VmState::Running;
                self.commit(
                    &mut vm,
                    &[NewEvent::new(EventType::Migrated, Cause::Api, detail)],
                )?;
                return Ok(());
            }
            // A migration pauses the source's guest on its way out (and a
            // failed one resumes it): not the tenant's pause.
            if matches!(kind, EventType::Paused | EventType::Resumed) {
                return Ok(());
            }
        }
        if matches!(vm.state, VmState::Stopping | VmState::Starting) && kind != EventType::Rebooted
        {
            return Ok(());
        }
        vm.state = state;
        self.commit(&mut vm, &[NewEvent::new(kind, cause, detail)])?;
        Ok(())
    }

    async fn note(&self, id: Uuid, kind: EventType, cause: Cause, detail: String) -> Result<()> {
        if let Some(mut vm) = self.store.vm(id)? {
            self.commit(&mut vm, &[NewEvent::new(kind, cause, detail)])?;
        }
        Ok(())
    }

    /// Records how a guest's QEMU ended and undoes its attachments.
    pub(super) async fn record_exit(
        &self,
        id: Uuid,
        shutdown: Option<(bool, String)>,
        panicked: bool,
        while_away: bool,
    ) -> Result<()> {
        let Some(mut vm) = self.store.vm(id)? else {
            return Ok(());
        };
        if vm.migration.is_some() && self.migration_exit(&mut vm, while_away).await? {
            return Ok(());
        }
        let pid = vm.runtime.as_ref().map(|r| r.pid).unwrap_or(0);
        let (state, kind, cause, detail) = if while_away {
            (
                VmState::Stopped,
                EventType::Stopped,
                Cause::Reconciliation,
                format!("QEMU (pid {pid}) ended while agentd was not running"),
            )
        } else if vm.state == VmState::Stopping {
            let how = match &shutdown {
                Some((_, r)) => r.clone(),
                None => "forced".to_string(),
            };
            (VmState::Stopped, EventType::Stopped, Cause::Api, how)
        } else if panicked {
            (
                VmState::Crashed,
                EventType::Crashed,
                Cause::GuestPanic,
                "guest kernel panicked".to_string(),
            )
        } else {
            match shutdown {
                Some((true, reason)) => {
                    (VmState::Stopped, EventType::Stopped, Cause::Guest, reason)
                }
                Some((false, reason)) => {
                    (VmState::Stopped, EventType::Stopped, Cause::Host, reason)
                }
                None => (
                    VmState::Crashed,
                    EventType::Crashed,
                    Cause::Qemu,
                    format!("QEMU (pid {pid}) exited without a shutdown"),
                ),
            }
        };
        let mut events = self.tear_down(&mut vm).await;
        vm.state = state;
        vm.state_reason = detail.clone();
        events.push(NewEvent::new(kind, cause, detail));
        // Unless a destroy removed the guest meanwhile (the monitor holds no
        // lock: a stop waits for what it commits).
        if let Some(out) = self.store.commit_existing(&mut vm, &events)? {
            for e in &out {
                tracing::info!(seq = e.seq, vm = %e.vm_name, event = ?e.kind, state = ?e.state,
                    cause = ?e.cause, detail = %e.detail, "event");
            }
        }
        Ok(())
    }
}
