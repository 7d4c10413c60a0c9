//! The lvm backend: volumes are thin LVs in one thin pool of one volume
//! group; snapshots and clones are thin snapshots (constant time, sharing
//! every block, no copy-on-write exception store to fill up).
//!
//! The backend's operations are here; LVM's JSON reports are parsed in
//! `lvm/report.rs`, names (LVM's rules, ours, an LV's class) in
//! `lvm/names.rs`; the unit tests are in `lvm_tests.rs`.
//!
//! ```text
//! VG/POOL                  the thin pool (given, or made by --lvm-create-pool)
//! VG/pd-vol-<uuid>         writable volumes            } tagged stratus.pdisk,
//! VG/pd-snap-<uuid>        read-only snapshots         } thin LVs of POOL
//! VG/pd-tmp-vol-<uuid>     a volume being built (import, growing clone)
//! ```
//! LV names come from UUIDs only. An LV is ours when it carries the tag
//! [`OWNER_TAG`], lives in our thin pool and has a name of the forms above;
//! every other LV of the VG is reported as foreign (drift) and never touched,
//! even one named like ours.
//!
//! # What `list` reports is complete
//! - `create` and `snapshot` are one `lvcreate` each, straight under the
//!   final name: LVM writes the new LV with its name, size, tag, permission
//!   and activation flag in one metadata commit (and reverts it when the
//!   thin device cannot be made), so the LV exists whole or not at all.
//!   An empty thin LV reads as zeros; a thin snapshot is read-only from its
//!   first commit (`--permission r`, as LVM's own test suite does in
//!   `lvcreate-thin-snap.sh`), so no writable window exists.
//! - `clone` is one `lvcreate` too when it keeps the source's size. A clone
//!   that grows, and an `import` (which writes data), are built under
//!   `pd-tmp-vol-<uuid>` and `lvrename`d at the end. Temporaries are removed
//!   by `delete` of their object and at start ([`LvmBackend::clear_temporaries`]).
//!
//! # LVM calls
//! LVM is driven through its command line, argv only, through the
//! [`CommandRunner`], every call with a timeout. Reports are JSON
//! (`--reportformat json --units b --nosuffix`: every value is a string,
//! sizes in bytes). One report serves one operation: `list` (objects,
//! allocation, pool usage) is one `lvs` of the whole VG; `size`, `allocated`,
//! `usage` and `resize` one `lvs` of one LV. Nothing is cached but the VG's
//! extent size (read at open; it only changes with `vgchange -s`, which LVM
//! allows only when every LV stays aligned, so a stale value cannot make a
//! record disagree with an LV).
//!
//! Retries: only `lvremove` retries, and only when LVM says the LV is in use
//! (see [`LvmBackend::remove_lv`]). Everything else fails at once, with
//! LVM's stderr in the error.
//!
//! Environment: LVM warns on stderr about file descriptors it inherits
//! unless `LVM_SUPPRESS_FD_WARNINGS=1`. The runner passes no environment of
//! its own (argv only), so the variable is not set here; none are leaked,
//! since Rust and tokio open every descriptor with O_CLOEXEC, and the
//! warnings would only reach the logs anyway.
//!
//! # Activation
//! LVM marks thin snapshots "skip activation" by default, so they would stay
//! inactive after a reboot and their device paths would be missing. Ours are
//! made with `--setactivationskip n` (they activate like any LV, now and at
//! boot), and `open` activates any of ours that is inactive with
//! `--ignoreactivationskip`.
//!
//! # Delete
//! `lvremove` returns the LV's blocks to the thin pool; the pool passes
//! discards down to the disks (`--discards passdown`, LVM's default). No
//! zeroing pass, no `dd`. With [`Wipe::Zero`] the LV is first overwritten
//! with `blkdiscard --zeroout`: blocks only this LV holds are zeroed in
//! place, blocks shared with snapshots or clones stay theirs. dm-thin has no
//! WRITE ZEROES, so the kernel writes zero pages over the whole LV, which
//! also provisions its unallocated blocks until the LV is removed; a wipe
//! that would take the pool past [`WIPE_MAX_PERCENT`] is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use uuid::Uuid;

use super::image;
use super::{Backend, ImageFormat, ObjectId, PoolListing, PoolUsage, ProgressFn, ThinUsage};
use crate::error::{Error, ErrorKind, Result};
use crate::runner::{BoxFuture, Cmd, CommandRunner, Output};
use crate::types::ByteSize;

