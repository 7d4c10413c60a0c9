//! What a start attaches to a guest on this host, and how it is undone:
//! disks (pdisk exports with a fresh CHAP secret, reached by QEMU's own
//! iSCSI initiator or the kernel's; host files; image disks; the NoCloud
//! seed) and NICs (taps on bridges). Each attachment is recorded in the
//! guest's runtime before, or right as, it is made, so that
//! [`Agent::tear_down`] can undo it after a failure or a crash.

use std::path::Path;
use std::time::Duration;

use stratus_proto::pdisk::v1 as pdpb;

use super::images::ImageDisk;
use super::Agent;
use crate::attach::{AttachMode, Holder, IscsiLun, KernelDisk, KrbdDisk, NvmeDisk, NvmeNamespace};
use crate::net;
use crate::seed;
use crate::spec::{Cause, Disk, DiskSource, EventType, Nic, ServerName};
use crate::store::{DiskAttachment, NewEvent, NicAttachment, PdiskExport, VmRecord};
use crate::vmm::{DiskBackend, PlannedDisk, PlannedNic};
use stratus_core::error::Result;
use stratus_core::rooted::RootedFile;
use stratus_core::types::Chap;
use uuid::Uuid;

/// The CHAP credentials of one attachment of pdisk volume `volume_uuid` as
/// guest `vm`'s disk `device`, each secret fresh from [`Chap::random_secret`]
/// (128 bits) at every start, so none is ever stored by agentd: they live
/// in pdisk's export and in the initiator (QEMU's memfd or the node record)
/// until the disk is detached.
///
/// - The initiator's user is one per disk: tgtd's accounts are global by
///   name, so two disks of a guest under one user with two secrets would
///   leave the first one's login refused (found by agent/tests/faults.rs,
///   whose guests have two pdisk disks).
/// - With `mutual`, the target's account (the one the target answers the
///   initiator's challenge with) is `stt-VOLUME_UUID`: one per volume, as
///   each volume is its own target and tgtd refuses an outgoing account
///   bound to two targets; its secret is drawn separately (RFC 3720 8.2.1:
///   never the same secret in both directions).
pub(super) fn disk_chap(vm: Uuid, device: &str, volume_uuid: &str, mutual: bool) -> Result<Chap> {
    let user = format!("st{}{device}", &vm.simple().to_string()[..12]);
    let chap = Chap::new(&user, &Chap::random_secret()?)?;
    if !mutual {
        return Ok(chap);
    }
    let target = Chap::new(&format!("stt-{volume_uuid}"), &Chap::random_secret()?)?;
    chap.with_mutual(target)
}

/// `chap` as ExportVolume carries it (inside TLS or the local socket only).
pub(super) fn chap_credentials(chap: &Chap) -> pdpb::ChapCredentials {
    pdpb::ChapCredentials {
        user: chap.user.clone(),
        secret: chap.secret().to_owned(),
        target: chap.mutual().map(|t| pdpb::ChapAccount {
            user: t.user.clone(),
            secret: t.secret().to_owned(),
        }),
    }
}

/// The NoCloud seed image in a guest's directory.
pub(super) const SEED_FILE: &str = "seed.img";

pub(super) use crate::spec::device_name;

