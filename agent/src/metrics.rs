//! agentd's metrics (`--metrics-listen`): what its guests use, read at each
//! scrape from the host (`/proc/<pid>/stat` and `status` of each QEMU, the
//! taps' kernel counters in `/sys/class/net`, QMP `query-blockstats`), the
//! image cache's figures, and the launch histogram counted as guests
//! start. The RPC histograms are stratus-pki's, shared with pdiskd.
//!
//! Per-guest series carry only the guest's `uuid` and `name` (plus the disk
//! or tap they count): cardinality grows with guests, never with requests.
//!
//! | metric | kind | what |
//! |---|---|---|
//! | `stratus_agent_guests{state}` | gauge | guests in each state (every state listed, 0 included) |
//! | `stratus_agent_guest_vcpus`, `_memory_bytes` | gauge | the guest's spec |
//! | `stratus_agent_guest_cpu_seconds_total` | counter | CPU time of its QEMU (user + system) |
//! | `stratus_agent_guest_resident_memory_bytes` | gauge | its QEMU's resident set |
//! | `stratus_agent_guest_block_{read,write}_bytes_total`, `_{read,write}_requests_total`, `_{read,write}_time_seconds_total` `{device}` | counter | QEMU's per-disk I/O |
//! | `stratus_agent_tap_{receive,transmit}_{bytes,packets,drops}_total{tap}` | counter | the tap's kernel counters, from the host's side (receive = sent by the guest) |
//! | `stratus_agent_image_cache_bytes`, `_images` | gauge | the local image cache |
//! | `stratus_agent_image_cache_{hits,misses,evictions}_total` | counter | lookups served at once, lookups that waited for a download, images removed |
//! | `stratus_agent_launch_duration_seconds{outcome}` | histogram | StartVm: request to QEMU running (or the start undone) |
//! | `stratus_agent_journal_last_seq` | gauge | the event journal's last seq |
//!
//! Counters here are QEMU's and the kernel's: they restart from 0 with a
//! new QEMU (a new tap), which Prometheus' `rate()` treats as a reset.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use stratus_pki::metrics::{write_family, Kind, Labels, Refresh};

use crate::images::CacheStats;
use crate::spec::VmState;
use crate::Agent;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Launch timings, counted by the guest service as starts finish.
#[derive(Clone, Debug)]
pub struct Launches {
    durations: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
}

impl Default for Launches {
    fn default() -> Self {
        Launches {
            durations: Family::new_with_constructor(stratus_pki::metrics::slow_histogram),
        }
    }
}

