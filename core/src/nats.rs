//! The NATS JetStream broker, as both daemons and their CLIs reach it: the
//! connection flags (`--nats-*`, the same TOML keys), the connection with its
//! credentials and TLS, the stream `STRATUS_EVENTS`, publishing a message
//! with its id and waiting for JetStream's ack ([`Broker::publish`]), and
//! reading through a durable consumer ([`Broker::durable`]).
//!
//! Secrets never reach argv: the password is read from a file, a `.creds`
//! file holds a JWT and its nkey seed.
//!
//! One stream holds every Stratus subject (`stratus.agent.>`,
//! `stratus.pdisk.>`, `stratus.usage.>`): each daemon creates it with the
//! same subjects when it is missing, so whichever starts first makes it, and
//! an existing stream (an operator's own settings) is left as it is. Limits
//! retention: messages stay until they are older than `max_age` or the
//! stream passes `max_bytes`/`max_msgs` (then the oldest go), whether or not
//! a consumer read them; a durable consumer keeps its place while its reader
//! is away. `duplicate_window` is how long the stream remembers a message id:
//! a publisher's re-send after a lost ack within it is dropped by the broker.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::types::ByteSize;

/// The stream every Stratus daemon publishes to.
pub const STREAM: &str = "STRATUS_EVENTS";
/// The subjects of [`STREAM`].
pub const SUBJECTS: [&str; 3] = ["stratus.agent.>", "stratus.pdisk.>", "stratus.usage.>"];
/// The version of the JSON payloads' schema (`"schema"` in each): bumped
/// when a field changes meaning or goes; new fields do not bump it.
pub const SCHEMA_VERSION: u32 = 1;

/// The NATS flags both daemons flatten into theirs (`#[command(flatten)]`,
/// `#[serde(flatten)]`): TOML keys are the flags' names with `_` for `-`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(default)]
pub struct NatsFlags {
    /// Publish events to this NATS server (JetStream), e.g.
    /// nats://127.0.0.1:4222 or tls://broker.example:4222 (comma-separated
    /// for a cluster); without it nothing is published
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS credentials file (JWT and nkey seed, `nsc` format)
    #[arg(long, value_name = "FILE", conflicts_with = "nats_user")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user; the password is the first line of --nats-password-file
    #[arg(long, value_name = "NAME", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password (never on the command line)
    #[arg(long, value_name = "FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
    /// CA (PEM) that verifies the broker's certificate; TLS is then required
    #[arg(long, value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a broker that verifies its clients
    #[arg(long, value_name = "FILE", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// The client certificate's key (PEM)
    #[arg(long, value_name = "FILE", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// This host's name in subjects and message ids [default: the
    /// hostname, with `.` as `_`]
    #[arg(long, value_name = "NAME")]
    pub nats_host: Option<String>,
    /// STRATUS_EVENTS, when this daemon creates it: messages older than
    /// this are removed, e.g. 30d [default: 30d]
    #[arg(long, value_name = "DURATION")]
    pub nats_max_age: Option<String>,
    /// STRATUS_EVENTS, when this daemon creates it: the oldest messages go
    /// past this size [default: 1G]
    #[arg(long, value_name = "SIZE")]
    pub nats_max_bytes: Option<String>,
    /// STRATUS_EVENTS, when this daemon creates it: how long a message id
    /// is remembered, so a re-send is dropped [default: 10m]
    #[arg(long, value_name = "DURATION")]
    pub nats_duplicate_window: Option<String>,
}

