//! Domain types parsed at the edge: once a request has been turned into these,
//! the rest of the code cannot hold an invalid name, size, IQN or label.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MIB: u64 = 1 << 20;

/// Label of a base volume made from an image: the image's SHA-256. The agent
/// sets it when it imports or saves an image; `pdisk image` lists by it.
pub const LABEL_IMAGE_SHA256: &str = "stratus.io/image-sha256";
/// Label of a guest's own clone of an image base: the guest's UUID.
pub const LABEL_VM: &str = "stratus.io/vm";
pub const GIB: u64 = 1 << 30;

/// A volume or snapshot name: `^[a-z0-9][a-z0-9._-]{0,62}$`.
///
/// The grammar keeps names safe as file names and LV names: no `/`, no
/// leading `.` or `-`, at most 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

impl VolumeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VolumeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let b = s.as_bytes();
        let ok_first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ok_rest = |c: u8| ok_first(c) || matches!(c, b'.' | b'_' | b'-');
        if b.is_empty() || b.len() > 63 || !ok_first(b[0]) || !b[1..].iter().all(|&c| ok_rest(c)) {
            return Err(Error::invalid(format!(
                "invalid name {s:?}: must match ^[a-z0-9][a-z0-9._-]{{0,62}}$"
            )));
        }
        Ok(VolumeName(s.to_owned()))
    }
}

impl TryFrom<String> for VolumeName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<VolumeName> for String {
    fn from(n: VolumeName) -> String {
        n.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes, parsed from `512M`, `10G`, `1T`, `4096` (bytes), `1.5G`.
/// Suffixes are binary (K = 1024). Volume sizes are rounded up to 1 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Rounds up to a whole MiB, refusing zero and overflow.
    pub fn volume_size(bytes: u64) -> Result<ByteSize> {
        if bytes == 0 {
            return Err(Error::invalid("size must be greater than 0"));
        }
        let rounded = bytes
            .checked_add(MIB - 1)
            .map(|b| b / MIB * MIB)
            .ok_or_else(|| Error::invalid(format!("size {bytes} is too large")))?;
        // Keep well inside i64/off_t and tgt's limits.
        if rounded > (1u64 << 60) {
            return Err(Error::invalid(format!("size {bytes} is too large")));
        }
        Ok(ByteSize(rounded))
    }
}

impl FromStr for ByteSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        let bad = || Error::invalid(format!("invalid size {s:?}: use e.g. 512M, 10G, 1T"));
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            "G" | "GB" | "GIB" => 1 << 30,
            "T" | "TB" | "TIB" => 1 << 40,
            "P" | "PB" | "PIB" => 1 << 50,
            _ => return Err(bad()),
        };
        if num.is_empty() {
            return Err(bad());
        }
        if let Some((int, frac)) = num.split_once('.') {
            let int: u64 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| bad())?
            };
            if frac.is_empty() || frac.len() > 6 || frac.contains('.') {
                return Err(bad());
            }
            let frac_v: u64 = frac.parse().map_err(|_| bad())?;
            let scale = 10u64.pow(frac.len() as u32);
            let whole = int.checked_mul(mult).ok_or_else(bad)?;
            let part = (frac_v as u128 * mult as u128 / scale as u128) as u64;
            Ok(ByteSize(whole.checked_add(part).ok_or_else(bad)?))
        } else {
            let n: u64 = num.parse().map_err(|_| bad())?;
            Ok(ByteSize(n.checked_mul(mult).ok_or_else(bad)?))
        }
    }
}

impl fmt::Display for ByteSize {
    /// Human form with binary units: `10.0G`, `512M`, `4.0K`, `17B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        const UNITS: [(u64, &str); 5] = [
            (1 << 50, "P"),
            (1 << 40, "T"),
            (1 << 30, "G"),
            (1 << 20, "M"),
            (1 << 10, "K"),
        ];
        for (scale, unit) in UNITS {
            if b >= scale {
                return if b.is_multiple_of(scale) {
                    write!(f, "{}{unit}", b / scale)
                } else {
                    write!(f, "{:.1}{unit}", b as f64 / scale as f64)
                };
            }
        }
        write!(f, "{b}B")
    }
}

/// An iSCSI qualified name in RFC 3720 form: `iqn.YYYY-MM.reversed.domain[:suffix]`
/// or `eui.` followed by 16 hex digits. Stored lowercase, as iSCSI names compare.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Iqn(String);

