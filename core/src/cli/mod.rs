//! Plumbing shared by the Stratus command-line clients (`pdisk`, `agentctl`),
//! so both look and fail alike:
//! - one server flag, `host:port` taken as `http://host:port`, and a
//!   [`Remote`] that connects and turns every gRPC status into a [`Failure`];
//! - results on stdout (a human table, [`Table`] and [`fields`], or JSON with
//!   `--json`), where a closed pipe (`... | head`) is not an error;
//! - every failure as one stderr line `<program>: <code in words>: <message>`,
//!   plus `{"error": {"code", "message"}}` on stdout with `--json`, and exit
//!   status 1 (the server refused, or the call failed) or 2 (bad input);
//! - the command-line values both take ([`args`]);
//! - man pages and shell completions from a binary's clap definition
//!   ([`docs`], for the packages).
//!
//! What a client calls and how it renders its messages stays in its binary.

pub mod args;
pub mod docs;
pub mod failure;
pub mod table;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tonic::transport::Channel;

pub use failure::{root_cause, Failure};
pub use table::{fields, Table};

/// How long to wait for the connection to the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client certificate flags both CLIs take (`--cert --key --ca`, or
/// `STRATUS_CERT`, `STRATUS_KEY`, `STRATUS_CA`), needed for `https://` servers.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Client certificate (PEM) for https:// servers
    #[arg(long, global = true, env = "STRATUS_CERT", value_name = "FILE")]
    pub cert: Option<std::path::PathBuf>,
    /// Client private key (PEM)
    #[arg(long, global = true, env = "STRATUS_KEY", value_name = "FILE")]
    pub key: Option<std::path::PathBuf>,
    /// The cloud's CA certificate (PEM) that signed the server's
    #[arg(long, global = true, env = "STRATUS_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> Result<Option<stratus_pki::TlsFiles>, String> {
        stratus_pki::TlsFiles::from_parts(
            self.cert.clone(),
            self.key.clone(),
            self.ca.clone(),
            ["--cert", "--key", "--ca"],
        )
    }
}

/// The server a command talks to: where it is, and how messages name it.
#[derive(Debug, Clone)]
pub struct Remote {
    server: &'static str,
    url: String,
    dialer: Result<stratus_pki::Dialer, String>,
}

impl Remote {
    /// `server` names it in messages ("the pdisk server", "the agent");
    /// `address` is `unix:/PATH`, `https://HOST:PORT` (`HOST:PORT` alone
    /// means https) or a loopback `http://HOST:PORT`.
    pub fn new(server: &'static str, address: &str, tls: &TlsArgs) -> Remote {
        let dialer = tls.files().and_then(|files| {
            stratus_pki::Dialer::from_address(address, files.as_ref())
                .map(|d| d.with_connect_timeout(CONNECT_TIMEOUT))
                .map_err(|e| format!("{e:#}"))
        });
        let url = match &dialer {
            Ok(d) => d.target().to_string(),
            Err(_) => address.to_owned(),
        };
        Remote {
            server,
            url,
            dialer,
        }
    }

    pub fn server(&self) -> &'static str {
        self.server
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// How to reach the server; a malformed address or unusable
    /// certificate files are a usage error.
    pub fn dialer(&self) -> Result<&stratus_pki::Dialer, Failure> {
        self.dialer
            .as_ref()
            .map_err(|e| Failure::Usage(format!("server {:?}: {e}", self.url)))
    }

    /// Connects; clients call it only after their local checks passed, so
    /// bad input is reported as such even when the server is down.
    pub async fn connect(&self) -> Result<Channel, Failure> {
        self.dialer()?
            .connect()
            .await
            .map_err(|e| Failure::Unreachable {
                server: self.server,
                url: self.url.clone(),
                cause: format!("{e:#}"),
            })
    }

    /// The answer of a call, or why there is none.
    pub fn answer<T>(&self, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Failure> {
        r.map(tonic::Response::into_inner)
            .map_err(|s| self.failure(s))
    }

    /// A status from a call (or from a stream's message) as a failure.
    pub fn failure(&self, status: tonic::Status) -> Failure {
        Failure::from_status(status, self)
    }
}

/// Writes to stdout and flushes, reporting every error, a closed pipe
/// included: commands that follow a stream stop when nobody reads.
pub fn try_write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush())
}

/// Writes to stdout; a closed pipe (`pdisk volume list | head`) is not an error.
pub fn write_stdout(text: &str) -> Result<(), Failure> {
    match try_write_stdout(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Local(format!("cannot write the output: {e}"))),
    }
}

