//! Usage records as they leave the host: who the site is ([`Site`]), one
//! guest's record ([`UsageRecord`]) and its renderings, the APEL cloud
//! message v0.4 and CSV. Fields and units are in the parent module's doc.

use std::fmt::Write as _;

use super::*;

/// Who this host is in the federation's accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// GOCDB site name (`--usage-site`).
    pub site_name: String,
    /// This cloud resource within the site (`--usage-service`).
    pub cloud_compute_service: String,
    /// The host, for the NATS subject and message ids.
    pub host: String,
}

impl Site {
    /// Until agentd names them: the host name for all three.
    pub fn of_this_host() -> Site {
        let host = stratus_core::host::hostname();
        Site {
            site_name: host.clone(),
            cloud_compute_service: host.clone(),
            host,
        }
    }
}

/// A cloud usage record: the fields of the EGI cloud accounting record
/// v0.4, in exact units (the APEL message rounds to its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Unix seconds.
    pub record_create_time: u64,
    pub vm_uuid: String,
    pub site_name: String,
    pub cloud_compute_service: String,
    pub machine_name: String,
    /// The guest's project (APEL LocalGroupId).
    pub local_group_id: String,
    /// Who created the guest, `ROLE/NAME` of its certificate (APEL
    /// LocalUserId); empty when unknown.
    #[serde(default)]
    pub local_user_id: String,
    /// The same identity as its certificate names it,
    /// `stratus://ROLE/NAME` (APEL GlobalUserName).
    #[serde(default)]
    pub global_user_name: String,
    /// `/PROJECT/Role=ROLE/Capability=NULL`, VOMS-style (APEL FQAN); empty
    /// without a project or a creator.
    #[serde(default)]
    pub fqan: String,
    /// started, paused, stopped, error, completed.
    pub status: String,
    /// Unix seconds; 0: none.
    pub start_time: u64,
    pub end_time: u64,
    pub suspend_duration: u64,
    pub wall_duration: u64,
    pub cpu_duration: u64,
    pub cpu_count: u32,
    pub network_inbound_bytes: u64,
    pub network_outbound_bytes: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub image_id: String,
    pub cloud_type: String,
}

/// The APEL status of a guest in `state` (cASO's words for the same).
pub fn status_word(state: VmState, ended: bool) -> &'static str {
    if ended {
        return "completed";
    }
    match state {
        VmState::Starting | VmState::Running | VmState::Stopping => "started",
        VmState::Paused => "paused",
        VmState::Defined | VmState::Stopped | VmState::Crashed => "stopped",
        VmState::Error => "error",
        VmState::Destroying | VmState::Destroyed => "completed",
    }
}

impl UsageRecord {
    pub fn from_tally(t: &Tally, site: &Site, created_us: u64) -> UsageRecord {
        UsageRecord {
            record_create_time: created_us / US,
            vm_uuid: t.vm_uuid.to_string(),
            site_name: site.site_name.clone(),
            cloud_compute_service: site.cloud_compute_service.clone(),
            machine_name: t.vm_name.clone(),
            local_group_id: t.project.clone(),
            local_user_id: t
                .creator
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            global_user_name: t
                .creator
                .as_ref()
                .map(|c| format!("{}{c}", stratus_pki::identity::SCHEME))
                .unwrap_or_default(),
            fqan: match &t.creator {
                Some(c) if !t.project.is_empty() => {
                    format!("/{}/Role={}/Capability=NULL", t.project, c.role)
                }
                _ => String::new(),
            },
            status: status_word(t.state, t.ended_us.is_some()).into(),
            start_time: t.started_us.unwrap_or(0) / US,
            end_time: t.ended_us.unwrap_or(0) / US,
            suspend_duration: t.suspend_us / US,
            wall_duration: t.wall_us / US,
            cpu_duration: t.cpu_us / US,
            cpu_count: t.vcpus,
            network_inbound_bytes: t.network_inbound_bytes,
            network_outbound_bytes: t.network_outbound_bytes,
            memory_bytes: t.memory_bytes,
            disk_bytes: t.disk_bytes,
            image_id: t.image_id.clone(),
            cloud_type: CLOUD_TYPE.into(),
        }
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `bytes` in whole `unit`s, rounded to the nearest.
fn round_to(bytes: u64, unit: u64) -> u64 {
    (bytes + unit / 2) / unit
}

/// The APEL message of `records`: the header, then each record's
/// `Key: value` lines ended by `%%`. Memory is MB, Disk GB (rounded up:
/// what is allocated), network GB (rounded); empty and unset fields are
/// left out, as the format allows for its optional fields.
pub fn apel_message(records: &[UsageRecord]) -> String {
    let mut out = String::from(APEL_HEADER);
    out.push('\n');
    for r in records {
        let mut field = |k: &str, v: String| {
            if !v.is_empty() {
                let _ = writeln!(out, "{k}: {}", one_line(&v));
            }
        };
        field("VMUUID", r.vm_uuid.clone());
        field("SiteName", r.site_name.clone());
        field("CloudComputeService", r.cloud_compute_service.clone());
        field("MachineName", r.machine_name.clone());
        field("LocalUserId", r.local_user_id.clone());
        field("LocalGroupId", r.local_group_id.clone());
        field("GlobalUserName", r.global_user_name.clone());
        field("FQAN", r.fqan.clone());
        field("Status", r.status.clone());
        if r.start_time != 0 {
            field("StartTime", r.start_time.to_string());
        }
        if r.end_time != 0 {
            field("EndTime", r.end_time.to_string());
        }
        field("SuspendDuration", r.suspend_duration.to_string());
        field("WallDuration", r.wall_duration.to_string());
        field("CpuDuration", r.cpu_duration.to_string());
        field("CpuCount", r.cpu_count.to_string());
        field(
            "NetworkInbound",
            round_to(r.network_inbound_bytes, GIB).to_string(),
        );
        field(
            "NetworkOutbound",
            round_to(r.network_outbound_bytes, GIB).to_string(),
        );
        field("Memory", r.memory_bytes.div_ceil(MIB).to_string());
        field("Disk", r.disk_bytes.div_ceil(GIB).to_string());
        field("ImageId", r.image_id.clone());
        field("CloudType", r.cloud_type.clone());
        out.push_str("%%\n");
    }
    out
}

/// A value on one line: the format has no escapes, so a line break in a
/// name would start a field of its own.
fn one_line(v: &str) -> String {
    v.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The CSV columns, in order (the JSON field names).
pub const CSV_COLUMNS: [&str; 22] = [
    "record_create_time",
    "vm_uuid",
    "site_name",
    "cloud_compute_service",
    "machine_name",
    "local_group_id",
    "status",
    "start_time",
    "end_time",
    "suspend_duration",
    "wall_duration",
    "cpu_duration",
    "cpu_count",
    "network_inbound_bytes",
    "network_outbound_bytes",
    "memory_bytes",
    "disk_bytes",
    "image_id",
    "cloud_type",
    // Added later: at the end, so older readers' columns stay where they were.
    "local_user_id",
    "global_user_name",
    "fqan",
];

/// `records` as CSV (RFC 4180: a header line; fields with a comma, quote
/// or line break quoted, quotes doubled).
pub fn csv(records: &[UsageRecord]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for r in records {
        let v = serde_json::to_value(r).expect("records serialize");
        let cells: Vec<String> = CSV_COLUMNS
            .iter()
            .map(|c| match &v[*c] {
                serde_json::Value::String(s) => csv_cell(s),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
