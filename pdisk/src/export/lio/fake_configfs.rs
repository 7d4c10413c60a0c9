//! A fake configfs for the unit tests (`tests.rs`): a directory tree in a
//! tempdir that behaves like LIO's configfs where the exporter depends on it:
//! - mkdir creates the attribute files and default groups the kernel
//!   creates (those the exporter reads or writes, with LIO's defaults),
//!   and refuses directories LIO would refuse (EPERM);
//! - attribute files can't be created or removed, only written (ENOENT
//!   for a misspelt name); some writes carry LIO's semantics: `control`
//!   updates `info`, `enable` can't be written twice, the unit serial
//!   can't change while a LUN links the backstore, a TPG can't be enabled
//!   twice (older kernels), CHAP values are kept verbatim;
//! - symlinks only from LUNs to enabled backstores and from mapped LUNs
//!   to LUNs of the same TPG; readlink answers relative paths;
//! - rmdir only of directories made by mkdir, and only once no directory
//!   made by mkdir or symlink remains inside (ENOTEMPTY) and no symlink
//!   points at it (EBUSY); the attribute files and default groups go with it.
//!
//! Attribute files the exporter never touches are not created.

use std::collections::BTreeSet;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use super::configfs::{ConfigFs, EntryKind};
use super::tree::*;
use super::*;

pub(super) struct FakeConfigFs {
    pub(super) root: PathBuf,
    pub(super) state: StdMutex<FakeState>,
}

#[derive(Default)]
pub(super) struct FakeState {
    /// Directories made by mkdir, relative to root.
    pub(super) user_dirs: BTreeSet<PathBuf>,
    /// Every mutation: "mkdir P", "rmdir P", "write P=V", "symlink P", "unlink P".
    pub(super) ops: Vec<String>,
    pub(super) mounted: bool,
    pub(super) iscsi_loadable: bool,
    /// Whether LIO accepts fd_dev_size on an enabled fileio backstore.
    pub(super) live_fd_size: bool,
    /// Writes to paths ending like this fail with this errno.
    pub(super) fail_writes: Vec<(String, i32)>,
    /// Every attribute ever written, relative to root.
    pub(super) written: BTreeSet<String>,
}

