//! Reading the event journal: [`EventJournal::follow`] replays what is
//! stored, then follows what is committed, each event exactly once and in
//! seq order (`stratus_core::journal::follow`, shared with pdiskd, says why
//! nothing is lost or repeated at the seam). WatchEvents streams it; the
//! guest service waits on it for QEMU's confirmations.

use std::sync::Arc;

use futures::stream::BoxStream;

use crate::store::{AgentStore, Event};
use stratus_core::error::Result;

/// Events one reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// A guest's UUID or name; None: every event (host events too).
    vm: Option<String>,
    /// Only events of this project's guests; None: every project's.
    project: Option<String>,
}

impl EventFilter {
    pub fn all() -> EventFilter {
        EventFilter::default()
    }

    /// The events of one guest, by UUID or name: a destroyed guest's events
    /// stay in the journal under both.
    pub fn vm(uuid_or_name: impl Into<String>) -> EventFilter {
        EventFilter {
            vm: Some(uuid_or_name.into()),
            project: None,
        }
    }

    /// Narrows the filter to the events of `project`'s guests (never host
    /// events, which belong to no project).
    pub fn in_project(self, project: impl Into<String>) -> EventFilter {
        EventFilter {
            project: Some(project.into()),
            ..self
        }
    }

    pub fn matches(&self, e: &Event) -> bool {
        let in_project = match &self.project {
            None => true,
            Some(p) => !e.vm_uuid.is_nil() && e.project == *p,
        };
        in_project
            && match &self.vm {
                None => true,
                Some(f) => e.vm_uuid.to_string() == *f || e.vm_name == *f,
            }
    }
}

/// Events in the journal of an [`AgentStore`], replayed then followed.
#[derive(Clone)]
pub struct EventJournal {
    store: Arc<AgentStore>,
}

impl EventJournal {
    pub fn new(store: Arc<AgentStore>) -> EventJournal {
        EventJournal { store }
    }

    /// The events after `since` that `filter` wants: those journaled, then
    /// each one as it is committed, forever. The live subscription starts
    /// with this call, so a caller that calls it before acting sees every
    /// event the action causes.
    pub fn follow(&self, since: u64, filter: EventFilter) -> BoxStream<'static, Result<Event>> {
        self.read(since, filter, true)
    }

    /// The events after `since` that `filter` wants, up to the journal's end.
    pub fn replay(&self, since: u64, filter: EventFilter) -> BoxStream<'static, Result<Event>> {
        self.read(since, filter, false)
    }

    fn read(
        &self,
        since: u64,
        filter: EventFilter,
        follow: bool,
    ) -> BoxStream<'static, Result<Event>> {
        stratus_core::journal::follow(
            self.store.clone(),
            since,
            move |e| filter.matches(e),
            follow,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Cause, EventType};
    use crate::store::NewEvent;
    use futures::StreamExt;

    fn host_event(i: u64) -> NewEvent {
        NewEvent::image(EventType::ImagePullProgress, Cause::Api, "", "", i, 0)
    }

    async fn collect_until(stream: &mut BoxStream<'static, Result<Event>>, last: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.last() != Some(&last) {
            let e = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next())
                .await
                .expect("the stream stalled")
                .expect("the stream ended")
                .unwrap();
            seqs.push(e.seq);
        }
        seqs
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follow_neither_loses_nor_repeats_at_the_replay_live_seam() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AgentStore::open(dir.path()).unwrap());
        let journal = EventJournal::new(store.clone());
        const TOTAL: u64 = 3000;
        for i in 0..500 {
            store.record_host(&[host_event(i)]).unwrap();
        }
        // A writer appends the rest while readers start at moments spread
        // over its run: each one starts replaying while appends go on.
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 500..TOTAL {
                    store.record_host(&[host_event(i)]).unwrap();
                    if i % 250 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut readers = Vec::new();
        for since in [0u64, 100, 499] {
            let mut s = journal.follow(since, EventFilter::all());
            readers.push(tokio::spawn(async move {
                (since, collect_until(&mut s, TOTAL).await)
            }));
            tokio::task::yield_now().await;
        }
        writer.join().unwrap();
        for r in readers {
            let (since, seqs) = r.await.unwrap();
            let want: Vec<u64> = (since + 1..=TOTAL).collect();
            assert_eq!(seqs, want, "reader from {since}");
        }
    }

    #[tokio::test]
    async fn a_reader_that_lags_rereads_the_journal_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AgentStore::open_with_live_capacity(dir.path(), 4).unwrap());
        let journal = EventJournal::new(store.clone());
        let mut s = journal.follow(0, EventFilter::all());
        // Committed while the reader does not read: its subscription lags.
        for i in 0..100 {
            store.record_host(&[host_event(i)]).unwrap();
        }
        let seqs = collect_until(&mut s, 100).await;
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        // And it goes on live after catching up.
        store.record_host(&[host_event(100)]).unwrap();
        assert_eq!(collect_until(&mut s, 101).await, vec![101]);
    }

    #[tokio::test]
    async fn replay_ends_at_the_journal_end_and_filters_by_vm() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AgentStore::open(dir.path()).unwrap());
        let journal = EventJournal::new(store.clone());
        for i in 0..5 {
            store.record_host(&[host_event(i)]).unwrap();
        }
        let all: Vec<u64> = journal
            .replay(2, EventFilter::all())
            .map(|e| e.unwrap().seq)
            .collect()
            .await;
        assert_eq!(all, vec![3, 4, 5]);
        let none: Vec<Event> = journal
            .replay(0, EventFilter::vm("web1"))
            .map(|e| e.unwrap())
            .collect()
            .await;
        assert!(none.is_empty());
    }
}
