//! The kernel's iSCSI initiator: [`KernelAttacher`] (`--attach kernel` on an
//! iSCSI export). open-iscsi logs the host in, the LUN becomes a SCSI disk
//! and QEMU opens `/dev/sdX` as a `host_device`.
//!
//! Why one file of ~910 lines: it is one sequence of iscsiadm/sysfs steps
//! whose attach and detach halves undo each other, documented here step by
//! step; the tests are in `iscsi_kernel_tests.rs`.
//!
//! It owns, on the host:
//! - one iscsiadm *iface* record (`stratus` by default) whose
//!   `iface.initiatorname` is agentd's initiator IQN, the name pdisk's export
//!   ACLs allow. Every session agentd makes goes through it, which is also how
//!   agentd tells its own sessions from an operator's;
//! - the node records and sessions of the (portal, target) pairs its guests
//!   use, and the SCSI devices of the LUNs it scanned.
//!
//! The sequence (argv only, through the runner, each call with a timeout).
//! Attach, when no guest holds a session to (portal, target) yet:
//!
//! ```text
//! iscsiadm -m iface -I stratus -o new                  only when ifaces/stratus is missing
//! iscsiadm -m iface -I stratus -o update -n iface.initiatorname -v IQN
//! iscsiadm -m node -T TARGET -p PORTAL -I stratus -o new
//! iscsiadm -m node -T TARGET -p PORTAL -I stratus -o update -n node.startup -v manual
//!          -n node.session.scan -v manual -n node.session.auth.authmethod -v CHAP|None
//!          [-n node.session.auth.username -v USER]
//!          [-n node.session.auth.username_in -v TARGET_USER]   mutual CHAP only
//! (CHAP passwords: written into the node record file by agentd, see below)
//! iscsiadm -m node -T TARGET -p PORTAL -I stratus --login  (15: already logged in = fine)
//! ```
//!
//! then, for every LUN (the session is found in sysfs, not in iscsiadm's output):
//!
//! ```text
//! write "- - LUN" to /sys/class/scsi_host/hostN/scan   (only this LUN is probed)
//! wait for /dev/disk/by-path/ip-ADDR:PORT-iscsi-TARGET-lun-LUN (backoff, bounded)
//! ```
//!
//! Detach (every iscsiadm call above and below: a 6, the node database
//! changing under it, is retried; see `NODE_DB`):
//!
//! ```text
//! unless another holder uses the LUN:
//! blockdev --flushbufs /dev/sdX ; write "1" to /sys/block/sdX/device/delete
//! once no holder is left:
//! iscsiadm -m node -T TARGET -p PORTAL -I stratus --logout     (21: no session = fine)
//! iscsiadm -m node -T TARGET -p PORTAL -I stratus -o delete    (21: no record = fine)
//! ```
//!
//! The SCSI device to delete is found at detach time from the live session
//! (its host number) and the LUN, never from a recorded `sdX` name: those
//! are reused, and deleting someone else's disk is not an undo.
//!
//! **CHAP secrets never reach argv or a log.** `iscsiadm -o update -n
//! node.session.auth.password -v SECRET` would put the secret in
//! `/proc/PID/cmdline`, readable by every user, and in the runner's argv log;
//! iscsiadm 2.1.8 reads a value from nowhere else (its `-v` is argv only; no
//! stdin or file option). So iscsiadm makes the record and every other
//! change, and agentd then writes the `node.session.auth.password = SECRET`
//! line (and, for mutual CHAP, `node.session.auth.password_in = SECRET`: the
//! secret the target must prove it knows) into the record file itself, as a
//! new 0600 file renamed over it. iscsiadm's record parser
//! (`idbm_recinfo_config`) reads such lines and derives the password lengths
//! itself; `--login` reads the record and hands it to iscsid over its
//! socket. The record is deleted at logout.
//!
//! **Mutual CHAP** (`agentd --chap-mutual`): with `username_in` and
//! `password_in` in the record, open-iscsi sends the target a challenge of
//! its own after answering the target's, and fails the login (iscsiadm exit
//! 24, authorization failure) unless the target answers it with that
//! account. Without them the initiator never asks, whatever the target is
//! configured with: so the two keys are what makes the target authenticated.
//!
//! **Reference counts.** Several LUNs (and guests) can share one session to a
//! (portal, target). Each session has a set of holders (guest UUID + disk),
//! each with its LUN: a LUN's device is removed when no holder of that LUN is
//! left, the session logged out when no holder at all is. A set, not a
//! counter, so a repeated detach cannot drive it below zero. The sets live
//! in memory and are rebuilt at start from the attachments recorded in the
//! store ([`KernelAttacher::adopt`]) *before* reconciliation undoes the
//! attachments of dead guests, so an agentd restart never logs out a session
//! that a live guest uses; sessions on our iface that no record holds are
//! then logged out ([`KernelAttacher::reap_orphans`]), so none leaks.
//! Attach and detach of one session are serialized by its own lock; iscsiadm
//! calls on the node database by one more (see `NODE_DB`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use stratus_core::error::{Error, Result};
use stratus_core::runner::{Cmd, CommandRunner, Output};
use stratus_core::types::Chap;

