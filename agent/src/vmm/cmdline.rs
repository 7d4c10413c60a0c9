//! The QEMU command line: what a guest's QEMU is given ([`LaunchPlan`],
//! its disks and NICs) and how it is written (`-blockdev` JSON nodes,
//! `virtio-blk-pci` and `virtio-net-pci` devices on root ports, fd sets).

use std::path::{Path, PathBuf};

use serde_json::json;
use uuid::Uuid;

use super::{Accel, PassedFds};
use crate::cgroup::Limits;
use crate::confine::Confinement;
use crate::disk_io::{Aio, DiskIo};
use stratus_core::error::Result;
use stratus_core::image::ImageFormat;
use stratus_core::types::Chap;

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