impl Agent {
    /// Attaches disk `i` of `vm` and records it with its DISK_ATTACHED event.
    /// A host file is opened here, beneath a `--host-file-root`, and pushed
    /// to `held`: QEMU opens that very file through its `/proc` path, so
    /// `held` must live until QEMU has started.
    pub(super) async fn attach_disk(
        &self,
        vm: &mut VmRecord,
        i: usize,
        d: &Disk,
        held: &mut Vec<RootedFile>,
    ) -> Result<PlannedDisk> {
        let device = device_name(i);
        // Image disks become a pdisk clone or a local overlay first.
        let (source, described) = match &d.source {
            // A migration's destination opens the source's clone.
            DiskSource::Image { image, server, .. } if vm.is_incoming() => {
                let clone = vm
                    .owned_volumes
                    .iter()
                    .find(|o| o.device == device && !o.volume.is_empty())
                    .ok_or_else(|| {
                        stratus_core::error::Error::precondition(format!(
                            "{device}: the migrating guest owns no clone of image {}",
                            image.url
                        ))
                    })?;
                (
                    ImageDisk::Pdisk(server.clone(), clone.volume.clone()),
                    Some(format!(
                        "image:{} sha256={} clone",
                        image.url,
                        &image.sha256[..12]
                    )),
                )
            }
            DiskSource::Image {
                image,
                size,
                local,
                server,
            } => {
                let s = self
                    .image_disk(vm, &device, image, *size, *local, server)
                    .await?;
                let how = if *local { "local" } else { "clone" };
                (
                    s,
                    Some(format!(
                        "image:{} sha256={} {how}",
                        image.url,
                        &image.sha256[..12]
                    )),
                )
            }
            DiskSource::Pdisk(v) => (
                ImageDisk::Pdisk(v.server.clone(), v.volume.to_string()),
                None,
            ),
            DiskSource::File(path) => {
                let f = self.host_files.open_file("disk", path, !d.read_only)?;
                (ImageDisk::RawFile(f), None)
            }
        };
        let file_attachment = |path: &Path| DiskAttachment {
            device: device.clone(),
            source: format!("file:{}", path.display()),
            attachment: path.display().to_string(),
            read_only: d.read_only,
            pdisk_volume: None,
            pdisk_server: Default::default(),
            mode: AttachMode::Qemu,
            kernel: None,
            nvme: None,
            krbd: None,
        };
        let (backend, mut att) = match source {
            ImageDisk::Pdisk(server, volume) => {
                self.attach_pdisk(vm, &device, &server, &volume, d.read_only)
                    .await?
            }
            ImageDisk::RawFile(file) => {
                // Raw, never probed: the guest writes these bytes.
                let path = file.proc_path();
                self.vmm.check_raw(&path).await?;
                let att = file_attachment(&file.path);
                held.push(file);
                (DiskBackend::RawFile { path }, att)
            }
            ImageDisk::Overlay {
                path,
                base,
                base_format,
            } => {
                self.vmm.check_overlay(&path, &base, base_format).await?;
                let att = file_attachment(&path);
                (
                    DiskBackend::Overlay {
                        path,
                        base,
                        base_format,
                    },
                    att,
                )
            }
        };
        if let Some(d) = described {
            att.source = d;
        }
        let detail = format!("{device} {}", att.source);
        // The attachment's record takes over from the export's intent (and
        // an earlier unexport still to retry would now take the disk from
        // under the guest).
        if let Some(v) = &att.pdisk_volume {
            vm.pending_unexports
                .retain(|p| !(p.volume == *v && p.server == att.pdisk_server));
        }
        vm.runtime.as_mut().expect("runtime").disks.push(att);
        self.commit(
            vm,
            &[NewEvent::new(EventType::DiskAttached, Cause::Api, detail)],
        )?;
        Ok(PlannedDisk {
            qos: Some(crate::qos::PlannedQos::of(&d.qos, &device)),
            device,
            backend,
            read_only: d.read_only,
            boot_index: d.boot_index,
        })
    }

    /// Builds the NoCloud seed of `vm` as disk `i` and records it. Rebuilt
    /// at every start from the spec, so it always matches it; the last
    /// disk, read-only, never booted from.
    pub(super) fn attach_seed(
        &self,
        vm: &mut VmRecord,
        dir: &Path,
        i: usize,
    ) -> Result<Option<PlannedDisk>> {
        let Some(context) = vm.spec.context.clone() else {
            return Ok(None);
        };
        let device = device_name(i);
        let path = dir.join(SEED_FILE);
        seed::build_seed(&context.seed(vm.uuid, &vm.spec.name), &path)?;
        // Built, not recorded: tear-down removes a guest's seed whether
        // recorded or not.
        self.crash_point("start.seed_built");
        let att = DiskAttachment {
            device: device.clone(),
            source: "seed".into(),
            attachment: path.display().to_string(),
            read_only: true,
            pdisk_volume: None,
            pdisk_server: Default::default(),
            mode: AttachMode::Qemu,
            kernel: None,
            nvme: None,
            krbd: None,
        };
        let detail = format!(
            "{device} seed hostname={}",
            context.hostname_for(&vm.spec.name)
        );
        vm.runtime.as_mut().expect("runtime").disks.push(att);
        self.commit(
            vm,
            &[NewEvent::new(EventType::DiskAttached, Cause::Api, detail)],
        )?;
        Ok(Some(PlannedDisk {
            device,
            backend: DiskBackend::RawFile { path },
            read_only: true,
            boot_index: 0,
            qos: None,
        }))
    }