use super::iscsi_nodes::{write_secrets, SCRATCH_PREFIX};
use super::{command_error, Holder};

pub const ISCSIADM: &str = "iscsiadm";
/// The iface record agentd's sessions go through.
pub const DEFAULT_IFACE: &str = "stratus";

/// iscsiadm's exit codes we act on (open-iscsi `include/iscsi_err.h`).
const ISCSI_ERR_IDBM: i32 = 6;
const ISCSI_ERR_SESS_EXISTS: i32 = 15;
const ISCSI_ERR_NO_OBJS_FOUND: i32 = 21;

/// open-iscsi's node database is not safe against itself: a command that
/// walks every record (`-m node -o update|delete`, `--login`, `-m iface -o
/// update`: `idbm_for_each_rec`) fails with 6 (ISCSI_ERR_IDBM) when another
/// iscsiadm deletes some other target's record under it (it opens a
/// directory that was just removed). So in this process a record deletion
/// runs alone (write lock) and every other iscsiadm call shares a read
/// lock, and a 6 caused by iscsiadm runs of other processes is retried.
/// Process-wide, as the database is the host's.
static NODE_DB: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
const IDBM_ATTEMPTS: u32 = 4;

/// The record keys whose values agentd writes itself: the initiator's
/// secret, and for mutual CHAP the target's.
const PASSWORD_KEY: &str = "node.session.auth.password";
const PASSWORD_IN_KEY: &str = "node.session.auth.password_in";

/// Calls on records and sessions; a login waits for iscsid, whose own
/// retries (node.session.initial_login_retry_max = 8 x login_timeout = 15 s
/// by default) can take two minutes before it gives up.
const ISCSIADM_TIMEOUT: Duration = Duration::from_secs(30);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(180);
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(60);
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// One LUN of an iSCSI target, as the kernel initiator reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IscsiLun {
    /// Always an address: by-path names, sysfs and node records carry the
    /// address the initiator connected to, not a host name.
    pub portal: SocketAddr,
    pub target: String,
    pub lun: u32,
}

impl IscsiLun {
    pub fn new(portal: SocketAddr, target: &str, lun: u32) -> Result<IscsiLun> {
        check_target(target)?;
        Ok(IscsiLun {
            portal,
            target: target.to_owned(),
            lun,
        })
    }

