//! How results look: each agent.v1 message as JSON (for `--json`) and as
//! human text (tables, `key: value` blocks, one line per event).
//!
//! JSON keeps the proto field names, sizes as numbers of bytes, enums as
//! lowercase words ("running", "disk_attached", "api") and labels as an
//! object with sorted keys, so the output is stable for scripts whatever
//! order the server sends.

use serde_json::{json, Value};
use stratus_core::cli::failure::one_line;
use stratus_core::cli::{fields, labels_json, labels_text, Table};
use stratus_core::types::ByteSize;
use stratus_proto::agent::v1::{
    disk_spec, AttachedDisk, AttachedNic, CachedImage, DiskPersistence, DiskSpec, Event,
    EventCause, EventType, Host, ImageFormat, ImageRef, NicSpec, Vm, VmSpec, VmState,
};

/// Shown for an empty value in human output.
const NONE: &str = "-";

/// `VM_STATE_DISK_ATTACHED`-style proto names as "disk_attached"; numbers
/// this client does not know (a newer agent) as "unknown(N)".
fn word(name: Option<&str>, prefix: &str, raw: i32) -> String {
    match name {
        Some(name) => name
            .strip_prefix(prefix)
            .unwrap_or(name)
            .to_ascii_lowercase(),
        None => format!("unknown({raw})"),
    }
}

pub fn state_word(state: i32) -> String {
    let name = VmState::try_from(state).ok().map(|s| s.as_str_name());
    word(name, "VM_STATE_", state)
}

pub fn event_type_word(t: i32) -> String {
    let name = EventType::try_from(t).ok().map(|t| t.as_str_name());
    word(name, "EVENT_TYPE_", t)
}

pub fn format_word(format: i32) -> String {
    let name = ImageFormat::try_from(format).ok().map(|f| f.as_str_name());
    word(name, "IMAGE_FORMAT_", format)
}

pub fn persistence_word(p: i32) -> String {
    let name = DiskPersistence::try_from(p).ok().map(|p| p.as_str_name());
    word(name, "DISK_PERSISTENCE_", p)
}

pub fn cause_word(cause: i32) -> String {
    let name = EventCause::try_from(cause).ok().map(|c| c.as_str_name());
    word(name, "EVENT_CAUSE_", cause)
}

/// A QEMU process exists, or is being made or ended, in these states: the
/// console may still grow.
pub fn is_active(state: i32) -> bool {
    matches!(
        VmState::try_from(state),
        Ok(VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping)
    )
}

fn size(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        NONE.to_owned()
    } else {
        s.to_owned()
    }
}

/// The first `n` characters of a checksum: enough to tell images apart in
/// human output (JSON always has the whole).
fn short(sha256: &str, n: usize) -> String {
    sha256.chars().take(n).collect()
}

/// A word for human output, with "-" for "unspecified".
fn or_none_word(word: String) -> String {
    if word == "unspecified" {
        NONE.to_owned()
    } else {
        word
    }
}

// ---- VMs ----

fn image_ref_json(i: &ImageRef) -> Value {
    json!({
        "url": i.url,
        "sha256": i.sha256,
        "format": format_word(i.format),
        "endorser": i.endorser,
    })
}

/// A disk of the spec: its one source key (`pdisk_volume`, `file` or
/// `image`); image disks also have `size_bytes` and `persistence`, which
/// apply to them only.
fn disk_spec_json(d: &DiskSpec) -> Value {
    let mut j = json!({ "read_only": d.read_only, "boot_index": d.boot_index });
    match &d.source {
        Some(disk_spec::Source::PdiskVolume(v)) => j["pdisk_volume"] = json!(v),
        Some(disk_spec::Source::File(f)) => j["file"] = json!(f),
        Some(disk_spec::Source::Image(i)) => {
            j["image"] = image_ref_json(i);
            j["size_bytes"] = json!(d.size_bytes);
            j["persistence"] = json!(persistence_word(d.persistence));
        }
        None => {}
    }
    j
}

/// A disk source as the command line and AttachedDisk.source write it; an
/// image as its URL and the start of its checksum.
fn disk_source_text(d: &DiskSpec) -> String {
    match &d.source {
        Some(disk_spec::Source::PdiskVolume(v)) => format!("pdisk:{v}"),
        Some(disk_spec::Source::File(f)) => format!("file:{f}"),
        Some(disk_spec::Source::Image(i)) => {
            format!("image:{} sha256={}", i.url, short(&i.sha256, 12))
        }
        None => NONE.to_owned(),
    }
}

fn is_image(d: &DiskSpec) -> bool {
    matches!(d.source, Some(disk_spec::Source::Image(_)))
}

fn nic_spec_json(n: &NicSpec) -> Value {
    json!({ "bridge": n.bridge, "mac": n.mac, "vlan": n.vlan })
}

fn attached_disk_json(d: &AttachedDisk) -> Value {
    json!({
        "device": d.device,
        "source": d.source,
        "attachment": d.attachment,
        "read_only": d.read_only,
    })
}

