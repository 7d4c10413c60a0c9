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
//! which must be flattened first. A clone whose chain of parents would pass
//! `max_clone_depth` is flattened (`rbd flatten`) before it is published,
//! like Cinder's `rbd_max_clone_depth`, so reads never walk a long chain.
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

use serde::Deserialize;
use uuid::Uuid;

use super::image;
use super::{Backend, ImageFormat, ObjectId, PoolListing, PoolUsage, ProgressFn};
use crate::error::{Error, ErrorKind, Result};
use crate::runner::{BoxFuture, Cmd, CommandRunner, Output};

const VOL_PREFIX: &str = "pd-vol-";
const SNAP_PREFIX: &str = "pd-snap-";
const TMP_PREFIX: &str = "pd-tmp-vol-";
/// The snapshot of an image base that its clones are made from.
const BASE_SNAP: &str = "pd-base";
/// The image-meta key tying an image to pdisk.
pub const OWNER_KEY: &str = "stratus.pdisk.object";
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

// ---------- JSON of rbd 16.2 ----------

/// A row of `rbd ls -l --format json`: an image, or one of its snapshots.
#[derive(Debug, Deserialize)]
struct LsRow {
    image: String,
    #[serde(default)]
    snapshot: Option<String>,
}

/// `rbd info --format json`.
#[derive(Debug, Deserialize)]
struct Info {
    size: u64,
    #[serde(default)]
    parent: Option<ParentRef>,
}

#[derive(Debug, Deserialize)]
struct ParentRef {
    pool: String,
    image: String,
}

/// `rbd du --format json`.
#[derive(Debug, Deserialize)]
struct Du {
    images: Vec<DuRow>,
}

#[derive(Debug, Deserialize)]
struct DuRow {
    name: String,
    #[serde(default)]
    snapshot: Option<String>,
    used_size: u64,
}

/// `rbd snap ls --format json`.
#[derive(Debug, Deserialize)]
struct SnapRow {
    name: String,
    #[serde(default)]
    protected: Option<String>,
}

/// `ceph mon dump --format json` (the parts used).
#[derive(Debug, Deserialize)]
struct MonDump {
    fsid: String,
    mons: Vec<MonEntry>,
}

#[derive(Debug, Deserialize)]
struct MonEntry {
    public_addrs: AddrVec,
}

#[derive(Debug, Deserialize)]
struct AddrVec {
    addrvec: Vec<MonAddr>,
}

#[derive(Debug, Deserialize)]
struct MonAddr {
    #[serde(rename = "type")]
    kind: String,
    addr: String,
}

