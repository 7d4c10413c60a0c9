//! The guest service: every VM operation in domain terms. The gRPC layer
//! only converts.
//!
//! Ownership: agentd owns, per guest, its directory under `STATE_DIR/vms/`,
//! its taps (named from the VM UUID, see [`crate::net::tap_name_for`]), the pdisk
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
//! resume, reboot, stop) follows the journal *before* it sends the QMP
//! command, then waits for the event the monitor commits.
//!
//! Host effects go through three seams, so that all of the above is
//! unit-tested without root (`service_tests.rs`): [`VolumeClient`] (pdisk),
//! [`HostNet`] (taps and bridges) and [`Vmm`] (QEMU processes and QMP).
//!
//! Rooms: `lifecycle.rs` create/start/stop/pause/resume/reboot/destroy;
//! `attachments.rs` what a start attaches and how it is undone;
//! `monitor.rs` QMP events → journal events; `reconcile.rs` start-up
//! reconciliation and the retry of unfinished destroys; `host.rs` host
//! facts and capacity; `images.rs` image disks and the image API;
//! `image_save.rs` SaveImage.

mod attachments;
mod host;
mod hotplug;
mod image_save;
mod images;
mod lifecycle;
mod migrate;
mod migrate_stream;
mod monitor;
mod nic_filter_check;
mod qos;
mod reconcile;
#[cfg(test)]
mod service_tests;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::attach::{
    AttachMode, KernelAttacher, KernelOptions, KrbdAttacher, KrbdOptions, NvmeAttacher,
    NvmeOptions, RbdKernel, SysfsKernel,
};
use crate::confine::{Confinement, QemuUsers, UidPool};
use crate::journal::EventJournal;
use crate::net::{HostNet, KernelNet};
use crate::spec::ServerName;
use crate::store::{AgentStore, Event, NewEvent, VmRecord};
use crate::vmm::{HostVmm, QmpCommands, Vmm};
use crate::volumes::{PdiskServer, PdiskServers, PdiskVolumes, VolumeClient};
use stratus_core::error::{Error, Result};
use stratus_core::runner::CommandRunner;

pub use host::HostFacts;
pub use hotplug::DETACH_WAIT;
pub use images::ImageInfo;
pub use migrate::IncomingGuest;

/// Settings the service needs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub state_dir: PathBuf,
    pub default_bridge: String,
    /// Bridges besides the default one that guests' NICs may join.
    pub allowed_bridges: Vec<String>,
    pub initiator_iqn: String,
    /// How pdisk disks reach QEMU: its own iSCSI initiator or the kernel's.
    pub attach: AttachMode,
    /// Mutual CHAP on pdisk disks: the target proves itself too (kernel
    /// initiator only; refused with QEMU's, see [`AttachMode::check_mutual_chap`]).
    pub chap_mutual: bool,
    /// This host's id, sent with pdisk exports: a pdiskd on this host
    /// answers with the volume's own file or device (issue 16). None:
    /// always iSCSI (agentd --local-attach=false).
    pub local_host_id: Option<String>,
    /// This host as a Ceph client: pdisk disks on RBD (`crate::rbd`).
    pub ceph: crate::rbd::CephClient,
    /// The pdisk servers, each with its address and TLS files; empty when
    /// this host runs no pdisk disks.
    pub pdisk: Vec<crate::config::PdiskServerSettings>,
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
    /// Directories `file:` disks, kernels and initrds may be opened from
    /// (admin callers only); none: host files refused.
    pub host_file_roots: Vec<PathBuf>,
    /// Image URLs may reach loopback, link-local and this host's addresses.
    pub image_allow_private: bool,
    /// Whom guests' QEMUs run as.
    pub qemu_users: QemuUsers,
    /// Start guests unconfined (as root, no sandbox): on a QEMU without
    /// seccomp, or to measure what confinement costs.
    pub allow_unsandboxed: bool,
    /// The cgroup v2 directory confined guests' cgroups go under; None:
    /// no per-guest cgroups.
    pub cgroup_parent: Option<PathBuf>,
    /// Bytes a guest's console log may take (two files, each half).
    pub console_log_max: u64,
    /// Empty PCIe root ports each guest starts with (hot-plug room).
    pub hotplug_ports: u32,
    /// How QEMU does guests' disk I/O (`aio`, iothreads, queues).
    pub disk_io: crate::disk_io::DiskIo,
    /// The certificate, key and CA agentd calls other agentds with (a live
    /// migration's destination); None: it cannot migrate guests out over
    /// mTLS.
    pub peer_tls: Option<stratus_pki::TlsFiles>,
    /// What live migrations' streams are encrypted with (QEMU's
    /// `tls-creds-x509`); None: plain TCP.
    pub migration_tls: Option<stratus_pki::TlsFiles>,
    /// Bytes per second an outgoing migration may send (QEMU's
    /// `max-bandwidth`); None: QEMU's default.
    pub migration_max_bandwidth: Option<u64>,
}

