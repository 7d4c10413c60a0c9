//! Storage accounting: what each project holds on this pool over time,
//! kept durably in pdiskd's store and given out as storage usage records
//! in the EGI storage accounting format (StAR, the EMI StorageUsageRecord
//! 1.0 that APEL loads: `apel/db/records/storage.py`), as JSON or as CSV.
//!
//! A [`StorageSample`] is one project's volumes, snapshots, provisioned
//! bytes (their sizes, as the quota counts them: every state, quarantined
//! volumes' bytes but not the volumes) and
//! allocated bytes (what the pool holds for them, from one look at the
//! pool) at one moment, covering the time since the project's previous
//! sample. Samples are taken every `--usage-interval`, after each change
//! to a project's volumes or snapshots (following the event journal), and
//! when a caller asks for records up to now. A project that held
//! something is sampled until a sample shows it holds nothing, so the
//! drop to zero is on record.
//!
//! Every sample is appended to a log (`storage_usage_log`, a seq each) in
//! one write transaction with the project's latest sample, so a crash
//! keeps a sample whole or not at all. The log is the history
//! ListStorageUsage reads and the outbox from which the records are
//! published to NATS (`stratus.usage.<host>`, message id
//! `pdisk-usage.<host>:<seq>`), like the event journal; it is compacted
//! with the journal's `--event-retention`.
//!
//! StAR fields of a record ([`StorageUsageRecord`]): RecordIdentity
//! (recordId `<host>/pdisk/usage/<seq>`, createTime), StorageSystem
//! (`--usage-service`, default the host name), Site (`--usage-site`),
//! StorageShare (the pool), StorageMedia `disk`, FileCount (volumes +
//! snapshots), SubjectIdentity/Group (the project; left out for objects
//! of no project), StartTime and EndTime (the previous sample and this
//! one), ResourceCapacityUsed (allocated bytes) and
//! ResourceCapacityAllocated (provisioned bytes).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use stratus_core::nats::{Outgoing, SCHEMA_VERSION};
use stratus_core::outbox::{Outbox, OutboxMessage};
use stratus_proto::pdisk::v1 as pb;

use crate::backend::ObjectId;
use crate::error::{Error, Result};
use crate::events::PoolEventKind;
use crate::service::PoolService;
use crate::store::{SnapshotRecord, Store, VolumeRecord};

/// project -> its latest [`StorageSample`].
const LATEST: TableDefinition<&str, &[u8]> = TableDefinition::new("storage_usage");
/// seq -> a [`StorageSample`]: the history and the outbox.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("storage_usage_log");
/// `last_seq`, `oldest_seq`, `published_seq` of the log.
const META: TableDefinition<&str, u64> = TableDefinition::new("storage_usage_meta");
const LAST_SEQ: &str = "last_seq";
const OLDEST_SEQ: &str = "oldest_seq";
const PUBLISHED_SEQ: &str = "published_seq";

/// The XML namespace of StAR records.
pub const STAR_NAMESPACE: &str = "http://eu-emi.eu/namespaces/2011/02/storagerecord";

/// Microseconds since the Unix epoch.
const US: u64 = 1_000_000;

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Creates the usage tables (in the store's opening transaction).
pub(crate) fn create_tables(tx: &redb::WriteTransaction) -> Result<()> {
    tx.open_table(LATEST)?;
    tx.open_table(LOG)?;
    tx.open_table(META)?;
    Ok(())
}

/// What one project holds at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub volumes: u64,
    pub snapshots: u64,
    /// The sizes of its volumes and snapshots.
    pub provisioned_bytes: u64,
    /// What the pool holds for them.
    pub allocated_bytes: u64,
}

impl Holding {
    fn is_empty(&self) -> bool {
        self.volumes == 0 && self.snapshots == 0 && self.provisioned_bytes == 0
    }
}

