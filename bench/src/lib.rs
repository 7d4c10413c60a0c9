//! stratus-bench: whole-scenario benchmarks against real daemons, reported
//! as figures beside a peer measured in the same run (local file vs export,
//! our import vs `qemu-img convert`, tgt aio vs rdwr, ...).
//!
//! - [`report`]: figures, and the JSON / Markdown / SVG written to `--out`;
//! - [`scenarios`]: one module per scenario; each returns figures;
//! - [`soak`]: the random-crash soak run by `stratus-soak`.

pub mod report;
pub mod scenarios;
pub mod soak;
