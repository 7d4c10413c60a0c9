//! Mutating operations that outlive their callers, and retries by
//! `request_id` that get the first attempt's result.
//!
//! tonic drops a handler's future when its client disconnects or its
//! deadline passes; an operation awaited there would stop between two steps
//! (a volume left `creating`, a guest left STARTING with live exports). So
//! both daemons run every mutating operation through a [`RequestLog`]: the
//! operation is a task of the daemon's own and runs to its end whatever the
//! caller does.
//!
//! With a client-chosen `request_id`, the log also remembers the outcome,
//! per caller scope, for [`RequestLog::KEEP`]: a retry with the same id
//! (after a timeout, a dropped connection) waits for the first attempt if it
//! still runs and answers with its result, success or error, without running
//! the operation again. The same id with another RPC or other arguments is
//! InvalidArgument. The log is in memory; a daemon that gives it a
//! [`DurableOutcomes`] ([`RequestLog::with_durable`], agentd's store) and
//! runs a request through [`RequestLog::run_resolved`] also keeps it there:
//! the request is written before its operation starts and its outcome
//! before it is answered, so a retry after a restart (a kill -9 between the
//! answer and the retry) gets the same answer, and a retry of an attempt
//! the restart interrupted runs again knowing so ([`Attempt::AfterRestart`],
//! with the object the first attempt resolved), to answer from the state it
//! finds. Kept rows go after [`RequestLog::KEEP`] too.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};

/// A finished operation's outcome, kept for retries: the answer, or the
/// error's kind and message.
type Outcome = std::result::Result<Arc<dyn Any + Send + Sync>, (ErrorKind, String)>;

struct Entry {
    rpc: &'static str,
    /// What the request asked for, so a reused id with other arguments is
    /// refused instead of answered with another call's result.
    fingerprint: u64,
    started: Instant,
    outcome: watch::Receiver<Option<Outcome>>,
}

/// The outcomes of recent mutating requests, keyed by (scope, request id).
pub struct RequestLog {
    entries: Mutex<HashMap<(String, String), Entry>>,
    keep: Duration,
    max: usize,
    durable: Option<Arc<dyn DurableOutcomes>>,
    /// When the durable rows were last pruned.
    pruned: Arc<Mutex<Option<Instant>>>,
}

impl Default for RequestLog {
    fn default() -> Self {
        RequestLog::new(RequestLog::KEEP, RequestLog::MAX)
    }
}

/// A request as kept durably by [`DurableOutcomes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRequest {
    pub rpc: String,
    pub fingerprint: u64,
    /// When its first attempt started (seconds since the Unix epoch).
    pub started: u64,
    /// The object the first attempt resolved the request to (a guest's
    /// UUID; empty when the request names none).
    pub target: String,
    /// None while it runs, and for good when the daemon stopped during it.
    pub outcome: Option<StoredOutcome>,
}

/// A finished request's outcome: the encoded answer, or the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredOutcome {
    Answer(Vec<u8>),
    /// The error's kind (as [`ErrorKind`]'s Debug name) and message.
    Error {
        kind: String,
        message: String,
    },
}

/// Where a daemon keeps requests with an id across its restarts, keyed by
/// (scope, request id).
pub trait DurableOutcomes: Send + Sync {
    fn get(&self, scope: &str, request_id: &str) -> Result<Option<StoredRequest>>;
    fn put(&self, scope: &str, request_id: &str, request: &StoredRequest) -> Result<()>;
    /// Removes the requests started before `before` (Unix seconds);
    /// returns how many went.
    fn prune(&self, before: u64) -> Result<usize>;
}

/// An answer that can be kept durably: the daemons' protobuf messages
/// (and `()` and `String`, which prost encodes too).
pub trait Answer: Clone + Send + Sync + 'static {
    fn encode_answer(&self) -> Vec<u8>;
    fn decode_answer(bytes: &[u8]) -> Option<Self>;
}

impl<T: prost::Message + Default + Clone + 'static> Answer for T {
    fn encode_answer(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
    fn decode_answer(bytes: &[u8]) -> Option<Self> {
        T::decode(bytes).ok()
    }
}

