//! The rbd backend: volumes are RBD images in one Ceph pool, snapshots are
//! RBD snapshots of them, clones are RBD clones (layering) of a snapshot.
//!
//! ```text
//! POOL/pd-vol-<uuid>                        a volume (image-meta stratus.pdisk.object = volume <uuid>)
//! POOL/pd-vol-<uuid>@pd-snap-<uuid>         a snapshot of that volume
//! POOL/pd-tmp-vol-<uuid>                    a volume being built (create, clone, import)
//! ```
//!
//! # Why the CLIs
//! Ceph is driven through `rbd` and `ceph` with `--format json`, argv only,
//! through the [`CommandRunner`] with a timeout on every call, as Proxmox
//! drives it. No librbd crate was taken: `ceph-rust` and `librbd-sys`
//! (crates.io) are thin unsafe FFI bindings last released years ago, not
//! maintained against Pacific; linking librbd would also put a C++ library
//! with its own threads into pdiskd's address space and make the build need
//! `librbd-dev`. The CLIs cost a process per call (about 0.1 s), which is
//! small next to what an operation does, and they are what operators use.
//!
//! # Identity and credentials
//! Every call carries `--conf FILE --id USER` and, when given, `--keyring
//! FILE`; the cephx key is read by the tools from the keyring, never put in
//! argv. Names in argv come from UUIDs and from the validated settings only.
//!
//! # What `list` reports is complete
//! `create`, `clone` and `import` build the image under `pd-tmp-vol-<uuid>`,
//! tag it with image-meta and then `rbd rename` it to its final name (one
//! update of the pool's directory object); `snapshot` is one `rbd snap
//! create`. Temporaries are removed by `delete` of their object and at start
//! ([`RbdBackend::clear_temporaries`]). An image is classified by its name:
//! `pd-vol-<uuid>` is ours, anything else in the pool is foreign (drift).
//!
//! # Clones
//! A clone of a snapshot is `rbd clone` (format 2 when the cluster's
//! `require_min_compat_client` is mimic or newer: no protection needed).
//! When the cluster still wants protected parents, the snapshot is
//! protected and the clone retried; deleting a snapshot unprotects it first.
//! A snapshot with children is never deleted: the error names the clones,
//! which must be flattened first. A clone whose chain of parents passes
//! `max_clone_depth` is published layered (usable at once) and
//! [`Backend::wants_flatten`] says so: the service flattens it (`rbd
//! flatten`, with its progress) in the background, like Cinder's
//! `rbd_max_clone_depth`, so reads do not walk a long chain for long.
//! A clone of a volume (not a snapshot) is a full sparse copy (`rbd cp`,
//! the image's head only, never its snapshots).
//!
//! # Clones of image bases
//! An image base (a volume made read-only, see below) is never written, so
//! a clone of it needs no copy: the first clone takes one snapshot of it,
//! `pd-vol-<uuid>@pd-base`, and every clone of the base is an RBD clone of
//! that snapshot (the boot-storm case: a guest's disk costs one metadata
//! object, not a copy of the image). `pd-base` is the backend's own: not a
//! pdisk snapshot, not listed, removed with its volume, which is refused
//! while clones depend on it (flatten them first).
//!
//! # Native access
//! Clients reach an image with Ceph's own client, not through a target:
//! [`RbdBackend::native_access`] names the monitors (read once at start,
//! `ceph mon dump`), the pool, the image and the cephx user clients attach
//! as (`--rbd-client-id`), and where their key is (a reference to the
//! client host's own keyring, never the key).
//!
//! # What Ceph has no notion of
//! RBD has no read-only flag for an image: `set_read_only` records
//! `stratus.pdisk.read-only = true` in image-meta, and users of base images
//! open them read-only. There is no device path either: `device_path` is the
//! `rbd:POOL/IMAGE[@SNAP]` name QEMU's rbd driver takes (with the client's
//! id and conf added by the user).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use super::{Backend, ImageFormat, ObjectId, PoolListing, PoolUsage, ProgressFn};
use crate::error::{Error, Result};
use crate::failpoints::crash_point;
use crate::runner::{BoxFuture, CommandRunner};

mod cli;
mod clones;
mod pool;
mod volumes;

