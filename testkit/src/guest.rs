//! The test guest (`scripts/guest-image`): where it is, waiting on its
//! console, and the HTTP server images are pulled from ([`Httpd`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{wait_for, NetNs};

/// Where `scripts/guest-image` put the test guest (STRATUS_GUEST_DIR or
/// `var/guest` in the workspace); panics when it is not there, for tests
/// that boot guests.
pub fn guest_dir() -> PathBuf {
    let dir = guest_dir_if_built();
    assert!(
        is_built(&dir),
        "no test guest in {}: run scripts/guest-image",
        dir.display()
    );
    dir
}

/// Where the test guest is or would be, without requiring it: agentd's
/// start in the integration tier (no guests, no guest image built yet)
/// adds it as a host-file root only when it exists.
pub fn guest_dir_if_built() -> PathBuf {
    let dir = match std::env::var_os("STRATUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../var/guest"),
    };
    dir.canonicalize().unwrap_or(dir)
}

/// Whether `dir` holds a built test guest.
pub fn is_built(dir: &Path) -> bool {
    dir.join("stratus-guest.raw").exists()
}

/// Waits for a line containing `needle` in a guest's console log.
pub fn wait_console(path: &Path, needle: &str, limit: Duration) -> String {
    wait_for(&format!("{needle:?} on {}", path.display()), limit, || {
        let text = std::fs::read_to_string(path).ok()?;
        text.contains(needle).then_some(text)
    })
}

/// A static HTTP server (busybox httpd) inside a test namespace, serving
/// `dir` on 127.0.0.1:8080 there; it logs every request.
pub struct Httpd {
    pub dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Httpd {
    pub fn start_in(ns: &NetNs, dir: &Path) -> Httpd {
        let log = dir.with_extension("httpd.log");
        let child = ns
            .command("busybox")
            .args(["httpd", "-f", "-vv", "-p", "127.0.0.1:8080", "-h"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("busybox (busybox-static) must be installed");
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        wait_for("httpd to listen", Duration::from_secs(10), || {
            ns.can_connect(addr).then_some(())
        });
        Httpd {
            dir: dir.to_path_buf(),
            log,
            child,
        }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:8080/{file}")
    }

    /// How many times `file` was requested.
    pub fn requests(&self, file: &str) -> usize {
        let needle = format!("url:/{file}");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with(&needle))
            .count()
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
