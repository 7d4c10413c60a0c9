//! Scenario "rbd": pdiskd's rbd backend on a single-node Ceph cluster
//! (testkit's CephCluster: one monitor, one memstore OSD, cephx, loopback),
//! in four parts, each with a peer measured in the same run:
//!
//! 1. Data path: QEMU's rbd driver (`qemu-img bench` on an `rbd:` filename,
//!    the block layer a guest's virtio-blk requests go through, with
//!    librbd's cache as agentd opens it, `cache.direct=off`) against
//!    librbd alone on the same image (`rbd bench`, the peer; ratio = QEMU /
//!    rbd bench). Sequential 128 KiB and 4 KiB reads and writes with 32
//!    requests in flight (`qemu-img bench -d 32`, `rbd bench --io-threads
//!    32 --io-pattern seq`), on a 256 MiB image written in full first. The
//!    two tools' runs alternate, each figure the median of 3 (1 with
//!    `--quick`). memstore keeps the data in the OSD's memory: these are
//!    the client and messenger paths, not a disk's speed.
//! 2. Snapshot and clone latency through pdiskd's gRPC API, for 1, 10 and
//!    100 GiB volumes holding 64 MiB of data spread across them (written
//!    through QEMU's rbd driver), as the file scenario measures: each size
//!    against the 1 GiB figure (1.00x = no growth with the size).
//! 3. The storage half of a boot storm: 30 clones (`--bulk N`; 3 with
//!    `--quick`) of one image base at once (what agentd asks pdisk for each
//!    guest: an RBD clone of the base's `pd-base` snapshot), then a first
//!    read of 4 MiB of each through QEMU's rbd driver at once (what a
//!    booting guest reads first), against one clone and one read alone.
//! 4. The boot storm with real guests: the bulk scenario's launch
//!    (`bulk::measure`: one guest alone, then N at once — 30, `--bulk N`, 3
//!    with `--quick` — to RUNNING and to `ready` on the console) through a
//!    real agentd whose pdiskd runs on a second micro-cluster inside the
//!    guests' namespace (`GuestHost::start_rbd`): each guest's disk an RBD
//!    clone of the image base, attached by QEMU's rbd driver. Under TCG on
//!    a small host this measures the CPU as much as the storage; the bulk
//!    scenario is the same launch over iSCSI.

use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use stratus_proto::pdisk::v1 as pb;
use testkit::{CephCluster, Client, Pdiskd};

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "rbd";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const POOL: &str = "bench";
/// The data path's image.
const DP_IMAGE: &str = "datapath";
const DP_SIZE: u64 = 256 * MIB;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let mut figs = storage(ctx).await?;
    figs.extend(boot_storm(ctx)?);
    Ok(figs)
}

/// Parts 1 to 3, on a cluster of their own (gone before part 4 starts).
async fn storage(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let scratch = tempfile::Builder::new()
        .prefix("rbd-")
        .tempdir_in(&ctx.work)?;
    let (ceph, pdiskd) = tokio::task::block_in_place(|| {
        let ceph = CephCluster::start();
        eprintln!(
            "  ceph micro-cluster up in {:.1} s",
            ceph.startup.as_secs_f64()
        );
        ceph.create_pool(POOL);
        let keyring = ceph.create_rbd_user("pdisk", POOL);
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
            keyring.to_str().unwrap(),
            "--max-overcommit",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pdiskd = Pdiskd::start_on(
            scratch.path(),
            scratch.path(),
            scratch.path().join("unused-pool-dir"),
            None,
            args,
        );
        (ceph, pdiskd)
    });
    let mut figs = tokio::task::block_in_place(|| datapath(ctx, &ceph))?;
    let mut c = pdiskd.client().await;
    figs.extend(
        latency(ctx, &ceph, &mut c)
            .await
            .with_context(|| format!("pdiskd log: {}", pdiskd.log.display()))?,
    );
    figs.extend(
        storm(ctx, &ceph, &mut c)
            .await
            .with_context(|| format!("pdiskd log: {}", pdiskd.log.display()))?,
    );
    Ok(figs)
}

