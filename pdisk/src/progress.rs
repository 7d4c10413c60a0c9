//! Progress of long operations, keyed by a client-chosen request id.
//!
//! A client that wants a progress bar picks a request id, starts the
//! operation with it, and calls WatchProgress(request_id) alongside; the two
//! calls may arrive in either order. Every started operation finishes its
//! entry (on success, on error, and on early return through the guard's Drop),
//! so a watcher never waits for an operation that ended.
//!
//! Request ids are per project: the gRPC layer keys an operation by
//! [`key`] (the project its call acts in, and the client's id), so a
//! watcher sees only operations of calls acting in its own project, and two
//! projects choosing the same id never see each other's progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::ProgressFn;
use crate::error::{Error, Result};

/// Where an operation stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressState {
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub finished: bool,
    pub error: Option<String>,
}

/// How long a finished entry stays for late watchers.
const LINGER: Duration = Duration::from_secs(60);

#[derive(Clone, Default)]
pub struct ProgressHub {
    entries: Arc<Mutex<HashMap<String, watch::Sender<ProgressState>>>>,
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

/// The hub's key of request `id` of a call acting in `project` ("": an
/// admin or agent naming none); empty for an untracked call (empty id).
/// Project names hold no `/`, request ids neither.
pub fn key(project: &str, id: &str) -> Result<String> {
    if id.is_empty() {
        return Ok(String::new());
    }
    validate_request_id(id)?;
    Ok(format!("{project}/{id}"))
}

/// Validates a hub key: a request id, optionally after `project/`.
fn validate_key(key: &str) -> Result<()> {
    validate_request_id(key.rsplit_once('/').map_or(key, |(_, id)| id))
}

impl ProgressHub {
    fn sender(&self, id: &str) -> watch::Sender<ProgressState> {
        self.entries
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_insert_with(|| watch::channel(ProgressState::default()).0)
            .clone()
    }

    /// Starts tracking `request_id` (empty: untracked). The returned guard
    /// reports progress and finishes the entry when dropped.
    pub fn start(&self, request_id: &str) -> Result<Operation> {
        if request_id.is_empty() {
            return Ok(Operation {
                tx: None,
                hub: self.clone(),
                id: String::new(),
            });
        }
        validate_key(request_id)?;
        Ok(Operation {
            tx: Some(self.sender(request_id)),
            hub: self.clone(),
            id: request_id.to_owned(),
        })
    }

    /// A receiver for `request_id`, whether or not the operation started yet.
    pub fn watch(&self, request_id: &str) -> Result<watch::Receiver<ProgressState>> {
        validate_key(request_id)?;
        let tx = self.sender(request_id);
        let rx = tx.subscribe();
        // Forget entries nobody started within LINGER.
        let hub = self.clone();
        let id = request_id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            let mut m = hub.entries.lock().unwrap();
            if m.get(&id)
                .is_some_and(|t| *t.borrow() == ProgressState::default())
            {
                m.remove(&id);
            }
        });
        Ok(rx)
    }

    fn forget_later(&self, id: String) {
        let hub = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(LINGER).await;
                hub.entries.lock().unwrap().remove(&id);
            });
        }
    }
}

/// A tracked operation. Dropping it without `finish` records it as failed.
pub struct Operation {
    tx: Option<watch::Sender<ProgressState>>,
    hub: ProgressHub,
    id: String,
}

impl Operation {
    /// A callback for backends: (phase, done, total).
    pub fn reporter(&self) -> ProgressFn {
        let tx = self.tx.clone();
        Arc::new(move |phase: &str, done: u64, total: u64| {
            if let Some(tx) = &tx {
                tx.send_modify(|s| {
                    if s.phase != phase {
                        s.phase = phase.to_owned();
                    }
                    s.done = done;
                    s.total = total;
                });
            }
        })
    }

    /// Ends the operation with its result.
    pub fn finish<T>(mut self, result: &Result<T>) {
        self.end(result.as_ref().err().map(|e| e.to_string()));
    }

    fn end(&mut self, error: Option<String>) {
        if let Some(tx) = self.tx.take() {
            tx.send_modify(|s| {
                s.finished = true;
                if error.is_none() && s.total > 0 {
                    s.done = s.total;
                }
                s.error = error;
            });
            self.hub.forget_later(std::mem::take(&mut self.id));
        }
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        self.end(Some("operation ended early".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watcher_before_start_sees_progress_and_end() {
        let hub = ProgressHub::default();
        let mut rx = hub.watch("req-1").unwrap();
        let op = hub.start("req-1").unwrap();
        (op.reporter())("copy", 5, 10);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().done, 5);
        op.finish::<()>(&Ok(()));
        rx.changed().await.unwrap();
        let s = rx.borrow().clone();
        assert!(s.finished && s.error.is_none() && s.done == 10);
    }

    #[tokio::test]
    async fn dropped_operation_ends_with_error() {
        let hub = ProgressHub::default();
        let mut rx = hub.watch("req-2").unwrap();
        drop(hub.start("req-2").unwrap());
        rx.changed().await.unwrap();
        assert!(rx.borrow().finished && rx.borrow().error.is_some());
        assert!(hub.start("bad id!").is_err());
    }
}
