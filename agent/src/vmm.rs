//! QEMU processes: the accelerator choice, the command line, launching,
//! and finding a guest's process again.
//!
//! Every guest is one `qemu-system-x86_64` started with `-daemonize`, so it
//! belongs to init, not to agentd: guests keep running when agentd stops or
//! crashes, and agentd re-adopts them through their pid file and QMP socket.
//! Disks are `-blockdev` nodes written as JSON (no comma-escaping of paths)
//! behind `virtio-blk-pci`: QEMU's own iSCSI initiator, files, or block
//! devices the kernel's initiator attached (`host_device`, see `attach`).
//! NICs are `virtio-net-pci` on taps that agentd made; CHAP secrets reach
//! QEMU through `-object secret,file=`, never argv.
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

use crate::qmp::{Qmp, QmpEvents, RunState};

use stratus_core::error::{Error, Result};
use stratus_core::image::ImageFormat;
use stratus_core::runner::{Cmd, CommandRunner};

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

    /// Launches QEMU daemonized and returns its pid ([`launch`]).
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
}

/// The host's QEMU: processes found through /proc, commands through the
/// one command runner.
pub struct HostVmm {
    runner: Arc<dyn CommandRunner>,
}

impl HostVmm {
    pub fn new(runner: Arc<dyn CommandRunner>) -> HostVmm {
        HostVmm { runner }
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
        Box::pin(launch(self.runner.as_ref(), plan))
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

/// How QEMU reaches one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackend {
    Iscsi {
        portal: String,
        target: String,
        lun: u32,
        initiator: String,
        /// (user, file holding the secret)
        chap: Option<(String, PathBuf)>,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    /// vda, vdb, ...: also the blockdev node name.
    pub device: String,
    pub backend: DiskBackend,
    pub read_only: bool,
    pub boot_index: u32,
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
    /// The guest's directory: QMP socket, pid file, console log.
    pub dir: PathBuf,
    /// Use io_uring for file disks (QEMU built with it).
    pub io_uring: bool,
}

impl LaunchPlan {
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The full QEMU command line (without the program).
    pub fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |x: &[&str]| a.extend(x.iter().map(|s| s.to_string()));
        push(&["-name", &format!("guest={},debug-threads=on", self.name)]);
        push(&["-uuid", &self.uuid.to_string()]);
        push(&["-machine", &format!("q35,accel={}", self.accel.name())]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", self.console_log().display()),
            "-serial",
            "chardev:serial0",
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
        ]);
        // A panic device turns guest panics into GUEST_PANICKED events.
        push(&["-device", "pvpanic"]);
        for d in &self.disks {
            let node = &d.device;
            let blockdev = match &d.backend {
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
                    if let Some((user, file)) = chap {
                        let id = format!("chap-{node}");
                        push(&[
                            "-object",
                            &format!("secret,id={id},file={},format=raw", file.display()),
                        ]);
                        v["user"] = json!(user);
                        v["password-secret"] = json!(id);
                    }
                    v
                }
                DiskBackend::RawFile { path } => json!({
                    "driver": "raw",
                    "node-name": node,
                    "read-only": d.read_only,
                    "file": self.file_node(path),
                }),
                DiskBackend::Overlay {
                    path,
                    base,
                    base_format,
                } => {
                    let mut backing = json!({
                        "driver": base_format.as_str(),
                        "node-name": format!("{node}-base"),
                        "read-only": true,
                        "file": self.file_node(base),
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
                        "file": self.file_node(path),
                        "backing": backing,
                    })
                }
                DiskBackend::HostDevice { path } => {
                    // Like file disks: no host page cache, io_uring or
                    // native AIO (a block device always takes O_DIRECT).
                    json!({
                        "driver": "raw",
                        "node-name": node,
                        "read-only": d.read_only,
                        "file": {
                            "driver": "host_device",
                            "filename": path,
                            "aio": if self.io_uring { "io_uring" } else { "native" },
                            "cache": {"direct": true},
                        },
                    })
                }
            };
            push(&["-blockdev", &blockdev.to_string()]);
            let mut dev = format!("virtio-blk-pci,drive={node},id={node}-dev");
            if d.boot_index > 0 {
                dev.push_str(&format!(",bootindex={}", d.boot_index));
            }
            push(&["-device", &dev]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            push(&[
                "-netdev",
                &format!("tap,id=net{i},ifname={},script=no,downscript=no", n.tap),
                "-device",
                &format!("virtio-net-pci,netdev=net{i},mac={},id=net{i}-dev", n.mac),
            ]);
        }
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.kernel.display().to_string()]);
            if let Some(i) = &k.initrd {
                push(&["-initrd", &i.display().to_string()]);
            }
            if !k.cmdline.is_empty() {
                push(&["-append", &k.cmdline]);
            }
        }
        push(&[
            "-pidfile",
            &self.pidfile().display().to_string(),
            "-daemonize",
        ]);
        a
    }

    /// The protocol node of a file on this host.
    fn file_node(&self, path: &Path) -> serde_json::Value {
        // Direct I/O (no host page cache in the guest's data path), with
        // io_uring where QEMU has it, else Linux native AIO (which needs
        // O_DIRECT). A filesystem without O_DIRECT (tmpfs) falls back to
        // buffered I/O on a thread pool.
        let direct = supports_direct_io(path);
        let aio = match (direct, self.io_uring) {
            (_, true) => "io_uring",
            (true, false) => "native",
            (false, false) => "threads",
        };
        json!({
            "driver": "file",
            "filename": path,
            "aio": aio,
            "cache": {"direct": direct},
        })
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

/// Launches QEMU and returns its pid. On failure the error carries QEMU's
/// own message (its stderr before it daemonized).
pub async fn launch(runner: &dyn CommandRunner, plan: &LaunchPlan) -> Result<u32> {
    std::fs::create_dir_all(&plan.dir).map_err(|e| Error::io(plan.dir.display(), e))?;
    let _ = std::fs::remove_file(plan.qmp_socket());
    let _ = std::fs::remove_file(plan.pidfile());
    let cmd = Cmd::new(QEMU)
        .args(plan.argv())
        .timeout(Duration::from_secs(60));
    let out = match runner.run(&cmd).await {
        Ok(o) => o,
        Err(e) => {
            // Timed out: a daemonized child may be stuck in its set-up.
            for pid in find_qemus(plan.uuid) {
                signal(pid, libc::SIGKILL);
            }
            return Err(e.context(format!("starting QEMU for guest {}", plan.name)));
        }
    };
    if !out.success() {
        let msg: Vec<&str> = out
            .stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        return Err(Error::precondition(format!(
            "QEMU failed to start guest {}: {}",
            plan.name,
            if msg.is_empty() {
                format!("exit status {}", out.status)
            } else {
                msg.join("; ")
            }
        )));
    }
    read_pid(&plan.pidfile())?.ok_or_else(|| {
        Error::internal(format!(
            "QEMU started guest {} but wrote no pid file",
            plan.name
        ))
    })
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
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            uuid: Uuid::nil(),
            name: "web1".into(),
            vcpus: 2,
            memory_mib: 256,
            accel: Accel::Tcg,
            disks: vec![
                PlannedDisk {
                    device: "vda".into(),
                    backend: DiskBackend::Iscsi {
                        portal: "127.0.0.1:3260".into(),
                        target: "iqn.2026-11.io.stratus.pdisk:x".into(),
                        lun: 1,
                        initiator: "iqn.2026-11.io.stratus:host".into(),
                        chap: Some(("vm1".into(), "/s/vm/chap-vda".into())),
                    },
                    read_only: false,
                    boot_index: 1,
                },
                PlannedDisk {
                    device: "vdb".into(),
                    backend: DiskBackend::Overlay {
                        path: "/images/a,b.qcow2".into(),
                        base: "/cache/ab.img".into(),
                        base_format: ImageFormat::Qcow2,
                    },
                    read_only: true,
                    boot_index: 0,
                },
            ],
            nics: vec![PlannedNic {
                tap: "st00000000n0".into(),
                mac: "52:54:00:12:34:56".parse().unwrap(),
            }],
            kernel: None,
            dir: "/s/vm".into(),
            io_uring: true,
        }
    }

    #[test]
    fn command_line_uses_virtio_blockdev_and_secret_objects() {
        let a = plan().argv();
        let line = a.join(" ");
        assert!(line.contains("-machine q35,accel=tcg"));
        assert!(line.contains("-object secret,id=chap-vda,file=/s/vm/chap-vda,format=raw"));
        assert!(line.contains("\"password-secret\":\"chap-vda\""));
        assert!(line.contains("virtio-blk-pci,drive=vda,id=vda-dev,bootindex=1"));
        assert!(line.contains("virtio-blk-pci,drive=vdb,id=vdb-dev"));
        assert!(line.contains("\"aio\":\"io_uring\""));
        assert!(line.contains("tap,id=net0,ifname=st00000000n0,script=no,downscript=no"));
        assert!(line.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"));
        assert!(line.ends_with("-pidfile /s/vm/qemu.pid -daemonize"));
        // A comma in a path cannot break out of the JSON blockdev.
        let bd = a.iter().find(|x| x.contains("a,b.qcow2")).unwrap();
        let v: serde_json::Value = serde_json::from_str(bd).unwrap();
        assert_eq!(v["file"]["filename"], "/images/a,b.qcow2");
        assert_eq!(v["read-only"], true);
    }

    #[test]
    fn every_disk_has_an_explicit_format_and_overlays_an_explicit_backing() {
        let mut p = plan();
        p.disks.push(PlannedDisk {
            device: "vdc".into(),
            backend: DiskBackend::RawFile {
                path: "/srv/disk.raw".into(),
            },
            read_only: false,
            boot_index: 0,
        });
        for base_format in [ImageFormat::Qcow2, ImageFormat::Raw] {
            p.disks[1].backend = DiskBackend::Overlay {
                path: "/s/vm/vdb.qcow2".into(),
                base: "/cache/ab.img".into(),
                base_format,
            };
            let a = p.argv();
            let nodes: Vec<serde_json::Value> = a
                .windows(2)
                .filter(|w| w[0] == "-blockdev")
                .map(|w| serde_json::from_str(&w[1]).unwrap())
                .collect();
            assert_eq!(nodes.len(), 3);
            let raw = &nodes[2];
            assert_eq!(raw["driver"], "raw", "{raw}");
            assert_eq!(raw["file"]["filename"], "/srv/disk.raw");
            let ov = &nodes[1];
            assert_eq!(ov["driver"], "qcow2", "{ov}");
            assert_eq!(ov["file"]["filename"], "/s/vm/vdb.qcow2");
            let base = &ov["backing"];
            assert_eq!(base["driver"], base_format.as_str(), "{ov}");
            assert_eq!(base["node-name"], "vdb-base");
            assert_eq!(base["read-only"], true);
            assert_eq!(base["file"]["filename"], "/cache/ab.img");
            // A qcow2 base opens nothing its own header names.
            if base_format == ImageFormat::Qcow2 {
                assert!(base["backing"].is_null() && base.get("backing").is_some());
            } else {
                assert!(base.get("backing").is_none(), "raw takes no backing");
            }
            // No driver is left for QEMU to guess.
            for v in &nodes {
                assert!(v["driver"].is_string(), "{v}");
            }
        }
    }

    fn info_runner(json: &'static str) -> stratus_core::runner::FakeRunner {
        stratus_core::runner::FakeRunner::with(move |_| Ok(stratus_core::runner::Output::ok(json)))
    }

    #[tokio::test]
    async fn an_overlay_must_name_the_base_agentd_gave_it() {
        let base = Path::new("/cache/ab.img");
        let ok = r#"{"format":"qcow2","backing-filename":"/cache/ab.img",
            "backing-filename-format":"raw","format-specific":{"type":"qcow2","data":{}}}"#;
        let r = info_runner(ok);
        check_overlay(&r, Path::new("/s/vda.qcow2"), base, ImageFormat::Raw)
            .await
            .unwrap();
        assert_eq!(
            r.calls()[0].join(" "),
            "qemu-img info --output=json -f qcow2 /s/vda.qcow2"
        );
        let err = check_overlay(&r, Path::new("/s/vda.qcow2"), base, ImageFormat::Qcow2)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("backing format"), "{err}");
        for bad in [
            r#"{"format":"qcow2","backing-filename":"/etc/shadow","backing-filename-format":"raw"}"#,
            r#"{"format":"qcow2","backing-filename-format":"raw"}"#,
            r#"{"format":"qcow2","backing-filename":"/cache/ab.img","backing-filename-format":"raw",
                "format-specific":{"type":"qcow2","data":{"data-file":"/etc/shadow"}}}"#,
        ] {
            let r = info_runner(bad);
            let err = check_overlay(&r, Path::new("/s/vda.qcow2"), base, ImageFormat::Raw)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("not the one agentd made"), "{err}");
        }
    }

    #[test]
    fn kernel_attached_disks_are_raw_host_devices_with_direct_io() {
        let mut p = plan();
        p.disks[0].backend = DiskBackend::HostDevice {
            path: "/dev/sdc".into(),
        };
        for (io_uring, aio) in [(true, "io_uring"), (false, "native")] {
            p.io_uring = io_uring;
            let a = p.argv();
            assert!(!a.iter().any(|x| x.contains("secret")), "{a:?}");
            let bd = a.iter().find(|x| x.contains("/dev/sdc")).unwrap();
            let v: serde_json::Value = serde_json::from_str(bd).unwrap();
            assert_eq!(v["driver"], "raw");
            assert_eq!(v["node-name"], "vda");
            assert_eq!(v["read-only"], false);
            assert_eq!(v["file"]["driver"], "host_device");
            assert_eq!(v["file"]["filename"], "/dev/sdc");
            assert_eq!(v["file"]["aio"], aio);
            assert_eq!(v["file"]["cache"]["direct"], true);
        }
    }

    #[test]
    fn accel_choice_is_explained() {
        let (a, why) = choose_accel(AccelChoice::Tcg);
        assert_eq!(a, Accel::Tcg);
        assert!(!why.is_empty());
        let (_, why) = choose_accel(AccelChoice::Auto);
        assert!(!why.is_empty());
    }

    #[test]
    fn our_own_process_is_not_a_guest() {
        assert!(!is_our_qemu(std::process::id(), Uuid::new_v4()));
        assert!(!is_our_qemu(u32::MAX - 1, Uuid::new_v4()));
    }
}