/// One sequential case of the data path.
struct Case {
    read: bool,
    block: u64,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "seq {} {}k qd32",
            if self.read { "read" } else { "write" },
            self.block / 1024
        )
    }

    /// Requests per run: the whole image at 128 KiB, a quarter at 4 KiB.
    fn count(&self, quick: bool) -> u64 {
        let bytes = if self.block >= 128 * 1024 {
            DP_SIZE
        } else {
            DP_SIZE / 4
        };
        let n = bytes / self.block;
        if quick {
            n / 16
        } else {
            n
        }
    }

    /// MB/s for 128 KiB, IOPS for 4 KiB.
    fn unit(&self) -> &'static str {
        if self.block >= 128 * 1024 {
            "MB/s"
        } else {
            "IOPS"
        }
    }

    fn value(&self, count: u64, secs: f64) -> f64 {
        if self.block >= 128 * 1024 {
            (count * self.block) as f64 / secs / 1e6
        } else {
            count as f64 / secs
        }
    }
}

fn datapath(ctx: &Ctx, ceph: &CephCluster) -> anyhow::Result<Vec<Figure>> {
    ceph.rbd(&["create", "--size", "256M", &format!("{POOL}/{DP_IMAGE}")]);
    // Written in full first, so reads hit objects that exist.
    rbd_bench(ceph, "write", 4 * MIB, DP_SIZE)?;
    let url = ceph.qemu_url(POOL, DP_IMAGE);
    let runs = if ctx.quick { 1 } else { 3 };
    let mut out = Vec::new();
    for read in [true, false] {
        for block in [128 * 1024, 4096] {
            let case = Case { read, block };
            let count = case.count(ctx.quick);
            let (mut qemu, mut rbd) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let s = qemu_bench(&url, &case, count)?;
                qemu.push(case.value(count, s));
                let ops = rbd_bench(
                    ceph,
                    if read { "read" } else { "write" },
                    block,
                    count * block,
                )?;
                rbd.push(if block >= 128 * 1024 {
                    ops * block as f64 / 1e6
                } else {
                    ops
                });
            }
            let (q, r) = (percentile(&qemu, 50.0), percentile(&rbd, 50.0));
            eprintln!(
                "  {}: QEMU rbd driver {q:.0} {u}, rbd bench {r:.0} {u}",
                case.label(),
                u = case.unit()
            );
            out.push(
                Figure::new(
                    SCENARIO,
                    &format!("{} (QEMU rbd driver)", case.label()),
                    case.unit(),
                    q,
                )
                .with_samples(qemu)
                .against(&format!("{} (rbd bench)", case.label()), r)
                .with_peer_samples(rbd),
            );
        }
    }
    ceph.rbd(&["rm", "--no-progress", &format!("{POOL}/{DP_IMAGE}")]);
    Ok(out)
}

/// `qemu-img bench` of `count` requests on `url`; seconds.
fn qemu_bench(url: &str, case: &Case, count: u64) -> anyhow::Result<f64> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw", "-t", "writeback", "-d", "32"])
        .args(["-c", &count.to_string(), "-s", &case.block.to_string()]);
    if !case.read {
        cmd.arg("-w");
    }
    let out = cmd.arg(url).output().context("cannot run qemu-img")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "qemu-img bench on {url}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse::<f64>()
                .ok()
        })
        .with_context(|| format!("no run time in qemu-img bench output: {text}"))
}

/// `rbd bench` of `total` bytes in `size` requests, 32 in flight,
/// sequential; its ops/sec.
fn rbd_bench(ceph: &CephCluster, io: &str, size: u64, total: u64) -> anyhow::Result<f64> {
    let out = ceph.rbd(&[
        "bench",
        "--io-type",
        io,
        "--io-size",
        &size.to_string(),
        "--io-threads",
        "32",
        "--io-total",
        &total.to_string(),
        "--io-pattern",
        "seq",
        &format!("{POOL}/{DP_IMAGE}"),
    ]);
    parse_rbd_bench(&out)
}

/// `rbd bench` ends with `elapsed: 1   ops: 2048   ops/sec: 1234.5 ...`.
fn parse_rbd_bench(out: &str) -> anyhow::Result<f64> {
    out.lines()
        .rev()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("elapsed:")?;
            let (_, after) = rest.split_once("ops/sec:")?;
            after.split_whitespace().next()?.parse::<f64>().ok()
        })
        .with_context(|| format!("no ops/sec in rbd bench output: {out}"))
}

