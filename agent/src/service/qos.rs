//! SetDiskQos: a disk's I/O limits ([`crate::qos`]), in its spec and, on a
//! running guest, in its QEMU (`qom-set` of the disk's throttle group's
//! `limits`: every disk of a shared group changes with it).
//!
//! Order, as hot-plug's: the change is the record's `hotplug` intent
//! ([`Hotplug::Qos`]) while QEMU is told, then the spec and
//! DISK_QOS_CHANGED are committed together. After a crash in between,
//! adoption ([`Agent::reconcile_qos`]) asks QEMU which limits the group
//! has: the intent's (finished, cause reconciliation) or not (dropped);
//! then the stored limits of every disk are given to QEMU again, so QEMU
//! always ends with what the spec says.

use super::attachments::device_name;
use super::Agent;
use crate::qos::{DiskQos, PlannedQos};
use crate::spec::{Cause, EventType, VmState};
use crate::store::{Hotplug, NewEvent, VmRecord};
use stratus_core::error::{Error, Result};

impl Agent {
    /// Gives disk `device` of guest `r` the limits `qos` (its group, if
    /// any, with it).
    pub async fn set_disk_qos(&self, r: &str, device: &str, qos: DiskQos) -> Result<VmRecord> {
        let id = self.store.find_vm(r)?.uuid;
        let _g = self.lock(id).await;
        let mut vm = self.store.find_vm(&id.to_string())?;
        let live = match vm.state {
            VmState::Defined | VmState::Stopped | VmState::Crashed | VmState::Error => false,
            VmState::Running | VmState::Paused => true,
            s => {
                return Err(Error::precondition(format!(
                    "vm {} is {s:?}: disk limits change on a running or stopped guest",
                    vm.spec.name
                )))
            }
        };
        if vm.hotplug.is_some() {
            return Err(Error::precondition(format!(
                "vm {}: another disk or NIC change is unfinished",
                vm.spec.name
            )));
        }
        let i = self.spec_index(&vm, device)?;
        let old = vm.spec.disks[i].qos.clone();
        if live && old.group != qos.group {
            return Err(Error::invalid(format!(
                "vm {}: {device} is in QoS group {}: a running guest's disk keeps its group \
                 (change it while the guest is stopped)",
                vm.spec.name,
                old.group.as_deref().unwrap_or("(its own)")
            )));
        }
        let spec = with_qos(&vm, i, &qos)?;
        let detail = format!("{device} {}", qos.describe());
        if live {
            vm.hotplug = Some(Hotplug::Qos {
                device: device.to_owned(),
                qos: qos.clone(),
            });
            self.commit(&mut vm, &[])?;
            self.crash_point("qos.intent");
            let qmp = self.active_qmp(&vm)?;
            let planned = PlannedQos::of(&qos, device);
            if let Err(e) = qmp
                .set_throttle_limits(&planned.group_id, &planned.limits)
                .await
            {
                vm.hotplug = None;
                self.commit(&mut vm, &[])?;
                return Err(no_group(&vm, device, e));
            }
            self.crash_point("qos.applied");
            vm.hotplug = None;
        }
        vm.spec = spec;
        self.commit(
            &mut vm,
            &[NewEvent::new(EventType::DiskQosChanged, Cause::Api, detail)],
        )?;
        Ok(vm)
    }

    /// The spec index of disk `device`: its position among a running
    /// guest's spec disks (hot-plugged ones are appended to both), or the
    /// device its index names on a stopped one.
    fn spec_index(&self, vm: &VmRecord, device: &str) -> Result<usize> {
        let no_such = || Error::not_found(format!("vm {}: no disk {device}", vm.spec.name));
        match &vm.runtime {
            Some(rt) if vm.state.is_active() => rt
                .disks
                .iter()
                .filter(|d| d.source != "seed")
                .position(|d| d.device == device)
                .ok_or_else(no_such),
            _ => (0..vm.spec.disks.len())
                .find(|&i| device_name(i) == device)
                .ok_or_else(no_such),
        }
    }

    /// At adoption of a running guest: finishes or drops an unfinished
    /// SetDiskQos from what QEMU has, then gives QEMU every disk's stored
    /// limits again. Returns what it did, for the adoption's report.
    pub(super) async fn reconcile_qos(&self, vm: &mut VmRecord) -> Result<String> {
        let Some(qmp) = self.qmp_of(vm.uuid) else {
            return Ok(String::new());
        };
        let mut did = Vec::new();
        if let Some(Hotplug::Qos { device, qos }) = vm.hotplug.clone() {
            vm.hotplug = None;
            let group = qos.group_id(&device);
            let has = qmp.throttle_limits(&group).await.ok();
            let i = self.spec_index(vm, &device);
            match (has, i) {
                (Some(l), Ok(i)) if l == qos.limits => {
                    vm.spec = with_qos(vm, i, &qos)?;
                    self.commit(
                        vm,
                        &[NewEvent::new(
                            EventType::DiskQosChanged,
                            Cause::Reconciliation,
                            format!("{device} {} (change finished)", qos.describe()),
                        )],
                    )?;
                    did.push(format!("QoS change of {device} finished"));
                }
                _ => {
                    self.commit(vm, &[])?;
                    did.push(format!("QoS change of {device} dropped"));
                }
            }
        }
        let disks: Vec<(String, DiskQos)> = vm
            .runtime
            .iter()
            .flat_map(|r| r.disks.iter())
            .filter(|d| d.source != "seed")
            .zip(vm.spec.disks.iter())
            .map(|(a, d)| (a.device.clone(), d.qos.clone()))
            .collect();
        let mut applied = 0;
        for (device, q) in disks {
            let p = PlannedQos::of(&q, &device);
            match qmp.set_throttle_limits(&p.group_id, &p.limits).await {
                Ok(()) => applied += 1,
                // Started before disks had throttle groups.
                Err(e) => did.push(format!("{device} has no throttle group ({e})")),
            }
        }
        // The same limits again, usually: logged, not reported.
        tracing::info!(vm = %vm.spec.name, disks = applied, "stored disk QoS limits re-applied");
        Ok(did.join("; "))
    }
}

/// `vm`'s spec with disk `i` given `qos`, and the other disks of its
/// group (the old one's and the new one's) too: checked whole.
fn with_qos(vm: &VmRecord, i: usize, qos: &DiskQos) -> Result<crate::spec::VmSpec> {
    let mut spec = vm.spec.clone();
    if let Some(g) = &qos.group {
        for d in spec.disks.iter_mut() {
            if d.qos.group.as_ref() == Some(g) {
                d.qos.limits = qos.limits.clone();
            }
        }
    }
    spec.disks[i].qos = qos.clone();
    spec.validate()?;
    Ok(spec)
}

/// QEMU refused the limits: most likely a guest started before disks had
/// throttle groups.
fn no_group(vm: &VmRecord, device: &str, e: Error) -> Error {
    if e.kind() == stratus_core::error::ErrorKind::NotFound || e.message().contains("not found") {
        return Error::precondition(format!(
            "vm {}: {device} has no throttle group in its QEMU (started before disk QoS): \
             its limits apply from its next start ({e})",
            vm.spec.name
        ));
    }
    e
}
