//! Disk limits given when a disk is born, through `agentctl` and a real
//! agentd (test namespace, XFS pool, tgtd, pdiskd; a guest under TCG with
//! no OS, SeaBIOS finding nothing to boot): `vm create` with the QoS
//! options and `--qos-disk`, `vm disk attach` with them and `--group`.
//! The limits are in GetVm's spec and in QEMU itself (`qom-get` of each
//! disk's throttle group's `limits`). A bad value (QEMU's rules) is
//! refused with exit status 2 and a message naming the rule, and nothing
//! is created or attached; agentd refuses the same request sent directly
//! (`INVALID_ARGUMENT`), with nothing changed either. Run by scripts/test's
//! integration tier (needs root, QEMU and tgt).

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use stratus_proto::agent::v1 as pb;
use stratus_proto::pdisk::v1 as pdpb;
use testkit::*;

/// `agentctl --json ARGS`: exit status and the JSON printed.
fn ctl(h: &AgentHost, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let Output {
        status,
        stdout,
        stderr,
    } = h.agentd.ctl(&a);
    let out = String::from_utf8_lossy(&stdout);
    let json = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "agentctl {args:?}: not JSON ({e}): {out} / {}",
            String::from_utf8_lossy(&stderr)
        )
    });
    (status.code().unwrap_or(-1), json)
}

