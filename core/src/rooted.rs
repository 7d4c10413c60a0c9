//! Host files opened only beneath configured root directories.
//!
//! A request may name a host file (agentd's `file:` disks, kernels and
//! initrds, `file://` images): the operator lists the directories such
//! files may come from, and [`Roots::open`] opens a file only if it lies
//! beneath one of them. The check and the open are one system call:
//! `openat2(root, rest, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from a
//! descriptor of the root taken at start, so neither a `..` nor a symlink
//! (anywhere on the path, even one swapped in after a check) leads out of
//! the root, and `/proc/*/fd` links are not followed. What the caller gets
//! is the open file: it reads that descriptor, or hands it on (QEMU opens
//! it through [`RootedFile::proc_path`]), never the path again, so there
//! is no window between the check and the use.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// One root: the directory as configured, and a descriptor of it.
#[derive(Debug)]
struct Root {
    /// As configured (what a request names) and resolved (symlinks followed
    /// once, at start): a path under either form is under this root.
    given: PathBuf,
    real: PathBuf,
    dir: OwnedFd,
}

/// The directories host files may be opened from; none: every host file
/// is refused.
#[derive(Debug, Clone, Default)]
pub struct Roots {
    roots: Arc<Vec<Root>>,
    /// The setting that names them, for messages (`--host-file-root`).
    setting: &'static str,
}

/// A host file opened beneath a root.
#[derive(Debug, Clone)]
pub struct RootedFile {
    /// The path the request named.
    pub path: PathBuf,
    fd: Arc<OwnedFd>,
}

impl Roots {
    /// Opens each directory of `dirs` (they must exist: a typo in a setting
    /// should stop the daemon, not refuse every request later). `setting`
    /// names the flag for error messages.
    pub fn open(setting: &'static str, dirs: &[PathBuf]) -> Result<Roots> {
        let mut roots = Vec::new();
        for d in dirs {
            if !d.is_absolute() {
                return Err(Error::invalid(format!(
                    "{setting} {}: must be an absolute path",
                    d.display()
                )));
            }
            let real = d
                .canonicalize()
                .map_err(|e| Error::invalid(format!("{setting} {}: {e}", d.display())))?;
            let c = cstring(&real)?;
            // SAFETY: `c` is a NUL-terminated path; the returned descriptor
            // is owned by the OwnedFd below and closed once.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::invalid(format!("{setting} {}: {e}", d.display())));
            }
            roots.push(Root {
                given: d.clone(),
                real,
                // SAFETY: `fd` was just opened and is owned by nobody else.
                dir: unsafe { OwnedFd::from_raw_fd(fd) },
            });
        }
        Ok(Roots {
            roots: Arc::new(roots),
            setting,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The roots as configured, for messages and `host show`.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.roots.iter().map(|r| r.given.clone()).collect()
    }

    /// Opens `path` (read-only, or read-write with `write`) if it is a
    /// regular file beneath a root. `what` names it in errors ("disk",
    /// "kernel"). InvalidArgument: a relative path, `.`/`..` components,
    /// NUL, not a regular file; PermissionDenied: outside every root, or a
    /// symlink leading out; NotFound: nothing there. Nothing is created.
    pub fn open_file(&self, what: &str, path: &Path, write: bool) -> Result<RootedFile> {
        let shown = path.display();
        let raw = path.as_os_str().as_bytes();
        if !path.is_absolute() || raw.contains(&0) {
            return Err(Error::invalid(format!(
                "{what} {shown:?}: must be an absolute path"
            )));
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || raw.windows(3).any(|w| w == b"/./")
            || raw.ends_with(b"/.")
        {
            return Err(Error::invalid(format!(
                "{what} {shown:?}: `..` and `.` are not allowed in a host path"
            )));
        }
        if self.roots.is_empty() {
            return Err(Error::denied(format!(
                "{what} {shown}: host files are not allowed on this host (no {} is set)",
                self.setting
            )));
        }
        let found = self.roots.iter().find_map(|r| {
            [&r.given, &r.real]
                .into_iter()
                .find_map(|base| path.strip_prefix(base).ok())
                .map(|rest| (r, rest))
        });
        let Some((root, rest)) = found else {
            return Err(Error::denied(format!(
                "{what} {shown} is not under any {} ({})",
                self.setting,
                self.list()
            )));
        };
        if rest.as_os_str().is_empty() {
            return Err(Error::invalid(format!(
                "{what} {shown}: names the root directory, not a file"
            )));
        }
        let c = cstring(rest)?;
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        // SAFETY: open_how is plain data; zeroed is its documented initial
        // value (every field 0), then the three fields are set.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // O_NONBLOCK: a FIFO planted under the root must not hang the
        // daemon (it is refused below as not a regular file); regular
        // files ignore the flag.
        how.flags = (access | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 reads `how` (of the size given) and the
        // NUL-terminated `c`; the descriptor it returns is owned below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) | Some(libc::ELOOP) => Error::denied(format!(
                    "{what} {shown}: leads out of {} through a symlink or `..`",
                    root.given.display()
                )),
                Some(libc::ENOENT) => Error::not_found(format!("{what} {shown} not found")),
                Some(libc::ENOTDIR) => {
                    Error::invalid(format!("{what} {shown}: a parent is not a directory"))
                }
                Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                    Error::denied(format!("{what} {shown}: {e}"))
                }
                Some(libc::ENOSYS) => Error::internal(format!(
                    "{what} {shown}: this kernel has no openat2 (Linux 5.6 or newer is needed)"
                )),
                _ => Error::invalid(format!("{what} {shown}: {e}")),
            });
        }
        // SAFETY: `fd` was just returned by openat2 and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let file = File::from(fd);
        let md = file
            .metadata()
            .map_err(|e| Error::io(format!("{what} {shown}"), e))?;
        if !md.file_type().is_file() {
            return Err(Error::invalid(format!(
                "{what} {shown} is not a regular file"
            )));
        }
        // Back to blocking I/O for the readers of this descriptor.
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(RootedFile {
            path: path.to_path_buf(),
            fd: Arc::new(OwnedFd::from(file)),
        })
    }

    fn list(&self) -> String {
        let dirs: Vec<String> = self
            .roots
            .iter()
            .map(|r| r.given.display().to_string())
            .collect();
        dirs.join(", ")
    }
}

