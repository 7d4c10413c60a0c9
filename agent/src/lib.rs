//! agent: the per-host daemon that runs QEMU/KVM guests for a Stratus cloud.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`attach`]: how iSCSI disks reach QEMU; the kernel initiator
//!   (iscsiadm, sysfs scan, by-path devices, shared sessions counted);
//! - [`spec`]: validated guest specs, states, event types and causes;
//! - [`store`]: guest records and the event journal, committed together;
//! - `journal`: reading the journal: replay, then follow, exactly once;
//! - [`vmm`]: QEMU command lines, launching, accelerator choice;
//! - [`qmp`]: the QEMU Machine Protocol client (commands and events);
//! - [`console`]: guests' serial console logs, read from QEMU's socket
//!   and kept under a cap as two files;
//! - [`net`]: tap devices and bridges, by ioctl/netlink (no `ip` commands);
//! - [`images`]: image references, policy, the verified local image cache,
//!   qcow2 overlays;
//! - [`seed`]: cloud-init NoCloud seeds (a FAT12 `CIDATA` image, built in process);
//! - `service`: the guest service: lifecycle, attachments, QMP monitors,
//!   reconciliation, host facts, images;
//! - `volumes`: the pdisk calls agentd makes, behind `VolumeClient`;
//! - `grpc`: the tonic `VmService`, message conversion only;
//! - [`publisher`]: the journal as an outbox to NATS JetStream (subjects,
//!   payloads, `AgentOutbox`; the publisher task is stratus-core's);
//! - [`config`]: agentd settings from flags and TOML.
//!
//! It depends on `stratus-core` (error, domain types, runner, image
//! inspection, settings, CLI plumbing) and `stratus-proto`, never on pdisk:
//! pdiskd is reached over gRPC only (`core/tests/layering.rs` checks this).
//!
//! Public API, and who uses it: [`Agent`], [`AgentSettings`], [`HostFacts`],
//! [`Api`] and [`config`] compose agentd; [`spec`] and [`store`] are also
//! what the bench's journal benchmark drives; [`attach`], [`images`],
//! [`net`], [`qmp`] and [`vmm`] are exercised on their own by the root tests
//! under `agent/tests/`; [`images`], [`seed`], [`spec`] and [`net`]'s `Mac`
//! check agentctl's arguments the way agentd will. The service and its gRPC
//! layer are crate-private.

pub mod attach;
pub mod authz;
pub mod cgroup;
pub mod config;
pub mod confine;
pub mod console;
pub mod disk_io;
pub mod failpoints;
#[cfg(test)]
mod fakes;
pub(crate) mod grpc;
pub mod hotplug;
pub mod images;
pub(crate) mod journal;
mod launch_fds;
pub mod layout;
pub mod metrics;
pub mod migration_tls;
pub mod net;
pub mod publisher;
pub mod qmp;
pub mod qos;
pub mod rbd;
pub mod seed;
pub(crate) mod service;
pub mod spec;
pub mod store;
pub mod usage;
pub mod vmm;
pub(crate) mod volumes;

pub use grpc::Api;
pub use service::{Agent, AgentSettings, HostFacts};
