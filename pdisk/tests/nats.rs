//! pdiskd's event journal as an outbox to a real NATS JetStream (Debian's
//! `nats-server -js` on loopback): every journaled event reaches a durable
//! consumer once by message id, with the payload WatchEvents gives, across
//! nats-server killed for seconds mid-run and pdiskd killed -9 with a
//! backlog and again as it publishes it. Needs root (a loop device, tgtd);
//! run by scripts/test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stratus_core::nats::{Broker, NatsAuth, NatsSettings, StreamLimits};
use stratus_proto::pdisk::v1 as pb;
use testkit::*;

const HOST: &str = "st1";

/// A loopback address nothing listens on now.
fn free_loopback_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// pdiskd's events publisher on `/metrics`: (lag, failing).
async fn publisher(addr: std::net::SocketAddr) -> (f64, f64) {
    let m = scrape(addr).await;
    let events = [("stream", "events")];
    (
        m.value("stratus_pdisk_publisher_lag", &events),
        m.value("stratus_pdisk_publisher_failing", &events),
    )
}

fn settings(url: &str) -> NatsSettings {
    NatsSettings {
        url: url.into(),
        auth: NatsAuth::None,
        ca: None,
        client_cert: None,
        host: "test".into(),
        limits: StreamLimits::default(),
    }
}

