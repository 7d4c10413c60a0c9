//! Backends hold volume data. The service layer only sees [`Backend`].
//!
//! Objects are addressed by [`ObjectId`] (volume or snapshot UUID), never by a
//! name from a request, so no request can make a backend touch a path or LV
//! outside its pool.
//!
//! Backends: [`file`] (sparse files, reflinks), [`lvm`] (thin LVs, thin
//! snapshots) and [`rbd`] (Ceph RBD images, snapshots and clones).
//!
//! Invariants every backend keeps:
//! - `create`, `snapshot`, `clone_object` and `import` make the new object
//!   visible atomically when it is complete (built under a temporary name
//!   and renamed, or made by one atomic step): an object that `list`
//!   reports is complete;
//! - `delete` of a missing object succeeds (so an interrupted delete can be
//!   finished after a crash);
//! - snapshots are read-only.

pub(crate) mod checksum;
pub mod copy;
pub mod file;
pub(crate) mod image;
pub mod lvm;
pub mod rbd;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::runner::BoxFuture;
use crate::types::ByteSize;

/// A volume or a snapshot, as the backend stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectId {
    Volume(Uuid),
    Snapshot(Uuid),
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectId::Volume(u) => write!(f, "volume {u}"),
            ObjectId::Snapshot(u) => write!(f, "snapshot {u}"),
        }
    }
}

/// Reports progress of a long operation: (bytes done, bytes total).
pub type ProgressFn = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// A progress function that drops every report.
pub fn no_progress() -> ProgressFn {
    Arc::new(|_, _, _| {})
}

/// Capacity and use of the storage under the pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolUsage {
    pub capacity: u64,
    pub used: u64,
    /// Thin pools only: how full the pool's data and metadata space are.
    pub thin: Option<ThinUsage>,
}

/// The fill level of a thin pool, and the level past which new provisioning
/// is refused (a full thin pool stalls every volume in it).
#[derive(Debug, Clone, PartialEq)]
pub struct ThinUsage {
    /// The pool's name, e.g. `vg0/pool`.
    pub pool: String,
    pub data_percent: f64,
    pub metadata_percent: f64,
    pub threshold_percent: f64,
}

impl PoolUsage {
    /// Refuses (ResourceExhausted) `what` when, with `extra` more bytes
    /// written, the thin pool's data or metadata usage would pass its
    /// threshold. Pools that are not thin always have room here (their
    /// limit is the service's overcommit check).
    pub fn check_room(&self, what: &str, extra: u64) -> Result<()> {
        let Some(t) = &self.thin else {
            return Ok(());
        };
        let data_after = if self.capacity == 0 {
            100.0
        } else {
            t.data_percent + extra as f64 * 100.0 / self.capacity as f64
        };
        let hint = format!(
            "extend the pool (lvextend -L +SIZE {}, or --poolmetadatasize +SIZE for metadata) or delete volumes",
            t.pool
        );
        if data_after > t.threshold_percent {
            let now = if extra > 0 {
                format!(
                    "would reach {data_after:.2}% with {} more written (now {:.2}%)",
                    ByteSize(extra),
                    t.data_percent
                )
            } else {
                format!("is {:.2}%", t.data_percent)
            };
            return Err(Error::exhausted(format!(
                "{what}: thin pool {} data usage {now}, past the {}% threshold; {hint}",
                t.pool, t.threshold_percent
            )));
        }
        if t.metadata_percent > t.threshold_percent {
            return Err(Error::exhausted(format!(
                "{what}: thin pool {} metadata usage is {:.2}%, past the {}% threshold; {hint}",
                t.pool, t.metadata_percent, t.threshold_percent
            )));
        }
        Ok(())
    }
}

/// The format of an image to import (shared with the agent).
pub use stratus_core::image::ImageFormat;

pub trait Backend: Send + Sync {
    /// "file", "lvm" or "rbd".
    fn kind(&self) -> &'static str;

