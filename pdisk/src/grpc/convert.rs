//! Domain records as `pdisk.v1` messages (volumes, snapshots, exports,
//! quotas, the pool), for the handlers of `grpc.rs`.

use stratus_proto::pdisk::v1 as pb;

use crate::service::{is_image_base, Drift, ExportInfo, PoolInfo, SnapshotInfo, VolumeInfo};
use crate::store::{QuotaLimits, QuotaUsage, Source, VolumeState};
use crate::types::{Chap, LABEL_IMAGE_SHA256};

pub(super) fn volume_pb(v: VolumeInfo) -> pb::Volume {
    let r = v.record;
    let image_sha256 = if is_image_base(&r) {
        r.labels[LABEL_IMAGE_SHA256].clone()
    } else {
        String::new()
    };
    let (deleted_at, purge_at) = match &r.quarantine {
        Some(q) => (q.deleted_at.clone(), q.purge_at()),
        None => Default::default(),
    };
    let flatten = v.flatten.unwrap_or_default();
    pb::Volume {
        deleted_at,
        purge_at,
        flatten_pending: v.flatten.is_some(),
        flatten_done_bytes: flatten.done,
        flatten_total_bytes: flatten.total,
        uuid: r.uuid.to_string(),
        name: r.name.to_string(),
        size_bytes: r.size.0,
        allocated_bytes: v.allocated,
        labels: r.labels.into_iter().collect(),
        state: match r.state {
            VolumeState::Creating => pb::VolumeState::Creating,
            VolumeState::Ready => pb::VolumeState::Ready,
            VolumeState::Deleting => pb::VolumeState::Deleting,
            VolumeState::Error => pb::VolumeState::Error,
            VolumeState::Quarantined => pb::VolumeState::Quarantined,
        } as i32,
        state_reason: r.state_reason,
        clone_of_volume: match &r.source {
            Source::Volume(u) => u.to_string(),
            _ => String::new(),
        },
        clone_of_snapshot: match &r.source {
            Source::Snapshot(u) => u.to_string(),
            _ => String::new(),
        },
        image_sha256,
        source: r.source.describe(),
        created_at: r.created_at,
        exported: v.exported,
        snapshot_count: v.snapshot_count,
        device_path: v.device_path.display().to_string(),
        project: r.project,
        allow_multi_attach: r.allow_multi_attach,
        created_by: r.created_by.map(|c| c.to_string()).unwrap_or_default(),
    }
}

pub(super) fn snapshot_pb(s: SnapshotInfo) -> pb::Snapshot {
    let r = s.record;
    pb::Snapshot {
        project: s.project,
        uuid: r.uuid.to_string(),
        name: r.name.to_string(),
        volume_uuid: r.volume.to_string(),
        volume_name: s.volume_name,
        size_bytes: r.size.0,
        allocated_bytes: s.allocated,
        created_at: r.created_at,
    }
}

pub(super) fn export_pb(e: ExportInfo) -> pb::Export {
    let url = e.url();
    if let Some(l) = e.local {
        // No target: the caller opens the volume here.
        return pb::Export {
            volume_uuid: e.record.volume.to_string(),
            volume_name: e.volume_name,
            initiators: e.record.initiators.iter().map(|i| i.to_string()).collect(),
            url,
            exporter: e.exporter,
            project: e.project,
            local: Some(pb::LocalAttachment {
                path: l.path.display().to_string(),
                format: "raw".into(),
                block_device: l.block_device,
            }),
            ..Default::default()
        };
    }
    if let Some(r) = e.rbd {
        // No target: nothing iSCSI to name.
        return pb::Export {
            volume_uuid: e.record.volume.to_string(),
            volume_name: e.volume_name,
            initiators: e.record.initiators.iter().map(|i| i.to_string()).collect(),
            url,
            exporter: e.exporter,
            project: e.project,
            rbd: Some(pb::RbdAttachment {
                monitors: r.monitors,
                pool: r.pool,
                image: r.image,
                user: r.user,
                secret_ref: r.secret_ref,
                cluster_fsid: r.cluster_fsid,
            }),
            ..Default::default()
        };
    }
    pb::Export {
        volume_uuid: e.record.volume.to_string(),
        volume_name: e.volume_name,
        target_iqn: e.record.target_iqn.to_string(),
        portal: e.portal,
        lun: crate::export::VOLUME_LUN,
        initiators: e.record.initiators.iter().map(|i| i.to_string()).collect(),
        url,
        chap_target_user: e
            .record
            .chap
            .as_ref()
            .and_then(Chap::mutual)
            .map(|t| t.user.clone())
            .unwrap_or_default(),
        chap_user: e.record.chap.map(|c| c.user).unwrap_or_default(),
        exporter: e.exporter,
        project: e.project,
        rbd: None,
        local: None,
    }
}

pub(super) fn quota_pb(project: String, limits: QuotaLimits, usage: QuotaUsage) -> pb::Quota {
    pb::Quota {
        project,
        limits: Some(pb::QuotaLimits {
            volumes: limits.volumes,
            snapshots: limits.snapshots,
            bytes: limits.bytes,
        }),
        usage: Some(pb::QuotaUsage {
            volumes: usage.volumes,
            snapshots: usage.snapshots,
            bytes: usage.bytes,
        }),
    }
}

pub(super) fn drift_pb(d: Drift) -> pb::Drift {
    pb::Drift {
        kind: d.kind.as_str().into(),
        object: d.object,
        detail: d.detail,
    }
}

pub(super) fn pool_pb(p: PoolInfo) -> pb::Pool {
    pb::Pool {
        backend: p.backend,
        exporter: p.exporter,
        capacity_bytes: p.capacity,
        provisioned_bytes: p.provisioned,
        used_bytes: p.used,
        allocated_bytes: p.allocated,
        volume_count: p.volumes,
        quarantined_count: p.quarantined,
        quarantined_bytes: p.quarantined_bytes,
        snapshot_count: p.snapshots,
        export_count: p.exports,
        capabilities: p.capabilities,
        drift: p.drift.into_iter().map(drift_pb).collect(),
        last_reconciled_at: p.last_reconciled_at,
        exporter_status: p.exporter_status,
        max_overcommit: p.max_overcommit,
        location: p.location,
        data_percent: p.thin.as_ref().map(|t| t.data_percent),
        metadata_percent: p.thin.as_ref().map(|t| t.metadata_percent),
        thin_threshold_percent: p.thin.as_ref().map(|t| t.threshold_percent),
    }
}