/// Creates, grows and deletes volumes for `rounds` rounds or until `until`
/// passes: three events each.
async fn churn(p: &Pdiskd, first: usize, rounds: usize, until: Option<Duration>) -> usize {
    let mut c = p.client().await;
    let start = Instant::now();
    let mut done = 0;
    while done < rounds && until.is_none_or(|u| start.elapsed() < u) {
        let name = format!("n{}", first + done);
        c.create_volume(pb::CreateVolumeRequest {
            name: name.clone(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
        c.resize_volume(pb::ResizeVolumeRequest {
            volume: name.clone(),
            size_bytes: 2 << 20,
            project: String::new(),
            request_id: String::new(),
        })
        .await
        .unwrap();
        c.delete_volume(pb::DeleteVolumeRequest {
            now: false,
            volume: name,
            project: String::new(),
            request_id: String::new(),
        })
        .await
        .unwrap();
        done += 1;
    }
    done
}

async fn broker(url: &str) -> Broker {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Broker::connect(&settings(url), "test", true).await {
            Ok(b) => return b,
            Err(e) => assert!(Instant::now() < deadline, "the broker: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stream's events (its storage usage records are on
/// `stratus.usage.>`).
async fn held(b: &Broker) -> u64 {
    b.subject_messages("stratus.pdisk.>").await.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, a loop device, tgtd and nats-server: run by scripts/test"]
async fn every_event_reaches_a_durable_consumer_once_across_broker_and_pdiskd_kills() {
    require_root();
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start(pool.dir.path());
    let mut nats = NatsServer::start(pool.dir.path());
    let url = nats.url();
    let metrics = free_loopback_addr();
    let mut pdiskd = Pdiskd::start_with(
        &pool,
        &tgtd,
        &[
            "--nats-url",
            &url,
            "--nats-host",
            HOST,
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );

    let b = broker(&url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.stream_messages().await.is_err() {
        assert!(Instant::now() < deadline, "pdiskd never made the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut n = churn(&pdiskd, 0, 10, None).await;

    // (a) The broker is away for 3 s while volumes come and go.
    nats.kill9();
    n += churn(&pdiskd, n, 10_000, Some(Duration::from_secs(3))).await;
    let during_outage = n - 10;
    // The broker away: /metrics shows the events journaled, not acked.
    // An ack that never comes fails the round after JetStream's ack timeout
    // (5 s): then `failing` is 1.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (lag, _) = loop {
        let p = publisher(metrics).await;
        if p.1 == 1.0 {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "never failing with the broker away: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        lag >= 3.0 * during_outage as f64,
        "lag {lag} with the broker away"
    );
    nats.restart();
    let b = broker(&url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while held(&b).await != 3 * n as u64 {
        assert!(
            Instant::now() < deadline,
            "the backlog of (a) never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = held(&b).await;

    // (b) pdiskd killed -9 with a backlog the broker never saw, started
    // again before the broker is back, then killed -9 again the moment the
    // backlog starts reaching it.
    nats.kill9();
    n += churn(&pdiskd, n, 10_000, Some(Duration::from_secs(1))).await;
    pdiskd.kill9();
    pdiskd.restart();
    n += churn(&pdiskd, n, 10, None).await;
    nats.restart();
    let b = broker(&url).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut held_at_kill = held(&b).await;
    while held_at_kill <= before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
        held_at_kill = held(&b).await;
    }
    pdiskd.kill9();
    pdiskd.restart();
    n += churn(&pdiskd, n, 10, None).await;

    // Caught up: no lag, not failing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher(metrics).await != (0.0, 0.0) {
        assert!(
            Instant::now() < deadline,
            "lag never 0: {:?}",
            publisher(metrics).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The journal, as WatchEvents replays it.
    let mut c = pdiskd.client().await;
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            no_follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut journal = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        journal.push(e);
    }
    let last = journal.last().unwrap().seq;
    assert_eq!(last, 3 * n as u64, "three events for each of {n} volumes");

    let mut r = b
        .durable("test-consumer", Some("stratus.pdisk.>"))
        .await
        .unwrap();
    let mut got: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new();
    let mut deliveries = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (got.len() as u64) < last && Instant::now() < deadline {
        let Some(m) = r.next(Duration::from_secs(5)).await.unwrap() else {
            continue;
        };
        deliveries += 1;
        got.insert(
            m.message.msg_id.clone(),
            (m.message.subject.clone(), m.message.payload.clone()),
        );
        m.ack().await.unwrap();
    }
    while let Some(m) = r.next(Duration::from_secs(2)).await.unwrap() {
        deliveries += 1;
        got.insert(
            m.message.msg_id.clone(),
            (m.message.subject.clone(), m.message.payload.clone()),
        );
        m.ack().await.unwrap();
    }
    eprintln!(
        "{n} volumes, {last} events ({during_outage} volumes while the broker was away), \
         {before} in the stream before (b), {held_at_kill} when pdiskd was killed, \
         {deliveries} deliveries"
    );
    let want: Vec<String> = (1..=last).map(|s| format!("pdisk.{HOST}:{s}")).collect();
    let mut have: Vec<String> = got.keys().cloned().collect();
    have.sort_by_key(|id| id.rsplit(':').next().unwrap().parse::<u64>().unwrap());
    assert_eq!(have, want, "every event once by message id");
    assert_eq!(deliveries, last, "no message delivered twice");
    assert_eq!(held(&b).await, last, "the stream dropped re-sends");
    for e in &journal {
        let (subject, payload) = &got[&format!("pdisk.{HOST}:{}", e.seq)];
        let back = pdisk::events::event_from_payload(payload).unwrap();
        assert_eq!(&back, e, "payload of seq {}", e.seq);
        let kind = pb::PoolEventType::try_from(e.r#type)
            .unwrap()
            .as_str_name()
            .trim_start_matches("POOL_EVENT_TYPE_")
            .to_owned();
        assert_eq!(
            subject,
            &format!("stratus.pdisk.{HOST}.volume.{}.{kind}", e.volume_uuid)
        );
    }

    // `pdisk events` prints the same from the broker as from pdiskd.
    for json in [false, true] {
        let mut args: Vec<&str> = if json { vec!["--json"] } else { vec![] };
        args.push("events");
        let from_pdiskd = pdiskd.cli(&args);
        assert!(
            from_pdiskd.status.success(),
            "{}",
            String::from_utf8_lossy(&from_pdiskd.stderr)
        );
        let durable = if json { "cli-json" } else { "cli-text" };
        args.extend(["--from-nats", &url, "--durable", durable]);
        let from_nats = pdiskd.cli(&args);
        assert!(
            from_nats.status.success(),
            "{}",
            String::from_utf8_lossy(&from_nats.stderr)
        );
        assert_eq!(
            from_nats.stdout.iter().filter(|&&b| b == b'\n').count() as u64,
            last
        );
        assert_eq!(
            String::from_utf8_lossy(&from_pdiskd.stdout),
            String::from_utf8_lossy(&from_nats.stdout)
        );
    }

    // Storage usage records (a sample after each burst of changes) reach
    // the broker from their own outbox, each once across the kills.
    let kept = c
        .list_storage_usage(pb::ListStorageUsageRequest {
            until: 4_000_000_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .len() as u64;
    assert!(kept > 0);
    let usage_subject = format!("stratus.usage.{HOST}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.subject_messages(&usage_subject).await.unwrap_or(0) != kept {
        assert!(
            Instant::now() < deadline,
            "{} usage records in the stream, {kept} kept",
            b.subject_messages(&usage_subject).await.unwrap_or(0)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = scrape(metrics).await;
    assert_eq!(
        m.value("stratus_pdisk_publisher_lag", &[("stream", "usage")]),
        0.0
    );
}
