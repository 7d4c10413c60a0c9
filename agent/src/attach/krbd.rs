//! The kernel's RBD client (krbd): [`KrbdAttacher`] (`--attach kernel` on an
//! `rbd` export of pdiskd's RBD backend, when the host's kernel has the
//! `rbd` module). The image is mapped as `/dev/rbdN` and QEMU opens it as a
//! `host_device`, like an iSCSI LUN of the kernel initiator. Without the
//! module (`modprobe rbd` fails), the disk is opened by QEMU's own rbd
//! driver as with `--attach qemu` (see `crate::rbd`), said once in the log.
//!
//! **The kernel's own interface, not `rbd device map`.** agentd writes the
//! map request to `/sys/bus/rbd/add_single_major` itself, as `rbd device
//! map` does (ceph's `src/krbd.cc`, `do_map`): so the host needs no
//! ceph-common (70 MiB installed with its Python and librados). The request
//! names the key by reference (`key=NAME`), never the key: like
//! `src/common/secret.c` (`set_kernel_secret`), the key (the keyring's
//! base64, decoded) is added to agentd's process keyring as a `ceph` key
//! just before the write (add_key(2)) and invalidated right after it
//! (libceph copies it while parsing the request). So the key never reaches
//! argv, a log, agentd's store or the mapping's `config_info` (root-only,
//! but it keeps the request text: a `secret=` option would stay there for
//! the mapping's life). os-brick's `RBDConnector` maps with `rbd map` and a
//! keyring file instead; agentd writes no key to any file.
//!
//! ```text
//! attach, when no mapping of the image's head exists yet:
//!   add_key("ceph", "stratus.client.USER", KEY, @p)
//!   write "MON1,MON2 name=USER,key=stratus.client.USER POOL IMAGE" to
//!         /sys/bus/rbd/add_single_major
//!   keyctl(INVALIDATE)
//!   (crash point krbd.mapped)
//! then, always: the mapping is looked up in /sys/bus/rbd/devices by pool,
//! image, snapshot "-" and cluster fsid (never guessed), waited for with a
//! bounded backoff until /dev/rbdN exists
//!   (crash point krbd.device_found)
//! detach, once no holder is left:
//!   write "N" to /sys/bus/rbd/remove_single_major
//! ```
//!
//! The monitors are the export's, msgr1 addresses (pdiskd names a
//! monitor's v1 address first): the kernel's default `ms_mode=legacy`.
//!
//! **Crash safety** is the iSCSI and NVMe paths': the caller records the
//! attachment (the image, no device yet) before [`KrbdAttacher::attach`]
//! maps, so an interrupted start's undo unmaps it; at start every recorded
//! attachment is adopted ([`KrbdAttacher::adopt`]) and then
//! [`KrbdAttacher::reap`] unmaps the mappings of pdisk images (`pd-*`)
//! that no holder names, reporting each. Holders are a set per image, so a
//! repeated detach never unmaps an image another guest uses.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use stratus_core::error::{Error, Result};
use stratus_core::runner::{Cmd, CommandRunner};

use super::{command_error, Holder};
use crate::rbd::{CephKey, RbdDisk};

/// How long the kernel may take to map (its own `mount_timeout` is 60 s).
const MAP_TIMEOUT: Duration = Duration::from_secs(90);
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of an unmap the kernel answers EBUSY (0.25+0.5+1+2+2 s).
const UNMAP_BUSY_TRIES: u32 = 5;
/// pdiskd's RBD image names: only these are reaped.
const PDISK_PREFIX: &str = "pd-";

/// An RBD image as mapped by krbd, as recorded in the guest's runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrbdDisk {
    pub pool: String,
    pub image: String,
    /// The cluster's fsid from the export; empty: any cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fsid: String,
    /// The mapped block device; None until the mapping appeared.
    #[serde(default)]
    pub device: Option<PathBuf>,
}

impl KrbdDisk {
    fn key(&self) -> String {
        format!("{}/{}/{}", self.fsid, self.pool, self.image)
    }
}

impl std::fmt::Display for KrbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rbd:{}/{}", self.pool, self.image)
    }
}

/// What the kernel does for the attacher: writes to the rbd bus' control
/// files with a key in the process keyring. [`SysfsKernel`] on a host, a
/// fake in unit tests.
pub trait RbdKernel: Send + Sync {
    /// Writes `request` to `file` while the `ceph` key `name` holds `key`
    /// (when given) in this process' keyring; the key is gone after.
    fn write(
        &self,
        file: &Path,
        request: &str,
        key: Option<(&str, &CephKey)>,
    ) -> std::io::Result<()>;
}

