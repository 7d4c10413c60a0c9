//! Scenario 1, data path: one client on QEMU's block layer (`qemu-img
//! bench`, the code a guest's virtio-blk requests go through) against a
//! volume's backing file ("local", the peer), against a pdisk volume on the
//! same host reached as agentd reaches it there (pdiskd's local attachment,
//! see `same_host`), and against the backing file exported through tgt and
//! reached with QEMU's own iSCSI initiator (libiscsi), as agentd attaches
//! pdisk volumes on other hosts (issue 16).
//!
//! Measured: 128 KiB sequential read and write (MB/s) and 4 KiB random read
//! and write (IOPS), at queue depth 1 and 32, plus both writes at depth 32
//! with a flush every 64 or 256 requests (`flush/N`), as a guest's fsync
//! sends them. Every path carries its local peer (ratio = path / local),
//! and so does its CPU cost per GiB moved (qemu-img plus tgtd, `cpu`) on
//! the four cases of issue 16's goals (`goals()`). Then the levers, each
//! on those four cases against tgt with its own iSCSI parameters on the
//! same tgtd (`rdwr` store, pdisk's default): pdisk's tuned parameters
//! (`IscsiParams::measured_default`), only their 256 KiB data PDUs, only
//! `InitialR2T=No` with a 256 KiB first burst, tgt's `aio` store; and
//! tgtd's I/O thread count (`--nr_iothreads` 1 and 4 against the default
//! 16, tuned parameters). And QEMU's own levers, `aio` and `cache` for
//! files and host devices (`qemu_levers`), with the cache flushes that
//! reach the pool's disk per flush a client sends, for every subject.
//!
//! How it is measured, and why:
//! - The volume is a sparse file on an XFS reflink filesystem on a loop
//!   device (`testkit::XfsPool`), as pdisk lays volumes out, filled with
//!   data first so that reads hit allocated blocks. The loop device is
//!   switched to direct I/O: otherwise every "O_DIRECT" read of the volume
//!   would be served from the host page cache holding the loop's backing
//!   file, and the benchmark would measure memcpy.
//! - Local access uses the options agentd gives a guest's file disk:
//!   `cache.direct=on` (O_DIRECT) with agentd's default `aio` for files
//!   (`agent::disk_io`, measured by `qemu_levers`). The iSCSI access uses agentd's blockdev options
//!   too (`driver=iscsi`, `cache.direct=on`).
//! - `qemu-img bench` (QEMU 7.2) has no random mode: it issues requests at
//!   `offset, offset + step, offset + 2*step, ...` modulo the image size.
//!   Random access is emulated with a step of `p * 4 KiB` where `p` is
//!   coprime with the number of 4 KiB blocks and close to 0.382 of it (a
//!   golden-ratio Weyl sequence): consecutive requests land far apart, with
//!   no locality for readahead or request merging, and no block is visited
//!   twice before every block has been. (`qemu-io`'s `aio_read`/`aio_write`
//!   take one offset per command, so a random run would need one `-c` per
//!   request: impractical for thousands of requests.)
//! - tgt's `aio` store opens the file with O_DIRECT; `rdwr` uses buffered
//!   pread/pwrite on a thread pool, so the host page cache sits in its data
//!   path. So that no run is served from what an earlier run left in memory,
//!   the volume's pages are written back and dropped before every run, and
//!   a run never touches a block twice (its request count is capped at the
//!   number of distinct blocks). `rdwr` writes still complete once they are
//!   in the host page cache (the guest sees that speed; the data reaches the
//!   disk on the guest's next flush, which tgt turns into fdatasync, or
//!   whenever the kernel writes it back): the `flush/N` figures show what
//!   that costs.
//! - tgt 1.0.85's `aio` store completes SYNCHRONIZE CACHE without doing
//!   anything (checked with strace: 8 guest flushes, 0 fsync/fdatasync in
//!   tgtd; `rdwr` makes 8 fdatasync calls). Its O_DIRECT writes bypass the
//!   page cache but neither the disk's volatile write cache nor XFS's log
//!   (extent allocation in a sparse volume) is forced on a guest's flush, so
//!   `aio`'s `flush/N` figures are cheap because its flushes are not done.
//! - In full mode each figure is the median of 7 runs of about 0.7 s,
//!   sized from a short probe run (which also warms up the connection);
//!   `--quick` does one tiny run per figure. Every subject (local file,
//!   same host, every export) is live at once and their runs of a case
//!   alternate, so the machine's background load, which
//!   drifts, weighs on a figure and its peer alike.
//! - tgtd 1.0.85 has `-t/--nr_iothreads N` (default 16): the size of the
//!   worker pool of thread-based backing stores (`rdwr`), per LUN. `aio`
//!   submits to the kernel from tgtd's event loop and does not use it, so
//!   the thread comparison is made with `rdwr` only.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use pdisk::export::{ExportSpec, Exporter, IscsiParams, TgtConfig, TgtExporter};
use stratus_core::runner::HostRunner;
use testkit::{Tgtd, XfsPool, INITIATOR};
use tokio::runtime::Handle;

