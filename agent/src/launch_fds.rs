//! The descriptors agentd opens for a QEMU and hands over by inheritance
//! (taps, disks, the QMP listener, the console's listener, sealed secret memfds),
//! so that a confined QEMU under `spawn=deny` opens nothing itself; and a
//! numbering-only stand-in for checking command lines without root.
//! [`crate::vmm::LaunchPlan::argv`] asks a [`PassedFds`] for each number.

use std::path::Path;

use stratus_core::error::{Error, Result};

/// The descriptors a QEMU inherits, by the numbers its command line names.
/// [`crate::vmm::launch`] opens real ones ([`OpenFds`]); tests number them.
pub trait PassedFds {
    /// A host file, read-only or read-write.
    fn file(&mut self, path: &Path, writable: bool) -> Result<i32>;
    /// Tap `name`, attached with the flags agentd created it with.
    fn tap(&mut self, name: &str) -> Result<i32>;
    /// A secret's bytes, readable by QEMU as `/proc/self/fd/N`.
    fn secret(&mut self, bytes: &[u8]) -> Result<i32>;
    /// A listening Unix socket bound at `path` (QMP).
    fn listener(&mut self, path: &Path) -> Result<i32>;
    /// A file QEMU appends to, created 0600.
    fn log(&mut self, path: &Path) -> Result<i32>;
    /// The listening socket of the serial console, which agentd has
    /// already connected to (see [`crate::console`]).
    fn console(&mut self, path: &Path) -> Result<i32>;
}

/// Descriptor numbers for a command line, opening nothing: what each
/// number stands for is kept, to check command lines without root.
#[derive(Debug, Default)]
pub struct NumberedFds {
    /// (number, what: "file:PATH:rw", "tap:NAME", "secret:LEN", ...)
    pub given: Vec<(i32, String)>,
}

impl NumberedFds {
    fn give(&mut self, what: String) -> Result<i32> {
        let n = 100 + self.given.len() as i32;
        self.given.push((n, what));
        Ok(n)
    }
}

impl PassedFds for NumberedFds {
    fn file(&mut self, path: &Path, writable: bool) -> Result<i32> {
        let mode = if writable { "rw" } else { "ro" };
        self.give(format!("file:{}:{mode}", path.display()))
    }
    fn tap(&mut self, name: &str) -> Result<i32> {
        self.give(format!("tap:{name}"))
    }
    fn secret(&mut self, bytes: &[u8]) -> Result<i32> {
        self.give(format!("secret:{}", bytes.len()))
    }
    fn listener(&mut self, path: &Path) -> Result<i32> {
        self.give(format!("listener:{}", path.display()))
    }
    fn log(&mut self, path: &Path) -> Result<i32> {
        self.give(format!("log:{}", path.display()))
    }
    fn console(&mut self, path: &Path) -> Result<i32> {
        self.give(format!("console:{}", path.display()))
    }
}

/// Descriptors opened by agentd for one QEMU; closed in agentd once QEMU
/// has them (dropped after the spawn).
#[derive(Default)]
pub struct OpenFds {
    fds: Vec<std::os::fd::OwnedFd>,
    /// agentd's end of the serial console, connected before QEMU starts.
    console: Option<std::os::unix::net::UnixStream>,
}

impl OpenFds {
    fn keep(&mut self, fd: std::os::fd::OwnedFd) -> i32 {
        use std::os::fd::AsRawFd;
        let n = fd.as_raw_fd();
        self.fds.push(fd);
        n
    }

    /// agentd's connection to the serial console, once.
    pub fn take_console(&mut self) -> Option<std::os::unix::net::UnixStream> {
        self.console.take()
    }

    /// Their numbers, for the child to inherit.
    pub fn raw(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.fds.iter().map(|f| f.as_raw_fd()).collect()
    }
}

impl PassedFds for OpenFds {
    fn file(&mut self, path: &Path, writable: bool) -> Result<i32> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path.display(), e))?;
        Ok(self.keep(f.into()))
    }

    fn tap(&mut self, name: &str) -> Result<i32> {
        let tap: crate::net::TapName = name.parse()?;
        Ok(self.keep(crate::net::open_tap(&tap)?))
    }

    fn secret(&mut self, bytes: &[u8]) -> Result<i32> {
        Ok(self.keep(sealed_memfd(bytes)?))
    }

    fn listener(&mut self, path: &Path) -> Result<i32> {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| Error::io(path.display(), e))?;
        Ok(self.keep(l.into()))
    }

    fn log(&mut self, path: &Path) -> Result<i32> {
        Ok(self.keep(open_log(path)?.into()))
    }

    fn console(&mut self, path: &Path) -> Result<i32> {
        let n = self.listener(path)?;
        // Queued in the listener's backlog until QEMU accepts it.
        let client = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| Error::io(path.display(), e))?;
        self.console = Some(client);
        Ok(n)
    }
}

/// Opens (creates, 0600, root's) a log QEMU appends to.
pub(crate) fn open_log(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))
}

/// A memfd holding `bytes`, sealed against any change: QEMU reads it through
/// `/proc/self/fd/N` (a memfd's inode lets any uid that holds it reopen
/// it), so a secret never touches a disk or a command line.
pub(crate) fn sealed_memfd(bytes: &[u8]) -> Result<std::os::fd::OwnedFd> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a
    // new descriptor or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"stratus-secret".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::internal(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a new, valid descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(owned);
    f.write_all(bytes)
        .map_err(|e| Error::internal(format!("writing a secret memfd: {e}")))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS takes an int argument; the fd is valid.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::internal(format!(
            "sealing a secret memfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(f.into())
}
