//! `agentd --attach kernel`'s initiator against a real target (lab tier).
//!
//! Needs root, the kernel's iscsi_tcp, a running iscsid and udevd (for the
//! `/dev/disk/by-path` links), open-iscsi's iscsiadm, coreutils' dd and
//! qemu-io (QEMU's block layer opens the disk as agentd's QEMU would): the
//! lab VM has them all (`scripts/lab`; this host's kernel has no iscsi_tcp).
//! The target is pdiskd on testkit's `Stack`, so `STRATUS_STACK` picks it:
//! `lvm-lio` in the lab VM (with `STRATUS_LAB_VG`), `file-tgt` (tgtd, an XFS
//! loop pool) on any other host with the kernel initiator. Or, without
//! pdisk, an export made beforehand: `STRATUS_LAB_PORTAL` (addr:port),
//! `STRATUS_LAB_TARGET`, `STRATUS_LAB_LUN` (default 0),
//! `STRATUS_LAB_INITIATOR` (the name its ACL allows) and, for CHAP,
//! `STRATUS_LAB_CHAP_USER` and `STRATUS_LAB_CHAP_SECRET`; the tests then
//! share one target and initiator name, so run them with `--test-threads 1`.
//!
//! Each test logs in through an iface and with an initiator name of its own,
//! so tests running side by side (or an operator's sessions) never meet;
//! a drop guard logs out and deletes its records even when a test fails.
//!
//!   cargo test -p agent --test kernel_attach -- --ignored

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent::attach::{Holder, IscsiLun, KernelAttacher, KernelOptions};
use agent::vmm;
use pdisk::runner::HostRunner;
use pdisk::types::Chap;
use stratus_proto::pdisk::v1 as pb;
use testkit::*;
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// Checks what the kernel initiator needs, with a message saying what is missing.
fn require_kernel_initiator() {
    require_root();
    let _ = run("modprobe", &["iscsi_tcp"]);
    assert!(
        Path::new("/sys/module/iscsi_tcp").exists(),
        "the kernel has no iscsi_tcp: run this test in the lab VM (scripts/lab)"
    );
    // `-m session` answers 21 when there is none; anything but 0/21 means
    // iscsiadm is missing or broken.
    let out = run("iscsiadm", &["-m", "session"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(21)),
        "iscsiadm -m session: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test's own initiator: iface name and IQN, logged out and deleted on drop.
struct TestInitiator {
    iface: String,
    iqn: String,
    /// (target, portal) pairs to log out of on drop.
    nodes: std::sync::Mutex<Vec<(String, String)>>,
}

impl TestInitiator {
    fn new(tag: &str) -> TestInitiator {
        let n = std::process::id();
        TestInitiator {
            iface: format!("stratus-{tag}{n}"),
            iqn: format!("iqn.2026-11.io.stratus.test:{tag}{n}"),
            nodes: Default::default(),
        }
    }

    fn attacher(&self) -> KernelAttacher {
        KernelAttacher::new(
            Arc::new(HostRunner),
            KernelOptions {
                iface: self.iface.clone(),
                device_timeout: Duration::from_secs(60),
                ..KernelOptions::new(&self.iqn)
            },
        )
    }

    fn watch(&self, lun: &IscsiLun) {
        self.nodes
            .lock()
            .unwrap()
            .push((lun.target.clone(), lun.portal.to_string()));
    }

    /// Live sessions through our iface to `target`.
    fn sessions(&self, target: &str) -> usize {
        let Ok(rd) = std::fs::read_dir("/sys/class/iscsi_session") else {
            return 0;
        };
        rd.flatten()
            .filter(|e| {
                let attr = |a: &str| {
                    std::fs::read_to_string(e.path().join(a))
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                };
                attr("targetname") == target && attr("ifacename") == self.iface
            })
            .count()
    }
}

impl Drop for TestInitiator {
    fn drop(&mut self) {
        for (target, portal) in self.nodes.lock().unwrap().iter() {
            let node = |extra: &[&str]| {
                let mut a = vec!["-m", "node", "-T", target, "-p", portal, "-I", &self.iface];
                a.extend_from_slice(extra);
                let _ = run("iscsiadm", &a);
            };
            node(&["--logout"]);
            node(&["-o", "delete"]);
        }
        let _ = run(
            "iscsiadm",
            &["-m", "iface", "-I", &self.iface, "-o", "delete"],
        );
    }
}

/// Where the test's LUN comes from; kept alive for the test's length.
enum Export {
    Pdisk { _stack: Box<Stack> },
    Given,
}

/// The export made beforehand, when `STRATUS_LAB_PORTAL` names one:
/// (LUN, CHAP, initiator name).
async fn given_export() -> Option<(IscsiLun, Option<Chap>, String)> {
    let portal = std::env::var("STRATUS_LAB_PORTAL").ok()?;
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} is needed with STRATUS_LAB_PORTAL"))
    };
    let lun: u32 = std::env::var("STRATUS_LAB_LUN")
        .map(|l| l.parse().expect("STRATUS_LAB_LUN"))
        .unwrap_or(0);
    let lun = IscsiLun::resolve(&portal, &var("STRATUS_LAB_TARGET"), lun)
        .await
        .unwrap();
    let chap = std::env::var("STRATUS_LAB_CHAP_USER")
        .ok()
        .map(|u| Chap::new(&u, &var("STRATUS_LAB_CHAP_SECRET")).unwrap());
    Some((lun, chap, var("STRATUS_LAB_INITIATOR")))
}