fn attached_nic_json(n: &AttachedNic) -> Value {
    json!({ "tap": n.tap, "bridge": n.bridge, "mac": n.mac, "vlan": n.vlan })
}

pub fn vm_json(v: &Vm) -> Value {
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "uuid": v.uuid,
        "name": v.name,
        "spec": {
            "name": spec.name,
            "vcpus": spec.vcpus,
            "memory_bytes": spec.memory_bytes,
            "disks": spec.disks.iter().map(disk_spec_json).collect::<Vec<_>>(),
            "nics": spec.nics.iter().map(nic_spec_json).collect::<Vec<_>>(),
            "kernel": spec.kernel.as_ref().map(|k| json!({
                "kernel": k.kernel,
                "initrd": k.initrd,
                "cmdline": k.cmdline,
            })),
            "labels": labels_json(&spec.labels),
            "context": spec.context.as_ref().map(|c| json!({
                "hostname": c.hostname,
                "user_data": c.user_data,
                "network_config": c.network_config,
                "ssh_keys": c.ssh_keys,
            })),
        },
        "state": state_word(v.state),
        "state_reason": v.state_reason,
        "pid": v.pid,
        "disks": v.disks.iter().map(attached_disk_json).collect::<Vec<_>>(),
        "nics": v.nics.iter().map(attached_nic_json).collect::<Vec<_>>(),
        "console_log": v.console_log,
        "created_at": v.created_at,
        "last_event_seq": v.last_event_seq,
    })
}

pub fn vms_json(vs: &[Vm]) -> Value {
    json!({ "vms": vs.iter().map(vm_json).collect::<Vec<_>>() })
}

fn state_text(v: &Vm) -> String {
    let state = state_word(v.state);
    if v.state_reason.is_empty() {
        state
    } else {
        format!("{state} ({})", one_line(&v.state_reason))
    }
}

fn pid_text(pid: u32) -> String {
    if pid == 0 {
        NONE.to_owned()
    } else {
        pid.to_string()
    }
}

fn vlan_text(vlan: u32) -> String {
    if vlan == 0 {
        NONE.to_owned()
    } else {
        vlan.to_string()
    }
}

/// Disks as the spec asks for them, beside what was attached (in spec order)
/// while the VM runs. A VM with image disks gets two more columns: the
/// disk's size ("image" for the image's own) and its persistence.
fn disks_table(spec: &[DiskSpec], attached: &[AttachedDisk]) -> String {
    let images = spec.iter().any(is_image);
    let mut header = vec!["DEVICE", "SOURCE", "MODE", "BOOT"];
    if images {
        header.extend(["SIZE", "PERSISTENCE"]);
    }
    header.push("ATTACHMENT");
    let mut t = Table::new(header);
    for i in 0..spec.len().max(attached.len()) {
        let (s, a) = (spec.get(i), attached.get(i));
        let source = match (s, a) {
            (Some(s), _) => disk_source_text(s),
            (None, Some(a)) => or_none(&a.source),
            (None, None) => NONE.to_owned(),
        };
        let read_only = s.map(|s| s.read_only).or(a.map(|a| a.read_only));
        let boot = s.map_or(0, |s| s.boot_index);
        let mut row = vec![
            a.map_or(NONE.to_owned(), |a| or_none(&a.device)),
            source,
            if read_only == Some(true) { "ro" } else { "rw" }.to_owned(),
            if boot == 0 {
                NONE.to_owned()
            } else {
                boot.to_string()
            },
        ];
        if images {
            match s.filter(|s| is_image(s)) {
                Some(s) if s.size_bytes == 0 => row.push("image".to_owned()),
                Some(s) => row.push(size(s.size_bytes)),
                None => row.push(NONE.to_owned()),
            }
            row.push(
                s.filter(|s| is_image(s))
                    .map_or(NONE.to_owned(), |s| persistence_word(s.persistence)),
            );
        }
        row.push(a.map_or(NONE.to_owned(), |a| or_none(&a.attachment)));
        t.row(row);
    }
    t.render()
}

/// NICs as the spec asks for them, with the taps and generated MACs once
/// attached.
fn nics_table(spec: &[NicSpec], attached: &[AttachedNic]) -> String {
    let mut t = Table::new(["TAP", "BRIDGE", "MAC", "VLAN"]);
    for i in 0..spec.len().max(attached.len()) {
        let (s, a) = (spec.get(i), attached.get(i));
        let pick = |attached: Option<&str>, asked: Option<&str>, unset: &str| {
            attached
                .filter(|v| !v.is_empty())
                .or(asked.filter(|v| !v.is_empty()))
                .unwrap_or(unset)
                .to_owned()
        };
        t.row([
            a.map_or(NONE.to_owned(), |a| or_none(&a.tap)),
            pick(
                a.map(|a| a.bridge.as_str()),
                s.map(|s| s.bridge.as_str()),
                "(default)",
            ),
            pick(
                a.map(|a| a.mac.as_str()),
                s.map(|s| s.mac.as_str()),
                "(generated)",
            ),
            vlan_text(a.map_or(0, |a| a.vlan).max(s.map_or(0, |s| s.vlan))),
        ]);
    }
    t.render()
}