/// Each project's holding, from the store's records and the pool's
/// allocation of each object (an object the pool did not list counts 0).
pub fn holdings(
    volumes: &[VolumeRecord],
    snapshots: &[SnapshotRecord],
    allocated: &BTreeMap<ObjectId, u64>,
) -> BTreeMap<String, Holding> {
    let mut out: BTreeMap<String, Holding> = BTreeMap::new();
    let mut project_of = std::collections::HashMap::new();
    for v in volumes {
        let h = out.entry(v.project.clone()).or_default();
        // As the quota counts: a quarantined volume keeps its bytes (the
        // pool still holds them) but is no longer one of the project's.
        if v.quarantine.is_none() {
            h.volumes += 1;
        }
        h.provisioned_bytes = h.provisioned_bytes.saturating_add(v.size.0);
        h.allocated_bytes = h.allocated_bytes.saturating_add(
            allocated
                .get(&ObjectId::Volume(v.uuid))
                .copied()
                .unwrap_or(0),
        );
        project_of.insert(v.uuid, v.project.as_str());
    }
    for s in snapshots {
        let project = project_of.get(&s.volume).copied().unwrap_or("");
        let h = out.entry(project.to_owned()).or_default();
        h.snapshots += 1;
        h.provisioned_bytes = h.provisioned_bytes.saturating_add(s.size.0);
        h.allocated_bytes = h.allocated_bytes.saturating_add(
            allocated
                .get(&ObjectId::Snapshot(s.uuid))
                .copied()
                .unwrap_or(0),
        );
    }
    out
}

/// One project's holding as sampled, covering `[since_us, time_us]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageSample {
    pub project: String,
    /// The project's previous sample (this one's time for its first).
    pub since_us: u64,
    pub time_us: u64,
    #[serde(flatten)]
    pub holding: Holding,
}

fn encode(s: &StorageSample) -> Vec<u8> {
    serde_json::to_vec(s).expect("samples serialize")
}

fn decode(b: &[u8]) -> Result<StorageSample> {
    serde_json::from_slice(b)
        .map_err(|e| Error::internal(format!("usage store: corrupt sample: {e}")))
}

/// Who this pool is in the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSite {
    /// GOCDB site name (`--usage-site`): StAR Site.
    pub site: String,
    /// The storage system (`--usage-service`): StAR StorageSystem.
    pub storage_system: String,
    /// The pool (the backend's location): StAR StorageShare.
    pub storage_share: String,
    /// The host, for record ids, the NATS subject and message ids.
    pub host: String,
}

impl StorageSite {
    /// Until pdiskd names them: the host name.
    pub fn of_this_host() -> StorageSite {
        let host = stratus_core::host::hostname();
        StorageSite {
            site: host.clone(),
            storage_system: host.clone(),
            storage_share: String::new(),
            host,
        }
    }
}

/// The usage tables in pdiskd's store.
pub struct UsageBook {
    store: Arc<Store>,
    /// Woken after each sample is logged: the usage publisher.
    committed: Arc<tokio::sync::Notify>,
    site: std::sync::RwLock<StorageSite>,
    /// One sampling at a time: a slower one must not log older figures
    /// after a newer one.
    sampling: tokio::sync::Mutex<()>,
}

impl UsageBook {
    pub(crate) fn new(store: Arc<Store>) -> UsageBook {
        UsageBook {
            store,
            committed: Default::default(),
            site: std::sync::RwLock::new(StorageSite::of_this_host()),
            sampling: Default::default(),
        }
    }

    /// Names the site, system and share in the records from now on.
    pub fn set_site(&self, site: StorageSite) {
        *self.site.write().unwrap() = site;
    }

    pub fn site(&self) -> StorageSite {
        self.site.read().unwrap().clone()
    }

