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

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{ExportSpec, Exporter, LiveExport, VOLUME_LUN};
use crate::error::{Error, ErrorKind, Result};
use crate::runner::{exit_error, BoxFuture, Cmd, CommandRunner, Output};
use crate::types::{Chap, Iqn};

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

    // ---- tgtadm -------------------------------------------------------------

    fn tgtadm_cmd(&self, args: &[&str]) -> Cmd {
        Cmd::new(self.cfg.tgtadm.clone())
            .args(["-C", &self.cfg.control_port.to_string(), "--lld", "iscsi"])
            .args(args.iter().copied())
            .timeout(TGTADM_TIMEOUT)
    }

    /// Runs tgtadm with `args` (after `-C N --lld iscsi`) and returns stdout.
    async fn tgtadm(&self, args: &[&str]) -> Result<String> {
        self.check_port()?;
        let cmd = self.tgtadm_cmd(args);
        let what = tgtadm_what(args);
        let out = self
            .runner
            .run(&cmd)
            .await
            .map_err(|e| Error::new(e.kind(), format!("{what} on {}: {}", self.tgtd(), e)))?;
        match tgtadm_failure(&cmd, &out) {
            None => Ok(out.stdout),
            Some(e) => Err(e.context(format!("{what} on {}", self.tgtd()))),
        }
    }

    async fn show(&self) -> Result<Vec<TgtTarget>> {
        let out = self.tgtadm(&["--mode", "target", "--op", "show"]).await?;
        parse_target_show(&out)
    }

    async fn acl_bind(&self, tid: &str, initiator: &str) -> Result<()> {
        self.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            tid,
            "--initiator-name",
            initiator,
        ])
        .await
        .map(drop)
    }

    async fn acl_unbind(&self, tid: &str, entry: &str) -> Result<()> {
        self.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "unbind",
            "--tid",
            tid,
            acl_flag(entry),
            entry,
        ])
        .await
        .map(drop)
    }

    async fn account_bind(&self, tid: &str, user: &str, outgoing: bool) -> Result<()> {
        let mut args = vec![
            "--mode", "account", "--op", "bind", "--tid", tid, "--user", user,
        ];
        if outgoing {
            args.push("--outgoing");
        }
        self.tgtadm(&args).await.map(drop)
    }

    async fn account_unbind(&self, tid: &str, user: &str, outgoing: bool) -> Result<()> {
        let mut args = vec![
            "--mode", "account", "--op", "unbind", "--tid", tid, "--user", user,
        ];
        if outgoing {
            args.push("--outgoing");
        }
        self.tgtadm(&args).await.map(drop)
    }

    /// Unbinds every account of `t`, incoming ones in reverse listing order
    /// so that tgtd's account table never gets a hole.
    async fn account_unbind_all(&self, t: &TgtTarget) -> Result<()> {
        let tid = t.tid.to_string();
        if let Some(out) = &t.outgoing_account {
            self.account_unbind(&tid, out, true).await?;
        }
        for user in t.incoming_accounts.iter().rev() {
            self.account_unbind(&tid, user, false).await?;
        }
        Ok(())
    }

    async fn account_delete(&self, user: &str) -> Result<()> {
        self.tgtadm(&["--mode", "account", "--op", "delete", "--user", user])
            .await
            .map(drop)
    }

    /// Deletes those of `candidates` no target has bound any more.
    async fn delete_orphan_accounts(
        &self,
        candidates: &BTreeSet<String>,
        targets: &[TgtTarget],
    ) -> Result<()> {
        for user in candidates {
            if targets.iter().any(|t| t.uses_account(user)) {
                continue;
            }
            tracing::info!(user = %user, "tgt: deleting CHAP account no target uses");
            match self.account_delete(user).await {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                r => r?,
            }
        }
        Ok(())
    }

    async fn lun_new(&self, tid: &str, path: &str) -> Result<()> {
        self.tgtadm(&[
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            tid,
            "--lun",
            &VOLUME_LUN.to_string(),
            "--backing-store",
            path,
            "--bstype",
            &self.cfg.bstype,
        ])
        .await?;
        if self.thin() {
            self.lun_set_thin(tid, true).await?;
        }
        Ok(())
    }

    async fn lun_set_thin(&self, tid: &str, on: bool) -> Result<()> {
        let params = format!("thin_provisioning={}", u8::from(on));
        self.tgtadm(&[
            "--mode",
            "logicalunit",
            "--op",
            "update",
            "--tid",
            tid,
            "--lun",
            &VOLUME_LUN.to_string(),
            "--params",
            &params,
        ])
        .await
        .map(drop)
    }

    /// Deletes a LUN, retrying briefly while tgtd has commands queued on it
    /// (it refuses with "this logical unit is still active").
    async fn lun_delete(&self, tid: &str, lun: u64) -> Result<()> {
        let lun = lun.to_string();
        let args = [
            "--mode",
            "logicalunit",
            "--op",
            "delete",
            "--tid",
            tid,
            "--lun",
            &lun,
        ];
        let mut attempt = 1;
        loop {
            match self.tgtadm(&args).await {
                Err(e)
                    if e.kind() == ErrorKind::FailedPrecondition && attempt < LUN_BUSY_ATTEMPTS =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r.map(drop),
            }
        }
    }

    fn thin(&self) -> bool {
        self.cfg.bstype == THIN_BSTYPE
    }

    // ---- export -------------------------------------------------------------

    /// Creates the target `iqn` on the lowest free tid; retries when someone
    /// else took that tid (or created the target) meanwhile.
    async fn create_target(&self, iqn: &str, mut targets: Vec<TgtTarget>) -> Result<TgtTarget> {
        let mut attempt = 0;
        loop {
            if let Some(t) = targets.iter().find(|t| t.iqn == iqn) {
                return Ok(t.clone());
            }
            let tid = lowest_free_tid(&targets);
            let r = self
                .tgtadm(&[
                    "--mode",
                    "target",
                    "--op",
                    "new",
                    "--tid",
                    &tid.to_string(),
                    "--targetname",
                    iqn,
                ])
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(target = iqn, tid, "tgt: created target");
                    return Ok(TgtTarget {
                        tid,
                        iqn: iqn.to_owned(),
                        ..TgtTarget::default()
                    });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 3 => {
                    attempt += 1;
                    targets = self.show().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes target `spec.target_iqn` match `spec`, given the live
    /// `targets`. With `reopen_lun`, LUN 1 is re-created even when it already
    /// matches (see `refresh_size`).
    async fn export_locked(
        &self,
        spec: &ExportSpec,
        targets: Vec<TgtTarget>,
        reopen_lun: bool,
    ) -> Result<()> {
        let iqn = spec.target_iqn.as_str();
        let path = backing_path_arg(&spec.backing_path)?;
        let cur = self.create_target(iqn, targets.clone()).await?;
        let tid = cur.tid.to_string();

        // Initiators wanted, in the spec's order, without duplicates.
        let mut seen = BTreeSet::new();
        let wanted: Vec<&str> = spec
            .initiators
            .iter()
            .map(Iqn::as_str)
            .filter(|i| seen.insert(*i))
            .collect();

        // 1. Tighten: drop every ACL entry the spec doesn't ask for.
        let mut acl: Vec<String> = Vec::new();
        for entry in &cur.acl {
            if wanted.contains(&entry.as_str()) {
                acl.push(entry.clone());
            } else {
                self.acl_unbind(&tid, entry).await?;
            }
        }

        // 2. CHAP.
        self.converge_chap(&cur, spec.chap.as_ref(), &targets, &mut acl)
            .await?;

        // 3. LUN 1 on the backing path; no other LUNs (LUN 0 is tgt's controller).
        for lun in &cur.luns {
            if lun.lun != 0 && lun.lun != u64::from(VOLUME_LUN) {
                self.lun_delete(&tid, lun.lun).await?;
            }
        }
        match cur.lun(VOLUME_LUN) {
            None => self.lun_new(&tid, path).await?,
            Some(l)
                if !reopen_lun
                    && l.path.as_deref() == Some(spec.backing_path.as_path())
                    && l.bstype == self.cfg.bstype =>
            {
                if l.thin != self.thin() {
                    self.lun_set_thin(&tid, self.thin()).await?;
                }
            }
            Some(_) => {
                self.lun_delete(&tid, u64::from(VOLUME_LUN)).await?;
                self.lun_new(&tid, path).await?;
            }
        }

        // 4. Open: bind the initiators last, once CHAP and LUN are in place.
        for initiator in wanted {
            if !acl.iter().any(|a| a == initiator) {
                self.acl_bind(&tid, initiator).await?;
            }
        }
        Ok(())
    }

    /// Binds exactly `chap`'s user (or no account) to target `cur`, creating
    /// or re-keying the account. `acl` is the target's current ACL; the
    /// target is closed (ACL emptied) whenever it would otherwise pass
    /// through "no account", and the caller re-opens it.
    async fn converge_chap(
        &self,
        cur: &TgtTarget,
        chap: Option<&Chap>,
        targets: &[TgtTarget],
        acl: &mut Vec<String>,
    ) -> Result<()> {
        let tid = cur.tid.to_string();
        let mut dropped: BTreeSet<String> = cur
            .incoming_accounts
            .iter()
            .chain(cur.outgoing_account.iter())
            .cloned()
            .collect();

        let Some(chap) = chap else {
            if !dropped.is_empty() {
                self.account_unbind_all(cur).await?;
                let others: Vec<TgtTarget> = targets
                    .iter()
                    .filter(|t| t.tid != cur.tid)
                    .cloned()
                    .collect();
                self.delete_orphan_accounts(&dropped, &others).await?;
            }
            return Ok(());
        };
        let user = chap.user.as_str();
        dropped.remove(user);

        match self.accounts.add(chap).await? {
            AccountAdd::Created => {
                let has_accounts =
                    !cur.incoming_accounts.is_empty() || cur.outgoing_account.is_some();
                if has_accounts {
                    self.close(&tid, acl).await?;
                    self.account_unbind_all(cur).await?;
                }
                self.account_bind(&tid, user, false).await?;
            }
            AccountAdd::Exists => {
                // tgt can't change a password: delete and re-create the
                // account, with every target using it closed meanwhile.
                // The other targets get back exactly the accounts they had
                // (all unbound first, so the re-binds leave no hole).
                let sharers: Vec<&TgtTarget> = targets
                    .iter()
                    .filter(|t| t.tid != cur.tid && t.uses_account(user))
                    .collect();
                if let Some(f) = sharers.iter().find(|t| !self.owns(&t.iqn)) {
                    return Err(Error::precondition(format!(
                        "CHAP user {user} is also bound to target {}, which pdisk does not own; \
                         choose another user",
                        f.iqn
                    )));
                }
                tracing::info!(
                    user,
                    targets = sharers.len() + 1,
                    "tgt: re-keying CHAP account"
                );
                self.close(&tid, acl).await?;
                for s in &sharers {
                    let mut s_acl = s.acl.clone();
                    self.close(&s.tid.to_string(), &mut s_acl).await?;
                    self.account_unbind_all(s).await?;
                }
                self.account_unbind_all(cur).await?;
                match self.account_delete(user).await {
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    r => r?,
                }
                if self.accounts.add(chap).await? == AccountAdd::Exists {
                    return Err(Error::internal(format!(
                        "CHAP account {user} still exists in {} after deleting it",
                        self.tgtd()
                    )));
                }
                self.account_bind(&tid, user, false).await?;
                for s in &sharers {
                    let s_tid = s.tid.to_string();
                    for u in &s.incoming_accounts {
                        self.account_bind(&s_tid, u, false).await?;
                    }
                    if let Some(u) = &s.outgoing_account {
                        self.account_bind(&s_tid, u, true).await?;
                    }
                    for entry in &s.acl {
                        self.acl_bind_entry(&s_tid, entry).await?;
                    }
                }
            }
        }
        if !dropped.is_empty() {
            let now = self.show().await?;
            self.delete_orphan_accounts(&dropped, &now).await?;
        }
        Ok(())
    }

    /// Re-binds an ACL entry as it was listed (name or address).
    async fn acl_bind_entry(&self, tid: &str, entry: &str) -> Result<()> {
        self.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            tid,
            acl_flag(entry),
            entry,
        ])
        .await
        .map(drop)
    }

    /// Empties the ACL of target `tid`: no new login until it is re-bound.
    async fn close(&self, tid: &str, acl: &mut Vec<String>) -> Result<()> {
        for entry in acl.drain(..) {
            self.acl_unbind(tid, &entry).await?;
        }
        Ok(())
    }

    async fn unexport_locked(&self, target_iqn: &Iqn) -> Result<()> {
        let targets = self.show().await?;
        let Some(t) = targets.iter().find(|t| t.iqn == target_iqn.as_str()) else {
            return Ok(());
        };
        let tid = t.tid.to_string();
        // --force: tgt otherwise refuses while an initiator is logged in
        // ("this target is still active"); forced, it drops the sessions and
        // frees the LUNs, ACL and account bindings in one step.
        self.tgtadm(&[
            "--mode", "target", "--op", "delete", "--force", "--tid", &tid,
        ])
        .await?;
        tracing::info!(target = %target_iqn, tid = t.tid, "tgt: deleted target");
        let used: BTreeSet<String> = t
            .incoming_accounts
            .iter()
            .chain(t.outgoing_account.iter())
            .cloned()
            .collect();
        let others: Vec<TgtTarget> = targets.iter().filter(|o| o.tid != t.tid).cloned().collect();
        self.delete_orphan_accounts(&used, &others).await
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

/// `--mode X --op Y` of a tgtadm argv, for error messages.
fn tgtadm_what(args: &[&str]) -> String {
    let get = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or("?")
    };
    format!("tgtadm --mode {} --op {}", get("--mode"), get("--op"))
}

/// `--initiator-name` for entries that look like iSCSI names, otherwise
/// `--initiator-address` (tgt lists both kinds of ACL entry together).
fn acl_flag(entry: &str) -> &'static str {
    let e = entry.to_ascii_lowercase();
    if e.starts_with("iqn.") || e.starts_with("eui.") || e.starts_with("naa.") {
        "--initiator-name"
    } else {
        "--initiator-address"
    }
}