/// The guest's hostname and what its cloud-init seed holds, or "-" for
/// both when it has none.
fn context_text(spec: &VmSpec) -> (String, String) {
    let Some(c) = &spec.context else {
        return (NONE.to_owned(), NONE.to_owned());
    };
    let hostname = if c.hostname.is_empty() {
        format!("{} (the VM name)", spec.name)
    } else {
        c.hostname.clone()
    };
    let mut seed = vec![if c.user_data.is_empty() {
        "default user-data".to_owned()
    } else {
        format!("user-data {}", size(c.user_data.len() as u64))
    }];
    if !c.network_config.is_empty() {
        seed.push(format!(
            "network-config {}",
            size(c.network_config.len() as u64)
        ));
    }
    match c.ssh_keys.len() {
        0 => {}
        1 => seed.push("1 ssh key".to_owned()),
        n => seed.push(format!("{n} ssh keys")),
    }
    (hostname, seed.join(", "))
}

pub fn vm_view(v: &Vm) -> String {
    let spec = v.spec.clone().unwrap_or_default();
    let mut pairs = vec![
        ("name", v.name.clone()),
        ("uuid", v.uuid.clone()),
        ("state", state_text(v)),
        ("pid", pid_text(v.pid)),
        ("vcpus", spec.vcpus.to_string()),
        ("memory", size(spec.memory_bytes)),
    ];
    match &spec.kernel {
        Some(k) => {
            pairs.push(("kernel", or_none(&k.kernel)));
            pairs.push(("initrd", or_none(&k.initrd)));
            pairs.push(("cmdline", or_none(&k.cmdline)));
        }
        None => pairs.push(("kernel", "- (boots from disk)".to_owned())),
    }
    let (hostname, seed) = context_text(&spec);
    pairs.extend([
        ("hostname", hostname),
        ("seed", seed),
        ("labels", labels_text(&spec.labels)),
        ("console", or_none(&v.console_log)),
        ("created", or_none(&v.created_at)),
        ("last event", v.last_event_seq.to_string()),
    ]);
    let mut out = fields(&pairs);
    if !spec.disks.is_empty() || !v.disks.is_empty() {
        out.push('\n');
        out.push_str(&disks_table(&spec.disks, &v.disks));
    }
    if !spec.nics.is_empty() || !v.nics.is_empty() {
        out.push('\n');
        out.push_str(&nics_table(&spec.nics, &v.nics));
    }
    out
}

pub fn vms_table(vs: &[Vm]) -> String {
    let mut t = Table::new([
        "NAME", "UUID", "STATE", "VCPUS", "MEMORY", "DISKS", "NICS", "PID", "LABELS",
    ]);
    for v in vs {
        let spec = v.spec.clone().unwrap_or_default();
        t.row([
            v.name.clone(),
            v.uuid.clone(),
            state_word(v.state),
            spec.vcpus.to_string(),
            size(spec.memory_bytes),
            spec.disks.len().max(v.disks.len()).to_string(),
            spec.nics.len().max(v.nics.len()).to_string(),
            pid_text(v.pid),
            labels_text(&spec.labels),
        ]);
    }
    t.render()
}

// ---- events ----

