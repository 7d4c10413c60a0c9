//! The tgt exporter: publishes volumes through userspace tgtd (Debian `tgt`).
//!
//! What it owns: the tgtd targets whose IQN carries the configured prefix
//! (one target per exported volume, the volume on LUN 1, an ACL of initiator
//! names, at most one incoming CHAP account), and the CHAP accounts bound to
//! them. Everything else in tgtd (other targets, global accounts, portals) is
//! left alone; a CHAP user shared with a target we do not own is refused.
//!
//! How it talks to tgtd:
//! - `tgtadm -C <control port> --lld iscsi ...` through the [`CommandRunner`],
//!   argv only, with a timeout on every call;
//! - CHAP accounts are created by writing a request to tgtd's management
//!   socket (`<ipc_socket_dir>/socket.<control port>`, the protocol of tgt's
//!   `usr/tgtadm.h`) ourselves, because `tgtadm --mode account --op new`
//!   takes the password on its command line, where every local user can read
//!   it in `/proc/*/cmdline` and where our runner would log it. Secrets never
//!   appear in argv, logs or error messages.
//!
//! Facts about tgt 1.0.85 (Debian 12) this code relies on, all checked
//! against a real tgtd (see `tests/tgt_exporter.rs`):
//! - tgtd keeps everything in memory; targets need numeric tids, which we
//!   map from IQNs by listing, picking the lowest free tid for new targets.
//!   Mutations are serialized by a mutex so two exports can't pick one tid.
//! - A target with an empty ACL refuses every login, and a target with no
//!   incoming account accepts logins *without* CHAP. So a new target gets its
//!   CHAP account and its LUN before its ACL, and whenever the accounts of a
//!   target must change in a way that passes through "no account" (changing
//!   the user, or re-keying: tgt can't change a password in place, the
//!   account must be deleted and re-created), the target's ACL is emptied
//!   first ("closed") and restored last. Existing sessions are not affected;
//!   a login attempted in that window of a few milliseconds is refused and
//!   retried by the initiator. A crash in the window leaves the target closed,
//!   never open.
//! - tgtd segfaults on `--mode target --op show` when a target's incoming
//!   accounts have a hole (bind A, bind B, unbind A), so a target never gets
//!   more than one incoming account from us, and accounts are unbound in
//!   reverse listing order.
//! - `--params` is refused by `logicalunit --op new`; `thin_provisioning=1`
//!   is set with a following `--op update`. It is only enabled with the
//!   `rdwr` backing store, which turns UNMAP into hole punching. The `aio`
//!   store ignores UNMAP while tgt still advertises LBPRZ (reads of unmapped
//!   blocks return zeros), so with `aio` a guest would read stale data after
//!   a discard: thin provisioning stays off there.
//! - See [`TgtExporter::refresh_size`] for how a grown volume is shown.
//!
//! Files: this one holds the settings and the [`Exporter`] face; `tgtadm.rs`
//! runs tgtadm and maps its failures, `show.rs` parses its target listing,
//! `target.rs` converges one target to a spec, `accounts.rs` and `mgmt.rs`
//! create CHAP accounts over the management socket; `tests.rs` the unit tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::params::IscsiParams;
use super::{ExportSpec, Exporter, LiveExport, VOLUME_LUN};
use crate::error::{Error, Result};
use crate::runner::{BoxFuture, CommandRunner};
use crate::types::Iqn;
use accounts::{AccountAdder, MgmtSocket};
use show::TgtTarget;
use tgtadm::tgtadm_failure;

mod accounts;
mod mgmt;
mod show;
mod target;
#[cfg(test)]
mod tests;
mod tgtadm;

/// Timeout of every tgtadm call and management-socket request.
const TGTADM_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a LUN deletion is tried while tgtd reports it busy.
const LUN_BUSY_ATTEMPTS: u32 = 10;

/// The backing store with which tgt implements UNMAP (by punching holes).
const THIN_BSTYPE: &str = "rdwr";

/// Settings of a [`TgtExporter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TgtConfig {
    /// tgtd's control port (`tgtd -C N`, `tgtadm -C N`). tgt keeps it in a
    /// C `short`: at most 32767.
    pub control_port: u32,
    /// `host:port` initiators connect to.
    pub portal: String,
    /// IQN prefix of the targets this exporter owns.
    pub iqn_prefix: String,
    /// tgt backing store type: `rdwr` (honours flushes, thin provisioning)
    /// or `aio` (skips flushes).
    pub bstype: String,
    /// The tgtadm program.
    pub tgtadm: String,
    /// Directory of tgtd's management sockets (`socket.<control_port>`).
    pub ipc_socket_dir: PathBuf,
    /// The iSCSI parameters every new target offers (tgtadm `--op update
    /// --name K --value V`, set before its ACL opens). Empty: tgt's own
    /// (8 KiB data PDUs, `InitialR2T=Yes`); pdiskd passes
    /// `IscsiParams::measured_default()` unless told otherwise. A target
    /// keeps the parameters it was created with.
    pub params: IscsiParams,
}

impl Default for TgtConfig {
    fn default() -> Self {
        TgtConfig {
            control_port: 0,
            portal: "127.0.0.1:3260".into(),
            iqn_prefix: "iqn.2026-11.io.stratus.pdisk".into(),
            // rdwr, measured by stratus-bench (datapath): as fast as aio once
            // guest flushes are counted, and tgt 1.0.85's aio store
            // acknowledges SYNCHRONIZE CACHE without syncing anything.
            bstype: "rdwr".into(),
            tgtadm: "tgtadm".into(),
            ipc_socket_dir: PathBuf::from("/var/run/tgtd"),
            params: IscsiParams::default(),
        }
    }
}

