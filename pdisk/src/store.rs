//! The metadata store: pdiskd's source of truth for intent.
//!
//! One redb database (`pdisk.redb` in the data dir) holds volumes, snapshots,
//! exports (with their CHAP secrets, so the file is created mode 0600) and the
//! name index. Every change is one redb write transaction, so after a crash the
//! store shows either all of a change or none of it.
//!
//! Invariants kept here (not by callers):
//! - a volume name and a snapshot name each map to exactly one UUID;
//! - an export exists only for an existing volume;
//! - a volume with snapshots or an export cannot be removed;
//! - a project's volumes, snapshots and provisioned bytes stay within its
//!   quota: the check and the insert (or growth) are one transaction, so
//!   concurrent creates cannot pass a quota together.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use stratus_pki::tenancy::Creator;

use crate::error::{Error, Result};
use crate::types::{ByteSize, Chap, Iqn, Labels, VolumeName};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const EXPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("exports");
/// "v:<name>" and "s:<name>" -> uuid.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");
/// project -> its [`QuotaLimits`].
const QUOTAS: TableDefinition<&str, &[u8]> = TableDefinition::new("quotas");

/// A project's limits; None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub volumes: Option<u64>,
    pub snapshots: Option<u64>,
    /// Provisioned bytes: the sizes of its volumes and snapshots.
    pub bytes: Option<u64>,
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
            u.volumes += 1;
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
fn check_quota(tx: &redb::WriteTransaction, project: &str, more: QuotaUsage) -> Result<()> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Creating,
    Ready,
    Deleting,
    Error,
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "id")]
pub enum Source {
    Empty,
    Volume(Uuid),
    Snapshot(Uuid),
    /// sha256 of the imported image, or "upload".
    Image(String),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Empty => String::new(),
            Source::Volume(u) => format!("volume:{u}"),
            Source::Snapshot(u) => format!("snapshot:{u}"),
            Source::Image(s) => format!("image:{s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub uuid: Uuid,
    pub name: VolumeName,
    pub size: ByteSize,
    pub labels: Labels,
    pub state: VolumeState,
    pub state_reason: String,
    pub source: Source,
    pub created_at: String,
    /// The owning project, fixed at creation: "" = no project (admin-only),
    /// which is also what records older than projects load as.
    #[serde(default)]
    pub project: String,
    /// Who created it. None in records older than caller identities: those
    /// were made when every caller was the host's admin, and are trusted as
    /// an admin's (an image base is trusted only when an agent or an admin
    /// made it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<Creator>,
    /// May be exported read-write to more than one host at once (requests
    /// must also say `multi_attach`): for live migration and clustered
    /// file systems. False in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_multi_attach: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub uuid: Uuid,
    pub name: VolumeName,
    pub volume: Uuid,
    pub size: ByteSize,
    /// False while the snapshot is being made; such a record found at start
    /// belongs to an interrupted operation.
    pub complete: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub volume: Uuid,
    pub target_iqn: Iqn,
    pub initiators: Vec<Iqn>,
    pub chap: Option<Chap>,
    /// Who set `chap` (a caller identity, `agent/compute-7`): only that
    /// caller or an admin may replace it. None in records older than
    /// identities (replaceable by any caller allowed to export, once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_set_by: Option<String>,
    /// True once an unexport is committed but the target may still be live:
    /// reconciliation and the export watchdog remove the target and then
    /// the record, never re-create it. Absent in older stores.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unexporting: bool,
}

pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b)
        .map_err(|e| Error::internal(format!("metadata store: corrupt {what} record: {e}")))
}

fn vkey(name: &VolumeName) -> String {
    format!("v:{name}")
}
fn skey(name: &VolumeName) -> String {
    format!("s:{name}")
}