/// The host effects of the guest service, each behind its seam.
#[derive(Clone)]
pub struct HostEffects {
    /// The pdisk servers by name; none when this host runs no pdisk disks.
    pub volumes: BTreeMap<ServerName, Arc<dyn VolumeClient>>,
    pub net: Arc<dyn HostNet>,
    pub vmm: Arc<dyn Vmm>,
    /// The kernel iSCSI initiator's settings (its commands go through the
    /// agent's command runner; its roots are /sys, /dev and /etc/iscsi).
    pub kernel: KernelOptions,
    /// The NVMe/TCP host's settings (nvme-cli through the same runner).
    pub nvme: NvmeOptions,
    /// The kernel's rbd bus (krbd): sysfs writes with a key in agentd's
    /// keyring; its roots are the kernel initiator's.
    pub rbd_bus: Arc<dyn RbdKernel>,
}

impl HostEffects {
    /// The real ones: the pdiskds of `settings.pdisk`, the kernel's
    /// network, QEMU through `runner`.
    pub fn real(settings: &AgentSettings, runner: Arc<dyn CommandRunner>) -> Result<HostEffects> {
        let mut volumes = BTreeMap::new();
        for p in &settings.pdisk {
            let client = PdiskVolumes::connect_lazy(&p.url, p.tls.as_ref())
                .map_err(|e| Error::invalid(format!("pdisk server {}: {}", p.name, e.message())))?;
            volumes.insert(p.name.clone(), Arc::new(client) as Arc<dyn VolumeClient>);
        }
        let cgroups = settings.cgroup_parent.as_ref().and_then(|parent| {
            match crate::cgroup::GuestCgroups::open(parent) {
                Ok(cg) => Some(cg),
                Err(e) => {
                    tracing::warn!(error = %e, "guests get no cgroups");
                    None
                }
            }
        });
        Ok(HostEffects {
            volumes,
            net: Arc::new(KernelNet),
            vmm: Arc::new(HostVmm::new(runner, cgroups)),
            kernel: KernelOptions::new(&settings.initiator_iqn),
            nvme: NvmeOptions::new(&settings.initiator_iqn),
            rbd_bus: Arc::new(SysfsKernel),
        })
    }
}

pub struct Agent {
    store: Arc<AgentStore>,
    journal: EventJournal,
    runner: Arc<dyn CommandRunner>,
    settings: AgentSettings,
    host: HostFacts,
    /// The pdisk servers, by name.
    pdisk: PdiskServers,
    net: Arc<dyn HostNet>,
    /// Guests' taps' anti-spoofing rules (nftables, through the runner).
    filters: crate::net::NicFilters,
    vmm: Arc<dyn Vmm>,
    /// The kernel's iSCSI initiator: used for new disks with `--attach
    /// kernel`, and always for undoing disks recorded as kernel-attached.
    kernel: KernelAttacher,
    /// The kernel's NVMe/TCP host: new disks on nvmet exports with
    /// `--attach kernel`, and undoing disks recorded as NVMe-attached.
    nvme: NvmeAttacher,
    /// The kernel's RBD client: RBD disks with `--attach kernel` when the
    /// host has krbd, and undoing disks recorded as krbd-mapped.
    krbd: KrbdAttacher,
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// QMP connections of guests whose monitor runs.
    qmp: Mutex<HashMap<Uuid, Arc<dyn QmpCommands>>>,
    /// The monitor task of each guest, so a test can stop them all as a
    /// crash of agentd would.
    #[cfg(test)]
    monitors: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Serializes creates so capacity and name checks hold.
    create_lock: tokio::sync::Mutex<()>,
    /// The verified local image cache.
    images: crate::images::LocalCache,
    policy: Option<crate::images::Policy>,
    /// Where `file:` disks, kernels and initrds may be opened from.
    host_files: stratus_core::rooted::Roots,
    /// One pdisk import per image checksum at a time.
    base_flights: images::BaseFlights,
    /// The image saves this agentd is finishing (`image_save.rs`), so a
    /// retry of left-over work does not run one twice.
    saves_running: Mutex<std::collections::HashSet<String>>,
    /// Cached images held by guests' local disks, per guest.
    pins: Mutex<HashMap<Uuid, Vec<crate::images::PinGuard>>>,
    /// The uids guests' QEMUs hold.
    uids: UidPool,
    /// Launch timings for `/metrics`.
    launches: crate::metrics::Launches,
    /// Per-guest usage accounting, in the store (`usage.rs`).
    usage: crate::usage::UsageBook,
    /// The named step at which this agent "crashes" (panics), for the
    /// tests of crash safety; see [`Agent::crash_point`].
    #[cfg(test)]
    crash_at: Mutex<Option<&'static str>>,
}

