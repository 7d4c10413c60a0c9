//! An agentd in a test namespace ([`Agentd`]) and reading its journal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{
    bin, can_connect_in, channel, cli_tls_args, daemon_tls_args, wait_for, NetNs, TestPki,
    INITIATOR,
};

/// A running agentd inside a test namespace.
pub struct Agentd {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    netns: String,
    /// The daemon binary: `agentd`, or `agentd-failpoints` for fault tests.
    program: String,
}

impl Agentd {
    /// Starts agentd in `ns` with its state under `dir`, talking to pdiskd at
    /// `pdisk_url`, with `bridge` as the default bridge.
    pub fn start_in(dir: &Path, ns: &NetNs, pdisk_url: &str, bridge: &str) -> Agentd {
        Self::start_in_with(dir, ns, pdisk_url, bridge, &[])
    }

    /// Like [`Agentd::start_in`], with extra agentd flags.
    pub fn start_in_with(
        dir: &Path,
        ns: &NetNs,
        pdisk_url: &str,
        bridge: &str,
        extra: &[&str],
    ) -> Agentd {
        Self::start_in_with_env(dir, ns, pdisk_url, bridge, extra, &[])
    }

    /// Like [`Agentd::start_in_with`], with extra environment variables.
    pub fn start_in_with_env(
        dir: &Path,
        ns: &NetNs,
        pdisk_url: &str,
        bridge: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agentd {
        let state_dir = dir.join("agent");
        let listen: SocketAddr = "127.0.0.1:7401".parse().unwrap();
        // Tests boot the test guest's kernel from its directory, give file
        // disks from `DIR/host-files`, and serve images from loopback or
        // their namespace's own addresses.
        let files = dir.join("host-files");
        std::fs::create_dir_all(&files).unwrap();
        let mut host_files = vec![
            "--image-allow-private".to_string(),
            "--host-file-root".into(),
            files.display().to_string(),
        ];
        let guests = crate::guest::guest_dir_if_built();
        if crate::guest::is_built(&guests) {
            host_files.push("--host-file-root".into());
            host_files.push(guests.display().to_string());
        }
        let args: Vec<String> = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--pdisk".into(),
            pdisk_url.into(),
            "--bridge".into(),
            bridge.into(),
            "--accel".into(),
            "tcg".into(),
            "--initiator-iqn".into(),
            INITIATOR.into(),
            "--cpu-overcommit".into(),
            "32".into(),
            "--log-level".into(),
            "agent=debug,pdisk=debug,info".into(),
            "--local-socket".into(),
            dir.join("agentd.sock").display().to_string(),
        ]
        .into_iter()
        // A test that rotates agentd's certificate gives it files of its own.
        .chain(
            Some(daemon_tls_args(&TestPki::shared().agent()))
                .filter(|_| !extra.contains(&"--tls-cert"))
                .into_iter()
                .flatten(),
        )
        .chain(host_files)
        .chain(
            test_cgroup_parent()
                .filter(|_| !extra.contains(&"--cgroup-parent"))
                .map(|p| ["--cgroup-parent".to_string(), p.display().to_string()])
                .into_iter()
                .flatten(),
        )
        // agentd and pdiskd of a test share /etc/machine-id, so agentd
        // would open pdisk volumes directly (issue 16): the suites test
        // iSCSI unless one asks for the same-host path (--host-id).
        .chain(Some("--local-attach=false".to_string()).filter(|_| {
            !extra
                .iter()
                .any(|a| a.starts_with("--host-id") || a.starts_with("--local-attach"))
        }))
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        let mut a = Agentd {
            listen,
            state_dir,
            log: dir.join("agentd.log"),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            netns: ns.name.clone(),
            program: "agentd".into(),
        };
        a.spawn();
        a
    }

    /// Like [`Agentd::start_in_with`], as another host of the cluster:
    /// listening on every address of `ns` (clients dial `listen`), with
    /// initiator `iqn` and the certificate `tls` (which binds that IQN and
    /// names the addresses it is dialed at).
    pub fn start_in_as(
        dir: &Path,
        ns: &NetNs,
        pdisk_url: &str,
        bridge: &str,
        iqn: &str,
        tls: &stratus_pki::TlsFiles,
        extra: &[&str],
    ) -> Agentd {
        let tls_args = daemon_tls_args(tls);
        let mut all: Vec<&str> = tls_args.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        let mut a = Self::start_in_with(dir, ns, pdisk_url, bridge, &all);
        a.kill9();
        let mut next = None;
        for arg in a.args.iter_mut() {
            match next.take() {
                Some("--listen") => *arg = format!("0.0.0.0:{}", a.listen.port()),
                Some("--initiator-iqn") => *arg = iqn.to_string(),
                _ => {}
            }
            if arg == "--listen" {
                next = Some("--listen");
            } else if arg == "--initiator-iqn" {
                next = Some("--initiator-iqn");
            }
        }
        a.spawn();
        a
    }

