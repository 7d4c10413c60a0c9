//! Hot-plug end to end with the test guest (under TCG, direct kernel boot,
//! on a bridge in a namespace of the test's own): a pdisk volume attached
//! to a running guest shows up in it as a new virtio disk, which it writes
//! a marker on; detached, it leaves the guest; attached to a second guest,
//! that guest reads the first one's marker. A NIC hot-plugged with a MAC
//! shows up with it, and the guest pings the bridge's address through it. Run by
//! scripts/test's e2e tier (needs root, QEMU, tgt and scripts/guest-image).

use std::path::Path;
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use testkit::*;

const BOOT: Duration = Duration::from_secs(180);
const SEEN: Duration = Duration::from_secs(60);

/// A running guest with no disk and no NIC, booted from the test kernel
/// with `args` on its command line; its console log.
fn guest(h: &AgentHost, name: &str, args: &str) -> String {
    let g = guest_dir();
    let spec = pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: format!("console=ttyS0 {args}"),
        }),
        ..Default::default()
    };
    let vm = h.launch("", spec);
    wait_console(Path::new(&vm.console_log), "STRATUS-GUEST ready", BOOT);
    vm.console_log
}

/// The names of QEMU `pid`'s threads (debug-threads=on names them).
fn qemu_threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

fn attach(h: &AgentHost, vm: &str, volume: &str) -> pb::Vm {
    let (vm, volume) = (vm.to_owned(), volume.to_owned());
    h.agent(move |mut c| async move {
        c.attach_disk(pb::AttachDiskRequest {
            vm,
            disk: Some(pb::DiskSpec {
                source: Some(pb::disk_spec::Source::PdiskVolume(volume)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    })
}

/// The device guest b's pdisk disk has.
fn vm_b_disk(h: &AgentHost) -> String {
    h.agent(|mut c| async move {
        c.get_vm(pb::VmRequest {
            vm: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .disks
        .into_iter()
        .find(|d| d.source == "pdisk:shared")
        .unwrap()
        .device
    })
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn a_volume_moves_between_running_guests_and_a_hot_plugged_nic_answers() {
    let h = AgentHost::start(512, &[]);
    h.ns.ip(&["addr", "add", "10.232.0.1/24", "dev", BRIDGE]);
    h.pdisk(|mut c| async move {
        c.create_volume(pdpb::CreateVolumeRequest {
            name: "shared".into(),
            size_bytes: 8 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
    });

    // Guest a: the volume comes, the guest writes its marker, it goes.
    let log_a = guest(&h, "a", "stratus.hotplug_marker=from-a");
    let vm = attach(&h, "a", "shared");
    let pid_a = vm.pid;
    assert_eq!(vm.spec.unwrap().disks.len(), 1);
    let disk = vm
        .disks
        .iter()
        .find(|d| d.source == "pdisk:shared")
        .unwrap();
    let device = disk.device.clone();
    let log = wait_console(Path::new(&log_a), "STRATUS-GUEST hotplug wrote", SEEN);
    assert!(
        log.contains("STRATUS-GUEST hotplug disk vda added size=8388608"),
        "{log}"
    );
    // The hot-plugged disk has its own iothread, as cold-plugged ones.
    assert!(
        qemu_threads(pid_a).iter().any(|t| t == "IO iothread-vda"),
        "{:?}",
        qemu_threads(pid_a)
    );
    let vm = h.agent(move |mut c| async move {
        c.detach_disk(pb::DetachDiskRequest {
            vm: "a".into(),
            device,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert!(vm.spec.unwrap().disks.is_empty());
    assert!(vm.disks.is_empty());
    // Unplugged: its iothread went with it.
    assert!(
        !qemu_threads(pid_a)
            .iter()
            .any(|t| t.starts_with("IO iothread")),
        "{:?}",
        qemu_threads(pid_a)
    );
    wait_console(
        Path::new(&log_a),
        "STRATUS-GUEST hotplug disk vda removed",
        SEEN,
    );

    // Guest b reads a's marker from the same volume.
    let log_b = guest(
        &h,
        "b",
        "stratus.hotplug_ip=10.232.0.3/24 stratus.hotplug_peer=10.232.0.1",
    );
    attach(&h, "b", "shared");
    let log = wait_console(Path::new(&log_b), "STRATUS-GUEST hotplug marker", SEEN);
    assert!(
        log.contains("STRATUS-GUEST hotplug marker vda=from-a"),
        "{log}"
    );

    // Grown online: the storage admin grows the volume (pdiskd lets no
    // agent resize), ResizeDisk tells QEMU's iSCSI initiator; the guest
    // sees it.
    h.pdisk(|mut c| async move {
        c.resize_volume(pdpb::ResizeVolumeRequest {
            volume: "shared".into(),
            size_bytes: 16 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
    });
    let device = vm_b_disk(&h);
    h.agent(move |mut c| async move {
        c.resize_disk(pb::ResizeDiskRequest {
            vm: "b".into(),
            device,
            size_bytes: 16 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
    });
    wait_console(
        Path::new(&log_b),
        "STRATUS-GUEST hotplug disk vda size=16777216",
        SEEN,
    );

    // A NIC with its MAC, behind its anti-spoofing rules, answers a ping.
    let vm = h.agent(|mut c| async move {
        c.attach_nic(pb::AttachNicRequest {
            vm: "b".into(),
            nic: Some(pb::NicSpec {
                bridge: BRIDGE.into(),
                mac: "52:54:00:00:00:42".into(),
                vlan: 0,
                ips: vec!["10.232.0.3".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(vm.nics.len(), 1);
    let log = wait_console(Path::new(&log_b), "STRATUS-GUEST hotplug nic eth0 up", SEEN);
    assert!(
        log.contains("STRATUS-GUEST hotplug nic eth0 added mac=52:54:00:00:00:42"),
        "{log}"
    );
    let log = wait_console(
        Path::new(&log_b),
        "STRATUS-GUEST hotplug nic eth0 ping 10.232.0.1",
        SEEN,
    );
    assert!(
        log.contains("STRATUS-GUEST hotplug nic eth0 ping 10.232.0.1 ok"),
        "{log}"
    );
    let tap = vm.nics[0].tap.clone();
    let vm = h.agent(|mut c| async move {
        c.detach_nic(pb::DetachNicRequest {
            vm: "b".into(),
            nic: "52:54:00:00:00:42".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert!(vm.nics.is_empty());
    assert!(!h.ns.link_exists(&tap), "tap {tap} left");
    wait_console(
        Path::new(&log_b),
        "STRATUS-GUEST hotplug nic eth0 removed",
        SEEN,
    );
}

/// Disk QoS through a real agentd: a guest started with limits has them
/// in its QEMU's throttle group (`qom-get` of `/objects/qos-vda`'s
/// `limits`) above a `throttle` node; a disk hot-plugged with limits
/// gets its own group; SetDiskQos changes a running guest's limits live.
/// QEMU serves one QMP client, so agentd is killed to ask it, and
/// restarted (adoption gives QEMU the stored limits again).
#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn disk_limits_reach_qemu_at_start_at_hot_plug_and_change_live() {
    let mut h = AgentHost::start(512, &[]);
    for v in ["q1", "q2"] {
        h.pdisk(move |mut c| async move {
            c.create_volume(pdpb::CreateVolumeRequest {
                name: v.into(),
                size_bytes: 8 << 20,
                ..Default::default()
            })
            .await
            .unwrap()
        });
    }
    let g = guest_dir();
    let spec = pb::VmSpec {
        name: "q".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: "console=ttyS0".into(),
        }),
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume("q1".into())),
            qos: Some(pb::DiskQos {
                iops_total: 200,
                iops_total_max: 400,
                iops_total_max_length: 5,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let vm = h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            vm: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    let uuid = vm.uuid.clone();
    let vm = h.agent(|mut c| async move {
        c.attach_disk(pb::AttachDiskRequest {
            vm: "q".into(),
            disk: Some(pb::DiskSpec {
                source: Some(pb::disk_spec::Source::PdiskVolume("q2".into())),
                qos: Some(pb::DiskQos {
                    bps_write: 1 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    let hot = vm
        .disks
        .iter()
        .find(|d| d.source == "pdisk:q2")
        .unwrap()
        .device
        .clone();
    // Live: a read/write split instead of the total.
    let vm = h.agent(|mut c| async move {
        c.set_disk_qos(pb::SetDiskQosRequest {
            vm: "q".into(),
            device: "vda".into(),
            qos: Some(pb::DiskQos {
                iops_read: 100,
                iops_write: 50,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(
        vm.spec.unwrap().disks[0].qos.clone().unwrap().iops_read,
        100
    );
    // A total with a split is refused, and nothing changes.
    let err = h.agent(|mut c| async move {
        c.set_disk_qos(pb::SetDiskQosRequest {
            vm: "q".into(),
            device: "vda".into(),
            qos: Some(pb::DiskQos {
                iops_total: 10,
                iops_read: 10,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    h.agentd.kill9();
    let socket = h.agentd.state_dir.join("vms").join(&uuid).join("qmp.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (limits, hot_limits, nodes) = rt.block_on(async {
        let (qmp, _events) = agent::qmp::Qmp::connect(&socket, Duration::from_secs(10))
            .await
            .unwrap();
        let get = |id: String| {
            let qmp = &qmp;
            async move {
                qmp.execute(
                    "qom-get",
                    Some(
                        serde_json::json!({"path": format!("/objects/{id}"), "property": "limits"}),
                    ),
                )
                .await
                .unwrap()
            }
        };
        let limits = get("qos-vda".into()).await;
        let hot_limits = get(format!("qos-{hot}")).await;
        let nodes = qmp.execute("query-named-block-nodes", None).await.unwrap();
        (limits, hot_limits, nodes)
    });
    drop(rt);
    assert_eq!(limits["iops-read"], 100, "{limits}");
    assert_eq!(limits["iops-write"], 50, "{limits}");
    assert_eq!(limits["iops-total"], 0, "{limits}");
    assert_eq!(limits["iops-total-max"], 0, "{limits}");
    assert_eq!(hot_limits["bps-write"], 1 << 20, "{hot_limits}");
    let drv = |name: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .map(|n| n["drv"].as_str().unwrap().to_owned())
    };
    assert_eq!(drv("vda").as_deref(), Some("throttle"), "{nodes}");
    // Its format node below: QEMU's iSCSI initiator, or raw over a
    // same-host volume.
    assert!(
        matches!(drv("vda-fmt").as_deref(), Some("iscsi" | "raw")),
        "{nodes}"
    );
    assert_eq!(drv(&hot).as_deref(), Some("throttle"), "{nodes}");
    // Adopted again, and still managed.
    h.agentd.restart();
    let vm = h.agent(|mut c| async move {
        c.get_vm(pb::VmRequest {
            vm: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(vm.state, pb::VmState::Running as i32);
}
