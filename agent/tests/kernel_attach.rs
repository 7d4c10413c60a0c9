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
//! The last test runs the whole of `agentd --attach kernel` (lvm-lio only;
//! it also needs qemu-system-x86_64): agentd, in this network namespace,
//! starts guests (TCG, no OS, an empty pdisk volume as the disk) whose disks
//! open-iscsi attached; a stop and a destroy log out; a guest running across
//! an agentd `kill -9` is adopted with its session, and the restarted agentd
//! attaches another guest through the same iface; a guest that died while
//! agentd was away is recorded stopped and logged out of at the restart.
//! Another grows a running guest's kernel-attached disk with ResizeDisk.
//!
//!   cargo test -p agent --test kernel_attach -- --ignored

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent::attach::{AttachMode, Holder, IscsiLun, KernelAttacher, KernelOptions, DEFAULT_IFACE};
use agent::vmm;
use stratus_core::runner::HostRunner;
use stratus_core::types::Chap;
use stratus_proto::agent::v1 as apb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pb;
use testkit::*;
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// Held by each test that runs agentd: their agentds share the iface
/// `DEFAULT_IFACE`, and a restarted agentd logs out of every session on it
/// that it does not hold, another test's guest's included (topology 1 runs
/// this suite with `--test-threads 2`).
static AGENTD_IFACE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            volume: name.into(),
            initiators: vec![initiator.into()],
            chap: Some(pb::ChapCredentials {
                user: chap.user.clone(),
                secret,
                target: None,
            }),
            request_id: String::new(),
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
            qos: None,
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
        disk_io: agent::disk_io::DiskIo::measured_default(
            vmm::io_uring_supported(&HostRunner).await,
        ),
        confinement: None,
        console_log_max: 1 << 20,
        hotplug_ports: 0,
        incoming: false,
        layout: None,
    };
    let argv = plan.argv(&mut vmm::NumberedFds::default()).unwrap();
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

// ---------- agentd end to end with --attach kernel ----------

/// One iSCSI session as `iscsiadm -m session -P 1` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    target: String,
    /// `ADDR:PORT`, without the portal group tag.
    portal: String,
    iface: String,
    initiator: String,
}

/// The host's sessions to `target`, from `iscsiadm -m session -P 1`
/// (21: there is none).
fn sessions_to(target: &str) -> Vec<Session> {
    let out = run("iscsiadm", &["-m", "session", "-P", "1"]);
    if out.status.code() == Some(21) {
        return Vec::new();
    }
    assert!(
        out.status.success(),
        "iscsiadm -m session -P 1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut tgt, mut portal, mut iface, mut initiator) =
        (String::new(), String::new(), String::new(), String::new());
    let mut all = Vec::new();
    for l in text.lines().map(str::trim) {
        let field = |key: &str| l.strip_prefix(key).map(|v| v.trim().to_string());
        if let Some(v) = field("Target:") {
            tgt = v.split_whitespace().next().unwrap_or_default().to_string();
        } else if let Some(v) = field("Current Portal:") {
            portal = v.split(',').next().unwrap_or_default().to_string();
        } else if let Some(v) = field("Iface Name:") {
            iface = v;
        } else if let Some(v) = field("Iface Initiatorname:") {
            initiator = v;
        } else if l.starts_with("SID:") {
            all.push(Session {
                target: tgt.clone(),
                portal: portal.clone(),
                iface: iface.clone(),
                initiator: initiator.clone(),
            });
        }
    }
    all.retain(|s| s.target == target);
    all
}

/// open-iscsi's node record files for `target` (none once it was deleted).
fn node_records(target: &str) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        if p.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), out);
            }
        } else if p.exists() {
            out.push(p.to_owned());
        }
    }
    let mut v = Vec::new();
    walk(&Path::new("/etc/iscsi/nodes").join(target), &mut v);
    v
}

