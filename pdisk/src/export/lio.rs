//! The LIO exporter: publishes volumes through the Linux kernel's iSCSI target
//! (LIO), configured by writing configfs directly: no targetcli, no rtslib,
//! no shell. Only `modprobe` is ever run, through the [`CommandRunner`].
//!
//! What it owns, under `<configfs>/target/` (`/sys/kernel/config/target/`):
//!
//! ```text
//! core/iblock_0/<target IQN>/          backstore of a block device (an LV)
//!     control        udev_path=<dev>
//! core/fileio_0/<target IQN>/          backstore of a regular file
//!     control        fd_dev_name=<path>,fd_dev_size=<bytes>
//!                    [fd_buffered_io=1, with attrib/emulate_write_cache = 1]
//!   (both) udev_path = <backing path>, enable = 1,
//!          wwn/vpd_unit_serial = <volume UUID>,
//!          attrib/emulate_tpu = 1, attrib/emulate_tpws = 1 (UNMAP, WRITE SAME/UNMAP)
//! iscsi/<target IQN>/tpgt_1/
//!     attrib/generate_node_acls=0 cache_dynamic_acls=0 demo_mode_write_protect=1
//!            prod_mode_write_protect=0 demo_mode_discovery=0 authentication=0|1
//!     lun/lun_1/backstore -> core/<hba>/<target IQN>
//!     np/<IP:PORT>/                    the configured portal
//!     acls/<initiator IQN>/
//!         attrib/authentication = 0|1  (kernels that have it, 6.0+)
//!         auth/userid, auth/password   (CHAP, only when the spec has it)
//!         lun_1/lun -> tpgt_1/lun/lun_1, lun_1/write_protect = 0
//!     enable = 1                       (last: logins start here)
//! ```
//!
//! Backstores are named after their target's IQN, so everything of ours
//! carries the IQN prefix; a target or backstore without it is never touched.
//! The HBA directories (`iblock_0`, `fileio_0`) may be shared with other tools
//! and are left in place.
//!
//! Facts about LIO this relies on (Linux 6.1, `drivers/target/`; the layout,
//! CHAP, UNMAP on fileio and iblock, both resizes and a watchdog repair were
//! tried in the lab VM's Debian 6.1 cloud kernel with open-iscsi logging in):
//! - configfs creates every attribute file and default group (`attrib`,
//!   `auth`, `param`, `wwn`, `statistics`...) of a new directory itself, and
//!   only allows `rmdir` of a directory made by `mkdir` once everything made
//!   inside it by a user (directories, symlinks) is gone. So teardown goes
//!   leaf first: disable the TPG, unlink and rmdir mapped LUNs, rmdir ACLs,
//!   unlink and rmdir LUNs, rmdir portals, the TPG, the target, then the
//!   backstore.
//! - A backstore must be enabled (configured) before a LUN can link to it;
//!   `wwn/vpd_unit_serial` can only change while no LUN links to it; writing
//!   `enable` twice fails (`EEXIST`), and so does re-enabling an enabled TPG
//!   on older kernels: both are read before they are written.
//! - CHAP values are stored verbatim (`__DEF_NACL_AUTH_STR`): a trailing
//!   newline would become part of the secret, so nothing we write carries one,
//!   and a value starting with `NULL` means "unset" (how a value is cleared).
//! - A new TPG has `authentication=1`; with it, `iscsit_ta_authentication`
//!   removes `None` from the offered AuthMethod. Since 6.0 each ACL also has
//!   `attrib/authentication` (-1 inherits the TPG's); we set it explicitly.
//! - iblock reads the device size at every READ CAPACITY
//!   (`iblock_get_blocks`: `bdev_nr_bytes`); fileio on a regular file reports
//!   `fd_dev_size` as configured (`fd_get_blocks`). See
//!   [`LioExporter::refresh_size`].
//! - `mkdir target/iscsi` makes the kernel load iscsi_target_mod itself
//!   (`target_core_register_fabric`), and the first HBA loads the backstore
//!   modules (`transport_subsystem_check_init`); `modprobe` is the fallback.
//!
//! Secrets are written to configfs files only: never to argv, logs or error
//! messages. LIO forgets everything on reboot; pdiskd re-applies its stored
//! exports with [`Exporter::restore`].

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{ExportSpec, Exporter, LiveExport, VOLUME_LUN};
use crate::error::{Error, ErrorKind, Result};
use crate::runner::{run_checked, BoxFuture, Cmd, CommandRunner};
use crate::types::{Chap, Iqn};

/// The one TPG of every target of ours.
const TPGT: &str = "tpgt_1";
/// HBA directories our backstores are made in.
const IBLOCK_HBA: &str = "iblock_0";
const FILEIO_HBA: &str = "fileio_0";
/// Name of the symlink from a LUN to its backstore (any name works).
const LUN_LINK: &str = "backstore";
/// Name of the symlink from a mapped LUN to the TPG's LUN (any name works).
const MAPPED_LUN_LINK: &str = "lun";
/// LIO's limit on `udev_path` (SE_UDEV_PATH_LEN, with the NUL).
const UDEV_PATH_MAX: usize = 511;
/// Timeout of a modprobe call.
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// TPG attributes every target of ours has (authentication is set with CHAP).
const TPG_ATTRIBS: [(&str, &str); 5] = [
    // Only initiators with an ACL may log in...
    ("generate_node_acls", "0"),
    ("cache_dynamic_acls", "0"),
    // ...and should demo mode ever be switched on, it is read-only.
    ("demo_mode_write_protect", "1"),
    // ACL'd initiators get read-write LUNs.
    ("prod_mode_write_protect", "0"),
    // SendTargets discovery only shows targets the initiator has an ACL on.
    ("demo_mode_discovery", "0"),
];

/// Settings of a [`LioExporter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LioConfig {
    /// Where configfs is mounted.
    pub configfs_root: PathBuf,
    /// `IP:PORT` the targets listen on and initiators connect to.
    pub portal: String,
    /// IQN prefix of the targets (and backstores) this exporter owns.
    pub iqn_prefix: String,
    /// fileio backstores use the page cache and advertise a write cache
    /// (`fd_buffered_io=1`): guest flushes (SYNCHRONIZE CACHE, FUA) are
    /// honoured with fsync, as with tgt's `rdwr`. Off: every write is O_DSYNC.
    pub fileio_write_back: bool,
    /// The modprobe program.
    pub modprobe: String,
}

impl Default for LioConfig {
    fn default() -> Self {
        LioConfig {
            configfs_root: PathBuf::from("/sys/kernel/config"),
            portal: "127.0.0.1:3260".into(),
            iqn_prefix: "iqn.2026-11.io.stratus.pdisk".into(),
            fileio_write_back: true,
            modprobe: "modprobe".into(),
        }
    }
}

/// An [`Exporter`] writing the kernel's LIO configuration in configfs.
pub struct LioExporter {
    lio: Arc<Lio>,
    runner: Arc<dyn CommandRunner>,
    /// Serializes every change of LIO's state made by this exporter.
    lock: Mutex<()>,
    /// modprobe is tried at most once per module and process.
    tried_core: AtomicBool,
    tried_iscsi: AtomicBool,
}

impl LioExporter {
    pub fn new(runner: Arc<dyn CommandRunner>, cfg: LioConfig) -> Self {
        Self::with_host(
            runner,
            cfg,
            Arc::new(KernelConfigFs),
            Arc::new(stat_backing),
        )
    }

    fn with_host(
        runner: Arc<dyn CommandRunner>,
        mut cfg: LioConfig,
        fs: Arc<dyn ConfigFs>,
        stat: Arc<StatFn>,
    ) -> Self {
        // Target IQNs are lower case (see `Iqn`); so is the prefix we compare.
        cfg.iqn_prefix = cfg.iqn_prefix.to_ascii_lowercase();
        // LIO names portals `A.B.C.D:P` and `[v6]:P`, as SocketAddr prints them.
        let np = cfg
            .portal
            .parse::<SocketAddr>()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| cfg.portal.clone());
        LioExporter {
            lio: Arc::new(Lio { cfg, np, fs, stat }),
            runner,
            lock: Mutex::new(()),
            tried_core: AtomicBool::new(false),
            tried_iscsi: AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> &LioConfig {
        &self.lio.cfg
    }

    fn check_owned(&self, iqn: &Iqn) -> Result<()> {
        if owns(&self.lio.cfg.iqn_prefix, iqn.as_str()) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "target {iqn} lacks the prefix {} of targets this LIO exporter owns",
                self.lio.cfg.iqn_prefix
            )))
        }
    }

    /// Runs `f` on the blocking pool (configfs writes can wait on the kernel:
    /// opening a device, dropping sessions), with the caller's tracing
    /// subscriber.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Lio) -> Result<T> + Send + 'static,
    {
        let lio = self.lio.clone();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        tokio::task::spawn_blocking(move || {
            tracing::dispatcher::with_default(&dispatch, || f(&lio))
        })
        .await
        .map_err(|e| Error::internal(format!("LIO configfs task failed: {e}")))?
    }

    /// Makes sure configfs is mounted and LIO's core and iSCSI modules are
    /// loaded, trying `modprobe` once per module if they are not.
    async fn ensure_lio(&self) -> Result<()> {
        for _ in 0..3 {
            let (module, tried, cause) = match self.blocking(|lio| Ok(lio.probe())).await? {
                Probe::Ready => return Ok(()),
                Probe::NotMounted(why) => return Err(Error::unavailable(why)),
                Probe::NoCore(why) => ("target_core_mod", &self.tried_core, why),
                Probe::NoIscsi(why) => ("iscsi_target_mod", &self.tried_iscsi, why),
            };
            if tried.swap(true, Ordering::SeqCst) {
                return Err(Error::unavailable(format!(
                    "{cause} (modprobe {module} was tried already)"
                )));
            }
            tracing::info!(module, "lio: loading kernel module");
            let cmd = Cmd::new(self.lio.cfg.modprobe.clone())
                .arg(module)
                .timeout(MODPROBE_TIMEOUT);
            if let Err(e) = run_checked(self.runner.as_ref(), &cmd).await {
                return Err(Error::unavailable(format!(
                    "{cause}; modprobe {module}: {e}"
                )));
            }
        }
        Err(Error::unavailable(
            "LIO is still not ready after loading its modules",
        ))
    }
}

impl Exporter for LioExporter {
    fn kind(&self) -> &'static str {
        "lio"
    }

    fn portal(&self) -> String {
        self.lio.cfg.portal.clone()
    }

    fn iqn_prefix(&self) -> &str {
        &self.lio.cfg.iqn_prefix
    }

    fn export<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(&spec.target_iqn)?;
            let ctx = || format!("exporting {}", spec.target_iqn);
            check_chap(spec.chap.as_ref()).map_err(|e| e.context(ctx()))?;
            self.ensure_lio().await.map_err(|e| e.context(ctx()))?;
            let _guard = self.lock.lock().await;
            let owned = spec.clone();
            self.blocking(move |lio| lio.export(&owned))
                .await
                .map_err(|e| e.context(ctx()))
        })
    }

    fn unexport<'a>(&'a self, target_iqn: &'a Iqn) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(target_iqn)?;
            let ctx = || format!("unexporting {target_iqn}");
            let _guard = self.lock.lock().await;
            let iqn = target_iqn.to_string();
            self.blocking(move |lio| lio.unexport(&iqn))
                .await
                .map_err(|e| e.context(ctx()))
        })
    }

    /// An iblock LUN needs nothing: LIO asks the block device for its size at
    /// every READ CAPACITY, so a grown LV shows at once. A fileio LUN on a
    /// regular file reports the `fd_dev_size` it was configured with; it is
    /// set to the file's new size by writing `fd_dev_size=N` to the
    /// backstore's `control` (LIO 6.1 accepts it on a live backstore and
    /// `fd_get_blocks` reads it at every READ CAPACITY; a logged-in
    /// open-iscsi initiator saw the new size after a rescan). Should the kernel
    /// refuse, the backstore is re-created with the new size and the same
    /// serial: LUN 1 disappears for a moment (initiators get a "reported
    /// LUNs data has changed" unit attention and retry). Logged-in
    /// initiators see the new size when they read the capacity again
    /// (QEMU: `block_resize`; Linux: a SCSI rescan).
    fn refresh_size<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(&spec.target_iqn)?;
            let ctx = || format!("refreshing the size of {}", spec.target_iqn);
            check_chap(spec.chap.as_ref()).map_err(|e| e.context(ctx()))?;
            self.ensure_lio().await.map_err(|e| e.context(ctx()))?;
            let _guard = self.lock.lock().await;
            let owned = spec.clone();
            self.blocking(move |lio| {
                let target = lio.target_dir(owned.target_iqn.as_str());
                if !lio.exists(&target) {
                    return Err(Error::not_found(format!(
                        "target {} is not exported by LIO",
                        owned.target_iqn
                    )));
                }
                lio.export(&owned)
            })
            .await
            .map_err(|e| e.context(ctx()))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveExport>>> {
        Box::pin(async move {
            self.ensure_lio().await?;
            self.blocking(|lio| lio.list()).await
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.ensure_lio().await })
    }
}