/// The real kernel: add_key(2), a write(2) to sysfs, keyctl(2).
pub struct SysfsKernel;

impl RbdKernel for SysfsKernel {
    fn write(
        &self,
        file: &Path,
        request: &str,
        key: Option<(&str, &CephKey)>,
    ) -> std::io::Result<()> {
        let serial = match key {
            Some((name, k)) => Some(add_ceph_key(name, k)?),
            None => None,
        };
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, request.as_bytes()));
        if let Some(s) = serial {
            // SAFETY: keyctl with integer arguments only.
            unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, s) };
        }
        r
    }
}

const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
const KEYCTL_INVALIDATE: libc::c_long = 21;

/// add_key(2) of a `ceph` key (the keyring's base64 decoded: the encoded
/// `ceph_crypto_key` libceph reads) to the process keyring; its serial.
fn add_ceph_key(name: &str, key: &CephKey) -> std::io::Result<libc::c_long> {
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(key.base64())
        .map_err(|_| std::io::Error::other("the cephx key is not base64"))?;
    let ty = std::ffi::CString::new("ceph").unwrap();
    let desc = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: NUL-terminated strings and a buffer with its length, all
    // alive for the call.
    let serial = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            ty.as_ptr(),
            desc.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_PROCESS_KEYRING,
        )
    };
    if serial < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(serial)
}

/// Settings of the krbd client; the roots are `/sys` and `/dev` except in
/// tests.
#[derive(Debug, Clone)]
pub struct KrbdOptions {
    pub sys: PathBuf,
    pub dev: PathBuf,
    /// How long to wait for a mapping's block device.
    pub device_timeout: Duration,
}

impl Default for KrbdOptions {
    fn default() -> KrbdOptions {
        KrbdOptions {
            sys: "/sys".into(),
            dev: "/dev".into(),
            device_timeout: Duration::from_secs(30),
        }
    }
}

impl KrbdOptions {
    /// Beside the kernel iSCSI initiator `k`: the same roots.
    pub fn beside(k: &super::KernelOptions) -> KrbdOptions {
        KrbdOptions {
            sys: k.sys.clone(),
            dev: k.dev.clone(),
            device_timeout: k.device_timeout,
        }
    }
}

/// A mapping as sysfs shows it (`/sys/bus/rbd/devices/N`).
#[derive(Debug, Clone)]
struct Mapping {
    id: u32,
    pool: String,
    image: String,
    snap: String,
    fsid: String,
}

impl Mapping {
    fn is(&self, d: &KrbdDisk) -> bool {
        self.pool == d.pool
            && self.image == d.image
            && self.snap == "-"
            && (d.fsid.is_empty() || self.fsid == d.fsid)
    }
}

/// The krbd client: maps, finds devices, counts holders, unmaps.
pub struct KrbdAttacher {
    runner: Arc<dyn CommandRunner>,
    kernel: Arc<dyn RbdKernel>,
    opts: KrbdOptions,
    images: Mutex<HashMap<String, Arc<tokio::sync::Mutex<BTreeSet<Holder>>>>>,
    /// Whether the host has krbd; None until first asked.
    available: tokio::sync::Mutex<Option<bool>>,
    crash: super::CrashPoints,
}

