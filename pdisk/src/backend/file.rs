//! The file backend: one sparse file per volume or snapshot in the pool dir.
//!
//! ```text
//! <pool>/volumes/<uuid>.raw     writable volumes
//! <pool>/snapshots/<uuid>.raw   read-only snapshots (mode 0444)
//! <pool>/staging/               temporaries: partial copies, uploads
//! ```
//! File names come from UUIDs only, so no request can name a path. New objects
//! are built in `staging/` and renamed into place, so a file in `volumes/` or
//! `snapshots/` is always complete; `staging/` holds nothing worth keeping
//! after a crash.
//!
//! On a reflink filesystem (XFS with reflink=1, btrfs) snapshots and clones are
//! FICLONE calls: constant time, sharing every extent. Elsewhere they fall
//! back to the sparse-aware copy in [`super::copy`], with progress.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use super::copy::{self, ficlone, sparse_copy};
use super::image;
use super::{Backend, ImageFormat, ObjectId, PoolListing, PoolUsage, ProgressFn};
use crate::error::{Error, Result};
use crate::runner::{BoxFuture, CommandRunner};

pub struct FileBackend {
    root: PathBuf,
    reflink: bool,
    runner: Arc<dyn CommandRunner>,
}

impl FileBackend {
    /// Opens (creating its directories) the pool at `root` and probes reflink.
    pub fn open(root: &Path, runner: Arc<dyn CommandRunner>) -> Result<FileBackend> {
        for d in ["volumes", "snapshots", "staging"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(p.display(), e))?;
        }
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(root.display(), e))?;
        let reflink = copy::reflink_supported(&root.join("staging"))
            .map_err(|e| Error::io(root.display(), e))?;
        if reflink {
            tracing::info!(pool = %root.display(), "file backend: reflink supported; snapshots and clones share extents");
        } else {
            tracing::warn!(pool = %root.display(), "file backend: no reflink on this filesystem; snapshots and clones fall back to sparse copies");
        }
        Ok(FileBackend {
            root,
            reflink,
            runner,
        })
    }

    pub fn reflink(&self) -> bool {
        self.reflink
    }

    fn path(&self, id: ObjectId) -> PathBuf {
        match id {
            ObjectId::Volume(u) => self.root.join("volumes").join(format!("{u}.raw")),
            ObjectId::Snapshot(u) => self.root.join("snapshots").join(format!("{u}.raw")),
        }
    }

    fn temp_path(&self, id: ObjectId) -> PathBuf {
        let (kind, u) = match id {
            ObjectId::Volume(u) => ("volume", u),
            ObjectId::Snapshot(u) => ("snapshot", u),
        };
        self.root.join("staging").join(format!("{kind}-{u}.tmp"))
    }

    /// Makes the finished temp file the object: fsync, rename, fsync the dir.
    fn publish(&self, tmp: &Path, id: ObjectId) -> Result<()> {
        let dst = self.path(id);
        if dst.exists() {
            let _ = std::fs::remove_file(tmp);
            return Err(Error::exists(format!("{id} already has a file")));
        }
        File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(tmp.display(), e))?;
        if let ObjectId::Snapshot(_) = id {
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o444))
                .map_err(|e| Error::io(tmp.display(), e))?;
        }
        crate::failpoints::crash_point("file::publish::before_rename");
        std::fs::rename(tmp, &dst).map_err(|e| Error::io(dst.display(), e))?;
        crate::failpoints::crash_point("file::publish::after_rename");
        sync_parent(&dst)
    }

    fn new_temp(&self, id: ObjectId) -> Result<(PathBuf, File)> {
        let tmp = self.temp_path(id);
        let _ = std::fs::remove_file(&tmp);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(tmp.display(), e))?;
        Ok((tmp, f))
    }

    /// Copies `src` into a new temp file for `dst` by reflink or sparse copy,
    /// sized to at least `size`, and publishes it.
    fn copy_object(
        &self,
        src: ObjectId,
        dst: ObjectId,
        size: u64,
        progress: ProgressFn,
    ) -> Result<()> {
        let src_path = self.path(src);
        let s = File::open(&src_path).map_err(|e| Error::io(src, e))?;
        let len = s.metadata().map_err(|e| Error::io(src, e))?.len();
        let (tmp, d) = self.new_temp(dst)?;
        let result = (|| {
            if self.reflink {
                ficlone(&s, &d).map_err(|e| Error::io(format!("reflink {src} to {dst}"), e))?;
                progress("reflink", len, len);
            } else {
                sparse_copy(&s, &d, len, |done| progress("copy", done, len))
                    .map_err(|e| Error::io(format!("copy {src} to {dst}"), e))?;
            }
            if size > len {
                d.set_len(size).map_err(|e| Error::io(tmp.display(), e))?;
            }
            drop(d);
            self.publish(&tmp, dst)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Removes every temporary in `staging/`: they belong to operations that
    /// a crash interrupted. Returns their names.
    pub fn clear_staging(&self) -> Result<Vec<String>> {
        let dir = self.root.join("staging");
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(dir.display(), e))? {
            let e = e.map_err(|e| Error::io(dir.display(), e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.ends_with(".upload") {
                std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path().display(), err))?;
                removed.push(name);
            }
        }
        if !removed.is_empty() {
            sync_parent(&dir.join("x"))?;
        }
        Ok(removed)
    }
}

/// Makes a create, rename or removal of `path`'s entry durable: fsync of its
/// directory.
fn sync_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir.display(), e))
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> BoxFuture<'static, Result<T>> {
    Box::pin(async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::internal(format!("backend task failed: {e}")))?
    })
}

