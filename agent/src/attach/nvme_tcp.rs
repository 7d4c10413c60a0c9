//! The kernel's NVMe/TCP host: [`NvmeAttacher`] (`--attach kernel` on an
//! export of pdiskd's `nvmet` exporter). nvme-cli connects the host to the
//! volume's subsystem, the namespace becomes `/dev/nvmeSnN` and QEMU opens
//! it as a `host_device`, like an iSCSI LUN of the kernel initiator.
//!
//! Names: a volume's subsystem NQN is its target IQN mapped by
//! [`Iqn::to_nqn`], and this host's NQN is agentd's initiator IQN mapped the
//! same way: the one derivation pdiskd's exporter uses for its
//! `allowed_hosts`, so the two always agree.
//!
//! The sequence (argv only, through the runner, each call with a timeout):
//!
//! ```text
//! attach, when no controller of ours is connected to SUBNQN yet:
//!   nvme connect -t tcp -a ADDR -s PORT -n SUBNQN -q HOSTNQN
//!   (crash point nvme.connected)
//! then, always: the namespace's block device is looked up in sysfs by the
//! subsystem NQN (never guessed from a name): the nvme-subsystem whose
//! `subsysnqn` is SUBNQN, its namespace head `nvmeSnNSID` (native
//! multipath, Debian's default), else the controller's own `nvmeCnNSID`;
//! waited for with a bounded backoff until /dev/NAME exists
//!   (crash point nvme.device_found)
//! detach, once no holder is left:
//!   blockdev --flushbufs /dev/nvmeSnN
//!   nvme disconnect -d nvmeC       each controller of ours: subsysnqn SUBNQN,
//!                                  hostnqn HOSTNQN, transport tcp, address
//!                                  ADDR:PORT (never `-n SUBNQN`, which drops
//!                                  every controller of the subsystem)
//! ```
//!
//! **Access control is the subsystem's `allowed_hosts` only.** The lab
//! kernel (Debian 12, 6.1) has no `CONFIG_NVME_TARGET_AUTH`, so there is no
//! DH-HMAC-CHAP: nvmet admits the host NQN a host *claims*. pdiskd drops the
//! CHAP account of an nvmet export; agentd passes no secret to nvme-cli.
//!
//! **Crash safety** is the iSCSI kernel path's: the caller records the
//! attachment (the namespace, no device yet) before [`NvmeAttacher::attach`]
//! connects, so an interrupted start's undo disconnects it; at start every
//! recorded attachment is adopted ([`NvmeAttacher::adopt`]) and then
//! [`NvmeAttacher::reap`] disconnects the controllers with our host NQN that
//! no holder names, reporting each. Holders are a set per subsystem, so a
//! repeated detach never disconnects a controller another guest uses.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use stratus_core::error::{Error, Result};
use stratus_core::runner::{Cmd, CommandRunner, Output};
use stratus_core::types::Iqn;

use super::{command_error, Holder};

pub const NVME: &str = "nvme";
/// `nvme connect` waits for the fabric's Connect (and its retries).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(60);
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// One namespace of an NVMe/TCP subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NvmeNamespace {
    /// Always an address: nvme-cli's `-a` and sysfs' `address` carry it.
    pub addr: SocketAddr,
    pub subnqn: String,
    pub nsid: u32,
}

impl NvmeNamespace {
    pub fn new(addr: SocketAddr, subnqn: &str, nsid: u32) -> Result<NvmeNamespace> {
        check_nqn(subnqn)?;
        if nsid == 0 {
            return Err(Error::invalid("NVMe namespace id 0"));
        }
        Ok(NvmeNamespace {
            addr,
            subnqn: subnqn.to_owned(),
            nsid,
        })
    }

    /// From pdiskd's export URL `nvme+tcp://HOST:PORT/SUBNQN/NSID` (a host
    /// name is resolved once, here). The NQN must be the one the export's
    /// target IQN maps to ([`Iqn::to_nqn`]): one derivation on both sides.
    pub async fn from_export(url: &str, target_iqn: &str) -> Result<NvmeNamespace> {
        let bad = || Error::invalid(format!("bad NVMe/TCP export URL {url:?}"));
        let rest = url.strip_prefix("nvme+tcp://").ok_or_else(bad)?;
        let (rest, nsid) = rest.rsplit_once('/').ok_or_else(bad)?;
        let (portal, subnqn) = rest.split_once('/').ok_or_else(bad)?;
        let nsid: u32 = nsid.parse().map_err(|_| bad())?;
        let expected = target_iqn.parse::<Iqn>()?.to_nqn()?;
        if subnqn != expected {
            return Err(Error::invalid(format!(
                "NVMe/TCP export URL {url:?} names subsystem {subnqn}, not {expected} \
                 (the NQN of target {target_iqn})"
            )));
        }
        let addr = match portal.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(portal)
                .await
                .map_err(|e| Error::unavailable(format!("NVMe/TCP portal {portal:?}: {e}")))?
                .next()
                .ok_or_else(|| {
                    Error::unavailable(format!("NVMe/TCP portal {portal:?}: no address"))
                })?,
        };
        NvmeNamespace::new(addr, subnqn, nsid)
    }
}

