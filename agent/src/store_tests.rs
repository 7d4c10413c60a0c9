use super::*;
use crate::spec::VmSpec;

fn record(name: &str) -> VmRecord {
    VmRecord {
        request_id: String::new(),
        created_by: None,
        hotplug: None,
        migration: None,
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
fn records_from_before_named_pdisk_servers_load_as_the_default_server() {
    let d: DiskAttachment = serde_json::from_str(
        r#"{"device":"vda","source":"pdisk:v","attachment":"x","read_only":false,"pdisk_volume":"u"}"#,
    )
    .unwrap();
    assert!(d.pdisk_server.is_default());
    let o: OwnedVolume =
        serde_json::from_str(r#"{"device":"vda","volume":"u","name":"n"}"#).unwrap();
    assert!(o.server.is_default());
    let p: Vec<PdiskExport> = serde_json::from_str(r#"["u1","u2"]"#).unwrap();
    assert!(p.iter().all(|e| e.server.is_default()));
    assert_eq!(p[1].volume, "u2");
    // New ones keep their server; default ones are written as before.
    let b = PdiskExport {
        server: "b".parse().unwrap(),
        volume: "u3".into(),
    };
    let back: PdiskExport = serde_json::from_slice(&encode(&b)).unwrap();
    assert_eq!(back, b);
    let o = OwnedVolume {
        server: "b".parse().unwrap(),
        ..o
    };
    let back: OwnedVolume = serde_json::from_slice(&encode(&o)).unwrap();
    assert_eq!(back, o);
    let d2 = DiskAttachment {
        pdisk_server: "b".parse().unwrap(),
        ..d.clone()
    };
    let back: DiskAttachment = serde_json::from_slice(&encode(&d2)).unwrap();
    assert_eq!(back, d2);
    assert!(!String::from_utf8(encode(&d))
        .unwrap()
        .contains("pdisk_server"));
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
            chap_target_user: Some("stt-0b9c6f52-5a1e-4d8e-9a57-2f0e3c1d4b6a".into()),
        }),
        ..d
    };
    let back: DiskAttachment = serde_json::from_slice(&encode(&k)).unwrap();
    assert_eq!(back, k);
    // Kernel records from before mutual CHAP read as one-way.
    let one_way = r#"{"device":"vda","source":"pdisk:v","attachment":"/dev/sdb","read_only":false,"pdisk_volume":"u","mode":"kernel","kernel":{"lun":{"portal":"127.0.0.1:3260","target":"iqn.2026-11.io.stratus.pdisk:v","lun":1},"device":"/dev/sdb"}}"#;
    let d: DiskAttachment = serde_json::from_str(one_way).unwrap();
    assert_eq!(d.nvme, None);
    assert_eq!(d.kernel.unwrap().chap_target_user, None);
    // An NVMe/TCP attachment round-trips, and a record without one omits it.
    let n = DiskAttachment {
        mode: AttachMode::Kernel,
        kernel: None,
        nvme: Some(crate::attach::NvmeDisk {
            namespace: crate::attach::NvmeNamespace::new(
                "127.0.0.1:4420".parse().unwrap(),
                "nqn.2026-11.io.stratus.pdisk:v",
                1,
            )
            .unwrap(),
            device: Some("/dev/nvme0n1".into()),
        }),
        ..back.clone()
    };
    let again: DiskAttachment = serde_json::from_slice(&encode(&n)).unwrap();
    assert_eq!(again, n);
    assert!(!String::from_utf8(encode(&back)).unwrap().contains("nvme"));
    // So does a krbd mapping; records from before krbd have none.
    assert_eq!(back.krbd, None);
    let r = DiskAttachment {
        mode: AttachMode::Kernel,
        kernel: None,
        krbd: Some(crate::attach::KrbdDisk {
            pool: "stratus".into(),
            image: "pd-vol-0b9c6f52-5a1e-4d8e-9a57-2f0e3c1d4b6a".into(),
            fsid: "69d8ee26-508c-4088-b3a4-b2c4a29d107d".into(),
            device: Some("/dev/rbd0".into()),
        }),
        ..back.clone()
    };
    let again: DiskAttachment = serde_json::from_slice(&encode(&r)).unwrap();
    assert_eq!(again, r);
    assert!(!String::from_utf8(encode(&back)).unwrap().contains("krbd"));
}

#[test]
fn kept_requests_survive_a_reopen_and_go_when_old() {
    use stratus_core::requests::StoredOutcome;
    let dir = tempfile::tempdir().unwrap();
    let row = |started, outcome| StoredRequest {
        rpc: "StartVm".into(),
        fingerprint: 42,
        started,
        target: "u".into(),
        outcome,
    };
    let done = row(1000, Some(StoredOutcome::Answer(vec![1, 2])));
    {
        let s = AgentStore::open(dir.path()).unwrap();
        s.put("alice|p", "r1", &done).unwrap();
        s.put("alice|p", "r0", &row(10, None)).unwrap();
        // The same id of another caller is another row.
        s.put("bob|p", "r1", &row(2000, None)).unwrap();
    }
    let s = AgentStore::open(dir.path()).unwrap();
    assert_eq!(s.get("alice|p", "r1").unwrap(), Some(done.clone()));
    assert_eq!(s.get("bob|p", "r1").unwrap().unwrap().started, 2000);
    assert_eq!(s.get("alice|q", "r1").unwrap(), None);
    assert_eq!(s.prune(500).unwrap(), 1);
    assert_eq!(s.get("alice|p", "r0").unwrap(), None);
    assert_eq!(s.get("alice|p", "r1").unwrap(), Some(done));
}

#[test]
fn an_image_save_is_kept_until_it_ends_with_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut save = PendingSave {
        id: "save-0123456789ab".into(),
        vm: Uuid::new_v4(),
        vm_name: "web".into(),
        device: "vdb".into(),
        server: ServerName::default(),
        volume: "web-data".into(),
        project: "p".into(),
        target: "web-img".into(),
        snapshot: None,
        size_bytes: 0,
    };
    {
        let s = AgentStore::open(dir.path()).unwrap();
        s.put_save(&save, &[]).unwrap();
        save.snapshot = Some("u1".into());
        let started = NewEvent::new(EventType::ImageSaveStarted, Cause::Api, "web vdb");
        assert_eq!(s.put_save(&save, &[started]).unwrap().len(), 1);
    }
    // After a restart: the last version, once.
    let s = AgentStore::open(dir.path()).unwrap();
    assert_eq!(s.saves().unwrap(), vec![save.clone()]);
    let done = NewEvent::new(
        EventType::ImageSaved,
        Cause::Reconciliation,
        "pdisk:///web-img",
    );
    let evs = s.end_save(&save.id, &[done]).unwrap();
    assert_eq!(evs[0].seq, 2);
    assert!(s.saves().unwrap().is_empty());
    let kinds: Vec<EventType> = s
        .events_since(0, 10)
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventType::ImageSaveStarted, EventType::ImageSaved]);
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

