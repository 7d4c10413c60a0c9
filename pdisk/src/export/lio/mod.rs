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
//!            [default_cmdsn_depth = N]    (--iscsi-params QueueDepth)
//!     param/<key> = <value>            (--iscsi-params: MaxBurstLength, InitialR2T...)
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
//!
//! Files: this one holds the settings and the async [`Exporter`] face;
//! `configfs.rs` the host it acts on (configfs, backing files), `tree.rs`
//! the blocking configuration state with its paths and primitives,
//! `backstore.rs` and `target.rs` the two halves of an export, `live.rs`
//! the live tree read back; `fake_configfs.rs` and `tests.rs` the unit tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::params::IscsiParams;
use super::{ExportSpec, Exporter, LiveExport, VOLUME_LUN};
use crate::error::{Error, Result};
use crate::runner::{run_checked, BoxFuture, Cmd, CommandRunner};
use crate::types::{Chap, Iqn};
use configfs::{stat_backing, ConfigFs, KernelConfigFs, StatFn};
use tree::{Lio, Probe};

mod backstore;
pub(super) mod configfs;
#[cfg(test)]
mod fake_configfs;
mod live;
mod target;
#[cfg(test)]
mod tests;
mod tree;

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
    /// What every TPG offers at login (`param/<key>`, the queue depth as
    /// `attrib/default_cmdsn_depth`), converged at every export. Empty:
    /// LIO's own; pdiskd passes `IscsiParams::measured_default()`.
    pub params: IscsiParams,
}

impl Default for LioConfig {
    fn default() -> Self {
        LioConfig {
            configfs_root: PathBuf::from("/sys/kernel/config"),
            portal: "127.0.0.1:3260".into(),
            iqn_prefix: "iqn.2026-11.io.stratus.pdisk".into(),
            fileio_write_back: true,
            modprobe: "modprobe".into(),
            params: IscsiParams::default(),
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
pub(in crate::export) fn owns(prefix: &str, iqn: &str) -> bool {
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
    // The target's account (mutual CHAP) lands in the same kind of attribute.
    check_chap(chap.mutual())
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
