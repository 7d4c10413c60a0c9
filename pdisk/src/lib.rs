//! pdisk: the persistent-disk service of a Stratus storage host.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`backend`]: where volume data lives (reflink files, LVM thin LVs);
//! - [`export`]: how volumes reach initiators (tgt, LIO);
//! - `store`: the transactional metadata store, source of truth for intent;
//! - `service`: the VolumeService operations tying them together;
//! - `grpc`: the tonic VolumeService, message conversion only;
//! - [`config`]: pdiskd settings from flags and TOML;
//! - [`events`]: the pool's event journal (kinds, filter, NATS subjects and
//!   payloads, `PoolOutbox`), streamed by WatchEvents;
//! - `progress`: progress of long operations, streamed by WatchProgress;
//! - `tenancy`: projects at the gRPC edge (what a call may see and touch);
//! - [`usage`]: storage accounting per project (samples, StAR records, the
//!   usage outbox).
//!
//! The error type, domain types, command runner, image inspection and CLI
//! plumbing it shares with the agent live in `stratus_core`; `error`,
//! `runner` and `types` are re-exported inside the crate so its modules keep
//! short paths. Nothing here is used by the agent (`core/tests/layering.rs`).
//!
//! Public API, and who uses it: [`PoolService`], [`ServiceSettings`],
//! [`Store`], [`Api`], [`config`] and the [`backend`] and [`export`]
//! implementations compose pdiskd; [`export`] (the `Exporter` trait, tgt,
//! LIO) is also driven directly by the root tests `exporter_suite` and
//! `tgt_exporter` and by the bench's data-path scenario, and
//! [`backend::copy`] by the bench's copy benchmark. The service, store, gRPC
//! layer and progress hub are crate-private.

pub(crate) use stratus_core::{error, runner, types};

pub mod authz;
pub mod backend;
pub mod config;
pub mod events;
pub mod export;
pub mod failpoints;
pub(crate) mod grpc;
pub mod metrics;
pub(crate) mod progress;
pub(crate) mod service;
pub(crate) mod store;
pub(crate) mod tenancy;
pub mod usage;

pub use grpc::Api;
pub use service::{ExportBy, PoolService, ServiceSettings};
pub use store::Store;
