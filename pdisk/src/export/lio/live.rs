//! Reading the live tree back: our targets as [`LiveExport`]s, and whether each
//! is whole (what `check`/`restore` repair).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::configfs::BackingKind;
use super::owns;
use super::tree::{backstore_hba, chap_value, info_field, Lio};
use crate::error::Result;
use crate::export::{ExportHealth, LiveExport};

impl Lio {
    pub(super) fn list(&self) -> Result<Vec<LiveExport>> {
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
    /// the ACLs' CHAP, a fileio size behind its file), its health is
    /// `Broken`, so that `restore` sees it differ from its spec and
    /// re-applies it; `backing_path` is then its backstore's, if it has one.
    pub(super) fn live_export(&self, iqn: &str) -> Result<LiveExport> {
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
        // The target's user (mutual CHAP) likewise: one on every ACL, or a
        // comma-joined list that never matches a spec.
        let target_users: Vec<Option<String>> = initiators
            .iter()
            .map(|i| {
                self.read_opt(&acls.join(i).join("auth/userid_mutual"))
                    .as_deref()
                    .and_then(chap_value)
                    .map(str::to_owned)
            })
            .collect();
        let distinct_targets: BTreeSet<&str> =
            target_users.iter().flatten().map(String::as_str).collect();
        let chap_target_user = match (
            distinct_targets.len(),
            target_users.iter().all(Option::is_some),
        ) {
            (0, _) => None,
            (1, true) => distinct_targets.iter().next().map(|u| u.to_string()),
            _ => Some(
                target_users
                    .iter()
                    .map(|u| u.as_deref().unwrap_or("(none)"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        };
        let (backing_path, health) = match self.whole(&tpg, &initiators, chap_user.is_some()) {
            Ok(p) => (Some(PathBuf::from(p)), ExportHealth::Whole),
            Err(why) => {
                tracing::debug!(target = iqn, why = %why, "lio: target is not whole");
                let backstore = self.find_backstores(iqn).ok().and_then(|dirs| {
                    dirs.iter()
                        .find_map(|d| self.backstore_path(d))
                        .map(PathBuf::from)
                });
                (backstore, ExportHealth::Broken(why))
            }
        };
        Ok(LiveExport {
            target_iqn: iqn.to_owned(),
            backing_path,
            initiators,
            chap_user,
            chap_target_user,
            health,
        })
    }

    /// The backing path of a whole target, or why it is not whole.
    pub(super) fn whole(
        &self,
        tpg: &Path,
        initiators: &[String],
        chap: bool,
    ) -> Result<String, String> {
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
