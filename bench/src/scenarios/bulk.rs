//! Scenario 4: bulk launch. N guests (default 30, `--bulk N`; 3 in quick
//! mode) launched at once on one host from one cached image, against a
//! single launch of the same image measured just before, on the same host.
//!
//! The guests are the launch scenario's (1 vCPU, 128 MiB, TCG, the test
//! guest as a pdisk clone over iSCSI, no NICs). The image is pulled into
//! agentd's cache and imported into pdisk first (PullImage), so every launch
//! is a clone, an export and a QEMU. All N CreateVm + StartVm calls start
//! together, each on its own task over one gRPC connection, and are timed
//! from that common start:
//! - until all RUNNING: the last StartVm answer (agentd answers once QEMU
//!   runs the guest);
//! - until all ready: the last `STRATUS-GUEST ready` console line (polled
//!   every 50 ms). Under TCG on a small host the guests share its cores,
//!   so this takes minutes; a guest that is not ready within the limit (5
//!   minutes; 2 in quick mode), or whose kernel panics first, counts as a
//!   failure, as does a failed start.
//! - agentd's CPU time over the whole launch: the sum of its threads' run
//!   times from /proc/PID/task/*/schedstat (ns), or user + system from
//!   /proc/PID/stat (10 ms ticks) when that is clearly larger (threads that
//!   ended meanwhile); QEMU runs daemonized, outside it. And agentd's peak
//!   RSS (VmRSS sampled every 50 ms).
//!
//! Peers: the single launch's times (ratio = how much longer N guests take
//! than one; the per-guest figure divides the bulk time by N, so below 1.00x
//! means the host launched guests faster in bulk than one by one), its CPU,
//! and agentd's RSS when idle just before the bulk launch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use stratus_proto::agent::v1 as pb;

use super::guests::{self, GuestHost, Image, Launched};
use super::Ctx;
use crate::report::Figure;

const SCENARIO: &str = "bulk launch";
const SINGLE_LIMIT: Duration = Duration::from_secs(180);

/// What one bulk run measured.
#[derive(Debug)]
pub(crate) struct Measured {
    n: usize,
    single: Launched,
    single_cpu_s: f64,
    idle_rss: u64,
    /// One per guest: Err when its start failed.
    guests: Vec<Result<Launched, String>>,
    bulk_cpu_s: f64,
    peak_rss: u64,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let n = ctx.bulk.unwrap_or(if ctx.quick { 3 } else { 30 });
    anyhow::ensure!((1..=200).contains(&n), "--bulk {n}: 1 to 200 guests");
    let limit = Duration::from_secs(if ctx.quick { 120 } else { 300 });
    tokio::task::block_in_place(|| {
        let host = GuestHost::start();
        let image = host.image.clone();
        let pid = host.agentd_pid()?;
        let m = host
            .run(move |url| measure(url, image, n, pid, limit))
            .with_context(|| host.agentd_log_tail())?;
        Ok(figures(SCENARIO, "", &m))
    })
}

/// One guest alone, then `n` at once, on the agentd at `url` (pid `pid`):
/// also the rbd scenario's boot storm, on a host whose pdiskd is on Ceph.
pub(crate) async fn measure(
    url: String,
    image: Image,
    n: usize,
    pid: u32,
    limit: Duration,
) -> anyhow::Result<Measured> {
    let mut c = guests::connect(&url).await?;
    c.pull_image(pb::PullImageRequest {
        server: String::new(),
        request_id: String::new(),
        image: Some(pb::ImageRef {
            url: image.url.clone(),
            sha256: image.sha256.clone(),
            format: 0,
            endorser: String::new(),
            endorsement: String::new(),
        }),
        to_pdisk: true,
    })
    .await
    .context("PullImage")?;

    // One guest alone: the peer.
    let before = guests::proc_usage(pid)?;
    let t0 = Instant::now();
    let single = guests::launch(
        &mut c,
        guests::image_spec("bulk-single", &image),
        t0,
        t0 + SINGLE_LIMIT,
    )
    .await?;
    let single_cpu_s = guests::proc_usage(pid)?.cpu_since(&before);
    single
        .ready
        .context("the single guest printed no ready line")?;
    guests::destroy(&mut c, "bulk-single", 10).await?;
    eprintln!(
        "  single: RUNNING {:.0} ms, ready {:.0} ms, agentd {:.1} CPU ms",
        guests::ms(single.running),
        guests::ms(single.ready.unwrap_or_default()),
        single_cpu_s * 1e3
    );

    // N at once, with agentd's RSS sampled meanwhile.
    let idle = guests::proc_usage(pid)?;
    let peak = Arc::new(AtomicU64::new(idle.rss_bytes));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok(u) = guests::proc_usage(pid) {
                    peak.fetch_max(u.rss_bytes, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let mut c = c.clone();
            let spec = guests::image_spec(&format!("bulk-{i}"), &image);
            tokio::spawn(async move {
                guests::launch(&mut c, spec, t0, t0 + limit)
                    .await
                    .map_err(|e| format!("{e:#}"))
            })
        })
        .collect();
    let mut launched = Vec::with_capacity(n);
    for t in tasks {
        launched.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    let bulk_cpu_s = guests::proc_usage(pid)?.cpu_since(&idle);
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    for (i, l) in launched.iter().enumerate() {
        match l {
            Err(e) => eprintln!("  bulk-{i}: failed: {e}"),
            Ok(l) if l.panicked => eprintln!("  bulk-{i}: the guest's kernel panicked at boot"),
            Ok(l) if l.ready.is_none() => eprintln!("  bulk-{i}: not ready within {limit:?}"),
            Ok(_) => {}
        }
    }

    // Tear down (not timed): a guest that never booted ignores the ACPI
    // powerdown and is forced after 5 s.
    let destroys: Vec<_> = (0..n)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { guests::destroy(&mut c, &format!("bulk-{i}"), 5).await })
        })
        .collect();
    for d in destroys {
        if let Ok(Err(e)) = d.await {
            eprintln!("  {e:#}");
        }
    }
    Ok(Measured {
        n,
        single,
        single_cpu_s,
        idle_rss: idle.rss_bytes,
        guests: launched,
        bulk_cpu_s,
        peak_rss: peak.load(Ordering::Relaxed),
    })
}

