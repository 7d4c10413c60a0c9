//! Usage accounting: the counting rules, the durable book and the record
//! formats (APEL read back by a parser written from the EGI spec).

use super::*;
use crate::images::DeclaredFormat;
use crate::spec::{Disk, ImageSpec, VmSpec};

const S: u64 = 1_000_000;

fn guest(project: &str) -> VmRecord {
    VmRecord {
        request_id: String::new(),
        created_by: None,
        hotplug: None,
        migration: None,
        uuid: Uuid::new_v4(),
        spec: VmSpec {
            name: "web1".parse().unwrap(),
            vcpus: 2,
            memory: stratus_core::types::ByteSize(512 << 20),
            disks: vec![Disk {
                qos: Default::default(),
                source: DiskSource::Image {
                    image: ImageSpec {
                        url: "https://images.example/debian.qcow2".into(),
                        sha256: "ab".repeat(32),
                        format: DeclaredFormat::Qcow2,
                        endorser: None,
                        endorsement: None,
                    },
                    size: 0,
                    local: true,
                    server: Default::default(),
                },
                read_only: false,
                boot_index: 1,
            }],
            nics: vec![],
            kernel: None,
            labels: Default::default(),
            context: None,
        },
        state: VmState::Running,
        state_reason: String::new(),
        runtime: None,
        created_at: crate::store::now_rfc3339(),
        last_event_seq: 0,
        owned_volumes: Vec::new(),
        pending_unexports: Vec::new(),
        project: project.into(),
    }
}

fn cg(instance: u64, usec: u64) -> Option<CpuCounter> {
    Some(CpuCounter {
        source: CpuSource::Cgroup,
        instance,
        usec,
    })
}

fn tap(ifindex: u32, rx: u64, tx: u64) -> TapBytes {
    TapBytes {
        tap: "st-1".into(),
        ifindex,
        rx_bytes: rx,
        tx_bytes: tx,
    }
}

fn reading(
    t: u64,
    state: VmState,
    pid: u32,
    cpu: Option<CpuCounter>,
    taps: Vec<TapBytes>,
) -> Reading {
    Reading {
        time_us: t * S,
        state,
        qemu_pid: pid,
        cpu,
        taps,
        disk_bytes: None,
    }
}

#[test]
fn wall_cpu_and_network_add_what_moved_between_readings_of_one_qemu() {
    let vm = guest("astro");
    let mut t = Tally::new(&vm);
    assert!(t.advance(&reading(
        100,
        VmState::Running,
        7,
        cg(1, 2 * S),
        vec![tap(5, 1000, 4000)]
    )));
    // The first sight of a new QEMU, cgroup and tap: their counters
    // started with them.
    assert_eq!(t.started_us, Some(100 * S));
    assert_eq!((t.wall_us, t.cpu_us), (0, 2 * S));
    assert_eq!(
        (t.network_outbound_bytes, t.network_inbound_bytes),
        (1000, 4000)
    );
    t.advance(&reading(
        160,
        VmState::Running,
        7,
        cg(1, 5 * S),
        vec![tap(5, 1500, 4100)],
    ));
    assert_eq!((t.wall_us, t.cpu_us), (60 * S, 5 * S));
    assert_eq!(
        (t.network_outbound_bytes, t.network_inbound_bytes),
        (1500, 4100)
    );
    // Paused for 30 s: wall and suspended time both grow.
    t.advance(&reading(
        170,
        VmState::Paused,
        7,
        cg(1, 5 * S),
        vec![tap(5, 1500, 4100)],
    ));
    t.advance(&reading(
        200,
        VmState::Running,
        7,
        cg(1, 5 * S),
        vec![tap(5, 1500, 4100)],
    ));
    assert_eq!((t.wall_us, t.suspend_us), (100 * S, 30 * S));
}

#[test]
fn a_new_qemu_counts_from_zero_and_totals_never_go_back() {
    let vm = guest("");
    let mut t = Tally::new(&vm);
    t.advance(&reading(
        0,
        VmState::Running,
        7,
        cg(1, 10 * S),
        vec![tap(5, 100, 100)],
    ));
    // Torn down: the last reading of pid 7, then stopped (no QEMU).
    t.advance(&reading(
        50,
        VmState::Stopping,
        7,
        cg(1, 12 * S),
        vec![tap(5, 300, 200)],
    ));
    t.advance(&reading(60, VmState::Stopped, 0, None, vec![]));
    assert_eq!((t.wall_us, t.cpu_us), (50 * S, 12 * S));
    // 40 s stopped add no wall time; the new QEMU has a new cgroup and tap.
    t.advance(&reading(
        100,
        VmState::Running,
        9,
        cg(2, S),
        vec![tap(6, 10, 20)],
    ));
    assert_eq!((t.wall_us, t.cpu_us), (50 * S, 13 * S));
    assert_eq!(
        (t.network_outbound_bytes, t.network_inbound_bytes),
        (310, 220)
    );
    t.advance(&reading(
        110,
        VmState::Running,
        9,
        cg(2, 3 * S),
        vec![tap(6, 10, 20)],
    ));
    assert_eq!((t.wall_us, t.cpu_us), (60 * S, 15 * S));
    // A reading taken before the last one counted changes nothing.
    let before = t.clone();
    assert!(!t.advance(&reading(105, VmState::Running, 9, cg(2, 2 * S), vec![])));
    assert_eq!(t, before);
}

