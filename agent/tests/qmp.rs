//! The QMP client against a real QEMU (integration tier: needs
//! `qemu-system-x86_64`, no root, no KVM, no disk). Each test starts its own
//! QEMU, paused (`-S`), with its QMP socket in its own temp dir, and kills it on
//! the way out whatever happens.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agent::qmp::{Qmp, QmpEvent, QmpEventKind, QmpEvents, RunStatus, ShutdownCause};

const WAIT: Duration = Duration::from_secs(20);

/// A QEMU process, killed and reaped on drop.
struct Qemu {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    fn start() -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", "pc", "-accel", "tcg", "-m", "64", "-nodefaults"])
            .args(["-display", "none", "-S", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is installed");
        Qemu {
            child,
            socket,
            _dir: dir,
        }
    }

    fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits for QEMU to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Fails harmlessly when QEMU already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next event matching `want`, skipping others (a guest without a disk
/// may also reset itself from the BIOS).
async fn wait_for(events: &mut QmpEvents, want: impl Fn(&QmpEventKind) -> bool) -> QmpEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("event in time")
            .expect("events ended");
        if want(&event.kind) {
            return event;
        }
        eprintln!("skipping {event:?}");
    }
}

#[tokio::test]
#[ignore = "needs qemu-system-x86_64: run by scripts/test"]
async fn drives_a_real_qemu_through_its_life() {
    let mut qemu = Qemu::start();
    let started = std::time::SystemTime::now();
    let (qmp, mut events) = Qmp::connect(qemu.socket(), WAIT).await.unwrap();
    assert_eq!(qmp.query_version().await.unwrap(), *qmp.version());
    assert!(qmp.version().major >= 7, "{}", qmp.version());

    let state = qmp.query_status().await.unwrap();
    assert_eq!(state.status, RunStatus::Prelaunch);
    assert!(!state.running);
    assert_eq!(qmp.query_block().await.unwrap(), vec![]);

    qmp.cont().await.unwrap();
    // QEMU writes RESUME before cont's reply, so it is already queued.
    let resume = wait_for(&mut events, |k| *k == QmpEventKind::Resume).await;
    // QEMU's clock is the host's: the timestamp is now-ish.
    let age = resume
        .timestamp
        .duration_since(started)
        .expect("stamped after start");
    assert!(age < WAIT, "{age:?}");
    let state = qmp.query_status().await.unwrap();
    assert_eq!(state.status, RunStatus::Running);
    assert!(state.running);

    qmp.stop().await.unwrap();
    wait_for(&mut events, |k| *k == QmpEventKind::Stop).await;
    assert_eq!(qmp.query_status().await.unwrap().status, RunStatus::Paused);

    qmp.system_reset().await.unwrap();
    wait_for(&mut events, |k| {
        *k == QmpEventKind::Reset {
            guest: false,
            reason: ShutdownCause::HostQmpSystemReset,
        }
    })
    .await;

    // A command QEMU refuses keeps QEMU's words.
    let err = qmp
        .execute(
            "blockdev-del",
            Some(serde_json::json!({"node-name": "nope"})),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), stratus_core::error::ErrorKind::InvalidArgument);
    assert!(err.message().contains("nope"), "{err}");

    qmp.quit().await.unwrap();
    wait_for(&mut events, |k| {
        *k == QmpEventKind::Shutdown {
            guest: false,
            reason: ShutdownCause::HostQmpQuit,
        }
    })
    .await;
    wait_for(&mut events, |k| *k == QmpEventKind::Closed).await;
    assert!(events.recv().await.is_none());
    assert!(qemu.wait_exit().success());
    assert_eq!(
        qmp.query_status().await.unwrap_err().kind(),
        stratus_core::error::ErrorKind::Unavailable
    );
}

#[tokio::test]
#[ignore = "needs qemu-system-x86_64: run by scripts/test"]
async fn reconnects_to_a_running_qemu() {
    let mut qemu = Qemu::start();
    let (qmp, mut events) = Qmp::connect(qemu.socket(), WAIT).await.unwrap();
    qmp.cont().await.unwrap();
    // agentd goes away: its socket closes, QEMU keeps running.
    drop(qmp);
    // The events already queued (RESUME) are still delivered, then the channel
    // ends without Closed: QEMU did not go away.
    while let Some(event) = events.recv().await {
        assert_ne!(event.kind, QmpEventKind::Closed);
    }

    // A restarted agentd re-adopts the guest, as it left it.
    let (qmp, mut events) = Qmp::connect(qemu.socket(), WAIT).await.unwrap();
    assert_eq!(qmp.query_status().await.unwrap().status, RunStatus::Running);

    // Killed from outside: the client learns that QEMU went away.
    qemu.child.kill().unwrap();
    wait_for(&mut events, |k| *k == QmpEventKind::Closed).await;
    let err = qmp.query_status().await.unwrap_err();
    assert_eq!(err.kind(), stratus_core::error::ErrorKind::Unavailable);
    assert!(
        err.message().starts_with("QMP connection to"),
        "{}",
        err.message()
    );
    assert!(!qemu.wait_exit().success());
}
