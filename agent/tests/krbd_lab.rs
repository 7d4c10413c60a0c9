//! krbd in the lab (run by `scripts/lab krbd`, needs root, QEMU, Ceph and
//! the lab VM image): this host's kernel has no rbd module, the lab VM's
//! (Debian's cloud kernel) has.
//!
//! The host side ([`an_rbd_image_is_mapped_by_the_lab_vms_kernel`]): a
//! single-node Ceph cluster (testkit's) in a network namespace, bound to the
//! address of the namespace's tap; a pool, an RBD user limited to it, and a
//! pdisk-named image holding a pattern. The lab VM boots on that tap and
//! runs the VM side ([`krbd_in_the_vm`]): agentd's [`KrbdAttacher`] with the
//! real kernel maps the image (modprobe rbd, add_single_major with the key
//! in the process keyring), reads the host's pattern through /dev/rbdN,
//! writes its own, and walks what an agentd restart does (a recorded
//! mapping is adopted and re-found, not mapped twice; one no record names
//! is reaped) and the detach (unmapped). Back on the host, `rbd export`
//! reads the VM's pattern.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use agent::attach::{Holder, KrbdAttacher, KrbdDisk, KrbdOptions, SysfsKernel};
use agent::rbd::{CephClient, RbdDisk};
use stratus_core::runner::HostRunner;
use stratus_proto::pdisk::v1 as pdpb;
use testkit::*;

const TAP: &str = "krbdtap0";
const HOST_IP: &str = "10.78.0.1";
const HOST_ADDR: &str = "10.78.0.1/24";
const VM_ADDR: &str = "10.78.0.2/24";
const POOL: &str = "stratus";
const USER: &str = "compute";
const MIB: usize = 1 << 20;

/// `len` bytes of a pattern named by `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

