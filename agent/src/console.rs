//! A guest's serial console log, bounded: agentd writes it, never QEMU.
//!
//! # Why agentd reads a socket rather than QEMU appending to a file
//! A guest controls what its console prints and how much. A file QEMU
//! appends to can only be bounded after the fact (copy-truncate): between
//! two checks a spamming guest writes as much as it likes, and bytes
//! written between the copy and the truncate are lost. A resource limit on
//! QEMU (`RLIMIT_FSIZE`) would cap its disk files too. So QEMU's serial
//! port is a socket chardev (`-chardev socket,fd=N,server=on,wait=on`, the
//! listener opened by agentd, see [`crate::launch_fds`]), agentd is its one
//! client, and [`ConsoleRing`] writes what it reads into two files: the
//! current `console.log` and the previous `console.log.1`, each at most
//! half of `--console-log-max`. The bound is exact, there is no race, and
//! a guest printing faster than agentd writes is slowed down: QEMU's UART
//! waits for the socket to drain, the guest's driver for the UART.
//!
//! agentd connects before QEMU starts (a connect to a listening socket
//! completes from the backlog), so `wait=on` lets QEMU take that
//! connection at once and nothing the firmware prints is missed. When
//! agentd is gone, QEMU drops what the guest prints (a socket chardev with
//! no client discards), and agentd connects again when it adopts the
//! guest. The socket is `console.sock` in the guest's directory (root's,
//! 0700).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

/// The default of `--console-log-max`.
pub const DEFAULT_MAX: u64 = 1 << 20;
/// The smallest `--console-log-max` accepted.
pub const MIN_MAX: u64 = 16 << 10;

/// The socket of a guest's serial console in its directory.
pub fn socket_in(dir: &Path) -> PathBuf {
    dir.join("console.sock")
}

/// The current log in a guest's directory.
pub fn log_in(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

/// The previous log, beside the current one.
pub fn rotated(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Two files, `console.log` and `console.log.1`, together at most `max`
/// bytes: appends go to the first; when it would pass `max / 2` it becomes
/// the second (replacing the older one) and a new first is started.
pub struct ConsoleRing {
    path: PathBuf,
    half: u64,
    file: File,
    len: u64,
}

impl ConsoleRing {
    /// Continues `path` (created 0600 if missing) under a cap of `max`.
    pub fn open(path: &Path, max: u64) -> io::Result<ConsoleRing> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        let mut ring = ConsoleRing {
            path: path.to_owned(),
            half: (max / 2).max(1),
            file,
            len,
        };
        // A log from a larger cap: start a new file now.
        if ring.len > ring.half {
            ring.rotate()?;
        }
        Ok(ring)
    }

    pub fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.len >= self.half {
                self.rotate()?;
            }
            let room = (self.half - self.len) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.file.write_all(now)?;
            self.len += now.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, rotated(&self.path))?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Copies what QEMU's serial port sends on `stream` into the ring until
/// QEMU closes it (the guest ended) or the log cannot be written.
pub async fn pump(mut stream: tokio::net::UnixStream, mut ring: ConsoleRing, vm: String) {
    let mut buf = vec![0u8; 8 << 10];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = ring.append(&buf[..n]) {
                    tracing::warn!(vm = %vm, error = %e, "cannot write the console log; no more of it is kept");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "reading the guest's console");
                return;
            }
        }
    }
}

/// agentd's end of a new guest's console, `conn` (the connection it made
/// to the listener QEMU will take), and the ring it fills under `dir`:
/// opened before QEMU runs, pumped by [`pump`] once it does.
pub fn keeper(
    conn: std::os::unix::net::UnixStream,
    dir: &Path,
    max: u64,
) -> io::Result<(tokio::net::UnixStream, ConsoleRing)> {
    let ring = ConsoleRing::open(&log_in(dir), max)?;
    conn.set_nonblocking(true)?;
    Ok((tokio::net::UnixStream::from_std(conn)?, ring))
}

/// Connects to the console socket of a running guest's QEMU (at adoption)
/// and keeps its log from now on.
pub async fn follow(dir: &Path, max: u64, vm: String) -> io::Result<()> {
    let stream = tokio::net::UnixStream::connect(socket_in(dir)).await?;
    let ring = ConsoleRing::open(&log_in(dir), max)?;
    tokio::spawn(pump(stream, ring, vm));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(log: &Path) -> (u64, u64) {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        (len(log), len(&rotated(log)))
    }

    #[test]
    fn the_ring_never_holds_more_than_its_cap_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut ring = ConsoleRing::open(&log, 1000).unwrap();
        let mut all = Vec::new();
        for i in 0..500 {
            let line = format!("line {i:04} \x1b[2J spam\n");
            all.extend_from_slice(line.as_bytes());
            ring.append(line.as_bytes()).unwrap();
            let (cur, old) = sizes(&log);
            assert!(cur <= 500 && old <= 500, "{cur} + {old}");
        }
        let mut kept = std::fs::read(rotated(&log)).unwrap();
        kept.extend(std::fs::read(&log).unwrap());
        assert_eq!(kept.len(), 500 + sizes(&log).0 as usize);
        assert!(
            all.ends_with(&kept),
            "the two files are the newest bytes, in order"
        );
        assert!(String::from_utf8_lossy(&kept).ends_with("line 0499 \x1b[2J spam\n"));
        use std::os::unix::fs::PermissionsExt;
        for p in [log.clone(), rotated(&log)] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn a_write_larger_than_half_the_cap_is_split_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut ring = ConsoleRing::open(&log, 100).unwrap();
        ring.append(&[b'x'; 130]).unwrap();
        assert_eq!(sizes(&log), (30, 50));
        ring.append(&[b'y'; 1000]).unwrap();
        assert_eq!(sizes(&log), (30, 50));
        assert_eq!(std::fs::read(&log).unwrap(), [b'y'; 30]);
        assert_eq!(std::fs::read(rotated(&log)).unwrap(), [b'y'; 50]);
    }

    #[test]
    fn a_log_kept_under_a_larger_cap_is_rotated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, [b'a'; 300]).unwrap();
        let mut ring = ConsoleRing::open(&log, 100).unwrap();
        ring.append(b"b").unwrap();
        assert_eq!(sizes(&log), (1, 300));
        ring.append(&[b'c'; 60]).unwrap();
        assert_eq!(sizes(&log), (11, 50), "the oversized old file is gone");
    }

    #[tokio::test]
    async fn pump_copies_until_the_writer_closes() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let (ours, mut qemu) = tokio::net::UnixStream::pair().unwrap();
        let ring = ConsoleRing::open(&log, 64 << 10).unwrap();
        let task = tokio::spawn(pump(ours, ring, "vm".into()));
        use tokio::io::AsyncWriteExt;
        for _ in 0..100 {
            qemu.write_all(&[b'z'; 4096]).await.unwrap();
        }
        drop(qemu);
        task.await.unwrap();
        let (cur, old) = sizes(&log);
        assert!(cur <= 32 << 10 && old == 32 << 10, "{cur} {old}");
    }
}
