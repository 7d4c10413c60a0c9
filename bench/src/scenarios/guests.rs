//! What the guest scenarios (launch, bulk, events) share: one host of their
//! own inside a network namespace the bench creates — an XFS reflink pool,
//! tgtd, pdiskd and agentd (as `testkit` starts them for the e2e tests, TCG
//! guests), and busybox httpd serving the test guest's qcow2 — plus a tokio
//! runtime whose threads all live in that namespace, for the gRPC clients.
//!
//! Everything is torn down when the [`GuestHost`] drops, on failure too:
//! agentd and its guests first, the namespace last. Ports are the
//! namespace's own (agentd 127.0.0.1:7401, httpd 127.0.0.1:8080 inside it),
//! so nothing collides with the host or with tests running beside.

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::{Agentd, CephCluster, Httpd, NetNs, Pdiskd, Tgtd, XfsPool};
use tonic::transport::Channel;

pub(crate) type Agent = VmServiceClient<Channel>;

/// A client of agentd at `url` as the test admin (mTLS for https://).
pub(crate) async fn connect(url: &str) -> anyhow::Result<Agent> {
    let files = testkit::TestPki::shared().admin();
    let dialer = stratus_pki::Dialer::from_address(url, Some(&files))?;
    Ok(VmServiceClient::new(dialer.connect().await?))
}

const BRIDGE: &str = "stbench0";
/// The line the test guest prints once it has booted (scripts/guest-image).
pub(crate) const READY: &str = "STRATUS-GUEST ready";
const PANIC: &str = "Kernel panic - not syncing";

/// The test guest's qcow2 as served over HTTP, with its checksum.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub url: String,
    pub sha256: String,
}

/// The Ceph pool of [`GuestHost::start_rbd`].
const RBD_POOL: &str = "vms";

/// One host for guest scenarios. Fields drop in order: httpd, agentd (which
/// kills its guests), pdiskd, tgtd or the Ceph cluster, the pool, the
/// namespace.
pub(crate) struct GuestHost {
    _httpd: Httpd,
    pub agentd: Agentd,
    _pdiskd: Pdiskd,
    _tgtd: Option<Tgtd>,
    _ceph: Option<CephCluster>,
    _pool: XfsPool,
    pub ns: NetNs,
    pub image: Image,
}

impl GuestHost {
    /// Starts everything (blocking; panics, with the daemons' logs, when a
    /// daemon does not come up, as testkit does).
    pub fn start() -> GuestHost {
        Self::start_with(&[])
    }

    /// [`GuestHost::start`] with extra agentd flags.
    pub fn start_with(agentd_flags: &[&str]) -> GuestHost {
        let ns = NetNs::new();
        ns.add_bridge(BRIDGE);
        let pool = XfsPool::new(4096);
        let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
        let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
        let agentd =
            Agentd::start_in_with(pool.dir.path(), &ns, &pdiskd.url(), BRIDGE, agentd_flags);
        let (httpd, image) = serve_guest(&pool, &ns);
        GuestHost {
            _httpd: httpd,
            agentd,
            _pdiskd: pdiskd,
            _tgtd: Some(tgtd),
            _ceph: None,
            _pool: pool,
            ns,
            image,
        }
    }

    /// [`GuestHost::start`] on Ceph RBD, as `agent/tests/rbd.rs` starts it:
    /// a micro-cluster in the namespace (testkit's CephCluster, memstore),
    /// pdiskd `--backend rbd` as `client.pdisk`, and agentd attaching RBD
    /// disks with QEMU's rbd driver as `client.compute` (both users limited
    /// to the pool). A guest's disk is an RBD clone of the image base's
    /// `pd-base` snapshot. No tgtd.
    pub fn start_rbd() -> GuestHost {
        let ns = NetNs::new();
        ns.add_bridge(BRIDGE);
        let pool = XfsPool::new(4096);
        let ceph = CephCluster::start_in(&ns);
        eprintln!(
            "  ceph micro-cluster up in {:.1} s",
            ceph.startup.as_secs_f64()
        );
        ceph.create_pool(RBD_POOL);
        let pdisk_keyring = ceph.create_rbd_user("pdisk", RBD_POOL);
        let compute_keyring = ceph.create_rbd_user("compute", RBD_POOL);
        let state = pool.dir.path().join("pdisk-rbd");
        std::fs::create_dir_all(&state).expect("creating pdiskd's directory");
        let args: Vec<String> = [
            "--backend",
            "rbd",
            "--rbd-pool",
            RBD_POOL,
            "--ceph-conf",
            ceph.conf.to_str().unwrap(),
            "--ceph-id",
            "pdisk",
            "--ceph-keyring",
            pdisk_keyring.to_str().unwrap(),
            "--rbd-client-id",
            "compute",
            // memstore's 1 GiB holds what guests write, not their sizes.
            "--max-overcommit",
            "1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pdiskd = Pdiskd::start_on(
            &state,
            &state,
            state.join("unused-pool-dir"),
            Some(&ns),
            args,
        );
        let agentd = Agentd::start_in_with(
            pool.dir.path(),
            &ns,
            &pdiskd.url(),
            BRIDGE,
            &[
                "--ceph-id",
                "compute",
                "--ceph-keyring",
                compute_keyring.to_str().unwrap(),
            ],
        );
        let (httpd, image) = serve_guest(&pool, &ns);
        GuestHost {
            _httpd: httpd,
            agentd,
            _pdiskd: pdiskd,
            _tgtd: None,
            _ceph: Some(ceph),
            _pool: pool,
            ns,
            image,
        }
    }

