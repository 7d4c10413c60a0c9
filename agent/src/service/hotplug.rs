//! Hot-plug (AttachDisk, DetachDisk, AttachNic, DetachNic): on a stopped
//! guest a change of its spec; on a running one the device is added to
//! or removed from its QEMU too (`crate::hotplug`), on a free root port.
//!
//! Order (agent invariant 2 holds for hot-plugged devices as for started
//! ones): a pdisk export's volume is in `pending_unexports` before pdisk
//! grants it, a tap's name is in the runtime before the tap exists, and
//! the device being added is the record's `hotplug` intent while QEMU is
//! asked. The spec, the runtime and the event change in one commit once
//! QEMU has (or no longer has) the device. After a crash in between,
//! [`Agent::reconcile_hotplug`] (at adoption) asks QEMU which devices it
//! has and finishes or undoes the change, so the spec never names a
//! device QEMU lacks, nor the other way round.

use std::time::Duration;

use super::attachments::device_name;
use super::Agent;
use crate::net;
use crate::spec::{Cause, Disk, DiskSource, EventType, Nic, VmState};
use crate::store::{DiskAttachment, Hotplug, NewEvent, NicAttachment, PdiskExport, VmRecord};
use crate::vmm::{PlannedDisk, PlannedNic};
use stratus_core::error::{Error, Result};

/// How long a detach waits for the guest by default.
pub const DETACH_WAIT: Duration = Duration::from_secs(30);

/// What a hot-plug call finds the guest doing.
enum Mode {
    /// Not running: only its spec changes.
    Spec,
    /// Running or paused: QEMU too.
    Live,
}

fn mode(vm: &VmRecord) -> Result<Mode> {
    match vm.state {
        VmState::Defined | VmState::Stopped | VmState::Crashed | VmState::Error => Ok(Mode::Spec),
        VmState::Running | VmState::Paused => Ok(Mode::Live),
        s => Err(Error::precondition(format!(
            "vm {} is {s:?}: disks and NICs change only on a running or stopped guest",
            vm.spec.name
        ))),
    }
}

/// The disks of a running guest that are spec disks (the seed is not),
/// in spec order: hot-plugged ones are appended to both.
pub(super) fn spec_disks(vm: &VmRecord) -> Vec<&DiskAttachment> {
    vm.runtime
        .iter()
        .flat_map(|r| r.disks.iter())
        .filter(|d| d.source != "seed")
        .collect()
}

/// The netdev id of the NIC whose tap is `tap` (`net<i>` for tap index i,
/// as the command line numbers them).
pub(super) fn netdev_of(tap: &str) -> String {
    let i = tap.rsplit('n').next().unwrap_or("0");
    format!("net{i}")
}

