//! Host networking for guests: the tap device behind each virtio-net NIC, the
//! bridge port it becomes, and that port's VLAN. Done by ioctl on
//! `/dev/net/tun` and by rtnetlink; agentd never runs `ip`, `brctl` or `bridge`.
//!
//! What this module owns: the taps it is asked to create (named by
//! [`tap_name_for`]). It reads bridges but never creates, changes or deletes
//! one: the host's network belongs to the operator. It refuses to delete,
//! enslave or re-flag a link that is not a tap.
//!
//! # Why persistent taps
//! [`create_tap`] makes the tap persistent (`TUNSETPERSIST`) and closes its fd.
//! QEMU then opens `/dev/net/tun` itself and attaches by name
//! (`-netdev tap,ifname=NAME,script=no,downscript=no`). So the tap, its bridge
//! port and its VLAN exist before QEMU starts and outlive both a QEMU exit and
//! an agentd restart: a restarted agentd finds them again under their
//! deterministic names and adopts a running guest instead of re-plumbing it.
//! The price is that a tap also outlives a crash of everything, so agentd
//! sweeps leftovers ([`list_taps_with_prefix`]) against its store on start.
//!
//! # Flags that must agree with QEMU 7.2
//! QEMU's `tap_open` does `TUNSETIFF` with `IFF_TAP | IFF_NO_PI`, plus
//! `IFF_VNET_HDR` (vnet_hdr defaults to on when the kernel has it) and
//! `IFF_MULTI_QUEUE` only when `queues` > 1. For an existing device the kernel
//! requires the same type (tap) and the same `IFF_MULTI_QUEUE` bit (else
//! EINVAL), and then *replaces* the feature flags (`IFF_NO_PI`,
//! `IFF_VNET_HDR`, ...) with the attacher's. So we create a single-queue tap
//! with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, matching what QEMU asks for;
//! a multi-queue NIC would need a multi-queue tap, which we do not make.
//! A single-queue tap takes one attacher: while QEMU holds it, another
//! `TUNSETIFF` gets EBUSY, which is why [`create_tap`] looks before it opens.
//!
//! # Who may attach
//! A persistent tap without an owner can be attached by anyone who can open
//! `/dev/net/tun` (often mode 0666), which would put that process on the
//! guest's bridge and VLAN while the guest is down. So the tap is owned
//! (`TUNSETOWNER`) by agentd's euid, which is QEMU's too; others need
//! CAP_NET_ADMIN. A QEMU run as another user would need that user as owner.
//!
//! # Namespaces and blocking
//! Every function works in the network namespace of the calling thread (a
//! fresh netlink socket, `/dev/net/tun` opened per call), and never reads
//! `/sys/class/net`, which shows the namespace of whoever mounted sysfs. Each
//! call is a handful of short syscalls; async code may call them directly.

//!
//! # Rooms
//! `mac.rs`: [`Mac`]. `tap.rs`: [`TapName`] and the tun ioctls. `rtnl.rs`:
//! links, OS errors and the rtnetlink client. `filter.rs`: [`NicFilters`],
//! the anti-spoofing rules of each tap (nftables, through `nft` and the
//! command runner). This file: the operations, and [`HostNet`], the seam
//! the guest service reaches them through.

mod filter;
mod mac;
mod rtnl;
mod tap;

use std::ffi::CString;

use stratus_core::error::{Error, Result};

pub use filter::{NicFilters, TABLE as FILTER_TABLE};
pub use mac::Mac;
use rtnl::*;
use tap::{check_ifname, make_persistent_tap, open_tap_queue};
pub use tap::{tap_name_for, TapName};

/// The prefix of every tap agentd names (see [`tap_name_for`]).
pub const TAP_PREFIX: &str = "st";

/// [`tap_name_for`] takes NIC indexes below this: the name must fit in 15 bytes.
pub const MAX_NICS_PER_GUEST: usize = 10_000;

/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = libc::IFNAMSIZ - 1;

