//! What a guest should be: the validated form of `agent.v1.VmSpec`, and the
//! states and causes the agent reports. Parsed at the gRPC edge; nothing
//! past it can hold an invalid name, MAC, pdisk volume reference, image
//! format, size or path. The typed fields serialize as the strings records
//! always held, so records written before they were typed still load.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::images::DeclaredFormat;
use crate::net::Mac;
use crate::qos::DiskQos;
use crate::seed::{self, Seed};
use stratus_core::error::{Error, Result};
use stratus_core::types::{ByteSize, ObjectRef, VolumeName, MIB};

/// Guest names follow the volume-name grammar (they name files and taps).
pub type VmName = VolumeName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "ref")]
pub enum DiskSource {
    /// A pdisk volume by name or UUID, on one of the agent's pdisk servers.
    Pdisk(PdiskRef),
    /// A raw image on this host (opened as raw, never probed).
    File(PathBuf),
    /// An image by URL and checksum, through the caches.
    Image {
        image: ImageSpec,
        /// Bytes; 0 = the image's size.
        size: u64,
        /// Ephemeral qcow2 overlay on this host instead of a pdisk clone.
        local: bool,
        /// The pdisk server the clone (and the image's base) lives on;
        /// records from before named servers load as the default one.
        #[serde(default, skip_serializing_if = "ServerName::is_default")]
        server: ServerName,
    },
}

impl DiskSource {
    /// The pdisk server this disk uses: its volume's, or its image clone's;
    /// None for host files and local image disks.
    pub fn pdisk_server(&self) -> Option<&ServerName> {
        match self {
            DiskSource::Pdisk(r) => Some(&r.server),
            DiskSource::Image {
                local: false,
                server,
                ..
            } => Some(server),
            _ => None,
        }
    }
}

/// The name of a pdisk server this agent talks to (`agentd --pdisk
/// NAME=URL`): 1 to 32 of lowercase letters, digits and '-', starting with
/// a letter. `default` is the server `--pdisk URL` names, and the one of
/// every disk that names none (and of records from before named servers).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerName(String);

impl ServerName {
    pub const DEFAULT: &'static str = "default";

    pub fn is_default(&self) -> bool {
        self.0 == Self::DEFAULT
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A request's server field: empty means the default server.
    pub fn from_request(s: &str) -> Result<ServerName> {
        if s.is_empty() {
            Ok(ServerName::default())
        } else {
            s.parse()
        }
    }
}

impl Default for ServerName {
    fn default() -> Self {
        ServerName(Self::DEFAULT.into())
    }
}

impl std::str::FromStr for ServerName {
    type Err = Error;
    fn from_str(s: &str) -> Result<ServerName> {
        let ok = (1..=32).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        if !ok {
            return Err(Error::invalid(format!(
                "pdisk server name {s:?}: 1 to 32 of lowercase letters, digits and '-', \
                 starting with a letter"
            )));
        }
        Ok(ServerName(s.to_owned()))
    }
}

impl TryFrom<String> for ServerName {
    type Error = Error;
    fn try_from(s: String) -> Result<ServerName> {
        s.parse()
    }
}

impl From<ServerName> for String {
    fn from(n: ServerName) -> String {
        n.0
    }
}

impl std::fmt::Display for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A pdisk volume on a named server, written `VOLUME` (the default
/// server) or `SERVER/VOLUME`, and serialized as that string: records from
/// before named servers hold a bare volume and load as the default server's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PdiskRef {
    pub server: ServerName,
    pub volume: ObjectRef,
}

impl PdiskRef {
    /// `volume` on the default server.
    pub fn on_default(volume: ObjectRef) -> PdiskRef {
        PdiskRef {
            server: ServerName::default(),
            volume,
        }
    }
}

impl std::str::FromStr for PdiskRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<PdiskRef> {
        match s.split_once('/') {
            Some((server, volume)) => Ok(PdiskRef {
                server: server.parse()?,
                volume: volume.parse()?,
            }),
            None => Ok(PdiskRef::on_default(s.parse()?)),
        }
    }
}

impl TryFrom<String> for PdiskRef {
    type Error = Error;
    fn try_from(s: String) -> Result<PdiskRef> {
        s.parse()
    }
}

