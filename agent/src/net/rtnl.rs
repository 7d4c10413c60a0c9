//! Links by rtnetlink: what a link is, the OS errors of syscalls and netlink
//! requests, and a hand-written rtnetlink client (no `ip` commands).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use stratus_core::error::{Error, ErrorKind, Result};

use super::TapName;

// ---------------------------------------------------------------------------
// Plumbing: what a link is

/// What this module needs to know about a link, from an RTM_NEWLINK message.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Link {
    pub(super) index: u32,
    pub(super) name: String,
    /// ifi_flags (IFF_UP, ...).
    pub(super) flags: u32,
    /// Index of the master (the bridge, for a bridge port).
    pub(super) master: Option<u32>,
    /// IFLA_INFO_KIND: "tun" (tun and tap), "bridge", "veth", ...
    pub(super) kind: Option<String>,
    pub(super) tun: Option<TunInfo>,
    /// For a bridge: IFLA_BR_VLAN_FILTERING.
    pub(super) vlan_filtering: Option<bool>,
    /// For a bridge: IFLA_BR_VLAN_DEFAULT_PVID, the VLAN a new port joins
    /// untagged when the bridge filters VLANs (0: none).
    pub(super) default_pvid: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct TunInfo {
    pub(super) tap: bool,
    pub(super) persist: bool,
    pub(super) multi_queue: bool,
}

impl Link {
    pub(super) fn is_tap(&self) -> bool {
        self.tun.is_some_and(|t| t.tap)
    }

    pub(super) fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    /// "a bridge", "a veth", "a tun device", for messages.
    pub(super) fn describe(&self) -> String {
        match (&self.kind, &self.tun) {
            (_, Some(t)) if t.tap => "a tap".into(),
            (Some(k), _) if k == "tun" => "a tun device".into(),
            (Some(k), _) => format!("a {k}"),
            (None, _) => "a device without a link kind (physical or loopback)".into(),
        }
    }
}

/// The link named `name`, or None if there is none.
pub(super) fn lookup(nl: &mut Rtnl, name: &str) -> std::result::Result<Option<Link>, OsError> {
    let mut msg = LinkMsg::new(libc::AF_UNSPEC as u8, 0);
    let mut c_name = name.as_bytes().to_vec();
    c_name.push(0);
    msg.attr(uapi::IFLA_IFNAME, &c_name);
    get_link(nl, msg)
}

/// The link with index `index`, or None if there is none.
pub(super) fn lookup_index(
    nl: &mut Rtnl,
    index: u32,
) -> std::result::Result<Option<Link>, OsError> {
    get_link(nl, LinkMsg::new(libc::AF_UNSPEC as u8, index))
}

