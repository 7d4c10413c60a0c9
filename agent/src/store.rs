//! The agent's state: guest records and the event journal, in one redb
//! database (`STATE_DIR/agent.redb`).
//!
//! A guest's new state and the events that announce it are written in the
//! same transaction ([`AgentStore::commit`]), so after a crash the journal and
//! the records never disagree, and sequence numbers are never reused: the
//! last seq is stored with the events and the next one is always last + 1.
//! Live subscribers are told only after the commit, so nobody sees an event
//! that a crash could take back.
//!
//! The journal is bounded ([`AgentStore::compact`]): events older than the
//! retention or beyond the count are removed, but a live guest's latest
//! event (which carries its state) is kept. The journal is complete from
//! its oldest seq on (`oldest_seq` in META); a read from a point before it
//! is refused with OutOfRange naming that seq, so a reader never gets a
//! silent gap.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::attach::{AttachMode, KernelDisk, KrbdDisk, NvmeDisk};
use crate::spec::{Cause, EventType, ServerName, VmSpec, VmState};
use stratus_core::error::{Error, Result};
use stratus_core::requests::{DurableOutcomes, StoredRequest};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_SEQ: &str = "last_seq";
/// project -> its [`QuotaLimits`].
const QUOTAS: TableDefinition<&str, &[u8]> = TableDefinition::new("quotas");
/// (caller scope, request id) -> its [`StoredRequest`]: mutating requests
/// with an id, kept for retries across restarts
/// ([`stratus_core::requests`]).
const REQUESTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("requests");
/// save id -> its [`PendingSave`]: SaveImage's intent, until it is done or
/// undone.
const IMAGE_SAVES: TableDefinition<&str, &[u8]> = TableDefinition::new("image_saves");

mod quota;
mod saves;
pub use quota::{QuotaLimits, QuotaUsage};
pub use saves::PendingSave;

/// More to write in a commit's transaction.
type AlsoWrite<'a> = &'a dyn Fn(&redb::WriteTransaction) -> Result<()>;

/// The journal holds every event from this seq on (1 until a compaction).
const OLDEST_SEQ: &str = "oldest_seq";

/// How much of the event journal is kept (`--event-retention`, `--event-max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this are removed.
    pub max_age: Duration,
    /// At most this many of the newest events are kept.
    pub max_events: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_events: 1_000_000,
        }
    }
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compaction {
    /// Events removed.
    pub removed: u64,
    /// Events older than the oldest seq kept because each is a live guest's
    /// latest (its state).
    pub kept_states: u64,
    /// The journal is complete from this seq on.
    pub oldest_seq: u64,
}

/// A disk as attached to a running guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAttachment {
    /// vda, vdb, ...
    pub device: String,
    pub source: String,
    /// The iscsi:// URL, the file path or the block device QEMU opened.
    pub attachment: String,
    pub read_only: bool,
    /// For pdisk disks: the volume UUID, to unexport on stop.
    pub pdisk_volume: Option<String>,
    /// For pdisk disks: the server of `pdisk_volume` (records from before
    /// named servers: the default one).
    #[serde(default, skip_serializing_if = "ServerName::is_default")]
    pub pdisk_server: ServerName,
    /// How the host reached the disk: by QEMU itself (files, QEMU's iSCSI
    /// initiator) or by the kernel's initiator. Records from before kernel
    /// attach existed read as qemu.
    #[serde(default)]
    pub mode: AttachMode,
    /// For kernel attachments: the LUN to detach and log out of. Recorded
    /// before the login, so a crash mid-attach leaves enough to undo it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelDisk>,
    /// For kernel attachments over NVMe/TCP (an nvmet export): the
    /// namespace to disconnect from; recorded before the connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeDisk>,
    /// For kernel attachments of RBD images (krbd): the image to unmap;
    /// recorded before the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub krbd: Option<KrbdDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAttachment {
    pub tap: String,
    pub bridge: String,
    pub mac: crate::net::Mac,
    pub vlan: u16,
    /// The addresses its anti-spoofing rules allow (the spec's at start),
    /// so reconciliation re-applies the very rules the guest started with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
}

