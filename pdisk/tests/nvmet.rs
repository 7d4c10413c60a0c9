//! pdisk's nvmet exporter against the kernel's NVMe/TCP target, with the
//! kernel's NVMe/TCP host (`nvme connect`) as the client: only in the lab
//! VM (`scripts/lab`, stack lvm-lio; this host's kernel has no nvmet).
//! Data written through a connection is read back through another host's
//! connection and from the LV itself; a host that is not allowed is
//! refused; a revoked host loses its connection; unexport leaves nothing.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdisk::export::nvmet::{NvmetConfig, NvmetExporter};
use pdisk::export::{ExportSpec, Exporter};
use stratus_core::runner::HostRunner;
use stratus_core::types::Iqn;
use testkit::*;

const PREFIX: &str = "iqn.2026-11.io.stratus.nvmetlab";
const PORTAL: &str = "127.0.0.1:4421";
const HOST_A: &str = "iqn.2026-11.io.stratus.lab:host-a";
const HOST_B: &str = "iqn.2026-11.io.stratus.lab:host-b";
const MIB: usize = 1 << 20;

fn lab() -> bool {
    let yes = stack_kind() == StackKind::LvmLio;
    if !yes {
        eprintln!("skipped: nvmet runs on the lvm-lio stack (scripts/lab)");
    }
    yes
}

fn nqn(iqn: &str) -> String {
    iqn.parse::<Iqn>().unwrap().to_nqn().unwrap()
}

/// `nvme connect` as `host`; Ok(device) or Err(what nvme said).
fn connect(sub: &str, host: &str, uuid: &uuid::Uuid) -> Result<PathBuf, String> {
    let out = std::process::Command::new("nvme")
        .args(["connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4421"])
        .args(["-n", sub, "-q", &nqn(host)])
        // A refused or revoked host gives up after 2 s, not 10 min.
        .args(["-l", "2", "-c", "1"])
        .output()
        .expect("nvme (nvme-cli)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let want = format!("uuid.{uuid}");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("nvme") && !n.contains('c') {
                let w = std::fs::read_to_string(format!("/sys/block/{n}/wwid")).unwrap_or_default();
                if w.trim() == want {
                    return Ok(PathBuf::from(format!("/dev/{n}")));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("no block device with wwid {want}"))
}

fn disconnect(sub: &str) {
    let _ = std::process::Command::new("nvme")
        .args(["disconnect", "-n", sub])
        .output();
}

/// The states of the controllers connected to `sub` (as `host`).
fn controllers(sub: &str, host: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/class/nvme").unwrap().flatten() {
        let p = e.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        if read("subsysnqn").trim() == sub && read("hostnqn").trim() == nqn(host) {
            out.push(read("state").trim().to_owned());
        }
    }
    out
}

fn direct(path: &Path, write: bool) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

/// A 4 KiB-aligned buffer (O_DIRECT) of `len` bytes.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let off = v.as_ptr().align_offset(4096);
    (v, off)
}

#[test]
#[ignore = "needs root and the kernel's nvmet and nvme-tcp: run by scripts/lab"]
fn data_goes_through_nvme_tcp_and_only_allowed_hosts_get_in() {
    if !lab() {
        return;
    }
    let _ = run("modprobe", &["-a", "nvmet", "nvmet_tcp", "nvme_tcp"]);
    let pool = ThinPool::new(256);
    let lv_name = format!("nv{}", std::process::id());
    run_ok(
        "lvcreate",
        &[
            "-q",
            "-V",
            "64M",
            "-T",
            &format!("{}/{}", pool.vg, pool.pool),
            "-n",
            &lv_name,
        ],
    );
    let lv = PathBuf::from(format!("/dev/{}/{lv_name}", pool.vg));
    let exp = NvmetExporter::new(
        Arc::new(HostRunner),
        NvmetConfig {
            portal: PORTAL.into(),
            port_id: 2,
            iqn_prefix: PREFIX.into(),
            ..NvmetConfig::default()
        },
    )
    .unwrap();
    let uuid = uuid::Uuid::new_v4();
    let target: Iqn = format!("{PREFIX}:{uuid}").parse().unwrap();
    let sub = target.to_nqn().unwrap();
    let spec = |hosts: &[&str]| ExportSpec {
        target_iqn: target.clone(),
        backing_path: lv.clone(),
        initiators: hosts.iter().map(|h| h.parse().unwrap()).collect(),
        chap: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(exp.export(&spec(&[HOST_A]))).unwrap();

    // Host B is not allowed: refused.
    let e = connect(&sub, HOST_B, &uuid).unwrap_err();
    eprintln!("host B refused: {}", e.trim());
    assert!(controllers(&sub, HOST_B).is_empty());

    // Host A writes 1 MiB at 1 MiB through NVMe/TCP.
    let dev = connect(&sub, HOST_A, &uuid).unwrap();
    let (mut buf, o) = aligned(MIB);
    for (i, b) in buf[o..o + MIB].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let data = buf[o..o + MIB].to_vec();
    direct(&dev, true)
        .write_all_at(&buf[o..o + MIB], MIB as u64)
        .unwrap();
    direct(&dev, true).sync_all().unwrap();
    // The LV itself holds it.
    let (mut back, o2) = aligned(MIB);
    direct(&lv, false)
        .read_exact_at(&mut back[o2..o2 + MIB], MIB as u64)
        .unwrap();
    assert!(
        back[o2..o2 + MIB] == data[..],
        "the LV holds what host A wrote"
    );

    // Host B allowed, host A revoked: A's connection ends, B reads it back.
    rt.block_on(exp.export(&spec(&[HOST_B]))).unwrap();
    let t = Instant::now();
    while controllers(&sub, HOST_A).iter().any(|s| s == "live") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "host A still live after its revocation: {:?}",
            controllers(&sub, HOST_A)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    disconnect(&sub);
    let dev = connect(&sub, HOST_B, &uuid).unwrap();
    let (mut back, o3) = aligned(MIB);
    direct(&dev, false)
        .read_exact_at(&mut back[o3..o3 + MIB], MIB as u64)
        .unwrap();
    assert!(
        back[o3..o3 + MIB] == data[..],
        "host B reads what host A wrote"
    );
    assert!(
        connect(&sub, HOST_A, &uuid).is_err(),
        "revoked host A refused"
    );

    // Unexport: B's connection ends, nothing of ours is left in nvmet.
    rt.block_on(exp.unexport(&target)).unwrap();
    disconnect(&sub);
    let nvmet = Path::new("/sys/kernel/config/nvmet");
    assert!(!nvmet.join("subsystems").join(&sub).exists());
    for h in [HOST_A, HOST_B] {
        assert!(!nvmet.join("hosts").join(nqn(h)).exists(), "{h}");
    }
    assert!(rt.block_on(exp.list()).unwrap().is_empty());
    // Our port (id 2) has nothing linked; it is removed so the VM ends clean.
    assert!(std::fs::read_dir(nvmet.join("ports/2/subsystems"))
        .unwrap()
        .next()
        .is_none());
    std::fs::remove_dir(nvmet.join("ports/2")).unwrap();
    run_ok("lvremove", &["-q", "-y", &format!("{}/{lv_name}", pool.vg)]);
}
