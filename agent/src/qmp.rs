//! QMP client: agentd's one connection to one QEMU process's monitor socket.
//!
//! agentd starts every guest's QEMU with `-qmp unix:PATH,server=on,wait=off`:
//! QEMU listens, we connect. This module owns that connection and nothing else
//! (not the process, not the guest's state): it sends commands, routes their
//! replies back to the caller that asked, and turns QEMU's asynchronous events
//! into typed [`QmpEvent`]s.
//!
//! The connection (reader, writer, reply routing) and the reply types are
//! here; the event stream and the typing of events in `qmp/events.rs`,
//! device hot-plug commands in `qmp_devices.rs`, the tests in `qmp_tests.rs`.
//!
//! # Protocol shape
//!
//! QMP is newline-delimited JSON objects in both directions:
//!
//! - QEMU greets: `{"QMP": {"version": {"qemu": {"major", "minor", "micro"},
//!   "package"}, "capabilities": [..]}}`, then accepts nothing but
//!   `qmp_capabilities` until that has been sent.
//! - We send `{"execute": NAME, "arguments": {..}, "id": N}`; QEMU answers
//!   `{"return": VALUE, "id": N}` or `{"error": {"class", "desc"}, "id": N}`.
//!   QEMU runs commands one at a time in order, but a client must not rely on
//!   that, so every reply is matched to its command by `id` alone.
//! - Events arrive between replies at any time: `{"event": NAME, "data": {..},
//!   "timestamp": {"seconds", "microseconds"}}`. An event a command causes is
//!   written *before* that command's reply (`RESUME` before `cont`'s return,
//!   `SHUTDOWN` before `quit`'s), and this client keeps that order: such an event
//!   is already in the [`QmpEvents`] channel when the command returns.
//! - QEMU serves one client at a time on the socket. A second client's
//!   `connect()` succeeds (the kernel queues it) but its greeting only comes once
//!   the first client has hung up. That is what lets a restarted agentd re-adopt
//!   a running guest, and why [`Qmp`] must close its socket promptly when dropped.
//!
//! # Tasks and ownership
//!
//! [`Qmp::connect`] spawns two tasks per connection:
//!
//! - the **reader** owns the socket's read half. It parses every line, completes
//!   the waiting caller of a reply, and pushes events into the [`QmpEvents`]
//!   channel in the order QEMU wrote them. At end of stream it fails every
//!   in-flight command with `Unavailable`, and sends a final
//!   [`QmpEventKind::Closed`].
//! - the **writer** owns the write half and writes whole lines it receives over a
//!   channel. Callers never write to the socket themselves, so a caller whose
//!   future is dropped halfway (a timeout, a cancelled gRPC request) cannot
//!   leave half a JSON object on the wire.
//!
//! [`Qmp`] is a cheap handle (an `Arc`) shared by any number of tasks. When the
//! last handle is dropped both tasks are aborted and the socket is closed; the
//! events receiver then ends (`None`) *without* a `Closed` event, because QEMU
//! did not go away: we left.
//!
//! The events channel is unbounded, deliberately: the reader must never wait for
//! the event consumer, or command replies queued behind an event would stall and
//! a consumer that awaits a command while events pile up would deadlock. Events
//! are few (QEMU rate-limits its chatty ones) and agentd drains them
//! continuously, so memory is bounded by how far the consumer lags, and no event
//! is ever dropped.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use stratus_core::error::{Error, ErrorKind, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long [`Qmp::execute`] waits for a reply. QEMU answers almost every command
/// in milliseconds; one that takes this long means QEMU's main loop is stuck
/// (typically on storage that stopped answering).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one QEMU's QMP socket. Clone it freely: clones share the
/// connection, and commands from many tasks may be in flight at once.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    version: QemuVersion,
    next_id: AtomicU64,
    pending: Arc<Pending>,
    /// Whole lines for the writer task, each with the descriptor it
    /// carries (SCM_RIGHTS), if any.
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// Ids of the devices QEMU reported deleted (`DEVICE_DELETED`), for
    /// [`Qmp::device_del`]'s wait.
    deleted: tokio::sync::broadcast::Sender<String>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

/// Commands waiting for their reply, by id. `None` once the connection has
/// closed, so that a command issued afterwards fails at once instead of waiting
/// out its timeout. Dropping a sender is how a waiting caller learns of the close.
type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>;