mod names;
mod report;

pub use names::LvmName;
use names::{object_lv, parse_role, temp_lv, Class, Role};
use report::{parse_extent_size, parse_lvs, Lv, LV_FIELDS, VG_FIELDS};

/// The LV tag that marks an LV as pdisk's.
pub const OWNER_TAG: &str = "stratus.pdisk";

/// Reports only read metadata, but wait for the VG lock behind changes.
const REPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// lvcreate, lvextend, lvrename, lvchange, lvremove: metadata commits plus
/// device-mapper and udev work.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Creating the thin pool zeroes its metadata LV.
const POOL_CREATE_TIMEOUT: Duration = Duration::from_secs(600);
/// Zeroing an LV: a base plus the LV's size at this slowest expected rate.
const WIPE_BASE_TIMEOUT: Duration = Duration::from_secs(300);
const WIPE_MIN_BYTES_PER_SEC: u64 = 32 << 20;
/// A secure wipe provisions the LV's unallocated blocks until the LV is
/// removed; it is refused when it would take the pool's data past this.
pub const WIPE_MAX_PERCENT: f64 = 95.0;
/// The share of the VG's free space a pool made by `--lvm-create-pool` gets;
/// the rest leaves room to grow the pool's metadata.
const CREATED_POOL_EXTENTS: &str = "95%FREE";

/// How `delete` treats an LV's data before removing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wipe {
    /// Remove only: the thin pool discards the blocks.
    #[default]
    None,
    /// Overwrite the LV with zeros (`blkdiscard --zeroout`) first.
    Zero,
}

/// What the lvm backend is told at start.
#[derive(Debug, Clone)]
pub struct LvmSettings {
    pub vg: LvmName,
    pub thin_pool: LvmName,
    /// Create the thin pool when the VG has none.
    pub create_pool: bool,
    /// Refuse new provisioning once the pool's data or metadata usage would
    /// pass this percentage.
    pub threshold_percent: f64,
    pub wipe: Wipe,
    /// Where uploads are staged before import (under pdiskd's data dir).
    pub staging_dir: PathBuf,
}

// ---------- the backend ----------

pub struct LvmBackend {
    runner: Arc<dyn CommandRunner>,
    settings: LvmSettings,
    extent_size: u64,
    /// Pauses between `lvremove` attempts of an LV in use.
    remove_retry_delays: Vec<Duration>,
    /// Held while one of our LVM changes runs. LVM serializes changes of a
    /// VG behind its lock file anyway; queueing them here instead means a
    /// change's timeout measures the change itself, not the wait behind
    /// others (twenty concurrent snapshots under TCG queued past 120 s).
    changes: tokio::sync::Mutex<()>,
}

/// An LVM command that changes VG metadata and so takes the VG's lock
/// (lvcreate, lvextend, lvrename, lvchange, lvremove), tagged where it is
/// built ([`LvmBackend::change`]). The type is the tag: only
/// [`LvmBackend::run_change`] and [`LvmBackend::attempt_change`] run one,
/// and both hold the backend's queue while it runs.
struct Change(Cmd);

impl Change {
    fn arg(self, a: impl Into<String>) -> Self {
        Change(self.0.arg(a))
    }

    fn args<I, S>(self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Change(self.0.args(args))
    }

    fn timeout(self, t: Duration) -> Self {
        Change(self.0.timeout(t))
    }
}

/// The error for a failed LVM call: the program and its target, the exit
/// status and LVM's messages, its kind read from those messages.
fn lvm_error(cmd: &Cmd, out: &Output) -> Error {
    let e = &out.stderr;
    let kind = if e.contains("already exists in volume group") {
        ErrorKind::AlreadyExists
    } else if e.contains("Failed to find logical volume")
        || e.contains("Couldn't find origin volume")
        || (e.contains("Volume group \"") && e.contains("\" not found"))
    {
        ErrorKind::NotFound
    } else if e.contains("reached threshold")
        || e.contains("Insufficient free space")
        || e.contains("Insufficient suitable allocatable extents")
    {
        ErrorKind::ResourceExhausted
    } else {
        ErrorKind::Internal
    };
    let said: Vec<&str> = e
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(5)
        .collect();
    Error::new(
        kind,
        format!(
            "{} {} exited with status {}: {}",
            cmd.program,
            cmd.args.last().map(String::as_str).unwrap_or(""),
            out.status,
            if said.is_empty() {
                "(no stderr)".to_string()
            } else {
                said.join("; ")
            }
        ),
    )
}