impl Agent {
    /// The agent with the real host effects ([`HostEffects::real`]).
    pub fn new(
        store: AgentStore,
        runner: Arc<dyn CommandRunner>,
        settings: AgentSettings,
        host: HostFacts,
    ) -> Result<Arc<Agent>> {
        let effects = HostEffects::real(&settings, runner.clone())?;
        Agent::with_effects(store, runner, settings, host, effects)
    }

    pub fn with_effects(
        store: AgentStore,
        runner: Arc<dyn CommandRunner>,
        settings: AgentSettings,
        host: HostFacts,
        effects: HostEffects,
    ) -> Result<Arc<Agent>> {
        if settings.chap_mutual {
            settings.attach.check_mutual_chap()?;
        }
        let policy = match &settings.image_policy {
            Some(p) => Some(crate::images::Policy::load(p)?),
            None => None,
        };
        let images = crate::images::LocalCache::open(
            images::cache_dir(&settings.state_dir),
            crate::images::CacheOptions {
                quota: settings.image_quota,
                policy: policy.clone(),
                file_roots: Some(settings.image_file_roots.clone()),
                egress: if settings.image_allow_private {
                    crate::images::Egress::allow_private()
                } else {
                    crate::images::Egress::public_only()
                },
                ..Default::default()
            },
        )?;
        let krbd = KrbdAttacher::new(
            runner.clone(),
            effects.rbd_bus,
            KrbdOptions::beside(&effects.kernel),
        );
        let kernel = KernelAttacher::new(runner.clone(), effects.kernel);
        let nvme = NvmeAttacher::new(runner.clone(), effects.nvme);
        let host_files =
            stratus_core::rooted::Roots::open("--host-file-root", &settings.host_file_roots)?;
        let store = Arc::new(store);
        let usage = crate::usage::UsageBook::open(store.clone())?;
        let uids = UidPool::new(settings.qemu_users.clone());
        let filters = crate::net::NicFilters::new(runner.clone());
        let pdisk = PdiskServers::new(effects.volumes, |name| {
            settings
                .pdisk
                .iter()
                .find(|p| &p.name == name)
                .map(|p| p.url.clone())
                .unwrap_or_default()
        });
        Ok(Arc::new(Agent {
            journal: EventJournal::new(store.clone()),
            store,
            runner,
            settings,
            host,
            pdisk,
            net: effects.net,
            filters,
            vmm: effects.vmm,
            kernel,
            nvme,
            krbd,
            locks: Mutex::default(),
            qmp: Mutex::default(),
            #[cfg(test)]
            monitors: Mutex::default(),
            create_lock: tokio::sync::Mutex::new(()),
            images,
            policy,
            host_files,
            base_flights: Default::default(),
            saves_running: Mutex::default(),
            pins: Mutex::default(),
            uids,
            launches: Default::default(),
            usage,
            #[cfg(test)]
            crash_at: Mutex::default(),
        }))
    }

    pub fn store(&self) -> &AgentStore {
        &self.store
    }

    /// The store, shared: the outbox publisher reads the journal through it.
    pub fn shared_store(&self) -> Arc<AgentStore> {
        self.store.clone()
    }

    /// Launch timings (`/metrics`).
    /// Per-guest usage accounting.
    pub fn usage_book(&self) -> &crate::usage::UsageBook {
        &self.usage
    }

    pub(crate) fn launches(&self) -> &crate::metrics::Launches {
        &self.launches
    }

    /// The local image cache (`/metrics`).
    pub(crate) fn image_cache(&self) -> &crate::images::LocalCache {
        &self.images
    }

    /// The event journal, to replay and follow.
    pub fn journal(&self) -> &EventJournal {
        &self.journal
    }

    pub fn settings(&self) -> &AgentSettings {
        &self.settings
    }

    pub fn host_facts(&self) -> &HostFacts {
        &self.host
    }

