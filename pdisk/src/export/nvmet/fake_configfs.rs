//! A fake nvmet configfs for the unit tests: a directory tree in a tempdir
//! behaving like Linux 6.1's `nvmet` configfs where the exporter depends on
//! it (each rule below was seen in the lab VM's kernel):
//! - mkdir of a subsystem, namespace, port or host creates its attribute
//!   files and default groups, with nvmet's defaults (`device_path` shows
//!   `(null)`, a random `device_uuid`, `attr_allow_any_host` 0, empty port
//!   addresses);
//! - attribute files can't be created or removed; `device_path` and
//!   `device_uuid` can't change while the namespace is enabled (EBUSY); a
//!   port's `addr_*` can't change while a subsystem is linked (EACCES);
//!   `attr_allow_any_host` 1 with hosts linked is EINVAL; enabling a
//!   namespace without a device is ENOENT;
//! - an `allowed_hosts` link needs an existing host and `allow_any_host` 0
//!   (EINVAL); a port link needs `addr_trtype` set (EINVAL, "transport type
//!   0 not supported");
//! - rmdir only of directories made by mkdir, none left inside (ENOTEMPTY),
//!   and none a symlink points at (EBUSY).
//!
//! It also records which hosts are *connected* to which subsystem: a
//! connection lasts until the subsystem is unlinked from the port (as in
//! nvmet, where removing an allowed host does not end its controllers).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use super::super::lio::configfs::{ConfigFs, EntryKind};

pub(super) struct FakeNvmet {
    pub(super) root: PathBuf,
    pub(super) state: StdMutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    /// Directories made by mkdir, relative to root.
    user_dirs: BTreeSet<PathBuf>,
    /// Every mutation: "mkdir P", "rmdir P", "write P=V", "symlink P", "unlink P".
    pub(super) ops: Vec<String>,
    /// Whether the nvmet module is loaded (`nvmet/` exists).
    pub(super) loaded: bool,
    /// Live connections: subsystem NQN -> hosts.
    pub(super) connected: BTreeMap<String, BTreeSet<String>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeNvmet {
    pub(super) fn new(loaded: bool) -> (tempfile::TempDir, Arc<FakeNvmet>) {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeNvmet {
            root: dir.path().join("config"),
            state: StdMutex::new(State::default()),
        });
        std::fs::create_dir(&fake.root).unwrap();
        if loaded {
            fake.load();
        }
        (dir, fake)
    }

    /// What loading nvmet creates.
    pub(super) fn load(&self) {
        for d in ["subsystems", "ports", "hosts"] {
            std::fs::create_dir_all(self.root.join("nvmet").join(d)).unwrap();
        }
        self.state.lock().unwrap().loaded = true;
    }

    /// A reboot: nvmet forgets everything, connections end.
    pub(super) fn reboot(&self) {
        std::fs::remove_dir_all(self.root.join("nvmet")).unwrap();
        let mut s = self.state.lock().unwrap();
        s.user_dirs.clear();
        s.connected.clear();
        drop(s);
        self.load();
    }

    pub(super) fn ops(&self) -> Vec<String> {
        self.state.lock().unwrap().ops.clone()
    }

    pub(super) fn clear_ops(&self) {
        self.state.lock().unwrap().ops.clear();
    }

