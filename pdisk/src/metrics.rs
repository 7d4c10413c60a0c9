//! pdiskd's metrics (`--metrics-listen`): the pool as `GetPool` reports it,
//! read at each scrape, and the service's operation timings, counted as
//! they happen. The RPC histograms are stratus-pki's, shared with agentd.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `stratus_pdisk_pool_capacity_bytes`, `_used_bytes`, `_provisioned_bytes`, `_allocated_bytes` | gauge | the pool's storage, sizes promised, bytes our objects hold |
//! | `stratus_pdisk_thin_data_percent`, `_metadata_percent`, `_threshold_percent` | gauge | thin pools (lvm) only |
//! | `stratus_pdisk_volumes`, `_snapshots`, `_exports` | gauge | objects in the store |
//! | `stratus_pdisk_quarantined_volumes`, `_quarantined_bytes` | gauge | deleted volumes kept until their purge time, their sizes |
//! | `stratus_pdisk_drift` | gauge | drift found at the last reconciliation (left in place) |
//! | `stratus_pdisk_exporter_up` | gauge | 1 when tgtd/LIO answers |
//! | `stratus_pdisk_exports_broken` | gauge | live targets that do not match their export |
//! | `stratus_pdisk_operation_duration_seconds{operation, outcome}` | histogram | create, clone, import, snapshot, export, resize, delete |
//! | `stratus_pdisk_import_bytes_total` | counter | image bytes imported (`rate()` is the import speed) |
//! | `stratus_pdisk_last_import_bytes_per_second` | gauge | the last import's speed |

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use stratus_pki::metrics::{write_family, Kind, Refresh};

use crate::service::PoolService;

/// An operation the service times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Create,
    Clone,
    Import,
    Snapshot,
    Export,
    Resize,
    Delete,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Clone => "clone",
            Op::Import => "import",
            Op::Snapshot => "snapshot",
            Op::Export => "export",
            Op::Resize => "resize",
            Op::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: &'static str,
    outcome: &'static str,
}

