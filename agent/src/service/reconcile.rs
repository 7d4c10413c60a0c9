//! Start-up reconciliation: the store says what agentd had; the host says
//! what survived. Live QEMUs are adopted, guests whose QEMU ended while
//! agentd was away are recorded STOPPED, interrupted starts are undone
//! (ERROR), unfinished destroys are finished, leftover taps named like ours
//! are removed (and anti-spoofing rules of taps no record holds; live
//! guests' rules are applied again), kernel iSCSI sessions no record
//! holds are logged out, empty per-guest cgroups of no record are
//! removed, and so are overlays a crash left half-made in a guest's
//! directory; interrupted image saves are finished or rolled back. Each such removal is in the report, the log, and the event
//! stream (a LEFTOVER_REMOVED host event naming it, cause reconciliation).
//!
//! One guest that cannot be reconciled (its QMP does not answer, its
//! record cannot be written) is logged, reported and left as it is: it
//! never keeps agentd from starting or the other guests from being
//! reconciled.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::Agent;
use crate::attach::{AttachMode, Holder};
use crate::net;
use crate::spec::{Cause, EventType, VmState};
use crate::store::{NewEvent, VmRecord};
use stratus_core::error::Result;

/// How long reconciliation waits for a live guest's QMP socket.
const QMP_ADOPT: Duration = Duration::from_secs(10);