    /// Logs the holdings of `now_us` for the projects of `only` (None:
    /// every project holding something, or that held something at its
    /// last sample), in one transaction. A project whose latest sample is
    /// not older than `now_us` is left out. Returns the samples logged.
    pub fn record(
        &self,
        now_us: u64,
        held: &BTreeMap<String, Holding>,
        only: Option<&BTreeSet<String>>,
    ) -> Result<Vec<StorageSample>> {
        let tx = self.store.database().begin_write()?;
        let mut out = Vec::new();
        {
            let mut latest = tx.open_table(LATEST)?;
            let mut previous: BTreeMap<String, StorageSample> = BTreeMap::new();
            for r in latest.iter()? {
                let (k, v) = r?;
                previous.insert(k.value().to_owned(), decode(v.value())?);
            }
            let mut projects: BTreeSet<&String> = held.keys().collect();
            projects.extend(
                previous
                    .iter()
                    .filter(|(_, s)| !s.holding.is_empty())
                    .map(|(p, _)| p),
            );
            if let Some(only) = only {
                projects.retain(|p| only.contains(*p));
            }
            let mut meta = tx.open_table(META)?;
            let mut log = tx.open_table(LOG)?;
            let mut seq = meta.get(LAST_SEQ)?.map(|v| v.value()).unwrap_or(0);
            for p in projects {
                let prev = previous.get(p);
                if prev.is_some_and(|s| s.time_us >= now_us) {
                    continue;
                }
                let s = StorageSample {
                    project: p.clone(),
                    since_us: prev.map(|s| s.time_us).unwrap_or(now_us),
                    time_us: now_us,
                    holding: held.get(p).copied().unwrap_or_default(),
                };
                let bytes = encode(&s);
                seq += 1;
                log.insert(seq, bytes.as_slice())?;
                latest.insert(p.as_str(), bytes.as_slice())?;
                out.push(s);
            }
            meta.insert(LAST_SEQ, seq)?;
        }
        tx.commit()?;
        if !out.is_empty() {
            self.committed.notify_one();
        }
        Ok(out)
    }

    /// The logged samples taken in `[since_us, until_us]` of the projects
    /// `sees` lets through, with their seqs, in seq order.
    pub fn samples_within(
        &self,
        since_us: u64,
        until_us: u64,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<(u64, StorageSample)>> {
        let tx = self.store.database().begin_read()?;
        let log = tx.open_table(LOG)?;
        let mut out = Vec::new();
        for r in log.iter()? {
            let (k, v) = r?;
            let s = decode(v.value())?;
            if s.time_us >= since_us && s.time_us <= until_us && sees(&s.project) {
                out.push((k.value(), s));
            }
        }
        Ok(out)
    }

    fn meta(&self, key: &str, default: u64) -> Result<u64> {
        let tx = self.store.database().begin_read()?;
        let t = tx.open_table(META)?;
        let x = t.get(key)?;
        Ok(x.map(|v| v.value()).unwrap_or(default))
    }

    /// The last seq of the log (0: none).
    pub fn last_seq(&self) -> Result<u64> {
        self.meta(LAST_SEQ, 0)
    }

    /// Removes samples older than `max_age` as of `now`, and the latest
    /// sample of projects that have held nothing since then. Returns how
    /// many samples went.
    pub fn compact(&self, max_age: Duration, now: SystemTime) -> Result<u64> {
        let cutoff = unix_us(now).saturating_sub(max_age.as_micros() as u64);
        let tx = self.store.database().begin_write()?;
        let removed;
        {
            let mut log = tx.open_table(LOG)?;
            let mut old = Vec::new();
            for r in log.iter()? {
                let (k, v) = r?;
                if decode(v.value())?.time_us >= cutoff {
                    break;
                }
                old.push(k.value());
            }
            for k in &old {
                log.remove(k)?;
            }
            removed = old.len() as u64;
            if let Some(&last) = old.last() {
                let mut meta = tx.open_table(META)?;
                let oldest = meta.get(OLDEST_SEQ)?.map(|v| v.value()).unwrap_or(1);
                meta.insert(OLDEST_SEQ, oldest.max(last + 1))?;
            }
            let mut latest = tx.open_table(LATEST)?;
            let mut gone = Vec::new();
            for r in latest.iter()? {
                let (k, v) = r?;
                let s = decode(v.value())?;
                if s.holding.is_empty() && s.time_us < cutoff {
                    gone.push(k.value().to_owned());
                }
            }
            for k in &gone {
                latest.remove(k.as_str())?;
            }
        }
        tx.commit()?;
        Ok(removed)
    }
}

/// A storage usage record: one sample, with the StAR fields in exact
/// units (times Unix seconds, sizes bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageUsageRecord {
    pub record_id: String,
    pub create_time: u64,
    pub storage_system: String,
    pub site: String,
    pub storage_share: String,
    pub storage_media: String,
    /// The project ("": objects of no project).
    pub group: String,
    pub start_time: u64,
    pub end_time: u64,
    pub volumes: u64,
    pub snapshots: u64,
    pub allocated_bytes: u64,
    pub provisioned_bytes: u64,
}

