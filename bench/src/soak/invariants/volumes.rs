//! pdiskd's side of the final checks: volume states, pool files, tgt
//! against the store, drift, acknowledged volumes, snapshots and exports
//! with their content.

use std::collections::{BTreeMap, BTreeSet};

use stratus_proto::pdisk::v1 as pdpb;

use super::{checksum, clients, files, stored_exports, tgt_exports, Checks};
use crate::soak::expect::{Expectations, Known};
use crate::soak::{Places, WRITER_IQN};

pub(super) async fn checks(
    places: &Places,
    expect: &Expectations,
    c: &mut Checks,
) -> anyhow::Result<()> {
    let (_, mut pdisk) = clients(places).await?;
    let vols = pdisk
        .list_volumes(pdpb::ListVolumesRequest::default())
        .await?
        .into_inner()
        .volumes;
    let snaps = pdisk
        .list_snapshots(pdpb::ListSnapshotsRequest::default())
        .await?
        .into_inner()
        .snapshots;
    for v in &vols {
        c.expect(v.state() == pdpb::VolumeState::Ready, || {
            format!(
                "volume {} is {}: {}",
                v.name,
                v.state().as_str_name(),
                v.state_reason
            )
        });
    }
    let want_vols: BTreeSet<String> = vols.iter().map(|v| v.uuid.clone()).collect();
    let want_snaps: BTreeSet<String> = snaps.iter().map(|s| s.uuid.clone()).collect();
    for (dir, want) in [("volumes", &want_vols), ("snapshots", &want_snaps)] {
        let (have, other) = files(&places.pool_dir.join(dir))?;
        c.expect(&have == want && other.is_empty(), || {
            format!(
                "{dir}/ holds {:?} {other:?}; records without a file {:?}",
                have.difference(want).collect::<Vec<_>>(),
                want.difference(&have).collect::<Vec<_>>()
            )
        });
    }
    let (staged, other) = files(&places.pool_dir.join("staging"))?;
    c.expect(staged.is_empty() && other.is_empty(), || {
        format!("staging/ not empty: {staged:?} {other:?}")
    });
    let exports = pdisk
        .list_exports(pdpb::ListExportsRequest::default())
        .await?
        .into_inner()
        .exports;
    let stored = stored_exports(&exports);
    let live = tgt_exports(places).await?;
    c.expect(stored == live, || {
        format!("tgt has {live:?}, the store {stored:?}")
    });
    let pool = pdisk.get_pool(pdpb::GetPoolRequest {}).await?.into_inner();
    for d in &pool.drift {
        c.expect(d.detail.starts_with("rolled back"), || {
            format!("drift {} {}: {}", d.kind, d.object, d.detail)
        });
    }
    // What the clients were told.
    let by_name: BTreeMap<&str, &pdpb::Volume> =
        vols.iter().map(|v| (v.name.as_str(), v)).collect();
    let exported: BTreeSet<&str> = exports
        .iter()
        .filter(|e| e.initiators.iter().any(|i| i == WRITER_IQN))
        .map(|e| e.volume_name.as_str())
        .collect();
    for v in &expect.volumes {
        if v.acknowledged {
            c.expect(by_name.contains_key(v.name.as_str()), || {
                format!("acknowledged volume {} lost", v.name)
            });
        }
        if !by_name.contains_key(v.name.as_str()) {
            continue;
        }
        match v.exported {
            Known::Yes => c.expect(exported.contains(v.name.as_str()), || {
                format!("acknowledged export of {} lost", v.name)
            }),
            Known::No => c.expect(!exported.contains(v.name.as_str()), || {
                format!("volume {} exported after its unexport answered", v.name)
            }),
            Known::Unknown => {}
        }
        if let Some(want) = &v.sha256 {
            let got = checksum(&mut pdisk, &v.name, false).await?;
            c.expect(&got == want, || {
                format!("volume {} reads back {got}, written {want}", v.name)
            });
        }
    }
    let snap_names: BTreeSet<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    for s in &expect.snapshots {
        if s.acknowledged {
            c.expect(snap_names.contains(s.name.as_str()), || {
                format!("acknowledged snapshot {} lost", s.name)
            });
        }
        if let (true, Some(want)) = (snap_names.contains(s.name.as_str()), &s.sha256) {
            let got = checksum(&mut pdisk, &s.name, true).await?;
            c.expect(&got == want, || {
                format!("snapshot {} reads back {got}, written {want}", s.name)
            });
        }
    }
    Ok(())
}