mod cpu;
mod figures;
pub mod lab;
mod qemu_levers;
mod same_host;

use cpu::CpuMark;
use figures::figures;

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "data path";
const IQN_PREFIX: &str = "iqn.2026-11.io.stratus.bench";
/// Targets are named `<TARGET_PREFIX>-<subject>`.
const TARGET_PREFIX: &str = "iqn.2026-11.io.stratus.bench:datapath";
/// tgtd's default `--nr_iothreads`.
const TGTD_DEFAULT_THREADS: u32 = 16;
/// `--nr_iothreads` values compared with the default (`rdwr` only).
const THREAD_COUNTS: [u32; 2] = [1, 4];

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: f64 = (1024 * MIB) as f64;

/// One access pattern.
#[derive(Debug, Clone, Copy)]
struct Pattern {
    name: &'static str,
    block: u64,
    write: bool,
    random: bool,
    /// A flush (`--flush-interval`) after every this many requests; 0: none.
    flush_every: u64,
}

const PATTERNS: [Pattern; 4] = [
    Pattern {
        name: "seq read 128k",
        block: 128 * KIB,
        write: false,
        random: false,
        flush_every: 0,
    },
    Pattern {
        name: "seq write 128k",
        block: 128 * KIB,
        write: true,
        random: false,
        flush_every: 0,
    },
    Pattern {
        name: "rand read 4k",
        block: 4 * KIB,
        write: false,
        random: true,
        flush_every: 0,
    },
    Pattern {
        name: "rand write 4k",
        block: 4 * KIB,
        write: true,
        random: true,
        flush_every: 0,
    },
];
const DEPTHS: [u32; 2] = [1, 32];

/// Writes with periodic flushes, as a guest's fsync or journal commit sends
/// them: a write-back cache (tgt's rdwr, through the host page cache) pays
/// for its writes here. Measured at queue depth 32 only.
const FLUSHED: [Pattern; 2] = [
    Pattern {
        name: "seq write 128k",
        block: 128 * KIB,
        write: true,
        random: false,
        flush_every: 64,
    },
    Pattern {
        name: "rand write 4k",
        block: 4 * KIB,
        write: true,
        random: true,
        flush_every: 256,
    },
];

/// The full matrix: every pattern at every depth, then the flushed writes.
fn matrix() -> Vec<(Pattern, u32)> {
    let mut cases: Vec<(Pattern, u32)> = PATTERNS
        .iter()
        .flat_map(|p| DEPTHS.iter().map(|d| (*p, *d)))
        .collect();
    cases.extend(FLUSHED.iter().map(|p| (*p, 32)));
    cases
}