    /// Runs `f` to completion on a fresh two-worker runtime whose threads
    /// (workers and blocking pool alike) are in the host's namespace, so
    /// every socket it opens reaches agentd. Blocks the calling thread.
    pub fn run<F, Fut, T>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(String) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.ns.name);
        let ns = Arc::new(std::fs::File::open(&path).with_context(|| format!("opening {path}"))?);
        let url = self.agentd.url();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&ns)?;
                let for_workers = ns.clone();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .on_thread_start(move || {
                        enter(&for_workers).expect("entering the bench's network namespace")
                    })
                    .build()?;
                let out = rt.block_on(f(url));
                rt.shutdown_timeout(Duration::from_secs(5));
                out
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// The end of agentd's log, to go with an error (the log goes with the host).
    pub fn agentd_log_tail(&self) -> String {
        format!(
            "last lines of agentd's log:\n{}",
            log_tail(&self.agentd.log, 30)
        )
    }

    /// agentd's pid, found by its executable and its state directory.
    pub fn agentd_pid(&self) -> anyhow::Result<u32> {
        let exe = testkit::bin("agentd");
        let state = self.agentd.state_dir.display().to_string();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let same_exe = std::fs::read_link(entry.path().join("exe")).is_ok_and(|p| p == exe);
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if same_exe && String::from_utf8_lossy(&cmdline).contains(&state) {
                return Ok(pid);
            }
        }
        anyhow::bail!("agentd ({}) for {state} is not running", exe.display())
    }
}

/// busybox httpd in `ns` serving the test guest's qcow2 from the pool.
fn serve_guest(pool: &XfsPool, ns: &NetNs) -> (Httpd, Image) {
    let www = pool.dir.path().join("www");
    std::fs::create_dir_all(&www).expect("creating the web root");
    let img = www.join("guest.qcow2");
    std::fs::copy(testkit::guest_dir().join("stratus-guest.qcow2"), &img)
        .expect("copying the test guest (scripts/guest-image)");
    let sha256 = testkit::sha256_of(&img);
    let httpd = Httpd::start_in(ns, &www);
    let url = httpd.url("guest.qcow2");
    (httpd, Image { url, sha256 })
}

/// Moves the calling thread into the namespace open as `ns`.
fn enter(ns: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: setns on an open namespace fd only changes the calling
    // thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A tiny guest (1 vCPU, 128 MiB, as the e2e tests run them) booting from
/// a pdisk clone of `image`, without NICs.
pub(crate) fn image_spec(name: &str, image: &Image) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        disks: vec![pb::DiskSpec {
            qos: None,
            server: String::new(),
            source: Some(pb::disk_spec::Source::Image(pb::ImageRef {
                url: image.url.clone(),
                sha256: image.sha256.clone(),
                format: 0,
                endorser: String::new(),
                endorsement: String::new(),
            })),
            read_only: false,
            boot_index: 1,
            size_bytes: 0,
            persistence: pb::DiskPersistence::Clone as i32,
        }],
        ..Default::default()
    }
}

/// A tiny guest booted directly from the test guest's kernel and initramfs:
/// no disks, no NICs, nothing but QEMU.
pub(crate) fn kernel_spec(name: &str) -> pb::VmSpec {
    let g = testkit::guest_dir();
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(pb::KernelBoot {
            kernel: g.join("vmlinuz").display().to_string(),
            initrd: g.join("initrd.img").display().to_string(),
            cmdline: "console=ttyS0".into(),
        }),
        ..Default::default()
    }
}

/// When a guest launched at `t0` reported what.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Launched {
    /// StartVm answered RUNNING (QEMU runs the guest, per QMP query-status).
    pub running: Duration,
    /// The guest printed its `ready` line; `None` when it did not in time.
    pub ready: Option<Duration>,
    /// The guest's kernel panicked before it was ready.
    pub panicked: bool,
}