    fn rel<'a>(&self, p: &'a Path) -> io::Result<&'a Path> {
        p.strip_prefix(&self.root).map_err(|_| errno(libc::EPERM))
    }

    fn parts(rel: &Path) -> Vec<String> {
        rel.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    fn attr(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }

    /// A host connects (nvme connect): allowed when the subsystem is on a
    /// port, has an enabled namespace and lists the host.
    pub(super) fn connect(&self, nqn: &str, host: &str) -> bool {
        let sub = self.root.join("nvmet/subsystems").join(nqn);
        let on_port = std::fs::read_dir(self.root.join("nvmet/ports"))
            .map(|it| {
                it.flatten()
                    .any(|p| p.path().join("subsystems").join(nqn).is_symlink())
            })
            .unwrap_or(false);
        let ok = on_port
            && sub.join("allowed_hosts").join(host).is_symlink()
            && self.attr(&format!("nvmet/subsystems/{nqn}/namespaces/1/enable")) == "1\n";
        if ok {
            let mut s = self.state.lock().unwrap();
            s.connected
                .entry(nqn.to_owned())
                .or_default()
                .insert(host.to_owned());
        }
        ok
    }

    pub(super) fn connected(&self, nqn: &str) -> BTreeSet<String> {
        let s = self.state.lock().unwrap();
        s.connected.get(nqn).cloned().unwrap_or_default()
    }

    fn files(dir: &Path, files: &[(&str, &str)]) {
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
    }

    /// True when a symlink anywhere in the tree points at `abs`.
    fn linked(&self, abs: &Path) -> bool {
        fn walk(d: &Path, want: &Path) -> bool {
            let Ok(it) = std::fs::read_dir(d) else {
                return false;
            };
            it.flatten().any(|e| {
                let p = e.path();
                if p.is_symlink() {
                    std::fs::read_link(&p).is_ok_and(|t| t == want)
                } else {
                    p.is_dir() && walk(&p, want)
                }
            })
        }
        walk(&self.root, abs)
    }
}

