//! Snapshots and clones: RBD clones of snapshots and of image bases (their
//! `pd-base` snapshot), protection when the cluster wants it, the clone
//! depth, and deletes that refuse while clones depend on a snapshot.

use uuid::Uuid;

use super::cli::{ceph_error, parse, Child, SnapRow};
use super::{snap_name, temp_image, volume_image, RbdBackend};
use super::{BASE_SNAP, DATA_TIMEOUT, FLATTEN_MAP_KEY, READ_ONLY_KEY};
use crate::backend::{ObjectId, ProgressFn};
use crate::error::{Error, Result};
use crate::failpoints::crash_point;

impl RbdBackend {
    /// How many ancestors `spec` has (0 for an image that is no clone).
    pub(super) async fn clone_depth(&self, spec: &str) -> Result<u32> {
        let mut depth = 0;
        let mut at = spec.split('@').next().unwrap_or(spec).to_string();
        while let Some(p) = self.info(&at).await?.parent {
            depth += 1;
            at = format!("{}/{}", p.pool, p.image);
            if depth > 1000 {
                return Err(Error::internal(format!("{spec}: parent chain loops")));
            }
        }
        Ok(depth)
    }

    pub(super) async fn clone_now(
        &self,
        src: ObjectId,
        dst: Uuid,
        size: u64,
        progress: ProgressFn,
    ) -> Result<()> {
        let source = self.object_spec(src).await?;
        let tmp = self.spec(&temp_image(dst));
        self.build(dst, async {
            match src {
                // A clone too deep is flattened later, in the background
                // (the service asks `wants_flatten` once it is published).
                ObjectId::Snapshot(_) => self.clone_snapshot(&source, &tmp).await?,
                ObjectId::Volume(_) if self.is_read_only(&source).await? => {
                    // An image base never changes: layer on its pd-base.
                    let snap = self.base_snapshot(&source).await?;
                    crash_point("rbd::clone::base_snapshot");
                    self.clone_snapshot(&snap, &tmp).await?;
                }
                ObjectId::Volume(_) => {
                    // A volume has no point in time to layer on: copy its
                    // head (sparse), never its snapshots.
                    progress("copy", 0, 1);
                    self.run(
                        &self
                            .rbd_change(["cp"])
                            .args(self.data_pool_args())
                            .args([source.as_str(), tmp.as_str()])
                            .timeout(DATA_TIMEOUT),
                    )
                    .await?;
                    progress("copy", 1, 1);
                }
            }
            if self.info(&tmp).await?.size < size {
                self.run(&self.rbd_change(["resize", "--size", &Self::size_arg(size), &tmp]))
                    .await?;
            }
            Ok(())
        })
        .await
    }

    /// `rbd clone SNAP TMP`; when the cluster wants protected parents (clone
    /// format 1), protects the snapshot and tries once more.
    pub(super) async fn clone_snapshot(&self, snap: &str, tmp: &str) -> Result<()> {
        let cmd = self
            .rbd_change(["clone"])
            .args(self.data_pool_args())
            .args([snap, tmp]);
        let out = self.runner.run(&cmd).await?;
        if out.success() {
            return Ok(());
        }
        if !out.stderr.contains("must be protected") {
            return Err(ceph_error(&cmd, &out));
        }
        tracing::info!(snapshot = %snap, "cluster needs protected parents: protecting");
        let protect = self.rbd_change(["snap", "protect", snap]);
        let out = self.runner.run(&protect).await?;
        // Clones of one snapshot run at once (the service shares its lock):
        // another may have protected it meanwhile, which rbd 16.2 answers
        // with "snap is already protected ... (16) Device or resource busy".
        if !out.success() && !out.stderr.contains("(16) Device or resource busy") {
            return Err(ceph_error(&protect, &out));
        }
        self.run(&cmd).await.map(|_| ())
    }

    pub(super) async fn delete_now(&self, id: ObjectId) -> Result<()> {
        match id {
            ObjectId::Volume(u) => {
                self.remove_image(&temp_image(u)).await?;
                self.remove_base_snapshot(&volume_image(u)).await?;
                self.remove_image(&volume_image(u)).await
            }
            ObjectId::Snapshot(s) => {
                let Some(v) = self.volume_of(s).await? else {
                    return Ok(());
                };
                let spec = format!("{}@{}", self.spec(&volume_image(v)), snap_name(s));
                let children = self.children(&spec).await?;
                if !children.is_empty() {
                    return Err(Error::precondition(format!(
                        "{id}: clones depend on it ({}); flatten them first (pdisk volume flatten)",
                        children.join(", ")
                    )));
                }
                crash_point("rbd::delete_snapshot::children_checked");
                let out = self
                    .run(&self.rbd_report(["snap", "ls", &self.spec(&volume_image(v))]))
                    .await?;
                let snaps: Vec<SnapRow> = parse("rbd snap ls", &out.stdout)?;
                let name = snap_name(s);
                match snaps.iter().find(|r| r.name == name) {
                    None => {}
                    Some(r) => {
                        if r.protected.as_deref() == Some("true") {
                            self.run(&self.rbd_change(["snap", "unprotect", &spec]))
                                .await?;
                        }
                        self.run(&self.rbd_change(["snap", "rm", &spec])).await?;
                        crash_point("rbd::delete_snapshot::removed");
                    }
                }
                self.snap_parent.lock().unwrap().remove(&s);
                Ok(())
            }
        }
    }