// ---------------------------------------------------------------------------
// HostNet: the operations the guest service uses, behind a trait

/// What the guest service does to the host's network: its taps and their
/// bridge ports. [`KernelNet`] is the real one (the functions below); the
/// unit tests use an in-memory fake that can fail any call.
pub trait HostNet: Send + Sync {
    fn create_tap(&self, name: &TapName) -> Result<()>;
    fn delete_tap(&self, name: &TapName) -> Result<()>;
    /// Makes the tap a port of `bridge` for a NIC on `vlan` (0: untagged;
    /// see [`attach_to_bridge`] for when that is refused).
    fn attach_to_bridge(&self, tap: &TapName, bridge: &str, vlan: u16) -> Result<()>;
    fn set_vlan(&self, tap: &TapName, vlan: u16) -> Result<()>;
    /// Names of the taps whose name starts with `prefix`.
    fn list_taps_with_prefix(&self, prefix: &str) -> Vec<String>;
}

/// The kernel's network, in the calling thread's namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelNet;

impl HostNet for KernelNet {
    fn create_tap(&self, name: &TapName) -> Result<()> {
        create_tap(name)
    }

    fn delete_tap(&self, name: &TapName) -> Result<()> {
        delete_tap(name)
    }

    fn attach_to_bridge(&self, tap: &TapName, bridge: &str, vlan: u16) -> Result<()> {
        attach_to_bridge(tap, bridge, vlan)
    }

    fn set_vlan(&self, tap: &TapName, vlan: u16) -> Result<()> {
        set_vlan(tap, vlan)
    }

    fn list_taps_with_prefix(&self, prefix: &str) -> Vec<String> {
        list_taps_with_prefix(prefix)
    }
}

// ---------------------------------------------------------------------------
// Operations

/// Creates tap `name` (single-queue, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`),
/// makes it persistent so it outlives our fd, and sets it up.
///
/// Idempotent: an existing tap of that name is accepted as it is (even while
/// QEMU holds it) and only set up. A link of that name that is not a tap is
/// AlreadyExists; an existing multi-queue tap is FailedPrecondition, since
/// QEMU's single-queue attach would fail on it.
pub fn create_tap(name: &TapName) -> Result<()> {
    let mut nl = Rtnl::open().map_err(|e| fail(name, "open rtnetlink socket", e))?;
    if lookup_tap_for_create(&mut nl, name)?.is_none() {
        match make_persistent_tap(name) {
            Ok(()) => tracing::info!(tap = %name, "created persistent tap"),
            // Someone (a concurrent call, QEMU) made and holds it since we
            // looked; the second lookup judges what it is.
            Err(e) if e.errno() == Some(libc::EBUSY) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) => {
                return Err(Error::unavailable(format!(
                    "tap {name}: /dev/net/tun: {e} (is the tun module loaded?)"
                ))
                .with_source(e))
            }
            Err(e) => return Err(fail(name, "create with TUNSETIFF/TUNSETPERSIST", e)),
        }
    }
    let link = lookup_tap_for_create(&mut nl, name)?
        .ok_or_else(|| Error::internal(format!("tap {name} vanished right after creation")))?;
    if !link.tun.is_some_and(|t| t.persist) {
        tracing::warn!(tap = %name, "tap exists but is not persistent; it will go with its holder");
    }
    if link.flags & uapi::IFF_UP == 0 {
        nl.ack(
            uapi::RTM_SETLINK,
            &LinkMsg::new(libc::AF_UNSPEC as u8, link.index).up(),
        )
        .map_err(|e| fail(name, "set up", e))?;
    }
    Ok(())
}

