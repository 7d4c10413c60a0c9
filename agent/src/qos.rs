//! Disk QoS (issue 15): a disk's I/O limits as its spec holds them,
//! checked with QEMU's own rules (`throttle_is_valid`), and what QEMU is
//! given for them.
//!
//! Every disk of a guest's spec reaches QEMU through a `throttle` block
//! node (named like the disk, `vda`, above its format node `vda-fmt`) in
//! a `throttle-group` object: the disk's own (`qos-vda`), or the group it
//! names shared with other disks of the guest (`qos-group-NAME`). A disk
//! without limits gets an unlimited group, so its limits can be set live
//! later (`qom-set` of the group's `limits`) without a restart.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use stratus_core::error::{Error, Result};
use stratus_proto::agent::v1 as pb;

/// QEMU's bound for every rate and burst (`THROTTLE_VALUE_MAX`).
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;
/// The longest burst: a day.
pub const MAX_BURST_SECONDS: u64 = 86_400;
/// `iops_size` bounds: a sector to 64 MiB.
pub const IOPS_SIZE_MIN: u64 = 512;
pub const IOPS_SIZE_MAX: u64 = 64 << 20;

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One of QEMU's leaky buckets: a rate, a burst rate, and how many
/// seconds the burst may last (0: QEMU's default, 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Bucket {
    #[serde(skip_serializing_if = "is_zero")]
    pub avg: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub max_length: u64,
}

impl Bucket {
    pub fn is_unset(&self) -> bool {
        *self == Bucket::default()
    }
}

/// A disk's (or a group's) limits: IOPS and bytes per second, total or
/// split into reads and writes; 0 = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    #[serde(skip_serializing_if = "Bucket::is_unset")]
    pub iops_total: Bucket,
    #[serde(skip_serializing_if = "Bucket::is_unset")]
    pub iops_read: Bucket,
    #[serde(skip_serializing_if = "Bucket::is_unset")]
    pub iops_write: Bucket,
    #[serde(skip_serializing_if = "Bucket::is_unset")]
    pub bps_total: Bucket,
    #[serde(skip_serializing_if = "Bucket::is_unset")]
    pub bps_read: Bucket,
    #[serde(skip_serializing_if = "Bucket::is_unset")]
    pub bps_write: Bucket,
    /// An I/O larger than this counts as several for the IOPS limits.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_size: u64,
}

