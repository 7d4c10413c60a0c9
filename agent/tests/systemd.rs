//! agentd under systemd's notify protocol (`Type=notify`), with a real
//! datagram socket as `NOTIFY_SOCKET`: `READY=1` once reconciled and
//! listening, `WATCHDOG=1` at half `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM.
//! Needs root (agentd in a test namespace); run by scripts/test.

use std::time::Duration;

use testkit::*;

#[test]
#[ignore = "needs root (agentd in a namespace): run by scripts/test"]
fn agentd_tells_systemd_ready_then_pings_the_watchdog_then_stopping() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    ns.add_bridge("sdbr0");
    let systemd = NotifySocket::bind(dir.path());
    let path = systemd.env_value();
    // No pdiskd: agentd serves without it (its pdisk work waits for it).
    let mut agentd = Agentd::start_in_with_env(
        dir.path(),
        &ns,
        "http://127.0.0.1:9",
        "sdbr0",
        &[],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );

    let ready = systemd.recv();
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving on "),
        "{ready:?}"
    );
    assert!(ready.contains("unix:"), "{ready:?}");
    assert!(
        agentd.log_text().contains("start-up reconciliation done"),
        "READY=1 before reconciliation finished"
    );
    for _ in 0..3 {
        assert_eq!(systemd.recv(), "WATCHDOG=1");
    }

    let stopping = systemd.after_sigterm(agentd.pid());
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=shutting down; guests keep running"),
        "{stopping:?}"
    );
    let status = agentd
        .wait_exit(Duration::from_secs(60))
        .expect("agentd exits after SIGTERM");
    assert!(status.success(), "{status}");
}
