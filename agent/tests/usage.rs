//! Usage records end to end with a real guest (the test guest under TCG,
//! from a cached image, on a bridge in a namespace of the test's own):
//! the record of a running guest has its identity, its allocation, CPU
//! time and the bytes the test sent it; agentd killed and restarted
//! neither resets nor double-counts; a destroyed guest's record is
//! completed. The APEL message is read back by a parser written from the
//! EGI cloud accounting spec (v0.4). Run by scripts/test's e2e tier (needs
//! root, QEMU, tgt and scripts/guest-image).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stratus_proto::agent::v1 as pb;
use testkit::*;

const BOOT: Duration = Duration::from_secs(180);

/// The hyperconverged test host ([`AgentHost`]) and this suite's own helpers.
struct Host(AgentHost);

impl Host {
    fn start(extra: &[&str]) -> Host {
        Host(AgentHost::start(2048, extra))
    }

    /// The guest's record, read now (until = 0 reads every guest first).
    fn record(&self, until: u64) -> pb::UsageRecord {
        let mut r = self.agent(move |mut c| async move {
            c.list_usage_records(pb::ListUsageRecordsRequest {
                until,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records
        });
        assert_eq!(r.len(), 1, "{r:?}");
        r.remove(0)
    }

    /// Sends `n` UDP datagrams of `payload` bytes to the guest from the
    /// bridge's address.
    fn send_to_guest(&self, n: usize, payload: usize) {
        self.ns.block_on(move || async move {
            let s = std::net::UdpSocket::bind("10.232.0.1:0").unwrap();
            let buf = vec![0x5a; payload];
            for _ in 0..n {
                s.send_to(&buf, "10.232.0.2:9").unwrap();
            }
        });
    }
}

testkit::wraps_agent_host!(Host, 0);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An APEL cloud message, parsed as the EGI spec has it: the header
/// `APEL-cloud-message: v0.4`, then records of `Key: value` lines, each
/// ended by `%%`.
fn parse_apel(msg: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = msg.lines();
    assert_eq!(lines.next(), Some("APEL-cloud-message: v0.4"), "{msg}");
    let mut out = Vec::new();
    let mut cur = BTreeMap::new();
    for l in lines {
        if l == "%%" {
            out.push(std::mem::take(&mut cur));
        } else {
            let (k, v) = l.split_once(": ").expect("a Key: value line");
            assert!(
                cur.insert(k.to_owned(), v.to_owned()).is_none(),
                "{k} twice"
            );
        }
    }
    assert!(cur.is_empty(), "the last record has no %%: {msg}");
    for r in &out {
        for k in ["VMUUID", "SiteName", "MachineName"] {
            assert!(r.contains_key(k), "{k} is mandatory: {r:?}");
        }
    }
    out
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_guests_usage_record_counts_what_it_used_across_an_agentd_restart() {
    let mut h = Host::start(&[
        "--usage-interval",
        "2s",
        "--usage-site",
        "STRATUS-TEST",
        "--usage-service",
        "compute1.test",
    ]);
    h.ns.ip(&["addr", "add", "10.232.0.1/24", "dev", BRIDGE]);
    let dir = h.pool.dir.path().join("www");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("guest.qcow2");
    std::fs::copy(guest_dir().join("stratus-guest.qcow2"), &img).unwrap();
    let sha = sha256_of(&img);
    let httpd = Httpd::start_in(&h.ns, &dir);
    let url = httpd.url("guest.qcow2");
    let g = guest_dir();
    let spec = pb::VmSpec {
        name: "metered".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: "console=ttyS0 stratus.ip=10.232.0.2/24 stratus.peer=10.232.0.1".into(),
        }),
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url,
                sha256: sha.clone(),
                format: 0,
                endorser: String::new(),
                endorsement: String::new(),
            })),
            read_only: false,
            boot_index: 1,
            size_bytes: 256 << 20,
            persistence: pb::DiskPersistence::Local as i32,
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: String::new(),
            vlan: 0,
            ips: vec!["10.232.0.2".into()],
        }],
        ..Default::default()
    };
    let started = unix_now();
    let vm = h.launch("astro", spec);
    let log = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ping 10.232.0.1",
        BOOT,
    );
    assert!(log.contains("STRATUS-GUEST ping 10.232.0.1 ok"), "{log}");

    let r1 = h.record(0);
    assert_eq!(r1.vm_uuid, vm.uuid);
    assert_eq!(r1.machine_name, "metered");
    assert_eq!(r1.local_group_id, "astro");
    assert_eq!(r1.site_name, "STRATUS-TEST");
    assert_eq!(r1.cloud_compute_service, "compute1.test");
    assert_eq!(r1.cloud_type, "Stratus");
    assert_eq!(r1.status, "started");
    assert_eq!(r1.cpu_count, 1);
    assert_eq!(r1.memory_bytes, 128 << 20);
    assert_eq!(r1.disk_bytes, 256 << 20, "the overlay's virtual size");
    assert_eq!(r1.image_id, format!("sha256:{sha}"));
    assert_eq!(r1.end_time, 0);
    assert!(
        r1.start_time >= started && r1.start_time <= unix_now(),
        "{} not in [{started}, now]",
        r1.start_time
    );
    // Booting a kernel under TCG takes seconds of CPU.
    assert!(r1.cpu_duration >= 1, "{r1:?}");
    let elapsed = unix_now() - r1.start_time;
    assert!(
        r1.wall_duration + 3 >= elapsed && r1.wall_duration <= elapsed + 1,
        "{r1:?} after {elapsed} s"
    );
    // The guest's ping went out and its reply came in.
    assert!(r1.network_outbound_bytes >= 2 * 42, "{r1:?}");
    assert!(r1.network_inbound_bytes >= 2 * 42, "{r1:?}");

    // 300 datagrams of 1000 bytes: 1042-byte frames into the guest's tap.
    let sent = 300 * (1000 + 8 + 20 + 14);
    h.send_to_guest(300, 1000);
    let mut r2 = h.record(0);
    for _ in 0..50 {
        if r2.network_inbound_bytes >= r1.network_inbound_bytes + sent {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        r2 = h.record(0);
    }
    let got = r2.network_inbound_bytes - r1.network_inbound_bytes;
    assert!(
        got >= sent && got <= sent + sent / 10,
        "{got} bytes counted in, {sent} sent"
    );

    // agentd killed and restarted: the same QEMU, cgroup and tap count on.
    h.agentd.restart();
    // The guest keeps running: its wall time goes on through the restart.
    std::thread::sleep(Duration::from_secs(3));
    let r3 = h.record(0);
    assert!(
        r3.wall_duration >= r2.wall_duration + 2,
        "{r2:?} then {r3:?}"
    );
    assert!(r3.cpu_duration >= r2.cpu_duration, "{r2:?} then {r3:?}");
    assert!(r3.wall_duration >= r2.wall_duration, "{r2:?} then {r3:?}");
    let more_in = r3.network_inbound_bytes - r2.network_inbound_bytes;
    assert!(
        more_in < sent / 10,
        "the restart added {more_in} bytes in: counted twice?"
    );
    assert!(r3.network_outbound_bytes - r2.network_outbound_bytes < sent / 10);
    // A restart does not reset: time goes on from the stored totals.
    let elapsed = unix_now() - r3.start_time;
    assert!(r3.wall_duration + 5 >= elapsed, "{r3:?} after {elapsed} s");
    assert_eq!(r3.start_time, r1.start_time);

    // agentctl prints the same record as APEL, JSON and CSV.
    let out = h.agentd.ctl(&["usage", "--format", "apel"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("agentctl usage:\n{text}");
    let apel = parse_apel(&text);
    assert_eq!(apel.len(), 1);
    let a = &apel[0];
    assert_eq!(a["VMUUID"], vm.uuid);
    assert_eq!(a["SiteName"], "STRATUS-TEST");
    assert_eq!(a["CloudComputeService"], "compute1.test");
    assert_eq!(a["MachineName"], "metered");
    assert_eq!(a["LocalGroupId"], "astro");
    assert_eq!(a["Status"], "started");
    assert_eq!(a["CpuCount"], "1");
    assert_eq!(a["Memory"], "128");
    assert_eq!(a["Disk"], "1");
    assert_eq!(a["StartTime"], r1.start_time.to_string());
    assert!(a["CpuDuration"].parse::<u64>().unwrap() >= r3.cpu_duration);
    assert!(!a.contains_key("EndTime"));
    let out = h.agentd.ctl(&["--json", "usage"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["vm_uuid"], vm.uuid);
    assert!(v[0]["cpu_duration"].as_u64().unwrap() >= r3.cpu_duration);
    let out = h
        .agentd
        .ctl(&["usage", "--format", "csv", "--vm", "metered"]);
    assert!(out.status.success(), "{out:?}");
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().contains(&vm.uuid), "{csv}");

    // Paused for 2 s: suspended time, part of the wall time.
    for rpc in ["pause", "resume"] {
        let u = vm.uuid.clone();
        h.agent(move |mut c| async move {
            let req = pb::VmRequest {
                project: "astro".into(),
                vm: u,
                request_id: String::new(),
            };
            if rpc == "pause" {
                c.pause_vm(req).await.unwrap();
            } else {
                c.resume_vm(req).await.unwrap();
            }
        });
        if rpc == "pause" {
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let paused = h.record(0);
    assert!(
        paused.suspend_duration >= 1 && paused.suspend_duration <= 4,
        "{paused:?}"
    );
    assert!(paused.wall_duration >= r3.wall_duration + 2, "{paused:?}");

    // Destroyed: completed, with its end, and still reported for its time.
    let u = vm.uuid.clone();
    h.agent(move |mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            project: "astro".into(),
            vm: u,
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let mut r4 = h.record(0);
    for _ in 0..50 {
        if r4.status == "completed" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        r4 = h.record(0);
    }
    assert_eq!(r4.status, "completed");
    assert!(r4.end_time >= r3.start_time && r4.end_time <= unix_now());
    assert!(r4.cpu_duration >= r3.cpu_duration);
    assert!(r4.wall_duration >= paused.wall_duration);
    for (when, r) in [
        ("running", &r1),
        ("after 300 datagrams", &r2),
        ("3 s after the restart", &r3),
        ("paused 2 s", &paused),
        ("destroyed", &r4),
    ] {
        eprintln!(
            "{when}: status {} wall {} s suspended {} s cpu {} s in {} B out {} B disk {} B",
            r.status,
            r.wall_duration,
            r.suspend_duration,
            r.cpu_duration,
            r.network_inbound_bytes,
            r.network_outbound_bytes,
            r.disk_bytes
        );
    }
    // The history: as of before the restart, the earlier totals.
    let before = h.record(r2.record_create_time);
    assert!(before.cpu_duration <= r3.cpu_duration);
    assert_eq!(before.status, "started");
}

/// A kernel-booted test guest at `ip` on the bridge, its disk a local
/// overlay of the served image; `extra` goes on its kernel command line.
fn pinging_spec(name: &str, url: &str, sha: &str, ip: &str, extra: &str) -> pb::VmSpec {
    let g = guest_dir();
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: format!("console=ttyS0 stratus.ip={ip}/24 {extra}"),
        }),
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url: url.into(),
                sha256: sha.into(),
                ..Default::default()
            })),
            boot_index: 1,
            size_bytes: 256 << 20,
            persistence: pb::DiskPersistence::Local as i32,
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            ips: vec![ip.into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The accounting check between two guests: one pings the other
/// 200 times with 1000-byte payloads; each guest's record counts, within
/// 10%, the frames that crossed its tap: the pinger's requests out and
/// replies in, the pinged one's the other way round.
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn bytes_pinged_between_two_guests_are_counted_within_ten_percent() {
    let h = Host::start(&["--usage-interval", "2s"]);
    let g = h.serve_guest();
    let (url, sha) = (g.url.clone(), g.sha256.clone());
    const COUNT: u64 = 200;
    const SIZE: u64 = 1000;
    let quiet = pinging_spec("quiet", &url, &sha, "10.232.0.3", "");
    let talker = pinging_spec(
        "talker",
        &url,
        &sha,
        "10.232.0.2",
        &format!("stratus.peer=10.232.0.3 stratus.ping_burst={COUNT}:{SIZE}"),
    );
    let start = |spec: pb::VmSpec| h.launch("", spec);
    let q = start(quiet);
    wait_console(Path::new(&q.console_log), "STRATUS-GUEST ready", BOOT);
    let t = start(talker);
    let log = wait_console(Path::new(&t.console_log), "STRATUS-GUEST burst", BOOT);
    let line = log
        .lines()
        .find(|l| l.starts_with("STRATUS-GUEST burst"))
        .unwrap()
        .to_owned();
    let received: u64 = line
        .rsplit("received=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(received >= COUNT * 9 / 10, "{line}");

    // Ethernet + IPv4 + ICMP headers around each payload.
    let frame = SIZE + 8 + 20 + 14;
    let (requests, replies) = (COUNT * frame, received * frame);
    let records = h.agent(|mut c| async move {
        c.list_usage_records(pb::ListUsageRecordsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .records
    });
    let of = |uuid: &str| {
        records
            .iter()
            .find(|r| r.vm_uuid == uuid)
            .unwrap_or_else(|| panic!("no record of {uuid}: {records:?}"))
            .clone()
    };
    let (rt, rq) = (of(&t.uuid), of(&q.uuid));
    eprintln!(
        "talker out {} in {}; quiet out {} in {}; requests {requests} B, replies {replies} B",
        rt.network_outbound_bytes,
        rt.network_inbound_bytes,
        rq.network_outbound_bytes,
        rq.network_inbound_bytes
    );
    for (what, got, want) in [
        ("talker out", rt.network_outbound_bytes, requests),
        ("talker in", rt.network_inbound_bytes, replies),
        ("quiet in", rq.network_inbound_bytes, requests),
        ("quiet out", rq.network_outbound_bytes, replies),
    ] {
        assert!(
            got >= want && got <= want + want / 10,
            "{what}: {got} B counted, {want} B pinged"
        );
    }
}
