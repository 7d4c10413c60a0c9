//! The random-crash soak (`stratus-soak`): several clients drive guests and
//! volumes through a real stack while pdiskd, agentd and tgtd are killed
//! with SIGKILL at random moments and restarted; at the end the soak waits
//! for the daemons' own recovery (reconciliation at start, the 60 s retry of
//! pdisk leftovers) and checks the invariants of issue 13.
//!
//! The stack is the fault tier's (`agent/tests/faults.rs`), in a network
//! namespace of the soak's own: an XFS reflink pool on a loop device, tgtd,
//! pdiskd, agentd, busybox httpd serving a 1 MiB image, a bridge. Guests are
//! the cheapest real ones: QEMU under TCG with SeaBIOS finding nothing to
//! boot on a pdisk clone of that image (QEMU runs, QMP answers, the disk is
//! an iSCSI export, the NIC a tap with its nftables rules), so a 2-minute
//! soak costs little CPU.
//!
//! - [`workload`]: the clients and the operations they drive;
//! - [`expect`]: what each client knows was acknowledged;
//! - [`events`]: the follower of agentd's events across restarts;
//! - [`invariants`]: the checks, each failure a violation string;
//! - [`chaos`]: the thread killing daemons and QEMUs, and the comparison of
//!   tgt with pdiskd's exports after each restart;
//! - this module: the stack, the settle phase, the summary.
//!
//! Every object a client makes is its own (names `c<client>-…`), so what it
//! expects of each is exact; overlapping names and objects are the 50 × 200
//! concurrency tests' job.

mod chaos;
mod events;
mod expect;
mod invariants;
mod workload;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use stratus_proto::agent::v1 as pb;
use testkit::{Agentd, Httpd, NetNs, Pdiskd, Tgtd, XfsPool};

pub(crate) const BRIDGE: &str = "stsoak0";
/// The IQN the soak's own writer (qemu-io) uses for volume exports; agentd
/// uses `testkit::INITIATOR`.
pub(crate) const WRITER_IQN: &str = testkit::OTHER_INITIATOR;
/// Images each client pulls and evicts.
const IMAGES_PER_CLIENT: usize = 2;

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long the clients run (the settle phase and checks come after).
    pub duration: Duration,
    /// Concurrent clients, each with its own guests and volumes.
    pub clients: usize,
    /// A daemon is killed every `kill_every.0` to `kill_every.1`.
    pub kill_every: (Duration, Duration),
    /// Which daemons may be killed.
    pub victims: Vec<Daemon>,
    /// The random seed (printed, so a run can be repeated).
    pub seed: u64,
    /// How long the settle phase may wait for recovery before checking.
    pub settle: Duration,
}

/// A daemon the chaos thread kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Daemon {
    Pdiskd,
    Agentd,
    Tgtd,
    /// A random running soak guest's QEMU, as a guest crash would end it.
    Qemu,
}

impl Daemon {
    pub fn parse(s: &str) -> Option<Daemon> {
        match s {
            "pdiskd" => Some(Daemon::Pdiskd),
            "agentd" => Some(Daemon::Agentd),
            "tgtd" => Some(Daemon::Tgtd),
            "qemu" => Some(Daemon::Qemu),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Daemon::Pdiskd => "pdiskd",
            Daemon::Agentd => "agentd",
            Daemon::Tgtd => "tgtd",
            Daemon::Qemu => "qemu",
        }
    }
}

/// One SIGKILL.
#[derive(Debug, Clone, Serialize)]
pub struct Crash {
    pub daemon: Daemon,
    /// Seconds since the clients started.
    pub at_s: f64,
    /// From the kill until the restarted daemon listened again (0 for a
    /// QEMU: agentd's monitor records its end, nothing restarts it).
    pub down_ms: u64,
    /// The QEMU's pid, for a QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// Counts of one operation kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpCount {
    pub ok: u64,
    /// Final answers other than OK, by gRPC code name.
    pub failed: BTreeMap<String, u64>,
    /// Attempts repeated (same request id) after a lost answer.
    pub retries: u64,
    /// The first message of each failure code, to tell refusals apart.
    pub examples: BTreeMap<String, String>,
}

/// What `stratus-soak` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub clients: usize,
    pub duration_s: f64,
    pub operations: u64,
    pub by_operation: BTreeMap<String, OpCount>,
    pub crashes: Vec<Crash>,
    pub crashes_by_daemon: BTreeMap<String, u64>,
    /// Seconds the settle phase waited for the daemons to finish recovery.
    pub settle_s: f64,
    /// Individual invariant checks evaluated in the final pass.
    pub invariant_checks: u64,
    /// Events the follower saw, across agentd's restarts, each seq once.
    pub events_followed: u64,
    pub violations: Vec<String>,
}