/// True when `iqn` is the prefix or continues it after `:` or `.`.
fn owns(prefix: &str, iqn: &str) -> bool {
    match iqn.strip_prefix(prefix) {
        Some(rest) => {
            rest.is_empty() || prefix.ends_with([':', '.']) || rest.starts_with([':', '.'])
        }
        None => false,
    }
}

/// LIO treats a CHAP value starting with `NULL` as unset.
fn check_chap(chap: Option<&Chap>) -> Result<()> {
    let Some(chap) = chap else { return Ok(()) };
    if chap.user.starts_with("NULL") {
        return Err(Error::invalid(format!(
            "CHAP user {} can't be given to LIO: a value starting with NULL means unset",
            chap.user
        )));
    }
    if chap.secret().starts_with("NULL") {
        return Err(Error::invalid(
            "the CHAP secret can't be given to LIO: a value starting with NULL means unset",
        ));
    }
    Ok(())
}

/// The unit serial (VPD page 0x80) of a target's LUN: the part of the IQN
/// after its last `:` (the volume UUID for pdisk's targets), so it is the
/// same every time the volume is exported. LIO derives the LUN's NAA
/// identifier (VPD page 0x83) from it.
fn unit_serial(iqn: &str) -> &str {
    match iqn.rsplit_once(':') {
        Some((_, s)) if !s.is_empty() => s,
        _ => iqn,
    }
}

// ---- the host: configfs and the backing files -----------------------------------

/// What a directory entry in configfs is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Dir,
    Link,
    File,
}

/// The filesystem operations the exporter performs on configfs. The kernel
/// one is a thin layer over `std::fs`; unit tests use a fake that behaves
/// like configfs where it matters.
trait ConfigFs: Send + Sync {
    fn exists(&self, path: &Path) -> bool;
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `value` to an existing attribute in one write(2).
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    fn unlink(&self, link: &Path) -> io::Result<()>;
    fn read_link(&self, link: &Path) -> io::Result<PathBuf>;
    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>>;
    /// True when configfs is mounted at `root`.
    fn mounted(&self, root: &Path) -> bool;
}

struct KernelConfigFs;

impl ConfigFs for KernelConfigFs {
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        use std::io::Write;
        // No O_CREAT: a misspelt attribute is an error, not a new file.
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }
    fn unlink(&self, link: &Path) -> io::Result<()> {
        std::fs::remove_file(link)
    }
    fn read_link(&self, link: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(link)
    }
    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let t = e.file_type()?;
            let kind = if t.is_symlink() {
                EntryKind::Link
            } else if t.is_dir() {
                EntryKind::Dir
            } else {
                EntryKind::File
            };
            out.push((e.file_name().to_string_lossy().into_owned(), kind));
        }
        Ok(out)
    }
    fn mounted(&self, root: &Path) -> bool {
        // /proc/self/mounts: "configfs /sys/kernel/config configfs rw,... 0 0".
        // When it can't be read, assume it is mounted and let the operations
        // on it report what is wrong.
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
            return true;
        };
        let root = root.to_string_lossy();
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[2] == "configfs" && f[1] == root
        })
    }
}

/// A volume's backing as LIO needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackingKind {
    /// A block device: an iblock backstore.
    Block,
    /// A regular file of this many bytes: a fileio backstore.
    File(u64),
}

type StatFn = dyn Fn(&Path) -> io::Result<BackingKind> + Send + Sync;

fn stat_backing(path: &Path) -> io::Result<BackingKind> {
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::metadata(path)?;
    if m.file_type().is_block_device() {
        Ok(BackingKind::Block)
    } else if m.is_file() {
        Ok(BackingKind::File(m.len()))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ))
    }
}

// ---- the configuration logic (blocking) ------------------------------------------

enum Probe {
    Ready,
    NotMounted(String),
    NoCore(String),
    NoIscsi(String),
}

/// The backing of a spec, checked.
struct Backing {
    path: String,
    kind: BackingKind,
}

/// How an existing backstore compares with what a spec wants.
enum Fit {
    Fits,
    /// A fileio backstore whose configured size differs from the file's.
    SizeDiffers(u64),
    Differs(String),
}

struct Lio {
    cfg: LioConfig,
    /// Directory name of the portal under `np/`.
    np: String,
    fs: Arc<dyn ConfigFs>,
    stat: Arc<StatFn>,
}

/// The configfs error for `op` on `path`. The value written is never part
/// of it (it may be a secret); LIO's own reason is in the kernel log.
fn cfs_error(op: &str, path: &Path, e: &io::Error) -> Error {
    let kind = match e.raw_os_error() {
        Some(libc::EBUSY) => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Internal,
    };
    Error::new(
        kind,
        format!(
            "configfs: {op} {}: {e} (the kernel log has LIO's reason)",
            path.display()
        ),
    )
}

fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
        || (errno == libc::ENOENT && e.kind() == io::ErrorKind::NotFound)
}

/// The last two normal components of a symlink's target: `(hba, name)` for
/// a backstore, `("lun", "lun_1")` for a TPG's LUN. configfs returns link
/// targets as relative paths.
fn link_tail(target: &Path) -> Option<(String, String)> {
    let mut it = target.components().rev().filter_map(|c| match c {
        Component::Normal(s) => s.to_str(),
        _ => None,
    });
    let last = it.next()?;
    let prev = it.next()?;
    Some((prev.to_owned(), last.to_owned()))
}

fn dir_tail(dir: &Path) -> Option<(String, String)> {
    link_tail(dir)
}

/// `iblock_N` or `fileio_N`: an HBA our backstores can live in.
fn backstore_hba(name: &str) -> Option<&str> {
    let (plugin, idx) = name.rsplit_once('_')?;
    let ok = matches!(plugin, "iblock" | "fileio")
        && !idx.is_empty()
        && idx.bytes().all(|c| c.is_ascii_digit());
    ok.then_some(plugin)
}

/// A value from LIO's `info` text, e.g. `Size` in `File: /x  Size: 1048576`;
/// the key is a whole word (`Size` is not the one in `SectorSize: 512`).
fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}: ");
    let mut from = 0;
    while let Some(i) = info[from..].find(&pat) {
        let at = from + i;
        if at == 0 || info[..at].ends_with(char::is_whitespace) {
            return info[at + pat.len()..].split_whitespace().next();
        }
        from = at + pat.len();
    }
    None
}

/// An auth attribute as shown: the stored bytes and one `\n`.
fn shown(s: &str) -> &str {
    s.strip_suffix('\n').unwrap_or(s)
}

/// A CHAP attribute's value, None when unset ("", or "NULL...").
fn chap_value(s: &str) -> Option<&str> {
    let v = shown(s);
    (!v.is_empty() && !v.starts_with("NULL")).then_some(v)
}

impl Lio {
    // ---- paths ----

    fn target_root(&self) -> PathBuf {
        self.cfg.configfs_root.join("target")
    }
    fn core_dir(&self) -> PathBuf {
        self.target_root().join("core")
    }
    fn iscsi_dir(&self) -> PathBuf {
        self.target_root().join("iscsi")
    }
    fn target_dir(&self, iqn: &str) -> PathBuf {
        self.iscsi_dir().join(iqn)
    }
    fn tpg_dir(&self, iqn: &str) -> PathBuf {
        self.target_dir(iqn).join(TPGT)
    }
    fn lun_name() -> String {
        format!("lun_{VOLUME_LUN}")
    }

    // ---- configfs primitives with our error messages ----

    fn exists(&self, p: &Path) -> bool {
        self.fs.exists(p)
    }

    fn mkdir(&self, p: &Path) -> Result<()> {
        self.fs.mkdir(p).map_err(|e| cfs_error("mkdir", p, &e))
    }

