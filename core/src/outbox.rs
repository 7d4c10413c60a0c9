//! The event journal as an outbox: a [`Publisher`] task sends a daemon's
//! journaled events to the broker in seq order, waits for JetStream's acks,
//! and records the last acknowledged seq durably in the daemon's own store
//! ([`Outbox::set_published_seq`]). After a broker outage, or a crash of the
//! daemon, it resumes after that seq: nothing journaled is skipped.
//!
//! What must stay true:
//! - the published seq only moves forward, and only past events JetStream
//!   acknowledged (an ack means the message is stored in the stream);
//! - everything after it is sent again after any error. The message id
//!   (`<source>:<seq>`, `Nats-Msg-Id`) makes the stream drop a re-send of a
//!   message it already holds (within its duplicate window), and lets a
//!   consumer drop what still gets through twice;
//! - a journal compacted past the published seq (the broker away longer
//!   than the journal's retention) is the one loss: logged as an error
//!   naming the seqs, then the publisher goes on from the oldest held.
//!
//! Sends are pipelined (up to [`WINDOW`] in flight, acks awaited in order),
//! and the published seq is written once per window, not per event.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::error::{ErrorKind, Result};
use crate::nats::{Broker, Outgoing};

/// Events in flight at most (sent, ack not yet awaited).
pub const WINDOW: usize = 256;

/// One journaled event as a message: its seq and what goes to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub seq: u64,
    pub message: Outgoing,
}

/// What a daemon's journal offers its publisher. Calls are short,
/// synchronous store reads and writes; the publisher makes them on a
/// blocking thread.
pub trait Outbox: Send + Sync + 'static {
    /// Journaled events with seq > `after`, in seq order, at most `limit`,
    /// as messages. An OutOfRange error when events after `after` were
    /// compacted away.
    fn messages_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxMessage>>;
    /// The seq from which the journal is complete.
    fn oldest_seq(&self) -> Result<u64>;
    /// The last seq the broker acknowledged (0: none), as stored.
    fn published_seq(&self) -> Result<u64>;
    /// Stores the last acknowledged seq (durably, before returning).
    fn set_published_seq(&self, seq: u64) -> Result<()>;
    /// Notified after each commit to the journal.
    fn committed(&self) -> Arc<Notify>;
}

/// A daemon's store as the outbox of its event journal sees it.
pub trait JournalEvents: Send + Sync + 'static {
    /// The redb database that holds the journal ([`crate::journal`]'s
    /// tables).
    fn journal_db(&self) -> &redb::Database;
    /// Notified after each commit to the journal.
    fn journal_committed(&self) -> Arc<Notify>;
    /// As [`Outbox::messages_after`], the messages published as `host`.
    fn messages(&self, host: &str, after: u64, limit: usize) -> Result<Vec<OutboxMessage>>;
}

/// A daemon's event journal as its publisher's outbox: the seqs are the
/// journal's own, the messages the store's ([`JournalEvents`]).
pub struct JournalOutbox<S> {
    store: Arc<S>,
    host: String,
}

impl<S> JournalOutbox<S> {
    pub fn new(store: Arc<S>, host: impl Into<String>) -> JournalOutbox<S> {
        JournalOutbox {
            store,
            host: host.into(),
        }
    }
}

impl<S: JournalEvents> Outbox for JournalOutbox<S> {
    fn messages_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxMessage>> {
        self.store.messages(&self.host, after, limit)
    }

    fn oldest_seq(&self) -> Result<u64> {
        crate::journal::oldest_seq(self.store.journal_db())
    }

    fn published_seq(&self) -> Result<u64> {
        crate::journal::published_seq(self.store.journal_db())
    }

    fn set_published_seq(&self, seq: u64) -> Result<()> {
        crate::journal::set_published_seq(self.store.journal_db(), seq)
    }

    fn committed(&self) -> Arc<Notify> {
        self.store.journal_committed()
    }
}

/// Where the publisher is, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStatus {
    /// The last seq the broker acknowledged.
    pub published_seq: u64,
    /// The last publish round failed (the broker is away or refused).
    pub failing: bool,
    /// Events lost to the broker because the journal was compacted first.
    pub lost_to_compaction: u64,
}

/// A running publisher as `/metrics` sees it: its status beside the last
/// seq journaled, read at each scrape.
pub struct PublisherLag {
    stream: &'static str,
    status: watch::Receiver<PublisherStatus>,
    last_seq: Box<dyn Fn() -> Result<u64> + Send + Sync>,
}