impl KrbdAttacher {
    pub fn new(
        runner: Arc<dyn CommandRunner>,
        kernel: Arc<dyn RbdKernel>,
        opts: KrbdOptions,
    ) -> KrbdAttacher {
        KrbdAttacher {
            runner,
            kernel,
            opts,
            images: Mutex::default(),
            available: tokio::sync::Mutex::new(None),
            crash: super::CrashPoints::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn arm_crash_point(&self, at: Option<&'static str>) {
        self.crash.arm(at);
    }

    fn bus(&self) -> PathBuf {
        self.opts.sys.join("bus/rbd")
    }

    /// Whether this host maps with krbd: `/sys/bus/rbd` exists, after
    /// `modprobe rbd` if needed. Asked once; the answer is logged.
    pub async fn available(&self) -> bool {
        let mut known = self.available.lock().await;
        if let Some(k) = *known {
            return k;
        }
        if !self.bus().exists() {
            let cmd = Cmd::new("modprobe").arg("rbd").timeout(MODPROBE_TIMEOUT);
            match self.runner.run(&cmd).await {
                Ok(out) if !out.success() => {
                    tracing::info!(error = %command_error(&cmd, &out), "no krbd")
                }
                Err(e) => tracing::info!(error = %e, "no krbd"),
                Ok(_) => {}
            }
        }
        let k = self.bus().exists();
        if k {
            tracing::info!("RBD disks are mapped by the kernel's rbd client (krbd)");
        } else {
            tracing::warn!(
                "--attach kernel: this host's kernel has no rbd module; RBD disks \
                 are opened by QEMU's own rbd driver"
            );
        }
        *known = Some(k);
        k
    }

    fn slot(&self, d: &KrbdDisk) -> Arc<tokio::sync::Mutex<BTreeSet<Holder>>> {
        self.images
            .lock()
            .unwrap()
            .entry(d.key())
            .or_default()
            .clone()
    }

    /// How many holders the image has.
    pub async fn holders(&self, d: &KrbdDisk) -> usize {
        self.slot(d).lock().await.len()
    }

    /// Maps `rbd` (unless its head is mapped already) and returns the block
    /// device. On failure with no other holder, a mapping this call made is
    /// unmapped.
    pub async fn attach(&self, holder: &Holder, rbd: &RbdDisk, fsid: &str) -> Result<PathBuf> {
        let d = KrbdDisk {
            pool: rbd.pool.clone(),
            image: rbd.image.clone(),
            fsid: fsid.to_owned(),
            device: None,
        };
        let slot = self.slot(&d);
        let mut holders = slot.lock().await;
        if self.mapping(&d).is_none() {
            self.map(rbd)
                .await
                .map_err(|e| e.context(format!("mapping {d}")))?;
            tracing::info!(%holder, disk = %d, "RBD image mapped (krbd)");
            self.crash.hit("krbd.mapped");
        }
        match self.wait_for_device(&d).await {
            Ok(dev) => {
                self.crash.hit("krbd.device_found");
                holders.insert(holder.clone());
                Ok(dev)
            }
            Err(e) => {
                if holders.is_empty() {
                    if let Err(u) = self.unmap(&d).await {
                        tracing::warn!(disk = %d, error = %u, "could not unmap after a failed attach");
                    }
                }
                Err(e)
            }
        }
    }

    async fn map(&self, rbd: &RbdDisk) -> Result<()> {
        let mons: Vec<String> = rbd
            .monitors
            .iter()
            .map(|m| match m.host.contains(':') {
                true => format!("[{}]:{}", m.host, m.port),
                false => format!("{}:{}", m.host, m.port),
            })
            .collect();
        let key_name = format!("stratus.client.{}", rbd.user);
        let request = format!(
            "{} name={},key={key_name} {} {}",
            mons.join(","),
            rbd.user,
            rbd.pool,
            rbd.image
        );
        let file = self.control("add")?;
        let kernel = self.kernel.clone();
        let key = rbd.key.clone();
        let write = tokio::task::spawn_blocking(move || {
            kernel.write(&file, &request, Some((&key_name, &key)))
        });
        match tokio::time::timeout(MAP_TIMEOUT, write).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(Error::unavailable(format!(
                "the kernel refused to map it: {e} (its log says why: dmesg | grep -e rbd -e libceph)"
            ))),
            Ok(Err(e)) => Err(Error::internal(format!("the map task failed: {e}"))),
            Err(_) => Err(Error::unavailable(format!(
                "the kernel did not map it within {MAP_TIMEOUT:?}"
            ))),
        }
    }

    /// `/sys/bus/rbd/{add,remove}_single_major`, or the old `add`/`remove`.
    fn control(&self, op: &str) -> Result<PathBuf> {
        let single = self.bus().join(format!("{op}_single_major"));
        if single.exists() {
            return Ok(single);
        }
        let plain = self.bus().join(op);
        if plain.exists() {
            return Ok(plain);
        }
        Err(Error::precondition(
            "this host has no krbd (/sys/bus/rbd: modprobe rbd)",
        ))
    }

    /// Drops `holder`; the last one out unmaps the image. Unmapping what is
    /// not mapped is fine (a repeated undo).
    pub async fn detach(&self, holder: &Holder, d: &KrbdDisk) -> Result<()> {
        let slot = self.slot(d);
        let mut holders = slot.lock().await;
        holders.remove(holder);
        if !holders.is_empty() {
            return Ok(());
        }
        if self.mapping(d).is_none() {
            return Ok(());
        }
        self.unmap(d).await?;
        tracing::info!(%holder, disk = %d, "RBD image unmapped (krbd)");
        Ok(())
    }

    /// A recorded attachment holds its image (at start, before any undo).
    pub async fn adopt(&self, holder: Holder, d: &KrbdDisk) {
        self.slot(d).lock().await.insert(holder);
    }

    /// Unmaps the mappings of pdisk images (`pd-*`) that no holder names:
    /// left by a crash or a failed unmap. Only at start, after every record
    /// was adopted. Ok lines say what was removed, Err lines what could not
    /// be.
    pub async fn reap(&self) -> Vec<std::result::Result<String, String>> {
        let mut report = Vec::new();
        for m in self.mappings() {
            if !m.image.starts_with(PDISK_PREFIX) || m.snap != "-" {
                continue;
            }
            let held = self
                .images
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| {
                    let (fsid, rest) = k.split_once('/').unwrap_or_default();
                    rest == format!("{}/{}", m.pool, m.image) && (fsid.is_empty() || fsid == m.fsid)
                })
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>();
            let mut in_use = false;
            for h in held {
                in_use |= !h.lock().await.is_empty();
            }
            if in_use {
                continue;
            }
            let what = format!("krbd mapping rbd{} of rbd:{}/{}", m.id, m.pool, m.image);
            report.push(match self.unmap_id(m.id).await {
                Ok(()) => Ok(format!("unmapped {what} (no guest holds it)")),
                Err(e) => Err(format!("could not unmap {what}: {e}")),
            });
        }
        report
    }