    /// Makes `p` unless it exists (made meanwhile by someone else is fine).
    fn ensure_dir(&self, p: &Path) -> Result<bool> {
        if self.exists(p) {
            return Ok(false);
        }
        match self.fs.mkdir(p) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(false),
            Err(e) => Err(cfs_error("mkdir", p, &e)),
        }
    }

    /// Removes a group; gone already is fine.
    fn rmdir(&self, p: &Path) -> Result<()> {
        match self.fs.rmdir(p) {
            Err(e) if !is_errno(&e, libc::ENOENT) => Err(cfs_error("rmdir", p, &e)),
            _ => Ok(()),
        }
    }

    fn unlink(&self, p: &Path) -> Result<()> {
        match self.fs.unlink(p) {
            Err(e) if !is_errno(&e, libc::ENOENT) => Err(cfs_error("unlink", p, &e)),
            _ => Ok(()),
        }
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        self.fs
            .symlink(target, link)
            .map_err(|e| cfs_error("symlink", link, &e))
    }

    fn read(&self, p: &Path) -> Result<String> {
        self.fs.read(p).map_err(|e| cfs_error("reading", p, &e))
    }

    /// The attribute's text, None when it can't be read.
    fn read_opt(&self, p: &Path) -> Option<String> {
        self.fs.read(p).ok()
    }

    fn write(&self, p: &Path, value: &str) -> Result<()> {
        tracing::debug!(path = %p.display(), value, "lio: configfs write");
        self.fs
            .write(p, value)
            .map_err(|e| cfs_error("writing", p, &e))
    }

    /// Writes a secret: logged without its value.
    fn write_secret(&self, p: &Path, value: &str) -> Result<()> {
        tracing::debug!(path = %p.display(), value = "<redacted>", "lio: configfs write");
        self.fs
            .write(p, value)
            .map_err(|e| cfs_error("writing", p, &e))
    }

    /// Writes a numeric/flag attribute unless it already shows `value`.
    fn ensure_attr(&self, p: &Path, value: &str) -> Result<()> {
        match self.read_opt(p) {
            Some(cur) if cur.trim() == value => Ok(()),
            _ => self.write(p, value),
        }
    }

    /// Like `ensure_attr`, for attributes only some kernels have.
    fn ensure_attr_if_present(&self, p: &Path, value: &str) -> Result<()> {
        if self.exists(p) {
            self.ensure_attr(p, value)
        } else {
            Ok(())
        }
    }

    /// Sets a CHAP attribute to exactly `value` (no newline: LIO keeps it).
    fn ensure_chap_value(&self, p: &Path, value: &str, secret: bool) -> Result<()> {
        if self.read_opt(p).as_deref().map(shown) == Some(value) {
            return Ok(());
        }
        if secret {
            self.write_secret(p, value)
        } else {
            self.write(p, value)
        }
    }

    /// Clears a CHAP attribute that is set.
    fn clear_chap_value(&self, p: &Path) -> Result<()> {
        match self.read_opt(p) {
            Some(cur) if chap_value(&cur).is_none() => Ok(()),
            None if !self.exists(p) => Ok(()),
            _ => self.write(p, "NULL"),
        }
    }

    /// Names of the subdirectories of `dir` (none when it is missing).
    fn subdirs(&self, dir: &Path) -> Result<Vec<String>> {
        self.entries_of(dir, EntryKind::Dir)
    }

    fn links(&self, dir: &Path) -> Result<Vec<String>> {
        self.entries_of(dir, EntryKind::Link)
    }

    fn entries_of(&self, dir: &Path, kind: EntryKind) -> Result<Vec<String>> {
        match self.fs.entries(dir) {
            Ok(v) => {
                let mut names: Vec<String> = v
                    .into_iter()
                    .filter(|(_, k)| *k == kind)
                    .map(|(n, _)| n)
                    .collect();
                names.sort();
                Ok(names)
            }
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(cfs_error("listing", dir, &e)),
        }
    }

    /// Where the symlinks in `dir` point, as `link_tail`s.
    fn link_tails(&self, dir: &Path) -> Result<Vec<Option<(String, String)>>> {
        Ok(self
            .links(dir)?
            .iter()
            .map(|l| {
                self.fs
                    .read_link(&dir.join(l))
                    .ok()
                    .and_then(|t| link_tail(&t))
            })
            .collect())
    }

    // ---- module state ----

    fn probe(&self) -> Probe {
        let root = &self.cfg.configfs_root;
        let target = self.target_root();
        if !self.exists(&target) {
            if !self.exists(root) || !self.fs.mounted(root) {
                return Probe::NotMounted(format!(
                    "configfs is not mounted at {0} (mount -t configfs configfs {0}), \
                     so LIO can't be configured",
                    root.display()
                ));
            }
            return Probe::NoCore(format!(
                "LIO is not loaded: {} is missing (kernel module target_core_mod)",
                target.display()
            ));
        }
        let iscsi = self.iscsi_dir();
        if self.exists(&iscsi) {
            return Probe::Ready;
        }
        // The kernel loads iscsi_target_mod itself for this mkdir.
        match self.fs.mkdir(&iscsi) {
            Ok(()) => Probe::Ready,
            Err(e) if is_errno(&e, libc::EEXIST) => Probe::Ready,
            Err(e) => Probe::NoIscsi(format!(
                "LIO's iSCSI target is not loaded: mkdir {}: {e} (kernel module iscsi_target_mod)",
                iscsi.display()
            )),
        }
    }

    // ---- backing ----

    fn backing(&self, spec: &ExportSpec) -> Result<Backing> {
        let p = &spec.backing_path;
        let path = match p.to_str() {
            Some(s)
                if s.starts_with('/')
                    && s.len() <= UDEV_PATH_MAX
                    && !s.contains(|c: char| c == ',' || c.is_whitespace() || c.is_control()) =>
            {
                s.to_owned()
            }
            _ => {
                return Err(Error::invalid(format!(
                    "backing path {} can't be given to LIO: it must be absolute UTF-8 of at most \
                     {UDEV_PATH_MAX} bytes, without ',' or white space",
                    p.display()
                )))
            }
        };
        let kind = (self.stat)(p).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::InvalidArgument
            };
            Error::new(kind, format!("backing path {}: {e}", p.display()))
        })?;
        if let BackingKind::File(size) = kind {
            // fileio reports fd_dev_size minus one block as the last LBA.
            if size < 4096 {
                return Err(Error::invalid(format!(
                    "backing file {} has {size} bytes: LIO needs at least 4096",
                    p.display()
                )));
            }
        }
        Ok(Backing { path, kind })
    }

    /// Every backstore named `name` (normally one).
    fn find_backstores(&self, name: &str) -> Result<Vec<PathBuf>> {
        let core = self.core_dir();
        let mut out = Vec::new();
        for hba in self.subdirs(&core)? {
            if backstore_hba(&hba).is_some() {
                let dir = core.join(&hba).join(name);
                if self.exists(&dir) {
                    out.push(dir);
                }
            }
        }
        Ok(out)
    }

    /// The backing path a backstore was configured with: its `udev_path`,
    /// else what its `info` says.
    fn backstore_path(&self, dir: &Path) -> Option<String> {
        if let Some(p) = self.read_opt(&dir.join("udev_path")) {
            let p = p.trim();
            if !p.is_empty() {
                return Some(p.to_owned());
            }
        }
        let info = self.read_opt(&dir.join("info"))?;
        info_field(&info, "File")
            .or_else(|| info_field(&info, "PATH"))
            .map(str::to_owned)
    }

    fn backstore_serial(&self, dir: &Path) -> Option<String> {
        let s = self.read_opt(&dir.join("wwn/vpd_unit_serial"))?;
        // "T10 VPD Unit Serial Number: <serial>"
        Some(s.split_once(':')?.1.trim().to_owned())
    }

    fn fit(&self, dir: &Path, want: &Backing, serial: &str) -> Fit {
        let plugin = dir
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .and_then(backstore_hba);
        let want_plugin = match want.kind {
            BackingKind::Block => "iblock",
            BackingKind::File(_) => "fileio",
        };
        if plugin != Some(want_plugin) {
            return Fit::Differs(format!("it is not {want_plugin}"));
        }
        if self.read_opt(&dir.join("enable")).as_deref().map(str::trim) != Some("1") {
            return Fit::Differs("it is not enabled".into());
        }
        if self.backstore_path(dir).as_deref() != Some(want.path.as_str()) {
            return Fit::Differs("its backing path differs".into());
        }
        if self.backstore_serial(dir).as_deref() != Some(serial) {
            return Fit::Differs("its unit serial differs".into());
        }
        if let BackingKind::File(size) = want.kind {
            let info = self.read_opt(&dir.join("info")).unwrap_or_default();
            let mode = if self.cfg.fileio_write_back {
                "Buffered-WCE"
            } else {
                "O_DSYNC"
            };
            if info_field(&info, "Mode") != Some(mode) {
                return Fit::Differs("its write cache mode differs".into());
            }
            if info_field(&info, "Size") != Some(size.to_string().as_str()) {
                return Fit::SizeDiffers(size);
            }
        }
        Fit::Fits
    }

    /// Sets a live fileio backstore's size; Err when LIO refused or ignored it.
    fn set_fileio_size(&self, dir: &Path, size: u64) -> Result<()> {
        self.write(&dir.join("control"), &format!("fd_dev_size={size}"))?;
        let info = self.read(&dir.join("info"))?;
        if info_field(&info, "Size") == Some(size.to_string().as_str()) {
            Ok(())
        } else {
            Err(Error::internal(format!(
                "LIO kept the old size of {} after fd_dev_size={size}",
                dir.display()
            )))
        }
    }

    fn create_backstore(&self, name: &str, want: &Backing, serial: &str) -> Result<PathBuf> {
        let hba = self.core_dir().join(match want.kind {
            BackingKind::Block => IBLOCK_HBA,
            BackingKind::File(_) => FILEIO_HBA,
        });
        self.ensure_dir(&hba)?;
        let dir = hba.join(name);
        self.mkdir(&dir)?;
        let configure = || -> Result<()> {
            let control = dir.join("control");
            match want.kind {
                BackingKind::Block => self.write(&control, &format!("udev_path={}", want.path))?,
                BackingKind::File(size) => {
                    self.write(
                        &control,
                        &format!("fd_dev_name={},fd_dev_size={size}", want.path),
                    )?;
                    if self.cfg.fileio_write_back {
                        // Advertise the cache so initiators flush (LIO also
                        // forces this for buffered fileio; rtslib sets both).
                        self.write(&dir.join("attrib/emulate_write_cache"), "1")?;
                        self.write(&control, "fd_buffered_io=1")?;
                    }
                }
            }
            self.write(&dir.join("udev_path"), &want.path)?;
            self.write(&dir.join("enable"), "1")?;
            // Before any LUN links it: LIO refuses a new serial once exported.
            self.write(&dir.join("wwn/vpd_unit_serial"), serial)
        };
        if let Err(e) = configure() {
            // Leave no half-configured backstore behind.
            let _ = self.fs.rmdir(&dir);
            return Err(e);
        }
        tracing::info!(backstore = %dir.display(), backing = %want.path, "lio: created backstore");
        Ok(dir)
    }

    /// Thin provisioning: UNMAP and WRITE SAME with UNMAP. LIO refuses them
    /// when the device can't discard; the volume is then exported without.
    fn ensure_thin(&self, dir: &Path) {
        for attr in ["emulate_tpu", "emulate_tpws"] {
            if let Err(e) = self.ensure_attr(&dir.join("attrib").join(attr), "1") {
                tracing::info!(backstore = %dir.display(), error = %e,
                    "lio: no thin provisioning (UNMAP) for this backstore");
                return;
            }
        }
    }

    /// Removes a backstore of ours, first detaching it from `tpg`'s LUNs.
    fn remove_backstore(&self, dir: &Path, tpg: &Path) -> Result<()> {
        let tail = dir_tail(dir);
        for lun in self.subdirs(&tpg.join("lun"))? {
            if self
                .link_tails(&tpg.join("lun").join(&lun))?
                .contains(&tail)
            {
                self.remove_lun(tpg, &lun)?;
            }
        }
        self.rmdir(dir)?;
        tracing::info!(backstore = %dir.display(), "lio: removed backstore");
        Ok(())
    }

    /// The backstore `spec` needs, corrected or made.
    fn converge_backstore(&self, name: &str, want: &Backing, tpg: &Path) -> Result<PathBuf> {
        let serial = unit_serial(name);
        let mut keep: Option<PathBuf> = None;
        for dir in self.find_backstores(name)? {
            if keep.is_none() {
                match self.fit(&dir, want, serial) {
                    Fit::Fits => {
                        keep = Some(dir);
                        continue;
                    }
                    Fit::SizeDiffers(size) => match self.set_fileio_size(&dir, size) {
                        Ok(()) => {
                            tracing::info!(backstore = %dir.display(), size,
                                    "lio: fileio backstore resized");
                            keep = Some(dir);
                            continue;
                        }
                        Err(e) => tracing::info!(backstore = %dir.display(), error = %e,
                                "lio: re-creating the backstore to resize it"),
                    },
                    Fit::Differs(why) => tracing::info!(backstore = %dir.display(), why = %why,
                        "lio: re-creating backstore"),
                }
            }
            self.remove_backstore(&dir, tpg)?;
        }
        let dir = match keep {
            Some(d) => d,
            None => self.create_backstore(name, want, serial)?,
        };
        self.ensure_thin(&dir);
        Ok(dir)
    }

    // ---- fabric side ----

    /// Removes a mapped LUN (an ACL's view of a TPG LUN).
    fn remove_mapped_lun(&self, dir: &Path) -> Result<()> {
        for l in self.links(dir)? {
            self.unlink(&dir.join(l))?;
        }
        self.rmdir(dir)
    }

    fn remove_acl(&self, acl: &Path) -> Result<()> {
        for m in self.subdirs(acl)? {
            if m.starts_with("lun_") {
                self.remove_mapped_lun(&acl.join(m))?;
            }
        }
        self.rmdir(acl)
    }

    /// Removes TPG LUN `lun` and every ACL's mapping of it.
    fn remove_lun(&self, tpg: &Path, lun: &str) -> Result<()> {
        let acls = tpg.join("acls");
        let tail = Some(("lun".to_owned(), lun.to_owned()));
        for a in self.subdirs(&acls)? {
            for m in self.subdirs(&acls.join(&a))? {
                let mdir = acls.join(&a).join(&m);
                if m.starts_with("lun_") && self.link_tails(&mdir)?.contains(&tail) {
                    self.remove_mapped_lun(&mdir)?;
                }
            }
        }
        let dir = tpg.join("lun").join(lun);
        for l in self.links(&dir)? {
            self.unlink(&dir.join(l))?;
        }
        self.rmdir(&dir)
    }

    /// Takes a TPG down, leaf first, as configfs requires.
    fn remove_tpg(&self, tpg: &Path) -> Result<()> {
        let enable = tpg.join("enable");
        if self.read_opt(&enable).as_deref().map(str::trim) == Some("1") {
            // Drops the sessions: no I/O reaches the LUNs after this.
            self.write(&enable, "0")?;
        }
        let acls = tpg.join("acls");
        for a in self.subdirs(&acls)? {
            self.remove_acl(&acls.join(a))?;
        }
        let luns = tpg.join("lun");
        for l in self.subdirs(&luns)? {
            let dir = luns.join(l);
            for link in self.links(&dir)? {
                self.unlink(&dir.join(link))?;
            }
            self.rmdir(&dir)?;
        }
        let nps = tpg.join("np");
        for n in self.subdirs(&nps)? {
            self.rmdir(&nps.join(n))?;
        }
        self.rmdir(tpg)
    }

    /// LUN 1 linked to `backstore`, and no other LUN.
    fn converge_lun(&self, tpg: &Path, backstore: &Path) -> Result<()> {
        let luns = tpg.join("lun");
        let want = Self::lun_name();
        for l in self.subdirs(&luns)? {
            if l != want {
                self.remove_lun(tpg, &l)?;
            }
        }
        let lun = luns.join(&want);
        if self.exists(&lun) {
            if self.link_tails(&lun)? == vec![dir_tail(backstore)] {
                return Ok(());
            }
            self.remove_lun(tpg, &want)?;
        }
        self.mkdir(&lun)?;
        self.symlink(backstore, &lun.join(LUN_LINK))
    }

    /// Exactly the configured portal.
    fn converge_portal(&self, tpg: &Path) -> Result<()> {
        let nps = tpg.join("np");
        for n in self.subdirs(&nps)? {
            if n != self.np {
                self.rmdir(&nps.join(n))?;
            }
        }
        self.ensure_dir(&nps.join(&self.np)).map(drop)
    }

    /// The ACL's mapped LUN 1 pointing at the TPG's LUN 1, read-write, and
    /// no other mapped LUN.
    fn converge_mapped_lun(&self, tpg: &Path, acl: &Path) -> Result<()> {
        let want = Self::lun_name();
        for m in self.subdirs(acl)? {
            if m.starts_with("lun_") && m != want {
                self.remove_mapped_lun(&acl.join(m))?;
            }
        }
        let mdir = acl.join(&want);
        let tail = Some(("lun".to_owned(), want.clone()));
        if self.exists(&mdir) {
            if self.link_tails(&mdir)? != vec![tail] {
                for l in self.links(&mdir)? {
                    self.unlink(&mdir.join(l))?;
                }
                self.symlink(&tpg.join("lun").join(&want), &mdir.join(MAPPED_LUN_LINK))?;
            }
        } else {
            self.mkdir(&mdir)?;
            self.symlink(&tpg.join("lun").join(&want), &mdir.join(MAPPED_LUN_LINK))?;
        }
        self.ensure_attr(&mdir.join("write_protect"), "0")
    }

    /// ACLs of exactly the spec's initiators, CHAP as the spec says. Never
    /// opens more than asked for on the way: unwanted ACLs go first, and with
    /// CHAP the TPG and each ACL require authentication before credentials
    /// and mapped LUNs are written, so a new ACL is never usable without CHAP.
    fn converge_acls(&self, tpg: &Path, spec: &ExportSpec) -> Result<()> {
        let acls = tpg.join("acls");
        let mut seen = BTreeSet::new();
        let wanted: Vec<&str> = spec
            .initiators
            .iter()
            .map(Iqn::as_str)
            .filter(|i| seen.insert(*i))
            .collect();
        for a in self.subdirs(&acls)? {
            if !wanted.contains(&a.as_str()) {
                self.remove_acl(&acls.join(&a))?;
                tracing::info!(target = %spec.target_iqn, initiator = %a, "lio: removed ACL");
            }
        }
        let tpg_auth = tpg.join("attrib/authentication");
        match &spec.chap {
            Some(chap) => {
                self.ensure_attr(&tpg_auth, "1")?;
                for i in &wanted {
                    let acl = acls.join(i);
                    if self.ensure_dir(&acl)? {
                        tracing::info!(target = %spec.target_iqn, initiator = %i, "lio: added ACL");
                    }
                    self.ensure_attr_if_present(&acl.join("attrib/authentication"), "1")?;
                    let auth = acl.join("auth");
                    self.ensure_chap_value(&auth.join("userid"), &chap.user, false)?;
                    self.ensure_chap_value(&auth.join("password"), chap.secret(), true)?;
                    self.clear_chap_value(&auth.join("userid_mutual"))?;
                    self.clear_chap_value(&auth.join("password_mutual"))?;
                }
            }
            None => {
                for i in &wanted {
                    let acl = acls.join(i);
                    if self.ensure_dir(&acl)? {
                        tracing::info!(target = %spec.target_iqn, initiator = %i, "lio: added ACL");
                    }
                    self.ensure_attr_if_present(&acl.join("attrib/authentication"), "0")?;
                }
                self.ensure_attr(&tpg_auth, "0")?;
                for i in &wanted {
                    let auth = acls.join(i).join("auth");
                    for a in ["userid", "password", "userid_mutual", "password_mutual"] {
                        self.clear_chap_value(&auth.join(a))?;
                    }
                }
            }
        }
        for i in &wanted {
            self.converge_mapped_lun(tpg, &acls.join(i))?;
        }
        Ok(())
    }

    // ---- the operations ----

    fn require_iscsi(&self) -> Result<()> {
        match self.probe() {
            Probe::Ready => Ok(()),
            Probe::NotMounted(w) | Probe::NoCore(w) | Probe::NoIscsi(w) => {
                Err(Error::unavailable(w))
            }
        }
    }

    fn export(&self, spec: &ExportSpec) -> Result<()> {
        self.require_iscsi()?;
        let want = self.backing(spec)?;
        let iqn = spec.target_iqn.as_str();
        let target = self.target_dir(iqn);
        let tpg = self.tpg_dir(iqn);

        // 1. The backstore, so the LUN can link to it.
        let backstore = self.converge_backstore(iqn, &want, &tpg)?;

        // 2. Target and its one TPG.
        if self.ensure_dir(&target)? {
            tracing::info!(target = iqn, "lio: created target");
        }
        for t in self.subdirs(&target)? {
            if t.starts_with("tpgt_") && t != TPGT {
                self.remove_tpg(&target.join(t))?;
            }
        }
        self.ensure_dir(&tpg)?;
        for (attr, value) in TPG_ATTRIBS {
            self.ensure_attr(&tpg.join("attrib").join(attr), value)?;
        }

        // 3. LUN 1, the portal, ACLs with CHAP and mapped LUNs.
        self.converge_lun(&tpg, &backstore)?;
        self.converge_portal(&tpg)?;
        self.converge_acls(&tpg, spec)?;

        // 4. Open: logins start once everything above is in place.
        self.ensure_attr(&tpg.join("enable"), "1")
    }

    fn unexport(&self, iqn: &str) -> Result<()> {
        match self.probe() {
            Probe::NotMounted(why) => return Err(Error::unavailable(why)),
            // LIO is not loaded: it has no targets.
            Probe::NoCore(_) => return Ok(()),
            Probe::NoIscsi(_) | Probe::Ready => {}
        }
        let target = self.target_dir(iqn);
        if self.exists(&target) {
            for t in self.subdirs(&target)? {
                if t.starts_with("tpgt_") {
                    self.remove_tpg(&target.join(t))?;
                }
            }
            self.rmdir(&target)?;
            tracing::info!(target = iqn, "lio: removed target");
        }
        for dir in self.find_backstores(iqn)? {
            self.rmdir(&dir)?;
            tracing::info!(backstore = %dir.display(), "lio: removed backstore");
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<LiveExport>> {
        let iscsi = self.iscsi_dir();
        let mut out = Vec::new();
        for name in self.subdirs(&iscsi)? {
            if owns(&self.cfg.iqn_prefix, &name) {
                out.push(self.live_export(&name)?);
            }
        }
        Ok(out)
    }

    /// A target as it is live. When it is not whole (TPG disabled, LUN not
    /// linked, portal or a mapped LUN missing, authentication not matching
    /// the ACLs' CHAP, a fileio size behind its file), `backing_path` is
    /// None so that `restore` sees it differ from its spec and re-applies it.
    fn live_export(&self, iqn: &str) -> Result<LiveExport> {
        let tpg = self.tpg_dir(iqn);
        let acls = tpg.join("acls");
        let initiators = self.subdirs(&acls)?;
        let users: Vec<Option<String>> = initiators
            .iter()
            .map(|i| {
                self.read_opt(&acls.join(i).join("auth/userid"))
                    .as_deref()
                    .and_then(chap_value)
                    .map(str::to_owned)
            })
            .collect();
        // One user on every ACL is the CHAP user; anything else is shown
        // comma-joined, never a valid user, so it never matches a spec.
        let distinct: BTreeSet<&str> = users.iter().flatten().map(String::as_str).collect();
        let chap_user = match (distinct.len(), users.iter().all(Option::is_some)) {
            (0, _) => None,
            (1, true) => distinct.iter().next().map(|u| u.to_string()),
            _ => Some(
                users
                    .iter()
                    .map(|u| u.as_deref().unwrap_or("(none)"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        };
        let backing_path = match self.whole(&tpg, &initiators, chap_user.is_some()) {
            Ok(p) => Some(PathBuf::from(p)),
            Err(why) => {
                tracing::debug!(target = iqn, why = %why, "lio: target is not whole");
                None
            }
        };
        Ok(LiveExport {
            target_iqn: iqn.to_owned(),
            backing_path,
            initiators,
            chap_user,
        })
    }

    /// The backing path of a whole target, or why it is not whole.
    fn whole(&self, tpg: &Path, initiators: &[String], chap: bool) -> Result<String, String> {
        let on = |p: &Path| self.read_opt(p).as_deref().map(str::trim) == Some("1");
        if !on(&tpg.join("enable")) {
            return Err("its TPG is not enabled".into());
        }
        let lun = tpg.join("lun").join(Self::lun_name());
        let links = self.link_tails(&lun).map_err(|e| e.to_string())?;
        let [Some((hba, name))] = links.as_slice() else {
            return Err("LUN 1 is not linked to one backstore".into());
        };
        let bs = self.core_dir().join(hba).join(name);
        if !on(&bs.join("enable")) {
            return Err("its backstore is not enabled".into());
        }
        let path = self
            .backstore_path(&bs)
            .ok_or("its backstore has no backing path")?;
        if !self.exists(&tpg.join("np").join(&self.np)) {
            return Err(format!("portal {} is missing", self.np));
        }
        for i in initiators {
            let m = tpg.join("acls").join(i).join(Self::lun_name());
            if self.links(&m).map(|l| l.len()).unwrap_or(0) != 1 {
                return Err(format!("initiator {i} has no mapped LUN 1"));
            }
        }
        if on(&tpg.join("attrib/authentication")) != chap {
            return Err("TPG authentication does not match the ACLs' CHAP".into());
        }
        if backstore_hba(hba) == Some("fileio") {
            if let Ok(BackingKind::File(size)) = (self.stat)(Path::new(&path)) {
                let info = self.read_opt(&bs.join("info")).unwrap_or_default();
                if info_field(&info, "Size") != Some(size.to_string().as_str()) {
                    return Err("its fileio size differs from the file's".into());
                }
            }
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::matches_spec;
    use crate::runner::{FakeRunner, Output};
    use std::collections::BTreeMap;
    use std::sync::Mutex as StdMutex;

    // ---- a fake configfs -------------------------------------------------------
    //
    // A directory tree in a tempdir that behaves like LIO's configfs where
    // the exporter depends on it:
    // - mkdir creates the attribute files and default groups the kernel
    //   creates (those the exporter reads or writes, with LIO's defaults),
    //   and refuses directories LIO would refuse (EPERM);
    // - attribute files can't be created or removed, only written (ENOENT
    //   for a misspelt name); some writes carry LIO's semantics: `control`
    //   updates `info`, `enable` can't be written twice, the unit serial
    //   can't change while a LUN links the backstore, a TPG can't be enabled
    //   twice (older kernels), CHAP values are kept verbatim;
    // - symlinks only from LUNs to enabled backstores and from mapped LUNs
    //   to LUNs of the same TPG; readlink answers relative paths;
    // - rmdir only of directories made by mkdir, and only once no directory
    //   made by mkdir or symlink remains inside (ENOTEMPTY) and no symlink
    //   points at it (EBUSY); the attribute files and default groups go with it.
    // Attribute files the exporter never touches are not created.

    struct FakeConfigFs {
        root: PathBuf,
        state: StdMutex<FakeState>,
    }

    #[derive(Default)]
    struct FakeState {
        /// Directories made by mkdir, relative to root.
        user_dirs: BTreeSet<PathBuf>,
        /// Every mutation: "mkdir P", "rmdir P", "write P=V", "symlink P", "unlink P".
        ops: Vec<String>,
        mounted: bool,
        iscsi_loadable: bool,
        /// Whether LIO accepts fd_dev_size on an enabled fileio backstore.
        live_fd_size: bool,
        /// Writes to paths ending like this fail with this errno.
        fail_writes: Vec<(String, i32)>,
        /// Every attribute ever written, relative to root.
        written: BTreeSet<String>,
    }

    fn errno(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    impl FakeConfigFs {
        fn new() -> (tempfile::TempDir, Arc<FakeConfigFs>) {
            let dir = tempfile::tempdir().unwrap();
            let fake = Arc::new(FakeConfigFs {
                root: dir.path().join("config"),
                state: StdMutex::new(FakeState {
                    mounted: true,
                    iscsi_loadable: true,
                    live_fd_size: true,
                    ..FakeState::default()
                }),
            });
            std::fs::create_dir(&fake.root).unwrap();
            fake.load_core();
            (dir, fake)
        }

        fn rel<'a>(&self, p: &'a Path) -> io::Result<&'a Path> {
            p.strip_prefix(&self.root).map_err(|_| errno(libc::EPERM))
        }

        /// What loading target_core_mod creates.
        fn load_core(&self) {
            let t = self.root.join("target");
            std::fs::create_dir_all(t.join("core/alua/lu_gps/default_lu_gp")).unwrap();
            std::fs::write(
                t.join("version"),
                "Target Engine Core ConfigFS Infrastructure\n",
            )
            .unwrap();
        }

        /// LIO forgets everything (a reboot, or the modules reloaded).
        fn reboot(&self) {
            std::fs::remove_dir_all(self.root.join("target")).unwrap();
            self.state.lock().unwrap().user_dirs.clear();
            self.load_core();
        }

        fn ops(&self) -> Vec<String> {
            self.state.lock().unwrap().ops.clone()
        }

        fn clear_ops(&self) {
            self.state.lock().unwrap().ops.clear();
        }

        fn fail_writes(&self, suffix: &str, e: i32) {
            self.state
                .lock()
                .unwrap()
                .fail_writes
                .push((suffix.to_owned(), e));
        }

        fn files(dir: &Path, files: &[(&str, &str)]) {
            for (name, content) in files {
                let p = dir.join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, content).unwrap();
            }
        }

        /// The attribute files and default groups a mkdir of `rel` gets.
        fn layout(&self, rel: &Path) -> io::Result<Vec<(&'static str, &'static str)>> {
            let c: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
            let s = self.state.lock().unwrap();
            Ok(match c.as_slice() {
                ["target", "iscsi"] if s.iscsi_loadable => vec![
                    ("lio_version", "Datera Inc. iSCSI Target v4.1.0\n"),
                    ("discovery_auth/enforce_discovery_auth", "0\n"),
                ],
                ["target", "iscsi"] => return Err(errno(libc::EINVAL)),
                ["target", "core", hba] if backstore_hba(hba).is_some() => {
                    vec![("hba_info", "HBA Index: 0\n"), ("hba_mode", "0\n")]
                }
                ["target", "core", hba, _] if backstore_hba(hba).is_some() => vec![
                    ("info", ""),
                    ("control", ""),
                    ("alias", ""),
                    ("udev_path", ""),
                    ("enable", "0\n"),
                    ("attrib/emulate_tpu", "0\n"),
                    ("attrib/emulate_tpws", "0\n"),
                    ("attrib/emulate_write_cache", "0\n"),
                    ("attrib/block_size", "512\n"),
                    ("wwn/vpd_unit_serial", "T10 VPD Unit Serial Number: \n"),
                    ("pr/res_holder", "No SPC-3 Reservation holder\n"),
                    ("alua/default_tg_pt_gp/alua_access_state", "0\n"),
                    ("statistics/scsi_dev/indx", "0\n"),
                ],
                ["target", "iscsi", _] => vec![
                    ("fabric_statistics/iscsi_instance/inst", "0\n"),
                    ("param/cmd_completion_affinity", "-1\n"),
                ],
                ["target", "iscsi", _, t] if t.starts_with("tpgt_") => vec![
                    ("enable", "0\n"),
                    ("dynamic_sessions", ""),
                    ("rtpi", "1\n"),
                    ("attrib/authentication", "1\n"),
                    ("attrib/generate_node_acls", "0\n"),
                    ("attrib/cache_dynamic_acls", "0\n"),
                    ("attrib/demo_mode_write_protect", "1\n"),
                    ("attrib/prod_mode_write_protect", "0\n"),
                    ("attrib/demo_mode_discovery", "1\n"),
                    ("attrib/login_timeout", "15\n"),
                    ("auth/userid", "\n"),
                    ("auth/password", "\n"),
                    ("param/AuthMethod", "CHAP,None\n"),
                    ("lun/.keep", ""),
                    ("np/.keep", ""),
                    ("acls/.keep", ""),
                ],
                ["target", "iscsi", _, t, "lun", l]
                    if t.starts_with("tpgt_") && l.starts_with("lun_") =>
                {
                    vec![("alua_tg_pt_gp", ""), ("statistics/scsi_port/indx", "0\n")]
                }
                ["target", "iscsi", _, t, "np", addr] if t.starts_with("tpgt_") => {
                    if addr.parse::<SocketAddr>().is_err() {
                        return Err(errno(libc::EINVAL));
                    }
                    vec![("iser", "0\n"), ("cxgbit", "0\n")]
                }
                ["target", "iscsi", _, t, "acls", _] if t.starts_with("tpgt_") => vec![
                    ("info", ""),
                    ("cmdsn_depth", "64\n"),
                    ("tag", ""),
                    ("attrib/authentication", "-1\n"),
                    ("attrib/dataout_timeout", "3\n"),
                    ("auth/userid", "\n"),
                    ("auth/password", "\n"),
                    ("auth/authenticate_target", "0\n"),
                    ("auth/userid_mutual", "\n"),
                    ("auth/password_mutual", "\n"),
                    ("param/MaxConnections", "No Active iSCSI Session\n"),
                    ("fabric_statistics/iscsi_sess_stats/.keep", ""),
                ],
                ["target", "iscsi", _, t, "acls", _, m]
                    if t.starts_with("tpgt_") && m.starts_with("lun_") =>
                {
                    vec![
                        ("write_protect", ""),
                        ("statistics/scsi_auth_intr/.keep", ""),
                    ]
                }
                _ => return Err(errno(libc::EPERM)),
            })
        }

        /// Symlinks anywhere in the tree and where they point (absolute).
        fn all_links(&self) -> Vec<(PathBuf, PathBuf)> {
            fn walk(d: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
                for e in std::fs::read_dir(d).unwrap() {
                    let e = e.unwrap();
                    let t = e.file_type().unwrap();
                    if t.is_symlink() {
                        let target = std::fs::read_link(e.path()).unwrap();
                        let abs = e.path().parent().unwrap().join(target);
                        out.push((e.path(), normalize(&abs)));
                    } else if t.is_dir() {
                        walk(&e.path(), out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.root, &mut out);
            out
        }

        fn is_dev_dir(rel: &Path) -> bool {
            let c: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
            matches!(c.as_slice(), ["target", "core", hba, _] if backstore_hba(hba).is_some())
        }

        /// The backstore directory of an attribute path, if any.
        fn dev_of(rel: &Path) -> Option<PathBuf> {
            let c: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
            match c.as_slice() {
                ["target", "core", hba, dev, ..] if backstore_hba(hba).is_some() => {
                    Some(PathBuf::from(format!("target/core/{hba}/{dev}")))
                }
                _ => None,
            }
        }

        fn linked(&self, abs: &Path) -> bool {
            self.all_links().iter().any(|(_, t)| t == abs)
        }

        /// LIO's `control` semantics, kept in `info`.
        fn control(&self, dev: &Path, value: &str) -> io::Result<()> {
            let abs = self.root.join(dev);
            let enabled = std::fs::read_to_string(abs.join("enable"))?.trim() == "1";
            let info_path = abs.join("info");
            let info = std::fs::read_to_string(&info_path)?;
            let fileio = dev.to_str().unwrap().contains("/fileio_");
            let mut file = info_field(&info, "File").map(str::to_owned);
            let mut size = info_field(&info, "Size").map(str::to_owned);
            let mut mode = info_field(&info, "Mode").unwrap_or("O_DSYNC").to_owned();
            let mut udev = info_field(&info, "PATH").map(str::to_owned);
            for opt in value.split([',', '\n']).filter(|o| !o.is_empty()) {
                let (k, v) = opt.split_once('=').ok_or_else(|| errno(libc::EINVAL))?;
                match (fileio, k) {
                    (true, "fd_dev_name") => file = Some(v.to_owned()),
                    (true, "fd_dev_size") => {
                        if enabled && !self.state.lock().unwrap().live_fd_size {
                            return Err(errno(libc::EINVAL));
                        }
                        v.parse::<u64>().map_err(|_| errno(libc::EINVAL))?;
                        size = Some(v.to_owned());
                    }
                    (true, "fd_buffered_io") if v == "1" => mode = "Buffered-WCE".into(),
                    (false, "udev_path") if enabled => return Err(errno(libc::EEXIST)),
                    (false, "udev_path") => udev = Some(v.to_owned()),
                    _ => return Err(errno(libc::EINVAL)),
                }
            }
            let info = if fileio {
                format!(
                    "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 0\n\
                     TCM FILEIO ID: 0        File: {}  Size: {}  Mode: {mode} Async: 0\n",
                    file.unwrap_or_default(),
                    size.unwrap_or_else(|| "0".into())
                )
            } else {
                format!(
                    "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 0\n\
                     iBlock device: dm-3  UDEV PATH: {}  readonly: 0\n        Major: 254 Minor: 3  CLAIMED: IBLOCK\n",
                    udev.unwrap_or_default()
                )
            };
            std::fs::write(info_path, info)
        }
    }

    /// Resolves `.` and `..` without touching the filesystem.
    fn normalize(p: &Path) -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                c => out.push(c),
            }
        }
        out
    }

    impl ConfigFs for FakeConfigFs {
        fn exists(&self, path: &Path) -> bool {
            path.symlink_metadata().is_ok()
        }

        fn mkdir(&self, path: &Path) -> io::Result<()> {
            let rel = self.rel(path)?.to_owned();
            if path.symlink_metadata().is_ok() {
                return Err(errno(libc::EEXIST));
            }
            if !path.parent().unwrap().is_dir() {
                return Err(errno(libc::ENOENT));
            }
            let layout = self.layout(&rel)?;
            std::fs::create_dir(path)?;
            Self::files(path, &layout);
            let mut s = self.state.lock().unwrap();
            s.user_dirs.insert(rel.clone());
            s.ops.push(format!("mkdir {}", rel.display()));
            Ok(())
        }

        fn rmdir(&self, path: &Path) -> io::Result<()> {
            let rel = self.rel(path)?.to_owned();
            if !path.is_dir() {
                return Err(errno(libc::ENOENT));
            }
            let links = self.all_links();
            let mut s = self.state.lock().unwrap();
            if !s.user_dirs.contains(&rel) {
                return Err(errno(libc::EPERM));
            }
            let inner_dir = s.user_dirs.iter().any(|d| d != &rel && d.starts_with(&rel));
            let inner_link = links.iter().any(|(l, _)| l.starts_with(path));
            if inner_dir || inner_link {
                return Err(errno(libc::ENOTEMPTY));
            }
            if links.iter().any(|(_, t)| t == path) {
                return Err(errno(libc::EBUSY));
            }
            std::fs::remove_dir_all(path)?;
            s.user_dirs.remove(&rel);
            s.ops.push(format!("rmdir {}", rel.display()));
            Ok(())
        }

        fn read(&self, path: &Path) -> io::Result<String> {
            self.rel(path)?;
            std::fs::read_to_string(path)
        }

        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            let rel = self.rel(path)?.to_owned();
            let m = path.symlink_metadata()?;
            if !m.is_file() {
                return Err(errno(libc::EISDIR));
            }
            let fails = self.state.lock().unwrap().fail_writes.clone();
            if let Some((_, e)) = fails
                .iter()
                .find(|(s, _)| rel.to_str().unwrap().ends_with(s.as_str()))
            {
                return Err(errno(*e));
            }
            let name = rel.file_name().unwrap().to_str().unwrap();
            let dev = Self::dev_of(&rel);
            let cur = std::fs::read_to_string(path)?;
            let content = match (name, &dev) {
                ("control", Some(d)) if Self::is_dev_dir(d) && rel == d.join("control") => {
                    self.control(d, value)?;
                    String::new()
                }
                ("enable", Some(d)) if rel == d.join("enable") => {
                    if !value.contains('1') {
                        return Err(errno(libc::EINVAL));
                    }
                    if cur.trim() == "1" {
                        return Err(errno(libc::EEXIST));
                    }
                    let info = std::fs::read_to_string(self.root.join(d).join("info"))?;
                    if info_field(&info, "File").is_none() && info_field(&info, "PATH").is_none() {
                        return Err(errno(libc::EINVAL));
                    }
                    "1\n".into()
                }
                ("vpd_unit_serial", Some(d)) => {
                    if self.linked(&self.root.join(d)) {
                        return Err(errno(libc::EINVAL));
                    }
                    format!("T10 VPD Unit Serial Number: {}\n", value.trim())
                }
                ("udev_path", Some(_)) => {
                    format!("{}\n", value.strip_suffix('\n').unwrap_or(value))
                }
                ("enable", None) => {
                    // A TPG's enable: older kernels refuse enabling twice.
                    let v = value.trim();
                    if v != "0" && v != "1" {
                        return Err(errno(libc::EINVAL));
                    }
                    if v == "1" && cur.trim() == "1" {
                        return Err(errno(libc::EINVAL));
                    }
                    format!("{v}\n")
                }
                _ if rel.parent().unwrap().ends_with("auth") => format!("{value}\n"),
                _ => format!("{}\n", value.trim()),
            };
            std::fs::write(path, content)?;
            let mut s = self.state.lock().unwrap();
            s.written.insert(rel.display().to_string());
            s.ops.push(format!("write {}={value}", rel.display()));
            Ok(())
        }

        fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
            let rel = self.rel(link)?.to_owned();
            let trel = self.rel(target)?.to_owned();
            if link.symlink_metadata().is_ok() {
                return Err(errno(libc::EEXIST));
            }
            if !target.is_dir() {
                return Err(errno(libc::ENOENT));
            }
            let parent: Vec<&str> = rel
                .parent()
                .unwrap()
                .iter()
                .map(|s| s.to_str().unwrap())
                .collect();
            let t: Vec<&str> = trel.iter().map(|s| s.to_str().unwrap()).collect();
            match (parent.as_slice(), t.as_slice()) {
                (["target", "iscsi", _, _, "lun", _], ["target", "core", _, _]) => {
                    let enabled = std::fs::read_to_string(target.join("enable"))?;
                    if enabled.trim() != "1" {
                        return Err(errno(libc::ENODEV));
                    }
                    if !self.links_in(link.parent().unwrap()).is_empty() {
                        return Err(errno(libc::EEXIST));
                    }
                }
                (
                    ["target", "iscsi", w, g, "acls", _, _],
                    ["target", "iscsi", w2, g2, "lun", _],
                ) => {
                    if w != w2 || g != g2 || self.links_in(target).is_empty() {
                        return Err(errno(libc::EINVAL));
                    }
                }
                _ => return Err(errno(libc::EPERM)),
            }
            // configfs answers readlink with a path relative to the link.
            let ups = rel.parent().unwrap().iter().count();
            let relative = PathBuf::from("../".repeat(ups)).join(&trel);
            std::os::unix::fs::symlink(relative, link)?;
            self.state.lock().unwrap().ops.push(format!(
                "symlink {} -> {}",
                rel.display(),
                trel.display()
            ));
            Ok(())
        }

        fn unlink(&self, link: &Path) -> io::Result<()> {
            let rel = self.rel(link)?.to_owned();
            if !link.symlink_metadata()?.file_type().is_symlink() {
                return Err(errno(libc::EPERM));
            }
            std::fs::remove_file(link)?;
            self.state
                .lock()
                .unwrap()
                .ops
                .push(format!("unlink {}", rel.display()));
            Ok(())
        }

        fn read_link(&self, link: &Path) -> io::Result<PathBuf> {
            std::fs::read_link(link)
        }

        fn entries(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
            KernelConfigFs
                .entries(dir)
                .map(|v| v.into_iter().filter(|(n, _)| n != ".keep").collect())
        }

        fn mounted(&self, _root: &Path) -> bool {
            self.state.lock().unwrap().mounted
        }
    }

    impl FakeConfigFs {
        fn links_in(&self, dir: &Path) -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_type().map(|t| t.is_symlink()).unwrap_or(false))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        }

        /// What is configured, one line per user-made directory ("d P"),
        /// symlink ("l P -> T") and attribute ever written ("f P = V"),
        /// sorted. Attributes still at their defaults are left out.
        fn tree(&self) -> Vec<String> {
            let s = self.state.lock().unwrap();
            let mut out: Vec<String> = s
                .user_dirs
                .iter()
                .map(|d| format!("d {}", d.display()))
                .collect();
            let written = s.written.clone();
            drop(s);
            for (l, t) in self.all_links() {
                out.push(format!(
                    "l {} -> {}",
                    l.strip_prefix(&self.root).unwrap().display(),
                    t.strip_prefix(&self.root).unwrap().display()
                ));
            }
            for w in written {
                let p = self.root.join(&w);
                if let Ok(v) = std::fs::read_to_string(&p) {
                    if !w.ends_with("/control") {
                        out.push(format!("f {w} = {}", v.trim_end_matches('\n')));
                    }
                }
            }
            out.sort();
            out
        }
    }

    // ---- fixtures --------------------------------------------------------------

    const PREFIX: &str = "iqn.2026-11.io.stratus.test";
    const VOL_A: &str = "0b5c1e2a-7d4f-4b8e-9a61-3f2d9c8e7a10";
    const VOL_B: &str = "5e7f9a1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b";
    const INIT_1: &str = "iqn.1993-08.org.debian:01:host1";
    const INIT_2: &str = "iqn.1993-08.org.debian:01:host2";
    const INIT_3: &str = "iqn.1993-08.org.debian:01:host3";
    const SECRET: &str = "s3cr3t-Pa55word";
    const SECRET_2: &str = "an0ther-Secr3t!";

    /// Backing files and block devices the tests pretend exist.
    type Disks = Arc<StdMutex<BTreeMap<PathBuf, BackingKind>>>;

    struct Lab {
        _dir: tempfile::TempDir,
        fs: Arc<FakeConfigFs>,
        disks: Disks,
        runner: FakeRunner,
        exp: LioExporter,
    }

    fn lab() -> Lab {
        lab_with(FakeRunner::new())
    }

    fn lab_with(runner: FakeRunner) -> Lab {
        let (dir, fs) = FakeConfigFs::new();
        lab_on(dir, fs, runner)
    }

    fn lab_on(dir: tempfile::TempDir, fs: Arc<FakeConfigFs>, runner: FakeRunner) -> Lab {
        let disks: Disks = Arc::default();
        disks
            .lock()
            .unwrap()
            .insert(file_path(VOL_A), BackingKind::File(1 << 30));
        disks
            .lock()
            .unwrap()
            .insert(file_path(VOL_B), BackingKind::File(2 << 30));
        disks
            .lock()
            .unwrap()
            .insert(PathBuf::from("/dev/pdisk/vol-a"), BackingKind::Block);
        let d2 = disks.clone();
        let stat: Arc<StatFn> = Arc::new(move |p: &Path| {
            d2.lock()
                .unwrap()
                .get(p)
                .copied()
                .ok_or_else(|| errno(libc::ENOENT))
        });
        let exp = LioExporter::with_host(
            Arc::new(runner.clone()),
            LioConfig {
                configfs_root: fs.root.clone(),
                portal: "192.0.2.10:3260".into(),
                iqn_prefix: PREFIX.into(),
                ..LioConfig::default()
            },
            fs.clone(),
            stat,
        );
        Lab {
            _dir: dir,
            fs,
            disks,
            runner,
            exp,
        }
    }

    fn file_path(vol: &str) -> PathBuf {
        PathBuf::from(format!("/srv/pdisk/pool/volumes/{vol}.raw"))
    }

    fn iqn(s: &str) -> Iqn {
        s.parse().unwrap()
    }

    fn target(vol: &str) -> String {
        format!("{PREFIX}:{vol}")
    }

    fn spec(vol: &str, backing: PathBuf, initiators: &[&str], chap: Option<Chap>) -> ExportSpec {
        ExportSpec {
            target_iqn: iqn(&target(vol)),
            backing_path: backing,
            initiators: initiators.iter().map(|i| iqn(i)).collect(),
            chap,
        }
    }

    fn chap(user: &str, secret: &str) -> Option<Chap> {
        Some(Chap::new(user, secret).unwrap())
    }

    /// The tree of a fileio export of VOL_A (1 GiB) to `inits` without CHAP.
    fn fileio_tree(inits: &[&str]) -> Vec<String> {
        let t = format!("target/iscsi/{}", target(VOL_A));
        let bs = format!("target/core/fileio_0/{}", target(VOL_A));
        let mut v = vec![
            "d target/iscsi".to_string(),
            "d target/core/fileio_0".into(),
            format!("d {bs}"),
            format!("f {bs}/udev_path = {}", file_path(VOL_A).display()),
            format!("f {bs}/enable = 1"),
            format!("f {bs}/wwn/vpd_unit_serial = T10 VPD Unit Serial Number: {VOL_A}"),
            format!("f {bs}/attrib/emulate_tpu = 1"),
            format!("f {bs}/attrib/emulate_tpws = 1"),
            format!("f {bs}/attrib/emulate_write_cache = 1"),
            format!("d {t}"),
            format!("d {t}/tpgt_1"),
            format!("f {t}/tpgt_1/attrib/demo_mode_discovery = 0"),
            format!("f {t}/tpgt_1/attrib/authentication = 0"),
            format!("d {t}/tpgt_1/lun/lun_1"),
            format!("l {t}/tpgt_1/lun/lun_1/backstore -> {bs}"),
            format!("d {t}/tpgt_1/np/192.0.2.10:3260"),
            format!("f {t}/tpgt_1/enable = 1"),
        ];
        for i in inits {
            let a = format!("{t}/tpgt_1/acls/{i}");
            v.push(format!("d {a}"));
            v.push(format!("f {a}/attrib/authentication = 0"));
            v.push(format!("d {a}/lun_1"));
            v.push(format!("l {a}/lun_1/lun -> {t}/tpgt_1/lun/lun_1"));
            v.push(format!("f {a}/lun_1/write_protect = 0"));
        }
        v.sort();
        v
    }

    fn info_of(lab: &Lab, vol: &str, hba: &str) -> String {
        std::fs::read_to_string(
            lab.fs
                .root
                .join(format!("target/core/{hba}/{}/info", target(vol))),
        )
        .unwrap()
    }

    /// Makes a target and backstore as another tool would (not ours).
    fn foreign(lab: &Lab, name: &str) {
        let fs = &lab.fs;
        let r = &fs.root;
        fs.mkdir(&r.join("target/core/fileio_0")).ok();
        let bs = r.join("target/core/fileio_0").join(name);
        fs.mkdir(&bs).unwrap();
        fs.write(
            &bs.join("control"),
            "fd_dev_name=/tmp/foreign.img,fd_dev_size=1048576",
        )
        .unwrap();
        fs.write(&bs.join("enable"), "1").unwrap();
        let tpg = r.join("target/iscsi").join(name).join("tpgt_1");
        fs.mkdir(&r.join("target/iscsi")).ok();
        fs.mkdir(tpg.parent().unwrap()).unwrap();
        fs.mkdir(&tpg).unwrap();
        fs.mkdir(&tpg.join("lun/lun_0")).unwrap();
        fs.symlink(&bs, &tpg.join("lun/lun_0/abc123")).unwrap();
        fs.mkdir(&tpg.join("np/0.0.0.0:3261")).unwrap();
        fs.mkdir(&tpg.join("acls").join(INIT_1)).unwrap();
        fs.mkdir(&tpg.join("acls").join(INIT_1).join("lun_0"))
            .unwrap();
        fs.symlink(
            &tpg.join("lun/lun_0"),
            &tpg.join("acls").join(INIT_1).join("lun_0/def456"),
        )
        .unwrap();
        fs.write(&tpg.join("enable"), "1").unwrap();
    }

    // ---- export ----------------------------------------------------------------

    #[tokio::test]
    async fn fresh_file_export_writes_the_documented_tree() {
        let lab = lab();
        let s = spec(VOL_A, file_path(VOL_A), &[INIT_1, INIT_2], None);
        lab.exp.export(&s).await.unwrap();
        assert_eq!(lab.fs.tree(), fileio_tree(&[INIT_1, INIT_2]));
        let info = info_of(&lab, VOL_A, "fileio_0");
        assert!(
            info.contains(&format!(
                "File: {}  Size: 1073741824  Mode: Buffered-WCE",
                file_path(VOL_A).display()
            )),
            "{info}"
        );
        // The TPG is enabled last, once everything else is in place.
        let ops = lab.fs.ops();
        assert!(ops.last().unwrap().ends_with("tpgt_1/enable=1"), "{ops:?}");
        // The backstore is enabled before its serial is set and before the LUN links it.
        let pos = |needle: &str| ops.iter().position(|o| o.contains(needle)).unwrap();
        assert!(pos("fileio_0/iqn") < pos("/enable=1"));
        assert!(pos("/enable=1") < pos("vpd_unit_serial"));
        assert!(pos("vpd_unit_serial") < pos("symlink"));
        // No program was run: LIO was loaded already.
        assert!(lab.runner.calls().is_empty());
    }

    #[tokio::test]
    async fn block_devices_get_an_iblock_backstore() {
        let lab = lab();
        let s = spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None);
        lab.exp.export(&s).await.unwrap();
        let bs = format!("target/core/iblock_0/{}", target(VOL_A));
        let tree = lab.fs.tree();
        assert!(tree.contains(&format!("d {bs}")), "{tree:?}");
        assert!(tree.contains(&format!("f {bs}/udev_path = /dev/pdisk/vol-a")));
        assert!(tree.contains(&format!(
            "l target/iscsi/{}/tpgt_1/lun/lun_1/backstore -> {bs}",
            target(VOL_A)
        )));
        assert!(lab
            .fs
            .ops()
            .contains(&format!("write {bs}/control=udev_path=/dev/pdisk/vol-a")));
        assert!(info_of(&lab, VOL_A, "iblock_0").contains("UDEV PATH: /dev/pdisk/vol-a"));
        assert!(!tree.iter().any(|l| l.contains("fileio_0")));
    }

    #[tokio::test]
    async fn write_through_fileio_when_write_back_is_off() {
        let (dir, fs) = FakeConfigFs::new();
        let mut lab = lab_on(dir, fs, FakeRunner::new());
        let mut cfg = lab.exp.config().clone();
        cfg.fileio_write_back = false;
        let stat = lab.exp.lio.stat.clone();
        lab.exp = LioExporter::with_host(Arc::new(FakeRunner::new()), cfg, lab.fs.clone(), stat);
        lab.exp
            .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
            .await
            .unwrap();
        assert!(info_of(&lab, VOL_A, "fileio_0").contains("Mode: O_DSYNC"));
        assert!(!lab.fs.ops().iter().any(|o| o.contains("fd_buffered_io")));
    }

    #[tokio::test]
    async fn re_export_of_a_matching_target_changes_nothing() {
        let lab = lab();
        let s = spec(VOL_A, file_path(VOL_A), &[INIT_1], chap("alice", SECRET));
        lab.exp.export(&s).await.unwrap();
        let before = lab.fs.tree();
        lab.fs.clear_ops();
        lab.exp.export(&s).await.unwrap();
        assert_eq!(lab.fs.ops(), Vec::<String>::new());
        assert_eq!(lab.fs.tree(), before);
    }

    #[tokio::test]
    async fn re_export_converges_acls_and_chap() {
        let lab = lab();
        let t = format!("target/iscsi/{}/tpgt_1", target(VOL_A));
        lab.exp
            .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1, INIT_2], None))
            .await
            .unwrap();

        // Drop host1, add host3, turn CHAP on.
        lab.fs.clear_ops();
        lab.exp
            .export(&spec(
                VOL_A,
                file_path(VOL_A),
                &[INIT_2, INIT_3],
                chap("alice", SECRET),
            ))
            .await
            .unwrap();
        let mut want = fileio_tree(&[INIT_2, INIT_3]);
        want.retain(|l| !l.contains("authentication = 0"));
        for i in [INIT_2, INIT_3] {
            let a = format!("{t}/acls/{i}");
            want.push(format!("f {a}/attrib/authentication = 1"));
            want.push(format!("f {a}/auth/userid = alice"));
            want.push(format!("f {a}/auth/password = {SECRET}"));
        }
        want.push(format!("f {t}/attrib/authentication = 1"));
        want.sort();
        assert_eq!(lab.fs.tree(), want);
        let ops = lab.fs.ops();
        let pos = |needle: &str| {
            ops.iter()
                .position(|o| o.contains(needle))
                .unwrap_or_else(|| panic!("no {needle} in {ops:?}"))
        };
        // Tighten first, then require CHAP before the new ACL exists, and
        // give every ACL its credentials before its mapped LUN.
        assert!(
            pos(&format!("rmdir {t}/acls/{INIT_1}")) < pos(&format!("mkdir {t}/acls/{INIT_3}"))
        );
        assert!(
            pos(&format!("write {t}/attrib/authentication=1"))
                < pos(&format!("mkdir {t}/acls/{INIT_3}"))
        );
        assert!(
            pos(&format!("{INIT_3}/attrib/authentication=1"))
                < pos(&format!("{INIT_3}/auth/password"))
        );
        assert!(
            pos(&format!("{INIT_3}/auth/password"))
                < pos(&format!("mkdir {t}/acls/{INIT_3}/lun_1"))
        );
        // The TPG stayed enabled: existing sessions were never dropped.
        assert!(!ops.iter().any(|o| o.contains("tpgt_1/enable=")), "{ops:?}");
        // The backstore and LUN were left alone.
        assert!(!ops.iter().any(|o| o.contains("target/core")), "{ops:?}");

        // Another user and secret.
        lab.exp
            .export(&spec(
                VOL_A,
                file_path(VOL_A),
                &[INIT_2, INIT_3],
                chap("bob", SECRET_2),
            ))
            .await
            .unwrap();
        let tree = lab.fs.tree();
        for i in [INIT_2, INIT_3] {
            assert!(
                tree.contains(&format!("f {t}/acls/{i}/auth/userid = bob")),
                "{tree:?}"
            );
            assert!(tree.contains(&format!("f {t}/acls/{i}/auth/password = {SECRET_2}")));
        }

        // CHAP off again: credentials cleared the way LIO clears them.
        lab.exp
            .export(&spec(VOL_A, file_path(VOL_A), &[INIT_2, INIT_3], None))
            .await
            .unwrap();
        let tree = lab.fs.tree();
        assert!(tree.contains(&format!("f {t}/attrib/authentication = 0")));
        for i in [INIT_2, INIT_3] {
            assert!(
                tree.contains(&format!("f {t}/acls/{i}/auth/userid = NULL")),
                "{tree:?}"
            );
            assert!(tree.contains(&format!("f {t}/acls/{i}/auth/password = NULL")));
            assert!(tree.contains(&format!("f {t}/acls/{i}/attrib/authentication = 0")));
        }
        let live = lab.exp.list().await.unwrap();
        assert_eq!(live[0].chap_user, None);
        assert!(live[0].backing_path.is_some());
    }

    #[tokio::test]
    async fn a_new_backing_path_recreates_backstore_and_lun_with_the_same_serial() {
        let lab = lab();
        lab.exp
            .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
            .await
            .unwrap();
        lab.fs.clear_ops();
        lab.exp
            .export(&spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None))
            .await
            .unwrap();
        let t = format!("target/iscsi/{}/tpgt_1", target(VOL_A));
        let old = format!("target/core/fileio_0/{}", target(VOL_A));
        let new = format!("target/core/iblock_0/{}", target(VOL_A));
        let ops = lab.fs.ops();
        let pos = |needle: &str| {
            ops.iter()
                .position(|o| o == needle)
                .unwrap_or_else(|| panic!("no {needle} in {ops:?}"))
        };
        // Mapped LUN, LUN link, LUN, then the old backstore.
        assert!(
            pos(&format!("unlink {t}/acls/{INIT_1}/lun_1/lun"))
                < pos(&format!("unlink {t}/lun/lun_1/backstore"))
        );
        assert!(
            pos(&format!("unlink {t}/lun/lun_1/backstore")) < pos(&format!("rmdir {t}/lun/lun_1"))
        );
        assert!(pos(&format!("rmdir {t}/lun/lun_1")) < pos(&format!("rmdir {old}")));
        let tree = lab.fs.tree();
        assert!(!tree.iter().any(|l| l.contains(&old)), "{tree:?}");
        assert!(tree.contains(&format!("l {t}/lun/lun_1/backstore -> {new}")));
        assert!(tree.contains(&format!("l {t}/acls/{INIT_1}/lun_1/lun -> {t}/lun/lun_1")));
        assert!(tree.contains(&format!(
            "f {new}/wwn/vpd_unit_serial = T10 VPD Unit Serial Number: {VOL_A}"
        )));
        let live = lab.exp.list().await.unwrap();
        assert_eq!(
            live[0].backing_path,
            Some(PathBuf::from("/dev/pdisk/vol-a"))
        );
    }

    #[tokio::test]
    async fn thin_provisioning_refused_by_lio_is_not_fatal() {
        let lab = lab();
        lab.fs.fail_writes("attrib/emulate_tpu", libc::ENOSYS);
        lab.exp
            .export(&spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None))
            .await
            .unwrap();
        assert!(!lab.fs.ops().iter().any(|o| o.contains("emulate_tp")));
        assert!(lab.exp.list().await.unwrap()[0].backing_path.is_some());
    }

    #[tokio::test]
    async fn bad_specs_are_refused_before_anything_changes() {
        let lab = lab();
        for (path, kind) in [
            ("relative/x.raw", ErrorKind::InvalidArgument),
            ("/srv/a,b.raw", ErrorKind::InvalidArgument),
            ("/srv/with space.raw", ErrorKind::InvalidArgument),
            ("/srv/missing.raw", ErrorKind::NotFound),
        ] {
            let e = lab
                .exp
                .export(&spec(VOL_A, path.into(), &[INIT_1], None))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), kind, "{path}: {e}");
        }
        lab.disks
            .lock()
            .unwrap()
            .insert("/srv/tiny.raw".into(), BackingKind::File(512));
        assert!(lab
            .exp
            .export(&spec(VOL_A, "/srv/tiny.raw".into(), &[INIT_1], None))
            .await
            .is_err());
        let e = lab
            .exp
            .export(&spec(
                VOL_A,
                file_path(VOL_A),
                &[INIT_1],
                chap("alice", "NULLsecret123"),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(!e.message().contains("NULLsecret123"), "{e}");
        let e = lab
            .exp
            .export(&ExportSpec {
                target_iqn: iqn("iqn.2026-11.io.stratus.other:x"),
                ..spec(VOL_A, file_path(VOL_A), &[INIT_1], None)
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        // Only `mkdir target/iscsi` (done when LIO is checked) happened.
        assert_eq!(lab.fs.ops(), vec!["mkdir target/iscsi"]);
    }

    // ---- unexport --------------------------------------------------------------

    #[tokio::test]
    async fn unexport_tears_down_leaf_first_and_leaves_others_alone() {
        let lab = lab();
        foreign(&lab, "iqn.2003-01.org.linux-iscsi.other:sn.1234");
        // Shares our prefix but not as a prefix of the name: not ours.
        foreign(&lab, &format!("{PREFIX}x:lookalike"));
        let untouched = lab.fs.tree();
        lab.exp
            .export(&spec(
                VOL_A,
                file_path(VOL_A),
                &[INIT_1, INIT_2],
                chap("alice", SECRET),
            ))
            .await
            .unwrap();
        lab.exp
            .export(&spec(VOL_B, file_path(VOL_B), &[INIT_1], None))
            .await
            .unwrap();
        lab.fs.clear_ops();
        lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();

        let t = format!("target/iscsi/{}", target(VOL_A));
        let a1 = format!("{t}/tpgt_1/acls/{INIT_1}");
        let a2 = format!("{t}/tpgt_1/acls/{INIT_2}");
        let bs = format!("target/core/fileio_0/{}", target(VOL_A));
        assert_eq!(
            lab.fs.ops(),
            vec![
                format!("write {t}/tpgt_1/enable=0"),
                format!("unlink {a1}/lun_1/lun"),
                format!("rmdir {a1}/lun_1"),
                format!("rmdir {a1}"),
                format!("unlink {a2}/lun_1/lun"),
                format!("rmdir {a2}/lun_1"),
                format!("rmdir {a2}"),
                format!("unlink {t}/tpgt_1/lun/lun_1/backstore"),
                format!("rmdir {t}/tpgt_1/lun/lun_1"),
                format!("rmdir {t}/tpgt_1/np/192.0.2.10:3260"),
                format!("rmdir {t}/tpgt_1"),
                format!("rmdir {t}"),
                format!("rmdir {bs}"),
            ]
        );
        // Nothing of VOL_A left; VOL_B and the foreign targets as they were.
        let tree = lab.fs.tree();
        assert!(!tree.iter().any(|l| l.contains(VOL_A)), "{tree:?}");
        assert!(tree.iter().any(|l| l.contains(VOL_B)));
        lab.exp.unexport(&iqn(&target(VOL_B))).await.unwrap();
        assert_eq!(lab.fs.tree(), untouched);
        assert!(lab.exp.list().await.unwrap().is_empty());

        // Absent: still fine, and nothing happens.
        lab.fs.clear_ops();
        lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();
        assert!(lab.fs.ops().is_empty());
        // Not ours: refused.
        let e = lab
            .exp
            .unexport(&iqn("iqn.2003-01.org.linux-iscsi.other:sn.1234"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[tokio::test]
    async fn unexport_finishes_a_half_made_export() {
        let lab = lab();
        // A crash after the backstore was made, before the target.
        let bs = lab.fs.root.join("target/core/fileio_0").join(target(VOL_A));
        lab.fs
            .mkdir(&lab.fs.root.join("target/core/fileio_0"))
            .unwrap();
        lab.fs.mkdir(&bs).unwrap();
        lab.exp.unexport(&iqn(&target(VOL_A))).await.unwrap();
        assert!(!bs.exists());
    }

    // ---- list and restore ------------------------------------------------------

    #[tokio::test]
    async fn list_reads_the_live_tree_back() {
        let lab = lab();
        foreign(&lab, "iqn.2003-01.org.linux-iscsi.other:sn.1234");
        let a = spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            chap("alice", SECRET),
        );
        let b = spec(VOL_B, "/dev/pdisk/vol-a".into(), &[INIT_3], None);
        lab.exp.export(&a).await.unwrap();
        lab.exp.export(&b).await.unwrap();
        let mut live = lab.exp.list().await.unwrap();
        live.sort_by(|x, y| x.target_iqn.cmp(&y.target_iqn));
        assert_eq!(
            live,
            vec![
                LiveExport {
                    target_iqn: target(VOL_A),
                    backing_path: Some(file_path(VOL_A)),
                    initiators: vec![INIT_1.into(), INIT_2.into()],
                    chap_user: Some("alice".into()),
                },
                LiveExport {
                    target_iqn: target(VOL_B),
                    backing_path: Some("/dev/pdisk/vol-a".into()),
                    initiators: vec![INIT_3.into()],
                    chap_user: None,
                },
            ]
        );
        assert!(matches_spec(&live[0], &a));
        assert!(matches_spec(&live[1], &b));
    }

    #[tokio::test]
    async fn restore_after_reboot_recreates_every_export() {
        let lab = lab();
        let a = spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            chap("alice", SECRET),
        );
        let b = spec(VOL_B, file_path(VOL_B), &[INIT_3], None);
        lab.exp.export(&a).await.unwrap();
        lab.exp.export(&b).await.unwrap();
        let before = lab.fs.tree();
        let r = lab.exp.restore(&[a.clone(), b.clone()]).await.unwrap();
        assert_eq!(r.unchanged.len(), 2, "{r:?}");

        lab.fs.reboot();
        assert!(lab.exp.list().await.unwrap().is_empty());
        let r = lab.exp.restore(&[a, b]).await.unwrap();
        assert_eq!(r.restored.len(), 2, "{r:?}");
        assert!(r.failed.is_empty() && r.unknown.is_empty(), "{r:?}");
        assert_eq!(lab.fs.tree(), before);
    }

    #[tokio::test]
    async fn restore_repairs_targets_that_are_not_whole() {
        let lab = lab();
        let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], None);
        lab.exp.export(&a).await.unwrap();
        let tpg = lab
            .fs
            .root
            .join("target/iscsi")
            .join(target(VOL_A))
            .join("tpgt_1");

        // A crash before the TPG was enabled.
        lab.fs.write(&tpg.join("enable"), "0").unwrap();
        assert_eq!(lab.exp.list().await.unwrap()[0].backing_path, None);
        let r = lab.exp.restore(std::slice::from_ref(&a)).await.unwrap();
        assert_eq!(r.restored, vec![target(VOL_A)]);
        assert_eq!(std::fs::read_to_string(tpg.join("enable")).unwrap(), "1\n");

        // A mapped LUN gone missing.
        let m = tpg.join("acls").join(INIT_1).join("lun_1");
        lab.fs.unlink(&m.join("lun")).unwrap();
        lab.fs.rmdir(&m).unwrap();
        assert_eq!(lab.exp.list().await.unwrap()[0].backing_path, None);
        lab.exp.restore(std::slice::from_ref(&a)).await.unwrap();
        assert_eq!(
            lab.exp.list().await.unwrap()[0].backing_path,
            Some(file_path(VOL_A))
        );

        // The file grew but nobody told LIO.
        lab.disks
            .lock()
            .unwrap()
            .insert(file_path(VOL_A), BackingKind::File(3 << 30));
        assert_eq!(lab.exp.list().await.unwrap()[0].backing_path, None);
        lab.exp.restore(std::slice::from_ref(&a)).await.unwrap();
        assert!(info_of(&lab, VOL_A, "fileio_0").contains("Size: 3221225472"));

        // Unknown targets with our prefix are reported, never removed.
        let r = lab.exp.restore(&[]).await.unwrap();
        assert_eq!(r.unknown, vec![target(VOL_A)]);
        assert!(lab
            .fs
            .root
            .join("target/iscsi")
            .join(target(VOL_A))
            .exists());
    }

    // ---- refresh_size ----------------------------------------------------------

    #[tokio::test]
    async fn refresh_size_sets_fd_dev_size_on_the_live_fileio_backstore() {
        let lab = lab();
        let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], None);
        lab.exp.export(&a).await.unwrap();
        lab.disks
            .lock()
            .unwrap()
            .insert(file_path(VOL_A), BackingKind::File(2 << 30));
        lab.fs.clear_ops();
        lab.exp.refresh_size(&a).await.unwrap();
        let bs = format!("target/core/fileio_0/{}", target(VOL_A));
        assert_eq!(
            lab.fs.ops(),
            vec![format!("write {bs}/control=fd_dev_size=2147483648")]
        );
        assert!(info_of(&lab, VOL_A, "fileio_0").contains("Size: 2147483648"));
    }

    #[tokio::test]
    async fn refresh_size_recreates_the_fileio_backstore_when_lio_refuses() {
        let lab = lab();
        lab.fs.state.lock().unwrap().live_fd_size = false;
        let a = spec(VOL_A, file_path(VOL_A), &[INIT_1], chap("alice", SECRET));
        lab.exp.export(&a).await.unwrap();
        let before = lab.fs.tree();
        lab.disks
            .lock()
            .unwrap()
            .insert(file_path(VOL_A), BackingKind::File(2 << 30));
        lab.fs.clear_ops();
        lab.exp.refresh_size(&a).await.unwrap();
        assert!(info_of(&lab, VOL_A, "fileio_0").contains("Size: 2147483648"));
        // Same tree: same serial, LUN and mappings back, TPG never disabled.
        assert_eq!(lab.fs.tree(), before);
        let ops = lab.fs.ops();
        assert!(
            ops.contains(&format!("rmdir target/core/fileio_0/{}", target(VOL_A))),
            "{ops:?}"
        );
        assert!(!ops.iter().any(|o| o.contains("tpgt_1/enable")), "{ops:?}");
    }

    #[tokio::test]
    async fn refresh_size_of_a_block_device_changes_nothing() {
        let lab = lab();
        let a = spec(VOL_A, "/dev/pdisk/vol-a".into(), &[INIT_1], None);
        lab.exp.export(&a).await.unwrap();
        lab.fs.clear_ops();
        lab.exp.refresh_size(&a).await.unwrap();
        assert!(lab.fs.ops().is_empty(), "{:?}", lab.fs.ops());
    }

    #[tokio::test]
    async fn refresh_size_of_a_missing_target_is_not_found() {
        let lab = lab();
        let e = lab
            .exp
            .refresh_size(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    // ---- secrets ---------------------------------------------------------------

    /// A tracing writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<StdMutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_secret_reaches_only_the_password_attribute() {
        // While a single subscriber is registered, tracing computes a
        // callsite's interest with the subscriber of whichever thread hits
        // it first: a lio callsite first reached by another test's thread
        // (no subscriber) would be off for ours too. A second registered
        // subscriber makes tracing ask every live one instead.
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let log = Captured::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // Callsites whose registration was under way meanwhile: recompute.
        std::thread::sleep(Duration::from_millis(50));
        tracing::callsite::rebuild_interest_cache();

        let lab = lab();
        lab.exp
            .export(&spec(
                VOL_A,
                file_path(VOL_A),
                &[INIT_1, INIT_2],
                chap("alice", SECRET),
            ))
            .await
            .unwrap();
        // Re-keyed, then a failure right after the secret was written.
        lab.fs
            .fail_writes(&format!("{INIT_1}/lun_1/write_protect"), libc::EIO);
        let mut s = spec(
            VOL_A,
            file_path(VOL_A),
            &[INIT_1, INIT_2],
            chap("alice", SECRET_2),
        );
        s.initiators.reverse();
        lab.fs.reboot();
        let e = lab.exp.export(&s).await.unwrap_err();
        let r = lab.exp.restore(std::slice::from_ref(&s)).await.unwrap();

        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("lio: created target"),
            "nothing captured: {text}"
        );
        assert!(text.contains("<redacted>"));
        for secret in [SECRET, SECRET_2] {
            assert!(!text.contains(secret), "secret in the log:\n{text}");
            assert!(!e.message().contains(secret) && !format!("{e:?}").contains(secret));
            assert!(!format!("{r:?}").contains(secret));
            assert!(!format!("{s:?}").contains(secret));
            for argv in lab.runner.calls() {
                assert!(!argv.iter().any(|a| a.contains(secret)), "{argv:?}");
            }
            for op in lab.fs.ops() {
                if op.contains(secret) {
                    assert!(op.contains("/auth/password="), "{op}");
                    assert!(!op.ends_with('\n'), "{op}");
                }
            }
        }
    }

    // ---- check -----------------------------------------------------------------

    #[tokio::test]
    async fn check_passes_when_lio_is_loaded_and_makes_the_iscsi_group() {
        let lab = lab();
        lab.exp.check().await.unwrap();
        assert!(lab.fs.root.join("target/iscsi/lio_version").exists());
        assert!(lab.runner.calls().is_empty());
    }

    #[tokio::test]
    async fn check_without_configfs_is_unavailable() {
        let lab = lab();
        std::fs::remove_dir_all(lab.fs.root.join("target")).unwrap();
        lab.fs.state.lock().unwrap().mounted = false;
        let e = lab.exp.check().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.message().contains("configfs is not mounted"), "{e}");
        let e = lab
            .exp
            .export(&spec(VOL_A, file_path(VOL_A), &[INIT_1], None))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(lab.runner.calls().is_empty());
    }

    #[tokio::test]
    async fn check_loads_missing_modules_with_modprobe_once() {
        let (dir, fs) = FakeConfigFs::new();
        std::fs::remove_dir_all(fs.root.join("target")).unwrap();
        fs.state.lock().unwrap().iscsi_loadable = false;
        // modprobe "loads" what it is asked for.
        let f2 = fs.clone();
        let runner = FakeRunner::with(move |argv| {
            match argv[1].as_str() {
                "target_core_mod" => f2.load_core(),
                "iscsi_target_mod" => f2.state.lock().unwrap().iscsi_loadable = true,
                _ => return Ok(Output::failed(1, "modprobe: FATAL: Module not found")),
            }
            Ok(Output::ok(""))
        });
        let lab = lab_on(dir, fs, runner);
        lab.exp.check().await.unwrap();
        assert_eq!(
            lab.runner.command_lines(),
            vec!["modprobe target_core_mod", "modprobe iscsi_target_mod"]
        );
        lab.exp.check().await.unwrap();
        assert_eq!(lab.runner.calls().len(), 2);
    }

    #[tokio::test]
    async fn check_reports_modules_that_do_not_load_and_tries_only_once() {
        let (dir, fs) = FakeConfigFs::new();
        std::fs::remove_dir_all(fs.root.join("target")).unwrap();
        let runner = FakeRunner::with(|_| {
            Ok(Output::failed(
                1,
                "modprobe: FATAL: Module target_core_mod not found",
            ))
        });
        let lab = lab_on(dir, fs, runner);
        let e = lab.exp.check().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.message().contains("target_core_mod"), "{e}");
        assert!(e.message().contains("not found"), "{e}");
        let e = lab.exp.check().await.unwrap_err();
        assert!(e.message().contains("tried already"), "{e}");
        assert_eq!(lab.runner.calls().len(), 1);

        // The iSCSI fabric that can't be loaded.
        let (dir, fs) = FakeConfigFs::new();
        fs.state.lock().unwrap().iscsi_loadable = false;
        let lab = lab_on(dir, fs, FakeRunner::new());
        let e = lab.exp.check().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.message().contains("iscsi_target_mod"), "{e}");
        assert_eq!(
            lab.runner.command_lines(),
            vec!["modprobe iscsi_target_mod"]
        );
    }

    #[test]
    fn helpers() {
        assert!(owns(PREFIX, &format!("{PREFIX}:x")));
        assert!(owns(PREFIX, PREFIX));
        assert!(!owns(PREFIX, &format!("{PREFIX}x:y")));
        assert_eq!(unit_serial(&target(VOL_A)), VOL_A);
        assert_eq!(unit_serial("iqn.2026-11.io.x"), "iqn.2026-11.io.x");
        assert_eq!(backstore_hba("fileio_12"), Some("fileio"));
        assert_eq!(backstore_hba("pscsi_0"), None);
        assert_eq!(backstore_hba("iblock_"), None);
        assert_eq!(
            link_tail(Path::new("../../../../../../target/core/fileio_0/iqn.x:y")),
            Some(("fileio_0".into(), "iqn.x:y".into()))
        );
        let info = "TCM FILEIO ID: 0        File: /a/b.raw  Size: 4096  Mode: O_DSYNC Async: 0\n";
        assert_eq!(info_field(info, "File"), Some("/a/b.raw"));
        assert_eq!(info_field(info, "Size"), Some("4096"));
        let real =
            "Status: ACTIVATED  Max Queue Depth: 128  SectorSize: 512  HwMaxSectors: 16384\n\
                    TCM FILEIO ID: 0        File: /a.raw  Size: 8192  Mode: O_DSYNC Async: 0\n";
        assert_eq!(info_field(real, "Size"), Some("8192"));
        assert_eq!(info_field(real, "Mode"), Some("O_DSYNC"));
        assert_eq!(info_field("SectorSize: 512", "Size"), None);
        assert_eq!(chap_value("NULL\n"), None);
        assert_eq!(chap_value("\n"), None);
        assert_eq!(chap_value("alice\n"), Some("alice"));
    }
}