const VOL_PREFIX: &str = "pd-vol-";
const SNAP_PREFIX: &str = "pd-snap-";
const TMP_PREFIX: &str = "pd-tmp-vol-";
/// The snapshot of an image base that its clones are made from.
const BASE_SNAP: &str = "pd-base";
/// The image-meta key tying an image to pdisk.
pub const OWNER_KEY: &str = "stratus.pdisk.object";
/// The image-meta key of an image whose object map a flatten turned off
/// (the features to turn on again: `fast-diff,object-map`).
const FLATTEN_MAP_KEY: &str = "stratus.pdisk.flatten-map-off";
/// The image-meta key of a volume made read-only (see the module doc).
pub const READ_ONLY_KEY: &str = "stratus.pdisk.read-only";

/// Reports: the monitors answer at once unless the cluster is unhealthy.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Metadata changes (create, snap, clone, rename, resize, rm of an image
/// whose objects are few; rm walks every object, so it gets the long one).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How old the monitor list clients are sent to may get before `list` or
/// `usage` reads it again.
const MON_REFRESH: Duration = Duration::from_secs(60);
/// How old the pool's usage (`ceph df`) may be when a create, clone,
/// snapshot or resize checks the room left, or a listing (pool status,
/// drift, every Get/List's allocations) reports it. Ceph's own figures lag
/// by its stats period (the mgr's, 5 s), and `ceph df` is a Python program
/// that costs about 0.3-0.8 s of CPU a call: a burst of calls shares one.
const USAGE_MAX_AGE: Duration = Duration::from_secs(5);
/// Data-moving calls: rm, cp, flatten, import.
const DATA_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// A Ceph pool or user name, checked so that nothing odd reaches argv or a
/// QEMU `rbd:` filename: letters, digits, `_`, `-`, `.`; not starting with
/// `-` or `.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephName(String);

impl CephName {
    pub fn new(what: &str, s: &str) -> Result<CephName> {
        let ok = !s.is_empty()
            && s.len() <= 100
            && !s.starts_with(['-', '.'])
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(CephName(s.to_string()))
        } else {
            Err(Error::invalid(format!(
                "{what} {s:?}: use letters, digits, '_', '-' and '.', not starting with '-' or '.'"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CephName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the rbd backend is told at start.
#[derive(Debug, Clone)]
pub struct RbdSettings {
    pub pool: CephName,
    /// An erasure-coded pool for the images' data (metadata stays in `pool`).
    pub data_pool: Option<CephName>,
    pub ceph_conf: PathBuf,
    /// The cephx user, without `client.`.
    pub ceph_id: CephName,
    /// The user's keyring; None: the standard locations the conf names.
    pub keyring: Option<PathBuf>,
    /// The cephx user clients (agents' QEMUs) attach volumes as, without
    /// `client.`: exports name it, and clients hold its key.
    pub client_id: CephName,
    /// A clone whose parent chain would be longer than this is flattened.
    pub max_clone_depth: u32,
    /// Where uploads are staged before import (under pdiskd's data dir).
    pub staging_dir: PathBuf,
}

/// Checks that a path can be given to QEMU's `rbd:` filename (`:` separates
/// its options) and to the CLIs.
pub fn check_path_for_rbd(what: &str, p: &Path) -> Result<()> {
    let s = p
        .to_str()
        .ok_or_else(|| Error::invalid(format!("{what}: not UTF-8")))?;
    if !p.is_absolute() || s.contains([':', ',', '@', '\\', '=']) {
        return Err(Error::invalid(format!(
            "{what} {s:?}: must be an absolute path without ':', ',', '@', '=' or '\\'"
        )));
    }
    Ok(())
}

// ---------- names ----------

fn volume_image(u: Uuid) -> String {
    format!("{VOL_PREFIX}{u}")
}

fn snap_name(u: Uuid) -> String {
    format!("{SNAP_PREFIX}{u}")
}

fn temp_image(u: Uuid) -> String {
    format!("{TMP_PREFIX}{u}")
}

fn parse_suffix(name: &str, prefix: &str) -> Option<Uuid> {
    let rest = name.strip_prefix(prefix)?;
    let u = Uuid::parse_str(rest).ok()?;
    // Only the canonical (hyphenated, lowercase) spelling is ours.
    (u.to_string() == rest).then_some(u)
}

/// How a client opens a volume's image itself, with Ceph's own client
/// (QEMU's rbd driver): never a key, only where the client finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdAccess {
    /// `ADDR:PORT` of each monitor.
    pub monitors: Vec<String>,
    pub pool: String,
    pub image: String,
    /// The cephx user, without `client.`.
    pub user: String,
    /// `keyring:client.USER`: the user's key in the client host's keyring.
    pub secret_ref: String,
    pub cluster_fsid: String,
}

// ---------- the backend ----------

pub struct RbdBackend {
    runner: Arc<dyn CommandRunner>,
    settings: RbdSettings,
    /// The monitors clients are sent to, read at open (`ceph mon dump`)
    /// and again by `list` and `usage` once [`MON_REFRESH`] has passed
    /// (monitors come and go; a failed read keeps the last list), with
    /// when they were read.
    monitors: Mutex<(Vec<String>, std::time::Instant)>,
    fsid: String,
    /// Snapshot -> the volume it belongs to (RBD names a snapshot by its
    /// image). Filled by `snapshot` and every `list`; a miss is looked up.
    snap_parent: Mutex<HashMap<Uuid, Uuid>>,
    /// The last `ceph df` figures and when they were read (see
    /// [`USAGE_MAX_AGE`]).
    usage: Mutex<Option<(std::time::Instant, PoolUsage)>>,
}

impl Backend for RbdBackend {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    fn capabilities(&self) -> Vec<String> {
        vec![
            "thin".to_string(),
            "rbd-snapshot".to_string(),
            "rbd-clone".to_string(),
        ]
    }

    fn location(&self) -> String {
        format!("rbd:{}", self.settings.pool)
    }

    fn native_access(&self, id: ObjectId) -> Option<RbdAccess> {
        match id {
            ObjectId::Volume(u) => Some(RbdBackend::native_access(self, u)),
            ObjectId::Snapshot(_) => None,
        }
    }

    fn device_path(&self, id: ObjectId) -> PathBuf {
        // Only a volume's name is known without a lookup; a snapshot is
        // shown by its name (its volume is in the service's records).
        PathBuf::from(match id {
            ObjectId::Volume(u) => format!("rbd:{}", self.spec(&volume_image(u))),
            ObjectId::Snapshot(s) => format!("rbd:{}/*@{}", self.settings.pool, snap_name(s)),
        })
    }

    fn create(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ObjectId::Volume(u) = id else {
                return Err(Error::invalid(format!("{id}: only volumes are created")));
            };
            self.create_now(u, size)
                .await
                .map_err(|e| e.context(format!("creating {id}")))
        })
    }

    fn delete(&self, id: ObjectId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.delete_now(id)
                .await
                .map_err(|e| e.context(format!("deleting {id}")))
        })
    }