impl PublisherLag {
    /// `stream` names what it publishes (`events`, `usage`); `last_seq`
    /// reads the journal's last seq.
    pub fn new(
        stream: &'static str,
        status: watch::Receiver<PublisherStatus>,
        last_seq: impl Fn() -> Result<u64> + Send + Sync + 'static,
    ) -> PublisherLag {
        PublisherLag {
            stream,
            status,
            last_seq: Box::new(last_seq),
        }
    }

    /// The figures now (a journal that cannot be read shows no lag rather
    /// than a made-up one).
    pub fn figures(&self) -> stratus_pki::metrics::PublisherFigures {
        let s = *self.status.borrow();
        let last_seq = (self.last_seq)().unwrap_or(s.published_seq);
        stratus_pki::metrics::PublisherFigures {
            stream: self.stream,
            last_seq,
            acked_seq: s.published_seq,
            failing: s.failing,
            lost: s.lost_to_compaction,
        }
    }
}

/// The task that empties a daemon's outbox into the broker.
pub struct Publisher<O: Outbox> {
    outbox: Arc<O>,
    broker: Broker,
    status: watch::Sender<PublisherStatus>,
}

impl<O: Outbox> Publisher<O> {
    /// Starts publishing `outbox` through `broker` on a task of its own;
    /// the receiver follows its status.
    pub fn spawn(outbox: Arc<O>, broker: Broker) -> watch::Receiver<PublisherStatus> {
        let (status, rx) = watch::channel(PublisherStatus::default());
        let p = Publisher {
            outbox,
            broker,
            status,
        };
        tokio::spawn(p.run());
        rx
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&O) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let o = self.outbox.clone();
        tokio::task::spawn_blocking(move || f(&o))
            .await
            .expect("outbox store calls do not panic")
    }

    async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut stream_ready = false;
        loop {
            let Err(e) = self.publish_until_error(&mut stream_ready).await;
            // An ack since the last error cleared `failing`: a new outage.
            if !self.status.borrow().failing {
                tracing::warn!(error = %e, "event publisher: the broker failed; retrying");
                backoff = Duration::from_millis(100);
            } else {
                tracing::debug!(error = %e, "event publisher: still failing");
            }
            self.status.send_modify(|s| s.failing = true);
            stream_ready = false;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Publishes windows of events until something fails.
    async fn publish_until_error(&self, stream_ready: &mut bool) -> Result<Infallible> {
        if !*stream_ready {
            self.broker.ensure_stream().await?;
            *stream_ready = true;
        }
        let mut published = self.blocking(|o| o.published_seq()).await?;
        // Where it starts from (stored by an earlier run): the lag on
        // `/metrics` is measured from here until the next ack.
        self.status
            .send_modify(|s| s.published_seq = s.published_seq.max(published));
        let wake = self.outbox.committed();
        loop {
            let batch = match self
                .blocking(move |o| o.messages_after(published, WINDOW))
                .await
            {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::OutOfRange => {
                    let oldest = self.blocking(|o| o.oldest_seq()).await?;
                    let lost = oldest.saturating_sub(published + 1);
                    tracing::error!(
                        first = published + 1,
                        last = oldest - 1,
                        "event publisher: events were compacted out of the journal before the \
                         broker acknowledged them; they never reach the broker"
                    );
                    let to = oldest - 1;
                    self.blocking(move |o| o.set_published_seq(to)).await?;
                    published = to;
                    self.status.send_modify(|s| {
                        s.published_seq = to;
                        s.lost_to_compaction += lost;
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            if batch.is_empty() {
                // A commit after the read above left a permit: no lost wake-up.
                // The timer covers a compaction or a store written by another
                // process.
                let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
                continue;
            }
            let mut pending = Vec::with_capacity(batch.len());
            let mut send_error = None;
            for m in &batch {
                match self.broker.send(&m.message).await {
                    Ok(p) => pending.push((m.seq, p)),
                    Err(e) => {
                        send_error = Some(e);
                        break;
                    }
                }
            }
            let mut acked = published;
            let mut ack_error = None;
            for (seq, p) in pending {
                match p.acked().await {
                    Ok(_) => acked = seq,
                    Err(e) => {
                        ack_error = Some(e);
                        break;
                    }
                }
            }
            if acked > published {
                self.blocking(move |o| o.set_published_seq(acked)).await?;
                published = acked;
                if self.status.borrow().failing {
                    tracing::info!(published_seq = acked, "event publisher: publishing again");
                }
                self.status.send_modify(|s| {
                    s.published_seq = acked;
                    s.failing = false;
                });
            }
            if let Some(e) = ack_error.or(send_error) {
                return Err(e);
            }
        }
    }
}