type Reply = std::result::Result<Value, QmpError>;

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the socket is what lets QEMU accept the next client (a
        // restarted agentd, or another connect from this one), so do not wait
        // for the tasks to notice on their own.
        self.reader.abort();
        self.writer.abort();
    }
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.inner.path)
            .field("version", &self.inner.version)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads QEMU's greeting and
    /// negotiates capabilities, all within `timeout`.
    ///
    /// While the socket does not exist yet or refuses connections (QEMU is still
    /// starting, or has died and left a stale socket file) it retries until
    /// `timeout`, then fails with `Unavailable`. It also fails with
    /// `Unavailable` when the greeting does not come: QEMU serves one client at
    /// a time and another one is still connected.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<(Qmp, QmpEvents)> {
        let deadline = Instant::now() + timeout;
        let stream = connect_socket(path, timeout, deadline).await?;
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);

        let greeting = tokio::time::timeout_at(deadline, read_greeting(&mut read))
            .await
            .map_err(|_| {
                Error::unavailable(format!(
                    "QMP socket {}: no greeting within {} (QEMU serves one client at a \
                     time: is another one connected?)",
                    path.display(),
                    humantime::format_duration(timeout)
                ))
            })?
            .map_err(|e| e.context(format!("QMP socket {}", path.display())))?;

        let pending: Arc<Pending> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let (deleted, _) = tokio::sync::broadcast::channel(64);
        let reader = tokio::spawn(read_loop(
            read,
            Arc::clone(&pending),
            Sinks {
                events: events_tx,
                deleted: deleted.clone(),
            },
            path.to_owned(),
        ));
        let writer = tokio::spawn(write_loop(write, outbox_rx, path.to_owned()));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                version: greeting.qmp.version,
                next_id: AtomicU64::new(0),
                pending,
                outbox,
                deleted,
                reader,
                writer,
            }),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        qmp.execute_with_timeout("qmp_capabilities", None, remaining)
            .await?;
        tracing::debug!(path = %path.display(), version = %qmp.inner.version, "QMP connected");
        Ok((qmp, QmpEvents { rx: events_rx }))
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// QEMU's version, from its greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Runs `command` with `arguments` (a JSON object, or `None`) and returns
    /// QEMU's `return` value, waiting at most [`COMMAND_TIMEOUT`].
    ///
    /// Errors: QEMU's refusal keeps its `desc` in the message and carries a
    /// [`QmpError`] as the source (for callers that know better than the
    /// class-based [`ErrorKind`]: see [`QmpError::kind`]); a closed connection
    /// or a timeout is `Unavailable`.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(command, arguments, COMMAND_TIMEOUT)
            .await
    }

    /// [`Qmp::execute`] with its own timeout, for the rare command known to be slow.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.call(command, arguments, timeout)
            .await
            .map_err(|e| e.into_error(&self.inner.path, command))
    }

    /// Starts or resumes the guest's CPUs (`cont`). QEMU emits `RESUME`.
    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", None).await.map(drop)
    }

    /// Pauses the guest's CPUs (`stop`). QEMU emits `STOP`.
    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", None).await.map(drop)
    }

    /// Presses the ACPI power button (`system_powerdown`). QEMU emits
    /// `POWERDOWN`; a cooperating guest then shuts down, which QEMU reports as
    /// `SHUTDOWN {guest: true, reason: guest-shutdown}`.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// Resets the machine (`system_reset`). QEMU emits
    /// `RESET {guest: false, reason: host-qmp-system-reset}`.
    pub async fn system_reset(&self) -> Result<()> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// Makes QEMU exit (`quit`). QEMU emits `SHUTDOWN {guest: false, reason:
    /// host-qmp-quit}`, answers, and closes the socket as it exits; it may close
    /// before its answer reaches us, so a close after `quit` was issued counts as
    /// success. A connection already closed before `quit` is still `Unavailable`:
    /// the caller learns nothing about QEMU from it and should check the process.
    pub async fn quit(&self) -> Result<()> {
        match self.call("quit", None, COMMAND_TIMEOUT).await {
            Ok(_) | Err(CallError::Closed) => Ok(()),
            Err(e) => Err(e.into_error(&self.inner.path, "quit")),
        }
    }

    /// The run state of the guest (`query-status`).
    pub async fn query_status(&self) -> Result<RunState> {
        self.query("query-status").await
    }

    /// The guest's block backends (`query-block`).
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.query("query-block").await
    }

    /// I/O counters of the guest's block backends (`query-blockstats`),
    /// for `/metrics`.
    pub async fn query_blockstats(&self) -> Result<Vec<BlockStats>> {
        self.query("query-blockstats").await
    }

    /// QEMU's version (`query-version`); the same as [`Qmp::version`] unless the
    /// binary was replaced under a running QEMU, which this cannot see anyway.
    pub async fn query_version(&self) -> Result<QemuVersion> {
        self.query("query-version").await
    }

    async fn query<T: DeserializeOwned>(&self, command: &str) -> Result<T> {
        let value = self.execute(command, None).await?;
        serde_json::from_value(value).map_err(|e| {
            Error::internal(format!(
                "QMP {command} on {}: unexpected reply: {e}",
                self.inner.path.display()
            ))
            .with_source(e)
        })
    }

    async fn call(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> std::result::Result<Value, CallError> {
        self.call_with_fd(command, arguments, timeout, None).await
    }

    /// [`Qmp::call`] with a descriptor sent alongside the command's line
    /// (SCM_RIGHTS), as `getfd` and `add-fd` expect.
    async fn call_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> std::result::Result<Value, CallError> {
        let inner = &self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&inner.pending).as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(CallError::NotConnected),
        };
        // Whatever happens from here (reply, timeout, the caller dropping this
        // future), the id must leave the table.
        let _forget = Forget {
            pending: &inner.pending,
            id,
        };

        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string().into_bytes();
        line.push(b'\n');
        tracing::debug!(path = %inner.path.display(), command, id, "QMP command");
        if inner.outbox.send(Outgoing { line, fd }).is_err() {
            // The writer stopped: the socket failed before this was written.
            return Err(CallError::NotConnected);
        }

        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(CallError::TimedOut(timeout)),
            Ok(Err(_)) => Err(CallError::Closed),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(refusal))) => Err(CallError::Refused(refusal)),
        }
    }
}

