//! QEMU processes: the accelerator choice, the command line, launching,
//! and finding a guest's process again.
//!
//! Every guest is one `qemu-system-x86_64` that agentd starts in a session
//! of its own, already as the guest's unprivileged user (see
//! [`crate::confine`]), under the full seccomp sandbox. QEMU opens nothing
//! of the host's by name but its kernel and initrd: agentd opens the disk
//! files, the seed, the taps, the QMP socket and the console log and hands
//! them over as inherited descriptors ([`PassedFds`], in `launch_fds.rs`:
//! `-add-fd` fd sets,
//! `tap,fd=`, `socket,fd=`); a CHAP secret is a sealed memfd QEMU reads as
//! `/proc/self/fd/N`, never a file or argv. Guests keep running when agentd
//! stops or crashes (their session is not agentd's; they are reparented to
//! init), and agentd re-adopts them through the recorded pid and their QMP
//! socket.
//! Disks are `-blockdev` nodes written as JSON (no comma-escaping of paths)
//! behind `virtio-blk-pci`: QEMU's own iSCSI initiator, files, block
//! devices the kernel's initiator attached (`host_device`, see `attach`;
//! opened by QEMU as the guest's user, who owns the device node), or RBD
//! images through QEMU's rbd driver (the cephx key a sealed memfd like a
//! CHAP secret; see `crate::rbd`).
//!
//! The guest service reaches all of this through [`Vmm`] (launch, find,
//! signal, QMP connect) and [`QmpCommands`] (what it asks a running QEMU);
//! [`HostVmm`] and [`Qmp`] are the real ones, and the unit tests use an
//! in-memory QEMU.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use uuid::Uuid;

use crate::cgroup::{GuestCgroups, Limits};
use crate::confine::Confinement;
use crate::disk_io::{Aio, DiskIo};
use crate::launch_fds::open_log;
pub use crate::launch_fds::{NumberedFds, OpenFds, PassedFds};
use crate::qmp::{Qmp, QmpEvents, RunState};

use stratus_core::error::{Error, Result};
use stratus_core::image::ImageFormat;
use stratus_core::runner::{Cmd, CommandRunner};
use stratus_core::types::Chap;

pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU processes as the guest service drives them.
pub trait Vmm: Send + Sync {
    /// Checks that a raw disk opens ([`check_raw`]).
    fn check_raw<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<()>>;

    /// Checks a local overlay names exactly its base ([`check_overlay`]).
    fn check_overlay<'a>(
        &'a self,
        overlay: &'a Path,
        base: &'a Path,
        base_format: ImageFormat,
    ) -> BoxFuture<'a, Result<()>>;

    /// Launches QEMU, waits until it serves QMP, and returns its pid ([`launch`]).
    fn launch<'a>(&'a self, plan: &'a LaunchPlan) -> BoxFuture<'a, Result<u32>>;

    /// Connects to a QEMU's QMP socket ([`Qmp::connect`]).
    fn connect_qmp<'a>(
        &'a self,
        socket: &'a Path,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(Arc<dyn QmpCommands>, QmpEvents)>>;

    /// True when `pid` is a live QEMU running guest `uuid` ([`is_our_qemu`]).
    fn is_our_qemu(&self, pid: u32, uuid: Uuid) -> bool;

    /// Live QEMUs running guest `uuid` ([`find_qemus`]).
    fn find_qemus(&self, uuid: Uuid) -> Vec<u32>;

    /// SIGKILL; nothing when it is already gone.
    fn kill(&self, pid: u32);

    /// Waits until `pid` no longer runs guest `uuid`, up to `limit`.
    fn wait_gone(&self, pid: u32, uuid: Uuid, limit: Duration) -> BoxFuture<'_, bool>;

    /// Puts an adopted guest's QEMU back in its cgroup, if guests get
    /// cgroups here; Some(what it did) when it had to.
    fn readopt_cgroup(&self, uuid: Uuid, pid: u32, limits: Limits) -> Result<Option<String>>;

    /// Removes guest `uuid`'s cgroup once its QEMU is gone; Ok(true) when
    /// there was one, Ok(false) when there was none.
    fn release_cgroup(&self, uuid: Uuid) -> BoxFuture<'_, Result<bool>>;

    /// How guests' cgroups are kept here, for GetHost; None: they get none.
    fn cgroups(&self) -> Option<String>;

    /// Removes the leftover per-guest cgroups of guests not in `known`
    /// ([`GuestCgroups::sweep`]); each line Ok when it removed one, Err
    /// when it could not.
    fn sweep_cgroups(
        &self,
        known: &std::collections::HashSet<Uuid>,
    ) -> Vec<std::result::Result<String, String>>;

    /// Keeps the console log of the running guest whose directory is
    /// `dir` again, capped at `max` (at adoption; [`crate::console::follow`]).
    fn follow_console<'a>(
        &'a self,
        dir: &'a Path,
        max: u64,
        vm: String,
    ) -> BoxFuture<'a, Result<()>>;
}