    /// Turns the object map a flatten turned off on again (the features
    /// noted in [`FLATTEN_MAP_KEY`]), rebuilds it from the objects there,
    /// and removes the note. Nothing when there is no note.
    pub(super) async fn restore_object_map(&self, spec: &str) -> Result<()> {
        let cmd = self.rbd_change(["image-meta", "get", spec, FLATTEN_MAP_KEY]);
        let out = self.runner.run(&cmd).await?;
        if !out.success() {
            if out.stderr.contains("(2) No such file or directory") {
                return Ok(());
            }
            return Err(ceph_error(&cmd, &out));
        }
        let have = self.info(spec).await?.features;
        // object-map before fast-diff, which needs it.
        let on: Vec<&str> = ["object-map", "fast-diff"]
            .into_iter()
            .filter(|f| out.stdout.trim().split(',').any(|n| n == *f))
            .filter(|f| !have.iter().any(|h| h == f))
            .collect();
        if !on.is_empty() {
            self.run(
                &self
                    .rbd_change(["feature", "enable", spec])
                    .args(on.iter().copied()),
            )
            .await?;
        }
        self.run(
            &self
                .rbd_change(["object-map", "rebuild", "--no-progress", spec])
                .timeout(DATA_TIMEOUT),
        )
        .await
        .map_err(|e| e.context(format!("rebuilding the object map of {spec}")))?;
        crash_point("rbd::flatten::map_restored");
        self.run(&self.rbd_change(["image-meta", "remove", spec, FLATTEN_MAP_KEY]))
            .await
            .map(|_| ())
    }

    /// Whether volume image `spec` was made read-only (an image base).
    pub(super) async fn is_read_only(&self, spec: &str) -> Result<bool> {
        let cmd = self.rbd_change(["image-meta", "get", spec, READ_ONLY_KEY]);
        let out = self.runner.run(&cmd).await?;
        if out.success() {
            return Ok(out.stdout.trim() == "true");
        }
        // rbd 16.2: "failed to get metadata ...: (2) No such file or directory"
        if out.stderr.contains("(2) No such file or directory") {
            return Ok(false);
        }
        Err(ceph_error(&cmd, &out))
    }

    /// `POOL/IMAGE@pd-base` of an image base, taken now if it is not yet.
    pub(super) async fn base_snapshot(&self, spec: &str) -> Result<String> {
        let snap = format!("{spec}@{BASE_SNAP}");
        let cmd = self.rbd_change(["snap", "create", &snap]);
        let out = self.runner.run(&cmd).await?;
        if !out.success() && !out.stderr.contains("(17) File exists") {
            return Err(ceph_error(&cmd, &out));
        }
        Ok(snap)
    }

    /// The clones of `snap` (`POOL/IMAGE@SNAP`), as `POOL/IMAGE`.
    pub(super) async fn children(&self, snap: &str) -> Result<Vec<String>> {
        let out = self.run(&self.rbd_report(["children", snap])).await?;
        let children: Vec<Child> = if out.stdout.trim().is_empty() {
            Vec::new()
        } else {
            parse("rbd children", &out.stdout)?
        };
        Ok(children
            .iter()
            .map(|c| format!("{}/{}", c.pool, c.image))
            .collect())
    }

    /// Removes volume image `image`'s `pd-base` snapshot, unless clones
    /// depend on it (FailedPrecondition naming them). Ok when it has none.
    pub(super) async fn remove_base_snapshot(&self, image: &str) -> Result<()> {
        let spec = self.spec(image);
        let cmd = self.rbd_report(["snap", "ls", &spec]);
        let out = self.runner.run(&cmd).await?;
        if !out.success() {
            if out.stderr.contains("(2) No such file or directory") {
                return Ok(());
            }
            return Err(ceph_error(&cmd, &out));
        }
        let snaps: Vec<SnapRow> = if out.stdout.trim().is_empty() {
            Vec::new()
        } else {
            parse("rbd snap ls", &out.stdout)?
        };
        let Some(row) = snaps.iter().find(|r| r.name == BASE_SNAP) else {
            return Ok(());
        };
        let snap = format!("{spec}@{BASE_SNAP}");
        let children = self.children(&snap).await?;
        if !children.is_empty() {
            return Err(Error::precondition(format!(
                "{spec} is an image base and clones depend on it ({}); flatten or delete them first (pdisk volume flatten)",
                children.join(", ")
            )));
        }
        crash_point("rbd::delete::children_checked");
        if row.protected.as_deref() == Some("true") {
            self.run(&self.rbd_change(["snap", "unprotect", &snap]))
                .await?;
        }
        self.run(&self.rbd_change(["snap", "rm", &snap])).await?;
        crash_point("rbd::delete::base_removed");
        Ok(())
    }
}