impl std::fmt::Display for NvmeNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "namespace {} of {} at {}",
            self.nsid, self.subnqn, self.addr
        )
    }
}

/// NQNs reach argv and are compared with sysfs: `nqn.` and then letters,
/// digits and `.:-_`, at most 223 bytes (NVMe base spec, 4.5).
fn check_nqn(n: &str) -> Result<()> {
    let ok = (5..=223).contains(&n.len())
        && n.starts_with("nqn.")
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b':' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid NVMe qualified name {n:?}: nqn. followed by letters, digits, . : - _"
        )))
    }
}

/// A kernel-attached NVMe/TCP disk, as recorded in the guest's runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeDisk {
    pub namespace: NvmeNamespace,
    /// The block device QEMU opened; None until the namespace appeared.
    #[serde(default)]
    pub device: Option<PathBuf>,
}

/// Settings of the NVMe/TCP host; the roots are `/sys` and `/dev` except
/// in tests.
#[derive(Debug, Clone)]
pub struct NvmeOptions {
    /// agentd's initiator IQN; the host NQN is derived from it.
    pub initiator: String,
    pub sys: PathBuf,
    pub dev: PathBuf,
    /// How long to wait for a connected namespace's block device.
    pub device_timeout: Duration,
}

impl NvmeOptions {
    pub fn new(initiator: &str) -> NvmeOptions {
        NvmeOptions {
            initiator: initiator.to_owned(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            device_timeout: Duration::from_secs(30),
        }
    }

    /// The NVMe/TCP host beside the kernel iSCSI initiator `k`: the same
    /// initiator (so host NQN) and roots.
    pub fn beside(k: &super::KernelOptions) -> NvmeOptions {
        NvmeOptions {
            sys: k.sys.clone(),
            dev: k.dev.clone(),
            device_timeout: k.device_timeout,
            ..NvmeOptions::new(&k.initiator)
        }
    }

    /// The host NQN agentd connects as: [`Iqn::to_nqn`] of its initiator
    /// IQN, as pdiskd's nvmet exporter names it in `allowed_hosts`.
    pub fn host_nqn(&self) -> Result<String> {
        self.initiator
            .parse::<Iqn>()
            .and_then(|i| i.to_nqn())
            .map_err(|e| e.context("NVMe/TCP host NQN"))
    }
}

/// A controller as sysfs shows it (`/sys/class/nvme/nvmeC`).
#[derive(Debug, Clone)]
struct Controller {
    name: String,
    subnqn: String,
    hostnqn: String,
    /// `transport` (`tcp`, `rdma`, `pcie`...).
    transport: String,
    /// `traddr` and `trsvcid` of `address` (`traddr=A,trsvcid=P,src_addr=S`).
    traddr: String,
    trsvcid: String,
}

impl Controller {
    /// True for an NVMe/TCP controller connected to `addr`.
    fn reaches(&self, addr: &SocketAddr) -> bool {
        self.transport == "tcp"
            && self.traddr.parse::<std::net::IpAddr>().ok() == Some(addr.ip())
            && self.trsvcid == addr.port().to_string()
    }
}

/// The NVMe/TCP host: connects, finds namespaces, counts holders,
/// disconnects.
pub struct NvmeAttacher {
    runner: Arc<dyn CommandRunner>,
    opts: NvmeOptions,
    subsystems: Mutex<HashMap<String, Arc<tokio::sync::Mutex<BTreeSet<Holder>>>>>,
    crash: super::CrashPoints,
}

impl NvmeAttacher {
    pub fn new(runner: Arc<dyn CommandRunner>, opts: NvmeOptions) -> NvmeAttacher {
        NvmeAttacher {
            runner,
            opts,
            subsystems: Mutex::default(),
            crash: super::CrashPoints::default(),
        }
    }

    /// A step boundary (`crate::failpoints::NVME_POINTS`); see
    /// `KernelAttacher::crash_point`.
    fn crash_point(&self, name: &'static str) {
        self.crash.hit(name);
    }

    #[cfg(test)]
    pub(crate) fn arm_crash_point(&self, at: Option<&'static str>) {
        self.crash.arm(at);
    }

