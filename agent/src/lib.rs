//! agent: the per-host daemon that runs QEMU/KVM guests for a Stratus cloud.
//!
//! Module map (see ARCHITECTURE.md for the invariants):
//! - [`qmp`]: the QEMU Machine Protocol client (commands and events);
//! - [`net`]: tap devices and bridges, by ioctl/netlink (no `ip` commands);

pub mod net;
pub mod qmp;