/// The flags of a CLI's `events --from-nats URL --durable NAME`: read the
/// events from the broker through a durable consumer (which keeps its place
/// between runs) instead of from the daemon. Credentials as the daemons'.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct FromNatsArgs {
    /// Read the events from this NATS server (JetStream) instead of the
    /// daemon, e.g. nats://127.0.0.1:4222
    #[arg(long, value_name = "URL", requires = "durable")]
    pub from_nats: Option<String>,
    /// The durable consumer to read through: made on first use (from the
    /// stream's start), it resumes where the last run acknowledged
    #[arg(long, value_name = "NAME", requires = "from_nats")]
    pub durable: Option<String>,
    /// NATS credentials file (JWT and nkey seed)
    #[arg(long, value_name = "FILE", requires = "from_nats")]
    pub nats_creds: Option<PathBuf>,
    /// NATS user; the password is the first line of --nats-password-file
    #[arg(long, value_name = "NAME", requires = "nats_password_file")]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password
    #[arg(long, value_name = "FILE", requires = "nats_user")]
    pub nats_password_file: Option<PathBuf>,
    /// CA (PEM) that verifies the broker's certificate
    #[arg(long, value_name = "FILE", requires = "from_nats")]
    pub nats_ca: Option<PathBuf>,
}

impl FromNatsArgs {
    /// The broker and the durable consumer's name, when reading from NATS.
    pub fn settings(&self) -> Result<Option<(NatsSettings, String)>> {
        let (Some(url), Some(durable)) = (&self.from_nats, &self.durable) else {
            return Ok(None);
        };
        check_token("durable consumer name", durable)?;
        let flags = NatsFlags {
            nats_url: Some(url.clone()),
            nats_creds: self.nats_creds.clone(),
            nats_user: self.nats_user.clone(),
            nats_password_file: self.nats_password_file.clone(),
            nats_ca: self.nats_ca.clone(),
            nats_host: Some("cli".into()),
            ..NatsFlags::default()
        };
        Ok(flags
            .resolve(&NatsFlags::default())?
            .map(|s| (s, durable.clone())))
    }
}

/// Reads `filter`'s messages through the durable consumer `durable` and
/// hands each to `show` once by message id (a re-delivery in this run is
/// acked and dropped), acking it after `show` returns. Without `follow` it
/// returns once no message came for `idle` (caught up); `show` returning
/// false (the reader went away) ends it too.
pub async fn read_durable(
    settings: &NatsSettings,
    durable: &str,
    filter: &str,
    follow: bool,
    idle: Duration,
    mut show: impl FnMut(&Delivered) -> Result<bool>,
) -> Result<()> {
    let broker = Broker::connect(settings, "stratus-cli", true).await?;
    let mut reader = broker.durable(durable, Some(filter)).await?;
    let mut seen = std::collections::HashSet::new();
    loop {
        let Some(m) = reader.next(idle).await? else {
            if follow {
                continue;
            }
            return Ok(());
        };
        let fresh = m.message.msg_id.is_empty() || seen.insert(m.message.msg_id.clone());
        let go_on = if fresh { show(&m.message)? } else { true };
        if !go_on {
            return Ok(());
        }
        m.ack().await?;
    }
}

/// How the stream is made when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_age: Duration,
    pub max_bytes: u64,
    pub duplicate_window: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(600),
        }
    }
}

/// How the broker is reached, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// One URL or several, comma-separated.
    pub url: String,
    pub auth: NatsAuth,
    pub ca: Option<PathBuf>,
    /// Client certificate and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// This host's subject token: no `.`, `*`, `>` or whitespace.
    pub host: String,
    pub limits: StreamLimits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    Creds(PathBuf),
    UserPassword {
        user: String,
        password_file: PathBuf,
    },
}

