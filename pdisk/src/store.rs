//! The metadata store: pdiskd's source of truth for intent.
//!
//! One redb database (`pdisk.redb` in the data dir) holds volumes, snapshots,
//! exports (with their CHAP secrets, so the file is created mode 0600) and the
//! name index. Every change is one redb write transaction, so after a crash the
//! store shows either all of a change or none of it.
//!
//! Invariants kept here (not by callers):
//! - within a project, a volume name and a snapshot name each map to exactly
//!   one UUID (names are unique per project, as in GCP projects or
//!   Kubernetes namespaces: a tenant's create never learns, through
//!   AlreadyExists, what another project calls its objects);
//! - an export exists only for an existing volume;
//! - a volume with snapshots or an export cannot be removed;
//! - a project's volumes, snapshots and provisioned bytes stay within its
//!   quota: the check and the insert (or growth) are one transaction, so
//!   concurrent creates cannot pass a quota together;
//! - a quarantined volume (one with [`VolumeRecord::quarantine`], while it
//!   waits and while it is purged) holds no name: its name may be taken by
//!   a new volume, and only a restore, checking the name is free in the
//!   same transaction, gives it one again. It counts in its project's bytes
//!   but not in its volumes.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use stratus_core::journal;
use tokio::sync::{broadcast, Notify};
use uuid::Uuid;

use stratus_pki::tenancy::Creator;

use crate::error::{Error, Result};
use crate::events::{NewPoolEvent, PoolEvent};
use crate::types::{ByteSize, Chap, Iqn, Labels, VolumeName};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const EXPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("exports");
/// "v:<project>/<name>" and "s:<project>/<name>" -> uuid (a snapshot's
/// project is its volume's; project names hold no `/`). Derived from the
/// records and rebuilt at every open, so stores from before per-project
/// names (keys "v:<name>") need no migration step.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");
/// project -> its [`QuotaLimits`].
const QUOTAS: TableDefinition<&str, &[u8]> = TableDefinition::new("quotas");

mod quota;
mod requests;

use quota::check_quota;
pub use quota::{QuotaLimits, QuotaUsage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Creating,
    Ready,
    Deleting,
    Error,
    /// Deleted, its data kept until [`Quarantine::purge_at_ms`].
    Quarantined,
}

/// A deleted volume's stay in quarantine. Kept on the record while it waits
/// (`quarantined`) and while it is purged (`deleting`), so the record is
/// known to hold no name whatever its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// When the delete was acknowledged (RFC 3339).
    pub deleted_at: String,
    /// When its data may be destroyed: Unix time in milliseconds.
    pub purge_at_ms: u64,
}

impl Quarantine {
    /// The purge time as RFC 3339 (seconds).
    pub fn purge_at(&self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.purge_at_ms);
        humantime::format_rfc3339_seconds(t).to_string()
    }
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
    /// Set once a delete put the volume in quarantine; cleared by a restore.
    /// Absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// A clone past the backend's maximum clone depth, published before it
    /// was flattened: the background flatten (`service/flatten.rs`) has
    /// still to run. Absent (false) in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flatten_pending: bool,
}

impl VolumeRecord {
    /// In quarantine and not being purged: what RestoreVolume may restore.
    pub fn is_quarantined(&self) -> bool {
        self.quarantine.is_some() && self.state == VolumeState::Quarantined
    }
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
    /// True while no target serves the export: it was made for an agent
    /// on the storage host itself, which opens the volume directly (issue
    /// 16). Reconciliation makes no target for it; a remote initiator
    /// added later turns it false (and gets a target). Absent in older
    /// stores.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// A live migration's second host, while it lasts (ExportVolumeRequest
    /// `migration`). Absent in older stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<ExportMigration>,
}

/// The bounded second host of a live migration on one export: what to put
/// back when the migration fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportMigration {
    /// The destination host's initiator.
    pub incoming: Iqn,
    /// The source's CHAP account and its setter, replaced by the
    /// destination's for the migration; restored when the destination's
    /// initiator is removed while the source's stays.
    pub previous_chap: Option<Chap>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_chap_set_by: Option<String>,
}

pub struct Store {
    db: Database,
    /// Events, told after their commit (WatchEvents' live half).
    live: broadcast::Sender<PoolEvent>,
    /// Woken after each commit of events: the outbox publisher.
    committed: Arc<Notify>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b)
        .map_err(|e| Error::internal(format!("metadata store: corrupt {what} record: {e}")))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

