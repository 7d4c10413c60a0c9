//! Integration- and e2e-test harness, all real parts: tgtd, an XFS reflink
//! filesystem on a loop device, pdiskd, agentd (in its own network namespace,
//! [`Agentd`], with its state directory and the guests it launches cleaned up
//! on drop), network namespaces of the test's own with their bridges ([`NetNs`]), a
//! small HTTP server for image pulls ([`Httpd`]), QEMU's iSCSI initiator
//! ([`Initiator`]), the test guest (`scripts/guest-image`, [`guest_dir`]),
//! and the storage stack a pdisk test runs on (`stack.rs`: file+tgt on the
//! host, LVM thin + LIO + the kernel initiator of `open_iscsi.rs` in the lab
//! VM). One file per concern: `netns.rs`, `xfs.rs`, `tgtd.rs`, `pdiskd.rs`,
//! `initiator.rs`, `agentd.rs`, `guest.rs` (with the httpd), `nats.rs` (a
//! `nats-server -js` of the test's own), `ceph.rs` (a single-node Ceph
//! cluster on memstore for the rbd backend), `stack.rs`,
//! `open_iscsi.rs`, `pki.rs`, `metrics.rs` (scraping
//! `/metrics` and reading the samples back), `host.rs` (one hyperconverged
//! host for the agent's suites, [`AgentHost`]), `systemd.rs` (systemd's notify
//! socket, [`NotifySocket`]); this file holds the helpers they share.
//!
//! Every piece has a drop guard that tears it down even when the test fails,
//! and takes its own ports and directories, so tests run in parallel.
//! These tests need root; they are `#[ignore]`d and run by `scripts/test`.
//! Binaries are taken from the workspace's target directory (`bin`), so run
//! `cargo build --workspace` first; `scripts/test` does.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use tonic::transport::Channel;

mod agentd;
mod ceph;
mod guest;
mod host;
mod initiator;
mod metrics;
mod nats;
mod netns;
mod open_iscsi;
mod pdiskd;
mod pki;
mod stack;
mod systemd;
mod tgtd;
mod two_hosts;
mod xfs;

pub use agentd::{agent_events, test_cgroup_parent, Agentd};
pub use ceph::{CephCluster, MAX_CLUSTERS, MEMSTORE_BYTES};
pub use guest::{guest_dir, wait_console, Httpd};
pub use host::{AgentHost, ServedGuest, BRIDGE};
pub use initiator::Initiator;
pub use metrics::{scrape, Scrape};
pub use nats::NatsServer;
pub use netns::{can_connect_in, NetNs};
pub use pdiskd::Pdiskd;
pub use stack::{stack_kind, Exports, Lio, Pool, Stack, StackKind, ThinPool};
pub use systemd::NotifySocket;
pub use tgtd::Tgtd;
pub use two_hosts::TwoHosts;
pub use xfs::XfsPool;

pub use pki::{
    call_empty, channel, channel_as, cli_tls_args, daemon_tls_args, own_copy, TestPki, AGENT_NAME,
};

pub const INITIATOR: &str = "iqn.2026-11.io.stratus.test:host-a";
pub const OTHER_INITIATOR: &str = "iqn.2026-11.io.stratus.test:host-b";
/// The addresses of the two hosts of a live migration's test (a veth pair
/// between two namespaces): A runs pdiskd, tgtd and the source agentd, B
/// the destination agentd.
pub const MIGRATION_HOST_A: &str = "10.231.0.1";
pub const MIGRATION_HOST_B: &str = "10.231.0.2";

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

/// The SHA-256 of a file, as lowercase hex (with sha256sum).
pub fn sha256_of(path: &Path) -> String {
    run_ok("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