/// Opens a queue of tap `name` for a QEMU to inherit (`-netdev tap,fd=`).
/// The tap must exist already (made by [`create_tap`], on its bridge): a
/// missing one is NotFound, never made here unbridged.
pub fn open_tap(name: &TapName) -> Result<std::os::fd::OwnedFd> {
    let mut nl = Rtnl::open().map_err(|e| fail(name, "open rtnetlink socket", e))?;
    match lookup(&mut nl, name.as_str()).map_err(|e| fail(name, "look up", e))? {
        Some(l) if l.is_tap() => {}
        Some(l) => {
            return Err(Error::precondition(format!(
                "link {name} is {}, not a tap",
                l.describe()
            )))
        }
        None => return Err(Error::not_found(format!("tap {name} does not exist"))),
    }
    open_tap_queue(name).map_err(|e| fail(name, "open a queue with TUNSETIFF", e))
}

/// Deletes tap `name` (RTM_DELLINK, which works even while QEMU holds it).
/// Idempotent: a missing tap is Ok. A link of that name that is not a tap is
/// FailedPrecondition and is left alone.
pub fn delete_tap(name: &TapName) -> Result<()> {
    let mut nl = Rtnl::open().map_err(|e| fail(name, "open rtnetlink socket", e))?;
    let Some(link) = lookup(&mut nl, name.as_str()).map_err(|e| fail(name, "look up", e))? else {
        return Ok(());
    };
    if !link.is_tap() {
        return Err(Error::precondition(format!(
            "link {name} is {}, not a tap; not deleting it",
            link.describe()
        )));
    }
    match nl.ack(
        uapi::RTM_DELLINK,
        &LinkMsg::new(libc::AF_UNSPEC as u8, link.index),
    ) {
        Ok(()) => {
            tracing::info!(tap = %name, "deleted tap");
            Ok(())
        }
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(fail(name, "delete", e)),
    }
}

/// Makes tap `tap` a port of bridge `bridge` (IFLA_MASTER), moving it from
/// any other master, for a NIC on VLAN `vlan` (0: untagged). Idempotent.
///
/// A missing bridge, or a link `bridge` that is not a bridge, is
/// FailedPrecondition naming it, and the tap is left unchanged; a missing tap
/// is NotFound; a malformed bridge name is InvalidArgument.
///
/// VLAN 0 on a bridge that filters VLANs is refused (FailedPrecondition,
/// before the tap joins) unless the bridge's `default_pvid` is 0: the kernel
/// makes every new port a member of the default VLAN, untagged, so an
/// "untagged" guest would land on whatever that VLAN carries (often the
/// hosts' own network) by accident. With `default_pvid` 0 the port belongs
/// to no VLAN until the operator says so. Without VLAN filtering the bridge
/// is one untagged segment, which VLAN 0 means.
pub fn attach_to_bridge(tap: &TapName, bridge: &str, vlan: u16) -> Result<()> {
    check_ifname(bridge).map_err(|why| Error::invalid(format!("bridge name {bridge:?} {why}")))?;
    let mut nl = Rtnl::open().map_err(|e| fail(tap, "open rtnetlink socket", e))?;
    let br = match lookup(&mut nl, bridge).map_err(|e| fail(bridge, "look up", e))? {
        None => {
            return Err(Error::precondition(format!(
                "bridge {bridge} does not exist on this host"
            )))
        }
        Some(l) if !l.is_bridge() => {
            return Err(Error::precondition(format!(
                "{bridge} is not a bridge (it is {})",
                l.describe()
            )))
        }
        Some(l) => l,
    };
    if let (0, Some(true), pvid) = (vlan, br.vlan_filtering, br.default_pvid) {
        if pvid != Some(0) {
            let pvid = pvid.map_or("its default VLAN".into(), |p| format!("VLAN {p}"));
            return Err(Error::precondition(format!(
                "bridge {bridge} filters VLANs and puts new ports on {pvid} untagged: \
                 an untagged NIC (vlan 0) on tap {tap} would put the guest there by accident; \
                 give the NIC a VLAN, or set the bridge's default_pvid to 0"
            )));
        }
    }
    let port = require_tap(&mut nl, tap)?;
    if port.master == Some(br.index) {
        return Ok(());
    }
    nl.ack(
        uapi::RTM_SETLINK,
        &LinkMsg::new(libc::AF_UNSPEC as u8, port.index).master(br.index),
    )
    .map_err(|e| fail(tap, &format!("attach to bridge {bridge}"), e))?;
    tracing::info!(tap = %tap, bridge, "attached tap to bridge");
    Ok(())
}

