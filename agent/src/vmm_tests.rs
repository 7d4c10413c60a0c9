use super::*;
use stratus_core::types::Chap;

fn plan() -> LaunchPlan {
    LaunchPlan {
        uuid: Uuid::nil(),
        name: "web1".into(),
        vcpus: 2,
        memory_mib: 256,
        accel: Accel::Tcg,
        disks: vec![
            PlannedDisk {
                qos: None,
                device: "vda".into(),
                backend: DiskBackend::Iscsi {
                    portal: "127.0.0.1:3260".into(),
                    target: "iqn.2026-11.io.stratus.pdisk:x".into(),
                    lun: 1,
                    initiator: "iqn.2026-11.io.stratus:host".into(),
                    chap: Some(Chap::new("vm1", "s3cr3t-s3cr3t-x").unwrap()),
                },
                read_only: false,
                boot_index: 1,
            },
            PlannedDisk {
                qos: None,
                device: "vdb".into(),
                backend: DiskBackend::Overlay {
                    path: "/images/a,b.qcow2".into(),
                    base: "/cache/ab.img".into(),
                    base_format: ImageFormat::Qcow2,
                },
                read_only: true,
                boot_index: 0,
            },
        ],
        nics: vec![PlannedNic {
            tap: "st00000000n0".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
        }],
        kernel: None,
        dir: "/s/vm".into(),
        console_log_max: 1 << 20,
        hotplug_ports: 2,
        incoming: false,
        layout: None,
        disk_io: DiskIo::measured_default(true),
        confinement: Some(Confinement {
            user: crate::confine::QemuUser {
                uid: 64007,
                gid: 64007,
            },
            sandbox: true,
        }),
    }
}

/// The command line with numbered descriptors, and what each stands for.
fn argv_of(p: &LaunchPlan) -> (Vec<String>, std::collections::BTreeMap<String, String>) {
    let mut fds = NumberedFds::default();
    let a = p.argv(&mut fds).unwrap();
    let given = fds
        .given
        .into_iter()
        .map(|(n, what)| (n.to_string(), what))
        .collect();
    (a, given)
}