impl StorageUsageRecord {
    pub fn from_sample(
        seq: u64,
        s: &StorageSample,
        site: &StorageSite,
        created_us: u64,
    ) -> StorageUsageRecord {
        StorageUsageRecord {
            record_id: format!("{}/pdisk/usage/{seq}", site.host),
            create_time: created_us / US,
            storage_system: site.storage_system.clone(),
            site: site.site.clone(),
            storage_share: site.storage_share.clone(),
            storage_media: "disk".into(),
            group: s.project.clone(),
            start_time: s.since_us / US,
            end_time: s.time_us / US,
            volumes: s.holding.volumes,
            snapshots: s.holding.snapshots,
            allocated_bytes: s.holding.allocated_bytes,
            provisioned_bytes: s.holding.provisioned_bytes,
        }
    }
}

impl From<&StorageUsageRecord> for pb::StorageUsageRecord {
    fn from(r: &StorageUsageRecord) -> pb::StorageUsageRecord {
        pb::StorageUsageRecord {
            record_id: r.record_id.clone(),
            create_time: r.create_time,
            storage_system: r.storage_system.clone(),
            site: r.site.clone(),
            storage_share: r.storage_share.clone(),
            storage_media: r.storage_media.clone(),
            group: r.group.clone(),
            start_time: r.start_time,
            end_time: r.end_time,
            volumes: r.volumes,
            snapshots: r.snapshots,
            allocated_bytes: r.allocated_bytes,
            provisioned_bytes: r.provisioned_bytes,
        }
    }
}

impl From<pb::StorageUsageRecord> for StorageUsageRecord {
    fn from(r: pb::StorageUsageRecord) -> StorageUsageRecord {
        StorageUsageRecord {
            record_id: r.record_id,
            create_time: r.create_time,
            storage_system: r.storage_system,
            site: r.site,
            storage_share: r.storage_share,
            storage_media: r.storage_media,
            group: r.group,
            start_time: r.start_time,
            end_time: r.end_time,
            volumes: r.volumes,
            snapshots: r.snapshots,
            allocated_bytes: r.allocated_bytes,
            provisioned_bytes: r.provisioned_bytes,
        }
    }
}

/// Unix seconds as StAR's `xs:dateTime` in UTC (`2026-12-03T22:00:00Z`).
fn star_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// Text for XML element content and attribute values.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not allowed in XML 1.0 at all.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// `records` as a StAR document: `sr:StorageUsageRecords` holding one
/// `sr:StorageUsageRecord` each, as APEL's StAR parser reads them.
pub fn star_xml(records: &[StorageUsageRecord]) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<sr:StorageUsageRecords xmlns:sr=\"{STAR_NAMESPACE}\">\n"
    );
    for r in records {
        let el = |out: &mut String, name: &str, v: &str| {
            let _ = writeln!(out, "    <sr:{name}>{}</sr:{name}>", xml_escape(v));
        };
        out.push_str("  <sr:StorageUsageRecord>\n");
        let _ = writeln!(
            out,
            "    <sr:RecordIdentity sr:createTime=\"{}\" sr:recordId=\"{}\"/>",
            star_time(r.create_time),
            xml_escape(&r.record_id)
        );
        el(&mut out, "StorageSystem", &r.storage_system);
        if !r.site.is_empty() {
            el(&mut out, "Site", &r.site);
        }
        if !r.storage_share.is_empty() {
            el(&mut out, "StorageShare", &r.storage_share);
        }
        el(&mut out, "StorageMedia", &r.storage_media);
        el(
            &mut out,
            "FileCount",
            &(r.volumes + r.snapshots).to_string(),
        );
        if !r.group.is_empty() {
            let _ = writeln!(
                out,
                "    <sr:SubjectIdentity>\n      <sr:Group>{}</sr:Group>\n    </sr:SubjectIdentity>",
                xml_escape(&r.group)
            );
        }
        el(&mut out, "StartTime", &star_time(r.start_time));
        el(&mut out, "EndTime", &star_time(r.end_time));
        el(
            &mut out,
            "ResourceCapacityUsed",
            &r.allocated_bytes.to_string(),
        );
        el(
            &mut out,
            "ResourceCapacityAllocated",
            &r.provisioned_bytes.to_string(),
        );
        out.push_str("  </sr:StorageUsageRecord>\n");
    }
    out.push_str("</sr:StorageUsageRecords>\n");
    out
}