/// Ends a failed command: the JSON error on stdout with `json`, one line
/// prefixed with `program` on stderr, and the failure's exit status.
pub fn report(program: &str, failure: &Failure, json: bool) -> ExitCode {
    if json {
        let _ = write_stdout(&format!("{}\n", failure.json()));
    }
    eprintln!("{}", failure.line(program));
    ExitCode::from(failure.exit_code())
}

/// clap's own exit (help, version, usage errors with status 2), plus the JSON
/// error on stdout when `--json` is on the command line.
pub fn usage_exit(err: clap::Error) -> ! {
    if err.use_stderr() && wants_json(std::env::args_os().skip(1)) {
        let _ = write_stdout(&format!("{}\n", Failure::Usage(clap_message(&err)).json()));
    }
    err.exit()
}

/// Whether `--json` is among the arguments (before any `--`). clap refused
/// them, so they are scanned as they are.
fn wants_json(args: impl Iterator<Item = OsString>) -> bool {
    args.take_while(|a| a != "--").any(|a| a == "--json")
}

/// The first line of clap's message, without its "error: " prefix.
pub fn clap_message(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// Runs a CLI's command on a current-thread runtime and turns the outcome
/// into the process's exit status (printing the failure as `program` says).
pub fn run_to_exit<F>(program: &str, json: bool, command: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), Failure>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let failure = Failure::Local(format!("cannot start: {e}"));
            return report(program, &failure, json);
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(program, &failure, json),
    }
}

/// Prints a result: `json` (pretty) with --json, else the human form.
pub fn print(
    json_mode: bool,
    json: serde_json::Value,
    human: impl FnOnce() -> String,
) -> Result<(), Failure> {
    if json_mode {
        write_stdout(&format!("{json:#}\n"))
    } else {
        write_stdout(&human())
    }
}

fn sorted_labels(
    labels: &std::collections::HashMap<String, String>,
) -> std::collections::BTreeMap<&str, &str> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Labels as a JSON object with sorted keys.
pub fn labels_json(labels: &std::collections::HashMap<String, String>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = sorted_labels(labels)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
        .collect();
    serde_json::Value::Object(map)
}

/// Labels as `k=v,k2=v2` (sorted), or `-` when there are none.
pub fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let pairs: Vec<String> = sorted_labels(labels)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if pairs.is_empty() {
        "-".to_owned()
    } else {
        pairs.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_sockets_https_or_loopback_http() {
        let none = TlsArgs::default();
        let remote = Remote::new("the agent", "unix:/run/stratus/agentd.sock", &none);
        assert_eq!(remote.url(), "unix:/run/stratus/agentd.sock");
        assert_eq!(remote.server(), "the agent");
        remote.dialer().unwrap();
        // host:port means https, which needs a certificate.
        let err = Remote::new("the agent", "127.0.0.1:7401", &none)
            .dialer()
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.line("agentctl").contains("--cert"),
            "{}",
            err.line("agentctl")
        );
        let half = TlsArgs {
            cert: Some("/c.pem".into()),
            ..TlsArgs::default()
        };
        let err = Remote::new("the agent", "unix:/x", &half)
            .dialer()
            .unwrap_err();
        assert!(
            err.line("agentctl").contains("--key and --ca"),
            "{}",
            err.line("agentctl")
        );
    }

    #[test]
    fn json_is_wanted_only_before_a_double_dash() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>().into_iter();
        assert!(wants_json(os(&["volume", "list", "--json"])));
        assert!(!wants_json(os(&["volume", "list"])));
        assert!(!wants_json(os(&["volume", "--", "--json"])));
    }

    #[test]
    fn clap_messages_lose_their_prefix_and_colours() {
        let command = clap::Command::new("x").arg(
            clap::Arg::new("n")
                .long("n")
                .value_parser(clap::value_parser!(u8)),
        );
        let err = command
            .try_get_matches_from(["x", "--n", "300"])
            .unwrap_err();
        let message = clap_message(&err);
        assert!(
            message.starts_with("invalid value '300' for '--n"),
            "{message}"
        );
        assert!(
            !message.contains('\u{1b}'),
            "no terminal colours: {message}"
        );
    }

    #[tokio::test]
    async fn bad_server_urls_are_usage_errors() {
        let remote = Remote::new("the pdisk server", "http://bad host:1", &TlsArgs::default());
        let err = remote.dialer().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(remote.connect().await.is_err());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_one_clear_line() {
        // Port 1 on loopback: nothing listens there in the test environment.
        let remote = Remote::new(
            "the pdisk server",
            "http://127.0.0.1:1",
            &TlsArgs::default(),
        );
        let err = remote.connect().await.unwrap_err();
        let line = err.line("pdisk");
        assert!(
            line.starts_with("pdisk: cannot reach the pdisk server at http://127.0.0.1:1: "),
            "{line}"
        );
        assert_eq!(err.exit_code(), 1);
    }
}
