//! How results look: each pdisk.v1 message as JSON (for `--json`) and as
//! human text (tables and `key: value` blocks).
//!
//! JSON keeps the proto field names, sizes as numbers of bytes, enums as
//! lowercase words ("ready") and labels as an object with sorted keys, so the
//! output is stable for scripts whatever order the server sends.

use serde_json::{json, Value};
use stratus_core::types::ByteSize;
use stratus_proto::pdisk::v1::{
    Drift, Export, Pool, PoolEvent, PoolEventType, Quota, Snapshot, Volume, VolumeState,
};

use stratus_core::cli::{fields, labels_json, labels_text, Table};

use crate::images::ImageEntry;

/// Shown for an empty value in human output.
const NONE: &str = "-";

pub fn state_name(state: i32) -> String {
    match VolumeState::try_from(state) {
        Ok(VolumeState::Unspecified) => "unspecified".into(),
        Ok(VolumeState::Creating) => "creating".into(),
        Ok(VolumeState::Ready) => "ready".into(),
        Ok(VolumeState::Deleting) => "deleting".into(),
        Ok(VolumeState::Error) => "error".into(),
        Ok(VolumeState::Quarantined) => "quarantined".into(),
        Err(_) => format!("unknown({state})"),
    }
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

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        NONE.to_owned()
    } else {
        items.join(",")
    }
}

// ---- volumes ----

pub fn volume_json(v: &Volume) -> Value {
    json!({
        "uuid": v.uuid,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "allocated_bytes": v.allocated_bytes,
        "labels": labels_json(&v.labels),
        "state": state_name(v.state),
        "state_reason": v.state_reason,
        "source": v.source,
        "created_at": v.created_at,
        "exported": v.exported,
        "snapshot_count": v.snapshot_count,
        "device_path": v.device_path,
        "project": v.project,
        "created_by": v.created_by,
        "deleted_at": v.deleted_at,
        "purge_at": v.purge_at,
        "flatten": flatten_json(v),
    })
}

/// A clone waiting for, or in, its background flatten; null otherwise.
fn flatten_json(v: &Volume) -> Value {
    if !v.flatten_pending {
        return Value::Null;
    }
    json!({
        "done_bytes": v.flatten_done_bytes,
        "total_bytes": v.flatten_total_bytes,
    })
}

/// "waiting its turn", "25% (16M of 64M)", or none.
fn flatten_text(v: &Volume) -> String {
    if !v.flatten_pending {
        return NONE.to_owned();
    }
    if v.flatten_total_bytes == 0 {
        return "waiting its turn".to_owned();
    }
    format!(
        "{}% ({} of {})",
        v.flatten_done_bytes * 100 / v.flatten_total_bytes,
        size(v.flatten_done_bytes),
        size(v.flatten_total_bytes)
    )
}

pub fn volumes_json(vs: &[Volume]) -> Value {
    json!({ "volumes": vs.iter().map(volume_json).collect::<Vec<_>>() })
}

fn state_text(v: &Volume) -> String {
    let state = state_name(v.state);
    if v.state_reason.is_empty() {
        state
    } else {
        format!("{state} ({})", v.state_reason)
    }
}

pub fn volume_view(v: &Volume) -> String {
    fields(&[
        ("name", v.name.clone()),
        ("uuid", v.uuid.clone()),
        ("size", size(v.size_bytes)),
        ("allocated", size(v.allocated_bytes)),
        ("state", state_text(v)),
        ("project", or_none(&v.project)),
        ("creator", or_none(&v.created_by)),
        ("source", or_none(&v.source)),
        ("labels", labels_text(&v.labels)),
        ("exported", yes_no(v.exported)),
        ("snapshots", v.snapshot_count.to_string()),
        ("created", or_none(&v.created_at)),
        ("device", or_none(&v.device_path)),
        ("deleted", or_none(&v.deleted_at)),
        ("purge at", or_none(&v.purge_at)),
        ("flatten", flatten_text(v)),
    ])
}

