//! The guest service: every VM operation in domain terms, the per-guest QMP
//! monitors, and the start-up reconciliation. The gRPC layer only converts.
//!
//! Ownership: agentd owns, per guest, its directory under `STATE_DIR/vms/`,
//! its taps (named from the VM UUID, see [`net::tap_name_for`]), the pdisk
//! exports it asked for on the guest's behalf and, with `--attach kernel`,
//! the iSCSI sessions and SCSI disks of those exports ([`crate::attach`]).
//! QEMU processes are daemonized and owned by init; agentd finds them again
//! by pid file + UUID.
//!
//! Crash safety: every state change is committed with its events in one
//! transaction. Attachments (exports, taps) are recorded in the guest's
//! runtime *before* QEMU starts, so a crash at any point leaves a record from
//! which [`Agent::reconcile`] can either adopt the live QEMU or undo the
//! attachments of a dead one.
//!
//! Synchronisation without sleeps: an API call that waits for QEMU (pause,
//! resume, reboot, stop) subscribes to the event stream *before* it sends the
//! QMP command, then waits for the event the monitor commits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tokio::sync::broadcast;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::attach::{AttachMode, Holder, IscsiLun, KernelAttacher, KernelDisk, KernelOptions};
use crate::net;
use crate::qmp::{Qmp, QmpEventKind};
use crate::seed;
use crate::spec::{Cause, DiskSource, EventType, VmSpec, VmState};
use crate::store::{
    now_rfc3339, AgentStore, DiskAttachment, Event, NewEvent, NicAttachment, Runtime, VmRecord,
};
use crate::vmm::{self, Accel, DiskBackend, LaunchPlan, PlannedDisk, PlannedNic};
use stratus_core::error::{Error, Result};
use stratus_core::runner::CommandRunner;

/// Settings the service needs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    pub default_bridge: String,
    pub initiator_iqn: String,
    /// How pdisk disks reach QEMU: its own iSCSI initiator or the kernel's.
    pub attach: AttachMode,
    /// pdiskd's URL; None when this host runs no pdisk disks.
    pub pdisk_url: Option<String>,
    /// vCPUs promised to guests may reach host CPUs times this.
    pub cpu_overcommit: u32,
    /// Memory kept for the host itself.
    pub reserved_memory: u64,
    /// Bytes the local image cache may hold; None: no limit.
    pub image_quota: Option<u64>,
    /// The image policy file (allowed/denied checksums and endorsers).
    pub image_policy: Option<PathBuf>,
    /// Directories `file://` images may come from; none: file:// refused.
    pub image_file_roots: Vec<PathBuf>,
}

/// Facts about this host, found at start.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub hostname: String,
    pub cpus: u32,
    pub memory: u64,
    pub accel: Accel,
    pub accel_reason: String,
    pub qemu_version: String,
    pub io_uring: bool,
}

impl HostFacts {
    pub async fn probe(runner: &dyn CommandRunner, accel: vmm::AccelChoice) -> HostFacts {
        let (accel, accel_reason) = vmm::choose_accel(accel);
        let memory = stratus_core::host::memory_total().unwrap_or(0);
        HostFacts {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory,
            accel,
            accel_reason,
            qemu_version: vmm::qemu_version(runner).await,
            io_uring: vmm::io_uring_supported(runner).await,
        }
    }
}

/// What GetHost reports.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub facts: HostFacts,
    pub free_vcpus: u32,
    pub free_memory: u64,
    pub vm_count: u32,
    pub running: u32,
    pub last_seq: u64,
}

pub struct Agent {
    store: AgentStore,
    runner: Arc<dyn CommandRunner>,
    settings: AgentSettings,
    host: HostFacts,
    pdisk: Option<VolumeServiceClient<Channel>>,
    /// The kernel's iSCSI initiator: used for new disks with `--attach
    /// kernel`, and always for undoing disks recorded as kernel-attached.
    kernel: KernelAttacher,
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// QMP clients of guests whose monitor runs.
    qmp: Mutex<HashMap<Uuid, Qmp>>,
    /// Serializes creates so capacity and name checks hold.
    create_lock: tokio::sync::Mutex<()>,
    /// The verified local image cache.
    images: crate::images::LocalCache,
    policy: Option<crate::images::Policy>,
    /// One pdisk import per image checksum at a time.
    base_flights: images_ops::BaseFlights,
    /// Cached images held by guests' local disks, per guest.
    pins: Mutex<HashMap<Uuid, Vec<crate::images::PinGuard>>>,
}

