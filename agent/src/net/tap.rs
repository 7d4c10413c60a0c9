//! Tap names ([`TapName`], [`tap_name_for`]) and the tun ioctls that make a
//! persistent tap.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use stratus_core::error::{Error, Result};
use uuid::Uuid;

use super::rtnl::*;
use super::{IFNAME_MAX, MAX_NICS_PER_GUEST, TAP_PREFIX};

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
pub(super) fn check_ifname(name: &str) -> std::result::Result<(), &'static str> {
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
// Plumbing: tun ioctls

/// Opens `/dev/net/tun` attached to tap `name` (made if missing) with the
/// flags every tap of ours has: a tap, no packet info, virtio-net headers.
fn attach_tun(name: &TapName) -> std::result::Result<std::fs::File, OsError> {
    // std opens with O_CLOEXEC: a QEMU inherits it only when handed it.
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
    Ok(tun)
}

/// Opens a queue of the existing tap `name` for QEMU (`-netdev tap,fd=`),
/// so QEMU needs no right to `/dev/net/tun` or to the tap itself.
pub(super) fn open_tap_queue(name: &TapName) -> std::result::Result<OwnedFd, OsError> {
    Ok(attach_tun(name)?.into())
}

/// Creates tap `name`, owned by our euid, and makes it persistent; the fd
/// closes on return and the tap stays, down and without carrier until QEMU
/// attaches.
pub(super) fn make_persistent_tap(name: &TapName) -> std::result::Result<(), OsError> {
    let tun = attach_tun(name)?;
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
