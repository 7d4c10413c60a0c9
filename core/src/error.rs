//! The one error type of pdiskd, agentd and their CLIs.
//!
//! Every failure carries a [`ErrorKind`] that maps onto exactly one gRPC status
//! code, a message that names the object and the cause, and optionally the
//! underlying source. Both directions of that map live here and nowhere else:
//! [`ErrorKind::code`] (an error becomes the status a daemon answers) and
//! [`ErrorKind::from_code`] (a status a peer answered becomes an error, as
//! [`Error::from_status`] does for the agent's calls to pdisk).

use std::fmt;

/// What went wrong, in the terms a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request already exists (name taken, snapshot exists).
    AlreadyExists,
    /// A dependency (tgtd, LVM, qemu-img) is down or not answering.
    Unavailable,
    /// The request is not allowed in the current state (exported, in use, has dependents).
    FailedPrecondition,
    /// A bug or an unexpected failure of the host.
    Internal,
    /// The request is malformed; nothing was changed.
    InvalidArgument,
    /// The object does not exist.
    NotFound,
    /// The request asks for what is no longer held (a compacted range of
    /// agentd's event journal); the message says what is.
    OutOfRange,
    /// The caller is known but may not do this (a host file for a
    /// non-admin, an export to another host's initiator); nothing changed.
    PermissionDenied,
    /// The pool (or host) has no room for it.
    ResourceExhausted,
}

impl ErrorKind {
    /// The gRPC status code a daemon answers with for this kind.
    pub fn code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Internal => Code::Internal,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        }
    }

    /// The kind of a status code a peer answered with: the inverse of
    /// [`ErrorKind::code`], plus the codes no daemon of ours sends. A call
    /// that timed out, was cancelled or got no well-formed answer is
    /// Unavailable (the peer may answer a retry); anything else we do not
    /// expect is Internal.
    pub fn from_code(code: tonic::Code) -> ErrorKind {
        use tonic::Code;
        match code {
            Code::NotFound => ErrorKind::NotFound,
            Code::InvalidArgument => ErrorKind::InvalidArgument,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::OutOfRange => ErrorKind::OutOfRange,
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        }
    }
}

/// An error with a kind, a message naming the object and the cause, and a source.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, message)
    }
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceExhausted, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// An I/O error on `what` (a path or an object), classified: ENOSPC and
    /// EDQUOT become ResourceExhausted, ENOENT NotFound, the rest Internal.
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::ResourceExhausted,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, format!("{what}: {err}")).with_source(err)
    }

    /// Prefixes the message with context, keeping the kind.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }

    /// The status `peer` (e.g. "pdisk") answered to the step `what`, as our
    /// error: the kind from its code ([`ErrorKind::from_code`]), the message
    /// naming the step, and, when the peer could not be reached or sent no
    /// message, saying that the peer is unavailable.
    pub fn from_status(s: tonic::Status, peer: &str, what: &str) -> Self {
        let kind = ErrorKind::from_code(s.code());
        let message = if s.code() == tonic::Code::Unavailable || s.message().is_empty() {
            format!("{what}: {peer} unavailable: {}", s.message())
        } else {
            format!("{what}: {}", s.message())
        };
        Error::new(kind, message)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.kind.code(), e.message)
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::internal(format!("metadata store: {e}")).with_source(e)
    }
}

macro_rules! redb_into_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::from(redb::Error::from(e))
            }
        }
    )*};
}
redb_into_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_grpc_codes() {
        let s: tonic::Status = Error::precondition("volume db1 is exported").into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(s.message(), "volume db1 is exported");
        let s: tonic::Status =
            Error::io("pool/x", std::io::Error::from_raw_os_error(libc::ENOSPC)).into();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
    }

    const KINDS: [ErrorKind; 9] = [
        ErrorKind::AlreadyExists,
        ErrorKind::Unavailable,
        ErrorKind::FailedPrecondition,
        ErrorKind::Internal,
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::OutOfRange,
        ErrorKind::PermissionDenied,
        ErrorKind::ResourceExhausted,
    ];

    #[test]
    fn a_kind_survives_the_round_trip_through_a_status() {
        for kind in KINDS {
            let status: tonic::Status = Error::new(kind, "volume db1: why").into();
            let back = Error::from_status(status, "pdisk", "attaching db1");
            assert_eq!(back.kind(), kind, "{kind:?}");
        }
    }

    #[test]
    fn a_peer_status_names_the_step_and_an_unreachable_peer() {
        let e = Error::from_status(
            tonic::Status::failed_precondition("volume db1 is exported"),
            "pdisk",
            "deleting db1",
        );
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(e.message(), "deleting db1: volume db1 is exported");

        let e = Error::from_status(
            tonic::Status::unavailable("connection refused"),
            "pdisk",
            "exporting db1",
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(
            e.message(),
            "exporting db1: pdisk unavailable: connection refused"
        );

        // Codes our daemons never send: a timeout may pass, the rest is a bug.
        let e = Error::from_status(tonic::Status::deadline_exceeded(""), "pdisk", "x");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.message(), "x: pdisk unavailable: ");
        let e = Error::from_status(tonic::Status::unimplemented("no"), "pdisk", "x");
        assert_eq!(e.kind(), ErrorKind::Internal);
    }

    #[test]
    fn the_source_is_kept_and_displayed_as_the_message() {
        use std::error::Error as _;
        let e = Error::io("pool/x", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), e.message());
        assert!(e.source().is_some());
        assert!(Error::internal("x").source().is_none());
    }
}