/// CreateVm + StartVm of `spec`, then waits (until `deadline`) for the
/// guest's `ready` line. Times are from `t0` (just before CreateVm, or the
/// common start of a bulk launch).
pub(crate) async fn launch(
    c: &mut Agent,
    spec: pb::VmSpec,
    t0: Instant,
    deadline: Instant,
) -> anyhow::Result<Launched> {
    let name = spec.name.clone();
    c.create_vm(pb::CreateVmRequest {
        request_id: String::new(),
        project: String::new(),
        spec: Some(spec),
    })
    .await
    .with_context(|| format!("CreateVm {name}"))?;
    let vm = c
        .start_vm(pb::VmRequest {
            request_id: String::new(),
            project: String::new(),
            vm: name.clone(),
        })
        .await
        .with_context(|| format!("StartVm {name}"))?
        .into_inner();
    let running = t0.elapsed();
    anyhow::ensure!(
        vm.state() == pb::VmState::Running,
        "{name}: StartVm answered {:?}",
        vm.state()
    );
    let boot = wait_ready(Path::new(&vm.console_log), deadline).await;
    Ok(Launched {
        running,
        ready: (boot == Boot::Ready).then(|| t0.elapsed()),
        panicked: boot == Boot::Panicked,
    })
}

/// How a guest's boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Boot {
    Ready,
    /// Under TCG on a busy host the kernel's timer check can fail ("IO-APIC
    /// + timer doesn't work!"), and the guest never comes up.
    Panicked,
    TimedOut,
}

/// Polls a console log every 25 ms until the `ready` line, a kernel panic,
/// or `deadline`.
pub(crate) async fn wait_ready(console: &Path, deadline: Instant) -> Boot {
    let has = |b: &[u8], s: &str| b.windows(s.len()).any(|w| w == s.as_bytes());
    loop {
        let log = std::fs::read(console).unwrap_or_default();
        if has(&log, READY) {
            return Boot::Ready;
        }
        if has(&log, PANIC) {
            return Boot::Panicked;
        }
        if Instant::now() >= deadline {
            return Boot::TimedOut;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Destroys a guest (ACPI powerdown, forced after `timeout_s`).
pub(crate) async fn destroy(c: &mut Agent, name: &str, timeout_s: u32) -> anyhow::Result<()> {
    c.destroy_vm(pb::DestroyVmRequest {
        request_id: String::new(),
        project: String::new(),
        vm: name.into(),
        timeout_seconds: timeout_s,
    })
    .await
    .with_context(|| format!("DestroyVm {name}"))?;
    Ok(())
}

/// A process's CPU time and resident memory, from /proc.
#[derive(Debug, Clone)]
pub(crate) struct ProcUsage {
    /// utime + stime from /proc/PID/stat: the whole process (threads that
    /// ended included), in clock ticks (10 ms) converted to seconds.
    pub stat_cpu_s: f64,
    /// One clock tick, in seconds.
    pub tick_s: f64,
    /// Run time of each live thread, ns, from /proc/PID/task/TID/schedstat.
    pub thread_ns: HashMap<u32, u64>,
    pub rss_bytes: u64,
}

impl ProcUsage {
    /// CPU seconds used since `earlier`: the threads' run times (ns), unless
    /// the whole-process count (ticks, so a difference of two readings is
    /// off by up to a tick either way) is more than two ticks larger, which
    /// means threads that ended in between took their time with them.
    pub fn cpu_since(&self, earlier: &ProcUsage) -> f64 {
        let stat = self.stat_cpu_s - earlier.stat_cpu_s;
        let threads = self
            .thread_ns
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(earlier.thread_ns.get(tid).copied().unwrap_or(0)))
            .sum::<u64>() as f64
            / 1e9;
        if stat - threads > 2.0 * self.tick_s {
            stat
        } else {
            threads
        }
    }
}

pub(crate) fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    // Fields after the command name (which may hold spaces), from field 3:
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i - 3)
            .context("short /proc/PID/stat")?
            .parse::<u64>()? as f64)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat_cpu_s = (ticks(14)? + ticks(15)?) / hz;
    let mut thread_ns = HashMap::new();
    for t in std::fs::read_dir(dir.join("task"))?.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // "run-ns wait-ns timeslices"; a thread may end meanwhile.
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            thread_ns.insert(tid, ns);
        }
    }
    let status = std::fs::read_to_string(dir.join("status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS in /proc/PID/status")?
        .parse::<u64>()?;
    Ok(ProcUsage {
        stat_cpu_s,
        tick_s: 1.0 / hz,
        thread_ns,
        rss_bytes: rss_kib * 1024,
    })
}

/// The last lines of a daemon's log, for an error message (the log lives in
/// a temp dir that goes with the host).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_usage_is_read() {
        let a = proc_usage(std::process::id()).unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = proc_usage(std::process::id()).unwrap();
        assert!(b.rss_bytes > 0);
        assert!(!b.thread_ns.is_empty());
        assert!(b.cpu_since(&a) > 0.0);
    }
}