impl MonDump {
    /// Each monitor's msgr v1 address when it has one (what every client
    /// parses unambiguously), else its v2 address.
    fn monitors(&self) -> Vec<String> {
        self.mons
            .iter()
            .filter_map(|m| {
                let v = &m.public_addrs.addrvec;
                v.iter()
                    .find(|a| a.kind == "v1")
                    .or_else(|| v.iter().find(|a| a.kind == "v2"))
                    .map(|a| a.addr.clone())
            })
            .collect()
    }
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

/// `rbd children --format json`.
#[derive(Debug, Deserialize)]
struct Child {
    pool: String,
    image: String,
}

/// `ceph df --format json` (the parts used).
#[derive(Debug, Deserialize)]
struct Df {
    pools: Vec<DfPool>,
}

#[derive(Debug, Deserialize)]
struct DfPool {
    name: String,
    stats: DfStats,
}

#[derive(Debug, Deserialize)]
struct DfStats {
    stored: u64,
    max_avail: u64,
}

fn parse<'a, T: Deserialize<'a>>(what: &str, text: &'a str) -> Result<T> {
    serde_json::from_str(text.trim())
        .map_err(|e| Error::internal(format!("unexpected output of {what}: {e}")))
}

/// The error of a failed rbd/ceph call: the program, its subcommand and
/// target, the exit status and the tool's messages, its kind read from the
/// errno the tools print ("(2) No such file or directory").
/// Reports `rbd`'s progress lines on stderr (`Importing image: 42%
/// complete...`) as bytes of `total` to `progress` under `phase`.
fn rbd_progress(phase: &'static str, total: u64, progress: ProgressFn) -> crate::runner::LineSink {
    Arc::new(move |line: &str| {
        let Some((head, _)) = line.split_once("% complete") else {
            return;
        };
        let pct = head.rsplit(' ').next().and_then(|p| p.parse::<u64>().ok());
        if let Some(pct) = pct.filter(|p| *p <= 100) {
            progress(phase, total / 100 * pct + total % 100 * pct / 100, total);
        }
    })
}

fn ceph_error(cmd: &Cmd, out: &Output) -> Error {
    let e = &out.stderr;
    let kind = if e.contains("(2) No such file or directory") {
        ErrorKind::NotFound
    } else if e.contains("(17) File exists") {
        ErrorKind::AlreadyExists
    } else if e.contains("(28) No space left") || e.contains("(122) Disk quota exceeded") {
        ErrorKind::ResourceExhausted
    } else if e.contains("(16) Device or resource busy")
        || e.contains("still has watchers")
        || e.contains("has snapshots")
    {
        ErrorKind::FailedPrecondition
    } else if e.contains("(110) Connection timed out") || e.contains("(13) Permission denied") {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    };
    // The first lines are enough: rbd prints its error, then librbd's.
    let said: Vec<&str> = e
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("% complete"))
        .take(5)
        .collect();
    let target = cmd
        .args
        .iter()
        .rev()
        .find(|a| a.contains('/') && !a.starts_with('/'))
        .or(cmd.args.last())
        .map(String::as_str)
        .unwrap_or("");
    Error::new(
        kind,
        format!(
            "{} {} exited with status {}: {}",
            cmd.program,
            target,
            out.status,
            if said.is_empty() {
                "(no stderr)".to_string()
            } else {
                said.join("; ")
            }
        ),
    )
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
}

impl RbdBackend {
    /// Opens the pool: checks that the user reaches it (one `rbd ls`),
    /// reads the monitors clients are sent to (`ceph mon dump`) and makes
    /// the staging directory.
    pub async fn open(runner: Arc<dyn CommandRunner>, settings: RbdSettings) -> Result<RbdBackend> {
        let mut b = RbdBackend {
            runner,
            settings,
            monitors: Mutex::new((Vec::new(), std::time::Instant::now())),
            fsid: String::new(),
            snap_parent: Mutex::default(),
        };
        b.ls()
            .await
            .map_err(|e| e.context(format!("rbd pool {}", b.settings.pool)))?;
        let (monitors, fsid) = b.mon_dump().await?;
        b.fsid = fsid;
        let dir = &b.settings.staging_dir;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        tracing::info!(pool = %b.settings.pool, user = %b.settings.ceph_id,
            client_user = %b.settings.client_id, monitors = ?monitors, fsid = %b.fsid,
            max_clone_depth = b.settings.max_clone_depth, "rbd backend: pool ready");
        *b.monitors.lock().unwrap() = (monitors, std::time::Instant::now());
        Ok(b)
    }

    /// `ceph mon dump`: the monitors clients can be sent to, and the fsid.
    async fn mon_dump(&self) -> Result<(Vec<String>, String)> {
        let cmd = self
            .cli("ceph")
            .args(["mon", "dump", "--format", "json"])
            .timeout(REPORT_TIMEOUT);
        let out = self
            .run(&cmd)
            .await
            .map_err(|e| e.context("ceph mon dump"))?;
        let dump: MonDump = parse("ceph mon dump", &out.stdout)?;
        let monitors = dump.monitors();
        if monitors.is_empty() {
            return Err(Error::unavailable(
                "ceph mon dump lists no monitor address clients could be sent to",
            ));
        }
        Ok((monitors, dump.fsid))
    }

