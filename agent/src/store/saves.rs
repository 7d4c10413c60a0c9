//! SaveImage's intent (`image_saves`): a save is written here before its
//! snapshot is asked of pdisk, updated once the snapshot exists, and
//! removed in the same transaction as its final event (IMAGE_SAVED or
//! IMAGE_SAVE_FAILED), so reconciliation finds every save a crash
//! interrupted and journals exactly one outcome for each.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{db_err, decode, encode, AgentStore, Event, NewEvent, IMAGE_SAVES};
use crate::spec::ServerName;
use stratus_core::error::Result;

/// A save in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSave {
    /// `save-<12 hex>`: the snapshot's name and, with `snap-`/`clone-`
    /// before it, the request ids of pdisk's snapshot and clone, so a
    /// retry after a crash joins the call the crash left running.
    pub id: String,
    pub vm: Uuid,
    pub vm_name: String,
    pub device: String,
    pub server: ServerName,
    /// The pdisk volume saved and its project.
    pub volume: String,
    pub project: String,
    /// The image base volume to make.
    pub target: String,
    /// The snapshot's UUID once pdisk answered; until then the save is
    /// unacknowledged and a crash rolls it back.
    pub snapshot: Option<String>,
    pub size_bytes: u64,
}

impl AgentStore {
    /// Writes (or rewrites) `save`, with `events`, atomically.
    pub fn put_save(&self, save: &PendingSave, events: &[NewEvent]) -> Result<Vec<Event>> {
        let row = encode(save);
        let put = |tx: &redb::WriteTransaction| -> Result<()> {
            let mut t = tx.open_table(IMAGE_SAVES).map_err(db_err)?;
            t.insert(save.id.as_str(), row.as_slice()).map_err(db_err)?;
            Ok(())
        };
        let _g = self.commit_lock.lock().unwrap();
        self.write(None, None, events, Some(&put))
    }

    /// Removes save `id` and appends its final `events`, atomically.
    pub fn end_save(&self, id: &str, events: &[NewEvent]) -> Result<Vec<Event>> {
        let remove = |tx: &redb::WriteTransaction| -> Result<()> {
            let mut t = tx.open_table(IMAGE_SAVES).map_err(db_err)?;
            t.remove(id).map_err(db_err)?;
            Ok(())
        };
        let _g = self.commit_lock.lock().unwrap();
        self.write(None, None, events, Some(&remove))
    }

    /// Every save in progress.
    pub fn saves(&self) -> Result<Vec<PendingSave>> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(IMAGE_SAVES).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (_, v) = row.map_err(db_err)?;
            out.push(decode("image save", v.value())?);
        }
        Ok(out)
    }
}
