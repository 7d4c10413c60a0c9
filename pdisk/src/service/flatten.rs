//! Background flattening: a clone whose chain of parents passed the
//! backend's maximum depth (rbd: `--rbd-max-clone-depth`, Cinder's
//! `rbd_max_clone_depth`) is published at once, usable, with a durable
//! `flatten_pending` mark in its record; this task flattens marked volumes
//! one at a time, oldest first, and clears the mark with VOLUME_FLATTENED.
//! A failed attempt journals VOLUME_FLATTEN_FAILED with the error (one
//! event per attempt) and is retried after [`FLATTEN_RETRY`].
//!
//! Crash order: the mark is stored in the same transaction that makes the
//! clone `ready` (intent); the flatten runs (effect; it is idempotent, and
//! one of a volume with no parent does nothing); then the mark is cleared
//! with the event (commit). A pdiskd killed at any point finds the mark at
//! start and flattens again.
//!
//! The volume's lock is not held while the data moves (exports, snapshots
//! and resizes go on; librbd hands the flatten to whoever holds the
//! image's exclusive lock). A delete (or a purge) of a volume being
//! flattened waits for that flatten to end, then deletes: killing `rbd
//! flatten` would leave its watch on the image for the OSDs' watch timeout
//! (30 s), during which `rbd rm` is refused. A volume still waiting its
//! turn is deleted at once, and the task skips it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::backend::ObjectId;
use crate::events::{NewPoolEvent, PoolEventKind};
use crate::store::VolumeState;

use super::PoolService;

/// How long the task waits after a failed flatten before trying again.
const FLATTEN_RETRY: Duration = Duration::from_secs(60);

/// A flatten in progress, as Get shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlattenProgress {
    /// Bytes of `total` done, from the backend's progress.
    pub done: u64,
    pub total: u64,
    /// False while the volume waits its turn.
    pub running: bool,
}

/// The flatten the task is running now, if any.
#[derive(Default)]
pub(super) struct Flattening {
    current: Mutex<Option<Running>>,
}

struct Running {
    volume: Uuid,
    progress: Arc<Mutex<(u64, u64)>>,
    /// Turns true when the flatten ended (whatever its result).
    ended: tokio::sync::watch::Receiver<bool>,
}

impl PoolService {
    /// The progress of volume `v`'s flatten: None unless it is marked.
    pub(super) fn flatten_progress(&self, v: Uuid, pending: bool) -> Option<FlattenProgress> {
        if !pending {
            return None;
        }
        let cur = self.flattening.current.lock().unwrap();
        Some(match cur.as_ref().filter(|r| r.volume == v) {
            Some(r) => {
                let (done, total) = *r.progress.lock().unwrap();
                FlattenProgress {
                    done,
                    total,
                    running: true,
                }
            }
            None => FlattenProgress::default(),
        })
    }

    /// Waits until no flatten of volume `v` runs (see the module doc).
    pub(super) async fn wait_for_flatten(&self, v: Uuid) {
        let ended = {
            let cur = self.flattening.current.lock().unwrap();
            match cur.as_ref().filter(|r| r.volume == v) {
                Some(r) => r.ended.clone(),
                None => return,
            }
        };
        tracing::info!(volume = %v, "waiting for the volume's flatten to end");
        let mut ended = ended;
        // An error: the task dropped its sender, which also means it ended.
        let _ = ended.wait_for(|e| *e).await;
    }

    /// Runs until shutdown: flattens every marked volume, oldest first,
    /// woken when a clone is marked; a failure is retried after
    /// [`FLATTEN_RETRY`]. Marks found at start are resumed at once.
    pub async fn watch_flattens(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let mut failed = false;
            for v in self.volumes_to_flatten() {
                tokio::select! {
                    ok = self.flatten_one(v) => failed |= !ok,
                    _ = shutdown.changed() => return,
                }
            }
            let wait = if failed {
                FLATTEN_RETRY
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.flatten_wanted.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Marked volumes that can be flattened now, oldest first.
    fn volumes_to_flatten(&self) -> Vec<Uuid> {
        let mut vs: Vec<_> = match self.store.volumes() {
            Ok(vs) => vs,
            Err(e) => {
                tracing::warn!(error = %e, "flatten: store not readable");
                return Vec::new();
            }
        };
        vs.retain(|v| v.flatten_pending && v.state == VolumeState::Ready && v.quarantine.is_none());
        vs.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        vs.into_iter().map(|v| v.uuid).collect()
    }

    /// Flattens volume `u` if it is still marked, then clears the mark.
    /// False when the flatten failed (the mark stays).
    async fn flatten_one(&self, u: Uuid) -> bool {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let progress = Arc::new(Mutex::new((0, 0)));
        // Registered under the volume's lock: a delete (which holds it from
        // its wait for a flatten until the record is `deleting`) either
        // finds this flatten and waits, or has made the volume `deleting`
        // before this reads it.
        let rec = {
            let _g = self.locks.lock(u).await;
            let Ok(Some(rec)) = self.store.volume(u) else {
                return true;
            };
            if !rec.flatten_pending || rec.state != VolumeState::Ready || rec.quarantine.is_some() {
                return true;
            }
            *progress.lock().unwrap() = (0, rec.size.0);
            *self.flattening.current.lock().unwrap() = Some(Running {
                volume: u,
                progress: progress.clone(),
                ended: rx,
            });
            rec
        };
        tracing::info!(volume = %rec.name, uuid = %u, "flattening a deep clone in the background");
        let reporter: crate::backend::ProgressFn = Arc::new(move |_phase: &str, done, total| {
            *progress.lock().unwrap() = (done, total);
        });
        let result = self.backend.flatten(ObjectId::Volume(u), reporter).await;
        // Ended: a delete waiting for it may go on (it holds the lock this
        // takes next, so this must come first).
        *self.flattening.current.lock().unwrap() = None;
        let _ = tx.send(true);
        if let Err(e) = result {
            tracing::warn!(volume = %rec.name, error = %e, "background flatten failed; retried later");
            let failed = NewPoolEvent::volume(PoolEventKind::VolumeFlattenFailed, &rec)
                .detail(format!("{e}; retried in {} s", FLATTEN_RETRY.as_secs()));
            if let Err(e) = self.store.record(&[failed]) {
                tracing::warn!(volume = %rec.name, error = %e, "could not journal a failed flatten");
            }
            return false;
        }
        let _g = self.locks.lock(u).await;
        let mut rec = match self.store.volume(u) {
            Ok(Some(r)) if r.flatten_pending => r,
            // Deleted meanwhile, or flattened on request.
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(volume = %u, error = %e, "flatten: store not readable");
                return false;
            }
        };
        rec.flatten_pending = false;
        let done = NewPoolEvent::volume(PoolEventKind::VolumeFlattened, &rec);
        if let Err(e) = self.store.update_volume(&rec, &[done]) {
            tracing::warn!(volume = %rec.name, error = %e, "flatten: mark not cleared; flattened again later");
            return false;
        }
        tracing::info!(volume = %rec.name, uuid = %u, "background flatten done");
        true
    }
}