/// Puts bridge port `tap` on access VLAN `vlan` (1..=4094): the port's only
/// VLAN, as PVID and egress-untagged, so the guest sends and receives plain
/// frames and sees nothing of other VLANs. Done with bridge VLAN filtering:
/// RTM_DELLINK (AF_BRIDGE) of every other VLAN, then RTM_SETLINK (AF_BRIDGE)
/// of IFLA_AF_SPEC/IFLA_BRIDGE_VLAN_INFO {PVID|UNTAGGED, vlan}. Idempotent,
/// and re-applying the same VLAN does not interrupt traffic.
///
/// The tap must be a port of a bridge with `vlan_filtering` on (else
/// FailedPrecondition: without filtering the bridge ignores port VLANs and
/// the guest would see every VLAN). Carrying the VLAN on the bridge's uplink
/// is the operator's configuration, not ours.
pub fn set_vlan(tap: &TapName, vlan: u16) -> Result<()> {
    if !(1..=4094).contains(&vlan) {
        return Err(Error::invalid(format!(
            "VLAN {vlan} for tap {tap} is out of 1..=4094"
        )));
    }
    let mut nl = Rtnl::open().map_err(|e| fail(tap, "open rtnetlink socket", e))?;
    let port = require_tap(&mut nl, tap)?;
    let not_attached = || {
        Error::precondition(format!(
            "tap {tap} is not a port of a bridge; attach it before setting VLAN {vlan}"
        ))
    };
    let master = port.master.ok_or_else(not_attached)?;
    let br = lookup_index(&mut nl, master)
        .map_err(|e| fail(tap, "look up its master", e))?
        .filter(Link::is_bridge)
        .ok_or_else(not_attached)?;
    if br.vlan_filtering != Some(true) {
        let b = &br.name;
        return Err(Error::precondition(format!(
            "bridge {b} does not filter VLANs, so VLAN {vlan} on tap {tap} would not \
             isolate the guest; enable it with `ip link set {b} type bridge vlan_filtering 1` \
             (the kernel needs CONFIG_BRIDGE_VLAN_FILTERING)"
        )));
    }
    let bridge_msg = || LinkMsg::new(uapi::AF_BRIDGE, port.index);
    // Delete first: a moment with no VLAN drops frames, whereas a moment with
    // two would leak the old VLAN's frames to the guest.
    let others = vlans_except(vlan);
    nl.ack(uapi::RTM_DELLINK, &bridge_msg().vlans(&others))
        .map_err(|e| fail(tap, "remove other bridge VLANs", e))?;
    let access = [VlanEntry {
        flags: uapi::BRIDGE_VLAN_INFO_PVID | uapi::BRIDGE_VLAN_INFO_UNTAGGED,
        vid: vlan,
    }];
    nl.ack(uapi::RTM_SETLINK, &bridge_msg().vlans(&access))
        .map_err(|e| fail(tap, &format!("set bridge VLAN {vlan}"), e))?;
    tracing::info!(tap = %tap, bridge = %br.name, vlan, "set access VLAN");
    Ok(())
}

