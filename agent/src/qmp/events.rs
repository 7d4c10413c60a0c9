//! QEMU's events on a QMP connection: the stream a [`super::Qmp`]
//! connection feeds ([`QmpEvents`]), and each event parsed into its typed
//! form ([`QmpEventKind`]) or kept whole as `Other`.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::mpsc;

/// The receiving end of one connection's events, in QEMU's order. After QEMU
/// closes the connection it yields one [`QmpEventKind::Closed`] and then `None`;
/// after the last [`Qmp`] handle is dropped it yields `None` alone.
#[derive(Debug)]
pub struct QmpEvents {
    pub(super) rx: mpsc::UnboundedReceiver<QmpEvent>,
}

impl QmpEvents {
    /// An events channel fed by hand: the unit tests' QEMU.
    #[cfg(test)]
    pub(crate) fn channel() -> (mpsc::UnboundedSender<QmpEvent>, QmpEvents) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, QmpEvents { rx })
    }

    /// The next event; `None` once the connection is gone and all were read.
    pub async fn recv(&mut self) -> Option<QmpEvent> {
        self.rx.recv().await
    }
}

impl futures::Stream for QmpEvents {
    type Item = QmpEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<QmpEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// One event from QEMU, stamped with QEMU's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// When QEMU emitted it (for `Closed`: when the close was seen).
    pub timestamp: SystemTime,
    pub kind: QmpEventKind,
}

/// What happened. The events agentd acts on are typed; the rest, and a known
/// event whose data does not parse (a newer QEMU), arrive as `Other`, so none is
/// lost.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEventKind {
    /// `SHUTDOWN`: the machine stopped running for good (QEMU exits next, unless
    /// started with `-no-shutdown`). `guest` tells whether the guest asked.
    Shutdown { guest: bool, reason: ShutdownCause },
    /// `STOP`: the CPUs were paused (by `stop`, an I/O error policy, a panic...).
    Stop,
    /// `RESUME`: the CPUs run again.
    Resume,
    /// `RESET`: the machine was reset.
    Reset { guest: bool, reason: ShutdownCause },
    /// `POWERDOWN`: the ACPI power button was pressed (`system_powerdown`).
    Powerdown,
    /// `GUEST_PANICKED`: the guest reported a panic (pvpanic or Hyper-V).
    GuestPanicked { action: PanicAction },
    /// `BLOCK_IO_ERROR`: a disk request failed. With `action: Stop` the guest
    /// is now paused; `nospace` marks ENOSPC (a thin pool ran out).
    BlockIoError {
        /// The backend's name; empty for backends made with `-blockdev` alone.
        device: String,
        node_name: Option<String>,
        operation: IoOperation,
        action: BlockErrorAction,
        nospace: bool,
        reason: String,
    },
    /// Any other event, as QEMU sent it (`data` is `null` when it had none).
    Other { name: String, data: Value },
    /// The connection closed: QEMU exited or was killed. Always the last event.
    Closed,
}

/// Defines a QAPI enum: its QEMU wire names, plus `Other` for names a newer QEMU
/// may send, so parsing never fails on them.
macro_rules! qapi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this client does not know, verbatim.
            Other(String),
        }

        impl $name {
            /// Parses QEMU's name for it.
            pub fn from_qapi(name: &str) -> Self {
                match name {
                    $($wire => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// QEMU's name for it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)*
                    Self::Other(name) => name,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                String::deserialize(d).map(|name| Self::from_qapi(&name))
            }
        }
    };
}

qapi_enum! {
    /// QEMU's `RunState`, as `query-status` reports it.
    RunStatus {
        Debug = "debug",
        InMigrate = "inmigrate",
        InternalError = "internal-error",
        /// Paused by a disk error with `werror=stop`/`rerror=stop`.
        IoError = "io-error",
        Paused = "paused",
        PostMigrate = "postmigrate",
        /// Started with `-S` and never continued.
        Prelaunch = "prelaunch",
        FinishMigrate = "finish-migrate",
        RestoreVm = "restore-vm",
        Running = "running",
        SaveVm = "save-vm",
        /// Shut down but kept alive by `-no-shutdown`.
        Shutdown = "shutdown",
        Suspended = "suspended",
        Watchdog = "watchdog",
        GuestPanicked = "guest-panicked",
        Colo = "colo",
    }
}