/// The CSV columns, in order (the JSON field names).
pub const CSV_COLUMNS: [&str; 13] = [
    "record_id",
    "create_time",
    "storage_system",
    "site",
    "storage_share",
    "storage_media",
    "group",
    "start_time",
    "end_time",
    "volumes",
    "snapshots",
    "allocated_bytes",
    "provisioned_bytes",
];

/// `records` as CSV (RFC 4180: a header line; fields with a comma, quote
/// or line break quoted, quotes doubled).
pub fn csv(records: &[StorageUsageRecord]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for r in records {
        let v = serde_json::to_value(r).expect("records serialize");
        let cells: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| match &v[*c] {
                serde_json::Value::String(s) if s.contains([',', '"', '\n', '\r']) => {
                    format!("\"{}\"", s.replace('"', "\"\""))
                }
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Whether an event changes what a project holds.
fn changes_holdings(kind: PoolEventKind) -> bool {
    use PoolEventKind as K;
    matches!(
        kind,
        K::VolumeCreated
            | K::VolumeCloned
            | K::ImportFinished
            | K::VolumeResized
            | K::VolumeDeleted
            | K::SnapshotCreated
            | K::SnapshotDeleted
            | K::VolumeQuarantined
            | K::VolumeRestored
    )
}

impl PoolService {
    /// Samples the projects of `only` (None: all) now and logs them.
    /// Fails, logging nothing, when the pool cannot be read: allocations
    /// of 0 would be wrong figures, not missing ones.
    pub async fn sample_usage(
        &self,
        only: Option<&BTreeSet<String>>,
    ) -> Result<Vec<StorageSample>> {
        let book = self.usage();
        let _one = book.sampling.lock().await;
        let now = unix_us(SystemTime::now());
        let volumes = self.store().volumes()?;
        let snapshots = self.store().snapshots()?;
        let listing = self
            .backend()
            .list()
            .await
            .map_err(|e| e.context("usage: reading the pool's allocations"))?;
        let held = holdings(&volumes, &snapshots, &listing.allocated);
        book.record(now, &held, only)
    }

    /// The records of the samples taken in `[since, until]` (Unix
    /// seconds; `until` None: now, after sampling every project) of the
    /// projects `sees` lets through.
    pub async fn storage_usage(
        &self,
        since: u64,
        until: Option<u64>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<StorageUsageRecord>> {
        let until_us = match until {
            // The whole of second `u`.
            Some(u) => u.saturating_mul(US).saturating_add(US - 1),
            None => {
                self.sample_usage(None).await?;
                unix_us(SystemTime::now())
            }
        };
        let book = self.usage();
        let site = book.site();
        let now = unix_us(SystemTime::now());
        Ok(book
            .samples_within(since.saturating_mul(US), until_us, sees)?
            .iter()
            .map(|(seq, s)| StorageUsageRecord::from_sample(*seq, s, &site, now))
            .collect())
    }
}

/// Samples every project every `interval` and the projects whose volumes
/// or snapshots change (following the journal's live events); runs until
/// `shutdown` turns true.
pub fn spawn_sampler(
    svc: Arc<PoolService>,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // Subscribed before the first tick: no change goes unseen.
    let mut events = svc.store().subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let only = tokio::select! {
                _ = shutdown.wait_for(|v| *v) => return,
                _ = tick.tick() => None,
                e = events.recv() => {
                    let mut projects = BTreeSet::new();
                    let mut all = false;
                    let mut next = e.map_err(|e| match e {
                        RecvError::Closed => TryRecvError::Closed,
                        RecvError::Lagged(n) => TryRecvError::Lagged(n),
                    });
                    // Every event already committed, in one sampling.
                    loop {
                        match next {
                            Ok(e) => {
                                if changes_holdings(e.kind) {
                                    projects.insert(e.project);
                                }
                            }
                            Err(TryRecvError::Lagged(_)) => all = true,
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Closed) => return,
                        }
                        next = events.try_recv();
                    }
                    match (all, projects.is_empty()) {
                        (true, _) => None,
                        (false, true) => continue,
                        (false, false) => Some(projects),
                    }
                }
            };
            if let Err(e) = svc.sample_usage(only.as_ref()).await {
                tracing::warn!(error = %e, "usage: sampling failed");
            }
        }
    });
}