/// Removes a command's entry from the pending table when its caller stops
/// waiting, so late replies are recognised as orphans and the table cannot grow.
struct Forget<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(pending) = lock(self.pending).as_mut() {
            pending.remove(&self.id);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The table stays consistent even if a holder panicked: every critical
    // section is a single insert, remove or take.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a command got no `return`, before it becomes an [`Error`]; `quit` needs
/// to tell a close while in flight from the others.
enum CallError {
    /// The connection was already closed when the command was issued.
    NotConnected,
    /// The connection closed while the command was in flight.
    Closed,
    TimedOut(Duration),
    Refused(QmpError),
}

impl CallError {
    fn into_error(self, path: &Path, command: &str) -> Error {
        let path = path.display();
        match self {
            CallError::NotConnected => {
                Error::unavailable(format!("QMP connection to {path} closed"))
            }
            CallError::Closed => Error::unavailable(format!(
                "QMP connection to {path} closed before {command} was answered"
            )),
            CallError::TimedOut(timeout) => Error::unavailable(format!(
                "QMP {command} on {path}: no answer within {}",
                humantime::format_duration(timeout)
            )),
            CallError::Refused(refusal) => Error::new(
                refusal.kind(),
                format!("QMP {command} on {path}: {}", refusal.desc),
            )
            .with_source(refusal),
        }
    }
}

/// QEMU's refusal of a command: `{"error": {"class": .., "desc": ..}}`. It is
/// the source of the [`Error`] that [`Qmp::execute`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QmpError {
    /// `GenericError` for nearly everything; see [`QmpError::kind`].
    pub class: String,
    /// QEMU's human-readable reason.
    pub desc: String,
}

impl QmpError {
    /// The kind QEMU's class suggests. QEMU reports almost every failure as
    /// `GenericError`, bad arguments and failed actions alike; most of what
    /// agentd sends that QEMU refuses is a bad argument, so that is the default
    /// guess. A caller that knows better (an unreachable iSCSI target during
    /// `blockdev-add` is really `Unavailable`) maps the error itself.
    pub fn kind(&self) -> ErrorKind {
        match self.class.as_str() {
            "GenericError" => ErrorKind::InvalidArgument,
            "DeviceNotFound" => ErrorKind::NotFound,
            // The device or host is not in a state that allows the command.
            "DeviceNotActive" | "KVMMissingCap" => ErrorKind::FailedPrecondition,
            // CommandNotFound: agentd asked for something this QEMU lacks.
            _ => ErrorKind::Internal,
        }
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.desc, self.class)
    }
}