impl Store {
    /// Opens or creates `dir/pdisk.redb`, readable by root only.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        let path = dir.join("pdisk.redb");
        let db = Database::create(&path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(path.display(), e))?;
        }
        let tx = db.begin_write()?;
        tx.open_table(VOLUMES)?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(EXPORTS)?;
        tx.open_table(NAMES)?;
        tx.open_table(QUOTAS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    // ---- volumes ----

    /// Inserts a new volume; AlreadyExists when its name is taken,
    /// ResourceExhausted when it would pass its project's quota.
    pub fn insert_volume(&self, v: &VolumeRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        check_quota(
            &tx,
            &v.project,
            QuotaUsage {
                volumes: 1,
                snapshots: 0,
                bytes: v.size.0,
            },
        )
        .map_err(|e| e.context(format!("volume {}", v.name)))?;
        {
            let mut names = tx.open_table(NAMES)?;
            if names.get(vkey(&v.name).as_str())?.is_some() {
                return Err(Error::exists(format!("volume {} already exists", v.name)));
            }
            names.insert(vkey(&v.name).as_str(), v.uuid.to_string().as_str())?;
            let mut vols = tx.open_table(VOLUMES)?;
            vols.insert(v.uuid.to_string().as_str(), encode(v).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a volume record (same UUID and name); a record that grows
    /// must stay within its project's byte quota.
    pub fn update_volume(&self, v: &VolumeRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        let key = v.uuid.to_string();
        let old: VolumeRecord = match tx.open_table(VOLUMES)?.get(key.as_str())? {
            Some(old) => decode("volume", old.value())?,
            None => return Err(Error::not_found(format!("volume {} not found", v.name))),
        };
        if v.size > old.size {
            check_quota(
                &tx,
                &v.project,
                QuotaUsage {
                    bytes: v.size.0 - old.size.0,
                    ..Default::default()
                },
            )
            .map_err(|e| e.context(format!("volume {}", v.name)))?;
        }
        {
            tx.open_table(VOLUMES)?
                .insert(key.as_str(), encode(v).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes a volume that has neither snapshots nor an export.
    pub fn remove_volume(&self, uuid: Uuid) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let key = uuid.to_string();
            let mut vols = tx.open_table(VOLUMES)?;
            let Some(rec) = vols.remove(key.as_str())? else {
                return Err(Error::not_found(format!("volume {uuid} not found")));
            };
            let rec: VolumeRecord = decode("volume", rec.value())?;
            if tx.open_table(EXPORTS)?.get(key.as_str())?.is_some() {
                return Err(Error::precondition(format!(
                    "volume {} is exported",
                    rec.name
                )));
            }
            for s in tx.open_table(SNAPSHOTS)?.iter()? {
                let (_, v) = s?;
                let s: SnapshotRecord = decode("snapshot", v.value())?;
                if s.volume == uuid {
                    return Err(Error::precondition(format!(
                        "volume {} has snapshot {}",
                        rec.name, s.name
                    )));
                }
            }
            tx.open_table(NAMES)?.remove(vkey(&rec.name).as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn volume(&self, uuid: Uuid) -> Result<Option<VolumeRecord>> {
        let tx = self.db.begin_read()?;
        let vols = tx.open_table(VOLUMES)?;
        let x = vols.get(uuid.to_string().as_str())?;
        x.map(|v| decode("volume", v.value())).transpose()
    }

    /// Resolves a reference (UUID or name) to a volume; NotFound otherwise.
    pub fn find_volume(&self, r: &str) -> Result<VolumeRecord> {
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(v) = self.volume(u)? {
                return Ok(v);
            }
        }
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        if let Some(u) = names.get(format!("v:{r}").as_str())? {
            let vols = tx.open_table(VOLUMES)?;
            if let Some(v) = vols.get(u.value())? {
                return decode("volume", v.value());
            }
        }
        Err(Error::not_found(format!("volume {r} not found")))
    }

    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let tx = self.db.begin_read()?;
        let vols = tx.open_table(VOLUMES)?;
        let mut out: Vec<VolumeRecord> = vols
            .iter()?
            .map(|r| {
                let (_, v) = r?;
                decode("volume", v.value())
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    // ---- snapshots ----

    /// Inserts a snapshot of an existing volume; AlreadyExists on a taken
    /// name, ResourceExhausted past its volume's project's quota.
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let volume: VolumeRecord =
                match tx.open_table(VOLUMES)?.get(s.volume.to_string().as_str())? {
                    Some(v) => decode("volume", v.value())?,
                    None => return Err(Error::not_found(format!("volume {} not found", s.volume))),
                };
            check_quota(
                &tx,
                &volume.project,
                QuotaUsage {
                    volumes: 0,
                    snapshots: 1,
                    bytes: s.size.0,
                },
            )
            .map_err(|e| e.context(format!("snapshot {}", s.name)))?;
            let mut names = tx.open_table(NAMES)?;
            if names.get(skey(&s.name).as_str())?.is_some() {
                return Err(Error::exists(format!("snapshot {} already exists", s.name)));
            }
            names.insert(skey(&s.name).as_str(), s.uuid.to_string().as_str())?;
            tx.open_table(SNAPSHOTS)?
                .insert(s.uuid.to_string().as_str(), encode(s).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn update_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(SNAPSHOTS)?
            .insert(s.uuid.to_string().as_str(), encode(s).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn remove_snapshot(&self, uuid: Uuid) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let Some(rec) = snaps.remove(uuid.to_string().as_str())? else {
                return Err(Error::not_found(format!("snapshot {uuid} not found")));
            };
            let rec: SnapshotRecord = decode("snapshot", rec.value())?;
            tx.open_table(NAMES)?.remove(skey(&rec.name).as_str())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn snapshot(&self, uuid: Uuid) -> Result<Option<SnapshotRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let x = t.get(uuid.to_string().as_str())?;
        x.map(|v| decode("snapshot", v.value())).transpose()
    }

    pub fn find_snapshot(&self, r: &str) -> Result<SnapshotRecord> {
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(s) = self.snapshot(u)? {
                return Ok(s);
            }
        }
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        if let Some(u) = names.get(format!("s:{r}").as_str())? {
            if let Some(v) = tx.open_table(SNAPSHOTS)?.get(u.value())? {
                return decode("snapshot", v.value());
            }
        }
        Err(Error::not_found(format!("snapshot {r} not found")))
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out: Vec<SnapshotRecord> = t
            .iter()?
            .map(|r| {
                let (_, v) = r?;
                decode("snapshot", v.value())
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    // ---- quotas ----

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

    /// Changes `project`'s limits: `set` ones (Some) are set, the others
    /// kept, then `clear` ones removed. Returns the new limits.
    pub fn set_quota(
        &self,
        project: &str,
        set: QuotaLimits,
        clear: QuotaLimits,
    ) -> Result<QuotaLimits> {
        let tx = self.db.begin_write()?;
        let limits = {
            let mut t = tx.open_table(QUOTAS)?;
            let mut q: QuotaLimits = match t.get(project)? {
                Some(q) => decode("quota", q.value())?,
                None => QuotaLimits::default(),
            };
            q.volumes = set
                .volumes
                .or(q.volumes)
                .filter(|_| clear.volumes.is_none());
            q.snapshots = set
                .snapshots
                .or(q.snapshots)
                .filter(|_| clear.snapshots.is_none());
            q.bytes = set.bytes.or(q.bytes).filter(|_| clear.bytes.is_none());
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
    pub fn quota(&self, project: &str) -> Result<(QuotaLimits, QuotaUsage)> {
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
    pub fn quota_projects(&self) -> Result<Vec<String>> {
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

    // ---- exports ----

    /// Creates or replaces the export of an existing volume.
    pub fn put_export(&self, e: &ExportRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let key = e.volume.to_string();
            if tx.open_table(VOLUMES)?.get(key.as_str())?.is_none() {
                return Err(Error::not_found(format!("volume {} not found", e.volume)));
            }
            tx.open_table(EXPORTS)?
                .insert(key.as_str(), encode(e).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn remove_export(&self, volume: Uuid) -> Result<Option<ExportRecord>> {
        let tx = self.db.begin_write()?;
        let old = {
            let mut t = tx.open_table(EXPORTS)?;
            let x = t.remove(volume.to_string().as_str())?;
            x.map(|v| decode("export", v.value())).transpose()?
        };
        tx.commit()?;
        Ok(old)
    }

    pub fn export(&self, volume: Uuid) -> Result<Option<ExportRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(EXPORTS)?;
        let x = t.get(volume.to_string().as_str())?;
        x.map(|v| decode("export", v.value())).transpose()
    }

    pub fn exports(&self) -> Result<Vec<ExportRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(EXPORTS)?;
        t.iter()?
            .map(|r| {
                let (_, v) = r?;
                decode("export", v.value())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn vol(name: &str) -> VolumeRecord {
        VolumeRecord {
            allow_multi_attach: false,
            uuid: Uuid::new_v4(),
            name: name.parse().unwrap(),
            size: ByteSize(1 << 20),
            labels: Labels::new(),
            state: VolumeState::Ready,
            state_reason: String::new(),
            source: Source::Empty,
            created_at: "2026-11-21T00:00:00Z".into(),
            project: String::new(),
            created_by: None,
        }
    }

    #[test]
    fn records_older_than_projects_load_as_project_none_made_by_nobody_known() {
        let mut old = serde_json::to_value(vol("legacy")).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("project");
        obj.remove("created_by");
        let back: VolumeRecord = decode("volume", old.to_string().as_bytes()).unwrap();
        assert_eq!(back.project, "");
        assert_eq!(back.created_by, None);
        let mut owned = vol("owned");
        owned.project = "astro".into();
        owned.created_by = Some(Creator {
            role: stratus_pki::Role::Project,
            name: "astro".into(),
        });
        let back: VolumeRecord = decode("volume", &encode(&owned)).unwrap();
        assert_eq!(back, owned);
    }

    #[test]
    fn names_are_unique_and_refs_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let a = vol("a");
        s.insert_volume(&a).unwrap();
        let err = s.insert_volume(&vol("a")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(s.find_volume("a").unwrap().uuid, a.uuid);
        assert_eq!(s.find_volume(&a.uuid.to_string()).unwrap().name, a.name);
        assert_eq!(s.find_volume("b").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(s.volumes().unwrap().len(), 1);
    }

    #[test]
    fn dependents_block_removal_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = vol("a");
        let snap = SnapshotRecord {
            uuid: Uuid::new_v4(),
            name: "a-1".parse().unwrap(),
            volume: a.uuid,
            size: a.size,
            complete: true,
            created_at: String::new(),
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.insert_volume(&a).unwrap();
            s.insert_snapshot(&snap).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let err = s.remove_volume(a.uuid).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.message().contains("a-1"));
        s.remove_snapshot(snap.uuid).unwrap();
        s.put_export(&ExportRecord {
            volume: a.uuid,
            target_iqn: "iqn.2026-11.io.stratus:t".parse().unwrap(),
            initiators: vec![],
            chap: None,
            chap_set_by: None,
            unexporting: false,
        })
        .unwrap();
        assert_eq!(
            s.remove_volume(a.uuid).unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
        s.remove_export(a.uuid).unwrap();
        s.remove_volume(a.uuid).unwrap();
        // The name is free again.
        s.insert_volume(&vol("a")).unwrap();
    }
}
