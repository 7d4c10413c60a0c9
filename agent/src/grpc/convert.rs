//! Conversions between `agent.v1` messages and the agent's domain types.
//! Requests are parsed and checked here, at the edge ([`parse_spec`],
//! [`image_spec`]), so the service only ever sees typed, valid specs.

use crate::images::DeclaredFormat;
use crate::net::Mac;
use crate::qos::DiskQos;
use crate::service::Agent;
use crate::spec::{
    self, Cause, Context, Disk, DiskSource, EventType, ImageSpec, KernelBoot, Nic, PdiskRef,
    ServerName, VmSpec, VmState,
};
use crate::store::{Event, QuotaLimits, QuotaUsage, VmRecord};
use stratus_core::error::Error;
use stratus_core::types::ByteSize;
use stratus_proto::agent::v1 as pb;

pub(crate) fn quota_pb(project: String, l: QuotaLimits, u: QuotaUsage) -> pb::Quota {
    pb::Quota {
        project,
        limits: Some(pb::QuotaLimits {
            vms: l.vms,
            vcpus: l.vcpus,
            memory_bytes: l.memory,
        }),
        usage: Some(pb::QuotaUsage {
            vms: u.vms,
            vcpus: u.vcpus,
            memory_bytes: u.memory,
        }),
    }
}

fn state_pb(s: VmState) -> pb::VmState {
    match s {
        VmState::Defined => pb::VmState::Defined,
        VmState::Starting => pb::VmState::Starting,
        VmState::Running => pb::VmState::Running,
        VmState::Paused => pb::VmState::Paused,
        VmState::Stopping => pb::VmState::Stopping,
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Crashed => pb::VmState::Crashed,
        VmState::Error => pb::VmState::Error,
        VmState::Destroying => pb::VmState::Destroying,
        VmState::Destroyed => pb::VmState::Destroyed,
    }
}

fn event_type_pb(t: EventType) -> pb::EventType {
    match t {
        EventType::Created => pb::EventType::Created,
        EventType::Starting => pb::EventType::Starting,
        EventType::Running => pb::EventType::Running,
        EventType::Paused => pb::EventType::Paused,
        EventType::Resumed => pb::EventType::Resumed,
        EventType::Stopping => pb::EventType::Stopping,
        EventType::Stopped => pb::EventType::Stopped,
        EventType::Crashed => pb::EventType::Crashed,
        EventType::Destroyed => pb::EventType::Destroyed,
        EventType::DiskAttached => pb::EventType::DiskAttached,
        EventType::DiskDetached => pb::EventType::DiskDetached,
        EventType::Error => pb::EventType::Error,
        EventType::Rebooted => pb::EventType::Rebooted,
        EventType::NicAttached => pb::EventType::NicAttached,
        EventType::NicDetached => pb::EventType::NicDetached,
        EventType::DiskIoError => pb::EventType::DiskIoError,
        EventType::Adopted => pb::EventType::Adopted,
        EventType::ImagePullStarted => pb::EventType::ImagePullStarted,
        EventType::ImagePullProgress => pb::EventType::ImagePullProgress,
        EventType::ImageCached => pb::EventType::ImageCached,
        EventType::ImagePullFailed => pb::EventType::ImagePullFailed,
        EventType::ImageEvicted => pb::EventType::ImageEvicted,
        EventType::ImageImported => pb::EventType::ImageImported,
        EventType::ImageSaveStarted => pb::EventType::ImageSaveStarted,
        EventType::ImageSaveProgress => pb::EventType::ImageSaveProgress,
        EventType::ImageSaved => pb::EventType::ImageSaved,
        EventType::ImageSaveFailed => pb::EventType::ImageSaveFailed,
        EventType::LeftoverRemoved => pb::EventType::LeftoverRemoved,
        EventType::DiskDetachPending => pb::EventType::DiskDetachPending,
        EventType::Migrating => pb::EventType::Migrating,
        EventType::MigrationProgress => pb::EventType::MigrationProgress,
        EventType::Migrated => pb::EventType::Migrated,
        EventType::MigrationFailed => pb::EventType::MigrationFailed,
        EventType::DiskResized => pb::EventType::DiskResized,
        EventType::DiskQosChanged => pb::EventType::DiskQosChanged,
    }
}

