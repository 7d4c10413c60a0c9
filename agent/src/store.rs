//! The agent's state: guest records and the event journal, in one redb
//! database (`STATE_DIR/agent.redb`).
//!
//! A guest's new state and the events that announce it are written in the
//! same transaction ([`AgentStore::commit`]), so after a crash the journal and
//! the records never disagree, and sequence numbers are never reused: the
//! last seq is stored with the events and the next one is always last + 1.
//! Live subscribers are told only after the commit, so nobody sees an event
//! that a crash could take back.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::attach::{AttachMode, KernelDisk};
use crate::spec::{Cause, EventType, VmSpec, VmState};
use stratus_core::error::{Error, Result};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_SEQ: &str = "last_seq";
/// project -> its [`QuotaLimits`].
const QUOTAS: TableDefinition<&str, &[u8]> = TableDefinition::new("quotas");

/// A project's limits on this host; None is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub vms: Option<u64>,
    pub vcpus: Option<u64>,
    pub memory: Option<u64>,
}

/// What a project's guests hold (every guest the store has, whatever its
/// state: a defined guest holds its place, as for the host's capacity).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub vms: u64,
    pub vcpus: u64,
    pub memory: u64,
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
    /// How the host reached the disk: by QEMU itself (files, QEMU's iSCSI
    /// initiator) or by the kernel's initiator. Records from before kernel
    /// attach existed read as qemu.
    #[serde(default)]
    pub mode: AttachMode,
    /// For kernel attachments: the LUN to detach and log out of. Recorded
    /// before the login, so a crash mid-attach leaves enough to undo it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAttachment {
    pub tap: String,
    pub bridge: String,
    pub mac: crate::net::Mac,
    pub vlan: u16,
}

/// Facts about a guest's current QEMU, present while it is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Runtime {
    pub pid: u32,
    pub qmp_socket: PathBuf,
    pub disks: Vec<DiskAttachment>,
    pub nics: Vec<NicAttachment>,
}

