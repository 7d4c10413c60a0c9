//! Running tgtadm: argv through the runner with a timeout, its answers read
//! (target listing, account listing), and its failures turned into our errors.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use super::show::{parse_target_show, TgtTarget};
use super::{TgtExporter, LUN_BUSY_ATTEMPTS, TGTADM_TIMEOUT, THIN_BSTYPE, VOLUME_LUN};
use crate::error::{Error, ErrorKind, Result};
use crate::runner::{exit_error, Cmd, Output};

impl TgtExporter {
    pub(super) fn tgtadm_cmd(&self, args: &[&str]) -> Cmd {
        Cmd::new(self.cfg.tgtadm.clone())
            .args(["-C", &self.cfg.control_port.to_string(), "--lld", "iscsi"])
            .args(args.iter().copied())
            .timeout(TGTADM_TIMEOUT)
    }

    /// Runs tgtadm with `args` (after `-C N --lld iscsi`) and returns stdout.
    pub(super) async fn tgtadm(&self, args: &[&str]) -> Result<String> {
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

    pub(super) async fn show(&self) -> Result<Vec<TgtTarget>> {
        let out = self.tgtadm(&["--mode", "target", "--op", "show"]).await?;
        parse_target_show(&out)
    }

    pub(super) async fn acl_bind(&self, tid: &str, initiator: &str) -> Result<()> {
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

    pub(super) async fn acl_unbind(&self, tid: &str, entry: &str) -> Result<()> {
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

    pub(super) async fn account_bind(&self, tid: &str, user: &str, outgoing: bool) -> Result<()> {
        let mut args = vec![
            "--mode", "account", "--op", "bind", "--tid", tid, "--user", user,
        ];
        if outgoing {
            args.push("--outgoing");
        }
        self.tgtadm(&args).await.map(drop)
    }

    pub(super) async fn account_unbind(&self, tid: &str, user: &str, outgoing: bool) -> Result<()> {
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
    pub(super) async fn account_unbind_all(&self, t: &TgtTarget) -> Result<()> {
        let tid = t.tid.to_string();
        if let Some(out) = &t.outgoing_account {
            self.account_unbind(&tid, out, true).await?;
        }
        for user in t.incoming_accounts.iter().rev() {
            self.account_unbind(&tid, user, false).await?;
        }
        Ok(())
    }

    pub(super) async fn account_delete(&self, user: &str) -> Result<()> {
        self.tgtadm(&["--mode", "account", "--op", "delete", "--user", user])
            .await
            .map(drop)
    }

    /// Deletes those of `candidates` no target has bound any more.
    pub(super) async fn delete_orphan_accounts(
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

    pub(super) async fn lun_new(&self, tid: &str, path: &str) -> Result<()> {
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

    pub(super) async fn lun_set_thin(&self, tid: &str, on: bool) -> Result<()> {
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
    pub(super) async fn lun_delete(&self, tid: &str, lun: u64) -> Result<()> {
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

    pub(super) fn thin(&self) -> bool {
        self.cfg.bstype == THIN_BSTYPE
    }
}

/// `--mode X --op Y` of a tgtadm argv, for error messages.
pub(super) fn tgtadm_what(args: &[&str]) -> String {
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
pub(super) fn acl_flag(entry: &str) -> &'static str {
    let e = entry.to_ascii_lowercase();
    if e.starts_with("iqn.") || e.starts_with("eui.") || e.starts_with("naa.") {
        "--initiator-name"
    } else {
        "--initiator-address"
    }
}

/// The backing path as tgtadm gets it: UTF-8, and free of the `,` that
/// separates tgt's parameters.
pub(super) fn backing_path_arg(path: &Path) -> Result<&str> {
    match path.to_str() {
        Some(s) if s.starts_with('/') && !s.contains([',', '\n']) => Ok(s),
        _ => Err(Error::invalid(format!(
            "backing path {} can't be given to tgt: it must be absolute UTF-8 without ',' or newlines",
            path.display()
        ))),
    }
}

pub(super) fn lowest_free_tid(targets: &[TgtTarget]) -> u32 {
    let used: BTreeSet<u32> = targets.iter().map(|t| t.tid).collect();
    (1..).find(|tid| !used.contains(tid)).expect("a free tid")
}

/// The error for a tgtadm run, or None when it succeeded. Failures meaning
/// tgtd is not there are Unavailable; tgt's own error messages map onto our
/// kinds; the rest is Internal with stderr.
pub(super) fn tgtadm_failure(cmd: &Cmd, out: &Output) -> Option<Error> {
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