impl NatsFlags {
    /// These flags over the settings file's (`file`) over the defaults;
    /// None without a URL.
    pub fn resolve(&self, file: &NatsFlags) -> Result<Option<NatsSettings>> {
        let Some(url) = self.nats_url.clone().or(file.nats_url.clone()) else {
            return Ok(None);
        };
        macro_rules! pick {
            ($f:ident) => {
                self.$f.clone().or(file.$f.clone())
            };
        }
        let auth = match (
            pick!(nats_creds),
            pick!(nats_user),
            pick!(nats_password_file),
        ) {
            (Some(_), Some(_), _) => {
                return Err(Error::invalid(
                    "nats-creds and nats-user exclude each other",
                ))
            }
            (Some(c), None, _) => NatsAuth::Creds(c),
            (None, Some(user), Some(password_file)) => NatsAuth::UserPassword {
                user,
                password_file,
            },
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(Error::invalid(
                    "nats-user and nats-password-file go together",
                ))
            }
            (None, None, None) => NatsAuth::None,
        };
        let client_cert = match (pick!(nats_cert), pick!(nats_key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(Error::invalid("nats-cert and nats-key go together")),
        };
        let host = match pick!(nats_host) {
            Some(h) => h,
            None => subject_token(&crate::host::hostname()),
        };
        check_token("nats-host", &host)?;
        let d = StreamLimits::default();
        let duration = |what: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => {
                humantime::parse_duration(&s).map_err(|e| Error::invalid(format!("{what}: {e}")))
            }
        };
        let limits = StreamLimits {
            max_age: duration("nats-max-age", pick!(nats_max_age), d.max_age)?,
            max_bytes: match pick!(nats_max_bytes) {
                None => d.max_bytes,
                Some(s) => {
                    s.parse::<ByteSize>()
                        .map_err(|e| Error::invalid(format!("nats-max-bytes: {e}")))?
                        .0
                }
            },
            duplicate_window: duration(
                "nats-duplicate-window",
                pick!(nats_duplicate_window),
                d.duplicate_window,
            )?,
        };
        if limits.duplicate_window > limits.max_age {
            return Err(Error::invalid(
                "nats-duplicate-window must not pass nats-max-age",
            ));
        }
        Ok(Some(NatsSettings {
            url,
            auth,
            ca: pick!(nats_ca),
            client_cert,
            host,
            limits,
        }))
    }
}

/// `name` as one subject token: `.` becomes `_`, anything outside
/// `[A-Za-z0-9_-]` becomes `-`.
pub fn subject_token(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' => '_',
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => c,
            _ => '-',
        })
        .collect()
}

fn check_token(what: &str, t: &str) -> Result<()> {
    if t.is_empty()
        || t.len() > 64
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::invalid(format!(
            "{what} {t:?}: one subject token of letters, digits, `_` and `-` (at most 64)"
        )));
    }
    Ok(())
}

fn nats_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("NATS: {what}: {e}"))
}

/// A connection to the broker and its JetStream context.
#[derive(Clone)]
pub struct Broker {
    client: async_nats::Client,
    js: jetstream::Context,
    limits: StreamLimits,
}

/// A message as it goes to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    /// JSON.
    pub payload: Vec<u8>,
    /// `Nats-Msg-Id`: the stream drops a second message with the same id
    /// within its duplicate window.
    pub msg_id: String,
}

/// A message read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub subject: String,
    pub payload: Vec<u8>,
    /// Its `Nats-Msg-Id` ("" if it had none).
    pub msg_id: String,
    /// Its sequence in the stream.
    pub stream_seq: u64,
}