/// A pdisk volume the agent made for a guest (a clone of an image's base):
/// the guest owns it, and destroying the guest deletes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedVolume {
    /// vda, vdb, ...
    pub device: String,
    /// The volume's UUID.
    pub volume: String,
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
    /// pdisk volumes (UUIDs) whose unexport failed when the guest stopped
    /// or was destroyed: retried until pdisk answers, so no export of ours
    /// is forgotten (and dropped from here when a start exports it again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_unexports: Vec<String>,
    /// The owning project, fixed at creation: "" = no project (admin-only),
    /// which is also what records older than projects load as.
    #[serde(default)]
    pub project: String,
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
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b)
        .map_err(|e| Error::internal(format!("agent store: corrupt {what} record: {e}")))
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
        let db = Database::create(&path).map_err(db_err)?;
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
        tx.commit().map_err(db_err)?;
        let (live, _) = broadcast::channel(capacity);
        Ok(AgentStore {
            db,
            commit_lock: Mutex::new(()),
            live,
        })
    }

    /// Writes `vm` (when given) and appends `events` about it, atomically.
    /// `vm.last_event_seq` is set to the last new seq. Returns the events.
    pub fn commit(&self, vm: &mut VmRecord, events: &[NewEvent]) -> Result<Vec<Event>> {
        self.commit_inner(Some(vm), None, events)
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

    fn commit_inner(
        &self,
        put: Option<&mut VmRecord>,
        remove: Option<&mut VmRecord>,
        events: &[NewEvent],
    ) -> Result<Vec<Event>> {
        let _g = self.commit_lock.lock().unwrap();
        let tx = self.db.begin_write().map_err(db_err)?;
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
        Ok(out)
    }

    pub fn vm(&self, uuid: Uuid) -> Result<Option<VmRecord>> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(VMS).map_err(db_err)?;
        let x = t.get(uuid.to_string().as_str()).map_err(db_err)?;
        x.map(|v| decode("vm", v.value())).transpose()
    }

    /// Resolves a UUID or a name.
    pub fn find_vm(&self, r: &str) -> Result<VmRecord> {
        if let Ok(u) = Uuid::parse_str(r) {
            if let Some(v) = self.vm(u)? {
                return Ok(v);
            }
        }
        self.vms()?
            .into_iter()
            .find(|v| v.spec.name.as_str() == r)
            .ok_or_else(|| Error::not_found(format!("vm {r} not found")))
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

    /// Changes `project`'s limits: `set` ones (Some) set, the others kept,
    /// then `clear` ones removed. Returns the new limits.
    pub fn set_quota(
        &self,
        project: &str,
        set: QuotaLimits,
        clear: QuotaLimits,
    ) -> Result<QuotaLimits> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let q = {
            let mut t = tx.open_table(QUOTAS).map_err(db_err)?;
            let old = t.get(project).map_err(db_err)?.map(|v| v.value().to_vec());
            let mut q: QuotaLimits = match old {
                Some(b) => decode("quota", &b)?,
                None => QuotaLimits::default(),
            };
            q.vms = set.vms.or(q.vms).filter(|_| clear.vms.is_none());
            q.vcpus = set.vcpus.or(q.vcpus).filter(|_| clear.vcpus.is_none());
            q.memory = set.memory.or(q.memory).filter(|_| clear.memory.is_none());
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
    pub fn quota(&self, project: &str) -> Result<(QuotaLimits, QuotaUsage)> {
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
    pub fn quota_projects(&self) -> Result<Vec<String>> {
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

    pub fn last_seq(&self) -> Result<u64> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(META).map_err(db_err)?;
        let x = t.get(LAST_SEQ).map_err(db_err)?;
        Ok(x.map(|v| v.value()).unwrap_or(0))
    }

    /// Journaled events with seq > `since`, in order, at most `limit`.
    pub fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        let tx = self.db.begin_read().map_err(db_err)?;
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

    /// Live events, from the moment of the call.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSpec;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            uuid: Uuid::new_v4(),
            spec: VmSpec {
                name: name.parse().unwrap(),
                vcpus: 1,
                memory: stratus_core::types::ByteSize(64 << 20),
                disks: vec![],
                nics: vec![],
                kernel: None,
                labels: Default::default(),
                context: None,
            },
            state: VmState::Defined,
            state_reason: String::new(),
            runtime: None,
            created_at: now_rfc3339(),
            last_event_seq: 0,
            owned_volumes: Vec::new(),
            pending_unexports: Vec::new(),
            project: String::new(),
        }
    }

    #[test]
    fn guests_and_events_older_than_projects_load_as_project_none() {
        let mut old = serde_json::to_value(record("legacy")).unwrap();
        old.as_object_mut().unwrap().remove("project");
        let back: VmRecord = decode("vm", old.to_string().as_bytes()).unwrap();
        assert_eq!(back.project, "");
        let dir = tempfile::tempdir().unwrap();
        let s = AgentStore::open(dir.path()).unwrap();
        let mut vm = record("owned");
        vm.project = "astro".into();
        let evs = s
            .commit(
                &mut vm,
                &[NewEvent::new(EventType::Created, Cause::Api, "")],
            )
            .unwrap();
        assert_eq!(
            evs[0].project, "astro",
            "events carry their guest's project"
        );
        let mut ev = serde_json::to_value(&evs[0]).unwrap();
        ev.as_object_mut().unwrap().remove("project");
        let back: Event = decode("event", ev.to_string().as_bytes()).unwrap();
        assert_eq!(back.project, "");
    }

    #[test]
    fn disk_records_from_before_kernel_attach_read_as_qemu() {
        let old = r#"{"device":"vda","source":"pdisk:v","attachment":"iscsi://127.0.0.1:3260/iqn.x/1","read_only":false,"pdisk_volume":"u"}"#;
        let d: DiskAttachment = serde_json::from_str(old).unwrap();
        assert_eq!(d.mode, AttachMode::Qemu);
        assert_eq!(d.kernel, None);
        let k = DiskAttachment {
            mode: AttachMode::Kernel,
            kernel: Some(KernelDisk {
                lun: crate::attach::IscsiLun::new(
                    "127.0.0.1:3260".parse().unwrap(),
                    "iqn.2026-11.io.stratus.pdisk:v",
                    1,
                )
                .unwrap(),
                device: Some("/dev/sdb".into()),
            }),
            ..d
        };
        let back: DiskAttachment = serde_json::from_slice(&encode(&k)).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn seqs_continue_across_reopen_and_state_travels_with_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = record("a");
        {
            let s = AgentStore::open(dir.path()).unwrap();
            let evs = s
                .commit(
                    &mut vm,
                    &[NewEvent::new(EventType::Created, Cause::Api, "")],
                )
                .unwrap();
            assert_eq!(evs[0].seq, 1);
            vm.state = VmState::Starting;
            s.commit(
                &mut vm,
                &[
                    NewEvent::new(EventType::Starting, Cause::Api, ""),
                    NewEvent::new(EventType::DiskAttached, Cause::Api, "vda"),
                ],
            )
            .unwrap();
            assert_eq!(vm.last_event_seq, 3);
        }
        let s = AgentStore::open(dir.path()).unwrap();
        assert_eq!(s.last_seq().unwrap(), 3);
        let got = s.find_vm("a").unwrap();
        assert_eq!(got.state, VmState::Starting);
        assert_eq!(got.last_event_seq, 3);
        let mut rx = s.subscribe();
        vm.state = VmState::Destroyed;
        s.remove(&vm, &[NewEvent::new(EventType::Destroyed, Cause::Api, "")])
            .unwrap();
        assert_eq!(rx.try_recv().unwrap().seq, 4);
        assert!(s.find_vm("a").is_err());
        let all = s.events_since(0, 100).unwrap();
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert_eq!(s.events_since(2, 100).unwrap()[0].seq, 3);
        assert_eq!(all[3].state, Some(VmState::Destroyed));
    }
}