/// LVM refused to remove an LV because something holds it open; worth
/// another try once that something lets go (see [`LvmBackend::remove_lv`]).
fn in_use(out: &Output) -> bool {
    // "Logical volume VG/LV in use." and
    // "Logical volume VG/LV contains a filesystem in use." (LVM 2.03,
    // lib/activate/activate.c lv_check_not_in_use). Not "is used by another
    // device": a holder (a partition mapping, a stacked device) stays.
    out.stderr.contains(" in use.")
}

impl LvmBackend {
    /// Opens the pool: checks the VG and the thin pool (creating the pool
    /// when asked and the VG has none), activates the pool and any of our
    /// LVs that are inactive (after a reboot, say), and makes the staging
    /// directory.
    pub async fn open(runner: Arc<dyn CommandRunner>, settings: LvmSettings) -> Result<LvmBackend> {
        let mut b = LvmBackend {
            runner,
            settings,
            extent_size: 1 << 20,
            remove_retry_delays: [500, 1000, 2000, 4000].map(Duration::from_millis).to_vec(),
            changes: tokio::sync::Mutex::new(()),
        };
        let vg = b.settings.vg.to_string();
        let out = b
            .run(
                &Cmd::new("vgs")
                    .args(Self::report_args(VG_FIELDS))
                    .arg(&vg)
                    .timeout(REPORT_TIMEOUT),
            )
            .await
            .map_err(|e| e.context(format!("volume group {vg}")))?;
        b.extent_size = parse_extent_size(&out.stdout, &vg)?;

        let mut lvs = b.lvs_vg().await?;
        let pool = match lvs.iter().find(|l| b.classify(l) == Class::Pool) {
            Some(p) => p.clone(),
            None if b.settings.create_pool => {
                b.create_pool(&lvs).await?;
                lvs = b.lvs_vg().await?;
                lvs.iter()
                    .find(|l| b.classify(l) == Class::Pool)
                    .cloned()
                    .ok_or_else(|| {
                        Error::internal(format!("thin pool {} missing after lvcreate", b.pool()))
                    })?
            }
            None => {
                return Err(Error::not_found(format!(
                    "thin pool {} not found: create it (lvcreate --type thin-pool -l 95%FREE -n {} {vg}) \
                     or start pdiskd with --lvm-create-pool",
                    b.pool(),
                    b.settings.thin_pool
                )))
            }
        };
        if !pool.is_thin_pool() {
            return Err(Error::invalid(format!(
                "{} is a {} LV, not a thin pool",
                b.pool(),
                if pool.segtype.is_empty() {
                    "non-thin"
                } else {
                    &pool.segtype
                }
            )));
        }
        if !pool.active() {
            b.run_change(&b.change("lvchange").args(["--activate", "y"]).arg(b.pool()))
                .await?;
        }
        for lv in &lvs {
            if matches!(b.classify(lv), Class::Ours(Role::Object(_))) && !lv.active() {
                b.activate(&lv.name).await?;
            }
        }
        let dir = &b.settings.staging_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        tracing::info!(pool = %b.pool(), extent_size = b.extent_size,
            threshold_percent = b.settings.threshold_percent, wipe = ?b.settings.wipe,
            "lvm backend: thin pool ready");
        Ok(b)
    }