    async fn unmap(&self, d: &KrbdDisk) -> Result<()> {
        match self.mapping(d) {
            Some(m) => self.unmap_id(m.id).await,
            None => Ok(()),
        }
    }

    /// Writes the remove request. EBUSY is retried for a few seconds: udev
    /// probes (blkid) a device after it appears and after its last close,
    /// which `rbd unmap` knows too (ceph's krbd.cc `do_unmap` retries).
    async fn unmap_id(&self, id: u32) -> Result<()> {
        let file = self.control("remove")?;
        let mut pause = Duration::from_millis(250);
        let mut tries = 0;
        loop {
            let kernel = self.kernel.clone();
            let f = file.clone();
            let write =
                tokio::task::spawn_blocking(move || kernel.write(&f, &id.to_string(), None));
            let e = match tokio::time::timeout(MAP_TIMEOUT, write).await {
                Ok(Ok(Ok(()))) => return Ok(()),
                Ok(Ok(Err(e))) => e,
                Ok(Err(e)) => return Err(Error::internal(format!("the unmap task failed: {e}"))),
                Err(_) => {
                    return Err(Error::unavailable(format!(
                        "the kernel did not unmap rbd{id} within {MAP_TIMEOUT:?}"
                    )))
                }
            };
            if e.raw_os_error() != Some(libc::EBUSY) || tries == UNMAP_BUSY_TRIES {
                return Err(Error::unavailable(format!(
                    "the kernel refused to unmap rbd{id}: {e}"
                )));
            }
            tries += 1;
            tracing::debug!(id, tries, "rbd{id} is busy; unmap retried");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn wait_for_device(&self, d: &KrbdDisk) -> Result<PathBuf> {
        let deadline = tokio::time::Instant::now() + self.opts.device_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            if let Some(m) = self.mapping(d) {
                let dev = self.opts.dev.join(format!("rbd{}", m.id));
                if dev.exists() {
                    return Ok(dev);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::unavailable(format!(
                    "{d}: no block device within {:?} after mapping",
                    self.opts.device_timeout
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The mapping of `d`'s head, if any.
    fn mapping(&self, d: &KrbdDisk) -> Option<Mapping> {
        self.mappings().into_iter().find(|m| m.is(d))
    }

    fn mappings(&self) -> Vec<Mapping> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.bus().join("devices")) else {
            return out;
        };
        for e in entries.flatten() {
            let Ok(id) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let p = e.path();
            let read = |f: &str| {
                std::fs::read_to_string(p.join(f))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default()
            };
            out.push(Mapping {
                id,
                pool: read("pool"),
                image: read("name"),
                snap: read("current_snap"),
                fsid: read("cluster_fsid"),
            });
        }
        out.sort_by_key(|m| m.id);
        out
    }
}

#[cfg(test)]
#[path = "krbd_tests.rs"]
pub(crate) mod tests;
