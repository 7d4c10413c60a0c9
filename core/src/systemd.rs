//! Telling systemd how a daemon is doing (`Type=notify` units): the
//! `sd_notify` protocol by hand, one datagram per state change to the
//! socket in `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace), as `sd_notify(3)` specifies. No libsystemd: the protocol is
//! a few lines, and a host without systemd simply has no `NOTIFY_SOCKET`.
//!
//! Both daemons send `READY=1` once reconciliation is done and their
//! listeners are bound (systemd orders dependants after that, and
//! `systemctl start` returns then), `STOPPING=1` when a signal asks them to
//! stop, and `WATCHDOG=1` every half `$WATCHDOG_USEC` when the unit sets
//! `WatchdogSec=`, from a task on the daemon's runtime: a runtime that stops
//! making progress stops the pings, and systemd restarts the daemon.
//!
//! Children inherit `NOTIFY_SOCKET` (the variable is not removed: that is
//! not thread-safe once the runtime runs); the units keep the default
//! `NotifyAccess=main`, so systemd ignores anything but the daemon's own pid.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where to send notifications, from `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    to: SocketAddr,
    display: String,
}

impl Notifier {
    /// The notifier systemd asked for, if any: `None` without
    /// `NOTIFY_SOCKET` (not started by systemd, or not `Type=notify`).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v.to_string_lossy()).map(Some),
        }
    }

    /// A notifier for `address`: an absolute path, or `@name` for an
    /// abstract socket.
    pub fn new(address: &str) -> io::Result<Notifier> {
        let to = if let Some(name) = address.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET {address:?} is neither a path nor @abstract"),
            ));
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            to,
            display: address.to_owned(),
        })
    }

    /// Sends one notification: newline-separated `KEY=value` lines.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.to)?;
        if sent != state.len() {
            return Err(io::Error::other(format!(
                "notification to {} cut short",
                self.display
            )));
        }
        Ok(())
    }
}

/// How often systemd wants `WATCHDOG=1`: half of `$WATCHDOG_USEC` (the
/// margin `sd_watchdog_enabled(3)` recommends), when it is set and
/// `$WATCHDOG_PID`, if set, is this process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// A daemon's link to systemd: silent when there is none, and a failed
/// notification is logged, never fatal (the daemon serves either way).
#[derive(Debug, Default)]
pub struct ServiceManager {
    notifier: Option<std::sync::Arc<Notifier>>,
}

impl ServiceManager {
    /// From the environment systemd set; an unusable `NOTIFY_SOCKET` is
    /// logged and ignored.
    pub fn from_env() -> ServiceManager {
        match Notifier::from_env() {
            Ok(n) => ServiceManager {
                notifier: n.map(std::sync::Arc::new),
            },
            Err(e) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET unusable: systemd will not hear from us");
                ServiceManager::default()
            }
        }
    }

    fn send(&self, state: &str) {
        if let Some(n) = &self.notifier {
            match n.notify(state) {
                Ok(()) => tracing::debug!(socket = %n.display, state, "told systemd"),
                Err(e) => tracing::warn!(socket = %n.display, state, error = %e,
                    "could not notify systemd"),
            }
        }
    }

    /// `READY=1` with a status line, and the watchdog pings from now on if
    /// the unit asked for them. Call it on a tokio runtime.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
        let (Some(n), Some(every)) = (&self.notifier, watchdog_interval()) else {
            return;
        };
        tracing::info!(every = ?every, "systemd watchdog: pinging");
        let n = n.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = n.notify("WATCHDOG=1") {
                    tracing::warn!(error = %e, "systemd watchdog ping failed");
                }
            }
        });
    }

    /// `STOPPING=1`: the daemon is shutting down on purpose.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real datagram socket standing in for systemd's.
    fn systemd_socket(dir: &std::path::Path) -> (UnixDatagram, String) {
        let path = dir.join("notify");
        let s = UnixDatagram::bind(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (s, path.display().to_string())
    }

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_arrive_as_one_datagram_each() {
        let dir = tempfile::tempdir().unwrap();
        let (systemd, path) = systemd_socket(dir.path());
        let n = Notifier::new(&path).unwrap();
        n.notify("READY=1\nSTATUS=serving").unwrap();
        n.notify("STOPPING=1").unwrap();
        assert_eq!(recv(&systemd), "READY=1\nSTATUS=serving");
        assert_eq!(recv(&systemd), "STOPPING=1");
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("stratus-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .notify("WATCHDOG=1")
            .unwrap();
        assert_eq!(recv(&systemd), "WATCHDOG=1");
    }

    #[test]
    fn a_relative_socket_is_refused_and_a_missing_one_fails_to_send() {
        assert!(Notifier::new("notify").is_err());
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(&dir.path().join("none").display().to_string()).unwrap();
        assert!(n.notify("READY=1").is_err());
    }

    #[test]
    fn the_watchdog_pings_at_half_the_timeout_and_only_for_its_pid() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 7), half);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("x"), None, 7), None);
    }

    #[tokio::test]
    async fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
        let m = ServiceManager::default();
        m.ready("serving");
        m.stopping("bye");
    }
}
