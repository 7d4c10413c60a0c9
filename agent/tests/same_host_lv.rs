//! A same-host attachment of a thin LV (lab tier, issue 16): agentd and
//! pdiskd (lvm backend, LIO exporter) on one host with one host id, as on a
//! hyperconverged host. The guest's pdisk volume reaches QEMU as the LV's
//! block device, opened by agentd and passed as a descriptor (QEMU's
//! `host_device` driver, O_DIRECT), with no LIO target; a snapshot of the
//! attached volume works, and destroying the guest drops the export.
//!
//! Runs in the lab VM (`scripts/lab topology1`, `STRATUS_STACK=lvm-lio`);
//! elsewhere it says it is skipped. The guest has no OS (an empty volume:
//! SeaBIOS retries its boot while QEMU runs), so nothing but the disk is
//! exercised. The file-backend twin, with a booted guest, is e2e's
//! `on_the_storage_host_a_guest_opens_its_pdisk_volumes_directly_with_no_target`.
//!
//!   cargo test -p agent --test same_host_lv -- --ignored

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use stratus_proto::agent::v1 as apb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pb;
use testkit::*;

const HOST_ID: &str = "lab-same-host";
const VOLUME: &str = "same-lv";

/// The descriptor of QEMU `pid` open on the device `dev` (canonical path),
/// with its open flags (octal, from fdinfo).
fn qemu_fd_flags(pid: u32, dev: &Path) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == dev))
        .and_then(|e| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
}

/// The `-blockdev` JSON of node `node` on QEMU `pid`'s command line:
/// its format node, below the throttle node every disk has (issue 15's
/// QoS).
fn qemu_blockdev(pid: u32, node: &str) -> serde_json::Value {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let arg = cmdline
        .split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .find(|a| a.contains(&format!("\"node-name\":\"{node}\"")))
        .unwrap_or_else(|| panic!("no blockdev {node} on QEMU {pid}'s command line"));
    let v: serde_json::Value = serde_json::from_str(&arg).unwrap();
    match v["driver"].as_str() {
        Some("throttle") => v["file"].clone(),
        _ => v,
    }
}

async fn exports(stack: &Stack) -> Vec<pb::Export> {
    let mut c = stack.pdiskd.client().await;
    let mut v = c
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .exports;
    v.retain(|e| e.volume_name == VOLUME);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, LVM, LIO and QEMU: the lab VM"]
async fn on_the_storage_host_a_guest_gets_its_thin_lv_by_descriptor_with_no_target() {
    if stack_kind() != StackKind::LvmLio {
        eprintln!("skipped: a same-host LV attachment needs the lvm-lio stack (scripts/lab)");
        return;
    }
    require_root();
    assert!(
        run("sh", &["-c", "command -v qemu-system-x86_64"])
            .status
            .success(),
        "qemu-system-x86_64 is missing (the lab image has it)"
    );
    let stack = Stack::start_with(&["--host-id", HOST_ID]);
    stack
        .pdiskd
        .client()
        .await
        .create_volume(pb::CreateVolumeRequest {
            name: VOLUME.into(),
            size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    let agentd = Agentd::start_in_with(
        stack.scratch(),
        &NetNs::host(),
        &stack.pdiskd.url(),
        "stbr0",
        &["--host-id", HOST_ID],
    );
    let mut c = VmServiceClient::new(channel(&agentd.url()).await);
    c.create_vm(apb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(apb::VmSpec {
            name: "same-lv1".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![apb::DiskSpec {
                source: Some(apb::disk_spec::Source::PdiskVolume(VOLUME.into())),
                boot_index: 1,
                ..Default::default()
            }],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let vm = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "same-lv1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.state(), apb::VmState::Running, "{vm:?}");

    // pdisk's record says local, with the LV's device; agentd shows it.
    let e = exports(&stack).await;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].exporter, "local", "{e:?}");
    let local = e[0].local.clone().expect("a local attachment");
    assert!(local.block_device && local.format == "raw", "{local:?}");
    let dev = PathBuf::from(&local.path);
    assert_eq!(vm.disks[0].attachment, format!("file:{}", dev.display()));
    let real = std::fs::canonicalize(&dev).unwrap();
    assert!(std::fs::metadata(&real)
        .unwrap()
        .file_type()
        .is_block_device());

    // QEMU got the device as a descriptor (an fd set), host_device, O_DIRECT.
    let vda = qemu_blockdev(vm.pid, "vda");
    assert_eq!(vda["file"]["driver"], "host_device", "{vda}");
    assert_eq!(vda["file"]["cache"]["direct"], true, "{vda}");
    let filename = vda["file"]["filename"].as_str().unwrap();
    assert!(filename.starts_with("/dev/fdset/"), "{vda}");
    let flags = qemu_fd_flags(vm.pid, &real).expect("QEMU holds the LV's device");
    assert_ne!(flags & libc::O_DIRECT as u32, 0, "flags {flags:o}");
    // No LIO target for it.
    let show = stack.exports.show();
    assert!(!show.contains(&e[0].volume_uuid), "a target: {show}");

    // Snapshots of the attached volume work as with iSCSI.
    let mut p = stack.pdiskd.client().await;
    p.create_snapshot(pb::CreateSnapshotRequest {
        volume: VOLUME.into(),
        name: "same-lv-snap".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Destroying the guest drops the export; the volume and LV stay.
    c.destroy_vm(apb::DestroyVmRequest {
        vm: "same-lv1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for(
        "the export to go",
        std::time::Duration::from_secs(30),
        || {
            let left = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(exports(&stack))
            });
            left.is_empty().then_some(())
        },
    );
    assert!(dev.exists(), "the LV stays");
    p.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot: "same-lv-snap".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    p.delete_volume(pb::DeleteVolumeRequest {
        volume: VOLUME.into(),
        now: true,
        ..Default::default()
    })
    .await
    .unwrap();
}