    /// `nvme version`, once nvme-cli answers and the kernel's NVMe/TCP host
    /// (`nvme_tcp`) is loaded or loads; else why NVMe/TCP exports cannot be
    /// attached here.
    pub async fn probe(&self) -> Result<String> {
        let cmd = Cmd::new(NVME)
            .arg("version")
            .timeout(Duration::from_secs(10));
        let out = self
            .runner
            .run(&cmd)
            .await
            .map_err(|e| e.context("NVMe/TCP exports need nvme-cli's nvme"))?;
        if !out.success() {
            return Err(command_error(&cmd, &out).context("NVMe/TCP exports need nvme-cli"));
        }
        if !self.opts.sys.join("module/nvme_tcp").exists() {
            let load = Cmd::new("modprobe")
                .arg("nvme_tcp")
                .timeout(Duration::from_secs(30));
            self.run(&load)
                .await
                .map_err(|e| e.context("NVMe/TCP exports need the kernel's nvme_tcp module"))?;
        }
        Ok(out.stdout.trim().to_owned())
    }

    fn slot(&self, subnqn: &str) -> Arc<tokio::sync::Mutex<BTreeSet<Holder>>> {
        self.subsystems
            .lock()
            .unwrap()
            .entry(subnqn.to_owned())
            .or_default()
            .clone()
    }

    /// How many holders the namespace's subsystem has.
    pub async fn holders(&self, ns: &NvmeNamespace) -> usize {
        self.slot(&ns.subnqn).lock().await.len()
    }

    /// Connects (unless a controller of ours is connected to the subsystem
    /// already) and returns the namespace's block device. On failure with no
    /// other holder, a controller this call connected is disconnected.
    pub async fn attach(&self, holder: &Holder, ns: &NvmeNamespace) -> Result<PathBuf> {
        let host = self.opts.host_nqn()?;
        let slot = self.slot(&ns.subnqn);
        let mut holders = slot.lock().await;
        if self.ours(&ns.subnqn, &host).is_empty() {
            let cmd = Cmd::new(NVME)
                .args(["connect", "-t", "tcp", "-a"])
                .arg(ns.addr.ip().to_string())
                .args(["-s", &ns.addr.port().to_string(), "-n", &ns.subnqn])
                .args(["-q", &host])
                .timeout(CONNECT_TIMEOUT);
            let out = self.runner.run(&cmd).await?;
            // Already connected (a race with a reconnect) is fine.
            if !out.success() && self.ours(&ns.subnqn, &host).is_empty() {
                return Err(command_error(&cmd, &out).context(format!("connecting {ns}")));
            }
            tracing::info!(%holder, %ns, "NVMe/TCP connected");
            self.crash_point("nvme.connected");
        }
        match self.wait_for_device(ns).await {
            Ok(dev) => {
                self.crash_point("nvme.device_found");
                holders.insert(holder.clone());
                Ok(dev)
            }
            Err(e) => {
                if holders.is_empty() {
                    if let Err(d) = self.disconnect(ns, &host).await {
                        tracing::warn!(%ns, error = %d, "could not disconnect after a failed attach");
                    }
                }
                Err(e)
            }
        }
    }

    /// Drops `holder`; the last one out disconnects the subsystem.
    /// Disconnecting what is not connected is fine (a repeated undo).
    pub async fn detach(&self, holder: &Holder, ns: &NvmeNamespace) -> Result<()> {
        let slot = self.slot(&ns.subnqn);
        let mut holders = slot.lock().await;
        holders.remove(holder);
        if !holders.is_empty() {
            return Ok(());
        }
        let host = self.opts.host_nqn()?;
        if self.ours(&ns.subnqn, &host).is_empty() {
            return Ok(());
        }
        if let Some(dev) = self.find_device(ns) {
            let cmd = Cmd::new("blockdev")
                .arg("--flushbufs")
                .arg(dev.display().to_string())
                .timeout(FLUSH_TIMEOUT);
            self.run(&cmd).await?;
        }
        self.disconnect(ns, &host).await?;
        tracing::info!(%holder, %ns, "NVMe/TCP disconnected");
        Ok(())
    }

    /// A recorded attachment holds its subsystem (at start, before any undo).
    pub async fn adopt(&self, holder: Holder, ns: &NvmeNamespace) {
        self.slot(&ns.subnqn).lock().await.insert(holder);
    }