    /// Makes the tap of NIC `i` of `vm` (recorded first: a crash after
    /// creating the tap must find it) on an allowed bridge: its
    /// anti-spoofing rules first, then the tap, then its bridge port and
    /// VLAN; records NIC_ATTACHED. So the tap never carries a frame without
    /// its rules.
    pub(super) async fn attach_nic(
        &self,
        vm: &mut VmRecord,
        i: usize,
        n: &Nic,
    ) -> Result<PlannedNic> {
        let tap = net::tap_name_for(vm.uuid, i);
        let bridge = self.allowed_bridge(&n.bridge)?.to_string();
        vm.runtime
            .as_mut()
            .expect("runtime")
            .nics
            .push(NicAttachment {
                tap: tap.to_string(),
                bridge: bridge.clone(),
                mac: n.mac,
                vlan: n.vlan,
                ips: n.ips.clone(),
            });
        self.commit(vm, &[])?;
        self.crash_point("start.nic_recorded");
        self.filters.protect(&tap, n.mac, &n.ips).await?;
        self.net.create_tap(&tap)?;
        self.net.attach_to_bridge(&tap, &bridge, n.vlan)?;
        if n.vlan > 0 {
            self.net.set_vlan(&tap, n.vlan)?;
        }
        self.commit(
            vm,
            &[NewEvent::new(
                EventType::NicAttached,
                Cause::Api,
                format!("{tap} on {bridge} mac={}", n.mac),
            )],
        )?;
        Ok(PlannedNic {
            tap: tap.to_string(),
            mac: n.mac,
        })
    }

    /// The bridge a NIC naming `requested` joins (empty: the default
    /// bridge), if this host lets guests on it (`--bridge` and every
    /// `--allowed-bridge`); PermissionDenied otherwise. Checked at create
    /// and again at each start, since the host's list may have changed.
    pub(super) fn allowed_bridge<'a>(&'a self, requested: &'a str) -> Result<&'a str> {
        let bridge = if requested.is_empty() {
            self.settings.default_bridge.as_str()
        } else {
            requested
        };
        if bridge == self.settings.default_bridge
            || self.settings.allowed_bridges.iter().any(|b| b == bridge)
        {
            return Ok(bridge);
        }
        Err(stratus_core::error::Error::denied(format!(
            "bridge {bridge} is not one guests may join on this host (agentd --bridge \
             and --allowed-bridge)"
        )))
    }

