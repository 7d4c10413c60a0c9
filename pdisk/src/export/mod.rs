//! Exporters publish volumes to initiators over iSCSI.
//!
//! The service layer only sees the [`Exporter`] trait. Two implementations:
//! `tgt` (userspace tgtd, driven by tgtadm and its management socket; the
//! portable one, for hosts and tests) and `lio` (the kernel's LIO target,
//! written straight into configfs; production, with the `lvm` backend);
//! and `rbd`, which serves nothing: the rbd backend's images are opened by
//! Ceph's own client, so its exports are records only.
//! [`MemoryExporter`] is the unit-tier fake. Each exported volume gets
//! one target whose IQN is derived from the volume UUID, with the volume as
//! LUN 1, an ACL of initiator names, and optional one-way CHAP.
//!
//! Invariants:
//! - `export` is idempotent and converges: after it returns, the live target
//!   matches the spec exactly (LUN backing path, ACL, CHAP user), whatever was
//!   there before. Re-running it after a crash or a tgtd restart is the
//!   restore path.
//! - `unexport` of a target that does not exist succeeds.
//! - Exporters never touch targets whose IQN lacks the configured prefix.

pub mod lio;
pub mod nvmet;
pub mod params;
pub mod rbd;
pub mod tgt;

pub use params::{IscsiKey, IscsiParams, IscsiValue};
pub use tgt::{TgtConfig, TgtExporter};

use std::path::PathBuf;

use crate::error::Result;
use crate::runner::BoxFuture;
use crate::types::{Chap, Iqn};

/// The LUN number every pdisk target exposes its volume on.
pub const VOLUME_LUN: u32 = 1;

/// What an export should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub target_iqn: Iqn,
    /// File or block device holding the volume's data.
    pub backing_path: PathBuf,
    pub initiators: Vec<Iqn>,
    pub chap: Option<Chap>,
}

/// An export as the exporter sees it live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveExport {
    pub target_iqn: String,
    /// What the target's LUN 1 serves, when that can be read.
    pub backing_path: Option<PathBuf>,
    pub initiators: Vec<String>,
    pub chap_user: Option<String>,
    /// The target's CHAP user (mutual CHAP: tgt's outgoing account, LIO's
    /// `userid_mutual`).
    pub chap_target_user: Option<String>,
    pub health: ExportHealth,
}

/// Whether a live target is whole: every part an initiator needs is in
/// place. A target that is not never matches its spec, so `restore` (and
/// the export watchdog) re-applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportHealth {
    Whole,
    /// A part is missing or differs (LIO: a TPG not enabled, a LUN not
    /// linked, a mapped LUN gone, a fileio size behind its file...); why.
    Broken(String),
}

impl ExportHealth {
    pub fn is_whole(&self) -> bool {
        matches!(self, ExportHealth::Whole)
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Targets re-created or corrected.
    pub restored: Vec<String>,
    /// Targets that matched already.
    pub unchanged: Vec<String>,
    /// Live targets with our prefix that no spec asked for (left in place).
    pub unknown: Vec<String>,
    /// Targets that could not be restored, with the cause.
    pub failed: Vec<(String, String)>,
}

pub trait Exporter: Send + Sync {
    /// "tgt", "lio", "nvmet" or "rbd".
    fn kind(&self) -> &'static str;

    /// True when clients open volumes with the storage's own client and
    /// no target serves them (rbd): exports then carry no CHAP and need
    /// no watchdog.
    fn native_client(&self) -> bool {
        false
    }

    /// False when the target can't authenticate initiators (nvmet on a
    /// kernel without DH-HMAC-CHAP): pdiskd then keeps no CHAP for its
    /// exports and the initiator list is the only access control.
    fn authenticates(&self) -> bool {
        true
    }

    /// `host:port` initiators connect to.
    fn portal(&self) -> String;

    /// The IQN prefix of targets this exporter owns, e.g. `iqn.2026-11.io.stratus.pdisk`.
    fn iqn_prefix(&self) -> &str;

    /// Creates or corrects the target so that it matches `spec`.
    fn export<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>>;

    /// Removes the target; succeeds when it does not exist.
    fn unexport<'a>(&'a self, target_iqn: &'a Iqn) -> BoxFuture<'a, Result<()>>;

    /// Makes initiators see the new size of a grown backing file or device.
    fn refresh_size<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>>;

    /// Every live target carrying our prefix.
    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveExport>>>;

    /// Ok when the target daemon answers; Unavailable otherwise.
    fn check(&self) -> BoxFuture<'_, Result<()>>;

