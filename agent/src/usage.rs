//! Usage accounting: what each guest used on this host, kept durably in
//! agentd's store and given out as cloud usage records in the EGI/APEL
//! format (`APEL-cloud-message: v0.4`), as JSON or as CSV.
//!
//! A guest's [`Tally`] holds its totals (wall time, CPU time of its QEMU,
//! suspended time, bytes in and out of its taps) and the raw counters it
//! was last advanced from. Each [`Reading`] (every `--usage-interval`, at
//! every state change, and once more when a guest's QEMU is torn down,
//! before its cgroup and taps go) adds what the counters moved since, so
//! the totals only grow: a counter that restarts from 0 (a new QEMU, a new
//! cgroup, a new tap) is recognised by its identity (QEMU pid, cgroup
//! inode, tap ifindex) and counted from 0, and an agentd restart resumes
//! from the stored counters of the same QEMU. What must stay true:
//! - a total never decreases, and a counter's value is never added twice:
//!   where it is unclear whether a counter's value was already counted (the
//!   same QEMU read from another source), it is taken as the new baseline
//!   and nothing is added (at most one interval is lost, never doubled);
//! - wall time is counted only between two readings of the same QEMU; the
//!   time a QEMU ran while agentd was down is counted when agentd finds the
//!   same QEMU again (adopted), or up to the teardown reading if it ended.
//!
//! Every reading is also appended to a log (`usage_log`, a seq per record),
//! which is both the history `--until` reads and the outbox from which the
//! records are published to NATS (`stratus.usage.<host>`), like the event
//! journal. Record fields and units follow the EGI cloud accounting record
//! v0.4 (APEL's `cloud.py`, cASO): times are Unix seconds, durations
//! seconds, Memory MB, Disk and Network GB.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use stratus_core::error::{Error, Result};
use stratus_core::nats::{Outgoing, SCHEMA_VERSION};
use stratus_core::outbox::{Outbox, OutboxMessage};
use stratus_proto::agent::v1 as pb;

use crate::spec::{DiskSource, EventType, VmState};
use crate::store::{AgentStore, Runtime, VmRecord};

mod record;
pub use record::*;

/// guest uuid -> its latest [`Tally`].
const USAGE: TableDefinition<&str, &[u8]> = TableDefinition::new("usage");
/// seq -> a [`Tally`] as of one reading: the history and the outbox.
const USAGE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("usage_log");
/// `last_seq`, `oldest_seq`, `published_seq` of the log.
const USAGE_META: TableDefinition<&str, u64> = TableDefinition::new("usage_meta");
const LAST_SEQ: &str = "last_seq";
const OLDEST_SEQ: &str = "oldest_seq";
const PUBLISHED_SEQ: &str = "published_seq";

/// The header of an APEL cloud message.
pub const APEL_HEADER: &str = "APEL-cloud-message: v0.4";
/// `CloudType` of every record.
pub const CLOUD_TYPE: &str = "Stratus";

/// Microseconds since the Unix epoch.
pub(crate) const US: u64 = 1_000_000;

pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("usage store: {e}"))
}

/// Where a CPU counter is read: the guest's cgroup (`cpu.stat`
/// `usage_usec`, every thread QEMU ever had) or its QEMU's
/// `/proc/<pid>/stat` (utime + stime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuSource {
    Cgroup,
    Process,
}

/// One CPU counter as read: what it counts from, which instance of it
/// (the cgroup's inode, or the pid), and its value in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuCounter {
    pub source: CpuSource,
    pub instance: u64,
    pub usec: u64,
}