/// The four columns of issue 16's goals: reads at queue depth 32, writes
/// at queue depth 32 with flushes (the levers are measured on these).
fn goals() -> Vec<(Pattern, u32)> {
    let reads = PATTERNS.iter().filter(|p| !p.write).map(|p| (*p, 32));
    reads.chain(FLUSHED.iter().map(|p| (*p, 32))).collect()
}

impl Pattern {
    fn label(&self, depth: u32) -> String {
        match self.flush_every {
            0 => format!("{} qd{depth}", self.name),
            n => format!("{} qd{depth} flush/{n}", self.name),
        }
    }

    /// Large blocks are reported as throughput, small ones as IOPS.
    fn unit(&self) -> &'static str {
        if self.random {
            "IOPS"
        } else {
            "MB/s"
        }
    }

    fn value(&self, count: u64, secs: f64) -> f64 {
        let per_sec = count as f64 / secs.max(1e-3);
        if self.random {
            per_sec
        } else {
            per_sec * self.block as f64 / 1e6
        }
    }

    /// Distinct blocks of the volume: the most requests one run may make.
    fn blocks(&self, vol_size: u64) -> u64 {
        vol_size / self.block
    }

    /// `qemu-img bench -S`: the block size for sequential access; for
    /// random access a Weyl step (see the module comment).
    fn step(&self, vol_size: u64) -> u64 {
        if !self.random {
            return self.block;
        }
        let n = self.blocks(vol_size);
        let mut p = ((n as f64) * 0.381_966).round().max(1.0) as u64;
        while gcd(p, n) != 1 {
            p += 1;
        }
        p * self.block
    }

    /// Requests per run in quick mode, and of the probe run in full mode:
    /// at least two flushes' worth when flushed.
    fn small_count(&self, quick: bool) -> u64 {
        let n = match (quick, self.random) {
            (true, false) => 32,
            (true, true) => 128,
            (false, false) => 128,
            (false, true) => 1000,
        };
        n.max(2 * self.flush_every)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What `qemu-img bench` opens.
#[derive(Debug, Clone)]
enum Target {
    /// The backing file, as agentd opens a guest's file disk, or a local
    /// attachment as agentd opens it: QEMU's `file` driver for a file,
    /// `host_device` for a block device.
    Local {
        path: PathBuf,
        aio: &'static str,
        driver: &'static str,
    },
    /// A tgt export (LUN 1 of `iqn`), through QEMU's iSCSI initiator.
    Iscsi { portal: String, iqn: String },
    /// Any other `--image-opts` (the QEMU levers).
    Opts(String),
}

impl Target {
    fn image_opts(&self) -> String {
        match self {
            Target::Local { path, aio, driver } => format!(
                "driver=raw,file.driver={driver},file.filename={},file.aio={aio},file.cache.direct=on",
                path.display()
            ),
            Target::Iscsi { portal, iqn } => format!(
                "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=1,initiator-name={INITIATOR},cache.direct=on"
            ),
            Target::Opts(o) => o.clone(),
        }
    }
}

/// One thing measured: a target and the cases run against it.
struct Subject {
    name: String,
    target: Target,
    cases: Vec<(Pattern, u32)>,
    /// The tgtd serving the target, whose CPU time counts with qemu-img's.
    tgtd: Option<u32>,
}

impl Subject {
    fn runs(&self, p: &Pattern, depth: u32) -> bool {
        self.cases
            .iter()
            .any(|(q, d)| q.label(*d) == p.label(depth))
    }
}

/// Sizes of the run.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    vol_size: u64,
    /// Full mode: length of one measured run.
    run_secs: f64,
    /// Full mode: runs per figure (the figure is their median).
    reps: usize,
}

/// Runs `qemu-img bench` against the volume.
struct Bench<'a> {
    plan: &'a Plan,
    /// The volumes' backing files (or devices), whose cached pages are
    /// dropped before every run.
    volumes: &'a [PathBuf],
    /// The pool's block device (`loop3`), whose cache flushes are counted.
    pool_dev: Option<String>,
}

