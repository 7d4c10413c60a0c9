//! Where a running guest's PCI devices really sit, so that a live
//! migration's destination rebuilds the same machine (issue 15).
//!
//! QEMU migrates device state by PCI address: a guest started with two
//! disks that later got a third disk and a NIC hot-plugged on root ports
//! `hp0` and `hp1` has those behind the ports, at addresses a destination
//! started from the spec alone (every device cold-plugged, in spec order)
//! would give other devices; its migration would fail or, worse, load
//! state into the wrong device. The source reads the layout from its QEMU
//! (`qom-list` and each device's `addr`) and sends it with
//! PrepareIncoming; the destination's command line then places every
//! device and root port at the source's address (explicit `addr=`, devices
//! behind root ports with `bus=`, after the ports), as libvirt does.

use serde_json::json;

use crate::qmp::Peripheral;
use crate::vmm::{QmpCommands, MAX_HOTPLUG_PORTS, ROOT_PORT_PREFIX};
use stratus_core::error::{Error, Result};

/// Where one device sits: on a hot-plug root port (`hp3`) or on the root
/// bus (None), at PCI `devfn` (slot << 3 | function) of that bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub port: Option<String>,
    pub devfn: u32,
}

/// A running guest's devices, in the order of its spec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceLayout {
    /// One per spec disk.
    pub disks: Vec<Placement>,
    /// The cloud-init seed's disk, if the guest has one.
    pub seed: Option<Placement>,
    /// One per spec NIC.
    pub nics: Vec<Placement>,
    /// The hot-plug root ports `hp0`, `hp1`, ... (all on the root bus).
    pub ports: Vec<Placement>,
}

impl DeviceLayout {
    /// Reads the layout from QEMU: `disks`, `seed` and `nics` are the qdev
    /// ids of the spec's disks, the seed's and the spec's NICs, in order.
    pub async fn read(
        qmp: &dyn QmpCommands,
        disks: &[String],
        seed: Option<&str>,
        nics: &[String],
    ) -> Result<DeviceLayout> {
        let all = qmp.peripherals().await?;
        let place = |id: &str| {
            let all = &all;
            let id = id.to_string();
            async move {
                let p = all
                    .iter()
                    .find(|p| p.id == id)
                    .ok_or_else(|| Error::internal(format!("QEMU has no device {id}")))?;
                Ok::<_, Error>(Placement {
                    port: p.port.clone(),
                    devfn: devfn(qmp, &id).await?,
                })
            }
        };
        let mut layout = DeviceLayout::default();
        for id in disks {
            layout.disks.push(place(id).await?);
        }
        if let Some(id) = seed {
            layout.seed = Some(place(id).await?);
        }
        for id in nics {
            layout.nics.push(place(id).await?);
        }
        for id in root_ports(&all) {
            layout.ports.push(place(&id).await?);
        }
        Ok(layout)
    }

    /// Checks a layout received from a source against the spec it came
    /// with (`disks` and `nics` counts): every device placed, ports named
    /// as ours are and not more than we allow, addresses that exist.
    pub fn check(&self, disks: usize, nics: usize) -> Result<()> {
        let bad = |why: String| Err(Error::invalid(format!("device layout: {why}")));
        if self.disks.len() != disks || self.nics.len() != nics {
            return bad(format!(
                "{} disks and {} NICs placed, the spec has {disks} and {nics}",
                self.disks.len(),
                self.nics.len()
            ));
        }
        if self.ports.len() > MAX_HOTPLUG_PORTS as usize {
            return bad(format!(
                "{} root ports (at most {MAX_HOTPLUG_PORTS})",
                self.ports.len()
            ));
        }
        let every = self
            .disks
            .iter()
            .chain(&self.seed)
            .chain(&self.nics)
            .chain(&self.ports);
        for p in every {
            if p.devfn > 0xff {
                return bad(format!("PCI address {:#x}", p.devfn));
            }
            if let Some(port) = &p.port {
                let known = port
                    .strip_prefix(ROOT_PORT_PREFIX)
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n < self.ports.len() && port == &port_id(n));
                if !known {
                    return bad(format!("no root port {port:?}"));
                }
            }
        }
        if self.ports.iter().any(|p| p.port.is_some()) {
            return bad("a root port behind a root port".into());
        }
        Ok(())
    }
}

