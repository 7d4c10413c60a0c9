//! VMs: one in detail (state, disks, NICs, seed), the list as a table, and
//! both as JSON.

use serde_json::{json, Value};
use stratus_core::cli::failure::one_line;
use stratus_core::cli::{fields, labels_json, labels_text, Table};
use stratus_proto::agent::v1::{
    disk_spec, AttachedDisk, AttachedNic, DiskQos, DiskSpec, ImageRef, NicSpec, Vm, VmSpec,
};

use super::{format_word, or_none, persistence_word, short, size, state_word, NONE};

pub(super) fn image_ref_json(i: &ImageRef) -> Value {
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
pub(super) fn disk_spec_json(d: &DiskSpec) -> Value {
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
    if let Some(q) = d.qos.as_ref().filter(|q| !qos_fields(q).is_empty()) {
        j["qos"] = Value::Object(
            qos_fields(q)
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        );
    }
    j
}

/// A disk's limits that are set, by their API names.
pub(super) fn qos_fields(q: &DiskQos) -> Vec<(&'static str, Value)> {
    let all = [
        ("iops_total", q.iops_total),
        ("iops_total_max", q.iops_total_max),
        ("iops_total_max_length", q.iops_total_max_length),
        ("iops_read", q.iops_read),
        ("iops_read_max", q.iops_read_max),
        ("iops_read_max_length", q.iops_read_max_length),
        ("iops_write", q.iops_write),
        ("iops_write_max", q.iops_write_max),
        ("iops_write_max_length", q.iops_write_max_length),
        ("bps_total", q.bps_total),
        ("bps_total_max", q.bps_total_max),
        ("bps_total_max_length", q.bps_total_max_length),
        ("bps_read", q.bps_read),
        ("bps_read_max", q.bps_read_max),
        ("bps_read_max_length", q.bps_read_max_length),
        ("bps_write", q.bps_write),
        ("bps_write_max", q.bps_write_max),
        ("bps_write_max_length", q.bps_write_max_length),
        ("iops_size", q.iops_size),
    ];
    let mut out: Vec<(&'static str, Value)> = all
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k, json!(v)))
        .collect();
    if !q.group.is_empty() {
        out.push(("group", json!(q.group)));
    }
    out
}

/// `iops_total=200 bps_write=10485760 group=db`, or `-`.
pub(super) fn qos_text(d: &DiskSpec) -> String {
    let f = d.qos.as_ref().map(qos_fields).unwrap_or_default();
    if f.is_empty() {
        return NONE.to_owned();
    }
    f.iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            v => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A disk source as the command line and AttachedDisk.source write it; an
/// image as its URL and the start of its checksum.
pub(super) fn disk_source_text(d: &DiskSpec) -> String {
    match &d.source {
        Some(disk_spec::Source::PdiskVolume(v)) => format!("pdisk:{v}"),
        Some(disk_spec::Source::File(f)) => format!("file:{f}"),
        Some(disk_spec::Source::Image(i)) => {
            format!("image:{} sha256={}", i.url, short(&i.sha256, 12))
        }
        None => NONE.to_owned(),
    }
}

pub(super) fn is_image(d: &DiskSpec) -> bool {
    matches!(d.source, Some(disk_spec::Source::Image(_)))
}

pub(super) fn nic_spec_json(n: &NicSpec) -> Value {
    json!({ "bridge": n.bridge, "mac": n.mac, "vlan": n.vlan, "ips": n.ips })
}

pub(super) fn attached_disk_json(d: &AttachedDisk) -> Value {
    json!({
        "device": d.device,
        "source": d.source,
        "attachment": d.attachment,
        "read_only": d.read_only,
    })
}

pub(super) fn attached_nic_json(n: &AttachedNic) -> Value {
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

pub(super) fn state_text(v: &Vm) -> String {
    let state = state_word(v.state);
    if v.state_reason.is_empty() {
        state
    } else {
        format!("{state} ({})", one_line(&v.state_reason))
    }
}

pub(super) fn pid_text(pid: u32) -> String {
    if pid == 0 {
        NONE.to_owned()
    } else {
        pid.to_string()
    }
}

pub(super) fn vlan_text(vlan: u32) -> String {
    if vlan == 0 {
        NONE.to_owned()
    } else {
        vlan.to_string()
    }
}

/// Disks as the spec asks for them, beside what was attached (in spec order)
/// while the VM runs. A VM with image disks gets two more columns: the
/// disk's size ("image" for the image's own) and its persistence.
pub(super) fn disks_table(spec: &[DiskSpec], attached: &[AttachedDisk]) -> String {
    let images = spec.iter().any(is_image);
    let limited = spec.iter().any(|s| qos_text(s) != NONE);
    let mut header = vec!["DEVICE", "SOURCE", "MODE", "BOOT"];
    if images {
        header.extend(["SIZE", "PERSISTENCE"]);
    }
    header.push("ATTACHMENT");
    if limited {
        header.push("QOS");
    }
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
        if limited {
            row.push(s.map_or(NONE.to_owned(), qos_text));
        }
        t.row(row);
    }
    t.render()
}

/// NICs as the spec asks for them, with the taps and generated MACs once
/// attached.
pub(super) fn nics_table(spec: &[NicSpec], attached: &[AttachedNic]) -> String {
    let mut t = Table::new(["TAP", "BRIDGE", "MAC", "VLAN", "IPS"]);
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
            s.filter(|s| !s.ips.is_empty())
                .map_or("(any)".to_owned(), |s| s.ips.join(",")),
        ]);
    }
    t.render()
}

/// The guest's hostname and what its cloud-init seed holds, or "-" for
/// both when it has none.
pub(super) fn context_text(spec: &VmSpec) -> (String, String) {
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