/// A million events compact to the bound, a live guest's latest state
/// event survives, and reads from inside the compacted range are
/// OutOfRange naming the oldest seq, through the store and the journal.
#[tokio::test(flavor = "multi_thread")]
async fn a_million_events_compact_to_the_bound_and_compacted_reads_are_out_of_range() {
    use futures::StreamExt;
    use stratus_core::error::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(AgentStore::open(dir.path()).unwrap());
    let mut live = record("live");
    live.state = VmState::Running;
    s.commit(
        &mut live,
        &[NewEvent::new(EventType::Running, Cause::Api, "")],
    )
    .unwrap();
    let batch: Vec<NewEvent> = (0..100_000)
        .map(|_| NewEvent::new(EventType::ImageCached, Cause::Api, "x"))
        .collect();
    for _ in 0..10 {
        s.record_host(&batch).unwrap();
    }
    let last = s.last_seq().unwrap();
    assert_eq!(last, 1_000_001);

    let bound = Retention {
        max_events: 100_000,
        ..Retention::default()
    };
    let c = s.compact(bound, SystemTime::now()).unwrap();
    assert_eq!(
        c,
        Compaction {
            removed: 900_000,
            kept_states: 1,
            oldest_seq: last - 100_000 + 1
        }
    );
    let held = s.events_since(0, usize::MAX).unwrap();
    assert_eq!(held.len(), 100_001);
    assert_eq!(
        (held[0].seq, held[0].vm_uuid),
        (1, live.uuid),
        "the live guest's state"
    );
    assert_eq!(held[0].state, Some(VmState::Running));
    assert_eq!(held[1].seq, c.oldest_seq);

    let e = s.events_since(5, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    assert!(e.message().contains(&c.oldest_seq.to_string()), "{e}");
    assert_eq!(
        s.events_since(c.oldest_seq - 1, 1).unwrap()[0].seq,
        c.oldest_seq
    );
    let journal = crate::journal::EventJournal::new(s.clone());
    let first = journal
        .follow(5, crate::journal::EventFilter::all())
        .next()
        .await
        .unwrap();
    assert_eq!(first.unwrap_err().kind(), ErrorKind::OutOfRange);
    let from_start = journal
        .replay(0, crate::journal::EventFilter::vm(live.uuid.to_string()))
        .collect::<Vec<_>>()
        .await;
    assert_eq!(from_start.len(), 1, "a reader from 0 gets what is held");

    // Past the retention age everything goes but the live guest's state.
    let later = SystemTime::now() + Duration::from_secs(8 * 24 * 3600);
    let c = s.compact(Retention::default(), later).unwrap();
    assert_eq!((c.removed, c.oldest_seq), (100_000, last + 1));
    assert_eq!(s.events_since(0, usize::MAX).unwrap().len(), 1);
    assert!(s.events_since(last, 10).unwrap().is_empty());
    assert_eq!(s.compact(Retention::default(), later).unwrap().removed, 0);
}