fn cause_pb(c: Cause) -> pb::EventCause {
    match c {
        Cause::Api => pb::EventCause::Api,
        Cause::Guest => pb::EventCause::Guest,
        Cause::GuestPanic => pb::EventCause::GuestPanic,
        Cause::Qemu => pb::EventCause::Qemu,
        Cause::Host => pb::EventCause::Host,
        Cause::Reconciliation => pb::EventCause::Reconciliation,
    }
}

pub fn event_pb(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: e.time.clone(),
        vm_uuid: e.vm_uuid.to_string(),
        vm_name: e.vm_name.clone(),
        r#type: event_type_pb(e.kind) as i32,
        state: e.state.map(state_pb).unwrap_or(pb::VmState::Unspecified) as i32,
        cause: cause_pb(e.cause) as i32,
        detail: e.detail.clone(),
        image_sha256: e.image_sha256.clone(),
        bytes: e.bytes,
        total_bytes: e.total_bytes,
        project: e.project.clone(),
    }
}

pub(crate) fn spec_pb(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: s.name.to_string(),
        vcpus: s.vcpus,
        memory_bytes: s.memory.0,
        disks: s
            .disks
            .iter()
            .map(|d| {
                let server = d
                    .source
                    .pdisk_server()
                    .filter(|s| !s.is_default())
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let (source, size_bytes, local) = match &d.source {
                    DiskSource::Pdisk(v) => (
                        pb::disk_spec::Source::PdiskVolume(v.volume.to_string()),
                        0,
                        false,
                    ),
                    DiskSource::File(p) => (
                        pb::disk_spec::Source::File(p.display().to_string()),
                        0,
                        false,
                    ),
                    DiskSource::Image {
                        image, size, local, ..
                    } => (
                        pb::disk_spec::Source::Image(pb::ImageRef {
                            url: image.url.clone(),
                            sha256: image.sha256.clone(),
                            format: match image.format {
                                DeclaredFormat::Raw => pb::ImageFormat::Raw,
                                DeclaredFormat::Qcow2 => pb::ImageFormat::Qcow2,
                                DeclaredFormat::Auto => pb::ImageFormat::Auto,
                            } as i32,
                            endorser: image.endorser.clone().unwrap_or_default(),
                            endorsement: image.endorsement.clone().unwrap_or_default(),
                        }),
                        *size,
                        *local,
                    ),
                };
                pb::DiskSpec {
                    source: Some(source),
                    read_only: d.read_only,
                    boot_index: d.boot_index,
                    size_bytes,
                    persistence: if local {
                        pb::DiskPersistence::Local
                    } else {
                        pb::DiskPersistence::Clone
                    } as i32,
                    server,
                    qos: (!d.qos.is_default()).then(|| d.qos.to_pb()),
                }
            })
            .collect(),
        nics: s
            .nics
            .iter()
            .map(|n| pb::NicSpec {
                bridge: n.bridge.clone(),
                mac: n.mac.to_string(),
                vlan: n.vlan as u32,
                ips: n.ips.iter().map(|ip| ip.to_string()).collect(),
            })
            .collect(),
        kernel: s.kernel.as_ref().map(|k| pb::KernelBoot {
            kernel: k.kernel.display().to_string(),
            initrd: k
                .initrd
                .as_ref()
                .map(|i| i.display().to_string())
                .unwrap_or_default(),
            cmdline: k.cmdline.clone(),
        }),
        labels: s.labels.clone().into_iter().collect(),
        context: s.context.as_ref().map(|c| pb::Contextualization {
            hostname: c.hostname.clone().unwrap_or_default(),
            user_data: c.user_data.clone().unwrap_or_default(),
            network_config: c.network_config.clone().unwrap_or_default(),
            ssh_keys: c.ssh_keys.clone(),
        }),
    }
}

