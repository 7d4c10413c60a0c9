//! `agent::net::NicFilters` (anti-spoofing per tap, nftables in the bridge
//! family) against the real kernel and `nft`, without guests: a tap in a
//! network namespace of the test's own, with frames written into the tap as
//! QEMU would write a guest's, and a veth port on the same bridge as the
//! neighbour that must not hear forged ones. Also the VLAN 0 rule of
//! `attach_to_bridge`. Root: `#[ignore]`d, run by scripts/test's
//! integration tier.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::net::{
    attach_to_bridge, create_tap, delete_tap, open_tap, tap_name_for, Mac, NicFilters,
};
use serde_json::Value;
use stratus_core::error::{ErrorKind, Result};
use stratus_core::runner::{BoxFuture, Cmd, CommandRunner, HostRunner, Output};
use testkit::NetNs;
use uuid::Uuid;

const GUEST_MAC: &str = "52:54:00:5a:00:01";
const FORGED_MAC: &str = "52:54:00:5a:00:99";
const GUEST_IP: [u8; 4] = [10, 77, 0, 5];
const FORGED_IP: [u8; 4] = [10, 77, 0, 99];

/// Runs every command inside the test's namespace (`ip netns exec NS ...`),
/// so agentd's nft calls land there as they would in agentd's own.
struct InNamespace(String);

impl CommandRunner for InNamespace {
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>> {
        Box::pin(async move {
            let mut wrapped = Cmd::new("ip")
                .args(["netns", "exec", self.0.as_str(), cmd.program.as_str()])
                .args(cmd.args.iter().cloned())
                .timeout(cmd.timeout);
            wrapped.on_stdout_line = cmd.on_stdout_line.clone();
            HostRunner.run(&wrapped).await
        })
    }
}

/// Runs `f` on a thread inside `ns`.
fn in_ns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        // SAFETY: setns on an open namespace fd only changes this thread's
        // network namespace; the thread ends with `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A packet socket on `ifname` in `ns`: what a neighbour hears.
struct Listener(OwnedFd);

impl Listener {
    fn on(ns: &NetNs, ifname: &str) -> Listener {
        let ifname = ifname.to_string();
        in_ns(ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2); the fd is owned right below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh socket nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let c = std::ffi::CString::new(ifname).unwrap();
            // SAFETY: `c` is NUL-terminated and outlives the call.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert!(index != 0);
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto as u16;
            sa.sll_ifindex = index as i32;
            // SAFETY: `sa` is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sa as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            Listener(fd)
        })
    }

    /// Whether a frame carrying `marker` arrives within `wait`.
    fn hears(&self, marker: &[u8], wait: Duration) -> bool {
        let end = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 100) };
            if n <= 0 {
                continue;
            }
            // SAFETY: reads into `buf`, within its length.
            let got = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if got > 0
                && buf[..got as usize]
                    .windows(marker.len())
                    .any(|w| w == marker)
            {
                return true;
            }
        }
        false
    }
}

fn mac(s: &str) -> [u8; 6] {
    s.parse::<Mac>().unwrap().octets()
}

