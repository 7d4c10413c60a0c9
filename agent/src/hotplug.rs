//! What agentd asks a running QEMU to hot-plug and unplug, and in which
//! order, on top of the QMP commands of `qmp_devices.rs`:
//!
//! - a disk: its files as fd sets (`add-fd`, ids [`fdset_base`] + k, so
//!   that the unplug finds them again), its secrets as `secret` objects
//!   read from sealed memfds QEMU gets over the socket, the same
//!   `blockdev` JSON as at launch ([`crate::vmm::blockdev`]), its
//!   iothread (`object-add`, when disks get one), then `virtio-blk-pci` on
//!   a free root port; any failure undoes the steps before it.
//! - a NIC: the tap, opened by agentd, given by `getfd`, `netdev_add tap`,
//!   then `virtio-net-pci` on a free root port.
//! - an unplug: `device_del` and the guest's `DEVICE_DELETED`; only then
//!   the node, secrets and fd sets (or netdev) go. A guest that does not
//!   release the device keeps all of it.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::disk_io::{iothread_id, DiskIo};
use crate::qmp::Qmp;
use crate::vmm::{DiskSink, PlannedDisk, PlannedNic};
use stratus_core::error::{Error, Result};

/// The first fd set id of hot-plugged disk `device` (vda → 1000000,
/// vdb → 1000016, ...): far above the fd sets of the command line, which
/// are numbered like descriptors.
pub fn fdset_base(device: &str) -> u64 {
    let i = device.bytes().last().unwrap_or(b'a').saturating_sub(b'a') as u64;
    1_000_000 + i * FDSETS_PER_DISK
}

/// Fd sets one disk may use (an overlay uses two).
const FDSETS_PER_DISK: u64 = 16;

/// What a disk's node needs from agentd, gathered before QMP is asked.
#[derive(Default)]
struct QmpSink {
    base: u64,
    fdsets: Vec<(u64, OwnedFd, String)>,
    /// (object id, memfd, format)
    secrets: Vec<(String, OwnedFd, String)>,
}

impl DiskSink for QmpSink {
    fn file(&mut self, path: &Path, writable: bool, node: &str) -> Result<String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path.display(), e))?;
        let id = self.base + self.fdsets.len() as u64;
        self.fdsets.push((id, f.into(), node.to_owned()));
        Ok(format!("/dev/fdset/{id}"))
    }

    fn secret(&mut self, id: &str, bytes: &[u8], format: &str) -> Result<()> {
        let fd = crate::launch_fds::sealed_memfd(bytes)?;
        self.secrets.push((id.to_owned(), fd, format.to_owned()));
        Ok(())
    }

    fn memfd_path(&mut self, _bytes: &[u8]) -> Result<String> {
        Err(Error::precondition(
            "RBD disks are not hot-plugged: attach the disk while the guest is stopped",
        ))
    }
}

/// Hot-plugs disk `d` of a guest of `vcpus` vCPUs on root port `port`, with
/// its iothread when `io` gives disks one; on failure what was added goes.
pub async fn add_disk(
    qmp: &Qmp,
    d: &PlannedDisk,
    io: &DiskIo,
    vcpus: u32,
    port: &str,
) -> Result<()> {
    let mut sink = QmpSink {
        base: fdset_base(&d.device),
        ..Default::default()
    };
    let node = crate::vmm::blockdev(d, io, &mut sink)?;
    let secrets: Vec<String> = sink.secrets.iter().map(|s| s.0.clone()).collect();
    let r = async {
        for (id, fd, opaque) in sink.fdsets {
            qmp.add_fd(fd, Some(id), &opaque).await?;
        }
        for (id, fd, format) in sink.secrets {
            let added = qmp.add_fd(fd, None, &id).await?;
            let made = qmp
                .object_add(json!({
                    "qom-type": "secret",
                    "id": id,
                    "file": format!("/proc/self/fd/{}", added.fd),
                    "format": format,
                }))
                .await;
            // Read at creation: the memfd is not needed any more.
            let _ = qmp.remove_fd(added.fdset_id).await;
            made?;
        }
        if let Some(q) = &d.qos {
            add_group(qmp, q).await?;
        }
        qmp.blockdev_add(node).await?;
        if let Some(id) = io.iothread(&d.device) {
            qmp.object_add(json!({"qom-type": "iothread", "id": id}))
                .await?;
        }
        qmp.device_add(&crate::vmm::disk_device(d, io, vcpus, Some(port)))
            .await
    }
    .await;
    if r.is_err() {
        release_disk(qmp, &d.device, &secrets).await;
    }
    r
}

/// Makes throttle group `q` (a group another disk of the guest already
/// has just gets these limits: they are the same by the spec's rule).
async fn add_group(qmp: &Qmp, q: &crate::qos::PlannedQos) -> Result<()> {
    if qmp.throttle_groups().await?.contains(&q.group_id) {
        qmp.set_throttle_limits(&q.group_id, &q.limits).await
    } else {
        qmp.object_add(q.group_object()).await
    }
}

