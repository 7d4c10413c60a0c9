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
        Qemu::start_with(&["-machine", "pc"])
    }

    fn start_with(machine: &[&str]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(machine)
            .args(["-accel", "tcg", "-m", "64", "-nodefaults"])
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

/// Hot-plug as agentd does it, against a q35 QEMU with agentd's empty root
/// ports and no guest OS: a file disk whose descriptor crosses the QMP
/// socket (SCM_RIGHTS, `add-fd`), a NIC on a socket passed by `getfd`,
/// each on a free root port as `qom-list` tells them; a resize QEMU sees;
/// and a `device_del` no guest acknowledges, which leaves the device.
#[tokio::test]
#[ignore = "needs qemu-system-x86_64: run by scripts/test"]
async fn hot_plugs_a_disk_and_a_nic_on_empty_root_ports() {
    use std::os::fd::OwnedFd;
    let mut args = vec!["-machine".to_owned(), "q35".to_owned()];
    for i in 0..2 {
        args.push("-device".into());
        args.push(format!(
            "pcie-root-port,id=hp{i},bus=pcie.0,chassis={},port={}",
            i + 1,
            16 + i
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qemu = Qemu::start_with(&args);
    let (qmp, _events) = Qmp::connect(qemu.socket(), WAIT).await.unwrap();
    let ports = |p: &[agent::qmp::Peripheral]| -> Vec<(String, Option<String>)> {
        p.iter().map(|d| (d.id.clone(), d.port.clone())).collect()
    };
    assert_eq!(
        ports(&qmp.peripherals().await.unwrap()),
        [("hp0".into(), None), ("hp1".into(), None)]
    );

    // A 1 MiB file QEMU could never open itself: agentd's descriptor.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let file: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap()
        .into();
    let added = qmp.add_fd(file, Some(1000), "vdz").await.unwrap();
    assert_eq!(added.fdset_id, 1000);
    qmp.blockdev_add(serde_json::json!({
        "driver": "raw", "node-name": "vdz",
        "file": {"driver": "file", "filename": "/dev/fdset/1000"},
    }))
    .await
    .unwrap();
    qmp.device_add("virtio-blk-pci,drive=vdz,id=vdz-dev,bus=hp1")
        .await
        .unwrap();

    // A NIC on a datagram socket given by name.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    qmp.getfd("nic1", OwnedFd::from(sock)).await.unwrap();
    qmp.netdev_add(serde_json::json!({"type": "socket", "id": "net1", "fd": "nic1"}))
        .await
        .unwrap();
    qmp.device_add("virtio-net-pci,netdev=net1,mac=52:54:00:00:00:42,id=net1-dev,bus=hp0")
        .await
        .unwrap();
    assert_eq!(
        ports(&qmp.peripherals().await.unwrap()),
        [
            ("hp0".into(), None),
            ("hp1".into(), None),
            ("net1-dev".into(), Some("hp0".into())),
            ("vdz-dev".into(), Some("hp1".into())),
        ]
    );
    // A third device has no free port left: QEMU refuses a taken one.
    let err = qmp
        .device_add("virtio-blk-pci,drive=vdz,id=again,bus=hp1")
        .await
        .unwrap_err();
    assert!(!err.message().is_empty());

    // block_resize: QEMU sees the new size (the file grew with it).
    qmp.block_resize("vdz", 2 << 20).await.unwrap();
    let size = |b: Vec<agent::qmp::BlockInfo>| {
        b.into_iter()
            .find_map(|b| b.inserted.filter(|m| m.node_name == "vdz"))
            .and_then(|m| m.image)
            .map(|i| i.virtual_size)
    };
    assert_eq!(size(qmp.query_block().await.unwrap()), Some(2 << 20));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);

    // No guest OS answers the unplug request: the device stays.
    assert!(!qmp
        .device_del("vdz-dev", Duration::from_secs(2))
        .await
        .unwrap());
    assert!(qmp
        .peripherals()
        .await
        .unwrap()
        .iter()
        .any(|p| p.id == "vdz-dev"));
    // Removals of what is not there are no errors.
    qmp.blockdev_del("nope").await.unwrap();
    qmp.netdev_del("nope").await.unwrap();
    qmp.remove_fd(4242).await.unwrap();
    assert!(qmp
        .device_del("nope", Duration::from_secs(1))
        .await
        .unwrap());
}