/// One tap's kernel byte counters, from the host's side: `rx` is what the
/// guest sent, `tx` what it received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapBytes {
    pub tap: String,
    /// A tap made again under the same name has another ifindex.
    pub ifindex: u32,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl TapBytes {
    /// Reads `/sys/class/net/<tap>`; None when the tap is gone.
    pub fn read(tap: &str) -> Option<TapBytes> {
        let c = crate::metrics::TapCounters::read(tap)?;
        let ifindex =
            std::fs::read_to_string(Path::new("/sys/class/net").join(tap).join("ifindex"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
        Some(TapBytes {
            tap: tap.to_owned(),
            ifindex,
            rx_bytes: c.rx_bytes,
            tx_bytes: c.tx_bytes,
        })
    }
}

/// What agentd measured of a guest at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub time_us: u64,
    pub state: VmState,
    /// The QEMU the counters belong to; 0: none runs.
    pub qemu_pid: u32,
    pub cpu: Option<CpuCounter>,
    pub taps: Vec<TapBytes>,
    /// Bytes of the guest's writable disks, when QEMU could say.
    pub disk_bytes: Option<u64>,
}

/// The raw counters a tally was last advanced from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub time_us: u64,
    pub state: Option<VmState>,
    pub qemu_pid: u32,
    pub cpu: Option<CpuCounter>,
    pub taps: Vec<TapBytes>,
}

/// A guest's usage on this host to date.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub vm_uuid: Uuid,
    pub vm_name: String,
    pub project: String,
    /// The image its first image disk came from (`sha256:<hex>`), else
    /// its first pdisk volume (`pdisk:<ref>`); empty for host files.
    pub image_id: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub state: VmState,
    /// When a QEMU of it was first seen running; None: it never ran.
    pub started_us: Option<u64>,
    /// When it was destroyed.
    pub ended_us: Option<u64>,
    pub wall_us: u64,
    /// Of the wall time, paused.
    pub suspend_us: u64,
    pub cpu_us: u64,
    /// Bytes the guest received / sent on its taps.
    pub network_inbound_bytes: u64,
    pub network_outbound_bytes: u64,
    /// The time of the reading it is as of.
    pub updated_us: u64,
    pub baseline: Baseline,
    /// Who created the guest (None: unknown, older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<stratus_pki::tenancy::Creator>,
}

impl Tally {
    /// A guest's tally before any reading.
    pub fn new(vm: &VmRecord) -> Tally {
        let mut t = Tally {
            vm_uuid: vm.uuid,
            vm_name: String::new(),
            project: String::new(),
            image_id: String::new(),
            vcpus: 0,
            memory_bytes: 0,
            disk_bytes: 0,
            state: vm.state,
            started_us: None,
            ended_us: None,
            wall_us: 0,
            suspend_us: 0,
            cpu_us: 0,
            network_inbound_bytes: 0,
            network_outbound_bytes: 0,
            updated_us: 0,
            baseline: Baseline::default(),
            creator: None,
        };
        t.describe(vm);
        t
    }

    /// Takes the guest's identity and allocation from its record.
    pub fn describe(&mut self, vm: &VmRecord) {
        self.vm_name = vm.spec.name.to_string();
        self.project = vm.project.clone();
        self.creator = vm.created_by.clone();
        self.vcpus = vm.spec.vcpus;
        self.memory_bytes = vm.spec.memory.0;
        self.image_id = vm
            .spec
            .disks
            .iter()
            .find_map(|d| match &d.source {
                DiskSource::Image { image, .. } => Some(format!("sha256:{}", image.sha256)),
                _ => None,
            })
            .or_else(|| {
                vm.spec.disks.iter().find_map(|d| match &d.source {
                    DiskSource::Pdisk(r) => Some(format!("pdisk:{r}")),
                    _ => None,
                })
            })
            .unwrap_or_default();
    }

