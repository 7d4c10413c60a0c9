//! agentd on Ceph RBD end to end: a single-node Ceph cluster (testkit's
//! CephCluster, memstore), pdiskd `--backend rbd` and agentd, all in a
//! network namespace the test creates. The test guest is pulled over HTTP,
//! imported by agentd as a pdisk image base (an RBD image), and booted
//! from its per-guest clone, an RBD clone of the base's `pd-base` snapshot,
//! by QEMU's rbd driver with the key from agentd's keyring. Data is checked
//! through QEMU's rbd driver (`qemu-img compare` against the image).
//! Run by scripts/test's e2e tier (needs root, QEMU with qemu-block-extra,
//! ceph and the test guest).

use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::*;

const BRIDGE: &str = "strbd0";
const BOOT: Duration = Duration::from_secs(240);
const POOL: &str = "vms";

/// One host: namespace, Ceph cluster, pdiskd on it, agentd. Fields drop in
/// order: agentd (and its guests) first, the namespace last.
struct Host {
    agentd: Agentd,
    _pdiskd: Pdiskd,
    ceph: CephCluster,
    scratch: tempfile::TempDir,
    ns: NetNs,
}

impl Host {
    fn start() -> Host {
        let ns = NetNs::new();
        ns.add_bridge(BRIDGE);
        let ceph = CephCluster::start_in(&ns);
        eprintln!("ceph micro-cluster up in {:?}", ceph.startup);
        ceph.create_pool(POOL);
        // pdiskd's user, and the one compute hosts attach as: both limited
        // to the pool.
        let pdisk_keyring = ceph.create_rbd_user("pdisk", POOL);
        let compute_keyring = ceph.create_rbd_user("compute", POOL);
        let scratch = tempfile::Builder::new()
            .prefix("stratus-e2e-rbd-")
            .tempdir()
            .unwrap();
        let args: Vec<String> = [
            "--backend",
            "rbd",
            "--rbd-pool",
            POOL,
            "--ceph-conf",
            ceph.conf.to_str().unwrap(),
            "--ceph-id",
            "pdisk",
            "--ceph-keyring",
            pdisk_keyring.to_str().unwrap(),
            "--rbd-client-id",
            "compute",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pdiskd = Pdiskd::start_on(
            scratch.path(),
            scratch.path(),
            scratch.path().join("unused-pool-dir"),
            Some(&ns),
            args,
        );
        let agentd = Agentd::start_in_with(
            scratch.path(),
            &ns,
            &pdiskd.url(),
            BRIDGE,
            &[
                "--ceph-id",
                "compute",
                "--ceph-keyring",
                compute_keyring.to_str().unwrap(),
            ],
        );
        Host {
            agentd,
            _pdiskd: pdiskd,
            ceph,
            scratch,
            ns,
        }
    }

    fn agent<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(VmServiceClient<tonic::transport::Channel>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let url = self.agentd.url();
        self.ns.block_on(move || async move {
            let c = VmServiceClient::new(testkit::channel(&url).await);
            f(c).await
        })
    }

    fn rbd_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.ceph.rbd(&a)).unwrap()
    }

    /// The pool's images without snapshots.
    fn images(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ceph
            .rbd(&["ls", POOL])
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }
}

fn req(vm: &str) -> pb::VmRequest {
    pb::VmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: vm.into(),
    }
}