    /// Reads the monitors again when [`MON_REFRESH`] has passed since the
    /// last read (see the field). A failure is logged and keeps the list.
    async fn refresh_monitors(&self, now: std::time::Instant) {
        if now.duration_since(self.monitors.lock().unwrap().1) < MON_REFRESH {
            return;
        }
        match self.mon_dump().await {
            Ok((monitors, fsid)) if fsid == self.fsid => {
                let mut m = self.monitors.lock().unwrap();
                if m.0 != monitors {
                    tracing::info!(before = ?m.0, now = ?monitors, "rbd backend: the cluster's monitors changed");
                }
                *m = (monitors, now);
            }
            Ok((_, fsid)) => {
                tracing::warn!(fsid = %fsid, expected = %self.fsid,
                    "ceph mon dump names another cluster; monitors kept");
                self.monitors.lock().unwrap().1 = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "monitors not re-read; the last list kept");
                self.monitors.lock().unwrap().1 = now;
            }
        }
    }

    /// Removes what interrupted operations left: temporary images and
    /// staged uploads. Returns their names.
    pub async fn clear_temporaries(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for row in self.ls().await? {
            if row.snapshot.is_none() && parse_suffix(&row.image, TMP_PREFIX).is_some() {
                self.remove_image(&row.image).await?;
                removed.push(self.spec(&row.image));
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

    /// `POOL/IMAGE`.
    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.settings.pool)
    }

    /// The common arguments of every call: who we are and where the cluster is.
    fn cli(&self, program: &str) -> Cmd {
        let mut c = Cmd::new(program)
            .arg("--conf")
            .arg(self.settings.ceph_conf.to_string_lossy())
            .args(["--id", self.settings.ceph_id.as_str()]);
        if let Some(k) = &self.settings.keyring {
            c = c.arg("--keyring").arg(k.to_string_lossy());
        }
        c
    }

    /// An `rbd` call that reads, with `--format json`.
    fn rbd_report<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cli("rbd")
            .args(args)
            .args(["--format", "json"])
            .timeout(REPORT_TIMEOUT)
    }

    /// An `rbd` call that changes something. (Its progress lines go to
    /// stderr and are dropped from errors; `--no-progress` is not taken by
    /// every subcommand.)
    fn rbd_change<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cli("rbd").args(args).timeout(CHANGE_TIMEOUT)
    }

    async fn run(&self, cmd: &Cmd) -> Result<Output> {
        let out = self.runner.run(cmd).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(ceph_error(cmd, &out))
        }
    }

    /// Every image and snapshot of the pool: one `rbd ls -l`.
    async fn ls(&self) -> Result<Vec<LsRow>> {
        let out = self
            .run(&self.rbd_report(["ls", "-l", self.settings.pool.as_str()]))
            .await?;
        // An empty pool prints nothing at all, not "[]".
        if out.stdout.trim().is_empty() {
            return Ok(Vec::new());
        }
        parse("rbd ls -l", &out.stdout)
    }

    async fn info(&self, spec: &str) -> Result<Info> {
        let out = self.run(&self.rbd_report(["info", spec])).await?;
        parse("rbd info", &out.stdout)
    }

    /// The `POOL/IMAGE[@SNAP]` of an object; a snapshot's volume is looked
    /// up (NotFound when no volume has it).
    async fn object_spec(&self, id: ObjectId) -> Result<String> {
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
    async fn volume_of(&self, s: Uuid) -> Result<Option<Uuid>> {
        if let Some(v) = self.snap_parent.lock().unwrap().get(&s) {
            return Ok(Some(*v));
        }
        self.remember_snapshots(&self.ls().await?);
        Ok(self.snap_parent.lock().unwrap().get(&s).copied())
    }

    /// Refreshes the snapshot -> volume map from a full listing.
    fn remember_snapshots(&self, rows: &[LsRow]) {
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

    async fn tag(&self, image: &str, id: ObjectId) -> Result<()> {
        let value = match id {
            ObjectId::Volume(u) => format!("volume {u}"),
            ObjectId::Snapshot(u) => format!("snapshot {u}"),
        };
        self.run(&self.rbd_change(["image-meta", "set", &self.spec(image), OWNER_KEY, &value]))
            .await
            .map(|_| ())
    }

    /// Publishes a built temporary under the object's name.
    async fn publish(&self, tmp: &str, u: Uuid) -> Result<()> {
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
    async fn build<F>(&self, u: Uuid, build: F) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>>,
    {
        let tmp = temp_image(u);
        let r = async {
            build.await?;
            self.tag(&tmp, ObjectId::Volume(u)).await?;
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

    fn data_pool_args(&self) -> Vec<String> {
        match &self.settings.data_pool {
            Some(p) => vec!["--data-pool".into(), p.to_string()],
            None => Vec::new(),
        }
    }

    /// `rbd rm`; Ok when the image does not exist.
    async fn remove_image(&self, image: &str) -> Result<()> {
        let cmd = self
            .rbd_change(["rm", &self.spec(image)])
            .timeout(DATA_TIMEOUT);
        let out = self.runner.run(&cmd).await?;
        if out.success() || out.stderr.contains("(2) No such file or directory") {
            return Ok(());
        }
        Err(ceph_error(&cmd, &out))
    }

    fn size_arg(size: u64) -> String {
        // rbd's --size takes a unit; bytes are "B"... in 16.2 only M/G/T
        // are documented, so sizes are whole MiB (the size granularity).
        format!("{}M", size.div_ceil(1 << 20))
    }

    async fn create_now(&self, u: Uuid, size: u64) -> Result<()> {
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

    /// How many ancestors `spec` has (0 for an image that is no clone).
    async fn clone_depth(&self, spec: &str) -> Result<u32> {
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

    async fn clone_now(
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
                ObjectId::Snapshot(_) => {
                    let depth = self.clone_depth(&source).await? + 1;
                    self.clone_snapshot(&source, &tmp).await?;
                    if depth > self.settings.max_clone_depth {
                        tracing::info!(clone = %tmp, depth, max = self.settings.max_clone_depth,
                            "clone chain too deep: flattening");
                        progress("flatten", 0, 1);
                        self.run(&self.rbd_change(["flatten", &tmp]).timeout(DATA_TIMEOUT))
                            .await?;
                        progress("flatten", 1, 1);
                    }
                }
                ObjectId::Volume(_) if self.is_read_only(&source).await? => {
                    // An image base never changes: layer on its pd-base.
                    let snap = self.base_snapshot(&source).await?;
                    let depth = self.clone_depth(&source).await? + 1;
                    self.clone_snapshot(&snap, &tmp).await?;
                    if depth > self.settings.max_clone_depth {
                        progress("flatten", 0, 1);
                        self.run(&self.rbd_change(["flatten", &tmp]).timeout(DATA_TIMEOUT))
                            .await?;
                        progress("flatten", 1, 1);
                    }
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
    async fn clone_snapshot(&self, snap: &str, tmp: &str) -> Result<()> {
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
        self.run(&self.rbd_change(["snap", "protect", snap]))
            .await?;
        self.run(&cmd).await.map(|_| ())
    }

    async fn delete_now(&self, id: ObjectId) -> Result<()> {
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
                    }
                }
                self.snap_parent.lock().unwrap().remove(&s);
                Ok(())
            }
        }
    }

    async fn resize_now(&self, id: ObjectId, size: u64) -> Result<()> {
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

    async fn import_now(
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
    async fn import_raw(
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
    fn qemu_target(&self, image: &str) -> String {
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

    /// How a client opens volume `u`'s image (see the module doc).
    pub fn native_access(&self, u: Uuid) -> RbdAccess {
        RbdAccess {
            monitors: self.monitors.lock().unwrap().0.clone(),
            pool: self.settings.pool.to_string(),
            image: volume_image(u),
            user: self.settings.client_id.to_string(),
            secret_ref: format!("keyring:client.{}", self.settings.client_id),
            cluster_fsid: self.fsid.clone(),
        }
    }

    /// Whether volume image `spec` was made read-only (an image base).
    async fn is_read_only(&self, spec: &str) -> Result<bool> {
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
    async fn base_snapshot(&self, spec: &str) -> Result<String> {
        let snap = format!("{spec}@{BASE_SNAP}");
        let cmd = self.rbd_change(["snap", "create", &snap]);
        let out = self.runner.run(&cmd).await?;
        if !out.success() && !out.stderr.contains("(17) File exists") {
            return Err(ceph_error(&cmd, &out));
        }
        Ok(snap)
    }

    /// The clones of `snap` (`POOL/IMAGE@SNAP`), as `POOL/IMAGE`.
    async fn children(&self, snap: &str) -> Result<Vec<String>> {
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
    async fn remove_base_snapshot(&self, image: &str) -> Result<()> {
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
        if row.protected.as_deref() == Some("true") {
            self.run(&self.rbd_change(["snap", "unprotect", &snap]))
                .await?;
        }
        self.run(&self.rbd_change(["snap", "rm", &snap]))
            .await
            .map(|_| ())
    }

    async fn du(&self, spec: Option<&str>) -> Result<Du> {
        let cmd = match spec {
            Some(s) => self.rbd_report(["du", s]),
            None => self.rbd_report(["du", "--pool", self.settings.pool.as_str()]),
        };
        let out = self.run(&cmd).await?;
        parse("rbd du", &out.stdout)
    }

    async fn usage_now(&self) -> Result<PoolUsage> {
        self.refresh_monitors(std::time::Instant::now()).await;
        let cmd = self
            .cli("ceph")
            .args(["df", "--format", "json"])
            .timeout(REPORT_TIMEOUT);
        let out = self.run(&cmd).await?;
        let df: Df = parse("ceph df", &out.stdout)?;
        let p = df
            .pools
            .iter()
            .find(|p| p.name == self.settings.pool.as_str())
            .ok_or_else(|| {
                Error::unavailable(format!("ceph df does not list pool {}", self.settings.pool))
            })?;
        // The pool's data lives in the data pool when there is one.
        let data = match &self.settings.data_pool {
            Some(d) => df.pools.iter().find(|p| p.name == d.as_str()).unwrap_or(p),
            None => p,
        };
        Ok(PoolUsage {
            capacity: data.stats.stored + data.stats.max_avail,
            used: data.stats.stored,
            thin: None,
        })
    }

    async fn list_now(&self) -> Result<PoolListing> {
        self.refresh_monitors(std::time::Instant::now()).await;
        let rows = self.ls().await?;
        self.remember_snapshots(&rows);
        let mut out = PoolListing::default();
        for r in &rows {
            let id = match (&r.snapshot, parse_suffix(&r.image, VOL_PREFIX)) {
                (None, Some(v)) => Some(ObjectId::Volume(v)),
                // An image base's own snapshot: part of its volume.
                (Some(s), Some(_)) if s == BASE_SNAP => continue,
                (Some(s), Some(_)) => parse_suffix(s, SNAP_PREFIX).map(ObjectId::Snapshot),
                _ => None,
            };
            match id {
                Some(id) => out.objects.push(id),
                // Being built, or left by a crash (cleared at start).
                None if r.snapshot.is_none() && parse_suffix(&r.image, TMP_PREFIX).is_some() => {}
                None => out.foreign.push(match &r.snapshot {
                    Some(s) => format!("{}@{s}", self.spec(&r.image)),
                    None => self.spec(&r.image),
                }),
            }
        }
        if !rows.is_empty() {
            for d in self.du(None).await?.images {
                let id = match (&d.snapshot, parse_suffix(&d.name, VOL_PREFIX)) {
                    (None, Some(v)) => ObjectId::Volume(v),
                    // An image base's data sits in its pd-base snapshot.
                    (Some(s), Some(v)) if s == BASE_SNAP => ObjectId::Volume(v),
                    (Some(s), Some(_)) => match parse_suffix(s, SNAP_PREFIX) {
                        Some(s) => ObjectId::Snapshot(s),
                        None => continue,
                    },
                    _ => continue,
                };
                *out.allocated.entry(id).or_default() += d.used_size;
            }
        }
        out.usage = self.usage_now().await?;
        out.objects.sort();
        Ok(out)
    }
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

    fn flatten(&self, id: ObjectId, progress: ProgressFn) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let ObjectId::Volume(_) = id else {
                return Err(Error::invalid(format!("{id}: only volumes are flattened")));
            };
            let spec = self.object_spec(id).await?;
            if self.info(&spec).await?.parent.is_none() {
                return Ok(false);
            }
            progress("flatten", 0, 1);
            self.run(&self.rbd_change(["flatten", &spec]).timeout(DATA_TIMEOUT))
                .await
                .map_err(|e| e.context(format!("flattening {id}")))?;
            progress("flatten", 1, 1);
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
        Box::pin(self.usage_now())
    }
}

#[cfg(test)]
#[path = "rbd_tests.rs"]
mod tests;
