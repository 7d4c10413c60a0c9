//! pdiskd's event journal: what happened to the pool's volumes, in seq
//! order, kept in the metadata store (`crate::store`: the tables and
//! counters of `stratus_core::journal`) and appended in the same write
//! transaction as the change it announces (creation committed `ready`,
//! deletion, growth, a snapshot complete or gone, an export added or
//! removed); import progress and failures and reconciliation's drift are
//! appended on their own. Streamed by WatchEvents (replay, then live,
//! exactly once: `stratus_core::journal::follow`) and published to NATS
//! JetStream with `--nats-url` ([`PoolOutbox`]).
//!
//! Kinds: a volume appears as VOLUME_CREATED (empty), VOLUME_CLONED (from a
//! volume or snapshot: `object_*` name the source) or IMPORT_FINISHED (from
//! an image file or an upload); then VOLUME_RESIZED, SNAPSHOT_CREATED and
//! SNAPSHOT_DELETED (`object_*` the snapshot), EXPORT_ADDED (also when the
//! initiator list changes) and EXPORT_REMOVED, VOLUME_DELETED (at once, or
//! when a quarantined volume is purged); VOLUME_QUARANTINED (a delete kept
//! the data until `detail`'s purge time) and VOLUME_RESTORED;
//! VOLUME_FLATTENED (a clone past the maximum clone depth, flattened in the
//! background: `service/flatten.rs`) and VOLUME_FLATTEN_FAILED (one per
//! failed attempt, the error in `detail`; the flatten is retried);
//! IMPORT_PROGRESS (each 10% of an import) and IMPORT_FAILED; DRIFT_FOUND
//! (one per drift reconciliation reports, its kind and cause in `detail`).
//!
//! NATS subjects: `stratus.pdisk.<host>.volume.<uuid>.<EVENT>` (drift
//! without a volume: `stratus.pdisk.<host>.pool.DRIFT_FOUND`); message id
//! `pdisk.<host>:<seq>`; payload the event's fields plus `schema`,
//! `source` (`pdisk`) and `host`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use stratus_core::error::{Error, Result};
use stratus_core::nats::{Outgoing, SCHEMA_VERSION};
use stratus_core::outbox::{JournalEvents, JournalOutbox, OutboxMessage};
use stratus_proto::pdisk::v1 as pb;

use crate::store::{Store, VolumeRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolEventKind {
    VolumeCreated,
    VolumeCloned,
    VolumeResized,
    VolumeDeleted,
    SnapshotCreated,
    SnapshotDeleted,
    ExportAdded,
    ExportRemoved,
    ImportProgress,
    ImportFinished,
    ImportFailed,
    DriftFound,
    VolumeQuarantined,
    VolumeRestored,
    VolumeFlattened,
    VolumeFlattenFailed,
}

impl PoolEventKind {
    /// The word in subjects: `VOLUME_CREATED`.
    pub fn word(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_ascii_uppercase))
            .expect("kinds serialize as words")
    }

    fn pb(self) -> pb::PoolEventType {
        use pb::PoolEventType as T;
        match self {
            PoolEventKind::VolumeCreated => T::VolumeCreated,
            PoolEventKind::VolumeCloned => T::VolumeCloned,
            PoolEventKind::VolumeResized => T::VolumeResized,
            PoolEventKind::VolumeDeleted => T::VolumeDeleted,
            PoolEventKind::SnapshotCreated => T::SnapshotCreated,
            PoolEventKind::SnapshotDeleted => T::SnapshotDeleted,
            PoolEventKind::ExportAdded => T::ExportAdded,
            PoolEventKind::ExportRemoved => T::ExportRemoved,
            PoolEventKind::ImportProgress => T::ImportProgress,
            PoolEventKind::ImportFinished => T::ImportFinished,
            PoolEventKind::ImportFailed => T::ImportFailed,
            PoolEventKind::DriftFound => T::DriftFound,
            PoolEventKind::VolumeQuarantined => T::VolumeQuarantined,
            PoolEventKind::VolumeRestored => T::VolumeRestored,
            PoolEventKind::VolumeFlattened => T::VolumeFlattened,
            PoolEventKind::VolumeFlattenFailed => T::VolumeFlattenFailed,
        }
    }
}

/// An event as journaled and streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEvent {
    pub seq: u64,
    pub time: String,
    pub kind: PoolEventKind,
    /// Nil for drift that names no volume.
    pub volume_uuid: Uuid,
    pub volume_name: String,
    /// The volume's project ("" for the pool's own events).
    pub project: String,
    /// The snapshot, or a clone's source, when the event has one.
    #[serde(default)]
    pub object_uuid: String,
    #[serde(default)]
    pub object_name: String,
    #[serde(default)]
    pub detail: String,
    /// Size after the event (volumes), bytes done (imports).
    #[serde(default)]
    pub bytes: u64,
    /// An import's total.
    #[serde(default)]
    pub total_bytes: u64,
}

impl stratus_core::journal::Journaled for PoolEvent {
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl stratus_core::journal::JournalSource<PoolEvent> for Store {
    fn events_after(&self, since: u64, limit: usize, check: bool) -> Result<Vec<PoolEvent>> {
        Store::events_after(self, since, limit, check)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<PoolEvent> {
        Store::subscribe(self)
    }
}

/// An event before it has a seq and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPoolEvent {
    pub kind: PoolEventKind,
    pub volume_uuid: Uuid,
    pub volume_name: String,
    pub project: String,
    pub object_uuid: String,
    pub object_name: String,
    pub detail: String,
    pub bytes: u64,
    pub total_bytes: u64,
}

impl NewPoolEvent {
    /// An event about volume `v`; `bytes` is its size.
    pub(crate) fn volume(kind: PoolEventKind, v: &VolumeRecord) -> NewPoolEvent {
        NewPoolEvent {
            kind,
            volume_uuid: v.uuid,
            volume_name: v.name.to_string(),
            project: v.project.clone(),
            object_uuid: String::new(),
            object_name: String::new(),
            detail: String::new(),
            bytes: v.size.0,
            total_bytes: 0,
        }
    }

