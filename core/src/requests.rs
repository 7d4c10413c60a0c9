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
//! InvalidArgument. The log is in memory: a daemon's restart forgets it, and
//! what survives a restart is said by each daemon (a create's record carries
//! its request id, so its retry finds it).

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

impl Default for RequestLog {
    fn default() -> Self {
        RequestLog::new(RequestLog::KEEP, RequestLog::MAX)
    }
}

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
        }
    }

    /// Runs `op` as a task of the daemon's own and answers with its result.
    /// With a non-empty `request_id`, a retry in the same `scope` gets the
    /// first attempt's result instead of running `op` (see the module doc).
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
        if request_id.is_empty() {
            return detached(op).await;
        }
        validate_request_id(request_id)?;
        let key = (scope.to_owned(), request_id.to_owned());
        let mut outcome = {
            let mut entries = self.entries.lock().unwrap();
            self.prune(&mut entries);
            match entries.get(&key) {
                Some(e) if e.rpc != rpc || e.fingerprint != fingerprint => {
                    return Err(Error::invalid(format!(
                        "request_id {request_id} was used by another request ({}); \
                         a retry must repeat its request unchanged",
                        e.rpc
                    )));
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
                    if entries.len() >= self.max {
                        return Err(Error::exhausted(format!(
                            "too many requests with a request_id in flight ({}); retry later",
                            self.max
                        )));
                    }
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
                    tokio::spawn(async move {
                        let out: Outcome = match op.await {
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
        !request_id.is_empty()
            && self
                .entries
                .lock()
                .unwrap()
                .contains_key(&(scope.to_owned(), request_id.to_owned()))
    }

    /// How many outcomes (finished or running) the log holds.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