    /// Exports a pdisk volume to this host with a fresh CHAP secret (and,
    /// with `--chap-mutual`, the target's own account, see [`disk_chap`])
    /// and says how QEMU reaches it: by its own initiator (the secret in a
    /// sealed memfd QEMU inherits, see [`crate::vmm`]), or with `--attach
    /// kernel` through the host's (the secrets only in open-iscsi's node
    /// record). A kernel attachment is recorded in
    /// the guest's runtime before the login, so that a crash or a failure
    /// from there on is undone by [`Agent::tear_down`].
    pub(super) async fn attach_pdisk(
        &self,
        vm: &mut VmRecord,
        device: &str,
        server: &ServerName,
        volume: &str,
        read_only: bool,
    ) -> Result<(DiskBackend, DiskAttachment)> {
        let kernel = self.settings.attach == AttachMode::Kernel;
        let pdisk = self.pdisk(server)?;
        // Intent first: the volume is among the exports to undo, durably,
        // before pdisk grants it; the attachment's record replaces it.
        let uuid = pdisk
            .get_volume(volume.to_string(), vm.project.clone())
            .await
            .map_err(|s| pdisk.error(s, &format!("pdisk volume {volume}")))?
            .uuid;
        let chap = disk_chap(vm.uuid, device, &uuid, self.settings.chap_mutual)?;
        let intent = PdiskExport {
            server: server.clone(),
            volume: uuid.clone(),
        };
        if !vm.pending_unexports.contains(&intent) {
            vm.pending_unexports.push(intent.clone());
            self.commit(vm, &[])?;
        }
        self.crash_point("start.export_intent");
        let e = pdisk
            .export_volume(pdpb::ExportVolumeRequest {
                // A migration's destination: the source holds the volume
                // too, until the migration ends (pdisk bounds it).
                migration: vm.is_incoming(),
                volume: uuid.clone(),
                initiators: vec![self.settings.initiator_iqn.clone()],
                // A guest's pdisk disks are volumes of its own project:
                // pdisk answers NotFound for any other.
                project: vm.project.clone(),
                chap: Some(chap_credentials(&chap)),
                multi_attach: vm.is_incoming(),
                // pdiskd on this host answers with the volume itself.
                host_id: self.settings.local_host_id.clone().unwrap_or_default(),
                request_id: String::new(),
            })
            .await
            .map_err(|s| pdisk.error(s, &format!("exporting pdisk volume {volume}")))?;
        self.crash_point("start.exported");
        let mut att = DiskAttachment {
            device: device.to_string(),
            source: if server.is_default() {
                format!("pdisk:{volume}")
            } else {
                format!("pdisk:{server}/{volume}")
            },
            attachment: e.url,
            read_only,
            pdisk_volume: Some(e.volume_uuid),
            pdisk_server: server.clone(),
            mode: AttachMode::Qemu,
            kernel: None,
            nvme: None,
            krbd: None,
        };
        if let Some(l) = &e.local {
            // pdiskd runs here: its volume's own file or device, opened
            // by agentd and handed to QEMU, whatever --attach says.
            let path = local_disk(l, self.settings.local_host_id.is_some())?;
            return Ok((
                DiskBackend::Local {
                    path,
                    block_device: l.block_device,
                },
                att,
            ));
        }
        if let Some(rbd) = &e.rbd {
            // An RBD volume: no target. Mapped by the kernel (krbd) with
            // --attach kernel when the host has it; else QEMU's rbd driver
            // opens it with this host's key.
            let disk = crate::rbd::RbdDisk::from_attachment(rbd, &self.settings.ceph)?;
            if !kernel || !self.krbd.available().await {
                return Ok((DiskBackend::Rbd(disk), att));
            }
            return self
                .attach_krbd(vm, device, disk, &rbd.cluster_fsid, att, intent)
                .await;
        }
        if e.exporter == "nvmet" {
            return self
                .attach_nvme(vm, device, &e.target_iqn, att, intent)
                .await;
        }
        if !kernel {
            let backend = DiskBackend::Iscsi {
                portal: e.portal,
                target: e.target_iqn,
                lun: e.lun,
                initiator: self.settings.initiator_iqn.clone(),
                chap: Some(chap),
            };
            return Ok((backend, att));
        }
        let lun = IscsiLun::resolve(&e.portal, &e.target_iqn, e.lun).await;
        att.mode = AttachMode::Kernel;
        let chap_target_user = chap.mutual().map(|t| t.user.clone());
        att.kernel = lun.as_ref().ok().map(|l| KernelDisk {
            lun: l.clone(),
            device: None,
            chap_target_user: chap_target_user.clone(),
        });
        // Recorded before the login (the export too, should the LUN be bad).
        vm.runtime
            .as_mut()
            .expect("runtime")
            .disks
            .push(att.clone());
        vm.pending_unexports.retain(|v| *v != intent);
        self.commit(vm, &[])?;
        let lun = lun?;
        let got = self
            .kernel
            .attach(&Holder::disk(vm.uuid, device), &lun, Some(&chap))
            .await?;
        // The caller records the finished attachment with its event.
        vm.runtime.as_mut().expect("runtime").disks.pop();
        att.attachment = got.device.display().to_string();
        att.kernel = Some(KernelDisk {
            lun,
            device: Some(got.device.clone()),
            chap_target_user,
        });
        Ok((DiskBackend::HostDevice { path: got.device }, att))
    }

    /// Detaches a kernel-attached disk (an iSCSI LUN's session or an
    /// NVMe/TCP controller, when `d` is the last holder); nothing for others.
    pub(super) async fn detach_kernel_disk(&self, vm: Uuid, d: &DiskAttachment) -> Result<()> {
        if d.mode != AttachMode::Kernel {
            return Ok(());
        }
        let holder = Holder::disk(vm, &d.device);
        if let Some(k) = &d.kernel {
            self.kernel.detach(&holder, &k.lun).await?;
        }
        if let Some(n) = &d.nvme {
            self.nvme.detach(&holder, &n.namespace).await?;
        }
        if let Some(r) = &d.krbd {
            self.krbd.detach(&holder, r).await?;
        }
        Ok(())
    }