/// One run's result.
struct Run {
    secs: f64,
    /// CPU seconds of qemu-img and the subject's tgtd.
    cpu: f64,
    /// Cache flushes the pool's device completed during the run.
    flushes: Option<u64>,
}

impl Bench<'_> {
    /// One `qemu-img bench` run of `count` requests.
    fn run_once(
        &self,
        subject: &Subject,
        p: &Pattern,
        depth: u32,
        count: u64,
    ) -> anyhow::Result<Run> {
        let target = &subject.target;
        for v in self.volumes {
            drop_cached_pages(v)?;
        }
        let mut cmd = Command::new("qemu-img");
        // argv only: `-c` is qemu-img bench's request count, not a shell's.
        cmd.args(["bench", "--image-opts"])
            .args(["-c", &count.to_string()])
            .args(["-d", &depth.to_string()])
            .args(["-s", &p.block.to_string()])
            .args(["-S", &p.step(self.plan.vol_size).to_string()]);
        if p.write {
            cmd.args(["-w", "--pattern=0x5a"]);
        }
        if p.flush_every > 0 {
            cmd.arg(format!("--flush-interval={}", p.flush_every));
        }
        cmd.arg(target.image_opts());
        let dev = self.pool_dev.as_deref();
        let flushes_before = dev.and_then(qemu_levers::device_flushes);
        let mark = CpuMark::now(subject.tgtd);
        let out = cmd
            .output()
            .context("cannot run qemu-img (package qemu-utils)")?;
        let cpu = mark.since(subject.tgtd);
        let flushes = dev
            .and_then(qemu_levers::device_flushes)
            .zip(flushes_before)
            .map(|(after, before)| after.saturating_sub(before));
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "qemu-img bench {} against {}: {}{}",
                p.label(depth),
                target.image_opts(),
                stdout,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Run {
            secs: parse_bench_seconds(&stdout)?,
            cpu,
            flushes,
        })
    }

    /// Measures every case of the matrix on every subject that runs it.
    /// The subjects' runs of one case are interleaved (a probe each, then
    /// round after round of one run per subject), so a change in the
    /// machine's background load hits them alike. Returns, per subject, its
    /// figures in matrix order.
    fn all(&self, subjects: &[Subject]) -> anyhow::Result<Vec<Vec<Measured>>> {
        let mut out: Vec<Vec<Measured>> = subjects.iter().map(|_| Vec::new()).collect();
        for (pattern, depth) in matrix() {
            let who: Vec<usize> = (0..subjects.len())
                .filter(|&i| subjects[i].runs(&pattern, depth))
                .collect();
            if who.is_empty() {
                continue;
            }
            let max = pattern.blocks(self.plan.vol_size);
            let small = pattern
                .small_count(self.plan.quick)
                .min(max)
                .max(u64::from(depth));
            // Requests per run, per subject.
            let mut counts = Vec::new();
            for &i in &who {
                let count = if self.plan.quick {
                    small
                } else {
                    let probe = self.run_once(&subjects[i], &pattern, depth, small)?.secs;
                    let rate = small as f64 / probe.max(1e-3);
                    ((rate * self.plan.run_secs) as u64).clamp(small, max)
                };
                counts.push(count);
            }
            let mut samples: Vec<Vec<f64>> = who.iter().map(|_| Vec::new()).collect();
            let mut cpu: Vec<Vec<f64>> = who.iter().map(|_| Vec::new()).collect();
            let mut flushes: Vec<Vec<f64>> = who.iter().map(|_| Vec::new()).collect();
            for _ in 0..self.plan.reps {
                for (k, &i) in who.iter().enumerate() {
                    let run = self.run_once(&subjects[i], &pattern, depth, counts[k])?;
                    samples[k].push(pattern.value(counts[k], run.secs));
                    let gib = (counts[k] * pattern.block) as f64 / GIB;
                    cpu[k].push(run.cpu / gib);
                    // qemu-img bench drains and flushes every
                    // `flush_every` requests.
                    let sent = counts[k] / pattern.flush_every.max(1);
                    if let (Some(f), true) = (run.flushes, pattern.flush_every > 0 && sent > 0) {
                        flushes[k].push(f as f64 / sent as f64);
                    }
                }
            }
            let mut line = format!("  {:<30}", pattern.label(depth));
            for (k, &i) in who.iter().enumerate() {
                let value = percentile(&samples[k], 50.0);
                line.push_str(&format!("  {} {value:.0}", subjects[i].name));
                out[i].push(Measured {
                    pattern,
                    depth,
                    value,
                    cpu_per_gib: percentile(&cpu[k], 50.0),
                    flushes_per_flush: (!flushes[k].is_empty())
                        .then(|| percentile(&flushes[k], 50.0)),
                    samples: if self.plan.quick {
                        Vec::new()
                    } else {
                        std::mem::take(&mut samples[k])
                    },
                });
            }
            eprintln!("{line} {}", pattern.unit());
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
struct Measured {
    pattern: Pattern,
    depth: u32,
    value: f64,
    /// Median CPU seconds (qemu-img + tgtd) per GiB moved.
    cpu_per_gib: f64,
    /// Flushed cases: median cache flushes the pool's device completed per
    /// flush the client sent (at least 1 when a guest's fsync is durable).
    flushes_per_flush: Option<f64>,
    samples: Vec<f64>,
}

impl Measured {
    fn label(&self) -> String {
        self.pattern.label(self.depth)
    }

    /// CPU milliseconds (qemu-img + tgtd) per GiB moved.
    fn cpu_figure(&self, name: String) -> Figure {
        Figure::new(SCENARIO, &name, "ms/GiB", self.cpu_per_gib * 1e3)
    }

    fn figure(&self, name: String) -> Figure {
        Figure::new(SCENARIO, &name, self.pattern.unit(), self.value)
            .with_samples(self.samples.clone())
    }
}

/// The peer of `m` (same pattern and depth) in `peers`.
fn peer_of<'a>(peers: &'a [Measured], m: &Measured) -> &'a Measured {
    peers
        .iter()
        .find(|x| x.label() == m.label())
        .expect("peers measured with the same patterns and depths")
}

