//! stratus-bench: runs the scenarios and writes results.json, results.md
//! and SVG plots into --out.
//!
//!   stratus-bench --out results            every scenario, full size
//!   stratus-bench --quick --out DIR        smoke run (scripts/test)
//!   stratus-bench --only datapath --out DIR
//!   stratus-bench --only datapath-lab --out DIR   in the lab VM (scripts/lab datapath)
//!   stratus-bench --only bulk --bulk 10 --out DIR
//!   stratus-bench --only confinement --out DIR   confined launches vs --allow-unsandboxed
//!   stratus-bench --only rbd --out DIR   on a single-node Ceph cluster (QEMU rbd vs rbd bench)

use std::path::PathBuf;

use clap::Parser;
use stratus_bench::report::{self, Results};
use stratus_bench::scenarios::{self, Ctx, ALL, ON_REQUEST};

#[derive(Parser)]
#[command(
    name = "stratus-bench",
    version,
    about = "Stratus benchmarks, side by side with peers"
)]
struct Cli {
    /// Directory for results.json, results.md and the plots.
    #[arg(long, value_name = "DIR", default_value = "results")]
    out: PathBuf,
    /// Smoke run: tiny sizes, few repetitions (checks the harness, not the speed).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeatable): datapath, snapshot, launch,
    /// confinement, bulk, import, events, events-nats, transport, rbd; and,
    /// only when named, datapath-lab (inside the lab VM: scripts/lab datapath).
    #[arg(long, value_name = "SCENARIO")]
    only: Vec<String>,
    /// Guests launched at once by the bulk scenario [default: 30; 3 with --quick]
    #[arg(long, value_name = "N")]
    bulk: Option<usize>,
    /// Scratch directory on a local disk [default: a temp dir under ./var]
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    for s in &cli.only {
        anyhow::ensure!(
            ALL.contains(&s.as_str()) || ON_REQUEST.contains(&s.as_str()),
            "unknown scenario {s:?}; known: {}, {}",
            ALL.join(", "),
            ON_REQUEST.join(", ")
        );
    }
    let scratch_root = std::env::current_dir()?.join("var").join("bench");
    std::fs::create_dir_all(&scratch_root)?;
    let scratch = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&scratch_root)?;
    let ctx = Ctx {
        quick: cli.quick,
        work: cli
            .work
            .clone()
            .unwrap_or_else(|| scratch.path().to_path_buf()),
        bulk: cli.bulk,
    };
    let mut results = Results {
        machine: machine(),
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        quick: cli.quick,
        figures: Vec::new(),
    };
    for name in ALL
        .iter()
        .chain(ON_REQUEST)
        .filter(|n| (cli.only.is_empty() && ALL.contains(n)) || cli.only.iter().any(|o| o == *n))
    {
        eprintln!("stratus-bench: running {name}");
        let t = std::time::Instant::now();
        let figs = match *name {
            "datapath" => scenarios::datapath::run(&ctx).await,
            "datapath-lab" => scenarios::datapath::lab::run(&ctx).await,
            "snapshot" => scenarios::snapshot::run(&ctx).await,
            "import" => scenarios::import::run(&ctx).await,
            "launch" => scenarios::launch::run(&ctx).await,
            "confinement" => scenarios::confinement::run(&ctx).await,
            "bulk" => scenarios::bulk::run(&ctx).await,
            "events" => scenarios::events::run(&ctx).await,
            "events-nats" => scenarios::events_nats::run(&ctx).await,
            "transport" => scenarios::transport::run(&ctx).await,
            "rbd" => scenarios::rbd::run(&ctx).await,
            "migrate" => scenarios::migrate::run(&ctx).await,
            "qos" => scenarios::qos::run(&ctx).await,
            _ => unreachable!(),
        }
        .map_err(|e| e.context(format!("scenario {name}")))?;
        eprintln!(
            "stratus-bench: {name}: {} figures in {:.1} s",
            figs.len(),
            t.elapsed().as_secs_f64()
        );
        results.figures.extend(figs);
    }
    // The machine is shared: its load, at the start and at the end.
    results.machine = format!("{}; load average at the end {}", results.machine, loadavg());
    report::write(&cli.out, &results)?;
    print!("{}", report::markdown(&results));
    eprintln!("stratus-bench: wrote {}", cli.out.display());
    Ok(())
}

/// CPU model, cores and memory, for the report.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_gib = stratus_core::host::memory_total().unwrap_or(0) as f64 / (1u64 << 30) as f64;
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB; load average at the start {}",
        loadavg()
    )
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg says them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