impl Agent {
    /// Adds pdisk disk `disk` to guest `r`.
    pub async fn attach_disk_to(&self, r: &str, disk: Disk) -> Result<VmRecord> {
        let id = self.store.find_vm(r)?.uuid;
        let _g = self.lock(id).await;
        let mut vm = self.store.find_vm(&id.to_string())?;
        let DiskSource::Pdisk(volume) = &disk.source else {
            return Err(Error::invalid(
                "only pdisk volumes are hot-plugged (files and image disks: in the spec at create)",
            ));
        };
        let volume = volume.clone();
        if vm.spec.disks.iter().any(|d| d.source == disk.source) {
            return Err(Error::exists(format!(
                "vm {}: pdisk volume {} is already one of its disks",
                vm.spec.name, volume.volume
            )));
        }
        let mut spec = vm.spec.clone();
        spec.disks.push(disk.clone());
        spec.validate()?;
        let mode = mode(&vm)?;
        let pdisk = self.pdisk(&volume.server)?;
        // Tenancy: a volume of the guest's project only (NotFound otherwise).
        pdisk
            .get_volume(volume.volume.to_string(), vm.project.clone())
            .await
            .map_err(|s| pdisk.error(s, &format!("pdisk volume {}", volume.volume)))?;
        if let Mode::Spec = mode {
            let detail = format!(
                "{} pdisk:{} (attached at the next start)",
                device_name(vm.spec.disks.len()),
                volume.volume
            );
            vm.spec = spec;
            self.commit(
                &mut vm,
                &[NewEvent::new(EventType::DiskAttached, Cause::Api, detail)],
            )?;
            return Ok(vm);
        }
        let qmp = self.active_qmp(&vm)?;
        let port = crate::hotplug::free_port(&qmp.peripherals().await?).ok_or_else(|| {
            Error::exhausted(format!(
                "vm {}: no free hot-plug port (agentd --hotplug-ports, from the guest's next start)",
                vm.spec.name
            ))
        })?;
        let taken: Vec<String> = vm
            .runtime
            .iter()
            .flat_map(|r| r.disks.iter().map(|d| d.device.clone()))
            .collect();
        let device = (0..crate::spec::MAX_DISKS + 1)
            .map(device_name)
            .find(|d| !taken.contains(d))
            .expect("fewer disks than names");
        let attached = self
            .attach_pdisk(
                &mut vm,
                &device,
                &volume.server,
                &volume.volume.to_string(),
                disk.read_only,
            )
            .await;
        let (backend, att) = match attached {
            Ok(a) => a,
            Err(e) => {
                self.undo_hot_disk(&mut vm, &device, None).await;
                return Err(e);
            }
        };
        vm.hotplug = Some(Hotplug::Disk {
            disk: disk.clone(),
            attachment: att.clone(),
        });
        self.commit(&mut vm, &[])?;
        self.crash_point("hotplug.disk_intent");
        let planned = PlannedDisk {
            device: device.clone(),
            backend,
            read_only: disk.read_only,
            boot_index: 0,
            qos: Some(crate::qos::PlannedQos::of(&disk.qos, &device)),
        };
        if let Err(e) = qmp
            .add_disk(&planned, &self.settings.disk_io, vm.spec.vcpus, &port)
            .await
        {
            vm.hotplug = None;
            self.undo_hot_disk(&mut vm, &device, Some(&att)).await;
            return Err(e);
        }
        self.crash_point("hotplug.disk_added");
        let detail = format!("{device} {} hot-plugged on {port}", att.source);
        self.finish_hot_disk(&mut vm, disk, att);
        self.commit(
            &mut vm,
            &[NewEvent::new(EventType::DiskAttached, Cause::Api, detail)],
        )?;
        Ok(vm)
    }

    /// The record of a disk QEMU now has: spec, runtime, no intent, no
    /// export left to undo (the caller commits with the event).
    fn finish_hot_disk(&self, vm: &mut VmRecord, disk: Disk, att: DiskAttachment) {
        vm.hotplug = None;
        if let Some(v) = &att.pdisk_volume {
            vm.pending_unexports
                .retain(|p| !(p.volume == *v && p.server == att.pdisk_server));
        }
        vm.spec.disks.push(disk);
        vm.runtime.as_mut().expect("runtime").disks.push(att);
    }

    /// Undoes a disk hot-plug that did not happen: the kernel session (if
    /// any), the export, the runtime entry of `device` (which was free:
    /// an entry of it is this attempt's, recorded before a kernel login).
    async fn undo_hot_disk(&self, vm: &mut VmRecord, device: &str, att: Option<&DiskAttachment>) {
        let recorded = vm
            .runtime
            .as_ref()
            .and_then(|r| r.disks.iter().find(|d| d.device == device).cloned());
        if let Some(a) = att.or(recorded.as_ref()) {
            self.release_disk_host_side(vm, a).await;
        }
        if let Some(rt) = vm.runtime.as_mut() {
            rt.disks.retain(|d| d.device != device);
        }
        self.retry_unexports(vm).await;
        if let Err(e) = self.commit(vm, &[]) {
            tracing::warn!(vm = %vm.spec.name, error = %e, "could not record an undone hot-plug");
        }
    }

    /// Logs out of a kernel-attached disk's session and queues its
    /// volume's unexport.
    async fn release_disk_host_side(&self, vm: &mut VmRecord, d: &DiskAttachment) {
        if let Err(e) = self.detach_kernel_disk(vm.uuid, d).await {
            tracing::warn!(vm = %vm.spec.name, disk = %d.device, error = %e,
                "could not detach the kernel-attached disk; undone at the next start");
        }
        if let Some(volume) = &d.pdisk_volume {
            let export = PdiskExport {
                server: d.pdisk_server.clone(),
                volume: volume.clone(),
            };
            if !vm.pending_unexports.contains(&export) {
                vm.pending_unexports.push(export);
            }
        }
    }

