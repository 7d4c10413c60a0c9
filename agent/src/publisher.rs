//! agentd's journal as an outbox to NATS JetStream (`--nats-url`): the
//! subjects and JSON payloads of its events, and [`AgentOutbox`], what
//! `stratus_core::outbox::Publisher` reads and marks through. The publisher
//! itself (seq order, acks, resume after the last acknowledged seq) is
//! stratus-core's, shared with pdiskd.
//!
//! Subjects: `stratus.agent.<host>.vm.<uuid>.<EVENT>` for a guest's events,
//! `stratus.agent.<host>.host.<EVENT>` for the host's own (image pulls and
//! evictions without a guest); `<EVENT>` is the event type in capitals
//! (`CREATED`, `IMAGE_CACHED`). Message id `agent.<host>:<seq>`: the daemon
//! in it keeps an agentd's and a pdiskd's seqs on one host apart in the
//! stream's de-duplication.
//!
//! Payload: the journaled event's fields as WatchEvents has them (`seq`,
//! `time`, `vm_uuid`, `vm_name`, `kind`, `state`, `cause`, `detail`,
//! `image_sha256`, `bytes`, `total_bytes`, `project`), plus `schema`
//! (`stratus_core::nats::SCHEMA_VERSION`), `source` (`agent`) and `host`.

use std::sync::Arc;

use serde_json::Value;
use stratus_core::error::{Error, Result};
use stratus_core::nats::{Outgoing, SCHEMA_VERSION};
use stratus_core::outbox::{JournalEvents, JournalOutbox, OutboxMessage};
use stratus_proto::agent::v1 as pb;

use crate::store::{AgentStore, Event};

/// `source` in payloads and message ids.
const SOURCE: &str = "agent";

/// The subject of `e` published by `host`.
pub fn subject(host: &str, e: &Event) -> String {
    let kind = kind_word(e);
    if e.vm_uuid.is_nil() {
        format!("stratus.agent.{host}.host.{kind}")
    } else {
        format!("stratus.agent.{host}.vm.{}.{kind}", e.vm_uuid)
    }
}

/// The message id of seq `seq` published by `host`.
pub fn msg_id(host: &str, seq: u64) -> String {
    format!("{SOURCE}.{host}:{seq}")
}

fn kind_word(e: &Event) -> String {
    serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_ascii_uppercase))
        .expect("event types serialize as words")
}

/// The message of `e` published by `host`.
pub fn message(host: &str, e: &Event) -> Outgoing {
    let mut v = serde_json::to_value(e).expect("events serialize");
    let o = v.as_object_mut().expect("an event is an object");
    o.insert("schema".into(), SCHEMA_VERSION.into());
    o.insert("source".into(), SOURCE.into());
    o.insert("host".into(), host.into());
    Outgoing {
        subject: subject(host, e),
        payload: serde_json::to_vec(&v).expect("JSON serializes"),
        msg_id: msg_id(host, e.seq),
    }
}

/// A published payload read back: the event as WatchEvents streams it.
pub fn event_from_payload(payload: &[u8]) -> Result<pb::Event> {
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| Error::invalid(format!("event payload: not JSON: {e}")))?;
    let schema = v.get("schema").and_then(Value::as_u64).unwrap_or(0);
    if schema != u64::from(SCHEMA_VERSION) {
        return Err(Error::invalid(format!(
            "event payload: schema {schema}, this agentctl reads {SCHEMA_VERSION}"
        )));
    }
    let e: Event =
        serde_json::from_value(v).map_err(|e| Error::invalid(format!("event payload: {e}")))?;
    Ok(crate::grpc::event_pb(&e))
}

/// agentd's journal, as the publisher's outbox.
pub type AgentOutbox = JournalOutbox<AgentStore>;

impl JournalEvents for AgentStore {
    fn journal_db(&self) -> &redb::Database {
        self.database()
    }