impl Limits {
    /// The buckets by QEMU's names (`iops-total`, ...).
    pub fn buckets(&self) -> [(&'static str, &Bucket); 6] {
        [
            ("iops-total", &self.iops_total),
            ("iops-read", &self.iops_read),
            ("iops-write", &self.iops_write),
            ("bps-total", &self.bps_total),
            ("bps-read", &self.bps_read),
            ("bps-write", &self.bps_write),
        ]
    }

    pub fn buckets_mut(&mut self) -> [(&'static str, &mut Bucket); 6] {
        [
            ("iops-total", &mut self.iops_total),
            ("iops-read", &mut self.iops_read),
            ("iops-write", &mut self.iops_write),
            ("bps-total", &mut self.bps_total),
            ("bps-read", &mut self.bps_read),
            ("bps-write", &mut self.bps_write),
        ]
    }

    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }

    /// QEMU's rules, with a message naming the field as the API does
    /// (`iops_total_max`).
    pub fn validate(&self) -> Result<()> {
        let api = |q: &str| q.replace('-', "_");
        let bad = |m: String| Err(Error::invalid(format!("disk QoS: {m}")));
        for kind in ["iops", "bps"] {
            let b = |split: &str| {
                self.buckets()
                    .into_iter()
                    .find(|(n, _)| *n == format!("{kind}-{split}"))
                    .map(|(_, b)| *b)
                    .expect("bucket")
            };
            let (t, r, w) = (b("total"), b("read"), b("write"));
            if (t.avg > 0 && (r.avg > 0 || w.avg > 0)) || (t.max > 0 && (r.max > 0 || w.max > 0)) {
                return bad(format!(
                    "{kind}_total cannot be combined with {kind}_read/{kind}_write \
                     (a total limit or a read/write split, as QEMU requires)"
                ));
            }
        }
        for (name, b) in self.buckets() {
            let n = api(name);
            if b.avg > VALUE_MAX || b.max > VALUE_MAX {
                return bad(format!("{n} and {n}_max must be at most {VALUE_MAX}"));
            }
            if b.max > 0 && b.avg == 0 {
                return bad(format!("{n}_max needs {n} (a burst above a base limit)"));
            }
            if b.max > 0 && b.max < b.avg {
                return bad(format!(
                    "{n}_max ({}) must be at least {n} ({})",
                    b.max, b.avg
                ));
            }
            if b.max_length > 0 && b.max == 0 {
                return bad(format!("{n}_max_length needs {n}_max"));
            }
            if b.max_length > MAX_BURST_SECONDS {
                return bad(format!(
                    "{n}_max_length is {} s; at most {MAX_BURST_SECONDS} (a day)",
                    b.max_length
                ));
            }
            if b.max > 0 && b.max_length.max(1) > VALUE_MAX / b.max {
                return bad(format!("{n}_max_length is too long for {n}_max"));
            }
        }
        if self.iops_size > 0 {
            if !(IOPS_SIZE_MIN..=IOPS_SIZE_MAX).contains(&self.iops_size) {
                return bad(format!(
                    "iops_size must be {IOPS_SIZE_MIN} to {IOPS_SIZE_MAX} bytes, not {}",
                    self.iops_size
                ));
            }
            if self.iops_total.avg == 0 && self.iops_read.avg == 0 && self.iops_write.avg == 0 {
                return bad("iops_size needs an IOPS limit".into());
            }
        }
        Ok(())
    }

    /// QEMU's `ThrottleLimits` with every field, so that a `qom-set` of a
    /// group's `limits` also clears what is no longer limited.
    pub fn qemu(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, b) in self.buckets() {
            m.insert(name.into(), json!(b.avg));
            m.insert(format!("{name}-max"), json!(b.max));
            m.insert(format!("{name}-max-length"), json!(b.max_length.max(1)));
        }
        m.insert("iops-size".into(), json!(self.iops_size));
        Value::Object(m)
    }

    /// The limits QEMU reports (`qom-get` of a group's `limits`).
    pub fn from_qemu(v: &Value) -> Limits {
        let get = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let mut l = Limits {
            iops_size: get("iops-size"),
            ..Default::default()
        };
        for (name, b) in l.buckets_mut() {
            b.avg = get(name);
            b.max = get(&format!("{name}-max"));
            b.max_length = get(&format!("{name}-max-length"));
            if b.max_length == 1 {
                b.max_length = 0;
            }
        }
        l
    }

    /// `iops_total=200 bps_write=10485760 ...` for events and `vm show`;
    /// `unlimited` when nothing is limited.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (name, b) in self.buckets() {
            let n = name.replace('-', "_");
            if b.avg > 0 {
                out.push(format!("{n}={}", b.avg));
            }
            if b.max > 0 {
                out.push(format!("{n}_max={}", b.max));
            }
            if b.max_length > 0 {
                out.push(format!("{n}_max_length={}", b.max_length));
            }
        }
        if self.iops_size > 0 {
            out.push(format!("iops_size={}", self.iops_size));
        }
        if out.is_empty() {
            "unlimited".into()
        } else {
            out.join(" ")
        }
    }
}