/// The backing path as tgtadm gets it: UTF-8, and free of the `,` that
/// separates tgt's parameters.
fn backing_path_arg(path: &Path) -> Result<&str> {
    match path.to_str() {
        Some(s) if s.starts_with('/') && !s.contains([',', '\n']) => Ok(s),
        _ => Err(Error::invalid(format!(
            "backing path {} can't be given to tgt: it must be absolute UTF-8 without ',' or newlines",
            path.display()
        ))),
    }
}

fn lowest_free_tid(targets: &[TgtTarget]) -> u32 {
    let used: BTreeSet<u32> = targets.iter().map(|t| t.tid).collect();
    (1..).find(|tid| !used.contains(tid)).expect("a free tid")
}

/// The error for a tgtadm run, or None when it succeeded. Failures meaning
/// tgtd is not there are Unavailable; tgt's own error messages map onto our
/// kinds; the rest is Internal with stderr.
fn tgtadm_failure(cmd: &Cmd, out: &Output) -> Option<Error> {
    const DOWN: [&str; 7] = [
        "can't send the request to the tgt daemon",
        "can't connect to tgt daemon",
        "failed to send request hdr to tgt daemon",
        "transport endpoint is not connected",
        "connection refused",
        // tgtadm exits 0 when tgtd dies during the request.
        "tgtd closed the socket",
        "can't get the response",
    ];
    let stderr = out.stderr.to_ascii_lowercase();
    if DOWN.iter().any(|d| stderr.contains(d)) {
        return Some(Error::unavailable(format!(
            "tgtd is not running or not answering: {}",
            out.stderr.trim().lines().next().unwrap_or("")
        )));
    }
    if out.success() {
        return None;
    }
    let e = exit_error(cmd, out);
    let kind = if stderr.contains("can't find the target")
        || stderr.contains("can't find the logical unit")
        || stderr.contains("can't find the account")
        || stderr.contains("access control rule does not exist")
    {
        ErrorKind::NotFound
    } else if stderr.contains("already exists") {
        ErrorKind::AlreadyExists
    } else if stderr.contains("still active") || stderr.contains("is busy") {
        ErrorKind::FailedPrecondition
    } else if stderr.contains("too many accounts") || stderr.contains("out of memory") {
        ErrorKind::ResourceExhausted
    } else {
        ErrorKind::Internal
    };
    Some(Error::new(kind, e.message()))
}