/// Facts about a guest's current QEMU, present while it is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Runtime {
    pub pid: u32,
    /// Who QEMU runs as (None: as root, `--allow-unsandboxed`, or a record
    /// from before confinement). Recorded before QEMU starts; a live
    /// guest's keeps its uid across agentd restarts.
    #[serde(default)]
    pub qemu_user: Option<crate::confine::QemuUser>,
    pub qmp_socket: PathBuf,
    pub disks: Vec<DiskAttachment>,
    pub nics: Vec<NicAttachment>,
}

/// A pdisk volume the agent made for a guest (a clone of an image's base):
/// the guest owns it, and destroying the guest deletes it. Recorded with its
/// name before pdisk is asked to make it, so a clone made just before a
/// crash is found again (used or deleted), never orphaned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedVolume {
    /// vda, vdb, ...
    pub device: String,
    /// The volume's UUID; empty while only intended (pdisk has not answered).
    pub volume: String,
    /// The clone's name in pdisk (empty in records older than intents).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The pdisk server it is on (records from before named servers: the
    /// default one).
    #[serde(default, skip_serializing_if = "ServerName::is_default")]
    pub server: ServerName,
}

/// The export of pdisk volume `volume` (a UUID) on `server` to this host.
/// Records from before named servers hold the bare UUID, which loads as an
/// export on the default server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PdiskExportRecord")]
pub struct PdiskExport {
    #[serde(default, skip_serializing_if = "ServerName::is_default")]
    pub server: ServerName,
    pub volume: String,
}

/// [`PdiskExport`] as records hold it, old or new.
#[derive(Deserialize)]
#[serde(untagged)]
enum PdiskExportRecord {
    Bare(String),
    Named {
        #[serde(default)]
        server: ServerName,
        volume: String,
    },
}

impl From<PdiskExportRecord> for PdiskExport {
    fn from(r: PdiskExportRecord) -> PdiskExport {
        match r {
            PdiskExportRecord::Bare(volume) => PdiskExport {
                server: ServerName::default(),
                volume,
            },
            PdiskExportRecord::Named { server, volume } => PdiskExport { server, volume },
        }
    }
}

impl std::fmt::Display for PdiskExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server.is_default() {
            write!(f, "{}", self.volume)
        } else {
            write!(f, "{}/{}", self.server, self.volume)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub uuid: Uuid,
    pub spec: VmSpec,
    pub state: VmState,
    pub state_reason: String,
    pub runtime: Option<Runtime>,
    pub created_at: String,
    pub last_event_seq: u64,
    #[serde(default)]
    pub owned_volumes: Vec<OwnedVolume>,
    /// pdisk exports whose unexport failed when the guest stopped or was
    /// destroyed (or that a start only intended): retried until their
    /// server answers, so no export of ours is forgotten (and dropped from
    /// here when a start exports it again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_unexports: Vec<PdiskExport>,
    /// The owning project, fixed at creation: "" = no project (admin-only),
    /// which is also what records older than projects load as.
    #[serde(default)]
    pub project: String,
    /// The `request_id` of the CreateVm that made it (empty: none): a retry
    /// of that create, even after agentd restarted, answers with this guest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// Who created it (the caller's certificate identity): the user in its
    /// usage records. None in records older than this, and for guests
    /// made without a caller (tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<stratus_pki::tenancy::Creator>,
    /// A device being hot-plugged into the running guest: recorded before
    /// QEMU is asked, cleared in the commit that adds it to the spec (or
    /// by the undo); at adoption, finished or undone from what QEMU has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug: Option<Hotplug>,
    /// A live migration of this guest in progress, journaled before each
    /// of its steps (`crate::service::migrate`). None in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// The device a hot-plug is adding (see [`VmRecord::hotplug`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// At most one per record, built once per hot-plug: the size is no matter.
#[allow(clippy::large_enum_variant)]
pub enum Hotplug {
    Disk {
        disk: crate::spec::Disk,
        attachment: DiskAttachment,
    },
    Nic {
        nic: crate::spec::Nic,
        attachment: NicAttachment,
    },
    /// Not a device: new I/O limits of disk `device` (SetDiskQos) while
    /// its QEMU is told.
    Qos {
        device: String,
        qos: crate::qos::DiskQos,
    },
}

impl VmRecord {
    /// True while this host is a live migration's destination for it.
    pub fn is_incoming(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| m.direction == MigrationDirection::Incoming)
    }
}