    /// From an export's `host:port` portal (a host name is resolved once,
    /// here), target and LUN.
    pub async fn resolve(portal: &str, target: &str, lun: u32) -> Result<IscsiLun> {
        let addr = match portal.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(portal)
                .await
                .map_err(|e| Error::unavailable(format!("iSCSI portal {portal:?}: {e}")))?
                .next()
                .ok_or_else(|| {
                    Error::unavailable(format!("iSCSI portal {portal:?}: no address"))
                })?,
        };
        IscsiLun::new(addr, target, lun)
    }

    /// udev's name for the LUN's disk (systemd's path_id:
    /// `ip-%s:%s-iscsi-%s-lun-%s` from the connection's persistent address
    /// and port, the session's target name and the LUN).
    pub fn by_path_name(&self) -> String {
        format!(
            "ip-{}:{}-iscsi-{}-lun-{}",
            self.portal.ip(),
            self.portal.port(),
            self.target,
            self.lun
        )
    }

    fn session(&self) -> SessionKey {
        SessionKey {
            portal: self.portal,
            target: self.target.clone(),
        }
    }
}

impl std::fmt::Display for IscsiLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LUN {} of {} at {}", self.lun, self.target, self.portal)
    }
}

/// Target names go into paths (node records, by-path links): iqn./eui./naa.
/// names of letters, digits and `.:-`, at most 223 bytes (RFC 3720).
fn check_target(t: &str) -> Result<()> {
    let ok = (5..=223).contains(&t.len())
        && ["iqn.", "eui.", "naa."]
            .iter()
            .any(|p| t.to_ascii_lowercase().starts_with(p))
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid iSCSI target name {t:?}: iqn./eui./naa. followed by letters, digits, . : -"
        )))
    }
}

/// A kernel-attached disk, as recorded in the guest's runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDisk {
    pub lun: IscsiLun,
    /// The block device QEMU opened (`/dev/sdX`); None until the LUN appeared.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// The target's CHAP user when the login authenticated the target too
    /// (mutual CHAP); never its secret, which lives only in the node record.
    /// Absent for one-way CHAP and in records from before mutual CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_target_user: Option<String>,
}

/// A LUN made visible on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedLun {
    /// `/dev/disk/by-path/ip-...-lun-N`
    pub by_path: PathBuf,
    /// What it points to: `/dev/sdX`.
    pub device: PathBuf,
}

/// Settings of the kernel initiator; the roots are `/sys`, `/dev` and
/// `/etc/iscsi` except in tests.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// The initiator IQN sessions log in as (pdisk's export ACL names it).
    pub initiator: String,
    pub iface: String,
    pub sys: PathBuf,
    pub dev: PathBuf,
    /// open-iscsi's database root (`nodes/`, `ifaces/`): Debian's /etc/iscsi.
    pub iscsi_db: PathBuf,
    /// How long to wait for a scanned LUN's by-path link.
    pub device_timeout: Duration,
    /// How long a write to sysfs (a scan, a delete) may block.
    pub sysfs_timeout: Duration,
}

impl KernelOptions {
    pub fn new(initiator: &str) -> KernelOptions {
        KernelOptions {
            initiator: initiator.to_owned(),
            iface: DEFAULT_IFACE.to_owned(),
            sys: "/sys".into(),
            dev: "/dev".into(),
            iscsi_db: "/etc/iscsi".into(),
            device_timeout: Duration::from_secs(30),
            sysfs_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    portal: SocketAddr,
    target: String,
}

impl std::fmt::Display for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.target, self.portal)
    }
}

/// A session's holders, each with the LUN it uses.
type Holders = BTreeMap<Holder, u32>;

/// An iSCSI session as sysfs shows it.
#[derive(Debug, Clone)]
struct LiveSession {
    host: u32,
    target: String,
    portal: Option<SocketAddr>,
    iface: Option<String>,
}

/// The kernel initiator: logs in, exposes LUNs, counts holders, logs out.
pub struct KernelAttacher {
    runner: Arc<dyn CommandRunner>,
    opts: KernelOptions,
    sessions: Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<Holders>>>>,
    /// True once our iface record is in place (made once per agentd).
    iface_ready: tokio::sync::Mutex<bool>,
    /// The unit tier's armed crash point (see `crash_point`).
    crash: super::CrashPoints,
}

impl KernelAttacher {
    pub fn new(runner: Arc<dyn CommandRunner>, opts: KernelOptions) -> KernelAttacher {
        KernelAttacher {
            runner,
            opts,
            sessions: Mutex::default(),
            iface_ready: tokio::sync::Mutex::new(false),
            crash: super::CrashPoints::default(),
        }
    }

