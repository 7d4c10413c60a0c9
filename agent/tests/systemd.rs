//! agentd under systemd's notify protocol (`Type=notify`), with a real
//! datagram socket as `NOTIFY_SOCKET`: `READY=1` once reconciled and
//! listening, `WATCHDOG=1` at half `WATCHDOG_USEC`, `STOPPING=1` on SIGTERM.
//! Needs root (agentd in a test namespace); run by scripts/test.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use testkit::*;

fn recv(s: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = s.recv(&mut buf).expect("a notification from agentd");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
#[ignore = "needs root (agentd in a namespace): run by scripts/test"]
fn agentd_tells_systemd_ready_then_pings_the_watchdog_then_stopping() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    ns.add_bridge("sdbr0");
    let path = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let path = path.display().to_string();
    // No pdiskd: agentd serves without it (its pdisk work waits for it).
    let mut agentd = Agentd::start_in_with_env(
        dir.path(),
        &ns,
        "http://127.0.0.1:9",
        "sdbr0",
        &[],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );

    let ready = recv(&systemd);
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
        assert_eq!(recv(&systemd), "WATCHDOG=1");
    }

    // SAFETY: signals the pid of the agentd this test started.
    unsafe {
        libc::kill(agentd.pid() as libc::pid_t, libc::SIGTERM);
    }
    let stopping = loop {
        let m = recv(&systemd);
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=shutting down; guests keep running"),
        "{stopping:?}"
    );
    let status = agentd
        .wait_exit(Duration::from_secs(60))
        .expect("agentd exits after SIGTERM");
    assert!(status.success(), "{status}");
}