    /// Adds what the counters moved between the baseline and `r`, and
    /// makes `r` the baseline. A reading older than the baseline (taken
    /// before one already counted) changes nothing: false.
    pub fn advance(&mut self, r: &Reading) -> bool {
        let last = &self.baseline;
        if r.time_us < last.time_us {
            return false;
        }
        let dt = r.time_us - last.time_us;
        if last.qemu_pid != 0 && r.qemu_pid == last.qemu_pid {
            self.wall_us += dt;
            if last.state == Some(VmState::Paused) {
                self.suspend_us += dt;
            }
        }
        if r.qemu_pid != 0 && self.started_us.is_none() {
            self.started_us = Some(r.time_us);
        }
        let mut cpu = last.cpu;
        if let Some(c) = r.cpu {
            match last.cpu {
                Some(p) if p.source == c.source && p.instance == c.instance => {
                    // A counter never goes back; if it did, it is not the
                    // one we know: rebaseline.
                    self.cpu_us += c.usec.saturating_sub(p.usec);
                }
                // A new cgroup counts only what ran in it; a new QEMU
                // (another pid) started its counter at 0.
                _ if c.source == CpuSource::Cgroup || r.qemu_pid != last.qemu_pid => {
                    self.cpu_us += c.usec;
                }
                // The same QEMU now read from /proc: its whole life, of
                // which part was counted from its cgroup. Add nothing.
                _ => {}
            }
            cpu = Some(c);
        }
        for t in &r.taps {
            match last
                .taps
                .iter()
                .find(|p| p.tap == t.tap && p.ifindex == t.ifindex)
            {
                Some(p) => {
                    self.network_outbound_bytes += t.rx_bytes.saturating_sub(p.rx_bytes);
                    self.network_inbound_bytes += t.tx_bytes.saturating_sub(p.tx_bytes);
                }
                // A tap not seen before was made for this QEMU: from 0.
                None => {
                    self.network_outbound_bytes += t.rx_bytes;
                    self.network_inbound_bytes += t.tx_bytes;
                }
            }
        }
        if let Some(d) = r.disk_bytes {
            self.disk_bytes = d;
        }
        self.state = r.state;
        self.updated_us = r.time_us;
        self.baseline = Baseline {
            time_us: r.time_us,
            state: Some(r.state),
            qemu_pid: r.qemu_pid,
            cpu,
            taps: r.taps.clone(),
        };
        true
    }

    /// Whether the guest ran at some time in `[since, until]` (µs).
    pub fn ran_within(&self, since_us: u64, until_us: u64) -> bool {
        match self.started_us {
            None => false,
            Some(s) => s <= until_us && self.ended_us.is_none_or(|e| e >= since_us),
        }
    }
}

/// The usage tables in agentd's store.
pub struct UsageBook {
    store: Arc<AgentStore>,
    /// Woken after each reading is logged: the usage publisher.
    committed: Arc<tokio::sync::Notify>,
    /// Who this host is in the records (agentd sets it from its flags).
    site: std::sync::RwLock<Site>,
}

fn encode(t: &Tally) -> Vec<u8> {
    serde_json::to_vec(t).expect("tallies serialize")
}

fn decode(b: &[u8]) -> Result<Tally> {
    serde_json::from_slice(b)
        .map_err(|e| Error::internal(format!("usage store: corrupt tally: {e}")))
}

impl UsageBook {
    pub fn open(store: Arc<AgentStore>) -> Result<UsageBook> {
        let tx = store.database().begin_write().map_err(db_err)?;
        tx.open_table(USAGE).map_err(db_err)?;
        tx.open_table(USAGE_LOG).map_err(db_err)?;
        tx.open_table(USAGE_META).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(UsageBook {
            store,
            committed: Default::default(),
            site: std::sync::RwLock::new(Site::of_this_host()),
        })
    }

    /// Names the site and service in the records from now on.
    pub fn set_site(&self, site: Site) {
        *self.site.write().unwrap() = site;
    }

    pub fn site(&self) -> Site {
        self.site.read().unwrap().clone()
    }

    /// Advances `vm`'s tally by `r` and logs it, in one transaction.
    /// Returns the tally (unchanged for a stale reading, which is not
    /// logged).
    pub fn record(&self, vm: &VmRecord, r: &Reading) -> Result<Tally> {
        let t = self.update(vm.uuid, |t| {
            let mut t = t.unwrap_or_else(|| Tally::new(vm));
            t.describe(vm);
            let moved = t.advance(r);
            Some((t, moved))
        })?;
        Ok(t.expect("a tally was made"))
    }

    /// Marks guest `uuid` destroyed at `time_us`. A guest without a tally
    /// has no usage: nothing is recorded (None).
    pub fn complete(&self, uuid: Uuid, time_us: u64) -> Result<Option<Tally>> {
        self.update(uuid, |t| {
            let mut t = t?;
            if t.ended_us.is_some() {
                return Some((t, false));
            }
            t.updated_us = t.updated_us.max(time_us);
            t.ended_us = Some(t.updated_us);
            t.state = VmState::Destroyed;
            t.baseline.qemu_pid = 0;
            Some((t, true))
        })
    }