    /// Makes the live state match `specs`: missing or different targets are
    /// (re-)created; unknown ones are reported, never removed.
    fn restore<'a>(&'a self, specs: &'a [ExportSpec]) -> BoxFuture<'a, Result<RestoreReport>> {
        Box::pin(async move {
            let live = self.list().await?;
            let mut report = RestoreReport::default();
            for spec in specs {
                let current = live
                    .iter()
                    .find(|l| l.target_iqn == spec.target_iqn.as_str());
                if current.is_some_and(|l| matches_spec(l, spec)) {
                    report.unchanged.push(spec.target_iqn.to_string());
                    continue;
                }
                match self.export(spec).await {
                    Ok(()) => report.restored.push(spec.target_iqn.to_string()),
                    Err(e) => report
                        .failed
                        .push((spec.target_iqn.to_string(), e.to_string())),
                }
            }
            for l in &live {
                if !specs.iter().any(|s| s.target_iqn.as_str() == l.target_iqn) {
                    report.unknown.push(l.target_iqn.clone());
                }
            }
            Ok(report)
        })
    }
}

/// True when the live target is whole and has the spec's backing path,
/// exactly its initiators (in any order), and its CHAP user.
pub fn matches_spec(live: &LiveExport, spec: &ExportSpec) -> bool {
    let mut want: Vec<&str> = spec.initiators.iter().map(Iqn::as_str).collect();
    let mut have: Vec<&str> = live.initiators.iter().map(String::as_str).collect();
    want.sort_unstable();
    have.sort_unstable();
    live.health.is_whole()
        && live.backing_path.as_deref() == Some(spec.backing_path.as_path())
        && want == have
        && live.chap_user.as_deref() == spec.chap.as_ref().map(|c| c.user.as_str())
        && live.chap_target_user.as_deref() == spec_target_user(spec)
}

/// The target's CHAP user a spec asks for (mutual CHAP).
pub fn spec_target_user(spec: &ExportSpec) -> Option<&str> {
    spec.chap
        .as_ref()
        .and_then(Chap::mutual)
        .map(|t| t.user.as_str())
}

/// An in-memory exporter for unit tests of the service layer.
#[derive(Default)]
pub struct MemoryExporter {
    targets: std::sync::Mutex<std::collections::BTreeMap<String, LiveExport>>,
    /// When set, every call fails with Unavailable (a daemon that is down).
    pub down: std::sync::atomic::AtomicBool,
    /// When set, it can't authenticate initiators (as nvmet without
    /// DH-HMAC-CHAP) and refuses specs with CHAP, as nvmet's exporter does.
    pub no_auth: std::sync::atomic::AtomicBool,
}

impl MemoryExporter {
    fn up(&self) -> Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(crate::error::Error::unavailable("memory exporter is down"))
        } else {
            Ok(())
        }
    }

    /// Forgets every target, as tgtd does when it restarts.
    pub fn forget_all(&self) {
        self.targets.lock().unwrap().clear();
    }
}

impl Exporter for MemoryExporter {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn authenticates(&self) -> bool {
        !self.no_auth.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn portal(&self) -> String {
        "127.0.0.1:3260".into()
    }
    fn iqn_prefix(&self) -> &str {
        "iqn.2026-11.io.stratus.test"
    }
    fn export<'a>(&'a self, spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.up()?;
            if spec.chap.is_some() && !self.authenticates() {
                return Err(crate::error::Error::invalid("this exporter has no CHAP"));
            }
            self.targets.lock().unwrap().insert(
                spec.target_iqn.to_string(),
                LiveExport {
                    target_iqn: spec.target_iqn.to_string(),
                    backing_path: Some(spec.backing_path.clone()),
                    initiators: spec.initiators.iter().map(|i| i.to_string()).collect(),
                    chap_user: spec.chap.as_ref().map(|c| c.user.clone()),
                    chap_target_user: spec_target_user(spec).map(str::to_owned),
                    health: ExportHealth::Whole,
                },
            );
            Ok(())
        })
    }
    fn unexport<'a>(&'a self, target_iqn: &'a Iqn) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.up()?;
            self.targets.lock().unwrap().remove(target_iqn.as_str());
            Ok(())
        })
    }
    fn refresh_size<'a>(&'a self, _spec: &'a ExportSpec) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.up() })
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveExport>>> {
        Box::pin(async move {
            self.up()?;
            Ok(self.targets.lock().unwrap().values().cloned().collect())
        })
    }
    fn check(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.up() })
    }
}