/// Volumes in quarantine: what they were and when they go.
pub fn quarantined_table(vs: &[Volume]) -> String {
    let mut t = Table::new([
        "NAME", "UUID", "PROJECT", "SIZE", "STATE", "DELETED", "PURGE AT",
    ]);
    for v in vs {
        t.row([
            v.name.clone(),
            v.uuid.clone(),
            or_none(&v.project),
            size(v.size_bytes),
            state_name(v.state),
            or_none(&v.deleted_at),
            or_none(&v.purge_at),
        ]);
    }
    t.render()
}

pub fn volumes_table(vs: &[Volume]) -> String {
    let mut t = Table::new([
        "NAME",
        "UUID",
        "SIZE",
        "ALLOCATED",
        "STATE",
        "EXPORTED",
        "SNAPSHOTS",
        "LABELS",
    ]);
    for v in vs {
        t.row([
            v.name.clone(),
            v.uuid.clone(),
            size(v.size_bytes),
            size(v.allocated_bytes),
            state_name(v.state),
            yes_no(v.exported),
            v.snapshot_count.to_string(),
            labels_text(&v.labels),
        ]);
    }
    t.render()
}

// ---- snapshots ----

pub fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "uuid": s.uuid,
        "name": s.name,
        "volume_uuid": s.volume_uuid,
        "volume_name": s.volume_name,
        "size_bytes": s.size_bytes,
        "allocated_bytes": s.allocated_bytes,
        "created_at": s.created_at,
    })
}

pub fn snapshots_json(ss: &[Snapshot]) -> Value {
    json!({ "snapshots": ss.iter().map(snapshot_json).collect::<Vec<_>>() })
}

pub fn snapshot_view(s: &Snapshot) -> String {
    fields(&[
        ("name", s.name.clone()),
        ("uuid", s.uuid.clone()),
        ("volume", format!("{} ({})", s.volume_name, s.volume_uuid)),
        ("size", size(s.size_bytes)),
        ("allocated", size(s.allocated_bytes)),
        ("created", or_none(&s.created_at)),
    ])
}

pub fn snapshots_table(ss: &[Snapshot]) -> String {
    let mut t = Table::new(["NAME", "UUID", "VOLUME", "SIZE", "ALLOCATED", "CREATED"]);
    for s in ss {
        t.row([
            s.name.clone(),
            s.uuid.clone(),
            s.volume_name.clone(),
            size(s.size_bytes),
            size(s.allocated_bytes),
            or_none(&s.created_at),
        ]);
    }
    t.render()
}

// ---- exports ----

pub fn export_json(e: &Export) -> Value {
    json!({
        "volume_uuid": e.volume_uuid,
        "volume_name": e.volume_name,
        "target_iqn": e.target_iqn,
        "portal": e.portal,
        "lun": e.lun,
        "initiators": e.initiators,
        "url": e.url,
        "chap_user": e.chap_user,
        "chap_target_user": e.chap_target_user,
        "exporter": e.exporter,
        // No key, only where the client host finds it.
        "rbd": e.rbd.as_ref().map(|r| json!({
            "monitors": r.monitors,
            "pool": r.pool,
            "image": r.image,
            "user": r.user,
            "secret_ref": r.secret_ref,
            "cluster_fsid": r.cluster_fsid,
        })),
        "local": e.local.as_ref().map(|l| json!({
            "path": l.path,
            "format": l.format,
            "block_device": l.block_device,
        })),
    })
}

pub fn exports_json(es: &[Export]) -> Value {
    json!({ "exports": es.iter().map(export_json).collect::<Vec<_>>() })
}