pub(crate) fn vm_pb(agent: &Agent, v: &VmRecord) -> pb::Vm {
    let rt = v.runtime.clone().unwrap_or_default();
    pb::Vm {
        uuid: v.uuid.to_string(),
        name: v.spec.name.to_string(),
        spec: Some(spec_pb(&v.spec)),
        state: state_pb(v.state) as i32,
        state_reason: v.state_reason.clone(),
        pid: rt.pid,
        disks: rt
            .disks
            .iter()
            .map(|d| pb::AttachedDisk {
                device: d.device.clone(),
                source: d.source.clone(),
                attachment: d.attachment.clone(),
                read_only: d.read_only,
            })
            .collect(),
        nics: rt
            .nics
            .iter()
            .map(|n| pb::AttachedNic {
                tap: n.tap.clone(),
                bridge: n.bridge.clone(),
                mac: n.mac.to_string(),
                vlan: n.vlan as u32,
            })
            .collect(),
        console_log: agent.console_log(v.uuid).display().to_string(),
        created_at: v.created_at.clone(),
        last_event_seq: v.last_event_seq,
        project: v.project.clone(),
    }
}

/// Validates an image reference from a request.
pub(crate) fn image_spec(i: pb::ImageRef) -> Result<ImageSpec, Error> {
    let format = match pb::ImageFormat::try_from(i.format) {
        Ok(pb::ImageFormat::Raw) => DeclaredFormat::Raw,
        Ok(pb::ImageFormat::Qcow2) => DeclaredFormat::Qcow2,
        Ok(pb::ImageFormat::Auto) => DeclaredFormat::Auto,
        Err(_) => return Err(Error::invalid(format!("unknown image format {}", i.format))),
    };
    let spec = ImageSpec {
        url: i.url,
        sha256: i.sha256.to_ascii_lowercase(),
        format,
        endorser: (!i.endorser.is_empty()).then_some(i.endorser),
        endorsement: (!i.endorsement.is_empty()).then_some(i.endorsement),
    };
    spec.to_ref()?;
    Ok(spec)
}

pub(crate) fn image_pb(i: crate::service::ImageInfo) -> pb::CachedImage {
    pb::CachedImage {
        sha256: i.sha256,
        url: i.url,
        size_bytes: i.size,
        format: i.format.map(|f| f.as_str()).unwrap_or_default().into(),
        location: i.location,
        server: i.server.map(|s| s.to_string()).unwrap_or_default(),
        volume: i.volume,
        users: i.users,
        last_used: i.last_used,
        endorser: i
            .endorsed
            .as_ref()
            .map(|e| e.endorser.clone())
            .unwrap_or_default(),
        endorser_key: i.endorsed.map(|e| e.signer).unwrap_or_default(),
    }
}

pub(crate) fn server_pb(s: crate::volumes::ServerState) -> pb::PdiskServer {
    pb::PdiskServer {
        name: s.name.to_string(),
        url: s.url,
        reachable: s.reachable,
        last_error: s.last_error,
        last_error_at: s.last_error_at,
    }
}

/// Parses a request's spec into the validated domain form.
pub(crate) fn parse_spec(s: pb::VmSpec) -> Result<VmSpec, Error> {
    let name: spec::VmName = s.name.parse()?;
    let mut disks = Vec::new();
    for d in s.disks {
        disks.push(parse_disk(&name, d)?);
    }
    if !disks.is_empty() && disks.iter().all(|d| d.boot_index == 0) && s.kernel.is_none() {
        disks[0].boot_index = 1;
    }
    let mut nics = Vec::new();
    for n in s.nics {
        nics.push(parse_nic(n)?);
    }
    let kernel = match s.kernel {
        Some(k) if !k.kernel.is_empty() => Some(KernelBoot {
            kernel: spec::check_host_file("kernel", &k.kernel)?,
            initrd: if k.initrd.is_empty() {
                None
            } else {
                Some(spec::check_host_file("initrd", &k.initrd)?)
            },
            cmdline: k.cmdline,
        }),
        _ => None,
    };
    if s.memory_bytes == 0 {
        return Err(Error::invalid(format!("vm {name}: memory is required")));
    }
    // Empty strings are proto3's "unset"; keys are kept as given (the seed
    // trims them) so that a bad one is refused rather than dropped.
    let some = |s: String| if s.is_empty() { None } else { Some(s) };
    let context = s.context.map(|c| Context {
        hostname: some(c.hostname),
        user_data: some(c.user_data),
        network_config: some(c.network_config),
        ssh_keys: c.ssh_keys,
    });
    Ok(VmSpec {
        name,
        vcpus: s.vcpus,
        memory: ByteSize(s.memory_bytes),
        disks,
        nics,
        kernel,
        labels: s.labels.into_iter().collect(),
        context,
    })
}