impl Iqn {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The NVMe qualified name of this iSCSI name, for NVMe/TCP (pdisk's
    /// `nvmet` exporter, agentd's `nvme connect`): `iqn.REST` becomes
    /// `nqn.REST`, so a subsystem's NQN follows from its target's IQN and a
    /// host's NQN from its initiator IQN (the one its certificate binds).
    /// `eui.` names have no such form: refused.
    pub fn to_nqn(&self) -> Result<String> {
        match self.0.strip_prefix("iqn.") {
            Some(rest) => Ok(format!("nqn.{rest}")),
            None => Err(Error::invalid(format!(
                "{} has no NVMe qualified name: only iqn. names map to nqn. names",
                self.0
            ))),
        }
    }

    /// The iSCSI name an NQN made by [`Iqn::to_nqn`] stands for.
    pub fn from_nqn(nqn: &str) -> Result<Iqn> {
        match nqn.strip_prefix("nqn.") {
            Some(rest) => format!("iqn.{rest}").parse(),
            None => Err(Error::invalid(format!(
                "{nqn:?} is not an NVMe qualified name (nqn.)"
            ))),
        }
    }
}

impl FromStr for Iqn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid(format!("invalid initiator name {s:?}: {why}"));
        let lower = s.to_ascii_lowercase();
        if lower.len() > 223 {
            return Err(bad("longer than 223 bytes"));
        }
        if let Some(hex) = lower.strip_prefix("eui.") {
            if hex.len() == 16 && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Ok(Iqn(lower));
            }
            return Err(bad("eui. names carry exactly 16 hex digits"));
        }
        let rest = lower
            .strip_prefix("iqn.")
            .ok_or_else(|| bad("must start with iqn. or eui."))?;
        let b = rest.as_bytes();
        let date_ok = b.len() >= 8
            && b[..4].iter().all(u8::is_ascii_digit)
            && b[4] == b'-'
            && b[5..7].iter().all(u8::is_ascii_digit)
            && matches!(
                &rest[5..7],
                "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
            )
            && b[7] == b'.';
        if !date_ok {
            return Err(bad("expected iqn.YYYY-MM.naming-authority"));
        }
        let authority_and_suffix = &rest[8..];
        let (authority, _suffix) = authority_and_suffix
            .split_once(':')
            .unwrap_or((authority_and_suffix, ""));
        if authority.is_empty()
            || authority.starts_with('.')
            || authority.ends_with('.')
            || !authority
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            return Err(bad("the naming authority must be a reversed domain name"));
        }
        // RFC 3722 stringprep leaves ASCII letters, digits, '-', '.', ':'.
        if !lower
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b':'))
        {
            return Err(bad("only letters, digits, '-', '.' and ':' are allowed"));
        }
        Ok(Iqn(lower))
    }
}

impl TryFrom<String> for Iqn {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Iqn> for String {
    fn from(n: Iqn) -> String {
        n.0
    }
}

impl fmt::Display for Iqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CHAP credentials: the initiator's account, which the target checks, and
/// optionally (mutual CHAP) the target's own account, which the initiator
/// checks. Secrets never appear in Debug output, logs or command lines.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chap {
    pub user: String,
    secret: String,
    /// The target's account for mutual CHAP (never itself mutual). Absent in
    /// records older than mutual CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mutual: Option<Box<Chap>>,
}