/// What the guest service asks a running QEMU over QMP; see [`Qmp`] for
/// what each command makes QEMU emit.
pub trait QmpCommands: Send + Sync {
    fn query_status(&self) -> BoxFuture<'_, Result<RunState>>;
    fn stop(&self) -> BoxFuture<'_, Result<()>>;
    fn cont(&self) -> BoxFuture<'_, Result<()>>;
    fn system_powerdown(&self) -> BoxFuture<'_, Result<()>>;
    fn system_reset(&self) -> BoxFuture<'_, Result<()>>;
    fn quit(&self) -> BoxFuture<'_, Result<()>>;
    /// I/O counters of the guest's disks, for `/metrics`; none by default
    /// (the unit tier's QEMU has no disks to count).
    fn query_blockstats(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::BlockStats>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// The guest's block backends and their images' sizes, for usage
    /// records; none by default (as above).
    fn query_block(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::BlockInfo>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Hot-plug (`crate::hotplug`): the devices QEMU has, each with its
    /// root port.
    fn peripherals(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::Peripheral>>>;
    /// Hot-plugs disk `d` of a guest of `vcpus` vCPUs on root port `port`.
    fn add_disk<'a>(
        &'a self,
        d: &'a PlannedDisk,
        io: &'a DiskIo,
        vcpus: u32,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
    /// Unplugs disk `device`; false: the guest kept it within `wait`.
    fn remove_disk<'a>(&'a self, device: &'a str, wait: Duration) -> BoxFuture<'a, Result<bool>>;
    /// Hot-plugs NIC `n` as netdev `netdev` on root port `port`.
    fn add_nic<'a>(
        &'a self,
        n: &'a PlannedNic,
        netdev: &'a str,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
    /// Unplugs NIC `netdev`; false: the guest kept it within `wait`.
    fn remove_nic<'a>(&'a self, netdev: &'a str, wait: Duration) -> BoxFuture<'a, Result<bool>>;
    /// Tells QEMU disk `device` grew to `size` bytes (`block_resize`).
    fn block_resize<'a>(&'a self, device: &'a str, size: u64) -> BoxFuture<'a, Result<()>>;
    /// Gives throttle group `id` the limits `limits` (`qom-set`).
    fn set_throttle_limits<'a>(
        &'a self,
        id: &'a str,
        limits: &'a crate::qos::Limits,
    ) -> BoxFuture<'a, Result<()>>;
    /// The limits throttle group `id` has (`qom-get`).
    fn throttle_limits<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<crate::qos::Limits>>;
    /// Any other command ([`Qmp::execute`]), for live migration's
    /// `migrate*` and `query-migrate`; Unavailable by default (the unit
    /// tier's QEMU does not migrate).
    fn execute<'a>(
        &'a self,
        command: &'a str,
        _arguments: Option<serde_json::Value>,
    ) -> BoxFuture<'a, Result<serde_json::Value>> {
        Box::pin(async move {
            Err(Error::unavailable(format!(
                "QMP {command}: not supported here"
            )))
        })
    }
    /// Gives QEMU the migration's TLS credentials as `endpoint`
    /// ([`crate::migration_tls::install`]); Unavailable by default.
    fn install_migration_tls<'a>(
        &'a self,
        _guest_dir: &'a Path,
        _tls: &'a stratus_pki::TlsFiles,
        _endpoint: crate::migration_tls::Endpoint,
        _owner: Option<crate::confine::QemuUser>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Err(Error::unavailable("migration TLS: not supported here")) })
    }
}

impl QmpCommands for Qmp {
    fn query_status(&self) -> BoxFuture<'_, Result<RunState>> {
        Box::pin(Qmp::query_status(self))
    }

    fn stop(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Qmp::stop(self))
    }

    fn cont(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Qmp::cont(self))
    }

    fn system_powerdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Qmp::system_powerdown(self))
    }

    fn system_reset(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Qmp::system_reset(self))
    }

    fn quit(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(Qmp::quit(self))
    }

    fn query_blockstats(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::BlockStats>>> {
        Box::pin(Qmp::query_blockstats(self))
    }

    fn query_block(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::BlockInfo>>> {
        Box::pin(Qmp::query_block(self))
    }

    fn peripherals(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::Peripheral>>> {
        Box::pin(Qmp::peripherals(self))
    }

    fn add_disk<'a>(
        &'a self,
        d: &'a PlannedDisk,
        io: &'a DiskIo,
        vcpus: u32,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::hotplug::add_disk(self, d, io, vcpus, port))
    }

    fn remove_disk<'a>(&'a self, device: &'a str, wait: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(crate::hotplug::remove_disk(self, device, wait))
    }

    fn add_nic<'a>(
        &'a self,
        n: &'a PlannedNic,
        netdev: &'a str,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::hotplug::add_nic(self, n, netdev, port))
    }

    fn remove_nic<'a>(&'a self, netdev: &'a str, wait: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(crate::hotplug::remove_nic(self, netdev, wait))
    }

    fn execute<'a>(
        &'a self,
        command: &'a str,
        arguments: Option<serde_json::Value>,
    ) -> BoxFuture<'a, Result<serde_json::Value>> {
        Box::pin(Qmp::execute(self, command, arguments))
    }

    fn install_migration_tls<'a>(
        &'a self,
        guest_dir: &'a Path,
        tls: &'a stratus_pki::TlsFiles,
        endpoint: crate::migration_tls::Endpoint,
        owner: Option<crate::confine::QemuUser>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(crate::migration_tls::install(
            self, guest_dir, tls, endpoint, owner,
        ))
    }

    fn block_resize<'a>(&'a self, device: &'a str, size: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(Qmp::block_resize(self, device, size))
    }

    fn set_throttle_limits<'a>(
        &'a self,
        id: &'a str,
        limits: &'a crate::qos::Limits,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(Qmp::set_throttle_limits(self, id, limits))
    }

    fn throttle_limits<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<crate::qos::Limits>> {
        Box::pin(Qmp::throttle_limits(self, id))
    }
}

/// The host's QEMU: processes found through /proc, commands through the
/// one command runner.
pub struct HostVmm {
    runner: Arc<dyn CommandRunner>,
    /// Confined guests' cgroups; None: guests get none.
    cgroups: Option<GuestCgroups>,
}

