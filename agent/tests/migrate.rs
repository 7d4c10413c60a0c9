//! Live migration end to end (issue 15): two hosts, each a network
//! namespace with its bridge and agentd, joined by a veth pair (A is
//! 10.231.0.1, B 10.231.0.2); host A also runs the one pdiskd and tgtd,
//! both reached by B across the link. The test guest (TCG, 128 MiB,
//! `stratus.count=1`: a count and its uptime on the console every second)
//! boots on A from a pdisk volume. A migration to B refused by B (a bridge
//! B does not allow) leaves it running on A; a migration to B, over TLS,
//! moves it without a restart with a disk and a NIC hot-plugged on A
//! (they keep their root ports on B, work there and detach), leaving
//! nothing on A. Its disk limits (DiskQos on the root disk and on the
//! hot-plugged one) come along: B's QEMU has them in its throttle groups
//! (`qom-get`), GetVm on B shows them; SetDiskQos on B changes them, and
//! they are kept over the move back to A (B → A), where it stops normally.
//! Run by scripts/test's e2e tier (needs root, QEMU, tgt and the test guest).

use std::path::{Path, PathBuf};
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::Code;

const BRIDGE: &str = "stbr0";
/// A bridge host A allows and host B does not.
const ONLY_ON_A: &str = "stmig0";
const BOOT: Duration = Duration::from_secs(180);
const HOTPLUG_SEEN: Duration = Duration::from_secs(60);
/// The MAC of the NIC hot-plugged on A.
const HOT_MAC: &str = "52:54:00:00:00:43";

/// The two hosts (testkit's), A also with a bridge B does not allow.
fn two_hosts() -> TwoHosts {
    TwoHosts::start(
        BRIDGE,
        1024,
        [&[ONLY_ON_A], &[]],
        [&["--allowed-bridge", ONLY_ON_A], &[]],
    )
}

/// Volumes for the tests, in the two hosts' pdisk.
trait Volumes {
    fn guest_volume(&self, name: &str);
    fn empty_volume(&self, name: &str, size: u64);
    fn grow_volume(&self, volume: &str, size: u64);
}

impl Volumes for TwoHosts {
    /// A clone of the test guest's disk, `name`, in pdisk.
    fn guest_volume(&self, name: &str) {
        let src = guest_dir().join("stratus-guest.raw");
        let dst = self.pdiskd.import_dir.join("stratus-guest.raw");
        std::fs::copy(&src, &dst).unwrap();
        let url = self.pdiskd.url();
        let (name, dst) = (name.to_string(), dst.display().to_string());
        self.ns[0].block_on(move || async move {
            let mut c = VolumeServiceClient::new(channel(&url).await);
            c.create_volume(pdpb::CreateVolumeRequest {
                name,
                source: Some(pdpb::create_volume_request::Source::FromImage(
                    pdpb::ImageSource {
                        path: dst,
                        format: pdpb::ImageFormat::Raw as i32,
                    },
                )),
                ..Default::default()
            })
            .await
            .unwrap();
        });
    }

    /// An empty volume `name` of `size` bytes in pdisk.
    fn empty_volume(&self, name: &str, size: u64) {
        let (url, name) = (self.pdiskd.url(), name.to_string());
        self.ns[0].block_on(move || async move {
            let mut c = VolumeServiceClient::new(channel(&url).await);
            c.create_volume(pdpb::CreateVolumeRequest {
                name,
                size_bytes: size,
                ..Default::default()
            })
            .await
            .unwrap();
        });
    }

    /// The storage admin grows `volume` to `size` bytes.
    fn grow_volume(&self, volume: &str, size: u64) {
        let (url, volume) = (self.pdiskd.url(), volume.to_string());
        self.ns[0].block_on(move || async move {
            let mut c = VolumeServiceClient::new(channel(&url).await);
            c.resize_volume(pdpb::ResizeVolumeRequest {
                volume,
                size_bytes: size,
                ..Default::default()
            })
            .await
            .unwrap();
        });
    }
}

