//! The scenarios. Each starts what it measures (tgtd, pdiskd, ... on
//! loopback, through `testkit`) and returns figures with their peers.

pub mod bulk;
pub mod confinement;
pub mod datapath;
pub mod events;
pub mod events_nats;
mod guests;
pub mod import;
pub mod launch;
pub mod migrate;
pub mod qos;
pub mod rbd;
pub mod snapshot;
pub mod transport;

use std::path::PathBuf;

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Smoke mode: tiny sizes and few repetitions; checks the harness works,
    /// the figures mean nothing.
    pub quick: bool,
    /// Scratch space on local disk (not tmpfs) for images and pools.
    pub work: PathBuf,
    /// Guests of the bulk launch [default: 30, 3 in quick mode].
    pub bulk: Option<usize>,
}

/// Scenario names, in the order they run (the numbering).
pub const ALL: &[&str] = &[
    "datapath",
    "snapshot",
    "launch",
    "confinement",
    "bulk",
    "import",
    "events",
    "events-nats",
    "transport",
    "rbd",
    "qos",
    "migrate",
];

/// Scenarios that run only where asked for by name (`--only`), never by
/// default: `datapath-lab` needs the lab VM's kernel (`scripts/lab datapath`).
pub const ON_REQUEST: &[&str] = &["datapath-lab"];