    /// Removes disk `device` from guest `r`: its spec and, running, its
    /// QEMU, waiting up to `wait` for the guest to release it.
    pub async fn detach_disk_from(
        &self,
        r: &str,
        device: &str,
        wait: Duration,
    ) -> Result<VmRecord> {
        let id = self.store.find_vm(r)?.uuid;
        let _g = self.lock(id).await;
        let mut vm = self.store.find_vm(&id.to_string())?;
        let no_such = || Error::not_found(format!("vm {}: no disk {device}", vm.spec.name));
        if let Mode::Spec = mode(&vm)? {
            let i = (0..vm.spec.disks.len())
                .find(|&i| device_name(i) == device)
                .ok_or_else(no_such)?;
            vm.spec.disks.remove(i);
            let detail = format!("{device} (removed from the spec)");
            self.commit(
                &mut vm,
                &[NewEvent::new(EventType::DiskDetached, Cause::Api, detail)],
            )?;
            return Ok(vm);
        }
        let disks = spec_disks(&vm);
        let Some(i) = disks.iter().position(|d| d.device == device) else {
            if vm
                .runtime
                .iter()
                .flat_map(|r| &r.disks)
                .any(|d| d.device == device)
            {
                return Err(Error::invalid(format!(
                    "vm {}: {device} is its cloud-init seed, which is not detached",
                    vm.spec.name
                )));
            }
            return Err(no_such());
        };
        let att = disks[i].clone();
        let qmp = self.active_qmp(&vm)?;
        if !qmp.remove_disk(device, wait).await? {
            let detail = format!(
                "{device} {}: the guest did not release it within {}; it stays attached",
                att.source,
                humantime::format_duration(wait)
            );
            self.commit(
                &mut vm,
                &[NewEvent::new(
                    EventType::DiskDetachPending,
                    Cause::Api,
                    detail.clone(),
                )],
            )?;
            return Err(Error::precondition(format!(
                "vm {}: {detail} (a later DetachDisk finishes it once the guest lets go; \
                 or stop the guest and detach it then)",
                vm.spec.name
            )));
        }
        self.crash_point("hotplug.disk_removed");
        self.forget_disk(&mut vm, &att, Cause::Api).await
    }

    /// Drops a disk QEMU no longer has from spec and runtime with its
    /// DISK_DETACHED (one commit, its unexport queued in it), then
    /// unexports it.
    async fn forget_disk(
        &self,
        vm: &mut VmRecord,
        att: &DiskAttachment,
        cause: Cause,
    ) -> Result<VmRecord> {
        let i = spec_disks(vm)
            .iter()
            .position(|d| d.device == att.device)
            .expect("a spec disk");
        self.release_disk_host_side(vm, att).await;
        vm.spec.disks.remove(i);
        if let Some(rt) = vm.runtime.as_mut() {
            rt.disks.retain(|d| d.device != att.device);
        }
        self.commit(
            vm,
            &[NewEvent::new(
                EventType::DiskDetached,
                cause,
                format!("{} {}", att.device, att.source),
            )],
        )?;
        let before = vm.pending_unexports.len();
        self.retry_unexports(vm).await;
        if vm.pending_unexports.len() != before {
            self.commit(vm, &[])?;
        }
        Ok(vm.clone())
    }

