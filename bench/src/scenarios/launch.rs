//! Scenario 3: launch latency, from the API call to QEMU running and to the
//! guest's `STRATUS-GUEST ready` console line, for an uncached image (the
//! peer) and a cached one.
//!
//! Each launch is CreateVm + StartVm of a 1-vCPU, 128 MiB TCG guest whose
//! only disk is the test guest's qcow2 image (16 MiB, served by busybox
//! httpd on loopback in the bench's namespace) as a pdisk clone, booted by
//! SeaBIOS over iSCSI. Timed from just before CreateVm:
//! - to RUNNING: StartVm's answer, which agentd gives once QEMU runs the
//!   guest (QMP `query-status` after the RUNNING event is journaled);
//! - to ready: the `ready` line in the guest's console log, polled every
//!   25 ms.
//!
//! Uncached: before the launch the image is evicted from agentd's cache and
//! its pdisk base volume deleted (EvictImage local + pdisk, then checked with
//! ListImages), so StartVm downloads, verifies, imports it (qemu-img convert
//! into a base volume), clones, exports and launches. Cached: the image is in
//! both, so StartVm only clones, exports and launches. Uncached and cached
//! launches alternate, each guest destroyed before the next, so background
//! load weighs on both alike; in full mode an untimed pair goes first. A
//! launch whose guest kernel panics at boot (TCG's timer check on a busy
//! host) is done again, at most twice.
//! Figures are p50 and p95 of the cached launches against the uncached
//! ones (ratio cached/uncached), plus RUNNING → ready (the guest's boot,
//! which should not depend on the cache).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use stratus_proto::agent::v1 as pb;

use super::guests::{self, Agent, GuestHost, Image, Launched};
use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "launch latency";
/// How long a guest may take to print `ready`.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// Launches redone when the guest's kernel panics at boot (see
/// `guests::Boot::Panicked`); a run is timed on the launch that booted.
const MAX_RETRIES: usize = 2;

#[derive(Debug, Default)]
struct Runs {
    uncached: Vec<Launched>,
    cached: Vec<Launched>,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let runs = if ctx.quick { 2 } else { 10 };
    let warmup = !ctx.quick;
    tokio::task::block_in_place(|| {
        let host = GuestHost::start();
        let image = host.image.clone();
        let runs = host
            .run(move |url| measure(url, image, runs, warmup))
            .with_context(|| host.agentd_log_tail())?;
        Ok(figures(&runs))
    })
}

async fn measure(url: String, image: Image, runs: usize, warmup: bool) -> anyhow::Result<Runs> {
    let mut c = guests::connect(&url).await?;
    let mut out = Runs::default();
    for i in 0..runs + usize::from(warmup) {
        let counted = !warmup || i > 0;
        for cached in [false, true] {
            let kind = if cached { "cached" } else { "uncached" };
            let mut attempt = 0;
            let (name, l) = loop {
                prepare(&mut c, &image.sha256, cached).await?;
                let name = match attempt {
                    0 => format!("launch-{kind}-{i}"),
                    n => format!("launch-{kind}-{i}-again{n}"),
                };
                let t0 = Instant::now();
                let l = guests::launch(
                    &mut c,
                    guests::image_spec(&name, &image),
                    t0,
                    t0 + BOOT_LIMIT,
                )
                .await?;
                guests::destroy(&mut c, &name, 10).await?;
                if l.panicked && attempt < MAX_RETRIES {
                    eprintln!(
                        "  {name}: the guest's kernel panicked at boot (TCG on a busy host); launching again"
                    );
                    attempt += 1;
                    continue;
                }
                break (name, l);
            };
            let ready = l.ready.with_context(|| {
                if l.panicked {
                    format!("{name}: the guest's kernel panicked at boot")
                } else {
                    format!("{name} printed no ready line in {BOOT_LIMIT:?}")
                }
            })?;
            eprintln!(
                "  {name}{}: RUNNING {:.0} ms, ready {:.0} ms",
                if counted { "" } else { " (warm-up)" },
                guests::ms(l.running),
                guests::ms(ready)
            );
            if counted {
                if cached {
                    out.cached.push(l);
                } else {
                    out.uncached.push(l);
                }
            }
        }
    }
    Ok(out)
}

