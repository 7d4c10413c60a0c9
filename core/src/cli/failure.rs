//! How a failed command ends: one line on stderr, `{"error": ...}` on stdout
//! with `--json`, and the exit status (1 for the server's refusals and for
//! failures along the way, 2 for bad input, as clap does).

use serde_json::{json, Value};
use tonic::Code;

use super::Remote;

/// Why a command failed.
#[derive(Debug)]
pub enum Failure {
    /// Bad input found before contacting the server; nothing was sent.
    Usage(String),
    /// No connection to the server at all.
    Unreachable {
        /// How messages name the server: "the pdisk server", "the agent".
        server: &'static str,
        url: String,
        cause: String,
    },
    /// The connection broke during a call: whether the server acted is unknown.
    Lost {
        server: &'static str,
        url: String,
        cause: String,
    },
    /// The server answered with an error status.
    Server(tonic::Status),
    /// A failure that is no status from the server: on this side while the
    /// request was under way (reading an upload, a log file), or an outcome
    /// the server reported as data (a VM that did not start).
    Local(String),
}

impl Failure {
    /// Classifies a status from a call to `remote`. Statuses sent by the
    /// server carry no source; those raised on this side from a transport
    /// error do, and mean the server could not be reached or the connection
    /// broke mid-call.
    pub fn from_status(status: tonic::Status, remote: &Remote) -> Failure {
        let Some(source) = std::error::Error::source(&status) else {
            return Failure::Server(status);
        };
        let (server, url, cause) = (remote.server(), remote.url().to_owned(), root_cause(source));
        if status.code() == Code::Unavailable {
            Failure::Unreachable { server, url, cause }
        } else {
            Failure::Lost { server, url, cause }
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            _ => 1,
        }
    }

    /// The gRPC code name that `--json` reports, e.g. "NotFound".
    pub fn code(&self) -> &'static str {
        match self {
            Failure::Usage(_) => "InvalidArgument",
            Failure::Unreachable { .. } | Failure::Lost { .. } => "Unavailable",
            Failure::Server(s) => code_name(s.code()),
            Failure::Local(_) => "Unknown",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::Usage(m) | Failure::Local(m) => one_line(m),
            Failure::Unreachable { server, url, cause } => {
                format!("cannot reach {server} at {url}: {}", one_line(cause))
            }
            Failure::Lost { server, url, cause } => format!(
                "lost the connection to {server} at {url}: {}; \
                 the request may or may not have been carried out",
                one_line(cause)
            ),
            Failure::Server(s) => one_line(s.message()),
        }
    }

    /// The single stderr line: `<program>: <code in words>: <message>`.
    pub fn line(&self, program: &str) -> String {
        let message = self.message();
        match self {
            Failure::Unreachable { .. } | Failure::Lost { .. } | Failure::Local(_) => {
                format!("{program}: {message}")
            }
            _ if message.is_empty() => format!("{program}: {}", code_words(self.code())),
            _ => format!("{program}: {}: {message}", code_words(self.code())),
        }
    }

    pub fn json(&self) -> Value {
        json!({ "error": { "code": self.code(), "message": self.message() } })
    }
}

/// The last, most specific cause in an error's chain: for a refused
/// connection "Connection refused (os error 111)" rather than "transport error".
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Collapses every run of whitespace, newlines included, into one space.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// "FailedPrecondition" as "failed precondition".
pub fn code_words(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_name_the_code_in_words() {
        let f = Failure::Server(tonic::Status::not_found("volume db9 not found"));
        assert_eq!(f.line("pdisk"), "pdisk: not found: volume db9 not found");
        assert_eq!(f.exit_code(), 1);
        assert_eq!(
            f.json().to_string(),
            r#"{"error":{"code":"NotFound","message":"volume db9 not found"}}"#
        );
        let f = Failure::Server(tonic::Status::failed_precondition("volume db1 is exported"));
        assert_eq!(
            f.line("pdisk"),
            "pdisk: failed precondition: volume db1 is exported"
        );
        let f = Failure::Server(tonic::Status::resource_exhausted("no free memory"));
        assert_eq!(
            f.line("agentctl"),
            "agentctl: resource exhausted: no free memory"
        );
    }

    #[test]
    fn messages_stay_on_one_line() {
        let f = Failure::Server(tonic::Status::internal("first\nsecond  third\n"));
        assert_eq!(f.line("pdisk"), "pdisk: internal: first second third");
        let f = Failure::Server(tonic::Status::unavailable(""));
        assert_eq!(f.line("pdisk"), "pdisk: unavailable");
    }

    #[test]
    fn usage_errors_exit_2() {
        let f = Failure::Usage("too many labels (33): at most 32".into());
        assert_eq!(f.exit_code(), 2);
        assert_eq!(
            f.line("pdisk"),
            "pdisk: invalid argument: too many labels (33): at most 32"
        );
        assert_eq!(f.json()["error"]["code"], "InvalidArgument");
    }

    #[test]
    fn unreachable_server_names_the_url() {
        let f = Failure::Unreachable {
            server: "the pdisk server",
            url: "http://127.0.0.1:7400".into(),
            cause: "Connection refused (os error 111)".into(),
        };
        assert_eq!(
            f.line("pdisk"),
            "pdisk: cannot reach the pdisk server at http://127.0.0.1:7400: \
             Connection refused (os error 111)"
        );
        assert_eq!(f.json()["error"]["code"], "Unavailable");
        assert_eq!(f.exit_code(), 1);
    }

    #[test]
    fn transport_errors_raised_here_are_about_the_connection() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let status = tonic::Status::from_error(Box::new(io));
        let f = Failure::from_status(
            status,
            &Remote::new(
                "the pdisk server",
                "http://h:1",
                &crate::cli::TlsArgs::default(),
            ),
        );
        assert!(matches!(f, Failure::Lost { .. }), "{f:?}");
        assert_eq!(
            f.line("pdisk"),
            "pdisk: lost the connection to the pdisk server at http://h:1: connection reset; \
             the request may or may not have been carried out"
        );
        assert_eq!(f.json()["error"]["code"], "Unavailable");
    }

    #[test]
    fn a_server_side_unavailable_stays_a_server_error() {
        let remote = Remote::new(
            "the pdisk server",
            "http://h:1",
            &crate::cli::TlsArgs::default(),
        );
        let f = Failure::from_status(tonic::Status::unavailable("tgtd is down"), &remote);
        assert_eq!(f.line("pdisk"), "pdisk: unavailable: tgtd is down");
    }

    #[test]
    fn local_failures_have_no_code_words() {
        let f = Failure::Local("cannot read /var/log/x: Permission denied".into());
        assert_eq!(
            f.line("agentctl"),
            "agentctl: cannot read /var/log/x: Permission denied"
        );
        assert_eq!(f.json()["error"]["code"], "Unknown");
        assert_eq!(f.exit_code(), 1);
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn root_cause_walks_the_chain() {
        let refused = Layer("Connection refused (os error 111)", None);
        let err = Layer(
            "transport error",
            Some(Box::new(Layer(
                "tcp connect error",
                Some(Box::new(refused)),
            ))),
        );
        assert_eq!(root_cause(&err), "Connection refused (os error 111)");
    }
}
