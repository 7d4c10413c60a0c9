//! The node records of agentd's iface in open-iscsi's database, read from
//! its files: a crash between `iscsiadm -m node -o new` and the login
//! leaves a record (with the CHAP secrets agentd wrote into it) and no
//! session, which the sweep of unused sessions cannot see. At start,
//! [`KernelAttacher::reap`](super::KernelAttacher::reap) deletes
//! those no guest holds.
//!
//! Layout (open-iscsi `idbm_rec_write`): a record made without a portal
//! group tag (ours, `-o new`) is the file `nodes/TARGET/ADDR,PORT`, naming
//! its iface in `iface.iscsi_ifacename = IFACE`; one from discovery is
//! `nodes/TARGET/ADDR,PORT,TPGT/IFACE`.
//!
//! And [`write_secrets`]: the CHAP secrets agentd writes into a record itself.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use uuid::Uuid;

use stratus_core::error::{Error, Result};

/// Scratch files of [`write_secrets`], in the database root.
pub(crate) const SCRATCH_PREFIX: &str = ".stratus-node-";

/// (target, portal) of every node record on `iface` under `db`.
pub(crate) fn records(db: &Path, iface: &str) -> Vec<(String, SocketAddr)> {
    let mut out = Vec::new();
    let Ok(targets) = std::fs::read_dir(db.join("nodes")) else {
        return out;
    };
    for t in targets.flatten() {
        let target = t.file_name().to_string_lossy().into_owned();
        let Ok(portals) = std::fs::read_dir(t.path()) else {
            continue;
        };
        for p in portals.flatten() {
            let name = p.file_name().to_string_lossy().into_owned();
            let path = p.path();
            let ours = if path.is_file() {
                std::fs::read_to_string(&path).is_ok_and(|text| {
                    text.lines().any(|l| {
                        l.split_once('=').is_some_and(|(k, v)| {
                            k.trim() == "iface.iscsi_ifacename" && v.trim() == iface
                        })
                    })
                })
            } else {
                path.join(iface).is_file()
            };
            if let (true, Some(portal)) = (ours, portal_of(&name, path.is_file())) {
                out.push((target.clone(), portal));
            }
        }
    }
    out.sort();
    out
}

/// `ADDR,PORT` (a flat record) or `ADDR,PORT,TPGT`; IPv6 maybe bracketed.
fn portal_of(name: &str, flat: bool) -> Option<SocketAddr> {
    let addr_port = if flat { name } else { name.rsplit_once(',')?.0 };
    let (addr, port) = addr_port.rsplit_once(',')?;
    let ip: IpAddr = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// Puts `KEY = SECRET` lines (`node.session.auth.password`, and
/// `password_in` for mutual CHAP) into a node record: the other lines kept,
/// any old line of those keys dropped, the new ones placed before `# END
/// RECORD`. Written to a new 0600 file in `scratch_dir` (the database root,
/// which iscsiadm never scans for records) and renamed over the record.
pub(crate) fn write_secrets(
    record: &Path,
    secrets: &[(&str, &str)],
    scratch_dir: &Path,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = std::fs::read_to_string(record).map_err(|e| Error::io(record.display(), e))?;
    let line: String = secrets
        .iter()
        .map(|(key, secret)| format!("{key} = {secret}\n"))
        .collect();
    let mut out = String::with_capacity(text.len() + line.len());
    let mut placed = false;
    for l in text.lines() {
        // Keys compared whole: `password` must not drop `password_in`.
        let key = l.split('=').next().map(str::trim);
        if secrets.iter().any(|(k, _)| key == Some(*k)) {
            continue;
        }
        if !placed && l.trim() == "# END RECORD" {
            out.push_str(&line);
            placed = true;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !placed {
        out.push_str(&line);
    }
    let tmp = scratch_dir.join(format!("{SCRATCH_PREFIX}{}", Uuid::new_v4().simple()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(out.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, record));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(record.display(), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_records_of_the_iface_in_both_layouts() {
        let db = tempfile::tempdir().unwrap();
        let t = db.path().join("nodes/iqn.2026-11.io.x:a");
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(
            t.join("127.0.0.1,3260"),
            "node.name = iqn.2026-11.io.x:a\niface.iscsi_ifacename = stratus\n",
        )
        .unwrap();
        std::fs::write(t.join("10.0.0.1,3260"), "iface.iscsi_ifacename = default\n").unwrap();
        let d = db.path().join("nodes/iqn.2026-11.io.x:b/[fd00::1],3261,1");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("stratus"), "x").unwrap();
        let e = db.path().join("nodes/iqn.2026-11.io.x:c/192.0.2.1,3260,1");
        std::fs::create_dir_all(&e).unwrap();
        std::fs::write(e.join("default"), "x").unwrap();
        assert_eq!(
            records(db.path(), "stratus"),
            vec![
                (
                    "iqn.2026-11.io.x:a".into(),
                    "127.0.0.1:3260".parse().unwrap()
                ),
                (
                    "iqn.2026-11.io.x:b".into(),
                    "[fd00::1]:3261".parse().unwrap()
                ),
            ]
        );
        assert!(records(&db.path().join("none"), "stratus").is_empty());
    }
}