#[path = "service_images.rs"]
mod images_ops;
pub use images_ops::ImageInfo;

/// How long start waits for QEMU's QMP socket.
const QMP_CONNECT: Duration = Duration::from_secs(30);
/// How long pause/resume/reboot wait for QEMU to confirm.
const CONFIRM: Duration = Duration::from_secs(30);

/// The NoCloud seed image in a guest's directory.
const SEED_FILE: &str = "seed.img";

fn device_name(i: usize) -> String {
    format!("vd{}", (b'a' + i as u8) as char)
}

fn random_secret() -> String {
    // 16 characters from a UUIDv4's random bits: tgt and LIO accept 12..=16.
    let u = Uuid::new_v4().simple().to_string();
    u[..16].to_string()
}

impl Agent {
    pub fn new(
        store: AgentStore,
        runner: Arc<dyn CommandRunner>,
        settings: AgentSettings,
        host: HostFacts,
    ) -> Result<Arc<Agent>> {
        let pdisk = match &settings.pdisk_url {
            Some(url) => Some(VolumeServiceClient::new(
                tonic::transport::Endpoint::from_shared(url.clone())
                    .map_err(|e| Error::invalid(format!("pdisk URL {url}: {e}")))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(600))
                    .connect_lazy(),
            )),
            None => None,
        };
        let policy = match &settings.image_policy {
            Some(p) => Some(crate::images::Policy::load(p)?),
            None => None,
        };
        let images = crate::images::LocalCache::open(
            images_ops::cache_dir(&settings.state_dir),
            crate::images::CacheOptions {
                quota: settings.image_quota,
                policy: policy.clone(),
                file_roots: Some(settings.image_file_roots.clone()),
                ..Default::default()
            },
        )?;
        let kernel =
            KernelAttacher::new(runner.clone(), KernelOptions::new(&settings.initiator_iqn));
        Ok(Arc::new(Agent {
            store,
            runner,
            settings,
            host,
            pdisk,
            kernel,
            locks: Mutex::default(),
            qmp: Mutex::default(),
            create_lock: tokio::sync::Mutex::new(()),
            images,
            policy,
            base_flights: Default::default(),
            pins: Mutex::default(),
        }))
    }

    pub fn store(&self) -> &AgentStore {
        &self.store
    }

    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    pub fn host_facts(&self) -> &HostFacts {
        &self.host
    }

    pub fn kernel_initiator(&self) -> &KernelAttacher {
        &self.kernel
    }

    async fn lock(&self, id: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.locks.lock().unwrap().entry(id).or_default().clone();
        m.lock_owned().await
    }

    fn vm_dir(&self, id: Uuid) -> PathBuf {
        self.settings.state_dir.join("vms").join(id.to_string())
    }

    pub fn console_log(&self, id: Uuid) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    fn pdisk(&self) -> Result<VolumeServiceClient<Channel>> {
        self.pdisk.clone().ok_or_else(|| {
            Error::precondition("this agent has no pdisk server configured (--pdisk URL)")
        })
    }

    fn qmp_of(&self, id: Uuid) -> Option<Qmp> {
        self.qmp.lock().unwrap().get(&id).cloned()
    }

    fn commit(&self, vm: &mut VmRecord, events: &[NewEvent]) -> Result<Vec<Event>> {
        let out = self.store.commit(vm, events)?;
        for e in &out {
            tracing::info!(seq = e.seq, vm = %e.vm_name, event = ?e.kind, state = ?e.state,
                cause = ?e.cause, detail = %e.detail, "event");
        }
        Ok(out)
    }

    // ---------- capacity ----------

    pub fn host_info(&self) -> Result<HostInfo> {
        let vms = self.store.vms()?;
        let vcpus: u32 = vms.iter().map(|v| v.spec.vcpus).sum();
        let mem: u64 = vms.iter().map(|v| v.spec.memory.0).sum();
        let cap_vcpus = self.host.cpus * self.settings.cpu_overcommit;
        let cap_mem = self
            .host
            .memory
            .saturating_sub(self.settings.reserved_memory);
        Ok(HostInfo {
            facts: self.host.clone(),
            free_vcpus: cap_vcpus.saturating_sub(vcpus),
            free_memory: cap_mem.saturating_sub(mem),
            vm_count: vms.len() as u32,
            running: vms.iter().filter(|v| v.state.is_active()).count() as u32,
            last_seq: self.store.last_seq()?,
        })
    }

    // ---------- create ----------

    pub async fn create_vm(&self, spec: VmSpec) -> Result<VmRecord> {
        spec.validate()?;
        for d in &spec.disks {
            match &d.source {
                DiskSource::File(p) => {
                    crate::spec::check_host_file("disk", &p.display().to_string())?;
                }
                DiskSource::Image { image, local, .. } => {
                    let r = image.to_ref()?;
                    if let Some(policy) = &self.policy {
                        policy.check(&r)?;
                    }
                    if !local {
                        self.pdisk()?;
                    }
                }
                DiskSource::Pdisk(v) => {
                    let mut c = self.pdisk()?;
                    c.get_volume(pdpb::GetVolumeRequest { volume: v.clone() })
                        .await
                        .map_err(|s| status_error(s, &format!("pdisk volume {v}")))?;
                }
            }
        }
        if let Some(k) = &spec.kernel {
            crate::spec::check_host_file("kernel", &k.kernel.display().to_string())?;
            if let Some(i) = &k.initrd {
                crate::spec::check_host_file("initrd", &i.display().to_string())?;
            }
        }
        let _g = self.create_lock.lock().await;
        if self.store.find_vm(spec.name.as_str()).is_ok() {
            return Err(Error::exists(format!("vm {} already exists", spec.name)));
        }
        let info = self.host_info()?;
        if spec.vcpus > info.free_vcpus || spec.memory.0 > info.free_memory {
            return Err(Error::exhausted(format!(
                "vm {}: needs {} vCPUs and {}, host has {} vCPUs and {} free",
                spec.name,
                spec.vcpus,
                spec.memory,
                info.free_vcpus,
                stratus_core::types::ByteSize(info.free_memory)
            )));
        }
        let mut vm = VmRecord {
            uuid: Uuid::new_v4(),
            spec,
            state: VmState::Defined,
            state_reason: String::new(),
            runtime: None,
            created_at: now_rfc3339(),
            last_event_seq: 0,
            owned_volumes: Vec::new(),
        };
        self.commit(
            &mut vm,
            &[NewEvent::new(EventType::Created, Cause::Api, "")],
        )?;
        Ok(vm)
    }

    pub fn get_vm(&self, r: &str) -> Result<VmRecord> {
        self.store.find_vm(r)
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>> {
        self.store.vms()
    }

    // ---------- start ----------

    pub async fn start_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord> {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let mut vm = self.store.find_vm(&vm.uuid.to_string())?;
        if vm.state.is_active() {
            return Err(Error::precondition(format!(
                "vm {} is {:?}",
                vm.spec.name, vm.state
            )));
        }
        vm.state = VmState::Starting;
        vm.state_reason.clear();
        vm.runtime = Some(Runtime::default());
        self.commit(
            &mut vm,
            &[NewEvent::new(EventType::Starting, Cause::Api, "")],
        )?;
        match self.bring_up(&mut vm).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                tracing::warn!(vm = %vm.spec.name, error = %e, "start failed; undoing attachments");
                let mut events = self.tear_down(&mut vm).await;
                vm.state = VmState::Error;
                vm.state_reason = e.to_string();
                events.push(NewEvent::new(EventType::Error, Cause::Qemu, e.to_string()));
                self.commit(&mut vm, &events)?;
                Err(e)
            }
        }
    }

    /// Attaches disks and NICs (recording each before the next step), then
    /// launches QEMU and connects its monitor.
    async fn bring_up(self: &Arc<Self>, vm: &mut VmRecord) -> Result<()> {
        let dir = self.vm_dir(vm.uuid);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let mut disks = Vec::new();
        for (i, d) in vm.spec.disks.clone().iter().enumerate() {
            let device = device_name(i);
            // Image disks become a pdisk clone or a local overlay first.
            let (source, described) = match &d.source {
                DiskSource::Image { image, size, local } => {
                    let s = self.image_disk(vm, &device, image, *size, *local).await?;
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
                other => (other.clone(), None),
            };
            let (backend, mut att) = match &source {
                DiskSource::Pdisk(volume) => {
                    self.attach_pdisk(vm, &dir, &device, volume, d.read_only)
                        .await?
                }
                DiskSource::Image { .. } => {
                    return Err(Error::internal("image disk was not resolved"));
                }
                DiskSource::File(path) => {
                    let format = match stratus_core::image::detect_format(path)? {
                        stratus_core::image::ImageFormat::Qcow2 => "qcow2",
                        stratus_core::image::ImageFormat::Raw => "raw",
                    };
                    vmm::check_image(self.runner.as_ref(), path, format).await?;
                    (
                        DiskBackend::File {
                            path: path.clone(),
                            format: format.into(),
                        },
                        DiskAttachment {
                            device: device.clone(),
                            source: format!("file:{}", path.display()),
                            attachment: path.display().to_string(),
                            read_only: d.read_only,
                            pdisk_volume: None,
                            mode: AttachMode::Qemu,
                            kernel: None,
                        },
                    )
                }
            };
            if let Some(d) = described {
                att.source = d;
            }
            let detail = format!("{device} {}", att.source);
            vm.runtime.as_mut().expect("runtime").disks.push(att);
            self.commit(
                vm,
                &[NewEvent::new(EventType::DiskAttached, Cause::Api, detail)],
            )?;
            disks.push(PlannedDisk {
                device,
                backend,
                read_only: d.read_only,
                boot_index: d.boot_index,
            });
        }
        if let Some(context) = &vm.spec.context {
            // Rebuilt at every start from the spec, so it always matches it;
            // the last disk, read-only, never booted from.
            let device = device_name(disks.len());
            let path = dir.join(SEED_FILE);
            seed::build_seed(&context.seed(vm.uuid, &vm.spec.name), &path)?;
            let att = DiskAttachment {
                device: device.clone(),
                source: "seed".into(),
                attachment: path.display().to_string(),
                read_only: true,
                pdisk_volume: None,
                mode: AttachMode::Qemu,
                kernel: None,
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
            disks.push(PlannedDisk {
                device,
                backend: DiskBackend::File {
                    path,
                    format: "raw".into(),
                },
                read_only: true,
                boot_index: 0,
            });
        }
        let mut nics = Vec::new();
        for (i, n) in vm.spec.nics.clone().iter().enumerate() {
            let tap = net::tap_name_for(vm.uuid, i);
            let bridge = if n.bridge.is_empty() {
                self.settings.default_bridge.clone()
            } else {
                n.bridge.clone()
            };
            // Record first: a crash after creating the tap must find it.
            vm.runtime
                .as_mut()
                .expect("runtime")
                .nics
                .push(NicAttachment {
                    tap: tap.to_string(),
                    bridge: bridge.clone(),
                    mac: n.mac.clone(),
                    vlan: n.vlan,
                });
            self.commit(vm, &[])?;
            net::create_tap(&tap)?;
            net::attach_to_bridge(&tap, &bridge)?;
            if n.vlan > 0 {
                net::set_vlan(&tap, n.vlan)?;
            }
            self.commit(
                vm,
                &[NewEvent::new(
                    EventType::NicAttached,
                    Cause::Api,
                    format!("{tap} on {bridge} mac={}", n.mac),
                )],
            )?;
            nics.push(PlannedNic {
                tap: tap.to_string(),
                mac: n.mac.clone(),
            });
        }
        let plan = LaunchPlan {
            uuid: vm.uuid,
            name: vm.spec.name.to_string(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory.0 >> 20,
            accel: self.host.accel,
            disks,
            nics,
            kernel: vm.spec.kernel.clone(),
            dir: dir.clone(),
            io_uring: self.host.io_uring,
        };
        let _ = std::fs::remove_file(plan.console_log());
        let pid = vmm::launch(self.runner.as_ref(), &plan).await?;
        {
            let rt = vm.runtime.as_mut().expect("runtime");
            rt.pid = pid;
            rt.qmp_socket = plan.qmp_socket();
        }
        self.commit(vm, &[])?;
        let (qmp, events) = Qmp::connect(&plan.qmp_socket(), QMP_CONNECT).await?;
        let status = qmp.query_status().await?;
        vm.state = if status.running {
            VmState::Running
        } else {
            VmState::Paused
        };
        self.qmp.lock().unwrap().insert(vm.uuid, qmp);
        self.commit(
            vm,
            &[NewEvent::new(
                EventType::Running,
                Cause::Api,
                format!("qemu pid {pid}, accel {}", self.host.accel.name()),
            )],
        )?;
        tokio::spawn(self.clone().monitor(vm.uuid, pid, events));
        Ok(())
    }

    /// Exports a pdisk volume to this host with a fresh CHAP secret and says
    /// how QEMU reaches it: by its own initiator (the secret in a 0600 file
    /// QEMU reads), or with `--attach kernel` through the host's (the secret
    /// only in open-iscsi's node record). A kernel attachment is recorded in
    /// the guest's runtime before the login, so that a crash or a failure
    /// from there on is undone by [`Agent::tear_down`].
    async fn attach_pdisk(
        &self,
        vm: &mut VmRecord,
        dir: &Path,
        device: &str,
        volume: &str,
        read_only: bool,
    ) -> Result<(DiskBackend, DiskAttachment)> {
        let kernel = self.settings.attach == AttachMode::Kernel;
        let secret = random_secret();
        let user = format!("st{}", &vm.uuid.simple().to_string()[..12]);
        let chap = stratus_core::types::Chap::new(&user, &secret)?;
        let secret_file = dir.join(format!("chap-{device}"));
        if !kernel {
            write_secret(&secret_file, &secret)?;
        }
        let mut c = self.pdisk()?;
        let e = c
            .export_volume(pdpb::ExportVolumeRequest {
                volume: volume.to_string(),
                initiators: vec![self.settings.initiator_iqn.clone()],
                chap: Some(pdpb::ChapCredentials {
                    user: user.clone(),
                    secret,
                }),
            })
            .await
            .map_err(|s| status_error(s, &format!("exporting pdisk volume {volume}")))?
            .into_inner();
        let mut att = DiskAttachment {
            device: device.to_string(),
            source: format!("pdisk:{volume}"),
            attachment: e.url,
            read_only,
            pdisk_volume: Some(e.volume_uuid),
            mode: AttachMode::Qemu,
            kernel: None,
        };
        if !kernel {
            let backend = DiskBackend::Iscsi {
                portal: e.portal,
                target: e.target_iqn,
                lun: e.lun,
                initiator: self.settings.initiator_iqn.clone(),
                chap: Some((user, secret_file)),
            };
            return Ok((backend, att));
        }
        let lun = IscsiLun::resolve(&e.portal, &e.target_iqn, e.lun).await;
        att.mode = AttachMode::Kernel;
        att.kernel = lun.as_ref().ok().map(|l| KernelDisk {
            lun: l.clone(),
            device: None,
        });
        // Recorded before the login (the export too, should the LUN be bad).
        vm.runtime
            .as_mut()
            .expect("runtime")
            .disks
            .push(att.clone());
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
        });
        Ok((DiskBackend::HostDevice { path: got.device }, att))
    }

    /// Undoes a guest's attachments: kills a leftover QEMU, detaches its
    /// kernel-attached disks (logging out of sessions no one else holds),
    /// unexports its pdisk disks, deletes its taps, secrets and seed.
    /// Returns the events to commit.
    async fn tear_down(&self, vm: &mut VmRecord) -> Vec<NewEvent> {
        let mut events = Vec::new();
        self.qmp.lock().unwrap().remove(&vm.uuid);
        let Some(rt) = vm.runtime.take() else {
            return events;
        };
        let mut pids = vmm::find_qemus(vm.uuid);
        if rt.pid != 0 && !pids.contains(&rt.pid) && vmm::is_our_qemu(rt.pid, vm.uuid) {
            pids.push(rt.pid);
        }
        for pid in pids {
            vmm::signal(pid, libc::SIGKILL);
            vmm::wait_gone(pid, vm.uuid, Duration::from_secs(10)).await;
        }
        for d in rt.disks.iter().rev() {
            // Before the unexport: the session must not outlive its target.
            if let (AttachMode::Kernel, Some(k)) = (d.mode, &d.kernel) {
                if let Err(e) = self
                    .kernel
                    .detach(&Holder::disk(vm.uuid, &d.device), &k.lun)
                    .await
                {
                    tracing::warn!(vm = %vm.spec.name, disk = %d.device, error = %e,
                        "could not detach the kernel iSCSI disk; \
                         an unused session is logged out at the next start");
                }
            }
            if let Some(volume) = &d.pdisk_volume {
                if let Err(e) = self.unexport(volume).await {
                    tracing::warn!(vm = %vm.spec.name, disk = %d.device, error = %e,
                        "could not unexport; pdisk keeps the export until retried");
                }
            }
            events.push(NewEvent::new(
                EventType::DiskDetached,
                Cause::Api,
                format!("{} {}", d.device, d.source),
            ));
        }
        for n in &rt.nics {
            match n.tap.parse::<net::TapName>() {
                Ok(t) => {
                    if let Err(e) = net::delete_tap(&t) {
                        tracing::warn!(tap = %n.tap, error = %e, "could not delete tap");
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
                // the next start builds it again.
                if name.starts_with("chap-")
                    || name == "qmp.sock"
                    || name == "qemu.pid"
                    || name == SEED_FILE
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        events
    }

    async fn unexport(&self, volume: &str) -> Result<()> {
        let mut c = self.pdisk()?;
        match c
            .unexport_volume(pdpb::UnexportVolumeRequest {
                volume: volume.to_string(),
                initiators: vec![self.settings.initiator_iqn.clone()],
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already gone (or never exported to us): nothing to undo.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(status_error(s, &format!("unexporting volume {volume}"))),
        }
    }

    // ---------- the monitor ----------

    /// Follows one QEMU's QMP events until it exits, then records how it
    /// ended and undoes its attachments.
    async fn monitor(self: Arc<Self>, id: Uuid, pid: u32, mut events: crate::qmp::QmpEvents) {
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
        if !vmm::wait_gone(pid, id, Duration::from_secs(10)).await {
            vmm::signal(pid, libc::SIGKILL);
            vmm::wait_gone(pid, id, Duration::from_secs(5)).await;
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
    async fn record_exit(
        &self,
        id: Uuid,
        shutdown: Option<(bool, String)>,
        panicked: bool,
        while_away: bool,
    ) -> Result<()> {
        let Some(mut vm) = self.store.vm(id)? else {
            return Ok(());
        };
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
        self.commit(&mut vm, &events)?;
        Ok(())
    }

    // ---------- stop, pause, resume, reboot ----------

    /// Waits for an event of `kinds` about `id` on `rx` (subscribed before
    /// the action that causes it).
    async fn await_event(
        &self,
        rx: &mut broadcast::Receiver<Event>,
        id: Uuid,
        kinds: &[EventType],
        limit: Duration,
    ) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => {
                    return Err(Error::unavailable(format!(
                        "vm {id}: QEMU did not confirm within {limit:?}"
                    )))
                }
                Ok(Ok(e)) if e.vm_uuid == id && kinds.contains(&e.kind) => return Ok(e),
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    // Fall back to the record: it is committed before the event is sent.
                    if let Some(vm) = self.store.vm(id)? {
                        let evs = self
                            .store
                            .events_since(vm.last_event_seq.saturating_sub(8), 64)?;
                        if let Some(e) = evs
                            .into_iter()
                            .rev()
                            .find(|e| e.vm_uuid == id && kinds.contains(&e.kind))
                        {
                            return Ok(e);
                        }
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(Error::internal("event stream closed"))
                }
            }
        }
    }

    fn active_qmp(&self, vm: &VmRecord) -> Result<Qmp> {
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(Error::precondition(format!(
                "vm {} is {:?}",
                vm.spec.name, vm.state
            )));
        }
        self.qmp_of(vm.uuid).ok_or_else(|| {
            Error::unavailable(format!(
                "vm {}: no QMP connection to its QEMU",
                vm.spec.name
            ))
        })
    }

    pub async fn stop_vm(&self, r: &str, timeout: Duration, force: bool) -> Result<VmRecord> {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let vm = self.store.find_vm(&vm.uuid.to_string())?;
        self.stop_locked(vm, timeout, force, Cause::Api).await
    }

    async fn stop_locked(
        &self,
        mut vm: VmRecord,
        timeout: Duration,
        force: bool,
        cause: Cause,
    ) -> Result<VmRecord> {
        let qmp = self.active_qmp(&vm)?;
        let id = vm.uuid;
        let mut rx = self.store.subscribe();
        vm.state = VmState::Stopping;
        self.commit(
            &mut vm,
            &[NewEvent::new(
                EventType::Stopping,
                cause,
                if force { "forced" } else { "ACPI powerdown" },
            )],
        )?;
        let ended = [EventType::Stopped, EventType::Crashed];
        if !force {
            match qmp.system_powerdown().await {
                Ok(_) => {
                    if let Ok(e) = self.await_event(&mut rx, id, &ended, timeout).await {
                        let _ = e;
                        return self.store.find_vm(&id.to_string());
                    }
                    tracing::warn!(vm = %vm.spec.name, ?timeout, "guest ignored ACPI powerdown; forcing");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.spec.name, error = %e, "powerdown failed; forcing")
                }
            }
        }
        if let Err(e) = qmp.quit().await {
            tracing::warn!(vm = %vm.spec.name, error = %e, "QMP quit failed; killing QEMU");
            if let Some(pid) = vm.runtime.as_ref().map(|r| r.pid) {
                vmm::signal(pid, libc::SIGKILL);
            }
        }
        self.await_event(&mut rx, id, &ended, Duration::from_secs(30))
            .await?;
        self.store.find_vm(&id.to_string())
    }

    pub async fn pause_vm(&self, r: &str) -> Result<VmRecord> {
        self.qmp_action(r, VmState::Running, EventType::Paused, |q| async move {
            q.stop().await
        })
        .await
    }

    pub async fn resume_vm(&self, r: &str) -> Result<VmRecord> {
        self.qmp_action(r, VmState::Paused, EventType::Resumed, |q| async move {
            q.cont().await
        })
        .await
    }

    pub async fn reboot_vm(&self, r: &str) -> Result<VmRecord> {
        self.qmp_action(r, VmState::Running, EventType::Rebooted, |q| async move {
            q.system_reset().await
        })
        .await
    }

    async fn qmp_action<F, Fut>(
        &self,
        r: &str,
        from: VmState,
        confirm: EventType,
        act: F,
    ) -> Result<VmRecord>
    where
        F: FnOnce(Qmp) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let vm = self.store.find_vm(&vm.uuid.to_string())?;
        if vm.state != from {
            return Err(Error::precondition(format!(
                "vm {} is {:?}, not {:?}",
                vm.spec.name, vm.state, from
            )));
        }
        let qmp = self.active_qmp(&vm)?;
        let mut rx = self.store.subscribe();
        act(qmp).await?;
        self.await_event(&mut rx, vm.uuid, &[confirm], CONFIRM)
            .await?;
        self.store.find_vm(&vm.uuid.to_string())
    }

    // ---------- destroy ----------

    pub async fn destroy_vm(&self, r: &str, timeout: Duration) -> Result<()> {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let mut vm = self.store.find_vm(&vm.uuid.to_string())?;
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            vm = self.stop_locked(vm, timeout, false, Cause::Api).await?;
        }
        let mut events = self.tear_down(&mut vm).await;
        self.delete_owned_volumes(&vm).await;
        let dir = self.vm_dir(vm.uuid);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        }
        self.unpin(vm.uuid);
        vm.state = VmState::Destroyed;
        events.push(NewEvent::new(EventType::Destroyed, Cause::Api, ""));
        self.store.remove(&vm, &events)?;
        tracing::info!(vm = %vm.spec.name, "destroyed");
        self.locks.lock().unwrap().remove(&vm.uuid);
        Ok(())
    }

    // ---------- reconciliation ----------

    /// At start: adopts every live QEMU, records the guests that ended while
    /// agentd was away, removes leftover taps of guests that are gone, and
    /// logs out of kernel iSCSI sessions that no guest's record holds.
    /// Returns human lines saying what it did.
    pub async fn reconcile(self: &Arc<Self>) -> Result<Vec<String>> {
        let mut report = Vec::new();
        for vm in self.store.vms()? {
            self.repin(&vm);
            // Every recorded kernel attachment holds its session, before any
            // dead guest's detach can count it down.
            for d in vm.runtime.iter().flat_map(|r| &r.disks) {
                if let (AttachMode::Kernel, Some(k)) = (d.mode, &d.kernel) {
                    self.kernel
                        .adopt(Holder::disk(vm.uuid, &d.device), &k.lun)
                        .await;
                }
            }
        }
        for vm in self.store.vms()? {
            if !vm.state.is_active() {
                continue;
            }
            let id = vm.uuid;
            let rt = vm.runtime.clone().unwrap_or_default();
            let alive = rt.pid != 0 && vmm::is_our_qemu(rt.pid, id);
            if alive && vm.state != VmState::Starting {
                match Qmp::connect(&rt.qmp_socket, Duration::from_secs(10)).await {
                    Ok((qmp, events)) => {
                        let status = qmp.query_status().await?;
                        let mut vm = vm;
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
                        report.push(format!("adopted {} (pid {})", vm.spec.name, rt.pid));
                        tokio::spawn(self.clone().monitor(id, rt.pid, events));
                    }
                    Err(e) => {
                        report.push(format!(
                            "{}: QEMU pid {} lives but its QMP socket does not answer ({e}); left alone",
                            vm.spec.name, rt.pid
                        ));
                    }
                }
            } else if vm.state == VmState::Starting {
                // agentd died mid-start: undo and report.
                let mut vm = vm;
                let mut events = self.tear_down(&mut vm).await;
                vm.state = VmState::Error;
                vm.state_reason = "start interrupted by an agent restart".into();
                events.push(NewEvent::new(
                    EventType::Error,
                    Cause::Reconciliation,
                    vm.state_reason.clone(),
                ));
                self.commit(&mut vm, &events)?;
                report.push(format!("{}: interrupted start undone", vm.spec.name));
            } else {
                let name = vm.spec.name.to_string();
                self.record_exit(id, None, false, true).await?;
                report.push(format!("{name}: QEMU ended while agentd was away"));
            }
        }
        // Taps named like ours whose guest is gone.
        let mut wanted = std::collections::HashSet::new();
        for vm in self.store.vms()? {
            if let Some(rt) = &vm.runtime {
                for n in &rt.nics {
                    wanted.insert(n.tap.clone());
                }
            }
        }
        for tap in net::list_taps_with_prefix(net::TAP_PREFIX) {
            if !wanted.contains(&tap) {
                if let Ok(t) = tap.parse::<net::TapName>().map_err(|_| ()).and_then(|t| {
                    // Only names shaped like ours: an operator's "st..." tap stays.
                    if t.is_guest_nic() {
                        Ok(t)
                    } else {
                        Err(())
                    }
                }) {
                    let _ = net::delete_tap(&t);
                    report.push(format!("removed leftover tap {tap}"));
                }
            }
        }
        // Sessions on our iface that no record holds (a crash, a failed logout).
        report.extend(self.kernel.reap_orphans().await);
        for line in &report {
            tracing::info!(action = %line, "reconcile");
        }
        Ok(report)
    }
}

fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))?;
    f.write_all(secret.as_bytes())
        .map_err(|e| Error::io(path.display(), e))
}

/// A status pdisk answered to the step `what`, as our error (the map is
/// stratus-core's [`Error::from_status`]).
pub(crate) fn status_error(s: tonic::Status, what: &str) -> Error {
    Error::from_status(s, "pdisk", what)
}