impl HostVmm {
    pub fn new(runner: Arc<dyn CommandRunner>, cgroups: Option<GuestCgroups>) -> HostVmm {
        HostVmm { runner, cgroups }
    }
}

impl Vmm for HostVmm {
    fn check_raw<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<()>> {
        Box::pin(check_raw(self.runner.as_ref(), path))
    }

    fn check_overlay<'a>(
        &'a self,
        overlay: &'a Path,
        base: &'a Path,
        base_format: ImageFormat,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(check_overlay(
            self.runner.as_ref(),
            overlay,
            base,
            base_format,
        ))
    }

    fn launch<'a>(&'a self, plan: &'a LaunchPlan) -> BoxFuture<'a, Result<u32>> {
        Box::pin(launch(plan, self.cgroups.as_ref()))
    }

    fn connect_qmp<'a>(
        &'a self,
        socket: &'a Path,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<(Arc<dyn QmpCommands>, QmpEvents)>> {
        Box::pin(async move {
            let (qmp, events) = Qmp::connect(socket, timeout).await?;
            Ok((Arc::new(qmp) as Arc<dyn QmpCommands>, events))
        })
    }

    fn is_our_qemu(&self, pid: u32, uuid: Uuid) -> bool {
        is_our_qemu(pid, uuid)
    }

    fn find_qemus(&self, uuid: Uuid) -> Vec<u32> {
        find_qemus(uuid)
    }

    fn kill(&self, pid: u32) {
        signal(pid, libc::SIGKILL)
    }

    fn wait_gone(&self, pid: u32, uuid: Uuid, limit: Duration) -> BoxFuture<'_, bool> {
        Box::pin(wait_gone(pid, uuid, limit))
    }

    fn readopt_cgroup(&self, uuid: Uuid, pid: u32, limits: Limits) -> Result<Option<String>> {
        let Some(cg) = &self.cgroups else {
            return Ok(None);
        };
        Ok(cg
            .adopt(uuid, pid, limits)?
            .then(|| format!("QEMU pid {pid} put back in {}", cg.path(uuid).display())))
    }

    fn release_cgroup(&self, uuid: Uuid) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            match &self.cgroups {
                Some(cg) => cg.remove(uuid, Duration::from_secs(5)).await,
                None => Ok(false),
            }
        })
    }

    fn cgroups(&self) -> Option<String> {
        self.cgroups.as_ref().map(GuestCgroups::describe)
    }

    fn sweep_cgroups(
        &self,
        known: &std::collections::HashSet<Uuid>,
    ) -> Vec<std::result::Result<String, String>> {
        match &self.cgroups {
            Some(cg) => cg.sweep(|u| known.contains(&u), crate::cgroup::SWEEP_MIN_AGE),
            None => Vec::new(),
        }
    }

    fn follow_console<'a>(
        &'a self,
        dir: &'a Path,
        max: u64,
        vm: String,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            crate::console::follow(dir, max, vm)
                .await
                .map_err(|e| Error::io(crate::console::socket_in(dir).display(), e))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Picks the accelerator: KVM only when the CPU advertises vmx/svm and
/// /dev/kvm opens (a /dev/kvm without the CPU flags hangs guests). Returns
/// the choice and the reason, for the logs and GetHost.
pub fn choose_accel(choice: AccelChoice) -> (Accel, String) {
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
        })
        .unwrap_or(false);
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    match choice {
        AccelChoice::Tcg => (Accel::Tcg, "tcg requested".into()),
        AccelChoice::Kvm => (Accel::Kvm, "kvm requested".into()),
        AccelChoice::Auto if cpu_flags && dev => {
            (Accel::Kvm, "CPU has vmx/svm and /dev/kvm opens".into())
        }
        AccelChoice::Auto => (
            Accel::Tcg,
            format!(
                "no KVM: CPU virtualization flags {}, /dev/kvm {}",
                if cpu_flags { "present" } else { "absent" },
                if dev { "opens" } else { "does not open" }
            ),
        ),
    }
}

/// `qemu-system-x86_64 --version`'s first line, e.g. "7.2.22".
pub async fn qemu_version(runner: &dyn CommandRunner) -> String {
    match runner.run(&Cmd::new(QEMU).arg("--version")).await {
        Ok(o) if o.success() => o
            .stdout
            .split_whitespace()
            .nth(3)
            .unwrap_or("unknown")
            .to_string(),
        _ => "unavailable".into(),
    }
}

/// What this QEMU offers for confinement, from `qemu-system-x86_64 -help`
/// (nothing when it does not answer: guests are then refused).
pub async fn qemu_caps(runner: &dyn CommandRunner) -> crate::confine::QemuCaps {
    let help = match runner.run(&Cmd::new(QEMU).arg("-help")).await {
        Ok(o) if o.success() => o.stdout,
        _ => String::new(),
    };
    crate::confine::QemuCaps::from_help(&help)
}

