//! Integration- and e2e-test harness, all real parts: tgtd, an XFS reflink
//! filesystem on a loop device, pdiskd, agentd (in its own network namespace,
//! [`Agentd`], with its state directory and the guests it launches cleaned up
//! on drop), network namespaces of the test's own with their bridges ([`NetNs`]), a
//! small HTTP server for image pulls ([`Httpd`]), QEMU's iSCSI initiator
//! ([`Initiator`]), the test guest (`scripts/guest-image`, [`guest_dir`]),
//! and the storage stack a pdisk test runs on (`stack.rs`: file+tgt on the
//! host, LVM thin + LIO + the kernel initiator of `open_iscsi.rs` in the lab
//! VM). It is test code: one file per concern would be the next step for
//! this ~1,000-line `lib.rs`.
//!
//! Every piece has a drop guard that tears it down even when the test fails,
//! and takes its own ports and directories, so tests run in parallel.
//! These tests need root; they are `#[ignore]`d and run by `scripts/test`.
//! Binaries are taken from the workspace's target directory (`bin`), so run
//! `cargo build --workspace` first; `scripts/test` does.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;

mod open_iscsi;
mod pki;
mod stack;

pub use pki::{channel, channel_as, cli_tls_args, daemon_tls_args, TestPki, AGENT_NAME};

pub const INITIATOR: &str = "iqn.2026-11.io.stratus.test:host-a";
pub const OTHER_INITIATOR: &str = "iqn.2026-11.io.stratus.test:host-b";

pub type Client = VolumeServiceClient<Channel>;

