//! A pdiskd of the test's own ([`Pdiskd`]): its flags, listeners and client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;

use crate::{
    bin, can_connect_in, channel, cli_tls_args, daemon_tls_args, free_port, pki, wait_for, Client,
    NetNs, TestPki, Tgtd, XfsPool,
};

/// A running pdiskd with its own data dir on the test's XFS pool.
pub struct Pdiskd {
    pub listen: SocketAddr,
    /// Its local admin socket.
    pub local_socket: PathBuf,
    /// Its own copies of the server certificate, key and CA (a test may
    /// replace them and send SIGHUP).
    pub tls: stratus_pki::TlsFiles,
    pub data_dir: PathBuf,
    pub pool_dir: PathBuf,
    pub import_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    netns: Option<String>,
    /// The daemon binary: `pdiskd`, or `pdiskd-failpoints` for fault tests.
    program: String,
    /// FAILPOINTS for the next spawn (fault-injection builds only).
    failpoints: Option<String>,
    /// Extra environment, e.g. systemd's `NOTIFY_SOCKET`.
    env: Vec<(String, String)>,
}

impl Pdiskd {
    pub fn start(pool: &XfsPool, tgtd: &Tgtd) -> Pdiskd {
        Self::start_in(pool, tgtd, None)
    }

    /// Starts pdiskd with extra flags after the harness's own, e.g.
    /// `["--max-overcommit", "1000"]`.
    pub fn start_with(pool: &XfsPool, tgtd: &Tgtd, extra_args: &[&str]) -> Pdiskd {
        Self::start_full(pool, tgtd, None, extra_args)
    }

    /// Like [`Pdiskd::start`], with extra environment variables.
    pub fn start_with_env(pool: &XfsPool, tgtd: &Tgtd, env: &[(&str, &str)]) -> Pdiskd {
        let pool_dir = pool.mnt.join("pool");
        let args = Self::tgt_args(&pool_dir, tgtd, &[]);
        Self::start_on_env(pool.dir.path(), &pool.mnt, pool_dir, None, args, env)
    }

    /// Starts pdiskd inside `netns`.
    pub fn start_in(pool: &XfsPool, tgtd: &Tgtd, netns: Option<&NetNs>) -> Pdiskd {
        Self::start_full(pool, tgtd, netns, &[])
    }

    /// Starts pdiskd inside `netns` with extra flags, e.g.
    /// `["--quarantine-period", "1h"]`.
    pub fn start_in_with(
        pool: &XfsPool,
        tgtd: &Tgtd,
        netns: Option<&NetNs>,
        extra_args: &[&str],
    ) -> Pdiskd {
        Self::start_full(pool, tgtd, netns, extra_args)
    }

    /// Starts pdiskd inside `netns` listening on `ip` (an address of the
    /// namespace other namespaces reach; the test certificates name
    /// [`crate::MIGRATION_HOST_A`]), for several hosts.
    pub fn start_in_at(pool: &XfsPool, tgtd: &Tgtd, netns: &NetNs, ip: &str) -> Pdiskd {
        let pool_dir = pool.mnt.join("pool");
        let args = Self::tgt_args(&pool_dir, tgtd, &[]);
        let mut d =
            Self::start_on_env(pool.dir.path(), &pool.mnt, pool_dir, Some(netns), args, &[]);
        d.kill9();
        let listen: SocketAddr = format!("{ip}:{}", d.listen.port()).parse().unwrap();
        let old = d.listen.to_string();
        for a in d.args.iter_mut().filter(|a| **a == old) {
            *a = listen.to_string();
        }
        d.listen = listen;
        d.spawn();
        d
    }

    fn start_full(
        pool: &XfsPool,
        tgtd: &Tgtd,
        netns: Option<&NetNs>,
        extra_args: &[&str],
    ) -> Pdiskd {
        let pool_dir = pool.mnt.join("pool");
        let args = Self::tgt_args(&pool_dir, tgtd, extra_args);
        Self::start_on(pool.dir.path(), &pool.mnt, pool_dir, netns, args)
    }

    /// The file backend on `pool_dir`, exported by `tgtd`, then `extra_args`.
    fn tgt_args(pool_dir: &Path, tgtd: &Tgtd, extra_args: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--pool-dir".into(),
            pool_dir.display().to_string(),
            "--portal".into(),
            tgtd.portal(),
            "--tgt-control-port".into(),
            tgtd.control_port.to_string(),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        args
    }

    /// Starts pdiskd with its store under `scratch`, imports under
    /// `import_parent`, and the backend/exporter flags in `args`.
    pub fn start_on(
        scratch: &Path,
        import_parent: &Path,
        pool_dir: PathBuf,
        netns: Option<&NetNs>,
        backend_args: Vec<String>,
    ) -> Pdiskd {
        Self::start_on_env(scratch, import_parent, pool_dir, netns, backend_args, &[])
    }