impl Launches {
    /// One start that began at `started`: `ok` when QEMU runs.
    pub(crate) fn observe(&self, ok: bool, started: Instant) {
        let outcome = if ok { "ok" } else { "error" };
        self.durations
            .get_or_create(&OutcomeLabel { outcome })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// One guest's figures at a scrape.
#[derive(Debug, Clone, Default)]
pub(crate) struct GuestSample {
    pub uuid: String,
    pub name: String,
    pub vcpus: u32,
    pub memory: u64,
    /// Its QEMU's, when one runs.
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub disks: Vec<crate::qmp::BlockStats>,
    pub taps: Vec<(String, TapCounters)>,
}

/// A tap's kernel counters (`/sys/class/net/TAP/statistics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl TapCounters {
    /// Reads `/sys/class/net/<tap>/statistics`; None when the tap is gone.
    pub fn read(tap: &str) -> Option<TapCounters> {
        // A tap name is ours (checked when recorded) and has no '/'.
        if tap.contains('/') || tap.is_empty() {
            return None;
        }
        let dir = std::path::Path::new("/sys/class/net")
            .join(tap)
            .join("statistics");
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(TapCounters {
            rx_bytes: read("rx_bytes")?,
            tx_bytes: read("tx_bytes")?,
            rx_packets: read("rx_packets")?,
            tx_packets: read("tx_packets")?,
            rx_dropped: read("rx_dropped")?,
            tx_dropped: read("tx_dropped")?,
        })
    }
}

/// CPU seconds (user + system) of process `pid`, from `/proc/<pid>/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks_per_second())
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, index 11 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident memory of process `pid` (`VmRSS` of `/proc/<pid>/status`).
fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// One family's samples: labels and value.
type Samples = Vec<(Labels, f64)>;

/// Everything read at one scrape.
#[derive(Debug, Default, Clone)]
struct Sample {
    states: Vec<(VmState, u64)>,
    guests: Vec<GuestSample>,
    cache: CacheStats,
    last_seq: u64,
}

#[derive(Debug, Default)]
struct AgentCollector {
    sample: Mutex<Option<Sample>>,
}

const STATES: [VmState; 10] = [
    VmState::Defined,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Stopped,
    VmState::Crashed,
    VmState::Error,
    VmState::Destroying,
    VmState::Destroyed,
];

fn state_name(s: VmState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self.sample.lock().unwrap().clone() else {
            return Ok(());
        };
        let states: Vec<(Labels, f64)> = s
            .states
            .iter()
            .map(|(st, n)| (vec![("state", state_name(*st))], *n as f64))
            .collect();
        write_family(
            &mut enc,
            "stratus_agent_guests",
            "guests by state",
            Kind::Gauge,
            &states,
        )?;
        let guest = |g: &GuestSample| -> Labels {
            vec![("uuid", g.uuid.clone()), ("name", g.name.clone())]
        };
        let per_guest = |f: &dyn Fn(&GuestSample) -> Option<f64>| -> Vec<(Labels, f64)> {
            s.guests
                .iter()
                .filter_map(|g| f(g).map(|v| (guest(g), v)))
                .collect()
        };
        let families: [(&str, &str, Kind, Samples); 4] = [
            (
                "stratus_agent_guest_vcpus",
                "vCPUs of the guest's spec",
                Kind::Gauge,
                per_guest(&|g| Some(g.vcpus as f64)),
            ),
            (
                "stratus_agent_guest_memory_bytes",
                "memory of the guest's spec",
                Kind::Gauge,
                per_guest(&|g| Some(g.memory as f64)),
            ),
            (
                "stratus_agent_guest_cpu_seconds",
                "CPU time of the guest's QEMU (user + system)",
                Kind::Counter,
                per_guest(&|g| g.cpu_seconds),
            ),
            (
                "stratus_agent_guest_resident_memory_bytes",
                "resident memory of the guest's QEMU",
                Kind::Gauge,
                per_guest(&|g| g.resident_bytes.map(|b| b as f64)),
            ),
        ];
        for (name, help, kind, samples) in &families {
            write_family(&mut enc, name, help, *kind, samples)?;
        }
        let per_disk = |f: &dyn Fn(&crate::qmp::BlockCounters) -> f64| -> Vec<(Labels, f64)> {
            s.guests
                .iter()
                .flat_map(|g| {
                    g.disks.iter().map(move |d| {
                        let mut l = guest(g);
                        l.push(("device", d.disk()));
                        (l, f(&d.stats))
                    })
                })
                .collect()
        };
        let ns = 1e-9;
        let disks: [(&str, &str, Samples); 6] = [
            (
                "stratus_agent_guest_block_read_bytes",
                "bytes the guest read from the disk",
                per_disk(&|c| c.rd_bytes as f64),
            ),
            (
                "stratus_agent_guest_block_write_bytes",
                "bytes the guest wrote to the disk",
                per_disk(&|c| c.wr_bytes as f64),
            ),
            (
                "stratus_agent_guest_block_read_requests",
                "read requests",
                per_disk(&|c| c.rd_operations as f64),
            ),
            (
                "stratus_agent_guest_block_write_requests",
                "write requests",
                per_disk(&|c| c.wr_operations as f64),
            ),
            (
                "stratus_agent_guest_block_read_time_seconds",
                "time spent on reads",
                per_disk(&|c| c.rd_total_time_ns as f64 * ns),
            ),
            (
                "stratus_agent_guest_block_write_time_seconds",
                "time spent on writes",
                per_disk(&|c| c.wr_total_time_ns as f64 * ns),
            ),
        ];
        for (name, help, samples) in &disks {
            write_family(&mut enc, name, help, Kind::Counter, samples)?;
        }
        let per_tap = |f: &dyn Fn(&TapCounters) -> u64| -> Vec<(Labels, f64)> {
            s.guests
                .iter()
                .flat_map(|g| {
                    g.taps.iter().map(move |(tap, c)| {
                        let mut l = guest(g);
                        l.push(("tap", tap.clone()));
                        (l, f(c) as f64)
                    })
                })
                .collect()
        };
        let taps: [(&str, &str, Samples); 6] = [
            (
                "stratus_agent_tap_receive_bytes",
                "bytes the host received on the tap (sent by the guest)",
                per_tap(&|c| c.rx_bytes),
            ),
            (
                "stratus_agent_tap_transmit_bytes",
                "bytes the host sent on the tap (received by the guest)",
                per_tap(&|c| c.tx_bytes),
            ),
            (
                "stratus_agent_tap_receive_packets",
                "packets received on the tap",
                per_tap(&|c| c.rx_packets),
            ),
            (
                "stratus_agent_tap_transmit_packets",
                "packets sent on the tap",
                per_tap(&|c| c.tx_packets),
            ),
            (
                "stratus_agent_tap_receive_drops",
                "packets dropped on receive",
                per_tap(&|c| c.rx_dropped),
            ),
            (
                "stratus_agent_tap_transmit_drops",
                "packets dropped on transmit",
                per_tap(&|c| c.tx_dropped),
            ),
        ];
        for (name, help, samples) in &taps {
            write_family(&mut enc, name, help, Kind::Counter, samples)?;
        }
        let one = |v: u64| vec![(Vec::new(), v as f64)];
        let cache: [(&str, &str, Kind, u64); 6] = [
            (
                "stratus_agent_image_cache_bytes",
                "bytes of images in the local cache",
                Kind::Gauge,
                s.cache.bytes,
            ),
            (
                "stratus_agent_image_cache_images",
                "images in the local cache",
                Kind::Gauge,
                s.cache.images,
            ),
            (
                "stratus_agent_image_cache_hits",
                "image lookups served from the cache at once",
                Kind::Counter,
                s.cache.hits,
            ),
            (
                "stratus_agent_image_cache_misses",
                "image lookups that waited for a download",
                Kind::Counter,
                s.cache.misses,
            ),
            (
                "stratus_agent_image_cache_evictions",
                "images removed from the cache (quota or EvictImage)",
                Kind::Counter,
                s.cache.evictions,
            ),
            (
                "stratus_agent_journal_last_seq",
                "the event journal's last seq",
                Kind::Gauge,
                s.last_seq,
            ),
        ];
        for (name, help, kind, v) in cache {
            write_family(&mut enc, name, help, kind, &one(v))?;
        }
        Ok(())
    }
}

