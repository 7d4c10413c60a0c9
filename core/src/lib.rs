//! stratus-core: what pdiskd, agentd and their CLIs share, so that neither
//! daemon depends on the other.
//!
//! The dependency rule between the workspace's crates is
//! `stratus-proto ← stratus-core ← pdisk, agent`, with `testkit` and
//! `stratus-bench` on top: this crate depends on neither daemon, and the agent
//! reaches pdisk only over gRPC. `core/tests/layering.rs` checks the rule.
//!
//! Module map:
//! - [`error`]: the one error type and both directions of its gRPC status
//!   map (an error a daemon answers with, a status a peer answered);
//! - [`types`]: validated domain values (volume names, sizes, IQNs, CHAP,
//!   labels and the label keys both daemons set);
//! - [`runner`]: the one way external programs are run (argv only, timeout),
//!   with [`runner::FakeRunner`] and [`runner::RecordingRunner`] for tests;
//! - [`detached`]: long-lived programs (a guest's QEMU) started by clone3
//!   straight into their cgroup, as their user, waited on through a pidfd;
//! - [`image`]: image formats, detected by magic and inspected with
//!   `qemu-img info` (untrusted input: backing files refused);
//! - [`settings`]: a daemon's TOML settings file and its logging;
//! - [`host`]: facts about this host (memory);
//! - [`rooted`]: host files opened only beneath configured roots (openat2
//!   `RESOLVE_BENEATH`: no `..` or symlink escape, no check-then-use race);
//! - [`journal`]: an event journal in a daemon's redb database (dense seqs
//!   appended with the state change, replay then follow exactly once);
//! - [`nats`]: the NATS JetStream broker (flags, connection, the
//!   `STRATUS_EVENTS` stream, publishing with a message id, durable consumers);
//! - [`outbox`]: a daemon's event journal published to the broker in seq
//!   order, resumed after the last acknowledged seq;
//! - [`quota`]: project quotas as both daemons serve them (SetQuota's
//!   checks and write, ListQuotas), over each daemon's own store;
//! - [`requests`]: mutating operations run as the daemon's own tasks, and
//!   retries by `request_id` answered with the first attempt's result;
//! - [`systemd`]: `sd_notify` for `Type=notify` units (READY, STOPPING,
//!   watchdog pings);
//! - [`cli`]: plumbing shared by the `pdisk` and `agentctl` CLIs (tables,
//!   one-line errors, exit codes, JSON errors, argument values).

pub mod cli;
pub mod db;
pub mod detached;
pub mod error;
pub mod host;
pub mod image;
pub mod journal;
pub mod nats;
pub mod outbox;
pub mod quota;
pub mod requests;
pub mod rooted;
pub mod runner;
pub mod settings;
pub mod systemd;
pub mod types;