impl Agent {
    /// At start: adopts every live QEMU, records the guests that ended while
    /// agentd was away, finishes unfinished destroys, removes leftover taps
    /// of guests that are gone, and logs out of kernel iSCSI sessions that
    /// no guest's record holds. Returns human lines saying what it did.
    /// Fails only when the store cannot be read.
    pub async fn reconcile(self: &Arc<Self>) -> Result<Vec<String>> {
        let mut report = Vec::new();
        for vm in self.store.vms()? {
            self.repin(&vm);
            // Before any new start can take it: a live guest keeps its uid
            // (a dead one's is released when it is undone below).
            if let Some(user) = vm.runtime.as_ref().and_then(|r| r.qemu_user) {
                self.uids.adopt(vm.uuid, user);
            }
            // Every recorded kernel attachment holds its session, before any
            // dead guest's detach can count it down.
            for d in vm.runtime.iter().flat_map(|r| &r.disks) {
                if let (AttachMode::Kernel, Some(r)) = (d.mode, &d.krbd) {
                    self.krbd.adopt(Holder::disk(vm.uuid, &d.device), r).await;
                }
                if let (AttachMode::Kernel, Some(n)) = (d.mode, &d.nvme) {
                    self.nvme
                        .adopt(Holder::disk(vm.uuid, &d.device), &n.namespace)
                        .await;
                }
                if let (AttachMode::Kernel, Some(k)) = (d.mode, &d.kernel) {
                    self.kernel
                        .adopt(Holder::disk(vm.uuid, &d.device), &k.lun)
                        .await;
                    // Turning --chap-mutual on does not re-key a live
                    // session: say which guests still trust an
                    // unauthenticated target until their next start.
                    if self.settings.chap_mutual && k.chap_target_user.is_none() {
                        let line = format!(
                            "{} {}: attached with one-way CHAP (before --chap-mutual); \
                             mutual from its next start",
                            vm.spec.name, d.device
                        );
                        tracing::warn!("{line}");
                        report.push(line);
                    }
                }
            }
        }
        for vm in self.store.vms()? {
            if !vm.state.is_active() {
                continue;
            }
            let uuid = vm.uuid;
            let name = vm.spec.name.to_string();
            // A migration in flight first: its journal and QEMU decide
            // which side keeps the guest (`migrate.rs`).
            let vm = if vm.migration.is_some() {
                match self.reconcile_migration(vm).await {
                    Ok(Some(line)) => {
                        report.push(line);
                        continue;
                    }
                    Ok(None) => match self.store.vm(uuid)? {
                        Some(vm) if vm.state.is_active() => vm,
                        _ => continue,
                    },
                    Err(e) => {
                        tracing::error!(vm = %name, error = %e, "could not reconcile the guest's migration; left as it is");
                        report.push(format!(
                            "{name}: migration not reconciled ({e}); left alone"
                        ));
                        continue;
                    }
                }
            } else {
                vm
            };
            match self.reconcile_guest(vm).await {
                Ok(line) => report.push(line),
                Err(e) => {
                    tracing::error!(vm = %name, error = %e, "could not reconcile the guest; left as it is");
                    report.push(format!("{name}: could not be reconciled ({e}); left alone"));
                }
            }
        }
        report.extend(self.retry_leftovers().await?);
        // What is removed below, for the event stream.
        let mut removed = Vec::new();
        // Taps named like ours whose guest is gone.
        let mut wanted = HashSet::new();
        for vm in self.store.vms()? {
            if let Some(rt) = &vm.runtime {
                for n in &rt.nics {
                    wanted.insert(n.tap.clone());
                }
            }
        }
        for tap in self.net.list_taps_with_prefix(net::TAP_PREFIX) {
            if wanted.contains(&tap) {
                continue;
            }
            // Only names shaped like ours: an operator's "st..." tap stays.
            if let Ok(t) = tap.parse::<net::TapName>() {
                if t.is_guest_nic() {
                    match self.net.delete_tap(&t) {
                        Ok(()) => removed.push(format!("removed leftover tap {tap}")),
                        Err(e) => report.push(format!("leftover tap {tap} not removed ({e})")),
                    }
                }
            }
        }
        // Overlays a crash left under construction (never in use: the
        // complete one is linked into place).
        for vm in self.store.vms()? {
            let dir = self.vm_dir(vm.uuid);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if crate::images::is_partial_overlay(&name) {
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => removed.push(format!(
                            "{}: removed unfinished overlay {name}",
                            vm.spec.name
                        )),
                        Err(err) => report.push(format!(
                            "{}: unfinished overlay {name} not removed ({err})",
                            vm.spec.name
                        )),
                    }
                }
            }
        }
        let (filters, rules_removed) = self.reconcile_filters(&wanted).await;
        report.extend(filters);
        removed.extend(rules_removed);
        // Sessions on our iface that no record holds (a crash, a failed
        // logout), and cgroups of guests no record holds.
        let known: HashSet<uuid::Uuid> = self.store.vms()?.iter().map(|v| v.uuid).collect();
        let reaped = self.kernel.reap().await.into_iter();
        let nvme = self.nvme.reap().await.into_iter();
        let krbd = self.krbd.reap().await.into_iter();
        for r in reaped
            .chain(nvme)
            .chain(krbd)
            .chain(self.vmm.sweep_cgroups(&known))
        {
            match r {
                Ok(line) => removed.push(line),
                Err(line) => report.push(line),
            }
        }
        if !removed.is_empty() {
            let events: Vec<NewEvent> = removed
                .iter()
                .map(|l| {
                    NewEvent::new(EventType::LeftoverRemoved, Cause::Reconciliation, l.clone())
                })
                .collect();
            self.journal_host(&events);
        }
        report.extend(removed);
        for line in &report {
            tracing::info!(action = %line, "reconcile");
        }
        Ok(report)
    }

    /// Anti-spoofing rules after a restart: each live guest's NICs get
    /// their recorded rules again (one transaction per tap that replaces
    /// them whole, so an adopted guest is never without them, and a table
    /// someone flushed is rebuilt), and rules of taps no record holds are
    /// removed. Only agentd's own table is touched. Returns the report's
    /// lines, and apart the removals.
    async fn reconcile_filters(&self, wanted: &HashSet<String>) -> (Vec<String>, Vec<String>) {
        let mut report = Vec::new();
        let mut removed = Vec::new();
        let live = match self.store.vms() {
            Ok(vms) => vms,
            Err(e) => {
                return (
                    vec![format!("anti-spoofing rules not reconciled ({e})")],
                    removed,
                )
            }
        };
        for n in live
            .iter()
            .filter_map(|v| v.runtime.as_ref())
            .flat_map(|r| &r.nics)
        {
            let Ok(tap) = n.tap.parse::<net::TapName>() else {
                continue;
            };
            if let Err(e) = self.filters.protect(&tap, n.mac, &n.ips).await {
                tracing::error!(tap = %tap, error = %e, "could not restore a guest's anti-spoofing rules");
                report.push(format!("tap {tap}: anti-spoofing rules not restored ({e})"));
            }
        }
        match self.filters.protected_taps().await {
            Ok(taps) => {
                for tap in taps.iter().filter(|t| !wanted.contains(*t)) {
                    let Ok(t) = tap.parse::<net::TapName>() else {
                        continue;
                    };
                    match self.filters.remove(&t).await {
                        Ok(()) => {
                            removed.push(format!("removed anti-spoofing rules of gone tap {tap}"))
                        }
                        Err(e) => report.push(format!("rules of gone tap {tap} not removed ({e})")),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the anti-spoofing table");
                report.push(format!("anti-spoofing table not read ({e})"));
            }
        }
        (report, removed)
    }

    /// Adopts, records or undoes one guest that was active when agentd
    /// stopped. Returns what it did.
    async fn reconcile_guest(self: &Arc<Self>, mut vm: VmRecord) -> Result<String> {
        let id = vm.uuid;
        let rt = vm.runtime.clone().unwrap_or_default();
        let alive = rt.pid != 0 && self.vmm.is_our_qemu(rt.pid, id);
        if alive && vm.state == VmState::Stopping {
            // agentd died mid-stop: the stop was asked for, so it is
            // finished (by force: the guest had its chance).
            self.record_exit(id, None, false, false).await?;
            let vm = self.store.find_vm(&id.to_string())?;
            return Ok(format!(
                "{}: interrupted stop finished ({:?})",
                vm.spec.name, vm.state
            ));
        }
        if alive && vm.state != VmState::Starting {
            let (qmp, events) = match self.vmm.connect_qmp(&rt.qmp_socket, QMP_ADOPT).await {
                Ok(c) => c,
                Err(e) => {
                    return Ok(format!(
                    "{}: QEMU pid {} lives but its QMP socket does not answer ({e}); left alone",
                    vm.spec.name, rt.pid
                ))
                }
            };
            let status = qmp.query_status().await?;
            if vm.state != VmState::Stopping {
                vm.state = if status.running {
                    VmState::Running
                } else {
                    VmState::Paused
                };
            }
            self.qmp.lock().unwrap().insert(id, qmp);
            self.commit(
                &mut vm,
                &[NewEvent::new(
                    EventType::Adopted,
                    Cause::Reconciliation,
                    format!("qemu pid {} is {}", rt.pid, status.status),
                )],
            )?;
            self.spawn_monitor(id, rt.pid, events);
            let mut line = format!("adopted {} (pid {})", vm.spec.name, rt.pid);
            // Devices hot-plugged or unplugged around the restart.
            if let Err(e) = self.reconcile_hotplug(&mut vm).await {
                tracing::warn!(vm = %vm.spec.name, error = %e, "could not reconcile hot-plugged devices");
                line.push_str(&format!("; hot-plugged devices not reconciled ({e})"));
            }
            // Disk limits: an unfinished change, and the stored ones again.
            match self.reconcile_qos(&mut vm).await {
                Ok(did) if !did.is_empty() => line.push_str(&format!("; {did}")),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm.spec.name, error = %e, "could not reconcile disk QoS");
                    line.push_str(&format!("; disk QoS not reconciled ({e})"));
                }
            }
            if let Err(e) = self
                .vmm
                .follow_console(
                    &self.vm_dir(id),
                    self.settings.console_log_max,
                    vm.spec.name.to_string(),
                )
                .await
            {
                // QEMUs started before agentd kept consoles write a file
                // of their own.
                tracing::warn!(vm = %vm.spec.name, error = %e, "not keeping the adopted guest's console log");
                line.push_str(&format!("; console not followed ({e})"));
            }
            if rt.qemu_user.is_some() {
                let limits = crate::cgroup::Limits::for_guest(
                    vm.spec.memory.0,
                    vm.spec.vcpus,
                    self.host.accel == crate::vmm::Accel::Tcg,
                );
                match self.vmm.readopt_cgroup(id, rt.pid, limits) {
                    Ok(Some(done)) => line.push_str(&format!("; {done}")),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(vm = %vm.spec.name, error = %e,
                            "could not put the adopted guest back in its cgroup");
                        line.push_str(&format!("; not in its cgroup ({e})"));
                    }
                }
            }
            Ok(line)
        } else if vm.state == VmState::Starting {
            // agentd died mid-start: undo and report.
            let mut events = self.tear_down(&mut vm).await;
            vm.state = VmState::Error;
            vm.state_reason = "start interrupted by an agent restart".into();
            events.push(NewEvent::new(
                EventType::Error,
                Cause::Reconciliation,
                vm.state_reason.clone(),
            ));
            self.commit(&mut vm, &events)?;
            Ok(format!("{}: interrupted start undone", vm.spec.name))
        } else {
            let name = vm.spec.name.to_string();
            let mut line = format!("{name}: QEMU ended while agentd was away");
            // Its QEMU is gone, so what confined it goes now (the tear-down
            // in record_exit would do it silently), and the report says so.
            match self.vmm.release_cgroup(id).await {
                Ok(true) => line.push_str("; its cgroup removed"),
                Ok(false) => {}
                Err(e) => line.push_str(&format!("; its cgroup not removed ({e})")),
            }
            if let Some(user) = rt.qemu_user {
                self.uids.release(id);
                line.push_str(&format!("; uid {} released", user.uid));
            }
            self.record_exit(id, None, false, true).await?;
            Ok(line)
        }
    }

    /// Retries the pdisk work guests left undone: unfinished destroys
    /// (records left DESTROYING by a failed pdisk call or a crash), and
    /// unexports that failed when a guest stopped. Returns what it did.
    pub async fn retry_leftovers(self: &Arc<Self>) -> Result<Vec<String>> {
        let mut report = self.retry_saves().await?;
        for vm in self.store.vms()? {
            let destroying = vm.state == VmState::Destroying;
            let left_behind = vm.runtime.is_some() || !vm.pending_unexports.is_empty();
            if !destroying && (!left_behind || vm.state.is_active()) {
                continue;
            }
            let _g = self.lock(vm.uuid).await;
            // Read again under the lock: a start or a retry may have won.
            let Some(mut vm) = self.store.vm(vm.uuid)? else {
                continue;
            };
            let name = vm.spec.name.to_string();
            if vm.state == VmState::Destroying {
                match self.finish_destroy(vm, Cause::Reconciliation).await {
                    Ok(()) => report.push(format!("{name}: unfinished destroy finished")),
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %e, "destroy still unfinished");
                        report.push(format!("{name}: destroy still unfinished ({e})"));
                    }
                }
            } else if !vm.state.is_active() && vm.runtime.is_some() {
                // A QEMU that outlived SIGKILL or a tap that would not go.
                let events = self.tear_down(&mut vm).await;
                let done = vm.runtime.is_none();
                self.commit(&mut vm, &events)?;
                report.push(if done {
                    format!("{name}: what its last run left is undone")
                } else {
                    format!("{name}: its last run is still not undone")
                });
            } else if !vm.state.is_active() && !vm.pending_unexports.is_empty() {
                let before = vm.pending_unexports.len();
                self.retry_unexports(&mut vm).await;
                if vm.pending_unexports.len() != before {
                    self.commit(&mut vm, &[])?;
                    report.push(format!(
                        "{name}: {} left-over export(s) undone",
                        before - vm.pending_unexports.len()
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Runs [`Agent::retry_leftovers`] every `every`, for as long as agentd
    /// runs.
    pub fn spawn_leftover_retries(self: &Arc<Self>, every: Duration) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(agent) = agent.upgrade() else { return };
                if let Err(e) = agent.retry_leftovers().await {
                    tracing::warn!(error = %e, "retrying left-over pdisk work");
                }
            }
        });
    }
}