    fn snapshot(
        &self,
        src: ObjectId,
        dst: Uuid,
        _progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ObjectId::Volume(v) = src else {
                return Err(Error::invalid(format!(
                    "{src}: RBD snapshots are taken of volumes"
                )));
            };
            let spec = format!("{}@{}", self.spec(&volume_image(v)), snap_name(dst));
            self.run(&self.rbd_change(["snap", "create", &spec]))
                .await
                .map_err(|e| e.context(format!("snapshot of {src}")))?;
            self.snap_parent.lock().unwrap().insert(dst, v);
            Ok(())
        })
    }

    fn clone_object(
        &self,
        src: ObjectId,
        dst: Uuid,
        size: u64,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.clone_now(src, dst, size, progress)
                .await
                .map_err(|e| e.context(format!("clone of {src}")))
        })
    }

    fn set_read_only(&self, id: ObjectId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ObjectId::Volume(u) = id else {
                // Snapshots are read-only already.
                return Ok(());
            };
            self.run(&self.rbd_change([
                "image-meta",
                "set",
                &self.spec(&volume_image(u)),
                READ_ONLY_KEY,
                "true",
            ]))
            .await
            .map(|_| ())
        })
    }

    fn checksum(
        &self,
        id: ObjectId,
        size: u64,
        progress: ProgressFn,
    ) -> Option<BoxFuture<'_, Result<String>>> {
        Some(Box::pin(async move {
            use sha2::{Digest, Sha256};
            let spec = self.object_spec(id).await?;
            // `rbd export SPEC -` writes every byte (holes as zeros) to
            // stdout, streamed into the hasher as it comes.
            let hashed = Arc::new(Mutex::new((Sha256::new(), 0u64)));
            let sink = {
                let hashed = hashed.clone();
                let progress = progress.clone();
                Arc::new(move |piece: &[u8]| {
                    let mut h = hashed.lock().unwrap();
                    h.0.update(piece);
                    h.1 += piece.len() as u64;
                    progress("checksum", h.1, size);
                })
            };
            let cmd = self
                .rbd_change(["export", "--no-progress", spec.as_str(), "-"])
                .timeout(DATA_TIMEOUT)
                .on_stdout_bytes(sink);
            self.run(&cmd)
                .await
                .map_err(|e| e.context(format!("checksum of {id}")))?;
            let (hasher, got) = std::mem::take(&mut *hashed.lock().unwrap());
            if got != size {
                return Err(Error::internal(format!(
                    "checksum of {id}: rbd export gave {got} bytes of {size}"
                )));
            }
            Ok(format!("{:x}", hasher.finalize()))
        }))
    }

    fn wants_flatten(&self, id: ObjectId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let ObjectId::Volume(_) = id else {
                return Ok(false);
            };
            let spec = self.object_spec(id).await?;
            let depth = self.clone_depth(&spec).await?;
            let wants = depth > self.settings.max_clone_depth;
            if wants {
                tracing::info!(clone = %spec, depth, max = self.settings.max_clone_depth,
                    "clone chain too deep: to be flattened in the background");
            }
            Ok(wants)
        })
    }

    fn flatten(&self, id: ObjectId, progress: ProgressFn) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let ObjectId::Volume(_) = id else {
                return Err(Error::invalid(format!("{id}: only volumes are flattened")));
            };
            let spec = self.object_spec(id).await?;
            let info = self.info(&spec).await?;
            if info.parent.is_none() {
                // Flat already (a crash may have come after `rbd flatten`).
                self.restore_object_map(&spec).await?;
                return Ok(false);
            }
            progress("flatten", 0, info.size);
            // A flatten skips the objects the object map says exist, and
            // a copy-up marks its object there before writing it: a
            // flatten killed between the two, or whose copy-up failed
            // (seen: EPERM), leaves objects marked but absent, which a
            // later flatten skips and then cuts from their parent, reading
            // zeros. `rbd object-map rebuild` did not clear such marks
            // (pdisk/tests/rbd.rs, a flatten failed by EPERM: the retry
            // lost the parents' data). So the flatten runs with the map
            // off: noted in image-meta first (intent), disabled, flatten,
            // then enabled again and rebuilt from the objects really there,
            // and the note removed. A crash anywhere leaves the note, and
            // the next attempt (or the no-op flatten of a flat image)
            // restores the map.
            let off: Vec<&str> = ["fast-diff", "object-map"]
                .into_iter()
                .filter(|f| info.features.iter().any(|h| h == f))
                .collect();
            if !off.is_empty() {
                self.run(&self.rbd_change([
                    "image-meta",
                    "set",
                    &spec,
                    FLATTEN_MAP_KEY,
                    &off.join(","),
                ]))
                .await?;
                self.run(
                    &self
                        .rbd_change(["feature", "disable", &spec])
                        .args(off.iter().copied()),
                )
                .await
                .map_err(|e| e.context(format!("turning the object map of {id} off")))?;
                crash_point("rbd::flatten::map_off");
            }
            // rbd prints "Image flatten: 42% complete..." as it goes.
            let cmd = self
                .rbd_change(["flatten", &spec])
                .timeout(DATA_TIMEOUT)
                .on_stderr_line(cli::rbd_progress("flatten", info.size, progress.clone()));
            self.run(&cmd)
                .await
                .map_err(|e| e.context(format!("flattening {id}")))?;
            crash_point("rbd::flatten::flattened");
            self.restore_object_map(&spec).await?;
            progress("flatten", info.size, info.size);
            Ok(true)
        })
    }

    fn resize(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.resize_now(id, size))
    }

    fn import<'a>(
        &'a self,
        dst: Uuid,
        path: &'a Path,
        format: ImageFormat,
        size: u64,
        progress: ProgressFn,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.import_now(dst, path, format, size, progress))
    }

    fn staging_dir(&self) -> PathBuf {
        self.settings.staging_dir.clone()
    }

    fn allocated(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let spec = self.object_spec(id).await?;
            Ok(self
                .du(Some(&spec))
                .await?
                .images
                .iter()
                .map(|r| r.used_size)
                .sum())
        })
    }

    fn size(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let spec = self.object_spec(id).await?;
            Ok(self.info(&spec).await?.size)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<PoolListing>> {
        Box::pin(self.list_now())
    }

    fn usage(&self) -> BoxFuture<'_, Result<PoolUsage>> {
        Box::pin(self.usage_recent())
    }
}

#[cfg(test)]
mod tests;