/// How QEMU reaches one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackend {
    Iscsi {
        portal: String,
        target: String,
        lun: u32,
        initiator: String,
        /// Reaches QEMU as a sealed memfd, never a file or argv.
        chap: Option<Chap>,
    },
    /// A raw file on this host: a `file:` disk or the seed. Always opened
    /// as raw, never probed: a guest that writes an image header into its
    /// disk must not change what QEMU opens at the next start.
    RawFile { path: PathBuf },
    /// A local qcow2 overlay on a cached image. The backing node is given
    /// explicitly (`base`, read-only, as `base_format`, with no backing of
    /// its own), so nothing QEMU opens is named by an image header.
    Overlay {
        path: PathBuf,
        base: PathBuf,
        base_format: ImageFormat,
    },
    /// A host block device: an iSCSI LUN the kernel's initiator attached
    /// (`/dev/sdX`), raw.
    HostDevice { path: PathBuf },
    /// An RBD image opened by QEMU's own rbd driver; its cephx key and
    /// client conf reach QEMU as sealed memfds (see [`crate::rbd`]).
    Rbd(crate::rbd::RbdDisk),
    /// A pdisk volume on this very host (pdiskd answered a local
    /// attachment, issue 16): its file or block device, raw, opened by
    /// agentd and handed to QEMU as a descriptor (QEMU never opens the
    /// path, which stays pdiskd's, owner and mode unchanged).
    Local { path: PathBuf, block_device: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    /// vda, vdb, ...: also the blockdev node name.
    pub device: String,
    pub backend: DiskBackend,
    pub read_only: bool,
    pub boot_index: u32,
    /// Its throttle group (a `throttle` node above the format node); None
    /// for the seed, which has none.
    pub qos: Option<crate::qos::PlannedQos>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNic {
    pub tap: String,
    pub mac: crate::net::Mac,
}

/// Everything needed to start one guest.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub uuid: Uuid,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub disks: Vec<PlannedDisk>,
    pub nics: Vec<PlannedNic>,
    pub kernel: Option<crate::spec::KernelBoot>,
    /// The guest's directory: QMP socket, console log, QEMU's own log.
    pub dir: PathBuf,
    /// How QEMU does the disks' I/O (`aio`, iothreads, queues).
    pub disk_io: DiskIo,
    /// Who QEMU runs as and under which sandbox; None: as root, unconfined
    /// (`--allow-unsandboxed`).
    pub confinement: Option<Confinement>,
    /// The console log's cap (`--console-log-max`).
    pub console_log_max: u64,
    /// Empty PCIe root ports for hot-plugged disks and NICs
    /// (`--hotplug-ports`).
    pub hotplug_ports: u32,
    /// A live migration's destination: QEMU starts with `-incoming defer`
    /// and waits for `migrate-incoming` (`crate::service::migrate`).
    pub incoming: bool,
    /// A live migration's destination: where the source's QEMU has each
    /// device and root port (hot-plugged ones behind their ports), which
    /// replaces the spec's order and `hotplug_ports`.
    pub layout: Option<crate::layout::DeviceLayout>,
}

impl LaunchPlan {
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The limits of the guest's cgroup.
    pub fn limits(&self) -> Limits {
        Limits::for_guest(self.memory_mib << 20, self.vcpus, self.accel == Accel::Tcg)
    }

    /// QEMU's pid, written by agentd once QEMU serves QMP.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// QEMU's own stdout and stderr (its start-up errors).
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn console_log(&self) -> PathBuf {
        crate::console::log_in(&self.dir)
    }