    /// Adds NIC `nic` to guest `r`.
    pub async fn attach_nic_to(&self, r: &str, nic: Nic) -> Result<VmRecord> {
        let id = self.store.find_vm(r)?.uuid;
        let _g = self.lock(id).await;
        let mut vm = self.store.find_vm(&id.to_string())?;
        let mut spec = vm.spec.clone();
        spec.nics.push(nic.clone());
        spec.validate()?;
        let bridge = self.allowed_bridge(&nic.bridge)?.to_string();
        if let Mode::Spec = mode(&vm)? {
            let detail = format!("mac={} on {bridge} (attached at the next start)", nic.mac);
            vm.spec = spec;
            self.commit(
                &mut vm,
                &[NewEvent::new(EventType::NicAttached, Cause::Api, detail)],
            )?;
            return Ok(vm);
        }
        let qmp = self.active_qmp(&vm)?;
        let port = crate::hotplug::free_port(&qmp.peripherals().await?).ok_or_else(|| {
            Error::exhausted(format!(
                "vm {}: no free hot-plug port (agentd --hotplug-ports, from the guest's next start)",
                vm.spec.name
            ))
        })?;
        let taps: Vec<String> = vm
            .runtime
            .iter()
            .flat_map(|r| r.nics.iter().map(|n| n.tap.clone()))
            .collect();
        let i = (0..crate::spec::MAX_NICS * 2)
            .find(|&i| !taps.contains(&net::tap_name_for(vm.uuid, i).to_string()))
            .expect("fewer NICs than tap names");
        let tap = net::tap_name_for(vm.uuid, i);
        let att = NicAttachment {
            tap: tap.to_string(),
            bridge: bridge.clone(),
            mac: nic.mac,
            vlan: nic.vlan,
            ips: nic.ips.clone(),
        };
        // The tap's name first: a crash after making it must find it.
        vm.runtime.as_mut().expect("runtime").nics.push(att.clone());
        vm.hotplug = Some(Hotplug::Nic {
            nic: nic.clone(),
            attachment: att.clone(),
        });
        self.commit(&mut vm, &[])?;
        self.crash_point("hotplug.nic_intent");
        let netdev = format!("net{i}");
        let made = async {
            // Its rules before the tap, the tap before its bridge port.
            self.filters.protect(&tap, nic.mac, &nic.ips).await?;
            self.net.create_tap(&tap)?;
            self.net.attach_to_bridge(&tap, &bridge, nic.vlan)?;
            if nic.vlan > 0 {
                self.net.set_vlan(&tap, nic.vlan)?;
            }
            let planned = PlannedNic {
                tap: tap.to_string(),
                mac: nic.mac,
            };
            qmp.add_nic(&planned, &netdev, &port).await
        }
        .await;
        if let Err(e) = made {
            self.release_tap(&mut vm, &att).await;
            vm.hotplug = None;
            if let Err(e) = self.commit(&mut vm, &[]) {
                tracing::warn!(vm = %vm.spec.name, error = %e, "could not record an undone hot-plug");
            }
            return Err(e);
        }
        vm.hotplug = None;
        vm.spec.nics.push(nic);
        self.commit(
            &mut vm,
            &[NewEvent::new(
                EventType::NicAttached,
                Cause::Api,
                format!("{tap} on {bridge} mac={} hot-plugged on {port}", att.mac),
            )],
        )?;
        Ok(vm)
    }

    /// Deletes a NIC's tap (then its rules) and drops it from the runtime;
    /// a tap that will not go stays recorded for the next tear-down.
    async fn release_tap(&self, vm: &mut VmRecord, att: &NicAttachment) {
        let Ok(tap) = att.tap.parse::<net::TapName>() else {
            return;
        };
        if let Err(e) = self.net.delete_tap(&tap) {
            tracing::warn!(tap = %att.tap, error = %e,
                "could not delete tap; kept in the record and retried");
            return;
        }
        if let Err(e) = self.filters.remove(&tap).await {
            tracing::warn!(tap = %att.tap, error = %e, "could not remove the tap's anti-spoofing rules");
        }
        if let Some(rt) = vm.runtime.as_mut() {
            rt.nics.retain(|n| n.tap != att.tap);
        }
    }