impl Chap {
    /// Validates user (1..=64 of `[A-Za-z0-9._@:-]`) and secret (12..=64
    /// bytes of printable ASCII without spaces, `,` or `=`: what tgt, LIO,
    /// open-iscsi and libiscsi all accept; the 16-byte cap some Windows
    /// initiators keep would leave a generated secret under 128 bits).
    pub fn new(user: &str, secret: &str) -> Result<Chap> {
        let user_ok = !user.is_empty()
            && user.len() <= 64
            && user.bytes().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'@' | b':' | b'-')
            });
        if !user_ok {
            return Err(Error::invalid(format!(
                "invalid CHAP user {user:?}: 1 to 64 of letters, digits, . _ @ : -"
            )));
        }
        let secret_ok = (12..=64).contains(&secret.len())
            && secret
                .bytes()
                .all(|c| c.is_ascii_graphic() && c != b',' && c != b'=');
        if !secret_ok {
            return Err(Error::invalid(
                "invalid CHAP secret: 12 to 64 printable ASCII characters, no spaces, ',' or '='",
            ));
        }
        Ok(Chap {
            user: user.to_owned(),
            secret: secret.to_owned(),
            mutual: None,
        })
    }

    /// Adds the target's account (mutual CHAP). Its secret must differ from
    /// the initiator's: RFC 3720 section 8.2.1 forbids one secret in both
    /// directions (it would let an attacker reflect challenges), and LIO and
    /// open-iscsi refuse it.
    pub fn with_mutual(mut self, target: Chap) -> Result<Chap> {
        if target.mutual.is_some() {
            return Err(Error::invalid(
                "the target's CHAP account cannot itself be mutual",
            ));
        }
        if target.secret == self.secret {
            return Err(Error::invalid(
                "mutual CHAP: the target's secret must differ from the initiator's",
            ));
        }
        if target.user == self.user {
            return Err(Error::invalid(format!(
                "mutual CHAP: the target's user must differ from the initiator's ({})",
                self.user
            )));
        }
        self.mutual = Some(Box::new(target));
        Ok(self)
    }

    /// The target's account, when CHAP is mutual.
    pub fn mutual(&self) -> Option<&Chap> {
        self.mutual.as_deref()
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A fresh secret of 128 random bits from the kernel (getrandom), as
    /// 32 hex digits.
    pub fn random_secret() -> Result<String> {
        let mut bytes = [0u8; 16];
        // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != bytes.len() as isize {
            return Err(Error::internal(format!(
                "getrandom: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl fmt::Debug for Chap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .field("mutual", &self.mutual)
            .finish()
    }
}

/// Labels: at most 32 pairs; keys like names (plus `/`), 1..=63 bytes; values
/// up to 255 printable characters.
pub type Labels = BTreeMap<String, String>;

pub fn validate_labels<I, K, V>(pairs: I) -> Result<Labels>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut out = Labels::new();
    for (k, v) in pairs {
        let (k, v) = (k.as_ref(), v.as_ref());
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(Error::invalid(format!(
                "invalid label key {k:?}: 1 to 63 of letters, digits, . _ - /"
            )));
        }
        if v.len() > 255 || v.chars().any(|c| c.is_control()) {
            return Err(Error::invalid(format!(
                "invalid label value for {k:?}: at most 255 printable characters"
            )));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    if out.len() > 32 {
        return Err(Error::invalid(format!(
            "too many labels ({}): at most 32",
            out.len()
        )));
    }
    Ok(out)
}

/// Parses `k=v` as given on a command line.
pub fn parse_label(s: &str) -> Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| Error::invalid(format!("invalid label {s:?}: expected key=value")))?;
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "db-01", "0x", "a.b_c-d", &"a".repeat(63)] {
            assert!(ok.parse::<VolumeName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "-a",
            ".a",
            "a/b",
            "../x",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(bad.parse::<VolumeName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(p("512M").unwrap(), 512 << 20);
        assert_eq!(p("10G").unwrap(), 10 << 30);
        assert_eq!(p("1T").unwrap(), 1 << 40);
        assert_eq!(p("1.5G").unwrap(), 3 << 29);
        assert_eq!(p("4096").unwrap(), 4096);
        assert_eq!(p("10GiB").unwrap(), 10 << 30);
        for bad in [
            "",
            "G",
            "-1G",
            "1X",
            "1..5G",
            "99999999999999999999G",
            "1.G",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert_eq!(ByteSize::volume_size(1).unwrap().0, MIB);
        assert_eq!(ByteSize::volume_size(MIB).unwrap().0, MIB);
        assert_eq!(ByteSize::volume_size(MIB + 1).unwrap().0, 2 * MIB);
        assert!(ByteSize::volume_size(0).is_err());
        assert!(ByteSize::volume_size(u64::MAX).is_err());
        assert_eq!(ByteSize(10 << 30).to_string(), "10G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1.5G");
    }

    #[test]
    fn nqns_map_both_ways() {
        let iqn: Iqn = "iqn.2026-11.io.stratus.pdisk:3b7c2f5e".parse().unwrap();
        let nqn = iqn.to_nqn().unwrap();
        assert_eq!(nqn, "nqn.2026-11.io.stratus.pdisk:3b7c2f5e");
        assert_eq!(Iqn::from_nqn(&nqn).unwrap(), iqn);
        let eui: Iqn = "eui.0123456789abcdef".parse().unwrap();
        assert!(eui.to_nqn().is_err());
        assert!(Iqn::from_nqn("iqn.2026-11.io.x:y").is_err());
        // An NQN that is not a valid IQN once mapped back is refused.
        assert!(Iqn::from_nqn("nqn.2014-08.org.nvmexpress:uuid:a b").is_err());
    }

    #[test]
    fn iqns() {
        for ok in [
            "iqn.2026-11.io.stratus:host1",
            "iqn.1993-08.org.debian:01:abcdef",
            "IQN.2026-11.IO.Stratus:X",
            "eui.02004567a425678d",
        ] {
            assert!(ok.parse::<Iqn>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "iqn.",
            "iqn.26-11.io.x",
            "iqn.2026-13.io.x",
            "iqn.2026-11.:x",
            "iqn.2026-11.io.x:a b",
            "iqn.2026-11.io.x:a,b",
            "eui.123",
            "host1",
        ] {
            assert!(bad.parse::<Iqn>().is_err(), "{bad}");
        }
        assert_eq!(
            "IQN.2026-11.IO.Stratus:X".parse::<Iqn>().unwrap().as_str(),
            "iqn.2026-11.io.stratus:x"
        );
    }

    #[test]
    fn chap_secret_is_redacted() {
        let c = Chap::new("alice", "s3cretpassw0rd").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(Chap::new("alice", "short").is_err());
        assert!(Chap::new("alice", &"x".repeat(65)).is_err());
        let a = Chap::random_secret().unwrap();
        let b = Chap::random_secret().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        Chap::new("alice", &a).unwrap();
        assert!(Chap::new("al ice", "s3cretpassw0rd").is_err());
        assert!(Chap::new("alice", "has,commas,here").is_err());
    }

    #[test]
    fn mutual_chap_needs_its_own_user_and_secret_and_stays_redacted() {
        let init = || Chap::new("alice", "initiatorsecret1").unwrap();
        let target = Chap::new("tgt-alice", "targetsecret0002").unwrap();
        let m = init().with_mutual(target.clone()).unwrap();
        assert_eq!(m.mutual().map(|t| t.user.as_str()), Some("tgt-alice"));
        assert_eq!(m.mutual().unwrap().secret(), "targetsecret0002");
        let dbg = format!("{m:?}");
        assert!(
            dbg.contains("tgt-alice") && !dbg.contains("targetsecret"),
            "{dbg}"
        );
        // A re-keyed target side is a different credential set.
        assert_ne!(m, init());
        let same_secret = Chap::new("bob", "initiatorsecret1").unwrap();
        assert!(init().with_mutual(same_secret).is_err());
        let same_user = Chap::new("alice", "targetsecret0002").unwrap();
        assert!(init().with_mutual(same_user).is_err());
        assert!(init().with_mutual(m.clone()).is_err());
        // Records written before mutual CHAP still read, as one-way.
        let old: Chap =
            serde_json::from_str(r#"{"user":"alice","secret":"initiatorsecret1"}"#).unwrap();
        assert_eq!(old, init());
        let round: Chap = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(round, m);
    }

    #[test]
    fn labels() {
        assert!(validate_labels([("tier", "gold")]).is_ok());
        assert!(validate_labels([("", "x")]).is_err());
        assert!(validate_labels([("a b", "x")]).is_err());
        assert!(validate_labels([("k", "x".repeat(256))]).is_err());
        let many: Vec<_> = (0..33)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(validate_labels(many).is_err());
    }
}

/// An object (a volume, a snapshot, a guest) as a request names it: its
/// UUID or its name. Parsed once at the edge: a string that parses as a
/// UUID is one (a name cannot be told from it anyway); anything else must
/// be a valid [`VolumeName`]. Written back as the lowercase hyphenated
/// UUID or the name, and serialized as that string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ObjectRef {
    Uuid(uuid::Uuid),
    Name(VolumeName),
}

impl FromStr for ObjectRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(u) = uuid::Uuid::try_parse(s) {
            return Ok(ObjectRef::Uuid(u));
        }
        s.parse().map(ObjectRef::Name).map_err(|_| {
            Error::invalid(format!(
                "{s:?} is neither a UUID nor a valid name \
                 (lowercase letters, digits, '.', '_', '-', at most 63)"
            ))
        })
    }
}

impl TryFrom<String> for ObjectRef {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<ObjectRef> for String {
    fn from(r: ObjectRef) -> String {
        r.to_string()
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Uuid(u) => write!(f, "{}", u.hyphenated()),
            ObjectRef::Name(n) => f.write_str(n.as_str()),
        }
    }
}

#[cfg(test)]
mod object_ref_tests {
    use super::*;

    #[test]
    fn an_object_ref_is_a_uuid_or_a_name_and_round_trips_as_a_string() {
        let u = "1B4E28BA-2FA1-11D2-883F-0016D3CCA427"
            .parse::<ObjectRef>()
            .unwrap();
        assert!(matches!(u, ObjectRef::Uuid(_)));
        assert_eq!(u.to_string(), "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
        let n: ObjectRef = "data-1".parse().unwrap();
        assert_eq!(n, ObjectRef::Name("data-1".parse().unwrap()));
        for bad in ["", "Data", "a/b", "-x"] {
            let e = bad.parse::<ObjectRef>().unwrap_err();
            assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument, "{bad}");
        }
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, "\"data-1\"");
        assert_eq!(serde_json::from_str::<ObjectRef>(&json).unwrap(), n);
        assert!(serde_json::from_str::<ObjectRef>("\"a b\"").is_err());
    }
}