    fn journal_committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed()
    }

    fn messages(&self, host: &str, after: u64, limit: usize) -> Result<Vec<OutboxMessage>> {
        // A guest's latest state may be kept below the oldest seq: reading
        // on from one of those is no gap. Anything else below it is.
        let oldest = self.oldest_seq()?;
        if after != 0 && after + 1 < oldest && !self.has_event(after)? {
            return Err(Error::out_of_range(format!(
                "events after seq {after} were compacted away"
            )));
        }
        Ok(self
            .events_after(after, limit, false)?
            .iter()
            .map(|e| OutboxMessage {
                seq: e.seq,
                message: message(host, e),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Cause, EventType, VmSpec, VmState};
    use crate::store::{NewEvent, VmRecord};
    use stratus_core::error::ErrorKind;
    use stratus_core::outbox::Outbox;

    fn guest(store: &AgentStore) -> VmRecord {
        let mut vm = VmRecord {
            request_id: String::new(),
            created_by: None,
            hotplug: None,
            migration: None,
            uuid: uuid::Uuid::new_v4(),
            spec: VmSpec {
                name: "web1".parse().unwrap(),
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
            created_at: crate::store::now_rfc3339(),
            last_event_seq: 0,
            owned_volumes: Vec::new(),
            pending_unexports: Vec::new(),
            project: "astro".into(),
        };
        store
            .commit(
                &mut vm,
                &[NewEvent::new(EventType::Created, Cause::Api, "")],
            )
            .unwrap();
        vm
    }

    #[test]
    fn subjects_ids_and_payloads_carry_host_seq_and_schema_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AgentStore::open(dir.path()).unwrap());
        let vm = guest(&store);
        store
            .record_host(&[NewEvent::image(
                EventType::ImageCached,
                Cause::Api,
                "ab",
                "",
                5,
                5,
            )])
            .unwrap();
        let out = AgentOutbox::new(store.clone(), "h1");
        let m = out.messages_after(0, 10).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].message.subject,
            format!("stratus.agent.h1.vm.{}.CREATED", vm.uuid)
        );
        assert_eq!(m[0].message.msg_id, "agent.h1:1");
        assert_eq!(m[1].message.subject, "stratus.agent.h1.host.IMAGE_CACHED");
        let v: Value = serde_json::from_slice(&m[0].message.payload).unwrap();
        assert_eq!(v["schema"], 1);
        assert_eq!(v["host"], "h1");
        assert_eq!(v["seq"], 1);
        assert_eq!(v["kind"], "created");
        assert_eq!(v["project"], "astro");
        let back = event_from_payload(&m[0].message.payload).unwrap();
        let journaled = store.events_since(0, 1).unwrap();
        assert_eq!(back, crate::grpc::event_pb(&journaled[0]));
        assert_eq!(
            event_from_payload(br#"{"schema":2}"#).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(out.messages_after(1, 10).unwrap()[0].seq, 2);
    }

    #[test]
    fn the_published_seq_is_durable_and_a_compacted_gap_is_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(AgentStore::open(dir.path()).unwrap());
            let out = AgentOutbox::new(store.clone(), "h1");
            assert_eq!(out.published_seq().unwrap(), 0);
            let _live = guest(&store);
            for _ in 0..10 {
                store
                    .record_host(&[NewEvent::new(EventType::ImageEvicted, Cause::Api, "")])
                    .unwrap();
            }
            out.set_published_seq(3).unwrap();
        }
        let store = Arc::new(AgentStore::open(dir.path()).unwrap());
        let out = AgentOutbox::new(store.clone(), "h1");
        assert_eq!(out.published_seq().unwrap(), 3, "kept across a restart");
        let c = store
            .compact(
                crate::store::Retention {
                    max_events: 2,
                    ..Default::default()
                },
                std::time::SystemTime::now(),
            )
            .unwrap();
        assert_eq!(c.oldest_seq, 10);
        // Seq 1 is the live guest's state, kept: reading on from it is fine.
        assert_eq!(out.messages_after(1, 10).unwrap()[0].seq, 10);
        let e = out.messages_after(3, 10).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert_eq!(out.messages_after(9, 10).unwrap().len(), 2);
    }
}
