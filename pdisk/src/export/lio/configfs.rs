//! The host the LIO exporter acts on: the configfs filesystem (a trait, so unit
//! tests can run on a fake) and the kind of a volume's backing (block device or
//! regular file).

use std::io;
use std::path::{Path, PathBuf};

/// What a directory entry in configfs is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::export) enum EntryKind {
    Dir,
    Link,
    File,
}

/// The filesystem operations the exporter performs on configfs. The kernel
/// one is a thin layer over `std::fs`; unit tests use a fake that behaves
/// like configfs where it matters.
pub(in crate::export) trait ConfigFs: Send + Sync {
    fn exists(&self, path: &Path) -> bool;
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `value` to an existing attribute in one write(2).
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    fn unlink(&self, link: &Path) -> io::Result<()>;
    fn read_link(&self, link: &Path) -> io::Result<PathBuf>;
    fn entries(&self, dir: &Path) -> io::Result<Vec<(String, EntryKind)>>;
    /// True when configfs is mounted at `root`.
    fn mounted(&self, root: &Path) -> bool;
}

pub(in crate::export) struct KernelConfigFs;

impl ConfigFs for KernelConfigFs {
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        use std::io::Write;
        // No O_CREAT: a misspelt attribute is an error, not a new file.
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }
    fn unlink(&self, link: &Path) -> io::Result<()> {
        std::fs::remove_file(link)
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
    fn mounted(&self, root: &Path) -> bool {
        // /proc/self/mounts: "configfs /sys/kernel/config configfs rw,... 0 0".
        // When it can't be read, assume it is mounted and let the operations
        // on it report what is wrong.
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
            return true;
        };
        let root = root.to_string_lossy();
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[2] == "configfs" && f[1] == root
        })
    }
}

/// A volume's backing as LIO needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::export) enum BackingKind {
    /// A block device: an iblock backstore.
    Block,
    /// A regular file of this many bytes: a fileio backstore.
    File(u64),
}

pub(in crate::export) type StatFn = dyn Fn(&Path) -> io::Result<BackingKind> + Send + Sync;

pub(in crate::export) fn stat_backing(path: &Path) -> io::Result<BackingKind> {
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::metadata(path)?;
    if m.file_type().is_block_device() {
        Ok(BackingKind::Block)
    } else if m.is_file() {
        Ok(BackingKind::File(m.len()))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ))
    }
}