/// The service's operation timings and import volume. Cheap to clone (the
/// metrics are shared).
#[derive(Clone, Debug)]
pub struct Operations {
    durations: Family<OpLabels, Histogram, fn() -> Histogram>,
    import_bytes: Counter,
    last_import_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Operations {
    fn default() -> Self {
        Operations {
            durations: Family::new_with_constructor(stratus_pki::metrics::slow_histogram),
            import_bytes: Counter::default(),
            last_import_rate: Gauge::default(),
        }
    }
}

impl Operations {
    /// Records one operation that started at `started`.
    pub(crate) fn observe<T, E>(&self, op: Op, result: &Result<T, E>, started: Instant) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.durations
            .get_or_create(&OpLabels {
                operation: op.as_str(),
                outcome,
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Records a finished import of `bytes` (the image's allocated bytes).
    pub(crate) fn imported(&self, bytes: u64, started: Instant) {
        self.import_bytes.inc_by(bytes);
        let secs = started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.last_import_rate.set(bytes as f64 / secs);
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "stratus_pdisk_operation_duration",
            "pool operations by kind and outcome",
            Unit::Seconds,
            self.durations.clone(),
        );
        registry.register_with_unit(
            "stratus_pdisk_import",
            "image bytes imported into volumes (rate() is the import speed)",
            Unit::Bytes,
            self.import_bytes.clone(),
        );
        registry.register(
            "stratus_pdisk_last_import_bytes_per_second",
            "the last import's speed",
            self.last_import_rate.clone(),
        );
    }
}

/// The pool's figures as the last refresh read them.
#[derive(Debug, Default, Clone)]
struct PoolSample {
    capacity: u64,
    used: u64,
    provisioned: u64,
    allocated: u64,
    volumes: u64,
    snapshots: u64,
    exports: u64,
    quarantined: u64,
    quarantined_bytes: u64,
    drift: u64,
    exporter_up: bool,
    broken_exports: u64,
    /// data, metadata and threshold percent (thin pools).
    thin: Option<(f64, f64, f64)>,
}

#[derive(Debug, Default)]
struct PoolCollector {
    sample: Mutex<Option<PoolSample>>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self.sample.lock().unwrap().clone() else {
            return Ok(());
        };
        let one = |v: f64| vec![(Vec::new(), v)];
        let gauges: [(&str, &str, f64); 12] = [
            (
                "stratus_pdisk_pool_capacity_bytes",
                "capacity of the pool's storage",
                s.capacity as f64,
            ),
            (
                "stratus_pdisk_pool_used_bytes",
                "bytes in use on the pool's storage",
                s.used as f64,
            ),
            (
                "stratus_pdisk_pool_provisioned_bytes",
                "sum of the sizes of all volumes and snapshots",
                s.provisioned as f64,
            ),
            (
                "stratus_pdisk_pool_allocated_bytes",
                "bytes allocated by pdisk's volumes and snapshots",
                s.allocated as f64,
            ),
            ("stratus_pdisk_volumes", "volumes", s.volumes as f64),
            ("stratus_pdisk_snapshots", "snapshots", s.snapshots as f64),
            (
                "stratus_pdisk_quarantined_volumes",
                "deleted volumes kept until their purge time",
                s.quarantined as f64,
            ),
            (
                "stratus_pdisk_quarantined_bytes",
                "sizes of the volumes in quarantine",
                s.quarantined_bytes as f64,
            ),
            (
                "stratus_pdisk_exports",
                "exported volumes",
                s.exports as f64,
            ),
            (
                "stratus_pdisk_drift",
                "differences between store and live state found at the last reconciliation",
                s.drift as f64,
            ),
            (
                "stratus_pdisk_exporter_up",
                "1 when the exporter (tgtd, LIO) answers",
                if s.exporter_up { 1.0 } else { 0.0 },
            ),
            (
                "stratus_pdisk_exports_broken",
                "live targets that do not match their export",
                s.broken_exports as f64,
            ),
        ];
        for (name, help, v) in gauges {
            write_family(&mut enc, name, help, Kind::Gauge, &one(v))?;
        }
        if let Some((data, meta, threshold)) = s.thin {
            write_family(
                &mut enc,
                "stratus_pdisk_thin_data_percent",
                "thin pool data space in use",
                Kind::Gauge,
                &one(data),
            )?;
            write_family(
                &mut enc,
                "stratus_pdisk_thin_metadata_percent",
                "thin pool metadata space in use",
                Kind::Gauge,
                &one(meta),
            )?;
            write_family(
                &mut enc,
                "stratus_pdisk_thin_threshold_percent",
                "fill past which growth is refused",
                Kind::Gauge,
                &one(threshold),
            )?;
        }
        Ok(())
    }
}

/// pdiskd's registry: the RPC histograms (`rpc`, registered by the caller
/// into the same registry), the service's operations and the pool,
/// refreshed by the returned [`Refresh`] before each scrape.
pub fn register(registry: &mut Registry, svc: Arc<PoolService>) -> Refresh {
    svc.operations().register(registry);
    let pool = Arc::new(PoolCollector::default());
    registry.register_collector(Box::new(pool.clone()));
    Arc::new(move || {
        let svc = svc.clone();
        let pool = pool.clone();
        Box::pin(async move {
            let sample = read_pool(&svc).await;
            *pool.sample.lock().unwrap() = sample;
        })
    })
}

async fn read_pool(svc: &PoolService) -> Option<PoolSample> {
    let info = match svc.pool().await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: reading the pool failed");
            return None;
        }
    };
    let broken = match svc.exporter().list().await {
        Ok(live) => live
            .iter()
            .filter(|l| !matches!(l.health, crate::export::ExportHealth::Whole))
            .count() as u64,
        Err(_) => 0,
    };
    Some(PoolSample {
        capacity: info.capacity,
        used: info.used,
        provisioned: info.provisioned,
        allocated: info.allocated,
        volumes: info.volumes,
        snapshots: info.snapshots,
        exports: info.exports,
        quarantined: info.quarantined,
        quarantined_bytes: info.quarantined_bytes,
        drift: info.drift.len() as u64,
        exporter_up: info.exporter_status == "up",
        broken_exports: broken,
        thin: info
            .thin
            .map(|t| (t.data_percent, t.metadata_percent, t.threshold_percent)),
    })
}
