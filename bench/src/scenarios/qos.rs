//! Scenario: disk QoS (issue 15). Two disks side by side, each a raw file
//! on the work directory served by its own `qemu-storage-daemon` over NBD
//! with the nodes agentd gives a disk (`agent::vmm::blockdev`,
//! `agent::qos::PlannedQos`): one throttled to 200 IOPS, one in an
//! unlimited throttle group (what every disk without limits gets). Both
//! are hammered at once by `qemu-img bench` (4 KiB writes, 4 in flight);
//! the throttled one is reported against its limit, the unlimited one
//! against a disk with no throttle node at all, hammered alone in the same
//! run (the cost of the node every disk now has). Then 4 MiB/s of writes
//! (256 KiB each) against their limit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::qos::{Bucket, DiskQos, Limits, PlannedQos};
use agent::vmm::{DiskBackend, DiskSink, PlannedDisk};
use anyhow::{bail, Context as _};

use super::Ctx;
use crate::report::Figure;

const SCENARIO: &str = "disk QoS";
const IOPS_LIMIT: u64 = 200;
const BPS_LIMIT: u64 = 4 << 20;

/// Files by path: the daemon opens them itself.
struct Paths;

impl DiskSink for Paths {
    fn file(&mut self, path: &Path, _: bool, _: &str) -> stratus_core::error::Result<String> {
        Ok(path.display().to_string())
    }
    fn secret(&mut self, _: &str, _: &[u8], _: &str) -> stratus_core::error::Result<()> {
        Err(stratus_core::error::Error::internal("no secrets here"))
    }
    fn memfd_path(&mut self, _: &[u8]) -> stratus_core::error::Result<String> {
        Err(stratus_core::error::Error::internal("no conf here"))
    }
}

/// A qemu-storage-daemon exporting disk `vda` over NBD; killed on drop.
struct Served {
    child: Child,
    socket: PathBuf,
}

impl Served {
    /// `qos`: None = no throttle node at all.
    fn start(dir: &Path, name: &str, qos: Option<Limits>) -> anyhow::Result<Served> {
        let image = dir.join(format!("qos-{name}.img"));
        std::fs::File::create(&image)?.set_len(256 << 20)?;
        let qos = qos.map(|limits| {
            PlannedQos::of(
                &DiskQos {
                    limits,
                    group: None,
                },
                "vda",
            )
        });
        let disk = PlannedDisk {
            device: "vda".into(),
            backend: DiskBackend::RawFile { path: image },
            read_only: false,
            boot_index: 0,
            qos: qos.clone(),
        };
        let node = agent::vmm::blockdev(
            &disk,
            &agent::disk_io::DiskIo::measured_default(false),
            &mut Paths,
        )?;
        let socket = dir.join(format!("qos-{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-storage-daemon");
        if let Some(q) = &qos {
            cmd.arg("--object").arg(q.group_object().to_string());
        }
        let child = cmd
            .arg("--blockdev")
            .arg(node.to_string())
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .args(["--export", "type=nbd,id=e,node-name=vda,writable=on"])
            .stdout(Stdio::null())
            .spawn()
            .context("qemu-storage-daemon")?;
        let served = Served { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !served.socket.exists() {
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon made no NBD socket");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(served)
    }

    /// `qemu-img bench`: `count` writes of `size` bytes, 4 in flight; the
    /// rate achieved (per second).
    fn bench(&self, count: u32, size: u64) -> anyhow::Result<f64> {
        let url = format!("nbd+unix:///vda?socket={}", self.socket.display());
        let t = Instant::now();
        let out = Command::new("qemu-img")
            .args(["bench", "-f", "raw", "-w", "-d", "4"])
            .args(["-c", &count.to_string(), "-s", &size.to_string()])
            .arg(&url)
            .output()?;
        if !out.status.success() {
            bail!("qemu-img bench: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(f64::from(count) / t.elapsed().as_secs_f64())
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

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    tokio::task::block_in_place(|| measure(ctx))
}

fn measure(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    // Throttled writes for ~1.5 s (quick) or ~10 s; the free disks as
    // many as they do meanwhile, about.
    let (throttled_n, free_n, bps_n) = if ctx.quick {
        (300, 3000, 24)
    } else {
        (2000, 20000, 160)
    };
    let dir = &ctx.work;
    let plain = Served::start(dir, "plain", None)?;
    let plain_iops = plain.bench(free_n, 4096)?;
    drop(plain);
    let throttled = Served::start(
        dir,
        "throttled",
        Some(Limits {
            iops_total: limit(IOPS_LIMIT),
            ..Default::default()
        }),
    )?;
    let free = Served::start(dir, "free", Some(Limits::default()))?;
    let (throttled_iops, free_iops) = std::thread::scope(|s| {
        let t = s.spawn(|| throttled.bench(throttled_n, 4096));
        let f = free.bench(free_n, 4096);
        (t.join().expect("bench thread"), f)
    });
    let (throttled_iops, free_iops) = (throttled_iops?, free_iops?);
    drop((throttled, free));
    let bps = Served::start(
        dir,
        "bps",
        Some(Limits {
            bps_write: limit(BPS_LIMIT),
            ..Default::default()
        }),
    )?;
    let bps_rate = bps.bench(bps_n, 256 << 10)? * f64::from(256u32 << 10);
    drop(bps);
    eprintln!(
        "  throttled {throttled_iops:.0} IOPS (limit {IOPS_LIMIT}), next to it unlimited \
         {free_iops:.0} IOPS; no throttle node {plain_iops:.0} IOPS; bps {bps_rate:.0} B/s"
    );
    Ok(vec![
        Figure::new(
            SCENARIO,
            "4k writes qd4, throttled disk",
            "IOPS",
            throttled_iops,
        )
        .against("its iops_total limit", IOPS_LIMIT as f64),
        Figure::new(
            SCENARIO,
            "4k writes qd4, unlimited throttle node, next to the throttled disk",
            "IOPS",
            free_iops,
        )
        .against("no throttle node, alone", plain_iops),
        Figure::new(
            SCENARIO,
            "256k writes qd4, bps_write-limited disk",
            "MiB/s",
            bps_rate / f64::from(1u32 << 20),
        )
        .against(
            "its bps_write limit",
            BPS_LIMIT as f64 / f64::from(1u32 << 20),
        ),
    ])
}
