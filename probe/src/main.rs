//! stratus-probe: is this pdiskd or agentd available? A Nagios/Icinga
//! plugin (`verdict.rs` holds the contract): one status line with perfdata
//! after `|`, or one JSON object with `--json`, and the exit status 0 OK,
//! 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the probe itself could not judge: bad
//! arguments, an image not cached for `--launch-test`).
//!
//! It connects like the CLIs (`unix:` local socket, `https://` with a
//! client certificate, loopback `http://`), asks the daemon's gRPC health
//! service about its API, then judges what the daemon reports: the pool
//! (`pdisk.rs`) or the host and its guests (`agent.rs`). A daemon that
//! cannot be reached, is not serving, or refuses the probe's calls is
//! CRITICAL.

mod agent;
mod pdisk;
mod verdict;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand};
use stratus_core::cli::{Remote, TlsArgs};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use verdict::{Perf, Status, Verdict};

/// Checks a Stratus daemon the way Nagios and Icinga expect: one line with
/// perfdata, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
#[derive(Debug, Parser)]
#[command(name = "stratus-probe", version)]
struct Cli {
    #[command(subcommand)]
    check: Check,
    #[command(flatten)]
    tls: TlsArgs,
    /// CRITICAL when the whole check takes longer than this
    #[arg(long, global = true, default_value = "30", value_name = "SECS")]
    timeout: u64,
    /// One JSON object instead of the status line (same exit status)
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Check {
    /// A pdiskd: health, pool fill, exporter, drift at the last reconciliation
    /// (GetPool: an admin's call)
    Pdisk(PdiskCheck),
    /// An agentd: health, guests in error, and optionally a test launch
    Agent(AgentCheck),
}

#[derive(Debug, Args)]
struct PdiskCheck {
    /// pdiskd's address: unix:/PATH, https://HOST:PORT or loopback http://
    #[arg(
        long,
        default_value = "unix:/run/stratus/pdiskd.sock",
        value_name = "ADDR"
    )]
    server: String,
    /// WARNING when the pool is at least this full (percent)
    #[arg(long, short = 'w', default_value = "80", value_name = "PERCENT")]
    warning: f64,
    /// CRITICAL when the pool is at least this full (percent)
    #[arg(long, short = 'c', default_value = "90", value_name = "PERCENT")]
    critical: f64,
}

#[derive(Debug, Args)]
struct AgentCheck {
    /// agentd's address: unix:/PATH, https://HOST:PORT or loopback http://
    #[arg(
        long,
        default_value = "unix:/run/stratus/agentd.sock",
        value_name = "ADDR"
    )]
    server: String,
    /// Also launch a tiny guest from a cached image, see it run, destroy it
    #[arg(long, requires_all = ["image_url", "image_sha256"])]
    launch_test: bool,
    /// The image's URL, as it was pulled (`agentctl image pull`)
    #[arg(long, value_name = "URL", requires = "launch_test")]
    image_url: Option<String>,
    /// The image's SHA-256; it must be in the agent's cache (else UNKNOWN)
    #[arg(long, value_name = "HEX", requires = "launch_test")]
    image_sha256: Option<String>,
    /// Boot this kernel (a host file beneath agentd's --host-file-root)
    #[arg(long, value_name = "PATH", requires = "launch_test")]
    kernel: Option<String>,
    /// The kernel's initrd
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<String>,
    /// The kernel's command line
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    cmdline: Option<String>,
    /// Memory of the test guest
    #[arg(long, default_value = "128", value_name = "MIB")]
    memory_mib: u64,
    /// Wait for this text on the guest's serial console (the log must be
    /// readable here: run the probe on the agent's host)
    #[arg(long, value_name = "TEXT", requires = "launch_test")]
    ready_marker: Option<String>,
    /// How long the guest must keep running once ready
    #[arg(long, default_value = "3", value_name = "SECS")]
    settle: u64,
}

