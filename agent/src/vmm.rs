//! QEMU processes: the accelerator choice, the command line, launching,
//! and finding a guest's process again. The command line itself (the
//! launch plan, `-blockdev` nodes, devices) is `vmm/cmdline.rs`.
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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use uuid::Uuid;

use crate::cgroup::{GuestCgroups, Limits};
use crate::confine::Confinement;
use crate::disk_io::DiskIo;
use crate::launch_fds::open_log;
pub use crate::launch_fds::{NumberedFds, OpenFds, PassedFds};
use crate::qmp::{Qmp, QmpEvents, RunState};

use stratus_core::error::{Error, Result};
use stratus_core::image::ImageFormat;
use stratus_core::runner::{Cmd, CommandRunner};

mod cmdline;
pub use cmdline::*;

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
