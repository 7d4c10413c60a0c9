//! How results look: each agent.v1 message as JSON (for `--json`) and as
//! human text (tables, `key: value` blocks, one line per event).
//!
//! JSON keeps the proto field names, sizes as numbers of bytes, enums as
//! lowercase words ("running", "disk_attached", "api") and labels as an
//! object with sorted keys, so the output is stable for scripts whatever
//! order the server sends.
//!
//! One file per noun: `vm.rs`, `events.rs`, `image.rs`, `host.rs`; the
//! enum words and small helpers they share are here.

use stratus_core::types::ByteSize;
use stratus_proto::agent::v1::{DiskPersistence, EventCause, EventType, ImageFormat, VmState};

mod events;
mod host;
mod image;
mod quota;
#[cfg(test)]
mod tests;
mod vm;

pub use events::{event_json, event_line};
pub use host::{host_json, host_view};
pub use image::{
    cached_image_json, evicted_json, evicted_text, image_view, images_json, images_table,
};
pub use quota::{quota_json, quota_view, quotas_json, quotas_table};
pub use vm::{vm_json, vm_view, vms_json, vms_table};

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
