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

use std::ffi::CString;
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use stratus_core::error::{Error, ErrorKind, Result};
use uuid::Uuid;

/// The prefix of every tap agentd names (see [`tap_name_for`]).
pub const TAP_PREFIX: &str = "st";

/// [`tap_name_for`] takes NIC indexes below this: the name must fit in 15 bytes.
pub const MAX_NICS_PER_GUEST: usize = 10_000;

/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = libc::IFNAMSIZ - 1;

// ---------------------------------------------------------------------------
// Mac

/// A guest NIC's unicast Ethernet address, written `52:54:00:ab:cd:ef`.
///
/// Parsing is case-insensitive and requires six two-digit hex octets; the
/// address must be unicast (low bit of the first octet clear) and not all
/// zeros. It is written back in lower case, and serialized as that string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac([u8; 6]);

impl Mac {
    /// QEMU's OUI; its low bits mark the address unicast and locally administered.
    pub const QEMU_OUI: [u8; 3] = [0x52, 0x54, 0x00];

    /// A validated address from its octets.
    pub fn new(octets: [u8; 6]) -> Result<Mac> {
        let mac = Mac(octets);
        if octets[0] & 1 != 0 {
            return Err(Error::invalid(format!(
                "MAC {mac} is a multicast address (low bit of the first octet set); \
                 a NIC needs a unicast one"
            )));
        }
        if octets == [0; 6] {
            return Err(Error::invalid("MAC 00:00:00:00:00:00 is not a NIC address"));
        }
        Ok(mac)
    }

