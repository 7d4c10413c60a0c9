//! Guests' disks on Ceph RBD, opened by QEMU's own `rbd` block driver
//! (Debian's `qemu-block-extra`), with no target and nothing mapped on the
//! host; with `--attach kernel` on a host with krbd, mapped by the kernel
//! instead (`crate::attach::krbd`, which takes the key from here too).
//!
//! pdiskd on an RBD pool answers ExportVolume with an `rbd` attachment:
//! monitors, pool, image, the cephx user to attach as, and a *reference* to
//! its key (`keyring:client.USER`), never the key. The key is this host's
//! own, as on Cinder's and Proxmox's compute hosts: agentd reads it from
//! its keyring (`--ceph-keyring`, default `/etc/ceph/ceph.client.USER.keyring`,
//! root's, 0600) at each start of a guest and hands it to QEMU as a sealed
//! memfd that a `secret` object reads (`format=base64`: QEMU's rbd driver
//! wants the raw key and encodes it for librados itself). So the key never
//! reaches argv, a log, agentd's store or a reply; [`CephKey`] prints as
//! `CephKey(..)`.
//!
//! QEMU's librados reads no ceph.conf of the host's: the `conf` it is given
//! is a memfd holding `--ceph-conf`'s text (client tunables), or nothing,
//! and the monitors come from the export as the driver's `server` list. A
//! confined QEMU (its own uid, the full seccomp sandbox) opens nothing of
//! the host's for it: librados only makes threads and TCP connections.
//!
//! `--ceph-id` pins the one user this host attaches as: an export naming
//! another is refused (FailedPrecondition) before QEMU starts.
//!
//! Cache: the rbd node is opened with `cache.direct=off` (librbd's own
//! in-memory writeback cache, `rbd_cache=true`), and virtio-blk announces
//! a volatile write cache to the guest, so guest flushes (fsync, journal
//! commits) reach the OSDs before they complete, as with a disk's write
//! cache; librbd stays write-through until the guest's first flush
//! (`rbd_cache_writethrough_until_flush`), so a guest that never flushes
//! loses nothing it was told was written. What a QEMU crash loses is what
//! the guest had not flushed, exactly as a power cut of a disk with a
//! write cache.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use stratus_core::error::{Error, Result};
use stratus_proto::pdisk::v1 as pdpb;

/// The flags of RBD disks, flattened into agentd's (`#[command(flatten)]`,
/// `#[serde(flatten)]`): TOML keys are the flags' names with `_` for `-`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(default)]
pub struct CephFlags {
    /// RBD disks: the only cephx user (without "client.") this host
    /// attaches as; an export naming another is refused [default: the
    /// user each export names]
    #[arg(long, value_name = "USER")]
    pub ceph_id: Option<String>,
    /// RBD disks: the keyring holding that user's key (read by agentd,
    /// never by QEMU) [default: /etc/ceph/ceph.client.USER.keyring]
    #[arg(long, value_name = "FILE")]
    pub ceph_keyring: Option<PathBuf>,
    /// RBD disks: a ceph.conf whose client settings QEMU's rbd driver
    /// reads (its text handed over as a memfd; the monitors always come
    /// from the export) [default: none]
    #[arg(long, value_name = "FILE")]
    pub ceph_conf: Option<PathBuf>,
}

impl CephFlags {
    /// Flags over the config file's keys.
    pub fn resolve(&self, file: &CephFlags) -> Result<CephClient> {
        let id = self.ceph_id.clone().or(file.ceph_id.clone());
        let keyring = self.ceph_keyring.clone().or(file.ceph_keyring.clone());
        let conf = self.ceph_conf.clone().or(file.ceph_conf.clone());
        for (what, p) in [("ceph-keyring", &keyring), ("ceph-conf", &conf)] {
            if p.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(Error::invalid(format!("{what} must be an absolute path")));
            }
        }
        Ok(CephClient {
            id: id.map(|i| check_name("ceph-id", &i)).transpose()?,
            keyring,
            conf,
        })
    }
}

/// This host as a Ceph client: whom it attaches as, where its key is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CephClient {
    /// The one user allowed; None: the user each export names.
    pub id: Option<String>,
    pub keyring: Option<PathBuf>,
    pub conf: Option<PathBuf>,
}

impl CephClient {
    /// The keyring that holds `user`'s key.
    pub fn keyring_for(&self, user: &str) -> PathBuf {
        self.keyring
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/etc/ceph/ceph.client.{user}.keyring")))
    }