/// The journal of a guest's live migration on one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Outgoing (this host is the source) or incoming (the destination).
    pub direction: MigrationDirection,
    /// The other agent: the destination's URL, or the source's identity.
    pub peer: String,
    pub phase: MigrationPhase,
    /// The TCP port the destination's QEMU waits on (0 until known).
    #[serde(default)]
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationDirection {
    Outgoing,
    Incoming,
}

/// Where a migration is; what a restart of agentd makes of it is in
/// `crate::service::migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Intent stored; the destination is being prepared.
    Preparing,
    /// QEMU sends the guest's state; the source still owns the guest.
    Transferring,
    /// QEMU reported the migration completed: the destination owns the
    /// guest; the source only cleans up.
    Completed,
}

/// An event as journaled and streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time: String,
    /// Nil for host events (images).
    pub vm_uuid: Uuid,
    pub vm_name: String,
    pub kind: EventType,
    /// The guest's state after the event; None for host events.
    pub state: Option<VmState>,
    pub cause: Cause,
    pub detail: String,
    #[serde(default)]
    pub image_sha256: String,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub total_bytes: u64,
    /// The project of the event's guest ("" for host events, and in events
    /// journaled before projects).
    #[serde(default)]
    pub project: String,
}

impl stratus_core::journal::Journaled for Event {
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl stratus_core::journal::JournalSource<Event> for AgentStore {
    fn events_after(&self, since: u64, limit: usize, check: bool) -> Result<Vec<Event>> {
        AgentStore::events_after(self, since, limit, check)
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        AgentStore::subscribe(self)
    }
}

/// An event before it has a seq and a time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventType,
    pub cause: Cause,
    pub detail: String,
    pub image_sha256: String,
    pub bytes: u64,
    pub total_bytes: u64,
}

impl NewEvent {
    pub fn new(kind: EventType, cause: Cause, detail: impl Into<String>) -> Self {
        NewEvent {
            kind,
            cause,
            detail: detail.into(),
            image_sha256: String::new(),
            bytes: 0,
            total_bytes: 0,
        }
    }

    /// An image event: its checksum and bytes done of total.
    pub fn image(
        kind: EventType,
        cause: Cause,
        sha256: &str,
        detail: impl Into<String>,
        bytes: u64,
        total_bytes: u64,
    ) -> Self {
        NewEvent {
            image_sha256: sha256.to_owned(),
            bytes,
            total_bytes,
            ..NewEvent::new(kind, cause, detail)
        }
    }
}

pub struct AgentStore {
    db: Database,
    /// Serializes commits so seqs are handed out in commit order.
    commit_lock: Mutex<()>,
    live: broadcast::Sender<Event>,
    /// Woken after each commit: the outbox publisher (`publisher.rs`).
    committed: std::sync::Arc<tokio::sync::Notify>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b)
        .map_err(|e| Error::internal(format!("agent store: corrupt {what} record: {e}")))
}

/// The answer to a read from a compacted point: resync with ListVms.
fn compacted(since: u64, oldest: u64) -> Error {
    Error::out_of_range(format!(
        "events after seq {since} were compacted away; the journal holds every \
         event from seq {oldest} on (and each guest's latest state): list the guests \
         again, then watch from seq {}",
        oldest - 1
    ))
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("agent store: {e}"))
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

impl AgentStore {
    pub fn open(dir: &Path) -> Result<AgentStore> {
        Self::open_with_live_capacity(dir, 4096)
    }