pub fn export_view(e: &Export) -> String {
    if let Some(r) = &e.rbd {
        return fields(&[
            ("volume", format!("{} ({})", e.volume_name, e.volume_uuid)),
            ("url", e.url.clone()),
            ("monitors", list_text(&r.monitors)),
            ("ceph user", r.user.clone()),
            ("key", r.secret_ref.clone()),
            ("cluster", r.cluster_fsid.clone()),
            ("initiators", list_text(&e.initiators)),
            ("exporter", or_none(&e.exporter)),
        ]);
    }
    fields(&[
        ("volume", format!("{} ({})", e.volume_name, e.volume_uuid)),
        ("target", e.target_iqn.clone()),
        ("portal", e.portal.clone()),
        ("lun", e.lun.to_string()),
        ("url", e.url.clone()),
        ("initiators", list_text(&e.initiators)),
        ("chap user", or_none(&e.chap_user)),
        ("chap target user", or_none(&e.chap_target_user)),
        ("exporter", or_none(&e.exporter)),
    ])
}

pub fn exports_table(es: &[Export]) -> String {
    let mut t = Table::new(["VOLUME", "TARGET", "PORTAL", "LUN", "INITIATORS", "CHAP"]);
    for e in es {
        // An rbd or local export has no target: its image or path instead.
        let target = if e.rbd.is_some() || e.local.is_some() {
            e.url.clone()
        } else {
            e.target_iqn.clone()
        };
        t.row([
            e.volume_name.clone(),
            target,
            e.portal.clone(),
            e.lun.to_string(),
            list_text(&e.initiators),
            or_none(&e.chap_user),
        ]);
    }
    t.render()
}

// ---- images ----

pub fn image_json(i: &ImageEntry<'_>) -> Value {
    json!({
        "sha256": i.sha256,
        "volume": i.base.name,
        "volume_uuid": i.base.uuid,
        "size_bytes": i.base.size_bytes,
        "allocated_bytes": i.base.allocated_bytes,
        "state": state_name(i.base.state),
        "clone_count": i.clones.len(),
        "clones": i.clone_names(),
        "created_at": i.base.created_at,
    })
}