    /// The full QEMU command line (without the program), naming the
    /// descriptors `fds` hands over.
    pub fn argv(&self, fds: &mut dyn PassedFds) -> Result<Vec<String>> {
        let mut a = Argv::default();
        a.push(&["-name", &format!("guest={},debug-threads=on", self.name)]);
        a.push(&["-uuid", &self.uuid.to_string()]);
        a.push(&["-machine", &format!("q35,accel={}", self.accel.name())]);
        if self.accel == Accel::Kvm {
            a.push(&["-cpu", "host"]);
        }
        a.push(&["-smp", &self.vcpus.to_string()]);
        a.push(&["-m", &format!("{}M", self.memory_mib)]);
        a.push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        if self.incoming {
            a.push(&["-incoming", "defer"]);
        }
        // agentd is its client and keeps the log (crate::console); wait=on
        // takes agentd's queued connection before the guest runs.
        let console = fds.console(&crate::console::socket_in(&self.dir))?;
        a.push(&[
            "-chardev",
            &format!("socket,id=serial0,fd={console},server=on,wait=on"),
            "-serial",
            "chardev:serial0",
        ]);
        let qmp = fds.listener(&self.qmp_socket())?;
        a.push(&[
            "-chardev",
            &format!("socket,id=qmp,fd={qmp},server=on,wait=off"),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
        // A panic device turns guest panics into GUEST_PANICKED events.
        a.push(&["-device", "pvpanic"]);
        // Devices behind root ports (a migration's layout) come after them.
        let mut behind_ports = Vec::new();
        let mut device = |a: &mut Argv, dev: String, at: Option<&crate::layout::Placement>| match at
        {
            Some(p) if p.port.is_some() => behind_ports.push(crate::layout::placed(&dev, p)),
            Some(p) => a.push(&["-device", &crate::layout::placed(&dev, p)]),
            None => a.push(&["-device", &dev]),
        };
        let layout = self.layout.as_ref();
        let mut groups = Vec::new();
        for (k, d) in self.disks.iter().enumerate() {
            // A group shared by several disks is made once, before them.
            if let Some(q) = d.qos.as_ref().filter(|q| !groups.contains(&q.group_id)) {
                a.push(&["-object", &q.group_object().to_string()]);
                groups.push(q.group_id.clone());
            }
            let blockdev = blockdev(d, &self.disk_io, &mut ArgvDisk { fds, a: &mut a })?;
            a.push(&["-blockdev", &blockdev.to_string()]);
            if let Some(id) = self.disk_io.iothread(&d.device) {
                a.push(&["-object", &format!("iothread,id={id}")]);
            }
            // Spec disks in order, then the seed.
            let at = layout.and_then(|l| l.disks.get(k).or(l.seed.as_ref()));
            device(&mut a, disk_device(d, &self.disk_io, self.vcpus, None), at);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let fd = fds.tap(&n.tap)?;
            a.push(&["-netdev", &format!("tap,id=net{i},fd={fd}")]);
            let at = layout.and_then(|l| l.nics.get(i));
            device(&mut a, nic_device(&format!("net{i}"), &n.mac, None), at);
        }
        // Empty PCIe root ports for hot-plug, after every cold-plugged
        // device so those keep the addresses they had without them.
        match layout {
            Some(l) => {
                for (i, p) in l.ports.iter().enumerate() {
                    a.push(&["-device", &crate::layout::placed(&root_port(i as u32), p)]);
                }
            }
            None => {
                for i in 0..self.hotplug_ports {
                    a.push(&["-device", &root_port(i)]);
                }
            }
        }
        for dev in behind_ports {
            a.push(&["-device", &dev]);
        }
        if let Some(k) = &self.kernel {
            // QEMU's loader takes a path, not an fd set: its own descriptor
            // through /proc (which checks the file's permissions against
            // QEMU's uid: kernels must be readable by guests' uids).
            let kernel = fds.file(&k.kernel, false)?;
            a.push(&["-kernel", &format!("/proc/self/fd/{kernel}")]);
            if let Some(i) = &k.initrd {
                let initrd = fds.file(i, false)?;
                a.push(&["-initrd", &format!("/proc/self/fd/{initrd}")]);
            }
            if !k.cmdline.is_empty() {
                a.push(&["-append", &k.cmdline]);
            }
        }
        if matches!(&self.confinement, Some(c) if c.sandbox) {
            a.push(&["-sandbox", crate::confine::SANDBOX]);
        }
        Ok(a.0)
    }
}

/// The `-blockdev` (or `blockdev-add`) node of disk `d`, every node with an
/// explicit driver; its files and secrets come from `sink` (inherited
/// descriptors at launch, QMP `add-fd` when hot-plugged). With a throttle
/// group the top node (named like the disk) is a `throttle` node in it,
/// above the format node `<device>-fmt` ([`crate::qos`]).
pub fn blockdev(
    d: &PlannedDisk,
    io: &DiskIo,
    sink: &mut dyn DiskSink,
) -> Result<serde_json::Value> {
    let Some(q) = &d.qos else {
        return format_blockdev(d, io, sink);
    };
    let mut inner = format_blockdev(d, io, sink)?;
    inner["node-name"] = json!(crate::qos::format_node(&d.device));
    let mut top = q.throttle_node(&d.device, inner);
    // The device asks the top node for write access unless it is itself
    // read-only: QEMU refuses a read-only disk otherwise ("Block node is
    // read-only").
    top["read-only"] = json!(d.read_only);
    Ok(top)
}

/// The format node of disk `d` (named `d.device`) and its children.
fn format_blockdev(
    d: &PlannedDisk,
    io: &DiskIo,
    sink: &mut dyn DiskSink,
) -> Result<serde_json::Value> {
    let node = &d.device;
    let writable = !d.read_only;
    Ok(match &d.backend {
        DiskBackend::Iscsi {
            portal,
            target,
            lun,
            initiator,
            chap,
        } => {
            let mut v = json!({
                "driver": "iscsi",
                "node-name": node,
                "transport": "tcp",
                "portal": portal,
                "target": target,
                "lun": lun,
                "initiator-name": initiator,
                "cache": {"direct": true},
                "read-only": d.read_only,
            });
            if let Some(chap) = chap {
                let id = format!("chap-{node}");
                sink.secret(&id, chap.secret().as_bytes(), "raw")?;
                v["user"] = json!(chap.user);
                v["password-secret"] = json!(id);
            }
            v
        }
        DiskBackend::RawFile { path } => {
            json!({
                "driver": "raw",
                "node-name": node,
                "read-only": d.read_only,
                "file": file_node(io.file_aio, path, &sink.file(path, writable, node)?),
            })
        }
        DiskBackend::Overlay {
            path,
            base,
            base_format,
        } => {
            let base_node = format!("{node}-base");
            let mut backing = json!({
                "driver": base_format.as_str(),
                "node-name": base_node,
                "read-only": true,
                "file": file_node(io.file_aio, base, &sink.file(base, false, &base_node)?),
            });
            if *base_format == ImageFormat::Qcow2 {
                // The cached base was refused if it had a backing
                // file; null says so to QEMU too.
                backing["backing"] = serde_json::Value::Null;
            }
            json!({
                "driver": "qcow2",
                "node-name": node,
                "read-only": d.read_only,
                "file": file_node(io.file_aio, path, &sink.file(path, writable, node)?),
                "backing": backing,
            })
        }
        DiskBackend::Rbd(r) => {
            // The key: a secret object reading a sealed memfd, in
            // base64 (the driver hands librados the raw key's
            // base64 itself). The conf: a memfd too, so librados
            // reads no ceph.conf of the host's.
            let id = format!("ceph-{node}");
            sink.secret(&id, r.key.base64().as_bytes(), "base64")?;
            let conf = sink.memfd_path(&r.conf)?;
            let servers: Vec<serde_json::Value> = r
                .monitors
                .iter()
                .map(|m| json!({"host": m.host, "port": m.port.to_string()}))
                .collect();
            json!({
                "driver": "raw",
                "node-name": node,
                "read-only": d.read_only,
                "file": {
                    "driver": "rbd",
                    "pool": r.pool,
                    "image": r.image,
                    "user": r.user,
                    "key-secret": id,
                    "conf": conf,
                    "server": servers,
                    // librbd's writeback cache; guest flushes
                    // reach the OSDs (see crate::rbd).
                    "cache": {"direct": false, "no-flush": false},
                },
            })
        }
        DiskBackend::Local { path, block_device } => {
            let filename = sink.file(path, writable, node)?;
            let file = if *block_device {
                json!({
                    "driver": "host_device",
                    "filename": filename,
                    "aio": io.device_aio.name(),
                    "cache": {"direct": true},
                })
            } else {
                file_node(io.file_aio, path, &filename)
            };
            json!({
                "driver": "raw",
                "node-name": node,
                "read-only": d.read_only,
                "file": file,
            })
        }
        DiskBackend::HostDevice { path } => {
            // Like file disks: no host page cache, the engine for
            // devices (a block device always takes O_DIRECT).
            // Opened by QEMU itself: its uid owns the device node.
            json!({
                "driver": "raw",
                "node-name": node,
                "read-only": d.read_only,
                "file": {
                    "driver": "host_device",
                    "filename": path,
                    "aio": io.device_aio.name(),
                    "cache": {"direct": true},
                },
            })
        }
    })
}

/// The protocol node of a file on this host, opened by QEMU as `filename`
/// (its fd set).
fn file_node(aio: Aio, path: &Path, filename: &str) -> serde_json::Value {
    // Direct I/O (no host page cache in the guest's data path), with the
    // engine for files (`crate::disk_io`). A filesystem without O_DIRECT
    // (tmpfs) gets buffered I/O, and native AIO (which needs O_DIRECT)
    // becomes the thread pool there.
    let direct = supports_direct_io(path);
    json!({
        "driver": "file",
        "filename": filename,
        "aio": aio.with_direct(direct).name(),
        "cache": {"direct": direct},
    })
}

/// The id of hot-plug root port `i` (`-device pcie-root-port`).
pub fn root_port_id(i: u32) -> String {
    format!("{ROOT_PORT_PREFIX}{i}")
}

/// Hot-plug root ports are named `hp0`, `hp1`, ...: nothing else of ours
/// has an id starting so.
pub const ROOT_PORT_PREFIX: &str = "hp";

/// At most this many hot-plug root ports (`--hotplug-ports`): with 16
/// disks and a few NICs the root bus's 32 slots must still hold them.
pub const MAX_HOTPLUG_PORTS: u32 = 16;

/// Hot-plug root port `i`: its own chassis (QEMU refuses two ports with
/// one chassis and slot) and PCIe port number, as libvirt numbers them.
fn root_port(i: u32) -> String {
    format!(
        "pcie-root-port,id={},bus=pcie.0,chassis={},port={:#x}",
        root_port_id(i),
        i + 1,
        0x10 + i
    )
}

/// The guest device of disk `d` (its id `<node>-dev`) in a guest of `vcpus`
/// vCPUs, on root port `bus` when hot-plugged, else on the root bus at the
/// next free slot; its queues and iothread as `io` says.
pub fn disk_device(d: &PlannedDisk, io: &DiskIo, vcpus: u32, bus: Option<&str>) -> String {
    let node = &d.device;
    let mut dev = format!("virtio-blk-pci,drive={node},id={node}-dev");
    dev.push_str(&io.device_props(node, vcpus));
    if d.boot_index > 0 {
        dev.push_str(&format!(",bootindex={}", d.boot_index));
    }
    if let Some(bus) = bus {
        dev.push_str(&format!(",bus={bus}"));
    }
    dev
}

/// The guest device of NIC `netdev` (its id `<netdev>-dev`), as for disks.
pub fn nic_device(netdev: &str, mac: &crate::net::Mac, bus: Option<&str>) -> String {
    let mut dev = format!("virtio-net-pci,netdev={netdev},mac={mac},id={netdev}-dev");
    if let Some(bus) = bus {
        dev.push_str(&format!(",bus={bus}"));
    }
    dev
}

/// Where a disk's block node gets what agentd opens for it: at launch
/// inherited descriptors and `-object` arguments ([`ArgvDisk`]), when
/// hot-plugged descriptors sent over QMP (`crate::qmp` `add-fd`).
pub trait DiskSink {
    /// Host file `path` for node `node`: the name QEMU opens it by
    /// (`/dev/fdset/N`).
    fn file(&mut self, path: &Path, writable: bool, node: &str) -> Result<String>;
    /// A `secret` object `id` holding `bytes` (`format` raw or base64),
    /// made before the node that names it.
    fn secret(&mut self, id: &str, bytes: &[u8], format: &str) -> Result<()>;
    /// `bytes` as a file QEMU reads by path (`/proc/self/fd/N`).
    fn memfd_path(&mut self, bytes: &[u8]) -> Result<String>;
}

/// [`DiskSink`] of a command line: inherited descriptors.
struct ArgvDisk<'a> {
    fds: &'a mut dyn PassedFds,
    a: &'a mut Argv,
}

impl DiskSink for ArgvDisk<'_> {
    fn file(&mut self, path: &Path, writable: bool, node: &str) -> Result<String> {
        let fd = self.fds.file(path, writable)?;
        Ok(self.a.fdset(fd, node))
    }