#[test]
fn the_same_qemu_read_from_another_source_adds_nothing() {
    let vm = guest("");
    let mut t = Tally::new(&vm);
    t.advance(&reading(0, VmState::Running, 7, cg(1, 10 * S), vec![]));
    // Its cgroup is gone (agentd restarted without cgroups): /proc holds
    // the QEMU's whole life, 10 s of which were counted already.
    let proc = Some(CpuCounter {
        source: CpuSource::Process,
        instance: 7,
        usec: 11 * S,
    });
    t.advance(&reading(10, VmState::Running, 7, proc, vec![]));
    assert_eq!(t.cpu_us, 10 * S);
    let proc = Some(CpuCounter {
        source: CpuSource::Process,
        instance: 7,
        usec: 14 * S,
    });
    t.advance(&reading(20, VmState::Running, 7, proc, vec![]));
    assert_eq!(t.cpu_us, 13 * S);
    // Back in a fresh cgroup (re-adopted): counted from its 0.
    t.advance(&reading(30, VmState::Running, 7, cg(3, S / 2), vec![]));
    assert_eq!(t.cpu_us, 13 * S + S / 2);
    assert_eq!(t.wall_us, 30 * S);
}

#[test]
fn the_book_survives_reopening_and_resumes_from_the_stored_counters() {
    let dir = tempfile::tempdir().unwrap();
    let vm = guest("astro");
    {
        let store = Arc::new(AgentStore::open(dir.path()).unwrap());
        let book = UsageBook::open(store).unwrap();
        book.record(
            &vm,
            &reading(100, VmState::Running, 7, cg(1, 2 * S), vec![tap(5, 10, 10)]),
        )
        .unwrap();
        book.record(
            &vm,
            &reading(160, VmState::Running, 7, cg(1, 4 * S), vec![tap(5, 20, 30)]),
        )
        .unwrap();
    }
    // agentd restarted; the same QEMU, cgroup and tap count on.
    let store = Arc::new(AgentStore::open(dir.path()).unwrap());
    let book = UsageBook::open(store).unwrap();
    let t = book
        .record(
            &vm,
            &reading(220, VmState::Running, 7, cg(1, 7 * S), vec![tap(5, 25, 40)]),
        )
        .unwrap();
    assert_eq!((t.wall_us, t.cpu_us), (120 * S, 7 * S));
    assert_eq!(
        (t.network_outbound_bytes, t.network_inbound_bytes),
        (25, 40)
    );
    assert_eq!(book.last_seq().unwrap(), 3);
    // History: as of 170 s the second reading; the guest ran in [0, 150].
    let then = book.tallies_within(0, 170 * S).unwrap();
    assert_eq!(then.len(), 1);
    assert_eq!(then[0].cpu_us, 4 * S);
    assert!(book.tallies_within(0, 50 * S).unwrap().is_empty());
    // Destroyed: completed once, at the time given.
    let done = book.complete(vm.uuid, 300 * S).unwrap().unwrap();
    assert_eq!(done.ended_us, Some(300 * S));
    assert_eq!(
        book.complete(vm.uuid, 400 * S).unwrap().unwrap().ended_us,
        Some(300 * S)
    );
    assert_eq!(book.complete(Uuid::new_v4(), 400 * S).unwrap(), None);
    assert!(book.tallies_within(301 * S, 500 * S).unwrap().is_empty());
    assert_eq!(book.tallies_within(250 * S, 500 * S).unwrap().len(), 1);
    assert_eq!(book.last_seq().unwrap(), 4);
    // Compaction keeps the live tallies, drops old log entries and those
    // destroyed before the cutoff.
    let now = UNIX_EPOCH + Duration::from_secs(1000);
    assert_eq!(book.compact(Duration::from_secs(800), now).unwrap(), 2);
    assert_eq!(book.tallies().unwrap().len(), 1);
    book.compact(Duration::from_secs(100), now).unwrap();
    assert!(book.tallies().unwrap().is_empty());
}

