//! The one way pdisk runs external programs (tgtadm, qemu-img, lvm, ...).
//!
//! - argv only, never a shell: arguments are passed as they are, so nothing
//!   from a request can be interpreted by `sh`;
//! - a timeout on every call; on expiry the child is killed;
//! - argv, duration and exit status logged for every call;
//! - stderr carried into the error.
//!
//! [`HostRunner`] runs real processes; [`FakeRunner`] records argv and answers
//! from a script so unit tests can check exact command lines without root.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Called with each line (split on `\n` or `\r`) the program writes to stdout.
pub type LineSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Called with each piece of a program's binary stdout, in order (e.g. an
/// image streamed into a hasher); such stdout is not kept in the Output.
pub type ByteSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A command to run: program, arguments, timeout.
#[derive(Clone)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    pub timeout: Duration,
    pub on_stdout_line: Option<LineSink>,
    pub on_stdout_bytes: Option<ByteSink>,
    /// Called with each line of stderr (e.g. `rbd`'s progress), which is
    /// still kept in the Output for errors.
    pub on_stderr_line: Option<LineSink>,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            timeout: Duration::from_secs(30),
            on_stdout_line: None,
            on_stdout_bytes: None,
            on_stderr_line: None,
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn on_stdout_line(mut self, sink: LineSink) -> Self {
        self.on_stdout_line = Some(sink);
        self
    }

    pub fn on_stderr_line(mut self, sink: LineSink) -> Self {
        self.on_stderr_line = Some(sink);
        self
    }

    /// Streams stdout to `sink` instead of keeping it (see [`ByteSink`]).
    pub fn on_stdout_bytes(mut self, sink: ByteSink) -> Self {
        self.on_stdout_bytes = Some(sink);
        self
    }

    /// `program arg1 arg2`, for logs and error messages.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.argv().join(" "))
    }
}

