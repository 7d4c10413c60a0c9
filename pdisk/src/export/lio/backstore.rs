//! Backstores: a spec's backing checked, our backstores found, compared with
//! what a spec wants, created, resized and removed.

use std::io;
use std::path::{Path, PathBuf};

use super::configfs::BackingKind;
use super::tree::{backstore_hba, dir_tail, info_field, Backing, Fit, Lio};
use super::{unit_serial, FILEIO_HBA, IBLOCK_HBA, UDEV_PATH_MAX};
use crate::error::{Error, ErrorKind, Result};
use crate::export::ExportSpec;

impl Lio {
    pub(super) fn backing(&self, spec: &ExportSpec) -> Result<Backing> {
        let p = &spec.backing_path;
        let path = match p.to_str() {
            Some(s)
                if s.starts_with('/')
                    && s.len() <= UDEV_PATH_MAX
                    && !s.contains(|c: char| c == ',' || c.is_whitespace() || c.is_control()) =>
            {
                s.to_owned()
            }
            _ => {
                return Err(Error::invalid(format!(
                    "backing path {} can't be given to LIO: it must be absolute UTF-8 of at most \
                     {UDEV_PATH_MAX} bytes, without ',' or white space",
                    p.display()
                )))
            }
        };
        let kind = (self.stat)(p).map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::InvalidArgument
            };
            Error::new(kind, format!("backing path {}: {e}", p.display()))
        })?;
        if let BackingKind::File(size) = kind {
            // fileio reports fd_dev_size minus one block as the last LBA.
            if size < 4096 {
                return Err(Error::invalid(format!(
                    "backing file {} has {size} bytes: LIO needs at least 4096",
                    p.display()
                )));
            }
        }
        Ok(Backing { path, kind })
    }

    /// Every backstore named `name` (normally one).
    pub(super) fn find_backstores(&self, name: &str) -> Result<Vec<PathBuf>> {
        let core = self.core_dir();
        let mut out = Vec::new();
        for hba in self.subdirs(&core)? {
            if backstore_hba(&hba).is_some() {
                let dir = core.join(&hba).join(name);
                if self.exists(&dir) {
                    out.push(dir);
                }
            }
        }
        Ok(out)
    }

    /// The backing path a backstore was configured with: its `udev_path`,
    /// else what its `info` says.
    pub(super) fn backstore_path(&self, dir: &Path) -> Option<String> {
        if let Some(p) = self.read_opt(&dir.join("udev_path")) {
            let p = p.trim();
            if !p.is_empty() {
                return Some(p.to_owned());
            }
        }
        let info = self.read_opt(&dir.join("info"))?;
        info_field(&info, "File")
            .or_else(|| info_field(&info, "PATH"))
            .map(str::to_owned)
    }

    pub(super) fn backstore_serial(&self, dir: &Path) -> Option<String> {
        let s = self.read_opt(&dir.join("wwn/vpd_unit_serial"))?;
        // "T10 VPD Unit Serial Number: <serial>"
        Some(s.split_once(':')?.1.trim().to_owned())
    }

    pub(super) fn fit(&self, dir: &Path, want: &Backing, serial: &str) -> Fit {
        let plugin = dir
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .and_then(backstore_hba);
        let want_plugin = match want.kind {
            BackingKind::Block => "iblock",
            BackingKind::File(_) => "fileio",
        };
        if plugin != Some(want_plugin) {
            return Fit::Differs(format!("it is not {want_plugin}"));
        }
        if self.read_opt(&dir.join("enable")).as_deref().map(str::trim) != Some("1") {
            return Fit::Differs("it is not enabled".into());
        }
        if self.backstore_path(dir).as_deref() != Some(want.path.as_str()) {
            return Fit::Differs("its backing path differs".into());
        }
        if self.backstore_serial(dir).as_deref() != Some(serial) {
            return Fit::Differs("its unit serial differs".into());
        }
        if let BackingKind::File(size) = want.kind {
            let info = self.read_opt(&dir.join("info")).unwrap_or_default();
            let mode = if self.cfg.fileio_write_back {
                "Buffered-WCE"
            } else {
                "O_DSYNC"
            };
            if info_field(&info, "Mode") != Some(mode) {
                return Fit::Differs("its write cache mode differs".into());
            }
            if info_field(&info, "Size") != Some(size.to_string().as_str()) {
                return Fit::SizeDiffers(size);
            }
        }
        Fit::Fits
    }

    /// Sets a live fileio backstore's size; Err when LIO refused or ignored it.
    pub(super) fn set_fileio_size(&self, dir: &Path, size: u64) -> Result<()> {
        self.write(&dir.join("control"), &format!("fd_dev_size={size}"))?;
        let info = self.read(&dir.join("info"))?;
        if info_field(&info, "Size") == Some(size.to_string().as_str()) {
            Ok(())
        } else {
            Err(Error::internal(format!(
                "LIO kept the old size of {} after fd_dev_size={size}",
                dir.display()
            )))
        }
    }

    pub(super) fn create_backstore(
        &self,
        name: &str,
        want: &Backing,
        serial: &str,
    ) -> Result<PathBuf> {
        let hba = self.core_dir().join(match want.kind {
            BackingKind::Block => IBLOCK_HBA,
            BackingKind::File(_) => FILEIO_HBA,
        });
        self.ensure_dir(&hba)?;
        let dir = hba.join(name);
        self.mkdir(&dir)?;
        let configure = || -> Result<()> {
            let control = dir.join("control");
            match want.kind {
                BackingKind::Block => self.write(&control, &format!("udev_path={}", want.path))?,
                BackingKind::File(size) => {
                    self.write(
                        &control,
                        &format!("fd_dev_name={},fd_dev_size={size}", want.path),
                    )?;
                    if self.cfg.fileio_write_back {
                        // Advertise the cache so initiators flush (LIO also
                        // forces this for buffered fileio; rtslib sets both).
                        self.write(&dir.join("attrib/emulate_write_cache"), "1")?;
                        self.write(&control, "fd_buffered_io=1")?;
                    }
                }
            }
            self.write(&dir.join("udev_path"), &want.path)?;
            self.write(&dir.join("enable"), "1")?;
            // Before any LUN links it: LIO refuses a new serial once exported.
            self.write(&dir.join("wwn/vpd_unit_serial"), serial)
        };
        if let Err(e) = configure() {
            // Leave no half-configured backstore behind.
            let _ = self.fs.rmdir(&dir);
            return Err(e);
        }
        tracing::info!(backstore = %dir.display(), backing = %want.path, "lio: created backstore");
        Ok(dir)
    }

    /// Thin provisioning: UNMAP and WRITE SAME with UNMAP. LIO refuses them
    /// when the device can't discard; the volume is then exported without.
    pub(super) fn ensure_thin(&self, dir: &Path) {
        for attr in ["emulate_tpu", "emulate_tpws"] {
            if let Err(e) = self.ensure_attr(&dir.join("attrib").join(attr), "1") {
                tracing::info!(backstore = %dir.display(), error = %e,
                    "lio: no thin provisioning (UNMAP) for this backstore");
                return;
            }
        }
    }

    /// Removes a backstore of ours, first detaching it from `tpg`'s LUNs.
    pub(super) fn remove_backstore(&self, dir: &Path, tpg: &Path) -> Result<()> {
        let tail = dir_tail(dir);
        for lun in self.subdirs(&tpg.join("lun"))? {
            if self
                .link_tails(&tpg.join("lun").join(&lun))?
                .contains(&tail)
            {
                self.remove_lun(tpg, &lun)?;
            }
        }
        self.rmdir(dir)?;
        tracing::info!(backstore = %dir.display(), "lio: removed backstore");
        Ok(())
    }

    /// The backstore `spec` needs, corrected or made.
    pub(super) fn converge_backstore(
        &self,
        name: &str,
        want: &Backing,
        tpg: &Path,
    ) -> Result<PathBuf> {
        let serial = unit_serial(name);
        let mut keep: Option<PathBuf> = None;
        for dir in self.find_backstores(name)? {
            if keep.is_none() {
                match self.fit(&dir, want, serial) {
                    Fit::Fits => {
                        keep = Some(dir);
                        continue;
                    }
                    Fit::SizeDiffers(size) => match self.set_fileio_size(&dir, size) {
                        Ok(()) => {
                            tracing::info!(backstore = %dir.display(), size,
                                    "lio: fileio backstore resized");
                            keep = Some(dir);
                            continue;
                        }
                        Err(e) => tracing::info!(backstore = %dir.display(), error = %e,
                                "lio: re-creating the backstore to resize it"),
                    },
                    Fit::Differs(why) => tracing::info!(backstore = %dir.display(), why = %why,
                        "lio: re-creating backstore"),
                }
            }
            self.remove_backstore(&dir, tpg)?;
        }
        let dir = match keep {
            Some(d) => d,
            None => self.create_backstore(name, want, serial)?,
        };
        self.ensure_thin(&dir);
        Ok(dir)
    }
}
