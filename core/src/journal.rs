//! An event journal as both daemons keep it: events numbered by a dense
//! seq in their redb database (tables `events` and `meta`), appended in the
//! same write transaction as the state change they announce, and read by
//! [`follow`]: replay from the journal, then live events, each exactly once
//! and in seq order.
//!
//! Why [`follow`] cannot lose or repeat an event at the seam: the live
//! subscription is taken when it is called, before the first journal read;
//! replay reads pages until the journal has nothing after the last seq it
//! gave; live events at or below that seq are skipped; a live event past a
//! gap (possible only if the subscription lagged) first re-reads the gap
//! from the journal. Seqs are dense and given in commit order under the
//! store's commit lock, and a commit is broadcast only after it is durable,
//! so the journal always holds every seq a live subscriber has seen.
//!
//! The `meta` keys: `last_seq` (the next seq is last + 1, never reused),
//! `oldest_seq` (the journal is complete from it on; 1 until a compaction),
//! `published_seq` (the last seq the NATS broker acknowledged, see
//! [`crate::outbox`]).

use std::sync::Arc;

use futures::stream::BoxStream;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::broadcast;

use crate::error::{Error, Result};

/// seq -> the event, JSON.
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// The journal's counters (and, in agentd's store, nothing else).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const LAST_SEQ: &str = "last_seq";
pub const OLDEST_SEQ: &str = "oldest_seq";
pub const PUBLISHED_SEQ: &str = "published_seq";

/// Journal pages read at a time.
const PAGE: usize = 1024;

/// An event a journal holds.
pub trait Journaled: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    fn seq(&self) -> u64;
}

/// Where a journal's events are read from, and told as they commit.
pub trait JournalSource<E>: Send + Sync + 'static {
    /// Journaled events with seq > `since`, in order, at most `limit`;
    /// OutOfRange when `check` and events after `since` were compacted away.
    fn events_after(&self, since: u64, limit: usize, check: bool) -> Result<Vec<E>>;
    /// Live events, from the moment of the call.
    fn subscribe(&self) -> broadcast::Receiver<E>;
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::internal(format!("event journal: corrupt event: {e}"))
}

/// Creates the journal's tables in `tx` (at open).
pub fn create_tables(tx: &WriteTransaction) -> Result<()> {
    tx.open_table(EVENTS)?;
    tx.open_table(META)?;
    Ok(())
}

/// Appends `n` events made by `make(seq)` in `tx`, with the next seqs;
/// the caller commits `tx` (with the state change) and only then tells
/// live readers.
pub fn append<E: Journaled>(
    tx: &WriteTransaction,
    n: usize,
    mut make: impl FnMut(usize, u64) -> E,
) -> Result<Vec<E>> {
    let mut meta = tx.open_table(META)?;
    let mut seq = meta.get(LAST_SEQ)?.map(|v| v.value()).unwrap_or(0);
    let mut journal = tx.open_table(EVENTS)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        seq += 1;
        let e = make(i, seq);
        let bytes = serde_json::to_vec(&e).expect("events serialize");
        journal.insert(seq, bytes.as_slice())?;
        out.push(e);
    }
    meta.insert(LAST_SEQ, seq)?;
    Ok(out)
}

fn meta_value(db: &Database, key: &str, default: u64) -> Result<u64> {
    let tx = db.begin_read()?;
    let t = tx.open_table(META)?;
    let x = t.get(key)?;
    Ok(x.map(|v| v.value()).unwrap_or(default))
}

pub fn last_seq(db: &Database) -> Result<u64> {
    meta_value(db, LAST_SEQ, 0)
}

/// The seq from which the journal is complete.
pub fn oldest_seq(db: &Database) -> Result<u64> {
    meta_value(db, OLDEST_SEQ, 1)
}

/// The last seq the broker acknowledged (0: none).
pub fn published_seq(db: &Database) -> Result<u64> {
    meta_value(db, PUBLISHED_SEQ, 0)
}