#[test]
#[ignore = "needs root, QEMU with qemu-block-extra, ceph and the test guest: run by scripts/test"]
fn a_guest_boots_from_an_rbd_clone_of_its_image_and_survives_an_agentd_crash() {
    let mut h = Host::start();
    // The test guest's image, served over HTTP inside the namespace.
    let www = h.scratch.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let raw = www.join("guest.raw");
    std::fs::copy(guest_dir().join("stratus-guest.raw"), &raw).unwrap();
    let sha = sha256_of(&raw);
    let httpd = Httpd::start_in(&h.ns, &www);
    let url = httpd.url("guest.raw");
    let spec = pb::VmSpec {
        name: "rbd1".into(),
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
            size_bytes: 64 << 20,
            persistence: pb::DiskPersistence::Clone as i32,
            ..Default::default()
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let vm = h.agent(move |mut c| async move {
        c.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            project: String::new(),
            spec: Some(spec),
        })
        .await
        .unwrap();
        c.start_vm(req("rbd1")).await.unwrap().into_inner()
    });
    assert_eq!(vm.state(), pb::VmState::Running);
    let attachment = &vm.disks[0].attachment;
    assert!(
        attachment.starts_with(&format!("rbd:{POOL}/pd-vol-")),
        "{attachment}"
    );
    let clone = attachment.rsplit('/').next().unwrap().to_string();

    // The guest's disk is an RBD clone of the image base's pd-base
    // snapshot, grown to the size asked; the base holds the image's bytes,
    // read through QEMU's rbd driver.
    let info = h.rbd_json(&["info", &format!("{POOL}/{clone}")]);
    assert_eq!(
        info["parent"]["snapshot"].as_str(),
        Some("pd-base"),
        "{info}"
    );
    assert_eq!(info["size"].as_u64(), Some(64 << 20), "{info}");
    let base = info["parent"]["image"].as_str().unwrap().to_string();
    let cmp = h.ceph.run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().unwrap(),
            &h.ceph.qemu_url(POOL, &base),
        ],
    );
    assert!(
        cmp.status.success(),
        "the base differs from the image: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    assert_eq!(h.images(), {
        let mut v = vec![base.clone(), clone.clone()];
        v.sort();
        v
    });

    // It boots from it.
    let console = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ready",
        BOOT,
    );
    assert!(
        console.contains("STRATUS-GUEST disk vda driver=virtio_blk"),
        "{console}"
    );

    // QEMU got the key as a secret object reading a memfd it inherited:
    // never on its command line, in agentd's state or its log.
    let key = h.ceph.key_of("compute");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
    assert!(!cmdline.contains(&key));
    assert!(cmdline.contains("\"driver\":\"rbd\""), "{cmdline}");
    let fd = cmdline
        .split("secret,id=ceph-vda,file=/proc/self/fd/")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .expect("the key is a secret object reading an inherited descriptor");
    let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", vm.pid)).unwrap();
    assert!(link.to_string_lossy().starts_with("/memfd:"), "{link:?}");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/fd/{fd}", vm.pid)).unwrap(),
        key
    );
    let state = h.agentd.state_dir.clone();
    assert!(
        !grep(&state, key.as_bytes()),
        "the key is in agentd's state"
    );
    assert!(
        !h.agentd.log_text().contains(&key),
        "the key is in agentd's log"
    );

    // agentd dies; the guest does not, and is adopted by the next agentd.
    h.agentd.kill9();
    assert!(std::path::Path::new(&format!("/proc/{}", vm.pid)).exists());
    h.agentd.restart();
    let got = h.agent(|mut c| async move { c.get_vm(req("rbd1")).await.unwrap().into_inner() });
    assert_eq!(got.state(), pb::VmState::Running);
    assert_eq!(got.pid, vm.pid);
    let events = h.ns.block_on({
        let url = h.agentd.url();
        move || agent_events(url, 0)
    });
    assert!(events.iter().any(|e| e.vm_name == "rbd1"
        && e.r#type() == pb::EventType::Adopted
        && e.cause() == pb::EventCause::Reconciliation));
    // Still under control, and still reading its disk through librbd: a
    // reset reboots it from the clone.
    let before = std::fs::read_to_string(&vm.console_log)
        .unwrap_or_default()
        .matches("STRATUS-GUEST ready")
        .count();
    h.agent(|mut c| async move {
        c.reboot_vm(req("rbd1")).await.unwrap();
    });
    wait_for("the guest to boot again from its clone", BOOT, || {
        let n = std::fs::read_to_string(&vm.console_log)
            .unwrap_or_default()
            .matches("STRATUS-GUEST ready")
            .count();
        (n > before).then_some(())
    });

    // Destroyed: the clone goes with the guest; the base stays for the next.
    h.agent(|mut c| async move {
        c.destroy_vm(pb::DestroyVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "rbd1".into(),
            timeout_seconds: 30,
        })
        .await
        .unwrap();
    });
    wait_for("the clone to be deleted", Duration::from_secs(60), || {
        (h.images() == [base.clone()]).then_some(())
    });
    drop(httpd);
}

/// Whether any file under `dir` holds `needle`.
fn grep(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let p = e.path();
            if p.is_dir() {
                grep(&p, needle)
            } else {
                std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            }
        })
}
