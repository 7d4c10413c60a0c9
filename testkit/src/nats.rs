//! A NATS server of the test's own with JetStream ([`NatsServer`]): Debian's
//! `nats-server -js` on a free loopback port (on the host, or inside a test
//! namespace so an agentd there reaches it), its store in the test's
//! directory, killed and restarted on the same port and store by the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{can_connect_in, free_port, wait_for, NetNs};

/// A running `nats-server -js`; killed on drop.
pub struct NatsServer {
    pub addr: SocketAddr,
    /// JetStream's store: kept across [`NatsServer::restart`].
    pub store_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    netns: Option<String>,
}

impl NatsServer {
    /// Starts one on the host's loopback, its store under `dir`.
    pub fn start(dir: &Path) -> NatsServer {
        Self::start_in(dir, None)
    }

    /// Starts one inside `ns` (on the namespace's loopback) when given.
    pub fn start_in(dir: &Path, ns: Option<&NetNs>) -> NatsServer {
        let port = free_port();
        let store_dir = dir.join(format!("nats-{port}"));
        std::fs::create_dir_all(&store_dir).unwrap();
        let mut n = NatsServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: dir.join(format!("nats-{port}.log")),
            store_dir,
            child: None,
            netns: ns.map(|n| n.name.clone()),
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nats-server"]);
                c
            }
            None => Command::new("nats-server"),
        };
        let child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.addr.port().to_string())
            .arg("-sd")
            .arg(&self.store_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (Debian package nats-server) must be installed");
        self.child = Some(child);
        let addr = self.addr;
        let ns = self.netns.clone();
        let log = self.log.clone();
        let child = self.child.as_mut().unwrap();
        wait_for("nats-server to listen", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let up = match &ns {
                Some(ns) => can_connect_in(ns, addr),
                None => std::net::TcpStream::connect(addr).is_ok(),
            };
            up.then_some(())
        });
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// SIGKILL, as in a crash: clients see the connection drop.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store (killing it first if it
    /// runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- nats-server log ----\n{}", self.log_text());
        }
    }
}