/// An [`Exporter`] driving userspace tgtd.
pub struct TgtExporter {
    runner: Arc<dyn CommandRunner>,
    cfg: TgtConfig,
    accounts: Arc<dyn AccountAdder>,
    /// Serializes every change of tgtd's state made by this exporter.
    lock: Mutex<()>,
}

impl TgtExporter {
    pub fn new(runner: Arc<dyn CommandRunner>, cfg: TgtConfig) -> Self {
        let accounts = Arc::new(MgmtSocket {
            path: cfg
                .ipc_socket_dir
                .join(format!("socket.{}", cfg.control_port)),
            control_port: cfg.control_port,
        });
        Self::with_accounts(runner, cfg, accounts)
    }

    fn with_accounts(
        runner: Arc<dyn CommandRunner>,
        mut cfg: TgtConfig,
        accounts: Arc<dyn AccountAdder>,
    ) -> Self {
        // Target IQNs are lower case (see `Iqn`); so is the prefix we compare.
        cfg.iqn_prefix = cfg.iqn_prefix.to_ascii_lowercase();
        TgtExporter {
            runner,
            cfg,
            accounts,
            lock: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &TgtConfig {
        &self.cfg
    }

    /// True when `iqn` is the prefix or continues it after `:` or `.`.
    fn owns(&self, iqn: &str) -> bool {
        let prefix = self.cfg.iqn_prefix.as_str();
        match iqn.strip_prefix(prefix) {
            Some(rest) => {
                rest.is_empty() || prefix.ends_with([':', '.']) || rest.starts_with([':', '.'])
            }
            None => false,
        }
    }

    fn check_owned(&self, iqn: &Iqn) -> Result<()> {
        if self.owns(iqn.as_str()) {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "target {iqn} lacks the prefix {} of targets this tgt exporter owns",
                self.cfg.iqn_prefix
            )))
        }
    }

    fn check_port(&self) -> Result<()> {
        if self.cfg.control_port > i16::MAX as u32 {
            return Err(Error::invalid(format!(
                "tgtd control port {} is above 32767, the largest tgt accepts",
                self.cfg.control_port
            )));
        }
        Ok(())
    }

    fn tgtd(&self) -> String {
        format!("tgtd (control port {})", self.cfg.control_port)
    }
}

impl Exporter for TgtExporter {
    fn kind(&self) -> &'static str {
        "tgt"
    }

    fn portal(&self) -> String {
        self.cfg.portal.clone()
    }

    fn iqn_prefix(&self) -> &str {
        &self.cfg.iqn_prefix
    }

    fn export<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(&spec.target_iqn)?;
            let _guard = self.lock.lock().await;
            let targets = self.show().await?;
            self.export_locked(spec, targets, false)
                .await
                .map_err(|e| e.context(format!("exporting {}", spec.target_iqn)))
        })
    }

    fn unexport<'a>(&'a self, target_iqn: &'a Iqn) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(target_iqn)?;
            let _guard = self.lock.lock().await;
            self.unexport_locked(target_iqn)
                .await
                .map_err(|e| e.context(format!("unexporting {target_iqn}")))
        })
    }

    /// tgt reads a backing file's size only when it opens it, and 1.0.85 has
    /// no resize operation. Re-opening in place (`--op update --params
    /// online=0,path=P`) would keep the LUN, but with the `aio` store it
    /// fails to set up a new AIO context and leaves the LUN offline with no
    /// backing file. So LUN 1 is deleted and re-created on the same file:
    /// tgt allows that while initiators are logged in (it refuses only while
    /// commands are queued, which `lun_delete` retries), keeps the SCSI
    /// ID and serial (derived from tid and LUN), and raises "reported LUNs
    /// data has changed" on existing sessions. New logins see the new size
    /// at once; a logged-in initiator sees it when it reads the capacity
    /// again (QEMU: `block_resize`; Linux: a SCSI rescan). Commands arriving
    /// in the millisecond between the two steps fail and are retried by the
    /// initiator's SCSI layer.
    fn refresh_size<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.check_owned(&spec.target_iqn)?;
            let _guard = self.lock.lock().await;
            let targets = self
                .show()
                .await
                .map_err(|e| e.context(format!("refreshing the size of {}", spec.target_iqn)))?;
            if !targets.iter().any(|t| t.iqn == spec.target_iqn.as_str()) {
                return Err(Error::not_found(format!(
                    "target {} is not exported by {}",
                    spec.target_iqn,
                    self.tgtd()
                )));
            }
            self.export_locked(spec, targets, true)
                .await
                .map_err(|e| e.context(format!("refreshing the size of {}", spec.target_iqn)))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveExport>>> {
        Box::pin(async move {
            Ok(self
                .show()
                .await?
                .iter()
                .filter(|t| self.owns(&t.iqn))
                .map(TgtTarget::to_live)
                .collect())
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check_port()?;
            let cmd = self.tgtadm_cmd(&["--mode", "system", "--op", "show"]);
            let cause = match self.runner.run(&cmd).await {
                Err(e) => e.message().to_owned(),
                Ok(out) => match tgtadm_failure(&cmd, &out) {
                    Some(e) => e.message().to_owned(),
                    // "LLDs:\n    iscsi: ready"
                    None if out.stdout.lines().any(|l| l.trim() == "iscsi: ready") => return Ok(()),
                    None => "its iscsi driver is not ready".to_owned(),
                },
            };
            Err(Error::unavailable(format!(
                "{} is not answering: {cause}",
                self.tgtd()
            )))
        })
    }
}
