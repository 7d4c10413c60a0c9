//! Unit tests of the QMP client against a scripted fake QEMU on a Unix socket.

use super::*;
use std::time::UNIX_EPOCH;
use tokio::net::UnixListener;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
const WAIT: Duration = Duration::from_secs(5);

/// The server side of one fake QEMU connection, driven by each test's script.
struct FakeQemu {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl FakeQemu {
    /// Accepts one client, greets it and answers `qmp_capabilities`, as QEMU does.
    async fn accept(listener: &UnixListener) -> FakeQemu {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, write) = stream.into_split();
        let mut qemu = FakeQemu {
            read: BufReader::new(read),
            write,
        };
        qemu.send_line(GREETING).await;
        let (id, command, _) = qemu.command().await;
        assert_eq!(command, "qmp_capabilities");
        qemu.reply(&id, json!({})).await;
        qemu
    }

    /// The next command: its id, name and arguments. Panics at end of stream.
    async fn command(&mut self) -> (Value, String, Value) {
        let mut line = String::new();
        assert!(
            self.read.read_line(&mut line).await.unwrap() > 0,
            "client hung up"
        );
        let mut message: Value = serde_json::from_str(&line).unwrap();
        let command = message["execute"].as_str().unwrap().to_owned();
        (message["id"].take(), command, message["arguments"].take())
    }

    async fn send_line(&mut self, line: &str) {
        // QEMU ends its lines with CRLF.
        self.write
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn send(&mut self, message: Value) {
        self.send_line(&message.to_string()).await;
    }

    async fn reply(&mut self, id: &Value, value: Value) {
        self.send(json!({ "return": value, "id": id })).await;
    }

    async fn refuse(&mut self, id: &Value, class: &str, desc: &str) {
        self.send(json!({ "id": id, "error": { "class": class, "desc": desc } }))
            .await;
    }

    async fn event(&mut self, name: &str, data: Option<Value>, seconds: u64) {
        let mut message = json!({
            "timestamp": { "seconds": seconds, "microseconds": 250 },
            "event": name,
        });
        if let Some(data) = data {
            message["data"] = data;
        }
        self.send(message).await;
    }

    /// Waits until the client closes its end.
    async fn expect_hangup(&mut self) {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.read.read_line(&mut line))
            .await
            .expect("client did not hang up")
            .unwrap();
        assert_eq!(n, 0, "unexpected line: {line}");
    }
}

/// A listening socket in its own temp dir.
fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

async fn next(events: &mut QmpEvents) -> Option<QmpEvent> {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no event in time")
}

async fn next_kind(events: &mut QmpEvents) -> QmpEventKind {
    next(events).await.expect("events ended").kind
}

#[tokio::test]
async fn routes_concurrent_replies_by_id_and_keeps_events_in_order() {
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        let mut commands = Vec::new();
        for _ in 0..3 {
            commands.push(qemu.command().await);
        }
        // Answer last first, with events in between, each echoing its
        // command's argument so the client can tell replies apart.
        qemu.event("STOP", None, 1).await;
        for (i, (id, _, arguments)) in commands.iter().rev().enumerate() {
            qemu.reply(id, arguments["n"].clone()).await;
            qemu.event("RESUME", None, 2 + i as u64).await;
        }
        qemu
    });

    let (qmp, mut events) = Qmp::connect(&path, WAIT).await.unwrap();
    assert_eq!(
        qmp.version(),
        &QemuVersion {
            major: 7,
            minor: 2,
            micro: 22,
            package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into()
        }
    );
    let (a, b, c) = tokio::join!(
        qmp.execute("echo", Some(json!({ "n": "a" }))),
        qmp.execute("echo", Some(json!({ "n": "b" }))),
        qmp.execute("echo", Some(json!({ "n": "c" }))),
    );
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap()),
        (json!("a"), json!("b"), json!("c"))
    );

    let first = next(&mut events).await.unwrap();
    assert_eq!(first.kind, QmpEventKind::Stop);
    assert_eq!(
        first.timestamp,
        UNIX_EPOCH + Duration::from_secs(1) + Duration::from_micros(250)
    );
    for seconds in 2..5 {
        let event = next(&mut events).await.unwrap();
        assert_eq!(event.kind, QmpEventKind::Resume);
        assert_eq!(
            event
                .timestamp
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            seconds
        );
    }
    drop(server.await.unwrap());
}