impl Broker {
    /// Connects as `client_name`. With `wait` false the connection is made
    /// in the background (a daemon starts while the broker is down and
    /// publishes once it is up); with `wait` true a broker that does not
    /// answer is an error (a CLI).
    pub async fn connect(s: &NatsSettings, client_name: &str, wait: bool) -> Result<Broker> {
        let mut o = match &s.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::Creds(p) => async_nats::ConnectOptions::with_credentials_file(p)
                .await
                .map_err(|e| Error::invalid(format!("nats-creds {}: {e}", p.display())))?,
            NatsAuth::UserPassword {
                user,
                password_file,
            } => {
                let text = std::fs::read_to_string(password_file)
                    .map_err(|e| Error::io(password_file.display(), e))?;
                let password = text.lines().next().unwrap_or("").to_owned();
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password)
            }
        };
        if let Some(ca) = &s.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((c, k)) = &s.client_cert {
            o = o.add_client_certificate(c.clone(), k.clone());
        }
        o = o
            .name(client_name)
            .connection_timeout(Duration::from_secs(5))
            // Reconnect forever, at most 2 s apart: a broker back from an
            // outage is found quickly.
            .max_reconnects(None)
            .reconnect_delay_callback(|n| Duration::from_millis((100 * n as u64).min(2000)))
            .event_callback(|ev| async move {
                match ev {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    other => tracing::debug!(event = %other, "NATS"),
                }
            });
        if !wait {
            o = o.retry_on_initial_connect();
        }
        let client = o
            .connect(s.url.as_str())
            .await
            .map_err(|e| nats_err(&format!("connecting to {}", s.url), e))?;
        let js = jetstream::new(client.clone());
        Ok(Broker {
            client,
            js,
            limits: s.limits,
        })
    }

    /// Creates [`STREAM`] with the configured limits when it is missing;
    /// an existing stream is left as its operator made it.
    pub async fn ensure_stream(&self) -> Result<()> {
        let l = self.limits;
        self.js
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: SUBJECTS.iter().map(|s| s.to_string()).collect(),
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: l.max_age,
                max_bytes: i64::try_from(l.max_bytes).unwrap_or(i64::MAX),
                duplicate_window: l.duplicate_window,
                discard: stream::DiscardPolicy::Old,
                description: Some("Stratus events: agentd, pdiskd, usage records".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?;
        Ok(())
    }

    /// Sends `m` and returns its ack to await: several can be in flight.
    pub async fn send(&self, m: &Outgoing) -> Result<PendingAck> {
        let ack = self
            .js
            .send_publish(
                m.subject.clone(),
                jetstream::message::PublishMessage::build()
                    .payload(m.payload.clone().into())
                    .message_id(&m.msg_id),
            )
            .await
            .map_err(|e| nats_err(&format!("publishing {}", m.subject), e))?;
        Ok(PendingAck {
            ack,
            subject: m.subject.clone(),
        })
    }

    /// Publishes `m` and waits for JetStream's ack (the message is stored,
    /// or was already: a duplicate id). For one-off messages such as usage
    /// records; the event outbox pipelines with [`Broker::send`].
    pub async fn publish(&self, m: &Outgoing) -> Result<Acked> {
        self.send(m).await?.acked().await
    }

    /// Reads the stream through the durable consumer `name` (made when
    /// missing: from the stream's start, explicit acks, `filter` or every
    /// subject), and tells the broker each message is done with
    /// [`DurableReader::ack`]. Unacked messages come again after `ack_wait`.
    pub async fn durable(&self, name: &str, filter: Option<&str>) -> Result<DurableReader> {
        check_token("durable consumer name", name)?;
        let stream = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?;
        let c: consumer::PullConsumer = stream
            .get_or_create_consumer(
                name,
                consumer::pull::Config {
                    durable_name: Some(name.into()),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    filter_subject: filter.unwrap_or_default().into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats_err(&format!("consumer {name}"), e))?;
        let messages = c
            .messages()
            .await
            .map_err(|e| nats_err(&format!("consumer {name}"), e))?;
        Ok(DurableReader { messages })
    }

    /// The stream's message count (for tests and the bench).
    pub async fn stream_messages(&self) -> Result<u64> {
        let mut s = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?;
        let info = s
            .info()
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?;
        Ok(info.state.messages)
    }

    /// How many of the stream's messages have subjects matching `filter`
    /// (`stratus.agent.>`: the events alone, without usage records).
    pub async fn subject_messages(&self, filter: &str) -> Result<u64> {
        use futures::TryStreamExt;
        let s = self
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?;
        let mut subjects = s
            .info_with_subjects(filter)
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?;
        let mut n = 0u64;
        while let Some((_, count)) = subjects
            .try_next()
            .await
            .map_err(|e| nats_err(&format!("stream {STREAM}"), e))?
        {
            n += count as u64;
        }
        Ok(n)
    }

    /// Waits until what was sent is flushed to the server.
    pub async fn flush(&self) -> Result<()> {
        self.client.flush().await.map_err(|e| nats_err("flush", e))
    }
}

/// A message sent whose ack has not come yet.
pub struct PendingAck {
    ack: jetstream::context::PublishAckFuture,
    subject: String,
}

/// JetStream's ack of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub stream_seq: u64,
    /// The stream already held a message with this id.
    pub duplicate: bool,
}

impl PendingAck {
    pub async fn acked(self) -> Result<Acked> {
        let a = self
            .ack
            .await
            .map_err(|e| nats_err(&format!("ack of {}", self.subject), e))?;
        Ok(Acked {
            stream_seq: a.sequence,
            duplicate: a.duplicate,
        })
    }
}