    /// Disconnects the NVMe/TCP controllers with our host NQN whose
    /// subsystem no holder names: left by a crash or a failed disconnect.
    /// Only at start, after every record was adopted. Ok lines say what was
    /// removed, Err lines what could not be.
    pub async fn reap(&self) -> Vec<std::result::Result<String, String>> {
        let mut report = Vec::new();
        let Ok(host) = self.opts.host_nqn() else {
            return report;
        };
        for c in self.controllers() {
            if c.hostnqn != host || c.transport != "tcp" {
                continue;
            }
            if !self.slot(&c.subnqn).lock().await.is_empty() {
                continue;
            }
            report.push(match self.disconnect_controller(&c.name).await {
                Ok(()) => Ok(format!(
                    "disconnected NVMe/TCP controller {} of {} (no guest holds it)",
                    c.name, c.subnqn
                )),
                Err(e) => Err(format!(
                    "could not disconnect NVMe/TCP controller {} of {}: {e}",
                    c.name, c.subnqn
                )),
            });
        }
        report
    }

    /// Disconnects our controllers of `ns`: host NQN `host`, NVMe/TCP to
    /// its address. Never `nvme disconnect -n SUBNQN`, which drops every
    /// controller of the subsystem, another host NQN's or another path's
    /// too: each controller by its name (`nvme disconnect -d nvmeC`).
    async fn disconnect(&self, ns: &NvmeNamespace, host: &str) -> Result<()> {
        for c in self.ours(&ns.subnqn, host) {
            if c.reaches(&ns.addr) {
                self.disconnect_controller(&c.name).await?;
            }
        }
        Ok(())
    }

    async fn disconnect_controller(&self, name: &str) -> Result<()> {
        let cmd = Cmd::new(NVME)
            .args(["disconnect", "-d", name])
            .timeout(DISCONNECT_TIMEOUT);
        self.run(&cmd).await.map(|_| ())
    }

    async fn run(&self, cmd: &Cmd) -> Result<Output> {
        let out = self.runner.run(cmd).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(command_error(cmd, &out))
        }
    }

    async fn wait_for_device(&self, ns: &NvmeNamespace) -> Result<PathBuf> {
        let deadline = tokio::time::Instant::now() + self.opts.device_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            if let Some(dev) = self.find_device(ns) {
                return Ok(dev);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::unavailable(format!(
                    "{ns}: no block device within {:?} after connecting",
                    self.opts.device_timeout
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The namespace's block device, by its subsystem NQN in sysfs: the
    /// multipath head under `class/nvme-subsystem`, else the namespace under
    /// `class/nvme/<controller>`; only once its /dev node exists.
    fn find_device(&self, ns: &NvmeNamespace) -> Option<PathBuf> {
        let sys = &self.opts.sys;
        let parents = dirs_with_nqn(&sys.join("class/nvme-subsystem"), &ns.subnqn)
            .into_iter()
            .chain(dirs_with_nqn(&sys.join("class/nvme"), &ns.subnqn));
        for parent in parents {
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_namespace_of(&name, ns.nsid) {
                    let dev = self.opts.dev.join(&name);
                    if dev.exists() {
                        return Some(dev);
                    }
                }
            }
        }
        None
    }

    /// Our controllers (host NQN `host`) connected to `subnqn`.
    fn ours(&self, subnqn: &str, host: &str) -> Vec<Controller> {
        self.controllers()
            .into_iter()
            .filter(|c| c.subnqn == subnqn && c.hostnqn == host)
            .collect()
    }

    fn controllers(&self) -> Vec<Controller> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.opts.sys.join("class/nvme")) else {
            return out;
        };
        for e in entries.flatten() {
            let p = e.path();
            let read = |f: &str| {
                std::fs::read_to_string(p.join(f))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            };
            let address = read("address");
            let field = |k: &str| {
                address
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or_default()
                    .to_owned()
            };
            out.push(Controller {
                name: e.file_name().to_string_lossy().into_owned(),
                subnqn: read("subsysnqn"),
                hostnqn: read("hostnqn"),
                transport: read("transport"),
                traddr: field("traddr"),
                trsvcid: field("trsvcid"),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The entries of `class` whose `subsysnqn` is `nqn`.
fn dirs_with_nqn(class: &Path, nqn: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::read_to_string(p.join("subsysnqn")).is_ok_and(|s| s.trim() == nqn))
        .collect()
}

/// `nvme<digits>n<nsid>`: a namespace block device (a multipath head or a
/// controller's own), not a hidden path `nvmeXcYnZ` nor a partition.
fn is_namespace_of(name: &str, nsid: u32) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((inst, n)) = rest.split_once('n') else {
        return false;
    };
    !inst.is_empty() && inst.bytes().all(|c| c.is_ascii_digit()) && n == nsid.to_string()
}

#[cfg(test)]
#[path = "nvme_tcp_tests.rs"]
mod tests;