pub fn event_json(e: &Event) -> Value {
    json!({
        "seq": e.seq,
        "time": e.time,
        "vm_uuid": e.vm_uuid,
        "vm_name": e.vm_name,
        "type": event_type_word(e.r#type),
        "state": state_word(e.state),
        "cause": cause_word(e.cause),
        "detail": e.detail,
        "image_sha256": e.image_sha256,
        "bytes": e.bytes,
        "total_bytes": e.total_bytes,
    })
}

/// One event on one line: `SEQ TIME VM TYPE STATE cause=CAUSE detail`, with
/// `-` for what is missing, so `awk` finds the same column on every line.
/// Image events (which have no VM when they come from `image pull`) add
/// `image=SHA` (its first 12 digits) and `DONE/TOTAL` bytes ("?" for an
/// unknown total) before the detail.
pub fn event_line(e: &Event) -> String {
    let vm = if e.vm_name.is_empty() {
        or_none(&e.vm_uuid)
    } else {
        e.vm_name.clone()
    };
    let mut line = format!(
        "{} {} {vm} {} {} cause={}",
        e.seq,
        or_none(&e.time),
        or_none_word(event_type_word(e.r#type)),
        or_none_word(state_word(e.state)),
        or_none_word(cause_word(e.cause)),
    );
    if !e.image_sha256.is_empty() {
        line.push_str(&format!(" image={}", short(&e.image_sha256, 12)));
    }
    if e.bytes != 0 || e.total_bytes != 0 {
        let total = if e.total_bytes == 0 {
            "?".to_owned()
        } else {
            size(e.total_bytes)
        };
        line.push_str(&format!(" {}/{total}", size(e.bytes)));
    }
    let detail = one_line(&e.detail);
    if !detail.is_empty() {
        line.push(' ');
        line.push_str(&detail);
    }
    line.push('\n');
    line
}

// ---- images ----

pub fn cached_image_json(c: &CachedImage) -> Value {
    json!({
        "sha256": c.sha256,
        "url": c.url,
        "size_bytes": c.size_bytes,
        "format": c.format,
        "location": c.location,
        "volume": c.volume,
        "users": c.users,
        "last_used": c.last_used,
    })
}

pub fn images_json(cs: &[CachedImage]) -> Value {
    json!({ "images": cs.iter().map(cached_image_json).collect::<Vec<_>>() })
}

/// Where a copy of an image is, in words: "the local cache", "pdisk volume X".
fn location_text(c: &CachedImage) -> String {
    match c.location.as_str() {
        "local" => "the local cache".to_owned(),
        "pdisk" if c.volume.is_empty() => "pdisk".to_owned(),
        "pdisk" => format!("pdisk volume {}", c.volume),
        "" => "an unknown place".to_owned(),
        other => other.to_owned(),
    }
}

/// One cached image in full (`image pull`).
pub fn image_view(c: &CachedImage) -> String {
    let users = match (c.location.as_str(), c.users) {
        ("pdisk", 1) => "clone",
        ("pdisk", _) => "clones",
        (_, 1) => "guest",
        _ => "guests",
    };
    fields(&[
        ("sha256", or_none(&c.sha256)),
        ("url", or_none(&c.url)),
        ("location", or_none(&c.location)),
        ("volume", or_none(&c.volume)),
        ("size", size(c.size_bytes)),
        ("format", or_none(&c.format)),
        ("users", format!("{} {users}", c.users)),
        ("last used", or_none(&c.last_used)),
    ])
}

/// `image list`: one row per copy (an image both cached here and imported
/// into pdisk has two), the URL last as the widest column.
pub fn images_table(cs: &[CachedImage]) -> String {
    let mut t = Table::new([
        "SHA256",
        "LOCATION",
        "VOLUME",
        "SIZE",
        "FORMAT",
        "USERS",
        "LAST USED",
        "URL",
    ]);
    for c in cs {
        t.row([
            or_none(&short(&c.sha256, 16)),
            or_none(&c.location),
            or_none(&c.volume),
            size(c.size_bytes),
            or_none(&c.format),
            c.users.to_string(),
            or_none(&c.last_used),
            or_none(&c.url),
        ]);
    }
    t.render()
}

/// `image rm`: the checksum asked for and the copies removed.
pub fn evicted_json(sha256: &str, evicted: &[CachedImage]) -> Value {
    json!({
        "sha256": sha256,
        "evicted": evicted.iter().map(cached_image_json).collect::<Vec<_>>(),
    })
}

/// `image rm`: one line per copy removed.
pub fn evicted_text(sha256: &str, evicted: &[CachedImage]) -> String {
    if evicted.is_empty() {
        return format!(
            "Nothing evicted: image {} is not cached.\n",
            short(sha256, 16)
        );
    }
    evicted
        .iter()
        .map(|c| {
            let sha = if c.sha256.is_empty() {
                sha256
            } else {
                &c.sha256
            };
            format!(
                "Evicted image {} from {} ({}).\n",
                short(sha, 16),
                location_text(c),
                size(c.size_bytes)
            )
        })
        .collect()
}

// ---- host ----

pub fn host_json(h: &Host) -> Value {
    json!({
        "hostname": h.hostname,
        "cpus": h.cpus,
        "memory_bytes": h.memory_bytes,
        "free_vcpus": h.free_vcpus,
        "free_memory_bytes": h.free_memory_bytes,
        "accelerator": h.accelerator,
        "accelerator_reason": h.accelerator_reason,
        "qemu_version": h.qemu_version,
        "agent_version": h.agent_version,
        "initiator_iqn": h.initiator_iqn,
        "vm_count": h.vm_count,
        "running_vms": h.running_vms,
        "last_event_seq": h.last_event_seq,
        "pdisk_server": h.pdisk_server,
    })
}

pub fn host_view(h: &Host) -> String {
    let accelerator = if h.accelerator_reason.is_empty() {
        or_none(&h.accelerator)
    } else {
        format!(
            "{} ({})",
            or_none(&h.accelerator),
            one_line(&h.accelerator_reason)
        )
    };
    fields(&[
        ("hostname", or_none(&h.hostname)),
        ("cpus", h.cpus.to_string()),
        ("memory", size(h.memory_bytes)),
        ("free vcpus", h.free_vcpus.to_string()),
        ("free memory", size(h.free_memory_bytes)),
        ("accelerator", accelerator),
        ("qemu", or_none(&h.qemu_version)),
        ("agent", or_none(&h.agent_version)),
        ("initiator", or_none(&h.initiator_iqn)),
        ("pdisk server", or_none(&h.pdisk_server)),
        ("vms", format!("{} ({} running)", h.vm_count, h.running_vms)),
        ("last event", h.last_event_seq.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_proto::agent::v1::{Contextualization, KernelBoot};

    fn vm() -> Vm {
        Vm {
            uuid: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
            name: "web1".into(),
            spec: Some(VmSpec {
                name: "web1".into(),
                vcpus: 2,
                memory_bytes: 512 << 20,
                disks: vec![
                    DiskSpec {
                        source: Some(disk_spec::Source::PdiskVolume("web1-root".into())),
                        read_only: false,
                        boot_index: 1,
                        ..DiskSpec::default()
                    },
                    DiskSpec {
                        source: Some(disk_spec::Source::File("/srv/seed.iso".into())),
                        read_only: true,
                        boot_index: 0,
                        ..DiskSpec::default()
                    },
                ],
                nics: vec![NicSpec {
                    bridge: "br0".into(),
                    mac: String::new(),
                    vlan: 20,
                }],
                kernel: None,
                labels: [("tier", "web"), ("app", "shop")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                context: None,
            }),
            state: VmState::Running as i32,
            state_reason: String::new(),
            pid: 4242,
            disks: vec![AttachedDisk {
                device: "vda".into(),
                source: "pdisk:web1-root".into(),
                attachment: "iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus:web1-root/1".into(),
                read_only: false,
            }],
            nics: vec![AttachedNic {
                tap: "st-6f9619ff-0".into(),
                bridge: "br0".into(),
                mac: "52:54:00:12:34:56".into(),
                vlan: 20,
            }],
            console_log: "/var/lib/stratus/agent/vms/6f96/console.log".into(),
            created_at: "2026-11-02T10:00:00Z".into(),
            last_event_seq: 42,
        }
    }

    #[test]
    fn enums_are_lowercase_words() {
        assert_eq!(state_word(VmState::Running as i32), "running");
        assert_eq!(state_word(VmState::Unspecified as i32), "unspecified");
        assert_eq!(state_word(99), "unknown(99)");
        assert_eq!(
            event_type_word(EventType::DiskAttached as i32),
            "disk_attached"
        );
        assert_eq!(
            event_type_word(EventType::DiskIoError as i32),
            "disk_io_error"
        );
        assert_eq!(cause_word(EventCause::Api as i32), "api");
        assert_eq!(cause_word(EventCause::GuestPanic as i32), "guest_panic");
        assert!(is_active(VmState::Paused as i32));
        assert!(!is_active(VmState::Stopped as i32));
        assert!(!is_active(77));
    }

    #[test]
    fn vm_json_keeps_proto_names() {
        let j = vm_json(&vm());
        assert_eq!(j["state"], "running");
        assert_eq!(j["spec"]["memory_bytes"], 512u64 << 20);
        assert_eq!(j["spec"]["disks"][0]["pdisk_volume"], "web1-root");
        assert_eq!(j["spec"]["disks"][0]["boot_index"], 1);
        assert_eq!(j["spec"]["disks"][1]["file"], "/srv/seed.iso");
        assert_eq!(j["spec"]["disks"][1]["read_only"], true);
        assert_eq!(j["spec"]["nics"][0]["vlan"], 20);
        assert_eq!(j["spec"]["kernel"], Value::Null);
        assert_eq!(
            serde_json::to_string(&j["spec"]["labels"]).unwrap(),
            r#"{"app":"shop","tier":"web"}"#,
            "keys sorted"
        );
        assert_eq!(j["disks"][0]["device"], "vda");
        assert_eq!(j["nics"][0]["mac"], "52:54:00:12:34:56");
        assert_eq!(j["last_event_seq"], 42);
        assert_eq!(vms_json(&[vm()])["vms"][0]["name"], "web1");

        let mut v = vm();
        v.spec.as_mut().unwrap().kernel = Some(KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: String::new(),
            cmdline: "console=ttyS0".into(),
        });
        assert_eq!(vm_json(&v)["spec"]["kernel"]["cmdline"], "console=ttyS0");
    }

    #[test]
    fn vm_view_shows_disks_and_nics() {
        let text = vm_view(&vm());
        assert!(text.starts_with("name:        web1\n"), "{text}");
        assert!(text.contains("state:       running\n"), "{text}");
        assert!(text.contains("memory:      512M\n"), "{text}");
        assert!(text.contains("labels:      app=shop,tier=web\n"), "{text}");
        assert!(
            text.contains("kernel:      - (boots from disk)\n"),
            "{text}"
        );
        let tables: Vec<&str> = text.split("\n\n").collect();
        assert_eq!(tables.len(), 3, "{text}");
        assert_eq!(
            tables[1],
            "DEVICE  SOURCE              MODE  BOOT  ATTACHMENT\n\
             vda     pdisk:web1-root     rw    1     \
             iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus:web1-root/1\n\
             -       file:/srv/seed.iso  ro    -     -"
        );
        assert_eq!(
            tables[2],
            "TAP            BRIDGE  MAC                VLAN\n\
             st-6f9619ff-0  br0     52:54:00:12:34:56  20\n"
        );

        let mut defined = vm();
        defined.state = VmState::Error as i32;
        defined.state_reason = "qemu: could not open\n/dev/x".into();
        defined.pid = 0;
        defined.disks.clear();
        defined.nics.clear();
        let text = vm_view(&defined);
        assert!(
            text.contains("state:       error (qemu: could not open /dev/x)\n"),
            "{text}"
        );
        assert!(text.contains("pid:         -\n"), "{text}");
        assert!(
            text.contains("-    br0     (generated)  20\n"),
            "the MAC is generated at start: {text}"
        );
    }

    #[test]
    fn the_seed_shows_as_hostname_and_contents() {
        let text = vm_view(&vm());
        assert!(text.contains("hostname:    -\n"), "{text}");
        assert!(text.contains("seed:        -\n"), "{text}");
        assert_eq!(vm_json(&vm())["spec"]["context"], Value::Null);

        let mut v = vm();
        v.spec.as_mut().unwrap().context = Some(Contextualization::default());
        v.disks.push(AttachedDisk {
            device: "vdb".into(),
            source: "file:/srv/seed.iso".into(),
            attachment: "/srv/seed.iso".into(),
            read_only: true,
        });
        v.disks.push(AttachedDisk {
            device: "vdc".into(),
            source: "seed".into(),
            attachment: "/var/lib/stratus/agent/vms/6f96/seed.img".into(),
            read_only: true,
        });
        let text = vm_view(&v);
        assert!(text.contains("hostname:    web1 (the VM name)\n"), "{text}");
        assert!(text.contains("seed:        default user-data\n"), "{text}");
        assert!(
            text.contains(
                "vdc     seed                ro    -     /var/lib/stratus/agent/vms/6f96/seed.img"
            ),
            "{text}"
        );

        v.spec.as_mut().unwrap().context = Some(Contextualization {
            hostname: "app1.example.org".into(),
            user_data: "#cloud-config\n".into(),
            network_config: "version: 2\n".into(),
            ssh_keys: vec!["ssh-ed25519 AAAA a".into(), "ssh-ed25519 AAAA b".into()],
        });
        let text = vm_view(&v);
        assert!(text.contains("hostname:    app1.example.org\n"), "{text}");
        assert!(
            text.contains("seed:        user-data 14B, network-config 11B, 2 ssh keys\n"),
            "{text}"
        );
        let j = vm_json(&v);
        assert_eq!(j["spec"]["context"]["hostname"], "app1.example.org");
        assert_eq!(j["spec"]["context"]["ssh_keys"][1], "ssh-ed25519 AAAA b");
    }

    #[test]
    fn vm_table_is_human() {
        let mut stopped = vm();
        stopped.name = "db".into();
        stopped.state = VmState::Stopped as i32;
        stopped.pid = 0;
        stopped.spec.as_mut().unwrap().labels.clear();
        let out = vms_table(&[vm(), stopped]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME  UUID"), "{out}");
        assert!(
            lines[1].ends_with("running  2      512M    2      1     4242  app=shop,tier=web"),
            "{out}"
        );
        assert!(
            lines[2].ends_with("stopped  2      512M    2      1     -     -"),
            "{out}"
        );
        assert_eq!(
            vms_table(&[]),
            "NAME  UUID  STATE  VCPUS  MEMORY  DISKS  NICS  PID  LABELS\n"
        );
    }

    #[test]
    fn events_print_one_line_each() {
        let mut e = Event {
            seq: 42,
            time: "2026-11-02T10:00:00.123456Z".into(),
            vm_uuid: "6f96".into(),
            vm_name: "web1".into(),
            r#type: EventType::DiskAttached as i32,
            state: VmState::Starting as i32,
            cause: EventCause::Api as i32,
            detail: "vda pdisk:web1-root\nvia iscsi".into(),
            ..Event::default()
        };
        assert_eq!(
            event_line(&e),
            "42 2026-11-02T10:00:00.123456Z web1 disk_attached starting cause=api \
             vda pdisk:web1-root via iscsi\n"
        );
        let j = event_json(&e);
        assert_eq!(j["type"], "disk_attached");
        assert_eq!(j["state"], "starting");
        assert_eq!(j["cause"], "api");
        assert_eq!(j["seq"], 42);
        assert!(!j.to_string().contains('\n'), "one JSON Line");
        e.vm_name.clear();
        e.detail.clear();
        e.state = VmState::Unspecified as i32;
        e.cause = EventCause::Reconciliation as i32;
        e.r#type = EventType::Adopted as i32;
        assert_eq!(
            event_line(&e),
            "42 2026-11-02T10:00:00.123456Z 6f96 adopted - cause=reconciliation\n"
        );
        assert_eq!(event_json(&e)["state"], "unspecified");
    }

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn image_vm() -> Vm {
        let mut v = vm();
        let disks = &mut v.spec.as_mut().unwrap().disks;
        disks[0] = DiskSpec {
            source: Some(disk_spec::Source::Image(ImageRef {
                url: "https://img.example/deb.qcow2".into(),
                sha256: SHA.into(),
                format: ImageFormat::Qcow2 as i32,
                endorser: "ops".into(),
            })),
            read_only: false,
            boot_index: 1,
            size_bytes: 10 << 30,
            persistence: DiskPersistence::Clone as i32,
        };
        disks.push(DiskSpec {
            source: Some(disk_spec::Source::Image(ImageRef {
                url: "file:///srv/a.raw".into(),
                sha256: SHA.into(),
                format: ImageFormat::Auto as i32,
                endorser: String::new(),
            })),
            persistence: DiskPersistence::Local as i32,
            ..DiskSpec::default()
        });
        v.disks[0].source = format!("image:{SHA}");
        v
    }

    #[test]
    fn image_disks_show_url_checksum_size_and_persistence() {
        let text = vm_view(&image_vm());
        let tables: Vec<&str> = text.split("\n\n").collect();
        assert_eq!(
            tables[1],
            "DEVICE  SOURCE                                                   MODE  BOOT  SIZE   \
             PERSISTENCE  ATTACHMENT\n\
             vda     image:https://img.example/deb.qcow2 sha256=9f86d081884c  rw    1     10G    \
             clone        iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus:web1-root/1\n\
             -       file:/srv/seed.iso                                       ro    -     -      \
             -            -\n\
             -       image:file:///srv/a.raw sha256=9f86d081884c              rw    -     image  \
             local        -"
        );
        // Without image disks, the table keeps its five columns.
        assert!(vm_view(&vm()).contains("\nDEVICE  SOURCE              MODE  BOOT  ATTACHMENT\n"));

        let j = vm_json(&image_vm());
        let d = &j["spec"]["disks"][0];
        assert_eq!(d["image"]["url"], "https://img.example/deb.qcow2");
        assert_eq!(d["image"]["sha256"], SHA, "whole in JSON");
        assert_eq!(d["image"]["format"], "qcow2");
        assert_eq!(d["image"]["endorser"], "ops");
        assert_eq!(d["size_bytes"], 10u64 << 30);
        assert_eq!(d["persistence"], "clone");
        assert_eq!(d["boot_index"], 1);
        assert_eq!(d.get("pdisk_volume"), None);
        let d = &j["spec"]["disks"][2];
        assert_eq!(d["image"]["format"], "auto");
        assert_eq!(d["size_bytes"], 0);
        assert_eq!(d["persistence"], "local");
        let d = &j["spec"]["disks"][1];
        assert_eq!(d["file"], "/srv/seed.iso");
        assert_eq!(d.get("persistence"), None, "image disks only");
        assert_eq!(j["disks"][0]["source"], format!("image:{SHA}"));
        assert_eq!(format_word(7), "unknown(7)");
        assert_eq!(persistence_word(DiskPersistence::Local as i32), "local");
    }

    fn images() -> Vec<CachedImage> {
        vec![
            CachedImage {
                sha256: SHA.into(),
                url: "https://img.example/deb.qcow2".into(),
                size_bytes: 2 << 30,
                format: "qcow2".into(),
                location: "local".into(),
                volume: String::new(),
                users: 2,
                last_used: "2026-11-02T10:00:00Z".into(),
            },
            CachedImage {
                sha256: SHA.into(),
                url: String::new(),
                size_bytes: 2 << 30,
                format: "raw".into(),
                location: "pdisk".into(),
                volume: "image-9f86d081884c".into(),
                users: 0,
                last_used: "2026-11-01T09:00:00Z".into(),
            },
        ]
    }

    #[test]
    fn images_list_as_a_table_and_json() {
        assert_eq!(
            images_table(&images()),
            "SHA256            LOCATION  VOLUME              SIZE  FORMAT  USERS  \
             LAST USED             URL\n\
             9f86d081884c7d65  local     -                   2G    qcow2   2      \
             2026-11-02T10:00:00Z  https://img.example/deb.qcow2\n\
             9f86d081884c7d65  pdisk     image-9f86d081884c  2G    raw     0      \
             2026-11-01T09:00:00Z  -\n"
        );
        assert_eq!(
            images_table(&[]),
            "SHA256  LOCATION  VOLUME  SIZE  FORMAT  USERS  LAST USED  URL\n"
        );
        let j = images_json(&images());
        assert_eq!(j["images"][0]["sha256"], SHA);
        assert_eq!(j["images"][0]["size_bytes"], 2u64 << 30);
        assert_eq!(j["images"][0]["users"], 2);
        assert_eq!(j["images"][1]["volume"], "image-9f86d081884c");
        assert_eq!(j["images"][1]["location"], "pdisk");
        assert_eq!(j["images"][1]["last_used"], "2026-11-01T09:00:00Z");
    }

    #[test]
    fn a_pulled_image_shows_in_full() {
        let [local, pdisk] = images().try_into().unwrap();
        let text = image_view(&local);
        assert_eq!(
            text,
            format!(
                "sha256:     {SHA}\n\
                 url:        https://img.example/deb.qcow2\n\
                 location:   local\n\
                 volume:     -\n\
                 size:       2G\n\
                 format:     qcow2\n\
                 users:      2 guests\n\
                 last used:  2026-11-02T10:00:00Z\n"
            )
        );
        let text = image_view(&pdisk);
        assert!(text.contains("volume:     image-9f86d081884c\n"), "{text}");
        assert!(text.contains("users:      0 clones\n"), "{text}");
        let one = CachedImage { users: 1, ..pdisk };
        assert!(image_view(&one).contains("users:      1 clone\n"));
        assert_eq!(cached_image_json(&local)["format"], "qcow2");
    }

    #[test]
    fn evictions_print_one_line_per_copy() {
        let mut evicted = images();
        evicted[1].sha256.clear();
        assert_eq!(
            evicted_text(SHA, &evicted),
            "Evicted image 9f86d081884c7d65 from the local cache (2G).\n\
             Evicted image 9f86d081884c7d65 from pdisk volume image-9f86d081884c (2G).\n"
        );
        assert_eq!(
            evicted_text(SHA, &[]),
            "Nothing evicted: image 9f86d081884c7d65 is not cached.\n"
        );
        let j = evicted_json(SHA, &evicted);
        assert_eq!(j["sha256"], SHA);
        assert_eq!(j["evicted"][0]["location"], "local");
        assert_eq!(j["evicted"][1]["volume"], "image-9f86d081884c");
        assert_eq!(evicted_json(SHA, &[])["evicted"], json!([]));
    }

    #[test]
    fn image_events_show_checksum_and_progress() {
        let mut e = Event {
            seq: 7,
            time: "2026-11-02T10:00:00.000001Z".into(),
            r#type: EventType::ImagePullProgress as i32,
            cause: EventCause::Api as i32,
            detail: "https://img.example/deb.qcow2".into(),
            image_sha256: SHA.into(),
            bytes: 512 << 20,
            total_bytes: 2 << 30,
            ..Event::default()
        };
        assert_eq!(
            event_line(&e),
            "7 2026-11-02T10:00:00.000001Z - image_pull_progress - cause=api \
             image=9f86d081884c 512M/2G https://img.example/deb.qcow2\n"
        );
        let j = event_json(&e);
        assert_eq!(j["type"], "image_pull_progress");
        assert_eq!(j["image_sha256"], SHA);
        assert_eq!(j["bytes"], 512u64 << 20);
        assert_eq!(j["total_bytes"], 2u64 << 30);
        assert_eq!(j["vm_name"], "");

        e.total_bytes = 0;
        e.bytes = 1536 << 20;
        assert!(
            event_line(&e).contains(" image=9f86d081884c 1.5G/? "),
            "unknown total: {}",
            event_line(&e)
        );
        e.bytes = 0;
        e.r#type = EventType::ImagePullStarted as i32;
        e.vm_name = "web1".into();
        e.state = VmState::Starting as i32;
        assert_eq!(
            event_line(&e),
            "7 2026-11-02T10:00:00.000001Z web1 image_pull_started starting cause=api \
             image=9f86d081884c https://img.example/deb.qcow2\n"
        );
        for (t, word) in [
            (EventType::ImageCached, "image_cached"),
            (EventType::ImagePullFailed, "image_pull_failed"),
            (EventType::ImageEvicted, "image_evicted"),
            (EventType::ImageImported, "image_imported"),
        ] {
            e.r#type = t as i32;
            assert!(event_line(&e).contains(&format!(" {word} ")), "{word}");
            assert_eq!(event_json(&e)["type"], word);
        }
        // Other events: no image fields on the line, zeros in JSON.
        let plain = Event {
            seq: 8,
            r#type: EventType::Running as i32,
            ..Event::default()
        };
        assert_eq!(event_line(&plain), "8 - - running - cause=-\n");
        assert_eq!(event_json(&plain)["image_sha256"], "");
        assert_eq!(event_json(&plain)["bytes"], 0);
    }

    #[test]
    fn host_shows_capacity_and_accelerator() {
        let h = Host {
            hostname: "hv1".into(),
            cpus: 8,
            memory_bytes: 32 << 30,
            free_vcpus: 6,
            free_memory_bytes: 31 << 30,
            accelerator: "tcg".into(),
            accelerator_reason: "the CPU has no vmx or svm flag".into(),
            qemu_version: "7.2.0".into(),
            agent_version: "0.1.0".into(),
            initiator_iqn: "iqn.2026-11.io.stratus:hv1".into(),
            vm_count: 3,
            running_vms: 1,
            last_event_seq: 42,
            pdisk_server: String::new(),
        };
        let j = host_json(&h);
        assert_eq!(j["memory_bytes"], 32u64 << 30);
        assert_eq!(j["accelerator"], "tcg");
        assert_eq!(j["running_vms"], 1);
        let text = host_view(&h);
        assert!(
            text.contains("accelerator:   tcg (the CPU has no vmx or svm flag)\n"),
            "{text}"
        );
        assert!(text.contains("memory:        32G\n"), "{text}");
        assert!(text.contains("vms:           3 (1 running)\n"), "{text}");
        assert!(text.contains("pdisk server:  -\n"), "{text}");
    }
}
