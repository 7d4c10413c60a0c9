//! The kernel's iSCSI initiator (open-iscsi) as the lab's tests drive it:
//! one login, qemu-io on the LUN's block device, and a logout that leaves
//! nothing behind, so the next step of a test (often right after an ACL
//! change) starts from no session and no node record.
//!
//! open-iscsi's behaviour this relies on (2.1.8, Debian 12, the lab VM):
//! - `iscsiadm -m node ... --login` first walks every node record under
//!   /etc/iscsi/nodes (`login_portals` -> `for_each_matched_rec`). When
//!   another iscsiadm deletes some other target's record during the walk,
//!   the walk ends with ISCSI_ERR_IDBM (6), yet iscsiadm still logs in to the
//!   records it collected ("if there is an err but some recs then try to
//!   login to what we have") and exits 6 even though the login succeeded. A
//!   blind retry of that login then fails with ISCSI_ERR_SESS_EXISTS (15),
//!   "1 session requested, but 1 already present". So a 6 or a 15 from
//!   `--login` is decided by looking at the sessions, and within this process
//!   record deletions take a write lock that every other record call shares
//!   as readers (tests run side by side; other processes' 6s are retried).
//! - A refused login (ACL or CHAP: login status 02/01, 02/02) is fatal to
//!   iscsid: it stops the connection, destroys the kernel session and only
//!   then answers iscsiadm. A connection refused or a timed-out login is
//!   retried by iscsid for `initial_login_retry_max x login_timeout` seconds
//!   before it answers. Either way the answer comes after the session is
//!   gone; the cleanup below still checks that with `iscsiadm -m session`.
//! - `-o delete` refuses (15) while a session uses the record, so the order
//!   is logout, wait until `iscsiadm -m session` no longer lists ours, delete.
//! - The LUN's `/dev/disk/by-path` link is udev's: after a logout its removal
//!   is still queued, and the next login to the same target and LUN (another
//!   initiator name, same link name) could find the old link or lose the new
//!   one to the old removal. `udevadm settle` after the logout closes that.

use std::path::Path;
use std::process::Output;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::run;

const ISCSI_ERR_IDBM: i32 = 6;
const ISCSI_ERR_SESS_EXISTS: i32 = 15;
const ISCSI_ERR_NO_OBJS_FOUND: i32 = 21;
/// Attempts of a record call that fails with ISCSI_ERR_IDBM.
const IDBM_ATTEMPTS: u32 = 6;
/// How long a logout may take to drop the session from sysfs.
const LOGOUT_LIMIT: Duration = Duration::from_secs(60);
/// How long a logged-in LUN may take to get its by-path link.
const DEVICE_LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// See the module comment: deletions alone, other record calls together.
static NODE_DB: RwLock<()> = RwLock::new(());

/// One (iface, target, portal) node of open-iscsi, iface named after the
/// initiator name so the target's ACL sees that name.
pub(crate) struct KernelNode<'a> {
    pub iface: String,
    pub initiator: &'a str,
    pub target: &'a str,
    /// `ADDR:PORT`
    pub portal: &'a str,
}

/// One session as `iscsiadm -m session -P 1` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    target: String,
    /// `ADDR:PORT`, without the portal group tag.
    portal: String,
    iface: String,
    sid: String,
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every session of the host (`iscsiadm -m session -P 1`; 21: none).
fn sessions() -> Result<Vec<Session>, String> {
    let out = run("iscsiadm", &["-m", "session", "-P", "1"]);
    match out.status.code() {
        Some(0) => {}
        Some(ISCSI_ERR_NO_OBJS_FOUND) => return Ok(Vec::new()),
        _ => return Err(format!("iscsiadm -m session -P 1: {}", text(&out))),
    }
    Ok(parse_sessions(&String::from_utf8_lossy(&out.stdout)))
}

/// The sessions in `iscsiadm -m session -P 1` output: a `Target:` heading,
/// its portals, then one `Interface:` block per session ending in `SID:`.
fn parse_sessions(listing: &str) -> Vec<Session> {
    let (mut target, mut portal, mut iface) = (String::new(), String::new(), String::new());
    let mut all = Vec::new();
    for l in listing.lines().map(str::trim) {
        let field = |key: &str| l.strip_prefix(key).map(|v| v.trim().to_string());
        if let Some(v) = field("Target:") {
            target = v.split_whitespace().next().unwrap_or_default().to_string();
        } else if let Some(v) = field("Persistent Portal:") {
            portal = v.split(',').next().unwrap_or_default().to_string();
        } else if let Some(v) = field("Iface Name:") {
            iface = v;
        } else if let Some(v) = field("SID:") {
            all.push(Session {
                target: target.clone(),
                portal: portal.clone(),
                iface: iface.clone(),
                sid: v,
            });
        }
    }
    all
}