impl Summary {
    /// The human-readable form.
    pub fn text(&self) -> String {
        let mut s = format!(
            "stratus-soak: {} clients for {:.0} s (seed {})\n\
             operations: {}\n",
            self.clients, self.duration_s, self.seed, self.operations
        );
        for (op, c) in &self.by_operation {
            let failed: Vec<String> = c.failed.iter().map(|(k, n)| format!("{k} {n}")).collect();
            s.push_str(&format!(
                "  {op:<16} ok {:>4}  retried {:>3}  failed {}\n",
                c.ok,
                c.retries,
                if failed.is_empty() {
                    "0".into()
                } else {
                    failed.join(", ")
                }
            ));
        }
        let by: Vec<String> = self
            .crashes_by_daemon
            .iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        s.push_str(&format!(
            "kills (SIGKILL; daemons restarted, QEMUs not): {} ({})\n\
             events followed across restarts: {}\n\
             settle: {:.0} s; invariant checks: {}; violations: {}\n",
            self.crashes.len(),
            by.join(", "),
            self.events_followed,
            self.settle_s,
            self.invariant_checks,
            self.violations.len()
        ));
        for v in &self.violations {
            s.push_str(&format!("  VIOLATION: {v}\n"));
        }
        s
    }
}

/// The daemons, owned by the chaos thread while clients run. Fields drop in
/// order: agentd (and its guests) first.
struct Daemons {
    agentd: Agentd,
    pdiskd: Pdiskd,
    tgtd: Tgtd,
}

/// Where things are, for clients and checks (fixed across restarts).
#[derive(Debug, Clone)]
pub(crate) struct Places {
    pub ns: String,
    pub agent_url: String,
    pub pdisk_url: String,
    pub portal: String,
    pub tgt_control_port: u32,
    pub pool_dir: PathBuf,
    pub agent_state: PathBuf,
    /// `pdisk:///…` of the base every guest's disk is a clone of.
    pub image_url: String,
    pub image_sha: String,
    /// Each client's own images on the httpd: (URL, SHA-256).
    pub client_images: Vec<Vec<(String, String)>>,
}

