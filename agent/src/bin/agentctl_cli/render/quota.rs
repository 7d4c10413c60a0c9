//! Per-project quotas on a host: limits and usage, `used of limit` for
//! people, numbers (null for no limit) in JSON.

use serde_json::{json, Value};
use stratus_core::cli::{fields, Table};
use stratus_proto::agent::v1::Quota;

use super::size;

pub fn quota_json(q: &Quota) -> Value {
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    json!({
        "project": q.project,
        "limits": { "vms": l.vms, "vcpus": l.vcpus, "memory_bytes": l.memory_bytes },
        "usage": { "vms": u.vms, "vcpus": u.vcpus, "memory_bytes": u.memory_bytes },
    })
}

pub fn quotas_json(qs: &[Quota]) -> Value {
    json!({ "quotas": qs.iter().map(quota_json).collect::<Vec<_>>() })
}

fn of_limit(used: String, limit: Option<String>) -> String {
    format!("{used} of {}", limit.unwrap_or_else(|| "unlimited".into()))
}

fn cells(q: &Quota) -> [String; 3] {
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    [
        of_limit(u.vms.to_string(), l.vms.map(|n| n.to_string())),
        of_limit(u.vcpus.to_string(), l.vcpus.map(|n| n.to_string())),
        of_limit(size(u.memory_bytes), l.memory_bytes.map(size)),
    ]
}

pub fn quota_view(q: &Quota) -> String {
    let [vms, vcpus, memory] = cells(q);
    fields(&[
        ("project", q.project.clone()),
        ("vms", vms),
        ("vcpus", vcpus),
        ("memory", memory),
    ])
}

pub fn quotas_table(qs: &[Quota]) -> String {
    let mut t = Table::new(["PROJECT", "VMS", "VCPUS", "MEMORY"]);
    for q in qs {
        let [vms, vcpus, memory] = cells(q);
        t.row([q.project.clone(), vms, vcpus, memory]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_proto::agent::v1::{QuotaLimits, QuotaUsage};

    #[test]
    fn usage_of_limit_and_null_for_no_limit() {
        let q = Quota {
            project: "astro".into(),
            limits: Some(QuotaLimits {
                vms: Some(10),
                vcpus: None,
                memory_bytes: Some(64 << 30),
            }),
            usage: Some(QuotaUsage {
                vms: 2,
                vcpus: 3,
                memory_bytes: 4 << 30,
            }),
        };
        let j = quota_json(&q);
        assert_eq!(j["limits"]["vms"], 10);
        assert!(j["limits"]["vcpus"].is_null());
        let v = quota_view(&q);
        assert!(v.contains("2 of 10") && v.contains("3 of unlimited"), "{v}");
        assert!(quotas_table(&[q])
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("astro"));
    }
}