    /// An RBD export mapped by the kernel's rbd client (`--attach kernel`
    /// on a host with krbd), recorded before the map like an iSCSI login.
    async fn attach_krbd(
        &self,
        vm: &mut VmRecord,
        device: &str,
        disk: crate::rbd::RbdDisk,
        fsid: &str,
        mut att: DiskAttachment,
        intent: PdiskExport,
    ) -> Result<(DiskBackend, DiskAttachment)> {
        let mut rec = KrbdDisk {
            pool: disk.pool.clone(),
            image: disk.image.clone(),
            fsid: fsid.to_owned(),
            device: None,
        };
        att.mode = AttachMode::Kernel;
        att.krbd = Some(rec.clone());
        // Recorded before the map.
        vm.runtime
            .as_mut()
            .expect("runtime")
            .disks
            .push(att.clone());
        vm.pending_unexports.retain(|v| *v != intent);
        self.commit(vm, &[])?;
        let dev = self
            .krbd
            .attach(&Holder::disk(vm.uuid, device), &disk, fsid)
            .await?;
        // The caller records the finished attachment with its event.
        vm.runtime.as_mut().expect("runtime").disks.pop();
        att.attachment = dev.display().to_string();
        rec.device = Some(dev.clone());
        att.krbd = Some(rec);
        Ok((DiskBackend::HostDevice { path: dev }, att))
    }

    /// An export of pdiskd's nvmet exporter (NVMe/TCP): connected by the
    /// kernel's NVMe host (`--attach kernel` only: QEMU has no NVMe/TCP
    /// initiator), recorded before the connect like an iSCSI login.
    async fn attach_nvme(
        &self,
        vm: &mut VmRecord,
        device: &str,
        target_iqn: &str,
        mut att: DiskAttachment,
        intent: PdiskExport,
    ) -> Result<(DiskBackend, DiskAttachment)> {
        if self.settings.attach != AttachMode::Kernel {
            return Err(stratus_core::error::Error::precondition(format!(
                "{} is exported over NVMe/TCP (exporter nvmet): \
                 agentd needs --attach kernel (QEMU has no NVMe/TCP initiator)",
                att.source
            )));
        }
        // The export URL pdiskd made: nvme+tcp://PORTAL/SUBNQN/NSID.
        let ns = NvmeNamespace::from_export(&att.attachment, target_iqn).await;
        att.mode = AttachMode::Kernel;
        att.nvme = ns.as_ref().ok().map(|n| NvmeDisk {
            namespace: n.clone(),
            device: None,
        });
        // Recorded before the connect (the export too, should the URL be bad).
        vm.runtime
            .as_mut()
            .expect("runtime")
            .disks
            .push(att.clone());
        vm.pending_unexports.retain(|v| *v != intent);
        self.commit(vm, &[])?;
        let ns = ns?;
        let dev = self
            .nvme
            .attach(&Holder::disk(vm.uuid, device), &ns)
            .await?;
        // The caller records the finished attachment with its event.
        vm.runtime.as_mut().expect("runtime").disks.pop();
        att.attachment = dev.display().to_string();
        att.nvme = Some(NvmeDisk {
            namespace: ns,
            device: Some(dev.clone()),
        });
        Ok((DiskBackend::HostDevice { path: dev }, att))
    }