/// The guest's counts and uptimes on a console log, in order.
fn counts(log: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.split("STRATUS-GUEST count ").nth(1)?;
            let mut w = rest.split_whitespace();
            let n = w.next()?.parse().ok()?;
            let _ = w.next()?;
            let up = w.next()?.parse().ok()?;
            Some((n, up))
        })
        .collect()
}

/// Waits until the console at `log` shows a count past `after`; the last.
fn count_past(log: &Path, after: u64) -> (u64, f64) {
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        if let Some(&last) = counts(log).last() {
            if last.0 > after {
                return last;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no count past {after} on {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kinds(events: &[pb::Event], vm: &str) -> Vec<pb::EventType> {
    events
        .iter()
        .filter(|e| e.vm_name == vm)
        .map(|e| e.r#type())
        .collect()
}

fn taps_in(ns: &NetNs) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("st") && n != BRIDGE && n != ONLY_ON_A)
        .collect()
}

/// The limits in guest `uuid`'s QEMU under `agentd`, of each throttle
/// group in `groups` (`qom-get` of `/objects/GROUP`'s `limits`), as
/// DiskQos. QEMU serves one QMP client: agentd is killed to ask it and
/// restarted after (it adopts the guest).
fn qemu_limits(agentd: &mut Agentd, uuid: &str, groups: &[&str]) -> Vec<agent::qos::Limits> {
    agentd.kill9();
    let socket = agentd.state_dir.join("vms").join(uuid).join("qmp.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limits = rt.block_on(async {
        let (qmp, _events) = agent::qmp::Qmp::connect(&socket, Duration::from_secs(10))
            .await
            .unwrap();
        let mut out = Vec::new();
        for g in groups {
            let v = qmp
                .execute(
                    "qom-get",
                    Some(
                        serde_json::json!({"path": format!("/objects/{g}"), "property": "limits"}),
                    ),
                )
                .await
                .unwrap();
            out.push(agent::qos::Limits::from_qemu(&v));
        }
        out
    });
    drop(rt);
    agentd.restart();
    limits
}

/// The limits of a DiskQos as QEMU would hold them.
fn limits_of(q: &pb::DiskQos) -> agent::qos::Limits {
    let mut l = agent::qos::Limits {
        iops_size: q.iops_size,
        ..Default::default()
    };
    let from = [
        (q.iops_total, q.iops_total_max, q.iops_total_max_length),
        (q.iops_read, q.iops_read_max, q.iops_read_max_length),
        (q.iops_write, q.iops_write_max, q.iops_write_max_length),
        (q.bps_total, q.bps_total_max, q.bps_total_max_length),
        (q.bps_read, q.bps_read_max, q.bps_read_max_length),
        (q.bps_write, q.bps_write_max, q.bps_write_max_length),
    ];
    for ((name, b), (avg, max, len)) in l.buckets_mut().into_iter().zip(from) {
        assert!(!name.is_empty());
        b.avg = avg;
        b.max = max;
        b.max_length = len;
    }
    l
}

fn qos_of(vm: &pb::Vm, device: usize) -> pb::DiskQos {
    vm.spec.as_ref().unwrap().disks[device]
        .qos
        .clone()
        .unwrap_or_default()
}

fn migrate(h: &TwoHosts, vm: &str) -> Result<pb::MigrateVmResponse, tonic::Status> {
    let (vm, destination) = (vm.to_string(), h.url(1));
    h.on(0, move |mut c| async move {
        c.migrate_vm(pb::MigrateVmRequest {
            vm,
            destination,
            project: String::new(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner())
    })
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_guest_moves_live_to_another_host_and_nothing_of_it_stays_behind() {
    let mut h = two_hosts();
    h.guest_volume("mig-root");
    let g: PathBuf = guest_dir();
    let spec = |bridge: &str| pb::VmSpec {
        name: "mover".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume("mig-root".into())),
            qos: Some(root_qos()),
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: bridge.into(),
            mac: String::new(),
            vlan: 0,
            ips: Vec::new(),
        }],
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: "console=ttyS0 stratus.count=1 stratus.hotplug_marker=from-a".into(),
        }),
        ..Default::default()
    };

    // 1. B refuses a guest on a bridge it does not allow: the guest keeps
    //    running on A, B has nothing, the volume stays A's alone.
    let refused_spec = spec(ONLY_ON_A);
    let vm = h.on(0, move |mut c| async move {
        let vm = c
            .create_vm(pb::CreateVmRequest {
                spec: Some(refused_spec),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.start_vm(pb::VmRequest {
            vm: vm.uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    let log_a = PathBuf::from(&vm.console_log);
    let (before, _) = count_past(&log_a, 2);
    let e = migrate(&h, "mover").unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(ONLY_ON_A), "{e:?}");
    count_past(&log_a, before + 2);
    let still = h.on(0, |mut c| async move {
        c.get_vm(pb::VmRequest {
            vm: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(still.state(), pb::VmState::Running);
    assert_eq!(still.pid, vm.pid, "the same QEMU runs the guest");
    let on_b = h.on(1, |mut c| async move {
        c.list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
    });
    assert!(on_b.is_empty(), "{on_b:?}");
    assert!(h.hosts[1].guest_pids().is_empty());
    assert!(taps_in(&h.ns[1]).is_empty(), "{:?}", taps_in(&h.ns[1]));
    assert_eq!(h.export_initiators("mig-root"), vec![INITIATOR.to_string()]);
    let events_a = h.ns[0].block_on({
        let url = h.hosts[0].url();
        move || agent_events(url, 0)
    });
    let k = kinds(&events_a, "mover");
    assert!(k.contains(&pb::EventType::Migrating), "{k:?}");
    assert_eq!(k.last(), Some(&pb::EventType::MigrationFailed), "{k:?}");

    // 2. The guest on the bridge both hosts have moves to B live.
    h.on(0, |mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            vm: "mover".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap();
        c.destroy_vm(pb::DestroyVmRequest {
            vm: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let moving_spec = spec(BRIDGE);
    let vm = h.on(0, move |mut c| async move {
        let vm = c
            .create_vm(pb::CreateVmRequest {
                spec: Some(moving_spec),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.start_vm(pb::VmRequest {
            vm: vm.uuid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    let log_a = PathBuf::from(&vm.console_log);
    let tap = vm.nics[0].tap.clone();
    count_past(&log_a, 3);

    // A disk and a NIC hot-plugged on A (behind root ports hp0 and hp1,
    // where a destination building from the spec would not put them).
    h.empty_volume("mig-data", 8 << 20);
    h.on(0, |mut c| async move {
        c.attach_disk(pb::AttachDiskRequest {
            vm: "mover".into(),
            disk: Some(pb::DiskSpec {
                source: Some(pb::disk_spec::Source::PdiskVolume("mig-data".into())),
                qos: Some(data_qos()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
    });
    wait_console(&log_a, "STRATUS-GUEST hotplug wrote vdb", HOTPLUG_SEEN);
    h.on(0, |mut c| async move {
        c.attach_nic(pb::AttachNicRequest {
            vm: "mover".into(),
            nic: Some(pb::NicSpec {
                bridge: BRIDGE.into(),
                mac: HOT_MAC.into(),
                vlan: 0,
                ips: Vec::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
    });
    wait_console(
        &log_a,
        &format!("STRATUS-GUEST hotplug nic eth1 added mac={HOT_MAC}"),
        HOTPLUG_SEEN,
    );
    let since_b = h.ns[1].block_on({
        let url = h.hosts[1].url();
        move || async move { agent_events(url, 0).await.last().map_or(0, |e| e.seq) }
    });
    let done = migrate(&h, "mover").expect("migration");
    eprintln!(
        "migrated (tls {}): total {} ms, downtime {} ms, {} MiB sent, QEMU total {} ms",
        done.tls,
        done.total_ms,
        done.downtime_ms,
        done.transferred_bytes >> 20,
        done.qemu_total_ms
    );
    assert!(done.transferred_bytes > 0, "{done:?}");
    // Both agentds have TLS certificates: the stream was TLS.
    assert!(done.tls, "{done:?}");
    assert_eq!(done.vm_uuid, vm.uuid);

    // Nothing of it on A: no record, QEMU, tap, directory or export.
    let gone = h.on(0, |mut c| async move {
        c.get_vm(pb::VmRequest {
            vm: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
    });
    assert_eq!(gone.code(), Code::NotFound);
    assert!(h.hosts[0].guest_pids().is_empty());
    assert!(!h.ns[0].link_exists(&tap));
    assert!(!log_a.exists(), "A kept {}", log_a.display());
    assert_eq!(
        h.export_initiators("mig-root"),
        vec![OTHER_INITIATOR.to_string()]
    );
    assert_eq!(
        h.export_initiators("mig-data"),
        vec![OTHER_INITIATOR.to_string()]
    );
    let k = kinds(
        &h.ns[0].block_on({
            let url = h.hosts[0].url();
            move || agent_events(url, 0)
        }),
        "mover",
    );
    assert_eq!(k.last(), Some(&pb::EventType::Migrated), "{k:?}");

    // On B it runs the same boot: the count goes on past A's last one and
    // the uptime keeps growing; B's console never saw it boot.
    let on_b = h.on(1, |mut c| async move {
        c.get_vm(pb::VmRequest {
            vm: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(on_b.state(), pb::VmState::Running);
    assert_eq!(on_b.uuid, vm.uuid);
    assert!(h.ns[1].link_exists(&on_b.nics[0].tap));
    let log_b = PathBuf::from(&on_b.console_log);
    let (n_b, up_b) = count_past(&log_b, 0);
    let first_b = counts(&log_b)[0];
    assert!(
        first_b.0 > 3 && up_b > 3.0,
        "B's guest counts from {first_b:?}: a new boot?"
    );
    let (n_later, up_later) = count_past(&log_b, n_b + 2);
    assert!(up_later > up_b && n_later > n_b);
    let text_b = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        !text_b.contains("STRATUS-GUEST init"),
        "the guest booted again on B:\n{text_b}"
    );
    let events_b = h.ns[1].block_on({
        let url = h.hosts[1].url();
        move || agent_events(url, since_b)
    });
    let k = kinds(&events_b, "mover");
    assert!(k.contains(&pb::EventType::Migrating), "{k:?}");
    assert!(k.contains(&pb::EventType::Migrated), "{k:?}");

    // The hot-plugged devices came along where they were: the disk grows
    // on B and the guest sees it through the migrated device; both detach
    // on B; the disk attached again shows A's marker.
    assert_eq!(on_b.spec.as_ref().unwrap().disks.len(), 2);
    assert_eq!(on_b.nics.len(), 2);
    // Their limits came along: in GetVm and in B's QEMU.
    assert_eq!(qos_of(&on_b, 0), root_qos());
    assert_eq!(qos_of(&on_b, 1), data_qos());
    assert_eq!(
        qemu_limits(&mut h.hosts[1], &vm.uuid, &["qos-vda", "qos-vdb"]),
        vec![limits_of(&root_qos()), limits_of(&data_qos())],
        "B's QEMU's throttle groups"
    );
    h.grow_volume("mig-data", 16 << 20);
    h.on(1, |mut c| async move {
        c.resize_disk(pb::ResizeDiskRequest {
            vm: "mover".into(),
            device: "vdb".into(),
            size_bytes: 16 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
    });
    wait_console(
        &log_b,
        "STRATUS-GUEST hotplug disk vdb size=16777216",
        HOTPLUG_SEEN,
    );
    let vm_b = h.on(1, |mut c| async move {
        c.detach_disk(pb::DetachDiskRequest {
            vm: "mover".into(),
            device: "vdb".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(vm_b.spec.unwrap().disks.len(), 1);
    wait_console(
        &log_b,
        "STRATUS-GUEST hotplug disk vdb removed",
        HOTPLUG_SEEN,
    );
    let vm_b = h.on(1, |mut c| async move {
        c.detach_nic(pb::DetachNicRequest {
            vm: "mover".into(),
            nic: HOT_MAC.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(vm_b.nics.len(), 1);
    wait_console(
        &log_b,
        "STRATUS-GUEST hotplug nic eth1 removed",
        HOTPLUG_SEEN,
    );
    h.on(1, |mut c| async move {
        c.attach_disk(pb::AttachDiskRequest {
            vm: "mover".into(),
            disk: Some(pb::DiskSpec {
                source: Some(pb::disk_spec::Source::PdiskVolume("mig-data".into())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
    });
    wait_console(
        &log_b,
        "STRATUS-GUEST hotplug marker vdb=from-a",
        HOTPLUG_SEEN,
    );
    let text_b = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        !text_b.contains("STRATUS-GUEST init"),
        "the guest booted again on B:\n{text_b}"
    );

    // New limits set on B (a read/write split instead of the total) are
    // kept over the move back to A.
    let set = h.on(1, |mut c| async move {
        c.set_disk_qos(pb::SetDiskQosRequest {
            vm: "mover".into(),
            device: "vda".into(),
            qos: Some(b_qos()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(qos_of(&set, 0), b_qos());
    let back = {
        let destination = h.url(0);
        h.on(1, move |mut c| async move {
            c.migrate_vm(pb::MigrateVmRequest {
                vm: "mover".into(),
                destination,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
        })
    }
    .expect("the move back to A");
    eprintln!(
        "migrated back: total {} ms, downtime {} ms",
        back.total_ms, back.downtime_ms
    );
    assert!(h.hosts[1].guest_pids().is_empty());
    let on_a = h.on(0, |mut c| async move {
        c.get_vm(pb::VmRequest {
            vm: "mover".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(on_a.state(), pb::VmState::Running);
    assert_eq!(qos_of(&on_a, 0), b_qos());
    assert_eq!(
        qemu_limits(&mut h.hosts[0], &vm.uuid, &["qos-vda"]),
        vec![limits_of(&b_qos())],
        "A's QEMU's throttle group after the move back"
    );
    let log_a = PathBuf::from(&on_a.console_log);
    count_past(&log_a, 0);
    let text_a = std::fs::read_to_string(&log_a).unwrap();
    assert!(
        !text_a.contains("STRATUS-GUEST init"),
        "the guest booted again on A:\n{text_a}"
    );

    // Back on A it stops normally, and then no host holds an export.
    let stopped = h.on(0, |mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            vm: "mover".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(stopped.state(), pb::VmState::Stopped);
    assert!(h.hosts[0].guest_pids().is_empty());
    assert!(h.export_initiators("mig-root").is_empty());
    assert!(h.export_initiators("mig-data").is_empty());
    let _ = &h.pool;
}

/// The root disk's limits from its creation: an IOPS total with a burst.
fn root_qos() -> pb::DiskQos {
    pb::DiskQos {
        iops_total: 200,
        iops_total_max: 400,
        iops_total_max_length: 5,
        ..Default::default()
    }
}

/// The hot-plugged disk's: bytes written per second.
fn data_qos() -> pb::DiskQos {
    pb::DiskQos {
        bps_write: 1 << 20,
        ..Default::default()
    }
}

/// The root disk's limits as set on B.
fn b_qos() -> pb::DiskQos {
    pb::DiskQos {
        iops_read: 100,
        iops_write: 50,
        ..Default::default()
    }
}
