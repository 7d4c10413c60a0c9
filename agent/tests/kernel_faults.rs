//! agentd `--attach kernel` crashing inside a disk's iSCSI login (issue 13;
//! lab tier, lvm-lio only: the host's kernel has no iscsi_tcp). For each of
//! `agent::failpoints::LAB_POINTS` (after the node record, after the
//! login, after the scan), agentd-failpoints exits there during a start;
//! restarted without failpoints, its reconciliation must leave no iSCSI
//! session, node record (it holds the CHAP secret) or by-path link of the
//! volume's target, and no pdisk export, with the guest in ERROR.
//!
//!   cargo build -p agent --features failpoints --bin agentd-failpoints
//!   cargo test -p agent --test kernel_faults -- --ignored   (in the lab VM)

use std::path::Path;
use std::time::Duration;

use agent::failpoints::{CRASH_EXIT_CODE, LAB_POINTS};
use stratus_proto::agent::v1 as apb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pb;
use testkit::*;

/// pdisk's exports of `volume`: (target, portal).
async fn exports_of(stack: &Stack, volume: &str) -> Vec<(String, String)> {
    let mut c = stack.pdiskd.client().await;
    let v = c
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .exports;
    v.into_iter()
        .filter(|e| e.volume_name == volume)
        .map(|e| (e.target_iqn, e.portal))
        .collect()
}

/// Sessions to `target` (iscsiadm's view; 21: none at all).
fn sessions_to(target: &str) -> usize {
    let out = run("iscsiadm", &["-m", "session"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == target))
        .count()
}

fn node_record_exists(target: &str) -> bool {
    Path::new("/etc/iscsi/nodes").join(target).exists()
}

fn by_path_links(target: &str) -> usize {
    std::fs::read_dir("/dev/disk/by-path")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(target))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the lab VM (kernel iSCSI initiator, LIO) and agentd-failpoints: run by scripts/lab"]
async fn a_crash_at_each_login_step_leaves_no_session_record_or_export() {
    if stack_kind() != StackKind::LvmLio {
        eprintln!("skipped: agentd --attach kernel runs on the lvm-lio stack (scripts/lab)");
        return;
    }
    require_root();
    let _ = run("modprobe", &["iscsi_tcp"]);
    let stack = Stack::start();
    let volume = "kf-root";
    stack
        .pdiskd
        .client()
        .await
        .create_volume(pb::CreateVolumeRequest {
            name: volume.into(),
            size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    let host = NetNs::host();
    let mut agentd = Agentd::start_failpoints_in_with(
        stack.scratch(),
        &host,
        &stack.pdiskd.url(),
        "stbr0",
        &["--attach", "kernel"],
    );
    let mut c = VmServiceClient::new(testkit::channel(&agentd.url()).await);
    c.create_vm(apb::CreateVmRequest {
        spec: Some(apb::VmSpec {
            name: "kf1".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![apb::DiskSpec {
                source: Some(apb::disk_spec::Source::PdiskVolume(volume.into())),
                boot_index: 1,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, points) = LAB_POINTS[0];
    let t0 = std::time::Instant::now();
    for at in points {
        agentd.restart_with_failpoints(Some(&format!("{at}=return")));
        let mut c = VmServiceClient::new(testkit::channel(&agentd.url()).await);
        let r = c
            .start_vm(apb::VmRequest {
                vm: "kf1".into(),
                ..Default::default()
            })
            .await;
        assert!(r.is_err(), "{at}: the start answered {r:?}");
        let status = agentd.wait_exit(Duration::from_secs(120));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(CRASH_EXIT_CODE),
            "{at}: agentd did not exit at the crash point"
        );
        // What the crash left: the export, and a record or a session.
        let exports = exports_of(&stack, volume).await;
        assert_eq!(exports.len(), 1, "{at}: {exports:?}");
        let target = exports[0].0.clone();
        assert!(
            node_record_exists(&target),
            "{at}: no node record left to undo"
        );
        if *at != "kernel.node_created" {
            assert_eq!(sessions_to(&target), 1, "{at}");
        }

        agentd.restart_with_failpoints(None);
        let mut c = VmServiceClient::new(testkit::channel(&agentd.url()).await);
        let vm = c
            .get_vm(apb::VmRequest {
                vm: "kf1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(vm.state(), apb::VmState::Error, "{at}: {vm:?}");
        assert_eq!(sessions_to(&target), 0, "{at}: a session without its guest");
        assert!(!node_record_exists(&target), "{at}: node record left");
        wait_for("the by-path link to go", Duration::from_secs(60), || {
            (by_path_links(&target) == 0).then_some(())
        });
        let exports = exports_of(&stack, volume).await;
        assert!(exports.is_empty(), "{at}: {exports:?}");
        eprintln!(
            "{:>6.1} s  crash at {at}: undone (no session, record, link or export)",
            t0.elapsed().as_secs_f64()
        );
    }
    eprintln!("walked {} kernel login crash points", points.len());
}
