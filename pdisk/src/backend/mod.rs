//! Backends hold volume data. The service layer only sees [`Backend`].
//!
//! Objects are addressed by [`ObjectId`] (volume or snapshot UUID), never by a
//! name from a request, so no request can make a backend touch a path or LV
//! outside its pool.
//!
//! Invariants every backend keeps:
//! - `create`, `snapshot`, `clone_from` and `import` build the new object under
//!   a temporary name and make it visible atomically at the end: an object
//!   that `list` reports is complete;
//! - `delete` of a missing object succeeds (so an interrupted delete can be
//!   finished after a crash);
//! - snapshots are read-only.

pub mod checksum;
pub mod copy;
pub mod file;
pub mod image;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::Result;
use crate::runner::BoxFuture;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub capacity: u64,
    pub used: u64,
}

/// An image to import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

pub trait Backend: Send + Sync {
    /// "file" or "lvm".
    fn kind(&self) -> &'static str;

    /// What this pool can do, e.g. "reflink" or "sparse-copy".
    fn capabilities(&self) -> Vec<String>;

    /// Where the pool lives (a directory, a VG/pool name).
    fn location(&self) -> String;

    /// The path a target or QEMU opens for this object.
    fn device_path(&self, id: ObjectId) -> PathBuf;

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
    fn set_read_only(&self, id: ObjectId) -> Result<()>;

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

    /// Bytes allocated for this object on the pool.
    fn allocated(&self, id: ObjectId) -> Result<u64>;

    /// Size in bytes of the object as stored.
    fn size(&self, id: ObjectId) -> Result<u64>;

    /// Every object present in the pool, and entries that are not ours
    /// (reported as drift, never removed).
    fn list(&self) -> Result<PoolListing>;

    fn usage(&self) -> Result<PoolUsage>;
}

#[derive(Debug, Clone, Default)]
pub struct PoolListing {
    pub objects: Vec<ObjectId>,
    pub foreign: Vec<String>,
}