    /// At start, when `--ceph-id` is set: its key must be readable now,
    /// not at the first guest.
    pub fn check(&self) -> Result<Option<String>> {
        let Some(id) = &self.id else {
            return Ok(None);
        };
        let keyring = self.keyring_for(id);
        read_key(&keyring, id)?;
        if let Some(c) = &self.conf {
            std::fs::read(c).map_err(|e| Error::io(c.display(), e))?;
        }
        Ok(Some(format!(
            "client.{id}, key from {}{}",
            keyring.display(),
            self.conf
                .as_ref()
                .map(|c| format!(", client settings from {}", c.display()))
                .unwrap_or_default()
        )))
    }
}

/// A cephx key (base64). Never shown: Debug prints `CephKey(..)`.
#[derive(Clone, PartialEq, Eq)]
pub struct CephKey(String);

impl CephKey {
    fn new(s: &str) -> Option<CephKey> {
        let ok = (16..=256).contains(&s.len())
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
        ok.then(|| CephKey(s.to_string()))
    }

    /// The base64 text, for the memfd QEMU's secret object reads.
    pub fn base64(&self) -> &str {
        &self.0
    }
}

/// A key for unit tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_key(base64: &str) -> CephKey {
    CephKey::new(base64).unwrap()
}

impl std::fmt::Debug for CephKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CephKey(..)")
    }
}

/// One monitor, as QEMU's `server` list takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitor {
    pub host: String,
    pub port: u16,
}

/// An RBD disk as QEMU opens it (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdDisk {
    pub monitors: Vec<Monitor>,
    pub pool: String,
    pub image: String,
    pub user: String,
    pub key: CephKey,
    /// `--ceph-conf`'s text, or empty.
    pub conf: Vec<u8>,
}

impl RbdDisk {
    /// The disk an export's attachment describes, with this host's key.
    /// Everything from pdiskd is checked before it reaches QEMU's JSON.
    pub fn from_attachment(a: &pdpb::RbdAttachment, client: &CephClient) -> Result<RbdDisk> {
        let pool = check_name("rbd pool", &a.pool)?;
        let image = check_name("rbd image", &a.image)?;
        let user = check_name("ceph user", &a.user)?;
        if let Some(only) = &client.id {
            if *only != user {
                return Err(Error::precondition(format!(
                    "the export of rbd:{pool}/{image} is for ceph user client.{user}; \
                     this host attaches only as client.{only} (agentd --ceph-id)"
                )));
            }
        }
        let want = format!("keyring:client.{user}");
        if a.secret_ref != want {
            return Err(Error::precondition(format!(
                "the export of rbd:{pool}/{image} names its key {:?}; agentd knows only \
                 {want:?} (the host's keyring)",
                a.secret_ref
            )));
        }
        let monitors = a
            .monitors
            .iter()
            .map(|m| parse_monitor(m))
            .collect::<Result<Vec<_>>>()?;
        if monitors.is_empty() {
            return Err(Error::precondition(format!(
                "the export of rbd:{pool}/{image} names no monitor"
            )));
        }
        let key = read_key(&client.keyring_for(&user), &user)?;
        let conf = match &client.conf {
            Some(c) => std::fs::read(c).map_err(|e| Error::io(c.display(), e))?,
            None => Vec::new(),
        };
        Ok(RbdDisk {
            monitors,
            pool,
            image,
            user,
            key,
            conf,
        })
    }
}

/// A Ceph pool, image or user name: letters, digits, `_`, `-`, `.`, not
/// starting with `-` or `.` (what pdiskd makes; nothing else reaches QEMU).
fn check_name(what: &str, s: &str) -> Result<String> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && !s.starts_with(['-', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(Error::invalid(format!(
            "{what} {s:?}: use letters, digits, '_', '-' and '.', not starting with '-' or '.'"
        )))
    }
}

/// `ADDR:PORT`, `[V6]:PORT` or `HOST:PORT`.
fn parse_monitor(m: &str) -> Result<Monitor> {
    let bad = || Error::invalid(format!("ceph monitor {m:?}: expected ADDR:PORT"));
    let (host, port) = m.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !host_ok || port == 0 {
        return Err(bad());
    }
    Ok(Monitor {
        host: host.to_string(),
        port,
    })
}

/// The key of `client.USER` in the keyring at `path`. Errors name the
/// file and the entity, never a key.
fn read_key(path: &Path, user: &str) -> Result<CephKey> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path.display(), e))?;
    key_in(&text, &format!("client.{user}")).ok_or_else(|| {
        Error::precondition(format!(
            "keyring {} holds no key for client.{user} (agentd --ceph-keyring)",
            path.display()
        ))
    })
}

