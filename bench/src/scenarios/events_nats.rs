//! Scenario events-nats: pdiskd's events through NATS JetStream (Debian's
//! `nats-server -js` on loopback, file storage) against the same events
//! through WatchEvents, in the same run.
//!
//! A driver creates and deletes 1 MiB volumes on a real stack (XFS reflink
//! pool on a loop device, tgtd), two events per volume. A WatchEvents
//! subscriber (gRPC, following) and a NATS durable consumer (pull, explicit
//! acks) read every event. For each event and reader: latency = arrival at
//! the reader − the event's `time` (stamped by pdiskd inside the store
//! transaction that commits it; both clocks are this host's), p50 and p99.
//! The broker path adds: the publisher waking, JetStream's store and ack,
//! the consumer's pull.
//!
//! Phases: latency (V volumes one after another: no queueing), rate (the
//! driver as fast as pdiskd answers for D seconds: events/s at the NATS
//! consumer over the phase, and the WatchEvents subscriber's as the peer),
//! outage (the driver runs on; nats-server is killed -9 for 5 s and
//! started again on the same store; the driver stops 5 s after; the
//! consumer must then hold every event since the phase's start: lost =
//! message ids never delivered; duplicates counted at the consumer before
//! any de-duplication, split into ids the stream stored twice (a re-send
//! its duplicate window did not drop) and redeliveries of one stored
//! message (the consumer's acks lost with the broker); a consumer that
//! de-duplicates by message id sees neither. The publisher's drain rate of
//! the backlog after the broker's return is the broker path's throughput
//! without the driver's limit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use stratus_core::nats::{Broker, NatsAuth, NatsSettings, StreamLimits};
use stratus_proto::pdisk::v1 as pb;
use testkit::{NatsServer, Pdiskd, Tgtd, XfsPool};

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "events-nats";
const HOST: &str = "bench";

/// Arrival times by seq, at one reader; `dups` counts repeats, and for
/// the broker `stored_twice` the repeats the stream held under a second
/// stream seq (a re-send it did not drop) rather than redelivered.
#[derive(Default)]
struct Arrivals {
    at: HashMap<u64, (SystemTime, SystemTime)>,
    stream_seq: HashMap<u64, u64>,
    dups: u64,
    stored_twice: u64,
}

impl Arrivals {
    fn record(&mut self, seq: u64, stamped: &str) {
        let now = SystemTime::now();
        let stamped = humantime::parse_rfc3339(stamped).unwrap_or(now);
        if self.at.insert(seq, (stamped, now)).is_some() {
            self.dups += 1;
        }
    }

    fn record_stream(&mut self, seq: u64, stamped: &str, stream_seq: u64) {
        self.record(seq, stamped);
        if let Some(old) = self.stream_seq.insert(seq, stream_seq) {
            if old != stream_seq {
                self.stored_twice += 1;
            }
        }
    }

    /// Events per second of the seqs in `range` committed before `after`
    /// and arriving after it (the backlog): count / (last − first arrival).
    fn drain_rate(&self, range: std::ops::RangeInclusive<u64>, after: SystemTime) -> (u64, f64) {
        let got: Vec<SystemTime> = range
            .filter_map(|s| self.at.get(&s))
            .filter(|(stamped, at)| *stamped < after && *at > after)
            .map(|a| a.1)
            .collect();
        let (Some(first), Some(last)) = (got.iter().min(), got.iter().max()) else {
            return (0, 0.0);
        };
        let secs = last
            .duration_since(*first)
            .unwrap_or_default()
            .as_secs_f64();
        (
            got.len() as u64,
            if secs == 0.0 {
                0.0
            } else {
                got.len() as f64 / secs
            },
        )
    }

    /// Latencies (ms) of seqs in `range`.
    fn latencies(&self, range: std::ops::RangeInclusive<u64>) -> Vec<f64> {
        range
            .filter_map(|s| self.at.get(&s))
            .map(|(stamped, at)| {
                at.duration_since(*stamped)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * 1000.0
            })
            .collect()
    }

    /// Events per second over `range`: count / (last arrival − `start`).
    fn rate(&self, range: std::ops::RangeInclusive<u64>, start: SystemTime) -> f64 {
        let got: Vec<SystemTime> = range.filter_map(|s| self.at.get(&s).map(|a| a.1)).collect();
        let last = got.iter().max().copied().unwrap_or(start);
        let secs = last.duration_since(start).unwrap_or_default().as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            got.len() as f64 / secs
        }
    }
}

fn settings(url: &str) -> NatsSettings {
    NatsSettings {
        url: url.into(),
        auth: NatsAuth::None,
        ca: None,
        client_cert: None,
        host: "bench".into(),
        limits: StreamLimits::default(),
    }
}