/// The subject usage records of `host` go to (agentd's too).
pub fn subject(host: &str) -> String {
    format!("stratus.usage.{host}")
}

/// One record as published: its fields plus `schema`, `source` (`pdisk`),
/// `record_type` (`storage`), `host` and `seq`.
pub fn message(site: &StorageSite, seq: u64, s: &StorageSample) -> Outgoing {
    let mut v = serde_json::to_value(StorageUsageRecord::from_sample(seq, s, site, s.time_us))
        .expect("records serialize");
    let o = v.as_object_mut().expect("a record is an object");
    o.insert("schema".into(), SCHEMA_VERSION.into());
    o.insert("source".into(), "pdisk".into());
    o.insert("record_type".into(), "storage".into());
    o.insert("host".into(), site.host.clone().into());
    o.insert("seq".into(), seq.into());
    Outgoing {
        subject: subject(&site.host),
        payload: serde_json::to_vec(&v).expect("JSON serializes"),
        // Not agentd's `usage.<host>:<seq>`: both may share a host name.
        msg_id: format!("pdisk-usage.{}:{seq}", site.host),
    }
}

/// The usage log as an outbox.
pub struct UsageOutbox {
    svc: Arc<PoolService>,
}

impl UsageOutbox {
    pub fn new(svc: Arc<PoolService>) -> UsageOutbox {
        UsageOutbox { svc }
    }
}

impl Outbox for UsageOutbox {
    fn messages_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxMessage>> {
        let book = self.svc.usage();
        let oldest = book.meta(OLDEST_SEQ, 1)?;
        if after + 1 < oldest {
            return Err(Error::out_of_range(format!(
                "usage records after seq {after} were compacted away"
            )));
        }
        let site = book.site();
        let tx = self.svc.store().database().begin_read()?;
        let log = tx.open_table(LOG)?;
        log.range(after.saturating_add(1)..)?
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                Ok(OutboxMessage {
                    seq: k.value(),
                    message: message(&site, k.value(), &decode(v.value())?),
                })
            })
            .collect()
    }

    fn oldest_seq(&self) -> Result<u64> {
        self.svc.usage().meta(OLDEST_SEQ, 1)
    }

    fn published_seq(&self) -> Result<u64> {
        self.svc.usage().meta(PUBLISHED_SEQ, 0)
    }

    fn set_published_seq(&self, seq: u64) -> Result<()> {
        let tx = self.svc.store().database().begin_write()?;
        tx.open_table(META)?.insert(PUBLISHED_SEQ, seq)?;
        tx.commit()?;
        Ok(())
    }

    fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.svc.usage().committed.clone()
    }
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