    /// Undoes a guest's attachments: kills its QEMUs (any process running
    /// its UUID, recorded or not), detaches its kernel-attached disks
    /// (logging out of sessions no one else holds), unexports its pdisk
    /// disks and any export only intended, deletes its taps, secrets and
    /// seed. Returns the events to commit. What could not be undone stays
    /// in the record for the next try: an unexport pdisk refused in
    /// `vm.pending_unexports`; a QEMU that outlived SIGKILL and taps that
    /// could not be deleted in `vm.runtime`.
    pub(super) async fn tear_down(&self, vm: &mut VmRecord) -> Vec<NewEvent> {
        let mut events = Vec::new();
        self.qmp.lock().unwrap().remove(&vm.uuid);
        // A hot-plug that had not finished: its export and tap are in the
        // record and go below; the spec never named its device.
        vm.hotplug = None;
        // No runtime: no attachment recorded, but a QEMU of the guest may
        // still run (one a restart lost track of); looked for all the same.
        let rt = vm.runtime.take().unwrap_or_default();
        let mut pids = self.vmm.find_qemus(vm.uuid);
        if rt.pid != 0 && !pids.contains(&rt.pid) && self.vmm.is_our_qemu(rt.pid, vm.uuid) {
            pids.push(rt.pid);
        }
        let mut alive = Vec::new();
        for pid in pids {
            self.vmm.kill(pid);
            if !self
                .vmm
                .wait_gone(pid, vm.uuid, Duration::from_secs(10))
                .await
            {
                tracing::warn!(vm = %vm.spec.name, pid,
                    "QEMU outlived SIGKILL; kept in the record and killed again at the next try");
                alive.push(pid);
            }
        }
        if alive.is_empty() {
            // Its QEMU is gone; its cgroup and taps still count what it
            // used since the last usage reading: take the last one now.
            self.final_usage(vm, &rt).await;
            // The uid may go to another guest.
            self.uids.release(vm.uuid);
            if let Err(e) = self.vmm.release_cgroup(vm.uuid).await {
                tracing::warn!(vm = %vm.spec.name, error = %e, "could not remove the guest's cgroup");
            }
        }
        for d in rt.disks.iter().rev() {
            // Before the unexport: the session must not outlive its target.
            if let Err(e) = self.detach_kernel_disk(vm.uuid, d).await {
                tracing::warn!(vm = %vm.spec.name, disk = %d.device, error = %e,
                    "could not detach the kernel-attached disk; an unused \
                     session or controller is removed at the next start");
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
            events.push(NewEvent::new(
                EventType::DiskDetached,
                Cause::Api,
                format!("{} {}", d.device, d.source),
            ));
        }
        // The disks' exports and any only intended (a crash between the
        // intent and the attachment's record); those pdisk refuses stay.
        self.retry_unexports(vm).await;
        let mut taps_left = Vec::new();
        for n in &rt.nics {
            match n.tap.parse::<net::TapName>() {
                Ok(t) => {
                    if let Err(e) = self.net.delete_tap(&t) {
                        tracing::warn!(tap = %n.tap, error = %e,
                            "could not delete tap; kept in the record and retried");
                        taps_left.push(n.clone());
                        continue;
                    }
                    // After the tap: it never sits on a bridge without them.
                    // Rules left by a failure here are removed at the next
                    // start's reconciliation.
                    if let Err(e) = self.filters.remove(&t).await {
                        tracing::warn!(tap = %n.tap, error = %e, "could not remove the tap's anti-spoofing rules");
                    }
                }
                Err(e) => tracing::warn!(tap = %n.tap, error = %e, "bad tap name in record"),
            }
            events.push(NewEvent::new(
                EventType::NicDetached,
                Cause::Api,
                n.tap.clone(),
            ));
        }
        let dir = self.vm_dir(vm.uuid);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // The seed goes too: its user-data may hold secrets, and
                // the next start builds it again. (`chap-*` files are left
                // by agentds from before secrets went by memfd.)
                if name.starts_with("chap-")
                    || (alive.is_empty() && (name == "qmp.sock" || name == "qemu.pid"))
                    || name == SEED_FILE
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        if !alive.is_empty() || !taps_left.is_empty() {
            vm.runtime = Some(crate::store::Runtime {
                pid: alive.first().copied().unwrap_or(0),
                qemu_user: if alive.is_empty() { None } else { rt.qemu_user },
                qmp_socket: rt.qmp_socket.clone(),
                disks: Vec::new(),
                nics: taps_left,
            });
        }
        events
    }

    /// Ends the export to this host `export` names; Ok when there is none.
    pub(super) async fn unexport(&self, export: &PdiskExport) -> Result<()> {
        let pdisk = self.pdisk(&export.server)?;
        let volume = &export.volume;
        match pdisk
            .unexport_volume(pdpb::UnexportVolumeRequest {
                volume: volume.to_string(),
                initiators: vec![self.settings.initiator_iqn.clone()],
                project: String::new(),
                request_id: String::new(),
            })
            .await
        {
            Ok(()) => Ok(()),
            // Already gone (or never exported to us): nothing to undo.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(pdisk.error(s, &format!("unexporting volume {volume}"))),
        }
    }
}

/// The path of a local attachment pdiskd answered, once it is what it
/// says: asked for (`asked`: this host sent its id), absolute with no
/// `..`, raw, and a regular file or a block device as announced. The path
/// is pdiskd's (the volume's own), never anything agentd's caller gave.
pub(super) fn local_disk(l: &pdpb::LocalAttachment, asked: bool) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let refuse = |why: &str| {
        Err(stratus_core::error::Error::precondition(format!(
            "pdisk answered a local attachment {:?}: {why}",
            l.path
        )))
    };
    if !asked {
        return refuse("this host did not ask for one (agentd --local-attach=false)");
    }
    let path = std::path::PathBuf::from(&l.path);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return refuse("not an absolute path");
    }
    if l.format != "raw" {
        return refuse(&format!("format {:?}, not raw", l.format));
    }
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return refuse(&format!("not on this host ({e})")),
    };
    let kind_ok = if l.block_device {
        meta.file_type().is_block_device()
    } else {
        meta.is_file()
    };
    if !kind_ok {
        return refuse(if l.block_device {
            "not a block device"
        } else {
            "not a regular file"
        });
    }
    Ok(path)
}