#[test]
fn command_line_names_only_descriptors_agentd_hands_over() {
    let (a, fds) = argv_of(&plan());
    let line = a.join(" ");
    assert!(line.contains("-machine q35,accel=tcg"));
    // The secret is a memfd read through /proc, never a file or argv.
    assert!(!line.contains("s3cr3t"), "{line}");
    assert!(line.contains("-object secret,id=chap-vda,file=/proc/self/fd/102,format=raw"));
    assert_eq!(fds["102"], "secret:15");
    assert!(line.contains("\"password-secret\":\"chap-vda\""));
    assert!(line.contains(
        "virtio-blk-pci,drive=vda,id=vda-dev,num-queues=2,iothread=iothread-vda,bootindex=1"
    ));
    assert!(line.contains("virtio-blk-pci,drive=vdb,id=vdb-dev,num-queues=2,iothread=iothread-vdb"));
    // Native AIO for the overlay's files; these test paths do not exist,
    // so O_DIRECT cannot be checked and native becomes the thread pool.
    assert!(line.contains("\"aio\":\"threads\""), "{line}");
    // The console's listener (agentd its client), QMP and tap by descriptor.
    assert!(line
        .contains("-chardev socket,id=serial0,fd=100,server=on,wait=on -serial chardev:serial0"));
    assert_eq!(fds["100"], "console:/s/vm/console.sock");
    assert!(line.contains(
        "-chardev socket,id=qmp,fd=101,server=on,wait=off -mon chardev=qmp,mode=control"
    ));
    assert_eq!(fds["101"], "listener:/s/vm/qmp.sock");
    assert!(line.contains("-netdev tap,id=net0,fd=105"), "{line}");
    assert_eq!(fds["105"], "tap:st00000000n0");
    assert!(line.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"));
    // QEMU neither forks, drops privileges itself, nor writes a pid file.
    for own in [
        "-daemonize",
        "-runas",
        "-run-with",
        "-pidfile",
        "-chroot",
        "ifname=",
    ] {
        assert!(!line.contains(own), "{own} in {line}");
    }
    assert!(line.ends_with(
        "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ));
    // The read-only overlay and its base are opened read-only, by agentd.
    assert_eq!(fds["103"], "file:/cache/ab.img:ro");
    assert_eq!(fds["104"], "file:/images/a,b.qcow2:ro");
    let bd = a.iter().find(|x| x.contains("\"vdb\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(bd).unwrap();
    assert_eq!(v["file"]["filename"], "/dev/fdset/104");
    assert_eq!(v["read-only"], true);
    // Unconfined: no sandbox.
    let mut p = plan();
    p.confinement = None;
    assert!(!argv_of(&p).0.join(" ").contains("-sandbox"));
}

#[test]
fn empty_hotplug_root_ports_come_after_every_cold_plugged_device() {
    let (a, _) = argv_of(&plan());
    let devices: Vec<&str> = a
        .windows(2)
        .filter(|w| w[0] == "-device")
        .map(|w| w[1].as_str())
        .collect();
    // Cold-plugged devices first, on the root bus in the order they had
    // before ports existed (so their addresses do not move), then the ports.
    assert_eq!(
        devices,
        [
            "pvpanic",
            "virtio-blk-pci,drive=vda,id=vda-dev,num-queues=2,iothread=iothread-vda,bootindex=1",
            "virtio-blk-pci,drive=vdb,id=vdb-dev,num-queues=2,iothread=iothread-vdb",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=net0-dev",
            "pcie-root-port,id=hp0,bus=pcie.0,chassis=1,port=0x10",
            "pcie-root-port,id=hp1,bus=pcie.0,chassis=2,port=0x11",
        ]
    );
    let mut p = plan();
    p.hotplug_ports = 0;
    assert!(!argv_of(&p).0.join(" ").contains("pcie-root-port"));
}

#[test]
fn a_migrations_destination_places_devices_where_the_source_has_them() {
    use crate::layout::{DeviceLayout, Placement};
    let at = |port: Option<&str>, devfn| Placement {
        port: port.map(str::to_owned),
        devfn,
    };
    let mut p = plan();
    p.incoming = true;
    // vdb and the NIC were hot-plugged on the source (hp1, hp0); it has
    // three ports whatever this host's --hotplug-ports says.
    p.layout = Some(DeviceLayout {
        disks: vec![at(None, 0x08), at(Some("hp1"), 0)],
        seed: None,
        nics: vec![at(Some("hp0"), 0)],
        ports: vec![at(None, 0x10), at(None, 0x18), at(None, 0x20)],
    });
    let (a, _) = argv_of(&p);
    let devices: Vec<&str> = a
        .windows(2)
        .filter(|w| w[0] == "-device")
        .map(|w| w[1].as_str())
        .collect();
    assert_eq!(
        devices,
        [
            "pvpanic",
            "virtio-blk-pci,drive=vda,id=vda-dev,num-queues=2,iothread=iothread-vda,bootindex=1,addr=0x1.0",
            "pcie-root-port,id=hp0,bus=pcie.0,chassis=1,port=0x10,addr=0x2.0",
            "pcie-root-port,id=hp1,bus=pcie.0,chassis=2,port=0x11,addr=0x3.0",
            "pcie-root-port,id=hp2,bus=pcie.0,chassis=3,port=0x12,addr=0x4.0",
            "virtio-blk-pci,drive=vdb,id=vdb-dev,num-queues=2,iothread=iothread-vdb,bus=hp1,addr=0x0.0",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,id=net0-dev,bus=hp0,addr=0x0.0",
        ]
    );
}

#[test]
fn every_disk_has_an_explicit_format_and_overlays_an_explicit_backing() {
    let mut p = plan();
    p.disks.push(PlannedDisk {
        qos: None,
        device: "vdc".into(),
        backend: DiskBackend::RawFile {
            path: "/srv/disk.raw".into(),
        },
        read_only: false,
        boot_index: 0,
    });
    for base_format in [ImageFormat::Qcow2, ImageFormat::Raw] {
        p.disks[1].backend = DiskBackend::Overlay {
            path: "/s/vm/vdb.qcow2".into(),
            base: "/cache/ab.img".into(),
            base_format,
        };
        let (a, fds) = argv_of(&p);
        let file = |v: &serde_json::Value| {
            let set = v["filename"].as_str().unwrap();
            fds[set.strip_prefix("/dev/fdset/").unwrap()].clone()
        };
        let nodes: Vec<serde_json::Value> = a
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(nodes.len(), 3);
        let raw = &nodes[2];
        assert_eq!(raw["driver"], "raw", "{raw}");
        assert_eq!(file(&raw["file"]), "file:/srv/disk.raw:rw");
        let ov = &nodes[1];
        assert_eq!(ov["driver"], "qcow2", "{ov}");
        assert_eq!(file(&ov["file"]), "file:/s/vm/vdb.qcow2:ro");
        let base = &ov["backing"];
        assert_eq!(base["driver"], base_format.as_str(), "{ov}");
        assert_eq!(base["node-name"], "vdb-base");
        assert_eq!(base["read-only"], true);
        assert_eq!(file(&base["file"]), "file:/cache/ab.img:ro");
        // A qcow2 base opens nothing its own header names.
        if base_format == ImageFormat::Qcow2 {
            assert!(base["backing"].is_null() && base.get("backing").is_some());
        } else {
            assert!(base.get("backing").is_none(), "raw takes no backing");
        }
        // No driver is left for QEMU to guess.
        for v in &nodes {
            assert!(v["driver"].is_string(), "{v}");
        }
    }
}

fn info_runner(json: &'static str) -> stratus_core::runner::FakeRunner {
    stratus_core::runner::FakeRunner::with(move |_| Ok(stratus_core::runner::Output::ok(json)))
}

#[tokio::test]
async fn an_overlay_must_name_the_base_agentd_gave_it() {
    let base = Path::new("/cache/ab.img");
    let ok = r#"{"format":"qcow2","backing-filename":"/cache/ab.img",
        "backing-filename-format":"raw","format-specific":{"type":"qcow2","data":{}}}"#;
    let r = info_runner(ok);
    check_overlay(&r, Path::new("/s/vda.qcow2"), base, ImageFormat::Raw)
        .await
        .unwrap();
    assert_eq!(
        r.calls()[0].join(" "),
        "qemu-img info --output=json -f qcow2 /s/vda.qcow2"
    );
    let err = check_overlay(&r, Path::new("/s/vda.qcow2"), base, ImageFormat::Qcow2)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("backing format"), "{err}");
    for bad in [
        r#"{"format":"qcow2","backing-filename":"/etc/shadow","backing-filename-format":"raw"}"#,
        r#"{"format":"qcow2","backing-filename-format":"raw"}"#,
        r#"{"format":"qcow2","backing-filename":"/cache/ab.img","backing-filename-format":"raw",
            "format-specific":{"type":"qcow2","data":{"data-file":"/etc/shadow"}}}"#,
    ] {
        let r = info_runner(bad);
        let err = check_overlay(&r, Path::new("/s/vda.qcow2"), base, ImageFormat::Raw)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not the one agentd made"), "{err}");
    }
}

#[test]
fn kernel_attached_disks_are_raw_host_devices_with_direct_io() {
    let mut p = plan();
    p.disks[0].backend = DiskBackend::HostDevice {
        path: "/dev/sdc".into(),
    };
    for (io_uring, aio) in [(true, "io_uring"), (false, "native")] {
        p.disk_io = DiskIo::measured_default(io_uring);
        let (a, _) = argv_of(&p);
        assert!(!a.iter().any(|x| x.contains("secret")), "{a:?}");
        let bd = a.iter().find(|x| x.contains("/dev/sdc")).unwrap();
        let v: serde_json::Value = serde_json::from_str(bd).unwrap();
        assert_eq!(v["driver"], "raw");
        assert_eq!(v["node-name"], "vda");
        assert_eq!(v["read-only"], false);
        assert_eq!(v["file"]["driver"], "host_device");
        assert_eq!(v["file"]["filename"], "/dev/sdc");
        assert_eq!(v["file"]["aio"], aio);
        assert_eq!(v["file"]["cache"]["direct"], true);
    }
}

#[test]
fn local_pdisk_volumes_are_handed_over_as_descriptors_with_direct_io() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol-1");
    std::fs::write(&vol, vec![0u8; 4096]).unwrap();
    let mut p = plan();
    for (block_device, driver) in [(false, "file"), (true, "host_device")] {
        p.disks[0].backend = DiskBackend::Local {
            path: vol.clone(),
            block_device,
        };
        for io_uring in [true, false] {
            p.disk_io = DiskIo::measured_default(io_uring);
            let aio = match block_device {
                true => p.disk_io.device_aio.name(),
                false => p
                    .disk_io
                    .file_aio
                    .with_direct(supports_direct_io(&vol))
                    .name(),
            };
            let (a, given) = argv_of(&p);
            // QEMU is given the descriptor agentd opened, never the path.
            assert!(!a.iter().any(|x| x.contains("vol-1")), "{a:?}");
            let bd = a.iter().find(|x| x.contains("\"vda\"")).unwrap();
            let v: serde_json::Value = serde_json::from_str(bd).unwrap();
            assert_eq!(v["driver"], "raw");
            assert_eq!(v["file"]["driver"], driver);
            assert_eq!(v["file"]["aio"], aio);
            assert_eq!(v["file"]["cache"]["direct"], true);
            let set = v["file"]["filename"].as_str().unwrap();
            let n = set.strip_prefix("/dev/fdset/").expect(set);
            assert_eq!(given[n], format!("file:{}:rw", vol.display()));
        }
    }
}

#[test]
fn accel_choice_is_explained() {
    let (a, why) = choose_accel(AccelChoice::Tcg);
    assert_eq!(a, Accel::Tcg);
    assert!(!why.is_empty());
    let (_, why) = choose_accel(AccelChoice::Auto);
    assert!(!why.is_empty());
}

#[test]
fn our_own_process_is_not_a_guest() {
    assert!(!is_our_qemu(std::process::id(), Uuid::new_v4()));
    assert!(!is_our_qemu(u32::MAX - 1, Uuid::new_v4()));
}

#[test]
fn an_rbd_disk_is_qemus_rbd_driver_with_key_and_conf_from_memfds() {
    use crate::rbd::{CephClient, RbdDisk};
    const KEY: &str = "AQB37hFrNEJkMhAAqUs+QZS9zmTGOfQGD4T7xg==";
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("k");
    std::fs::write(&keyring, format!("[client.compute]\nkey = {KEY}\n")).unwrap();
    let disk = RbdDisk::from_attachment(
        &stratus_proto::pdisk::v1::RbdAttachment {
            monitors: vec!["10.0.0.7:6789".into(), "10.0.0.8:6789".into()],
            pool: "pdisk".into(),
            image: "pd-vol-x".into(),
            user: "compute".into(),
            secret_ref: "keyring:client.compute".into(),
            cluster_fsid: String::new(),
        },
        &CephClient {
            keyring: Some(keyring),
            ..Default::default()
        },
    )
    .unwrap();
    let mut p = plan();
    p.disks = vec![PlannedDisk {
        qos: None,
        device: "vda".into(),
        backend: DiskBackend::Rbd(disk),
        read_only: false,
        boot_index: 1,
    }];
    let (a, fds) = argv_of(&p);
    let line = a.join(" ");
    assert!(!line.contains(KEY), "{line}");
    // Console 100, QMP 101, then the key and the (empty) conf.
    assert!(
        line.contains("-object secret,id=ceph-vda,file=/proc/self/fd/102,format=base64"),
        "{line}"
    );
    assert_eq!(fds["102"], format!("secret:{}", KEY.len()));
    assert_eq!(fds["103"], "secret:0");
    let i = a.iter().position(|x| x == "-blockdev").unwrap();
    let node: serde_json::Value = serde_json::from_str(&a[i + 1]).unwrap();
    assert_eq!(
        node["file"],
        serde_json::json!({
            "driver": "rbd",
            "pool": "pdisk",
            "image": "pd-vol-x",
            "user": "compute",
            "key-secret": "ceph-vda",
            "conf": "/proc/self/fd/103",
            "server": [
                {"host": "10.0.0.7", "port": "6789"},
                {"host": "10.0.0.8", "port": "6789"},
            ],
            "cache": {"direct": false, "no-flush": false},
        })
    );
    assert_eq!(node["driver"], "raw");
    assert!(line.contains(
        "virtio-blk-pci,drive=vda,id=vda-dev,num-queues=2,iothread=iothread-vda,bootindex=1"
    ));
}

#[test]
fn every_disk_gets_its_iothread_and_a_queue_per_vcpu() {
    let mut p = plan();
    p.vcpus = 3;
    let (a, _) = argv_of(&p);
    let pairs: Vec<(&str, &str)> = a
        .windows(2)
        .filter(|w| w[0] == "-object" || w[0] == "-device")
        .map(|w| (w[0].as_str(), w[1].as_str()))
        .collect();
    for node in ["vda", "vdb"] {
        let object = format!("iothread,id=iothread-{node}");
        let o = pairs.iter().position(|p| p.1 == object).expect(&object);
        let d = pairs
            .iter()
            .position(|p| p.1.starts_with(&format!("virtio-blk-pci,drive={node},")))
            .unwrap();
        // The iothread exists before the device that names it.
        assert!(o < d, "{pairs:?}");
        assert!(pairs[d]
            .1
            .contains(&format!(",num-queues=3,iothread=iothread-{node}")));
    }
    // Without iothreads: queues still per vCPU, no iothread anywhere.
    p.disk_io.iothreads = false;
    let line = argv_of(&p).0.join(" ");
    assert!(!line.contains("iothread"), "{line}");
    assert!(line.contains("virtio-blk-pci,drive=vda,id=vda-dev,num-queues=3,bootindex=1"));
}

#[test]
fn aio_is_chosen_per_kind_of_disk() {
    use crate::disk_io::Aio;
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol-1");
    std::fs::write(&vol, vec![0u8; 4096]).unwrap();
    let mut p = plan();
    p.disk_io = DiskIo {
        file_aio: Aio::Threads,
        device_aio: Aio::Native,
        iothreads: true,
    };
    let aio_of = |p: &LaunchPlan| {
        let (a, _) = argv_of(p);
        let bd = a.iter().find(|x| x.contains("\"vda\"")).unwrap().clone();
        let v: serde_json::Value = serde_json::from_str(&bd).unwrap();
        v["file"]["aio"].as_str().unwrap().to_string()
    };
    for (backend, aio) in [
        (
            DiskBackend::Local {
                path: vol.clone(),
                block_device: false,
            },
            "threads",
        ),
        (
            DiskBackend::Local {
                path: vol.clone(),
                block_device: true,
            },
            "native",
        ),
        (DiskBackend::RawFile { path: vol.clone() }, "threads"),
        (
            DiskBackend::HostDevice {
                path: "/dev/sdc".into(),
            },
            "native",
        ),
    ] {
        p.disks[0].backend = backend.clone();
        assert_eq!(aio_of(&p), aio, "{backend:?}");
    }
    // Native AIO needs O_DIRECT: a file without it gets the thread pool.
    p.disk_io.file_aio = Aio::Native;
    p.disks[0].backend = DiskBackend::RawFile { path: vol.clone() };
    let direct = supports_direct_io(&vol);
    assert_eq!(aio_of(&p), if direct { "native" } else { "threads" });
}

/// Disks with QoS: a throttle-group object per group, once, before the
/// disks; each disk's top node a `throttle` node named like the disk
/// (what the device and QMP name), over its format node `<disk>-fmt`.
#[test]
fn disks_with_qos_sit_under_a_throttle_node_in_their_group() {
    use crate::qos::{DiskQos, Limits, PlannedQos};
    let mut p = plan();
    let mut shared = DiskQos {
        limits: Limits::default(),
        group: Some("db".into()),
    };
    shared.limits.iops_total.avg = 200;
    p.disks[0].qos = Some(PlannedQos::of(&shared, "vda"));
    p.disks[1].qos = Some(PlannedQos::of(&shared, "vdb"));
    let mut own = p.disks[1].clone();
    own.device = "vdc".into();
    own.qos = Some(PlannedQos::of(&DiskQos::default(), "vdc"));
    p.disks.push(own);
    let (a, _) = argv_of(&p);
    let objects: Vec<serde_json::Value> = a
        .windows(2)
        .filter(|w| w[0] == "-object" && w[1].starts_with('{'))
        .map(|w| serde_json::from_str(&w[1]).unwrap())
        .collect();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!(objects[0]["qom-type"], "throttle-group");
    assert_eq!(objects[0]["id"], "qos-group-db");
    assert_eq!(objects[0]["limits"]["iops-total"], 200);
    assert_eq!(objects[1]["id"], "qos-vdc");
    assert_eq!(objects[1]["limits"]["iops-total"], 0);
    let nodes: Vec<serde_json::Value> = a
        .windows(2)
        .filter(|w| w[0] == "-blockdev")
        .map(|w| serde_json::from_str(&w[1]).unwrap())
        .collect();
    let group_of = |i: usize| nodes[i]["throttle-group"].as_str().unwrap().to_owned();
    assert_eq!(nodes[0]["driver"], "throttle");
    assert_eq!(nodes[0]["node-name"], "vda");
    assert_eq!(group_of(0), "qos-group-db");
    assert_eq!(nodes[0]["file"]["driver"], "iscsi");
    assert_eq!(nodes[0]["file"]["node-name"], "vda-fmt");
    assert_eq!(nodes[1]["file"]["driver"], "qcow2");
    assert_eq!(group_of(1), "qos-group-db");
    assert_eq!(group_of(2), "qos-vdc");
    // The groups come before the nodes that name them.
    let pos = |s: &str| a.iter().position(|x| x.contains(s)).unwrap();
    assert!(pos("\"id\":\"qos-group-db\"") < pos("\"node-name\":\"vda\""));
    assert!(pos("\"id\":\"qos-vdc\"") < pos("\"node-name\":\"vdc\""));
    let line = a.join(" ");
    assert!(line.contains("virtio-blk-pci,drive=vda,id=vda-dev"));
}

#[test]
fn a_read_only_disk_is_read_only_at_its_throttle_node_too() {
    // QEMU refuses a virtio-blk whose top node is writable above a
    // read-only format node (found by the e2e same-host case).
    let mut p = plan();
    for d in &mut p.disks {
        d.qos = Some(crate::qos::PlannedQos::of(
            &crate::qos::DiskQos::default(),
            &d.device,
        ));
    }
    let (a, _) = argv_of(&p);
    for (node, ro) in [("vda", false), ("vdb", true)] {
        let n = format!("\"node-name\":\"{node}\"");
        let bd = a.iter().find(|x| x.contains(&n)).unwrap();
        let v: serde_json::Value = serde_json::from_str(bd).unwrap();
        assert_eq!(v["driver"], "throttle", "{v}");
        assert_eq!(v["read-only"], ro, "{v}");
        assert_eq!(v["file"]["read-only"], ro, "{v}");
    }
}
