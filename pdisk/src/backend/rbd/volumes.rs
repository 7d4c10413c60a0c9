//! Volumes: build under a temporary name, tag and publish; create, resize,
//! import (raw through `rbd import`, others through `qemu-img convert`),
//! and the lookups that map pdisk objects to RBD names.

use std::path::Path;

use uuid::Uuid;

use super::cli::{rbd_progress, LsRow};
use super::{parse_suffix, snap_name, temp_image, volume_image, RbdBackend};
use super::{DATA_TIMEOUT, OWNER_KEY, SNAP_PREFIX, VOL_PREFIX};
use crate::backend::{image, ImageFormat, ObjectId, ProgressFn};
use crate::error::{Error, Result};
use crate::failpoints::crash_point;

impl RbdBackend {
    /// The `POOL/IMAGE[@SNAP]` of an object; a snapshot's volume is looked
    /// up (NotFound when no volume has it).
    pub(super) async fn object_spec(&self, id: ObjectId) -> Result<String> {
        match id {
            ObjectId::Volume(u) => Ok(self.spec(&volume_image(u))),
            ObjectId::Snapshot(s) => {
                let v = self.volume_of(s).await?.ok_or_else(|| {
                    Error::not_found(format!(
                        "{id}: no RBD snapshot {} in pool {}",
                        snap_name(s),
                        self.settings.pool
                    ))
                })?;
                Ok(format!("{}@{}", self.spec(&volume_image(v)), snap_name(s)))
            }
        }
    }

    /// The volume snapshot `s` belongs to, None when it does not exist.
    pub(super) async fn volume_of(&self, s: Uuid) -> Result<Option<Uuid>> {
        if let Some(v) = self.snap_parent.lock().unwrap().get(&s) {
            return Ok(Some(*v));
        }
        self.remember_snapshots(&self.ls().await?);
        Ok(self.snap_parent.lock().unwrap().get(&s).copied())
    }

    /// Refreshes the snapshot -> volume map from a full listing.
    pub(super) fn remember_snapshots(&self, rows: &[LsRow]) {
        let mut m = self.snap_parent.lock().unwrap();
        m.clear();
        for r in rows {
            if let (Some(v), Some(s)) = (
                parse_suffix(&r.image, VOL_PREFIX),
                r.snapshot
                    .as_deref()
                    .and_then(|s| parse_suffix(s, SNAP_PREFIX)),
            ) {
                m.insert(s, v);
            }
        }
    }

    pub(super) async fn tag(&self, image: &str, id: ObjectId) -> Result<()> {
        let value = match id {
            ObjectId::Volume(u) => format!("volume {u}"),
            ObjectId::Snapshot(u) => format!("snapshot {u}"),
        };
        self.run(&self.rbd_change(["image-meta", "set", &self.spec(image), OWNER_KEY, &value]))
            .await
            .map(|_| ())
    }

    /// Publishes a built temporary under the object's name.
    pub(super) async fn publish(&self, tmp: &str, u: Uuid) -> Result<()> {
        self.run(&self.rbd_change([
            "rename".to_string(),
            self.spec(tmp),
            self.spec(&volume_image(u)),
        ]))
        .await
        .map(|_| ())
    }

    /// Builds the volume `u` under its temporary name with `build`, tags
    /// and publishes it; on failure the temporary is removed.
    pub(super) async fn build<F>(&self, u: Uuid, build: F) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>>,
    {
        let tmp = temp_image(u);
        let r = async {
            build.await?;
            crash_point("rbd::build::built");
            self.tag(&tmp, ObjectId::Volume(u)).await?;
            crash_point("rbd::build::tagged");
            self.publish(&tmp, u).await
        }
        .await;
        if r.is_err() {
            if let Err(e) = self.remove_image(&tmp).await {
                tracing::warn!(image = %self.spec(&tmp), error = %e,
                    "could not remove a temporary image; it is removed at the next start");
            }
        }
        r
    }

