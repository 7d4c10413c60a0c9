//! The one error type of the pdisk crate.
//!
//! Every failure carries a [`ErrorKind`] that maps onto exactly one gRPC status
//! code, a message that names the object and the cause, and optionally the
//! underlying source. `From<Error> for tonic::Status` is the only place where
//! that mapping happens.

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
    /// The pool (or host) has no room for it.
    ResourceExhausted,
}

/// An error with a kind, a message naming the object and the cause, and a source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
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
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
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
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match e.kind {
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Internal => Code::Internal,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        };
        tonic::Status::new(code, e.message)
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
}
