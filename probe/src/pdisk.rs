//! The pdiskd check: the health service, then the pool as `GetPool`
//! reports it (an admin call: the local socket as root or the `stratus`
//! group, or an admin certificate).

use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;

use crate::verdict::{Perf, Status, Verdict};

/// Pool fill thresholds, percent.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub warning: f64,
    pub critical: f64,
}

pub async fn check(ch: Channel, limits: Thresholds, health_secs: f64) -> Verdict {
    match VolumeServiceClient::new(ch)
        .get_pool(pb::GetPoolRequest {})
        .await
    {
        Ok(r) => judge(&r.into_inner(), limits, health_secs),
        Err(s) => crate::refused("GetPool", &s),
    }
}

/// How full a pool is, percent: its storage's used share, and for a thin
/// pool the fuller of that, its data and its metadata (either running out
/// stops every write).
pub fn fill_percent(pool: &pb::Pool) -> f64 {
    let used = if pool.capacity_bytes > 0 {
        100.0 * pool.used_bytes as f64 / pool.capacity_bytes as f64
    } else {
        0.0
    };
    [pool.data_percent, pool.metadata_percent]
        .into_iter()
        .flatten()
        .fold(used, f64::max)
}

/// The verdict on a pool: CRITICAL when the exporter is not up or the pool
/// is at least `critical` percent full, WARNING at `warning` percent or
/// with drift at the last reconciliation.
pub fn judge(pool: &pb::Pool, limits: Thresholds, health_secs: f64) -> Verdict {
    let mut v = Verdict::new();
    if pool.exporter_status != "up" {
        v.add(
            Status::Critical,
            format!("exporter {}: {}", pool.exporter, pool.exporter_status),
        );
    }
    let fill = fill_percent(pool);
    let fill_status = if fill >= limits.critical {
        Status::Critical
    } else if fill >= limits.warning {
        Status::Warning
    } else {
        Status::Ok
    };
    let thin = match (pool.data_percent, pool.metadata_percent) {
        (Some(d), Some(m)) => format!(", thin data {d:.1}% metadata {m:.1}%"),
        _ => String::new(),
    };
    v.add(
        fill_status,
        format!(
            "pool {fill:.1}% full ({} of {} used{thin})",
            bytes(pool.used_bytes),
            bytes(pool.capacity_bytes)
        ),
    );
    match pool.drift.first() {
        Some(first) => v.add(
            Status::Warning,
            format!(
                "{} drift at the last reconciliation (first: {} {}: {})",
                pool.drift.len(),
                first.kind,
                first.object,
                first.detail
            ),
        ),
        None => v.add(Status::Ok, "no drift"),
    }
    v.add(
        Status::Ok,
        format!(
            "{} volumes, {} snapshots, {} exports",
            pool.volume_count, pool.snapshot_count, pool.export_count
        ),
    );
    v.perf = vec![
        Perf::gauge("fill", fill, "%")
            .warn_at(limits.warning)
            .crit_at(limits.critical)
            .max(100.0),
        Perf::gauge("used", pool.used_bytes as f64, "B").max(pool.capacity_bytes as f64),
        Perf::gauge("provisioned", pool.provisioned_bytes as f64, "B"),
        Perf::gauge("volumes", pool.volume_count as f64, ""),
        Perf::gauge("snapshots", pool.snapshot_count as f64, ""),
        Perf::gauge("exports", pool.export_count as f64, ""),
        Perf::gauge("drift", pool.drift.len() as f64, "").warn_at(1.0),
        Perf::gauge("time", health_secs, "s"),
    ];
    v
}

/// Bytes in binary units, one decimal.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Thresholds = Thresholds {
        warning: 80.0,
        critical: 90.0,
    };

    fn pool(used: u64, capacity: u64) -> pb::Pool {
        pb::Pool {
            exporter: "tgt".into(),
            exporter_status: "up".into(),
            capacity_bytes: capacity,
            used_bytes: used,
            ..Default::default()
        }
    }

    #[test]
    fn fill_decides_between_ok_warning_and_critical() {
        assert_eq!(judge(&pool(10, 100), LIMITS, 0.0).status(), Status::Ok);
        assert_eq!(judge(&pool(80, 100), LIMITS, 0.0).status(), Status::Warning);
        assert_eq!(
            judge(&pool(95, 100), LIMITS, 0.0).status(),
            Status::Critical
        );
        assert_eq!(judge(&pool(0, 0), LIMITS, 0.0).status(), Status::Ok);
    }

    #[test]
    fn a_thin_pool_is_as_full_as_its_fuller_part() {
        let mut p = pool(10, 100);
        p.data_percent = Some(40.0);
        p.metadata_percent = Some(85.0);
        assert_eq!(fill_percent(&p), 85.0);
        let v = judge(&p, LIMITS, 0.0);
        assert_eq!(v.status(), Status::Warning);
        assert!(
            v.line("PDISK").contains("metadata 85.0%"),
            "{}",
            v.line("PDISK")
        );
    }

    #[test]
    fn drift_warns_and_a_down_exporter_is_critical() {
        let mut p = pool(10, 100);
        p.drift.push(pb::Drift {
            kind: "file".into(),
            object: "volumes/x.raw".into(),
            detail: "unknown file".into(),
        });
        assert_eq!(judge(&p, LIMITS, 0.0).status(), Status::Warning);
        p.exporter_status = "down: tgtd not answering".into();
        let v = judge(&p, LIMITS, 0.0);
        assert_eq!(v.status(), Status::Critical);
        assert!(v
            .line("PDISK")
            .starts_with("STRATUS PDISK CRITICAL - exporter tgt: down"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4 << 30), "4.0 GiB");
    }
}
