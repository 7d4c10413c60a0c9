//! Operating agentd, end to end with a real guest (the test guest under
//! TCG, from a cached image, on a bridge in a namespace of the test's own):
//! `/metrics` counts what the test did. Run by scripts/test's e2e tier
//! (needs root, QEMU, tgt and scripts/guest-image).

use std::net::SocketAddr;
use std::time::Duration;

use stratus_proto::agent::v1 as pb;
use testkit::*;

const BOOT: Duration = Duration::from_secs(180);
/// Inside the test's namespace, so any port is free.
const METRICS: &str = "127.0.0.1:9464";

/// The hyperconverged test host ([`AgentHost`]) and this suite's own helpers.
struct Host(AgentHost);

impl Host {
    fn start(extra: &[&str]) -> Host {
        Host(AgentHost::start(2048, extra))
    }

    fn scrape(&self) -> Scrape {
        let addr: SocketAddr = METRICS.parse().unwrap();
        self.ns.block_on(move || scrape(addr))
    }
}

testkit::wraps_agent_host!(Host, 0);

fn image(url: &str, sha: &str) -> pb::ImageRef {
    pb::ImageRef {
        url: url.into(),
        sha256: sha.into(),
        format: 0,
        endorser: String::new(),
        endorsement: String::new(),
    }
}

/// The test guest's kernel at `ip` pinging `peer`, with the cached image
/// as its disk (a local overlay) and one NIC.
fn spec(name: &str, url: &str, sha: &str, ip: &str, peer: &str) -> pb::VmSpec {
    let g = guest_dir();
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: format!("console=ttyS0 stratus.ip={ip}/24 stratus.peer={peer}"),
        }),
        disks: vec![pb::DiskSpec {
            qos: None,
            server: String::new(),
            source: Some(pb::disk_spec::Source::Image(image(url, sha))),
            read_only: false,
            boot_index: 1,
            size_bytes: 256 << 20,
            persistence: pb::DiskPersistence::Local as i32,
        }],
        nics: vec![pb::NicSpec {
            bridge: BRIDGE.into(),
            mac: String::new(),
            vlan: 0,
            // Its own address: the tap's anti-spoofing rules let it through.
            ips: vec![ip.into()],
        }],
        ..Default::default()
    }
}