// ---- `tgtadm --mode target --op show` -----------------------------------------

/// One target as `tgtadm --mode target --op show` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TgtTarget {
    tid: u32,
    iqn: String,
    /// Number of I_T nexuses (logged-in initiator sessions).
    nexuses: usize,
    luns: Vec<TgtLun>,
    /// Incoming (initiator-authenticating) accounts, in tgt's order.
    incoming_accounts: Vec<String>,
    outgoing_account: Option<String>,
    /// IQN and address ACL entries, as listed.
    acl: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TgtLun {
    lun: u64,
    bstype: String,
    path: Option<PathBuf>,
    thin: bool,
}

impl TgtTarget {
    fn lun(&self, lun: u32) -> Option<&TgtLun> {
        self.luns.iter().find(|l| l.lun == u64::from(lun))
    }

    fn uses_account(&self, user: &str) -> bool {
        self.incoming_accounts.iter().any(|u| u == user)
            || self.outgoing_account.as_deref() == Some(user)
    }

    /// `chap_user` is the single incoming user. Any other account setup
    /// (several incoming users, an outgoing one) is shown comma-joined, e.g.
    /// `alice,bob (outgoing)`: never a valid CHAP user, so it never matches
    /// a spec and `restore` corrects it.
    fn to_live(&self) -> LiveExport {
        let chap_user = match (&self.incoming_accounts[..], &self.outgoing_account) {
            ([], None) => None,
            ([one], None) => Some(one.clone()),
            (many, out) => Some(
                many.iter()
                    .cloned()
                    .chain(out.iter().map(|o| format!("{o} (outgoing)")))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        };
        LiveExport {
            target_iqn: self.iqn.clone(),
            backing_path: self.lun(VOLUME_LUN).and_then(|l| l.path.clone()),
            initiators: self.acl.clone(),
            chap_user,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Other,
    Nexus,
    Lun,
    Account,
    Acl,
}

/// Parses the output of `tgtadm --mode target --op show` (tgt's
/// `tgt_target_show_all`): a `Target <tid>: <name>` line per target, then
/// sections indented by 4 spaces, their entries by 8, LUN details by 12.
fn parse_target_show(out: &str) -> Result<Vec<TgtTarget>> {
    let bad = |line: &str, why: &str| {
        Error::internal(format!(
            "unexpected tgtadm target show output ({why}): {line:?}"
        ))
    };
    let mut targets: Vec<TgtTarget> = Vec::new();
    let mut section = Section::Other;
    for line in out.lines() {
        let line = line.trim_end_matches(['\r', '\0']);
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let text = line.trim_start();
        if indent == 0 {
            let rest = text
                .strip_prefix("Target ")
                .ok_or_else(|| bad(line, "expected a Target line"))?;
            let (tid, name) = rest
                .split_once(": ")
                .ok_or_else(|| bad(line, "expected Target <tid>: <name>"))?;
            let tid = tid.parse().map_err(|_| bad(line, "bad tid"))?;
            targets.push(TgtTarget {
                tid,
                iqn: name.trim().to_owned(),
                ..TgtTarget::default()
            });
            section = Section::Other;
            continue;
        }
        let Some(t) = targets.last_mut() else {
            return Err(bad(line, "text before the first target"));
        };
        if indent == 4 {
            section = match text {
                "I_T nexus information:" => Section::Nexus,
                "LUN information:" => Section::Lun,
                "Account information:" => Section::Account,
                "ACL information:" => Section::Acl,
                _ => Section::Other,
            };
            continue;
        }
        match section {
            Section::Other => {}
            Section::Nexus => {
                if indent == 8 && text.starts_with("I_T nexus:") {
                    t.nexuses += 1;
                }
            }
            Section::Lun => {
                if indent == 8 {
                    if let Some(n) = text.strip_prefix("LUN: ") {
                        let lun = n.trim().parse().map_err(|_| bad(line, "bad LUN"))?;
                        t.luns.push(TgtLun {
                            lun,
                            ..TgtLun::default()
                        });
                    }
                } else if let Some(lun) = t.luns.last_mut() {
                    if let Some(v) = text.strip_prefix("Backing store type:") {
                        lun.bstype = v.trim().to_owned();
                    } else if let Some(v) = text.strip_prefix("Backing store path: ") {
                        lun.path = (v != "None").then(|| PathBuf::from(v));
                    } else if let Some(v) = text.strip_prefix("Thin-provisioning:") {
                        lun.thin = v.trim() == "Yes";
                    }
                }
            }
            Section::Account => {
                if indent == 8 {
                    match text.strip_suffix(" (outgoing)") {
                        Some(user) => t.outgoing_account = Some(user.to_owned()),
                        None => t.incoming_accounts.push(text.to_owned()),
                    }
                }
            }
            Section::Acl => {
                if indent == 8 {
                    t.acl.push(text.to_owned());
                }
            }
        }
    }
    Ok(targets)
}

// ---- CHAP accounts over tgtd's management socket ------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AccountAdd {
    Created,
    /// An account with that user already exists (its secret is unknown).
    Exists,
}

/// Creates CHAP accounts without putting the secret in argv.
trait AccountAdder: Send + Sync {
    fn add<'a>(&'a self, chap: &'a Chap) -> BoxFuture<'a, Result<AccountAdd>>;
}

/// Talks to tgtd's management socket like tgtadm does.
struct MgmtSocket {
    path: PathBuf,
    control_port: u32,
}

impl AccountAdder for MgmtSocket {
    fn add<'a>(&'a self, chap: &'a Chap) -> BoxFuture<'a, Result<AccountAdd>> {
        Box::pin(async move {
            tracing::debug!(user = %chap.user, control_port = self.control_port,
                "tgt: creating CHAP account over the management socket");
            // The exact format tgtadm builds and tgtd's account_mgmt()
            // parses: "user=U,password=P" and a NUL. Chap guarantees neither
            // part contains ',' or '='.
            let mut params =
                format!("user={},password={}\0", chap.user, chap.secret()).into_bytes();
            let r = mgmt::request(
                &self.path,
                mgmt::MODE_ACCOUNT,
                mgmt::OP_NEW,
                mgmt::NO_TID,
                &params,
                TGTADM_TIMEOUT,
            )
            .await;
            params.fill(0);
            std::hint::black_box(&params);
            let tgtd = format!("tgtd (control port {})", self.control_port);
            match r {
                Ok((mgmt::TGTADM_SUCCESS, _)) => Ok(AccountAdd::Created),
                Ok((mgmt::TGTADM_USER_EXIST, _)) => Ok(AccountAdd::Exists),
                Ok((code, _)) => {
                    let kind = match code {
                        mgmt::TGTADM_NOMEM | mgmt::TGTADM_TOO_MANY_USER => {
                            ErrorKind::ResourceExhausted
                        }
                        mgmt::TGTADM_NO_DRIVER => ErrorKind::Unavailable,
                        _ => ErrorKind::Internal,
                    };
                    Err(Error::new(
                        kind,
                        format!(
                            "creating CHAP account {} on {tgtd}: {}",
                            chap.user,
                            mgmt::strerror(code)
                        ),
                    ))
                }
                Err(e) => Err(Error::unavailable(format!(
                    "creating CHAP account {} on {tgtd}: management socket {}: {e}",
                    chap.user,
                    self.path.display()
                ))),
            }
        })
    }
}

/// tgt's management protocol (usr/tgtadm.h): a native-endian `struct
/// tgtadm_req` and a parameter string in; `struct tgtadm_rsp` and a payload
/// out; one request per connection.
mod mgmt {
    use std::path::Path;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// `sizeof(struct tgtadm_req)`: mode, op (enums, 4 bytes each), lld[64],
    /// len, tid (4 each), sid, lun (8 each, at offset 80: no padding needed),
    /// cid, host_no, device_type, ac_dir, pack, force (4 each) = 120.
    pub const REQ_LEN: usize = 120;
    /// `sizeof(struct tgtadm_rsp)`: err, len.
    pub const RSP_LEN: usize = 8;
    const LLD_LEN: usize = 64;
    /// Largest payload we accept in a response.
    const MAX_RSP: usize = 16 << 20;

    pub const MODE_ACCOUNT: u32 = 7;
    pub const OP_NEW: u32 = 0;
    /// What tgtadm sends when no `--tid` is given.
    pub const NO_TID: i32 = -1;

    pub const TGTADM_SUCCESS: u32 = 0;
    pub const TGTADM_NOMEM: u32 = 2;
    pub const TGTADM_NO_DRIVER: u32 = 3;
    pub const TGTADM_USER_EXIST: u32 = 14;
    pub const TGTADM_TOO_MANY_USER: u32 = 16;

    /// tgt's `enum tgtadm_errno`, with tgtadm's wording.
    pub fn strerror(code: u32) -> String {
        const MSG: [&str; 25] = [
            "success",
            "unknown error",
            "out of memory",
            "can't find the driver",
            "can't find the target",
            "can't find the logical unit",
            "can't find the session",
            "can't find the connection",
            "can't find the binding",
            "this target already exists",
            "this logical unit number already exists",
            "this binding already exists",
            "this access control rule already exists",
            "this access control rule does not exist",
            "this account already exists",
            "can't find the account",
            "too many accounts",
            "invalid request",
            "this target already has an outgoing account",
            "this target is still active",
            "this logical unit is still active",
            "this driver is busy",
            "this operation isn't supported",
            "unknown parameter",
            "this device has Prevent Removal set",
        ];
        match MSG.get(code as usize) {
            Some(m) => format!("{m} (tgtadm error {code})"),
            None => format!("tgtadm error {code}"),
        }
    }

    /// The request header for the iscsi driver, followed by `params`.
    pub fn encode(mode: u32, op: u32, tid: i32, params: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(REQ_LEN + params.len());
        b.extend_from_slice(&mode.to_ne_bytes());
        b.extend_from_slice(&op.to_ne_bytes());
        let mut lld = [0u8; LLD_LEN];
        lld[..5].copy_from_slice(b"iscsi");
        b.extend_from_slice(&lld);
        let len = u32::try_from(REQ_LEN + params.len()).expect("small request");
        b.extend_from_slice(&len.to_ne_bytes());
        b.extend_from_slice(&tid.to_ne_bytes());
        b.extend_from_slice(&0u64.to_ne_bytes()); // sid
        b.extend_from_slice(&u64::MAX.to_ne_bytes()); // lun: tgtadm's "none"
        b.extend_from_slice(&0u32.to_ne_bytes()); // cid
        b.extend_from_slice(&0u32.to_ne_bytes()); // host_no
        b.extend_from_slice(&0u32.to_ne_bytes()); // device_type: TYPE_DISK
        b.extend_from_slice(&0u32.to_ne_bytes()); // ac_dir: incoming
        b.extend_from_slice(&0u32.to_ne_bytes()); // pack
        b.extend_from_slice(&0u32.to_ne_bytes()); // force
        debug_assert_eq!(b.len(), REQ_LEN);
        b.extend_from_slice(params);
        b
    }

    /// Sends one request; returns tgt's error code and the payload.
    pub async fn request(
        socket: &Path,
        mode: u32,
        op: u32,
        tid: i32,
        params: &[u8],
        timeout: Duration,
    ) -> std::io::Result<(u32, Vec<u8>)> {
        let exchange = async {
            let mut s = UnixStream::connect(socket).await?;
            let mut req = encode(mode, op, tid, params);
            let written = s.write_all(&req).await;
            req.fill(0);
            std::hint::black_box(&req);
            written?;
            let mut rsp = [0u8; RSP_LEN];
            s.read_exact(&mut rsp).await?;
            let err = u32::from_ne_bytes(rsp[0..4].try_into().expect("4 bytes"));
            let len = u32::from_ne_bytes(rsp[4..8].try_into().expect("4 bytes")) as usize;
            let payload_len = len
                .checked_sub(RSP_LEN)
                .filter(|n| *n <= MAX_RSP)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad response length {len}"),
                    )
                })?;
            let mut payload = vec![0u8; payload_len];
            s.read_exact(&mut payload).await?;
            Ok((err, payload))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::FakeRunner;
    use std::collections::VecDeque;
    use std::sync::Mutex as StdMutex;

    /// Real output of tgt 1.0.85 (`tgtadm --mode target --op show`): a target
    /// with two IQN ACL entries, an address ACL, an incoming and an outgoing
    /// CHAP account and two LUNs (the second thin); a foreign target; and a
    /// second pdisk target on tid 3 with rdwr.
    const SHOW_CHAP_AND_ACLS: &str = "\
Target 1: iqn.2026-11.io.stratus.pdisk:vol-a
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00010001
            SCSI SN: beaf11
            Size: 67 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: Yes
            Backing store type: aio
            Backing store path: /tmp/tgtx/v1.img
            Backing store flags: 
    Account information:
        alice
        bob (outgoing)
    ACL information:
        10.0.0.0/24
        iqn.2026-11.io.stratus:host1
        iqn.2026-11.io.stratus:host2
Target 2: iqn.2003-01.org.other:foreign
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00020000
            SCSI SN: beaf20
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
    Account information:
    ACL information:
Target 3: iqn.2026-11.io.stratus.pdisk:vol-b
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00030000
            SCSI SN: beaf30
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00030001
            SCSI SN: beaf31
            Size: 34 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /tmp/tgtx/v2.img
            Backing store flags: 
    Account information:
    ACL information:
";

    /// Real output with a logged-in initiator (an I_T nexus).
    const SHOW_NEXUS: &str = "\
Target 2: iqn.2026-11.io.stratus.pdisk:vol-b
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 2
            Initiator: iqn.2026-11.io.stratus:tester alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00020000
            SCSI SN: beaf20
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00020001
            SCSI SN: beaf21
            Size: 34 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: aio
            Backing store path: /tmp/tgtx/v2.img
            Backing store flags: 
    Account information:
    ACL information:
        iqn.2026-11.io.stratus:tester
Target 4: iqn.2003-01.org.other:foreign
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00040000
            SCSI SN: beaf40
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
    Account information:
    ACL information:
        ALL
";

    const PREFIX: &str = "iqn.2026-11.io.stratus.pdisk";
    const SECRET: &str = "Sup3rSecretPw0";

    fn iqn(s: &str) -> Iqn {
        s.parse().unwrap()
    }

    fn lun(n: u64, bstype: &str, path: Option<&str>) -> TgtLun {
        TgtLun {
            lun: n,
            bstype: bstype.into(),
            path: path.map(PathBuf::from),
            thin: false,
        }
    }

    /// Renders targets the way tgt 1.0.85 does (checked against the real
    /// captures above by `renderer_matches_real_output`).
    fn render_show(targets: &[TgtTarget]) -> String {
        let mut s = String::new();
        for t in targets {
            s += &format!(
                "Target {}: {}\n    System information:\n        Driver: iscsi\n        State: ready\n    I_T nexus information:\n",
                t.tid, t.iqn
            );
            for n in 0..t.nexuses {
                s += &format!(
                    "        I_T nexus: {}\n            Initiator: iqn.2026-11.io.stratus:tester alias: none\n            Connection: 0\n                IP Address: 127.0.0.1\n",
                    n + 2
                );
            }
            s += "    LUN information:\n";
            for l in &t.luns {
                let (ty, size) = if l.lun == 0 {
                    ("controller", "0 MB, Block size: 1")
                } else {
                    ("disk", "64 MB, Block size: 512")
                };
                s += &format!(
                    "        LUN: {}\n            Type: {ty}\n            SCSI ID: IET     {:04x}{:04x}\n            SCSI SN: beaf{}{}\n            Size: {size}\n            Online: Yes\n            Removable media: No\n            Prevent removal: No\n            Readonly: No\n            SWP: No\n            Thin-provisioning: {}\n            Backing store type: {}\n            Backing store path: {}\n            Backing store flags: \n",
                    l.lun, t.tid, l.lun, t.tid, l.lun,
                    if l.thin { "Yes" } else { "No" },
                    l.bstype,
                    l.path.as_ref().map(|p| p.display().to_string()).unwrap_or("None".into()),
                );
            }
            s += "    Account information:\n";
            for a in &t.incoming_accounts {
                s += &format!("        {a}\n");
            }
            if let Some(o) = &t.outgoing_account {
                s += &format!("        {o} (outgoing)\n");
            }
            s += "    ACL information:\n";
            for a in &t.acl {
                s += &format!("        {a}\n");
            }
        }
        s
    }

    fn target(tid: u32, name: &str, path: &str, acl: &[&str], accounts: &[&str]) -> TgtTarget {
        TgtTarget {
            tid,
            iqn: name.into(),
            nexuses: 0,
            luns: vec![lun(0, "null", None), lun(1, "aio", Some(path))],
            incoming_accounts: accounts.iter().map(|s| s.to_string()).collect(),
            outgoing_account: None,
            acl: acl.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn parses_real_output_with_chap_acls_and_several_targets() {
        let ts = parse_target_show(SHOW_CHAP_AND_ACLS).unwrap();
        assert_eq!(ts.len(), 3);
        let a = &ts[0];
        assert_eq!(a.tid, 1);
        assert_eq!(a.iqn, "iqn.2026-11.io.stratus.pdisk:vol-a");
        assert_eq!(a.nexuses, 0);
        assert_eq!(
            a.luns,
            vec![
                lun(0, "null", None),
                TgtLun {
                    thin: true,
                    ..lun(1, "aio", Some("/tmp/tgtx/v1.img"))
                }
            ]
        );
        assert_eq!(a.incoming_accounts, vec!["alice"]);
        assert_eq!(a.outgoing_account.as_deref(), Some("bob"));
        assert_eq!(
            a.acl,
            vec![
                "10.0.0.0/24",
                "iqn.2026-11.io.stratus:host1",
                "iqn.2026-11.io.stratus:host2"
            ]
        );
        assert_eq!(ts[1].iqn, "iqn.2003-01.org.other:foreign");
        assert_eq!(ts[1].luns, vec![lun(0, "null", None)]);
        assert!(ts[1].acl.is_empty() && ts[1].incoming_accounts.is_empty());
        assert_eq!(ts[2].tid, 3);
        assert_eq!(ts[2].luns[1], lun(1, "rdwr", Some("/tmp/tgtx/v2.img")));

        let nexus = parse_target_show(SHOW_NEXUS).unwrap();
        assert_eq!(nexus[0].nexuses, 1);
        assert_eq!(nexus[0].acl, vec!["iqn.2026-11.io.stratus:tester"]);
        assert_eq!(nexus[1].acl, vec!["ALL"]);
        assert!(parse_target_show("").unwrap().is_empty());
        assert!(parse_target_show("garbage\n").is_err());
    }

    #[test]
    fn renderer_matches_real_output() {
        // Same text as tgt prints, except the sizes (not parsed, so not rendered).
        let without_sizes = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.trim_start().starts_with("Size:"))
                .map(str::to_owned)
                .collect()
        };
        for real in [SHOW_CHAP_AND_ACLS, SHOW_NEXUS] {
            let rendered = render_show(&parse_target_show(real).unwrap());
            assert_eq!(without_sizes(&rendered), without_sizes(real));
        }
    }

    #[tokio::test]
    async fn list_keeps_prefixed_targets_with_lun1_acl_and_chap_user() {
        let fake = FakeRunner::with(|_| Ok(Output::ok(SHOW_CHAP_AND_ACLS)));
        let (exp, _) = exporter(fake);
        let live = exp.list().await.unwrap();
        assert_eq!(
            live,
            vec![
                LiveExport {
                    target_iqn: "iqn.2026-11.io.stratus.pdisk:vol-a".into(),
                    backing_path: Some("/tmp/tgtx/v1.img".into()),
                    initiators: vec![
                        "10.0.0.0/24".into(),
                        "iqn.2026-11.io.stratus:host1".into(),
                        "iqn.2026-11.io.stratus:host2".into()
                    ],
                    chap_user: Some("alice,bob (outgoing)".into()),
                },
                LiveExport {
                    target_iqn: "iqn.2026-11.io.stratus.pdisk:vol-b".into(),
                    backing_path: Some("/tmp/tgtx/v2.img".into()),
                    initiators: vec![],
                    chap_user: None,
                },
            ]
        );
    }

    #[test]
    fn ownership_needs_the_prefix_then_a_separator() {
        let (exp, _) = exporter(FakeRunner::new());
        assert!(exp.owns("iqn.2026-11.io.stratus.pdisk:vol-1"));
        assert!(exp.owns("iqn.2026-11.io.stratus.pdisk.x:vol-1"));
        assert!(!exp.owns("iqn.2026-11.io.stratus.pdiskother:vol-1"));
        assert!(!exp.owns("iqn.2003-01.org.other:foreign"));
    }

    /// Scripted answers of the management socket, recording the secrets.
    #[derive(Default)]
    struct FakeAccounts {
        answers: StdMutex<VecDeque<AccountAdd>>,
        seen: StdMutex<Vec<(String, String)>>,
    }

    impl AccountAdder for FakeAccounts {
        fn add<'a>(&'a self, chap: &'a Chap) -> BoxFuture<'a, Result<AccountAdd>> {
            self.seen
                .lock()
                .unwrap()
                .push((chap.user.clone(), chap.secret().to_owned()));
            let a = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(AccountAdd::Created);
            Box::pin(async move { Ok(a) })
        }
    }

    fn exporter(fake: FakeRunner) -> (TgtExporter, Arc<FakeAccounts>) {
        let accounts = Arc::new(FakeAccounts::default());
        // The argv below are written for the aio store (no thin
        // provisioning update); the rdwr default is covered separately.
        let cfg = TgtConfig {
            control_port: 7,
            portal: "127.0.0.1:3260".into(),
            iqn_prefix: PREFIX.into(),
            bstype: "aio".into(),
            ..TgtConfig::default()
        };
        (
            TgtExporter::with_accounts(Arc::new(fake), cfg, accounts.clone()),
            accounts,
        )
    }

    /// A runner answering `target show` with `show` and everything else with success.
    fn showing(show: String) -> FakeRunner {
        FakeRunner::with(move |argv| {
            if argv.iter().any(|a| a == "show") {
                Ok(Output::ok(show.clone()))
            } else {
                Ok(Output::ok(""))
            }
        })
    }

    const T: &str = "tgtadm -C 7 --lld iscsi";

    fn spec(name: &str, initiators: &[&str], chap: Option<Chap>) -> ExportSpec {
        ExportSpec {
            target_iqn: iqn(&format!("{PREFIX}:{name}")),
            backing_path: PathBuf::from(format!("/pool/{name}")),
            initiators: initiators.iter().map(|i| iqn(i)).collect(),
            chap,
        }
    }

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|l| l.replace("$T", T)).collect()
    }

    #[tokio::test]
    async fn fresh_export_with_two_initiators() {
        // tid 1 is taken by a foreign target: the new one gets tid 2.
        let foreign = TgtTarget {
            luns: vec![lun(0, "null", None)],
            ..target(1, "iqn.2003-01.org.other:foreign", "/x", &[], &[])
        };
        let fake = showing(render_show(&[foreign]));
        let (exp, _) = exporter(fake.clone());
        let s = spec(
            "vol-1",
            &["iqn.2026-11.io.stratus:h1", "iqn.2026-11.io.stratus:h2"],
            None,
        );
        exp.export(&s).await.unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op new --tid 2 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
                "$T --mode logicalunit --op new --tid 2 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 2 --initiator-name iqn.2026-11.io.stratus:h1",
                "$T --mode target --op bind --tid 2 --initiator-name iqn.2026-11.io.stratus:h2",
            ])
        );
    }

    #[tokio::test]
    async fn rdwr_exports_get_thin_provisioning() {
        let fake = showing(String::new());
        let accounts = Arc::new(FakeAccounts::default());
        let cfg = TgtConfig {
            control_port: 7,
            iqn_prefix: PREFIX.into(),
            bstype: "rdwr".into(),
            ..TgtConfig::default()
        };
        let exp = TgtExporter::with_accounts(Arc::new(fake.clone()), cfg, accounts);
        exp.export(&spec("vol-1", &[], None)).await.unwrap();
        assert_eq!(
            fake.command_lines()[2..],
            lines(&[
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype rdwr",
                "$T --mode logicalunit --op update --tid 1 --lun 1 --params thin_provisioning=1",
            ])
        );
    }

    #[tokio::test]
    async fn re_export_adds_and_removes_initiators_only() {
        let live = target(
            3,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/pool/vol-1",
            &["iqn.2026-11.io.stratus:h1", "iqn.2026-11.io.stratus:h2"],
            &[],
        );
        let fake = showing(render_show(&[live]));
        let (exp, _) = exporter(fake.clone());
        let s = spec(
            "vol-1",
            &["iqn.2026-11.io.stratus:h2", "iqn.2026-11.io.stratus:h3"],
            None,
        );
        exp.export(&s).await.unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op unbind --tid 3 --initiator-name iqn.2026-11.io.stratus:h1",
                "$T --mode target --op bind --tid 3 --initiator-name iqn.2026-11.io.stratus:h3",
            ])
        );
    }

    #[tokio::test]
    async fn re_export_fixes_backing_path_and_address_acls() {
        let mut live = target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/old/path",
            &["ALL"],
            &[],
        );
        live.luns.push(lun(2, "aio", Some("/stray")));
        let fake = showing(render_show(&[live]));
        let (exp, _) = exporter(fake.clone());
        exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
            .await
            .unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op unbind --tid 1 --initiator-address ALL",
                "$T --mode logicalunit --op delete --tid 1 --lun 2",
                "$T --mode logicalunit --op delete --tid 1 --lun 1",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            ])
        );
    }

    #[tokio::test]
    async fn unexport_deletes_target_and_unused_accounts() {
        let a = target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/pool/vol-1",
            &["iqn.2026-11.io.stratus:h1"],
            &["alice"],
        );
        let b = target(
            2,
            "iqn.2026-11.io.stratus.pdisk:vol-2",
            "/pool/vol-2",
            &[],
            &["carol"],
        );
        let mut a2 = a.clone();
        a2.incoming_accounts = vec!["carol".into()];
        for (live, deletes_account) in [(vec![a, b.clone()], true), (vec![a2, b], false)] {
            let fake = showing(render_show(&live));
            let (exp, _) = exporter(fake.clone());
            exp.unexport(&iqn(&format!("{PREFIX}:vol-1")))
                .await
                .unwrap();
            let mut want = lines(&[
                "$T --mode target --op show",
                "$T --mode target --op delete --force --tid 1",
            ]);
            if deletes_account {
                want.extend(lines(&["$T --mode account --op delete --user alice"]));
            }
            assert_eq!(fake.command_lines(), want);
        }
    }

    #[tokio::test]
    async fn unexport_of_a_missing_target_is_ok() {
        let fake = showing(String::new());
        let (exp, _) = exporter(fake.clone());
        exp.unexport(&iqn(&format!("{PREFIX}:vol-9")))
            .await
            .unwrap();
        assert_eq!(fake.command_lines(), lines(&["$T --mode target --op show"]));
        let err = exp
            .unexport(&iqn("iqn.2003-01.org.other:foreign"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[tokio::test]
    async fn chap_export_binds_account_before_acl_and_never_puts_the_secret_in_argv() {
        let fake = showing(String::new());
        let (exp, accounts) = exporter(fake.clone());
        let chap = Chap::new("alice", SECRET).unwrap();
        exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], Some(chap)))
            .await
            .unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op new --tid 1 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
                "$T --mode account --op bind --tid 1 --user alice",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            ])
        );
        assert_eq!(
            *accounts.seen.lock().unwrap(),
            vec![("alice".to_string(), SECRET.to_string())]
        );
        assert!(!fake.command_lines().iter().any(|l| l.contains(SECRET)));
    }

    #[tokio::test]
    async fn re_export_with_existing_account_rekeys_while_targets_are_closed() {
        // vol-1 and vol-2 share alice; vol-1 also has a stale second account.
        let one = target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/pool/vol-1",
            &["iqn.2026-11.io.stratus:h1"],
            &["alice", "old"],
        );
        let two = target(
            2,
            "iqn.2026-11.io.stratus.pdisk:vol-2",
            "/pool/vol-2",
            &["iqn.2026-11.io.stratus:h2"],
            &["alice"],
        );
        let fake = showing(render_show(&[one, two]));
        let (exp, accounts) = exporter(fake.clone());
        accounts
            .answers
            .lock()
            .unwrap()
            .extend([AccountAdd::Exists, AccountAdd::Created]);
        let chap = Chap::new("alice", SECRET).unwrap();
        exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], Some(chap)))
            .await
            .unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                // close both targets
                "$T --mode target --op unbind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
                "$T --mode target --op unbind --tid 2 --initiator-name iqn.2026-11.io.stratus:h2",
                "$T --mode account --op unbind --tid 2 --user alice",
                // reverse order: no hole in tgt's account table
                "$T --mode account --op unbind --tid 1 --user old",
                "$T --mode account --op unbind --tid 1 --user alice",
                "$T --mode account --op delete --user alice",
                // (re-created over the management socket)
                "$T --mode account --op bind --tid 1 --user alice",
                "$T --mode account --op bind --tid 2 --user alice",
                "$T --mode target --op bind --tid 2 --initiator-name iqn.2026-11.io.stratus:h2",
                // `old` is bound nowhere else (the fake show still lists it on
                // tid 1, so it is kept here; real tgtd would have it unbound)
                "$T --mode target --op show",
                "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            ])
        );
        assert_eq!(accounts.seen.lock().unwrap().len(), 2);
        assert!(!fake.command_lines().iter().any(|l| l.contains(SECRET)));
    }

    #[tokio::test]
    async fn chap_user_shared_with_a_foreign_target_is_refused() {
        let one = target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/pool/vol-1",
            &[],
            &[],
        );
        let foreign = target(2, "iqn.2003-01.org.other:foreign", "/x", &[], &["alice"]);
        let fake = showing(render_show(&[one, foreign]));
        let (exp, accounts) = exporter(fake.clone());
        accounts
            .answers
            .lock()
            .unwrap()
            .push_back(AccountAdd::Exists);
        let chap = Chap::new("alice", SECRET).unwrap();
        let err = exp
            .export(&spec("vol-1", &[], Some(chap)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert_eq!(fake.command_lines(), lines(&["$T --mode target --op show"]));
    }

    #[tokio::test]
    async fn dropping_chap_unbinds_and_deletes_the_account() {
        let one = target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/pool/vol-1",
            &["iqn.2026-11.io.stratus:h1"],
            &["alice"],
        );
        let fake = showing(render_show(&[one]));
        let (exp, accounts) = exporter(fake.clone());
        exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
            .await
            .unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode account --op unbind --tid 1 --user alice",
                "$T --mode account --op delete --user alice",
            ])
        );
        assert!(accounts.seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn refresh_size_recreates_lun_1() {
        let one = target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/pool/vol-1",
            &["iqn.2026-11.io.stratus:h1"],
            &[],
        );
        let fake = showing(render_show(&[one]));
        let (exp, _) = exporter(fake.clone());
        exp.refresh_size(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
            .await
            .unwrap();
        assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode logicalunit --op delete --tid 1 --lun 1",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
            ])
        );
        let err = exp
            .refresh_size(&spec("vol-9", &[], None))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn lun_delete_retries_while_busy() {
        let busy = Arc::new(StdMutex::new(2));
        let one = render_show(&[target(
            1,
            "iqn.2026-11.io.stratus.pdisk:vol-1",
            "/old",
            &[],
            &[],
        )]);
        let b = busy.clone();
        let fake = FakeRunner::with(move |argv| {
            if argv.iter().any(|a| a == "show") {
                return Ok(Output::ok(one.clone()));
            }
            let mut n = b.lock().unwrap();
            if argv.iter().any(|a| a == "delete") && *n > 0 {
                *n -= 1;
                return Ok(Output::failed(
                    22,
                    "tgtadm: this logical unit is still active\n",
                ));
            }
            Ok(Output::ok(""))
        });
        let (exp, _) = exporter(fake.clone());
        exp.export(&spec("vol-1", &[], None)).await.unwrap();
        let deletes = fake
            .command_lines()
            .iter()
            .filter(|l| l.contains("--op delete"))
            .count();
        assert_eq!(deletes, 3);
    }

    #[tokio::test]
    async fn tgtd_down_is_unavailable() {
        let fake = FakeRunner::with(|_| {
            Ok(Output::failed(
                107,
                "tgtadm: failed to send request hdr to tgt daemon, Transport endpoint is not connected\n",
            ))
        });
        let (exp, _) = exporter(fake);
        let err = exp.check().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.message().contains("tgtd (control port 7)"), "{err}");
        assert!(err.message().contains("Transport endpoint"), "{err}");
        let err = exp.export(&spec("vol-1", &[], None)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert_eq!(exp.list().await.unwrap_err().kind(), ErrorKind::Unavailable);

        // tgtd dying mid-request: tgtadm exits 0 but says so.
        let fake = FakeRunner::with(|_| {
            Ok(Output {
                status: 0,
                stdout: String::new(),
                stderr: "tgtadm: tgtd closed the socket\n".into(),
            })
        });
        let (exp, _) = exporter(fake);
        assert_eq!(exp.list().await.unwrap_err().kind(), ErrorKind::Unavailable);

        // Timeouts and a missing tgtadm (runner errors) stay Unavailable.
        let fake = FakeRunner::with(|_| Err(Error::unavailable("tgtadm timed out after 10s")));
        let (exp, _) = exporter(fake);
        assert_eq!(
            exp.check().await.unwrap_err().kind(),
            ErrorKind::Unavailable
        );
    }

    #[tokio::test]
    async fn check_wants_the_iscsi_driver_ready() {
        let ok =
            "System:\n    State: ready\n    debug: off\nLLDs:\n    iscsi: ready\n    iser: error\n";
        let (exp, _) = exporter(FakeRunner::with(move |_| Ok(Output::ok(ok))));
        exp.check().await.unwrap();
        let (exp, _) = exporter(FakeRunner::with(|_| {
            Ok(Output::ok("LLDs:\n    iscsi: error\n"))
        }));
        assert_eq!(
            exp.check().await.unwrap_err().kind(),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn tgt_errors_map_to_kinds() {
        let cmd = Cmd::new("tgtadm").arg("-C");
        let kind = |stderr: &str| {
            tgtadm_failure(&cmd, &Output::failed(22, stderr))
                .unwrap()
                .kind()
        };
        assert_eq!(kind("tgtadm: can't find the target\n"), ErrorKind::NotFound);
        assert_eq!(
            kind("tgtadm: this target already exists\n"),
            ErrorKind::AlreadyExists
        );
        assert_eq!(
            kind("tgtadm: this target is still active\n"),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(kind("tgtadm: invalid request\n"), ErrorKind::Internal);
        assert_eq!(
            kind("tgtadm: can't send the request to the tgt daemon, Connection refused\n"),
            ErrorKind::Unavailable
        );
        let e = tgtadm_failure(&cmd, &Output::failed(22, "tgtadm: invalid request\n")).unwrap();
        assert!(e.message().contains("invalid request"), "{e}");
        assert!(tgtadm_failure(&cmd, &Output::ok("")).is_none());
    }

    #[test]
    fn backing_paths_with_commas_are_refused() {
        assert!(backing_path_arg(Path::new("/pool/a,b")).is_err());
        assert!(backing_path_arg(Path::new("relative")).is_err());
        assert_eq!(backing_path_arg(Path::new("/pool/a")).unwrap(), "/pool/a");
    }

    #[test]
    fn request_layout_matches_struct_tgtadm_req() {
        let b = mgmt::encode(mgmt::MODE_ACCOUNT, mgmt::OP_NEW, -1, b"user=u,password=p\0");
        assert_eq!(mgmt::REQ_LEN, 120); // sizeof(struct tgtadm_req) on x86_64, checked with gcc
        assert_eq!(b.len(), 120 + 18);
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 7);
        assert_eq!(u32_at(4), 0);
        assert_eq!(&b[8..13], b"iscsi");
        assert!(b[13..72].iter().all(|&c| c == 0));
        assert_eq!(u32_at(72), 138); // len
        assert_eq!(u32_at(76), u32::MAX); // tid -1
        assert_eq!(u64::from_ne_bytes(b[88..96].try_into().unwrap()), u64::MAX); // lun
        assert_eq!(&b[120..], b"user=u,password=p\0");
    }

    /// A stand-in tgtd on a Unix socket: checks the request like
    /// mgmt.c does and answers `code`.
    async fn fake_tgtd(listener: tokio::net::UnixListener, code: u32) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut hdr = [0u8; 120];
        s.read_exact(&mut hdr).await.unwrap();
        let len = u32::from_ne_bytes(hdr[72..76].try_into().unwrap()) as usize;
        let mut params = vec![0u8; len - 120];
        s.read_exact(&mut params).await.unwrap();
        let mut rsp = Vec::new();
        rsp.extend_from_slice(&code.to_ne_bytes());
        rsp.extend_from_slice(&8u32.to_ne_bytes());
        s.write_all(&rsp).await.unwrap();
        params
    }

    #[tokio::test]
    async fn management_socket_creates_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket.7");
        let adder = MgmtSocket {
            path: path.clone(),
            control_port: 7,
        };
        let chap = Chap::new("alice", SECRET).unwrap();

        let server = tokio::spawn(fake_tgtd(tokio::net::UnixListener::bind(&path).unwrap(), 0));
        assert_eq!(adder.add(&chap).await.unwrap(), AccountAdd::Created);
        let params = server.await.unwrap();
        assert_eq!(
            params,
            format!("user=alice,password={SECRET}\0").into_bytes()
        );
        std::fs::remove_file(&path).unwrap();

        let server = tokio::spawn(fake_tgtd(
            tokio::net::UnixListener::bind(&path).unwrap(),
            14,
        ));
        assert_eq!(adder.add(&chap).await.unwrap(), AccountAdd::Exists);
        server.await.unwrap();
        std::fs::remove_file(&path).unwrap();

        let server = tokio::spawn(fake_tgtd(
            tokio::net::UnixListener::bind(&path).unwrap(),
            16,
        ));
        let err = adder.add(&chap).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
        assert!(err.message().contains("too many accounts"), "{err}");
        assert!(!err.message().contains(SECRET));
        server.await.unwrap();
        std::fs::remove_file(&path).unwrap();

        // No tgtd: Unavailable, naming the socket, without the secret.
        let err = adder.add(&chap).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.message().contains("socket.7"), "{err}");
        assert!(!err.message().contains(SECRET));
    }
}