/// Makes the image cached (it is, after the previous launch) or uncached
/// (evicted from agentd's cache and pdisk), and checks it.
async fn prepare(c: &mut Agent, sha256: &str, cached: bool) -> anyhow::Result<()> {
    if !cached {
        let evicted = c
            .evict_image(pb::EvictImageRequest {
                server: String::new(),
                request_id: String::new(),
                sha256: sha256.to_string(),
                local: true,
                pdisk: true,
            })
            .await;
        match evicted {
            // Not cached yet (the first run).
            Err(s) if s.code() == tonic::Code::NotFound => {}
            r => {
                r.context("EvictImage")?;
            }
        }
    }
    expect_cached(c, sha256, cached).await
}

/// Checks that the image is (or is not) both in agentd's cache and in pdisk.
async fn expect_cached(c: &mut Agent, sha256: &str, cached: bool) -> anyhow::Result<()> {
    let images = c
        .list_images(pb::ListImagesRequest {})
        .await
        .context("ListImages")?
        .into_inner()
        .images;
    let locations: Vec<&str> = images
        .iter()
        .filter(|i| i.sha256 == sha256)
        .map(|i| i.location.as_str())
        .collect();
    let both = locations.contains(&"local") && locations.contains(&"pdisk");
    anyhow::ensure!(
        if cached { both } else { locations.is_empty() },
        "image {sha256} expected {}, found in {locations:?}",
        if cached {
            "in the cache and in pdisk"
        } else {
            "nowhere"
        }
    );
    Ok(())
}

fn figures(r: &Runs) -> Vec<Figure> {
    type Pick = fn(&Launched) -> f64;
    let measures: [(&str, Pick); 3] = [
        ("API call → RUNNING", |l| guests::ms(l.running)),
        ("API call → guest ready", |l| {
            l.ready.map(guests::ms).unwrap_or(f64::NAN)
        }),
        ("RUNNING → guest ready (boot)", |l| {
            l.ready
                .map(|r| guests::ms(r.saturating_sub(l.running)))
                .unwrap_or(f64::NAN)
        }),
    ];
    let mut out = Vec::new();
    for (what, pick) in measures {
        let cached: Vec<f64> = r.cached.iter().map(pick).collect();
        let uncached: Vec<f64> = r.uncached.iter().map(pick).collect();
        for p in [50.0, 95.0] {
            out.push(
                Figure::new(
                    SCENARIO,
                    &format!("{what} p{p} (cached)"),
                    "ms",
                    percentile(&cached, p),
                )
                .against(&format!("{what} p{p} (uncached)"), percentile(&uncached, p))
                .with_samples(cached.clone())
                .with_peer_samples(uncached.clone()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_launches_are_compared_with_uncached_ones() {
        let l = |run_ms: u64, ready_ms: u64| Launched {
            running: Duration::from_millis(run_ms),
            ready: Some(Duration::from_millis(ready_ms)),
            panicked: false,
        };
        let r = Runs {
            uncached: vec![l(1000, 5000), l(1200, 5400)],
            cached: vec![l(250, 4250), l(300, 4300)],
        };
        let f = figures(&r);
        assert_eq!(f.len(), 6);
        assert_eq!(f[0].name, "API call → RUNNING p50 (cached)");
        assert_eq!(
            f[0].peer.as_deref(),
            Some("API call → RUNNING p50 (uncached)")
        );
        assert_eq!(f[0].value, 250.0);
        assert_eq!(f[0].ratio, Some(0.25));
        assert_eq!(f[1].value, 300.0);
        assert_eq!(f[1].peer_value, Some(1200.0));
        // Boot time: ready - running, the same with or without the cache.
        assert_eq!(f[4].value, 4000.0);
        assert_eq!(f[4].ratio, Some(1.0));
        assert!(f.iter().all(|f| f.ratio.is_some()));
    }
}
