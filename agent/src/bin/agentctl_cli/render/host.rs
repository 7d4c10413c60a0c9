//! The host: capacity, accelerator, versions, initiator, pdisk servers
//! and VM counts.

use serde_json::{json, Value};
use stratus_core::cli::failure::one_line;
use stratus_core::cli::fields;
use stratus_proto::agent::v1::Host;

use super::{or_none, size};

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
        "pdisk_servers": h.pdisk_servers.iter().map(|s| json!({
            "name": s.name,
            "url": s.url,
            "reachable": s.reachable,
            "last_error": s.last_error,
            "last_error_at": s.last_error_at,
        })).collect::<Vec<_>>(),
        "qemu_confinement": h.qemu_confinement,
        "qemu_privilege_option": h.qemu_privilege_option,
        "qemu_seccomp": h.qemu_seccomp,
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
    // One line per pdisk server: its name, address and state.
    let servers: Vec<String> = h
        .pdisk_servers
        .iter()
        .map(|s| {
            let state = match (s.reachable, s.last_error.as_str()) {
                (true, "") => "reachable".to_owned(),
                (true, e) => format!(
                    "reachable (last error {}: {})",
                    or_none(&s.last_error_at),
                    one_line(e)
                ),
                (false, e) => format!(
                    "UNREACHABLE ({}: {})",
                    or_none(&s.last_error_at),
                    one_line(e)
                ),
            };
            format!("{} {}, {state}", s.name, or_none(&s.url))
        })
        .collect();
    let mut pairs: Vec<(&str, String)> = vec![
        ("hostname", or_none(&h.hostname)),
        ("cpus", h.cpus.to_string()),
        ("memory", size(h.memory_bytes)),
        ("free vcpus", h.free_vcpus.to_string()),
        ("free memory", size(h.free_memory_bytes)),
        ("accelerator", accelerator),
        ("qemu", or_none(&h.qemu_version)),
        ("confinement", or_none(&h.qemu_confinement)),
        (
            "qemu offers",
            format!(
                "{}, {}",
                if h.qemu_privilege_option.is_empty() {
                    "no privilege-drop option"
                } else {
                    &h.qemu_privilege_option
                },
                if h.qemu_seccomp {
                    "seccomp"
                } else {
                    "no seccomp"
                }
            ),
        ),
        ("agent", or_none(&h.agent_version)),
        ("initiator", or_none(&h.initiator_iqn)),
    ];
    if servers.is_empty() {
        pairs.push(("pdisk server", or_none(&h.pdisk_server)));
    }
    pairs.extend(servers.into_iter().map(|v| ("pdisk server", v)));
    pairs.push(("vms", format!("{} ({} running)", h.vm_count, h.running_vms)));
    pairs.push(("last event", h.last_event_seq.to_string()));
    fields(&pairs)
}