    /// What this pool can do, e.g. "reflink" or "sparse-copy".
    fn capabilities(&self) -> Vec<String>;

    /// Where the pool lives (a directory, a VG/pool name).
    fn location(&self) -> String;

    /// The path a target or QEMU opens for this object.
    fn device_path(&self, id: ObjectId) -> PathBuf;

    /// How a client opens volume `id` itself, with the storage's own
    /// protocol and no target (RBD); None for pools a target serves.
    fn native_access(&self, _id: ObjectId) -> Option<rbd::RbdAccess> {
        None
    }

    /// A new empty (all zero) object of `size` bytes.
    fn create(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>>;

    /// Removes the object; Ok when it does not exist.
    fn delete(&self, id: ObjectId) -> BoxFuture<'_, Result<()>>;

    /// A read-only point-in-time copy of `src` as snapshot `dst`.
    fn snapshot(&self, src: ObjectId, dst: Uuid, progress: ProgressFn)
        -> BoxFuture<'_, Result<()>>;

    /// A writable copy of `src` as volume `dst`, grown to `size` when larger.
    fn clone_object(
        &self,
        src: ObjectId,
        dst: Uuid,
        size: u64,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>>;

    /// Makes the object read-only for everyone (image base volumes).
    fn set_read_only(&self, id: ObjectId) -> BoxFuture<'_, Result<()>>;

    /// The SHA-256 (lowercase hex) of the object's `size` bytes, for pools
    /// with no file or device to read (rbd streams `rbd export`); None:
    /// the service reads `device_path` itself.
    fn checksum(
        &self,
        _id: ObjectId,
        _size: u64,
        _progress: ProgressFn,
    ) -> Option<BoxFuture<'_, Result<String>>> {
        None
    }

    /// Whether volume `id`, a clone just made, should be flattened: its
    /// chain of parents passed the backend's maximum depth (rbd). The
    /// service then flattens it in the background (`service/flatten.rs`).
    fn wants_flatten(&self, _id: ObjectId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Ok(false) })
    }

    /// Makes volume `id` independent of the snapshot or volume it was
    /// layered on; Ok(false) when it was not layered (every clone of the
    /// file and lvm backends).
    fn flatten(&self, _id: ObjectId, _progress: ProgressFn) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async { Ok(false) })
    }

    /// Grows the object to `size` bytes.
    fn resize(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>>;

    /// Imports the image at `path` (in `format`) as volume `dst` of `size`
    /// bytes (at least the image's virtual size). Zero blocks stay holes.
    fn import<'a>(
        &'a self,
        dst: Uuid,
        path: &'a Path,
        format: ImageFormat,
        size: u64,
        progress: ProgressFn,
    ) -> BoxFuture<'a, Result<()>>;

    /// A directory on the pool's filesystem for files being uploaded, so an
    /// upload can become a volume without crossing filesystems.
    fn staging_dir(&self) -> PathBuf;

    /// Sizes of objects are multiples of this many bytes (a power of two;
    /// the service rounds requested sizes up to it so its records match).
    fn size_granularity(&self) -> u64 {
        1 << 20
    }

    /// Bytes allocated for this object on the pool.
    fn allocated(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>>;

    /// Size in bytes of the object as stored.
    fn size(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>>;

    /// Every object present in the pool with its allocation, entries that
    /// are not ours (reported as drift, never removed), and the pool's
    /// usage: one look at the pool.
    fn list(&self) -> BoxFuture<'_, Result<PoolListing>>;

    fn usage(&self) -> BoxFuture<'_, Result<PoolUsage>>;
}

#[derive(Debug, Clone, Default)]
pub struct PoolListing {
    pub objects: Vec<ObjectId>,
    pub foreign: Vec<String>,
    /// Bytes allocated by each object of `objects`, where known.
    pub allocated: BTreeMap<ObjectId, u64>,
    pub usage: PoolUsage,
}