/// Runs a soak. Needs root, tgtd, QEMU and the workspace's binaries beside
/// this one (`cargo build --workspace`).
pub fn run(settings: &Settings) -> anyhow::Result<Summary> {
    testkit::require_root();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    let pool = XfsPool::new(2048);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let agentd = Agentd::start_in(pool.dir.path(), &ns, &pdiskd.url(), BRIDGE);
    let www = pool.dir.path().join("www");
    std::fs::create_dir_all(&www)?;
    let mut image = vec![0u8; 1 << 20];
    let stamp = format!("stratus-soak base image, seed {}", settings.seed);
    image[..stamp.len()].copy_from_slice(stamp.as_bytes());
    std::fs::write(www.join("base.raw"), &image)?;
    let httpd = Httpd::start_in(&ns, &www);
    // Each client pulls and evicts images of its own (distinct content).
    let mut client_images = Vec::new();
    for id in 0..settings.clients {
        let mut mine = Vec::new();
        for k in 0..IMAGES_PER_CLIENT {
            let file = format!("c{id}-p{k}.raw");
            let stamp = format!("stratus-soak image {file}, seed {}", settings.seed);
            image.fill(0);
            image[..stamp.len()].copy_from_slice(stamp.as_bytes());
            std::fs::write(www.join(&file), &image)?;
            mine.push((httpd.url(&file), testkit::sha256_of(&www.join(&file))));
        }
        client_images.push(mine);
    }
    let mut places = Places {
        ns: ns.name.clone(),
        agent_url: agentd.url(),
        pdisk_url: pdiskd.url(),
        portal: tgtd.portal(),
        tgt_control_port: tgtd.control_port,
        pool_dir: pdiskd.pool_dir.clone(),
        agent_state: agentd.state_dir.clone(),
        image_url: String::new(),
        image_sha: testkit::sha256_of(&www.join("base.raw")),
        client_images,
    };
    let rt = runtime_in(&ns)?;
    let url = httpd.url("base.raw");
    let base = rt.block_on(workload::pull_base(&places, url))?;
    places.image_url = format!("pdisk:///{base}");

    let daemons = Arc::new(Mutex::new(Some(Daemons {
        agentd,
        pdiskd,
        tgtd,
    })));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let chaos = {
        let daemons = daemons.clone();
        let stop = stop.clone();
        let settings = settings.clone();
        let places = places.clone();
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let mut chaos = chaos::Chaos {
                daemons: &daemons,
                places: &places,
                runtime: &handle,
                crashes: Vec::new(),
                violations: Vec::new(),
            };
            chaos.run(&stop, &settings, started);
            (chaos.crashes, chaos.violations)
        })
    };
    let follower = rt.spawn(events::follow_events(places.clone(), stop.clone()));
    let mut ops = rt.block_on(workload::run_clients(&places, settings));
    stop.store(true, Ordering::SeqCst);
    let (crashes, chaos_violations) = match chaos.join() {
        Ok(c) => c,
        Err(e) => {
            let d = daemons.lock().unwrap().take();
            if let Some(d) = d {
                eprintln!(
                    "stratus-soak: a daemon did not come back; logs:\n{}\n{}",
                    d.pdiskd.log_text(),
                    d.agentd.log_text()
                );
            }
            std::panic::resume_unwind(e)
        }
    };
    let duration = started.elapsed();
    // QEMUs the chaos killed: their guests must not run with them.
    let killed: std::collections::BTreeSet<u32> = crashes.iter().filter_map(|c| c.pid).collect();
    let followed = rt
        .block_on(follower)
        .context("the event follower panicked")?;

    // Settle: the daemons finish what the last crashes left (destroys and
    // unexports are retried every 60 s); then the final pass counts.
    let settle_started = Instant::now();
    let mut checks;
    loop {
        checks = rt.block_on(invariants::check(&places, &ops.expect, &followed, &killed));
        if checks.violations.is_empty() || settle_started.elapsed() > settings.settle {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    // The checks must be able to fail: plant an orphan tap and a stray
    // pool file, and each must be reported.
    let planted = rt.block_on(invariants::prove(&places, &ops.expect, &followed, &killed));
    let mut violations = std::mem::take(&mut ops.violations);
    violations.extend(planted);
    violations.extend(chaos_violations);
    violations.extend(followed.violations.iter().cloned());
    violations.extend(checks.violations);
    let mut crashes_by_daemon = BTreeMap::new();
    for c in &crashes {
        *crashes_by_daemon
            .entry(c.daemon.name().to_string())
            .or_insert(0) += 1;
    }
    let summary = Summary {
        seed: settings.seed,
        clients: settings.clients,
        duration_s: duration.as_secs_f64(),
        operations: ops
            .by_operation
            .values()
            .map(|c| c.ok + c.failed.values().sum::<u64>())
            .sum(),
        by_operation: ops.by_operation,
        crashes,
        crashes_by_daemon,
        settle_s: settle_started.elapsed().as_secs_f64(),
        invariant_checks: checks.count,
        events_followed: followed.events,
        violations,
    };
    if !summary.violations.is_empty() {
        let d = daemons.lock().unwrap();
        if let Some(d) = d.as_ref() {
            let keep = std::env::current_dir()?.join("var").join("soak-logs");
            std::fs::create_dir_all(&keep)?;
            for (name, log) in [("pdiskd.log", &d.pdiskd.log), ("agentd.log", &d.agentd.log)] {
                let _ = std::fs::copy(log, keep.join(name));
            }
            eprintln!("stratus-soak: daemon logs kept in {}", keep.display());
        }
    }
    rt.shutdown_timeout(Duration::from_secs(5));
    // Teardown in order: agentd and its guests, pdiskd, tgtd, then httpd,
    // the pool and the namespace.
    drop(daemons.lock().unwrap().take());
    drop(httpd);
    drop(pool);
    drop(ns);
    Ok(summary)
}

/// A multi-thread runtime whose threads all live in `ns`, so every socket
/// the clients open (and every program they run) is the namespace's.
fn runtime_in(ns: &NetNs) -> anyhow::Result<tokio::runtime::Runtime> {
    let path = format!("/var/run/netns/{}", ns.name);
    let file = Arc::new(std::fs::File::open(&path).with_context(|| format!("opening {path}"))?);
    let for_workers = file.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || enter(&for_workers).expect("entering the soak's namespace"))
        .build()?;
    Ok(rt)
}

fn enter(ns: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: setns on an open namespace fd only changes the calling
    // thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A guest's state, for the checks' messages.
pub(crate) fn state_name(v: &pb::Vm) -> &'static str {
    v.state().as_str_name()
}
