//! [`Mac`]: a guest NIC's Ethernet address, parsed once at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use stratus_core::error::{Error, Result};
use uuid::Uuid;

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

    /// The IPv6 link-local address a NIC of this MAC takes by default:
    /// `fe80::` and the modified EUI-64 (RFC 4291 appendix A: `ff:fe` in
    /// the middle, the universal/local bit flipped).
    pub fn link_local(&self) -> std::net::Ipv6Addr {
        let m = self.0;
        let mut a = [0u8; 16];
        a[0] = 0xfe;
        a[1] = 0x80;
        a[8..].copy_from_slice(&[m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]);
        std::net::Ipv6Addr::from(a)
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