qapi_enum! {
    /// QEMU's `ShutdownCause`: why a `SHUTDOWN` or `RESET` happened.
    ShutdownCause {
        /// QEMU's `none`.
        Unspecified = "none",
        HostError = "host-error",
        /// The `quit` command.
        HostQmpQuit = "host-qmp-quit",
        /// The `system_reset` command.
        HostQmpSystemReset = "host-qmp-system-reset",
        /// SIGTERM, SIGINT or SIGHUP to QEMU.
        HostSignal = "host-signal",
        HostUi = "host-ui",
        /// The guest powered itself off.
        GuestShutdown = "guest-shutdown",
        /// The guest rebooted (a `SHUTDOWN` with this cause means `-no-reboot`).
        GuestReset = "guest-reset",
        /// The guest panicked and the panic action is to power off.
        GuestPanic = "guest-panic",
        SubsystemReset = "subsystem-reset",
        SnapshotLoad = "snapshot-load",
    }
}

qapi_enum! {
    /// QEMU's `GuestPanicAction`: what QEMU did about a guest panic.
    PanicAction {
        Pause = "pause",
        Poweroff = "poweroff",
        Run = "run",
    }
}

qapi_enum! {
    /// QEMU's `IoOperationType`.
    IoOperation {
        Read = "read",
        Write = "write",
    }
}

qapi_enum! {
    /// QEMU's `BlockErrorAction`: what QEMU did about a failed disk request.
    BlockErrorAction {
        /// Pretended it succeeded.
        Ignore = "ignore",
        /// Returned the error to the guest.
        Report = "report",
        /// Paused the guest (run state `io-error`).
        Stop = "stop",
    }
}

qapi_enum! {
    /// QEMU's `BlockDeviceIoStatus`.
    IoStatus {
        Ok = "ok",
        Failed = "failed",
        NoSpace = "nospace",
    }
}

pub(super) fn parse_event(mut message: serde_json::Map<String, Value>) -> QmpEvent {
    let timestamp = message
        .get("timestamp")
        .and_then(|t| Timestamp::deserialize(t).ok())
        .map_or_else(SystemTime::now, SystemTime::from);
    let name = match message.remove("event") {
        Some(Value::String(name)) => name,
        other => other.map(|v| v.to_string()).unwrap_or_default(),
    };
    let data = message.remove("data").unwrap_or(Value::Null);
    let kind = typed_event(&name, &data).unwrap_or(QmpEventKind::Other { name, data });
    QmpEvent { timestamp, kind }
}

/// The typed form of a known event; `None` for unknown events and for known
/// ones whose data does not have the shape QEMU 7.2 gives it.
fn typed_event(name: &str, data: &Value) -> Option<QmpEventKind> {
    fn parse<T: DeserializeOwned>(name: &str, data: &Value) -> Option<T> {
        T::deserialize(data)
            .inspect_err(|e| tracing::warn!(event = name, error = %e, "QMP: unexpected event data"))
            .ok()
    }

    #[derive(Deserialize)]
    struct Cause {
        guest: bool,
        reason: ShutdownCause,
    }
    #[derive(Deserialize)]
    struct Panic {
        action: PanicAction,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct IoError {
        device: String,
        node_name: Option<String>,
        operation: IoOperation,
        action: BlockErrorAction,
        #[serde(default)]
        nospace: bool,
        reason: String,
    }

    Some(match name {
        "SHUTDOWN" => {
            let Cause { guest, reason } = parse(name, data)?;
            QmpEventKind::Shutdown { guest, reason }
        }
        "RESET" => {
            let Cause { guest, reason } = parse(name, data)?;
            QmpEventKind::Reset { guest, reason }
        }
        "STOP" => QmpEventKind::Stop,
        "RESUME" => QmpEventKind::Resume,
        "POWERDOWN" => QmpEventKind::Powerdown,
        "GUEST_PANICKED" => {
            let Panic { action } = parse(name, data)?;
            QmpEventKind::GuestPanicked { action }
        }
        "BLOCK_IO_ERROR" => {
            let e: IoError = parse(name, data)?;
            QmpEventKind::BlockIoError {
                device: e.device,
                node_name: e.node_name,
                operation: e.operation,
                action: e.action,
                nospace: e.nospace,
                reason: e.reason,
            }
        }
        _ => return None,
    })
}

/// QEMU's event stamp, from the host's wall clock. One that does not parse
/// (negative: a clock before 1970) is replaced by the time of receipt.
#[derive(Deserialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u64,
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        UNIX_EPOCH + Duration::from_secs(t.seconds) + Duration::from_micros(t.microseconds)
    }
}
