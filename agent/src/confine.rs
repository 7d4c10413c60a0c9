//! Confinement of guest QEMUs: which unprivileged user each one runs as,
//! the seccomp sandbox, and what this host's QEMU offers.
//!
//! A guest is the tenant's code and its QEMU is the attack surface, so no
//! QEMU ever runs as root: each takes a uid/gid of its own from a pool
//! (`--qemu-uid-range`, default 64000-64999; no account needs to exist) or
//! one shared account (`--qemu-user`). agentd opens everything the guest
//! needs (disks, seed, taps, the QMP socket, the console log, CHAP secrets)
//! and starts QEMU already as that user with those files as inherited
//! descriptors ([`crate::vmm`]), so QEMU never holds a privilege to drop.
//!
//! That is what lets the whole sandbox be on:
//! `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny`.
//! QEMU 7.2 installs its seccomp filter early in its start-up and only then
//! daemonizes (fork: denied by `spawn=deny`) and drops to `-runas` (setgid:
//! denied by `elevateprivileges=deny`); either kills it with SIGSYS
//! (verified: syscall 56, clone, and 106, setgid). So QEMU's own `-runas`,
//! `-run-with user=` and `-daemonize` are not used; they are only detected
//! (from `-help`, as Ganeti does) and reported. QEMU's `-chroot` needs
//! CAP_SYS_CHROOT, which an unprivileged QEMU does not have.
//!
//! Invariant: a uid of the pool belongs to at most one guest with a QEMU
//! (recorded in its runtime before QEMU starts, rebuilt from the store at
//! start), so one guest's QEMU never shares a uid with another's.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use stratus_core::error::{Error, Result};

/// The uid and gid one guest's QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuUser {
    pub uid: u32,
    pub gid: u32,
}

/// Where guests' users come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuUsers {
    /// One uid per guest, from `first..=last`; gid = uid.
    Pool { first: u32, last: u32 },
    /// Every guest as one account (`--qemu-user`).
    Shared { name: String, user: QemuUser },
}

impl QemuUsers {
    /// Parses `--qemu-uid-range FIRST-LAST`; uids below 1000 (system
    /// accounts, root) are refused.
    pub fn pool(range: &str) -> Result<QemuUsers> {
        let bad = || {
            Error::invalid(format!(
                "qemu-uid-range {range:?}: expected FIRST-LAST, e.g. 64000-64999, \
                 with 1000 <= FIRST <= LAST < 4294967295"
            ))
        };
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first < 1000 || first > last || last == u32::MAX {
            return Err(bad());
        }
        Ok(QemuUsers::Pool { first, last })
    }

    /// Looks up `--qemu-user NAME` in the host's user database.
    pub fn shared(name: &str) -> Result<QemuUsers> {
        let user = lookup_user(name)?;
        if user.uid == 0 {
            return Err(Error::invalid(format!(
                "qemu-user {name:?} is root: QEMU must not run as root"
            )));
        }
        Ok(QemuUsers::Shared {
            name: name.to_string(),
            user,
        })
    }

    /// For logs and GetHost, e.g. "uid pool 64000-64999".
    pub fn describe(&self) -> String {
        match self {
            QemuUsers::Pool { first, last } => format!("uid pool {first}-{last}"),
            QemuUsers::Shared { name, user } => {
                format!("shared user {name} ({}:{})", user.uid, user.gid)
            }
        }
    }
}

fn lookup_user(name: &str) -> Result<QemuUser> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| Error::invalid(format!("qemu-user {name:?}: not a user name")))?;
    // SAFETY: getpwnam_r writes only into `pwd` and `buf`, both live and
    // sized as passed; `result` is set to &pwd or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return Err(Error::invalid(format!(
                "qemu-user {name:?}: no such user on this host"
            )));
        }
        Ok(QemuUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// How this host's QEMU offers to drop to another user, from its `-help`.
/// Reported only: agentd starts QEMU as the guest's user itself (see the
/// module doc for why QEMU's own option cannot be used with the sandbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrivilegeDrop {
    /// `-runas USER` (QEMU < 9.1; left in until 10.0).
    Runas,
    /// `-run-with user=USER` (QEMU >= 9.1).
    RunWithUser,
    /// Neither.
    Unsupported,
}

impl PrivilegeDrop {
    pub fn option(self) -> &'static str {
        match self {
            PrivilegeDrop::Runas => "-runas",
            PrivilegeDrop::RunWithUser => "-run-with user=",
            PrivilegeDrop::Unsupported => "",
        }
    }
}

/// What this host's QEMU offers for confinement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuCaps {
    pub drop: PrivilegeDrop,
    /// Built with seccomp (`-sandbox`).
    pub seccomp: bool,
}

impl QemuCaps {
    /// Reads `qemu-system-x86_64 -help` (Ganeti does the same).
    pub fn from_help(help: &str) -> QemuCaps {
        let option = |name: &str| help.lines().any(|l| l.starts_with(name));
        let run_with_user = help
            .lines()
            .skip_while(|l| !l.starts_with("-run-with"))
            .take_while(|l| l.starts_with("-run-with") || l.starts_with(' '))
            .any(|l| l.contains("user="));
        let drop = if run_with_user {
            PrivilegeDrop::RunWithUser
        } else if option("-runas ") {
            PrivilegeDrop::Runas
        } else {
            PrivilegeDrop::Unsupported
        };
        QemuCaps {
            drop,
            seccomp: option("-sandbox "),
        }
    }
}