impl std::error::Error for QmpError {}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunState {
    pub status: RunStatus,
    /// Whether the CPUs are executing (true only in `running`).
    pub running: bool,
}

/// One block backend, from `query-block`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockInfo {
    /// The backend's name (`-drive id=`); empty for one made with `-blockdev`.
    pub device: String,
    /// The QOM path of the guest device it is attached to.
    pub qdev: Option<String>,
    /// The medium, if any (absent for an empty CD-ROM).
    pub inserted: Option<BlockMedium>,
    /// Present only for devices with an error policy.
    #[serde(rename = "io-status")]
    pub io_status: Option<IoStatus>,
}

/// One block backend's I/O counters (`query-blockstats`; QEMU counts
/// since it started).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BlockStats {
    /// `-drive id=`; empty for one made with `-blockdev`.
    #[serde(default)]
    pub device: String,
    /// The root node's name (agentd names nodes vda, vdb, ...).
    #[serde(rename = "node-name")]
    pub node_name: Option<String>,
    /// The QOM path of the guest device.
    pub qdev: Option<String>,
    pub stats: BlockCounters,
}

impl BlockStats {
    /// The name a person knows the disk by: the node name (vda), else the
    /// device id, else the guest device's QOM id.
    pub fn disk(&self) -> String {
        if let Some(n) = self.node_name.as_ref().filter(|n| !n.is_empty()) {
            return n.clone();
        }
        if !self.device.is_empty() {
            return self.device.clone();
        }
        let qdev = self.qdev.as_deref().unwrap_or_default();
        let id = qdev
            .strip_prefix("/machine/peripheral/")
            .and_then(|p| p.split('/').next())
            .unwrap_or(qdev);
        id.strip_suffix("-dev").unwrap_or(id).to_owned()
    }
}

/// The counters of [`BlockStats`] that `/metrics` shows.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct BlockCounters {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    #[serde(default)]
    pub rd_total_time_ns: u64,
    #[serde(default)]
    pub wr_total_time_ns: u64,
    #[serde(default)]
    pub flush_operations: u64,
}

/// The medium inserted in a block backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockMedium {
    /// The top node's name (QEMU invents `#blockNNN` when none was given).
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// The image's file name or URL (`iscsi://...`).
    pub file: String,
    /// The top node's driver (`raw`, `qcow2`, `file`, `iscsi`...).
    #[serde(rename = "drv")]
    pub driver: String,
    #[serde(rename = "ro")]
    pub read_only: bool,
    /// The image's size as the guest sees it (usage records' Disk).
    #[serde(default)]
    pub image: Option<BlockImage>,
}