fn main() -> ExitCode {
    stratus_core::cli::docs::write_if_asked("1", Cli::command);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let msg = stratus_core::cli::clap_message(&e);
            // --json may not have been parsed; the caller asked for it if
            // it is among the arguments.
            let json = std::env::args().skip(1).any(|a| a == "--json");
            return finish("probe", "PROBE", &Verdict::only(Status::Unknown, msg), json);
        }
    };
    let (check, what) = match &cli.check {
        Check::Pdisk(_) => ("pdisk", "PDISK"),
        Check::Agent(_) => ("agent", "AGENT"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let limit = Duration::from_secs(cli.timeout);
    let verdict = rt.block_on(async {
        match tokio::time::timeout(limit, run(&cli)).await {
            Ok(v) => v,
            Err(_) => Verdict::only(
                Status::Critical,
                format!("no verdict within {} s", cli.timeout),
            ),
        }
    });
    finish(check, what, &verdict, cli.json)
}

fn finish(check: &str, what: &str, verdict: &Verdict, json: bool) -> ExitCode {
    if json {
        println!("{}", verdict.json(check));
    } else {
        println!("{}", verdict.line(what));
    }
    ExitCode::from(verdict.status().exit_code())
}

async fn run(cli: &Cli) -> Verdict {
    match &cli.check {
        Check::Pdisk(p) => {
            if !(0.0..=100.0).contains(&p.warning)
                || !(0.0..=100.0).contains(&p.critical)
                || p.warning > p.critical
            {
                return Verdict::only(
                    Status::Unknown,
                    format!(
                        "--warning {} and --critical {} must be percentages, warning at most critical",
                        p.warning, p.critical
                    ),
                );
            }
            let limits = pdisk::Thresholds {
                warning: p.warning,
                critical: p.critical,
            };
            let remote = Remote::new("the pdisk server", &p.server, &cli.tls);
            match connect(&remote, "pdisk.v1.VolumeService").await {
                Ok((ch, secs)) => pdisk::check(ch, limits, secs).await,
                Err(v) => v,
            }
        }
        Check::Agent(a) => {
            let launch = a.launch_test.then(|| agent::LaunchTest {
                image_url: a.image_url.clone().unwrap_or_default(),
                image_sha256: a.image_sha256.clone().unwrap_or_default(),
                kernel: a.kernel.clone(),
                initrd: a.initrd.clone(),
                cmdline: a.cmdline.clone(),
                memory_mib: a.memory_mib,
                ready_marker: a.ready_marker.clone(),
                settle: Duration::from_secs(a.settle),
            });
            let remote = Remote::new("the agent", &a.server, &cli.tls);
            match connect(&remote, "agent.v1.VmService").await {
                Ok((ch, secs)) => agent::check(ch, launch.as_ref(), secs).await,
                Err(v) => v,
            }
        }
    }
}

/// Connects and asks the health service about `service`: the channel and
/// the round trip in seconds, or the verdict (UNKNOWN for an unusable
/// address or certificate, CRITICAL for a daemon down or not serving).
async fn connect(remote: &Remote, service: &str) -> Result<(Channel, f64), Verdict> {
    let dialer = remote
        .dialer()
        .map_err(|f| Verdict::only(Status::Unknown, f.message()))?;
    let started = Instant::now();
    let ch = dialer.connect().await.map_err(|e| {
        Verdict::only(
            Status::Critical,
            format!(
                "cannot reach {} at {}: {e:#}",
                remote.server(),
                remote.url()
            ),
        )
    })?;
    let answer = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await;
    let secs = started.elapsed().as_secs_f64();
    let down = |text: String| {
        let mut v = Verdict::only(Status::Critical, text);
        v.perf.push(Perf::gauge("time", secs, "s"));
        v
    };
    match answer {
        Ok(r) if r.get_ref().status() == ServingStatus::Serving => Ok((ch, secs)),
        Ok(r) => Err(down(format!(
            "{service} is {}",
            r.get_ref().status().as_str_name()
        ))),
        Err(s) => Err(down(format!(
            "health check refused: {:?}: {}",
            s.code(),
            s.message()
        ))),
    }
}

/// A call that failed: CRITICAL, since the probe cannot see what it must
/// (PermissionDenied means the probe's identity is not an admin).
fn refused(call: &str, s: &tonic::Status) -> Verdict {
    Verdict::only(
        Status::Critical,
        format!("{call} failed: {:?}: {}", s.code(), s.message()),
    )
}
