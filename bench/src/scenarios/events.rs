//! Scenario 6: events, from QEMU through agentd's journal to gRPC
//! WatchEvents subscribers: latency, sustained rate, and loss, with 10
//! subscribers against 1 (the peer).
//!
//! The guests are QEMUs booted straight from the test guest's kernel and
//! initramfs (no disks, no NICs; 2, or 4 in full mode), left to reach their
//! `ready` line before anything is measured. The events are PAUSED and
//! RESUMED: PauseVm/ResumeVm make agentd send QMP `stop`/`cont`; QEMU
//! answers with its STOP/RESUME event, agentd's monitor turns that into a
//! journal event (committed, then sent to live subscribers), and each
//! WatchEvents stream carries it to its subscriber. Each subscriber is its
//! own gRPC connection, following from the seq the phase starts at.
//!
//! Two phases, each run with 1 and then with 10 subscribers:
//! - latency: one guest paused and resumed K times in a row (K = 100; 10 in
//!   quick mode), so there is no queueing. Two latencies per event and
//!   subscriber, pooled over subscribers, p50 and p99:
//!   * "QMP event → subscriber": from the event's `time` (stamped by agentd
//!     in the journal transaction it commits as it handles QEMU's event, so
//!     the journal's fsync is included) to its arrival at the subscriber.
//!     Not included: QEMU writing the event to the QMP socket and agentd's
//!     reading it, a local socket hop. Both ends use this host's clock.
//!   * "API call → subscriber": from just before the PauseVm/ResumeVm call
//!     to the event's arrival (the gRPC request, the QMP command and its
//!     event, the commit, the stream): the upper bound of the same path.
//! - rate: every guest paused and resumed as fast as its driver can (one
//!   driver per guest, each waiting for agentd's confirmation) for D seconds
//!   (10; 2 in quick mode). Events per second at each subscriber = events it
//!   received / time from the drivers' start to its last event; the slowest
//!   subscriber's figure is reported, and the sum over subscribers. Each
//!   driver waits for agentd's answer before its next call, so this rate is
//!   bounded by how fast PauseVm/ResumeVm answer, not only by the event path.
//!
//! Loss: after each phase, the journal's events since the phase's first seq
//! (WatchEvents without follow) are what every subscriber must have
//! received, exactly once. Lost (missing) and duplicated events are counted
//! over both phases, against the number expected; both must be 0, and are
//! reported rather than asserted.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use stratus_proto::agent::v1 as pb;

use super::guests::{self, Agent, GuestHost};
use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "events";
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How long subscribers may take to catch up once the drivers stop.
const CATCH_UP: Duration = Duration::from_secs(30);

/// One event as a subscriber got it.
#[derive(Debug, Clone, Copy)]
struct Got {
    seq: u64,
    /// agentd's stamp (the event's `time`).
    stamped: Option<SystemTime>,
    at: SystemTime,
}

/// What one phase measured, over all its subscribers.
#[derive(Debug, Default)]
struct Phase {
    /// QMP event (agentd's stamp) → subscriber, ms.
    stamp_ms: Vec<f64>,
    /// API call → subscriber, ms.
    api_ms: Vec<f64>,
    /// Events per second at each subscriber.
    rates: Vec<f64>,
    expected: u64,
    lost: u64,
    duplicated: u64,
}

/// Everything measured with a number of subscribers.
#[derive(Debug, Default)]
struct BySubscribers {
    subs: usize,
    latency: Phase,
    rate: Phase,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let (guests, cycles, rate_for) = if ctx.quick {
        (2, 10, Duration::from_secs(2))
    } else {
        (4, 100, Duration::from_secs(10))
    };
    tokio::task::block_in_place(|| {
        let host = GuestHost::start();
        let m = host
            .run(move |url| measure(url, guests, cycles, rate_for))
            .with_context(|| host.agentd_log_tail())?;
        Ok(figures(&m))
    })
}