/// Path of a workspace binary of the profile the tests were built with.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests and benches run as target/<profile>/deps/<test>-<hash>; binaries
    // such as stratus-bench as target/<profile>/<bin>.
    let dir = exe.parent().expect("executable lives in target/<profile>");
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("test executable lives in target/<profile>/deps")
    } else {
        dir
    };
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests need root (loop devices, mount, tgtd): run scripts/test"
    );
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns Some, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// A network namespace of the test's own, with loopback up. Processes
/// started through [`NetNs::command`] live in it; [`NetNs::block_on`] runs
/// async client code whose sockets are created inside it. Deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    // Not Default: creating one changes the host (a new namespace).
    #[allow(clippy::new_without_default)]
    pub fn new() -> NetNs {
        require_root();
        let name = format!(
            "stratus-t{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run_ok("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS...`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    /// A bridge inside the namespace, up.
    pub fn add_bridge(&self, name: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["link", "set", name, "up"]);
    }

    pub fn link_exists(&self, name: &str) -> bool {
        run("ip", &["-n", &self.name, "link", "show", name])
            .status
            .success()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Moves the calling thread into the namespace.
    pub fn enter_this_thread(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on an open namespace fd only changes this thread's
        // network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// Runs `f` on a fresh thread inside the namespace, on a current-thread
    /// runtime, so every socket it opens belongs to the namespace.
    pub fn block_on<F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future,
        Fut::Output: Send + 'static,
    {
        let name = self.name.clone();
        std::thread::spawn(move || {
            NetNs { name }.enter_without_drop();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn enter_without_drop(self) {
        self.enter_this_thread();
        std::mem::forget(self);
    }

    /// True when a TCP connect to `addr` succeeds from inside the namespace.
    pub fn can_connect(&self, addr: SocketAddr) -> bool {
        can_connect_in(&self.name, addr)
    }
}

/// True when a TCP connect to `addr` succeeds from inside namespace `name`.
pub fn can_connect_in(name: &str, addr: SocketAddr) -> bool {
    let name = name.to_string();
    std::thread::spawn(move || {
        NetNs { name }.enter_without_drop();
        std::net::TcpStream::connect(addr).is_ok()
    })
    .join()
    .unwrap()
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// An XFS filesystem with reflink on a loop device, mounted in a temp dir.
pub struct XfsPool {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    loopdev: String,
}

impl XfsPool {
    pub fn new(size_mib: u64) -> XfsPool {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("stratus-it-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        let loopdev = run_ok("losetup", &["-f", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let pool = XfsPool { dir, mnt, loopdev };
        run_ok("mkfs.xfs", &["-q", "-m", "reflink=1", &pool.loopdev]);
        run_ok("mount", &[&pool.loopdev, pool.mnt.to_str().unwrap()]);
        pool
    }
}

impl Drop for XfsPool {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.mnt.to_str().unwrap()]);
        let _ = run("losetup", &["-d", &self.loopdev]);
    }
}

static NEXT_CONTROL: AtomicU32 = AtomicU32::new(0);

/// A tgtd of the test's own, on its own control port and portal.
pub struct Tgtd {
    pub control_port: u32,
    pub portal_port: u16,
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
                &format!("portal=127.0.0.1:{}", self.portal_port),
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
        format!("127.0.0.1:{}", self.portal_port)
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

    /// Starts pdiskd inside `netns`.
    pub fn start_in(pool: &XfsPool, tgtd: &Tgtd, netns: Option<&NetNs>) -> Pdiskd {
        Self::start_full(pool, tgtd, netns, &[])
    }

    fn start_full(
        pool: &XfsPool,
        tgtd: &Tgtd,
        netns: Option<&NetNs>,
        extra_args: &[&str],
    ) -> Pdiskd {
        let pool_dir = pool.mnt.join("pool");
        let mut args: Vec<String> = vec![
            "--pool-dir".into(),
            pool_dir.display().to_string(),
            "--portal".into(),
            tgtd.portal(),
            "--tgt-control-port".into(),
            tgtd.control_port.to_string(),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        Self::start_on(pool.dir.path(), &pool.mnt, pool_dir, netns, args)
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
            "--log-level".into(),
            "pdisk=debug,info".into(),
        ];
        args.extend(daemon_tls_args(&tls));
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
        let mut d = Self::start(pool, tgtd);
        d.kill9();
        d.program = "pdiskd-failpoints".into();
        d.spawn();
        d
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

/// QEMU's iSCSI initiator (libiscsi inside qemu-io), logging in as `initiator`.
pub struct Initiator {
    pub portal: String,
    pub target: String,
    pub name: String,
    /// (user, file holding the secret)
    pub chap: Option<(String, PathBuf)>,
}

impl Initiator {
    pub fn new(portal: &str, target: &str, name: &str) -> Initiator {
        Initiator {
            portal: portal.into(),
            target: target.into(),
            name: name.into(),
            chap: None,
        }
    }

    fn image_opts(&self) -> String {
        let mut o = format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun=1,initiator-name={}",
            self.portal, self.target, self.name
        );
        if let Some((user, _)) = &self.chap {
            o.push_str(&format!(",user={user},password-secret=sec0"));
        }
        o
    }

    /// Runs qemu-io commands; Ok(stdout) when every command succeeded.
    /// On the lvm-lio stack (the lab VM) the kernel's initiator logs in and
    /// qemu-io works on the block device; elsewhere qemu-io logs in itself.
    pub fn io(&self, cmds: &[&str]) -> Result<String, String> {
        if stack_kind() == StackKind::LvmLio {
            return self.kernel_io(cmds);
        }
        let mut c = Command::new("qemu-io");
        if let Some((_, file)) = &self.chap {
            c.arg("--object")
                .arg(format!("secret,id=sec0,file={}", file.display()));
        }
        c.arg("--image-opts");
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        c.arg(self.image_opts());
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let failed = !out.status.success()
            || stdout.contains("Pattern verification failed")
            || stdout.contains("failed:")
            || stderr.contains("can't open");
        if failed {
            Err(format!("{stdout}{stderr}"))
        } else {
            Ok(stdout)
        }
    }

    /// Logs in with open-iscsi (an iface per initiator name, so ACLs see
    /// this name), runs qemu-io with O_DIRECT on the LUN's block device, and
    /// logs out again whatever happened, leaving no session, node record or
    /// pending udev removal for the next call (see [`open_iscsi`]).
    fn kernel_io(&self, cmds: &[&str]) -> Result<String, String> {
        let node = open_iscsi::KernelNode {
            iface: format!("st{:x}", fnv(&self.name)),
            initiator: &self.name,
            target: &self.target,
            portal: &self.portal,
        };
        // A session of ours here would be a leftover: the login below must
        // be the only way one exists, so that its 15 can be trusted.
        if node.has_session()? {
            node.log_out_and_forget()?;
        }
        let secret;
        let mut settings = vec![
            ("node.session.initial_login_retry_max", "1"),
            ("node.conn[0].timeo.login_timeout", "5"),
        ];
        if let Some((user, file)) = &self.chap {
            secret = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
            settings.push(("node.session.auth.authmethod", "CHAP"));
            settings.push(("node.session.auth.username", user));
            settings.push(("node.session.auth.password", secret.trim()));
        }
        let result = node.create(&settings).and_then(|()| {
            node.login()?;
            let dev = node.wait_device(1)?;
            let mut c = Command::new("qemu-io");
            c.args(["-n", "-f", "raw"]);
            for cmd in cmds {
                c.arg("-c").arg(cmd);
            }
            let out = c.arg(&dev).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success()
                || stdout.contains("Pattern verification failed")
                || stdout.contains("failed:")
                || stderr.contains("can't open")
            {
                Err(format!("{stdout}{stderr}"))
            } else {
                Ok(stdout)
            }
        });
        match (result, node.log_out_and_forget()) {
            (r, Ok(())) => r,
            (Ok(_), Err(e)) => Err(format!("cleanup after the I/O: {e}")),
            (Err(r), Err(e)) => Err(format!("{r}\n(and the cleanup: {e})")),
        }
    }

    /// The LUN's size in bytes as the initiator sees it.
    pub fn length(&self) -> Result<u64, String> {
        let out = self.io(&["length"])?;
        // qemu-io prints e.g. "128 MiB" or "1 GiB"
        let t = out.trim();
        let (n, unit) = t
            .split_once(' ')
            .ok_or(format!("odd length output {t:?}"))?;
        let n: f64 = n.parse().map_err(|_| format!("odd length output {t:?}"))?;
        let mult = match unit {
            "bytes" => 1u64,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return Err(format!("odd length output {t:?}")),
        };
        Ok((n * mult as f64) as u64)
    }
}

pub use stack::{stack_kind, Exports, Lio, Pool, Stack, StackKind, ThinPool};

/// A running agentd inside a test namespace.
pub struct Agentd {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    netns: String,
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
        if guest_dir().is_dir() {
            host_files.push("--host-file-root".into());
            host_files.push(guest_dir().display().to_string());
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
        .chain(daemon_tls_args(&TestPki::shared().agent()))
        .chain(host_files)
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
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(bin("agentd"))
            .args(&self.args)
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

/// Where `scripts/guest-image` put the test guest (STRATUS_GUEST_DIR or
/// `var/guest` in the workspace).
pub fn guest_dir() -> PathBuf {
    let dir = match std::env::var_os("STRATUS_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../var/guest"),
    };
    let dir = dir.canonicalize().unwrap_or(dir);
    assert!(
        dir.join("stratus-guest.raw").exists(),
        "no test guest in {}: run scripts/guest-image",
        dir.display()
    );
    dir
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

/// The SHA-256 of a file, as lowercase hex (with sha256sum).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

pub fn sha256_of(path: &Path) -> String {
    run_ok("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

impl NetNs {
    /// The network namespace this test process runs in, under a name of its
    /// own (`ip netns attach`), so helpers that take a [`NetNs`] (such as
    /// [`Agentd::start_in_with`]) run there. For daemons that a private
    /// namespace cuts off: agentd with `--attach kernel` must reach iscsid,
    /// whose control socket is an abstract Unix socket (one per network
    /// namespace), and a pdiskd listening on this namespace's 127.0.0.1.
    /// Drop removes only the name; the namespace is this process's own.
    pub fn host() -> NetNs {
        require_root();
        let name = format!(
            "stratus-h{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(
            "ip",
            &["netns", "attach", &name, &std::process::id().to_string()],
        );
        NetNs { name }
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