/// The CHAP password agentd wrote into the node record of `target`, after
/// checking the record: one file, 0600, CHAP with `user`, manual scan.
fn record_secret(target: &str, user: &str) -> String {
    let recs = node_records(target);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let mode = std::fs::metadata(&recs[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", recs[0].display());
    let text = std::fs::read_to_string(&recs[0]).unwrap();
    for want in [
        "node.session.auth.authmethod = CHAP".to_string(),
        format!("node.session.auth.username = {user}"),
        "node.session.scan = manual".to_string(),
        "node.startup = manual".to_string(),
    ] {
        assert!(
            text.contains(&want),
            "{want:?} not in {}",
            recs[0].display()
        );
    }
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("node.session.auth.password = "))
        .unwrap_or_else(|| panic!("no password in {}", recs[0].display()))
        .trim()
        .to_string();
    assert!(
        secret.len() >= 12,
        "a short secret in {}",
        recs[0].display()
    );
    secret
}

fn qemu_alive(pid: u32, uuid: &str) -> bool {
    vmm::is_our_qemu(pid, uuid.parse().unwrap())
}

/// QEMU's argv, from /proc.
fn qemu_argv(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

async fn agent_client(agentd: &Agentd) -> VmServiceClient<tonic::transport::Channel> {
    VmServiceClient::new(testkit::channel(&agentd.url()).await)
}

async fn events_since(agentd: &Agentd, since: u64) -> Vec<apb::Event> {
    agent_events(agentd.url(), since).await
}

/// pdisk's exports of the volume named `volume`.
async fn exports_of(stack: &Stack, volume: &str) -> Vec<pb::Export> {
    let mut c = stack.pdiskd.client().await;
    let mut v = c
        .list_exports(pb::ListExportsRequest {
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .exports;
    v.retain(|e| e.volume_name == volume);
    v
}

/// What a running guest's kernel-attached disk must look like: a SCSI disk
/// behind the export's by-path link, one session on agentd's iface, the
/// CHAP secret in the 0600 node record and nowhere on QEMU's command line.
/// Returns the secret.
async fn check_attached(stack: &Stack, agentd: &Agentd, vm: &apb::Vm, volume: &str) -> String {
    assert_eq!(vm.state(), apb::VmState::Running, "{vm:?}");
    assert!(qemu_alive(vm.pid, &vm.uuid), "no QEMU at pid {}", vm.pid);
    let exports = exports_of(stack, volume).await;
    assert_eq!(exports.len(), 1, "{exports:?}");
    let e = &exports[0];
    assert_eq!(e.initiators, vec![INITIATOR.to_string()], "{e:?}");
    assert_eq!(e.exporter, "lio", "{e:?}");

    // The disk is the LUN's SCSI disk, found through its by-path link.
    let disk = &vm.disks[0];
    assert_eq!(disk.source, format!("pdisk:{volume}"), "{disk:?}");
    let dev = PathBuf::from(&disk.attachment);
    assert!(disk.attachment.starts_with("/dev/sd"), "{disk:?}");
    let meta = std::fs::metadata(&dev).unwrap();
    assert!(meta.file_type().is_block_device(), "{}", dev.display());
    let lun = IscsiLun::resolve(&e.portal, &e.target_iqn, e.lun)
        .await
        .unwrap();
    let by_path = Path::new("/dev/disk/by-path").join(lun.by_path_name());
    assert_eq!(std::fs::canonicalize(&by_path).unwrap(), dev);

    // Exactly one session to the target, through agentd's iface and name.
    assert_eq!(
        sessions_to(&e.target_iqn),
        vec![Session {
            target: e.target_iqn.clone(),
            portal: lun.portal.to_string(),
            iface: DEFAULT_IFACE.into(),
            initiator: INITIATOR.into(),
        }]
    );
    let secret = record_secret(&e.target_iqn, &e.chap_user);

    // QEMU opened the block device; no secret reached its command line.
    let argv = qemu_argv(vm.pid);
    let bd = argv
        .iter()
        .find(|a| a.contains("host_device"))
        .unwrap_or_else(|| panic!("no host_device disk in {argv:?}"));
    let v: serde_json::Value = serde_json::from_str(bd).unwrap();
    // Every disk has a QoS throttle node above its format node (issue 15).
    assert_eq!(v["driver"], "throttle", "{bd}");
    let v = v["file"].clone();
    assert_eq!(v["driver"], "raw", "{bd}");
    assert_eq!(v["file"]["driver"], "host_device", "{bd}");
    assert_eq!(v["file"]["filename"], disk.attachment.as_str(), "{bd}");
    assert_eq!(v["file"]["cache"]["direct"], true, "{bd}");
    let line = argv.join(" ");
    assert!(
        !line.contains(&secret),
        "the CHAP secret is on QEMU's command line"
    );
    assert!(
        !line.contains("iscsi") && !line.contains("password") && !line.contains("secret"),
        "{line}"
    );
    let vm_dir = agentd.state_dir.join("vms").join(&vm.uuid);
    assert!(
        !vm_dir.join("chap-vda").exists(),
        "a secret file in {}",
        vm_dir.display()
    );
    assert!(
        !agentd.log_text().contains(&secret),
        "the CHAP secret is in agentd's log"
    );
    secret
}

/// After a stop or destroy: QEMU gone, the session logged out, the node
/// record (with the secret) deleted, the SCSI disk and the export gone.
async fn check_detached(stack: &Stack, volume: &str, target: &str, vm: &apb::Vm) {
    assert!(
        !qemu_alive(vm.pid, &vm.uuid),
        "QEMU pid {} still runs",
        vm.pid
    );
    assert_eq!(sessions_to(target), vec![], "session to {target} left");
    assert_eq!(node_records(target), Vec::<PathBuf>::new(), "record left");
    // The SCSI disk was deleted before the logout (its sdX name may already
    // be another test's); the by-path link goes with udev's event.
    wait_for(
        "the LUN's by-path link to go",
        Duration::from_secs(60),
        || {
            let left = std::fs::read_dir("/dev/disk/by-path")
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains(target));
            (!left).then_some(())
        },
    );
    let exports = exports_of(stack, volume).await;
    assert!(exports.is_empty(), "{exports:?}");
    assert!(
        !stack.exports.show().contains(target),
        "{}",
        stack.exports.show()
    );
}

/// A guest with `volume` as its only disk and no NIC: the disk is empty,
/// so SeaBIOS finds nothing to boot and retries while QEMU runs.
fn guest(name: &str, volume: &str) -> apb::VmSpec {
    apb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![apb::DiskSpec {
            source: Some(apb::disk_spec::Source::PdiskVolume(volume.into())),
            boot_index: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn create_volume(stack: &Stack, name: &str) {
    stack
        .pdiskd
        .client()
        .await
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: 64 * MIB,
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The target of the volume's export; the drop guard will log out of it.
async fn target_of(stack: &Stack, volume: &str, guard: &TestInitiator) -> String {
    let e = exports_of(stack, volume).await.remove(0);
    guard
        .nodes
        .lock()
        .unwrap()
        .push((e.target_iqn.clone(), e.portal));
    e.target_iqn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iscsi_tcp, iscsid, udevd, LVM, LIO and QEMU: the lab VM"]
async fn agentd_runs_guests_on_kernel_attached_volumes_across_crashes() {
    if stack_kind() != StackKind::LvmLio {
        eprintln!("skipped: agentd --attach kernel runs on the lvm-lio stack (scripts/lab)");
        return;
    }
    require_kernel_initiator();
    assert!(
        run("sh", &["-c", "command -v qemu-system-x86_64"])
            .status
            .success(),
        "qemu-system-x86_64 is missing (the lab image has it)"
    );
    let _iface = AGENTD_IFACE.lock().await;
    let stack = Stack::start();
    let (vol1, vol2) = ("kg1-root", "kg2-root");
    create_volume(&stack, vol1).await;
    create_volume(&stack, vol2).await;
    // Logs out of agentd's sessions and deletes their records should the
    // test fail with a guest attached (dropped after agentd and its guests).
    let guard = TestInitiator {
        iface: DEFAULT_IFACE.into(),
        iqn: INITIATOR.into(),
        nodes: Default::default(),
    };
    // agentd runs in this namespace: iscsiadm's control socket to iscsid is
    // per network namespace, and pdiskd listens on its 127.0.0.1.
    let host = NetNs::host();
    let mut agentd = Agentd::start_in_with(
        stack.scratch(),
        &host,
        &stack.pdiskd.url(),
        "stbr0",
        &["--attach", "kernel"],
    );
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("{:>7.1} s  {what}", t0.elapsed().as_secs_f64());

    let mut c = agent_client(&agentd).await;
    c.create_vm(apb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(guest("kg1", vol1)),
    })
    .await
    .unwrap();
    let vm = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    step("kg1 started");
    let first_secret = check_attached(&stack, &agentd, &vm, vol1).await;
    let target1 = target_of(&stack, vol1, &guard).await;

    // A stop detaches: QEMU gone, logged out, record and export gone.
    let stopped = c
        .stop_vm(apb::StopVmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg1".into(),
            timeout_seconds: 0,
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    step("kg1 stopped");
    assert_eq!(stopped.state(), apb::VmState::Stopped, "{stopped:?}");
    check_detached(&stack, vol1, &target1, &vm).await;

    // Started again: a new session with a new secret.
    let vm = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    step("kg1 started again");
    let secret = check_attached(&stack, &agentd, &vm, vol1).await;
    assert_ne!(secret, first_secret, "every attachment gets its own secret");
    let target1 = target_of(&stack, vol1, &guard).await;
    let dev = PathBuf::from(&vm.disks[0].attachment);
    let before = events_since(&agentd, 0).await;

    // agentd dies; the guest, its disk and the session do not.
    drop(c);
    agentd.kill9();
    step("agentd killed");
    assert!(qemu_alive(vm.pid, &vm.uuid));
    assert_eq!(sessions_to(&target1).len(), 1);
    assert!(dev.exists());
    {
        // The record holds what a restart needs: mode, LUN, device.
        let store = agent::store::AgentStore::open(&agentd.state_dir).unwrap();
        let rec = store.find_vm("kg1").unwrap();
        let rt = rec.runtime.expect("runtime of a running guest");
        assert_eq!(rt.pid, vm.pid);
        let d = &rt.disks[0];
        assert_eq!(d.mode, AttachMode::Kernel, "{d:?}");
        let k = d.kernel.as_ref().expect("the kernel LUN is recorded");
        assert_eq!(k.lun.target, target1);
        assert_eq!(k.device.as_deref(), Some(dev.as_path()));
    }

    // Restarted: the guest is adopted and keeps its session.
    agentd.restart();
    step("agentd restarted");
    let mut c = agent_client(&agentd).await;
    let got = c
        .get_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), apb::VmState::Running, "{got:?}");
    assert_eq!(got.pid, vm.pid);
    assert_eq!(got.disks[0].attachment, vm.disks[0].attachment);
    let new = events_since(&agentd, before.last().unwrap().seq).await;
    assert!(
        new.iter().any(|e| e.vm_name == "kg1"
            && e.r#type() == apb::EventType::Adopted
            && e.cause() == apb::EventCause::Reconciliation),
        "{new:?}"
    );
    assert!(
        !new.iter()
            .any(|e| e.r#type() == apb::EventType::DiskDetached),
        "{new:?}"
    );
    assert_eq!(check_attached(&stack, &agentd, &got, vol1).await, secret);
    let log = agentd.log_text();
    assert!(!log.contains("logged out of unused"), "{log}");

    // The restarted agentd attaches another guest's disk through the iface
    // the adopted guest's session uses.
    c.create_vm(apb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(guest("kg2", vol2)),
    })
    .await
    .unwrap();
    let vm2 = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    step("kg2 started");
    let secret2 = check_attached(&stack, &agentd, &vm2, vol2).await;
    let target2 = target_of(&stack, vol2, &guard).await;
    assert_eq!(check_attached(&stack, &agentd, &got, vol1).await, secret);

    // Destroyed: QEMU gone, logged out, record deleted, export gone; the
    // other guest's session stays.
    c.destroy_vm(apb::DestroyVmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: "kg1".into(),
        timeout_seconds: 1,
    })
    .await
    .unwrap();
    step("kg1 destroyed");
    let e = c
        .get_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    check_detached(&stack, vol1, &target1, &vm).await;
    assert!(!agentd.state_dir.join("vms").join(&vm.uuid).exists());
    assert_eq!(check_attached(&stack, &agentd, &vm2, vol2).await, secret2);

    // The guest dies while agentd is away: the restart records it stopped
    // and logs out of its session.
    let seen = events_since(&agentd, 0).await.last().unwrap().seq;
    drop(c);
    agentd.kill9();
    vmm::signal(vm2.pid, libc::SIGKILL);
    wait_for("kg2's QEMU to end", Duration::from_secs(60), || {
        (!qemu_alive(vm2.pid, &vm2.uuid)).then_some(())
    });
    agentd.restart();
    step("agentd restarted without kg2's QEMU");
    let mut c = agent_client(&agentd).await;
    let got2 = c
        .get_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kg2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got2.state(), apb::VmState::Stopped, "{got2:?}");
    let new = events_since(&agentd, seen).await;
    assert!(
        new.iter().any(|e| e.vm_name == "kg2"
            && e.r#type() == apb::EventType::Stopped
            && e.cause() == apb::EventCause::Reconciliation),
        "{new:?}"
    );
    check_detached(&stack, vol2, &target2, &vm2).await;
    c.destroy_vm(apb::DestroyVmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: "kg2".into(),
        timeout_seconds: 1,
    })
    .await
    .unwrap();
    step("kg2 destroyed");

    let log = agentd.log_text();
    for s in [&first_secret, &secret, &secret2] {
        assert!(
            !log.contains(s.as_str()),
            "a CHAP secret is in agentd's log"
        );
    }
    let events = events_since(&agentd, 0).await;
    use apb::EventType as T;
    for (vm, wants) in [
        (
            "kg1",
            &[
                T::DiskAttached,
                T::Running,
                T::Stopped,
                T::Adopted,
                T::DiskDetached,
                T::Destroyed,
            ][..],
        ),
        (
            "kg2",
            &[T::DiskAttached, T::Running, T::Stopped, T::Destroyed][..],
        ),
    ] {
        let kinds: Vec<_> = events
            .iter()
            .filter(|e| e.vm_name == vm)
            .map(|e| e.r#type())
            .collect();
        for want in wants {
            assert!(
                kinds.contains(want),
                "{want:?} missing from {vm}'s {kinds:?}"
            );
        }
    }
    assert_eq!(sessions_to(&target1), vec![]);
    assert_eq!(sessions_to(&target2), vec![]);
}

// ---------- mutual CHAP ----------

/// `Chap` with the target's account, as agentd's `--chap-mutual` makes it.
fn mutual(user: &str, secret: &str, target_user: &str, target_secret: &str) -> Chap {
    Chap::new(user, secret)
        .unwrap()
        .with_mutual(Chap::new(target_user, target_secret).unwrap())
        .unwrap()
}

/// Exports `volume` to `initiator` with `chap` (mutual) on the stack's pdiskd;
/// a repeated call replaces the export's CHAP (the test is an admin).
async fn export_mutual(stack: &Stack, volume: &str, initiator: &str, chap: &Chap) -> pb::Export {
    let t = chap.mutual().unwrap();
    stack
        .pdiskd
        .client()
        .await
        .export_volume(pb::ExportVolumeRequest {
            migration: false,
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            volume: volume.into(),
            initiators: vec![initiator.into()],
            chap: Some(pb::ChapCredentials {
                user: chap.user.clone(),
                secret: chap.secret().into(),
                target: Some(pb::ChapAccount {
                    user: t.user.clone(),
                    secret: t.secret().into(),
                }),
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iscsi_tcp, iscsid, udevd and an iSCSI target: the lab VM"]
async fn mutual_chap_logs_in_only_when_the_target_proves_its_secret() {
    require_kernel_initiator();
    if std::env::var("STRATUS_LAB_PORTAL").is_ok() {
        eprintln!("skipped: re-keying the target needs pdisk (not STRATUS_LAB_PORTAL)");
        return;
    }
    let ini = TestInitiator::new("km");
    let stack = Stack::start();
    create_volume(&stack, "km-vol").await;
    let secret = || Chap::random_secret().unwrap();
    let (user, initiator_secret) = ("kmutual", secret());
    let target_user = "stt-km-vol";
    let right = mutual(user, &initiator_secret, target_user, &secret());
    let e = export_mutual(&stack, "km-vol", &ini.iqn, &right).await;
    assert_eq!(e.chap_target_user, target_user, "{e:?}");
    let lun = IscsiLun::resolve(&e.portal, &e.target_iqn, e.lun)
        .await
        .unwrap();
    ini.watch(&lun);
    let k = ini.attacher();
    let g = Holder::disk(Uuid::new_v4(), "vda");

    // The target answers with the secret the initiator expects: logged in,
    // and the record asked the target to prove itself.
    let a = k.attach(&g, &lun, Some(&right)).await.unwrap();
    assert!(std::fs::metadata(&a.device)
        .unwrap()
        .file_type()
        .is_block_device());
    assert_eq!(ini.sessions(&lun.target), 1);
    let text = std::fs::read_to_string(node_record(&lun)).unwrap();
    for want in [
        format!("node.session.auth.username_in = {target_user}\n"),
        format!(
            "node.session.auth.password_in = {}\n",
            right.mutual().unwrap().secret()
        ),
        format!("node.session.auth.password = {initiator_secret}\n"),
    ] {
        assert!(text.contains(&want), "{want:?} not in the node record");
    }
    k.detach(&g, &lun).await.unwrap();
    assert_eq!(ini.sessions(&lun.target), 0);

    // The target is re-keyed on its side only: the initiator's account
    // still opens the ACL, but the target now answers the initiator's
    // challenge with another secret. The login must fail, or the initiator
    // never checked the target.
    let rekeyed = mutual(user, &initiator_secret, target_user, &secret());
    export_mutual(&stack, "km-vol", &ini.iqn, &rekeyed).await;
    let t0 = std::time::Instant::now();
    let err = k
        .attach(&g, &lun, Some(&right))
        .await
        .expect_err("logged in to a target that answered with the wrong secret");
    eprintln!(
        "login with a wrong target secret refused after {:.1} s: {err}",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        err.kind(),
        stratus_core::error::ErrorKind::Unavailable,
        "{err}"
    );
    assert!(err.message().contains("login"), "{err}");
    assert_eq!(ini.sessions(&lun.target), 0);
    assert!(
        !node_record(&lun).exists(),
        "a failed login leaves no record (with its secrets)"
    );

    // Control: with the target's new secret the same initiator gets in, so
    // what failed above was the target's answer, not the ACL or the network.
    let b = k.attach(&g, &lun, Some(&rekeyed)).await.unwrap();
    write_direct(
        &b.device,
        &pattern(0x3c),
        tempfile::tempdir().unwrap().path(),
    );
    k.detach(&g, &lun).await.unwrap();
    assert_eq!(ini.sessions(&lun.target), 0);
}

/// Files under `dir` holding any of `needles`, pushed to `hits`.
fn grep_files(dir: &Path, needles: &[&str], hits: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            grep_files(&p, needles, hits);
        } else if let Ok(bytes) = std::fs::read(&p) {
            if needles
                .iter()
                .any(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
            {
                hits.push(p);
            }
        }
    }
}

/// LIO's mutual CHAP account on the ACL of `initiator` in `target`:
/// (userid_mutual, password_mutual).
fn lio_mutual_account(target: &str, initiator: &str) -> (String, String) {
    let root = Path::new("/sys/kernel/config/target/iscsi").join(target);
    let tpg = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("tpgt_")
        })
        .unwrap_or_else(|| panic!("no TPG in {}", root.display()));
    let auth = tpg.join("acls").join(initiator).join("auth");
    let read = |a: &str| {
        std::fs::read_to_string(auth.join(a))
            .unwrap()
            .trim()
            .to_string()
    };
    (read("userid_mutual"), read("password_mutual"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iscsi_tcp, iscsid, udevd, LVM, LIO and QEMU: the lab VM"]
async fn agentd_chap_mutual_has_each_kernel_attached_disk_authenticate_its_target() {
    if stack_kind() != StackKind::LvmLio {
        eprintln!("skipped: agentd --attach kernel runs on the lvm-lio stack (scripts/lab)");
        return;
    }
    require_kernel_initiator();
    let _iface = AGENTD_IFACE.lock().await;
    let stack = Stack::start();
    let vol = "kmg-root";
    create_volume(&stack, vol).await;
    let guard = TestInitiator {
        iface: DEFAULT_IFACE.into(),
        iqn: INITIATOR.into(),
        nodes: Default::default(),
    };
    let host = NetNs::host();
    let agentd = Agentd::start_in_with(
        stack.scratch(),
        &host,
        &stack.pdiskd.url(),
        "stbr0",
        &["--attach", "kernel", "--chap-mutual"],
    );
    let mut c = agent_client(&agentd).await;
    c.create_vm(apb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(guest("kmg", vol)),
    })
    .await
    .unwrap();
    let vm = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kmg".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let secret = check_attached(&stack, &agentd, &vm, vol).await;
    let target = target_of(&stack, vol, &guard).await;

    // pdisk got the target's account: stt-VOLUME_UUID.
    let e = exports_of(&stack, vol).await.remove(0);
    let target_user = format!("stt-{}", e.volume_uuid);
    assert_eq!(e.chap_target_user, target_user, "{e:?}");
    // The node record asks the target for the very account LIO answers
    // with; its secret is fresh, not the initiator's, and nowhere else.
    let rec = node_records(&target).remove(0);
    let text = std::fs::read_to_string(&rec).unwrap();
    assert!(
        text.contains(&format!("node.session.auth.username_in = {target_user}\n")),
        "no username_in in {}",
        rec.display()
    );
    let target_secret = text
        .lines()
        .find_map(|l| l.strip_prefix("node.session.auth.password_in = "))
        .unwrap_or_else(|| panic!("no password_in in {}", rec.display()))
        .trim()
        .to_string();
    assert_eq!(target_secret.len(), 32, "a 128-bit hex secret");
    assert_ne!(target_secret, secret);
    assert_eq!(
        lio_mutual_account(&target, INITIATOR),
        (target_user.clone(), target_secret.clone())
    );
    let argv = qemu_argv(vm.pid).join(" ");
    assert!(!argv.contains(&target_secret), "on QEMU's command line");
    assert!(
        !agentd.log_text().contains(&target_secret),
        "the target's secret is in agentd's log"
    );
    let got = c
        .get_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kmg".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !format!("{got:?}").contains(&target_secret),
        "in GetVm's reply"
    );

    // agentd stores neither secret (each is drawn afresh at every start).
    let mut stored = Vec::new();
    grep_files(&agentd.state_dir, &[&secret, &target_secret], &mut stored);
    assert!(stored.is_empty(), "a CHAP secret is stored in {stored:?}");

    // Destroyed: logged out, the record with both secrets and the export gone.
    c.destroy_vm(apb::DestroyVmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: "kmg".into(),
        timeout_seconds: 1,
    })
    .await
    .unwrap();
    check_detached(&stack, vol, &target, &vm).await;
    let log = agentd.log_text();
    assert!(!log.contains(&target_secret) && !log.contains(&secret));
}

// ---------- online resize ----------

/// The size of block device `dev` in bytes (`blockdev --getsize64`).
fn getsize64(dev: &Path) -> u64 {
    let out = run("blockdev", &["--getsize64", &dev.display().to_string()]);
    assert!(out.status.success(), "blockdev: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

async fn volume_size(stack: &Stack, volume: &str) -> u64 {
    let mut c = stack.pdiskd.client().await;
    c.get_volume(pb::GetVolumeRequest {
        volume: volume.into(),
        project: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .size_bytes
}

async fn resize_disk(
    c: &mut VmServiceClient<tonic::transport::Channel>,
    size: u64,
) -> Result<apb::Vm, tonic::Status> {
    c.resize_disk(apb::ResizeDiskRequest {
        vm: "kr".into(),
        device: "vda".into(),
        size_bytes: size,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

/// Issue 15, online resize with `--attach kernel`: the volume grown under
/// a running guest, ResizeDisk rescans the host's SCSI disk (so the by-path
/// device QEMU opened has the new size) and `block_resize`s QEMU's node;
/// DISK_RESIZED. A shrink is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, iscsi_tcp, iscsid, udevd, LVM, LIO and QEMU: the lab VM"]
async fn agentd_grows_a_kernel_attached_disk_under_a_running_guest() {
    if stack_kind() != StackKind::LvmLio {
        eprintln!("skipped: agentd --attach kernel runs on the lvm-lio stack (scripts/lab)");
        return;
    }
    require_kernel_initiator();
    let _iface = AGENTD_IFACE.lock().await;
    let stack = Stack::start();
    let vol = "kr-root";
    stack
        .pdiskd
        .client()
        .await
        .create_volume(pb::CreateVolumeRequest {
            name: vol.into(),
            size_bytes: 8 * MIB,
            ..Default::default()
        })
        .await
        .unwrap();
    let guard = TestInitiator {
        iface: DEFAULT_IFACE.into(),
        iqn: INITIATOR.into(),
        nodes: Default::default(),
    };
    let host = NetNs::host();
    let mut agentd = Agentd::start_in_with(
        stack.scratch(),
        &host,
        &stack.pdiskd.url(),
        "stbr0",
        &["--attach", "kernel"],
    );
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("{:>7.1} s  {what}", t0.elapsed().as_secs_f64());
    let mut c = agent_client(&agentd).await;
    c.create_vm(apb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(guest("kr", vol)),
    })
    .await
    .unwrap();
    let vm = c
        .start_vm(apb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: "kr".into(),
        })
        .await
        .unwrap()
        .into_inner();
    step("kr started");
    check_attached(&stack, &agentd, &vm, vol).await;
    let target = target_of(&stack, vol, &guard).await;
    let dev = PathBuf::from(&vm.disks[0].attachment);
    assert_eq!(getsize64(&dev), 8 * MIB);
    let seen = events_since(&agentd, 0).await.last().unwrap().seq;

    // The storage admin grows the volume; the host's SCSI disk does not
    // know until it is rescanned.
    stack
        .pdiskd
        .client()
        .await
        .resize_volume(pb::ResizeVolumeRequest {
            volume: vol.into(),
            size_bytes: 16 * MIB,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(volume_size(&stack, vol).await, 16 * MIB);
    assert_eq!(getsize64(&dev), 8 * MIB, "rescanned before ResizeDisk");
    let grown = resize_disk(&mut c, 16 * MIB).await.unwrap();
    step("vda grown to 16 MiB");
    assert_eq!(grown.state(), apb::VmState::Running, "{grown:?}");
    assert_eq!(grown.disks[0].attachment, vm.disks[0].attachment);
    assert_eq!(getsize64(&dev), 16 * MIB, "the SCSI disk was not rescanned");
    let new = events_since(&agentd, seen).await;
    let resized: Vec<_> = new
        .iter()
        .filter(|e| e.vm_name == "kr" && e.r#type() == apb::EventType::DiskResized)
        .collect();
    assert_eq!(resized.len(), 1, "{new:?}");
    assert!(
        resized[0].detail.contains("vda") && resized[0].detail.contains("size=16777216"),
        "{resized:?}"
    );
    let seen = new.last().unwrap().seq;

    // A shrink is refused: nothing changes, nothing is journaled.
    let e = resize_disk(&mut c, 8 * MIB).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("only grow"), "{e:?}");
    assert_eq!(volume_size(&stack, vol).await, 16 * MIB);
    assert_eq!(getsize64(&dev), 16 * MIB);
    let new = events_since(&agentd, seen).await;
    assert!(
        !new.iter()
            .any(|e| e.r#type() == apb::EventType::DiskResized),
        "{new:?}"
    );

    // QEMU's node has the new size: read with query-block while agentd,
    // which holds QEMU's one QMP connection, is away.
    drop(c);
    agentd.kill9();
    let sock = agentd.state_dir.join("vms").join(&vm.uuid).join("qmp.sock");
    {
        let (qmp, _events) = agent::qmp::Qmp::connect(&sock, Duration::from_secs(30))
            .await
            .unwrap();
        let blocks = qmp.query_block().await.unwrap();
        let sizes: Vec<_> = blocks
            .iter()
            .filter_map(|b| b.inserted.as_ref())
            .map(|m| m.image.as_ref().map(|i| i.virtual_size))
            .collect();
        // The guest's one disk (no seed: the spec has no cloud-init).
        assert_eq!(sizes, vec![Some(16 * MIB)], "{blocks:?}");
    }
    step("query-block read");
    agentd.restart();
    let mut c = agent_client(&agentd).await;
    c.destroy_vm(apb::DestroyVmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: "kr".into(),
        timeout_seconds: 1,
    })
    .await
    .unwrap();
    step("kr destroyed");
    check_detached(&stack, vol, &target, &vm).await;
}