    fn start_on_env(
        scratch: &Path,
        import_parent: &Path,
        pool_dir: PathBuf,
        netns: Option<&NetNs>,
        backend_args: Vec<String>,
        env: &[(&str, &str)],
    ) -> Pdiskd {
        let data_dir = scratch.join("data");
        let import_dir = import_parent.join("import");
        std::fs::create_dir_all(&import_dir).unwrap();
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let local_socket = scratch.join("pdiskd.sock");
        let tls = pki::own_copy(&TestPki::shared().pdiskd(), &scratch.join("tls"));
        let mut args = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--local-socket".into(),
            local_socket.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--import-dir".into(),
            import_dir.display().to_string(),
            "--export-check-interval".into(),
            "1".into(),
        ];
        // pdiskd's own debug lines; a test that wants another filter (e.g.
        // the commands pdiskd runs, stratus_core=debug) passes its own.
        if !backend_args.iter().any(|a| a.starts_with("--log-level")) {
            args.extend(["--log-level".into(), "pdisk=debug,info".into()]);
        }
        args.extend(daemon_tls_args(&tls));
        // Tests that are not about quarantine see a delete destroy the data
        // at once (their pool and space checks count on it); the quarantine
        // tests (pdisk/tests/quarantine.rs) pass their own period.
        if !backend_args
            .iter()
            .any(|a| a.starts_with("--quarantine-period"))
        {
            args.extend(["--quarantine-period".into(), "0".into()]);
        }
        args.extend(backend_args);
        let mut d = Pdiskd {
            listen,
            local_socket,
            tls,
            data_dir,
            pool_dir,
            import_dir,
            log: scratch.join("pdiskd.log"),
            args,
            child: None,
            netns: netns.map(|n| n.name.clone()),
            program: "pdiskd".into(),
            failpoints: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn();
        d
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
                c.args(["netns", "exec", ns]).arg(bin(&self.program));
                c
            }
            None => Command::new(bin(&self.program)),
        };
        cmd.env_remove("FAILPOINTS");
        if let Some(f) = &self.failpoints {
            cmd.env("FAILPOINTS", f);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = self.listen;
        let log = self.log.clone();
        let ns = self.netns.clone();
        let child = self.child.as_mut().unwrap();
        // pdiskd reconciles store, pool and exporter before it listens; in
        // the lab VM (TCG, host under load) that took over 30 s. An exit is
        // caught at once below, so a long limit costs a working run nothing.
        wait_for("pdiskd to listen", Duration::from_secs(120), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "pdiskd exited with {status}:\n{}",
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

    /// pdiskd's mTLS address.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// Starts `pdiskd-failpoints` (pdiskd with crash points; build it with
    /// `cargo build -p pdisk --features failpoints --bin pdiskd-failpoints`)
    /// with no failpoint set.
    pub fn start_failpoints(pool: &XfsPool, tgtd: &Tgtd) -> Pdiskd {
        Self::start_failpoints_with(pool, tgtd, &[])
    }

    /// [`Pdiskd::start_failpoints`] with extra flags, as [`Pdiskd::start_with`].
    pub fn start_failpoints_with(pool: &XfsPool, tgtd: &Tgtd, extra_args: &[&str]) -> Pdiskd {
        let mut d = Self::start_with(pool, tgtd, extra_args);
        d.kill9();
        d.program = "pdiskd-failpoints".into();
        d.spawn();
        d
    }

    /// This pdiskd's flags on `pdiskd-failpoints`, with no failpoint set
    /// (e.g. after [`Pdiskd::start_on`] with another backend).
    pub fn into_failpoints(mut self) -> Pdiskd {
        self.kill9();
        self.program = "pdiskd-failpoints".into();
        self.spawn();
        self
    }

    /// Restarts with FAILPOINTS set to `spec` (`None`: unset), e.g.
    /// `Some("service::create::after_intent=return")`.
    pub fn restart_with_failpoints(&mut self, spec: Option<&str>) {
        self.failpoints = spec.map(str::to_owned);
        self.restart();
    }

    /// Waits up to `limit` for the daemon to exit on its own (a crash point
    /// fired); its exit status, or None when it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client as the test admin, over mTLS.
    pub async fn client(&self) -> Client {
        VolumeServiceClient::new(channel(&self.url()).await)
    }

    /// The process id (for signals such as SIGHUP).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("pdiskd runs").id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the `pdisk` CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("pdisk"))
            .arg("--server")
            .arg(self.url())
            .args(cli_tls_args(&TestPki::shared().admin()))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs the CLI with --json, asserts success, returns the parsed output.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        assert!(
            out.status.success(),
            "pdisk {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "pdisk {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Pdiskd {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- pdiskd log ----\n{}", self.log_text());
        }
    }
}
