//! Hot-plug over QMP: descriptors sent with a command (`add-fd`, `getfd`:
//! QEMU runs under `spawn=deny` as an unprivileged uid and opens nothing
//! of the host's, so agentd opens taps and files and passes them over the
//! socket with SCM_RIGHTS), block nodes, netdevs and secret objects, guest
//! devices and their removal (`device_del`, which only completes once the
//! guest releases the device: `DEVICE_DELETED`), the devices QEMU really
//! has (`qom-list /machine/peripheral`, the truth hot-plug reconciles
//! with), and `block_resize`.
//!
//! Why `qom-list` and not `query-pci`: before the guest's firmware has
//! numbered the buses, `query-pci` shows every root port's bus as 0 and
//! nothing behind it; the QOM tree names each device and its parent bus
//! from the moment it is added.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::Interest;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;

use super::{CallError, Qmp, COMMAND_TIMEOUT};
use stratus_core::error::{Error, ErrorKind, Result};

/// What `add-fd` answers: the fd set the descriptor joined and its number
/// inside QEMU (`/proc/self/fd/N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct AddedFd {
    #[serde(rename = "fdset-id")]
    pub fdset_id: u64,
    pub fd: i64,
}

/// A device created with an id (`-device ...,id=` or `device_add`): its
/// id, its QOM type and, for devices on a PCIe root port, that port's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peripheral {
    pub id: String,
    /// `virtio-blk-pci`, `virtio-net-pci`, `pcie-root-port`, ...
    pub driver: String,
    /// The root port it sits on (`hp3`); None on the root bus.
    pub port: Option<String>,
}

impl Qmp {
    /// Adds `fd` to fd set `fdset_id` (a new set when None), for block
    /// nodes opening `/dev/fdset/N`. `opaque` names it in `query-fdsets`.
    pub async fn add_fd(
        &self,
        fd: OwnedFd,
        fdset_id: Option<u64>,
        opaque: &str,
    ) -> Result<AddedFd> {
        let mut args = json!({ "opaque": opaque });
        if let Some(id) = fdset_id {
            args["fdset-id"] = json!(id);
        }
        let v = self.with_fd("add-fd", args, fd).await?;
        serde_json::from_value(v).map_err(|e| Error::internal(format!("QMP add-fd: {e}")))
    }

    /// Removes fd set `fdset_id` (QEMU closes its descriptors once no node
    /// uses them). A set that is gone already is fine.
    pub async fn remove_fd(&self, fdset_id: u64) -> Result<()> {
        self.ignore_not_found("remove-fd", json!({ "fdset-id": fdset_id }))
            .await
    }

    /// Gives QEMU `fd` under `name` (`netdev_add tap,fd=NAME`).
    pub async fn getfd(&self, name: &str, fd: OwnedFd) -> Result<()> {
        self.with_fd("getfd", json!({ "fdname": name }), fd)
            .await
            .map(drop)
    }

    /// Closes a descriptor given by [`Qmp::getfd`] that no netdev took.
    pub async fn closefd(&self, name: &str) -> Result<()> {
        self.ignore_not_found("closefd", json!({ "fdname": name }))
            .await
    }

    /// `blockdev-add`: `node` is the same JSON as `-blockdev`.
    pub async fn blockdev_add(&self, node: Value) -> Result<()> {
        self.execute("blockdev-add", Some(node)).await.map(drop)
    }

    /// `blockdev-del` of a root node no device uses any more; a node that
    /// is gone already is fine.
    pub async fn blockdev_del(&self, node: &str) -> Result<()> {
        self.ignore_not_found("blockdev-del", json!({ "node-name": node }))
            .await
    }

    /// `object-add` (a secret object): `object` holds `qom-type` and `id`.
    pub async fn object_add(&self, object: Value) -> Result<()> {
        self.execute("object-add", Some(object)).await.map(drop)
    }

    /// `object-del`; an object that is gone already is fine.
    pub async fn object_del(&self, id: &str) -> Result<()> {
        self.ignore_not_found("object-del", json!({ "id": id }))
            .await
    }

