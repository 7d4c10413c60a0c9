//! Disk QoS options, one set for every command that gives a disk its
//! limits: `vm disk qos`, `vm disk attach` and `vm create` (with
//! `--qos-disk` to pick its disks). They are checked here with the agent's
//! own rules (QEMU's, [`agent::qos::Limits::validate`]), so a bad value is
//! refused with exit status 2 before anything is asked of the agent.

use agent::qos::DiskQos;
use clap::Args;
use stratus_core::types::ByteSize;

use super::vm::disk_size;

/// Help heading of the QoS options.
pub(super) const QOS: &str = "Disk QoS (QEMU's throttling; nothing given: unlimited)";

/// A disk's I/O limits: IOPS, bytes per second (`--bps-*` take sizes: 10M
/// is 10 MiB/s), bursts (`*-max`) above their base lasting up to
/// `*-max-length` seconds. QEMU's rules: a total limit or a read/write
/// split of the same kind, not both; a burst needs its base and is at
/// least it; a burst length needs its burst.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = QOS)]
pub struct QosArgs {
    /// Read and write operations per second, together.
    #[arg(long, value_name = "N")]
    pub iops_total: Option<u64>,
    /// Read operations per second.
    #[arg(long, value_name = "N")]
    pub iops_read: Option<u64>,
    /// Write operations per second.
    #[arg(long, value_name = "N")]
    pub iops_write: Option<u64>,
    /// Bytes per second read and written, together (e.g. 10M).
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub bps_total: Option<ByteSize>,
    /// Bytes read per second.
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub bps_read: Option<ByteSize>,
    /// Bytes written per second.
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub bps_write: Option<ByteSize>,
    /// Burst of --iops-total: the rate allowed for --iops-total-max-length s.
    #[arg(long, value_name = "N")]
    pub iops_total_max: Option<u64>,
    /// Burst of --iops-read: the rate allowed for --iops-read-max-length s.
    #[arg(long, value_name = "N")]
    pub iops_read_max: Option<u64>,
    /// Burst of --iops-write: the rate allowed for --iops-write-max-length s.
    #[arg(long, value_name = "N")]
    pub iops_write_max: Option<u64>,
    /// Burst of --bps-total: the rate allowed for --bps-total-max-length s.
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub bps_total_max: Option<ByteSize>,
    /// Burst of --bps-read: the rate allowed for --bps-read-max-length s.
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub bps_read_max: Option<ByteSize>,
    /// Burst of --bps-write: the rate allowed for --bps-write-max-length s.
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub bps_write_max: Option<ByteSize>,
    /// Seconds a --iops-total-max burst may last (default 1).
    #[arg(long, value_name = "SECS")]
    pub iops_total_max_length: Option<u64>,
    /// Seconds a --iops-read-max burst may last (default 1).
    #[arg(long, value_name = "SECS")]
    pub iops_read_max_length: Option<u64>,
    /// Seconds a --iops-write-max burst may last (default 1).
    #[arg(long, value_name = "SECS")]
    pub iops_write_max_length: Option<u64>,
    /// Seconds a --bps-total-max burst may last (default 1).
    #[arg(long, value_name = "SECS")]
    pub bps_total_max_length: Option<u64>,
    /// Seconds a --bps-read-max burst may last (default 1).
    #[arg(long, value_name = "SECS")]
    pub bps_read_max_length: Option<u64>,
    /// Seconds a --bps-write-max burst may last (default 1).
    #[arg(long, value_name = "SECS")]
    pub bps_write_max_length: Option<u64>,
    /// Larger I/Os count as several for the IOPS limits (e.g. 4K).
    #[arg(long, value_name = "SIZE", value_parser = disk_size)]
    pub iops_size: Option<ByteSize>,
    /// A QoS group of the VM: its disks naming it share one set of limits
    /// (their I/O together). A running guest's disk keeps the group it has.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
}

impl QosArgs {
    /// The limits given, checked as the agent (and QEMU) will.
    pub fn qos(&self) -> Result<DiskQos, String> {
        let n = |v: Option<u64>| v.unwrap_or(0);
        let b = |v: Option<ByteSize>| v.map_or(0, |b| b.0);
        let q = DiskQos::from_pb(stratus_proto::agent::v1::DiskQos {
            iops_total: n(self.iops_total),
            iops_read: n(self.iops_read),
            iops_write: n(self.iops_write),
            bps_total: b(self.bps_total),
            bps_read: b(self.bps_read),
            bps_write: b(self.bps_write),
            iops_total_max: n(self.iops_total_max),
            iops_read_max: n(self.iops_read_max),
            iops_write_max: n(self.iops_write_max),
            bps_total_max: b(self.bps_total_max),
            bps_read_max: b(self.bps_read_max),
            bps_write_max: b(self.bps_write_max),
            iops_total_max_length: n(self.iops_total_max_length),
            iops_read_max_length: n(self.iops_read_max_length),
            iops_write_max_length: n(self.iops_write_max_length),
            bps_total_max_length: n(self.bps_total_max_length),
            bps_read_max_length: n(self.bps_read_max_length),
            bps_write_max_length: n(self.bps_write_max_length),
            iops_size: b(self.iops_size),
            group: self.group.clone().unwrap_or_default(),
        });
        q.validate().map_err(|e| e.message().to_owned())?;
        Ok(q)
    }

    /// The limits for a new disk's spec: none when nothing is given.
    pub fn spec(&self) -> Result<Option<stratus_proto::agent::v1::DiskQos>, String> {
        let q = self.qos()?;
        Ok((!q.is_default()).then(|| q.to_pb()))
    }
}