pub(super) fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeConfigFs {
    pub(super) fn new() -> (tempfile::TempDir, Arc<FakeConfigFs>) {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeConfigFs {
            root: dir.path().join("config"),
            state: StdMutex::new(FakeState {
                mounted: true,
                iscsi_loadable: true,
                live_fd_size: true,
                ..FakeState::default()
            }),
        });
        std::fs::create_dir(&fake.root).unwrap();
        fake.load_core();
        (dir, fake)
    }

    pub(super) fn rel<'a>(&self, p: &'a Path) -> io::Result<&'a Path> {
        p.strip_prefix(&self.root).map_err(|_| errno(libc::EPERM))
    }

    /// What loading target_core_mod creates.
    pub(super) fn load_core(&self) {
        let t = self.root.join("target");
        std::fs::create_dir_all(t.join("core/alua/lu_gps/default_lu_gp")).unwrap();
        std::fs::write(
            t.join("version"),
            "Target Engine Core ConfigFS Infrastructure\n",
        )
        .unwrap();
    }

    /// LIO forgets everything (a reboot, or the modules reloaded).
    pub(super) fn reboot(&self) {
        std::fs::remove_dir_all(self.root.join("target")).unwrap();
        self.state.lock().unwrap().user_dirs.clear();
        self.load_core();
    }

    pub(super) fn ops(&self) -> Vec<String> {
        self.state.lock().unwrap().ops.clone()
    }

    pub(super) fn clear_ops(&self) {
        self.state.lock().unwrap().ops.clear();
    }

    pub(super) fn fail_writes(&self, suffix: &str, e: i32) {
        self.state
            .lock()
            .unwrap()
            .fail_writes
            .push((suffix.to_owned(), e));
    }

    pub(super) fn files(dir: &Path, files: &[(&str, &str)]) {
        for (name, content) in files {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
    }

    /// The attribute files and default groups a mkdir of `rel` gets.
    pub(super) fn layout(&self, rel: &Path) -> io::Result<Vec<(&'static str, &'static str)>> {
        let c: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
        let s = self.state.lock().unwrap();
        Ok(match c.as_slice() {
            ["target", "iscsi"] if s.iscsi_loadable => vec![
                ("lio_version", "Datera Inc. iSCSI Target v4.1.0\n"),
                ("discovery_auth/enforce_discovery_auth", "0\n"),
            ],
            ["target", "iscsi"] => return Err(errno(libc::EINVAL)),
            ["target", "core", hba] if backstore_hba(hba).is_some() => {
                vec![("hba_info", "HBA Index: 0\n"), ("hba_mode", "0\n")]
            }
            ["target", "core", hba, _] if backstore_hba(hba).is_some() => vec![
                ("info", ""),
                ("control", ""),
                ("alias", ""),
                ("udev_path", ""),
                ("enable", "0\n"),
                ("attrib/emulate_tpu", "0\n"),
                ("attrib/emulate_tpws", "0\n"),
                ("attrib/emulate_write_cache", "0\n"),
                ("attrib/block_size", "512\n"),
                ("wwn/vpd_unit_serial", "T10 VPD Unit Serial Number: \n"),
                ("pr/res_holder", "No SPC-3 Reservation holder\n"),
                ("alua/default_tg_pt_gp/alua_access_state", "0\n"),
                ("statistics/scsi_dev/indx", "0\n"),
            ],
            ["target", "iscsi", _] => vec![
                ("fabric_statistics/iscsi_instance/inst", "0\n"),
                ("param/cmd_completion_affinity", "-1\n"),
            ],
            ["target", "iscsi", _, t] if t.starts_with("tpgt_") => vec![
                ("enable", "0\n"),
                ("dynamic_sessions", ""),
                ("rtpi", "1\n"),
                ("attrib/authentication", "1\n"),
                ("attrib/generate_node_acls", "0\n"),
                ("attrib/cache_dynamic_acls", "0\n"),
                ("attrib/demo_mode_write_protect", "1\n"),
                ("attrib/prod_mode_write_protect", "0\n"),
                ("attrib/demo_mode_discovery", "1\n"),
                ("attrib/login_timeout", "15\n"),
                ("attrib/default_cmdsn_depth", "64\n"),
                ("auth/userid", "\n"),
                ("auth/password", "\n"),
                ("param/AuthMethod", "CHAP,None\n"),
                // LIO's defaults (iscsi_target_parameters.h).
                ("param/MaxRecvDataSegmentLength", "8192\n"),
                ("param/MaxXmitDataSegmentLength", "262144\n"),
                ("param/FirstBurstLength", "65536\n"),
                ("param/MaxBurstLength", "262144\n"),
                ("param/InitialR2T", "Yes\n"),
                ("param/ImmediateData", "Yes\n"),
                ("param/MaxOutstandingR2T", "1\n"),
                ("lun/.keep", ""),
                ("np/.keep", ""),
                ("acls/.keep", ""),
            ],
            ["target", "iscsi", _, t, "lun", l]
                if t.starts_with("tpgt_") && l.starts_with("lun_") =>
            {
                vec![("alua_tg_pt_gp", ""), ("statistics/scsi_port/indx", "0\n")]
            }
            ["target", "iscsi", _, t, "np", addr] if t.starts_with("tpgt_") => {
                if addr.parse::<SocketAddr>().is_err() {
                    return Err(errno(libc::EINVAL));
                }
                vec![("iser", "0\n"), ("cxgbit", "0\n")]
            }
            ["target", "iscsi", _, t, "acls", _] if t.starts_with("tpgt_") => vec![
                ("info", ""),
                ("cmdsn_depth", "64\n"),
                ("tag", ""),
                ("attrib/authentication", "-1\n"),
                ("attrib/dataout_timeout", "3\n"),
                ("auth/userid", "\n"),
                ("auth/password", "\n"),
                ("auth/authenticate_target", "0\n"),
                ("auth/userid_mutual", "\n"),
                ("auth/password_mutual", "\n"),
                ("param/MaxConnections", "No Active iSCSI Session\n"),
                ("fabric_statistics/iscsi_sess_stats/.keep", ""),
            ],
            ["target", "iscsi", _, t, "acls", _, m]
                if t.starts_with("tpgt_") && m.starts_with("lun_") =>
            {
                vec![
                    ("write_protect", ""),
                    ("statistics/scsi_auth_intr/.keep", ""),
                ]
            }
            _ => return Err(errno(libc::EPERM)),
        })
    }

    /// Symlinks anywhere in the tree and where they point (absolute).
    pub(super) fn all_links(&self) -> Vec<(PathBuf, PathBuf)> {
        fn walk(d: &Path, out: &mut Vec<(PathBuf, PathBuf)>) {
            for e in std::fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                if t.is_symlink() {
                    let target = std::fs::read_link(e.path()).unwrap();
                    let abs = e.path().parent().unwrap().join(target);
                    out.push((e.path(), normalize(&abs)));
                } else if t.is_dir() {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    pub(super) fn is_dev_dir(rel: &Path) -> bool {
        let c: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
        matches!(c.as_slice(), ["target", "core", hba, _] if backstore_hba(hba).is_some())
    }

    /// The backstore directory of an attribute path, if any.
    pub(super) fn dev_of(rel: &Path) -> Option<PathBuf> {
        let c: Vec<&str> = rel.iter().map(|s| s.to_str().unwrap()).collect();
        match c.as_slice() {
            ["target", "core", hba, dev, ..] if backstore_hba(hba).is_some() => {
                Some(PathBuf::from(format!("target/core/{hba}/{dev}")))
            }
            _ => None,
        }
    }

    pub(super) fn linked(&self, abs: &Path) -> bool {
        self.all_links().iter().any(|(_, t)| t == abs)
    }

    /// LIO's `control` semantics, kept in `info`.
    pub(super) fn control(&self, dev: &Path, value: &str) -> io::Result<()> {
        let abs = self.root.join(dev);
        let enabled = std::fs::read_to_string(abs.join("enable"))?.trim() == "1";
        let info_path = abs.join("info");
        let info = std::fs::read_to_string(&info_path)?;
        let fileio = dev.to_str().unwrap().contains("/fileio_");
        let mut file = info_field(&info, "File").map(str::to_owned);
        let mut size = info_field(&info, "Size").map(str::to_owned);
        let mut mode = info_field(&info, "Mode").unwrap_or("O_DSYNC").to_owned();
        let mut udev = info_field(&info, "PATH").map(str::to_owned);
        for opt in value.split([',', '\n']).filter(|o| !o.is_empty()) {
            let (k, v) = opt.split_once('=').ok_or_else(|| errno(libc::EINVAL))?;
            match (fileio, k) {
                (true, "fd_dev_name") => file = Some(v.to_owned()),
                (true, "fd_dev_size") => {
                    if enabled && !self.state.lock().unwrap().live_fd_size {
                        return Err(errno(libc::EINVAL));
                    }
                    v.parse::<u64>().map_err(|_| errno(libc::EINVAL))?;
                    size = Some(v.to_owned());
                }
                (true, "fd_buffered_io") if v == "1" => mode = "Buffered-WCE".into(),
                (false, "udev_path") if enabled => return Err(errno(libc::EEXIST)),
                (false, "udev_path") => udev = Some(v.to_owned()),
                _ => return Err(errno(libc::EINVAL)),
            }
        }
        let info = if fileio {
            format!(
                "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 0\n\
                     TCM FILEIO ID: 0        File: {}  Size: {}  Mode: {mode} Async: 0\n",
                file.unwrap_or_default(),
                size.unwrap_or_else(|| "0".into())
            )
        } else {
            format!(
                    "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 0\n\
                     iBlock device: dm-3  UDEV PATH: {}  readonly: 0\n        Major: 254 Minor: 3  CLAIMED: IBLOCK\n",
                    udev.unwrap_or_default()
                )
        };
        std::fs::write(info_path, info)
    }
}

/// Resolves `.` and `..` without touching the filesystem.
pub(super) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

impl ConfigFs for FakeConfigFs {
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        let rel = self.rel(path)?.to_owned();
        if path.symlink_metadata().is_ok() {
            return Err(errno(libc::EEXIST));
        }
        if !path.parent().unwrap().is_dir() {
            return Err(errno(libc::ENOENT));
        }
        let layout = self.layout(&rel)?;
        std::fs::create_dir(path)?;
        Self::files(path, &layout);
        let mut s = self.state.lock().unwrap();
        s.user_dirs.insert(rel.clone());
        s.ops.push(format!("mkdir {}", rel.display()));
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        let rel = self.rel(path)?.to_owned();
        if !path.is_dir() {
            return Err(errno(libc::ENOENT));
        }
        let links = self.all_links();
        let mut s = self.state.lock().unwrap();
        if !s.user_dirs.contains(&rel) {
            return Err(errno(libc::EPERM));
        }
        let inner_dir = s.user_dirs.iter().any(|d| d != &rel && d.starts_with(&rel));
        let inner_link = links.iter().any(|(l, _)| l.starts_with(path));
        if inner_dir || inner_link {
            return Err(errno(libc::ENOTEMPTY));
        }
        if links.iter().any(|(_, t)| t == path) {
            return Err(errno(libc::EBUSY));
        }
        std::fs::remove_dir_all(path)?;
        s.user_dirs.remove(&rel);
        s.ops.push(format!("rmdir {}", rel.display()));
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<String> {
        self.rel(path)?;
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let rel = self.rel(path)?.to_owned();
        let m = path.symlink_metadata()?;
        if !m.is_file() {
            return Err(errno(libc::EISDIR));
        }
        let fails = self.state.lock().unwrap().fail_writes.clone();
        if let Some((_, e)) = fails
            .iter()
            .find(|(s, _)| rel.to_str().unwrap().ends_with(s.as_str()))
        {
            return Err(errno(*e));
        }
        let name = rel.file_name().unwrap().to_str().unwrap();
        let dev = Self::dev_of(&rel);
        let cur = std::fs::read_to_string(path)?;
        let content = match (name, &dev) {
            ("control", Some(d)) if Self::is_dev_dir(d) && rel == d.join("control") => {
                self.control(d, value)?;
                String::new()
            }
            ("enable", Some(d)) if rel == d.join("enable") => {
                if !value.contains('1') {
                    return Err(errno(libc::EINVAL));
                }
                if cur.trim() == "1" {
                    return Err(errno(libc::EEXIST));
                }
                let info = std::fs::read_to_string(self.root.join(d).join("info"))?;
                if info_field(&info, "File").is_none() && info_field(&info, "PATH").is_none() {
                    return Err(errno(libc::EINVAL));
                }
                "1\n".into()
            }
            ("vpd_unit_serial", Some(d)) => {
                if self.linked(&self.root.join(d)) {
                    return Err(errno(libc::EINVAL));
                }
                format!("T10 VPD Unit Serial Number: {}\n", value.trim())
            }
            ("udev_path", Some(_)) => {
                format!("{}\n", value.strip_suffix('\n').unwrap_or(value))
            }
            ("enable", None) => {
                // A TPG's enable: older kernels refuse enabling twice.
                let v = value.trim();
                if v != "0" && v != "1" {
                    return Err(errno(libc::EINVAL));
                }
                if v == "1" && cur.trim() == "1" {
                    return Err(errno(libc::EINVAL));
                }
                format!("{v}\n")
            }
            _ if rel.parent().unwrap().ends_with("auth") => format!("{value}\n"),
            _ => format!("{}\n", value.trim()),
        };
        std::fs::write(path, content)?;
        let mut s = self.state.lock().unwrap();
        s.written.insert(rel.display().to_string());
        s.ops.push(format!("write {}={value}", rel.display()));
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        let rel = self.rel(link)?.to_owned();
        let trel = self.rel(target)?.to_owned();
        if link.symlink_metadata().is_ok() {
            return Err(errno(libc::EEXIST));
        }
        if !target.is_dir() {
            return Err(errno(libc::ENOENT));
        }
        let parent: Vec<&str> = rel
            .parent()
            .unwrap()
            .iter()
            .map(|s| s.to_str().unwrap())
            .collect();
        let t: Vec<&str> = trel.iter().map(|s| s.to_str().unwrap()).collect();
        match (parent.as_slice(), t.as_slice()) {
            (["target", "iscsi", _, _, "lun", _], ["target", "core", _, _]) => {
                let enabled = std::fs::read_to_string(target.join("enable"))?;
                if enabled.trim() != "1" {
                    return Err(errno(libc::ENODEV));
                }
                if !self.links_in(link.parent().unwrap()).is_empty() {
                    return Err(errno(libc::EEXIST));
                }
            }
            (["target", "iscsi", w, g, "acls", _, _], ["target", "iscsi", w2, g2, "lun", _]) => {
                if w != w2 || g != g2 || self.links_in(target).is_empty() {
                    return Err(errno(libc::EINVAL));
                }
            }
            _ => return Err(errno(libc::EPERM)),
        }
        // configfs answers readlink with a path relative to the link.
        let ups = rel.parent().unwrap().iter().count();
        let relative = PathBuf::from("../".repeat(ups)).join(&trel);
        std::os::unix::fs::symlink(relative, link)?;
        self.state.lock().unwrap().ops.push(format!(
            "symlink {} -> {}",
            rel.display(),
            trel.display()
        ));
        Ok(())
    }

    fn unlink(&self, link: &Path) -> io::Result<()> {
        let rel = self.rel(link)?.to_owned();
        if !link.symlink_metadata()?.file_type().is_symlink() {
            return Err(errno(libc::EPERM));
        }
        std::fs::remove_file(link)?;
        self.state
            .lock()
            .unwrap()
            .ops
            .push(format!("unlink {}", rel.display()));
        Ok(())
    }

    fn read_link(&self, link: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(link)
    }

    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
        KernelConfigFs
            .entries(dir)
            .map(|v| v.into_iter().filter(|(n, _)| n != ".keep").collect())
    }

    fn mounted(&self, _root: &Path) -> bool {
        self.state.lock().unwrap().mounted
    }
}

impl FakeConfigFs {
    pub(super) fn links_in(&self, dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_symlink()).unwrap_or(false))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What is configured, one line per user-made directory ("d P"),
    /// symlink ("l P -> T") and attribute ever written ("f P = V"),
    /// sorted. Attributes still at their defaults are left out.
    pub(super) fn tree(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let mut out: Vec<String> = s
            .user_dirs
            .iter()
            .map(|d| format!("d {}", d.display()))
            .collect();
        let written = s.written.clone();
        drop(s);
        for (l, t) in self.all_links() {
            out.push(format!(
                "l {} -> {}",
                l.strip_prefix(&self.root).unwrap().display(),
                t.strip_prefix(&self.root).unwrap().display()
            ));
        }
        for w in written {
            let p = self.root.join(&w);
            if let Ok(v) = std::fs::read_to_string(&p) {
                if !w.ends_with("/control") {
                    out.push(format!("f {w} = {}", v.trim_end_matches('\n')));
                }
            }
        }
        out.sort();
        out
    }
}