    /// Removes what interrupted operations left: our temporary LVs and
    /// staged uploads. Returns their names.
    pub async fn clear_temporaries(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let lvs = self.lvs_vg().await?;
        let pool = lvs.iter().find(|l| self.classify(l) == Class::Pool);
        for lv in &lvs {
            if let Class::Ours(Role::Temporary(_)) = self.classify(lv) {
                self.destroy(lv, pool).await?;
                removed.push(lv.name.clone());
            }
        }
        let dir = &self.settings.staging_dir;
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))? {
            let e = e.map_err(|e| Error::io(dir.display(), e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".upload") {
                std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path().display(), err))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    fn pool(&self) -> String {
        format!("{}/{}", self.settings.vg, self.settings.thin_pool)
    }

    fn qualified(&self, lv: &str) -> String {
        format!("{}/{lv}", self.settings.vg)
    }

    fn lv_path(&self, lv: &str) -> PathBuf {
        Path::new("/dev").join(self.settings.vg.as_str()).join(lv)
    }

    fn report_args(fields: &str) -> [&str; 7] {
        [
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ]
    }

    /// An LVM command that changes VG metadata.
    fn change(&self, program: &str) -> Change {
        Change(Cmd::new(program).timeout(CHANGE_TIMEOUT))
    }

    /// Runs a change behind our other changes; its failure is an error.
    async fn run_change(&self, change: &Change) -> Result<Output> {
        let _queue = self.changes.lock().await;
        self.run(&change.0).await
    }

    /// Runs a change behind our other changes and hands back its output,
    /// failed or not (for callers that judge the failure themselves).
    async fn attempt_change(&self, change: &Change) -> Result<Output> {
        let _queue = self.changes.lock().await;
        self.runner.run(&change.0).await
    }

    /// Runs a command that changes no VG metadata (reports, blkdiscard);
    /// its failure is an error.
    async fn run(&self, cmd: &Cmd) -> Result<Output> {
        let out = self.runner.run(cmd).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(lvm_error(cmd, &out))
        }
    }

    fn classify(&self, lv: &Lv) -> Class {
        if lv.name == self.settings.thin_pool.as_str() {
            return Class::Pool;
        }
        let ours =
            lv.tags.iter().any(|t| t == OWNER_TAG) && lv.pool == self.settings.thin_pool.as_str();
        match parse_role(&lv.name) {
            Some(role) if ours => Class::Ours(role),
            _ => Class::Foreign,
        }
    }

    /// Every LV of the VG (internal ones excepted): one `lvs`.
    async fn lvs_vg(&self) -> Result<Vec<Lv>> {
        let cmd = Cmd::new("lvs")
            .args(Self::report_args(LV_FIELDS))
            .arg(self.settings.vg.as_str())
            .timeout(REPORT_TIMEOUT);
        parse_lvs(&self.run(&cmd).await?.stdout)
    }

    /// One LV of the VG, or None when it does not exist.
    async fn lvs_one(&self, name: &str) -> Result<Option<Lv>> {
        let cmd = Cmd::new("lvs")
            .args(Self::report_args(LV_FIELDS))
            .arg(self.qualified(name))
            .timeout(REPORT_TIMEOUT);
        let out = self.runner.run(&cmd).await?;
        if !out.success() {
            if out.stderr.contains("Failed to find logical volume") {
                return Ok(None);
            }
            return Err(lvm_error(&cmd, &out));
        }
        Ok(parse_lvs(&out.stdout)?.into_iter().find(|l| l.name == name))
    }

    /// The LV of object `id`, NotFound when it is missing or not ours.
    async fn object(&self, id: ObjectId) -> Result<Lv> {
        match self.lvs_one(&object_lv(id)).await? {
            Some(lv) if self.classify(&lv) == Class::Ours(Role::Object(id)) => Ok(lv),
            _ => Err(Error::not_found(format!(
                "{id}: no LV {} in thin pool {}",
                self.qualified(&object_lv(id)),
                self.pool()
            ))),
        }
    }

    fn usage_of(&self, pool: &Lv) -> Result<PoolUsage> {
        let (Some(data), Some(meta)) = (pool.data_percent, pool.metadata_percent) else {
            return Err(Error::unavailable(format!(
                "thin pool {} reports no usage: is it active?",
                self.pool()
            )));
        };
        Ok(PoolUsage {
            capacity: pool.size,
            used: pool.allocated(),
            thin: Some(ThinUsage {
                pool: self.pool(),
                data_percent: data,
                metadata_percent: meta,
                threshold_percent: self.settings.threshold_percent,
            }),
        })
    }

    async fn create_pool(&self, lvs: &[Lv]) -> Result<()> {
        if let Some(other) = lvs.iter().find(|l| l.is_thin_pool()) {
            return Err(Error::precondition(format!(
                "volume group {} already has thin pool {}: use --thin-pool {} (--lvm-create-pool only creates a pool in a VG that has none)",
                self.settings.vg, other.name, other.name
            )));
        }
        // --zero y: a partly written new block never shows what a deleted
        // volume left there. --yes: wipe any old signature found where the
        // pool's metadata LV lands instead of prompting (stdin is /dev/null).
        let cmd = self
            .change("lvcreate")
            .args(["--type", "thin-pool", "--extents", CREATED_POOL_EXTENTS])
            .args(["--zero", "y", "--discards", "passdown", "--yes"])
            .args(["--name", self.settings.thin_pool.as_str()])
            .arg(self.settings.vg.as_str())
            .timeout(POOL_CREATE_TIMEOUT);
        self.run_change(&cmd)
            .await
            .map_err(|e| e.context(format!("creating thin pool {}", self.pool())))?;
        tracing::info!(pool = %self.pool(), share = CREATED_POOL_EXTENTS, "created the thin pool");
        Ok(())
    }

    async fn activate(&self, lv: &str) -> Result<()> {
        self.run_change(
            &self
                .change("lvchange")
                .args(["--activate", "y", "--ignoreactivationskip"])
                .arg(self.qualified(lv)),
        )
        .await
        .map(|_| ())
    }

    /// `lvcreate` of an empty thin LV of `size` bytes named `name`.
    async fn create_thin(&self, name: &str, size: u64) -> Result<()> {
        let cmd = self
            .change("lvcreate")
            .args(["--type", "thin", "--virtualsize"])
            .arg(format!("{size}b"))
            .args(["--thinpool", self.settings.thin_pool.as_str()])
            .args(["--name", name, "--addtag", OWNER_TAG])
            .arg(self.settings.vg.as_str());
        self.run_change(&cmd).await?;
        crate::failpoints::crash_point("lvm::lvcreate::done");
        Ok(())
    }

    /// `lvcreate --snapshot` of `src` named `name`, read-only or writable.
    async fn create_snapshot(&self, src: &str, name: &str, writable: bool) -> Result<()> {
        let cmd = self
            .change("lvcreate")
            .args(["--snapshot", "--setactivationskip", "n", "--permission"])
            .arg(if writable { "rw" } else { "r" })
            .args(["--name", name, "--addtag", OWNER_TAG])
            .arg(self.qualified(src));
        self.run_change(&cmd).await?;
        crate::failpoints::crash_point("lvm::lvcreate::done");
        Ok(())
    }

    async fn extend(&self, name: &str, size: u64) -> Result<()> {
        let cmd = self
            .change("lvextend")
            .arg("--size")
            .arg(format!("{size}b"))
            .arg(self.qualified(name));
        self.run_change(&cmd).await.map(|_| ())
    }

    /// `lvrename` of a temporary to its object's name: the publish step of
    /// an import or a growing clone.
    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let cmd = self
            .change("lvrename")
            .args([self.settings.vg.as_str(), from, to]);
        crate::failpoints::crash_point("lvm::publish::before_rename");
        self.run_change(&cmd).await?;
        crate::failpoints::crash_point("lvm::publish::after_rename");
        Ok(())
    }

    /// Removes a half-built temporary after a failure, keeping the
    /// original error; a leftover is removed at the next start anyway.
    async fn discard_temporary(&self, name: &str) {
        if let Err(e) = self.remove_lv(name).await {
            tracing::warn!(lv = %self.qualified(name), error = %e, "could not remove a temporary LV; it is removed at the next start");
        }
    }

    /// `lvremove --yes` (no prompt for an active LV), retried while LVM says
    /// the LV is in use.
    ///
    /// Why retry: LVM itself re-checks the open count for 5 s
    /// (`retry_deactivation`), but an LV can stay open longer just after a
    /// change: udev's blkid probe of a freshly created or renamed LV, an
    /// exporter (tgtd, LIO) still closing the device after an unexport.
    /// Those holders go away by themselves. A mounted filesystem ("contains
    /// a filesystem in use") only goes away when someone unmounts it; it is
    /// retried too, in case an unmount is under way, and then reported.
    /// Nothing else is retried.
    async fn remove_lv(&self, name: &str) -> Result<()> {
        let cmd = self
            .change("lvremove")
            .arg("--yes")
            .arg(self.qualified(name));
        let mut delays = self.remove_retry_delays.iter();
        loop {
            let out = self.attempt_change(&cmd).await?;
            if out.success() {
                return Ok(());
            }
            match delays.next() {
                Some(d) if in_use(&out) => {
                    tracing::info!(lv = %self.qualified(name), retry_in_ms = d.as_millis() as u64,
                        "LV in use; retrying lvremove");
                    tokio::time::sleep(*d).await;
                }
                _ if in_use(&out) => {
                    let e = lvm_error(&cmd.0, &out);
                    return Err(Error::precondition(e.message().to_owned()));
                }
                _ => return Err(lvm_error(&cmd.0, &out)),
            }
        }
    }

    /// Removes one LV of ours, zeroing it first when configured. `pool` is
    /// the thin pool's row of the same report (for the wipe's room check).
    async fn destroy(&self, lv: &Lv, pool: Option<&Lv>) -> Result<()> {
        if self.settings.wipe == Wipe::Zero {
            self.zero(lv, pool).await?;
        }
        self.remove_lv(&lv.name).await?;
        crate::failpoints::crash_point("lvm::delete::after_lvremove");
        Ok(())
    }

    async fn zero(&self, lv: &Lv, pool: Option<&Lv>) -> Result<()> {
        let what = self.qualified(&lv.name);
        // Zeroing provisions every unallocated block of the LV until it is
        // removed: make sure the pool can take that.
        if let Some(p) = pool.and_then(|p| self.usage_of(p).ok()) {
            let extra = lv.size - lv.allocated();
            let t = p.thin.as_ref().expect("thin usage");
            let after = t.data_percent + extra as f64 * 100.0 / p.capacity.max(1) as f64;
            if after > WIPE_MAX_PERCENT {
                return Err(Error::exhausted(format!(
                    "secure wipe of {what} would provision {} more and take thin pool {} to {after:.2}% \
                     (limit {WIPE_MAX_PERCENT}%): not deleted; extend the pool or set lvm_wipe = none",
                    ByteSize(extra),
                    t.pool
                )));
            }
        }
        if !lv.active() {
            self.activate(&lv.name).await?;
        }
        if !lv.writable() {
            self.run_change(
                &self
                    .change("lvchange")
                    .args(["--permission", "rw"])
                    .arg(&what),
            )
            .await?;
        }
        let timeout = WIPE_BASE_TIMEOUT + Duration::from_secs(lv.size / WIPE_MIN_BYTES_PER_SEC);
        let cmd = Cmd::new("blkdiscard")
            .arg("--zeroout")
            .arg(self.lv_path(&lv.name).to_string_lossy())
            .timeout(timeout);
        self.run(&cmd)
            .await
            .map_err(|e| e.context(format!("secure wipe of {what}")))?;
        tracing::info!(lv = %what, bytes = lv.size, "LV zeroed before removal");
        Ok(())
    }

    /// Import `path` into a fresh thin LV under the temporary name, then
    /// publish it.
    async fn import_now(
        &self,
        dst: Uuid,
        path: &Path,
        format: ImageFormat,
        size: u64,
        progress: ProgressFn,
    ) -> Result<()> {
        let id = ObjectId::Volume(dst);
        // The service inspected the image already; inspecting here too keeps
        // the backend safe on its own (qcow2 backing or data files refused).
        let info = image::inspect(self.runner.as_ref(), path, format).await?;
        let size = self.round_up(size.max(info.virtual_size))?;
        let tmp = temp_lv(id);
        self.create_thin(&tmp, size).await?;
        let r = async {
            image::convert_into_device(
                self.runner.as_ref(),
                path,
                format,
                &self.lv_path(&tmp),
                info.virtual_size,
                progress.clone(),
            )
            .await?;
            self.rename(&tmp, &object_lv(id)).await
        }
        .await;
        if r.is_err() {
            self.discard_temporary(&tmp).await;
        }
        r?;
        progress("import", info.virtual_size, info.virtual_size);
        Ok(())
    }

    fn round_up(&self, bytes: u64) -> Result<u64> {
        let e = self.extent_size;
        bytes
            .checked_add(e - 1)
            .map(|b| b / e * e)
            .ok_or_else(|| Error::invalid(format!("size {bytes} is too large")))
    }

    async fn list_now(&self) -> Result<PoolListing> {
        let lvs = self.lvs_vg().await?;
        let mut out = PoolListing::default();
        let mut pool = None;
        for lv in &lvs {
            match self.classify(lv) {
                Class::Pool => pool = Some(lv),
                Class::Ours(Role::Object(id)) => {
                    out.objects.push(id);
                    if lv.data_percent.is_some() {
                        out.allocated.insert(id, lv.allocated());
                    }
                }
                // An operation under way (or one a crash interrupted,
                // cleared at the next start), like the file backend's
                // staging files.
                Class::Ours(Role::Temporary(_)) => {}
                Class::Foreign => out.foreign.push(self.qualified(&lv.name)),
            }
        }
        let pool = pool.ok_or_else(|| {
            Error::unavailable(format!("thin pool {} is gone from the VG", self.pool()))
        })?;
        out.usage = self.usage_of(pool)?;
        out.objects.sort();
        Ok(out)
    }

    async fn delete_now(&self, id: ObjectId) -> Result<()> {
        let lvs = self.lvs_vg().await?;
        let pool = lvs.iter().find(|l| self.classify(l) == Class::Pool);
        for lv in &lvs {
            match self.classify(lv) {
                Class::Ours(Role::Object(o) | Role::Temporary(o)) if o == id => {
                    self.destroy(lv, pool)
                        .await
                        .map_err(|e| e.context(format!("deleting {id}")))?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn clone_now(&self, src: ObjectId, dst: Uuid, size: u64) -> Result<()> {
        let source = self.object(src).await?;
        let id = ObjectId::Volume(dst);
        let size = self.round_up(size)?;
        if size <= source.size {
            return self
                .create_snapshot(&source.name, &object_lv(id), true)
                .await;
        }
        // Growing takes two steps: build under the temporary name.
        let tmp = temp_lv(id);
        self.create_snapshot(&source.name, &tmp, true).await?;
        let r = async {
            self.extend(&tmp, size).await?;
            self.rename(&tmp, &object_lv(id)).await
        }
        .await;
        if r.is_err() {
            self.discard_temporary(&tmp).await;
        }
        r
    }

    async fn resize_now(&self, id: ObjectId, size: u64) -> Result<()> {
        let lv = self.object(id).await?;
        let size = self.round_up(size)?;
        if size < lv.size {
            return Err(Error::invalid(format!(
                "{id} is {} bytes; shrinking to {size} is refused",
                lv.size
            )));
        }
        if size == lv.size {
            return Ok(());
        }
        self.extend(&lv.name, size).await
    }

    async fn set_read_only_now(&self, id: ObjectId) -> Result<()> {
        let lv = self.object(id).await?;
        if !lv.writable() {
            return Ok(());
        }
        self.run_change(
            &self
                .change("lvchange")
                .args(["--permission", "r"])
                .arg(self.qualified(&lv.name)),
        )
        .await
        .map(|_| ())
    }
}

impl Backend for LvmBackend {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c = vec!["thin".to_string(), "thin-snapshot".to_string()];
        if self.settings.wipe == Wipe::Zero {
            c.push("secure-wipe".to_string());
        }
        c
    }

    fn location(&self) -> String {
        self.pool()
    }

    fn device_path(&self, id: ObjectId) -> PathBuf {
        self.lv_path(&object_lv(id))
    }

    fn create(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let size = self.round_up(size)?;
            self.create_thin(&object_lv(id), size)
                .await
                .map_err(|e| e.context(format!("creating {id}")))
        })
    }

    fn delete(&self, id: ObjectId) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.delete_now(id))
    }

    fn snapshot(
        &self,
        src: ObjectId,
        dst: Uuid,
        _progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.create_snapshot(&object_lv(src), &object_lv(ObjectId::Snapshot(dst)), false)
                .await
                .map_err(|e| e.context(format!("snapshot of {src}")))
        })
    }

    fn clone_object(
        &self,
        src: ObjectId,
        dst: Uuid,
        size: u64,
        _progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.clone_now(src, dst, size)
                .await
                .map_err(|e| e.context(format!("clone of {src}")))
        })
    }

    fn set_read_only(&self, id: ObjectId) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.set_read_only_now(id))
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

    fn size_granularity(&self) -> u64 {
        self.extent_size
    }

    fn allocated(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move { Ok(self.object(id).await?.allocated()) })
    }

    fn size(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move { Ok(self.object(id).await?.size) })
    }

    fn list(&self) -> BoxFuture<'_, Result<PoolListing>> {
        Box::pin(self.list_now())
    }

    fn usage(&self) -> BoxFuture<'_, Result<PoolUsage>> {
        Box::pin(async move {
            let name = self.settings.thin_pool.to_string();
            match self.lvs_one(&name).await? {
                Some(p) if p.is_thin_pool() => self.usage_of(&p),
                _ => Err(Error::unavailable(format!(
                    "thin pool {} is gone from the VG",
                    self.pool()
                ))),
            }
        })
    }
}

#[cfg(test)]
#[path = "lvm_tests.rs"]
pub(crate) mod tests;