    /// Removes the NIC with MAC or tap `which` from guest `r`, as
    /// [`Agent::detach_disk_from`].
    pub async fn detach_nic_from(&self, r: &str, which: &str, wait: Duration) -> Result<VmRecord> {
        let id = self.store.find_vm(r)?.uuid;
        let _g = self.lock(id).await;
        let mut vm = self.store.find_vm(&id.to_string())?;
        let mac: Option<net::Mac> = which.parse().ok();
        let no_such = || Error::not_found(format!("vm {}: no NIC {which}", vm.spec.name));
        if let Mode::Spec = mode(&vm)? {
            if mac.is_none() {
                return Err(Error::invalid(format!(
                    "vm {} is not running: its NICs are named by MAC, not {which:?}",
                    vm.spec.name
                )));
            }
            let i = vm
                .spec
                .nics
                .iter()
                .position(|n| Some(n.mac) == mac)
                .ok_or_else(no_such)?;
            vm.spec.nics.remove(i);
            self.commit(
                &mut vm,
                &[NewEvent::new(
                    EventType::NicDetached,
                    Cause::Api,
                    format!("mac={which} (removed from the spec)"),
                )],
            )?;
            return Ok(vm);
        }
        let att = vm
            .runtime
            .iter()
            .flat_map(|r| &r.nics)
            .find(|n| n.tap == which || Some(n.mac) == mac)
            .cloned()
            .ok_or_else(no_such)?;
        let qmp = self.active_qmp(&vm)?;
        if !qmp.remove_nic(&netdev_of(&att.tap), wait).await? {
            let detail = format!(
                "NIC {} mac={}: the guest did not release it within {}; it stays attached",
                att.tap,
                att.mac,
                humantime::format_duration(wait)
            );
            self.commit(
                &mut vm,
                &[NewEvent::new(
                    EventType::DiskDetachPending,
                    Cause::Api,
                    detail.clone(),
                )],
            )?;
            return Err(Error::precondition(format!(
                "vm {}: {detail}",
                vm.spec.name
            )));
        }
        self.crash_point("hotplug.nic_removed");
        self.forget_nic(&mut vm, &att, Cause::Api).await
    }

    /// Drops a NIC QEMU no longer has: tap, rules, runtime and spec, with
    /// NIC_DETACHED.
    async fn forget_nic(
        &self,
        vm: &mut VmRecord,
        att: &NicAttachment,
        cause: Cause,
    ) -> Result<VmRecord> {
        self.release_tap(vm, att).await;
        vm.spec.nics.retain(|n| n.mac != att.mac);
        self.commit(
            vm,
            &[NewEvent::new(
                EventType::NicDetached,
                cause,
                format!("{} mac={}", att.tap, att.mac),
            )],
        )?;
        Ok(vm.clone())
    }

    /// Grows pdisk disk `device` of guest `r` to `size` bytes: pdisk
    /// first (grow only; a volume already that large, grown by `pdisk
    /// volume resize`, is left as it is), then, running, QEMU
    /// (`block_resize`; with `--attach kernel` the host's SCSI disk is
    /// rescanned first so QEMU sees the size). DISK_RESIZED.
    pub async fn resize_disk(&self, r: &str, device: &str, size: u64) -> Result<VmRecord> {
        let id = self.store.find_vm(r)?.uuid;
        let _g = self.lock(id).await;
        let mut vm = self.store.find_vm(&id.to_string())?;
        let mode = mode(&vm)?;
        let (server, volume) = match mode {
            Mode::Spec => {
                let i = (0..vm.spec.disks.len())
                    .find(|&i| device_name(i) == device)
                    .ok_or_else(|| {
                        Error::not_found(format!("vm {}: no disk {device}", vm.spec.name))
                    })?;
                match &vm.spec.disks[i].source {
                    DiskSource::Pdisk(p) => (p.server.clone(), p.volume.to_string()),
                    _ => return Err(not_pdisk(&vm, device)),
                }
            }
            Mode::Live => {
                let att = spec_disks(&vm)
                    .into_iter()
                    .find(|d| d.device == device)
                    .cloned()
                    .ok_or_else(|| {
                        Error::not_found(format!("vm {}: no disk {device}", vm.spec.name))
                    })?;
                let Some(uuid) = att.pdisk_volume.clone() else {
                    return Err(not_pdisk(&vm, device));
                };
                (att.pdisk_server.clone(), uuid)
            }
        };
        let pdisk = self.pdisk(&server)?;
        let now = pdisk
            .get_volume(volume.clone(), vm.project.clone())
            .await
            .map_err(|s| pdisk.error(s, &format!("pdisk volume {volume}")))?
            .size_bytes;
        if now > size {
            return Err(Error::invalid(format!(
                "vm {}: {device} (pdisk volume {volume}) is {now} bytes already: disks only grow",
                vm.spec.name
            )));
        }
        // Already grown by the storage admin (`pdisk volume resize`): only
        // QEMU is left to tell. Otherwise pdisk grows it (a caller pdiskd
        // lets resize volumes).
        if now < size {
            pdisk
                .resize_volume(volume.clone(), size, vm.project.clone())
                .await
                .map_err(|s| pdisk.error(s, &format!("resizing pdisk volume {volume}")))?;
        }
        if let Mode::Live = mode {
            if let Some(k) = spec_disks(&vm)
                .into_iter()
                .find(|d| d.device == device)
                .and_then(|d| d.kernel.clone())
            {
                self.kernel.rescan(&k).await?;
            }
            self.active_qmp(&vm)?.block_resize(device, size).await?;
        }
        self.commit(
            &mut vm,
            &[NewEvent::new(
                EventType::DiskResized,
                Cause::Api,
                format!("{device} pdisk:{volume} size={size}"),
            )],
        )?;
        Ok(vm)
    }