impl KernelNode<'_> {
    fn node_args<'b>(&'b self, extra: &[&'b str]) -> Vec<&'b str> {
        let mut a = vec![
            "-m",
            "node",
            "-T",
            self.target,
            "-p",
            self.portal,
            "-I",
            &self.iface,
        ];
        a.extend_from_slice(extra);
        a
    }

    /// A record call, retried while iscsiadm's walk of the node database
    /// trips over another process's deletion (6). `ok` lists exit codes that
    /// count as success besides 0.
    fn adm(&self, args: &[&str], ok: &[i32], deletes: bool) -> Result<String, String> {
        let mut attempt = 1;
        loop {
            let out = if deletes {
                let _db = NODE_DB.write().unwrap_or_else(|e| e.into_inner());
                run("iscsiadm", args)
            } else {
                let _db = NODE_DB.read().unwrap_or_else(|e| e.into_inner());
                run("iscsiadm", args)
            };
            let code = out.status.code();
            if out.status.success() || code.is_some_and(|c| ok.contains(&c)) {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if code != Some(ISCSI_ERR_IDBM) || attempt == IDBM_ATTEMPTS {
                return Err(format!("iscsiadm {}: {}", args.join(" "), text(&out)));
            }
            attempt += 1;
            std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
        }
    }

    /// Our sessions: this target and portal, through our iface.
    fn our_sessions(&self) -> Result<Vec<String>, String> {
        Ok(sessions()?
            .into_iter()
            .filter(|s| s.target == self.target && s.portal == self.portal && s.iface == self.iface)
            .map(|s| s.sid)
            .collect())
    }

    /// Makes sure the iface exists with our initiator name. Tests side by
    /// side share an iface when they share an initiator name, and iscsiadm
    /// rewrites an iface file by truncating it before it takes its lock
    /// (`iface_conf_write`), so a concurrent reader (another test's node
    /// `-o new` or iface update) could find it empty: "Could not locate
    /// transport for iface". So the iface is written only when it is missing
    /// or names another initiator, and under the write lock.
    fn ensure_iface(&self) -> Result<(), String> {
        let conf = Path::new("/etc/iscsi/ifaces").join(&self.iface);
        let wanted = format!("iface.initiatorname = {}", self.initiator);
        let current = || std::fs::read_to_string(&conf).unwrap_or_default();
        if current().lines().any(|l| l.trim() == wanted) {
            return Ok(());
        }
        let _db = NODE_DB.write().unwrap_or_else(|e| e.into_inner());
        let iface = self.iface.as_str();
        if !conf.exists() {
            let out = run("iscsiadm", &["-m", "iface", "-I", iface, "-o", "new"]);
            if !out.status.success() {
                return Err(format!(
                    "iscsiadm -m iface -I {iface} -o new: {}",
                    text(&out)
                ));
            }
        }
        let args = [
            "-m",
            "iface",
            "-I",
            iface,
            "-o",
            "update",
            "-n",
            "iface.initiatorname",
            "-v",
            self.initiator,
        ];
        let out = run("iscsiadm", &args);
        if !out.status.success() {
            return Err(format!("iscsiadm {}: {}", args.join(" "), text(&out)));
        }
        if !current().lines().any(|l| l.trim() == wanted) {
            return Err(format!(
                "{} lacks `{wanted}` after its update",
                conf.display()
            ));
        }
        Ok(())
    }

    /// Makes the iface and the node record, with `settings` (key, value).
    pub fn create(&self, settings: &[(&str, &str)]) -> Result<(), String> {
        self.ensure_iface()?;
        self.adm(&self.node_args(&["-o", "new"]), &[], false)?;
        for (k, v) in settings {
            self.adm(
                &self.node_args(&["-o", "update", "-n", k, "-v", v]),
                &[],
                false,
            )?;
        }
        Ok(())
    }

    /// Logs in. A 6 or 15 is decided by the sessions: the login may have
    /// happened although iscsiadm's walk failed (see the module comment), and
    /// the caller made sure none of ours existed before.
    pub fn login(&self) -> Result<(), String> {
        let args = self.node_args(&["--login"]);
        let mut attempt = 1;
        loop {
            let out = {
                let _db = NODE_DB.read().unwrap_or_else(|e| e.into_inner());
                run("iscsiadm", &args)
            };
            let code = out.status.code();
            if out.status.success() {
                return Ok(());
            }
            let undecided = matches!(code, Some(ISCSI_ERR_IDBM) | Some(ISCSI_ERR_SESS_EXISTS));
            if undecided && !self.our_sessions()?.is_empty() {
                return Ok(());
            }
            if code != Some(ISCSI_ERR_IDBM) || attempt == IDBM_ATTEMPTS {
                return Err(format!("iscsiadm {}: {}", args.join(" "), text(&out)));
            }
            attempt += 1;
        }
    }

    /// The LUN's block device once udev linked it (bounded).
    pub fn wait_device(&self, lun: u32) -> Result<String, String> {
        let dev = format!(
            "/dev/disk/by-path/ip-{}-iscsi-{}-lun-{lun}",
            self.portal, self.target
        );
        let t0 = Instant::now();
        // exists() follows the link: a link left dangling by an old session
        // does not count.
        while !Path::new(&dev).exists() {
            if t0.elapsed() > DEVICE_LIMIT {
                return Err(format!("{dev} did not appear in {DEVICE_LIMIT:?}"));
            }
            std::thread::sleep(POLL);
        }
        Ok(dev)
    }

    /// Logs out, waits (bounded, polling `iscsiadm -m session`) until no
    /// session of ours is listed, deletes the node record and lets udev
    /// finish the device's removal. Err when something is left.
    pub fn log_out_and_forget(&self) -> Result<(), String> {
        let t0 = Instant::now();
        let mut logouts = 0;
        loop {
            let ours = self.our_sessions()?;
            if ours.is_empty() {
                break;
            }
            if t0.elapsed() > LOGOUT_LIMIT {
                return Err(format!(
                    "session(s) {ours:?} of iface {} to {} still listed {LOGOUT_LIMIT:?} after logging out",
                    self.iface, self.target
                ));
            }
            // 21: gone meanwhile; anything else (a session still in login
            // answers "try again later") is retried until the limit.
            let _ = self.adm(
                &self.node_args(&["--logout"]),
                &[ISCSI_ERR_NO_OBJS_FOUND],
                false,
            );
            logouts += 1;
            if logouts > 1 {
                std::thread::sleep(POLL);
            }
        }
        // 21: no record (a retried deletion that had worked).
        self.adm(
            &self.node_args(&["-o", "delete"]),
            &[ISCSI_ERR_NO_OBJS_FOUND],
            true,
        )?;
        let settle = run("udevadm", &["settle", "--timeout=60"]);
        if !settle.status.success() {
            return Err(format!("udevadm settle: {}", text(&settle)));
        }
        if let Some(rec) = self.record()? {
            return Err(format!("node record {rec} is left after its deletion"));
        }
        Ok(())
    }

    /// Our node record's file, when one exists
    /// (/etc/iscsi/nodes/TARGET/ADDR,PORT,TPGT/IFACE).
    fn record(&self) -> Result<Option<String>, String> {
        let dir = Path::new("/etc/iscsi/nodes").join(self.target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(None);
        };
        let (addr, port) = self
            .portal
            .rsplit_once(':')
            .ok_or(format!("portal {} is not ADDR:PORT", self.portal))?;
        let prefix = format!("{addr},{port},");
        Ok(rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join(&self.iface))
            .find(|p| p.exists())
            .map(|p| p.display().to_string()))
    }

    /// Whether a session of ours is listed (a leftover of an earlier call).
    pub fn has_session(&self) -> Result<bool, String> {
        Ok(!self.our_sessions()?.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sessions to one target through two ifaces, and one to another
    /// target, as open-iscsi 2.1.8 prints them.
    const LISTING: &str = "\
Target: iqn.2026-11.io.stratus.it7x0:vol-1 (non-flash)
\tCurrent Portal: 127.0.0.1:46625,1
\tPersistent Portal: 127.0.0.1:46625,1
\t\t**********
\t\tInterface:
\t\t**********
\t\tIface Name: sta1
\t\tIface Transport: tcp
\t\tIface Initiatorname: iqn.2026-11.io.stratus.test:host-a
\t\tSID: 3
\t\tiSCSI Connection State: LOGGED IN
\t\t**********
\t\tInterface:
\t\t**********
\t\tIface Name: stb2
\t\tIface Initiatorname: iqn.2026-11.io.stratus.test:host-b
\t\tSID: 4
Target: iqn.2026-11.io.stratus.it7x1:vol-2 (non-flash)
\tCurrent Portal: 127.0.0.1:40001,1
\tPersistent Portal: 127.0.0.1:40001,1
\t\tIface Name: sta1
\t\tSID: 5
";

    #[test]
    fn every_session_is_listed_with_its_target_portal_and_iface() {
        let s = |target: &str, portal: &str, iface: &str, sid: &str| Session {
            target: target.into(),
            portal: portal.into(),
            iface: iface.into(),
            sid: sid.into(),
        };
        assert_eq!(
            parse_sessions(LISTING),
            vec![
                s(
                    "iqn.2026-11.io.stratus.it7x0:vol-1",
                    "127.0.0.1:46625",
                    "sta1",
                    "3"
                ),
                s(
                    "iqn.2026-11.io.stratus.it7x0:vol-1",
                    "127.0.0.1:46625",
                    "stb2",
                    "4"
                ),
                s(
                    "iqn.2026-11.io.stratus.it7x1:vol-2",
                    "127.0.0.1:40001",
                    "sta1",
                    "5"
                ),
            ]
        );
        assert!(parse_sessions("").is_empty());
    }
}
