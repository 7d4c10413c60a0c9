//! Images: cached and pdisk copies, one in full, the list, and evictions.

use serde_json::{json, Value};
use stratus_core::cli::{fields, Table};
use stratus_proto::agent::v1::{CachedImage, PdiskServer};

use super::{or_none, short, size};

pub fn cached_image_json(c: &CachedImage) -> Value {
    json!({
        "sha256": c.sha256,
        "url": c.url,
        "size_bytes": c.size_bytes,
        "format": c.format,
        "location": c.location,
        "server": c.server,
        "volume": c.volume,
        "users": c.users,
        "last_used": c.last_used,
        "endorser": c.endorser,
        "endorser_key": c.endorser_key,
    })
}

/// The image list, and the pdisk servers whose bases it lacks.
pub fn images_json(cs: &[CachedImage], unreachable: &[PdiskServer]) -> Value {
    json!({
        "images": cs.iter().map(cached_image_json).collect::<Vec<_>>(),
        "unreachable_servers": unreachable.iter().map(|s| json!({
            "name": s.name,
            "error": s.last_error,
        })).collect::<Vec<_>>(),
    })
}

/// A pdisk copy's server when it is not the default one: " on pdisk server B".
fn on_server(c: &CachedImage) -> String {
    match c.server.as_str() {
        "" | "default" => String::new(),
        s => format!(" on pdisk server {s}"),
    }
}

/// Where a copy of an image is, in words: "the local cache", "pdisk volume
/// X" (and its server unless the default one).
pub(super) fn location_text(c: &CachedImage) -> String {
    match c.location.as_str() {
        "local" => "the local cache".to_owned(),
        "pdisk" if c.volume.is_empty() => format!("pdisk{}", on_server(c)),
        "pdisk" => format!("pdisk volume {}{}", c.volume, on_server(c)),
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
        ("volume", format!("{}{}", or_none(&c.volume), on_server(c))),
        ("size", size(c.size_bytes)),
        ("format", or_none(&c.format)),
        ("users", format!("{} {users}", c.users)),
        ("last used", or_none(&c.last_used)),
        ("endorsed by", endorsed(c)),
    ])
}

/// Who vouched for a cached image (a verified endorsement) and with which
/// key, or "-".
fn endorsed(c: &CachedImage) -> String {
    match (c.endorser.as_str(), c.endorser_key.as_str()) {
        ("", _) => "-".to_owned(),
        (who, "") => who.to_owned(),
        (who, key) => format!("{who} (key {key})"),
    }
}

/// `image list`: one row per copy (an image both cached here and imported
/// into pdisk has two; a pdisk copy on a server other than the default one
/// is located `pdisk:SERVER`), the URL last as the widest column; then a
/// line per pdisk server that could not be listed.
pub fn images_table(cs: &[CachedImage], unreachable: &[PdiskServer]) -> String {
    let mut t = Table::new([
        "SHA256",
        "LOCATION",
        "VOLUME",
        "SIZE",
        "FORMAT",
        "USERS",
        "LAST USED",
        "ENDORSED BY",
        "URL",
    ]);
    for c in cs {
        t.row([
            or_none(&short(&c.sha256, 16)),
            match (c.location.as_str(), c.server.as_str()) {
                ("pdisk", s) if !s.is_empty() && s != "default" => format!("pdisk:{s}"),
                _ => or_none(&c.location),
            },
            or_none(&c.volume),
            size(c.size_bytes),
            or_none(&c.format),
            c.users.to_string(),
            or_none(&c.last_used),
            or_none(&c.endorser),
            or_none(&c.url),
        ]);
    }
    let mut out = t.render();
    for s in unreachable {
        out.push_str(&format!(
            "pdisk server {} could not be listed (its image bases are missing above): {}\n",
            s.name,
            stratus_core::cli::failure::one_line(&s.last_error)
        ));
    }
    out
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