    /// The ids of the guest's throttle groups (`qom-list /objects`).
    pub async fn throttle_groups(&self) -> Result<Vec<String>> {
        let v = self
            .execute("qom-list", Some(json!({ "path": "/objects" })))
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["type"] == "child<throttle-group>")
            .filter_map(|p| p["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// The limits of throttle group `id` (`qom-get` of its `limits`).
    pub async fn throttle_limits(&self, id: &str) -> Result<crate::qos::Limits> {
        let v = self
            .execute(
                "qom-get",
                Some(json!({ "path": format!("/objects/{id}"), "property": "limits" })),
            )
            .await?;
        Ok(crate::qos::Limits::from_qemu(&v))
    }

    /// Gives throttle group `id` the limits `limits` (all of them: what is
    /// not limited any more is cleared), at once.
    pub async fn set_throttle_limits(&self, id: &str, limits: &crate::qos::Limits) -> Result<()> {
        self.execute(
            "qom-set",
            Some(json!({
                "path": format!("/objects/{id}"),
                "property": "limits",
                "value": limits.qemu(),
            })),
        )
        .await
        .map(drop)
    }

    /// `netdev_add`: `netdev` holds `type` and `id`.
    pub async fn netdev_add(&self, netdev: Value) -> Result<()> {
        self.execute("netdev_add", Some(netdev)).await.map(drop)
    }

    /// `netdev_del`; a netdev that is gone already is fine.
    pub async fn netdev_del(&self, id: &str) -> Result<()> {
        self.ignore_not_found("netdev_del", json!({ "id": id }))
            .await
    }

    /// `device_add` of a device given as on the command line
    /// (`virtio-blk-pci,drive=vdc,id=vdc-dev,bus=hp0`).
    pub async fn device_add(&self, device: &str) -> Result<()> {
        self.execute("device_add", Some(device_args(device)))
            .await
            .map(drop)
    }

    /// Asks the guest to release device `id` (`device_del`) and waits up
    /// to `wait` for QEMU's `DEVICE_DELETED`. True: it is gone (or was
    /// already); false: the guest has not released it (no ACPI or PCIe
    /// hot-plug support, or busy), and the device stays attached.
    pub async fn device_del(&self, id: &str, wait: Duration) -> Result<bool> {
        // Subscribed before asking, so the event cannot slip by.
        let mut deleted = self.inner.deleted.subscribe();
        match self
            .call("device_del", Some(json!({ "id": id })), COMMAND_TIMEOUT)
            .await
        {
            Ok(_) => {}
            Err(CallError::Refused(e)) if e.class == "DeviceNotFound" => return Ok(true),
            // An unplug asked for earlier is still pending: keep waiting.
            Err(CallError::Refused(e)) if e.desc.contains("in the process of unplug") => {}
            Err(e) => return Err(e.into_error(self.path(), "device_del")),
        }
        let gone = tokio::time::timeout(wait, async {
            loop {
                match deleted.recv().await {
                    Ok(d) if d == id => return true,
                    Ok(_) => {}
                    // Events were missed: ask QEMU instead.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if !self.has_peripheral(id).await.unwrap_or(true) {
                            return true;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        Ok(gone || !self.has_peripheral(id).await?)
    }

    /// Every device with an id, with the root port it sits on.
    pub async fn peripherals(&self) -> Result<Vec<Peripheral>> {
        #[derive(Deserialize)]
        struct Prop {
            name: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let v = self
            .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await?;
        let props: Vec<Prop> =
            serde_json::from_value(v).map_err(|e| Error::internal(format!("QMP qom-list: {e}")))?;
        let mut out = Vec::new();
        for p in props {
            let Some(driver) = p
                .kind
                .strip_prefix("child<")
                .and_then(|k| k.strip_suffix('>'))
            else {
                continue;
            };
            let bus = self
                .execute(
                    "qom-get",
                    Some(json!({
                        "path": format!("/machine/peripheral/{}", p.name),
                        "property": "parent_bus",
                    })),
                )
                .await?;
            out.push(Peripheral {
                port: port_of_bus(bus.as_str().unwrap_or_default()),
                id: p.name,
                driver: driver.to_owned(),
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// `block_resize` of root node `node` to `size` bytes (growing: the
    /// guest sees the new capacity through a virtio config change).
    pub async fn block_resize(&self, node: &str, size: u64) -> Result<()> {
        self.execute(
            "block_resize",
            Some(json!({ "node-name": node, "size": size })),
        )
        .await
        .map(drop)
    }

    async fn has_peripheral(&self, id: &str) -> Result<bool> {
        match self
            .execute(
                "qom-get",
                Some(json!({
                    "path": format!("/machine/peripheral/{id}"),
                    "property": "type",
                })),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound || e.to_string().contains("not found") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn with_fd(&self, command: &str, args: Value, fd: OwnedFd) -> Result<Value> {
        self.call_with_fd(command, Some(args), COMMAND_TIMEOUT, Some(fd))
            .await
            .map_err(|e| e.into_error(self.path(), command))
    }

    /// Runs a removal; QEMU saying the thing is not there counts as done.
    async fn ignore_not_found(&self, command: &str, args: Value) -> Result<()> {
        match self.call(command, Some(args), COMMAND_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err(CallError::Refused(e))
                if e.class == "DeviceNotFound"
                    || [
                        "not found",
                        "Failed to find",
                        "Cannot find",
                        "does not exist",
                    ]
                    .iter()
                    .any(|s| e.desc.contains(s)) =>
            {
                Ok(())
            }
            Err(e) => Err(e.into_error(self.path(), command)),
        }
    }
}

/// The root port a device's parent bus belongs to: hot-plug ports are
/// peripherals whose bus has their own name (`/machine/peripheral/hp1/hp1`).
fn port_of_bus(bus: &str) -> Option<String> {
    let rest = bus.strip_prefix("/machine/peripheral/")?;
    let (port, _) = rest.split_once('/')?;
    Some(port.to_owned())
}

/// `device_add`'s arguments from a `-device` string: the driver, then
/// `key=value` properties; all-digit values are numbers (QMP types them).
pub(super) fn device_args(device: &str) -> Value {
    let mut parts = device.split(',');
    let mut args = json!({ "driver": parts.next().unwrap_or_default() });
    for p in parts {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        args[k] = match v.parse::<u64>() {
            Ok(n) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => json!(n),
            _ => json!(v),
        };
    }
    args
}

/// The id of a `DEVICE_DELETED` event's device (QEMU also sends one
/// without `device` for a device's inner parts).
pub(super) fn deleted_device(name: &str, data: &Value) -> Option<String> {
    (name == "DEVICE_DELETED")
        .then(|| data.get("device")?.as_str().map(str::to_owned))
        .flatten()
}

/// Writes `bytes` (some of them) with `fd` attached (SCM_RIGHTS): the
/// count written; the rest goes out as a plain write.
pub(super) async fn send_with_fd(
    write: &OwnedWriteHalf,
    bytes: &[u8],
    fd: &OwnedFd,
) -> std::io::Result<usize> {
    let stream: &UnixStream = write.as_ref();
    stream
        .async_io(Interest::WRITABLE, || {
            sendmsg_with_fd(stream.as_raw_fd(), bytes, fd.as_raw_fd())
        })
        .await
}

fn sendmsg_with_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    const FD_LEN: u32 = std::mem::size_of::<RawFd>() as u32;
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(FD_LEN) } as usize;
    assert!(space <= std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, aligned, so the
    // first header is inside it and has room for one descriptor.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_LEN) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: every pointer in msg is valid for the call; the kernel
    // duplicates fd into the message and we keep ours.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_become_typed_device_add_arguments() {
        assert_eq!(
            device_args("virtio-blk-pci,drive=vdc,id=vdc-dev,bootindex=2,bus=hp0"),
            json!({"driver": "virtio-blk-pci", "drive": "vdc", "id": "vdc-dev",
                   "bootindex": 2, "bus": "hp0"})
        );
        assert_eq!(
            device_args("virtio-net-pci,netdev=net1,mac=52:54:00:00:00:01,id=net1-dev")["mac"],
            "52:54:00:00:00:01"
        );
    }

    #[test]
    fn a_device_on_a_hotplug_port_is_told_from_one_on_the_root_bus() {
        assert_eq!(
            port_of_bus("/machine/peripheral/hp1/hp1").as_deref(),
            Some("hp1")
        );
        assert_eq!(port_of_bus("/machine/q35/pcie.0"), None);
        assert_eq!(
            deleted_device(
                "DEVICE_DELETED",
                &json!({"device": "vdc-dev", "path": "/x"})
            ),
            Some("vdc-dev".into())
        );
        assert_eq!(
            deleted_device("DEVICE_DELETED", &json!({"path": "/x/virtio-backend"})),
            None
        );
    }
}