/// Unplugs disk `device`: true once the guest released it and its node is
/// gone; false when the guest kept it within `wait` (nothing removed).
pub async fn remove_disk(qmp: &Qmp, device: &str, wait: Duration) -> Result<bool> {
    if !qmp.device_del(&format!("{device}-dev"), wait).await? {
        return Ok(false);
    }
    release_disk(qmp, device, &[format!("chap-{device}")]).await;
    Ok(true)
}

/// Removes a disk's node, secrets and fd sets, whichever exist.
async fn release_disk(qmp: &Qmp, device: &str, secrets: &[String]) {
    for (what, r) in [
        ("node", qmp.blockdev_del(device).await),
        (
            "base node",
            qmp.blockdev_del(&format!("{device}-base")).await,
        ),
    ] {
        if let Err(e) = r {
            tracing::warn!(disk = device, error = %e, "could not remove the disk's {what}");
        }
    }
    for s in secrets {
        let _ = qmp.object_del(s).await;
    }
    // Its own throttle group; a shared group still used by another disk
    // stays (QEMU refuses to delete it), one no disk uses goes.
    let _ = qmp.object_del(&format!("qos-{device}")).await;
    if let Ok(groups) = qmp.throttle_groups().await {
        for g in groups.iter().filter(|g| g.starts_with("qos-group-")) {
            let _ = qmp.object_del(g).await;
        }
    }
    // Its iothread, if it has one (none when disks get none).
    let _ = qmp.object_del(&iothread_id(device)).await;
    let base = fdset_base(device);
    for id in base..base + 2 {
        let _ = qmp.remove_fd(id).await;
    }
}

/// Hot-plugs NIC `n` as netdev `netdev` on root port `port`: agentd opens
/// the tap (its anti-spoofing rules and bridge port already exist).
pub async fn add_nic(qmp: &Qmp, n: &PlannedNic, netdev: &str, port: &str) -> Result<()> {
    let tap: crate::net::TapName = n.tap.parse()?;
    let fd: OwnedFd = crate::net::open_tap(&tap)?;
    qmp.getfd(netdev, fd).await?;
    let r = async {
        qmp.netdev_add(json!({"type": "tap", "id": netdev, "fd": netdev}))
            .await?;
        qmp.device_add(&crate::vmm::nic_device(netdev, &n.mac, Some(port)))
            .await
    }
    .await;
    if r.is_err() {
        let _ = qmp.netdev_del(netdev).await;
        let _ = qmp.closefd(netdev).await;
    }
    r
}

/// Unplugs NIC `netdev`, as [`remove_disk`].
pub async fn remove_nic(qmp: &Qmp, netdev: &str, wait: Duration) -> Result<bool> {
    if !qmp.device_del(&format!("{netdev}-dev"), wait).await? {
        return Ok(false);
    }
    qmp.netdev_del(netdev).await?;
    Ok(true)
}

/// The first root port (`hp0`, `hp1`, ...) no device sits on.
pub fn free_port(devices: &[crate::qmp::Peripheral]) -> Option<String> {
    let mut ports: Vec<&str> = devices
        .iter()
        .filter(|p| p.driver == "pcie-root-port")
        .filter_map(|p| {
            p.id.strip_prefix(crate::vmm::ROOT_PORT_PREFIX)
                .filter(|n| n.parse::<u32>().is_ok())
                .map(|_| p.id.as_str())
        })
        .collect();
    ports.sort_by_key(|p| {
        p[crate::vmm::ROOT_PORT_PREFIX.len()..]
            .parse::<u32>()
            .unwrap_or(0)
    });
    ports
        .into_iter()
        .find(|port| !devices.iter().any(|d| d.port.as_deref() == Some(*port)))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::Peripheral;

    fn dev(id: &str, driver: &str, port: Option<&str>) -> Peripheral {
        Peripheral {
            id: id.into(),
            driver: driver.into(),
            port: port.map(str::to_owned),
        }
    }

    #[test]
    fn the_first_empty_root_port_is_taken() {
        let mut devices = vec![
            dev("hp0", "pcie-root-port", None),
            dev("hp1", "pcie-root-port", None),
            dev("hp10", "pcie-root-port", None),
            dev("vda-dev", "virtio-blk-pci", None),
            dev("vdc-dev", "virtio-blk-pci", Some("hp0")),
        ];
        assert_eq!(free_port(&devices).as_deref(), Some("hp1"));
        devices.push(dev("net1-dev", "virtio-net-pci", Some("hp1")));
        assert_eq!(free_port(&devices).as_deref(), Some("hp10"));
        devices.push(dev("vdd-dev", "virtio-blk-pci", Some("hp10")));
        assert_eq!(free_port(&devices), None);
        assert_eq!(fdset_base("vda"), 1_000_000);
        assert_eq!(fdset_base("vdc"), 1_000_032);
    }
}
