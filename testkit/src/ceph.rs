//! A throwaway single-node Ceph cluster of the test's own ([`CephCluster`]),
//! in the manner of go-ceph's `micro-osd.sh`: one monitor, one OSD on the
//! `memstore` object store (data in RAM, nothing on disk but logs and the
//! monitor's small store), one manager (for `ceph df` and the PG stats),
//! cephx on, bound to loopback, pool size 1, everything (conf, keyrings,
//! run dir, logs, mon store) under a temporary directory, with its own fsid
//! and monitor ports. The daemons run in the foreground as children of the
//! test and are killed, and the directory removed, on drop.
//!
//! Measured on the shared 2-core test host (Debian 12, ceph 16.2.15):
//! bring-up to an OSD up and a manager available takes 16-17 s (the
//! manager's Python start-up is most of it); the daemons' resident memory is
//! about 245 MiB (monitor 40, OSD 35, manager 155 with only the modules it
//! always runs) plus the data written, which memstore holds in RAM up to
//! [`MEMSTORE_BYTES`]; the directory holds under 1 MiB (mon store, logs).
//! So one cluster stays under 1.3 GiB even with its store full.
//!
//! [`CephCluster::start_in`] runs the daemons, and every tool the cluster
//! runs for the test, inside a test's network namespace, so daemons there
//! (pdiskd, agentd and its QEMUs) reach the monitor on that namespace's
//! loopback. [`CephCluster::start_in_at`] binds monitor, OSD and manager to
//! one of the namespace's own addresses instead (`mon host` and `public
//! addr`), so a machine outside it (the lab VM on a tap in the namespace,
//! whose kernel maps images with krbd) reaches the monitor and the OSD.
//!
//! `scripts/lib/ceph.sh` takes the same steps for `scripts/quickstart
//! --backend rbd` (daemons that outlive the script): change both together.
//!
//! At most [`MAX_CLUSTERS`] clusters run on the host at once: `start` takes
//! one of that many slot locks (flock, released when the cluster drops, or
//! by the kernel when the test process dies), so parallel test binaries
//! queue instead of piling up managers.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, require_root, wait_for, NetNs};

/// memstore's capacity: the OSD reports this as its size and refuses
/// writes past it.
pub const MEMSTORE_BYTES: u64 = 1 << 30;

/// Clusters allowed on the host at once (see the module doc).
pub const MAX_CLUSTERS: usize = 2;

/// Where Debian's ceph-mgr keeps its Python modules.
const MGR_MODULE_DIR: &str = "/usr/share/ceph/mgr";
/// The modules pacific's manager always runs, plus its helpers.
const MGR_MODULES: [&str; 12] = [
    "mgr_module.py",
    "mgr_util.py",
    "balancer",
    "crash",
    "devicehealth",
    "orchestrator",
    "pg_autoscaler",
    "progress",
    "rbd_support",
    "status",
    "telemetry",
    "volumes",
];

/// One micro-cluster; see the module doc.
pub struct CephCluster {
    pub dir: tempfile::TempDir,
    /// The cluster's ceph.conf (monitor address, admin keyring location).
    pub conf: PathBuf,
    /// The keyring of client.admin.
    pub admin_keyring: PathBuf,
    pub fsid: String,
    /// `[v2:ADDR:P,v1:ADDR:Q]` (ADDR: 127.0.0.1 unless [`CephCluster::start_in_at`]).
    pub mon_addrs: String,
    /// The monitor's msgr1 address `ADDR:Q`, as the kernel's rbd client
    /// (which speaks msgr1 by default) and pdiskd's exports name it.
    pub mon_v1: std::net::SocketAddr,
    daemons: Vec<(String, Child)>,
    /// The network namespace the daemons and tools run in; None: the host's.
    netns: Option<String>,
    _slot: std::fs::File,
    /// How long `start` took (for the tests' measurements).
    pub startup: Duration,
}

impl CephCluster {
    /// Starts the cluster and waits until the OSD is up and the manager is
    /// available. Panics (after tearing down what started) on failure, with
    /// the daemons' log tails.
    pub fn start() -> CephCluster {
        Self::start_on(None, Ipv4Addr::LOCALHOST)
    }

    /// Like [`CephCluster::start`], inside `ns` (see the module doc).
    pub fn start_in(ns: &NetNs) -> CephCluster {
        Self::start_on(Some(ns.name.clone()), Ipv4Addr::LOCALHOST)
    }

    /// Like [`CephCluster::start_in`], the daemons bound to `addr`, an
    /// address of one of `ns`'s interfaces (see the module doc).
    pub fn start_in_at(ns: &NetNs, addr: Ipv4Addr) -> CephCluster {
        Self::start_on(Some(ns.name.clone()), addr)
    }