/// The `key = ...` of section `[entity]` in a keyring's text.
fn key_in(text: &str, entity: &str) -> Option<CephKey> {
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = name.trim() == entity;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == "key" {
                return CephKey::new(v.trim());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AQB37hFrNEJkMhAAqUs+QZS9zmTGOfQGD4T7xg==";

    fn keyring(dir: &Path) -> PathBuf {
        let p = dir.join("ceph.client.compute.keyring");
        std::fs::write(
            &p,
            format!(
                "[client.admin]\n\tkey = AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==\n\
                 [client.compute]\n\tkey = {KEY}\n\tcaps mon = \"profile rbd\"\n"
            ),
        )
        .unwrap();
        p
    }

    fn attachment() -> pdpb::RbdAttachment {
        pdpb::RbdAttachment {
            monitors: vec!["10.0.0.7:6789".into(), "[fd00::8]:3300".into()],
            pool: "pdisk".into(),
            image: "pd-vol-3f2b8c1e-5d4a-4b7e-9c21-0a6f1e2d3c4b".into(),
            user: "compute".into(),
            secret_ref: "keyring:client.compute".into(),
            cluster_fsid: "f".into(),
        }
    }

    #[test]
    fn the_key_comes_from_the_hosts_keyring_and_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        let client = CephClient {
            keyring: Some(keyring(dir.path())),
            ..Default::default()
        };
        let d = RbdDisk::from_attachment(&attachment(), &client).unwrap();
        assert_eq!(d.key.base64(), KEY);
        assert_eq!(
            d.monitors,
            [
                Monitor {
                    host: "10.0.0.7".into(),
                    port: 6789
                },
                Monitor {
                    host: "fd00::8".into(),
                    port: 3300
                }
            ]
        );
        assert!(d.conf.is_empty());
        let shown = format!("{d:?}");
        assert!(
            !shown.contains(KEY) && shown.contains("CephKey(..)"),
            "{shown}"
        );

        // A user the keyring lacks: an error naming file and user, no key.
        let mut a = attachment();
        a.user = "other".into();
        a.secret_ref = "keyring:client.other".into();
        let e = RbdDisk::from_attachment(&a, &client).unwrap_err();
        assert!(e.message().contains("client.other"), "{e}");
        assert!(!e.message().contains("AQ"), "{e}");
        // The default keyring is the user's own file under /etc/ceph.
        assert_eq!(
            CephClient::default().keyring_for("compute"),
            PathBuf::from("/etc/ceph/ceph.client.compute.keyring")
        );
    }

    #[test]
    fn attachments_are_checked_before_anything_reaches_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let client = CephClient {
            keyring: Some(keyring(dir.path())),
            id: Some("compute".into()),
            ..Default::default()
        };
        type Edit = fn(&mut pdpb::RbdAttachment);
        let cases: [(Edit, &str); 7] = [
            (|a| a.pool = "p,ool".into(), "rbd pool"),
            (|a| a.image = "x\",\"driver\":\"file".into(), "rbd image"),
            (|a| a.monitors = vec!["10.0.0.7".into()], "monitor"),
            (|a| a.monitors = vec!["a b:1".into()], "monitor"),
            (|a| a.monitors.clear(), "no monitor"),
            (
                |a| a.secret_ref = "file:/etc/shadow".into(),
                "keyring:client",
            ),
            (
                |a| {
                    a.user = "admin".into();
                    a.secret_ref = "keyring:client.admin".into();
                },
                "--ceph-id",
            ),
        ];
        for (edit, why) in cases {
            let mut a = attachment();
            edit(&mut a);
            let e = RbdDisk::from_attachment(&a, &client).unwrap_err();
            assert!(e.message().contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn flags_and_the_conf_memfd_text() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        std::fs::write(&conf, "[client]\nrbd cache size = 8388608\n").unwrap();
        let flags = CephFlags {
            ceph_id: Some("compute".into()),
            ceph_keyring: Some(keyring(dir.path())),
            ceph_conf: Some(conf.clone()),
        };
        let c = flags.resolve(&CephFlags::default()).unwrap();
        assert!(c.check().unwrap().unwrap().contains("client.compute"));
        let d = RbdDisk::from_attachment(&attachment(), &c).unwrap();
        assert_eq!(d.conf, b"[client]\nrbd cache size = 8388608\n");
        // The file's keys under the flags.
        let file = CephFlags {
            ceph_id: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(
            CephFlags::default().resolve(&file).unwrap().id.as_deref(),
            Some("other")
        );
        for bad in [
            CephFlags {
                ceph_id: Some("client admin".into()),
                ..Default::default()
            },
            CephFlags {
                ceph_keyring: Some("rel/keyring".into()),
                ..Default::default()
            },
        ] {
            assert!(bad.resolve(&CephFlags::default()).is_err(), "{bad:?}");
        }
        // --ceph-id whose key is missing fails at start.
        let missing = CephClient {
            id: Some("nobody".into()),
            keyring: Some(keyring(dir.path())),
            conf: None,
        };
        assert!(missing.check().is_err());
        assert_eq!(CephClient::default().check().unwrap(), None);
    }
}
