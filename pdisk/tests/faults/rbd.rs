//! The rbd stack of the fault-injection walk (`pdisk/tests/faults.rs`):
//! one Ceph micro-cluster, a pool and a cephx user limited to it, and the
//! invariants read from the pool's images as client.admin.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use stratus_proto::pdisk::v1 as pb;
use testkit::*;

use super::Op;

pub struct RbdStack {
    pub ceph: CephCluster,
    pub pool: String,
    keyring: std::path::PathBuf,
    scratch: tempfile::TempDir,
}

impl RbdStack {
    /// Starts the cluster and makes `pool` with its user `client.<pool>`.
    pub fn start(pool: &str) -> RbdStack {
        require_root();
        let ceph = CephCluster::start();
        eprintln!("ceph micro-cluster up in {:?}", ceph.startup);
        ceph.create_pool(pool);
        let keyring = ceph.create_rbd_user(pool, pool);
        let scratch = tempfile::Builder::new()
            .prefix("stratus-rbd-faults-")
            .tempdir()
            .unwrap();
        RbdStack {
            ceph,
            pool: pool.to_string(),
            keyring,
            scratch,
        }
    }

    /// `pdiskd-failpoints --backend rbd` on the pool, with a maximum clone
    /// depth of 1 (a clone of a clone's snapshot is flattened).
    pub fn pdiskd_failpoints(&self) -> Pdiskd {
        let args = [
            "--backend",
            "rbd",
            "--rbd-pool",
            &self.pool,
            "--ceph-conf",
            self.ceph.conf.to_str().unwrap(),
            "--ceph-id",
            &self.pool,
            "--ceph-keyring",
            self.keyring.to_str().unwrap(),
            "--rbd-max-clone-depth",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let dir = self.scratch.path();
        Pdiskd::start_on(dir, dir, dir.join("unused-pool-dir"), None, args).into_failpoints()
    }

    /// The pool's images against the records: every `pd-vol-<uuid>` has a
    /// volume record and every record its image; no other image (a
    /// temporary `pd-tmp-vol-*`, a clone left behind); every snapshot is a
    /// recorded `pd-snap-<uuid>` of its own volume's image, or the
    /// `pd-base` of an image base.
    pub fn violations(&self, vols: &[pb::Volume], snaps: &[pb::Snapshot]) -> Vec<String> {
        let mut bad = Vec::new();
        let out = self.ceph.rbd(&["ls", "-l", "--format", "json", &self.pool]);
        let rows: Vec<serde_json::Value> = if out.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&out).unwrap()
        };
        let by_uuid: BTreeMap<&str, &pb::Volume> =
            vols.iter().map(|v| (v.uuid.as_str(), v)).collect();
        let mut images = BTreeSet::new();
        let mut snapshots = BTreeSet::new();
        for r in &rows {
            let image = r["image"].as_str().unwrap_or_default();
            let Some(u) = image.strip_prefix("pd-vol-") else {
                bad.push(format!("image {image} is no volume's: {r}"));
                continue;
            };
            match r["snapshot"].as_str() {
                None => {
                    images.insert(u.to_string());
                }
                Some("pd-base") => {
                    let base = by_uuid.get(u).is_some_and(|v| !v.image_sha256.is_empty());
                    if !base {
                        bad.push(format!("{image}@pd-base on a volume that is no image base"));
                    }
                }
                Some(s) => match s.strip_prefix("pd-snap-") {
                    Some(su) if snaps.iter().any(|x| x.uuid == su && x.volume_uuid == u) => {
                        snapshots.insert(su.to_string());
                    }
                    _ => bad.push(format!("snapshot {image}@{s} has no record")),
                },
            }
        }
        let want: BTreeSet<String> = by_uuid.keys().map(|u| u.to_string()).collect();
        if images != want {
            bad.push(format!(
                "pool {} holds volume images {images:?}, records say {want:?}",
                self.pool
            ));
        }
        let want: BTreeSet<String> = snaps.iter().map(|s| s.uuid.clone()).collect();
        if snapshots != want {
            bad.push(format!(
                "pool {} holds snapshots {snapshots:?}, records say {want:?}",
                self.pool
            ));
        }
        bad
    }
}

/// A create or snapshot interrupted before it answered must be reported
/// `rolled back` by the restart's reconciliation (its object named).
pub async fn rolled_back(c: &mut Client, op: Op, tag: &str) -> Vec<String> {
    let object = match op {
        Op::CreateEmpty | Op::ImportRaw | Op::CloneVolume | Op::CloneSnapshot | Op::CloneBase => {
            format!("{tag}-new")
        }
        Op::Snapshot => format!("{tag}-s"),
        _ => return Vec::new(),
    };
    let pool = c
        .get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner();
    let reported = pool
        .drift
        .iter()
        .any(|d| d.object == object && d.detail.starts_with("rolled back"));
    if reported {
        Vec::new()
    } else {
        vec![format!(
            "{object} not reported rolled back: {:?}",
            pool.drift
        )]
    }
}

/// Waits (up to 2 minutes) until no volume is marked for a background
/// flatten: a flatten a crash interrupted is resumed at start.
pub async fn wait_for_flattens(c: &mut Client) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending: Vec<String> = c
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes
            .into_iter()
            .filter(|v| v.flatten_pending)
            .map(|v| v.name)
            .collect();
        if pending.is_empty() {
            return pending;
        }
        if Instant::now() > deadline {
            return vec![format!(
                "still marked for a flatten after 2 min: {pending:?}"
            )];
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