    fn secret(&mut self, id: &str, bytes: &[u8], format: &str) -> Result<()> {
        let fd = self.fds.secret(bytes)?;
        self.a.push(&[
            "-object",
            &format!("secret,id={id},file=/proc/self/fd/{fd},format={format}"),
        ]);
        Ok(())
    }

    fn memfd_path(&mut self, bytes: &[u8]) -> Result<String> {
        Ok(format!("/proc/self/fd/{}", self.fds.secret(bytes)?))
    }
}

/// A QEMU command line being built.
#[derive(Default)]
struct Argv(Vec<String>);

impl Argv {
    fn push(&mut self, args: &[&str]) {
        self.0.extend(args.iter().map(|s| s.to_string()));
    }

    /// Puts descriptor `fd` in an fd set of its own (numbered like it) and
    /// returns the name QEMU opens it by.
    fn fdset(&mut self, fd: i32, what: &str) -> String {
        self.push(&["-add-fd", &format!("fd={fd},set={fd},opaque={what}")]);
        format!("/dev/fdset/{fd}")
    }
}

/// True when `path` can be opened with O_DIRECT (false on tmpfs, or when
/// the file cannot be opened at all: QEMU will then say why).
pub fn supports_direct_io(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// How long a QEMU may take from exec to serving QMP.
const READY: Duration = Duration::from_secs(60);

/// Launches QEMU as `plan` says and returns its pid once it serves QMP
/// (every device opened, the machine built). QEMU runs in a session of its
/// own, as the guest's user when confined, with the descriptors of
/// [`OpenFds`]; agentd keeps none of them. On failure QEMU is killed and
/// the error carries its own message (`qemu.log`).
pub async fn launch(plan: &LaunchPlan, cgroups: Option<&GuestCgroups>) -> Result<u32> {
    std::fs::create_dir_all(&plan.dir).map_err(|e| Error::io(plan.dir.display(), e))?;
    if let Some(c) = &plan.confinement {
        guard_disks(plan, c)?;
    }
    let mut fds = OpenFds::default();
    let argv = plan.argv(&mut fds)?;
    let log = plan.qemu_log();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(plan.pidfile());
    let output = open_log(&log)?;
    let cmd = Cmd::new(QEMU).args(argv);
    // A confined guest's QEMU enters its cgroup before it runs.
    let cgroup = match (cgroups, &plan.confinement) {
        (Some(cg), Some(_)) => Some(cg.prepare(plan.uuid, plan.limits())?),
        _ => None,
    };
    let how = stratus_core::detached::Detached {
        user: plan.confinement.as_ref().map(|c| (c.user.uid, c.user.gid)),
        inherit: fds.raw(),
        output: Some(output),
        cgroup: cgroup.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
    };
    // agentd's end of the serial console and the log it fills, ready
    // before QEMU runs.
    let console = fds
        .take_console()
        .map(|c| crate::console::keeper(c, &plan.dir, plan.console_log_max))
        .transpose()
        .map_err(|e| Error::io(plan.console_log().display(), e))?;
    let mut child = stratus_core::detached::spawn_detached(&cmd, how)?;
    // QEMU holds them now; ours would keep the QMP socket and taps alive
    // after QEMU's death.
    drop(fds);
    if let Some((c, ring)) = console {
        tokio::spawn(crate::console::pump(c, ring, plan.name.clone()));
    }
    drop(cgroup);
    let pid = child.id();
    let failed = |why: String| {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let said: Vec<&str> = said
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        Error::precondition(format!(
            "QEMU failed to start guest {}: {}",
            plan.name,
            if said.is_empty() {
                why
            } else {
                said.join("; ")
            }
        ))
    };
    let socket = plan.qmp_socket();
    let ready = tokio::select! {
        r = tokio::time::timeout(READY, qmp_greets(&socket)) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(failed(format!("its QMP socket: {e}"))),
            Err(_) => Err(failed(format!("no QMP greeting within {READY:?}"))),
        },
        status = child.wait() => Err(failed(match status {
            Ok(s) => format!("it exited ({s})"),
            Err(e) => format!("waiting for it: {e}"),
        })),
    };
    if let Err(e) = ready {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(e);
    }
    // For operators and tools (agentd itself goes by the pid it records).
    let pidfile = plan.pidfile();
    if let Err(e) = std::fs::write(&pidfile, format!("{pid}\n")) {
        tracing::warn!(file = %pidfile.display(), error = %e, "could not write QEMU's pid file");
    }
    // Reaped here when it ends, so it never lingers as a zombie; the guest
    // service learns of the end from QMP.
    let name = plan.name.clone();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(s) => tracing::info!(vm = %name, pid, status = %s, "QEMU exited"),
            Err(e) => tracing::warn!(vm = %name, pid, error = %e, "waiting for QEMU"),
        }
    });
    Ok(pid)
}