fn vkey(project: &str, name: &str) -> String {
    format!("v:{project}/{name}")
}
fn skey(project: &str, name: &str) -> String {
    format!("s:{project}/{name}")
}

/// What a name lookup may match: one project's objects, or every project's
/// (a call of an admin or an agent naming no project).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameScope<'a> {
    Project(&'a str),
    All,
}

/// Resolves `name` of `kind` ('v' or 's') in `scope` through the name
/// index. In every project, the object of no project ("") wins (so no
/// tenant can shadow an image base or an admin's volume); otherwise the
/// name must be unique across projects, or the ref is ambiguous
/// (InvalidArgument listing the projects: only admins and agents look
/// across projects, and they see them all).
fn lookup_name(
    names: &impl ReadableTable<&'static str, &'static str>,
    kind: char,
    what: &str,
    scope: NameScope,
    name: &str,
) -> Result<Option<String>> {
    let key = |project: &str| format!("{kind}:{project}/{name}");
    match scope {
        NameScope::Project(p) => Ok(names.get(key(p).as_str())?.map(|u| u.value().to_owned())),
        NameScope::All => {
            if let Some(u) = names.get(key("").as_str())? {
                return Ok(Some(u.value().to_owned()));
            }
            let prefix = format!("{kind}:");
            let suffix = format!("/{name}");
            let mut found = Vec::new();
            for r in names.range(prefix.as_str()..)? {
                let (k, u) = r?;
                let k = k.value();
                if !k.starts_with(&prefix) {
                    break;
                }
                if let Some(project) = k.strip_suffix(&suffix).map(|p| &p[prefix.len()..]) {
                    if !project.contains('/') {
                        found.push((project.to_owned(), u.value().to_owned()));
                    }
                }
            }
            match found.len() {
                0 => Ok(None),
                1 => Ok(found.pop().map(|(_, u)| u)),
                _ => Err(Error::invalid(format!(
                    "{what} {name} is ambiguous: projects {} each have one; \
                     name the project or use its UUID",
                    found
                        .iter()
                        .map(|(p, _)| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
    }
}

/// Rebuilds the name index from the volume and snapshot records.
fn rebuild_names(tx: &redb::WriteTransaction) -> Result<()> {
    tx.delete_table(NAMES)?;
    let vols = tx.open_table(VOLUMES)?;
    let snaps = tx.open_table(SNAPSHOTS)?;
    let mut names = tx.open_table(NAMES)?;
    let mut project_of = std::collections::HashMap::new();
    for r in vols.iter()? {
        let (_, v) = r?;
        let v: VolumeRecord = decode("volume", v.value())?;
        project_of.insert(v.uuid, v.project.clone());
        if v.quarantine.is_some() {
            continue;
        }
        names.insert(
            vkey(&v.project, v.name.as_str()).as_str(),
            v.uuid.to_string().as_str(),
        )?;
    }
    for r in snaps.iter()? {
        let (_, s) = r?;
        let s: SnapshotRecord = decode("snapshot", s.value())?;
        let project = project_of.get(&s.volume).map(String::as_str).unwrap_or("");
        names.insert(
            skey(project, s.name.as_str()).as_str(),
            s.uuid.to_string().as_str(),
        )?;
    }
    Ok(())
}

/// Removes `v`'s name from the index when the name is still its own (a
/// quarantined volume's name may belong to a newer volume by now).
fn remove_name_of(tx: &redb::WriteTransaction, v: &VolumeRecord) -> Result<()> {
    let mut names = tx.open_table(NAMES)?;
    let key = vkey(&v.project, v.name.as_str());
    let own = names
        .get(key.as_str())?
        .is_some_and(|u| u.value() == v.uuid.to_string());
    if own {
        names.remove(key.as_str())?;
    }
    Ok(())
}

impl Store {
    /// Opens or creates `dir/pdisk.redb`, readable by root only.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        let path = dir.join("pdisk.redb");
        let db = stratus_core::db::open(&path, stratus_core::db::LOCK_WAIT)?;
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
        tx.open_table(requests::REQUESTS)?;
        rebuild_names(&tx)?;
        journal::create_tables(&tx)?;
        crate::usage::create_tables(&tx)?;
        tx.commit()?;
        Ok(Store {
            db,
            live: broadcast::channel(4096).0,
            committed: Default::default(),
        })
    }

    /// Appends `events` to the journal in `tx`, commits, and only then
    /// tells live readers and the publisher.
    fn commit(&self, tx: WriteTransaction, events: &[NewPoolEvent]) -> Result<Vec<PoolEvent>> {
        let time = now_rfc3339();
        let out = journal::append(&tx, events.len(), |i, seq| {
            events[i].clone().into_event(seq, time.clone())
        })?;
        tx.commit()?;
        if !out.is_empty() {
            for e in &out {
                // No receivers is fine: the journal has it.
                let _ = self.live.send(e.clone());
            }
            self.committed.notify_one();
        }
        Ok(out)
    }

    /// The database, for the tables of other rooms (`crate::usage`).
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    // ---- the event journal ----

    /// Appends events that change no record (import progress and failures,
    /// drift).
    pub fn record(&self, events: &[NewPoolEvent]) -> Result<Vec<PoolEvent>> {
        let tx = self.db.begin_write()?;
        self.commit(tx, events)
    }

    /// Journaled events with seq > `since`, in order, at most `limit`;
    /// OutOfRange when `check` and events after `since` were compacted.
    pub fn events_after(&self, since: u64, limit: usize, check: bool) -> Result<Vec<PoolEvent>> {
        journal::events_after(&self.db, since, limit, check)
    }

    pub fn last_seq(&self) -> Result<u64> {
        journal::last_seq(&self.db)
    }

    pub fn oldest_seq(&self) -> Result<u64> {
        journal::oldest_seq(&self.db)
    }

    pub fn published_seq(&self) -> Result<u64> {
        journal::published_seq(&self.db)
    }

    pub fn set_published_seq(&self, seq: u64) -> Result<()> {
        journal::set_published_seq(&self.db, seq)
    }

    /// Live events, from the moment of the call.
    pub fn subscribe(&self) -> broadcast::Receiver<PoolEvent> {
        self.live.subscribe()
    }

    pub fn committed(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    /// Keeps at most `max_events` of the newest events and none older than
    /// `max_age` as of `now`. Returns (removed, oldest seq).
    pub fn compact_events(
        &self,
        max_events: u64,
        max_age: std::time::Duration,
        now: std::time::SystemTime,
    ) -> Result<(u64, u64)> {
        let last = self.last_seq()?;
        let oldest = self.oldest_seq()?;
        let mut cut = oldest.max(last.saturating_sub(max_events) + 1);
        let threshold = now.checked_sub(max_age).unwrap_or(std::time::UNIX_EPOCH);
        for e in self.events_after(cut - 1, usize::MAX, false)? {
            match humantime::parse_rfc3339(&e.time) {
                Ok(t) if t < threshold => cut = e.seq + 1,
                _ => break,
            }
        }
        let tx = self.db.begin_write()?;
        let removed = journal::remove_before(&tx, cut, &Default::default())?;
        tx.commit()?;
        Ok((removed, cut))
    }

    // ---- volumes ----

    /// Inserts a new volume; AlreadyExists when its name is taken in its
    /// project,
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
            let key = vkey(&v.project, v.name.as_str());
            if names.get(key.as_str())?.is_some() {
                return Err(Error::exists(format!("volume {} already exists", v.name)));
            }
            names.insert(key.as_str(), v.uuid.to_string().as_str())?;
            let mut vols = tx.open_table(VOLUMES)?;
            vols.insert(v.uuid.to_string().as_str(), encode(v).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a volume record (same UUID and name); a record that grows
    /// must stay within its project's byte quota.
    pub fn update_volume(&self, v: &VolumeRecord, events: &[NewPoolEvent]) -> Result<()> {
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
        self.commit(tx, events)?;
        Ok(())
    }

    /// Removes a volume that has neither snapshots nor an export.
    pub fn remove_volume(&self, uuid: Uuid, events: &[NewPoolEvent]) -> Result<()> {
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
            remove_name_of(&tx, &rec)?;
        }
        self.commit(tx, events)?;
        Ok(())
    }

    /// Puts a ready volume in quarantine: the record (state `quarantined`,
    /// `quarantine` set) and the release of its name, with `events`, in one
    /// transaction.
    pub fn quarantine_volume(&self, v: &VolumeRecord, events: &[NewPoolEvent]) -> Result<()> {
        debug_assert!(v.is_quarantined());
        let tx = self.db.begin_write()?;
        {
            let key = v.uuid.to_string();
            let mut vols = tx.open_table(VOLUMES)?;
            let old: VolumeRecord = match vols.get(key.as_str())? {
                Some(old) => decode("volume", old.value())?,
                None => return Err(Error::not_found(format!("volume {} not found", v.name))),
            };
            vols.insert(key.as_str(), encode(v).as_slice())?;
            remove_name_of(&tx, &old)?;
        }
        self.commit(tx, events)?;
        Ok(())
    }

    /// Brings quarantined volume `v` back as `restored` (ready, its name or
    /// a new one): AlreadyExists when that name is taken in its project,
    /// ResourceExhausted past the project's volume quota; the checks, the
    /// record, the name and `events` in one transaction.
    pub fn restore_volume(&self, restored: &VolumeRecord, events: &[NewPoolEvent]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            check_quota(
                &tx,
                &restored.project,
                QuotaUsage {
                    volumes: 1,
                    ..Default::default()
                },
            )
            .map_err(|e| e.context(format!("restoring volume {}", restored.name)))?;
            let mut names = tx.open_table(NAMES)?;
            let key = vkey(&restored.project, restored.name.as_str());
            if names.get(key.as_str())?.is_some() {
                return Err(Error::exists(format!(
                    "volume {} already exists (made after this one was deleted): \
                     restore it under another name (new_name; pdisk volume restore --as NEWNAME)",
                    restored.name
                )));
            }
            names.insert(key.as_str(), restored.uuid.to_string().as_str())?;
            let key = restored.uuid.to_string();
            let mut vols = tx.open_table(VOLUMES)?;
            let old: Option<VolumeRecord> = vols
                .get(key.as_str())?
                .map(|old| decode("volume", old.value()))
                .transpose()?;
            if !old.as_ref().is_some_and(VolumeRecord::is_quarantined) {
                return Err(Error::not_found(format!(
                    "volume {} is not in quarantine",
                    restored.uuid
                )));
            }
            vols.insert(key.as_str(), encode(restored).as_slice())?;
        }
        self.commit(tx, events)?;
        Ok(())
    }

    /// Every volume in quarantine (waiting or being purged), by name.
    pub fn quarantined_volumes(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self
            .volumes()?
            .into_iter()
            .filter(|v| v.quarantine.is_some())
            .collect())
    }

    /// Resolves a ref to a quarantined volume (waiting, not being purged):
    /// its UUID, or a name in `scope` that only one quarantined volume has
    /// (names are not unique in quarantine: InvalidArgument asking for the
    /// UUID); NotFound otherwise.
    pub fn find_quarantined_in(&self, scope: NameScope, r: &str) -> Result<VolumeRecord> {
        let not_found = || Error::not_found(format!("quarantined volume {r} not found"));
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(v) = self.volume(u)?.filter(VolumeRecord::is_quarantined) {
                return Ok(v);
            }
        }
        let mut found: Vec<VolumeRecord> = self
            .volumes()?
            .into_iter()
            .filter(|v| v.is_quarantined() && v.name.as_str() == r)
            .filter(|v| match scope {
                NameScope::Project(p) => v.project == p,
                NameScope::All => true,
            })
            .collect();
        match found.len() {
            0 => Err(not_found()),
            1 => Ok(found.remove(0)),
            n => Err(Error::invalid(format!(
                "{n} quarantined volumes are named {r}: name one by its UUID \
                 (pdisk volume list --quarantined)"
            ))),
        }
    }

    pub fn volume(&self, uuid: Uuid) -> Result<Option<VolumeRecord>> {
        let tx = self.db.begin_read()?;
        let vols = tx.open_table(VOLUMES)?;
        let x = vols.get(uuid.to_string().as_str())?;
        x.map(|v| decode("volume", v.value())).transpose()
    }

    /// Resolves a reference (UUID, or a name in any project: see
    /// [`lookup_name`]) to a volume; NotFound otherwise.
    pub fn find_volume(&self, r: &str) -> Result<VolumeRecord> {
        self.find_volume_in(NameScope::All, r)
    }

    /// Resolves a reference: a UUID (of any project: the caller checks what
    /// it may see), or a name looked up in `scope`; NotFound otherwise, also
    /// for a volume in quarantine (deleted, as far as every call but
    /// RestoreVolume and a listing of the quarantine goes).
    pub fn find_volume_in(&self, scope: NameScope, r: &str) -> Result<VolumeRecord> {
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(v) = self.volume(u)?.filter(|v| v.quarantine.is_none()) {
                return Ok(v);
            }
        }
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        if let Some(u) = lookup_name(&names, 'v', "volume", scope, r)? {
            let vols = tx.open_table(VOLUMES)?;
            if let Some(v) = vols.get(u.as_str())? {
                return decode("volume", v.value());
            }
        }
        Err(Error::not_found(format!("volume {r} not found")))
    }

    /// Whether `project` already has a volume named `name`.
    pub fn volume_name_taken(&self, project: &str, name: &VolumeName) -> Result<bool> {
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        let taken = names.get(vkey(project, name.as_str()).as_str())?.is_some();
        Ok(taken)
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

    /// Inserts a snapshot of an existing volume; AlreadyExists on a name
    /// taken in its volume's project, ResourceExhausted past that project's
    /// quota.
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
            let key = skey(&volume.project, s.name.as_str());
            if names.get(key.as_str())?.is_some() {
                return Err(Error::exists(format!("snapshot {} already exists", s.name)));
            }
            names.insert(key.as_str(), s.uuid.to_string().as_str())?;
            tx.open_table(SNAPSHOTS)?
                .insert(s.uuid.to_string().as_str(), encode(s).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn update_snapshot(&self, s: &SnapshotRecord, events: &[NewPoolEvent]) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(SNAPSHOTS)?
            .insert(s.uuid.to_string().as_str(), encode(s).as_slice())?;
        self.commit(tx, events)?;
        Ok(())
    }

    pub fn remove_snapshot(&self, uuid: Uuid, events: &[NewPoolEvent]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut snaps = tx.open_table(SNAPSHOTS)?;
            let Some(rec) = snaps.remove(uuid.to_string().as_str())? else {
                return Err(Error::not_found(format!("snapshot {uuid} not found")));
            };
            let rec: SnapshotRecord = decode("snapshot", rec.value())?;
            // A snapshot's volume outlives it (the store refuses removing a
            // volume with snapshots), so its project is known.
            let project = match tx
                .open_table(VOLUMES)?
                .get(rec.volume.to_string().as_str())?
            {
                Some(v) => decode::<VolumeRecord>("volume", v.value())?.project,
                None => String::new(),
            };
            tx.open_table(NAMES)?
                .remove(skey(&project, rec.name.as_str()).as_str())?;
        }
        self.commit(tx, events)?;
        Ok(())
    }

    pub fn snapshot(&self, uuid: Uuid) -> Result<Option<SnapshotRecord>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let x = t.get(uuid.to_string().as_str())?;
        x.map(|v| decode("snapshot", v.value())).transpose()
    }

    /// [`Store::find_snapshot_in`] every project.
    pub fn find_snapshot(&self, r: &str) -> Result<SnapshotRecord> {
        self.find_snapshot_in(NameScope::All, r)
    }

    /// Resolves a snapshot ref as [`Store::find_volume_in`] does a volume's.
    pub fn find_snapshot_in(&self, scope: NameScope, r: &str) -> Result<SnapshotRecord> {
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(s) = self.snapshot(u)? {
                return Ok(s);
            }
        }
        let tx = self.db.begin_read()?;
        let names = tx.open_table(NAMES)?;
        if let Some(u) = lookup_name(&names, 's', "snapshot", scope, r)? {
            if let Some(v) = tx.open_table(SNAPSHOTS)?.get(u.as_str())? {
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

    // ---- exports ----

    /// Creates or replaces the export of an existing volume.
    pub fn put_export(&self, e: &ExportRecord, events: &[NewPoolEvent]) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let key = e.volume.to_string();
            if tx.open_table(VOLUMES)?.get(key.as_str())?.is_none() {
                return Err(Error::not_found(format!("volume {} not found", e.volume)));
            }
            tx.open_table(EXPORTS)?
                .insert(key.as_str(), encode(e).as_slice())?;
        }
        self.commit(tx, events)?;
        Ok(())
    }

    pub fn remove_export(
        &self,
        volume: Uuid,
        events: &[NewPoolEvent],
    ) -> Result<Option<ExportRecord>> {
        let tx = self.db.begin_write()?;
        let old = {
            let mut t = tx.open_table(EXPORTS)?;
            let x = t.remove(volume.to_string().as_str())?;
            x.map(|v| decode("export", v.value())).transpose()?
        };
        self.commit(tx, events)?;
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
mod tests;