/// Part 2: snapshot and clone latency per volume size.
async fn latency(ctx: &Ctx, ceph: &CephCluster, c: &mut Client) -> anyhow::Result<Vec<Figure>> {
    let (sizes, runs): (&[u64], usize) = if ctx.quick {
        (&[1, 10], 2)
    } else {
        (&[1, 10, 100], 10)
    };
    let mut measured = Vec::new();
    for &gib in sizes {
        let name = format!("bench-{gib}g");
        let v = c
            .create_volume(pb::CreateVolumeRequest {
                name: name.clone(),
                size_bytes: gib * GIB,
                ..Default::default()
            })
            .await?
            .into_inner();
        tokio::task::block_in_place(|| {
            write_spread(ceph, &format!("pd-vol-{}", v.uuid), gib * GIB)
        })?;
        let m = super::snapshot::measure_pairs(c, &name, gib, runs).await?;
        eprintln!(
            "  {gib} GiB: snapshot p50 {:.1} ms, clone p50 {:.1} ms",
            percentile(&m.snapshot, 50.0),
            percentile(&m.clone, 50.0)
        );
        measured.push(m);
        c.delete_volume(pb::DeleteVolumeRequest {
            volume: name,
            ..Default::default()
        })
        .await?;
    }
    let mut figs = super::snapshot::figures(&measured);
    for f in &mut figs {
        f.scenario = SCENARIO.into();
        f.name = format!("{} on rbd", f.name);
        if let Some(p) = &mut f.peer {
            *p = format!("{p} on rbd");
        }
    }
    Ok(figs)
}

