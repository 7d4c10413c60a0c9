//! agent: the per-host daemon that runs QEMU/KVM guests for a Stratus cloud.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`attach`]: how iSCSI disks reach QEMU; the kernel initiator
//!   (iscsiadm, sysfs scan, by-path devices, shared sessions counted);
//! - [`spec`]: validated guest specs, states, event types and causes;
//! - [`store`]: guest records and the event journal, committed together;
//! - [`vmm`]: QEMU command lines, launching, accelerator choice;
//! - [`qmp`]: the QEMU Machine Protocol client (commands and events);
//! - [`net`]: tap devices and bridges, by ioctl/netlink (no `ip` commands);
//! - [`images`]: image references, policy, the verified local image cache,
//!   qcow2 overlays;
//! - [`seed`]: cloud-init NoCloud seeds (a FAT12 `CIDATA` image, built in process);
//! - [`service`]: the guest service: operations, QMP monitors, reconciliation;
//! - [`grpc`]: the tonic `VmService`, message conversion only;
//! - [`config`]: agentd settings from flags and TOML.

pub mod attach;
pub mod config;
pub mod grpc;
pub mod images;
pub mod net;
pub mod qmp;
pub mod seed;
pub mod service;
pub mod spec;
pub mod store;
pub mod vmm;
