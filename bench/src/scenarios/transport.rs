//! Scenario 7: what mutual TLS costs a caller. One pdiskd serves the same
//! API on its mTLS listener, its local Unix socket and a loopback
//! `--insecure-listen` (the old plain TCP); the scenario times unary calls
//! (ListVolumes on an empty pool: the transport dominates) on an
//! established connection of each, interleaved round by round so drift in
//! the machine's load hits all three alike, and separately the cost of
//! making a connection (TCP + TLS 1.3 handshake with client certificate
//! verification, against TCP alone).
//!
//! Then the same three ways into agentd for a stream: WatchEvents replaying
//! its journal (CREATED and DESTROYED of guests defined and destroyed for
//! it, no guest boots), timed whole, as events per second.
//!
//! Goal (issue 11): mTLS unary p50 within 1.3x of plain TCP.

use std::time::Instant;

use stratus_pki::Dialer;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::{free_port, Pdiskd, TestPki, Tgtd, XfsPool};
use tonic::transport::Channel;

use super::Ctx;
use crate::report::{percentile, Figure};

const SCENARIO: &str = "transport: mTLS vs local socket vs plain TCP";

/// The three ways in, in the order of each round.
const KINDS: [&str; 3] = ["mTLS", "local socket", "plain TCP"];

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    let (calls, connects) = if ctx.quick { (50, 5) } else { (2000, 50) };
    let plain_port = free_port();
    let (_pool, _tgtd, pdiskd) = tokio::task::block_in_place(|| {
        let pool = XfsPool::new(1024);
        let tgtd = Tgtd::start(pool.dir.path());
        let listen = format!("127.0.0.1:{plain_port}");
        let pdiskd = Pdiskd::start_with(&pool, &tgtd, &["--insecure-listen", &listen]);
        (pool, tgtd, pdiskd)
    });
    let admin = TestPki::shared().admin();
    let dialers = [
        Dialer::from_address(&pdiskd.url(), Some(&admin))?,
        Dialer::from_address(&format!("unix:{}", pdiskd.local_socket.display()), None)?,
        Dialer::from_address(&format!("http://127.0.0.1:{plain_port}"), None)?,
    ];

    // Connection set-up: a fresh connection and its first call each time.
    let mut setup: [Vec<f64>; 3] = Default::default();
    for _ in 0..connects {
        for (i, d) in dialers.iter().enumerate() {
            let t = Instant::now();
            let mut c = VolumeServiceClient::new(d.connect().await?);
            call(&mut c).await?;
            setup[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }

    // Unary calls on established connections.
    let mut clients: Vec<VolumeServiceClient<Channel>> = Vec::new();
    for d in &dialers {
        let mut c = VolumeServiceClient::new(d.connect().await?);
        call(&mut c).await?; // warm: HTTP/2 settings exchanged
        clients.push(c);
    }
    let mut unary: [Vec<f64>; 3] = Default::default();
    for _ in 0..calls {
        for (i, c) in clients.iter_mut().enumerate() {
            let t = Instant::now();
            call(c).await?;
            unary[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (i, kind) in KINDS.iter().enumerate() {
        eprintln!(
            "  {kind}: unary p50 {:.3} ms, connection + first call p50 {:.2} ms",
            percentile(&unary[i], 50.0),
            percentile(&setup[i], 50.0)
        );
    }
    let mut out = figures(&unary, &setup);
    out.extend(events(ctx).await?);
    Ok(out)
}

/// agentd's plain TCP port inside the bench's namespace.
const AGENTD_PLAIN: &str = "127.0.0.1:7411";

/// WatchEvents replay rate (events/s) over each transport, interleaved.
async fn events(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    use stratus_proto::agent::v1 as apb;
    use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
    let (guests, rounds) = if ctx.quick { (10, 3) } else { (250, 30) };
    let host = tokio::task::block_in_place(|| {
        super::guests::GuestHost::start_with(&["--insecure-listen", AGENTD_PLAIN])
    });
    let dir = host
        .agentd
        .state_dir
        .parent()
        .expect("agentd's state dir has a parent")
        .to_owned();
    let disk = dir.join("host-files/bench-transport.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20])?;
    let socket = dir.join("agentd.sock");
    let rates = tokio::task::block_in_place(|| {
        host.run(move |url| async move {
            let admin = TestPki::shared().admin();
            let dialers = [
                Dialer::from_address(&url, Some(&admin))?,
                Dialer::from_address(&format!("unix:{}", socket.display()), None)?,
                Dialer::from_address(&format!("http://{AGENTD_PLAIN}"), None)?,
            ];
            let mut admin_client = VmServiceClient::new(dialers[0].connect().await?);
            for i in 0..guests {
                let spec = apb::VmSpec {
                    name: format!("events-{i}"),
                    vcpus: 1,
                    memory_bytes: 64 << 20,
                    disks: vec![apb::DiskSpec {
                        source: Some(apb::disk_spec::Source::File(disk.display().to_string())),
                        read_only: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                let vm = admin_client
                    .create_vm(apb::CreateVmRequest {
                        spec: Some(spec),
                        project: String::new(),
                        request_id: String::new(),
                    })
                    .await?
                    .into_inner();
                admin_client
                    .destroy_vm(apb::DestroyVmRequest {
                        vm: vm.uuid,
                        ..Default::default()
                    })
                    .await?;
            }
            let mut clients = Vec::new();
            for d in &dialers {
                clients.push(VmServiceClient::new(d.connect().await?));
            }
            let mut rates: [Vec<f64>; 3] = Default::default();
            for _ in 0..rounds {
                for (i, c) in clients.iter_mut().enumerate() {
                    let t = Instant::now();
                    let mut s = c
                        .watch_events(apb::WatchEventsRequest {
                            no_follow: true,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    let mut n = 0u64;
                    while s.message().await?.is_some() {
                        n += 1;
                    }
                    anyhow::ensure!(n >= 2 * guests as u64, "replayed only {n} events");
                    rates[i].push(n as f64 / t.elapsed().as_secs_f64());
                }
            }
            Ok(rates)
        })
    })?;
    for (i, kind) in KINDS.iter().enumerate() {
        eprintln!(
            "  {kind}: WatchEvents replay p50 {:.0} events/s",
            percentile(&rates[i], 50.0)
        );
    }
    drop(host);
    let plain = percentile(&rates[2], 50.0);
    Ok((0..2)
        .map(|i| {
            Figure::new(
                SCENARIO,
                &format!("WatchEvents replay p50 ({})", KINDS[i]),
                "events/s",
                percentile(&rates[i], 50.0),
            )
            .with_samples(rates[i].clone())
            .against("WatchEvents replay p50 (plain TCP)", plain)
            .with_peer_samples(rates[2].clone())
        })
        .collect())
}

async fn call(c: &mut VolumeServiceClient<Channel>) -> anyhow::Result<()> {
    c.list_volumes(pb::ListVolumesRequest::default()).await?;
    Ok(())
}

/// Each transport's p50/p95 against plain TCP's, for unary calls and for
/// connection set-up.
fn figures(unary: &[Vec<f64>; 3], setup: &[Vec<f64>; 3]) -> Vec<Figure> {
    let mut out = Vec::new();
    for (what, samples) in [
        ("unary call", unary),
        ("new connection + first call", setup),
    ] {
        for p in [50.0, 95.0] {
            let plain = percentile(&samples[2], p);
            for i in 0..2 {
                let name = format!("{what} p{p} ({})", KINDS[i]);
                let peer = format!("{what} p{p} (plain TCP)");
                out.push(
                    Figure::new(SCENARIO, &name, "ms", percentile(&samples[i], p))
                        .with_samples(samples[i].clone())
                        .against(&peer, plain)
                        .with_peer_samples(samples[2].clone()),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_is_compared_with_plain_tcp() {
        let unary = [vec![2.0], vec![1.0], vec![1.0]];
        let setup = [vec![4.0], vec![1.0], vec![2.0]];
        let f = figures(&unary, &setup);
        assert_eq!(f.len(), 8);
        assert_eq!(f[0].name, "unary call p50 (mTLS)");
        assert_eq!(f[0].ratio, Some(2.0));
        assert_eq!(f[1].name, "unary call p50 (local socket)");
        assert_eq!(f[1].ratio, Some(1.0));
        assert_eq!(f[4].name, "new connection + first call p50 (mTLS)");
        assert_eq!(f[4].ratio, Some(2.0));
    }
}
