//! The configuration logic's state and its vocabulary: [`Lio`] (blocking, run
//! on tokio's blocking pool), the configfs paths of targets and backstores, the
//! configfs primitives with our error messages, and the probe of LIO's modules.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::configfs::{BackingKind, ConfigFs, EntryKind, StatFn};
use super::{LioConfig, TPGT, VOLUME_LUN};
use crate::error::{Error, ErrorKind, Result};

pub(super) enum Probe {
    Ready,
    NotMounted(String),
    NoCore(String),
    NoIscsi(String),
}

/// The backing of a spec, checked.
pub(super) struct Backing {
    pub(super) path: String,
    pub(super) kind: BackingKind,
}

/// How an existing backstore compares with what a spec wants.
pub(super) enum Fit {
    Fits,
    /// A fileio backstore whose configured size differs from the file's.
    SizeDiffers(u64),
    Differs(String),
}

pub(super) struct Lio {
    pub(super) cfg: LioConfig,
    /// Directory name of the portal under `np/`.
    pub(super) np: String,
    pub(super) fs: Arc<dyn ConfigFs>,
    pub(super) stat: Arc<StatFn>,
}

/// The configfs error for `op` on `path`. The value written is never part
/// of it (it may be a secret); LIO's own reason is in the kernel log.
pub(super) fn cfs_error(op: &str, path: &Path, e: &io::Error) -> Error {
    let kind = match e.raw_os_error() {
        Some(libc::EBUSY) => ErrorKind::FailedPrecondition,
        _ => ErrorKind::Internal,
    };
    Error::new(
        kind,
        format!(
            "configfs: {op} {}: {e} (the kernel log has LIO's reason)",
            path.display()
        ),
    )
}

pub(super) fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
        || (errno == libc::ENOENT && e.kind() == io::ErrorKind::NotFound)
}

/// The last two normal components of a symlink's target: `(hba, name)` for
/// a backstore, `("lun", "lun_1")` for a TPG's LUN. configfs returns link
/// targets as relative paths.
pub(super) fn link_tail(target: &Path) -> Option<(String, String)> {
    let mut it = target.components().rev().filter_map(|c| match c {
        Component::Normal(s) => s.to_str(),
        _ => None,
    });
    let last = it.next()?;
    let prev = it.next()?;
    Some((prev.to_owned(), last.to_owned()))
}

pub(super) fn dir_tail(dir: &Path) -> Option<(String, String)> {
    link_tail(dir)
}

/// `iblock_N` or `fileio_N`: an HBA our backstores can live in.
pub(super) fn backstore_hba(name: &str) -> Option<&str> {
    let (plugin, idx) = name.rsplit_once('_')?;
    let ok = matches!(plugin, "iblock" | "fileio")
        && !idx.is_empty()
        && idx.bytes().all(|c| c.is_ascii_digit());
    ok.then_some(plugin)
}

/// A value from LIO's `info` text, e.g. `Size` in `File: /x  Size: 1048576`;
/// the key is a whole word (`Size` is not the one in `SectorSize: 512`).
pub(super) fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}: ");
    let mut from = 0;
    while let Some(i) = info[from..].find(&pat) {
        let at = from + i;
        if at == 0 || info[..at].ends_with(char::is_whitespace) {
            return info[at + pat.len()..].split_whitespace().next();
        }
        from = at + pat.len();
    }
    None
}

/// An auth attribute as shown: the stored bytes and one `\n`.
pub(super) fn shown(s: &str) -> &str {
    s.strip_suffix('\n').unwrap_or(s)
}

/// A CHAP attribute's value, None when unset ("", or "NULL...").
pub(super) fn chap_value(s: &str) -> Option<&str> {
    let v = shown(s);
    (!v.is_empty() && !v.starts_with("NULL")).then_some(v)
}

impl Lio {
    // ---- paths ----

    pub(super) fn target_root(&self) -> PathBuf {
        self.cfg.configfs_root.join("target")
    }
    pub(super) fn core_dir(&self) -> PathBuf {
        self.target_root().join("core")
    }
    pub(super) fn iscsi_dir(&self) -> PathBuf {
        self.target_root().join("iscsi")
    }
    pub(super) fn target_dir(&self, iqn: &str) -> PathBuf {
        self.iscsi_dir().join(iqn)
    }
    pub(super) fn tpg_dir(&self, iqn: &str) -> PathBuf {
        self.target_dir(iqn).join(TPGT)
    }
    pub(super) fn lun_name() -> String {
        format!("lun_{VOLUME_LUN}")
    }

    // ---- configfs primitives with our error messages ----

    pub(super) fn exists(&self, p: &Path) -> bool {
        self.fs.exists(p)
    }

    pub(super) fn mkdir(&self, p: &Path) -> Result<()> {
        self.fs.mkdir(p).map_err(|e| cfs_error("mkdir", p, &e))
    }