fn record_of(vm: &VmRecord) -> UsageRecord {
    let mut t = Tally::new(vm);
    t.advance(&reading(
        1_764_590_000,
        VmState::Running,
        7,
        cg(1, 0),
        vec![],
    ));
    t.advance(&Reading {
        disk_bytes: Some(10 << 30),
        ..reading(
            1_764_593_600,
            VmState::Running,
            7,
            cg(1, 1800 * S + 400_000),
            vec![tap(5, 3 << 30, (1 << 30) + 1)],
        )
    });
    let site = Site {
        site_name: "STRATUS-TEST".into(),
        cloud_compute_service: "compute1.example".into(),
        host: "compute1".into(),
    };
    UsageRecord::from_tally(&t, &site, 1_764_593_601 * S)
}

/// An APEL message parser written from the EGI spec: a header line, then
/// records of `Key: value` lines each ended by `%%`.
fn parse_apel(msg: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = msg.lines();
    assert_eq!(lines.next(), Some("APEL-cloud-message: v0.4"));
    let mut out = Vec::new();
    let mut cur = BTreeMap::new();
    for l in lines {
        if l == "%%" {
            out.push(std::mem::take(&mut cur));
            continue;
        }
        let (k, v) = l.split_once(": ").expect("Key: value");
        assert!(
            cur.insert(k.to_owned(), v.to_owned()).is_none(),
            "{k} twice"
        );
    }
    assert!(cur.is_empty(), "a record without %%");
    out
}

#[test]
fn an_apel_message_has_the_v04_fields_in_their_units() {
    let vm = guest("astro");
    let r = record_of(&vm);
    let msg = apel_message(&[r.clone(), r]);
    let recs = parse_apel(&msg);
    assert_eq!(recs.len(), 2);
    let f = &recs[0];
    for k in ["VMUUID", "SiteName", "MachineName"] {
        assert!(f.contains_key(k), "{k} is mandatory");
    }
    assert_eq!(f["VMUUID"], vm.uuid.to_string());
    assert_eq!(f["SiteName"], "STRATUS-TEST");
    assert_eq!(f["CloudComputeService"], "compute1.example");
    assert_eq!(f["MachineName"], "web1");
    assert_eq!(f["LocalGroupId"], "astro");
    assert_eq!(f["Status"], "started");
    assert_eq!(f["StartTime"], "1764590000");
    assert!(!f.contains_key("EndTime"), "unset until completed");
    assert_eq!(f["WallDuration"], "3600");
    assert_eq!(f["CpuDuration"], "1800");
    assert_eq!(f["CpuCount"], "2");
    assert_eq!(f["Memory"], "512", "MB");
    assert_eq!(f["Disk"], "10", "GB");
    assert_eq!(f["NetworkOutbound"], "3", "GB the guest sent");
    assert_eq!(f["NetworkInbound"], "1", "GB it received");
    assert_eq!(f["ImageId"], format!("sha256:{}", "ab".repeat(32)));
    assert_eq!(f["CloudType"], "Stratus");
    // Every field name is one of the format's.
    let known = [
        "VMUUID",
        "SiteName",
        "CloudComputeService",
        "MachineName",
        "LocalUserId",
        "LocalGroupId",
        "GlobalUserName",
        "FQAN",
        "Status",
        "StartTime",
        "EndTime",
        "SuspendDuration",
        "WallDuration",
        "CpuDuration",
        "CpuCount",
        "NetworkType",
        "NetworkInbound",
        "NetworkOutbound",
        "PublicIPCount",
        "Memory",
        "Disk",
        "BenchmarkType",
        "Benchmark",
        "StorageRecordId",
        "ImageId",
        "CloudType",
    ];
    assert!(f.keys().all(|k| known.contains(&k.as_str())), "{f:?}");
}