impl From<PdiskRef> for String {
    fn from(r: PdiskRef) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for PdiskRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.server.is_default() {
            write!(f, "{}", self.volume)
        } else {
            write!(f, "{}/{}", self.server, self.volume)
        }
    }
}

/// An image reference as stored; [`ImageSpec::to_ref`] validates it into
/// the images module's [`crate::images::ImageRef`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub url: String,
    pub sha256: String,
    pub format: DeclaredFormat,
    pub endorser: Option<String>,
    /// A signed manifest token ([`crate::images::endorsement`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement: Option<String>,
}

impl ImageSpec {
    pub fn to_ref(&self) -> Result<crate::images::ImageRef> {
        crate::images::ImageRef::new(&self.url, &self.sha256, self.format, self.endorser.clone())?
            .with_endorsement(self.endorsement.as_deref())
    }

    /// A `file://` image names a file of this host.
    pub fn is_host_file(&self) -> bool {
        self.to_ref()
            .is_ok_and(|r| matches!(r.source(), crate::images::ImageSource::File(_)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub source: DiskSource,
    pub read_only: bool,
    /// 0: not bootable; 1 boots first.
    pub boot_index: u32,
    /// I/O limits ([`crate::qos`]); none in older records.
    #[serde(default, skip_serializing_if = "DiskQos::is_default")]
    pub qos: DiskQos,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub bridge: String,
    /// Stored in 52:54:00:xx:xx:xx form.
    pub mac: Mac,
    pub vlan: u16,
    /// The only IP sources the guest may use on this NIC (anti-spoofing,
    /// [`crate::net::NicFilters`]); empty: only the MAC is enforced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
}

/// Most addresses one NIC may name.
pub const MAX_IPS_PER_NIC: usize = 16;

/// Checks an address a NIC may claim: a unicast host address.
pub fn check_nic_ip(ip: std::net::IpAddr) -> Result<()> {
    let bad = match ip {
        std::net::IpAddr::V4(a) => {
            a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback()
        }
        std::net::IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback(),
    };
    if bad {
        return Err(Error::invalid(format!(
            "NIC address {ip} is not a unicast host address"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// What the guest is told at boot through a cloud-init NoCloud seed
/// ([`crate::seed`]). Checked by [`Context::validate`] with the seed's own
/// rules, so a stored context always builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Context {
    /// `None`: the VM name.
    pub hostname: Option<String>,
    /// `None`: a `#cloud-config` that authorizes `ssh_keys`, or does nothing.
    pub user_data: Option<String>,
    pub network_config: Option<String>,
    pub ssh_keys: Vec<String>,
}

impl Context {
    /// The hostname the guest gets: the given one, else the VM name.
    pub fn hostname_for<'a>(&'a self, vm: &'a VmName) -> &'a str {
        self.hostname.as_deref().unwrap_or(vm.as_str())
    }

    /// The seed of guest `uuid` named `vm`.
    pub fn seed(&self, uuid: uuid::Uuid, vm: &VmName) -> Seed {
        Seed {
            instance_id: uuid.to_string(),
            hostname: self.hostname_for(vm).to_string(),
            user_data: self.user_data.clone(),
            network_config: self.network_config.clone(),
            ssh_keys: self.ssh_keys.clone(),
        }
    }

    /// The seed's own rules ([`Seed::validate`]), and a VM name that can
    /// stand in for a missing hostname.
    pub fn validate(&self, vm: &VmName) -> Result<()> {
        if self.hostname.is_none() && seed::check_hostname(vm.as_str()).is_err() {
            return Err(Error::invalid(format!(
                "vm {vm}: its name is not a valid hostname for the guest (RFC 1123: \
                 no '_', no empty label, no label starting or ending with '-'): \
                 give the context a hostname"
            )));
        }
        self.seed(uuid::Uuid::nil(), vm).validate()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    pub vcpus: u32,
    pub memory: ByteSize,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub kernel: Option<KernelBoot>,
    pub labels: BTreeMap<String, String>,
    /// Some: a NoCloud seed disk after `disks`. Records written before
    /// contextualization existed have none.
    #[serde(default)]
    pub context: Option<Context>,
}

pub const MAX_VCPUS: u32 = 255;
pub const MIN_MEMORY: u64 = 16 * MIB;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;

/// The device of a guest's `i`th disk: vda, vdb, ... (the seed, when
/// there is one, comes after the spec's disks).
pub fn device_name(i: usize) -> String {
    format!("vd{}", char::from(b'a' + i as u8))
}

/// Checks the form of a host path given in a spec: absolute, no `.` or
/// `..`, no NUL, at most 4096 bytes. Whether the file may be used (beneath
/// a `--host-file-root`, an admin's request) is decided when agentd opens
/// it ([`stratus_core::rooted::Roots::open_file`]), never from this path.
pub fn check_host_file(what: &str, p: &str) -> Result<PathBuf> {
    let path = PathBuf::from(p);
    if !path.is_absolute()
        || path.components().any(|c| {
            matches!(
                c,
                std::path::Component::ParentDir | std::path::Component::CurDir
            )
        })
        || p.contains("/./")
        || p.ends_with("/.")
        || p.contains('\0')
        || p.len() > 4096
    {
        return Err(Error::invalid(format!(
            "{what} {p:?} must be an absolute path without '.' or '..'"
        )));
    }
    Ok(path)
}

/// Bridge names are Linux interface names.
pub fn check_ifname(what: &str, s: &str) -> Result<()> {
    if s.is_empty()
        || s.len() > 15
        || s == "."
        || s == ".."
        || s.bytes()
            .any(|c| c == b'/' || c == b':' || c.is_ascii_whitespace() || !c.is_ascii_graphic())
    {
        return Err(Error::invalid(format!(
            "{what} {s:?} is not a valid interface name"
        )));
    }
    Ok(())
}

impl VmSpec {
    /// The host files this spec names (`file:` disks, kernel, initrd,
    /// `file://` images), as "what path" for messages.
    pub fn host_files(&self) -> Vec<String> {
        let mut named = Vec::new();
        for d in &self.disks {
            match &d.source {
                DiskSource::File(p) => named.push(format!("disk {}", p.display())),
                DiskSource::Image { image, .. } if image.is_host_file() => {
                    named.push(format!("image {}", image.url))
                }
                _ => {}
            }
        }
        if let Some(k) = &self.kernel {
            named.push(format!("kernel {}", k.kernel.display()));
            if let Some(i) = &k.initrd {
                named.push(format!("initrd {}", i.display()));
            }
        }
        named
    }

    /// Checks the limits that do not depend on the host.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::invalid(format!(
                "vm {}: vcpus must be 1 to {MAX_VCPUS}, not {}",
                self.name, self.vcpus
            )));
        }
        if self.memory.0 < MIN_MEMORY || !self.memory.0.is_multiple_of(MIB) {
            return Err(Error::invalid(format!(
                "vm {}: memory must be a whole number of MiB, at least 16M (got {})",
                self.name, self.memory
            )));
        }
        if self.disks.len() > MAX_DISKS || self.nics.len() > MAX_NICS {
            return Err(Error::invalid(format!(
                "vm {}: at most {MAX_DISKS} disks and {MAX_NICS} NICs",
                self.name
            )));
        }
        if let Some(c) = &self.context {
            if self.disks.len() >= MAX_DISKS {
                return Err(Error::invalid(format!(
                    "vm {}: at most {} disks with a context (the seed is one more)",
                    self.name,
                    MAX_DISKS - 1
                )));
            }
            c.validate(&self.name)?;
        }
        for d in &self.disks {
            d.qos
                .validate()
                .map_err(|e| Error::invalid(format!("vm {}: {}", self.name, e.message())))?;
        }
        crate::qos::check_groups(self.name.as_str(), self.disks.iter().map(|d| &d.qos))?;
        for d in &self.disks {
            if let DiskSource::Image {
                local: true,
                server,
                ..
            } = &d.source
            {
                if !server.is_default() {
                    return Err(Error::invalid(format!(
                        "vm {}: a local image disk lives on this host: pdisk server {server} \
                         is only for clone disks",
                        self.name
                    )));
                }
            }
        }
        if self.disks.is_empty() && self.kernel.is_none() {
            return Err(Error::invalid(format!(
                "vm {}: nothing to boot: give a disk or a kernel",
                self.name
            )));
        }
        let dup = self
            .nics
            .iter()
            .enumerate()
            .any(|(i, a)| self.nics[..i].iter().any(|b| b.mac == a.mac));
        if dup {
            return Err(Error::invalid(format!("vm {}: duplicate MAC", self.name)));
        }
        for n in &self.nics {
            check_ifname("bridge", &n.bridge)?;
            if n.vlan > 4094 {
                return Err(Error::invalid(format!("vlan {} is out of 0..4094", n.vlan)));
            }
            if n.ips.len() > MAX_IPS_PER_NIC {
                return Err(Error::invalid(format!(
                    "a NIC names {} addresses; at most {MAX_IPS_PER_NIC}",
                    n.ips.len()
                )));
            }
            for ip in &n.ips {
                check_nic_ip(*ip)?;
            }
        }
        stratus_core::types::validate_labels(self.labels.iter())?;
        Ok(())
    }
}

/// The life of a guest as the agent tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Defined,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Crashed,
    Error,
    /// Destroy has begun: nothing of the guest runs on this host any more,
    /// but pdisk work (an unexport, an image clone's delete) is left, which
    /// agentd retries until done; then the record goes (DESTROYED).
    Destroying,
    Destroyed,
}

impl VmState {
    /// A QEMU process exists (or is being made) in these states.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Created,
    Starting,
    Running,
    Paused,
    Resumed,
    Stopping,
    Stopped,
    Crashed,
    Destroyed,
    DiskAttached,
    DiskDetached,
    Error,
    Rebooted,
    NicAttached,
    NicDetached,
    DiskIoError,
    Adopted,
    ImagePullStarted,
    ImagePullProgress,
    ImageCached,
    ImagePullFailed,
    ImageEvicted,
    ImageImported,
    ImageSaveStarted,
    ImageSaveProgress,
    ImageSaved,
    ImageSaveFailed,
    /// Reconciliation removed a leftover no guest record holds (host event).
    LeftoverRemoved,
    /// A running guest did not release a disk or NIC asked to detach.
    DiskDetachPending,
    /// Live migration (issue 15): started, progress, done, failed.
    Migrating,
    MigrationProgress,
    Migrated,
    MigrationFailed,
    /// A pdisk disk grew (ResizeDisk).
    DiskResized,
    /// A disk's I/O limits changed (SetDiskQos).
    DiskQosChanged,
}

/// Who or what caused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Api,
    Guest,
    GuestPanic,
    Qemu,
    Host,
    Reconciliation,
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_core::error::ErrorKind;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.parse().unwrap(),
            vcpus: 1,
            memory: ByteSize(64 << 20),
            disks: vec![],
            nics: vec![],
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                cmdline: String::new(),
            }),
            labels: BTreeMap::new(),
            context: Some(Context::default()),
        }
    }

    fn refused(s: &VmSpec) -> String {
        let e = s.validate().expect_err("should be refused");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        e.to_string()
    }

    #[test]
    fn a_context_names_the_guest_after_the_vm_unless_told() {
        let s = spec("web1");
        s.validate().unwrap();
        let id = uuid::Uuid::new_v4();
        let seed = s.context.as_ref().unwrap().seed(id, &s.name);
        assert_eq!(seed.instance_id, id.to_string());
        assert_eq!(seed.hostname, "web1");
        assert_eq!(seed.user_data, None);

        // A VM name need not be a hostname, but then the context must give one.
        let mut s = spec("web_1");
        assert!(refused(&s).contains("give the context a hostname"));
        s.context.as_mut().unwrap().hostname = Some("web-1".into());
        s.validate().unwrap();
        assert_eq!(
            s.context.as_ref().unwrap().seed(id, &s.name).hostname,
            "web-1"
        );
        s.context = None;
        s.validate().unwrap();
    }

    #[test]
    fn a_bad_context_is_refused() {
        let mut s = spec("web1");
        s.context.as_mut().unwrap().hostname = Some("a..b".into());
        assert!(refused(&s).contains("hostname \"a..b\""));
        let mut s = spec("web1");
        s.context.as_mut().unwrap().ssh_keys = vec!["ssh-ed25519 AAAA\nx y".into()];
        assert!(refused(&s).contains("one line"));
        let mut s = spec("web1");
        s.context.as_mut().unwrap().user_data = Some("a\0".into());
        assert!(refused(&s).contains("user-data contains a NUL"));
        let mut s = spec("web1");
        s.context.as_mut().unwrap().network_config = Some("x".repeat(seed::MAX_NETWORK_CONFIG + 1));
        assert!(refused(&s).contains("network-config is"));
        // The seed takes a disk slot.
        let mut s = spec("web1");
        s.disks = vec![
            Disk {
                qos: Default::default(),
                source: DiskSource::Pdisk("v".parse().unwrap()),
                read_only: false,
                boot_index: 0,
            };
            MAX_DISKS
        ];
        assert!(refused(&s).contains("at most 15 disks with a context"));
        s.context = None;
        s.validate().unwrap();
    }

    #[test]
    fn records_without_a_context_still_load() {
        let mut s = spec("web1");
        s.context = None;
        let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
        json.as_object_mut().unwrap().remove("context");
        let old: VmSpec = serde_json::from_value(json).unwrap();
        assert_eq!(old, s);
        // A context missing newer fields loads with their defaults.
        let c: Context = serde_json::from_str(r#"{"hostname":"h"}"#).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("h"));
        assert!(c.ssh_keys.is_empty());
        let s = spec("web1");
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn records_from_before_the_typed_fields_load_into_them() {
        let old = r#"{"name":"web1","vcpus":1,"memory":67108864,
            "disks":[{"source":{"kind":"pdisk","ref":"data"},"read_only":false,"boot_index":1},
                     {"source":{"kind":"image","ref":{"image":{"url":"https://i.example/a",
                        "sha256":"ab","format":"qcow2","endorser":null},"size":0,"local":true}},
                      "read_only":false,"boot_index":0}],
            "nics":[{"bridge":"br0","mac":"52:54:00:12:34:56","vlan":0}],
            "kernel":null,"labels":{}}"#;
        let s: VmSpec = serde_json::from_str(old).unwrap();
        assert_eq!(
            s.disks[0].source,
            DiskSource::Pdisk("data".parse().unwrap())
        );
        let DiskSource::Image { image, server, .. } = &s.disks[1].source else {
            panic!("{:?}", s.disks[1].source)
        };
        assert_eq!(image.format, DeclaredFormat::Qcow2);
        // Records from before named pdisk servers: the default server.
        assert!(server.is_default());
        assert!(s.disks[0].source.pdisk_server().unwrap().is_default());
        assert_eq!(s.nics[0].mac, "52:54:00:12:34:56".parse().unwrap());
        let again: VmSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
        // A record cannot smuggle in what the edge refuses.
        assert!(serde_json::from_str::<VmSpec>(&old.replace("52:54:00", "01:00:5e")).is_err());
    }

    #[test]
    fn pdisk_refs_name_their_server_and_default_ones_serialize_as_before() {
        let d: PdiskRef = "data".parse().unwrap();
        assert!(d.server.is_default());
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"data\"");
        let b: PdiskRef = "store-b/data".parse().unwrap();
        assert_eq!(b.server.as_str(), "store-b");
        assert_eq!(b.volume.to_string(), "data");
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"store-b/data\"");
        let back: PdiskRef = serde_json::from_str("\"store-b/data\"").unwrap();
        assert_eq!(back, b);
        for bad in ["B/data", "/data", "b/", "b/Data", "a/b/c", "1b/data"] {
            assert!(bad.parse::<PdiskRef>().is_err(), "{bad}");
        }
        assert!(ServerName::from_request("").unwrap().is_default());
        assert!(ServerName::from_request("x".repeat(33).as_str()).is_err());
        // A local image disk cannot name a server.
        let mut s = spec("web1");
        s.disks = vec![Disk {
            qos: Default::default(),
            source: DiskSource::Pdisk(d),
            read_only: false,
            boot_index: 1,
        }];
        s.validate().unwrap();
        s.disks[0].source = DiskSource::Image {
            image: ImageSpec {
                url: "https://i.example/a".into(),
                sha256: "ab".repeat(32),
                format: DeclaredFormat::Raw,
                endorser: None,
                endorsement: None,
            },
            size: 0,
            local: true,
            server: "b".parse().unwrap(),
        };
        assert!(refused(&s).contains("only for clone disks"));
    }
}