    /// A step boundary of the login sequence (`crate::failpoints::LAB_POINTS`):
    /// agentd exits here in the fault-injection build; the unit tier panics
    /// the attach's task when armed with [`Self::arm_crash_point`].
    fn crash_point(&self, name: &'static str) {
        self.crash.hit(name);
    }

    #[cfg(test)]
    pub(crate) fn arm_crash_point(&self, at: Option<&'static str>) {
        self.crash.arm(at);
    }

    pub fn options(&self) -> &KernelOptions {
        &self.opts
    }

    /// `iscsiadm --version`, or why the kernel initiator cannot be used.
    pub async fn probe(&self) -> Result<String> {
        let cmd = Cmd::new(ISCSIADM)
            .arg("--version")
            .timeout(Duration::from_secs(10));
        let out = self
            .runner
            .run(&cmd)
            .await
            .map_err(|e| e.context("--attach kernel needs open-iscsi's iscsiadm"))?;
        if !out.success() {
            return Err(command_error(&cmd, &out).context("--attach kernel"));
        }
        Ok(out.stdout.trim().to_owned())
    }

    fn slot(&self, key: &SessionKey) -> Arc<tokio::sync::Mutex<Holders>> {
        self.sessions
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// How many holders the session of `lun` has.
    pub async fn holders(&self, lun: &IscsiLun) -> usize {
        self.slot(&lun.session()).lock().await.len()
    }

    /// Makes `lun` a block device on this host for `holder`: logs in when no
    /// one holds the session yet, scans only this LUN, waits for its by-path
    /// link. On failure everything this call did is undone.
    pub async fn attach(
        &self,
        holder: &Holder,
        lun: &IscsiLun,
        chap: Option<&Chap>,
    ) -> Result<AttachedLun> {
        let key = lun.session();
        let slot = self.slot(&key);
        let mut holders = slot.lock().await;
        if holders.is_empty() {
            if let Err(e) = self.log_in(&key, chap).await {
                if let Err(u) = self.forget_session(&key).await {
                    tracing::warn!(session = %key, error = %u, "undoing a failed login");
                }
                return Err(e);
            }
        }
        match self.expose(lun).await {
            Ok(a) => {
                self.crash_point("kernel.scanned");
                holders.insert(holder.clone(), lun.lun);
                tracing::info!(holder = %holder, lun = %lun, device = %a.device.display(),
                    holders = holders.len(), "kernel iSCSI attach");
                Ok(a)
            }
            Err(e) => {
                if let Err(u) = self.release(&key, lun.lun, &holders).await {
                    tracing::warn!(lun = %lun, error = %u, "undoing a failed attach");
                }
                Err(e)
            }
        }
    }

    /// Undoes `holder`'s attachment of `lun`: flushes and deletes the LUN's
    /// SCSI device unless another holder uses the same LUN, and logs out of
    /// the session when no holder is left. Succeeds when there is nothing to
    /// undo (already logged out, guest long gone, repeated detach).
    pub async fn detach(&self, holder: &Holder, lun: &IscsiLun) -> Result<()> {
        let key = lun.session();
        let slot = self.slot(&key);
        let mut holders = slot.lock().await;
        // Dropped first: a failure below must not pin the session forever.
        holders.remove(holder);
        let r = self.release(&key, lun.lun, &holders).await;
        tracing::info!(holder = %holder, lun = %lun, holders = holders.len(),
            ok = r.is_ok(), "kernel iSCSI detach");
        r
    }

    /// Makes the kernel read a grown LUN's capacity again (`1` into
    /// `/sys/block/sdX/device/rescan`), so QEMU, which opened the block
    /// device, sees the new size.
    pub async fn rescan(&self, disk: &KernelDisk) -> Result<()> {
        let Some(name) = disk.device.as_ref().and_then(|d| d.file_name()) else {
            return Err(Error::precondition(format!(
                "{}: no block device recorded to rescan",
                disk.lun
            )));
        };
        let rescan = self.opts.sys.join("block").join(name).join("device/rescan");
        self.write_sysfs(&rescan, "1").await?;
        tracing::info!(lun = %disk.lun, device = ?disk.device, "kernel iSCSI disk rescanned");
        Ok(())
    }

    /// Counts a recorded attachment whose guest may still run (agentd start).
    pub async fn adopt(&self, holder: Holder, lun: &IscsiLun) {
        self.slot(&lun.session())
            .lock()
            .await
            .insert(holder, lun.lun);
    }

    /// Logs out of sessions on our iface that no holder has: left by a crash
    /// or a failed logout. Only at start, after every record was adopted.
    /// Returns what it did, for the reconciliation report.
    pub async fn reap_orphans(&self) -> Vec<String> {
        self.reap()
            .await
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| e))
            .collect()
    }

    /// [`Self::reap_orphans`], each line Ok when it says what was removed
    /// (journaled as LEFTOVER_REMOVED by reconciliation), Err when it says
    /// what could not be.
    pub async fn reap(&self) -> Vec<std::result::Result<String, String>> {
        let mut report = Vec::new();
        // A crash while writing a password can leave its scratch file.
        if let Ok(entries) = std::fs::read_dir(&self.opts.iscsi_db) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX) {
                    let _ = std::fs::remove_file(e.path());
                    report.push(Ok(format!("removed leftover {}", e.path().display())));
                }
            }
        }
        for s in self.live_sessions() {
            let Some(portal) = s.portal else {
                continue;
            };
            if s.iface.as_deref() != Some(self.opts.iface.as_str()) {
                continue;
            }
            let key = SessionKey {
                portal,
                target: s.target.clone(),
            };
            let slot = self.slot(&key);
            let holders = slot.lock().await;
            if !holders.is_empty() {
                continue;
            }
            match self.forget_session(&key).await {
                Ok(()) => report.push(Ok(format!("logged out of unused iSCSI session to {key}"))),
                Err(e) => report.push(Err(format!("unused iSCSI session to {key}: {e}"))),
            }
        }
        // Records without a session (a crash before the login): gone too,
        // with the secrets agentd wrote into them.
        let live: Vec<SessionKey> = self
            .live_sessions()
            .into_iter()
            .filter(|s| s.iface.as_deref() == Some(self.opts.iface.as_str()))
            .filter_map(|s| {
                Some(SessionKey {
                    portal: s.portal?,
                    target: s.target,
                })
            })
            .collect();
        for (target, portal) in super::iscsi_nodes::records(&self.opts.iscsi_db, &self.opts.iface) {
            let key = SessionKey { portal, target };
            let slot = self.slot(&key);
            let holders = slot.lock().await;
            if !holders.is_empty() || live.contains(&key) {
                continue;
            }
            match self.forget_session(&key).await {
                Ok(()) => report.push(Ok(format!("removed unused iSCSI node record of {key}"))),
                Err(e) => report.push(Err(format!("unused iSCSI node record of {key}: {e}"))),
            }
        }
        report
    }

    // ---------- the steps ----------

    fn node_cmd(&self, key: &SessionKey) -> Cmd {
        Cmd::new(ISCSIADM).args([
            "-m",
            "node",
            "-T",
            &key.target,
            "-p",
            &key.portal.to_string(),
            "-I",
            &self.opts.iface,
        ])
    }

    async fn ensure_iface(&self) -> Result<()> {
        let mut ready = self.iface_ready.lock().await;
        if *ready {
            return Ok(());
        }
        let iface = || Cmd::new(ISCSIADM).args(["-m", "iface", "-I", &self.opts.iface]);
        // Made only when its record is missing: `-o new` on an existing
        // iface rewrites it with defaults (an operator's settings on it, such
        // as iface.net_ifacename, would be lost at every agentd start), and
        // fails with 15 while sessions use it (after a restart that adopted
        // guests), which would be logged as a failed command.
        let record = self.opts.iscsi_db.join("ifaces").join(&self.opts.iface);
        if !record.is_file() {
            // 15: a session uses it after all, so it exists.
            self.iscsiadm(
                &iface().args(["-o", "new"]).timeout(ISCSIADM_TIMEOUT),
                &[ISCSI_ERR_SESS_EXISTS],
                false,
            )
            .await?;
        }
        self.iscsiadm(
            &iface()
                .args(["-o", "update", "-n", "iface.initiatorname", "-v"])
                .arg(&self.opts.initiator)
                .timeout(ISCSIADM_TIMEOUT),
            &[],
            false,
        )
        .await?;
        *ready = true;
        Ok(())
    }

    async fn log_in(&self, key: &SessionKey, chap: Option<&Chap>) -> Result<()> {
        self.ensure_iface().await?;
        self.iscsiadm(
            &self
                .node_cmd(key)
                .args(["-o", "new"])
                .timeout(ISCSIADM_TIMEOUT),
            &[],
            false,
        )
        .await?;
        // No automatic login at boot (a guest's disk is agentd's to attach)
        // and no scan of every LUN at login: only the ones guests use.
        let mut update = self.node_cmd(key).args([
            "-o",
            "update",
            "-n",
            "node.startup",
            "-v",
            "manual",
            "-n",
            "node.session.scan",
            "-v",
            "manual",
            "-n",
            "node.session.auth.authmethod",
            "-v",
        ]);
        update = match chap {
            Some(c) => update.args(["CHAP", "-n", "node.session.auth.username", "-v", &c.user]),
            None => update.arg("None"),
        };
        if let Some(t) = chap.and_then(Chap::mutual) {
            update = update.args(["-n", "node.session.auth.username_in", "-v", &t.user]);
        }
        self.iscsiadm(&update.timeout(ISCSIADM_TIMEOUT), &[], false)
            .await?;
        if let Some(c) = chap {
            // After every iscsiadm change: each one rewrites the record.
            let record = self.node_record(key)?;
            let mut secrets = vec![(PASSWORD_KEY, c.secret())];
            if let Some(t) = c.mutual() {
                secrets.push((PASSWORD_IN_KEY, t.secret()));
            }
            write_secrets(&record, &secrets, &self.opts.iscsi_db)?;
        }
        self.crash_point("kernel.node_created");
        let login = self.node_cmd(key).arg("--login").timeout(LOGIN_TIMEOUT);
        self.iscsiadm(&login, &[ISCSI_ERR_SESS_EXISTS], false)
            .await
            .map_err(|e| {
                Error::unavailable(format!("iSCSI login to {key} failed: {}", e.message()))
            })?;
        self.crash_point("kernel.logged_in");
        Ok(())
    }

    /// Scans the LUN on the session's SCSI host and waits for its link.
    async fn expose(&self, lun: &IscsiLun) -> Result<AttachedLun> {
        let key = lun.session();
        let session = self.find_session(&key).ok_or_else(|| {
            Error::unavailable(format!(
                "no iSCSI session to {key} in {} (logged out behind agentd's back?)",
                self.opts.sys.join("class/iscsi_session").display()
            ))
        })?;
        let scan = self
            .opts
            .sys
            .join(format!("class/scsi_host/host{}/scan", session.host));
        self.write_sysfs(&scan, &format!("- - {}", lun.lun)).await?;
        let by_path = self.opts.dev.join("disk/by-path").join(lun.by_path_name());
        let device = self.wait_for_link(&by_path, lun).await?;
        Ok(AttachedLun { by_path, device })
    }

    /// Polls for `link` with a growing delay, up to the device timeout.
    async fn wait_for_link(&self, link: &Path, lun: &IscsiLun) -> Result<PathBuf> {
        let limit = self.opts.device_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let mut delay = Duration::from_millis(10);
        loop {
            // canonicalize fails until both the link and its target exist.
            if let Ok(dev) = std::fs::canonicalize(link) {
                return Ok(dev);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::unavailable(format!(
                    "{} did not appear within {limit:?} after scanning {lun} (is udev running?)",
                    link.display()
                )));
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Removes the LUN's device unless another holder uses it; logs out when
    /// no holder is left. Tries both and reports the first failure.
    async fn release(&self, key: &SessionKey, lun: u32, holders: &Holders) -> Result<()> {
        let mut first = None;
        if !holders.values().any(|&l| l == lun) {
            if let Some(s) = self.find_session(key) {
                if let Err(e) = self.remove_lun(s.host, lun).await {
                    first.get_or_insert(e);
                }
            }
        }
        if holders.is_empty() {
            if let Err(e) = self.forget_session(key).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Flushes and deletes the SCSI disks of `lun` on SCSI host `host`.
    async fn remove_lun(&self, host: u32, lun: u32) -> Result<()> {
        for (name, _) in self
            .block_devices()
            .into_iter()
            .filter(|(_, h)| h.0 == host && h.3 == lun)
        {
            let dev = self.opts.dev.join(&name);
            let flush = Cmd::new("blockdev")
                .arg("--flushbufs")
                .arg(dev.display().to_string())
                .timeout(FLUSH_TIMEOUT);
            // QEMU opened the disk with O_DIRECT, and deleting an sd device
            // makes the kernel send SYNCHRONIZE CACHE itself: a failed flush
            // (target gone) must not keep the device and session alive.
            if let Err(e) = self.run(&flush).await {
                tracing::warn!(device = %dev.display(), error = %e, "flush before delete failed");
            }
            let delete = self
                .opts
                .sys
                .join("block")
                .join(&name)
                .join("device/delete");
            self.write_sysfs(&delete, "1").await?;
        }
        Ok(())
    }

    /// Logs out of the session and deletes its node record (with the CHAP
    /// secret). Nothing to log out or delete is success.
    async fn forget_session(&self, key: &SessionKey) -> Result<()> {
        self.iscsiadm(
            &self.node_cmd(key).arg("--logout").timeout(LOGOUT_TIMEOUT),
            &[ISCSI_ERR_NO_OBJS_FOUND],
            false,
        )
        .await?;
        self.iscsiadm(
            &self
                .node_cmd(key)
                .args(["-o", "delete"])
                .timeout(ISCSIADM_TIMEOUT),
            &[ISCSI_ERR_NO_OBJS_FOUND],
            true,
        )
        .await?;
        Ok(())
    }

    /// Runs an iscsiadm command under the database lock ([`NODE_DB`];
    /// exclusive for record deletions); `also_ok` exit codes count as
    /// success; a database failure (6) is retried with a growing pause.
    async fn iscsiadm(&self, cmd: &Cmd, also_ok: &[i32], deletes: bool) -> Result<Output> {
        let mut attempt = 1;
        loop {
            let out = if deletes {
                let _db = NODE_DB.write().await;
                self.runner.run(cmd).await?
            } else {
                let _db = NODE_DB.read().await;
                self.runner.run(cmd).await?
            };
            if out.success() || also_ok.contains(&out.status) {
                return Ok(out);
            }
            if out.status != ISCSI_ERR_IDBM || attempt == IDBM_ATTEMPTS {
                return Err(command_error(cmd, &out));
            }
            tracing::debug!(argv = ?cmd, attempt,
                "iscsiadm: node database changed under it; retrying");
            tokio::time::sleep(Duration::from_millis(200) * attempt).await;
            attempt += 1;
        }
    }

    async fn run(&self, cmd: &Cmd) -> Result<Output> {
        let out = self.runner.run(cmd).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(command_error(cmd, &out))
        }
    }

    /// Writes `text` to a sysfs attribute (never creating it) off the async
    /// threads, bounded: a scan or delete can block on an unresponsive target.
    async fn write_sysfs(&self, path: &Path, text: &str) -> Result<()> {
        let p = path.to_owned();
        let t = text.to_owned();
        let job = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|mut f| f.write_all(t.as_bytes()))
        });
        match tokio::time::timeout(self.opts.sysfs_timeout, job).await {
            Err(_) => Err(Error::unavailable(format!(
                "writing {text:?} to {} took more than {:?}",
                path.display(),
                self.opts.sysfs_timeout
            ))),
            Ok(Err(e)) => Err(Error::internal(format!("writing {}: {e}", path.display()))),
            Ok(Ok(r)) => r.map_err(|e| Error::io(path.display(), e)),
        }
    }

    // ---------- what sysfs and the node database show ----------

    /// The iSCSI sessions the kernel has: `class/iscsi_session/sessionN`
    /// (targetname, ifacename), its connection `connectionN:0`
    /// (persistent_address, persistent_port), and the SCSI host the session
    /// device sits under (as iscsiadm finds it: the nearest `hostM` parent).
    fn live_sessions(&self) -> Vec<LiveSession> {
        let dir = self.opts.sys.join("class/iscsi_session");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(sid) = name
                .strip_prefix("session")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(target) = read(e.path().join("targetname")) else {
                continue;
            };
            let Some(host) = std::fs::canonicalize(e.path()).ok().and_then(|p| {
                p.components().rev().find_map(|c| {
                    c.as_os_str()
                        .to_str()?
                        .strip_prefix("host")?
                        .parse::<u32>()
                        .ok()
                })
            }) else {
                continue;
            };
            let conn = self
                .opts
                .sys
                .join(format!("class/iscsi_connection/connection{sid}:0"));
            let portal = match (
                read(conn.join("persistent_address")),
                read(conn.join("persistent_port")),
            ) {
                (Some(a), Some(p)) => match (a.parse(), p.parse()) {
                    (Ok(ip), Ok(port)) => Some(SocketAddr::new(ip, port)),
                    _ => None,
                },
                _ => None,
            };
            out.push(LiveSession {
                host,
                target,
                portal,
                iface: read(e.path().join("ifacename")),
            });
        }
        out
    }

    fn find_session(&self, key: &SessionKey) -> Option<LiveSession> {
        self.live_sessions().into_iter().find(|s| {
            s.target == key.target
                && s.portal == Some(key.portal)
                && s.iface.as_deref().is_none_or(|i| i == self.opts.iface)
        })
    }

    /// Block devices that are SCSI disks: (name, host:channel:target:lun),
    /// from `block/NAME/device`, a link to the SCSI device `H:C:T:L`.
    fn block_devices(&self) -> Vec<(String, (u32, u32, u32, u32))> {
        let Ok(entries) = std::fs::read_dir(self.opts.sys.join("block")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let link = std::fs::read_link(e.path().join("device")).ok()?;
                let hctl = link.file_name()?.to_str()?;
                let n: Vec<u32> = hctl
                    .split(':')
                    .map(|x| x.parse().ok())
                    .collect::<Option<_>>()?;
                let [h, c, t, l] = n[..] else {
                    return None;
                };
                Some((e.file_name().to_string_lossy().into_owned(), (h, c, t, l)))
            })
            .collect()
    }

    /// The node record iscsiadm made for (target, portal): without a portal
    /// group tag it is the file `nodes/TARGET/ADDR,PORT`; with one (records
    /// from discovery) `nodes/TARGET/ADDR,PORT,TPGT/IFACE` (idbm_rec_write).
    fn node_record(&self, key: &SessionKey) -> Result<PathBuf> {
        let dir = self.opts.iscsi_db.join("nodes").join(&key.target);
        let (ip, port) = (key.portal.ip(), key.portal.port());
        let flat = dir.join(format!("{ip},{port}"));
        if flat.is_file() {
            return Ok(flat);
        }
        let prefix = format!("{ip},{port},");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let f = e.path().join(&self.opts.iface);
                    if f.is_file() {
                        return Ok(f);
                    }
                }
            }
        }
        Err(Error::internal(format!(
            "iscsiadm made no node record for {key} under {}",
            dir.display()
        )))
    }
}

#[cfg(test)]
#[path = "iscsi_kernel_tests.rs"]
mod tests;