    pub fn object(self, uuid: impl ToString, name: impl Into<String>) -> NewPoolEvent {
        NewPoolEvent {
            object_uuid: uuid.to_string(),
            object_name: name.into(),
            ..self
        }
    }

    pub fn detail(self, detail: impl Into<String>) -> NewPoolEvent {
        NewPoolEvent {
            detail: detail.into(),
            ..self
        }
    }

    pub fn progress(self, done: u64, total: u64) -> NewPoolEvent {
        NewPoolEvent {
            bytes: done,
            total_bytes: total,
            ..self
        }
    }

    /// Drift reconciliation found (`volume` when it names one).
    pub(crate) fn drift(volume: Option<&VolumeRecord>, detail: impl Into<String>) -> NewPoolEvent {
        let mut e = match volume {
            Some(v) => NewPoolEvent::volume(PoolEventKind::DriftFound, v),
            None => NewPoolEvent {
                kind: PoolEventKind::DriftFound,
                volume_uuid: Uuid::nil(),
                volume_name: String::new(),
                project: String::new(),
                object_uuid: String::new(),
                object_name: String::new(),
                detail: String::new(),
                bytes: 0,
                total_bytes: 0,
            },
        };
        e.detail = detail.into();
        e
    }

    pub(crate) fn into_event(self, seq: u64, time: String) -> PoolEvent {
        PoolEvent {
            seq,
            time,
            kind: self.kind,
            volume_uuid: self.volume_uuid,
            volume_name: self.volume_name,
            project: self.project,
            object_uuid: self.object_uuid,
            object_name: self.object_name,
            detail: self.detail,
            bytes: self.bytes,
            total_bytes: self.total_bytes,
        }
    }
}

/// Events one reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolEventFilter {
    /// A volume's UUID or name; None: every event.
    pub volume: Option<String>,
    /// Only events of this project's volumes; None: every project's (and
    /// the pool's own).
    pub project: Option<String>,
}

impl PoolEventFilter {
    pub fn matches(&self, e: &PoolEvent) -> bool {
        let in_project = match &self.project {
            None => true,
            Some(p) => !e.volume_uuid.is_nil() && e.project == *p,
        };
        in_project
            && match &self.volume {
                None => true,
                Some(f) => e.volume_uuid.to_string() == *f || e.volume_name == *f,
            }
    }
}

pub fn event_pb(e: &PoolEvent) -> pb::PoolEvent {
    pb::PoolEvent {
        seq: e.seq,
        time: e.time.clone(),
        r#type: e.kind.pb() as i32,
        volume_uuid: if e.volume_uuid.is_nil() {
            String::new()
        } else {
            e.volume_uuid.to_string()
        },
        volume_name: e.volume_name.clone(),
        project: e.project.clone(),
        object_uuid: e.object_uuid.clone(),
        object_name: e.object_name.clone(),
        detail: e.detail.clone(),
        bytes: e.bytes,
        total_bytes: e.total_bytes,
    }
}

/// `source` in payloads and message ids.
const SOURCE: &str = "pdisk";

pub fn subject(host: &str, e: &PoolEvent) -> String {
    if e.volume_uuid.is_nil() {
        format!("stratus.pdisk.{host}.pool.{}", e.kind.word())
    } else {
        format!(
            "stratus.pdisk.{host}.volume.{}.{}",
            e.volume_uuid,
            e.kind.word()
        )
    }
}

pub fn message(host: &str, e: &PoolEvent) -> Outgoing {
    let mut v = serde_json::to_value(e).expect("events serialize");
    let o = v.as_object_mut().expect("an event is an object");
    o.insert("schema".into(), SCHEMA_VERSION.into());
    o.insert("source".into(), SOURCE.into());
    o.insert("host".into(), host.into());
    Outgoing {
        subject: subject(host, e),
        payload: serde_json::to_vec(&v).expect("JSON serializes"),
        msg_id: format!("{SOURCE}.{host}:{}", e.seq),
    }
}

/// A published payload read back: the event as WatchEvents streams it.
pub fn event_from_payload(payload: &[u8]) -> Result<pb::PoolEvent> {
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| Error::invalid(format!("event payload: not JSON: {e}")))?;
    let schema = v.get("schema").and_then(Value::as_u64).unwrap_or(0);
    if schema != u64::from(SCHEMA_VERSION) {
        return Err(Error::invalid(format!(
            "event payload: schema {schema}, this pdisk reads {SCHEMA_VERSION}"
        )));
    }
    let e: PoolEvent =
        serde_json::from_value(v).map_err(|e| Error::invalid(format!("event payload: {e}")))?;
    Ok(event_pb(&e))
}

/// pdiskd's journal, as the publisher's outbox.
pub type PoolOutbox = JournalOutbox<Store>;

impl JournalEvents for Store {
    fn journal_db(&self) -> &redb::Database {
        self.database()
    }

    fn journal_committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed()
    }

    fn messages(&self, host: &str, after: u64, limit: usize) -> Result<Vec<OutboxMessage>> {
        Ok(self
            .events_after(after, limit, after != 0)?
            .iter()
            .map(|e| OutboxMessage {
                seq: e.seq,
                message: message(host, e),
            })
            .collect())
    }
}
