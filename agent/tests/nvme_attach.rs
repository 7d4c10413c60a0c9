//! `agentd --attach kernel` on an NVMe/TCP export (lab tier, issue 16):
//! pdiskd (lvm backend, `--export nvmet`) and agentd on one host, a guest
//! (TCG, no OS: an empty volume, SeaBIOS retries its boot while QEMU runs)
//! started from the export. agentd connects with nvme-cli as the host NQN
//! pdiskd allows, QEMU opens the namespace as `host_device`; bytes written
//! through that device are read back through a second connect (the next
//! start); a stop and a destroy leave no controller, and the unexport no
//! subsystem or host link in nvmet's configfs.
//!
//! Runs in the lab VM (`scripts/lab topology1`, `STRATUS_STACK=lvm-lio`:
//! it needs LVM and the kernel's nvmet, nvmet-tcp and nvme-tcp); elsewhere
//! it says it is skipped.
//!
//!   cargo test -p agent --test nvme_attach -- --ignored

use std::path::{Path, PathBuf};
use std::time::Duration;

use stratus_proto::agent::v1 as apb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pb;
use testkit::*;

const VOLUME: &str = "nv-lab";
const VM: &str = "nv-lab1";
/// Apart from pdisk/tests/nvmet.rs (4421) and the datapath scenario.
const PORTAL: &str = "127.0.0.1:4461";
const PORT_ID: &str = "61";
const NVMET: &str = "/sys/kernel/config/nvmet";

/// The controllers connected to `subnqn`: (name, host NQN).
fn controllers(subnqn: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/class/nvme")
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| {
            std::fs::read_to_string(e.path().join(f))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if read("subsysnqn") == subnqn {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                read("hostnqn"),
            ));
        }
    }
    out
}

/// The `-blockdev` JSON of node `node` on QEMU `pid`'s command line (its
/// format node, below the throttle node every disk has).
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

/// `len` bytes at `offset` of `dev`, O_DIRECT.
fn read_direct(dev: &Path, offset_mib: u64, len_mib: u64) -> Vec<u8> {
    let out = run(
        "dd",
        &[
            &format!("if={}", dev.display()),
            "bs=1M",
            &format!("skip={offset_mib}"),
            &format!("count={len_mib}"),
            "iflag=direct",
            "status=none",
        ],
    );
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn write_direct(dev: &Path, offset_mib: u64, file: &Path) {
    let out = run(
        "dd",
        &[
            &format!("if={}", file.display()),
            &format!("of={}", dev.display()),
            "bs=1M",
            &format!("seek={offset_mib}"),
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
    );
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn start(c: &mut VmServiceClient<tonic::transport::Channel>) -> apb::Vm {
    let vm = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: VM.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.state(), apb::VmState::Running, "{vm:?}");
    vm
}

/// The namespace device QEMU opened: host_device, on /dev/nvme*.
fn opened_device(vm: &apb::Vm) -> PathBuf {
    let dev = PathBuf::from(&vm.disks[0].attachment);
    assert!(
        dev.to_string_lossy().starts_with("/dev/nvme"),
        "{:?}",
        vm.disks[0]
    );
    let vda = qemu_blockdev(vm.pid, "vda");
    assert_eq!(vda["file"]["driver"], "host_device", "{vda}");
    dev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, LVM, nvmet/nvme-tcp and QEMU: the lab VM"]
async fn a_guest_starts_from_an_nvmet_export_and_stop_and_destroy_leave_no_controller() {
    if stack_kind() != StackKind::LvmLio {
        eprintln!("skipped: NVMe/TCP attach needs the lab VM's kernel (scripts/lab)");
        return;
    }
    require_root();
    let _ = run("modprobe", &["-a", "nvmet", "nvmet_tcp", "nvme_tcp"]);
    assert!(
        Path::new("/sys/module/nvme_tcp").exists() && Path::new(NVMET).exists(),
        "the kernel has no nvmet/nvme-tcp"
    );
    let pool = ThinPool::new(512);
    let prefix = format!("iqn.2026-12.io.stratus.nvlab{}", std::process::id());
    let scratch = pool.dir.path().to_path_buf();
    let args: Vec<String> = [
        "--backend",
        "lvm",
        "--vg",
        &pool.vg,
        "--thin-pool",
        &pool.pool,
        "--export",
        "nvmet",
        "--portal",
        PORTAL,
        "--nvmet-port-id",
        PORT_ID,
        "--iqn-prefix",
        &prefix,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pdiskd = Pdiskd::start_on(&scratch, &scratch, scratch.join("staging"), None, args);
    let mut p = pdiskd.client().await;
    p.create_volume(pb::CreateVolumeRequest {
        name: VOLUME.into(),
        size_bytes: 64 << 20,
        ..Default::default()
    })
    .await
    .unwrap();
    let agentd = Agentd::start_in_with(
        &scratch,
        &NetNs::host(),
        &pdiskd.url(),
        "stbr0",
        &["--attach", "kernel"],
    );
    let mut c = VmServiceClient::new(channel(&agentd.url()).await);
    c.create_vm(apb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(apb::VmSpec {
            name: VM.into(),
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

    // Start 1: pdiskd's export is NVMe/TCP; agentd's controller has the
    // host NQN pdiskd derived from agentd's initiator IQN.
    let vm = start(&mut c).await;
    let e = p
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].exporter, "nvmet", "{e:?}");
    let subnqn = e[0].target_iqn.replacen("iqn.", "nqn.", 1);
    let hostnqn = e[0].initiators[0].replacen("iqn.", "nqn.", 1);
    assert!(e[0].url.contains(&subnqn), "{e:?}");
    let ctrls = controllers(&subnqn);
    assert_eq!(ctrls.len(), 1, "{ctrls:?}");
    assert_eq!(ctrls[0].1, hostnqn);
    let dev = opened_device(&vm);
    // The host writes through the namespace QEMU has open (the guest has
    // no OS, so nothing else writes); 4 MiB at 16 MiB.
    let pattern: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let file = scratch.join("pattern");
    std::fs::write(&file, &pattern).unwrap();
    write_direct(&dev, 16, &file);

    // Stop: the controller goes; pdiskd keeps no export.
    c.stop_vm(apb::StopVmRequest {
        vm: VM.into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        controllers(&subnqn).is_empty(),
        "{:?}",
        controllers(&subnqn)
    );
    let left = p
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert!(left.is_empty(), "{left:?}");

    // Start 2: a second connect; the bytes come back through it.
    let vm = start(&mut c).await;
    let dev2 = opened_device(&vm);
    assert_eq!(controllers(&subnqn).len(), 1);
    assert!(
        read_direct(&dev2, 16, 4) == pattern,
        "the bytes differ after reconnecting"
    );

    // Destroy: no controller, no export, nothing of it in nvmet's configfs.
    c.destroy_vm(apb::DestroyVmRequest {
        vm: VM.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        controllers(&subnqn).is_empty(),
        "{:?}",
        controllers(&subnqn)
    );
    wait_for("the export to go", Duration::from_secs(30), || {
        let sub = Path::new(NVMET).join("subsystems").join(&subnqn);
        let link = sub.join("allowed_hosts").join(&hostnqn);
        (!link.exists() && !sub.exists()).then_some(())
    });
    assert!(
        !Path::new(NVMET).join("hosts").join(&hostnqn).exists(),
        "host {hostnqn} left in nvmet"
    );
    p.delete_volume(pb::DeleteVolumeRequest {
        volume: VOLUME.into(),
        now: true,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(agentd);
    drop(pdiskd);
}
