//! The nvmet exporter: publishes volumes over NVMe/TCP through the Linux
//! kernel's NVMe target (nvmet, nvmet-tcp), configured by writing configfs
//! directly (no nvmetcli, no shell). Only `modprobe` is ever run.
//!
//! Names: the service layer keys exports by target IQN and initiator IQN,
//! whatever the transport; this exporter maps them with
//! [`Iqn::to_nqn`](crate::types::Iqn::to_nqn) (`iqn.REST` -> `nqn.REST`), so
//! a volume's subsystem is `nqn.<prefix>:<volume uuid>` and an agent's host
//! NQN is `nqn.` + the rest of the IQN its certificate binds. `eui.`
//! initiators are refused.
//!
//! What it owns, under `<configfs>/nvmet/` (`/sys/kernel/config/nvmet/`):
//!
//! ```text
//! subsystems/<NQN>/
//!     attr_allow_any_host = 0          only the hosts linked below connect
//!     attr_serial = <volume uuid, 20 hex digits>   (at creation only)
//!     namespaces/1/
//!         device_path = <LV or file>, device_uuid = <volume uuid>
//!         enable = 1                   (0 while device_path/uuid change)
//!     allowed_hosts/<host NQN> -> hosts/<host NQN>
//! hosts/<host NQN>/                    shared by subsystems; removed when
//!                                      no subsystem links it any more
//! ports/<port id>/                     one port, --nvmet-port-id (1)
//!     addr_trtype = tcp, addr_adrfam = ipv4|ipv6,
//!     addr_traddr, addr_trsvcid        the configured portal
//!     subsystems/<NQN> -> subsystems/<NQN>   (last: connections start here)
//! ```
//!
//! **Access control is weaker than LIO's.** This kernel (Debian 6.1 cloud)
//! is built without `CONFIG_NVME_TARGET_AUTH`: nvmet has no DH-HMAC-CHAP,
//! so a host is admitted by the host NQN it *claims* in its Connect
//! command, nothing proves it. Anyone who can reach the port and knows
//! (or guesses) an allowed host NQN and the subsystem NQN gets the volume.
//! Exports with CHAP are refused here (pdiskd drops the CHAP of an nvmet
//! export, see `ExportService`); keep the port on a storage network only
//! agents reach. iSCSI with (mutual) CHAP on LIO is the authenticated
//! transport.
//!
//! Facts about nvmet this relies on (Linux 6.1, `drivers/nvme/target/
//! configfs.c`, tried in the lab VM): a port's `addr_*` can't change while a
//! subsystem is linked to it (EACCES); a namespace's `device_path` and
//! `device_uuid` can't change while it is enabled (EBUSY); a host can't be
//! linked while `attr_allow_any_host` is 1 and vice versa (EINVAL);
//! `attr_serial` can't change once a host has identified the subsystem.
//! Removing an `allowed_hosts` link does **not** drop the connections that
//! host already has: so when hosts are revoked the subsystem is unlinked
//! from the port and linked again, which deletes every controller of it on
//! that port (`nvmet_port_del_ctrls`); the hosts still allowed reconnect by
//! themselves (nvme-tcp retries every `reconnect_delay`, 10 s, for
//! `ctrl_loss_tmo`, 600 s). nvmet forgets everything at reboot; pdiskd
//! re-applies its exports with [`Exporter::restore`].
//!
//! Files: this one the settings and the async face, `tree.rs` the blocking
//! configfs logic, `fake_configfs.rs` and `tests.rs` the unit tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::lio::configfs::{stat_backing, ConfigFs, KernelConfigFs, StatFn};
use super::{ExportSpec, Exporter, LiveExport};
use crate::error::{Error, Result};
use crate::runner::{run_checked, BoxFuture, Cmd, CommandRunner};
use crate::types::Iqn;
use tree::{Nvmet, Probe};

#[cfg(test)]
mod fake_configfs;
#[cfg(test)]
mod tests;
mod tree;

