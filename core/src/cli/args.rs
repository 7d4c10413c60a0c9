//! Command-line values both clients take: references to named objects and
//! labels. Each is checked as clap parses it, so bad input ends with exit
//! status 2 before any server is contacted.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::types::{parse_label, validate_labels, VolumeName};

/// An object as requests name it (a volume, a snapshot, a VM): its UUID,
/// normalised to lowercase hyphenated form, or its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref(String);

impl Ref {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Ref {
    type Err = String;
    fn from_str(s: &str) -> Result<Ref, String> {
        if let Ok(uuid) = uuid::Uuid::try_parse(s) {
            return Ok(Ref(uuid.hyphenated().to_string()));
        }
        match s.parse::<VolumeName>() {
            Ok(name) => Ok(Ref(name.into())),
            Err(_) => Err(format!(
                "{s:?} is neither a UUID nor a valid name \
                 (lowercase letters, digits, '.', '_', '-', at most 63)"
            )),
        }
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Ref> for String {
    fn from(r: Ref) -> String {
        r.0
    }
}

/// One `KEY=VALUE` label, checked on its own (a clap value parser); the set
/// is checked by [`label_map`].
pub fn label_arg(s: &str) -> Result<(String, String), Error> {
    let (k, v) = parse_label(s)?;
    validate_labels([(&k, &v)])?;
    Ok((k, v))
}

/// The labels of one command as a request map: every key once, at most 32.
pub fn label_map(pairs: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut seen = HashSet::new();
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !seen.insert(k)) {
        return Err(format!("label {k:?} is given more than once"));
    }
    let checked = validate_labels(pairs.iter().map(|(k, v)| (k, v))).map_err(|e| e.to_string())?;
    Ok(checked.into_iter().collect())
}

/// A quota limit on the command line: a number, or `unlimited` to remove
/// the limit. Both clients' `quota set` take these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    At(u64),
    Unlimited,
}

impl Limit {
    /// A count (`100`) or `unlimited`; clap's value parser.
    pub fn parse_count(s: &str) -> Result<Limit, String> {
        if s == "unlimited" {
            return Ok(Limit::Unlimited);
        }
        s.parse()
            .map(Limit::At)
            .map_err(|_| format!("{s:?} is neither a count nor `unlimited`"))
    }

    /// A size (`2T`, `64G`) or `unlimited`; clap's value parser.
    pub fn parse_bytes(s: &str) -> Result<Limit, String> {
        if s == "unlimited" {
            return Ok(Limit::Unlimited);
        }
        s.parse::<crate::types::ByteSize>()
            .map(|b| Limit::At(b.0))
            .map_err(|e| format!("{e} (or `unlimited`)"))
    }
}

/// A time as Unix seconds: digits, or an RFC 3339 date and time.
pub fn unix_time(s: &str) -> Result<u64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|e| format!("{s}: {e}"));
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s}: not Unix seconds or an RFC 3339 time ({e})"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{s}: before 1970"))?
        .as_secs())
}

/// A SetQuota request's two parts from `quota set`'s flags: each number
/// given goes into its slot of the request's limits, and the names given
/// as `unlimited` are returned, for the request's `unlimited` list.
pub fn quota_request<const N: usize>(
    given: [(&str, Option<Limit>, &mut Option<u64>); N],
) -> Vec<String> {
    let mut unlimited = Vec::new();
    for (name, limit, slot) in given {
        match limit {
            Some(Limit::At(n)) => *slot = Some(n),
            Some(Limit::Unlimited) => unlimited.push(name.to_owned()),
            None => {}
        }
    }
    unlimited
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_accept_names_and_uuids() {
        assert_eq!("db1".parse::<Ref>().unwrap().as_str(), "db1");
        assert_eq!(
            "6F9619FF-8B86-D011-B42D-00C04FC964FF"
                .parse::<Ref>()
                .unwrap()
                .as_str(),
            "6f9619ff-8b86-d011-b42d-00c04fc964ff"
        );
        assert!("".parse::<Ref>().is_err());
        assert!("a/b".parse::<Ref>().is_err());
    }

    #[test]
    fn label_sets_refuse_duplicates_and_too_many() {
        let pair = |k: &str| (k.to_owned(), "v".to_owned());
        assert_eq!(label_map(&[pair("a"), pair("b")]).unwrap().len(), 2);
        assert!(label_map(&[pair("a"), pair("a")])
            .unwrap_err()
            .contains("more than once"));
        let many: Vec<_> = (0..33).map(|i| pair(&format!("k{i}"))).collect();
        assert!(label_map(&many).is_err());
    }

    #[test]
    fn a_label_needs_a_valid_key_and_an_equals_sign() {
        assert_eq!(
            label_arg("tier=gold").unwrap(),
            ("tier".to_owned(), "gold".to_owned())
        );
        assert!(label_arg("novalue").is_err());
        assert!(label_arg("bad key=v").is_err());
    }

    #[test]
    fn quota_limits_parse_and_split_into_a_request() {
        assert_eq!(Limit::parse_count("100"), Ok(Limit::At(100)));
        assert_eq!(Limit::parse_count("unlimited"), Ok(Limit::Unlimited));
        assert!(Limit::parse_count("2T").is_err());
        assert_eq!(Limit::parse_bytes("2K"), Ok(Limit::At(2048)));
        assert!(Limit::parse_bytes("lots").is_err());
        let (mut a, mut b, mut c) = (None, None, Some(7));
        let unlimited = quota_request([
            ("a", Some(Limit::At(3)), &mut a),
            ("b", Some(Limit::Unlimited), &mut b),
            ("c", None, &mut c),
        ]);
        assert_eq!((a, b, c), (Some(3), None, Some(7)));
        assert_eq!(unlimited, vec!["b".to_owned()]);
    }
}
