//! Events: one JSON object or one text line each.

use serde_json::{json, Value};
use stratus_core::cli::failure::one_line;
use stratus_proto::agent::v1::Event;

use super::{cause_word, event_type_word, or_none, or_none_word, short, size, state_word};

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