/// `qemu-img bench` ends with "Run completed in 1.234 seconds."
fn parse_bench_seconds(stdout: &str) -> anyhow::Result<f64> {
    stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .with_context(|| {
            format!("no \"Run completed in N seconds.\" in qemu-img output: {stdout:?}")
        })
}

/// Writes back and drops the file's pages from the page cache (GNU dd:
/// fdatasync, then POSIX_FADV_DONTNEED over the whole file).
fn drop_cached_pages(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("dd")
        .arg(format!("of={}", path.display()))
        .args([
            "oflag=nocache",
            "conv=notrunc,fdatasync",
            "count=0",
            "status=none",
        ])
        .output()
        .context("cannot run dd")?;
    if !out.status.success() {
        bail!(
            "dropping cached pages of {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn run_ok(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Switches the pool's loop device to direct I/O (see the module comment);
/// returns its name (`loop3`).
fn loop_direct_io(pool: &XfsPool) -> anyhow::Result<String> {
    let img = pool.dir.path().join("xfs.img");
    let img = img.to_str().context("pool image path is not UTF-8")?;
    let dev = run_ok("losetup", &["-n", "-O", "NAME", "-j", img])?;
    let dev = dev.lines().next().map(str::trim).filter(|d| !d.is_empty());
    let dev = dev.with_context(|| format!("no loop device for {img}"))?;
    run_ok("losetup", &["--direct-io=on", dev])?;
    Ok(dev.trim_start_matches("/dev/").to_string())
}

/// The `aio` agentd gives a disk of this kind (QEMU's `file` or
/// `host_device` driver) here: its measured default (`agent::disk_io`),
/// which depends on whether this QEMU has io_uring.
fn local_aio(volume: &Path, driver: &str) -> &'static str {
    let opts = format!(
        "driver=raw,file.driver={driver},file.filename={},file.aio=io_uring",
        volume.display()
    );
    let io_uring = Command::new("qemu-img")
        .args(["info", "--image-opts", &opts])
        .output()
        .is_ok_and(|o| o.status.success());
    let io = agent::disk_io::DiskIo::measured_default(io_uring);
    if driver == "host_device" {
        io.device_aio.name()
    } else {
        io.file_aio.name()
    }
}

/// Creates the sparse volume file and writes every block once.
fn create_volume(path: &Path, size: u64) -> anyhow::Result<()> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("creating {}", path.display()))?;
    fill_volume(path, "file", size)
}

