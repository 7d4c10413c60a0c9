//! stratus-soak: the random-crash soak of issue 13. Clients create, start,
//! stop, pause, resume and destroy guests, save stopped guests' disks as
//! images, pull and evict images, and create, write, snapshot, clone,
//! export and delete volumes on a real stack (in a namespace of its own)
//! while pdiskd, agentd and tgtd are killed with SIGKILL at random moments
//! and restarted, and guests' QEMUs are killed as a guest crash would end
//! them; then it waits for recovery, checks the invariants and prints a
//! summary.
//! Exit status 1 when any invariant was violated.
//!
//!   stratus-soak --duration 2m                    (scripts/test)
//!   stratus-soak --duration 1h --clients 4 --json > soak.json
//!
//! Needs root, tgtd and QEMU, and the workspace's binaries beside it
//! (`cargo build --workspace`).

use std::time::Duration;

use clap::Parser;
use stratus_bench::soak::{self, Daemon, Settings};

#[derive(Parser)]
#[command(
    name = "stratus-soak",
    version,
    about = "Random SIGKILLs of pdiskd, agentd, tgtd and guests' QEMUs under load, then the invariants"
)]
struct Cli {
    /// How long the clients run (e.g. 2m, 1h); recovery and checks follow.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent clients, each with up to 2 guests and 3 volumes.
    #[arg(long, default_value_t = 3)]
    clients: usize,
    /// Shortest time between two kills.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    kill_min: Duration,
    /// Longest time between two kills.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    kill_max: Duration,
    /// What may be killed (comma-separated: pdiskd, agentd, tgtd, and qemu:
    /// a random running guest's QEMU).
    #[arg(long, default_value = "pdiskd,agentd,tgtd,qemu", value_delimiter = ',')]
    kill: Vec<String>,
    /// Random seed [default: from the clock; printed, to repeat a run].
    #[arg(long)]
    seed: Option<u64>,
    /// How long recovery may take after the clients stop (agentd retries
    /// unfinished destroys and unexports every 60 s).
    #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut victims = Vec::new();
    for k in &cli.kill {
        victims.push(Daemon::parse(k).ok_or_else(|| {
            anyhow::anyhow!("--kill: unknown victim {k:?} (pdiskd, agentd, tgtd, qemu)")
        })?);
    }
    anyhow::ensure!(cli.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        cli.kill_min <= cli.kill_max,
        "--kill-min must not exceed --kill-max"
    );
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!(
        "stratus-soak: seed {seed}, {} clients, {:?}",
        cli.clients, cli.duration
    );
    let summary = soak::run(&Settings {
        duration: cli.duration,
        clients: cli.clients,
        kill_every: (cli.kill_min, cli.kill_max),
        victims,
        seed,
        settle: cli.settle,
    })?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", summary.text());
    }
    if !summary.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