impl ConfigFs for FakeNvmet {
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn mkdir(&self, path: &Path) -> io::Result<()> {
        let rel = self.rel(path)?.to_path_buf();
        let c = Self::parts(&rel);
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        if path.exists() {
            return Err(errno(libc::EEXIST));
        }
        let dirs: &[&str];
        let files: &[(&str, &str)];
        match c.as_slice() {
            ["nvmet", "subsystems", _] => {
                dirs = &["allowed_hosts", "namespaces"];
                files = &[
                    ("attr_allow_any_host", "0\n"),
                    ("attr_serial", "fe132d80b5209ff12422\n"),
                    ("attr_model", "Linux\n"),
                ];
            }
            ["nvmet", "subsystems", _, "namespaces", n] if n.parse::<u32>().is_ok() => {
                dirs = &[];
                files = &[
                    ("device_path", "(null)\n"),
                    ("device_uuid", "46fc6632-69af-4e35-a964-352fb1b636de\n"),
                    ("enable", "0\n"),
                    ("buffered_io", "0\n"),
                    ("revalidate_size", ""),
                ];
            }
            ["nvmet", "ports", n] if n.parse::<u16>().is_ok() => {
                dirs = &["subsystems", "referrals", "ana_groups"];
                files = &[
                    ("addr_trtype", "\n"),
                    ("addr_adrfam", "\n"),
                    ("addr_traddr", "\n"),
                    ("addr_trsvcid", "\n"),
                ];
            }
            ["nvmet", "hosts", _] => {
                dirs = &[];
                files = &[];
            }
            _ => return Err(errno(libc::EPERM)),
        }
        std::fs::create_dir(path)?;
        for d in dirs {
            std::fs::create_dir(path.join(d))?;
        }
        Self::files(path, files);
        let mut s = self.state.lock().unwrap();
        s.user_dirs.insert(rel.clone());
        s.ops.push(format!("mkdir {}", rel.display()));
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        let rel = self.rel(path)?.to_path_buf();
        if !path.is_dir() || path.is_symlink() {
            return Err(errno(libc::ENOENT));
        }
        let s = self.state.lock().unwrap();
        if !s.user_dirs.contains(&rel) {
            return Err(errno(libc::EPERM));
        }
        let inner = s.user_dirs.iter().any(|d| d != &rel && d.starts_with(&rel));
        let links = walkdir_links(path);
        if inner || links {
            return Err(errno(libc::ENOTEMPTY));
        }
        drop(s);
        if self.linked(path) {
            return Err(errno(libc::EBUSY));
        }
        std::fs::remove_dir_all(path)?;
        let mut s = self.state.lock().unwrap();
        s.user_dirs.remove(&rel);
        s.ops.push(format!("rmdir {}", rel.display()));
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<String> {
        if path.file_name().is_some_and(|n| n == "revalidate_size") {
            return Err(errno(libc::EACCES));
        }
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let rel = self.rel(path)?.to_path_buf();
        if !path.is_file() {
            return Err(errno(libc::ENOENT));
        }
        let dir = path.parent().unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
        let stored = match name.as_str() {
            "device_path" | "device_uuid" if read("enable") == "1\n" => {
                return Err(errno(libc::EBUSY))
            }
            "enable" if value == "1" && read("device_path") == "(null)\n" => {
                return Err(errno(libc::ENOENT))
            }
            "enable" if value != "0" && value != "1" => return Err(errno(libc::EINVAL)),
            n if n.starts_with("addr_") => {
                let linked = std::fs::read_dir(dir.join("subsystems"))
                    .map(|mut it| it.next().is_some())
                    .unwrap_or(false);
                if linked {
                    return Err(errno(libc::EACCES));
                }
                format!("{value}\n")
            }
            "attr_allow_any_host" => {
                let hosts = std::fs::read_dir(dir.join("allowed_hosts"))
                    .map(|mut it| it.next().is_some())
                    .unwrap_or(false);
                if value == "1" && hosts {
                    return Err(errno(libc::EINVAL));
                }
                format!("{value}\n")
            }
            "revalidate_size" => String::new(),
            _ => format!("{value}\n"),
        };
        std::fs::write(path, stored)?;
        let mut s = self.state.lock().unwrap();
        s.ops.push(format!("write {}={value}", rel.display()));
        Ok(())
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        let rel = self.rel(link)?.to_path_buf();
        let c = Self::parts(&rel);
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        if !target.is_dir() {
            return Err(errno(libc::ENOENT));
        }
        if link.symlink_metadata().is_ok() {
            return Err(errno(libc::EEXIST));
        }
        match c.as_slice() {
            ["nvmet", "subsystems", sub, "allowed_hosts", _] => {
                let any = self.attr(&format!("nvmet/subsystems/{sub}/attr_allow_any_host"));
                if any == "1\n" || !self.rel(target)?.starts_with("nvmet/hosts") {
                    return Err(errno(libc::EINVAL));
                }
            }
            ["nvmet", "ports", port, "subsystems", _] => {
                if self.attr(&format!("nvmet/ports/{port}/addr_trtype")) == "\n"
                    || !self.rel(target)?.starts_with("nvmet/subsystems")
                {
                    return Err(errno(libc::EINVAL));
                }
            }
            _ => return Err(errno(libc::EPERM)),
        }
        std::os::unix::fs::symlink(target, link)?;
        let mut s = self.state.lock().unwrap();
        s.ops.push(format!("symlink {}", rel.display()));
        Ok(())
    }

    fn unlink(&self, link: &Path) -> io::Result<()> {
        let rel = self.rel(link)?.to_path_buf();
        if !link.is_symlink() {
            return Err(errno(libc::ENOENT));
        }
        std::fs::remove_file(link)?;
        let c = Self::parts(&rel);
        let mut s = self.state.lock().unwrap();
        if let [_, "ports", _, "subsystems", nqn] =
            c.iter().map(String::as_str).collect::<Vec<_>>().as_slice()
        {
            // nvmet_port_del_ctrls: every controller of it on the port ends.
            s.connected.remove(*nqn);
        }
        s.ops.push(format!("unlink {}", rel.display()));
        Ok(())
    }

    fn read_link(&self, link: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(link)
    }

    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let t = e.file_type()?;
            let kind = if t.is_symlink() {
                EntryKind::Link
            } else if t.is_dir() {
                EntryKind::Dir
            } else {
                EntryKind::File
            };
            out.push((e.file_name().to_string_lossy().into_owned(), kind));
        }
        Ok(out)
    }

    fn mounted(&self, _root: &Path) -> bool {
        true
    }
}

/// True when `dir` holds a symlink anywhere below it.
fn walkdir_links(dir: &Path) -> bool {
    let Ok(it) = std::fs::read_dir(dir) else {
        return false;
    };
    it.flatten().any(|e| {
        let p = e.path();
        p.is_symlink() || (p.is_dir() && walkdir_links(&p))
    })
}

/// Paths of every symlink under `dir`, relative to it, sorted.
pub(super) fn links_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(it) = std::fs::read_dir(d) else { return };
        for e in it.flatten() {
            let p = e.path();
            if p.is_symlink() {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            } else if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
