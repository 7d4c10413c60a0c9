//! Converging one target to a spec: creating it on a free tid, its LUN, its
//! CHAP account (closing the ACL while accounts change) and its ACL; removing
//! it and the accounts only it used.

use std::collections::BTreeSet;

use super::accounts::AccountAdd;
use super::show::TgtTarget;
use super::tgtadm::{acl_flag, backing_path_arg, lowest_free_tid};
use super::{TgtExporter, VOLUME_LUN};
use crate::error::{Error, ErrorKind, Result};
use crate::export::params::IscsiKey;
use crate::export::ExportSpec;
use crate::types::{Chap, Iqn};

impl TgtExporter {
    /// Creates the target `iqn` on the lowest free tid; retries when someone
    /// else took that tid (or created the target) meanwhile.
    pub(super) async fn create_target(
        &self,
        iqn: &str,
        mut targets: Vec<TgtTarget>,
    ) -> Result<TgtTarget> {
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
                    if let Err(e) = self.set_params(tid).await {
                        // No ACL yet, so nobody logged in with tgt's own
                        // parameters; remove the target so the retry
                        // creates it again, with them.
                        let _ = self
                            .tgtadm(&[
                                "--mode",
                                "target",
                                "--op",
                                "delete",
                                "--tid",
                                &tid.to_string(),
                            ])
                            .await;
                        return Err(e);
                    }
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

    /// Sets the iSCSI parameters the new target `tid` offers at login
    /// (`TgtConfig::params`), before its ACL lets anyone log in. tgt calls
    /// the queue depth `MaxQueueCmd`.
    async fn set_params(&self, tid: u32) -> Result<()> {
        let tid = tid.to_string();
        for (key, value) in self.cfg.params.iter() {
            let name = match key {
                IscsiKey::QueueDepth => "MaxQueueCmd",
                k => k.name(),
            };
            self.tgtadm(&[
                "--mode",
                "target",
                "--op",
                "update",
                "--tid",
                &tid,
                "--name",
                name,
                "--value",
                &value.to_string(),
            ])
            .await?;
        }
        Ok(())
    }

    /// Makes target `spec.target_iqn` match `spec`, given the live
    /// `targets`. With `reopen_lun`, LUN 1 is re-created even when it already
    /// matches (see `refresh_size`).
    pub(super) async fn export_locked(
        &self,
        spec: &ExportSpec,
        targets: Vec<TgtTarget>,
        reopen_lun: bool,
    ) -> Result<()> {
        let iqn = spec.target_iqn.as_str();
        let path = backing_path_arg(&spec.backing_path)?;
        let cur = self.create_target(iqn, targets.clone()).await?;
        crate::failpoints::crash_point("tgt::export::target_created");
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
        crate::failpoints::crash_point("tgt::export::chap_bound");

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

        crate::failpoints::crash_point("tgt::export::lun_added");

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
    pub(super) async fn converge_chap(
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
        // Mutual CHAP: the target's (outgoing) account is one export's own
        // (agentd names it after the export). It is re-keyed by deleting and
        // re-creating it, which must not touch another target, so a user
        // bound elsewhere is refused before anything changes.
        if let Some(t) = chap.mutual() {
            dropped.remove(t.user.as_str());
            if let Some(other) = targets
                .iter()
                .find(|o| o.tid != cur.tid && o.uses_account(&t.user))
            {
                return Err(Error::precondition(format!(
                    "the target's CHAP user {} is also bound to target {}; \
                     a mutual CHAP user must belong to one export",
                    t.user, other.iqn
                )));
            }
        }

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
        // Every path above leaves `cur` with no outgoing account bound (the
        // incoming account is always created or re-keyed, unbinding all of
        // the target's accounts first when it had any).
        if let Some(t) = chap.mutual() {
            self.bind_outgoing(&tid, t).await?;
        }
        if !dropped.is_empty() {
            let now = self.show().await?;
            self.delete_orphan_accounts(&dropped, &now).await?;
        }
        Ok(())
    }

    /// Creates (or re-keys) the target's own account and binds it to `tid`
    /// as the outgoing one: tgtd answers an initiator's mutual-CHAP challenge
    /// with it. The account is bound to no target when this is called.
    async fn bind_outgoing(&self, tid: &str, t: &Chap) -> Result<()> {
        if self.accounts.add(t).await? == AccountAdd::Exists {
            // tgt can't change a password in place.
            match self.account_delete(&t.user).await {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                r => r?,
            }
            if self.accounts.add(t).await? == AccountAdd::Exists {
                return Err(Error::internal(format!(
                    "CHAP account {} still exists in {} after deleting it",
                    t.user,
                    self.tgtd()
                )));
            }
        }
        self.account_bind(tid, &t.user, true).await
    }

    /// Re-binds an ACL entry as it was listed (name or address).
    pub(super) async fn acl_bind_entry(&self, tid: &str, entry: &str) -> Result<()> {
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
    pub(super) async fn close(&self, tid: &str, acl: &mut Vec<String>) -> Result<()> {
        for entry in acl.drain(..) {
            self.acl_unbind(tid, &entry).await?;
        }
        Ok(())
    }

    /// Removes target `target_iqn` and the CHAP accounts only it uses, in
    /// an order a crash can interrupt anywhere and a retry finish: (1) the
    /// target is closed (ACL emptied: no new login, as it would accept
    /// logins without CHAP once its accounts go); (2) the accounts no other
    /// target uses are deleted (tgtd unbinds a deleted account from its
    /// targets); (3) the target is deleted. Until (3) the target still
    /// names what is left to remove, so the retry (pdiskd's reconciliation
    /// of an unexport it recorded) finds it; deleting the target first
    /// would leave its accounts, with their secrets, in tgtd for good.
    pub(super) async fn unexport_locked(&self, target_iqn: &Iqn) -> Result<()> {
        let targets = self.show().await?;
        let Some(t) = targets.iter().find(|t| t.iqn == target_iqn.as_str()) else {
            return Ok(());
        };
        let tid = t.tid.to_string();
        let mut acl = t.acl.clone();
        self.close(&tid, &mut acl).await?;
        crate::failpoints::crash_point("tgt::unexport::closed");
        let used: BTreeSet<String> = t
            .incoming_accounts
            .iter()
            .chain(t.outgoing_account.iter())
            .cloned()
            .collect();
        let others: Vec<TgtTarget> = targets.iter().filter(|o| o.tid != t.tid).cloned().collect();
        self.delete_orphan_accounts(&used, &others).await?;
        crate::failpoints::crash_point("tgt::unexport::accounts_deleted");
        // --force: tgt otherwise refuses while an initiator is logged in
        // ("this target is still active"); forced, it drops the sessions and
        // frees the LUNs and the bindings of shared accounts in one step.
        self.tgtadm(&[
            "--mode", "target", "--op", "delete", "--force", "--tid", &tid,
        ])
        .await?;
        tracing::info!(target = %target_iqn, tid = t.tid, "tgt: deleted target");
        Ok(())
    }
}