/// Makes a confined guest's disks unreachable to other guests' uids: its
/// host files (`file:` disks, overlays, the seed) lose every permission
/// but their owner's (QEMU reaches them through agentd's descriptors), and
/// a kernel-attached block device, which QEMU opens itself, becomes the
/// guest's uid's, 0600.
fn guard_disks(plan: &LaunchPlan, c: &Confinement) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in &plan.disks {
        match &d.backend {
            // A local pdisk volume reaches QEMU as a descriptor: its
            // owner and mode stay pdiskd's.
            DiskBackend::Iscsi { .. } | DiskBackend::Rbd(_) | DiskBackend::Local { .. } => {}
            DiskBackend::RawFile { path } | DiskBackend::Overlay { path, .. } => {
                let meta = std::fs::metadata(path).map_err(|e| Error::io(path.display(), e))?;
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))
                        .map_err(|e| Error::io(path.display(), e))?;
                }
            }
            DiskBackend::HostDevice { path } => {
                let dev = path
                    .canonicalize()
                    .map_err(|e| Error::io(path.display(), e))?;
                crate::confine::give_to(&dev, c.user, 0o600)?;
            }
        }
    }
    Ok(())
}

/// Connects to a QMP socket and reads QEMU's greeting: QEMU sends it from
/// its main loop, so it has finished starting. The connection is closed
/// again (QEMU serves one client at a time).
async fn qmp_greets(socket: &Path) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::UnixStream::connect(socket).await?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await?;
    if buf[..n].windows(5).any(|w| w == b"\"QMP\"") {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a greeting",
        ))
    }
}