    pub(super) async fn create_now(&self, u: Uuid, size: u64) -> Result<()> {
        self.build(u, async {
            self.run(
                &self
                    .rbd_change(["create", "--size", &Self::size_arg(size)])
                    .args(self.data_pool_args())
                    .arg(self.spec(&temp_image(u))),
            )
            .await
            .map(|_| ())
        })
        .await
    }

    pub(super) async fn resize_now(&self, id: ObjectId, size: u64) -> Result<()> {
        let ObjectId::Volume(_) = id else {
            return Err(Error::invalid(format!("{id}: snapshots cannot be resized")));
        };
        let spec = self.object_spec(id).await?;
        let now = self.info(&spec).await?.size;
        let size = size.div_ceil(1 << 20) << 20;
        if size < now {
            return Err(Error::invalid(format!(
                "{id} is {now} bytes; shrinking to {size} is refused"
            )));
        }
        if size == now {
            return Ok(());
        }
        self.run(&self.rbd_change(["resize", "--size", &Self::size_arg(size), &spec]))
            .await
            .map(|_| ())
    }

    pub(super) async fn import_now(
        &self,
        dst: Uuid,
        path: &Path,
        format: ImageFormat,
        size: u64,
        progress: ProgressFn,
    ) -> Result<()> {
        // The service inspected the image already; inspecting here too keeps
        // the backend safe on its own (qcow2 backing or data files refused).
        let info = image::inspect(self.runner.as_ref(), path, format).await?;
        let size = size.max(info.virtual_size);
        let tmp = temp_image(dst);
        if format == ImageFormat::Raw {
            return self
                .import_raw(dst, path, info.virtual_size, size, progress)
                .await;
        }
        self.build(dst, async {
            self.run(
                &self
                    .rbd_change(["create", "--size", &Self::size_arg(size)])
                    .args(self.data_pool_args())
                    .arg(self.spec(&tmp)),
            )
            .await?;
            let target = self.qemu_target(&tmp);
            image::convert_into_device(
                self.runner.as_ref(),
                path,
                format,
                Path::new(&target),
                info.virtual_size,
                progress.clone(),
            )
            .await
        })
        .await?;
        progress("import", info.virtual_size, info.virtual_size);
        Ok(())
    }

    /// A raw image: `rbd import` makes the image at the file's size and
    /// writes only its non-zero 4 KiB runs (`--sparse-size`, its default),
    /// reporting progress on stderr; then `rbd resize` grows it to `size`.
    pub(super) async fn import_raw(
        &self,
        dst: Uuid,
        path: &Path,
        len: u64,
        size: u64,
        progress: ProgressFn,
    ) -> Result<()> {
        let tmp = temp_image(dst);
        self.build(dst, async {
            let cmd = self
                .rbd_change(["import", "--image-format", "2"])
                .args(self.data_pool_args())
                .arg(path.to_string_lossy())
                .arg(self.spec(&tmp))
                .timeout(DATA_TIMEOUT)
                .on_stderr_line(rbd_progress("import", len, progress.clone()));
            self.run(&cmd)
                .await
                .map_err(|e| e.context(format!("importing {}", path.display())))?;
            crash_point("rbd::import::imported");
            if size > len {
                self.run(&self.rbd_change([
                    "resize".to_string(),
                    "--size".into(),
                    Self::size_arg(size),
                    self.spec(&tmp),
                ]))
                .await?;
            }
            Ok(())
        })
        .await?;
        progress("import", len, len);
        Ok(())
    }

    /// QEMU's `rbd:` filename of an image of ours, as our user.
    pub(super) fn qemu_target(&self, image: &str) -> String {
        let mut s = format!(
            "rbd:{}:id={}:conf={}",
            self.spec(image),
            self.settings.ceph_id,
            self.settings.ceph_conf.display()
        );
        if let Some(k) = &self.settings.keyring {
            s.push_str(&format!(":keyring={}", k.display()));
        }
        s
    }
}