    /// Reads and rewrites one tally: `f` returns it and whether it moved
    /// (then it is stored and logged), or None to leave things as they are.
    fn update(
        &self,
        uuid: Uuid,
        f: impl FnOnce(Option<Tally>) -> Option<(Tally, bool)>,
    ) -> Result<Option<Tally>> {
        let key = uuid.to_string();
        let tx = self.store.database().begin_write().map_err(db_err)?;
        let mut logged = false;
        let out = {
            let mut usage = tx.open_table(USAGE).map_err(db_err)?;
            let old = usage
                .get(key.as_str())
                .map_err(db_err)?
                .map(|v| decode(v.value()))
                .transpose()?;
            match f(old) {
                Some((t, true)) => {
                    let bytes = encode(&t);
                    usage
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(db_err)?;
                    let mut meta = tx.open_table(USAGE_META).map_err(db_err)?;
                    let seq = meta
                        .get(LAST_SEQ)
                        .map_err(db_err)?
                        .map(|v| v.value())
                        .unwrap_or(0)
                        + 1;
                    meta.insert(LAST_SEQ, seq).map_err(db_err)?;
                    tx.open_table(USAGE_LOG)
                        .map_err(db_err)?
                        .insert(seq, bytes.as_slice())
                        .map_err(db_err)?;
                    logged = true;
                    Some(t)
                }
                Some((t, false)) => Some(t),
                None => None,
            }
        };
        tx.commit().map_err(db_err)?;
        if logged {
            self.committed.notify_one();
        }
        Ok(out)
    }

    /// Every guest's latest tally.
    pub fn tallies(&self) -> Result<Vec<Tally>> {
        let tx = self.store.database().begin_read().map_err(db_err)?;
        let t = tx.open_table(USAGE).map_err(db_err)?;
        t.iter()
            .map_err(db_err)?
            .map(|r| decode(r.map_err(db_err)?.1.value()))
            .collect()
    }

    /// The tallies of the guests that ran in `[since, until]`, each as of
    /// its last reading at or before `until` (from the log when a later
    /// one exists), in start order.
    pub fn tallies_within(&self, since_us: u64, until_us: u64) -> Result<Vec<Tally>> {
        let mut out: BTreeMap<Uuid, Tally> = BTreeMap::new();
        let mut earlier: Vec<Uuid> = Vec::new();
        for t in self.tallies()? {
            if t.updated_us <= until_us {
                out.insert(t.vm_uuid, t);
            } else {
                earlier.push(t.vm_uuid);
            }
        }
        if !earlier.is_empty() {
            let tx = self.store.database().begin_read().map_err(db_err)?;
            let log = tx.open_table(USAGE_LOG).map_err(db_err)?;
            for r in log.iter().map_err(db_err)?.rev() {
                let t = decode(r.map_err(db_err)?.1.value())?;
                if t.updated_us <= until_us && earlier.contains(&t.vm_uuid) {
                    earlier.retain(|u| *u != t.vm_uuid);
                    out.insert(t.vm_uuid, t);
                    if earlier.is_empty() {
                        break;
                    }
                }
            }
        }
        let mut v: Vec<Tally> = out
            .into_values()
            .filter(|t| t.ran_within(since_us, until_us))
            .collect();
        v.sort_by_key(|t| (t.started_us, t.vm_uuid));
        Ok(v)
    }

    fn meta(&self, key: &str, default: u64) -> Result<u64> {
        let tx = self.store.database().begin_read().map_err(db_err)?;
        let t = tx.open_table(USAGE_META).map_err(db_err)?;
        let x = t.get(key).map_err(db_err)?;
        Ok(x.map(|v| v.value()).unwrap_or(default))
    }

    /// The last seq of the log (0: none).
    pub fn last_seq(&self) -> Result<u64> {
        self.meta(LAST_SEQ, 0)
    }

