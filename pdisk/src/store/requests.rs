//! Requests with an id (`requests`), kept in pdisk.redb so that a retry
//! after pdiskd was killed and restarted gets the first attempt's answer
//! ([`stratus_core::requests`]): the request is written before its
//! operation starts and its answer or error before it is answered. Rows go
//! after [`stratus_core::requests::RequestLog::KEEP`].

use redb::{ReadableDatabase, TableDefinition};
use stratus_core::requests::{DurableOutcomes, StoredRequest};

use super::{decode, encode, Store};
use crate::error::Result;

/// (caller scope, request id) -> its [`StoredRequest`].
pub(super) const REQUESTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("requests");

impl DurableOutcomes for Store {
    fn get(&self, scope: &str, request_id: &str) -> Result<Option<StoredRequest>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REQUESTS)?;
        let x = t.get((scope, request_id))?;
        x.map(|v| decode("request", v.value())).transpose()
    }

    fn put(&self, scope: &str, request_id: &str, request: &StoredRequest) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(REQUESTS)?;
            t.insert((scope, request_id), encode(request).as_slice())?;
        }
        Ok(tx.commit()?)
    }

    fn prune(&self, before: u64) -> Result<usize> {
        let tx = self.db.begin_write()?;
        let mut removed = 0;
        {
            let mut t = tx.open_table(REQUESTS)?;
            t.retain(|_, v| {
                let keep =
                    serde_json::from_slice::<StoredRequest>(v).is_ok_and(|r| r.started >= before);
                removed += usize::from(!keep);
                keep
            })?;
        }
        tx.commit()?;
        Ok(removed)
    }
}