#[tokio::test]
async fn no_event_is_lost_while_nobody_reads() {
    const COUNT: u64 = 2000;
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        let (id, _, _) = qemu.command().await;
        for i in 0..COUNT {
            qemu.event("RTC_CHANGE", Some(json!({ "offset": i })), i)
                .await;
        }
        qemu.reply(&id, json!({})).await;
        qemu
    });

    let (qmp, mut events) = Qmp::connect(&path, WAIT).await.unwrap();
    // The reply comes after all the events: they are all queued by now.
    qmp.execute("anything", None).await.unwrap();
    for i in 0..COUNT {
        assert_eq!(
            next_kind(&mut events).await,
            QmpEventKind::Other {
                name: "RTC_CHANGE".into(),
                data: json!({ "offset": i })
            }
        );
    }
    drop(server.await.unwrap());
}

#[tokio::test]
async fn parses_qemu_7_2_events() {
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        // Verbatim shapes from QEMU 7.2.
        qemu.event(
            "SHUTDOWN",
            Some(json!({"guest": true, "reason": "guest-shutdown"})),
            1,
        )
        .await;
        qemu.event(
            "RESET",
            Some(json!({"guest": false, "reason": "host-qmp-system-reset"})),
            1,
        )
        .await;
        qemu.event("POWERDOWN", None, 1).await;
        qemu.event("GUEST_PANICKED", Some(json!({"action": "pause"})), 1)
            .await;
        qemu.event(
            "BLOCK_IO_ERROR",
            Some(json!({
                "device": "", "node-name": "vol0", "operation": "write",
                "action": "stop", "nospace": true, "reason": "No space left on device"
            })),
            1,
        )
        .await;
        // A newer QEMU's cause, and a known event with a shape we do not know.
        qemu.event(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-future"})),
            1,
        )
        .await;
        qemu.event("STOP", Some(json!({"unexpected": 1})), 1).await;
        qemu.event("RESET", Some(json!({"reason": 7})), 1).await;
        qemu
    });

    let (_qmp, mut events) = Qmp::connect(&path, WAIT).await.unwrap();
    let expected = [
        QmpEventKind::Shutdown {
            guest: true,
            reason: ShutdownCause::GuestShutdown,
        },
        QmpEventKind::Reset {
            guest: false,
            reason: ShutdownCause::HostQmpSystemReset,
        },
        QmpEventKind::Powerdown,
        QmpEventKind::GuestPanicked {
            action: PanicAction::Pause,
        },
        QmpEventKind::BlockIoError {
            device: String::new(),
            node_name: Some("vol0".into()),
            operation: IoOperation::Write,
            action: BlockErrorAction::Stop,
            nospace: true,
            reason: "No space left on device".into(),
        },
        QmpEventKind::Shutdown {
            guest: false,
            reason: ShutdownCause::Other("host-future".into()),
        },
        // Extra members do not matter; missing ones demote to Other.
        QmpEventKind::Stop,
        QmpEventKind::Other {
            name: "RESET".into(),
            data: json!({"reason": 7}),
        },
    ];
    for kind in expected {
        assert_eq!(next_kind(&mut events).await, kind);
    }
    drop(server.await.unwrap());
}