    /// How guests' QEMUs are confined here, one line for GetHost and logs.
    pub fn confinement(&self) -> String {
        match (self.settings.allow_unsandboxed, self.sandbox_refusal()) {
            (true, why) => format!(
                "UNCONFINED: QEMU runs as root without a sandbox (--allow-unsandboxed{})",
                why.map(|w| format!("; {w}")).unwrap_or_default()
            ),
            (false, Some(why)) => format!("guests refused: {why}"),
            (false, None) => format!(
                "{}, started as the guest's user with inherited descriptors, \
                 seccomp sandbox {}; {}",
                self.settings.qemu_users.describe(),
                crate::confine::SANDBOX,
                self.vmm
                    .cgroups()
                    .unwrap_or_else(|| "no per-guest cgroups".into())
            ),
        }
    }

    /// Why this host's QEMU cannot be sandboxed, if it cannot.
    fn sandbox_refusal(&self) -> Option<String> {
        (!self.host.qemu_caps.seccomp).then(|| {
            format!(
                "QEMU {} has no seccomp sandbox (-sandbox)",
                self.host.qemu_version
            )
        })
    }

    /// The confinement of `vm`'s next QEMU, its user taken from the pool and
    /// put in the runtime; the caller commits it with STARTING, before
    /// anything is made for it. None only with `--allow-unsandboxed`;
    /// FailedPrecondition on a QEMU without seccomp.
    fn confine(&self, vm: &mut VmRecord) -> Result<Option<Confinement>> {
        if self.settings.allow_unsandboxed {
            tracing::warn!(vm = %vm.spec.name, "starting the guest UNCONFINED (--allow-unsandboxed)");
            return Ok(None);
        }
        if let Some(why) = self.sandbox_refusal() {
            return Err(Error::precondition(format!(
                "refusing to start guest {}: {why} (agentd --allow-unsandboxed starts \
                 guests unconfined)",
                vm.spec.name
            )));
        }
        let user = self.uids.take(vm.uuid)?;
        vm.runtime.as_mut().expect("runtime").qemu_user = Some(user);
        Ok(Some(Confinement {
            user,
            sandbox: true,
        }))
    }

    pub fn kernel_initiator(&self) -> &KernelAttacher {
        &self.kernel
    }

    /// The kernel's NVMe/TCP host (`--attach kernel` on nvmet exports).
    pub fn nvme_host(&self) -> &NvmeAttacher {
        &self.nvme
    }

    pub fn get_vm(&self, r: &str) -> Result<VmRecord> {
        self.store.find_vm(r)
    }

    /// The guest `r` names, a name looked up in `project` (None: every
    /// project); see [`crate::store::Store::find_vm_in`].
    pub fn get_vm_in(&self, project: Option<&str>, r: &str) -> Result<VmRecord> {
        self.store.find_vm_in(project, r)
    }

    pub fn list_vms(&self) -> Result<Vec<VmRecord>> {
        self.store.vms()
    }

    pub fn console_log(&self, id: Uuid) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    async fn lock(&self, id: Uuid) -> tokio::sync::OwnedMutexGuard<()> {
        let m = self.locks.lock().unwrap().entry(id).or_default().clone();
        m.lock_owned().await
    }

    fn vm_dir(&self, id: Uuid) -> PathBuf {
        self.settings.state_dir.join("vms").join(id.to_string())
    }

    /// The pdisk server `name`; see [`PdiskServers::get`].
    fn pdisk(&self, name: &ServerName) -> Result<&PdiskServer> {
        self.pdisk.get(name)
    }

    /// The pdisk servers.
    pub(crate) fn pdisk_servers(&self) -> &PdiskServers {
        &self.pdisk
    }

    pub(crate) fn qmp_of(&self, id: Uuid) -> Option<Arc<dyn QmpCommands>> {
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

    /// A step boundary where the crash-safety tests make agentd die: when
    /// `name` is armed, the task panics right here, leaving the store and
    /// the host as a crash would. Every name is in
    /// [`crate::failpoints::POINTS`].
    #[cfg(test)]
    fn crash_point(&self, name: &'static str) {
        if *self.crash_at.lock().unwrap() == Some(name) {
            panic!("crash point {name}");
        }
    }

    /// Arms (or with None, disarms) the crash point `at` for the unit
    /// tests of other modules.
    #[cfg(test)]
    pub(crate) fn arm_crash_point(&self, at: Option<&'static str>) {
        *self.crash_at.lock().unwrap() = at;
    }

    /// The same step boundary for the fault-injection build (agentd exits
    /// there, [`crate::failpoints`]); nothing in a plain build.
    #[cfg(not(test))]
    #[inline(always)]
    fn crash_point(&self, name: &'static str) {
        crate::failpoints::crash_point(name);
    }
}