pub fn images_json(is: &[ImageEntry<'_>]) -> Value {
    json!({ "images": is.iter().map(image_json).collect::<Vec<_>>() })
}

pub fn images_table(is: &[ImageEntry<'_>]) -> String {
    let mut t = Table::new(["SHA256", "VOLUME", "SIZE", "ALLOCATED", "CLONES", "CREATED"]);
    for i in is {
        t.row([
            i.short_sha(),
            i.base.name.clone(),
            size(i.base.size_bytes),
            size(i.base.allocated_bytes),
            i.clones.len().to_string(),
            or_none(&i.base.created_at),
        ]);
    }
    t.render()
}

// ---- pool ----

fn drift_json(d: &Drift) -> Value {
    json!({ "kind": d.kind, "object": d.object, "detail": d.detail })
}

/// A quota's limits and usage: numbers in JSON (a missing limit is null),
/// `used/limit` for people.
pub fn quota_json(q: &Quota) -> Value {
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    json!({
        "project": q.project,
        "limits": { "volumes": l.volumes, "snapshots": l.snapshots, "bytes": l.bytes },
        "usage": { "volumes": u.volumes, "snapshots": u.snapshots, "bytes": u.bytes },
    })
}

pub fn quotas_json(qs: &[Quota]) -> Value {
    json!({ "quotas": qs.iter().map(quota_json).collect::<Vec<_>>() })
}

fn of_limit(used: String, limit: Option<String>) -> String {
    format!("{used} of {}", limit.unwrap_or_else(|| "unlimited".into()))
}

fn quota_cells(q: &Quota) -> [String; 3] {
    let l = q.limits.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    [
        of_limit(u.volumes.to_string(), l.volumes.map(|n| n.to_string())),
        of_limit(u.snapshots.to_string(), l.snapshots.map(|n| n.to_string())),
        of_limit(size(u.bytes), l.bytes.map(size)),
    ]
}

pub fn quota_view(q: &Quota) -> String {
    let [volumes, snapshots, bytes] = quota_cells(q);
    fields(&[
        ("project", q.project.clone()),
        ("volumes", volumes),
        ("snapshots", snapshots),
        ("bytes", bytes),
    ])
}

pub fn quotas_table(qs: &[Quota]) -> String {
    let mut t = Table::new(["PROJECT", "VOLUMES", "SNAPSHOTS", "BYTES"]);
    for q in qs {
        let [volumes, snapshots, bytes] = quota_cells(q);
        t.row([q.project.clone(), volumes, snapshots, bytes]);
    }
    t.render()
}

pub fn pool_json(p: &Pool) -> Value {
    json!({
        "backend": p.backend,
        "exporter": p.exporter,
        "exporter_status": p.exporter_status,
        "location": p.location,
        "capacity_bytes": p.capacity_bytes,
        "provisioned_bytes": p.provisioned_bytes,
        "used_bytes": p.used_bytes,
        "allocated_bytes": p.allocated_bytes,
        "max_overcommit": p.max_overcommit,
        "data_percent": p.data_percent,
        "metadata_percent": p.metadata_percent,
        "thin_threshold_percent": p.thin_threshold_percent,
        "volume_count": p.volume_count,
        "snapshot_count": p.snapshot_count,
        "export_count": p.export_count,
        "quarantined_count": p.quarantined_count,
        "quarantined_bytes": p.quarantined_bytes,
        "capabilities": p.capabilities,
        "drift": p.drift.iter().map(drift_json).collect::<Vec<_>>(),
        "last_reconciled_at": p.last_reconciled_at,
    })
}

/// `part` as a share of the pool's capacity, when the capacity is known.
fn of_capacity(part: u64, capacity: u64) -> String {
    if capacity == 0 {
        size(part)
    } else {
        let pct = part as f64 * 100.0 / capacity as f64;
        format!("{} ({pct:.0}% of capacity)", size(part))
    }
}

pub fn pool_view(p: &Pool) -> String {
    let exporter = if p.exporter_status.is_empty() {
        or_none(&p.exporter)
    } else {
        format!("{} ({})", or_none(&p.exporter), p.exporter_status)
    };
    let overcommit = if p.max_overcommit > 0.0 {
        format!("{:.1}x", p.max_overcommit)
    } else {
        NONE.to_owned()
    };
    let drift = if p.drift.is_empty() {
        "none".to_owned()
    } else {
        format!(
            "{} difference(s), listed below; nothing was deleted",
            p.drift.len()
        )
    };
    let mut rows = vec![
        ("backend", or_none(&p.backend)),
        ("location", or_none(&p.location)),
        ("exporter", exporter),
        ("capacity", size(p.capacity_bytes)),
        ("used", of_capacity(p.used_bytes, p.capacity_bytes)),
        (
            "allocated",
            of_capacity(p.allocated_bytes, p.capacity_bytes),
        ),
        (
            "provisioned",
            of_capacity(p.provisioned_bytes, p.capacity_bytes),
        ),
    ];
    // Thin pools: how full data and metadata are, against the threshold.
    let past = |pct: f64| match p.thin_threshold_percent {
        Some(t) if pct > t => " (past the threshold)",
        _ => "",
    };
    if let Some(d) = p.data_percent {
        rows.push(("thin data", format!("{d:.2}%{}", past(d))));
    }
    if let Some(m) = p.metadata_percent {
        rows.push(("thin metadata", format!("{m:.2}%{}", past(m))));
    }
    if let Some(t) = p.thin_threshold_percent {
        rows.push((
            "thin threshold",
            format!("{t}% (new volumes, growth, clones, snapshots refused past it)"),
        ));
    }
    rows.extend([
        ("max overcommit", overcommit),
        ("volumes", p.volume_count.to_string()),
        (
            "quarantined",
            format!(
                "{} volume(s), {} (deleted, kept until their purge time)",
                p.quarantined_count,
                size(p.quarantined_bytes)
            ),
        ),
        ("snapshots", p.snapshot_count.to_string()),
        ("exports", p.export_count.to_string()),
        ("capabilities", list_text(&p.capabilities)),
        ("reconciled", or_none(&p.last_reconciled_at)),
        ("drift", drift),
    ]);
    let mut out = fields(&rows);
    if !p.drift.is_empty() {
        let mut t = Table::new(["KIND", "OBJECT", "DETAIL"]);
        for d in &p.drift {
            t.row([d.kind.clone(), d.object.clone(), d.detail.clone()]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

/// An event type as a lowercase word ("volume_created").
pub fn event_type_name(t: i32) -> String {
    match PoolEventType::try_from(t) {
        Ok(t) => t
            .as_str_name()
            .trim_start_matches("POOL_EVENT_TYPE_")
            .to_ascii_lowercase(),
        Err(_) => format!("unknown({t})"),
    }
}

pub fn event_json(e: &PoolEvent) -> Value {
    json!({
        "seq": e.seq,
        "time": e.time,
        "type": event_type_name(e.r#type),
        "volume_uuid": e.volume_uuid,
        "volume_name": e.volume_name,
        "project": e.project,
        "object_uuid": e.object_uuid,
        "object_name": e.object_name,
        "detail": e.detail,
        "bytes": e.bytes,
        "total_bytes": e.total_bytes,
    })
}

/// One event on one line: `SEQ TIME VOLUME TYPE [object=NAME] [SIZE|DONE/TOTAL] detail`,
/// with `-` for what is missing.
pub fn event_line(e: &PoolEvent) -> String {
    let volume = if e.volume_name.is_empty() {
        or_none(&e.volume_uuid)
    } else {
        e.volume_name.clone()
    };
    let mut line = format!(
        "{} {} {volume} {}",
        e.seq,
        or_none(&e.time),
        event_type_name(e.r#type)
    );
    if !e.object_name.is_empty() {
        line.push_str(&format!(" object={}", e.object_name));
    }
    if e.total_bytes != 0 {
        line.push_str(&format!(" {}/{}", size(e.bytes), size(e.total_bytes)));
    } else if e.bytes != 0 {
        line.push_str(&format!(" {}", size(e.bytes)));
    }
    let detail = stratus_core::cli::failure::one_line(&e.detail);
    if !detail.is_empty() {
        line.push(' ');
        line.push_str(&detail);
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume() -> Volume {
        Volume {
            uuid: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
            name: "db1".into(),
            size_bytes: 10 << 30,
            allocated_bytes: 1536 << 20,
            labels: [("tier", "gold"), ("app", "pg")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            state: VolumeState::Ready as i32,
            state_reason: String::new(),
            source: "snapshot:0f0e".into(),
            created_at: "2026-11-02T10:00:00Z".into(),
            exported: true,
            snapshot_count: 2,
            device_path: "/srv/pool/volumes/6f96.img".into(),
            clone_of_volume: String::new(),
            clone_of_snapshot: "0f0e".into(),
            image_sha256: String::new(),
            project: "astro".into(),
            created_by: "project/astro".into(),
            allow_multi_attach: false,
            deleted_at: String::new(),
            purge_at: String::new(),
            flatten_pending: false,
            flatten_done_bytes: 0,
            flatten_total_bytes: 0,
        }
    }

    #[test]
    fn quarantined_volumes_show_when_they_go() {
        let mut v = volume();
        v.state = VolumeState::Quarantined as i32;
        v.deleted_at = "2026-12-03T22:00:00Z".into();
        v.purge_at = "2026-12-04T22:00:00Z".into();
        let t = quarantined_table(std::slice::from_ref(&v));
        let header = t.lines().next().unwrap();
        assert!(
            header.contains("PURGE AT") && header.contains("DELETED"),
            "{t}"
        );
        let row = t.lines().nth(1).unwrap();
        for want in [
            "db1",
            "astro",
            "quarantined",
            "2026-12-03T22:00:00Z",
            "2026-12-04T22:00:00Z",
        ] {
            assert!(row.contains(want), "{want} missing: {t}");
        }
        let j = volume_json(&v);
        assert_eq!(j["state"], "quarantined");
        assert_eq!(j["purge_at"], "2026-12-04T22:00:00Z");
        assert!(volume_view(&v).contains("purge at"));
    }

    #[test]
    fn a_background_flatten_shows_its_progress() {
        let mut v = volume();
        assert!(volume_json(&v)["flatten"].is_null());
        v.flatten_pending = true;
        assert!(volume_view(&v).contains("waiting its turn"));
        v.flatten_done_bytes = 16 << 20;
        v.flatten_total_bytes = 64 << 20;
        let view = volume_view(&v);
        assert!(view.contains("25% (16M of 64M)"), "{view}");
        let j = volume_json(&v);
        assert_eq!(j["flatten"]["done_bytes"], 16 << 20);
        assert_eq!(j["flatten"]["total_bytes"], 64 << 20);
    }

    #[test]
    fn volume_json_uses_words_for_enums_and_numbers_for_sizes() {
        let j = volume_json(&volume());
        assert_eq!(j["state"], "ready");
        assert_eq!(j["size_bytes"], 10u64 << 30);
        assert_eq!(j["labels"], json!({"app": "pg", "tier": "gold"}));
        assert_eq!(j["exported"], true);
        assert_eq!(j["snapshot_count"], 2);
        let text = serde_json::to_string(&j["labels"]).unwrap();
        assert_eq!(text, r#"{"app":"pg","tier":"gold"}"#, "keys sorted");
        assert_eq!(volumes_json(&[volume()])["volumes"][0]["name"], "db1");
    }

    #[test]
    fn states_have_lowercase_names() {
        assert_eq!(state_name(VolumeState::Creating as i32), "creating");
        assert_eq!(state_name(VolumeState::Error as i32), "error");
        assert_eq!(state_name(42), "unknown(42)");
    }

    #[test]
    fn volume_table_is_human() {
        let mut v2 = volume();
        v2.name = "scratch".into();
        v2.labels.clear();
        v2.exported = false;
        v2.state = VolumeState::Error as i32;
        v2.state_reason = "import failed".into();
        let out = volumes_table(&[volume(), v2.clone()]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME     UUID"));
        assert!(lines[1].contains("10G") && lines[1].contains("1.5G"));
        assert!(lines[1].ends_with("app=pg,tier=gold"));
        assert!(lines[2].contains("error") && lines[2].ends_with('-'));
        assert!(volume_view(&v2).contains("state:      error (import failed)\n"));
    }

    #[test]
    fn export_and_snapshot_render() {
        let e = Export {
            volume_uuid: "u1".into(),
            volume_name: "db1".into(),
            target_iqn: "iqn.2026-11.io.stratus:db1".into(),
            portal: "10.0.0.5:3260".into(),
            lun: 1,
            initiators: vec![
                "iqn.2026-11.io.stratus:h1".into(),
                "iqn.2026-11.io.stratus:h2".into(),
            ],
            url: "iscsi://10.0.0.5:3260/iqn.2026-11.io.stratus:db1/1".into(),
            chap_user: String::new(),
            chap_target_user: String::new(),
            exporter: "tgt".into(),
            project: String::new(),
            rbd: None,
            local: None,
        };
        let j = export_json(&e);
        assert_eq!(j["initiators"][1], "iqn.2026-11.io.stratus:h2");
        assert_eq!(j["lun"], 1);
        let row = exports_table(std::slice::from_ref(&e));
        assert!(row
            .lines()
            .nth(1)
            .unwrap()
            .ends_with("iqn.2026-11.io.stratus:h1,iqn.2026-11.io.stratus:h2  -"));
        let view = export_view(&e);
        for label in ["chap user:", "chap target user:"] {
            let line = view.lines().find(|l| l.starts_with(label)).unwrap();
            assert_eq!(line[label.len()..].trim(), "-", "{view}");
        }

        let s = Snapshot {
            uuid: "s1".into(),
            name: "nightly".into(),
            volume_uuid: "u1".into(),
            volume_name: "db1".into(),
            size_bytes: 1 << 30,
            allocated_bytes: 0,
            created_at: String::new(),
            project: String::new(),
        };
        assert_eq!(
            snapshots_json(std::slice::from_ref(&s))["snapshots"][0]["volume_name"],
            "db1"
        );
        assert!(snapshot_view(&s).contains("volume:     db1 (u1)\n"));
        assert!(snapshots_table(&[s])
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("nightly"));
    }

    #[test]
    fn an_rbd_export_shows_its_image_and_key_reference_never_a_target() {
        let e = Export {
            volume_uuid: "u1".into(),
            volume_name: "db1".into(),
            initiators: vec!["iqn.2026-11.io.stratus:h1".into()],
            url: "rbd:pdisk/pd-vol-u1".into(),
            exporter: "rbd".into(),
            rbd: Some(stratus_proto::pdisk::v1::RbdAttachment {
                monitors: vec!["10.0.0.7:6789".into(), "10.0.0.8:6789".into()],
                pool: "pdisk".into(),
                image: "pd-vol-u1".into(),
                user: "compute".into(),
                secret_ref: "keyring:client.compute".into(),
                cluster_fsid: "f00".into(),
            }),
            ..Default::default()
        };
        let j = export_json(&e);
        assert_eq!(j["rbd"]["secret_ref"], "keyring:client.compute");
        assert_eq!(j["rbd"]["monitors"][1], "10.0.0.8:6789");
        let view = export_view(&e);
        assert!(view.contains("10.0.0.7:6789,10.0.0.8:6789"), "{view}");
        assert!(!view.contains("target"), "{view}");
        let row = exports_table(&[e]);
        assert!(row.lines().nth(1).unwrap().contains("rbd:pdisk/pd-vol-u1"));
    }

    #[test]
    fn images_show_a_short_checksum_and_clone_counts() {
        use crate::images::{images, LABEL_SHA256, LABEL_VM};
        let sha = "00aa11bb22cc33dd44ee55ff66778899".repeat(2);
        let mut base = volume();
        base.name = "image-00aa11bb22cc33dd".into();
        base.uuid = "u-base".into();
        base.labels = [(LABEL_SHA256.to_owned(), sha.clone())].into();
        base.image_sha256 = sha.clone();
        let mut clone = volume();
        clone.name = "vm-1-vda".into();
        clone.labels = [(LABEL_VM.to_owned(), "vm1".to_owned())].into();
        clone.source = "volume:u-base".into();
        clone.clone_of_volume = "u-base".into();
        clone.clone_of_snapshot = String::new();
        let vs = [volume(), clone, base];
        let is = images(&vs);
        let j = images_json(&is);
        assert_eq!(j["images"].as_array().unwrap().len(), 1);
        let i = &j["images"][0];
        assert_eq!(i["sha256"], sha);
        assert_eq!(i["volume"], "image-00aa11bb22cc33dd");
        assert_eq!(i["clone_count"], 1);
        assert_eq!(i["clones"], json!(["vm-1-vda"]));
        assert_eq!(i["size_bytes"], 10u64 << 30);
        assert_eq!(i["state"], "ready");
        let out = images_table(&is);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "SHA256            VOLUME                  SIZE  ALLOCATED  CLONES  CREATED"
        );
        assert_eq!(
            lines[1],
            "00aa11bb22cc33dd  image-00aa11bb22cc33dd  10G   1.5G       1       2026-11-02T10:00:00Z"
        );
        assert_eq!(
            images_table(&[]),
            "SHA256  VOLUME  SIZE  ALLOCATED  CLONES  CREATED\n"
        );
        assert_eq!(images_json(&[]), json!({ "images": [] }));
    }

    #[test]
    fn pool_shows_usage_and_drift() {
        let p = Pool {
            backend: "file".into(),
            exporter: "tgt".into(),
            capacity_bytes: 100 << 30,
            provisioned_bytes: 250 << 30,
            used_bytes: 30 << 30,
            allocated_bytes: 20 << 30,
            volume_count: 12,
            snapshot_count: 3,
            export_count: 2,
            capabilities: vec!["reflink".into(), "sparse-copy".into()],
            drift: vec![Drift {
                kind: "file".into(),
                object: "/srv/pool/volumes/stray.img".into(),
                detail: "not in the metadata store".into(),
            }],
            last_reconciled_at: "2026-11-02T10:00:00Z".into(),
            exporter_status: "running".into(),
            max_overcommit: 4.0,
            location: "/srv/pool".into(),
            ..Pool::default()
        };
        let j = pool_json(&p);
        assert_eq!(j["capacity_bytes"], 100u64 << 30);
        assert_eq!(j["drift"][0]["kind"], "file");
        assert_eq!(j["capabilities"], json!(["reflink", "sparse-copy"]));
        let text = pool_view(&p);
        assert!(text.contains("exporter:        tgt (running)\n"), "{text}");
        assert!(
            text.contains("provisioned:     250G (250% of capacity)\n"),
            "{text}"
        );
        assert!(
            text.contains("capabilities:    reflink,sparse-copy\n"),
            "{text}"
        );
        assert!(text.contains("\nKIND  OBJECT"), "{text}");
        assert!(!text.contains("thin data"), "{text}");
        assert_eq!(j["data_percent"], Value::Null);
        let empty = pool_view(&Pool::default());
        assert!(empty.contains("drift:           none\n"), "{empty}");
        assert!(empty.contains("capacity:        0B\n"), "{empty}");
    }

    #[test]
    fn thin_pool_shows_data_and_metadata_usage() {
        let p = Pool {
            backend: "lvm".into(),
            location: "stratus/pool".into(),
            capacity_bytes: 19 << 30,
            capabilities: vec!["thin".into(), "thin-snapshot".into()],
            data_percent: Some(91.25),
            metadata_percent: Some(10.94),
            thin_threshold_percent: Some(90.0),
            ..Pool::default()
        };
        let text = pool_view(&p);
        assert!(
            text.contains("thin data:       91.25% (past the threshold)\n"),
            "{text}"
        );
        assert!(text.contains("thin metadata:   10.94%\n"), "{text}");
        assert!(text.contains("thin threshold:  90% ("), "{text}");
        let j = pool_json(&p);
        assert_eq!(j["data_percent"], 91.25);
        assert_eq!(j["metadata_percent"], 10.94);
        assert_eq!(j["thin_threshold_percent"], 90.0);
    }

    #[test]
    fn quotas_show_usage_of_limit_and_null_for_no_limit() {
        use stratus_proto::pdisk::v1::{QuotaLimits, QuotaUsage};
        let q = Quota {
            project: "astro".into(),
            limits: Some(QuotaLimits {
                volumes: Some(100),
                snapshots: None,
                bytes: Some(2 << 40),
            }),
            usage: Some(QuotaUsage {
                volumes: 3,
                snapshots: 1,
                bytes: 12 << 30,
            }),
        };
        let j = quota_json(&q);
        assert_eq!(j["limits"]["volumes"], 100);
        assert!(j["limits"]["snapshots"].is_null());
        assert_eq!(j["usage"]["bytes"], 12u64 << 30);
        let v = quota_view(&q);
        assert!(v.contains("3 of 100"), "{v}");
        assert!(v.contains("1 of unlimited"), "{v}");
        assert!(v.contains("12G of 2T"), "{v}");
        assert!(quotas_table(&[q])
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("astro"));
    }
}