/// A LUN for `ini` to attach: the given export, or a new pdisk volume
/// exported to `ini` with CHAP on the test's own stack.
async fn export_for(ini: &mut TestInitiator, name: &str) -> (Export, IscsiLun, Option<Chap>) {
    if let Some((lun, chap, initiator)) = given_export().await {
        ini.iqn = initiator;
        return (Export::Given, lun, chap);
    }
    let stack = Stack::start();
    let (lun, chap) = exported_volume(&stack, name, &ini.iqn).await;
    let export = Export::Pdisk {
        _stack: Box::new(stack),
    };
    (export, lun, Some(chap))
}

/// A volume exported to `initiator` with CHAP; returns the LUN and the credentials.
async fn exported_volume(stack: &Stack, name: &str, initiator: &str) -> (IscsiLun, Chap) {
    let mut c = stack.pdiskd.client().await;
    c.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes: 64 * MIB,
        ..Default::default()
    })
    .await
    .unwrap();
    let secret = Uuid::new_v4().simple().to_string()[..16].to_string();
    let chap = Chap::new("kernelattach", &secret).unwrap();
    let e = c
        .export_volume(pb::ExportVolumeRequest {
            volume: name.into(),
            initiators: vec![initiator.into()],
            chap: Some(pb::ChapCredentials {
                user: chap.user.clone(),
                secret,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let lun = IscsiLun::resolve(&e.portal, &e.target_iqn, e.lun)
        .await
        .unwrap();
    (lun, chap)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..MIB as usize).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Writes 1 MiB at offset 1 MiB with O_DIRECT and fsync (through the page
/// cache would prove nothing about the target).
fn write_direct(dev: &Path, data: &[u8], scratch: &Path) {
    let src = scratch.join("pattern");
    std::fs::write(&src, data).unwrap();
    run_ok(
        "dd",
        &[
            &format!("if={}", src.display()),
            &format!("of={}", dev.display()),
            "bs=1M",
            "seek=1",
            "count=1",
            "oflag=direct",
            "conv=fsync,notrunc",
            "status=none",
        ],
    );
}

fn read_direct(dev: &Path, scratch: &Path) -> Vec<u8> {
    let dst = scratch.join("read-back");
    run_ok(
        "dd",
        &[
            &format!("if={}", dev.display()),
            &format!("of={}", dst.display()),
            "bs=1M",
            "skip=1",
            "count=1",
            "iflag=direct",
            "status=none",
        ],
    );
    std::fs::read(&dst).unwrap()
}

/// Opens `dev` through QEMU's block layer exactly as agentd's QEMU command
/// line does (vmm's `-blockdev` JSON for a kernel-attached disk, io_uring
/// when QEMU has it) and runs qemu-io commands on it.
async fn qemu_io_as_guest_disk(dev: &Path, cmds: &[&str]) -> String {
    let plan = vmm::LaunchPlan {
        uuid: Uuid::nil(),
        name: "kernel-attach".into(),
        vcpus: 1,
        memory_mib: 64,
        accel: vmm::Accel::Tcg,
        disks: vec![vmm::PlannedDisk {
            device: "vda".into(),
            backend: vmm::DiskBackend::HostDevice {
                path: dev.to_owned(),
            },
            read_only: false,
            boot_index: 1,
        }],
        nics: vec![],
        kernel: None,
        dir: "/nonexistent".into(),
        io_uring: vmm::io_uring_supported(&HostRunner).await,
    };
    let argv = plan.argv();
    let i = argv.iter().position(|a| a == "-blockdev").unwrap();
    let mut opts: serde_json::Value = serde_json::from_str(&argv[i + 1]).unwrap();
    opts.as_object_mut().unwrap().remove("node-name");
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    let spec = format!("json:{opts}");
    eprintln!("qemu-io on {spec}");
    args.push(&spec);
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io {spec}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn node_record(lun: &IscsiLun) -> PathBuf {
    PathBuf::from(format!(
        "/etc/iscsi/nodes/{}/{},{}",
        lun.target,
        lun.portal.ip(),
        lun.portal.port()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iscsi_tcp, iscsid, udevd and an iSCSI target: the lab VM"]
async fn attach_write_read_share_detach_and_log_out() {
    require_kernel_initiator();
    let mut ini = TestInitiator::new("ka");
    let (_export, lun, chap) = export_for(&mut ini, "ka-vol").await;
    let chap = chap.as_ref();
    ini.watch(&lun);
    let scratch = tempfile::tempdir().unwrap();
    let k = ini.attacher();
    let (g1, g2) = (
        Holder::disk(Uuid::new_v4(), "vda"),
        Holder::disk(Uuid::new_v4(), "vdb"),
    );

    let a = k.attach(&g1, &lun, chap).await.unwrap();
    let meta = std::fs::metadata(&a.device).unwrap();
    assert!(meta.file_type().is_block_device(), "{}", a.device.display());
    assert_eq!(std::fs::canonicalize(&a.by_path).unwrap(), a.device);
    assert!(a.by_path.ends_with(format!(
        "ip-{}:{}-iscsi-{}-lun-{}",
        lun.portal.ip(),
        lun.portal.port(),
        lun.target,
        lun.lun
    )));
    assert_eq!(ini.sessions(&lun.target), 1);
    // The secret went into a 0600 record, not onto a command line.
    let rec = node_record(&lun);
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", rec.display());
    let text = std::fs::read_to_string(&rec).unwrap();
    if let Some(chap) = chap {
        let line = format!("node.session.auth.password = {}", chap.secret());
        assert!(
            text.contains(&line),
            "no password line in {}",
            rec.display()
        );
    }
    assert!(text.contains("node.session.scan = manual"), "{text}");

    let data = pattern(0x5a);
    write_direct(&a.device, &data, scratch.path());
    assert!(read_direct(&a.device, scratch.path()) == data);
    // QEMU opens the device with agentd's options and sees the same bytes.
    qemu_io_as_guest_disk(&a.device, &["write -P 0xab 3M 64k", "read -P 0xab 3M 64k"]).await;
    assert!(read_direct(&a.device, scratch.path()) == data);

    // A second guest on the same LUN shares the session and the device.
    let b = k.attach(&g2, &lun, chap).await.unwrap();
    assert_eq!(b.device, a.device);
    assert_eq!(ini.sessions(&lun.target), 1);
    k.detach(&g1, &lun).await.unwrap();
    assert_eq!(
        ini.sessions(&lun.target),
        1,
        "guest 2 still holds the session"
    );
    assert!(a.by_path.exists());

    k.detach(&g2, &lun).await.unwrap();
    assert_eq!(ini.sessions(&lun.target), 0);
    assert!(
        !rec.exists(),
        "the record (with the secret) is deleted at logout"
    );
    wait_for("the by-path link to go", Duration::from_secs(30), || {
        (!a.by_path.exists()).then_some(())
    });
    // Already logged out: still success.
    k.detach(&g2, &lun).await.unwrap();

    // A new session reads what the first one wrote: it reached the target.
    let c = k.attach(&g1, &lun, chap).await.unwrap();
    assert!(read_direct(&c.device, scratch.path()) == data);
    k.detach(&g1, &lun).await.unwrap();
    assert_eq!(ini.sessions(&lun.target), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iscsi_tcp, iscsid, udevd and an iSCSI target: the lab VM"]
async fn a_restart_keeps_held_sessions_and_logs_out_unheld_ones() {
    require_kernel_initiator();
    let mut ini = TestInitiator::new("kr");
    let (_export, lun, chap) = export_for(&mut ini, "kr-vol").await;
    let chap = chap.as_ref();
    ini.watch(&lun);
    let g = Holder::disk(Uuid::new_v4(), "vda");
    let dev = {
        let k = ini.attacher();
        k.attach(&g, &lun, chap).await.unwrap().device
    };

    // agentd restarts with the attachment recorded: the session stays.
    let k = ini.attacher();
    k.adopt(g.clone(), &lun).await;
    let report = k.reap_orphans().await;
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(ini.sessions(&lun.target), 1);
    assert!(dev.exists());

    // agentd restarts with no record holding it: logged out.
    let k = ini.attacher();
    let report = k.reap_orphans().await;
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(report[0].contains("logged out"), "{report:?}");
    assert_eq!(ini.sessions(&lun.target), 0);
    assert!(!node_record(&lun).exists());
}