/// Writes every block of the volume at `path` once (`driver`: QEMU's
/// `file` or `host_device`).
fn fill_volume(path: &Path, driver: &'static str, size: u64) -> anyhow::Result<()> {
    let opts = Target::Local {
        path: path.to_path_buf(),
        aio: local_aio(path, driver),
        driver,
    }
    .image_opts();
    let count = (size / MIB).to_string();
    // qemu-img bench writing every 1 MiB block once (`-c`: request count).
    run_ok(
        "qemu-img",
        &[
            "bench",
            "--image-opts",
            "-w",
            "--pattern=0xa5",
            "-s",
            "1M",
            "-d",
            "8",
            "-c",
            &count,
            &opts,
        ],
    )?;
    Ok(())
}

/// Exports `volume` on LUN 1 of `iqn` through `tgtd` with `bstype`, as
/// pdiskd would (pdisk's exporter, no CHAP, our initiator in the ACL).
/// Returns the target to benchmark. The target lives as long as `tgtd`.
fn export(
    rt: &Handle,
    tgtd: &Tgtd,
    bstype: &str,
    params: &IscsiParams,
    name: &str,
    volume: &Path,
) -> anyhow::Result<Target> {
    let iqn = &format!("{TARGET_PREFIX}-{name}");
    let exporter = TgtExporter::new(
        Arc::new(HostRunner),
        TgtConfig {
            control_port: tgtd.control_port,
            portal: tgtd.portal(),
            iqn_prefix: IQN_PREFIX.into(),
            bstype: bstype.into(),
            params: params.clone(),
            ..TgtConfig::default()
        },
    );
    let spec = export_spec(iqn, volume)?;
    rt.block_on(exporter.export(&spec))
        .with_context(|| format!("exporting {} as {iqn} ({bstype})", volume.display()))?;
    Ok(Target::Iscsi {
        portal: tgtd.portal(),
        iqn: iqn.into(),
    })
}

fn export_spec(iqn: &str, volume: &Path) -> anyhow::Result<ExportSpec> {
    Ok(ExportSpec {
        target_iqn: iqn.parse()?,
        backing_path: volume.to_path_buf(),
        initiators: vec![INITIATOR.parse()?],
        chap: None,
    })
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let plan = if ctx.quick {
        Plan {
            quick: true,
            vol_size: 64 * MIB,
            run_secs: 0.0,
            reps: 1,
        }
    } else {
        Plan {
            quick: false,
            vol_size: 1024 * MIB,
            run_secs: 0.7,
            reps: 7,
        }
    };
    let rt = Handle::current();
    // testkit and the benchmark tools block (and testkit panics on
    // failure): run them on a blocking thread and turn a panic into an error.
    tokio::task::spawn_blocking(move || run_blocking(&rt, &plan))
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(p) => anyhow::anyhow!(
                "data path scenario panicked: {}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            ),
            Err(e) => anyhow::anyhow!("data path scenario task failed: {e}"),
        })?
}