#[tokio::test]
async fn qemu_errors_keep_desc_and_map_to_kinds() {
    let cases = [
        ("GenericError", ErrorKind::InvalidArgument),
        ("DeviceNotFound", ErrorKind::NotFound),
        ("DeviceNotActive", ErrorKind::FailedPrecondition),
        ("KVMMissingCap", ErrorKind::FailedPrecondition),
        ("CommandNotFound", ErrorKind::Internal),
        ("SomethingNew", ErrorKind::Internal),
    ];
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        for (class, _) in cases {
            let (id, command, _) = qemu.command().await;
            qemu.refuse(&id, class, &format!("{command} refused")).await;
        }
        qemu
    });

    let (qmp, _events) = Qmp::connect(&path, WAIT).await.unwrap();
    for (class, kind) in cases {
        let err = qmp.execute("device_del", None).await.unwrap_err();
        assert_eq!(err.kind(), kind, "{class}");
        assert_eq!(
            err.message(),
            format!("QMP device_del on {}: device_del refused", path.display())
        );
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<QmpError>())
            .expect("QmpError source");
        assert_eq!(source.class, class);
    }
    drop(server.await.unwrap());
}

#[tokio::test]
async fn typed_queries_parse_qemu_replies() {
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        let (id, command, _) = qemu.command().await;
        assert_eq!(command, "query-status");
        qemu.reply(
            &id,
            json!({"status": "prelaunch", "singlestep": false, "running": false}),
        )
        .await;
        let (id, command, _) = qemu.command().await;
        assert_eq!(command, "query-block");
        // Trimmed from QEMU 7.2: a -drive backend and a -blockdev one.
        qemu.reply(
            &id,
            json!([
                {"io-status": "ok", "device": "d1", "locked": false, "removable": false,
                 "inserted": {"ro": true, "node-name": "#block101", "drv": "raw",
                              "file": "/tmp/b.img", "encrypted": false},
                 "qdev": "/machine/peripheral/vdb/virtio-backend", "type": "unknown"},
                {"device": "", "locked": false, "removable": false,
                 "inserted": {"ro": false, "node-name": "vol0", "drv": "file",
                              "file": "/tmp/a.img"},
                 "qdev": "/machine/peripheral/vda/virtio-backend", "type": "unknown"}
            ]),
        )
        .await;
        let (id, _, _) = qemu.command().await;
        qemu.reply(&id, json!({"status": 3})).await;
        qemu
    });

    let (qmp, _events) = Qmp::connect(&path, WAIT).await.unwrap();
    assert_eq!(
        qmp.query_status().await.unwrap(),
        RunState {
            status: RunStatus::Prelaunch,
            running: false
        }
    );
    let blocks = qmp.query_block().await.unwrap();
    assert_eq!(
        blocks[0],
        BlockInfo {
            device: "d1".into(),
            qdev: Some("/machine/peripheral/vdb/virtio-backend".into()),
            inserted: Some(BlockMedium {
                node_name: "#block101".into(),
                file: "/tmp/b.img".into(),
                driver: "raw".into(),
                read_only: true,
                image: None,
            }),
            io_status: Some(IoStatus::Ok),
        }
    );
    assert_eq!(blocks[1].device, "");
    assert_eq!(blocks[1].io_status, None);
    assert_eq!(blocks[1].inserted.as_ref().unwrap().node_name, "vol0");
    // A reply of the wrong shape is our bug or QEMU's, not the caller's.
    let err = qmp.query_status().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    drop(server.await.unwrap());
}

#[tokio::test]
async fn close_fails_commands_in_flight_and_ends_events() {
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        qemu.command().await;
        qemu.command().await;
        qemu.event("STOP", None, 1).await;
        // Killed: no replies, no SHUTDOWN.
    });

    let (qmp, mut events) = Qmp::connect(&path, WAIT).await.unwrap();
    let (a, b) = tokio::join!(qmp.stop(), qmp.query_status());
    let a = a.unwrap_err();
    assert_eq!(a.kind(), ErrorKind::Unavailable);
    assert_eq!(
        a.message(),
        format!(
            "QMP connection to {} closed before stop was answered",
            path.display()
        )
    );
    assert_eq!(b.unwrap_err().kind(), ErrorKind::Unavailable);
    server.await.unwrap();

    assert_eq!(next_kind(&mut events).await, QmpEventKind::Stop);
    assert_eq!(next_kind(&mut events).await, QmpEventKind::Closed);
    assert_eq!(next(&mut events).await, None);

    // Later commands fail at once rather than waiting out a timeout.
    let err = qmp
        .execute_with_timeout("cont", None, Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(
        err.message(),
        format!("QMP connection to {} closed", path.display())
    );
    // And so does quit: nothing proves QEMU exited because of it.
    assert_eq!(qmp.quit().await.unwrap_err().kind(), ErrorKind::Unavailable);
}

