//! Parsing `tgtadm --mode target --op show`.

use std::path::PathBuf;

use super::VOLUME_LUN;
use crate::error::{Error, Result};
use crate::export::{ExportHealth, LiveExport};

/// One target as `tgtadm --mode target --op show` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TgtTarget {
    pub(super) tid: u32,
    pub(super) iqn: String,
    /// Number of I_T nexuses (logged-in initiator sessions).
    pub(super) nexuses: usize,
    pub(super) luns: Vec<TgtLun>,
    /// Incoming (initiator-authenticating) accounts, in tgt's order.
    pub(super) incoming_accounts: Vec<String>,
    pub(super) outgoing_account: Option<String>,
    /// IQN and address ACL entries, as listed.
    pub(super) acl: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct TgtLun {
    pub(super) lun: u64,
    pub(super) bstype: String,
    pub(super) path: Option<PathBuf>,
    pub(super) thin: bool,
}

impl TgtTarget {
    pub(super) fn lun(&self, lun: u32) -> Option<&TgtLun> {
        self.luns.iter().find(|l| l.lun == u64::from(lun))
    }

    pub(super) fn uses_account(&self, user: &str) -> bool {
        self.incoming_accounts.iter().any(|u| u == user)
            || self.outgoing_account.as_deref() == Some(user)
    }

    /// `chap_user` is the single incoming user, `chap_target_user` the
    /// outgoing one (mutual CHAP). Any other account setup (several incoming
    /// users, an outgoing one without an incoming one) is shown
    /// comma-joined, e.g. `alice,bob (outgoing)`: never a valid CHAP user, so
    /// it never matches a spec and `restore` corrects it.
    pub(super) fn to_live(&self) -> LiveExport {
        let mut chap_target_user = None;
        let chap_user = match (&self.incoming_accounts[..], &self.outgoing_account) {
            ([], None) => None,
            ([one], None) => Some(one.clone()),
            ([one], Some(out)) => {
                chap_target_user = Some(out.clone());
                Some(one.clone())
            }
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
            chap_target_user,
            // tgtd applies a target in one step: what it lists is whole.
            health: ExportHealth::Whole,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    Other,
    Nexus,
    Lun,
    Account,
    Acl,
}

/// Parses the output of `tgtadm --mode target --op show` (tgt's
/// `tgt_target_show_all`): a `Target <tid>: <name>` line per target, then
/// sections indented by 4 spaces, their entries by 8, LUN details by 12.
pub(super) fn parse_target_show(out: &str) -> Result<Vec<TgtTarget>> {
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
