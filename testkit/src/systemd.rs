//! A stand-in for systemd's side of the notify protocol (`Type=notify`): a
//! real datagram socket a daemon started with `NOTIFY_SOCKET` writes to.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds `DIR/notify`; each read waits at most a minute.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        NotifySocket { socket, path }
    }

    /// The value for the daemon's `NOTIFY_SOCKET`.
    pub fn env_value(&self) -> String {
        self.path.display().to_string()
    }

    /// The next notification.
    pub fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Sends SIGTERM to `pid`; the first notification after it that is not a
    /// watchdog ping (pings already in flight may come first).
    pub fn after_sigterm(&self, pid: u32) -> String {
        // SAFETY: kill(2) with a pid the test started; no memory involved.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        loop {
            let m = self.recv();
            if m != "WATCHDOG=1" {
                return m;
            }
        }
    }
}
