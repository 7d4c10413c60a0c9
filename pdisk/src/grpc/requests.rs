//! Requests with a `request_id` on pdiskd's handlers: run once, retries
//! answered with the first attempt's result ([`stratus_core::requests`],
//! kept in `pdisk.redb` too).

use stratus_core::requests::{fingerprint, Attempt};
use tonic::Status;

use super::Api;
use crate::tenancy::Call;

impl Api {
    /// Runs `op` as pdiskd's own task (`detached`); with a `request_id`,
    /// a retry of the same request by the same caller in the same project
    /// gets the first attempt's result instead of running again
    /// ([`stratus_core::requests`]), across restarts of pdiskd too: a
    /// retry of an attempt a restart interrupted (whose unacknowledged
    /// create reconciliation rolled back) runs again. `msg` is the request
    /// with its request_id cleared.
    pub(super) async fn once<T, M, F>(
        &self,
        call: &Call,
        rpc: &'static str,
        request_id: &str,
        msg: &M,
        op: F,
    ) -> Result<T, Status>
    where
        T: stratus_core::requests::Answer,
        M: prost::Message,
        F: std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
    {
        self.once_resolved(call, rpc, request_id, msg, |_| Ok((String::new(), op)))
            .await
    }

    /// [`Self::once`] for a request that names an existing object: the
    /// name is resolved by `prepare` only when the operation is to run (a
    /// retry answered from a kept outcome resolves nothing, so the retry
    /// of an answered delete is not NotFound). `prepare` is told whether an
    /// earlier attempt was interrupted by a restart, with the object (its
    /// UUID) that attempt resolved the name to, and returns that UUID and
    /// the operation.
    pub(super) async fn once_resolved<T, M, F, P>(
        &self,
        call: &Call,
        rpc: &'static str,
        request_id: &str,
        msg: &M,
        prepare: P,
    ) -> Result<T, Status>
    where
        T: stratus_core::requests::Answer,
        M: prost::Message,
        F: std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
        P: FnOnce(Attempt) -> crate::error::Result<(String, F)>,
    {
        let fp = fingerprint(&msg.encode_to_vec());
        Ok(self
            .requests
            .run_resolved(&caller_key(call), request_id, rpc, fp, prepare)
            .await?)
    }
}

/// For the retry of an attempt a restart interrupted: the UUID that
/// attempt resolved its name to, when the object it names is gone by now
/// (the interrupted delete finished, by reconciliation or in full), so the
/// retry answers as the delete would have instead of NotFound.
pub(super) fn gone_since(attempt: &Attempt, found: &crate::error::Result<impl Sized>) -> bool {
    matches!(attempt, Attempt::AfterRestart { target } if !target.is_empty())
        && matches!(found, Err(e) if e.kind() == crate::error::ErrorKind::NotFound)
}

/// Whose retries share request ids: the caller and the project it acts in.
pub(super) fn caller_key(call: &Call) -> String {
    format!("{}|{}", call.identity, call.scope.project())
}