    /// Removes log entries older than `max_age` as of `now` and the
    /// tallies of guests destroyed before then. The latest tally of every
    /// other guest stays, whatever its age.
    pub fn compact(&self, max_age: Duration, now: SystemTime) -> Result<u64> {
        let cutoff = unix_us(now).saturating_sub(max_age.as_micros() as u64);
        let tx = self.store.database().begin_write().map_err(db_err)?;
        let mut removed = 0;
        {
            let mut log = tx.open_table(USAGE_LOG).map_err(db_err)?;
            let mut old = Vec::new();
            for r in log.iter().map_err(db_err)? {
                let (k, v) = r.map_err(db_err)?;
                if decode(v.value())?.updated_us >= cutoff {
                    break;
                }
                old.push(k.value());
            }
            for k in &old {
                log.remove(k).map_err(db_err)?;
            }
            removed += old.len() as u64;
            if let Some(&last) = old.last() {
                let mut meta = tx.open_table(USAGE_META).map_err(db_err)?;
                let oldest = meta
                    .get(OLDEST_SEQ)
                    .map_err(db_err)?
                    .map(|v| v.value())
                    .unwrap_or(1);
                meta.insert(OLDEST_SEQ, oldest.max(last + 1))
                    .map_err(db_err)?;
            }
            let mut usage = tx.open_table(USAGE).map_err(db_err)?;
            let mut gone = Vec::new();
            for r in usage.iter().map_err(db_err)? {
                let (k, v) = r.map_err(db_err)?;
                if decode(v.value())?.ended_us.is_some_and(|e| e < cutoff) {
                    gone.push(k.value().to_owned());
                }
            }
            for k in &gone {
                usage.remove(k.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(removed)
    }
}

/// The cgroup v2 `cpu.stat` `usage_usec` of the cgroup at `dir`, with the
/// directory's inode as the counter's instance.
pub fn cgroup_cpu(dir: &Path) -> Option<CpuCounter> {
    use std::os::unix::fs::MetadataExt;
    let instance = std::fs::metadata(dir).ok()?.ino();
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let usec = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    Some(CpuCounter {
        source: CpuSource::Cgroup,
        instance,
        usec,
    })
}

/// A QEMU's CPU counter: its cgroup's when it has one under
/// `cgroup_parent`, else its `/proc/<pid>/stat`.
pub fn qemu_cpu(cgroup_parent: Option<&Path>, vm: Uuid, pid: u32) -> Option<CpuCounter> {
    if let Some(c) = cgroup_parent.and_then(|p| cgroup_cpu(&crate::cgroup::guest_dir(p, vm))) {
        return Some(c);
    }
    if pid == 0 {
        return None;
    }
    let secs = crate::metrics::process_cpu_seconds(pid)?;
    Some(CpuCounter {
        source: CpuSource::Process,
        instance: u64::from(pid),
        usec: (secs * 1e6) as u64,
    })
}

impl crate::Agent {
    /// What `vm`'s QEMU (`rt`'s; none when None) and taps count now.
    /// `disk_bytes` from QMP, when it answers within a second.
    pub(crate) async fn usage_reading(&self, vm: &VmRecord, rt: Option<&Runtime>) -> Reading {
        let pid = rt.map(|r| r.pid).unwrap_or(0);
        let cpu = rt.and_then(|_| qemu_cpu(self.settings().cgroup_parent.as_deref(), vm.uuid, pid));
        let taps = rt
            .map(|r| {
                r.nics
                    .iter()
                    .filter_map(|n| TapBytes::read(&n.tap))
                    .collect()
            })
            .unwrap_or_default();
        let mut disk_bytes = None;
        if rt.is_some() {
            if let Some(qmp) = self.qmp_of(vm.uuid) {
                if let Ok(Ok(blocks)) =
                    tokio::time::timeout(Duration::from_secs(1), qmp.query_block()).await
                {
                    disk_bytes = Some(
                        blocks
                            .iter()
                            .filter_map(|b| b.inserted.as_ref())
                            .filter(|m| !m.read_only)
                            .filter_map(|m| m.image.as_ref().map(|i| i.virtual_size))
                            .sum(),
                    );
                }
            }
        }
        Reading {
            time_us: unix_us(SystemTime::now()),
            state: vm.state,
            qemu_pid: pid,
            cpu,
            taps,
            disk_bytes,
        }
    }

    /// Takes a reading of guest `vm` as its record stands, and records it.
    pub async fn sample_usage(&self, vm: &VmRecord) -> Result<Tally> {
        let rt = vm.runtime.as_ref().filter(|_| vm.state.is_active());
        let r = self.usage_reading(vm, rt).await;
        // Short store writes, made inline like the service's commits.
        self.usage_book().record(vm, &r)
    }

    /// The last reading of a QEMU being torn down, before its cgroup and
    /// taps go: what it used since the last reading is counted.
    pub(crate) async fn final_usage(&self, vm: &VmRecord, rt: &Runtime) {
        if rt.pid == 0 {
            return;
        }
        let r = self.usage_reading(vm, Some(rt)).await;
        if let Err(e) = self.usage_book().record(vm, &r) {
            tracing::warn!(vm = %vm.spec.name, error = %e, "usage: the last reading was not recorded");
        }
    }

    /// The records of the guests that ran in `[since, until]` (Unix
    /// seconds; `until` None: now, after reading every guest) that
    /// `sees` a project of, `vm` only when given.
    pub async fn usage_records(
        &self,
        since: u64,
        until: Option<u64>,
        vm: Option<Uuid>,
        sees: impl Fn(&str) -> bool,
    ) -> Result<Vec<UsageRecord>> {
        let until_us = match until {
            Some(u) => u.saturating_mul(US),
            None => {
                self.sample_all_usage().await?;
                unix_us(SystemTime::now())
            }
        };
        let book = self.usage_book();
        let site = book.site();
        let now = unix_us(SystemTime::now());
        let tallies = book.tallies_within(since.saturating_mul(US), until_us)?;
        Ok(tallies
            .iter()
            .filter(|t| sees(&t.project) && vm.is_none_or(|u| u == t.vm_uuid))
            .map(|t| UsageRecord::from_tally(t, &site, now))
            .collect())
    }

    /// Samples every guest now.
    pub async fn sample_all_usage(&self) -> Result<()> {
        for vm in self.store().vms()? {
            if let Err(e) = self.sample_usage(&vm).await {
                tracing::warn!(vm = %vm.spec.name, error = %e, "usage: reading not recorded");
            }
        }
        Ok(())
    }
}

/// Samples every guest every `interval` and each guest whose state
/// changes (following the event journal), and marks destroyed guests'
/// tallies completed; runs for agentd's life.
pub fn spawn_sampler(agent: Arc<crate::Agent>, interval: Duration) {
    tokio::spawn(async move {
        use futures::StreamExt;
        let since = agent.store().last_seq().unwrap_or(0);
        let mut events = agent
            .journal()
            .follow(since, crate::journal::EventFilter::all());
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = agent.sample_all_usage().await {
                        tracing::warn!(error = %e, "usage: sampling failed");
                    }
                }
                e = events.next() => match e {
                    Some(Ok(e)) if e.kind == EventType::Destroyed => {
                        let t = unix_us(SystemTime::now());
                        let book = agent.usage_book();
                        if let Err(err) = book.complete(e.vm_uuid, t) {
                            tracing::warn!(vm = %e.vm_name, error = %err, "usage: completion not recorded");
                        }
                    }
                    Some(Ok(e)) if e.state.is_some() && !e.vm_uuid.is_nil() => {
                        if let Ok(Some(vm)) = agent.store().vm(e.vm_uuid) {
                            if let Err(err) = agent.sample_usage(&vm).await {
                                tracing::warn!(vm = %vm.spec.name, error = %err, "usage: reading not recorded");
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        // Compacted past us, or the store failed: resume live.
                        tracing::warn!(error = %err, "usage: following the journal failed; resuming");
                        let since = agent.store().last_seq().unwrap_or(0);
                        events = agent.journal().follow(since, crate::journal::EventFilter::all());
                    }
                    None => return,
                },
            }
        }
    });
}

impl From<&UsageRecord> for pb::UsageRecord {
    fn from(r: &UsageRecord) -> pb::UsageRecord {
        pb::UsageRecord {
            record_create_time: r.record_create_time,
            vm_uuid: r.vm_uuid.clone(),
            site_name: r.site_name.clone(),
            cloud_compute_service: r.cloud_compute_service.clone(),
            machine_name: r.machine_name.clone(),
            local_group_id: r.local_group_id.clone(),
            local_user_id: r.local_user_id.clone(),
            global_user_name: r.global_user_name.clone(),
            fqan: r.fqan.clone(),
            status: r.status.clone(),
            start_time: r.start_time,
            end_time: r.end_time,
            suspend_duration: r.suspend_duration,
            wall_duration: r.wall_duration,
            cpu_duration: r.cpu_duration,
            cpu_count: r.cpu_count,
            network_inbound_bytes: r.network_inbound_bytes,
            network_outbound_bytes: r.network_outbound_bytes,
            memory_bytes: r.memory_bytes,
            disk_bytes: r.disk_bytes,
            image_id: r.image_id.clone(),
            cloud_type: r.cloud_type.clone(),
        }
    }
}

impl From<pb::UsageRecord> for UsageRecord {
    fn from(r: pb::UsageRecord) -> UsageRecord {
        UsageRecord {
            record_create_time: r.record_create_time,
            vm_uuid: r.vm_uuid,
            site_name: r.site_name,
            cloud_compute_service: r.cloud_compute_service,
            machine_name: r.machine_name,
            local_group_id: r.local_group_id,
            local_user_id: r.local_user_id,
            global_user_name: r.global_user_name,
            fqan: r.fqan,
            status: r.status,
            start_time: r.start_time,
            end_time: r.end_time,
            suspend_duration: r.suspend_duration,
            wall_duration: r.wall_duration,
            cpu_duration: r.cpu_duration,
            cpu_count: r.cpu_count,
            network_inbound_bytes: r.network_inbound_bytes,
            network_outbound_bytes: r.network_outbound_bytes,
            memory_bytes: r.memory_bytes,
            disk_bytes: r.disk_bytes,
            image_id: r.image_id,
            cloud_type: r.cloud_type,
        }
    }
}

/// The usage log as an outbox: each logged tally is a record on
/// `stratus.usage.<host>`, message id `usage.<host>:<seq>`.
pub struct UsageOutbox {
    agent: Arc<crate::Agent>,
}

impl UsageOutbox {
    pub fn new(agent: Arc<crate::Agent>) -> UsageOutbox {
        UsageOutbox { agent }
    }
}

/// The subject usage records of `host` go to.
pub fn subject(host: &str) -> String {
    format!("stratus.usage.{host}")
}

/// One record as published: its fields plus `schema`, `source` (`agent`),
/// `host` and `seq`.
pub fn message(site: &Site, seq: u64, t: &Tally) -> Outgoing {
    let mut v = serde_json::to_value(UsageRecord::from_tally(t, site, t.updated_us))
        .expect("records serialize");
    let o = v.as_object_mut().expect("a record is an object");
    o.insert("schema".into(), SCHEMA_VERSION.into());
    o.insert("source".into(), "agent".into());
    o.insert("host".into(), site.host.clone().into());
    o.insert("seq".into(), seq.into());
    Outgoing {
        subject: subject(&site.host),
        payload: serde_json::to_vec(&v).expect("JSON serializes"),
        msg_id: format!("usage.{}:{seq}", site.host),
    }
}

impl Outbox for UsageOutbox {
    fn messages_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxMessage>> {
        let book = self.agent.usage_book();
        let oldest = book.meta(OLDEST_SEQ, 1)?;
        if after + 1 < oldest {
            return Err(Error::out_of_range(format!(
                "usage records after seq {after} were compacted away"
            )));
        }
        let site = book.site();
        let tx = self.agent.store().database().begin_read().map_err(db_err)?;
        let log = tx.open_table(USAGE_LOG).map_err(db_err)?;
        log.range(after.saturating_add(1)..)
            .map_err(db_err)?
            .take(limit)
            .map(|r| {
                let (k, v) = r.map_err(db_err)?;
                Ok(OutboxMessage {
                    seq: k.value(),
                    message: message(&site, k.value(), &decode(v.value())?),
                })
            })
            .collect()
    }

    fn oldest_seq(&self) -> Result<u64> {
        self.agent.usage_book().meta(OLDEST_SEQ, 1)
    }

    fn published_seq(&self) -> Result<u64> {
        self.agent.usage_book().meta(PUBLISHED_SEQ, 0)
    }

    fn set_published_seq(&self, seq: u64) -> Result<()> {
        let tx = self
            .agent
            .store()
            .database()
            .begin_write()
            .map_err(db_err)?;
        tx.open_table(USAGE_META)
            .map_err(db_err)?
            .insert(PUBLISHED_SEQ, seq)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.agent.usage_book().committed.clone()
    }
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