/// How one guest's QEMU is confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// The user QEMU is started as.
    pub user: QemuUser,
    /// `-sandbox` with [`SANDBOX`].
    pub sandbox: bool,
}

/// The seccomp sandbox every confined QEMU runs under.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The uids of guests whose QEMU runs or is being started.
#[derive(Debug)]
pub struct UidPool {
    users: QemuUsers,
    held: Mutex<BTreeMap<Uuid, QemuUser>>,
}

impl UidPool {
    pub fn new(users: QemuUsers) -> UidPool {
        UidPool {
            users,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn users(&self) -> &QemuUsers {
        &self.users
    }

    /// The user for `vm`'s next QEMU: the one it holds, else the lowest free
    /// uid of the pool (ResourceExhausted when none is left).
    pub fn take(&self, vm: Uuid) -> Result<QemuUser> {
        let mut held = self.held.lock().unwrap();
        if let Some(u) = held.get(&vm) {
            return Ok(*u);
        }
        let user = match &self.users {
            QemuUsers::Shared { user, .. } => *user,
            QemuUsers::Pool { first, last } => {
                let used: std::collections::HashSet<u32> = held.values().map(|u| u.uid).collect();
                let uid = (*first..=*last)
                    .find(|u| !used.contains(u))
                    .ok_or_else(|| {
                        Error::exhausted(format!(
                            "every uid of the QEMU pool {first}-{last} is in use"
                        ))
                    })?;
                QemuUser { uid, gid: uid }
            }
        };
        held.insert(vm, user);
        Ok(user)
    }

    /// Records the user of an adopted guest's QEMU (at start).
    pub fn adopt(&self, vm: Uuid, user: QemuUser) {
        self.held.lock().unwrap().insert(vm, user);
    }

    /// Frees `vm`'s uid once its QEMU is gone.
    pub fn release(&self, vm: Uuid) {
        self.held.lock().unwrap().remove(&vm);
    }
}

/// Makes `path` owned by `user` with `mode` (a guest's own file or
/// directory); no-op for a missing path.
pub fn give_to(path: &Path, user: QemuUser, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path.display(), e)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP_72: &str = "QEMU emulator version 7.2.22\n\
        -runas user     change to user id user just before starting the VM\n\
        -chroot dir     chroot to dir just before starting the VM\n\
        -sandbox on[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]\n\
        \x20               [,spawn=allow|deny][,resourcecontrol=allow|deny]\n";
    const HELP_91: &str = "QEMU emulator version 9.1.0\n\
        -run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n\
        \x20               Set miscellaneous QEMU process lifecycle options\n\
        -runas user     change to user id user just before starting the VM\n";
    const HELP_81: &str = "-run-with [async-teardown=on|off][,chroot=dir]\n\
        \x20               Set miscellaneous QEMU process lifecycle options\n\
        -runas user     change to user id user just before starting the VM\n";

    #[test]
    fn privilege_drop_is_detected_from_help() {
        let c = QemuCaps::from_help(HELP_72);
        assert_eq!(c.drop, PrivilegeDrop::Runas);
        assert!(c.seccomp);
        let c = QemuCaps::from_help(HELP_91);
        assert_eq!(c.drop, PrivilegeDrop::RunWithUser);
        assert!(!c.seccomp);
        assert_eq!(QemuCaps::from_help(HELP_81).drop, PrivilegeDrop::Runas);
        assert_eq!(
            QemuCaps::from_help("-m 128\n").drop,
            PrivilegeDrop::Unsupported
        );
        assert_eq!(PrivilegeDrop::Runas.option(), "-runas");
    }

    #[test]
    fn each_guest_gets_its_own_uid_until_it_releases_it() {
        let pool = UidPool::new(QemuUsers::pool("64000-64002").unwrap());
        let (a, b, c, d) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        assert_eq!(pool.take(a).unwrap().uid, 64000);
        pool.adopt(
            b,
            QemuUser {
                uid: 64001,
                gid: 64001,
            },
        );
        assert_eq!(pool.take(c).unwrap().uid, 64002);
        assert_eq!(pool.take(a).unwrap().uid, 64000, "stable while held");
        let e = pool.take(d).unwrap_err();
        assert_eq!(e.kind(), stratus_core::error::ErrorKind::ResourceExhausted);
        pool.release(a);
        assert_eq!(
            pool.take(d).unwrap(),
            QemuUser {
                uid: 64000,
                gid: 64000
            }
        );
    }

    #[test]
    fn pool_ranges_and_users_are_checked() {
        assert!(QemuUsers::pool("64000-64999").is_ok());
        for bad in ["0-10", "64999-64000", "x-y", "64000", "500-2000"] {
            assert!(QemuUsers::pool(bad).is_err(), "{bad}");
        }
        assert!(QemuUsers::shared("root").is_err());
        assert!(QemuUsers::shared("no-such-user-stratus").is_err());
    }
}