    /// Makes `p` unless it exists (made meanwhile by someone else is fine).
    pub(super) fn ensure_dir(&self, p: &Path) -> Result<bool> {
        if self.exists(p) {
            return Ok(false);
        }
        match self.fs.mkdir(p) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(false),
            Err(e) => Err(cfs_error("mkdir", p, &e)),
        }
    }

    /// Removes a group; gone already is fine.
    pub(super) fn rmdir(&self, p: &Path) -> Result<()> {
        match self.fs.rmdir(p) {
            Err(e) if !is_errno(&e, libc::ENOENT) => Err(cfs_error("rmdir", p, &e)),
            _ => Ok(()),
        }
    }

    pub(super) fn unlink(&self, p: &Path) -> Result<()> {
        match self.fs.unlink(p) {
            Err(e) if !is_errno(&e, libc::ENOENT) => Err(cfs_error("unlink", p, &e)),
            _ => Ok(()),
        }
    }

    pub(super) fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        self.fs
            .symlink(target, link)
            .map_err(|e| cfs_error("symlink", link, &e))
    }

    pub(super) fn read(&self, p: &Path) -> Result<String> {
        self.fs.read(p).map_err(|e| cfs_error("reading", p, &e))
    }

    /// The attribute's text, None when it can't be read.
    pub(super) fn read_opt(&self, p: &Path) -> Option<String> {
        self.fs.read(p).ok()
    }

    pub(super) fn write(&self, p: &Path, value: &str) -> Result<()> {
        tracing::debug!(path = %p.display(), value, "lio: configfs write");
        self.fs
            .write(p, value)
            .map_err(|e| cfs_error("writing", p, &e))
    }

    /// Writes a secret: logged without its value.
    pub(super) fn write_secret(&self, p: &Path, value: &str) -> Result<()> {
        tracing::debug!(path = %p.display(), value = "<redacted>", "lio: configfs write");
        self.fs
            .write(p, value)
            .map_err(|e| cfs_error("writing", p, &e))
    }

    /// Writes a numeric/flag attribute unless it already shows `value`.
    pub(super) fn ensure_attr(&self, p: &Path, value: &str) -> Result<()> {
        match self.read_opt(p) {
            Some(cur) if cur.trim() == value => Ok(()),
            _ => self.write(p, value),
        }
    }

    /// Like `ensure_attr`, for attributes only some kernels have.
    pub(super) fn ensure_attr_if_present(&self, p: &Path, value: &str) -> Result<()> {
        if self.exists(p) {
            self.ensure_attr(p, value)
        } else {
            Ok(())
        }
    }

    /// Sets a CHAP attribute to exactly `value` (no newline: LIO keeps it).
    pub(super) fn ensure_chap_value(&self, p: &Path, value: &str, secret: bool) -> Result<()> {
        if self.read_opt(p).as_deref().map(shown) == Some(value) {
            return Ok(());
        }
        if secret {
            self.write_secret(p, value)
        } else {
            self.write(p, value)
        }
    }

    /// Clears a CHAP attribute that is set.
    pub(super) fn clear_chap_value(&self, p: &Path) -> Result<()> {
        match self.read_opt(p) {
            Some(cur) if chap_value(&cur).is_none() => Ok(()),
            None if !self.exists(p) => Ok(()),
            _ => self.write(p, "NULL"),
        }
    }

    /// Names of the subdirectories of `dir` (none when it is missing).
    pub(super) fn subdirs(&self, dir: &Path) -> Result<Vec<String>> {
        self.entries_of(dir, EntryKind::Dir)
    }

    pub(super) fn links(&self, dir: &Path) -> Result<Vec<String>> {
        self.entries_of(dir, EntryKind::Link)
    }

    pub(super) fn entries_of(&self, dir: &Path, kind: EntryKind) -> Result<Vec<String>> {
        match self.fs.entries(dir) {
            Ok(v) => {
                let mut names: Vec<String> = v
                    .into_iter()
                    .filter(|(_, k)| *k == kind)
                    .map(|(n, _)| n)
                    .collect();
                names.sort();
                Ok(names)
            }
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(Vec::new()),
            Err(e) => Err(cfs_error("listing", dir, &e)),
        }
    }

    /// Where the symlinks in `dir` point, as `link_tail`s.
    pub(super) fn link_tails(&self, dir: &Path) -> Result<Vec<Option<(String, String)>>> {
        Ok(self
            .links(dir)?
            .iter()
            .map(|l| {
                self.fs
                    .read_link(&dir.join(l))
                    .ok()
                    .and_then(|t| link_tail(&t))
            })
            .collect())
    }

    // ---- module state ----

    pub(super) fn probe(&self) -> Probe {
        let root = &self.cfg.configfs_root;
        let target = self.target_root();
        if !self.exists(&target) {
            if !self.exists(root) || !self.fs.mounted(root) {
                return Probe::NotMounted(format!(
                    "configfs is not mounted at {0} (mount -t configfs configfs {0}), \
                     so LIO can't be configured",
                    root.display()
                ));
            }
            return Probe::NoCore(format!(
                "LIO is not loaded: {} is missing (kernel module target_core_mod)",
                target.display()
            ));
        }
        let iscsi = self.iscsi_dir();
        if self.exists(&iscsi) {
            return Probe::Ready;
        }
        // The kernel loads iscsi_target_mod itself for this mkdir.
        match self.fs.mkdir(&iscsi) {
            Ok(()) => Probe::Ready,
            Err(e) if is_errno(&e, libc::EEXIST) => Probe::Ready,
            Err(e) => Probe::NoIscsi(format!(
                "LIO's iSCSI target is not loaded: mkdir {}: {e} (kernel module iscsi_target_mod)",
                iscsi.display()
            )),
        }
    }
}