/// The namespace id of every volume in its subsystem.
pub const NSID: u32 = 1;
const MODPROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of an [`NvmetExporter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmetConfig {
    /// Where configfs is mounted.
    pub configfs_root: PathBuf,
    /// `IP:PORT` the port listens on (NVMe/TCP's port is 4420).
    pub portal: String,
    /// The nvmet port (`ports/<id>`) this exporter owns.
    pub port_id: u32,
    /// IQN prefix of the targets this exporter owns (their subsystems carry
    /// its NQN form).
    pub iqn_prefix: String,
    /// The modprobe program.
    pub modprobe: String,
}

impl Default for NvmetConfig {
    fn default() -> Self {
        NvmetConfig {
            configfs_root: PathBuf::from("/sys/kernel/config"),
            portal: "127.0.0.1:4420".into(),
            port_id: 1,
            iqn_prefix: "iqn.2026-11.io.stratus.pdisk".into(),
            modprobe: "modprobe".into(),
        }
    }
}

/// An [`Exporter`] writing the kernel's nvmet configuration in configfs.
pub struct NvmetExporter {
    nv: Arc<Nvmet>,
    runner: Arc<dyn CommandRunner>,
    /// Serializes every change of nvmet's state made by this exporter.
    lock: Mutex<()>,
    /// modprobe is tried at most once per process.
    tried: AtomicBool,
}

impl NvmetExporter {
    /// Fails on a portal that is not `IP:PORT` (nvmet listens on an address).
    pub fn new(runner: Arc<dyn CommandRunner>, cfg: NvmetConfig) -> Result<Self> {
        Self::with_host(
            runner,
            cfg,
            Arc::new(KernelConfigFs),
            Arc::new(stat_backing),
        )
    }

    fn with_host(
        runner: Arc<dyn CommandRunner>,
        mut cfg: NvmetConfig,
        fs: Arc<dyn ConfigFs>,
        stat: Arc<StatFn>,
    ) -> Result<Self> {
        cfg.iqn_prefix = cfg.iqn_prefix.to_ascii_lowercase();
        let addr: SocketAddr = cfg.portal.parse().map_err(|_| {
            Error::invalid(format!(
                "nvmet portal {:?} must be IP:PORT (e.g. 192.0.2.10:4420)",
                cfg.portal
            ))
        })?;
        let nqn_prefix = match cfg.iqn_prefix.strip_prefix("iqn.") {
            Some(rest) => format!("nqn.{rest}"),
            None => {
                return Err(Error::invalid(format!(
                    "nvmet needs an iqn. prefix to derive NQNs from, not {:?}",
                    cfg.iqn_prefix
                )))
            }
        };
        Ok(NvmetExporter {
            nv: Arc::new(Nvmet {
                cfg,
                addr,
                nqn_prefix,
                fs,
                stat,
            }),
            runner,
            lock: Mutex::new(()),
            tried: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &NvmetConfig {
        &self.nv.cfg
    }

    fn check_owned(&self, iqn: &Iqn) -> Result<()> {
        if super::lio::owns(&self.nv.cfg.iqn_prefix, iqn.as_str()) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "target {iqn} lacks the prefix {} of targets this nvmet exporter owns",
                self.nv.cfg.iqn_prefix
            )))
        }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Nvmet) -> Result<T> + Send + 'static,
    {
        let nv = self.nv.clone();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        tokio::task::spawn_blocking(move || tracing::dispatcher::with_default(&dispatch, || f(&nv)))
            .await
            .map_err(|e| Error::internal(format!("nvmet configfs task failed: {e}")))?
    }

    /// Makes sure configfs is mounted and nvmet and nvmet-tcp are loaded
    /// (modprobe once per process; the kernel would load nvmet-tcp itself
    /// when the port is enabled, if its modprobe helper works).
    async fn ensure_nvmet(&self) -> Result<()> {
        let probe = self.blocking(|nv| Ok(nv.probe())).await?;
        let cause = match probe {
            Probe::Ready if self.tried.load(Ordering::SeqCst) => return Ok(()),
            Probe::Ready => None,
            Probe::NotMounted(why) => return Err(Error::unavailable(why)),
            Probe::NoCore(why) => Some(why),
        };
        if self.tried.swap(true, Ordering::SeqCst) {
            if let Some(why) = cause {
                return Err(Error::unavailable(format!(
                    "{why} (modprobe nvmet was tried already)"
                )));
            }
            return Ok(());
        }
        tracing::info!("nvmet: loading kernel modules nvmet, nvmet_tcp");
        let cmd = Cmd::new(self.nv.cfg.modprobe.clone())
            .args(["-a", "nvmet", "nvmet_tcp"])
            .timeout(MODPROBE_TIMEOUT);
        let loaded = run_checked(self.runner.as_ref(), &cmd).await;
        match (self.blocking(|nv| Ok(nv.probe())).await?, loaded) {
            (Probe::Ready, _) => Ok(()),
            (Probe::NotMounted(why), _) | (Probe::NoCore(why), Ok(_)) => {
                Err(Error::unavailable(why))
            }
            (Probe::NoCore(why), Err(e)) => Err(Error::unavailable(format!(
                "{why}; modprobe nvmet nvmet_tcp: {e}"
            ))),
        }
    }
}

impl Exporter for NvmetExporter {
    fn kind(&self) -> &'static str {
        "nvmet"
    }

    fn authenticates(&self) -> bool {
        false
    }

    fn portal(&self) -> String {
        self.nv.cfg.portal.clone()
    }

    fn iqn_prefix(&self) -> &str {
        &self.nv.cfg.iqn_prefix
    }

    fn export<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(&spec.target_iqn)?;
            let ctx = || format!("exporting {} over NVMe/TCP", spec.target_iqn);
            if spec.chap.is_some() {
                return Err(Error::invalid(
                    "nvmet on this kernel has no DH-HMAC-CHAP (CONFIG_NVME_TARGET_AUTH \
                     is off): an NVMe/TCP export can't carry CHAP; its only access \
                     control is the host NQN list",
                )
                .context(ctx()));
            }
            self.ensure_nvmet().await.map_err(|e| e.context(ctx()))?;
            let _guard = self.lock.lock().await;
            let owned = spec.clone();
            self.blocking(move |nv| nv.export(&owned))
                .await
                .map_err(|e| e.context(ctx()))
        })
    }

    fn unexport<'a>(&'a self, target_iqn: &'a Iqn) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(target_iqn)?;
            let ctx = || format!("unexporting {target_iqn} from nvmet");
            let _guard = self.lock.lock().await;
            let iqn = target_iqn.clone();
            self.blocking(move |nv| nv.unexport(&iqn))
                .await
                .map_err(|e| e.context(ctx()))
        })
    }

    /// nvmet reads a block device's size again when a host identifies the
    /// namespace; `revalidate_size` (written when the kernel has it) tells
    /// connected hosts at once (a namespace-changed event).
    fn refresh_size<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(&spec.target_iqn)?;
            let ctx = || format!("refreshing the size of {}", spec.target_iqn);
            self.ensure_nvmet().await.map_err(|e| e.context(ctx()))?;
            let _guard = self.lock.lock().await;
            let owned = spec.clone();
            self.blocking(move |nv| nv.refresh_size(&owned))
                .await
                .map_err(|e| e.context(ctx()))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveExport>>> {
        Box::pin(async move {
            self.ensure_nvmet().await?;
            self.blocking(|nv| nv.list()).await
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.ensure_nvmet().await })
    }
}
