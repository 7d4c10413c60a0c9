//! The iSCSI session parameters a target offers at login, and its command
//! queue depth: what an operator may tune per target (`--iscsi-params`),
//! the same keys for tgt and LIO.
//!
//! What must stay true: only the keys below, each with a value in its
//! RFC 3720 range (or tgt's and LIO's for the queue depth), so a bad setting
//! is refused when pdiskd starts, never by the target at an export. The
//! values are what the target *offers*: the session gets the minimum of
//! both sides' numbers (and `InitialR2T=No` only when both say No).
//! stratus-bench's `datapath` scenario measured what QEMU's libiscsi 1.19
//! offers: `MaxBurstLength` and `FirstBurstLength` 262144,
//! `MaxOutstandingR2T` 1; larger offers are negotiated down to those.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// One tunable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IscsiKey {
    MaxRecvDataSegmentLength,
    MaxXmitDataSegmentLength,
    FirstBurstLength,
    MaxBurstLength,
    InitialR2T,
    ImmediateData,
    MaxOutstandingR2T,
    /// Commands a session may have outstanding: tgt's `MaxQueueCmd`, LIO's
    /// TPG `attrib/default_cmdsn_depth`.
    QueueDepth,
}

const KEYS: [IscsiKey; 8] = [
    IscsiKey::MaxRecvDataSegmentLength,
    IscsiKey::MaxXmitDataSegmentLength,
    IscsiKey::FirstBurstLength,
    IscsiKey::MaxBurstLength,
    IscsiKey::InitialR2T,
    IscsiKey::ImmediateData,
    IscsiKey::MaxOutstandingR2T,
    IscsiKey::QueueDepth,
];

impl IscsiKey {
    /// The key's name in `--iscsi-params`, tgtadm and LIO's `param/`.
    pub fn name(self) -> &'static str {
        match self {
            IscsiKey::MaxRecvDataSegmentLength => "MaxRecvDataSegmentLength",
            IscsiKey::MaxXmitDataSegmentLength => "MaxXmitDataSegmentLength",
            IscsiKey::FirstBurstLength => "FirstBurstLength",
            IscsiKey::MaxBurstLength => "MaxBurstLength",
            IscsiKey::InitialR2T => "InitialR2T",
            IscsiKey::ImmediateData => "ImmediateData",
            IscsiKey::MaxOutstandingR2T => "MaxOutstandingR2T",
            IscsiKey::QueueDepth => "QueueDepth",
        }
    }

    /// Allowed values: `None` for Yes/No, else the numeric range.
    fn range(self) -> Option<(u32, u32)> {
        match self {
            IscsiKey::InitialR2T | IscsiKey::ImmediateData => None,
            IscsiKey::MaxOutstandingR2T => Some((1, 65535)),
            // tgt's MaxQueueCmd and LIO's default_cmdsn_depth both stop at 512.
            IscsiKey::QueueDepth => Some((1, 512)),
            _ => Some((512, 16_777_215)),
        }
    }
}

/// A key's value, checked against its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IscsiValue {
    Bool(bool),
    Number(u32),
}

impl fmt::Display for IscsiValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IscsiValue::Bool(true) => f.write_str("Yes"),
            IscsiValue::Bool(false) => f.write_str("No"),
            IscsiValue::Number(n) => write!(f, "{n}"),
        }
    }
}

/// The parameters a target offers, in key order, each key at most once.
/// Empty: the target's own defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IscsiParams(Vec<(IscsiKey, IscsiValue)>);

impl IscsiParams {
    /// pdisk's default, measured by `stratus-bench --only datapath` (README,
    /// Performance): data PDUs of up to 256 KiB both ways, and a write's
    /// first 256 KiB sent with its command instead of after an R2T.
    pub fn measured_default() -> IscsiParams {
        "MaxRecvDataSegmentLength=262144,MaxXmitDataSegmentLength=262144,\
         FirstBurstLength=262144,MaxBurstLength=262144,InitialR2T=No,ImmediateData=Yes"
            .parse()
            .expect("the default parses")
    }

    pub fn iter(&self) -> impl Iterator<Item = (IscsiKey, IscsiValue)> + '_ {
        self.0.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for IscsiParams {
    type Err = Error;

    /// `KEY=VALUE,KEY=VALUE`; the empty string (or `none`) is no parameter.
    fn from_str(s: &str) -> Result<IscsiParams> {
        let mut out: Vec<(IscsiKey, IscsiValue)> = Vec::new();
        let s = s.trim();
        if s.is_empty() || s == "none" {
            return Ok(IscsiParams(out));
        }
        for item in s.split(',') {
            let (k, v) = item.trim().split_once('=').ok_or_else(|| {
                Error::invalid(format!("iscsi-params: {item:?} is not KEY=VALUE"))
            })?;
            let key = KEYS
                .iter()
                .copied()
                .find(|key| key.name() == k.trim())
                .ok_or_else(|| {
                    let names: Vec<&str> = KEYS.iter().map(|k| k.name()).collect();
                    Error::invalid(format!(
                        "iscsi-params: unknown key {k:?} (known: {})",
                        names.join(", ")
                    ))
                })?;
            let v = v.trim();
            let value = match key.range() {
                None => match v {
                    "Yes" => IscsiValue::Bool(true),
                    "No" => IscsiValue::Bool(false),
                    _ => {
                        return Err(Error::invalid(format!(
                            "iscsi-params: {} takes Yes or No, not {v:?}",
                            key.name()
                        )))
                    }
                },
                Some((lo, hi)) => match v.parse::<u32>() {
                    Ok(n) if (lo..=hi).contains(&n) => IscsiValue::Number(n),
                    _ => {
                        return Err(Error::invalid(format!(
                            "iscsi-params: {} takes a number from {lo} to {hi}, not {v:?}",
                            key.name()
                        )))
                    }
                },
            };
            if out.iter().any(|(k, _)| *k == key) {
                return Err(Error::invalid(format!(
                    "iscsi-params: {} given twice",
                    key.name()
                )));
            }
            out.push((key, value));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(IscsiParams(out))
    }
}

impl fmt::Display for IscsiParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}={v}", k.name())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_ranges_and_prints_back() {
        let p: IscsiParams = "InitialR2T=No, MaxBurstLength=262144,QueueDepth=64"
            .parse()
            .unwrap();
        assert_eq!(
            p.to_string(),
            "MaxBurstLength=262144,InitialR2T=No,QueueDepth=64"
        );
        assert_eq!(p.to_string().parse::<IscsiParams>().unwrap(), p);
        assert!("".parse::<IscsiParams>().unwrap().is_empty());
        assert!("none".parse::<IscsiParams>().unwrap().is_empty());
        let d = IscsiParams::measured_default();
        assert_eq!(d.to_string().parse::<IscsiParams>().unwrap(), d);
        assert_eq!(d.iter().count(), 6);

        for bad in [
            "InitialR2T=no",
            "MaxBurstLength=511",
            "MaxBurstLength=16777216",
            "MaxOutstandingR2T=0",
            "QueueDepth=513",
            "HeaderDigest=CRC32C",
            "InitialR2T",
            "InitialR2T=No,InitialR2T=Yes",
            "MaxBurstLength=1;reboot",
        ] {
            let e = bad.parse::<IscsiParams>().unwrap_err();
            assert!(e.to_string().contains("iscsi-params"), "{bad}: {e}");
        }
    }
}