fn get_vm(h: &AgentHost, vm: &str) -> Result<pb::Vm, tonic::Status> {
    let vm = vm.to_owned();
    h.agent(move |mut c| async move {
        c.get_vm(pb::VmRequest {
            vm,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
    })
}

/// The pdisk volumes exported (to any host).
fn exported(h: &AgentHost) -> Vec<String> {
    h.pdisk(|mut c| async move {
        c.list_exports(pdpb::ListExportsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .exports
            .into_iter()
            .map(|e| e.volume_name)
            .collect()
    })
}

/// QEMU's `limits` of throttle groups `ids`, asked over the guest's QMP
/// socket (QEMU serves one client: agentd is killed meanwhile, then
/// restarted, and adopts the guest again).
fn qemu_limits(h: &mut AgentHost, uuid: &str, ids: &[&str]) -> Vec<Value> {
    h.agentd.kill9();
    let socket = h.agentd.state_dir.join("vms").join(uuid).join("qmp.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = rt.block_on(async {
        let (qmp, _events) = agent::qmp::Qmp::connect(&socket, Duration::from_secs(10))
            .await
            .unwrap();
        let mut out = Vec::new();
        for id in ids {
            let args = serde_json::json!({"path": format!("/objects/{id}"), "property": "limits"});
            let v = qmp.execute("qom-get", Some(args)).await;
            out.push(v.unwrap_or_else(|e| panic!("qom-get {id}: {e}")));
        }
        out
    });
    drop(rt);
    h.agentd.restart();
    out
}

#[test]
#[ignore = "needs root, QEMU and tgt: run by scripts/test"]
fn disks_created_and_attached_with_limits_have_them_in_qemu_and_getvm() {
    let mut h = AgentHost::start(512, &[]);
    for v in ["c1", "c2", "c3"] {
        h.pdisk(move |mut c| async move {
            c.create_volume(pdpb::CreateVolumeRequest {
                name: v.into(),
                size_bytes: 4 << 20,
                ..Default::default()
            })
            .await
            .unwrap()
        });
    }
    let create = ["vm", "create", "q", "--vcpus", "1", "--memory", "64M"];
    let disks = ["--disk", "pdisk:c1", "--disk", "pdisk:c2"];

    // A bad value: refused before anything is asked of agentd.
    let mut bad = create.to_vec();
    bad.extend_from_slice(&disks);
    bad.extend(["--iops-total", "100", "--iops-read", "50"]);
    let (code, j) = ctl(&h, &bad);
    assert_eq!(code, 2, "{j}");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("iops_total cannot be combined with iops_read/iops_write"),
        "{msg}"
    );
    let (code, j) = ctl(
        &h,
        &[
            &create[..],
            &disks[..],
            &["--qos-disk", "vdc", "--iops-total", "1"],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{j}");
    // agentd refuses the same, sent directly.
    let err = h.agent(|mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(pb::VmSpec {
                name: "q".into(),
                vcpus: 1,
                memory_bytes: 64 << 20,
                disks: vec![pb::DiskSpec {
                    source: Some(pb::disk_spec::Source::PdiskVolume("c1".into())),
                    qos: Some(pb::DiskQos {
                        bps_write: 1 << 20,
                        bps_write_max: 1 << 10,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("bps_write_max"), "{err}");
    assert_eq!(
        get_vm(&h, "q").unwrap_err().code(),
        tonic::Code::NotFound,
        "a refused create made the VM"
    );

    // vdb limited (with a burst), vda not.
    let (code, j) = ctl(
        &h,
        &[
            &create[..],
            &disks[..],
            &[
                "--qos-disk",
                "vdb",
                "--iops-total",
                "200",
                "--iops-total-max",
                "400",
                "--iops-total-max-length",
                "5",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["spec"]["disks"][0].get("qos"), None, "{j}");
    assert_eq!(j["spec"]["disks"][1]["qos"]["iops_total"], 200, "{j}");
    let (code, j) = ctl(&h, &["vm", "start", "q"]);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["state"], "running", "{j}");
    let uuid = j["uuid"].as_str().unwrap().to_owned();

    // A bad attach: nothing attached, nothing exported.
    let before = get_vm(&h, "q").unwrap();
    let (code, j) = ctl(
        &h,
        &["vm", "disk", "attach", "q", "pdisk:c3", "--iops-size", "4K"],
    );
    assert_eq!(code, 2, "{j}");
    let msg = j["error"]["message"].as_str().unwrap();
    assert!(msg.contains("iops_size needs an IOPS limit"), "{msg}");
    let err = h.agent(|mut c| async move {
        c.attach_disk(pb::AttachDiskRequest {
            vm: "q".into(),
            disk: Some(pb::DiskSpec {
                source: Some(pb::disk_spec::Source::PdiskVolume("c3".into())),
                qos: Some(pb::DiskQos {
                    iops_read: 10,
                    group: "Bad_Group".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err()
    });
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let after = get_vm(&h, "q").unwrap();
    assert_eq!(after.spec, before.spec, "a refused attach changed the spec");
    assert_eq!(after.disks, before.disks, "a refused attach attached");
    assert!(
        !exported(&h).contains(&"c3".to_owned()),
        "a refused attach exported c3"
    );

    // Hot-plugged with limits, in a group.
    let (code, j) = ctl(
        &h,
        &[
            "vm",
            "disk",
            "attach",
            "q",
            "pdisk:c3",
            "--bps-write",
            "1M",
            "--group",
            "g",
        ],
    );
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["spec"]["disks"][2]["qos"]["bps_write"], 1 << 20, "{j}");
    assert_eq!(j["spec"]["disks"][2]["qos"]["group"], "g", "{j}");

    // GetVm's spec.
    let vm = get_vm(&h, "q").unwrap();
    let spec = vm.spec.clone().unwrap();
    assert_eq!(spec.disks.len(), 3);
    assert_eq!(spec.disks[0].qos, None);
    let q = spec.disks[1].qos.clone().unwrap();
    assert_eq!(
        (q.iops_total, q.iops_total_max, q.iops_total_max_length),
        (200, 400, 5)
    );
    let q = spec.disks[2].qos.clone().unwrap();
    assert_eq!((q.bps_write, q.group.as_str()), (1 << 20, "g"));
    assert!(vm.disks.iter().any(|d| d.source == "pdisk:c3"));

    // QEMU's.
    let l = qemu_limits(&mut h, &uuid, &["qos-vda", "qos-vdb", "qos-group-g"]);
    for (k, v) in l[0].as_object().unwrap() {
        let default = if k.ends_with("-max-length") { 1 } else { 0 };
        assert_eq!(v, default, "vda unlimited: {}", l[0]);
    }
    assert_eq!(l[1]["iops-total"], 200, "{}", l[1]);
    assert_eq!(l[1]["iops-total-max"], 400, "{}", l[1]);
    assert_eq!(l[1]["iops-total-max-length"], 5, "{}", l[1]);
    assert_eq!(l[1]["bps-write"], 0, "{}", l[1]);
    assert_eq!(l[2]["bps-write"], 1 << 20, "{}", l[2]);
    assert_eq!(l[2]["iops-total"], 0, "{}", l[2]);
    // Adopted again after the test's kill.
    assert_eq!(get_vm(&h, "q").unwrap().state(), pb::VmState::Running);
}