/// The figures of a run, named `PREFIX<name>` under `scenario`.
pub(crate) fn figures(scenario: &str, prefix: &str, m: &Measured) -> Vec<Figure> {
    let n = m.n as f64;
    let name = |s: &str| format!("{prefix}{s}");
    let ok: Vec<&Launched> = m.guests.iter().filter_map(|g| g.as_ref().ok()).collect();
    let ready: Vec<f64> = ok.iter().filter_map(|l| l.ready).map(secs).collect();
    let failures = m.n - ready.len();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let all_running = max(&ok.iter().map(|l| secs(l.running)).collect::<Vec<_>>());
    let all_ready = max(&ready);
    let single_running = secs(m.single.running);
    let single_ready = m.single.ready.map(secs).unwrap_or(f64::NAN);
    let ready_label = if failures == 0 {
        format!("{} guests", m.n)
    } else {
        format!("{} of {} guests", ready.len(), m.n)
    };
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    vec![
        Figure::new(
            scenario,
            &name(&format!("until all {} RUNNING", m.n)),
            "s",
            all_running,
        )
        .against("1 guest RUNNING", single_running)
        .with_samples(ok.iter().map(|l| secs(l.running)).collect()),
        Figure::new(
            scenario,
            &name(&format!("until all ready ({ready_label})")),
            "s",
            all_ready,
        )
        .against("1 guest ready", single_ready)
        .with_samples(ready.clone()),
        Figure::new(
            scenario,
            &name("per guest to RUNNING (bulk / N)"),
            "s",
            all_running / n,
        )
        .against("1 guest RUNNING", single_running),
        Figure::new(
            scenario,
            &name("per guest to ready (bulk / N)"),
            "s",
            all_ready / n,
        )
        .against("1 guest ready", single_ready),
        Figure::new(scenario, &name("failures"), "guests", failures as f64)
            .against("guests launched", n),
        Figure::new(
            scenario,
            &name("agentd peak RSS during launch"),
            "MiB",
            mib(m.peak_rss),
        )
        .against("agentd RSS idle", mib(m.idle_rss)),
        Figure::new(
            scenario,
            &name("agentd CPU per guest (bulk)"),
            "ms",
            m.bulk_cpu_s * 1e3 / n,
        )
        .against("agentd CPU, single launch", m.single_cpu_s * 1e3),
        Figure::new(
            scenario,
            &name(&format!("agentd CPU, all {} guests", m.n)),
            "ms",
            m.bulk_cpu_s * 1e3,
        )
        .against("N x single launch", m.single_cpu_s * 1e3 * n),
    ]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_figures_count_failures_and_compare_with_one_guest() {
        let l = |run_s: u64, ready_s: Option<u64>| Launched {
            running: Duration::from_secs(run_s),
            ready: ready_s.map(Duration::from_secs),
            panicked: false,
        };
        let m = Measured {
            n: 3,
            single: l(1, Some(5)),
            single_cpu_s: 0.5,
            idle_rss: 10 << 20,
            guests: vec![Ok(l(2, Some(20))), Ok(l(3, None)), Err("boom".into())],
            bulk_cpu_s: 1.2,
            peak_rss: 15 << 20,
        };
        let f = figures(SCENARIO, "", &m);
        assert_eq!(f[0].name, "until all 3 RUNNING");
        assert_eq!(f[0].value, 3.0);
        assert_eq!(f[0].ratio, Some(3.0));
        assert_eq!(f[1].name, "until all ready (1 of 3 guests)");
        assert_eq!(f[1].value, 20.0);
        assert_eq!(f[2].value, 1.0);
        assert_eq!(f[4].value, 2.0);
        assert_eq!(f[4].peer_value, Some(3.0));
        assert_eq!(f[5].value, 15.0);
        assert_eq!(f[5].ratio, Some(1.5));
        assert!((f[6].value - 400.0).abs() < 1e-9);
        assert_eq!(f[7].peer_value, Some(1500.0));
        assert!(f.iter().all(|f| f.ratio.is_some()));
    }
}
