//! Project quotas (`quotas`): a project's limits, its usage counted from
//! the volume and snapshot tables, and the checks that keep it within them.

use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use stratus_core::quota::{self, Book as _};

use super::{decode, encode, SnapshotRecord, Store, VolumeRecord, QUOTAS, SNAPSHOTS, VOLUMES};
use crate::error::{Error, Result};
use crate::types::ByteSize;

/// A project's limits; None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub volumes: Option<u64>,
    pub snapshots: Option<u64>,
    /// Provisioned bytes: the sizes of its volumes and snapshots.
    pub bytes: Option<u64>,
}

impl quota::Limits for QuotaLimits {
    fn named(&mut self) -> [(&'static str, &mut Option<u64>); 3] {
        [
            ("volumes", &mut self.volumes),
            ("snapshots", &mut self.snapshots),
            ("bytes", &mut self.bytes),
        ]
    }
}

/// What a project holds, counted as its quota counts (volumes in every
/// state, so a create in progress holds its place).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub volumes: u64,
    pub snapshots: u64,
    pub bytes: u64,
}

/// `project`'s usage, from the volume and snapshot tables of one transaction.
fn usage_of(
    vols: &impl ReadableTable<&'static str, &'static [u8]>,
    snaps: &impl ReadableTable<&'static str, &'static [u8]>,
    project: &str,
) -> Result<QuotaUsage> {
    let mut u = QuotaUsage::default();
    let mut mine = std::collections::HashSet::new();
    for r in vols.iter()? {
        let (_, v) = r?;
        let v: VolumeRecord = decode("volume", v.value())?;
        if v.project == project {
            // A quarantined volume keeps its data (bytes) but no longer
            // counts as one of the project's volumes.
            if v.quarantine.is_none() {
                u.volumes += 1;
            }
            u.bytes = u.bytes.saturating_add(v.size.0);
            mine.insert(v.uuid);
        }
    }
    for r in snaps.iter()? {
        let (_, s) = r?;
        let s: SnapshotRecord = decode("snapshot", s.value())?;
        if mine.contains(&s.volume) {
            u.snapshots += 1;
            u.bytes = u.bytes.saturating_add(s.size.0);
        }
    }
    Ok(u)
}

/// Refuses `more` for `project` when it would pass one of its limits
/// (ResourceExhausted naming the quota and the usage). Volumes of no
/// project ("") have no quota.
pub(super) fn check_quota(
    tx: &redb::WriteTransaction,
    project: &str,
    more: QuotaUsage,
) -> Result<()> {
    if project.is_empty() {
        return Ok(());
    }
    let limits: QuotaLimits = match tx.open_table(QUOTAS)?.get(project)? {
        Some(q) => decode("quota", q.value())?,
        None => return Ok(()),
    };
    let used = usage_of(
        &tx.open_table(VOLUMES)?,
        &tx.open_table(SNAPSHOTS)?,
        project,
    )?;
    within_quota(project, &limits, &used, &more)
}

/// Refuses `more` on top of `used` when it passes one of `limits`.
fn within_quota(
    project: &str,
    limits: &QuotaLimits,
    used: &QuotaUsage,
    more: &QuotaUsage,
) -> Result<()> {
    let over = |limit: Option<u64>, used: u64, more: u64| {
        limit.filter(|&l| more > 0 && used.saturating_add(more) > l)
    };
    if let Some(l) = over(limits.volumes, used.volumes, more.volumes) {
        return Err(Error::exhausted(format!(
            "project {project}: volume quota reached ({} of {l} volumes)",
            used.volumes
        )));
    }
    if let Some(l) = over(limits.snapshots, used.snapshots, more.snapshots) {
        return Err(Error::exhausted(format!(
            "project {project}: snapshot quota reached ({} of {l} snapshots)",
            used.snapshots
        )));
    }
    if let Some(l) = over(limits.bytes, used.bytes, more.bytes) {
        return Err(Error::exhausted(format!(
            "project {project}: byte quota exceeded: {} more requested, {} of {} provisioned",
            ByteSize(more.bytes),
            ByteSize(used.bytes),
            ByteSize(l)
        )));
    }
    Ok(())
}

impl Store {
    /// Refuses growing `v` to `size` past its project's byte quota.
    pub fn check_growth(&self, v: &VolumeRecord, size: ByteSize) -> Result<()> {
        let tx = self.db.begin_write()?;
        check_quota(
            &tx,
            &v.project,
            QuotaUsage {
                bytes: size.0.saturating_sub(v.size.0),
                ..Default::default()
            },
        )
        .map_err(|e| e.context(format!("volume {}", v.name)))
    }

    /// Refuses, before any work, what would pass `project`'s quota now (a
    /// streamed upload, before its bytes are taken in). Advisory: the
    /// insert that records the object checks again in its transaction.
    pub fn check_quota_now(&self, project: &str, more: QuotaUsage) -> Result<()> {
        if project.is_empty() {
            return Ok(());
        }
        let (limits, used) = self.quota(project)?;
        within_quota(project, &limits, &used, &more)
    }

    /// The provisioned bytes `project` may still add, with its usage and
    /// limit (None: no byte quota).
    pub fn bytes_room(&self, project: &str) -> Result<Option<(u64, u64, u64)>> {
        if project.is_empty() {
            return Ok(None);
        }
        let (limits, used) = self.quota(project)?;
        Ok(limits
            .bytes
            .map(|l| (l.saturating_sub(used.bytes), used.bytes, l)))
    }
}

impl quota::Book for Store {
    type Limits = QuotaLimits;
    type Usage = QuotaUsage;

    /// Changes `project`'s limits: `set` ones (Some) are set, the others
    /// kept, then `clear` ones removed. Returns the new limits.
    fn set_quota(
        &self,
        project: &str,
        set: QuotaLimits,
        clear: QuotaLimits,
    ) -> Result<QuotaLimits> {
        let tx = self.db.begin_write()?;
        let limits = {
            let mut t = tx.open_table(QUOTAS)?;
            let old: QuotaLimits = match t.get(project)? {
                Some(q) => decode("quota", q.value())?,
                None => QuotaLimits::default(),
            };
            let q = quota::merged(old, set, clear);
            if q == QuotaLimits::default() {
                t.remove(project)?;
            } else {
                t.insert(project, encode(&q).as_slice())?;
            }
            q
        };
        tx.commit()?;
        Ok(limits)
    }

    /// `project`'s limits (none set: all None) and usage.
    fn quota(&self, project: &str) -> Result<(QuotaLimits, QuotaUsage)> {
        let tx = self.db.begin_read()?;
        let limits = match tx.open_table(QUOTAS)?.get(project)? {
            Some(q) => decode("quota", q.value())?,
            None => QuotaLimits::default(),
        };
        let usage = usage_of(
            &tx.open_table(VOLUMES)?,
            &tx.open_table(SNAPSHOTS)?,
            project,
        )?;
        Ok((limits, usage))
    }

    /// Every project with a quota or with volumes, sorted.
    fn quota_projects(&self) -> Result<Vec<String>> {
        let mut out = std::collections::BTreeSet::new();
        for v in self.volumes()? {
            if !v.project.is_empty() {
                out.insert(v.project);
            }
        }
        let tx = self.db.begin_read()?;
        for r in tx.open_table(QUOTAS)?.iter()? {
            out.insert(r?.0.value().to_owned());
        }
        Ok(out.into_iter().collect())
    }
}