/// What `query-block` says of an inserted medium's image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockImage {
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// QEMU's version, as its greeting and `query-version` state it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "VersionInfo")]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// The distribution's package version, e.g. `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// QEMU's `VersionInfo`, the wire shape of [`QemuVersion`].
#[derive(Deserialize)]
struct VersionInfo {
    qemu: VersionTriple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct VersionTriple {
    major: u32,
    minor: u32,
    micro: u32,
}

impl From<VersionInfo> for QemuVersion {
    fn from(v: VersionInfo) -> Self {
        QemuVersion {
            major: v.qemu.major,
            minor: v.qemu.minor,
            micro: v.qemu.micro,
            package: v.package,
        }
    }
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: QemuVersion,
}

/// Connects, retrying while QEMU has not yet created the socket (`ENOENT`) or
/// is not accepting on it (`ECONNREFUSED`: starting, or dead with the file left
/// behind; `EAGAIN`: backlog full).
async fn connect_socket(path: &Path, timeout: Duration, deadline: Instant) -> Result<UnixStream> {
    use std::io::ErrorKind as Io;
    let mut backoff = Duration::from_millis(10);
    loop {
        let err = match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(err) => err,
        };
        if !matches!(
            err.kind(),
            Io::NotFound | Io::ConnectionRefused | Io::WouldBlock
        ) {
            return Err(Error::io(format!("QMP socket {}", path.display()), err));
        }
        if Instant::now() + backoff > deadline {
            return Err(Error::unavailable(format!(
                "QMP socket {}: {err}; gave up after {}",
                path.display(),
                humantime::format_duration(timeout)
            ))
            .with_source(err));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

async fn read_greeting(read: &mut BufReader<OwnedReadHalf>) -> Result<Greeting> {
    let mut line = Vec::new();
    let n = read
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| Error::unavailable(format!("reading the greeting: {e}")).with_source(e))?;
    if n == 0 {
        return Err(Error::unavailable("closed before greeting"));
    }
    serde_json::from_slice(&line).map_err(|e| {
        Error::internal(format!(
            "not a QMP greeting: {}",
            String::from_utf8_lossy(&line).trim_end()
        ))
        .with_source(e)
    })
}

/// A line for the writer, with the descriptor it carries.
struct Outgoing {
    line: Vec<u8>,
    fd: Option<std::os::fd::OwnedFd>,
}

/// Where the reader puts events: the consumer's channel, and deleted
/// devices' ids for [`Qmp::device_del`].
struct Sinks {
    events: mpsc::UnboundedSender<QmpEvent>,
    deleted: tokio::sync::broadcast::Sender<String>,
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    path: PathBuf,
) {
    while let Some(Outgoing { line, fd }) = outbox.recv().await {
        let sent = match &fd {
            // The descriptor rides on the line's first byte(s); QEMU
            // keeps it for the command that line holds.
            Some(fd) => devices::send_with_fd(&write, &line, fd).await,
            None => Ok(0),
        };
        // Closing our copy once sent: QEMU holds its own now.
        drop(fd);
        let written = match sent {
            Ok(n) => write.write_all(&line[n..]).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            // QEMU hung up. The reader sees the end of stream and fails the
            // commands in flight, this one included.
            tracing::debug!(path = %path.display(), error = %e, "QMP write failed");
            return;
        }
    }
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    pending: Arc<Pending>,
    sinks: Sinks,
    path: PathBuf,
) {
    // No length limit: one line can be large (query-qmp-schema is ~200 KB) and
    // the peer is the QEMU agentd itself started.
    let mut line = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) => break,
            Ok(_) => dispatch(&line, &pending, &sinks, &path),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "QMP read failed");
                break;
            }
        }
    }
    tracing::debug!(path = %path.display(), "QMP connection closed");
    // Dropping the senders fails every command in flight, and taking the table
    // makes later commands fail at once.
    drop(lock(&pending).take());
    // A send fails only if the consumer dropped its receiver: not interested.
    let _ = sinks.events.send(QmpEvent {
        timestamp: SystemTime::now(),
        kind: QmpEventKind::Closed,
    });
}

/// Routes one line from QEMU: a reply to its caller, an event to the channel.
fn dispatch(line: &[u8], pending: &Pending, sinks: &Sinks, path: &Path) {
    if line.trim_ascii().is_empty() {
        return;
    }
    let mut message: serde_json::Map<String, Value> = match serde_json::from_slice(line) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                line = %String::from_utf8_lossy(line).trim_end(),
                "QMP: unparsable line ignored"
            );
            return;
        }
    };

    if message.contains_key("event") {
        let event = parse_event(message);
        tracing::debug!(path = %path.display(), ?event, "QMP event");
        if let QmpEventKind::Other { name, data } = &event.kind {
            if let Some(id) = devices::deleted_device(name, data) {
                // Nobody waiting is fine.
                let _ = sinks.deleted.send(id);
            }
        }
        let _ = sinks.events.send(event);
        return;
    }

    // We only send numeric ids. A reply without one is QEMU refusing a line it
    // could not parse at all, which this client never sends.
    let Some(id) = message.get("id").and_then(Value::as_u64) else {
        tracing::warn!(path = %path.display(), ?message, "QMP: message without our id ignored");
        return;
    };
    let reply = match (message.remove("return"), message.remove("error")) {
        (Some(value), _) => Ok(value),
        (None, Some(error)) => Err(QmpError::deserialize(&error).unwrap_or_else(|_| QmpError {
            class: "GenericError".into(),
            desc: error.to_string(),
        })),
        (None, None) => {
            tracing::warn!(path = %path.display(), ?message, "QMP: unexpected message ignored");
            return;
        }
    };
    let waiter = lock(pending).as_mut().and_then(|p| p.remove(&id));
    match waiter {
        // The caller may have stopped waiting in the meantime; fine.
        Some(waiter) => {
            let _ = waiter.send(reply);
        }
        None => tracing::debug!(path = %path.display(), id, "QMP: reply after its caller gave up"),
    }
}

#[path = "qmp_devices.rs"]
mod devices;
mod events;
pub use devices::{AddedFd, Peripheral};
use events::parse_event;
pub use events::*;

#[cfg(test)]
#[path = "qmp_tests.rs"]
mod tests;