/// Whether a link (of any kind) named `name` exists in this namespace.
/// A malformed name does not exist.
pub fn link_exists(name: &str) -> bool {
    if check_ifname(name).is_err() {
        return false;
    }
    let Ok(c_name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c_name` is a NUL-terminated string that lives across the call;
    // if_nametoindex only reads it and returns 0 when there is no such link.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

/// The names of the taps (tun devices in tap mode, of any origin) whose name
/// starts with `prefix`, sorted; to find leftovers after a crash. Filter with
/// [`TapName::is_guest_nic`] before deleting anything.
///
/// If the kernel cannot be asked, this logs the error and returns no names,
/// so a start-up sweep deletes nothing rather than failing the start.
pub fn list_taps_with_prefix(prefix: &str) -> Vec<String> {
    match all_links() {
        Ok(links) => {
            let mut names: Vec<String> = links
                .into_iter()
                .filter(|l| l.is_tap() && l.name.starts_with(prefix))
                .map(|l| l.name)
                .collect();
            names.sort();
            names
        }
        Err(e) => {
            tracing::warn!(prefix, error = %e, "could not list taps");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use stratus_core::error::ErrorKind;
    use uuid::Uuid;

    #[test]
    fn mac_parses_case_insensitively_and_formats_lower_case() {
        let mac: Mac = "52:54:00:AB:cd:Ef".parse().unwrap();
        assert_eq!(mac.octets(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(format!("{mac:?}"), "Mac(52:54:00:ab:cd:ef)");
        assert_eq!(
            "02:00:00:00:00:01".parse::<Mac>().unwrap().to_string(),
            "02:00:00:00:00:01"
        );
    }

    #[test]
    fn a_macs_link_local_address_is_its_modified_eui64() {
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(mac.link_local().to_string(), "fe80::5054:ff:fe12:3456");
        // The universal/local bit flips both ways.
        let mac: Mac = "00:1b:21:0a:0b:0c".parse().unwrap();
        assert_eq!(mac.link_local().to_string(), "fe80::21b:21ff:fe0a:b0c");
    }

    #[test]
    fn mac_rejects_malformed_and_non_unicast() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54:00:ab:cd:e",
            "52:54:00:ab:cd:eff",
            "52-54-00-ab-cd-ef",
            "525400abcdef",
            "52:54:00:ab:cd:+f",
            "52:54:00:ab:cd:gg",
            "52:54:00:ab:cd:ef ",
            "52:54:00:ab::cd",
            "01:00:5e:00:00:01", // multicast
            "ff:ff:ff:ff:ff:ff", // broadcast
            "53:54:00:ab:cd:ef", // multicast bit in the first octet
            "00:00:00:00:00:00",
        ] {
            let err = bad.parse::<Mac>().expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        assert!("01:00:5e:00:00:01"
            .parse::<Mac>()
            .unwrap_err()
            .message()
            .contains("multicast"));
    }

    #[test]
    fn generated_macs_are_qemu_unicast_and_differ() {
        let macs: Vec<Mac> = (0..64).map(|_| Mac::generate()).collect();
        for mac in &macs {
            let o = mac.octets();
            assert_eq!(o[..3], Mac::QEMU_OUI);
            assert_eq!(o[0] & 1, 0, "unicast");
            assert_eq!(o[0] & 2, 2, "locally administered");
            assert_eq!(mac.to_string().parse::<Mac>().unwrap(), *mac);
        }
        let distinct: std::collections::HashSet<_> = macs.iter().collect();
        assert!(
            distinct.len() > 60,
            "64 draws of 24 random bits collide rarely"
        );
    }

    #[test]
    fn mac_serializes_as_its_string() {
        let mac: Mac = "52:54:00:12:34:56".parse().unwrap();
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"52:54:00:12:34:56\"");
        assert_eq!(
            serde_json::from_str::<Mac>("\"52:54:00:12:34:56\"").unwrap(),
            mac
        );
        assert!(serde_json::from_str::<Mac>("\"ff:ff:ff:ff:ff:ff\"").is_err());
        assert!(serde_json::from_str::<Mac>("17").is_err());
    }

    #[test]
    fn tap_names_follow_the_kernel_rules() {
        for good in ["t", "st1b4e28ban0", "tap-0_x.y", "fifteen_bytes_x", "é"] {
            let name = TapName::new(good).expect(good);
            assert_eq!(name.as_str(), good);
            assert_eq!(name.to_string(), good);
        }
        for bad in [
            "",
            "sixteen_bytes_xx",
            ".",
            "..",
            "a/b",
            "a b",
            "a\tb",
            "a\nb",
            "eth0:1",
            "tap%d",
            "a\0b",
        ] {
            let err = TapName::new(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
        }
        assert_eq!(
            serde_json::from_str::<TapName>("\"st0\"").unwrap(),
            TapName::new("st0").unwrap()
        );
        assert!(serde_json::from_str::<TapName>("\"a/b\"").is_err());
    }

    #[test]
    fn tap_name_for_is_deterministic_short_and_distinct() {
        let vm = Uuid::parse_str("1b4e28ba-2fa1-11d2-883f-0016d3cca427").unwrap();
        assert_eq!(tap_name_for(vm, 0).as_str(), "st1b4e28ban0");
        assert_eq!(tap_name_for(vm, 0), tap_name_for(vm, 0));
        assert_ne!(tap_name_for(vm, 1), tap_name_for(vm, 0));
        let longest = tap_name_for(vm, MAX_NICS_PER_GUEST - 1);
        assert_eq!(longest.as_str(), "st1b4e28ban9999");
        assert_eq!(longest.as_str().len(), IFNAME_MAX);
        let other = Uuid::parse_str("2b4e28ba-2fa1-11d2-883f-0016d3cca427").unwrap();
        assert_ne!(tap_name_for(other, 0), tap_name_for(vm, 0));
        for i in [0, 7, 10, 999, 9999] {
            let name = tap_name_for(Uuid::new_v4(), i);
            assert!(name.as_str().len() <= IFNAME_MAX);
            assert!(name.is_guest_nic(), "{name}");
            assert_eq!(name.as_str().parse::<TapName>().unwrap(), name);
        }
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn tap_name_for_refuses_an_index_that_does_not_fit() {
        tap_name_for(Uuid::new_v4(), MAX_NICS_PER_GUEST);
    }

    #[test]
    fn guest_nic_names_are_recognised_exactly() {
        for other in [
            "stuff",
            "st1b4e28ba",
            "st1b4e28ban",
            "st1B4E28BAn0",
            "st1b4e28ban01",
            "st1b4e28bax0",
        ] {
            assert!(!TapName::new(other).unwrap().is_guest_nic(), "{other}");
        }
    }

    #[test]
    fn vlans_except_covers_every_other_vlan() {
        let begin = uapi::BRIDGE_VLAN_INFO_RANGE_BEGIN;
        let end = uapi::BRIDGE_VLAN_INFO_RANGE_END;
        let e = |flags, vid| VlanEntry { flags, vid };
        assert_eq!(vlans_except(1), [e(begin, 2), e(end, 4094)]);
        assert_eq!(vlans_except(2), [e(0, 1), e(begin, 3), e(end, 4094)]);
        assert_eq!(
            vlans_except(100),
            [e(begin, 1), e(end, 99), e(begin, 101), e(end, 4094)]
        );
        assert_eq!(vlans_except(4093), [e(begin, 1), e(end, 4092), e(0, 4094)]);
        assert_eq!(vlans_except(4094), [e(begin, 1), e(end, 4093)]);
    }

    #[test]
    fn vlan_request_is_a_nested_af_spec() {
        let msg = LinkMsg::new(uapi::AF_BRIDGE, 42).vlans(&[VlanEntry { flags: 6, vid: 100 }]);
        let mut want = vec![7, 0, 0, 0];
        want.extend(42u32.to_ne_bytes());
        want.extend([0; 8]);
        want.extend(12u16.to_ne_bytes()); // IFLA_AF_SPEC: 4 + one 8-byte attribute
        want.extend(uapi::IFLA_AF_SPEC.to_ne_bytes());
        want.extend(8u16.to_ne_bytes());
        want.extend(uapi::IFLA_BRIDGE_VLAN_INFO.to_ne_bytes());
        want.extend(6u16.to_ne_bytes());
        want.extend(100u16.to_ne_bytes());
        assert_eq!(msg.buf, want);
    }

    #[test]
    fn link_messages_parse_into_links() {
        // What the kernel says of a persistent tap enslaved to index 3.
        let mut msg = LinkMsg::new(libc::AF_UNSPEC as u8, 9).up().master(3);
        msg.attr(uapi::IFLA_IFNAME, b"st1b4e28ban0\0");
        let start = msg.begin_nest(uapi::IFLA_LINKINFO);
        msg.attr(uapi::IFLA_INFO_KIND, b"tun\0");
        let data = msg.begin_nest(uapi::IFLA_INFO_DATA);
        msg.attr(uapi::IFLA_TUN_TYPE, &[libc::IFF_TAP as u8]);
        msg.attr(uapi::IFLA_TUN_PERSIST, &[1]);
        msg.attr(uapi::IFLA_TUN_MULTI_QUEUE, &[0]);
        msg.end_nest(data);
        msg.end_nest(start);
        let link = parse_link(&msg.buf).unwrap();
        assert_eq!(
            link,
            Link {
                index: 9,
                name: "st1b4e28ban0".into(),
                flags: uapi::IFF_UP,
                master: Some(3),
                kind: Some("tun".into()),
                tun: Some(TunInfo {
                    tap: true,
                    persist: true,
                    multi_queue: false
                }),
                vlan_filtering: None,
                default_pvid: None,
            }
        );
        assert!(link.is_tap() && !link.is_bridge());

        let mut msg = LinkMsg::new(libc::AF_UNSPEC as u8, 3);
        msg.attr(uapi::IFLA_IFNAME, b"br0\0");
        let start = msg.begin_nest(uapi::IFLA_LINKINFO);
        msg.attr(uapi::IFLA_INFO_KIND, b"bridge\0");
        let data = msg.begin_nest(uapi::IFLA_INFO_DATA);
        msg.attr(uapi::IFLA_BR_VLAN_FILTERING, &[1]);
        msg.end_nest(data);
        msg.end_nest(start);
        let link = parse_link(&msg.buf).unwrap();
        assert!(link.is_bridge() && !link.is_tap());
        assert_eq!(link.vlan_filtering, Some(true));
        assert_eq!(link.describe(), "a bridge");

        assert!(parse_link(&[0; 8]).is_err());
    }

    #[test]
    fn an_error_ack_carries_errno_and_kernel_message() {
        let mut payload = (-libc::EINVAL).to_ne_bytes().to_vec();
        payload.extend(16u32.to_ne_bytes()); // echoed header, capped
        payload.extend([0; 12]);
        payload.extend(12u16.to_ne_bytes());
        payload.extend(uapi::NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend(b"no way\0\0");
        let err = ack_result(uapi::NLM_F_CAPPED | uapi::NLM_F_ACK_TLVS, &payload).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL));
        assert_eq!(err.kernel_says.as_deref(), Some("no way"));
        let e = fail("st0", "attach", err);
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(
            e.message()
                .starts_with("link st0: attach: Invalid argument"),
            "{e}"
        );
        assert!(e.message().ends_with("(kernel: no way)"), "{e}");

        let mut ok = 0i32.to_ne_bytes().to_vec();
        ok.extend([0; 16]);
        assert!(ack_result(0, &ok).is_ok());
    }

    #[test]
    fn missing_links_are_not_found_and_busy_ones_failed_precondition() {
        let nodev = fail(
            "st0",
            "delete",
            io::Error::from_raw_os_error(libc::ENODEV).into(),
        );
        assert_eq!(nodev.kind(), ErrorKind::NotFound);
        let busy = fail(
            "st0",
            "create",
            io::Error::from_raw_os_error(libc::EBUSY).into(),
        );
        assert_eq!(busy.kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn malformed_names_do_not_exist() {
        assert!(!link_exists(""));
        assert!(!link_exists("../../etc"));
        assert!(!link_exists("no-such-link-x"));
    }
}
