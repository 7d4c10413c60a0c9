//! The fabric side: a target's TPG, LUN, portal, ACLs and CHAP converged to a
//! spec (export), and torn down leaf first (unexport).

use std::collections::BTreeSet;
use std::path::Path;

use super::tree::{dir_tail, Lio, Probe};
use super::{LUN_LINK, MAPPED_LUN_LINK, TPGT, TPG_ATTRIBS};
use crate::error::{Error, Result};
use crate::export::params::IscsiKey;
use crate::export::ExportSpec;
use crate::types::Iqn;

impl Lio {
    /// Removes a mapped LUN (an ACL's view of a TPG LUN).
    pub(super) fn remove_mapped_lun(&self, dir: &Path) -> Result<()> {
        for l in self.links(dir)? {
            self.unlink(&dir.join(l))?;
        }
        self.rmdir(dir)
    }

    pub(super) fn remove_acl(&self, acl: &Path) -> Result<()> {
        for m in self.subdirs(acl)? {
            if m.starts_with("lun_") {
                self.remove_mapped_lun(&acl.join(m))?;
            }
        }
        self.rmdir(acl)
    }

    /// Removes TPG LUN `lun` and every ACL's mapping of it.
    pub(super) fn remove_lun(&self, tpg: &Path, lun: &str) -> Result<()> {
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
    pub(super) fn remove_tpg(&self, tpg: &Path) -> Result<()> {
        let enable = tpg.join("enable");
        if self.read_opt(&enable).as_deref().map(str::trim) == Some("1") {
            // Drops the sessions: no I/O reaches the LUNs after this.
            self.write(&enable, "0")?;
        }
        let acls = tpg.join("acls");
        for a in self.subdirs(&acls)? {
            self.remove_acl(&acls.join(a))?;
        }
        crate::failpoints::crash_point("lio::unexport::acls_removed");
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
    pub(super) fn converge_lun(&self, tpg: &Path, backstore: &Path) -> Result<()> {
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
    pub(super) fn converge_portal(&self, tpg: &Path) -> Result<()> {
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
    pub(super) fn converge_mapped_lun(&self, tpg: &Path, acl: &Path) -> Result<()> {
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
    pub(super) fn converge_acls(&self, tpg: &Path, spec: &ExportSpec) -> Result<()> {
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
                crate::failpoints::crash_point("lio::export::acl_removed");
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
                    // Mutual CHAP: the credentials the target answers an
                    // initiator's challenge with. Without them LIO refuses a
                    // login whose initiator asks the target to prove itself.
                    match chap.mutual() {
                        Some(t) => {
                            self.ensure_chap_value(&auth.join("userid_mutual"), &t.user, false)?;
                            self.ensure_chap_value(
                                &auth.join("password_mutual"),
                                t.secret(),
                                true,
                            )?;
                        }
                        None => {
                            self.clear_chap_value(&auth.join("userid_mutual"))?;
                            self.clear_chap_value(&auth.join("password_mutual"))?;
                        }
                    }
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

    pub(super) fn require_iscsi(&self) -> Result<()> {
        match self.probe() {
            Probe::Ready => Ok(()),
            Probe::NotMounted(w) | Probe::NoCore(w) | Probe::NoIscsi(w) => {
                Err(Error::unavailable(w))
            }
        }
    }

    pub(super) fn export(&self, spec: &ExportSpec) -> Result<()> {
        self.require_iscsi()?;
        let want = self.backing(spec)?;
        let iqn = spec.target_iqn.as_str();
        let target = self.target_dir(iqn);
        let tpg = self.tpg_dir(iqn);

        // 1. The backstore, so the LUN can link to it.
        let backstore = self.converge_backstore(iqn, &want, &tpg)?;
        crate::failpoints::crash_point("lio::export::backstore_created");

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
        // The iSCSI parameters the TPG offers at login (new sessions); the
        // queue depth is the command window ACLs made after it get.
        for (key, value) in self.cfg.params.iter() {
            let attr = match key {
                IscsiKey::QueueDepth => tpg.join("attrib/default_cmdsn_depth"),
                k => tpg.join("param").join(k.name()),
            };
            self.ensure_attr(&attr, &value.to_string())?;
        }
        crate::failpoints::crash_point("lio::export::target_created");

        // 3. LUN 1, the portal, ACLs with CHAP and mapped LUNs.
        self.converge_lun(&tpg, &backstore)?;
        crate::failpoints::crash_point("lio::export::lun_added");
        self.converge_portal(&tpg)?;
        self.converge_acls(&tpg, spec)?;
        crate::failpoints::crash_point("lio::export::acls_set");

        // 4. Open: logins start once everything above is in place.
        self.ensure_attr(&tpg.join("enable"), "1")
    }

    pub(super) fn unexport(&self, iqn: &str) -> Result<()> {
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
            crate::failpoints::crash_point("lio::unexport::target_removed");
        }
        for dir in self.find_backstores(iqn)? {
            self.rmdir(&dir)?;
            tracing::info!(backstore = %dir.display(), "lio: removed backstore");
        }
        Ok(())
    }
}