/// A broadcast ARP request from (`src_mac`, `sender_ip`), with `marker`
/// in the padding; the virtio-net header the tap expects first.
fn arp(src_mac: [u8; 6], sender_ip: [u8; 4], marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 10]; // struct virtio_net_hdr: no offloads
    f.extend([0xff; 6]);
    f.extend(src_mac);
    f.extend([0x08, 0x06]);
    f.extend([0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend(src_mac);
    f.extend(sender_ip);
    f.extend([0; 6]);
    f.extend([10, 77, 0, 1]);
    f.extend(marker);
    f
}

/// A broadcast IPv4/UDP datagram from (`src_mac`, `src_ip`) carrying `marker`.
fn udp(src_mac: [u8; 6], src_ip: [u8; 4], marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 10];
    f.extend([0xff; 6]);
    f.extend(src_mac);
    f.extend([0x08, 0x00]);
    let len = (20 + 8 + marker.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend(len.to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend(src_ip);
    ip.extend([255, 255, 255, 255]);
    let sum = !ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .fold(0u32, |a, b| {
            let s = a + b;
            (s & 0xffff) + (s >> 16)
        }) as u16;
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend(ip);
    f.extend(4000u16.to_be_bytes());
    f.extend(4001u16.to_be_bytes());
    f.extend(((8 + marker.len()) as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(marker);
    f
}

fn nft_table(ns: &NetNs) -> Option<Value> {
    let out = ns
        .command("nft")
        .args(["-j", "list", "table", "bridge", "stratus"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("nft -j output"))
}

/// The rules of chain `chain` in the table, as JSON.
fn rules_of(table: &Value, chain: &str) -> Vec<Value> {
    table["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["rule"]["chain"] == chain)
        .map(|i| i["rule"].clone())
        .collect()
}

/// MACs the bridge learned on port `dev`.
fn learned(ns: &NetNs, dev: &str) -> Vec<String> {
    let out = ns
        .command("bridge")
        .args(["-j", "fdb", "show", "dev", dev])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["mac"].as_str().map(str::to_owned))
        .collect()
}

#[test]
#[ignore = "needs root, nft and network namespaces: run by scripts/test"]
fn a_tap_sends_only_as_its_guest_and_its_rules_go_with_it() {
    let ns = NetNs::new();
    ns.add_bridge("br0");
    // The neighbour: a veth port on the bridge, heard on its other end.
    ns.ip(&["link", "add", "nb0", "type", "veth", "peer", "name", "nb1"]);
    ns.ip(&["link", "set", "nb0", "master", "br0", "up"]);
    ns.ip(&["link", "set", "nb1", "up"]);
    let filters = NicFilters::new(Arc::new(InNamespace(ns.name.clone())));
    let tap = tap_name_for(Uuid::new_v4(), 0);
    let guest_ip: std::net::IpAddr = std::net::Ipv4Addr::from(GUEST_IP).into();

    // Rules first, as agentd does; then the tap joins the bridge.
    block_on(filters.protect(&tap, GUEST_MAC.parse().unwrap(), &[guest_ip])).unwrap();
    let t = tap.clone();
    let fd = in_ns(&ns, move || {
        create_tap(&t)?;
        attach_to_bridge(&t, "br0", 0)?;
        open_tap(&t)
    })
    .unwrap();
    let mut queue = std::fs::File::from(fd);
    let table = nft_table(&ns).expect("agentd's table");
    let chain = format!("nic-{tap}");
    let n_rules = rules_of(&table, &chain).len();
    assert!(n_rules >= 8, "{table}");
    assert_eq!(
        block_on(filters.protected_taps()).unwrap(),
        [tap.to_string()]
    );

    let neighbour = Listener::on(&ns, "nb1");
    // The port forwards once its carrier is up (the queue is open); the
    // guest's own frames get through, which also proves that.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut heard = false;
    while !heard && Instant::now() < deadline {
        queue
            .write_all(&arp(mac(GUEST_MAC), GUEST_IP, b"STRATUS-OWN-ARP"))
            .unwrap();
        heard = neighbour.hears(b"STRATUS-OWN-ARP", Duration::from_millis(500));
    }
    assert!(heard, "the guest's own ARP never reached its neighbour");
    queue
        .write_all(&udp(mac(GUEST_MAC), GUEST_IP, b"STRATUS-OWN-UDP"))
        .unwrap();
    assert!(neighbour.hears(b"STRATUS-OWN-UDP", Duration::from_secs(2)));

    // Forged: another MAC (Ethernet and ARP), another IP (ARP and IPv4).
    for (what, frame, marker) in [
        (
            "forged MAC",
            arp(mac(FORGED_MAC), GUEST_IP, b"STRATUS-FORGED-1"),
            &b"STRATUS-FORGED-1"[..],
        ),
        (
            "forged MAC",
            udp(mac(FORGED_MAC), GUEST_IP, b"STRATUS-FORGED-2"),
            b"STRATUS-FORGED-2",
        ),
        (
            "forged ARP IP",
            arp(mac(GUEST_MAC), FORGED_IP, b"STRATUS-FORGED-3"),
            b"STRATUS-FORGED-3",
        ),
        (
            "forged IP",
            udp(mac(GUEST_MAC), FORGED_IP, b"STRATUS-FORGED-4"),
            b"STRATUS-FORGED-4",
        ),
    ] {
        queue.write_all(&frame).unwrap();
        assert!(
            !neighbour.hears(marker, Duration::from_secs(1)),
            "{what} was heard"
        );
    }
    // Dropped before the bridge learned from them; counted by our rules.
    let learned_macs = learned(&ns, tap.as_str());
    assert!(
        learned_macs.iter().any(|m| m == GUEST_MAC),
        "{learned_macs:?}"
    );
    assert!(
        !learned_macs.iter().any(|m| m == FORGED_MAC),
        "{learned_macs:?}"
    );
    let table = nft_table(&ns).unwrap();
    let dropped: u64 = rules_of(&table, &chain)
        .iter()
        .flat_map(|r| r["expr"].as_array().unwrap().clone())
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum();
    assert_eq!(dropped, 4, "{table}");
    // And the guest still talks after all that.
    queue
        .write_all(&udp(mac(GUEST_MAC), GUEST_IP, b"STRATUS-OWN-AGAIN"))
        .unwrap();
    assert!(neighbour.hears(b"STRATUS-OWN-AGAIN", Duration::from_secs(2)));

    // Applied again (reconcile after a restart): replaced, not doubled.
    block_on(filters.protect(&tap, GUEST_MAC.parse().unwrap(), &[guest_ip])).unwrap();
    assert_eq!(rules_of(&nft_table(&ns).unwrap(), &chain).len(), n_rules);
    // Someone flushes the host's ruleset: the next protect rebuilds it all.
    assert!(ns
        .command("nft")
        .args(["flush", "ruleset"])
        .status()
        .unwrap()
        .success());
    block_on(filters.protect(&tap, GUEST_MAC.parse().unwrap(), &[guest_ip])).unwrap();
    queue
        .write_all(&udp(mac(FORGED_MAC), GUEST_IP, b"STRATUS-FORGED-5"))
        .unwrap();
    assert!(!neighbour.hears(b"STRATUS-FORGED-5", Duration::from_secs(1)));

    // The tap goes, then its rules; removing twice is fine; other taps'
    // rules stay.
    let other = tap_name_for(Uuid::new_v4(), 1);
    block_on(filters.protect(&other, FORGED_MAC.parse().unwrap(), &[])).unwrap();
    drop(queue);
    let t = tap.clone();
    in_ns(&ns, move || delete_tap(&t)).unwrap();
    block_on(filters.remove(&tap)).unwrap();
    block_on(filters.remove(&tap)).unwrap();
    let table = nft_table(&ns).unwrap();
    assert!(rules_of(&table, &chain).is_empty(), "{table}");
    assert_eq!(
        block_on(filters.protected_taps()).unwrap(),
        [other.to_string()]
    );
    block_on(filters.remove(&other)).unwrap();
    assert!(block_on(filters.protected_taps()).unwrap().is_empty());
}

#[test]
#[ignore = "needs root and network namespaces: run by scripts/test"]
fn vlan_0_is_refused_where_it_would_land_on_the_default_vlan() {
    let ns = NetNs::new();
    ns.add_bridge("br-plain");
    ns.add_bridge("br-vlan");
    let probe = ns
        .command("ip")
        .args([
            "link",
            "set",
            "br-vlan",
            "type",
            "bridge",
            "vlan_filtering",
            "1",
        ])
        .output()
        .unwrap();
    let t = tap_name_for(Uuid::new_v4(), 0);
    let t2 = t.clone();
    in_ns(&ns, move || create_tap(&t2)).unwrap();
    if probe.status.success() {
        let t2 = t.clone();
        let err = in_ns(&ns, move || attach_to_bridge(&t2, "br-vlan", 0)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(err.message().contains("VLAN 1"), "{err}");
        let link = ns.ip(&["-j", "link", "show", t.as_str()]);
        assert!(
            !link.contains("\"master\""),
            "the tap joined anyway: {link}"
        );
        // A tagged NIC may join it; so may an untagged one once the bridge
        // puts new ports on no VLAN.
        let t2 = t.clone();
        in_ns(&ns, move || attach_to_bridge(&t2, "br-vlan", 42)).unwrap();
        ns.ip(&[
            "link",
            "set",
            "br-vlan",
            "type",
            "bridge",
            "vlan_default_pvid",
            "0",
        ]);
        let t2 = t.clone();
        in_ns(&ns, move || attach_to_bridge(&t2, "br-vlan", 0)).unwrap();
    } else {
        eprintln!(
            "SKIPPED: this kernel has no bridge VLAN filtering; only the plain bridge is checked"
        );
    }
    let t2 = t.clone();
    in_ns(&ns, move || attach_to_bridge(&t2, "br-plain", 0)).unwrap();
    let link = ns.ip(&["-j", "link", "show", t.as_str()]);
    assert!(link.contains("\"master\":\"br-plain\""), "{link}");
    in_ns(&ns, move || delete_tap(&t)).unwrap();
}

const GUEST_V6: &str = "2001:db8:77::5";
const FORGED_V6: &str = "2001:db8:77::99";
/// GUEST_MAC's (modified EUI-64).
const GUEST_LINK_LOCAL: &str = "fe80::5054:ff:fe5a:1";
/// FORGED_MAC's.
const FORGED_LINK_LOCAL: &str = "fe80::5054:ff:fe5a:99";

/// An unsolicited IPv6 neighbour advertisement (RFC 4861 4.4) from the
/// guest's MAC and link-local address to all nodes, claiming `target`, with
/// `marker` after it (where options would be). The filters do not check
/// the ICMPv6 checksum, and the neighbour's packet socket does not either.
fn neighbour_advert(target: &str, marker: &[u8]) -> Vec<u8> {
    let target: std::net::Ipv6Addr = target.parse().unwrap();
    let src: std::net::Ipv6Addr = GUEST_LINK_LOCAL.parse().unwrap();
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0]; // type, code, checksum, O flag
    icmp.extend(target.octets());
    icmp.extend(marker);
    let mut f = vec![0u8; 10]; // struct virtio_net_hdr
    f.extend([0x33, 0x33, 0, 0, 0, 1]);
    f.extend(mac(GUEST_MAC));
    f.extend([0x86, 0xdd]);
    f.extend([0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, 255]); // ICMPv6, hop limit 255 as ND requires
    f.extend(src.octets());
    f.extend("ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    f.extend(icmp);
    f
}

#[test]
#[ignore = "needs root, nft and network namespaces: run by scripts/test"]
fn a_guest_advertises_only_its_own_ipv6_addresses() {
    let ns = NetNs::new();
    ns.add_bridge("br0");
    ns.ip(&["link", "add", "nb0", "type", "veth", "peer", "name", "nb1"]);
    ns.ip(&["link", "set", "nb0", "master", "br0", "up"]);
    ns.ip(&["link", "set", "nb1", "up"]);
    let filters = NicFilters::new(Arc::new(InNamespace(ns.name.clone())));
    let tap = tap_name_for(Uuid::new_v4(), 0);
    let ips: Vec<std::net::IpAddr> = vec![
        std::net::Ipv4Addr::from(GUEST_IP).into(),
        GUEST_V6.parse().unwrap(),
    ];
    block_on(filters.protect(&tap, GUEST_MAC.parse().unwrap(), &ips)).unwrap();
    let t = tap.clone();
    let fd = in_ns(&ns, move || {
        create_tap(&t)?;
        attach_to_bridge(&t, "br0", 0)?;
        open_tap(&t)
    })
    .unwrap();
    let mut queue = std::fs::File::from(fd);
    let neighbour = Listener::on(&ns, "nb1");

    // Its own global address (also once the port forwards at all).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut heard = false;
    while !heard && Instant::now() < deadline {
        queue
            .write_all(&neighbour_advert(GUEST_V6, b"STRATUS-NA-OWN"))
            .unwrap();
        heard = neighbour.hears(b"STRATUS-NA-OWN", Duration::from_millis(500));
    }
    assert!(
        heard,
        "the guest's advertisement of its own address was dropped"
    );
    // Its link-local address.
    queue
        .write_all(&neighbour_advert(GUEST_LINK_LOCAL, b"STRATUS-NA-LL"))
        .unwrap();
    assert!(neighbour.hears(b"STRATUS-NA-LL", Duration::from_secs(2)));
    // A neighbour's address, from the guest's own MAC and source: dropped.
    queue
        .write_all(&neighbour_advert(FORGED_V6, b"STRATUS-NA-FORGED"))
        .unwrap();
    assert!(
        !neighbour.hears(b"STRATUS-NA-FORGED", Duration::from_secs(1)),
        "an advertisement of another's address was heard"
    );
    // Another link-local address (a neighbour's, whose gateway cache it
    // would poison): dropped too.
    queue
        .write_all(&neighbour_advert(
            FORGED_LINK_LOCAL,
            b"STRATUS-NA-FORGED-LL",
        ))
        .unwrap();
    assert!(
        !neighbour.hears(b"STRATUS-NA-FORGED-LL", Duration::from_secs(1)),
        "an advertisement of another's link-local address was heard"
    );
    let table = nft_table(&ns).unwrap();
    let na_drops: u64 = rules_of(&table, &format!("nic-{tap}"))
        .iter()
        .filter(|r| r.to_string().contains("nd-neighbor-advert"))
        .flat_map(|r| r["expr"].as_array().unwrap().clone())
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum();
    assert_eq!(na_drops, 2, "{table}");
    // Still heard afterwards.
    queue
        .write_all(&neighbour_advert(GUEST_V6, b"STRATUS-NA-AGAIN"))
        .unwrap();
    assert!(neighbour.hears(b"STRATUS-NA-AGAIN", Duration::from_secs(2)));
    drop(queue);
    let t = tap.clone();
    in_ns(&ns, move || delete_tap(&t)).unwrap();
    block_on(filters.remove(&tap)).unwrap();
}