    /// Like [`Agentd::start_in`], running `agentd-failpoints` (agentd with
    /// crash points; build it with `cargo build -p agent --features
    /// failpoints --bin agentd-failpoints`) with no failpoint set.
    pub fn start_failpoints_in(dir: &Path, ns: &NetNs, pdisk_url: &str, bridge: &str) -> Agentd {
        Self::start_failpoints_in_with(dir, ns, pdisk_url, bridge, &[])
    }

    /// Like [`Agentd::start_failpoints_in`], with extra agentd flags.
    pub fn start_failpoints_in_with(
        dir: &Path,
        ns: &NetNs,
        pdisk_url: &str,
        bridge: &str,
        extra: &[&str],
    ) -> Agentd {
        let mut a = Self::start_in_with(dir, ns, pdisk_url, bridge, extra);
        a.kill9();
        a.program = "agentd-failpoints".into();
        a.spawn();
        a
    }

    /// The same agentd (flags, state, certificate) restarted as
    /// `agentd-failpoints`, e.g. after [`Agentd::start_in_as`].
    pub fn into_failpoints(mut self) -> Agentd {
        self.kill9();
        self.program = "agentd-failpoints".into();
        self.spawn();
        self
    }

    /// Restarts with FAILPOINTS set to `spec` (`None`: unset), e.g.
    /// `Some("start.exported=return")`.
    pub fn restart_with_failpoints(&mut self, spec: Option<&str>) {
        self.env.retain(|(k, _)| k != "FAILPOINTS");
        if let Some(s) = spec {
            self.env.push(("FAILPOINTS".into(), s.into()));
        }
        self.restart();
    }

    /// Waits up to `limit` for agentd to exit on its own (a crash point
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

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin(&self.program))
            .args(&self.args)
            .env_remove("FAILPOINTS")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let ns = self.netns.clone();
        let addr = self.listen;
        let log = self.log.clone();
        let child = self.child.as_mut().unwrap();
        wait_for("agentd to listen", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "agentd exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            can_connect_in(&ns, addr).then_some(())
        });
    }

    /// agentd's process id (`ip netns exec` execs it), for signals such as
    /// SIGHUP.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agentd runs").id()
    }

    /// agentd's mTLS address.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// SIGKILL, as in a crash. Guests keep running.
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

    /// Restarts agentd with the value-less `flag` (e.g.
    /// `--allow-unsandboxed`) given or not.
    pub fn restart_with_flag(&mut self, flag: &str, on: bool) {
        self.args.retain(|a| a != flag);
        if on {
            self.args.push(flag.to_string());
        }
        self.restart();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pids of the guests' QEMUs, from their pid files.
    pub fn guest_pids(&self) -> Vec<u32> {
        let Ok(dirs) = std::fs::read_dir(self.state_dir.join("vms")) else {
            return Vec::new();
        };
        dirs.flatten()
            .filter_map(|d| std::fs::read_to_string(d.path().join("qemu.pid")).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }

    /// Runs agentctl against this agent, inside the namespace.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin("agentctl"))
            .arg("--agent")
            .arg(self.url())
            .args(cli_tls_args(&TestPki::shared().admin()))
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Agentd {
    fn drop(&mut self) {
        self.kill9();
        // Guests are daemonized and outlive agentd by design: end them here.
        for pid in self.guest_pids() {
            // SAFETY: signals a pid read from a guest's pid file of this test.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        if std::thread::panicking() {
            eprintln!("---- agentd log ----\n{}", self.log_text());
        }
    }
}

/// Every event agentd at `url` has journaled after `since` (replay only, no
/// follow), in order.
pub async fn agent_events(url: String, since: u64) -> Vec<stratus_proto::agent::v1::Event> {
    use stratus_proto::agent::v1 as pb;
    let mut c = pb::vm_service_client::VmServiceClient::new(channel(&url).await);
    let mut s = c
        .watch_events(pb::WatchEventsRequest {
            project: String::new(),
            since_seq: since,
            vm: String::new(),
            no_follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        out.push(e);
    }
    out
}

/// Where test agentds put their guests' cgroups: `stratus-test.slice` on a
/// cgroup v2 mount of the host's hierarchy at `/run/stratus-test-cgroup2`
/// (made once; `ip netns exec` gives agentd a fresh /sys, without the
/// host's `/sys/fs/cgroup`). None when the host has no cgroup v2.
pub fn test_cgroup_parent() -> Option<PathBuf> {
    static PARENT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PARENT
        .get_or_init(|| {
            let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
            let has_cgroup2 = |at: &str| {
                mounts.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 2 && (at.is_empty() || f[1] == at) && f[2] == "cgroup2"
                })
            };
            if !has_cgroup2("") {
                return None;
            }
            let at = "/run/stratus-test-cgroup2";
            if !has_cgroup2(at) {
                std::fs::create_dir_all(at).ok()?;
                let ok = std::process::Command::new("mount")
                    .args(["-t", "cgroup2", "cgroup2", at])
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    return None;
                }
            }
            Some(PathBuf::from(at).join("stratus-test.slice"))
        })
        .clone()
}