    fn start_on(netns: Option<String>, addr: Ipv4Addr) -> CephCluster {
        require_root();
        let slot = take_slot();
        let begin = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("stratus-ceph-")
            .tempdir()
            .unwrap();
        let d = dir.path().to_path_buf();
        for sub in ["mon", "osd", "mgr", "run", "log", "mgr-modules"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        // The manager loads every Python module on its path: only the ones
        // it always runs (and rbd_support), which halves its memory and
        // start-up time.
        for m in MGR_MODULES {
            std::os::unix::fs::symlink(
                Path::new(MGR_MODULE_DIR).join(m),
                d.join("mgr-modules").join(m),
            )
            .unwrap();
        }
        let fsid = uuid_v4();
        let (v2, v1) = (free_port(), free_port());
        let mon_addrs = format!("[v2:{addr}:{v2},v1:{addr}:{v1}]");
        let conf = d.join("ceph.conf");
        std::fs::write(&conf, conf_text(&d, &fsid, &mon_addrs, addr)).unwrap();
        let admin_keyring = d.join("client.admin.keyring");
        let mut c = CephCluster {
            conf,
            admin_keyring,
            fsid,
            mon_addrs,
            mon_v1: (addr, v1).into(),
            daemons: Vec::new(),
            netns,
            _slot: slot,
            startup: Duration::ZERO,
            dir,
        };
        c.bootstrap();
        c.startup = begin.elapsed();
        c
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_string_lossy().into_owned()
    }

    fn bootstrap(&mut self) {
        let conf = self.conf.to_string_lossy().into_owned();
        let mon_keyring = self.path("mon.keyring");
        let admin = self.admin_keyring.to_string_lossy().into_owned();
        self.tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                &mon_keyring,
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        );
        self.tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                &admin,
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
        );
        self.tool("ceph-authtool", &[&mon_keyring, "--import-keyring", &admin]);
        let monmap = self.path("monmap");
        self.tool(
            "monmaptool",
            &[
                "--create",
                "--fsid",
                &self.fsid,
                "--addv",
                "a",
                &self.mon_addrs,
                &monmap,
            ],
        );
        self.tool(
            "ceph-mon",
            &[
                "-c",
                &conf,
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                &monmap,
                "--keyring",
                &mon_keyring,
            ],
        );
        self.daemon("ceph-mon", &["-c", &conf, "-f", "-i", "a"]);
        // Clones without snapshot protection (clone format 2) need clients
        // of mimic or newer; Debian 12's are pacific.
        self.ceph(&["osd", "set-require-min-compat-client", "mimic"]);
        self.ceph(&["osd", "create"]);
        let osd_keyring = self.path("osd/keyring");
        self.ceph(&[
            "auth",
            "get-or-create",
            "osd.0",
            "mon",
            "allow profile osd",
            "mgr",
            "allow profile osd",
            "osd",
            "allow *",
            "-o",
            &osd_keyring,
        ]);
        self.tool("ceph-osd", &["-c", &conf, "-i", "0", "--mkfs"]);
        self.daemon("ceph-osd", &["-c", &conf, "-f", "-i", "0"]);
        let mgr_keyring = self.path("mgr/keyring");
        self.ceph(&[
            "auth",
            "get-or-create",
            "mgr.x",
            "mon",
            "allow profile mgr",
            "osd",
            "allow *",
            "-o",
            &mgr_keyring,
        ]);
        self.daemon("ceph-mgr", &["-c", &conf, "-f", "-i", "x"]);
        let me = &*self;
        wait_for("the OSD to be up", Duration::from_secs(60), || {
            let s = me.ceph_json(&["osd", "stat"]);
            (s["num_up_osds"].as_u64() == Some(1)).then_some(())
        });
        wait_for(
            "the manager to be available",
            Duration::from_secs(60),
            || {
                let s = me.ceph_json(&["mgr", "stat"]);
                (s["available"].as_bool() == Some(true)).then_some(())
            },
        );
    }

    /// Runs a bootstrap tool; its failure tears the cluster down (drop)
    /// and panics with its stderr.
    fn tool(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        if !out.status.success() {
            panic!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tails()
            );
        }
    }

    fn daemon(&mut self, program: &str, args: &[&str]) {
        let out = std::fs::File::create(self.path(&format!("log/{program}.out"))).unwrap();
        let child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} (scripts/install-deps installs ceph): {e}")
            });
        self.daemons.push((program.to_string(), child));
    }

    /// A command that runs `program` where the cluster runs (its
    /// namespace, if it has one).
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs `program` where the cluster runs; its output, whatever it is.
    pub fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// `ceph -c CONF ARGS` as client.admin; panics on failure.
    pub fn ceph(&self, args: &[&str]) -> String {
        self.admin_cli("ceph", args)
    }

    /// `rbd -c CONF ARGS` as client.admin; panics on failure.
    pub fn rbd(&self, args: &[&str]) -> String {
        self.admin_cli("rbd", args)
    }

    /// `ceph ARGS --format json`, parsed.
    pub fn ceph_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.ceph(&a)).expect("ceph printed JSON")
    }

    fn admin_cli(&self, program: &str, args: &[&str]) -> String {
        let conf = self.conf.to_string_lossy().into_owned();
        let mut a = vec!["-c", conf.as_str()];
        a.extend_from_slice(args);
        let out = self.run(program, &a);
        if !out.status.success() {
            panic!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tails()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates a replicated RBD pool (one PG: one OSD).
    pub fn create_pool(&self, name: &str) {
        self.ceph(&["osd", "pool", "create", name, "8", "8"]);
        self.rbd(&["pool", "init", name]);
    }

    /// A cephx user `client.NAME` limited to RBD in `pool` (the caps the
    /// Ceph docs give an RBD client), its keyring written under the
    /// cluster's directory; returns the keyring's path.
    pub fn create_rbd_user(&self, name: &str, pool: &str) -> PathBuf {
        let keyring = self.dir.path().join(format!("client.{name}.keyring"));
        self.ceph(&[
            "auth",
            "get-or-create",
            &format!("client.{name}"),
            "mon",
            "profile rbd",
            "osd",
            &format!("profile rbd pool={pool}"),
            "mgr",
            &format!("profile rbd pool={pool}"),
            "-o",
            keyring.to_str().unwrap(),
        ]);
        keyring
    }

    /// The secret key of `client.NAME` (base64), e.g. for a QEMU secret.
    pub fn key_of(&self, name: &str) -> String {
        self.ceph(&["auth", "print-key", &format!("client.{name}")])
            .trim()
            .to_string()
    }

    /// A QEMU `rbd:` filename of `pool/image` as client.admin (for
    /// `qemu-io`/`qemu-img` in tests; the conf names the admin keyring).
    pub fn qemu_url(&self, pool: &str, image: &str) -> String {
        format!(
            "rbd:{pool}/{image}:id=admin:conf={}",
            self.conf.to_string_lossy()
        )
    }

    /// Resident memory of the cluster's daemons, in bytes (VmRSS).
    pub fn rss_bytes(&self) -> u64 {
        self.daemons
            .iter()
            .map(|(_, c)| {
                std::fs::read_to_string(format!("/proc/{}/status", c.id()))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("VmRSS:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    })
                    .unwrap_or(0)
                    * 1024
            })
            .sum()
    }

    /// Bytes under the cluster's directory (mon store, logs, keyrings).
    pub fn disk_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(self.dir.path())
    }

    /// The last lines of each daemon's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut s = String::new();
        for f in [
            "ceph-mon.out",
            "ceph-osd.out",
            "ceph-mgr.out",
            "mon.a.log",
            "osd.0.log",
        ] {
            if let Ok(text) = std::fs::read_to_string(self.dir.path().join("log").join(f)) {
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                if !tail.is_empty() {
                    s.push_str(&format!("\n--- {f} (last lines) ---\n"));
                    for l in tail.into_iter().rev() {
                        s.push_str(l);
                        s.push('\n');
                    }
                }
            }
        }
        s
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        // Manager and OSD first, the monitor last; memstore data dies with
        // the OSD. SIGKILL: a throwaway cluster needs no clean shutdown.
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn conf_text(d: &Path, fsid: &str, mon_addrs: &str, addr: Ipv4Addr) -> String {
    let d = d.display();
    format!(
        "[global]
fsid = {fsid}
mon host = {mon_addrs}
public addr = {addr}
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {d}/$name.keyring
run dir = {d}/run
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
crash dir = {d}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon osd down out interval = 0
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}
osd data = {d}/osd
mgr data = {d}/mgr
mgr module path = {d}/mgr-modules
mgr initial modules = status
mon data = {d}/mon
[mon.a]
keyring = {d}/mon/keyring
admin socket = {d}/run/mon.a.asok
[osd.0]
keyring = {d}/osd/keyring
admin socket = {d}/run/osd.0.asok
[mgr.x]
keyring = {d}/mgr/keyring
admin socket = {d}/run/mgr.x.asok
"
    )
}

/// A random UUID (v4) from the kernel, as text.
fn uuid_v4() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

/// Takes one of the host's [`MAX_CLUSTERS`] slot locks, waiting for one to
/// be free.
fn take_slot() -> std::fs::File {
    let start = Instant::now();
    loop {
        for i in 0..MAX_CLUSTERS {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(format!("/run/stratus-test-ceph-slot-{i}.lock"))
                .unwrap();
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return f;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "no Ceph test slot came free in 30 minutes"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