/// Stores the last seq the broker acknowledged, durably.
pub fn set_published_seq(db: &Database, seq: u64) -> Result<()> {
    let tx = db.begin_write()?;
    tx.open_table(META)?.insert(PUBLISHED_SEQ, seq)?;
    tx.commit()?;
    Ok(())
}

/// Whether the journal holds the event `seq`.
pub fn has_event(db: &Database, seq: u64) -> Result<bool> {
    let tx = db.begin_read()?;
    let t = tx.open_table(EVENTS)?;
    let x = t.get(seq)?;
    Ok(x.is_some())
}

/// The answer to a read from a compacted point.
pub fn compacted(since: u64, oldest: u64) -> Error {
    Error::out_of_range(format!(
        "events after seq {since} were compacted away; the journal holds every \
         event from seq {oldest} on: list the objects again, then watch from seq {}",
        oldest - 1
    ))
}

/// Journaled events with seq > `since`, in order, at most `limit`;
/// OutOfRange when `check` and events after `since` were compacted away.
pub fn events_after<E: Journaled>(
    db: &Database,
    since: u64,
    limit: usize,
    check: bool,
) -> Result<Vec<E>> {
    let tx = db.begin_read()?;
    if check {
        let oldest = tx
            .open_table(META)?
            .get(OLDEST_SEQ)?
            .map(|v| v.value())
            .unwrap_or(1);
        if since.saturating_add(1) < oldest {
            return Err(compacted(since, oldest));
        }
    }
    let t = tx.open_table(EVENTS)?;
    t.range(since.saturating_add(1)..)?
        .take(limit)
        .map(|r| {
            let (_, v) = r?;
            serde_json::from_slice(v.value()).map_err(corrupt)
        })
        .collect()
}

/// Removes every event below `cut` (and moves the oldest seq to it) except
/// those `keep` names, in `tx`. Returns how many it removed.
pub fn remove_before(
    tx: &WriteTransaction,
    cut: u64,
    keep: &std::collections::HashSet<u64>,
) -> Result<u64> {
    let mut journal = tx.open_table(EVENTS)?;
    let mut removed = 0;
    for r in journal.extract_from_if(..cut, |seq, _| !keep.contains(&seq))? {
        r?;
        removed += 1;
    }
    tx.open_table(META)?.insert(OLDEST_SEQ, cut)?;
    Ok(removed)
}

/// The events after `since` that `wants` keeps: those journaled, then (with
/// `live`) each one as it is committed, forever. The live subscription
/// starts with this call, so a caller that calls it before acting sees every
/// event the action causes. A reader from 0 takes what is held; any other
/// start inside a compacted range, or a compaction overtaking this reader,
/// is OutOfRange.
pub fn follow<E, S>(
    source: Arc<S>,
    since: u64,
    wants: impl Fn(&E) -> bool + Send + 'static,
    live: bool,
) -> BoxStream<'static, Result<E>>
where
    E: Journaled,
    S: JournalSource<E>,
{
    let mut rx = source.subscribe();
    Box::pin(async_stream::try_stream! {
        let mut last = since;
        loop {
            let page = source.events_after(last, PAGE, since != 0)?;
            if page.is_empty() {
                break;
            }
            for e in page {
                last = e.seq();
                if wants(&e) {
                    yield e;
                }
            }
        }
        if live {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        if e.seq() <= last {
                            continue;
                        }
                        if e.seq() > last + 1 {
                            let missed = (e.seq() - last - 1) as usize;
                            for m in source.events_after(last, missed, last != 0)? {
                                if wants(&m) {
                                    yield m;
                                }
                            }
                        }
                        last = e.seq();
                        if wants(&e) {
                            yield e;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => loop {
                        let page = source.events_after(last, PAGE, last != 0)?;
                        if page.is_empty() {
                            break;
                        }
                        for m in page {
                            last = m.seq();
                            if wants(&m) {
                                yield m;
                            }
                        }
                    },
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        }
    })
}
