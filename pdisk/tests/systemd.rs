//! pdiskd under systemd's notify protocol (`Type=notify`), with a real
//! datagram socket as `NOTIFY_SOCKET`: `READY=1` once reconciled and
//! listening, `WATCHDOG=1` at half `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM.
//! Needs root (tgtd, XFS on a loop device); run by scripts/test.

use std::time::Duration;

use testkit::*;

#[test]
#[ignore = "needs root, tgtd and XFS: run by scripts/test"]
fn pdiskd_tells_systemd_ready_then_pings_the_watchdog_then_stopping() {
    require_root();
    let pool = XfsPool::new(320);
    let tgtd = Tgtd::start(pool.dir.path());
    let dir = tempfile::tempdir().unwrap();
    let systemd = NotifySocket::bind(dir.path());
    let path = systemd.env_value();
    let mut pdiskd = Pdiskd::start_with_env(
        &pool,
        &tgtd,
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );

    let ready = systemd.recv();
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving on "),
        "{ready:?}"
    );
    assert!(ready.contains("mtls://"), "{ready:?}");
    assert!(
        pdiskd.log_text().contains("start-up reconciliation done"),
        "READY=1 before reconciliation finished"
    );
    for _ in 0..3 {
        assert_eq!(systemd.recv(), "WATCHDOG=1");
    }

    // SIGTERM: STOPPING=1 (after any pings still in flight), then a clean exit.
    let stopping = systemd.after_sigterm(pdiskd.pid());
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=shutting down"),
        "{stopping:?}"
    );
    let status = pdiskd
        .wait_exit(Duration::from_secs(60))
        .expect("pdiskd exits after SIGTERM");
    assert!(status.success(), "{status}");
}