    /// [`AgentStore::open`] with room for `capacity` live events per
    /// subscriber before it lags (and re-reads the journal).
    pub(crate) fn open_with_live_capacity(dir: &Path, capacity: usize) -> Result<AgentStore> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        let path = dir.join("agent.redb");
        let db = stratus_core::db::open(&path, stratus_core::db::LOCK_WAIT)
            .map_err(|e| e.context("agent store"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(path.display(), e))?;
        }
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(VMS).map_err(db_err)?;
        tx.open_table(EVENTS).map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?;
        tx.open_table(QUOTAS).map_err(db_err)?;
        tx.open_table(REQUESTS).map_err(db_err)?;
        tx.open_table(IMAGE_SAVES).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        let (live, _) = broadcast::channel(capacity);
        Ok(AgentStore {
            db,
            commit_lock: Mutex::new(()),
            live,
            committed: Default::default(),
        })
    }

    /// Writes `vm` (when given) and appends `events` about it, atomically.
    /// `vm.last_event_seq` is set to the last new seq. Returns the events.
    pub fn commit(&self, vm: &mut VmRecord, events: &[NewEvent]) -> Result<Vec<Event>> {
        self.commit_inner(Some(vm), None, events)
    }

    /// [`Self::commit`] only while the record exists: a monitor that
    /// records a guest's exit must not bring back a guest a destroy just
    /// removed. None when it was gone.
    pub fn commit_existing(
        &self,
        vm: &mut VmRecord,
        events: &[NewEvent],
    ) -> Result<Option<Vec<Event>>> {
        let _g = self.commit_lock.lock().unwrap();
        if self.vm(vm.uuid)?.is_none() {
            return Ok(None);
        }
        self.write(Some(vm), None, events, None).map(Some)
    }

    /// Appends events about the host rather than a guest (images).
    pub fn record_host(&self, events: &[NewEvent]) -> Result<Vec<Event>> {
        self.commit_inner(None, None, events)
    }

    /// Removes the record of `vm` and appends its final events, atomically.
    pub fn remove(&self, vm: &VmRecord, events: &[NewEvent]) -> Result<Vec<Event>> {
        let mut copy = vm.clone();
        self.commit_inner(None, Some(&mut copy), events)
    }

    /// [`Self::remove`] unless the record is gone already (two paths
    /// dropping one guest, e.g. a migration's abort and its monitor):
    /// None then, and no events.
    pub fn remove_existing(
        &self,
        vm: &VmRecord,
        events: &[NewEvent],
    ) -> Result<Option<Vec<Event>>> {
        let _g = self.commit_lock.lock().unwrap();
        if self.vm(vm.uuid)?.is_none() {
            return Ok(None);
        }
        let mut copy = vm.clone();
        self.write(None, Some(&mut copy), events, None).map(Some)
    }

    fn commit_inner(
        &self,
        put: Option<&mut VmRecord>,
        remove: Option<&mut VmRecord>,
        events: &[NewEvent],
    ) -> Result<Vec<Event>> {
        let _g = self.commit_lock.lock().unwrap();
        self.write(put, remove, events, None)
    }

    /// One transaction of [`Self::commit_inner`]; the caller holds the
    /// commit lock. `also` writes more in the same transaction.
    fn write(
        &self,
        put: Option<&mut VmRecord>,
        remove: Option<&mut VmRecord>,
        events: &[NewEvent],
        also: Option<AlsoWrite<'_>>,
    ) -> Result<Vec<Event>> {
        let tx = self.db.begin_write().map_err(db_err)?;
        if let Some(also) = also {
            also(&tx)?;
        }
        let mut out = Vec::with_capacity(events.len());
        {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let mut seq = meta
                .get(LAST_SEQ)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            let vm: Option<&VmRecord> = match (&put, &remove) {
                (Some(v), _) => Some(v),
                (None, Some(v)) => Some(v),
                _ => None,
            };
            let mut journal = tx.open_table(EVENTS).map_err(db_err)?;
            let time = now_rfc3339();
            for e in events {
                seq += 1;
                let ev = Event {
                    seq,
                    time: time.clone(),
                    vm_uuid: vm.map(|v| v.uuid).unwrap_or_default(),
                    vm_name: vm.map(|v| v.spec.name.to_string()).unwrap_or_default(),
                    kind: e.kind,
                    state: vm.map(|v| v.state),
                    cause: e.cause,
                    detail: e.detail.clone(),
                    image_sha256: e.image_sha256.clone(),
                    bytes: e.bytes,
                    total_bytes: e.total_bytes,
                    project: vm.map(|v| v.project.clone()).unwrap_or_default(),
                };
                journal
                    .insert(seq, encode(&ev).as_slice())
                    .map_err(db_err)?;
                out.push(ev);
            }
            meta.insert(LAST_SEQ, seq).map_err(db_err)?;
            let mut vms = tx.open_table(VMS).map_err(db_err)?;
            if let Some(v) = put {
                if !out.is_empty() {
                    v.last_event_seq = seq;
                }
                vms.insert(v.uuid.to_string().as_str(), encode(&*v).as_slice())
                    .map_err(db_err)?;
            }
            if let Some(v) = remove {
                vms.remove(v.uuid.to_string().as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        for e in &out {
            // No receivers is fine: the journal has it.
            let _ = self.live.send(e.clone());
        }
        self.committed.notify_one();
        Ok(out)
    }

    pub fn vm(&self, uuid: Uuid) -> Result<Option<VmRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let x = t.get(uuid.to_string().as_str()).map_err(db_err)?;
        x.map(|v| decode("vm", v.value())).transpose()
    }

    /// Resolves a UUID or a name in any project ([`Store::find_vm_in`]).
    pub fn find_vm(&self, r: &str) -> Result<VmRecord> {
        self.find_vm_in(None, r)
    }

    /// Resolves a UUID (of any project: the caller checks what it may see)
    /// or a name. Names are unique per project, so with `project` a name
    /// means that project's guest. Across projects (an admin naming none)
    /// the guest of no project wins, else the name must be unique: one
    /// several projects use is ambiguous (InvalidArgument naming them).
    pub fn find_vm_in(&self, project: Option<&str>, r: &str) -> Result<VmRecord> {
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(v) = self.vm(u)? {
                return Ok(v);
            }
        }
        let mut named: Vec<VmRecord> = self
            .vms()?
            .into_iter()
            .filter(|v| v.spec.name.as_str() == r && project.is_none_or(|p| v.project == p))
            .collect();
        if let Some(i) = named.iter().position(|v| v.project.is_empty()) {
            return Ok(named.swap_remove(i));
        }
        match named.len() {
            0 => Err(Error::not_found(format!("vm {r} not found"))),
            1 => Ok(named.remove(0)),
            _ => Err(Error::invalid(format!(
                "vm {r} is ambiguous: projects {} each have one; name the project or use its UUID",
                named
                    .iter()
                    .map(|v| v.project.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let mut out: Vec<VmRecord> = t
            .iter()
            .map_err(db_err)?
            .map(|r| {
                let (_, v) = r.map_err(db_err)?;
                decode("vm", v.value())
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(out)
    }

    pub fn last_seq(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(META).map_err(db_err)?;
        let x = t.get(LAST_SEQ).map_err(db_err)?;
        Ok(x.map(|v| v.value()).unwrap_or(0))
    }

    /// Journaled events with seq > `since`, in order, at most `limit`.
    /// OutOfRange when events after `since` were compacted away; `since` 0
    /// means "from the start of what is held" and is never refused.
    pub fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        self.events_after(since, limit, since != 0)
    }

    /// [`AgentStore::events_since`], refusing a compacted range only when
    /// `check` (a reader that began at 0 pages on through the kept states).
    pub(crate) fn events_after(&self, since: u64, limit: usize, check: bool) -> Result<Vec<Event>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        if check {
            let meta = tx.open_table(META).map_err(db_err)?;
            let oldest = meta
                .get(OLDEST_SEQ)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(1);
            if since.saturating_add(1) < oldest {
                return Err(compacted(since, oldest));
            }
        }
        let t = tx.open_table(EVENTS).map_err(db_err)?;
        t.range(since.saturating_add(1)..)
            .map_err(db_err)?
            .take(limit)
            .map(|r| {
                let (_, v) = r.map_err(db_err)?;
                decode("event", v.value())
            })
            .collect()
    }

    /// Whether the journal holds the event `seq` (one kept below the
    /// oldest seq as a guest's state, too).
    pub fn has_event(&self, seq: u64) -> Result<bool> {
        stratus_core::journal::has_event(&self.db, seq)
    }

    /// The last seq the broker acknowledged (0: none).
    pub fn published_seq(&self) -> Result<u64> {
        stratus_core::journal::published_seq(&self.db)
    }

    /// Stores the last seq the broker acknowledged, durably.
    pub fn set_published_seq(&self, seq: u64) -> Result<()> {
        stratus_core::journal::set_published_seq(&self.db, seq)
    }

    /// The redb database, for the tables other modules keep beside the
    /// journal (`usage`).
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    /// Notified after each commit (one waiter: the outbox publisher).
    pub fn committed(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    /// The oldest seq from which the journal is complete.
    pub fn oldest_seq(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(META).map_err(db_err)?;
        let x = t.get(OLDEST_SEQ).map_err(db_err)?;
        Ok(x.map(|v| v.value()).unwrap_or(1))
    }

    /// Removes the events `retention` no longer covers (older than its age
    /// as of `now`, or beyond its count), keeping each live guest's latest
    /// event, in one transaction under the commit lock. Moves the oldest
    /// seq past what it removed; never removes an event at or after it.
    pub fn compact(&self, retention: Retention, now: SystemTime) -> Result<Compaction> {
        let _g = self.commit_lock.lock().unwrap();
        let tx = self.db.begin_write().map_err(db_err)?;
        let done = {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let last = meta
                .get(LAST_SEQ)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0);
            let oldest = meta
                .get(OLDEST_SEQ)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(1);
            // By count: keep the newest max_events.
            let mut cut = oldest.max(last.saturating_sub(retention.max_events) + 1);
            // By age: seqs follow commit order, so the old ones come first.
            let threshold = now
                .checked_sub(retention.max_age)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let mut journal = tx.open_table(EVENTS).map_err(db_err)?;
            for r in journal.range(cut..).map_err(db_err)? {
                let (seq, v) = r.map_err(db_err)?;
                let e: Event = decode("event", v.value())?;
                match humantime::parse_rfc3339(&e.time) {
                    Ok(t) if t < threshold => cut = seq.value() + 1,
                    _ => break,
                }
            }
            let vms = tx.open_table(VMS).map_err(db_err)?;
            let mut states = std::collections::HashSet::new();
            for r in vms.iter().map_err(db_err)? {
                let (_, v) = r.map_err(db_err)?;
                let vm: VmRecord = decode("vm", v.value())?;
                if vm.last_event_seq != 0 && vm.last_event_seq < cut {
                    states.insert(vm.last_event_seq);
                }
            }
            let mut removed = 0;
            for r in journal
                .extract_from_if(..cut, |seq, _| !states.contains(&seq))
                .map_err(db_err)?
            {
                r.map_err(db_err)?;
                removed += 1;
            }
            meta.insert(OLDEST_SEQ, cut).map_err(db_err)?;
            Compaction {
                removed,
                kept_states: states.len() as u64,
                oldest_seq: cut,
            }
        };
        tx.commit().map_err(db_err)?;
        Ok(done)
    }

    /// Live events, from the moment of the call.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }
}

/// Requests with an id, kept in agent.redb so a retry after a restart of
/// agentd gets the first attempt's answer.
impl DurableOutcomes for AgentStore {
    fn get(&self, scope: &str, request_id: &str) -> Result<Option<StoredRequest>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(REQUESTS).map_err(db_err)?;
        let x = t.get((scope, request_id)).map_err(db_err)?;
        x.map(|v| decode("request", v.value())).transpose()
    }

    fn put(&self, scope: &str, request_id: &str, request: &StoredRequest) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(REQUESTS).map_err(db_err)?;
            t.insert((scope, request_id), encode(request).as_slice())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    fn prune(&self, before: u64) -> Result<usize> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let mut removed = 0;
        {
            let mut t = tx.open_table(REQUESTS).map_err(db_err)?;
            t.retain(|_, v| {
                let keep =
                    serde_json::from_slice::<StoredRequest>(v).is_ok_and(|r| r.started >= before);
                removed += usize::from(!keep);
                keep
            })
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        Ok(removed)
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