async fn measure(
    url: String,
    guests: usize,
    cycles: usize,
    rate_for: Duration,
) -> anyhow::Result<Vec<BySubscribers>> {
    let c = guests::connect(&url).await?;
    let names: Vec<String> = (0..guests).map(|i| format!("ev-{i}")).collect();
    let t0 = Instant::now();
    let boots: Vec<_> = names
        .iter()
        .map(|n| {
            let mut c = c.clone();
            let spec = guests::kernel_spec(n);
            tokio::spawn(async move { guests::launch(&mut c, spec, t0, t0 + BOOT_LIMIT).await })
        })
        .collect();
    for (b, n) in boots.into_iter().zip(&names) {
        // Only QEMU matters here (it pauses and resumes a guest whatever
        // the guest does); the wait for `ready` keeps boots out of the
        // measurements.
        if b.await??.ready.is_none() {
            eprintln!("  {n}: not ready (measuring anyway: QEMU runs)");
        }
    }
    let mut out = Vec::new();
    for subs in [1, 10] {
        let latency = phase(&url, subs, Drive::Sequential(names[0].clone(), cycles)).await?;
        let rate = phase(&url, subs, Drive::Parallel(names.clone(), rate_for)).await?;
        eprintln!(
            "  {subs} subscriber(s): stamp → subscriber p50 {:.2} ms, API → subscriber p50 {:.2} ms, {:.0} events/s each, lost {}, duplicated {}",
            percentile(&latency.stamp_ms, 50.0),
            percentile(&latency.api_ms, 50.0),
            rate.rates.iter().copied().fold(f64::NAN, f64::min),
            latency.lost + rate.lost,
            latency.duplicated + rate.duplicated,
        );
        out.push(BySubscribers {
            subs,
            latency,
            rate,
        });
    }
    Ok(out)
}

/// How a phase makes its events.
enum Drive {
    /// This guest, paused and resumed this many times in a row.
    Sequential(String, usize),
    /// Each guest paused and resumed by its own driver, for this long.
    Parallel(Vec<String>, Duration),
}

