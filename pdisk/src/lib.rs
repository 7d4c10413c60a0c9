//! pdisk: the persistent-disk service of a Stratus storage host.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`backend`]: where volume data lives (reflink files, LVM thin LVs);
//! - [`export`]: how volumes reach initiators (tgt, LIO);
//! - `store`: the transactional metadata store, source of truth for intent;
//! - [`service`]: the VolumeService operations tying them together;
//! - [`grpc`]: the tonic VolumeService, message conversion only;
//! - [`config`]: pdiskd settings from flags and TOML;
//! - `progress`: progress of long operations, for WatchOperation.
//!
//! The error type, domain types, command runner, image inspection and CLI
//! plumbing it shares with the agent live in `stratus_core`; `error`,
//! `runner` and `types` are re-exported inside the crate so its modules keep
//! short paths.

pub(crate) use stratus_core::{error, runner, types};

pub mod backend;
pub mod config;
pub mod export;
pub mod grpc;
pub(crate) mod progress;
pub mod service;
pub mod store;