#[test]
#[ignore = "needs root, QEMU, Ceph and the lab VM image: run by scripts/lab krbd"]
fn an_rbd_image_is_mapped_by_the_lab_vms_kernel() {
    let dir = tempfile::Builder::new()
        .prefix("stratus-krbd-")
        .tempdir()
        .unwrap();
    let ns = NetNs::new();
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    ns.ip(&["addr", "add", HOST_ADDR, "dev", TAP]);
    ns.ip(&["link", "set", TAP, "up"]);
    let t0 = Instant::now();
    let ceph = CephCluster::start_in_at(&ns, HOST_IP.parse().unwrap());
    eprintln!(
        "ceph up at {} in {:.1} s",
        ceph.mon_addrs,
        ceph.startup.as_secs_f64()
    );
    ceph.create_pool(POOL);
    let keyring = ceph.create_rbd_user(USER, POOL);
    let image = format!("pd-vol-{}", uuid::Uuid::new_v4());
    // The host's pattern, written before the VM maps it.
    let before = dir.path().join("before.raw");
    std::fs::write(&before, pattern(1, MIB)).unwrap();
    let spec = format!("{POOL}/{image}");
    ceph.rbd(&["import", "--no-progress", before.to_str().unwrap(), &spec]);
    ceph.rbd(&["resize", "--no-progress", &spec, "--size", "64M"]);

    // What the VM side needs: the export as pdiskd would answer it, and
    // the host's keyring of the user (the VM is the compute host).
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::copy(&keyring, files.join(format!("ceph.client.{USER}.keyring"))).unwrap();
    let export = serde_json::json!({
        "monitors": [ceph.mon_v1.to_string()],
        "pool": POOL,
        "image": image,
        "user": USER,
        "fsid": ceph.fsid,
    });
    std::fs::write(files.join("export.json"), export.to_string()).unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let console = dir.path().join("console.log");
    let mut child = Command::new(root.join("scripts/lab"))
        .args(["krbd-vm", &ns.name, TAP, VM_ADDR])
        .env("STRATUS_LAB_NOBUILD", "1")
        .env("STRATUS_LAB_FILES", &files)
        .current_dir(&root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut log = std::fs::File::create(&console).unwrap();
    let mut ok = false;
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        let _ = writeln!(log, "{line}");
        if line.starts_with("KRBD-LAB") || line.contains("panicked") {
            eprintln!("vm: {line}");
        }
        ok |= line == "KRBD-LAB ok";
    }
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        ok && status.success(),
        "the VM side failed ({status}):\n{text}\n{}",
        ceph.log_tails()
    );
    // The VM's pattern, read back by the cluster.
    let after = dir.path().join("after.raw");
    ceph.rbd(&[
        "export",
        "--no-progress",
        &format!("{POOL}/{image}"),
        after.to_str().unwrap(),
    ]);
    let mut got = vec![0u8; MIB];
    std::fs::File::open(&after)
        .unwrap()
        .read_exact(&mut got)
        .unwrap();
    assert!(
        got == pattern(2, MIB),
        "the VM's writes are not in the image"
    );
    eprintln!("krbd lab: passed in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The VM side; does nothing unless scripts/lab's krbd-vm run asks.
#[test]
#[ignore = "the lab VM's side of an_rbd_image_is_mapped_by_the_lab_vms_kernel"]
fn krbd_in_the_vm() {
    let Some(files) = std::env::var_os("STRATUS_KRBD_FILES").map(PathBuf::from) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(vm_side(&files));
    println!("KRBD-LAB ok");
}

async fn vm_side(files: &Path) {
    let e: serde_json::Value =
        serde_json::from_slice(&std::fs::read(files.join("export.json")).unwrap()).unwrap();
    let s = |k: &str| e[k].as_str().unwrap().to_string();
    let attachment = pdpb::RbdAttachment {
        monitors: e["monitors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect(),
        pool: s("pool"),
        image: s("image"),
        user: s("user"),
        secret_ref: format!("keyring:client.{}", s("user")),
        cluster_fsid: s("fsid"),
    };
    let keyring = files.join(format!("ceph.client.{USER}.keyring"));
    let key_text = std::fs::read_to_string(&keyring).unwrap();
    let key = key_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .unwrap()
        .to_string();
    let client = CephClient {
        keyring: Some(keyring),
        ..Default::default()
    };
    let disk = RbdDisk::from_attachment(&attachment, &client).unwrap();
    let record = KrbdDisk {
        pool: disk.pool.clone(),
        image: disk.image.clone(),
        fsid: attachment.cluster_fsid.clone(),
        device: None,
    };
    let fsid = attachment.cluster_fsid.as_str();
    let new_attacher = || {
        KrbdAttacher::new(
            Arc::new(HostRunner),
            Arc::new(SysfsKernel),
            KrbdOptions::default(),
        )
    };
    let holder = Holder::disk(uuid::Uuid::from_bytes([7; 16]), "vda");
    let mappings = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir("/sys/bus/rbd/devices")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };

    let a = new_attacher();
    assert!(a.available().await, "modprobe rbd in the lab VM");
    let t = Instant::now();
    let dev = a.attach(&holder, &disk, fsid).await.unwrap();
    println!(
        "KRBD-LAB mapped {} as {} in {:.2} s",
        record,
        dev.display(),
        t.elapsed().as_secs_f64()
    );
    assert!(std::fs::metadata(&dev)
        .unwrap()
        .file_type()
        .is_block_device());
    let ids = mappings();
    assert_eq!(ids.len(), 1, "{ids:?}");
    // The request named the key by reference; the key is nowhere in sysfs.
    let info =
        std::fs::read_to_string(format!("/sys/bus/rbd/devices/{}/config_info", ids[0])).unwrap();
    assert!(
        info.contains(&format!("key=stratus.client.{USER}")),
        "{info}"
    );
    assert!(!info.contains(&key), "config_info holds the key");
    // ... nor in the process keyring after the map.
    let keys = std::fs::read_to_string("/proc/keys").unwrap_or_default();
    assert!(!keys.contains("stratus.client"), "{keys}");

    // The host's pattern, read through the kernel; then the VM's.
    let mut got = vec![0u8; MIB];
    std::fs::File::open(&dev)
        .unwrap()
        .read_exact(&mut got)
        .unwrap();
    assert!(
        got == pattern(1, MIB),
        "the host's pattern is not on {dev:?}"
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all(&pattern(2, MIB)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    println!(
        "KRBD-LAB read the host's MiB and wrote the VM's through {}",
        dev.display()
    );

    // agentd restarts: the guest's record is adopted, nothing is reaped,
    // and its start finds the same device without a second map.
    let b = new_attacher();
    b.adopt(holder.clone(), &record).await;
    assert_eq!(b.reap().await, Vec::new());
    let again = b.attach(&holder, &disk, fsid).await.unwrap();
    assert_eq!(again, dev);
    assert_eq!(mappings(), ids);
    println!("KRBD-LAB after a restart: the recorded mapping was kept and re-found");

    // A restart with no record of it (a crash before the record was
    // committed cannot happen, but a record lost with its guest can):
    // reaped, with a line saying so.
    let c = new_attacher();
    let report = c.reap().await;
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(
        report[0].as_ref().unwrap().contains(&record.image),
        "{report:?}"
    );
    assert!(mappings().is_empty(), "{:?}", mappings());
    println!("KRBD-LAB a mapping no record names was reaped: {report:?}");

    // Map again, detach: unmapped.
    let dev = c.attach(&holder, &disk, fsid).await.unwrap();
    assert_eq!(mappings().len(), 1);
    c.detach(&holder, &record).await.unwrap();
    assert!(mappings().is_empty());
    assert!(!dev.exists());
    println!("KRBD-LAB detach unmapped {}", dev.display());
}