async fn phase(url: &str, subs: usize, drive: Drive) -> anyhow::Result<Phase> {
    let mut c = guests::connect(url).await?;
    let since = c
        .get_host(pb::GetHostRequest {})
        .await?
        .into_inner()
        .last_event_seq;

    // Subscribers, each on its own connection. WatchEvents subscribes to
    // live events before it answers, and replays from `since` anyway.
    let (target_tx, target_rx) = tokio::sync::watch::channel(None::<u64>);
    let mut received = Vec::new();
    let mut followers = Vec::new();
    for _ in 0..subs {
        let mut sc = guests::connect(url).await?;
        let mut stream = sc
            .watch_events(pb::WatchEventsRequest {
                project: String::new(),
                since_seq: since,
                vm: String::new(),
                no_follow: false,
            })
            .await
            .context("WatchEvents")?
            .into_inner();
        let got = Arc::new(Mutex::new(Vec::<Got>::new()));
        received.push(got.clone());
        let mut target = target_rx.clone();
        followers.push(tokio::spawn(async move {
            let _keep = sc;
            let mut last = since;
            loop {
                if target.borrow().is_some_and(|t| last >= t) {
                    return Ok::<(), tonic::Status>(());
                }
                tokio::select! {
                    m = stream.message() => match m? {
                        Some(e) => {
                            let at = SystemTime::now();
                            last = last.max(e.seq);
                            got.lock().unwrap().push(Got {
                                seq: e.seq,
                                stamped: humantime::parse_rfc3339(&e.time).ok(),
                                at,
                            });
                        }
                        None => return Ok(()),
                    },
                    r = target.changed() => if r.is_err() { return Ok(()) },
                }
            }
        }));
    }

    // The drivers. `sent` maps the seq of each confirmed event to the time
    // its API call was made.
    let started = SystemTime::now();
    let sent: HashMap<u64, SystemTime> = match drive {
        Drive::Sequential(vm, cycles) => {
            let mut sent = HashMap::new();
            for _ in 0..cycles {
                for pause in [true, false] {
                    let (seq, at) = toggle(&mut c, &vm, pause).await?;
                    sent.insert(seq, at);
                }
            }
            sent
        }
        Drive::Parallel(vms, secs) => {
            let guests_driven = vms.len();
            let until = Instant::now() + secs;
            let drivers: Vec<_> = vms
                .into_iter()
                .map(|vm| {
                    let url = url.to_string();
                    tokio::spawn(async move {
                        let mut c = guests::connect(&url).await?;
                        let mut sent = HashMap::new();
                        while Instant::now() < until {
                            for pause in [true, false] {
                                let (seq, at) = toggle(&mut c, &vm, pause).await?;
                                sent.insert(seq, at);
                            }
                        }
                        Ok::<_, anyhow::Error>(sent)
                    })
                })
                .collect();
            let mut sent = HashMap::new();
            for d in drivers {
                sent.extend(d.await??);
            }
            let took = started.elapsed().unwrap_or_default();
            eprintln!(
                "  rate phase, {subs} subscriber(s): {} calls in {:.1} s ({:.1} ms per call and guest)",
                sent.len(),
                took.as_secs_f64(),
                guests::ms(took) * guests_driven as f64 / sent.len().max(1) as f64
            );
            sent
        }
    };

    // What every subscriber must have: the journal since `since`.
    let until = c
        .get_host(pb::GetHostRequest {})
        .await?
        .into_inner()
        .last_event_seq;
    let _ = target_tx.send(Some(until));
    let catch_up = tokio::time::timeout(CATCH_UP, async {
        for f in &mut followers {
            if let Ok(Err(e)) = f.await {
                eprintln!("  a subscriber's stream failed: {e}");
            }
        }
    })
    .await;
    if catch_up.is_err() {
        eprintln!("  subscribers did not catch up within {CATCH_UP:?}");
        for f in &followers {
            f.abort();
        }
    }
    let mut replay = c
        .watch_events(pb::WatchEventsRequest {
            project: String::new(),
            since_seq: since,
            vm: String::new(),
            no_follow: true,
        })
        .await?
        .into_inner();
    let mut expected = HashSet::new();
    while let Some(e) = replay.message().await? {
        if e.seq <= until {
            expected.insert(e.seq);
        }
    }

    let mut p = Phase::default();
    for got in &received {
        let got = got.lock().unwrap();
        let in_window: Vec<&Got> = got.iter().filter(|g| g.seq <= until).collect();
        let unique: HashSet<u64> = in_window.iter().map(|g| g.seq).collect();
        p.expected += expected.len() as u64;
        p.lost += expected.difference(&unique).count() as u64;
        p.duplicated += (in_window.len() - unique.len()) as u64;
        for g in &in_window {
            if let Some(s) = g.stamped.and_then(|s| g.at.duration_since(s).ok()) {
                p.stamp_ms.push(guests::ms(s));
            }
            if let Some(a) = sent.get(&g.seq).and_then(|a| g.at.duration_since(*a).ok()) {
                p.api_ms.push(guests::ms(a));
            }
        }
        if let Some(last) = in_window.iter().map(|g| g.at).max() {
            let window = last.duration_since(started).unwrap_or_default();
            p.rates
                .push(in_window.len() as f64 / window.as_secs_f64().max(1e-6));
        }
    }
    Ok(p)
}

/// Pauses or resumes `vm`; returns the seq of the confirming event (the
/// guest's last event when the call returns) and when the call was made.
async fn toggle(c: &mut Agent, vm: &str, pause: bool) -> anyhow::Result<(u64, SystemTime)> {
    let at = SystemTime::now();
    let req = pb::VmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: vm.into(),
    };
    let r = if pause {
        c.pause_vm(req).await
    } else {
        c.resume_vm(req).await
    };
    let vm = r
        .with_context(|| format!("{} {vm}", if pause { "PauseVm" } else { "ResumeVm" }))?
        .into_inner();
    Ok((vm.last_event_seq, at))
}