#[tokio::test]
async fn quit_succeeds_when_qemu_closes_before_or_after_answering() {
    for answers in [false, true] {
        let (_dir, path, listener) = listen();
        let server = tokio::spawn(async move {
            let mut qemu = FakeQemu::accept(&listener).await;
            let (id, command, _) = qemu.command().await;
            assert_eq!(command, "quit");
            qemu.event(
                "SHUTDOWN",
                Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                1,
            )
            .await;
            if answers {
                qemu.reply(&id, json!({})).await;
            }
        });

        let (qmp, mut events) = Qmp::connect(&path, WAIT).await.unwrap();
        qmp.quit().await.unwrap();
        server.await.unwrap();
        assert_eq!(
            next_kind(&mut events).await,
            QmpEventKind::Shutdown {
                guest: false,
                reason: ShutdownCause::HostQmpQuit
            }
        );
        assert_eq!(next_kind(&mut events).await, QmpEventKind::Closed);
        assert_eq!(next(&mut events).await, None);
    }
}

#[tokio::test]
async fn a_command_times_out_and_its_late_reply_is_ignored() {
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        let (slow, _, _) = qemu.command().await;
        let (next, _, _) = qemu.command().await;
        qemu.reply(&slow, json!("late")).await;
        qemu.reply(&next, json!("next")).await;
        qemu
    });

    let (qmp, _events) = Qmp::connect(&path, WAIT).await.unwrap();
    let err = qmp
        .execute_with_timeout("slow", None, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(
        err.message(),
        format!("QMP slow on {}: no answer within 50ms", path.display())
    );
    assert_eq!(qmp.execute("next", None).await.unwrap(), json!("next"));
    assert!(lock(&qmp.inner.pending).as_ref().unwrap().is_empty());
    drop(server.await.unwrap());
}

#[tokio::test]
async fn connect_retries_until_the_socket_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server_path = path.clone();
    let server = tokio::spawn(async move {
        // Late, like a QEMU still starting; first a stale socket file
        // nobody listens on, as a dead QEMU leaves behind.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(UnixListener::bind(&server_path).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::remove_file(&server_path).unwrap();
        let listener = UnixListener::bind(&server_path).unwrap();
        FakeQemu::accept(&listener).await
    });
    let (qmp, _events) = Qmp::connect(&path, WAIT).await.unwrap();
    assert_eq!(qmp.version().major, 7);
    drop(server.await.unwrap());
}

#[tokio::test]
async fn connect_gives_up_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let err = Qmp::connect(&path, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err
        .message()
        .starts_with(&format!("QMP socket {}:", path.display())));

    // Accepted (queued by the kernel) but never greeted: another client holds QEMU.
    let _listener = UnixListener::bind(&path).unwrap();
    let err = Qmp::connect(&path, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("no greeting"), "{err}");
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_socket() {
    let (_dir, path, listener) = listen();
    let server = tokio::spawn(async move {
        let mut qemu = FakeQemu::accept(&listener).await;
        qemu.expect_hangup().await;
        // QEMU now accepts the next client: a restarted agentd.
        FakeQemu::accept(&listener).await
    });

    let (qmp, mut events) = Qmp::connect(&path, WAIT).await.unwrap();
    let clone = qmp.clone();
    drop(qmp);
    drop(clone);
    // We left; QEMU did not go away: no Closed.
    assert_eq!(next(&mut events).await, None);
    let (_again, _events) = Qmp::connect(&path, WAIT).await.unwrap();
    drop(server.await.unwrap());
}