/// A disk's QoS in its spec: its limits, and the group (of the guest) it
/// shares them with, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskQos {
    #[serde(skip_serializing_if = "Limits::is_unlimited")]
    pub limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl DiskQos {
    pub fn is_default(&self) -> bool {
        *self == DiskQos::default()
    }

    /// The id of the throttle-group object of disk `device` in QEMU.
    pub fn group_id(&self, device: &str) -> String {
        match &self.group {
            Some(g) => format!("qos-group-{g}"),
            None => format!("qos-{device}"),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(g) = &self.group {
            check_group(g)?;
        }
        self.limits.validate()
    }

    /// A request's QoS, typed (checked with the spec: [`DiskQos::validate`]).
    pub fn from_pb(q: pb::DiskQos) -> DiskQos {
        let b = |avg, max, max_length| Bucket {
            avg,
            max,
            max_length,
        };
        DiskQos {
            limits: Limits {
                iops_total: b(q.iops_total, q.iops_total_max, q.iops_total_max_length),
                iops_read: b(q.iops_read, q.iops_read_max, q.iops_read_max_length),
                iops_write: b(q.iops_write, q.iops_write_max, q.iops_write_max_length),
                bps_total: b(q.bps_total, q.bps_total_max, q.bps_total_max_length),
                bps_read: b(q.bps_read, q.bps_read_max, q.bps_read_max_length),
                bps_write: b(q.bps_write, q.bps_write_max, q.bps_write_max_length),
                iops_size: q.iops_size,
            },
            group: (!q.group.is_empty()).then_some(q.group),
        }
    }

    /// The API's form (agent.v1 `DiskQos`).
    pub fn to_pb(&self) -> pb::DiskQos {
        let l = &self.limits;
        pb::DiskQos {
            iops_total: l.iops_total.avg,
            iops_read: l.iops_read.avg,
            iops_write: l.iops_write.avg,
            bps_total: l.bps_total.avg,
            bps_read: l.bps_read.avg,
            bps_write: l.bps_write.avg,
            iops_total_max: l.iops_total.max,
            iops_read_max: l.iops_read.max,
            iops_write_max: l.iops_write.max,
            bps_total_max: l.bps_total.max,
            bps_read_max: l.bps_read.max,
            bps_write_max: l.bps_write.max,
            iops_total_max_length: l.iops_total.max_length,
            iops_read_max_length: l.iops_read.max_length,
            iops_write_max_length: l.iops_write.max_length,
            bps_total_max_length: l.bps_total.max_length,
            bps_read_max_length: l.bps_read.max_length,
            bps_write_max_length: l.bps_write.max_length,
            iops_size: l.iops_size,
            group: self.group.clone().unwrap_or_default(),
        }
    }

    /// `group=NAME iops_total=...` for events and `vm show`.
    pub fn describe(&self) -> String {
        match &self.group {
            Some(g) => format!("group={g} {}", self.limits.describe()),
            None => self.limits.describe(),
        }
    }
}

/// Group names: 1 to 32 of lowercase letters, digits and '-', starting
/// with a letter (they become part of a QEMU object id).
pub fn check_group(g: &str) -> Result<()> {
    let ok = (1..=32).contains(&g.len())
        && g.starts_with(|c: char| c.is_ascii_lowercase())
        && g.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if !ok {
        return Err(Error::invalid(format!(
            "disk QoS group {g:?}: 1 to 32 of lowercase letters, digits and '-', \
             starting with a letter"
        )));
    }
    Ok(())
}

/// Disks of one guest that share a group must agree on its limits (the
/// group has one set).
pub fn check_groups<'a>(vm: &str, disks: impl Iterator<Item = &'a DiskQos>) -> Result<()> {
    let mut seen: Vec<&DiskQos> = Vec::new();
    for q in disks {
        let Some(g) = &q.group else { continue };
        if let Some(other) = seen.iter().find(|o| o.group.as_ref() == Some(g)) {
            if other.limits != q.limits {
                return Err(Error::invalid(format!(
                    "vm {vm}: disks of QoS group {g} must have the same limits \
                     ({} and {})",
                    other.limits.describe(),
                    q.limits.describe()
                )));
            }
        } else {
            seen.push(q);
        }
    }
    Ok(())
}

/// What QEMU gets for one disk's QoS: its group's object id and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedQos {
    pub group_id: String,
    pub limits: Limits,
}

impl PlannedQos {
    pub fn of(q: &DiskQos, device: &str) -> PlannedQos {
        PlannedQos {
            group_id: q.group_id(device),
            limits: q.limits.clone(),
        }
    }

    /// The `throttle-group` object (`-object` JSON or `object-add`).
    pub fn group_object(&self) -> Value {
        json!({
            "qom-type": "throttle-group",
            "id": self.group_id,
            "limits": self.limits.qemu(),
        })
    }

    /// The `throttle` node `node` above `inner` (the format node).
    pub fn throttle_node(&self, node: &str, inner: Value) -> Value {
        json!({
            "driver": "throttle",
            "node-name": node,
            "throttle-group": self.group_id,
            "file": inner,
        })
    }
}

/// The format node's name under disk `device`'s throttle node.
pub fn format_node(device: &str) -> String {
    format!("{device}-fmt")
}

#[cfg(test)]
#[path = "qos_tests.rs"]
mod tests;