/// One disk of guest `name`'s spec, typed.
pub(crate) fn parse_disk(name: &spec::VmName, d: pb::DiskSpec) -> Result<Disk, Error> {
    let server = ServerName::from_request(&d.server)
        .map_err(|e| Error::invalid(format!("vm {name}: {}", e.message())))?;
    let source = match d.source {
        Some(pb::disk_spec::Source::PdiskVolume(v)) if !v.is_empty() => {
            DiskSource::Pdisk(PdiskRef {
                server,
                volume: v
                    .parse()
                    .map_err(|e: Error| Error::invalid(format!("vm {name}: pdisk volume {e}")))?,
            })
        }
        Some(pb::disk_spec::Source::File(f)) => {
            if !d.server.is_empty() {
                return Err(Error::invalid(format!(
                    "vm {name}: disk file {f}: a host file is on no pdisk server"
                )));
            }
            DiskSource::File(spec::check_host_file("disk", &f)?)
        }
        Some(pb::disk_spec::Source::Image(i)) => {
            let image = image_spec(i)?;
            DiskSource::Image {
                image,
                size: d.size_bytes,
                local: d.persistence == pb::DiskPersistence::Local as i32,
                server,
            }
        }
        _ => {
            return Err(Error::invalid(format!(
                "vm {name}: every disk needs a pdisk volume, a file or an image"
            )))
        }
    };
    Ok(Disk {
        source,
        read_only: d.read_only,
        boot_index: d.boot_index,
        qos: DiskQos::from_pb(d.qos.unwrap_or_default()),
    })
}

/// One NIC of a spec, typed (an empty MAC: a generated one).
pub(crate) fn parse_nic(n: pb::NicSpec) -> Result<Nic, Error> {
    let mac = if n.mac.is_empty() {
        Mac::generate()
    } else {
        n.mac.parse::<Mac>()?
    };
    if n.vlan > 4094 {
        return Err(Error::invalid(format!("vlan {} is out of 1..4094", n.vlan)));
    }
    let ips = n
        .ips
        .iter()
        .map(|ip| {
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| Error::invalid(format!("NIC address {ip:?} is not an IP address")))
        })
        .collect::<stratus_core::error::Result<Vec<_>>>()?;
    Ok(Nic {
        bridge: n.bridge,
        mac,
        vlan: n.vlan as u16,
        ips,
    })
}

/// A device layout for PrepareIncoming.
pub(crate) fn layout_pb(l: &crate::layout::DeviceLayout) -> pb::DeviceLayout {
    let one = |p: &crate::layout::Placement| pb::DevicePlacement {
        port: p.port.clone().unwrap_or_default(),
        devfn: p.devfn,
    };
    pb::DeviceLayout {
        disks: l.disks.iter().map(one).collect(),
        seed: l.seed.as_ref().map(one),
        nics: l.nics.iter().map(one).collect(),
        ports: l.ports.iter().map(one).collect(),
    }
}