    /// A random address in QEMU's `52:54:00` range, from the OS's CSPRNG
    /// (the random bytes of a v4 UUID).
    pub fn generate() -> Mac {
        let random = Uuid::new_v4();
        let r = random.as_bytes();
        let [a, b, c] = Self::QEMU_OUI;
        Mac([a, b, c, r[0], r[1], r[2]])
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for Mac {
    type Err = Error;

    fn from_str(s: &str) -> Result<Mac> {
        let bad = || {
            Error::invalid(format!(
                "MAC {s:?} is not six colon-separated hex octets like 52:54:00:ab:cd:ef"
            ))
        };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would accept "+f".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Mac::new(octets)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

impl TryFrom<String> for Mac {
    type Error = Error;
    fn try_from(s: String) -> Result<Mac> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(mac: Mac) -> String {
        mac.to_string()
    }
}

// ---------------------------------------------------------------------------
// TapName

/// A valid Linux interface name for a tap: 1 to 15 bytes, none of `/`, `:`,
/// whitespace or NUL, and not `.` or `..` (the kernel's `dev_valid_name`);
/// also no `%`, which `TUNSETIFF` would treat as a template ("tap%d") and
/// replace with a number, so the tap would not get the name we asked for.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TapName(String);

impl TapName {
    pub fn new(name: impl Into<String>) -> Result<TapName> {
        let name = name.into();
        match check_ifname(&name) {
            Ok(()) => Ok(TapName(name)),
            Err(why) => Err(Error::invalid(format!("tap name {name:?} {why}"))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name has the exact shape [`tap_name_for`] gives, so a
    /// start-up sweep can tell agentd's taps from an operator's `st…` link.
    pub fn is_guest_nic(&self) -> bool {
        let Some(rest) = self.0.strip_prefix(TAP_PREFIX) else {
            return false;
        };
        let (hex, index) = rest.split_at(rest.len().min(8));
        let Some(index) = index.strip_prefix('n') else {
            return false;
        };
        hex.len() == 8
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
            && (index == "0" || !index.starts_with('0'))
    }
}

/// Why `name` is not a usable interface name, if it is not.
fn check_ifname(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > IFNAME_MAX {
        return Err("is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("is . or ..");
    }
    if name
        .chars()
        .any(|c| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace())
    {
        return Err("contains '/', ':', '%', NUL or whitespace");
    }
    Ok(())
}

impl FromStr for TapName {
    type Err = Error;
    fn from_str(s: &str) -> Result<TapName> {
        TapName::new(s)
    }
}

impl TryFrom<String> for TapName {
    type Error = Error;
    fn try_from(s: String) -> Result<TapName> {
        TapName::new(s)
    }
}

impl From<TapName> for String {
    fn from(name: TapName) -> String {
        name.0
    }
}

impl AsRef<str> for TapName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TapName({:?})", self.0)
    }
}

/// The tap of NIC `nic_index` of guest `vm`: `st` + the first 8 hex digits of
/// the UUID + `n` + the index, e.g. `st1b4e28ban0`. The same inputs always
/// give the same name, so agentd finds its taps again after a restart.
///
/// 32 bits of a v4 UUID make a clash between two guests of one host unlikely
/// (about 1 in 10^4 with a thousand guests); if it happens, QEMU's attach
/// fails with EBUSY rather than sharing the tap.
///
/// # Panics
/// If `nic_index >= MAX_NICS_PER_GUEST`; the spec validation caps NICs far lower.
pub fn tap_name_for(vm: Uuid, nic_index: usize) -> TapName {
    assert!(
        nic_index < MAX_NICS_PER_GUEST,
        "NIC index {nic_index} of guest {vm} does not fit in a tap name"
    );
    let hex = vm.simple().to_string();
    TapName(format!("{TAP_PREFIX}{}n{nic_index}", &hex[..8]))
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
/// any other master. Idempotent.
///
/// A missing bridge, or a link `bridge` that is not a bridge, is
/// FailedPrecondition naming it, and the tap is left unchanged; a missing tap
/// is NotFound; a malformed bridge name is InvalidArgument.
pub fn attach_to_bridge(tap: &TapName, bridge: &str) -> Result<()> {
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

// ---------------------------------------------------------------------------
// Plumbing: tun ioctls

/// Creates tap `name`, owned by our euid, and makes it persistent; the fd
/// closes on return and the tap stays, down and without carrier until QEMU
/// attaches.
fn make_persistent_tap(name: &TapName) -> std::result::Result<(), OsError> {
    // std opens with O_CLOEXEC, so QEMU children never inherit it.
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain C data (a name array and a union of integers,
    // addresses and a pointer); all zeros is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_str().bytes()) {
        *dst = src as libc::c_char;
    }
    // At most 15 bytes were copied (TapName), so ifr_name stays NUL-terminated.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun; TUNSETIFF reads an ifreq and may
    // write the final name back into it, and `ifr` is a live, owned ifreq.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owner = unsafe { libc::geteuid() };
    // SAFETY: the fd is attached to our tap; TUNSETOWNER and TUNSETPERSIST
    // take their argument by value (no pointer), read as an unsigned long.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, owner as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Plumbing: what a link is

/// What this module needs to know about a link, from an RTM_NEWLINK message.
#[derive(Debug, Clone, Default, PartialEq)]
struct Link {
    index: u32,
    name: String,
    /// ifi_flags (IFF_UP, ...).
    flags: u32,
    /// Index of the master (the bridge, for a bridge port).
    master: Option<u32>,
    /// IFLA_INFO_KIND: "tun" (tun and tap), "bridge", "veth", ...
    kind: Option<String>,
    tun: Option<TunInfo>,
    /// For a bridge: IFLA_BR_VLAN_FILTERING.
    vlan_filtering: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct TunInfo {
    tap: bool,
    persist: bool,
    multi_queue: bool,
}

impl Link {
    fn is_tap(&self) -> bool {
        self.tun.is_some_and(|t| t.tap)
    }

    fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    /// "a bridge", "a veth", "a tun device", for messages.
    fn describe(&self) -> String {
        match (&self.kind, &self.tun) {
            (_, Some(t)) if t.tap => "a tap".into(),
            (Some(k), _) if k == "tun" => "a tun device".into(),
            (Some(k), _) => format!("a {k}"),
            (None, _) => "a device without a link kind (physical or loopback)".into(),
        }
    }
}

/// The link named `name`, or None if there is none.
fn lookup(nl: &mut Rtnl, name: &str) -> std::result::Result<Option<Link>, OsError> {
    let mut msg = LinkMsg::new(libc::AF_UNSPEC as u8, 0);
    let mut c_name = name.as_bytes().to_vec();
    c_name.push(0);
    msg.attr(uapi::IFLA_IFNAME, &c_name);
    get_link(nl, msg)
}

/// The link with index `index`, or None if there is none.
fn lookup_index(nl: &mut Rtnl, index: u32) -> std::result::Result<Option<Link>, OsError> {
    get_link(nl, LinkMsg::new(libc::AF_UNSPEC as u8, index))
}

fn get_link(nl: &mut Rtnl, mut msg: LinkMsg) -> std::result::Result<Option<Link>, OsError> {
    msg.attr(
        uapi::IFLA_EXT_MASK,
        &uapi::RTEXT_FILTER_SKIP_STATS.to_ne_bytes(),
    );
    match nl.get(uapi::RTM_GETLINK, &msg) {
        Ok(replies) => match replies.first() {
            Some(payload) => parse_link(payload).map(Some),
            None => Err(OsError::malformed("RTM_GETLINK got no RTM_NEWLINK reply")),
        },
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn all_links() -> std::result::Result<Vec<Link>, OsError> {
    let mut nl = Rtnl::open()?;
    let mut msg = LinkMsg::new(libc::AF_UNSPEC as u8, 0);
    msg.attr(
        uapi::IFLA_EXT_MASK,
        &uapi::RTEXT_FILTER_SKIP_STATS.to_ne_bytes(),
    );
    nl.dump(uapi::RTM_GETLINK, &msg)?
        .iter()
        .map(|p| parse_link(p))
        .collect()
}

/// The tap `tap`: NotFound if missing, FailedPrecondition if not a tap.
fn require_tap(nl: &mut Rtnl, tap: &TapName) -> Result<Link> {
    match lookup(nl, tap.as_str()).map_err(|e| fail(tap, "look up", e))? {
        None => Err(Error::not_found(format!("tap {tap} does not exist"))),
        Some(l) if !l.is_tap() => Err(Error::precondition(format!(
            "link {tap} is {}, not a tap",
            l.describe()
        ))),
        Some(l) => Ok(l),
    }
}

/// The existing tap `name`, None if no link has that name, or an error if the
/// link cannot serve as a QEMU single-queue tap.
fn lookup_tap_for_create(nl: &mut Rtnl, name: &TapName) -> Result<Option<Link>> {
    let Some(link) = lookup(nl, name.as_str()).map_err(|e| fail(name, "look up", e))? else {
        return Ok(None);
    };
    if !link.is_tap() {
        return Err(Error::exists(format!(
            "link {name} already exists and is {}, not a tap",
            link.describe()
        )));
    }
    if link.tun.is_some_and(|t| t.multi_queue) {
        return Err(Error::precondition(format!(
            "tap {name} exists but is multi-queue; QEMU attaches single-queue taps"
        )));
    }
    Ok(Some(link))
}

fn parse_link(payload: &[u8]) -> std::result::Result<Link, OsError> {
    if payload.len() < uapi::IFINFOMSG_LEN {
        return Err(OsError::malformed("short RTM_NEWLINK"));
    }
    let mut link = Link {
        index: u32_at(payload, 4),
        flags: u32_at(payload, 8),
        ..Link::default()
    };
    let mut info_data: &[u8] = &[];
    for (ty, val) in attrs(&payload[uapi::IFINFOMSG_LEN..]) {
        match ty {
            uapi::IFLA_IFNAME => link.name = c_string(val),
            uapi::IFLA_MASTER if val.len() >= 4 => link.master = Some(u32_at(val, 0)),
            uapi::IFLA_LINKINFO => {
                for (ty, val) in attrs(val) {
                    match ty {
                        uapi::IFLA_INFO_KIND => link.kind = Some(c_string(val)),
                        uapi::IFLA_INFO_DATA => info_data = val,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    match link.kind.as_deref() {
        Some("tun") => {
            let mut tun = TunInfo::default();
            for (ty, val) in attrs(info_data) {
                let on = val.first().is_some_and(|&b| b != 0);
                match ty {
                    uapi::IFLA_TUN_TYPE => tun.tap = val.first() == Some(&(libc::IFF_TAP as u8)),
                    uapi::IFLA_TUN_PERSIST => tun.persist = on,
                    uapi::IFLA_TUN_MULTI_QUEUE => tun.multi_queue = on,
                    _ => {}
                }
            }
            link.tun = Some(tun);
        }
        Some("bridge") => {
            link.vlan_filtering = attrs(info_data)
                .find(|&(ty, _)| ty == uapi::IFLA_BR_VLAN_FILTERING)
                .map(|(_, val)| val.first().is_some_and(|&b| b != 0));
        }
        _ => {}
    }
    Ok(link)
}

/// The VLAN entries that delete every VLAN but `keep`: up to two ranges.
fn vlans_except(keep: u16) -> Vec<VlanEntry> {
    let mut entries = Vec::new();
    for (lo, hi) in [(1, keep - 1), (keep + 1, 4094)] {
        if lo == hi {
            entries.push(VlanEntry { flags: 0, vid: lo });
        } else if lo < hi {
            entries.push(VlanEntry {
                flags: uapi::BRIDGE_VLAN_INFO_RANGE_BEGIN,
                vid: lo,
            });
            entries.push(VlanEntry {
                flags: uapi::BRIDGE_VLAN_INFO_RANGE_END,
                vid: hi,
            });
        }
    }
    entries
}

// ---------------------------------------------------------------------------
// Plumbing: errors

/// A failed syscall or netlink request: the OS error and, when the kernel
/// gave one (netlink extended ack), its explanation.
#[derive(Debug)]
struct OsError {
    err: io::Error,
    kernel_says: Option<String>,
}

impl OsError {
    fn errno(&self) -> Option<i32> {
        self.err.raw_os_error()
    }

    fn malformed(what: &str) -> OsError {
        OsError::from(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("netlink: {what}"),
        ))
    }
}

impl From<io::Error> for OsError {
    fn from(err: io::Error) -> OsError {
        OsError {
            err,
            kernel_says: None,
        }
    }
}

impl fmt::Display for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kernel_says {
            Some(msg) => write!(f, "{} (kernel: {msg})", self.err),
            None => write!(f, "{}", self.err),
        }
    }
}

impl std::error::Error for OsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

/// `op` on link `ifname` failed: an Error naming both, with the OS error.
/// ENODEV/ENOENT become NotFound, EBUSY FailedPrecondition, the rest Internal.
fn fail(ifname: impl fmt::Display, op: &str, e: OsError) -> Error {
    let kind = match e.errno() {
        Some(libc::ENODEV) | Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EBUSY) => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, format!("link {ifname}: {op}: {e}")).with_source(e)
}

// ---------------------------------------------------------------------------
// Plumbing: rtnetlink

/// Constants of the kernel's uapi headers (linux/netlink.h, rtnetlink.h,
/// if_link.h, if_bridge.h, if.h), spelled out because libc has only some.
mod uapi {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const NLMSG_NOOP: u16 = 1;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_DUMP_INTR: u16 = 0x10;
    pub const NLM_F_DUMP: u16 = 0x300;
    /// In an NLMSG_ERROR: the echoed request is cut to its header.
    pub const NLM_F_CAPPED: u16 = 0x100;
    /// In an NLMSG_ERROR: extended-ack attributes follow.
    pub const NLM_F_ACK_TLVS: u16 = 0x200;
    pub const NLMSGERR_ATTR_MSG: u16 = 1;
    pub const NLA_TYPE_MASK: u16 = 0x3fff;

    pub const RTM_DELLINK: u16 = 17;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_SETLINK: u16 = 19;
    pub const IFINFOMSG_LEN: usize = 16;
    pub const AF_BRIDGE: u8 = 7;
    pub const IFF_UP: u32 = 1;
    pub const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

    pub const IFLA_IFNAME: u16 = 3;
    pub const IFLA_MASTER: u16 = 10;
    pub const IFLA_LINKINFO: u16 = 18;
    pub const IFLA_AF_SPEC: u16 = 26;
    pub const IFLA_EXT_MASK: u16 = 29;
    pub const IFLA_INFO_KIND: u16 = 1;
    pub const IFLA_INFO_DATA: u16 = 2;
    pub const IFLA_TUN_TYPE: u16 = 3;
    pub const IFLA_TUN_PERSIST: u16 = 6;
    pub const IFLA_TUN_MULTI_QUEUE: u16 = 7;
    pub const IFLA_BR_VLAN_FILTERING: u16 = 7;

    pub const IFLA_BRIDGE_VLAN_INFO: u16 = 2;
    pub const BRIDGE_VLAN_INFO_PVID: u16 = 1 << 1;
    pub const BRIDGE_VLAN_INFO_UNTAGGED: u16 = 1 << 2;
    pub const BRIDGE_VLAN_INFO_RANGE_BEGIN: u16 = 1 << 3;
    pub const BRIDGE_VLAN_INFO_RANGE_END: u16 = 1 << 4;
}

/// One `struct bridge_vlan_info`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct VlanEntry {
    flags: u16,
    vid: u16,
}

/// The body of a link request: a `struct ifinfomsg` and its attributes.
struct LinkMsg {
    buf: Vec<u8>,
}

impl LinkMsg {
    fn new(family: u8, index: u32) -> LinkMsg {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[family, 0, 0, 0]); // family, pad, ifi_type
        buf.extend_from_slice(&index.to_ne_bytes());
        buf.extend_from_slice(&[0; 8]); // ifi_flags, ifi_change
        LinkMsg { buf }
    }

    /// Sets IFF_UP (ifi_flags), changing only that bit (ifi_change).
    fn up(mut self) -> LinkMsg {
        self.buf[8..12].copy_from_slice(&uapi::IFF_UP.to_ne_bytes());
        self.buf[12..16].copy_from_slice(&uapi::IFF_UP.to_ne_bytes());
        self
    }

    fn master(mut self, master: u32) -> LinkMsg {
        self.attr(uapi::IFLA_MASTER, &master.to_ne_bytes());
        self
    }

    /// IFLA_AF_SPEC holding one IFLA_BRIDGE_VLAN_INFO per entry.
    fn vlans(mut self, entries: &[VlanEntry]) -> LinkMsg {
        let start = self.begin_nest(uapi::IFLA_AF_SPEC);
        for e in entries {
            let mut info = [0u8; 4];
            info[..2].copy_from_slice(&e.flags.to_ne_bytes());
            info[2..].copy_from_slice(&e.vid.to_ne_bytes());
            self.attr(uapi::IFLA_BRIDGE_VLAN_INFO, &info);
        }
        self.end_nest(start);
        self
    }

    fn attr(&mut self, ty: u16, val: &[u8]) {
        let len = u16::try_from(4 + val.len()).expect("netlink attribute under 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(val);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn begin_nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.attr(ty, &[]);
        start
    }

    fn end_nest(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("netlink attribute under 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

/// A NUL-terminated attribute value as text.
fn c_string(val: &[u8]) -> String {
    let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
    String::from_utf8_lossy(&val[..end]).into_owned()
}

/// The (type, value) netlink attributes in `buf`; stops at a malformed one.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(buf, 0));
        let ty = u16_at(buf, 2) & uapi::NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let val = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, val))
    })
}

/// A NETLINK_ROUTE socket of the calling thread's network namespace.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

/// Large enough for any link message (the kernel caps a dump's datagram at 32 KiB).
const RECV_BUF: usize = 64 * 1024;

impl Rtnl {
    fn open() -> std::result::Result<Rtnl, OsError> {
        // SAFETY: socket() takes only integer arguments and returns a new fd or -1.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        // Best effort: with extended acks the kernel explains its errors.
        // SAFETY: the fd is valid, and the option value points to a live c_int
        // whose size is passed with it.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_EXT_ACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(Rtnl { fd, seq: 0 })
    }

    /// A request answered by an ack only.
    fn ack(&mut self, ty: u16, body: &LinkMsg) -> std::result::Result<(), OsError> {
        self.transact(ty, uapi::NLM_F_ACK, body).map(drop)
    }

    /// A request answered by messages, then an ack.
    fn get(&mut self, ty: u16, body: &LinkMsg) -> std::result::Result<Vec<Vec<u8>>, OsError> {
        self.transact(ty, uapi::NLM_F_ACK, body)
    }

    /// A dump, retried when the kernel says the set changed while it was sent.
    fn dump(&mut self, ty: u16, body: &LinkMsg) -> std::result::Result<Vec<Vec<u8>>, OsError> {
        let mut tries = 0;
        loop {
            match self.transact(ty, uapi::NLM_F_DUMP, body) {
                Err(e) if e.errno() == Some(libc::EAGAIN) && tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    /// Sends one request and collects the payloads of its reply messages
    /// until the ack (NLMSG_ERROR) or the end of a dump (NLMSG_DONE).
    fn transact(
        &mut self,
        ty: u16,
        flags: u16,
        body: &LinkMsg,
    ) -> std::result::Result<Vec<Vec<u8>>, OsError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = u32::try_from(uapi::NLMSG_HDRLEN + body.buf.len()).expect("small request");
        let mut req = Vec::with_capacity(len as usize);
        req.extend_from_slice(&len.to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&(uapi::NLM_F_REQUEST | flags).to_ne_bytes());
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills ours
        req.extend_from_slice(&body.buf);
        self.send(&req)?;

        let mut replies = Vec::new();
        let mut interrupted = false;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.recv(&mut buf)?;
            let mut rest = &buf[..n];
            while rest.len() >= uapi::NLMSG_HDRLEN {
                let msg_len = u32_at(rest, 0) as usize;
                if msg_len < uapi::NLMSG_HDRLEN || msg_len > rest.len() {
                    return Err(OsError::malformed("bad message length"));
                }
                let (msg_ty, msg_flags, msg_seq) =
                    (u16_at(rest, 4), u16_at(rest, 6), u32_at(rest, 8));
                let payload = &rest[uapi::NLMSG_HDRLEN..msg_len];
                rest = &rest[align4(msg_len).min(rest.len())..];
                if msg_seq != seq {
                    continue; // a stale reply to an earlier request
                }
                match msg_ty {
                    uapi::NLMSG_NOOP => {}
                    uapi::NLMSG_ERROR => return ack_result(msg_flags, payload).map(|()| replies),
                    uapi::NLMSG_DONE => {
                        if payload.len() >= 4 && (u32_at(payload, 0) as i32) < 0 {
                            let errno = -(u32_at(payload, 0) as i32);
                            return Err(io::Error::from_raw_os_error(errno).into());
                        }
                        if interrupted {
                            return Err(io::Error::from_raw_os_error(libc::EAGAIN).into());
                        }
                        return Ok(replies);
                    }
                    _ => {
                        interrupted |= msg_flags & uapi::NLM_F_DUMP_INTR != 0;
                        replies.push(payload.to_vec());
                    }
                }
            }
        }
    }

    fn send(&self, req: &[u8]) -> std::result::Result<(), OsError> {
        loop {
            // SAFETY: the fd is a valid socket and `req` is a live buffer of
            // the given length. Unaddressed, a netlink send goes to the kernel.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err.into());
            }
        }
    }

    fn recv(&self, buf: &mut [u8]) -> std::result::Result<usize, OsError> {
        loop {
            // SAFETY: the fd is a valid socket and `buf` is a live, writable
            // buffer of the given length. MSG_TRUNC makes the kernel return the
            // datagram's real length, so truncation is detected below.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n > buf.len() {
                    return Err(OsError::malformed("reply larger than the receive buffer"));
                }
                return Ok(n);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err.into());
            }
        }
    }
}

/// The outcome carried by an NLMSG_ERROR: Ok for an ack (error 0), else the
/// errno with the kernel's extended-ack message if there is one.
fn ack_result(flags: u16, payload: &[u8]) -> std::result::Result<(), OsError> {
    if payload.len() < 4 + uapi::NLMSG_HDRLEN {
        return Err(OsError::malformed("short NLMSG_ERROR"));
    }
    let code = u32_at(payload, 0) as i32;
    if code == 0 {
        return Ok(());
    }
    let mut err = OsError::from(io::Error::from_raw_os_error(-code));
    if flags & uapi::NLM_F_ACK_TLVS != 0 {
        // After the error code comes the echoed request: its header only if
        // capped, else all of it.
        let echoed = if flags & uapi::NLM_F_CAPPED != 0 {
            uapi::NLMSG_HDRLEN
        } else {
            align4(u32_at(payload, 4) as usize)
        };
        if let Some(tlvs) = payload.get(4 + echoed..) {
            err.kernel_says = attrs(tlvs)
                .find(|&(ty, _)| ty == uapi::NLMSGERR_ATTR_MSG)
                .map(|(_, val)| c_string(val));
        }
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

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