/// Which attempt at a request [`RequestLog::run_resolved`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// No attempt before (or none kept).
    First,
    /// An earlier attempt started and the daemon stopped before it ended:
    /// its effect may be partly or wholly done (and reconciliation may have
    /// finished or undone it). `target` is what it resolved the request to.
    AfterRestart { target: String },
}

const KINDS: [ErrorKind; 9] = [
    ErrorKind::AlreadyExists,
    ErrorKind::Unavailable,
    ErrorKind::FailedPrecondition,
    ErrorKind::Internal,
    ErrorKind::InvalidArgument,
    ErrorKind::NotFound,
    ErrorKind::OutOfRange,
    ErrorKind::PermissionDenied,
    ErrorKind::ResourceExhausted,
];

fn kind_named(name: &str) -> ErrorKind {
    KINDS
        .into_iter()
        .find(|k| format!("{k:?}") == name)
        .unwrap_or(ErrorKind::Internal)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How to keep answers of type T durably (none: in memory only).
type Codec<T> = Option<(fn(&T) -> Vec<u8>, fn(&[u8]) -> Option<T>)>;

/// Validates a request id: 1..=128 of `[A-Za-z0-9._:-]`.
pub fn validate_request_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
    {
        return Err(Error::invalid(format!(
            "invalid request_id {id:?}: 1 to 128 of letters, digits, . _ : -"
        )));
    }
    Ok(())
}