#[test]
fn the_creators_identity_fills_the_user_fields() {
    use stratus_pki::tenancy::Creator;
    use stratus_pki::Role;
    let mut vm = guest("astro");
    vm.created_by = Some(Creator {
        role: Role::Frontend,
        name: "horizon".into(),
    });
    let r = record_of(&vm);
    assert_eq!(r.local_user_id, "frontend/horizon");
    assert_eq!(r.global_user_name, "stratus://frontend/horizon");
    assert_eq!(r.fqan, "/astro/Role=frontend/Capability=NULL");
    let f = &parse_apel(&apel_message(std::slice::from_ref(&r)))[0];
    assert_eq!(f["LocalUserId"], "frontend/horizon");
    assert_eq!(f["GlobalUserName"], "stratus://frontend/horizon");
    assert_eq!(f["FQAN"], "/astro/Role=frontend/Capability=NULL");
    assert_eq!(f["LocalGroupId"], "astro");
    // The proto round trip keeps them.
    assert_eq!(UsageRecord::from(pb::UsageRecord::from(&r)), r);
    // CSV: the three at the end, after the columns older readers know.
    let row = csv(&[r]).lines().nth(1).unwrap().to_owned();
    assert!(
        row.ends_with(
            ",Stratus,frontend/horizon,stratus://frontend/horizon,/astro/Role=frontend/Capability=NULL"
        ),
        "{row}"
    );

    // An admin's guest of no project: a user, no FQAN.
    let mut vm = guest("");
    vm.created_by = Some(Creator {
        role: Role::Admin,
        name: "alice".into(),
    });
    let f = &parse_apel(&apel_message(&[record_of(&vm)]))[0];
    assert_eq!(f["LocalUserId"], "admin/alice");
    assert!(!f.contains_key("FQAN") && !f.contains_key("LocalGroupId"));
    // A guest from before creators were recorded: the fields are left out
    // (optional in the format), not filled with a guess.
    let f = &parse_apel(&apel_message(&[record_of(&guest("astro"))]))[0];
    for k in ["LocalUserId", "GlobalUserName", "FQAN"] {
        assert!(!f.contains_key(k), "{k}: {f:?}");
    }
}

#[test]
fn a_tally_stored_before_creators_loads_without_one() {
    let mut t = Tally::new(&guest("astro"));
    t.creator = None;
    let mut v = serde_json::to_value(&t).unwrap();
    assert!(v.get("creator").is_none());
    v.as_object_mut().unwrap().remove("creator");
    let back: Tally = serde_json::from_value(v).unwrap();
    assert_eq!(back, t);
}

#[test]
fn a_name_with_a_line_break_cannot_forge_a_field() {
    let mut r = record_of(&guest("astro"));
    r.machine_name = "evil\nSiteName: OTHER".into();
    let recs = parse_apel(&apel_message(&[r]));
    assert_eq!(recs[0]["SiteName"], "STRATUS-TEST");
    assert_eq!(recs[0]["MachineName"], "evil SiteName: OTHER");
}

#[test]
fn csv_has_a_header_and_quotes_what_needs_it() {
    let mut r = record_of(&guest("astro"));
    r.machine_name = "a,\"b\"".into();
    let out = csv(&[r.clone()]);
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap(), CSV_COLUMNS.join(","));
    let row = lines.next().unwrap();
    assert!(row.contains(",\"a,\"\"b\"\"\","), "{row}");
    assert!(row.starts_with(&format!("1764593601,{},STRATUS-TEST,", r.vm_uuid)));
    assert!(row.contains(",3600,1800,2,"), "{row}");
    assert_eq!(lines.next(), None);
}

#[test]
fn statuses_follow_casos_words() {
    assert_eq!(status_word(VmState::Running, false), "started");
    assert_eq!(status_word(VmState::Paused, false), "paused");
    assert_eq!(status_word(VmState::Stopped, false), "stopped");
    assert_eq!(status_word(VmState::Error, false), "error");
    assert_eq!(status_word(VmState::Running, true), "completed");
}

#[test]
fn published_records_carry_host_seq_and_schema() {
    let vm = guest("astro");
    let mut t = Tally::new(&vm);
    t.advance(&reading(100, VmState::Running, 7, cg(1, S), vec![]));
    let site = Site {
        site_name: "S".into(),
        cloud_compute_service: "c".into(),
        host: "h1".into(),
    };
    let m = message(&site, 42, &t);
    assert_eq!(m.subject, "stratus.usage.h1");
    assert_eq!(m.msg_id, "usage.h1:42");
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["seq"], 42);
    assert_eq!(v["vm_uuid"], vm.uuid.to_string());
    assert_eq!(v["cpu_duration"], 1);
    let back: UsageRecord = serde_json::from_value(v).unwrap();
    assert_eq!(back.local_group_id, "astro");
}

#[test]
fn this_process_cgroup_and_proc_counters_read() {
    let me = std::process::id();
    let c = qemu_cpu(None, Uuid::new_v4(), me).unwrap();
    assert_eq!((c.source, c.instance), (CpuSource::Process, u64::from(me)));
    assert_eq!(qemu_cpu(None, Uuid::new_v4(), 0), None);
    assert!(cgroup_cpu(Path::new("/nonexistent")).is_none());
    let lo = TapBytes::read("lo").unwrap();
    assert!(lo.ifindex >= 1);
}