fn figures(m: &[BySubscribers]) -> Vec<Figure> {
    let (Some(one), Some(ten)) = (
        m.iter().find(|b| b.subs == 1),
        m.iter().find(|b| b.subs == 10),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (what, pick) in [
        (
            "QMP event (agentd stamp) → subscriber",
            (|p: &Phase| &p.stamp_ms) as fn(&Phase) -> &Vec<f64>,
        ),
        ("API call → event at subscriber", |p: &Phase| &p.api_ms),
    ] {
        for p in [50.0, 99.0] {
            out.push(
                Figure::new(
                    SCENARIO,
                    &format!("{what} p{p} (10 subscribers)"),
                    "ms",
                    percentile(pick(&ten.latency), p),
                )
                .against(
                    &format!("{what} p{p} (1 subscriber)"),
                    percentile(pick(&one.latency), p),
                )
                .with_samples(pick(&ten.latency).clone())
                .with_peer_samples(pick(&one.latency).clone()),
            );
        }
    }
    let slowest = |b: &BySubscribers| b.rate.rates.iter().copied().fold(f64::NAN, f64::min);
    let total = |b: &BySubscribers| b.rate.rates.iter().sum::<f64>();
    out.push(
        Figure::new(
            SCENARIO,
            "events/s sustained, each subscriber (10 subscribers)",
            "events/s",
            slowest(ten),
        )
        .against("events/s (1 subscriber)", slowest(one))
        .with_samples(ten.rate.rates.clone()),
    );
    out.push(
        Figure::new(
            SCENARIO,
            "events/s delivered, all 10 subscribers",
            "events/s",
            total(ten),
        )
        .against("events/s delivered (1 subscriber)", total(one)),
    );
    for b in [ten, one] {
        let expected = b.latency.expected + b.rate.expected;
        let subs = if b.subs == 1 {
            "1 subscriber".to_string()
        } else {
            format!("{} subscribers", b.subs)
        };
        out.push(
            Figure::new(
                SCENARIO,
                &format!("events lost ({subs})"),
                "events",
                (b.latency.lost + b.rate.lost) as f64,
            )
            .against(&format!("events expected ({subs})"), expected as f64),
        );
        out.push(
            Figure::new(
                SCENARIO,
                &format!("events duplicated ({subs})"),
                "events",
                (b.latency.duplicated + b.rate.duplicated) as f64,
            )
            .against(&format!("events expected ({subs})"), expected as f64),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_subscribers_are_compared_with_one() {
        let phase = |ms: f64, rate: f64, subs: usize| Phase {
            stamp_ms: vec![ms; 4],
            api_ms: vec![ms * 2.0; 4],
            rates: vec![rate; subs],
            expected: 40 * subs as u64,
            lost: 0,
            duplicated: 0,
        };
        let m = vec![
            BySubscribers {
                subs: 1,
                latency: phase(1.0, 0.0, 1),
                rate: phase(0.0, 100.0, 1),
            },
            BySubscribers {
                subs: 10,
                latency: phase(2.0, 0.0, 10),
                rate: phase(0.0, 80.0, 10),
            },
        ];
        let f = figures(&m);
        assert_eq!(
            f[0].name,
            "QMP event (agentd stamp) → subscriber p50 (10 subscribers)"
        );
        assert_eq!(f[0].ratio, Some(2.0));
        assert_eq!(f[2].value, 4.0);
        assert_eq!(f[4].value, 80.0);
        assert_eq!(f[4].ratio, Some(0.8));
        assert_eq!(f[5].value, 800.0);
        assert_eq!(f[6].name, "events lost (10 subscribers)");
        assert_eq!(f[6].value, 0.0);
        assert_eq!(f[6].peer_value, Some(800.0));
        assert_eq!(f[6].ratio, Some(0.0));
        assert!(f.iter().all(|f| f.ratio.is_some()));
    }
}