fn port_id(n: usize) -> String {
    crate::vmm::root_port_id(n as u32)
}

/// The hot-plug root ports among `all`, in order (`hp0`, `hp1`, ...).
fn root_ports(all: &[Peripheral]) -> Vec<String> {
    let mut ports: Vec<(u32, String)> = all
        .iter()
        .filter(|p| p.driver == "pcie-root-port")
        .filter_map(|p| {
            let n = p.id.strip_prefix(ROOT_PORT_PREFIX)?.parse().ok()?;
            Some((n, p.id.clone()))
        })
        .collect();
    ports.sort();
    ports.into_iter().map(|(_, id)| id).collect()
}

/// Device `id`'s PCI address on its bus (QOM property `addr`: devfn).
async fn devfn(qmp: &dyn QmpCommands, id: &str) -> Result<u32> {
    let v = qmp
        .execute(
            "qom-get",
            Some(json!({"path": format!("/machine/peripheral/{id}"), "property": "addr"})),
        )
        .await?;
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Error::internal(format!("QEMU's address of {id}: {v}")))
}

/// `-device` argument `device` placed as `p` says.
pub fn placed(device: &str, p: &Placement) -> String {
    let mut d = device.to_string();
    if let Some(port) = &p.port {
        d.push_str(&format!(",bus={port}"));
    }
    d.push_str(&format!(",addr={:#x}.{}", p.devfn >> 3, p.devfn & 7));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: Option<&str>, devfn: u32) -> Placement {
        Placement {
            port: port.map(str::to_owned),
            devfn,
        }
    }

    #[test]
    fn a_device_goes_where_the_source_had_it() {
        assert_eq!(
            placed("virtio-blk-pci,drive=vdb,id=vdb-dev", &at(Some("hp0"), 0)),
            "virtio-blk-pci,drive=vdb,id=vdb-dev,bus=hp0,addr=0x0.0"
        );
        assert_eq!(
            placed("pcie-root-port,id=hp1", &at(None, 0x48)),
            "pcie-root-port,id=hp1,addr=0x9.0"
        );
    }

    #[test]
    fn a_layout_must_fit_the_spec_and_our_ports() {
        let good = DeviceLayout {
            disks: vec![at(None, 0x08), at(Some("hp1"), 0)],
            seed: None,
            nics: vec![at(None, 0x10)],
            ports: vec![at(None, 0x18), at(None, 0x20)],
        };
        good.check(2, 1).unwrap();
        assert!(good.check(1, 1).is_err());
        assert!(good.check(2, 2).is_err());
        for bad in [
            DeviceLayout {
                disks: vec![at(None, 0x08), at(Some("hp2"), 0)],
                ..good.clone()
            },
            DeviceLayout {
                disks: vec![at(None, 0x08), at(Some("hp01"), 0)],
                ..good.clone()
            },
            DeviceLayout {
                disks: vec![at(None, 0x100), at(Some("hp1"), 0)],
                ..good.clone()
            },
            DeviceLayout {
                ports: vec![at(None, 0x18), at(Some("hp0"), 0)],
                ..good.clone()
            },
            DeviceLayout {
                ports: vec![at(None, 0x18); 17],
                ..good.clone()
            },
        ] {
            let e = bad.check(2, 1).unwrap_err();
            assert_eq!(
                e.kind(),
                stratus_core::error::ErrorKind::InvalidArgument,
                "{e}"
            );
        }
    }

    #[test]
    fn root_ports_in_number_order() {
        let p = |id: &str, driver: &str| Peripheral {
            id: id.into(),
            driver: driver.into(),
            port: None,
        };
        let all = [
            p("hp10", "pcie-root-port"),
            p("hp2", "pcie-root-port"),
            p("vda-dev", "virtio-blk-pci"),
            p("other", "pcie-root-port"),
        ];
        assert_eq!(root_ports(&all), ["hp2", "hp10"]);
    }
}