/// agentd's registry: its launches and, refreshed by the returned
/// [`Refresh`] before each scrape, its guests, cache and journal. The RPC
/// histograms are registered by the caller in the same registry.
pub fn register(registry: &mut Registry, agent: Arc<Agent>) -> Refresh {
    registry.register_with_unit(
        "stratus_agent_launch_duration",
        "StartVm: from the request to QEMU running (or the start undone)",
        Unit::Seconds,
        agent.launches().durations.clone(),
    );
    let collector = Arc::new(AgentCollector::default());
    registry.register_collector(Box::new(collector.clone()));
    Arc::new(move || {
        let agent = agent.clone();
        let collector = collector.clone();
        Box::pin(async move {
            match read(&agent).await {
                Ok(s) => *collector.sample.lock().unwrap() = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: reading the guests failed");
                    *collector.sample.lock().unwrap() = None;
                }
            }
        })
    })
}

/// How long a scrape waits for one QEMU's blockstats.
const QMP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

async fn read(agent: &Agent) -> stratus_core::error::Result<Sample> {
    let vms = agent.store().vms()?;
    let states = STATES
        .iter()
        .map(|st| (*st, vms.iter().filter(|v| v.state == *st).count() as u64))
        .collect();
    let mut guests = Vec::new();
    for vm in &vms {
        let mut g = GuestSample {
            uuid: vm.uuid.to_string(),
            name: vm.spec.name.to_string(),
            vcpus: vm.spec.vcpus,
            memory: vm.spec.memory.0,
            ..Default::default()
        };
        if let Some(rt) = vm.runtime.as_ref().filter(|_| vm.state.is_active()) {
            if rt.pid != 0 {
                g.cpu_seconds = process_cpu_seconds(rt.pid);
                g.resident_bytes = resident_bytes(rt.pid);
            }
            g.taps = rt
                .nics
                .iter()
                .filter_map(|n| TapCounters::read(&n.tap).map(|c| (n.tap.clone(), c)))
                .collect();
            if let Some(qmp) = agent.qmp_of(vm.uuid) {
                if let Ok(Ok(stats)) = tokio::time::timeout(QMP_WAIT, qmp.query_blockstats()).await
                {
                    g.disks = stats;
                }
            }
        }
        guests.push(g);
    }
    Ok(Sample {
        states,
        guests,
        cache: agent.image_cache().stats(),
        last_seq: agent.store().last_seq()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_resident_memory() {
        let me = std::process::id();
        assert!(process_cpu_seconds(me).is_some());
        assert!(resident_bytes(me).unwrap() > 0);
        assert_eq!(process_cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn a_tap_name_is_never_a_path() {
        assert_eq!(TapCounters::read("../../etc"), None);
        assert_eq!(TapCounters::read(""), None);
        // Loopback exists in every namespace.
        assert!(TapCounters::read("lo").is_some());
    }
}
