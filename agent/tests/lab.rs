//! Lab topology 2 (run by `scripts/lab topology2`, needs root, QEMU and the
//! lab VM image): a storage host and a compute host on one bridge.
//!
//! The lab VM is the storage host: pdiskd with the lvm backend (a thin pool on
//! its own virtio disk) and the LIO exporter, listening on 10.77.0.2. This
//! host is the compute host: agentd in a network namespace whose bridge
//! carries the VM's tap. A guest launched from an image URL makes agentd
//! upload the image into the thin pool, clone it (a thin snapshot), export the
//! clone over LIO and boot the guest from it across the bridge.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;

const BRIDGE: &str = "labbr0";
const TAP: &str = "labtap0";
const HOST_ADDR: &str = "10.77.0.1/24";
const VM_ADDR: &str = "10.77.0.2/24";
const PDISK_URL: &str = "https://10.77.0.2:7400";
const PDISK_IP: &str = "10.77.0.2";
const PORTAL: &str = "10.77.0.2:3260";

/// The lab VM serving pdiskd on the namespace's bridge; killed on drop.
struct LabVm {
    child: Child,
    console: PathBuf,
}

impl LabVm {
    fn start(ns: &NetNs, dir: &Path) -> LabVm {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let console = dir.join("lab-console.log");
        // pdiskd in the VM serves mTLS with a certificate of this test's CA
        // (testkit's), so agentd's agent certificate and the test's admin
        // certificate are accepted; scripts/lab stages STRATUS_LAB_PKI.
        let pki = TestPki::shared();
        let server = pki.issue(stratus_pki::Role::Server, "lab-pdiskd", None, &[PDISK_IP]);
        let staged = dir.join("pki");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::copy(&server.cert, staged.join("server.pem")).unwrap();
        std::fs::copy(&server.key, staged.join("server.key")).unwrap();
        std::fs::copy(&server.ca, staged.join("ca.pem")).unwrap();
        let mut child = Command::new(root.join("scripts/lab"))
            .args(["serve", &ns.name, TAP, VM_ADDR])
            .env("STRATUS_LAB_NOBUILD", "1")
            .env("STRATUS_LAB_PKI", &staged)
            .current_dir(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap();
        // Copy the console to a file while waiting for "serving".
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = console.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&path).unwrap();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
                if line.starts_with("STRATUS-LAB serving") || line.starts_with("STRATUS-LAB exit=")
                {
                    let _ = tx.send(line.clone());
                }
            }
        });
        let vm = LabVm { child, console };
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(l) if l.starts_with("STRATUS-LAB serving") => vm,
            other => panic!(
                "the lab VM did not serve ({other:?}):\n{}",
                std::fs::read_to_string(&vm.console).unwrap_or_default()
            ),
        }
    }
}

impl Drop for LabVm {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- lab VM console ----\n{}",
                std::fs::read_to_string(&self.console).unwrap_or_default()
            );
        }
    }
}

fn pdisk<F, Fut, T>(ns: &NetNs, f: F) -> T
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    ns.block_on(move || async move {
        f(VolumeServiceClient::new(testkit::channel(PDISK_URL).await)).await
    })
}

/// pdisk's volumes and exports on the storage host.
fn volumes_and_exports(ns: &NetNs) -> (Vec<pdpb::Volume>, Vec<pdpb::Export>) {
    pdisk(ns, |mut c| async move {
        let vols = c
            .list_volumes(pdpb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let exports = c
            .list_exports(pdpb::ListExportsRequest {
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .exports;
        (vols, exports)
    })
}

#[test]
#[ignore = "needs root, QEMU and the lab VM image: run by scripts/lab topology2"]
fn a_guest_boots_across_the_bridge_from_a_thin_lv_exported_by_lio() {
    let dir = tempfile::Builder::new()
        .prefix("stratus-lab-")
        .tempdir()
        .unwrap();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    ns.ip(&["addr", "add", HOST_ADDR, "dev", BRIDGE]);
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.ip(&["link", "set", TAP, "master", BRIDGE]);
    ns.ip(&["link", "set", TAP, "up"]);
    let t0 = Instant::now();
    let _vm = LabVm::start(&ns, dir.path());
    eprintln!("lab VM serving after {:.1} s", t0.elapsed().as_secs_f64());

    // The storage host runs the production stack.
    let pool = pdisk(&ns, |mut c| async move {
        c.get_pool(pdpb::GetPoolRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(pool.backend, "lvm", "{pool:?}");
    assert_eq!(pool.exporter, "lio", "{pool:?}");

    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let img = www.join("guest.qcow2");
    std::fs::copy(guest_dir().join("stratus-guest.qcow2"), &img).unwrap();
    let sha = sha256_of(&img);
    let httpd = Httpd::start_in(&ns, &www);
    let url = httpd.url("guest.qcow2");

    let agentd = Agentd::start_in(dir.path(), &ns, PDISK_URL, BRIDGE);
    let agent_url = agentd.url();
    let spec = pb::VmSpec {
        name: "labvm".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url,
                sha256: sha.clone(),
                format: 0,
                endorser: String::new(),
                endorsement: String::new(),
            })),
            boot_index: 1,
            size_bytes: 256 << 20,
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: String::new(),
            vlan: 0,
            ips: Vec::new(),
        }],
        ..Default::default()
    };
    let u = agent_url.clone();
    let vm = ns.block_on(move || async move {
        let mut c = VmServiceClient::new(testkit::channel(&u).await);
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap();
        c.start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "labvm".into(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(vm.state(), pb::VmState::Running, "{vm:?}");
    // QEMU logs in to LIO on the storage host, across the bridge.
    assert!(
        vm.disks[0]
            .attachment
            .starts_with(&format!("iscsi://{PORTAL}/")),
        "{:?}",
        vm.disks[0]
    );
    let console = wait_console(
        Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        Duration::from_secs(300),
    );
    assert!(
        console.contains("STRATUS-GUEST disk vda driver=virtio_blk"),
        "{console}"
    );

    // The image became a base volume and the guest's disk a thin clone of
    // it, both LVs on the storage host; the clone is exported.
    let (vols, exports) = volumes_and_exports(&ns);
    assert_eq!(vols.len(), 2, "{vols:?}");
    assert!(
        vols.iter().all(|v| v.device_path.starts_with("/dev/lab/")),
        "{vols:?}"
    );
    assert!(vols.iter().any(|v| v.labels.values().any(|l| *l == sha)));
    assert_eq!(exports.len(), 1, "{exports:?}");

    // Destroying the guest logs out, unexports and deletes its clone.
    let u = agent_url.clone();
    ns.block_on(move || async move {
        let mut c = VmServiceClient::new(testkit::channel(&u).await);
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "labvm".into(),
            timeout_seconds: 30,
        })
        .await
        .unwrap();
    });
    let (vols, exports) = volumes_and_exports(&ns);
    assert!(exports.is_empty(), "{exports:?}");
    assert_eq!(vols.len(), 1, "only the image base is left: {vols:?}");
    drop(agentd);
}
