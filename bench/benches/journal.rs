//! The agent's event journal (`agent::store::AgentStore`, redb): committing
//! a guest's state with one event (one durable write transaction), and
//! replaying 10 000 journaled events with `events_since`, as `WatchEvents`
//! does for a subscriber that starts from 0.

use std::time::Duration;

use agent::spec::{Cause, EventType, VmSpec, VmState};
use agent::store::{now_rfc3339, AgentStore, NewEvent, VmRecord};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const REPLAY: usize = 10_000;

fn record(name: &str) -> VmRecord {
    VmRecord {
        request_id: String::new(),
        created_by: None,
        hotplug: None,
        migration: None,
        project: String::new(),
        uuid: uuid::Uuid::new_v4(),
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
        state: VmState::Running,
        state_reason: String::new(),
        runtime: None,
        created_at: now_rfc3339(),
        last_event_seq: 0,
        owned_volumes: Vec::new(),
        pending_unexports: Vec::new(),
    }
}

fn event() -> NewEvent {
    NewEvent::new(EventType::Running, Cause::Qemu, "RESUME from QMP")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let dir = tempfile::tempdir().unwrap();
    let store = AgentStore::open(dir.path()).unwrap();
    let mut vm = record("bench-commit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("commit one event", |b| {
        b.iter(|| store.commit(&mut vm, &[event()]).unwrap())
    });

    // A journal of exactly REPLAY events, written in 100 transactions.
    let dir = tempfile::tempdir().unwrap();
    let store = AgentStore::open(dir.path()).unwrap();
    let mut vm = record("bench-replay");
    let batch: Vec<NewEvent> = (0..100).map(|_| event()).collect();
    for _ in 0..REPLAY / 100 {
        store.commit(&mut vm, &batch).unwrap();
    }
    g.throughput(Throughput::Elements(REPLAY as u64));
    g.bench_function("events_since replay of 10k", |b| {
        b.iter(|| {
            let evs = store.events_since(0, REPLAY).unwrap();
            assert_eq!(evs.len(), REPLAY);
            evs
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