/// A fingerprint of a request's arguments (its encoded message with the
/// request id cleared), for [`RequestLog::run`].
pub fn fingerprint(bytes: &[u8]) -> u64 {
    // FNV-1a: stable across runs, no new dependency; collisions only make
    // a reused id with other arguments look like a retry, which needs the
    // same caller scope and request id to begin with.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RequestLog {
    /// How long an outcome is kept for retries.
    pub const KEEP: Duration = Duration::from_secs(15 * 60);
    /// How many outcomes are kept at most; past it the oldest finished go
    /// first, and when all run, new requests with an id are refused.
    pub const MAX: usize = 100_000;

    pub fn new(keep: Duration, max: usize) -> RequestLog {
        RequestLog {
            entries: Mutex::default(),
            keep,
            max,
            durable: None,
            pruned: Arc::default(),
        }
    }

    /// Keeps the requests run by [`Self::run_resolved`] in `durable` too,
    /// so retries after a restart are answered (see the module doc).
    pub fn with_durable(mut self, durable: Arc<dyn DurableOutcomes>) -> RequestLog {
        self.durable = Some(durable);
        self
    }

    /// Runs `op` as a task of the daemon's own and answers with its result.
    /// With a non-empty `request_id`, a retry in the same `scope` gets the
    /// first attempt's result instead of running `op` (see the module doc).
    /// In memory only.
    pub async fn run<T, F>(
        &self,
        scope: &str,
        request_id: &str,
        rpc: &'static str,
        fingerprint: u64,
        op: F,
    ) -> Result<T>
    where
        T: Clone + Send + Sync + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.run_inner(scope, request_id, rpc, fingerprint, None, |_| {
            Ok((String::new(), op))
        })
        .await
    }

    /// [`Self::run`], kept durably too when the log has a
    /// [`DurableOutcomes`]: a retry after a restart gets the first
    /// attempt's answer. The operation is made by `prepare` only when it
    /// is to run (not for a retry answered from a kept outcome), told
    /// whether an earlier attempt was interrupted by a restart; it returns
    /// the object it resolved the request to (kept for such a retry) and
    /// the operation. An error of `prepare` is answered, not kept.
    pub async fn run_resolved<T, F, P>(
        &self,
        scope: &str,
        request_id: &str,
        rpc: &'static str,
        fingerprint: u64,
        prepare: P,
    ) -> Result<T>
    where
        T: Answer,
        F: Future<Output = Result<T>> + Send + 'static,
        P: FnOnce(Attempt) -> Result<(String, F)>,
    {
        let codec: Codec<T> = Some((T::encode_answer, T::decode_answer));
        self.run_inner(scope, request_id, rpc, fingerprint, codec, prepare)
            .await
    }

    async fn run_inner<T, F, P>(
        &self,
        scope: &str,
        request_id: &str,
        rpc: &'static str,
        fingerprint: u64,
        codec: Codec<T>,
        prepare: P,
    ) -> Result<T>
    where
        T: Clone + Send + Sync + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
        P: FnOnce(Attempt) -> Result<(String, F)>,
    {
        if request_id.is_empty() {
            let (_, op) = prepare(Attempt::First)?;
            return detached(op).await;
        }
        validate_request_id(request_id)?;
        let key = (scope.to_owned(), request_id.to_owned());
        let refused = |other: &str| {
            Error::invalid(format!(
                "request_id {request_id} was used by another request ({other}); \
                 a retry must repeat its request unchanged"
            ))
        };
        let durable = match codec {
            Some(c) => self.durable.clone().map(|d| (d, c)),
            None => None,
        };
        let mut outcome = {
            let mut entries = self.entries.lock().unwrap();
            self.prune(&mut entries);
            match entries.get(&key) {
                Some(e) if e.rpc != rpc || e.fingerprint != fingerprint => {
                    return Err(refused(e.rpc));
                }
                Some(e) => {
                    tracing::info!(
                        request_id,
                        rpc,
                        "retry: answering with the first attempt's result"
                    );
                    e.outcome.clone()
                }
                None => {
                    // Not in memory: kept from before a restart?
                    let kept = match &durable {
                        Some((d, _)) => d.get(scope, request_id)?,
                        None => None,
                    };
                    let attempt = match kept {
                        Some(k) if k.rpc != rpc || k.fingerprint != fingerprint => {
                            return Err(refused(&k.rpc));
                        }
                        Some(StoredRequest {
                            outcome: Some(o), ..
                        }) => {
                            drop(entries);
                            tracing::info!(
                                request_id,
                                rpc,
                                "retry after a restart: answering with the first attempt's result"
                            );
                            return match o {
                                StoredOutcome::Answer(bytes) => {
                                    let decode = durable.expect("kept only with a codec").1 .1;
                                    decode(&bytes).ok_or_else(|| {
                                        Error::internal(format!("{rpc}: kept answer unreadable"))
                                    })
                                }
                                StoredOutcome::Error { kind, message } => {
                                    Err(Error::new(kind_named(&kind), message))
                                }
                            };
                        }
                        Some(k) => {
                            tracing::info!(
                                request_id,
                                rpc,
                                target = %k.target,
                                "retry of an attempt a restart interrupted: running it again"
                            );
                            Attempt::AfterRestart { target: k.target }
                        }
                        None => Attempt::First,
                    };
                    if entries.len() >= self.max {
                        return Err(Error::exhausted(format!(
                            "too many requests with a request_id in flight ({}); retry later",
                            self.max
                        )));
                    }
                    let (target, op) = prepare(attempt)?;
                    let (tx, rx) = watch::channel(None);
                    entries.insert(
                        key,
                        Entry {
                            rpc,
                            fingerprint,
                            started: Instant::now(),
                            outcome: rx.clone(),
                        },
                    );
                    let (scope, id) = (scope.to_owned(), request_id.to_owned());
                    let (keep, pruned) = (self.keep, self.pruned.clone());
                    tokio::spawn(async move {
                        let mut row = StoredRequest {
                            rpc: rpc.to_owned(),
                            fingerprint,
                            started: unix_now(),
                            target,
                            outcome: None,
                        };
                        // Kept before the operation touches anything, so a
                        // retry after a crash knows it began.
                        if let Some((d, _)) = &durable {
                            if let Err(e) = d.put(&scope, &id, &row) {
                                let e = Error::internal(format!(
                                    "{rpc}: could not keep request {id}: {e}"
                                ));
                                let _ = tx.send(Some(Err((e.kind(), e.message().to_owned()))));
                                return;
                            }
                        }
                        let result = op.await;
                        if let Some((d, (encode, _))) = &durable {
                            row.outcome = Some(match &result {
                                Ok(v) => StoredOutcome::Answer(encode(v)),
                                Err(e) => StoredOutcome::Error {
                                    kind: format!("{:?}", e.kind()),
                                    message: e.message().to_owned(),
                                },
                            });
                            if let Err(e) = d.put(&scope, &id, &row) {
                                tracing::warn!(request_id = %id, rpc, error = %e,
                                    "could not keep the outcome: a retry after a restart runs again");
                            }
                            prune_durable(d.as_ref(), keep, &pruned);
                        }
                        let out: Outcome = match result {
                            Ok(v) => Ok(Arc::new(v)),
                            Err(e) => Err((e.kind(), e.message().to_owned())),
                        };
                        let _ = tx.send(Some(out));
                    });
                    rx
                }
            }
        };
        let done = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::internal(format!("{rpc}: the operation's task failed")))?
            .clone()
            .expect("waited for Some");
        match done {
            Ok(v) => v
                .downcast_ref::<T>()
                .cloned()
                .ok_or_else(|| Error::internal(format!("{rpc}: answer of another type"))),
            Err((kind, message)) => Err(Error::new(kind, message)),
        }
    }

    /// Drops finished outcomes older than `keep`, then the oldest finished
    /// ones while the log is full.
    fn prune(&self, entries: &mut HashMap<(String, String), Entry>) {
        let finished = |e: &Entry| e.outcome.borrow().is_some();
        entries.retain(|_, e| !finished(e) || e.started.elapsed() < self.keep);
        if entries.len() < self.max {
            return;
        }
        let mut done: Vec<_> = entries
            .iter()
            .filter(|(_, e)| finished(e))
            .map(|(k, e)| (e.started, k.clone()))
            .collect();
        done.sort();
        let excess = entries.len() + 1 - self.max;
        for (_, k) in done.into_iter().take(excess) {
            entries.remove(&k);
        }
    }

    /// True when `request_id` in `scope` has an outcome (or a running
    /// attempt) kept: a handler that checks something before running its
    /// operation (a name being free) skips that check for a retry.
    pub fn knows(&self, scope: &str, request_id: &str) -> bool {
        if request_id.is_empty() {
            return false;
        }
        let in_memory = self
            .entries
            .lock()
            .unwrap()
            .contains_key(&(scope.to_owned(), request_id.to_owned()));
        in_memory
            || self
                .durable
                .as_ref()
                .is_some_and(|d| matches!(d.get(scope, request_id), Ok(Some(_))))
    }

    /// How many outcomes (finished or running) the log holds.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops durably kept requests older than `keep`, at most once a minute.