impl RootedFile {
    /// A path naming exactly this open file for a child process of ours
    /// (QEMU): `/proc/<our pid>/fd/<n>`. Opening it reopens the same inode,
    /// whatever has happened to the path since; it is valid while this
    /// `RootedFile` (or a clone) lives, so keep it until the child has
    /// opened it.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }

    /// A `File` reading the same open file (its own descriptor: closing
    /// it leaves this one open).
    pub fn try_clone_file(&self) -> Result<File> {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| Error::io(self.path.display(), e))?;
        Ok(File::from(fd))
    }
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{:?}: contains NUL", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::io::Read;

    fn setup() -> (tempfile::TempDir, Roots) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("disk.raw"), b"inside").unwrap();
        std::fs::write(root.join("sub/k"), b"kernel").unwrap();
        std::fs::write(t.path().join("secret"), b"outside").unwrap();
        let roots = Roots::open("--host-file-root", &[root]).unwrap();
        (t, roots)
    }

    fn kind(r: Result<RootedFile>) -> ErrorKind {
        r.unwrap_err().kind()
    }

    #[test]
    fn files_beneath_the_root_open_and_read_back() {
        let (t, roots) = setup();
        let f = roots
            .open_file("disk", &t.path().join("root/disk.raw"), false)
            .unwrap();
        let mut s = String::new();
        f.try_clone_file().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "inside");
        // The /proc path reopens the very file, even after a rename.
        std::fs::rename(t.path().join("root/disk.raw"), t.path().join("moved")).unwrap();
        assert_eq!(std::fs::read(f.proc_path()).unwrap(), b"inside");
        // A symlink inside the root that stays inside is fine.
        std::os::unix::fs::symlink("sub/k", t.path().join("root/klink")).unwrap();
        let k = roots
            .open_file("kernel", &t.path().join("root/klink"), false)
            .unwrap();
        assert_eq!(std::fs::read(k.proc_path()).unwrap(), b"kernel");
    }

    #[test]
    fn escapes_and_bad_paths_are_refused() {
        let (t, roots) = setup();
        let root = t.path().join("root");
        std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink(t.path(), root.join("dirlink")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", root.join("magic")).unwrap();
        let denied = [
            root.join("up"),
            root.join("abs"),
            root.join("dirlink/secret"),
            root.join("magic"),
            t.path().join("secret"),
            PathBuf::from("/etc/shadow"),
        ];
        for p in &denied {
            assert_eq!(
                kind(roots.open_file("disk", p, false)),
                ErrorKind::PermissionDenied,
                "{}",
                p.display()
            );
        }
        let invalid = [
            PathBuf::from("relative/disk.raw"),
            root.join("../secret"),
            root.join("./disk.raw"),
            root.join("sub/../disk.raw"),
            root.clone(),
            root.join("sub"),
        ];
        for p in &invalid {
            assert_eq!(
                kind(roots.open_file("disk", p, false)),
                ErrorKind::InvalidArgument,
                "{}",
                p.display()
            );
        }
        assert_eq!(
            kind(roots.open_file("disk", &root.join("nope"), false)),
            ErrorKind::NotFound
        );
        // A FIFO neither hangs the opener nor passes for a disk.
        let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(
            kind(roots.open_file("disk", &root.join("fifo"), true)),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn without_roots_every_host_file_is_refused() {
        let roots = Roots::open("--host-file-root", &[]).unwrap();
        let e = roots
            .open_file("kernel", Path::new("/boot/vmlinuz"), false)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.message().contains("--host-file-root"), "{e}");
        assert!(Roots::open("--host-file-root", &[PathBuf::from("/nonexistent/x")]).is_err());
        assert!(Roots::open("--host-file-root", &[PathBuf::from("rel")]).is_err());
    }
}