impl FileBackend {
    /// A copy to move into blocking tasks (the runner is shared).
    fn handle(&self) -> FileBackend {
        FileBackend {
            root: self.root.clone(),
            reflink: self.reflink,
            runner: self.runner.clone(),
        }
    }
}

impl Backend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c = vec!["sparse".to_string()];
        c.push(
            if self.reflink {
                "reflink"
            } else {
                "sparse-copy"
            }
            .to_string(),
        );
        c
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn device_path(&self, id: ObjectId) -> PathBuf {
        self.path(id)
    }

    fn create(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>> {
        let b = self.handle();
        blocking(move || {
            let (tmp, f) = b.new_temp(id)?;
            let r = f
                .set_len(size)
                .map_err(|e| Error::io(tmp.display(), e))
                .and_then(|_| {
                    drop(f);
                    b.publish(&tmp, id)
                });
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r
        })
    }

    /// Removes the object's file and any temporary of it in `staging/`
    /// (an interrupted create's partial copy), and makes both removals
    /// durable before answering.
    fn delete(&self, id: ObjectId) -> BoxFuture<'_, Result<()>> {
        let paths = [self.path(id), self.temp_path(id)];
        blocking(move || {
            for p in &paths {
                match std::fs::remove_file(p) {
                    Ok(()) => {
                        crate::failpoints::crash_point("file::delete::after_unlink");
                        sync_parent(p)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(p.display(), e)),
                }
            }
            Ok(())
        })
    }

    fn snapshot(
        &self,
        src: ObjectId,
        dst: Uuid,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>> {
        let b = self.handle();
        blocking(move || b.copy_object(src, ObjectId::Snapshot(dst), 0, progress))
    }

    fn clone_object(
        &self,
        src: ObjectId,
        dst: Uuid,
        size: u64,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<()>> {
        let b = self.handle();
        blocking(move || {
            b.copy_object(src, ObjectId::Volume(dst), size, progress)?;
            // A clone of a snapshot must be writable.
            let p = b.path(ObjectId::Volume(dst));
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(p.display(), e))
        })
    }

    fn set_read_only(&self, id: ObjectId) -> BoxFuture<'_, Result<()>> {
        let p = self.path(id);
        Box::pin(async move {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444))
                .map_err(|e| Error::io(p.display(), e))
        })
    }

    fn resize(&self, id: ObjectId, size: u64) -> BoxFuture<'_, Result<()>> {
        let p = self.path(id);
        blocking(move || {
            let f = OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| Error::io(p.display(), e))?;
            let cur = f.metadata().map_err(|e| Error::io(p.display(), e))?.len();
            if size < cur {
                return Err(Error::invalid(format!(
                    "{id} is {cur} bytes; shrinking to {size} is refused"
                )));
            }
            f.set_len(size).map_err(|e| Error::io(p.display(), e))?;
            f.sync_all().map_err(|e| Error::io(p.display(), e))
        })
    }

    fn import<'a>(
        &'a self,
        dst: Uuid,
        path: &'a Path,
        format: ImageFormat,
        size: u64,
        progress: ProgressFn,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let id = ObjectId::Volume(dst);
            match format {
                ImageFormat::Raw => {
                    let b = self.handle();
                    let src = path.to_path_buf();
                    blocking(move || {
                        let s = File::open(&src).map_err(|e| Error::io(src.display(), e))?;
                        let len = s.metadata().map_err(|e| Error::io(src.display(), e))?.len();
                        let (tmp, d) = b.new_temp(id)?;
                        let r = sparse_copy(&s, &d, len, |done| progress("import", done, len))
                            .map_err(|e| Error::io(format!("importing {}", src.display()), e))
                            .and_then(|_| {
                                if size > len {
                                    d.set_len(size).map_err(|e| Error::io(tmp.display(), e))?;
                                }
                                drop(d);
                                b.publish(&tmp, id)
                            });
                        if r.is_err() {
                            let _ = std::fs::remove_file(&tmp);
                        }
                        r
                    })
                    .await
                }
                ImageFormat::Qcow2 => {
                    let tmp = self.temp_path(id);
                    let _ = std::fs::remove_file(&tmp);
                    let info = image::inspect(self.runner.as_ref(), path, format).await?;
                    let r = async {
                        image::convert_qcow2_to_raw(
                            self.runner.as_ref(),
                            path,
                            &tmp,
                            info.virtual_size,
                            progress.clone(),
                        )
                        .await?;
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&tmp)
                            .map_err(|e| Error::io(tmp.display(), e))?;
                        if size > info.virtual_size {
                            f.set_len(size).map_err(|e| Error::io(tmp.display(), e))?;
                        }
                        drop(f);
                        progress("import", info.virtual_size, info.virtual_size);
                        self.publish(&tmp, id)
                    }
                    .await;
                    if r.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    r
                }
            }
        })
    }

    fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn allocated(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>> {
        let p = self.path(id);
        Box::pin(async move { copy::allocated_bytes(&p).map_err(|e| Error::io(p.display(), e)) })
    }

    fn size(&self, id: ObjectId) -> BoxFuture<'_, Result<u64>> {
        let p = self.path(id);
        Box::pin(async move {
            std::fs::metadata(&p)
                .map(|m| m.len())
                .map_err(|e| Error::io(p.display(), e))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<PoolListing>> {
        Box::pin(async move { self.list_now() })
    }

    fn usage(&self) -> BoxFuture<'_, Result<PoolUsage>> {
        Box::pin(async move { statvfs(&self.root) })
    }
}

impl FileBackend {
    fn list_now(&self) -> Result<PoolListing> {
        let mut out = PoolListing {
            usage: statvfs(&self.root)?,
            ..PoolListing::default()
        };
        for (dir, make) in [
            ("volumes", ObjectId::Volume as fn(Uuid) -> ObjectId),
            ("snapshots", ObjectId::Snapshot as fn(Uuid) -> ObjectId),
        ] {
            let d = self.root.join(dir);
            for e in std::fs::read_dir(&d).map_err(|e| Error::io(d.display(), e))? {
                let e = e.map_err(|e| Error::io(d.display(), e))?;
                let name = e.file_name().to_string_lossy().into_owned();
                match name
                    .strip_suffix(".raw")
                    .and_then(|u| Uuid::parse_str(u).ok())
                {
                    Some(u) => {
                        let id = make(u);
                        out.objects.push(id);
                        if let Ok(a) = copy::allocated_bytes(&e.path()) {
                            out.allocated.insert(id, a);
                        }
                    }
                    None => out.foreign.push(format!("{dir}/{name}")),
                }
            }
        }
        out.objects.sort();
        Ok(out)
    }
}

fn statvfs(p: &Path) -> Result<PoolUsage> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::internal("pool path contains NUL"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer
    // to a zero-initialised statvfs that lives across the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::io(p.display(), std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize;
    Ok(PoolUsage {
        capacity: st.f_blocks * frsize,
        used: (st.f_blocks - st.f_bfree) * frsize,
        thin: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::FakeRunner;
    use std::os::unix::fs::FileExt;

    fn backend(dir: &Path) -> FileBackend {
        FileBackend::open(dir, Arc::new(FakeRunner::new())).unwrap()
    }

    #[tokio::test]
    async fn create_snapshot_clone_resize_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        let v = Uuid::new_v4();
        b.create(ObjectId::Volume(v), 8 << 20).await.unwrap();
        let vp = b.device_path(ObjectId::Volume(v));
        File::options()
            .write(true)
            .open(&vp)
            .unwrap()
            .write_all_at(b"before", 4096)
            .unwrap();
        let s = Uuid::new_v4();
        b.snapshot(ObjectId::Volume(v), s, super::super::no_progress())
            .await
            .unwrap();
        File::options()
            .write(true)
            .open(&vp)
            .unwrap()
            .write_all_at(b"after!", 4096)
            .unwrap();
        let sp = b.device_path(ObjectId::Snapshot(s));
        let mut buf = [0u8; 6];
        File::open(&sp)
            .unwrap()
            .read_exact_at(&mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"before");
        assert!(std::fs::metadata(&sp).unwrap().permissions().readonly());

        let c = Uuid::new_v4();
        b.clone_object(
            ObjectId::Snapshot(s),
            c,
            16 << 20,
            super::super::no_progress(),
        )
        .await
        .unwrap();
        assert_eq!(b.size(ObjectId::Volume(c)).await.unwrap(), 16 << 20);
        File::open(b.device_path(ObjectId::Volume(c)))
            .unwrap()
            .read_exact_at(&mut buf, 4096)
            .unwrap();
        assert_eq!(&buf, b"before");

        b.resize(ObjectId::Volume(v), 32 << 20).await.unwrap();
        assert_eq!(b.size(ObjectId::Volume(v)).await.unwrap(), 32 << 20);
        assert!(b.resize(ObjectId::Volume(v), 1 << 20).await.is_err());

        let listing = b.list().await.unwrap();
        assert_eq!(listing.objects.len(), 3);
        assert_eq!(listing.allocated.len(), 3);
        assert!(listing.usage.capacity > 0 && listing.usage.thin.is_none());
        b.delete(ObjectId::Volume(v)).await.unwrap();
        b.delete(ObjectId::Volume(v)).await.unwrap(); // idempotent
        assert_eq!(b.list().await.unwrap().objects.len(), 2);
    }

    #[tokio::test]
    async fn foreign_files_are_listed_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        std::fs::write(dir.path().join("volumes/notes.txt"), b"x").unwrap();
        assert_eq!(b.list().await.unwrap().foreign, vec!["volumes/notes.txt"]);
        assert!(dir.path().join("volumes/notes.txt").exists());
    }
}