fn prune_durable(d: &dyn DurableOutcomes, keep: Duration, pruned: &Mutex<Option<Instant>>) {
    {
        let mut last = pruned.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return;
        }
        *last = Some(Instant::now());
    }
    match d.prune(unix_now().saturating_sub(keep.as_secs())) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(n, "kept requests past their time dropped"),
        Err(e) => tracing::warn!(error = %e, "could not drop kept requests"),
    }
}

/// Runs `op` as a task of the daemon's own: the caller going away (its
/// future dropped) does not stop it.
pub async fn detached<T, F>(op: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    match tokio::spawn(op).await {
        Ok(r) => r,
        Err(e) => Err(Error::internal(format!("operation task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn counting(runs: &Arc<AtomicU32>, answer: Result<u32>) -> impl Future<Output = Result<u32>> {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer
        }
    }

    #[tokio::test]
    async fn a_retry_gets_the_first_attempts_result_without_running_again() {
        let log = RequestLog::default();
        let runs = Arc::new(AtomicU32::new(0));
        // Two concurrent attempts and a late one: one run.
        let (a, b) = tokio::join!(
            log.run("p", "r1", "Create", 7, counting(&runs, Ok(1))),
            log.run("p", "r1", "Create", 7, counting(&runs, Ok(2))),
        );
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
        let c = log.run("p", "r1", "Create", 7, counting(&runs, Ok(3)));
        assert_eq!(c.await.unwrap(), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Errors are results too.
        let e = log
            .run::<u32, _>(
                "p",
                "r2",
                "Create",
                7,
                counting(&runs, Err(Error::exists("vm x"))),
            )
            .await
            .unwrap_err();
        let again = log
            .run::<u32, _>("p", "r2", "Create", 7, counting(&runs, Ok(9)))
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind(), again.kind()),
            (ErrorKind::AlreadyExists, ErrorKind::AlreadyExists)
        );
        assert_eq!(again.message(), "vm x");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // Another scope has its own ids; no id: always run.
        assert_eq!(
            log.run("q", "r1", "Create", 7, counting(&runs, Ok(4)))
                .await
                .unwrap(),
            4
        );
        assert_eq!(
            log.run("p", "", "Create", 7, counting(&runs, Ok(5)))
                .await
                .unwrap(),
            5
        );
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_reused_id_with_other_arguments_or_rpc_is_refused() {
        let log = RequestLog::default();
        let runs = Arc::new(AtomicU32::new(0));
        log.run("p", "r", "Create", 1, counting(&runs, Ok(1)))
            .await
            .unwrap();
        for (rpc, fp) in [("Create", 2), ("Delete", 1)] {
            let e = log
                .run("p", "r", rpc, fp, counting(&runs, Ok(2)))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        }
        let e = log
            .run("p", "bad id!", "Create", 1, counting(&runs, Ok(2)))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_operation_outlives_a_caller_that_gives_up() {
        let log = Arc::new(RequestLog::default());
        let runs = Arc::new(AtomicU32::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let op = async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(());
            Ok(1u32)
        };
        // The caller's deadline passes long before the operation ends.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), log.run("p", "r", "Start", 0, op))
                .await;
        assert!(gave_up.is_err());
        rx.await.expect("the operation ran to its end");
        // And the retry gets its result.
        assert_eq!(
            log.run("p", "r", "Start", 0, counting(&runs, Ok(2)))
                .await
                .unwrap(),
            1
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // Without an id, too.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tokio::time::timeout(
            Duration::from_millis(10),
            log.run("p", "", "Start", 0, async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(());
                Ok(0u32)
            }),
        )
        .await;
        rx.await.expect("ran to its end");
    }

    /// A daemon's durable store, in memory: what survives a "restart"
    /// (a new log over the same rows).
    #[derive(Default)]
    struct Rows(Mutex<HashMap<(String, String), StoredRequest>>);

    impl DurableOutcomes for Rows {
        fn get(&self, scope: &str, id: &str) -> Result<Option<StoredRequest>> {
            let rows = self.0.lock().unwrap();
            Ok(rows.get(&(scope.to_owned(), id.to_owned())).cloned())
        }
        fn put(&self, scope: &str, id: &str, r: &StoredRequest) -> Result<()> {
            let mut rows = self.0.lock().unwrap();
            rows.insert((scope.to_owned(), id.to_owned()), r.clone());
            Ok(())
        }
        fn prune(&self, before: u64) -> Result<usize> {
            let mut rows = self.0.lock().unwrap();
            let n = rows.len();
            rows.retain(|_, r| r.started >= before);
            Ok(n - rows.len())
        }
    }

    /// `prepare` for run_resolved: records the attempt it was given and
    /// runs `counting`.
    fn resolved(
        runs: &Arc<AtomicU32>,
        seen: &Arc<Mutex<Vec<Attempt>>>,
        answer: Result<String>,
    ) -> impl FnOnce(Attempt) -> Result<(String, BoxedOp)> {
        let (runs, seen) = (runs.clone(), seen.clone());
        move |a| {
            seen.lock().unwrap().push(a);
            let op: BoxedOp = Box::pin(async move {
                runs.fetch_add(1, Ordering::SeqCst);
                answer
            });
            Ok(("vm-uuid-1".to_owned(), op))
        }
    }

    type BoxedOp = std::pin::Pin<Box<dyn Future<Output = Result<String>> + Send>>;

    #[tokio::test]
    async fn kept_durably_a_retry_after_a_restart_gets_the_first_answer() {
        let rows = Arc::new(Rows::default());
        let runs = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = RequestLog::default().with_durable(rows.clone());
        let first = log
            .run_resolved(
                "p",
                "r1",
                "Start",
                7,
                resolved(&runs, &seen, Ok("one".into())),
            )
            .await
            .unwrap();
        let failed = log
            .run_resolved(
                "p",
                "r2",
                "Stop",
                7,
                resolved(&runs, &seen, Err(Error::precondition("vm x is Stopped"))),
            )
            .await
            .unwrap_err();
        assert_eq!((first.as_str(), runs.load(Ordering::SeqCst)), ("one", 2));
        // The log in memory is gone; the rows are not.
        let log = RequestLog::default().with_durable(rows.clone());
        let again = log
            .run_resolved(
                "p",
                "r1",
                "Start",
                7,
                resolved(&runs, &seen, Ok("two".into())),
            )
            .await
            .unwrap();
        assert_eq!(again, "one");
        let e = log
            .run_resolved(
                "p",
                "r2",
                "Stop",
                7,
                resolved(&runs, &seen, Ok("ok".into())),
            )
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind(), e.message()),
            (ErrorKind::FailedPrecondition, failed.message())
        );
        // Another request with a kept id: refused, nothing run.
        let e = log
            .run_resolved("p", "r1", "Stop", 7, resolved(&runs, &seen, Ok("x".into())))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(*seen.lock().unwrap(), vec![Attempt::First, Attempt::First]);
        // `run` (in memory only) keeps nothing durably.
        log.run("p", "r3", "Start", 7, async { Ok(3u32) })
            .await
            .unwrap();
        assert!(rows.get("p", "r3").unwrap().is_none());
    }

    #[tokio::test]
    async fn an_attempt_a_restart_interrupted_runs_again_knowing_its_target() {
        let rows = Arc::new(Rows::default());
        let runs = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        // What a daemon killed during the operation leaves: the request
        // kept, no outcome.
        rows.put(
            "p",
            "r1",
            &StoredRequest {
                rpc: "Destroy".into(),
                fingerprint: 7,
                started: unix_now(),
                target: "vm-uuid-0".into(),
                outcome: None,
            },
        )
        .unwrap();
        let log = RequestLog::default().with_durable(rows.clone());
        let answer = log
            .run_resolved(
                "p",
                "r1",
                "Destroy",
                7,
                resolved(&runs, &seen, Ok("done".into())),
            )
            .await
            .unwrap();
        assert_eq!(answer, "done");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Attempt::AfterRestart {
                target: "vm-uuid-0".into()
            }]
        );
        // Its outcome is kept now.
        let kept = rows.get("p", "r1").unwrap().unwrap();
        assert_eq!(
            kept.outcome,
            Some(StoredOutcome::Answer(b"\x0a\x04done".to_vec()))
        );
        // A refusal by prepare (the guest is not there) is answered, not kept.
        let e = log
            .run_resolved::<String, BoxedOp, _>("p", "r9", "Start", 7, |_| {
                Err(Error::not_found("vm y not found"))
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(rows.get("p", "r9").unwrap().is_none());
        assert_eq!(log.len(), 1);
    }

    #[tokio::test]
    async fn durable_rows_go_after_the_time_they_are_kept() {
        let rows = Arc::new(Rows::default());
        let old = StoredRequest {
            rpc: "Start".into(),
            fingerprint: 1,
            started: unix_now() - 3600,
            target: String::new(),
            outcome: Some(StoredOutcome::Answer(Vec::new())),
        };
        rows.put("p", "old", &old).unwrap();
        let log = RequestLog::new(Duration::from_secs(600), 10).with_durable(rows.clone());
        let runs = Arc::new(AtomicU32::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        log.run_resolved(
            "p",
            "new",
            "Start",
            1,
            resolved(&runs, &seen, Ok("n".into())),
        )
        .await
        .unwrap();
        assert!(rows.get("p", "old").unwrap().is_none());
        assert!(rows.get("p", "new").unwrap().is_some());
    }

    #[tokio::test]
    async fn outcomes_are_kept_for_a_bounded_time_and_number() {
        let log = RequestLog::new(Duration::from_millis(300), 3);
        let now = |v: u32| async move { Ok(v) };
        for i in 0..5u32 {
            log.run("p", &format!("r{i}"), "Create", 0, now(i))
                .await
                .unwrap();
            assert!(log.len() <= 3);
        }
        // The oldest went first: r0 runs again; r4 is still answered.
        assert_eq!(log.run("p", "r4", "Create", 0, now(40)).await.unwrap(), 4);
        assert_eq!(log.run("p", "r0", "Create", 0, now(10)).await.unwrap(), 10);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(log.run("p", "r4", "Create", 0, now(41)).await.unwrap(), 41);
    }
}
