//! CHAP accounts created over tgtd's management socket, so the secret never
//! reaches argv (`tgtadm --mode account --op new` takes it on its command line).

use std::path::PathBuf;

use super::{mgmt, TGTADM_TIMEOUT};
use crate::error::{Error, ErrorKind, Result};
use crate::runner::BoxFuture;
use crate::types::Chap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AccountAdd {
    Created,
    /// An account with that user already exists (its secret is unknown).
    Exists,
}

/// Creates CHAP accounts without putting the secret in argv.
pub(super) trait AccountAdder: Send + Sync {
    fn add<'a>(&'a self, chap: &'a Chap) -> BoxFuture<'a, Result<AccountAdd>>;
}

/// Talks to tgtd's management socket like tgtadm does.
pub(super) struct MgmtSocket {
    pub(super) path: PathBuf,
    pub(super) control_port: u32,
}

impl AccountAdder for MgmtSocket {
    fn add<'a>(&'a self, chap: &'a Chap) -> BoxFuture<'a, Result<AccountAdd>> {
        Box::pin(async move {
            tracing::debug!(user = %chap.user, control_port = self.control_port,
                "tgt: creating CHAP account over the management socket");
            // The exact format tgtadm builds and tgtd's account_mgmt()
            // parses: "user=U,password=P" and a NUL. Chap guarantees neither
            // part contains ',' or '='.
            let mut params =
                format!("user={},password={}\0", chap.user, chap.secret()).into_bytes();
            let r = mgmt::request(
                &self.path,
                mgmt::MODE_ACCOUNT,
                mgmt::OP_NEW,
                mgmt::NO_TID,
                &params,
                TGTADM_TIMEOUT,
            )
            .await;
            params.fill(0);
            std::hint::black_box(&params);
            let tgtd = format!("tgtd (control port {})", self.control_port);
            match r {
                Ok((mgmt::TGTADM_SUCCESS, _)) => Ok(AccountAdd::Created),
                Ok((mgmt::TGTADM_USER_EXIST, _)) => Ok(AccountAdd::Exists),
                Ok((code, _)) => {
                    let kind = match code {
                        mgmt::TGTADM_NOMEM | mgmt::TGTADM_TOO_MANY_USER => {
                            ErrorKind::ResourceExhausted
                        }
                        mgmt::TGTADM_NO_DRIVER => ErrorKind::Unavailable,
                        _ => ErrorKind::Internal,
                    };
                    Err(Error::new(
                        kind,
                        format!(
                            "creating CHAP account {} on {tgtd}: {}",
                            chap.user,
                            mgmt::strerror(code)
                        ),
                    ))
                }
                Err(e) => Err(Error::unavailable(format!(
                    "creating CHAP account {} on {tgtd}: management socket {}: {e}",
                    chap.user,
                    self.path.display()
                ))),
            }
        })
    }
}