    /// At adoption of a running guest: makes its record say what its QEMU
    /// has. A hot-plug intent whose device QEMU has is finished (ATTACHED,
    /// cause reconciliation), one whose device it lacks is undone; a
    /// recorded disk or NIC QEMU no longer has (the guest released it after
    /// a detach timed out, or agentd died right after) is detached.
    pub(super) async fn reconcile_hotplug(&self, vm: &mut VmRecord) -> Result<()> {
        let Some(qmp) = self.qmp_of(vm.uuid) else {
            return Ok(());
        };
        let ids: Vec<String> = qmp.peripherals().await?.into_iter().map(|p| p.id).collect();
        let has = |id: String| ids.contains(&id);
        match vm.hotplug.take() {
            Some(Hotplug::Disk { disk, attachment }) => {
                if has(format!("{}-dev", attachment.device)) {
                    let detail = format!(
                        "{} {} (hot-plug finished)",
                        attachment.device, attachment.source
                    );
                    self.finish_hot_disk(vm, disk, attachment);
                    self.commit(
                        vm,
                        &[NewEvent::new(
                            EventType::DiskAttached,
                            Cause::Reconciliation,
                            detail,
                        )],
                    )?;
                } else {
                    let device = attachment.device.clone();
                    self.undo_hot_disk(vm, &device, Some(&attachment)).await;
                }
            }
            Some(Hotplug::Nic { nic, attachment }) => {
                if has(format!("{}-dev", netdev_of(&attachment.tap))) {
                    vm.spec.nics.push(nic);
                    self.commit(
                        vm,
                        &[NewEvent::new(
                            EventType::NicAttached,
                            Cause::Reconciliation,
                            format!(
                                "{} mac={} (hot-plug finished)",
                                attachment.tap, attachment.mac
                            ),
                        )],
                    )?;
                } else {
                    self.release_tap(vm, &attachment).await;
                    self.commit(vm, &[])?;
                }
            }
            // Disk limits: `reconcile_qos`'s.
            Some(q @ Hotplug::Qos { .. }) => vm.hotplug = Some(q),
            None => {}
        }
        let gone_disks: Vec<DiskAttachment> = spec_disks(vm)
            .into_iter()
            .filter(|d| !has(format!("{}-dev", d.device)))
            .cloned()
            .collect();
        for d in gone_disks {
            self.forget_disk(vm, &d, Cause::Reconciliation).await?;
        }
        let gone_nics: Vec<NicAttachment> = vm
            .runtime
            .iter()
            .flat_map(|r| &r.nics)
            .filter(|n| !has(format!("{}-dev", netdev_of(&n.tap))))
            .cloned()
            .collect();
        for n in gone_nics {
            self.forget_nic(vm, &n, Cause::Reconciliation).await?;
        }
        Ok(())
    }
}

fn not_pdisk(vm: &VmRecord, device: &str) -> Error {
    Error::invalid(format!(
        "vm {}: {device} is not a pdisk disk: only pdisk disks are resized",
        vm.spec.name
    ))
}
