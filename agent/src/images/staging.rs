//! Temporaries of the image cache: files named `.partial-<uuid>…` in the
//! directory they will be published into.
//!
//! A [`Partial`] is removed when dropped unless it was published; publishing
//! is fsync, rename, fsync of the directory, so after a crash a name is
//! either absent or complete. What a crash leaves behind is only `.partial-*`
//! names, which [`crate::images::LocalCache::open`] removes.

use std::fs::File;
use std::path::{Path, PathBuf};

use stratus_core::error::{Error, Result};

/// The prefix of every temporary name; nothing else in the cache starts with it.
pub(crate) const PARTIAL_PREFIX: &str = ".partial-";

/// A temporary file, removed on drop unless published.
#[derive(Debug)]
pub(crate) struct Partial {
    path: PathBuf,
    published: bool,
}

impl Partial {
    /// Creates `dir/.partial-<uuid><suffix>`, which must not exist.
    pub(crate) fn create(dir: &Path, suffix: &str) -> Result<(Partial, File)> {
        let path = dir.join(format!(
            "{PARTIAL_PREFIX}{}{suffix}",
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(path.display(), e))?;
        Ok((
            Partial {
                path,
                published: false,
            },
            file,
        ))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the (already synced) file to `dest` in the same directory,
    /// replacing it, and makes the rename durable.
    pub(crate) fn publish(self, dest: &Path) -> Result<()> {
        self.rename(dest)?;
        sync_dir(dest.parent().unwrap_or(Path::new("/")))
    }

    /// Renames without making the rename durable: for data whose loss in a
    /// crash is harmless (a last-used time).
    fn rename(mut self, dest: &Path) -> Result<()> {
        std::fs::rename(&self.path, dest).map_err(|e| Error::io(dest.display(), e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.published {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temporary");
                }
            }
        }
    }
}

/// Writes `bytes` to `dest` through a synced temporary: `dest` holds either
/// its old content or all of `bytes`.
pub(crate) fn write_atomically(dest: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    use std::io::Write;
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let (partial, mut file) = Partial::create(dir, ".tmp")?;
    file.write_all(bytes)
        .map_err(|e| Error::io(partial.path().display(), e))?;
    if durable {
        file.sync_all()
            .map_err(|e| Error::io(partial.path().display(), e))?;
        partial.publish(dest)
    } else {
        partial.rename(dest)
    }
}

/// fsync of a directory, so the renames and unlinks in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_is_removed_unless_published() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _f) = Partial::create(dir.path(), "").unwrap();
        let name = p.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with(PARTIAL_PREFIX));
        drop(p);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let (p, _f) = Partial::create(dir.path(), "").unwrap();
        p.publish(&dir.path().join("done")).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["done"]);

        write_atomically(&dir.path().join("done"), b"new", false).unwrap();
        write_atomically(&dir.path().join("done"), b"newer", true).unwrap();
        assert_eq!(std::fs::read(dir.path().join("done")).unwrap(), b"newer");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