/// Messages of a durable consumer.
pub struct DurableReader {
    messages: consumer::pull::Stream,
}

/// One message of a [`DurableReader`], to be acked once handled.
pub struct DurableMessage {
    pub message: Delivered,
    raw: jetstream::Message,
}

impl DurableMessage {
    /// Tells the broker this consumer is done with the message.
    pub async fn ack(self) -> Result<()> {
        self.raw.double_ack().await.map_err(|e| nats_err("ack", e))
    }
}

impl DurableReader {
    /// The next message; None when `wait` passes with nothing new.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<DurableMessage>> {
        let m = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err(nats_err("consumer", "the message stream ended")),
            Ok(Some(Err(e))) => return Err(nats_err("consumer", e)),
            Ok(Some(Ok(m))) => m,
        };
        let msg_id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let stream_seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        Ok(Some(DurableMessage {
            message: Delivered {
                subject: m.subject.to_string(),
                payload: m.payload.to_vec(),
                msg_id,
                stream_seq,
            },
            raw: m,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsFlags,
    }

    fn resolve(args: &[&str]) -> Result<Option<NatsSettings>> {
        let mut a = vec!["x"];
        a.extend_from_slice(args);
        Cli::try_parse_from(a)
            .map_err(|e| Error::invalid(e.to_string()))?
            .nats
            .resolve(&NatsFlags::default())
    }

    #[test]
    fn no_url_no_broker_and_defaults_with_one() {
        assert_eq!(resolve(&[]).unwrap(), None);
        let s = resolve(&["--nats-url", "nats://127.0.0.1:4222", "--nats-host", "h1"])
            .unwrap()
            .unwrap();
        assert_eq!(s.auth, NatsAuth::None);
        assert_eq!(s.host, "h1");
        assert_eq!(s.limits, StreamLimits::default());
    }

    #[test]
    fn credentials_come_from_files_and_exclude_each_other() {
        let s = resolve(&[
            "--nats-url",
            "tls://b:4222",
            "--nats-user",
            "agent",
            "--nats-password-file",
            "/etc/stratus/nats.pw",
            "--nats-ca",
            "/etc/stratus/ca.pem",
            "--nats-max-age",
            "2d",
            "--nats-max-bytes",
            "10G",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            s.auth,
            NatsAuth::UserPassword {
                user: "agent".into(),
                password_file: "/etc/stratus/nats.pw".into()
            }
        );
        assert_eq!(s.limits.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(s.limits.max_bytes, 10 << 30);
        // No password flag exists: a password never reaches argv.
        assert!(resolve(&["--nats-url", "n", "--nats-password", "x"]).is_err());
        assert!(resolve(&["--nats-url", "n", "--nats-user", "u"]).is_err());
        assert!(resolve(&[
            "--nats-url",
            "n",
            "--nats-creds",
            "c",
            "--nats-user",
            "u",
            "--nats-password-file",
            "p"
        ])
        .is_err());
        assert!(resolve(&["--nats-url", "n", "--nats-cert", "c"]).is_err());
        assert!(resolve(&["--nats-url", "n", "--nats-host", "a.b"]).is_err());
        assert!(resolve(&["--nats-url", "n", "--nats-duplicate-window", "40d"]).is_err());
    }

    #[test]
    fn a_hostname_becomes_one_subject_token() {
        assert_eq!(subject_token("node-1.example.org"), "node-1_example_org");
        assert_eq!(subject_token("a b*>"), "a-b--");
        check_token("t", &subject_token("node-1.example.org")).unwrap();
    }

    #[test]
    fn toml_keys_are_the_flag_names() {
        let f: NatsFlags =
            toml::from_str("nats_url = \"nats://b:4222\"\nnats_creds = \"/etc/x.creds\"\n")
                .unwrap();
        let s = NatsFlags::default().resolve(&f).unwrap().unwrap();
        assert_eq!(s.auth, NatsAuth::Creds("/etc/x.creds".into()));
    }
}