/// Pids of live QEMU processes running guest `uuid`, found by scanning
/// /proc: used when a launch failed before its pid file could be trusted.
pub fn find_qemus(uuid: Uuid) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_our_qemu(pid, uuid))
        .collect()
}

/// Checks that a raw disk opens with `qemu-img info -f raw`, so a missing
/// or unreadable file gets qemu-img's own message before QEMU starts.
pub async fn check_raw(runner: &dyn CommandRunner, path: &Path) -> Result<()> {
    image_info(runner, path, ImageFormat::Raw).await.map(|_| ())
}

/// Checks a local overlay at each start: it opens as qcow2 (a corrupt header
/// gets qemu-img's message instead of a QEMU start that can hang: QEMU 7.2
/// with aio=io_uring does on some), its header names exactly the backing
/// file and format agentd gave it, and it has no external data file. QEMU is
/// given the backing node explicitly anyway; this catches an overlay that is
/// not the one agentd made.
pub async fn check_overlay(
    runner: &dyn CommandRunner,
    overlay: &Path,
    base: &Path,
    base_format: ImageFormat,
) -> Result<()> {
    let info = image_info(runner, overlay, ImageFormat::Qcow2).await?;
    let refuse = |why: String| {
        Err(Error::precondition(format!(
            "overlay {} is not the one agentd made: {why}",
            overlay.display()
        )))
    };
    let backing = info["backing-filename"].as_str();
    if backing != base.to_str() {
        return refuse(format!(
            "its backing file is {backing:?}, expected {}",
            base.display()
        ));
    }
    let fmt = info["backing-filename-format"].as_str();
    if fmt.and_then(|f| f.parse::<ImageFormat>().ok()) != Some(base_format) {
        return refuse(format!(
            "its backing format is {fmt:?}, expected {base_format}"
        ));
    }
    if let Some(data) = info["format-specific"]["data"]["data-file"].as_str() {
        return refuse(format!("it has an external data file {data:?}"));
    }
    Ok(())
}

/// `qemu-img info` of `path` opened as `format` (never probed), as JSON.
async fn image_info(
    runner: &dyn CommandRunner,
    path: &Path,
    format: ImageFormat,
) -> Result<serde_json::Value> {
    let cmd = Cmd::new("qemu-img")
        .args(["info", "--output=json", "-f", format.as_str()])
        .arg(path.display().to_string())
        .timeout(Duration::from_secs(30));
    let out = runner.run(&cmd).await?;
    if !out.success() {
        return Err(Error::precondition(format!(
            "QEMU cannot open disk image {}: {}",
            path.display(),
            out.stderr.trim()
        )));
    }
    serde_json::from_str(&out.stdout).map_err(|e| {
        Error::internal(format!(
            "qemu-img info of {}: output not understood: {e}",
            path.display()
        ))
    })
}

pub fn read_pid(pidfile: &Path) -> Result<Option<u32>> {
    match std::fs::read_to_string(pidfile) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::internal(format!("bad pid file {}", pidfile.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(pidfile.display(), e)),
    }
}

/// True when `pid` is a live (not zombie) QEMU running guest `uuid`: the
/// pid alone could have been reused after a reboot.
pub fn is_our_qemu(pid: u32, uuid: Uuid) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the parenthesised comm, is the state.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim_start()) {
            if rest.starts_with('Z') || rest.starts_with('X') {
                return false;
            }
        }
    }
    let needle = uuid.to_string();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == needle.as_bytes())
        && in_our_netns(pid)
}

/// True when `pid` shares agentd's network namespace (as the QEMUs it
/// launches do). A live migration's two hosts may be two namespaces of one
/// machine (agent/tests/migrate.rs), each with a QEMU of the same UUID:
/// neither agentd may take the other's for its own. True when either link
/// cannot be read (no namespaces to tell apart).
fn in_our_netns(pid: u32) -> bool {
    match (
        std::fs::read_link(format!("/proc/{pid}/ns/net")),
        std::fs::read_link("/proc/self/ns/net"),
    ) {
        (Ok(theirs), Ok(ours)) => theirs == ours,
        _ => true,
    }
}

/// Sends `sig` to `pid`; Ok when it is already gone.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a positive pid only signals that process; a
    // failure (ESRCH: already gone) is harmless and ignored.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits until `pid` no longer runs guest `uuid`, up to `limit`.
pub async fn wait_gone(pid: u32, uuid: Uuid, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while is_our_qemu(pid, uuid) {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Detects whether QEMU's file driver accepts aio=io_uring here (QEMU built
/// with liburing, kernel allows it), by opening a scratch file through
/// qemu-img, which shares qemu-system's block layer.
pub async fn io_uring_supported(runner: &dyn CommandRunner) -> bool {
    let Ok(probe) = tempfile::NamedTempFile::new() else {
        return false;
    };
    if probe.as_file().set_len(1 << 20).is_err() {
        return false;
    }
    let cmd = Cmd::new("qemu-img")
        .args(["info", "--image-opts"])
        .arg(format!(
            "driver=raw,file.driver=file,file.filename={},file.aio=io_uring",
            probe.path().display()
        ))
        .timeout(Duration::from_secs(10));
    matches!(runner.run(&cmd).await, Ok(o) if o.success())
}

#[cfg(test)]
#[path = "vmm_tests.rs"]
mod tests;
