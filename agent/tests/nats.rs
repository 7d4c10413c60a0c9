//! agentd's journal as an outbox to a real NATS JetStream (Debian's
//! `nats-server -js`, in the test's namespace): every journaled event
//! reaches a durable consumer once by message id, with the payload
//! WatchEvents gives, across nats-server killed for seconds mid-run and
//! agentd killed -9 while it publishes the backlog. Needs root (agentd in a
//! test namespace); run by scripts/test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use stratus_core::nats::{Broker, NatsAuth, NatsSettings, StreamLimits};
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::*;

const BRIDGE: &str = "stbr0";
const HOST: &str = "h1";
/// agentd's `/metrics`, inside the test's namespace.
const METRICS: &str = "127.0.0.1:9464";

/// agentd's events publisher on `/metrics`: (lag, failing).
fn publisher(ns: &NetNs) -> (f64, f64) {
    let addr: std::net::SocketAddr = METRICS.parse().unwrap();
    let m = ns.block_on(move || scrape(addr));
    let events = [("stream", "events")];
    (
        m.value("stratus_agent_publisher_lag", &events),
        m.value("stratus_agent_publisher_failing", &events),
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

/// Defines and destroys guests with a file disk for `rounds` rounds or
/// until `until` passes: two events each (CREATED, DESTROYED).
fn churn(
    ns: &NetNs,
    url: &str,
    disk: &str,
    first: usize,
    rounds: usize,
    until: Option<Duration>,
) -> usize {
    let (url, disk) = (url.to_owned(), disk.to_owned());
    ns.block_on(move || async move {
        let mut c = VmServiceClient::new(channel(&url).await);
        let start = Instant::now();
        let mut done = 0;
        while done < rounds && until.is_none_or(|u| start.elapsed() < u) {
            let name = format!("n{}", first + done);
            c.create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(pb::VmSpec {
                    name: name.clone(),
                    vcpus: 1,
                    memory_bytes: 64 << 20,
                    disks: vec![pb::DiskSpec {
                        source: Some(pb::disk_spec::Source::File(disk.clone())),
                        read_only: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                project: String::new(),
            })
            .await
            .unwrap();
            c.destroy_vm(pb::DestroyVmRequest {
                vm: name,
                ..Default::default()
            })
            .await
            .unwrap();
            done += 1;
        }
        done
    })
}

/// The subjects of agentd's events in the stream.
const EVENTS: &str = "stratus.agent.>";

/// Polls the stream on one connection until it holds more than `before`
/// events; returns how many it held then.
fn first_growth(ns: &NetNs, url: &str, before: u64) -> u64 {
    let url = url.to_owned();
    ns.block_on(move || async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        let b = loop {
            if let Ok(b) = Broker::connect(&settings(&url), "test", true).await {
                break b;
            }
            assert!(Instant::now() < deadline, "the broker did not come back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            let held = b.subject_messages(EVENTS).await.unwrap_or(0);
            if held > before || Instant::now() > deadline {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// The stream's events (its usage records are on `stratus.usage.>`),
/// asked from inside the namespace.
fn stream_messages(ns: &NetNs, url: &str) -> Option<u64> {
    let url = url.to_owned();
    ns.block_on(move || async move {
        let b = Broker::connect(&settings(&url), "test", true).await.ok()?;
        b.subject_messages(EVENTS).await.ok()
    })
}

#[test]
#[ignore = "needs root and nats-server: run by scripts/test"]
fn every_event_reaches_a_durable_consumer_once_across_broker_and_agentd_kills() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    let mut nats = NatsServer::start_in(dir.path(), Some(&ns));
    let url = nats.url();
    // No pdiskd: these guests have only a host file disk.
    let mut agentd = Agentd::start_in_with(
        dir.path(),
        &ns,
        "http://127.0.0.1:9",
        BRIDGE,
        &[
            "--nats-url",
            &url,
            "--nats-host",
            HOST,
            "--metrics-listen",
            METRICS,
        ],
    );
    let disk = dir.path().join("host-files/d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = disk.display().to_string();
    let ag = agentd.url();

    // The durable consumer exists before the first event.
    let u = url.clone();
    wait_for("the stream", Duration::from_secs(30), || {
        stream_messages(&ns, &u).map(|_| ())
    });
    let mut n = churn(&ns, &ag, &disk, 0, 20, None);

    // (a) The broker is away for 3 s while guests come and go.
    nats.kill9();
    n += churn(&ns, &ag, &disk, n, 10_000, Some(Duration::from_secs(3)));
    let during_outage = n - 20;
    // The broker away: /metrics shows the events journaled, not acked.
    // An ack that never comes fails the round after JetStream's ack timeout
    // (5 s): then `failing` is 1.
    let (lag, _) = wait_for(
        "failing with the broker away",
        Duration::from_secs(20),
        || Some(publisher(&ns)).filter(|(_, failing)| *failing == 1.0),
    );
    assert!(
        lag >= 2.0 * during_outage as f64,
        "lag {lag} with the broker away"
    );
    nats.restart();

    // (b) agentd killed -9 with a backlog the broker never saw (the broker
    // away), started again before the broker is back...
    let before = wait_for("the backlog of (a)", Duration::from_secs(30), || {
        let held = stream_messages(&ns, &url)?;
        (held == 2 * n as u64).then_some(held)
    });
    nats.kill9();
    n += churn(&ns, &ag, &disk, n, 10_000, Some(Duration::from_secs(1)));
    agentd.kill9();
    agentd.restart();
    n += churn(&ns, &ag, &disk, n, 10, None);
    nats.restart();
    // ... and killed -9 again the moment the backlog starts reaching it.
    let held_at_kill = first_growth(&ns, &url, before);
    agentd.kill9();
    agentd.restart();
    n += churn(&ns, &ag, &disk, n, 20, None);

    // The agent's own journal: what must arrive, each event once.
    let journal = ns.block_on({
        let ag = ag.clone();
        move || async move { agent_events(ag, 0).await }
    });
    let last = journal.last().unwrap().seq;
    assert!(last as usize >= 2 * n, "{last} events for {n} guests");

    let (got, deliveries) = ns.block_on({
        let url = url.clone();
        move || async move {
            let b = Broker::connect(&settings(&url), "test", true)
                .await
                .unwrap();
            let mut r = b
                .durable("test-consumer", Some("stratus.agent.>"))
                .await
                .unwrap();
            let mut got: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new();
            let mut deliveries = 0;
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
            // Anything more would be a duplicate.
            while let Some(m) = r.next(Duration::from_secs(2)).await.unwrap() {
                deliveries += 1;
                got.insert(
                    m.message.msg_id.clone(),
                    (m.message.subject.clone(), m.message.payload.clone()),
                );
                m.ack().await.unwrap();
            }
            (got, deliveries)
        }
    });
    eprintln!(
        "{n} guests, {last} events ({during_outage} guests while the broker was away), \
         {before} in the stream before the broker's return, {held_at_kill} when agentd was \
         killed, {deliveries} deliveries"
    );
    let want: Vec<String> = (1..=last).map(|s| format!("agent.{HOST}:{s}")).collect();
    let mut have: Vec<String> = got.keys().cloned().collect();
    have.sort_by_key(|id| id.rsplit(':').next().unwrap().parse::<u64>().unwrap());
    assert_eq!(have, want, "every event once by message id");
    assert_eq!(deliveries as u64, last, "no message delivered twice");
    assert_eq!(
        stream_messages(&ns, &url),
        Some(last),
        "the stream dropped re-sends"
    );
    // Caught up: no lag, not failing.
    wait_for(
        "the publisher's lag to reach 0",
        Duration::from_secs(30),
        || (publisher(&ns) == (0.0, 0.0)).then_some(()),
    );
    // Usage records share the stream, on subjects of their own.
    let u = url.clone();
    let usage = ns.block_on(move || async move {
        let b = Broker::connect(&settings(&u), "test", true).await.unwrap();
        b.subject_messages(&format!("stratus.usage.{HOST}"))
            .await
            .unwrap()
    });
    assert!(usage > 0, "agentd's usage records reached the broker");
    for e in &journal {
        let (subject, payload) = &got[&format!("agent.{HOST}:{}", e.seq)];
        let back = agent::publisher::event_from_payload(payload).unwrap();
        assert_eq!(&back, e, "payload of seq {}", e.seq);
        let kind = pb::EventType::try_from(e.r#type)
            .unwrap()
            .as_str_name()
            .trim_start_matches("EVENT_TYPE_")
            .to_owned();
        assert_eq!(
            subject,
            &format!("stratus.agent.{HOST}.vm.{}.{kind}", e.vm_uuid)
        );
    }

    // agentctl prints the same from the broker as from the agent.
    for json in [false, true] {
        let mut args: Vec<&str> = if json { vec!["--json"] } else { vec![] };
        args.push("events");
        let from_agent = agentd.ctl(&args);
        let durable = if json { "cli-json" } else { "cli-text" };
        args.extend(["--from-nats", &url, "--durable", durable]);
        let from_nats = agentd.ctl(&args);
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
            String::from_utf8_lossy(&from_agent.stdout),
            String::from_utf8_lossy(&from_nats.stdout)
        );
    }
    // A durable consumer resumes where it left off: nothing new, nothing printed.
    let again = agentd.ctl(&["events", "--from-nats", &url, "--durable", "cli-text"]);
    assert!(again.status.success());
    assert!(
        again.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}
