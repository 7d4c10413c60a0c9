//! Disk QoS measured, not assumed: the throttle group and `throttle` node
//! agentd gives a disk (built by agentd's own code, `agent::vmm::blockdev`
//! and `agent::qos::PlannedQos`, not copied strings) are served by a real
//! `qemu-storage-daemon` over NBD on a unix socket, and `qemu-img bench`
//! hammers them: the achieved IOPS (and bytes per second) must stay within
//! 10% of the limit. A measurement of QEMU's throttling through agentd's
//! configuration: the test asserts a ratio to the limit, no timing of our
//! code. (`qemu-img bench` of QEMU 7.2 has no `--object`, hence the
//! daemon.) Run by scripts/test's integration tier (QEMU only, no root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::qos::{Bucket, DiskQos, Limits, PlannedQos};
use agent::vmm::{DiskBackend, DiskSink, PlannedDisk};

/// Files by path (qemu-storage-daemon opens them itself here).
struct Paths;

impl DiskSink for Paths {
    fn file(
        &mut self,
        path: &Path,
        _writable: bool,
        _node: &str,
    ) -> stratus_core::error::Result<String> {
        Ok(path.display().to_string())
    }
    fn secret(&mut self, _: &str, _: &[u8], _: &str) -> stratus_core::error::Result<()> {
        unreachable!("raw files have no secrets")
    }
    fn memfd_path(&mut self, _: &[u8]) -> stratus_core::error::Result<String> {
        unreachable!("raw files have no conf")
    }
}

/// A qemu-storage-daemon exporting disk `vda` (a raw file) with `limits`
/// over NBD; killed on drop.
struct Served {
    child: Child,
    socket: PathBuf,
}

impl Served {
    fn start(dir: &Path, name: &str, limits: Limits) -> Served {
        let image = dir.join(format!("{name}.img"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let qos = PlannedQos::of(
            &DiskQos {
                limits,
                group: None,
            },
            "vda",
        );
        let disk = PlannedDisk {
            device: "vda".into(),
            backend: DiskBackend::RawFile { path: image },
            read_only: false,
            boot_index: 0,
            qos: Some(qos.clone()),
        };
        let node = agent::vmm::blockdev(
            &disk,
            &agent::disk_io::DiskIo::measured_default(false),
            &mut Paths,
        )
        .unwrap();
        let socket = dir.join(format!("{name}.sock"));
        let child = Command::new("qemu-storage-daemon")
            .arg("--object")
            .arg(qos.group_object().to_string())
            .arg("--blockdev")
            .arg(node.to_string())
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args(["--export", "type=nbd,id=e,node-name=vda,writable=on"])
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-system-common)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no NBD socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        Served { child, socket }
    }

    /// `qemu-img bench` of `count` writes of `size` bytes, 4 in flight:
    /// the seconds it took.
    fn bench(&self, count: u32, size: u64) -> f64 {
        let url = format!("nbd+unix:///vda?socket={}", self.socket.display());
        let t = Instant::now();
        let out = Command::new("qemu-img")
            .args(["bench", "-f", "raw", "-w", "-d", "4"])
            .args(["-c", &count.to_string(), "-s", &size.to_string()])
            .arg(&url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        t.elapsed().as_secs_f64()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn limit(avg: u64) -> Bucket {
    Bucket {
        avg,
        ..Default::default()
    }
}

#[test]
#[ignore = "needs QEMU (qemu-storage-daemon, qemu-img): run by scripts/test"]
fn a_throttled_disk_gets_its_iops_and_bytes_per_second_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    // 200 IOPS for ~5 s.
    let s = Served::start(
        dir.path(),
        "iops",
        Limits {
            iops_total: limit(200),
            ..Default::default()
        },
    );
    let iops = 1000.0 / s.bench(1000, 4096);
    let ratio = iops / 200.0;
    eprintln!("iops limit 200: achieved {iops:.1} IOPS, ratio {ratio:.3}");
    assert!((0.9..=1.1).contains(&ratio), "{iops} IOPS against 200");
    drop(s);
    // 4 MiB/s of writes for ~5 s, in 256 KiB writes.
    let s = Served::start(
        dir.path(),
        "bps",
        Limits {
            bps_write: limit(4 << 20),
            ..Default::default()
        },
    );
    let bps = (80.0 * 256.0 * 1024.0) / s.bench(80, 256 << 10);
    let ratio = bps / f64::from(4u32 << 20);
    eprintln!("bps_write limit 4 MiB/s: achieved {bps:.0} B/s, ratio {ratio:.3}");
    assert!((0.9..=1.1).contains(&ratio), "{bps} B/s against 4 MiB/s");
}
