//! A tgtd of the test's own ([`Tgtd`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{free_port, require_root, run, run_ok, wait_for, NetNs};

static NEXT_CONTROL: AtomicU32 = AtomicU32::new(0);

/// A tgtd of the test's own, on its own control port and portal.
pub struct Tgtd {
    pub control_port: u32,
    pub portal_port: u16,
    /// The address its portal listens on (127.0.0.1 unless started with
    /// [`Tgtd::start_in_at`]).
    pub portal_ip: String,
    child: Option<Child>,
    log: PathBuf,
    netns: Option<String>,
    extra_args: Vec<String>,
}

impl Tgtd {
    pub fn start(log_dir: &Path) -> Tgtd {
        Self::start_in(log_dir, None)
    }

    /// Starts tgtd with extra flags, e.g. `["--nr_iothreads", "1"]`.
    pub fn start_with(log_dir: &Path, extra_args: &[&str]) -> Tgtd {
        Self::start_full(log_dir, None, extra_args)
    }

    /// Starts tgtd inside `netns` (its portal then lives there).
    pub fn start_in(log_dir: &Path, netns: Option<&NetNs>) -> Tgtd {
        Self::start_full(log_dir, netns, &[])
    }

    /// Starts tgtd inside `netns` with its portal on `ip` (an address of
    /// the namespace other namespaces reach, for several hosts).
    pub fn start_in_at(log_dir: &Path, netns: &NetNs, ip: &str) -> Tgtd {
        let mut t = Self::start_full(log_dir, Some(netns), &[]);
        t.kill();
        t.portal_ip = ip.to_string();
        t.spawn();
        t
    }

    fn start_full(log_dir: &Path, netns: Option<&NetNs>, extra_args: &[&str]) -> Tgtd {
        require_root();
        // Control ports are small integers (tgt keeps them in a short);
        // spread by pid so parallel test binaries do not collide, and skip
        // any whose socket exists.
        let base = 1000 + (std::process::id() % 2000) * 10;
        let control_port = loop {
            let c = base + NEXT_CONTROL.fetch_add(1, Ordering::SeqCst) % 10_000;
            let c = c % 32_000 + 100;
            if !Path::new(&format!("/var/run/tgtd/socket.{c}")).exists() {
                break c;
            }
        };
        let mut t = Tgtd {
            control_port,
            portal_port: free_port(),
            portal_ip: "127.0.0.1".to_string(),
            child: None,
            log: log_dir.join(format!("tgtd-{control_port}.log")),
            netns: netns.map(|n| n.name.clone()),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tgtd"]);
                c
            }
            None => Command::new("tgtd"),
        };
        let child = cmd
            .args([
                "-f",
                "-C",
                &self.control_port.to_string(),
                "--iscsi",
                &format!("portal={}:{}", self.portal_ip, self.portal_port),
            ])
            .args(&self.extra_args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tgtd (Debian package tgt) must be installed");
        self.child = Some(child);
        let port = self.control_port.to_string();
        wait_for("tgtd to answer", Duration::from_secs(20), || {
            run("tgtadm", &["-C", &port, "--mode", "system", "--op", "show"])
                .status
                .success()
                .then_some(())
        });
    }

    pub fn portal(&self) -> String {
        format!("{}:{}", self.portal_ip, self.portal_port)
    }

    /// tgtd's process id while it runs (for its CPU time in /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills tgtd (SIGKILL): every target it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.control_port));
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}.lock", self.control_port));
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `tgtadm --mode target --op show` output.
    pub fn show(&self) -> String {
        run_ok(
            "tgtadm",
            &[
                "-C",
                &self.control_port.to_string(),
                "--lld",
                "iscsi",
                "--mode",
                "target",
                "--op",
                "show",
            ],
        )
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.kill();
    }
}