/// What a finished program left behind.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Exit code; -1 when killed by a signal.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(stdout: impl Into<String>) -> Self {
        Output {
            status: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    pub fn failed(status: i32, stderr: impl Into<String>) -> Self {
        Output {
            status,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Runs commands. Implementations must never involve a shell.
pub trait CommandRunner: Send + Sync {
    /// Runs `cmd` to completion. `Err` only when it could not be run at all
    /// (missing program: Unavailable) or timed out (Unavailable); a non-zero
    /// exit is an `Ok(Output)` for the caller to judge, or use [`run_checked`].
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>>;
}

/// Runs `cmd` and turns a non-zero exit into an Internal error carrying stderr.
pub async fn run_checked(runner: &dyn CommandRunner, cmd: &Cmd) -> Result<Output> {
    let out = runner.run(cmd).await?;
    if out.success() {
        Ok(out)
    } else {
        Err(exit_error(cmd, &out))
    }
}

/// The error for a command that exited non-zero: names the program, the exit
/// status and the first lines of stderr.
pub fn exit_error(cmd: &Cmd, out: &Output) -> Error {
    let stderr = out.stderr.trim();
    let stderr: String = stderr.lines().take(5).collect::<Vec<_>>().join("; ");
    Error::internal(format!(
        "{} {} exited with status {}: {}",
        cmd.program,
        cmd.args.first().map(String::as_str).unwrap_or(""),
        out.status,
        if stderr.is_empty() {
            "(no stderr)"
        } else {
            &stderr
        }
    ))
}

/// Runs real processes on this host.
#[derive(Debug, Default, Clone)]
pub struct HostRunner;

impl CommandRunner for HostRunner {
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>> {
        Box::pin(async move {
            let started = Instant::now();
            let mut child = tokio::process::Command::new(&cmd.program)
                .args(&cmd.args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    Error::unavailable(format!("cannot run {}: {e}", cmd.program)).with_source(e)
                })?;
            let mut stdout = child.stdout.take().expect("piped stdout");
            let mut stderr = child.stderr.take().expect("piped stderr");
            let sink = cmd.on_stdout_line.clone();
            let bytes = cmd.on_stdout_bytes.clone();
            let collect = async {
                let read_out = async {
                    let mut all = Vec::new();
                    let mut buf = vec![0u8; if bytes.is_some() { 1 << 20 } else { 8192 }];
                    let mut line = Vec::new();
                    loop {
                        let n = stdout.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        if let Some(bytes) = &bytes {
                            bytes(&buf[..n]);
                            continue;
                        }
                        all.extend_from_slice(&buf[..n]);
                        if let Some(sink) = &sink {
                            feed_lines(sink, &mut line, &buf[..n]);
                        }
                    }
                    Ok::<_, std::io::Error>(all)
                };
                let err_sink = cmd.on_stderr_line.clone();
                let read_err = async {
                    let mut all = Vec::new();
                    let Some(sink) = err_sink else {
                        stderr.read_to_end(&mut all).await?;
                        return Ok::<_, std::io::Error>(all);
                    };
                    let mut buf = vec![0u8; 8192];
                    let mut line = Vec::new();
                    loop {
                        let n = stderr.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        all.extend_from_slice(&buf[..n]);
                        feed_lines(&sink, &mut line, &buf[..n]);
                    }
                    Ok(all)
                };
                let (o, e) = tokio::try_join!(read_out, read_err)?;
                let status = child.wait().await?;
                Ok::<_, std::io::Error>((o, e, status))
            };
            let argv = cmd.argv().join(" ");
            match tokio::time::timeout(cmd.timeout, collect).await {
                Err(_) => {
                    tracing::warn!(argv = %argv, timeout_s = cmd.timeout.as_secs_f64(), "command timed out; killed");
                    Err(Error::unavailable(format!(
                        "{} timed out after {:?}",
                        cmd.program, cmd.timeout
                    )))
                }
                Ok(Err(e)) => Err(Error::internal(format!("running {}: {e}", cmd.program))),
                Ok(Ok((o, e, status))) => {
                    let out = Output {
                        status: status.code().unwrap_or(-1),
                        stdout: String::from_utf8_lossy(&o).into_owned(),
                        stderr: String::from_utf8_lossy(&e).into_owned(),
                    };
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    if out.success() {
                        tracing::debug!(argv = %argv, duration_ms = ms, status = out.status, "command");
                    } else {
                        tracing::info!(argv = %argv, duration_ms = ms, status = out.status,
                            stderr = %out.stderr.trim(), "command failed");
                    }
                    Ok(out)
                }
            }
        })
    }
}

/// Hands each complete line of `piece` (ended by `\n` or `\r`, as
/// progress meters end theirs) to `sink`, keeping a partial one in `line`.
fn feed_lines(sink: &LineSink, line: &mut Vec<u8>, piece: &[u8]) {
    for &c in piece {
        if c == b'\n' || c == b'\r' {
            if !line.is_empty() {
                sink(&String::from_utf8_lossy(line));
                line.clear();
            }
        } else {
            line.push(c);
        }
    }
}

type Responder = dyn Fn(&[String]) -> Result<Output> + Send + Sync;

/// Runs real processes like [`HostRunner`] and remembers every command
/// line, so integration tests can check what reached argv (never a secret).
#[derive(Debug, Default)]
pub struct RecordingRunner {
    lines: Mutex<Vec<String>>,
}

impl RecordingRunner {
    /// Every command line run so far, argv joined with spaces.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl CommandRunner for RecordingRunner {
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>> {
        self.lines.lock().unwrap().push(cmd.argv().join(" "));
        HostRunner.run(cmd)
    }
}

/// A runner for unit tests: records every argv and answers with `respond`.
#[derive(Clone)]
pub struct FakeRunner {
    calls: Arc<Mutex<Vec<Vec<String>>>>,
    respond: Arc<Responder>,
}

impl FakeRunner {
    /// Answers every command with success and empty output.
    pub fn new() -> Self {
        Self::with(|_| Ok(Output::ok("")))
    }

    /// Answers with `respond(argv)`.
    pub fn with(respond: impl Fn(&[String]) -> Result<Output> + Send + Sync + 'static) -> Self {
        FakeRunner {
            calls: Arc::default(),
            respond: Arc::new(respond),
        }
    }

    /// Every argv run so far, program first.
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }

    /// Every argv run so far, each joined with spaces.
    pub fn command_lines(&self) -> Vec<String> {
        self.calls().iter().map(|c| c.join(" ")).collect()
    }

    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

impl Default for FakeRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandRunner for FakeRunner {
    fn run<'a>(&'a self, cmd: &'a Cmd) -> BoxFuture<'a, Result<Output>> {
        let argv = cmd.argv();
        self.calls.lock().unwrap().push(argv.clone());
        let out = (self.respond)(&argv);
        Box::pin(async move { out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn host_runner_passes_argv_verbatim_without_shell() {
        let cmd = Cmd::new("printf").args(["%s|", "a b", "$(echo no)", ";ls"]);
        let out = HostRunner.run(&cmd).await.unwrap();
        assert!(out.success());
        assert_eq!(out.stdout, "a b|$(echo no)|;ls|");
    }

    #[tokio::test]
    async fn host_runner_reports_exit_status_and_stderr() {
        // ls exits 2 on a missing path and names it on stderr.
        let cmd = Cmd::new("ls").arg("/nonexistent/stratus-boom");
        let err = run_checked(&HostRunner, &cmd).await.unwrap_err();
        assert!(err.message().contains("status 2"), "{err}");
        assert!(err.message().contains("stratus-boom"), "{err}");
    }

    #[tokio::test]
    async fn host_runner_times_out_and_kills() {
        let cmd = Cmd::new("sleep")
            .arg("10")
            .timeout(Duration::from_millis(100));
        let started = Instant::now();
        let err = HostRunner.run(&cmd).await.unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn missing_program_is_unavailable() {
        let err = HostRunner
            .run(&Cmd::new("/nonexistent/stratus-no-such-tool"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Unavailable);
    }

    #[tokio::test]
    async fn stdout_lines_reach_the_sink() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let cmd = Cmd::new("printf")
            .arg("a\rb\nc")
            .on_stdout_line(Arc::new(move |l| s2.lock().unwrap().push(l.to_owned())));
        HostRunner.run(&cmd).await.unwrap();
        // The last line has no terminator and is not a progress line.
        assert_eq!(*seen.lock().unwrap(), vec!["a", "b"]);
    }

    #[tokio::test]
    async fn stderr_lines_reach_their_sink_and_stay_in_the_output() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        // As rbd prints its progress: `\r`-ended lines on stderr.
        let cmd = Cmd::new("sh")
            .args(["-c", "printf '10%% done\\r20%% done\\rboom\\n' >&2; exit 3"])
            .on_stderr_line(Arc::new(move |l| s2.lock().unwrap().push(l.to_owned())));
        let out = HostRunner.run(&cmd).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["10% done", "20% done", "boom"]);
        assert_eq!(out.status, 3);
        assert_eq!(out.stderr, "10% done\r20% done\rboom\n");
    }

    #[tokio::test]
    async fn fake_runner_records_argv() {
        let fake = FakeRunner::with(|argv| {
            if argv[1] == "fail" {
                Ok(Output::failed(1, "nope"))
            } else {
                Ok(Output::ok("yes"))
            }
        });
        let out = fake.run(&Cmd::new("tool").arg("go")).await.unwrap();
        assert_eq!(out.stdout, "yes");
        assert!(run_checked(&fake, &Cmd::new("tool").arg("fail"))
            .await
            .is_err());
        assert_eq!(fake.command_lines(), vec!["tool go", "tool fail"]);
    }
}