/// 64 pieces of 1 MiB spread evenly across the image, one qemu-io.
fn write_spread(ceph: &CephCluster, image: &str, size: u64) -> anyhow::Result<()> {
    let stride = size / 64 / MIB * MIB;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..64 {
        cmd.args(["-c", &format!("write -P {} {} 1M", i + 1, i * stride)]);
    }
    let out = cmd.arg(ceph.qemu_url(POOL, image)).output()?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-io writing {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Part 3: N clones of one image base at once, then a first read of each.
async fn storm(ctx: &Ctx, ceph: &CephCluster, c: &mut Client) -> anyhow::Result<Vec<Figure>> {
    let n = ctx.bulk.unwrap_or(if ctx.quick { 3 } else { 30 });
    let base = c
        .create_volume(pb::CreateVolumeRequest {
            name: "storm-base".into(),
            size_bytes: GIB,
            labels: [("stratus.io/image-sha256".to_string(), "cd".repeat(32))].into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    // The image's first 32 MiB hold data, as a small OS image's do.
    tokio::task::block_in_place(|| {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 32M"])
            .arg(ceph.qemu_url(POOL, &format!("pd-vol-{}", base.uuid)))
            .output()?;
        anyhow::ensure!(out.status.success(), "qemu-io writing the base");
        Ok(())
    })?;
    let clone = |c: &Client, name: String| {
        let mut c = c.clone();
        async move {
            let t = Instant::now();
            let v = c
                .clone_volume(pb::CloneVolumeRequest {
                    source: "storm-base".into(),
                    name,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>((t.elapsed().as_secs_f64() * 1e3, v))
        }
    };
    // One alone first (it also takes the base's pd-base snapshot): the peer.
    let (_, first) = clone(c, "storm-first".into()).await?;
    let (alone_ms, alone) = clone(c, "storm-alone".into()).await?;
    let read_alone = read_first(ceph, &alone).await?;

    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(clone(c, format!("storm-{i}"))))
        .collect();
    let mut each = Vec::new();
    let mut vols = Vec::new();
    for task in tasks {
        let (ms, v) = task.await??;
        each.push(ms);
        vols.push(v);
    }
    let all_ms = t.elapsed().as_secs_f64() * 1e3;
    let ceph_conf = ceph.conf.clone();
    let t = Instant::now();
    let reads: Vec<_> = vols
        .iter()
        .map(|v| {
            let url = format!(
                "rbd:{POOL}/pd-vol-{}:id=admin:conf={}",
                v.uuid,
                ceph_conf.display()
            );
            tokio::task::spawn_blocking(move || read_url(&url))
        })
        .collect();
    let mut read_each = Vec::new();
    for r in reads {
        read_each.push(r.await??);
    }
    let read_all_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "  {n} clones at once: {all_ms:.0} ms (one alone {alone_ms:.0} ms); \
         {n} first reads at once: {read_all_ms:.0} ms (one alone {read_alone:.0} ms)"
    );
    // Clean up: clones first, then the base (and its pd-base snapshot).
    for v in vols.iter().chain([&alone, &first]) {
        c.delete_volume(pb::DeleteVolumeRequest {
            volume: v.uuid.clone(),
            ..Default::default()
        })
        .await?;
    }
    c.delete_volume(pb::DeleteVolumeRequest {
        volume: "storm-base".into(),
        ..Default::default()
    })
    .await?;
    let alone_peer = "one clone alone";
    let read_peer = "one first read alone";
    Ok(vec![
        Figure::new(
            SCENARIO,
            &format!("{n} clones of an image base at once: all done"),
            "ms",
            all_ms,
        )
        .against(&format!("{n} x {alone_peer}"), alone_ms * n as f64),
        Figure::new(
            SCENARIO,
            &format!("{n} clones at once: p50 of each"),
            "ms",
            percentile(&each, 50.0),
        )
        .with_samples(each.clone())
        .against(alone_peer, alone_ms),
        Figure::new(
            SCENARIO,
            &format!("{n} clones at once: p95 of each"),
            "ms",
            percentile(&each, 95.0),
        )
        .with_samples(each)
        .against(alone_peer, alone_ms),
        Figure::new(
            SCENARIO,
            &format!("{n} first reads of 4 MiB at once (QEMU rbd driver): all done"),
            "ms",
            read_all_ms,
        )
        .with_samples(read_each)
        .against(read_peer, read_alone),
    ])
}

/// A first read of 4 MiB of a clone (parent blocks) through QEMU's rbd
/// driver, as a booting guest's; ms, including QEMU's connection set-up.
async fn read_first(ceph: &CephCluster, v: &pb::Volume) -> anyhow::Result<f64> {
    let url = ceph.qemu_url(POOL, &format!("pd-vol-{}", v.uuid));
    tokio::task::spawn_blocking(move || read_url(&url)).await?
}

fn read_url(url: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -P 0x5a 0 4M", url])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io read of {url}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Part 4: the boot storm with real guests: the bulk scenario's launch (one
/// guest alone, then N at once, to RUNNING and to `ready` on the console)
/// on a host whose pdiskd runs on Ceph, every guest's disk an RBD clone of
/// the image base attached by QEMU's rbd driver.
fn boot_storm(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let n = ctx.bulk.unwrap_or(if ctx.quick { 3 } else { 30 });
    let limit = std::time::Duration::from_secs(if ctx.quick { 120 } else { 300 });
    tokio::task::block_in_place(|| {
        let host = super::guests::GuestHost::start_rbd();
        let image = host.image.clone();
        let pid = host.agentd_pid()?;
        let m = host
            .run(move |url| super::bulk::measure(url, image, n, pid, limit))
            .with_context(|| host.agentd_log_tail())?;
        Ok(super::bulk::figures(
            SCENARIO,
            "boot storm (RBD clones): ",
            &m,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbd_bench_output_gives_ops_per_second() {
        // rbd 16.2.15's closing line.
        let out = "bench  type write io_size 131072 io_threads 32 bytes 268435456 pattern sequential\n  SEC       OPS   OPS/SEC   BYTES/SEC\n    1      1600   1612.33   201 MiB/s\nelapsed: 1   ops: 2048   ops/sec: 1573.29   bytes/sec: 197 MiB/s\n";
        assert_eq!(parse_rbd_bench(out).unwrap(), 1573.29);
        assert!(parse_rbd_bench("nothing").is_err());
    }

    #[test]
    fn cases_count_requests_and_convert_units() {
        let c = Case {
            read: true,
            block: 128 * 1024,
        };
        assert_eq!(c.count(false), 2048);
        assert_eq!(c.value(2048, 1.0), 268.435456);
        let c = Case {
            read: false,
            block: 4096,
        };
        assert_eq!(c.count(false), 16384);
        assert_eq!(c.label(), "seq write 4k qd32");
        assert_eq!((c.unit(), c.value(1000, 2.0)), ("IOPS", 500.0));
    }
}