/// Creates and deletes `n` volumes (or until `until`); returns how many.
async fn churn(c: &mut testkit::Client, first: usize, n: usize, until: Option<Instant>) -> usize {
    let mut done = 0;
    while done < n && until.is_none_or(|u| Instant::now() < u) {
        let name = format!("b{}", first + done);
        if c.create_volume(pb::CreateVolumeRequest {
            name: name.clone(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .is_err()
        {
            break;
        }
        let _ = c
            .delete_volume(pb::DeleteVolumeRequest {
                now: false,
                volume: name,
                project: String::new(),
                request_id: String::new(),
            })
            .await;
        done += 1;
    }
    done
}

async fn wait_last(a: &Mutex<Arrivals>, seq: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if a.lock().unwrap().at.contains_key(&seq) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    testkit::require_root();
    let (latency_n, rate_secs) = if ctx.quick { (20, 2) } else { (300, 10) };
    let pool = XfsPool::new(2048);
    let tgtd = Tgtd::start(pool.dir.path());
    let mut nats = NatsServer::start(pool.dir.path());
    let url = nats.url();
    let pdiskd = Pdiskd::start_with(&pool, &tgtd, &["--nats-url", &url, "--nats-host", HOST]);
    let mut c = pdiskd.client().await;

    // Readers, from the first event on.
    let grpc = Arc::new(Mutex::new(Arrivals::default()));
    let broker_side = Arc::new(Mutex::new(Arrivals::default()));
    let mut sub = pdiskd.client().await;
    let mut stream = sub
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .context("WatchEvents")?
        .into_inner();
    let g = grpc.clone();
    tokio::spawn(async move {
        while let Ok(Some(e)) = stream.message().await {
            g.lock().unwrap().record(e.seq, &e.time);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        if let Ok(b) = Broker::connect(&settings(&url), "bench", true).await {
            if b.stream_messages().await.is_ok() {
                break b;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "pdiskd never made the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut reader = b.durable("bench", Some("stratus.pdisk.>")).await?;
    let n = broker_side.clone();
    tokio::spawn(async move {
        loop {
            match reader.next(Duration::from_secs(1)).await {
                Ok(Some(m)) => {
                    if let Ok(e) = pdisk::events::event_from_payload(&m.message.payload) {
                        n.lock()
                            .unwrap()
                            .record_stream(e.seq, &e.time, m.message.stream_seq);
                    }
                    let _ = m.ack().await;
                }
                Ok(None) => {}
                // The broker away: the client reconnects on its own.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    // Latency: one volume at a time.
    let mut made = churn(&mut c, 0, latency_n, None).await;
    let latency_last = 2 * made as u64;
    wait_last(&broker_side, latency_last, Duration::from_secs(30)).await;
    wait_last(&grpc, latency_last, Duration::from_secs(30)).await;
    let nats_ms = broker_side.lock().unwrap().latencies(1..=latency_last);
    let grpc_ms = grpc.lock().unwrap().latencies(1..=latency_last);

    // Rate: as fast as pdiskd answers.
    let rate_first = latency_last + 1;
    let start = SystemTime::now();
    made += churn(
        &mut c,
        made,
        usize::MAX,
        Some(Instant::now() + Duration::from_secs(rate_secs)),
    )
    .await;
    let rate_last = 2 * made as u64;
    wait_last(&broker_side, rate_last, Duration::from_secs(30)).await;
    wait_last(&grpc, rate_last, Duration::from_secs(30)).await;
    let nats_rate = broker_side
        .lock()
        .unwrap()
        .rate(rate_first..=rate_last, start);
    let grpc_rate = grpc.lock().unwrap().rate(rate_first..=rate_last, start);

    // Outage: nats-server killed for 5 s while the driver runs.
    let outage_first = rate_last + 1;
    let (dups_before, stored_before) = {
        let a = broker_side.lock().unwrap();
        (a.dups, a.stored_twice)
    };
    let driver = {
        let mut c = pdiskd.client().await;
        let first = made;
        tokio::spawn(async move {
            churn(
                &mut c,
                first,
                usize::MAX,
                Some(Instant::now() + Duration::from_secs(12)),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.kill9();
    tokio::time::sleep(Duration::from_secs(5)).await;
    nats.restart();
    let back = SystemTime::now();
    made += driver.await?;
    let outage_last = 2 * made as u64;
    wait_last(&broker_side, outage_last, Duration::from_secs(60)).await;
    let (lost, redelivered, stored_twice, (drained, drain_rate)) = {
        let a = broker_side.lock().unwrap();
        let lost = (outage_first..=outage_last)
            .filter(|s| !a.at.contains_key(s))
            .count() as u64;
        let stored_twice = a.stored_twice - stored_before;
        (
            lost,
            a.dups - dups_before - stored_twice,
            stored_twice,
            a.drain_rate(outage_first..=outage_last, back),
        )
    };
    let outage_events = outage_last - outage_first + 1;
    drop(pdiskd);

    let f = |name: &str, unit: &str, v: f64| Figure::new(SCENARIO, name, unit, v);
    Ok(vec![
        f(
            "event → NATS consumer p50",
            "ms",
            percentile(&nats_ms, 50.0),
        )
        .against("event → WatchEvents p50", percentile(&grpc_ms, 50.0))
        .with_samples(nats_ms.clone())
        .with_peer_samples(grpc_ms.clone()),
        f(
            "event → NATS consumer p99",
            "ms",
            percentile(&nats_ms, 99.0),
        )
        .against("event → WatchEvents p99", percentile(&grpc_ms, 99.0)),
        f("events/s through the broker", "events/s", nats_rate)
            .against("events/s through WatchEvents", grpc_rate),
        f(
            "events during a 5 s nats-server outage",
            "events",
            outage_events as f64,
        ),
        f(
            "backlog drained after the broker's return",
            "events/s",
            drain_rate,
        ),
        f("events in that backlog", "events", drained as f64),
        f("lost after the outage", "events", lost as f64),
        f(
            "duplicated in the stream after the outage (same id stored twice)",
            "events",
            stored_twice as f64,
        ),
        f(
            "redelivered to the consumer after the outage (its acks lost with the broker)",
            "events",
            redelivered as f64,
        ),
    ])
}
