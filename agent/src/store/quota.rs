//! Project quotas on this host (`quotas`): a project's limits, and its
//! usage counted from the guests the store has.

use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use stratus_core::error::Result;
use stratus_core::quota;

use super::{db_err, decode, encode, AgentStore, QUOTAS};

/// A project's limits on this host; None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub vms: Option<u64>,
    pub vcpus: Option<u64>,
    pub memory: Option<u64>,
}

impl quota::Limits for QuotaLimits {
    fn named(&mut self) -> [(&'static str, &mut Option<u64>); 3] {
        [
            ("vms", &mut self.vms),
            ("vcpus", &mut self.vcpus),
            ("memory_bytes", &mut self.memory),
        ]
    }
}

/// What a project's guests hold (every guest the store has, whatever its
/// state: a defined guest holds its place, as for the host's capacity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory: u64,
}

impl quota::Book for AgentStore {
    type Limits = QuotaLimits;
    type Usage = QuotaUsage;

    /// Changes `project`'s limits: `set` ones (Some) set, the others kept,
    /// then `clear` ones removed. Returns the new limits.
    fn set_quota(
        &self,
        project: &str,
        set: QuotaLimits,
        clear: QuotaLimits,
    ) -> Result<QuotaLimits> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let q = {
            let mut t = tx.open_table(QUOTAS).map_err(db_err)?;
            let old = t.get(project).map_err(db_err)?.map(|v| v.value().to_vec());
            let old: QuotaLimits = match old {
                Some(b) => decode("quota", &b)?,
                None => QuotaLimits::default(),
            };
            let q = quota::merged(old, set, clear);
            if q == QuotaLimits::default() {
                t.remove(project).map_err(db_err)?;
            } else {
                t.insert(project, encode(&q).as_slice()).map_err(db_err)?;
            }
            q
        };
        tx.commit().map_err(db_err)?;
        Ok(q)
    }

    /// `project`'s limits (all None when it has none) and usage.
    fn quota(&self, project: &str) -> Result<(QuotaLimits, QuotaUsage)> {
        let limits = {
            let tx = self.db.begin_read().map_err(db_err)?;
            let t = tx.open_table(QUOTAS).map_err(db_err)?;
            let x = t.get(project).map_err(db_err)?;
            match x {
                Some(v) => decode("quota", v.value())?,
                None => QuotaLimits::default(),
            }
        };
        let mut u = QuotaUsage::default();
        for v in self.vms()?.iter().filter(|v| v.project == project) {
            u.vms += 1;
            u.vcpus += u64::from(v.spec.vcpus);
            u.memory = u.memory.saturating_add(v.spec.memory.0);
        }
        Ok((limits, u))
    }

    /// Every project with a quota or with guests, sorted.
    fn quota_projects(&self) -> Result<Vec<String>> {
        let mut out: std::collections::BTreeSet<String> = self
            .vms()?
            .into_iter()
            .map(|v| v.project)
            .filter(|p| !p.is_empty())
            .collect();
        let tx = self.db.begin_read().map_err(db_err)?;
        for r in tx
            .open_table(QUOTAS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            out.insert(r.map_err(db_err)?.0.value().to_owned());
        }
        Ok(out.into_iter().collect())
    }
}
