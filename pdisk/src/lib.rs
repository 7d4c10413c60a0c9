//! pdisk: the persistent-disk service of a Stratus storage host.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`types`]: validated domain values (names, sizes, IQNs, CHAP, labels);
//! - [`error`]: the crate's error type and its gRPC status mapping;
//! - [`runner`]: the one way external programs are run;
//! - [`backend`]: where volume data lives (reflink files; LVM later);
//! - [`export`]: how volumes reach initiators (tgt; LIO later);
//! - [`store`]: the transactional metadata store, source of truth for intent;
//! - [`service`]: the gRPC VolumeService tying them together;
//! - [`config`]: daemon settings from flags and TOML;
//! - [`cli`]: plumbing shared by the `pdisk` and `agentctl` CLIs (tables,
//!   one-line errors, exit codes, JSON errors).

pub mod backend;
pub mod cli;
pub mod config;
pub mod error;
pub mod export;
pub mod grpc;
pub mod progress;
pub mod runner;
pub mod service;
pub mod store;
pub mod types;