#[test]
#[ignore = "needs root, QEMU, tgt and the test guest: run by scripts/test"]
fn metrics_show_a_running_guest_its_disk_and_tap_and_count_the_calls() {
    let h = Host::start(&["--metrics-listen", METRICS]);
    let ServedGuest {
        httpd: _httpd,
        url,
        sha256: sha,
        size,
    } = h.serve_guest();
    let m = h.scrape();
    assert_eq!(
        m.value("stratus_agent_guests", &[("state", "running")]),
        0.0
    );
    assert_eq!(m.value("stratus_agent_image_cache_images", &[]), 0.0);
    // The guest's peer: the bridge's own address.
    h.ns.ip(&["addr", "add", "10.231.0.1/24", "dev", BRIDGE]);

    // Two pulls (a miss, then a hit), then a guest from the cached image.
    let (u, s) = (url.clone(), sha.clone());
    h.agent(move |mut c| async move {
        for _ in 0..2 {
            c.pull_image(pb::PullImageRequest {
                server: String::new(),
                image: Some(image(&u, &s)),
                to_pdisk: false,
                request_id: String::new(),
            })
            .await
            .unwrap();
        }
    });
    let vm = h.launch("", spec("metered", &url, &sha, "10.231.0.2", "10.231.0.1"));
    let log = wait_console(
        std::path::Path::new(&vm.console_log),
        "STRATUS-GUEST ping 10.231.0.1",
        BOOT,
    );
    assert!(log.contains("STRATUS-GUEST ping 10.231.0.1 ok"), "{log}");
    let guest = [("uuid", vm.uuid.as_str()), ("name", "metered")];
    let before = h.scrape();
    let tap = before.series("stratus_agent_tap_transmit_packets_total");
    assert_eq!(tap.len(), 1, "one NIC: {tap:?}");
    let tap = tap[0]["tap"].clone();
    let this_tap = [("uuid", vm.uuid.as_str()), ("tap", tap.as_str())];
    // The guest's ping: at least an ARP request and an echo request from
    // it, an ARP reply and an echo reply to it.
    for dir in ["receive", "transmit"] {
        let packets = before.value(&format!("stratus_agent_tap_{dir}_packets_total"), &this_tap);
        assert!(packets >= 2.0, "{dir}: {packets}");
        let bytes = before.value(&format!("stratus_agent_tap_{dir}_bytes_total"), &this_tap);
        assert!(bytes >= 2.0 * 42.0, "{dir}: {bytes}");
    }
    let sent = |m: &Scrape| m.value("stratus_agent_tap_transmit_packets_total", &this_tap);
    // Three datagrams to the guest: three more packets into its tap.
    h.ns.block_on(|| async {
        let s = std::net::UdpSocket::bind("10.231.0.1:0").unwrap();
        for _ in 0..3 {
            s.send_to(b"stratus", "10.231.0.2:9").unwrap();
        }
    });
    // QEMU counts them on the tap once it has read them: give it a moment.
    let mut m = h.scrape();
    for _ in 0..100 {
        if sent(&m) >= sent(&before) + 3.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        m = h.scrape();
    }
    assert!(
        sent(&m) >= sent(&before) + 3.0,
        "datagrams to the guest crossed its tap: {} -> {}",
        sent(&before),
        sent(&m)
    );

    assert_eq!(
        m.value("stratus_agent_guests", &[("state", "running")]),
        1.0
    );
    assert_eq!(
        m.value("stratus_agent_guests", &[("state", "stopped")]),
        0.0
    );
    assert_eq!(m.value("stratus_agent_guest_vcpus", &guest), 1.0);
    assert_eq!(
        m.value("stratus_agent_guest_memory_bytes", &guest),
        (128u64 << 20) as f64
    );
    assert!(m.value("stratus_agent_guest_cpu_seconds_total", &guest) > 0.0);
    assert!(m.value("stratus_agent_guest_resident_memory_bytes", &guest) > 0.0);
    let vda = [("uuid", vm.uuid.as_str()), ("device", "vda")];
    assert!(
        m.value("stratus_agent_guest_block_read_bytes_total", &vda) > 0.0,
        "the guest booted from vda"
    );
    assert!(m.value("stratus_agent_guest_block_read_requests_total", &vda) > 0.0);
    assert!(m.value("stratus_agent_guest_block_read_time_seconds_total", &vda) > 0.0);

    assert_eq!(m.value("stratus_agent_image_cache_images", &[]), 1.0);
    assert_eq!(m.value("stratus_agent_image_cache_bytes", &[]), size as f64);
    assert_eq!(m.value("stratus_agent_image_cache_misses_total", &[]), 1.0);
    assert_eq!(
        m.value("stratus_agent_image_cache_hits_total", &[]),
        2.0,
        "the second pull and the start"
    );
    assert_eq!(
        m.value("stratus_agent_image_cache_evictions_total", &[]),
        0.0
    );
    assert_eq!(
        m.value(
            "stratus_agent_launch_duration_seconds_count",
            &[("outcome", "ok")]
        ),
        1.0
    );
    let rpc = |method: &str| {
        m.value(
            "stratus_rpc_duration_seconds_count",
            &[
                ("service", "agent.v1.VmService"),
                ("method", method),
                ("code", "Ok"),
            ],
        )
    };
    assert_eq!(rpc("PullImage"), 2.0);
    assert_eq!(rpc("CreateVm"), 1.0);
    assert_eq!(rpc("StartVm"), 1.0);
    assert!(m.value("stratus_agent_journal_last_seq", &[]) > 0.0);

    // Stopped: no more per-QEMU counters, the spec's figures stay.
    h.agent(|mut c| async move {
        c.stop_vm(pb::StopVmRequest {
            project: String::new(),
            vm: "metered".into(),
            timeout_seconds: 5,
            force: true,
            request_id: String::new(),
        })
        .await
        .unwrap();
    });
    let m = h.scrape();
    assert_eq!(
        m.value("stratus_agent_guests", &[("state", "stopped")]),
        1.0
    );
    assert_eq!(m.get("stratus_agent_guest_cpu_seconds_total", &guest), None);
    assert_eq!(m.value("stratus_agent_guest_vcpus", &guest), 1.0);
}
