//! A live migration's destination on the fakes: an incoming guest that no
//! stream reaches is undone by the stream watch (its QEMU, tap and export
//! go) with one MIGRATION_FAILED that says why (cause reconciliation),
//! not the monitor's word for the exit the undo caused; the monitor
//! leaves an incoming guest to an undo holding its lock, and records a
//! QEMU's own exit after it. Runs on `service_tests.rs`'s harness.

use std::time::Duration;

use uuid::Uuid;

use super::{small_spec, Host};
use crate::service::IncomingGuest;
use crate::spec::{Cause, EventType, VmState};

#[tokio::test]
async fn an_incoming_guest_no_stream_reaches_is_undone_once_saying_why() {
    let host = Host::new();
    let agent = host.agent();
    let id = Uuid::new_v4();
    let port = agent
        .prepare_incoming(IncomingGuest {
            id,
            spec: small_spec("moved", "root"),
            project: String::new(),
            owned_volumes: Vec::new(),
            source: "agent/host-a".into(),
            source_dn: None,
            created_at: "2026-12-04T12:00:00Z".into(),
            tls: false,
            layout: None,
        })
        .await
        .unwrap();
    assert_ne!(port, 0);
    let vm = agent.store().vm(id).unwrap().unwrap();
    assert!(vm.is_incoming());
    assert_eq!(vm.state, VmState::Starting);
    assert_eq!(host.vmm.pids_of(id).len(), 1);
    assert_eq!(host.pdisk.exported().len(), 1);
    assert_eq!(host.net.taps().len(), 1);

    agent
        .undo_if_no_stream(id, Duration::from_secs(30))
        .await
        .unwrap();
    // The monitor sees the exit the undo caused; give it its turn.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(agent.store().vm(id).unwrap().is_none());
    assert!(host.vmm.pids_of(id).is_empty());
    assert!(host.pdisk.exported().is_empty());
    assert!(host.net.taps().is_empty());
    let failed: Vec<_> = agent
        .store()
        .events_since(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.vm_uuid == id && e.kind == EventType::MigrationFailed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].cause, Cause::Reconciliation);
    assert!(
        failed[0]
            .detail
            .contains("no migration stream from agent/host-a"),
        "{}",
        failed[0].detail
    );
    // Nothing of it is left to undo again: the next check is a no-op.
    agent
        .undo_if_no_stream(id, Duration::from_secs(30))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_monitor_leaves_an_incoming_guest_to_an_undo_holding_its_lock() {
    let host = Host::new();
    let agent = host.agent();
    let id = Uuid::new_v4();
    agent
        .prepare_incoming(IncomingGuest {
            id,
            spec: small_spec("moved", "root"),
            project: String::new(),
            owned_volumes: Vec::new(),
            source: "agent/host-a".into(),
            source_dn: None,
            created_at: "2026-12-04T12:00:00Z".into(),
            tls: false,
            layout: None,
        })
        .await
        .unwrap();
    let pid = agent.store().vm(id).unwrap().unwrap().runtime.unwrap().pid;
    // An undo holds the guest's lock (AbortIncoming, the stream watch)
    // when the incoming QEMU ends: the monitor waits for it.
    let undo = agent.lock(id).await;
    host.vmm.die(pid);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let vm = agent.store().vm(id).unwrap();
    assert!(
        vm.is_some_and(|v| v.is_incoming()),
        "the monitor undid the guest under an undo's lock"
    );
    // Once the lock is free (the undo did not remove it here), the exit is
    // QEMU's own: undone by the monitor, with its word.
    drop(undo);
    for _ in 0..100 {
        if agent.store().vm(id).unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(agent.store().vm(id).unwrap().is_none());
    assert!(host.pdisk.exported().is_empty());
    assert!(host.net.taps().is_empty());
    let failed: Vec<_> = agent
        .store()
        .events_since(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.vm_uuid == id && e.kind == EventType::MigrationFailed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].detail.starts_with("the incoming QEMU ended"));
}