pub(super) fn get_link(
    nl: &mut Rtnl,
    mut msg: LinkMsg,
) -> std::result::Result<Option<Link>, OsError> {
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

pub(super) fn all_links() -> std::result::Result<Vec<Link>, OsError> {
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
pub(super) fn require_tap(nl: &mut Rtnl, tap: &TapName) -> Result<Link> {
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
pub(super) fn lookup_tap_for_create(nl: &mut Rtnl, name: &TapName) -> Result<Option<Link>> {
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

pub(super) fn parse_link(payload: &[u8]) -> std::result::Result<Link, OsError> {
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
            for (ty, val) in attrs(info_data) {
                match ty {
                    uapi::IFLA_BR_VLAN_FILTERING => {
                        link.vlan_filtering = Some(val.first().is_some_and(|&b| b != 0))
                    }
                    uapi::IFLA_BR_VLAN_DEFAULT_PVID if val.len() >= 2 => {
                        link.default_pvid = Some(u16::from_ne_bytes([val[0], val[1]]))
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Ok(link)
}

/// The VLAN entries that delete every VLAN but `keep`: up to two ranges.
pub(super) fn vlans_except(keep: u16) -> Vec<VlanEntry> {
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
pub(super) struct OsError {
    pub(super) err: io::Error,
    pub(super) kernel_says: Option<String>,
}

impl OsError {
    pub(super) fn errno(&self) -> Option<i32> {
        self.err.raw_os_error()
    }

    pub(super) fn malformed(what: &str) -> OsError {
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
pub(super) fn fail(ifname: impl fmt::Display, op: &str, e: OsError) -> Error {
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
pub(super) mod uapi {
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
    pub const IFLA_BR_VLAN_DEFAULT_PVID: u16 = 39;

    pub const IFLA_BRIDGE_VLAN_INFO: u16 = 2;
    pub const BRIDGE_VLAN_INFO_PVID: u16 = 1 << 1;
    pub const BRIDGE_VLAN_INFO_UNTAGGED: u16 = 1 << 2;
    pub const BRIDGE_VLAN_INFO_RANGE_BEGIN: u16 = 1 << 3;
    pub const BRIDGE_VLAN_INFO_RANGE_END: u16 = 1 << 4;
}

/// One `struct bridge_vlan_info`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct VlanEntry {
    pub(super) flags: u16,
    pub(super) vid: u16,
}

/// The body of a link request: a `struct ifinfomsg` and its attributes.
pub(super) struct LinkMsg {
    pub(super) buf: Vec<u8>,
}

impl LinkMsg {
    pub(super) fn new(family: u8, index: u32) -> LinkMsg {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[family, 0, 0, 0]); // family, pad, ifi_type
        buf.extend_from_slice(&index.to_ne_bytes());
        buf.extend_from_slice(&[0; 8]); // ifi_flags, ifi_change
        LinkMsg { buf }
    }

    /// Sets IFF_UP (ifi_flags), changing only that bit (ifi_change).
    pub(super) fn up(mut self) -> LinkMsg {
        self.buf[8..12].copy_from_slice(&uapi::IFF_UP.to_ne_bytes());
        self.buf[12..16].copy_from_slice(&uapi::IFF_UP.to_ne_bytes());
        self
    }

    pub(super) fn master(mut self, master: u32) -> LinkMsg {
        self.attr(uapi::IFLA_MASTER, &master.to_ne_bytes());
        self
    }

    /// IFLA_AF_SPEC holding one IFLA_BRIDGE_VLAN_INFO per entry.
    pub(super) fn vlans(mut self, entries: &[VlanEntry]) -> LinkMsg {
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

    pub(super) fn attr(&mut self, ty: u16, val: &[u8]) {
        let len = u16::try_from(4 + val.len()).expect("netlink attribute under 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(val);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub(super) fn begin_nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.attr(ty, &[]);
        start
    }

    pub(super) fn end_nest(&mut self, start: usize) {
        let len = u16::try_from(self.buf.len() - start).expect("netlink attribute under 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

pub(super) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub(super) fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}

pub(super) fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

/// A NUL-terminated attribute value as text.
pub(super) fn c_string(val: &[u8]) -> String {
    let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
    String::from_utf8_lossy(&val[..end]).into_owned()
}

/// The (type, value) netlink attributes in `buf`; stops at a malformed one.
pub(super) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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
pub(super) struct Rtnl {
    pub(super) fd: OwnedFd,
    pub(super) seq: u32,
}

/// Large enough for any link message (the kernel caps a dump's datagram at 32 KiB).
pub(super) const RECV_BUF: usize = 64 * 1024;

impl Rtnl {
    pub(super) fn open() -> std::result::Result<Rtnl, OsError> {
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
    pub(super) fn ack(&mut self, ty: u16, body: &LinkMsg) -> std::result::Result<(), OsError> {
        self.transact(ty, uapi::NLM_F_ACK, body).map(drop)
    }

    /// A request answered by messages, then an ack.
    pub(super) fn get(
        &mut self,
        ty: u16,
        body: &LinkMsg,
    ) -> std::result::Result<Vec<Vec<u8>>, OsError> {
        self.transact(ty, uapi::NLM_F_ACK, body)
    }

    /// A dump, retried when the kernel says the set changed while it was sent.
    pub(super) fn dump(
        &mut self,
        ty: u16,
        body: &LinkMsg,
    ) -> std::result::Result<Vec<Vec<u8>>, OsError> {
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
    pub(super) fn transact(
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

    pub(super) fn send(&self, req: &[u8]) -> std::result::Result<(), OsError> {
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

    pub(super) fn recv(&self, buf: &mut [u8]) -> std::result::Result<usize, OsError> {
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
pub(super) fn ack_result(flags: u16, payload: &[u8]) -> std::result::Result<(), OsError> {
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