fn run_blocking(rt: &Handle, plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    // Guards are dropped in reverse order: the tgtds and pdiskd first, the
    // pool last. The pool holds two volumes: the bench's own file and
    // pdiskd's.
    let pool = XfsPool::new(if plan.quick { 512 } else { 3072 });
    let pool_dev = match loop_direct_io(&pool) {
        Ok(dev) => Some(dev),
        Err(e) => {
            eprintln!(
                "  warning: loop device stays buffered, reads may come from the host page cache: {e:#}"
            );
            None
        }
    };
    let volume = pool.mnt.join("volume.raw");
    let t = Instant::now();
    create_volume(&volume, plan.vol_size)?;
    let same_host = same_host::start(rt, &pool, plan.vol_size)?;
    let same_driver = if same_host.block_device {
        "host_device"
    } else {
        "file"
    };
    fill_volume(&same_host.path, same_driver, plan.vol_size)?;
    eprintln!(
        "  2 volumes of {} MiB written in {:.1} s; pdiskd's local attachment: {} ({same_driver})",
        plan.vol_size / MIB,
        t.elapsed().as_secs_f64(),
        same_host.path.display()
    );

    // The subjects, all live at once. Every tgt target is
    // backed by the bench's file; runs never overlap and the volumes'
    // cached pages are dropped before each, so they do not see each
    // other's data in memory.
    let aio = local_aio(&volume, "file");
    let tgtd = Tgtd::start(pool.dir.path());
    let tgt_own = IscsiParams::default();
    let tuned = IscsiParams::measured_default();
    let pdu_only: IscsiParams =
        "MaxRecvDataSegmentLength=262144,MaxXmitDataSegmentLength=262144".parse()?;
    let r2t_only: IscsiParams =
        "FirstBurstLength=262144,InitialR2T=No,ImmediateData=Yes".parse()?;
    let mut subjects = vec![
        Subject {
            name: format!("local({aio})"),
            target: Target::Local {
                path: volume.clone(),
                aio,
                driver: "file",
            },
            cases: matrix(),
            tgtd: None,
        },
        Subject {
            name: "same-host".into(),
            target: Target::Local {
                path: same_host.path.clone(),
                aio: local_aio(&same_host.path, same_driver),
                driver: same_driver,
            },
            cases: matrix(),
            tgtd: None,
        },
        Subject {
            name: "tgt".into(),
            target: export(rt, &tgtd, "rdwr", &tgt_own, "rdwr", &volume)?,
            cases: matrix(),
            tgtd: tgtd.pid(),
        },
        Subject {
            name: "tuned".into(),
            target: export(rt, &tgtd, "rdwr", &tuned, "tuned", &volume)?,
            cases: matrix(),
            tgtd: tgtd.pid(),
        },
        Subject {
            name: "pdu256k".into(),
            target: export(rt, &tgtd, "rdwr", &pdu_only, "pdu", &volume)?,
            cases: goals(),
            tgtd: tgtd.pid(),
        },
        Subject {
            name: "noR2T".into(),
            target: export(rt, &tgtd, "rdwr", &r2t_only, "r2t", &volume)?,
            cases: goals(),
            tgtd: tgtd.pid(),
        },
        Subject {
            name: "aio".into(),
            target: export(rt, &tgtd, "aio", &tgt_own, "aio", &volume)?,
            cases: goals(),
            tgtd: tgtd.pid(),
        },
    ];
    let mut tgtds = Vec::new();
    for threads in THREAD_COUNTS {
        let t = Tgtd::start_with(pool.dir.path(), &["--nr_iothreads", &threads.to_string()]);
        subjects.push(Subject {
            name: format!("tuned-t{threads}"),
            target: export(rt, &t, "rdwr", &tuned, &format!("t{threads}"), &volume)?,
            cases: goals(),
            tgtd: t.pid(),
        });
        tgtds.push(t);
    }
    // QEMU's levers; the host device is the bench's volume behind a loop
    // device of its own.
    let device = match qemu_levers::LoopDevice::attach(&volume) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("  warning: no loop device, host device levers not measured: {e:#}");
            None
        }
    };
    subjects.extend(qemu_levers::subjects(
        &volume,
        device
            .as_ref()
            .map(|d| (d.path.as_path(), local_aio(&d.path, "host_device"))),
    ));
    eprintln!(
        "  local file and same-host: O_DIRECT, aio={aio}; the rest: iSCSI through tgt (rdwr unless aio), \
         tgt's own parameters or tuned ({tuned}); pdu256k: {pdu_only}; noR2T: {r2t_only}; \
         tuned-tN: tgtd --nr_iothreads N; file-*, dev*: QEMU's aio and cache levers, dev(X): \
         a host device with agentd's default"
    );
    let mut volumes = vec![volume.clone(), same_host.path.clone()];
    volumes.extend(device.as_ref().map(|d| d.path.clone()));
    let bench = Bench {
        plan,
        volumes: &volumes,
        pool_dev,
    };
    let measured = bench.all(&subjects)?;
    qemu_levers::check_durable(&subjects, &measured)?;
    drop(device);
    drop(tgtds);
    drop(tgtd);
    drop(same_host);
    Ok(figures(&subjects, &measured))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_steps_visit_every_block_once_per_period() {
        let p = PATTERNS[2];
        for vol in [64 * MIB, 1024 * MIB, 1000 * MIB] {
            let n = p.blocks(vol);
            let step = p.step(vol);
            assert!(step.is_multiple_of(p.block), "aligned");
            assert!(
                step < vol && step <= i32::MAX as u64,
                "qemu-img takes an int step"
            );
            // qemu-img bench: offset += step; offset %= image size.
            let mut seen = vec![false; n as usize];
            let mut off = 0;
            for _ in 0..n {
                let b = (off / p.block) as usize;
                assert!(!seen[b], "block {b} visited twice within a period");
                seen[b] = true;
                off = (off + step) % vol;
            }
        }
        assert_eq!(PATTERNS[0].step(1024 * MIB), 128 * KIB);
    }

    #[test]
    fn parses_qemu_img_bench_output() {
        let out = "Sending 1000 read requests, 4096 bytes each, 32 in parallel (starting at offset 0, step size 4096)\nRun completed in 0.013 seconds.\n";
        assert_eq!(parse_bench_seconds(out).unwrap(), 0.013);
        assert!(parse_bench_seconds("nothing").is_err());
        let p = PATTERNS[0];
        assert_eq!(p.value(8, 1.0), 8.0 * 131_072.0 / 1e6);
        assert_eq!(PATTERNS[2].value(500, 0.5), 1000.0);
    }

    #[test]
    fn cases_and_options() {
        let m = matrix();
        assert_eq!(m.len(), PATTERNS.len() * DEPTHS.len() + FLUSHED.len());
        let labels: std::collections::BTreeSet<String> =
            m.iter().map(|(p, d)| p.label(*d)).collect();
        assert_eq!(labels.len(), m.len(), "labels are unique");
        assert_eq!(goals().len(), 4);
        assert!(goals().iter().all(|(p, d)| labels.contains(&p.label(*d))));
        assert!(FLUSHED.iter().all(|p| p.flush_every >= 32));

        let l = Target::Local {
            path: "/p/v.raw".into(),
            aio: "io_uring",
            driver: "file",
        }
        .image_opts();
        assert!(
            l.contains("file.filename=/p/v.raw")
                && l.contains("file.cache.direct=on")
                && l.contains("file.aio=io_uring")
        );
        let i = Target::Iscsi {
            portal: "127.0.0.1:3260".into(),
            iqn: format!("{TARGET_PREFIX}-aio"),
        }
        .image_opts();
        assert!(i.starts_with("driver=iscsi,transport=tcp,portal=127.0.0.1:3260,"));
        assert!(i.contains(",lun=1,") && i.contains(INITIATOR));
        let spec = export_spec(&format!("{TARGET_PREFIX}-rdwr-t1"), Path::new("/p/v.raw"));
        assert!(spec.is_ok());
    }
}