/// A source's device layout (checked against the spec by the service).
pub(crate) fn parse_layout(l: pb::DeviceLayout) -> crate::layout::DeviceLayout {
    let one = |p: pb::DevicePlacement| crate::layout::Placement {
        port: Some(p.port).filter(|s| !s.is_empty()),
        devfn: p.devfn,
    };
    crate::layout::DeviceLayout {
        disks: l.disks.into_iter().map(one).collect(),
        seed: l.seed.map(one),
        nics: l.nics.into_iter().map(one).collect(),
        ports: l.ports.into_iter().map(one).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_travels_both_ways() {
        let request = pb::VmSpec {
            name: "web1".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            context: Some(pb::Contextualization {
                hostname: String::new(),
                user_data: "#cloud-config\n".into(),
                network_config: String::new(),
                ssh_keys: vec!["ssh-ed25519 AAAA op@host".into()],
            }),
            ..Default::default()
        };
        let spec = parse_spec(request.clone()).unwrap();
        let c = spec.context.as_ref().unwrap();
        assert_eq!(c.hostname, None, "empty is unset: the VM name");
        assert_eq!(c.user_data.as_deref(), Some("#cloud-config\n"));
        assert_eq!(c.network_config, None);
        assert_eq!(c.ssh_keys, ["ssh-ed25519 AAAA op@host"]);
        assert_eq!(spec_pb(&spec), request);

        // An empty Contextualization still asks for a seed; none asks for none.
        let mut request = request;
        request.context = Some(pb::Contextualization::default());
        assert_eq!(
            parse_spec(request.clone()).unwrap().context,
            Some(Context::default())
        );
        request.context = None;
        assert_eq!(parse_spec(request).unwrap().context, None);
    }

    #[test]
    fn disks_nics_and_image_formats_are_typed_at_the_edge_and_travel_back() {
        let disk = |source| pb::DiskSpec {
            source: Some(source),
            ..Default::default()
        };
        let request = pb::VmSpec {
            name: "web1".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![
                disk(pb::disk_spec::Source::PdiskVolume("data".into())),
                disk(pb::disk_spec::Source::PdiskVolume(
                    "1b4e28ba-2fa1-11d2-883f-0016d3cca427".into(),
                )),
                disk(pb::disk_spec::Source::Image(pb::ImageRef {
                    url: "https://images.example/a.qcow2".into(),
                    sha256: "ab".repeat(32),
                    format: pb::ImageFormat::Qcow2 as i32,
                    endorser: String::new(),
                    endorsement: String::new(),
                })),
            ],
            nics: vec![pb::NicSpec {
                bridge: "br0".into(),
                mac: "52:54:00:AB:CD:EF".into(),
                vlan: 0,
                ips: Vec::new(),
            }],
            ..Default::default()
        };
        let spec = parse_spec(request.clone()).unwrap();
        assert!(matches!(
            &spec.disks[0].source,
            DiskSource::Pdisk(PdiskRef {
                volume: stratus_core::types::ObjectRef::Name(n),
                server,
            }) if n.as_str() == "data" && server.is_default()
        ));
        assert!(matches!(
            &spec.disks[1].source,
            DiskSource::Pdisk(PdiskRef {
                volume: stratus_core::types::ObjectRef::Uuid(_),
                ..
            })
        ));
        assert!(matches!(
            &spec.disks[2].source,
            DiskSource::Image { image, .. } if image.format == DeclaredFormat::Qcow2
        ));
        assert_eq!(spec.nics[0].mac.to_string(), "52:54:00:ab:cd:ef");
        let back = spec_pb(&spec);
        let sources = |d: &[pb::DiskSpec]| d.iter().map(|d| d.source.clone()).collect::<Vec<_>>();
        assert_eq!(sources(&back.disks), sources(&request.disks));
        assert_eq!(back.nics[0].mac, "52:54:00:ab:cd:ef");

        // A disk on a named server keeps it, there and back; a bad name,
        // or a server for a host file, is refused at the edge.
        let mut named = request.clone();
        named.disks[0].server = "store-b".into();
        named.disks[2].server = "store-b".into();
        let spec = parse_spec(named.clone()).unwrap();
        assert_eq!(
            spec.disks[0].source.pdisk_server().unwrap().as_str(),
            "store-b"
        );
        assert_eq!(
            spec.disks[2].source.pdisk_server().unwrap().as_str(),
            "store-b"
        );
        assert!(spec.disks[1].source.pdisk_server().unwrap().is_default());
        let back = spec_pb(&spec);
        assert_eq!(back.disks[0].server, "store-b");
        assert_eq!(back.disks[1].server, "");
        let mut bad = named.clone();
        bad.disks[0].server = "Store B".into();
        let e = parse_spec(bad).unwrap_err();
        assert_eq!(e.kind(), stratus_core::error::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("pdisk server name"), "{e}");
        let mut bad = named.clone();
        bad.disks[0] = pb::DiskSpec {
            source: Some(pb::disk_spec::Source::File("/a.img".into())),
            server: "store-b".into(),
            ..Default::default()
        };
        assert!(parse_spec(bad).is_err());

        // Refused at the edge, naming what is wrong.
        let mut bad = request.clone();
        bad.disks[0] = disk(pb::disk_spec::Source::PdiskVolume("Data/1".into()));
        let e = parse_spec(bad).unwrap_err();
        assert!(
            e.to_string().contains("vm web1: pdisk volume \"Data/1\""),
            "{e}"
        );
        let mut bad = request;
        bad.nics[0].mac = "01:00:5e:00:00:01".into();
        assert!(parse_spec(bad).is_err());
    }
}
