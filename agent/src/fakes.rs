//! In-memory host effects for the unit tier: a pdisk ([`FakeVolumes`]), a
//! host network ([`FakeNet`], its nftables [`FakeNft`]) and QEMU
//! ([`FakeVmm`]). Each keeps the state a test asserts on (exports, taps,
//! processes), records its calls, and fails any call on demand
//! ([`Failures`]). They outlive an [`Agent`] dropped in a test, as the host
//! outlives a crash of agentd.
//!
//! [`Agent`]: crate::service::Agent

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use stratus_core::types::{LABEL_IMAGE_SHA256, LABEL_VM};
use stratus_proto::pdisk::v1 as pdpb;
use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

use crate::net::{HostNet, TapName};
use crate::qmp::{QmpEvent, QmpEventKind, QmpEvents, RunState, RunStatus, ShutdownCause};
use crate::vmm::{LaunchPlan, QmpCommands, Vmm};
use crate::volumes::VolumeClient;
use stratus_core::error::{Error, Result};

mod nft;
pub use nft::FakeNft;

/// Calls to fail, by operation name: every time, or the next n times.
#[derive(Default)]
pub struct Failures {
    armed: Mutex<HashMap<&'static str, Armed>>,
    calls: Mutex<Vec<String>>,
}

/// Which calls of one operation fail.
#[derive(Clone, Copy)]
struct Armed {
    /// Calls to let through first.
    skip: usize,
    /// Calls to fail after those; None: all.
    times: Option<usize>,
}

impl Failures {
    /// Fails every call of `op` until [`Failures::heal`].
    pub fn fail(&self, op: &'static str) {
        self.armed.lock().unwrap().insert(
            op,
            Armed {
                skip: 0,
                times: None,
            },
        );
    }

    /// Fails the next `n` calls of `op`.
    pub fn fail_times(&self, op: &'static str, n: usize) {
        self.armed.lock().unwrap().insert(
            op,
            Armed {
                skip: 0,
                times: Some(n),
            },
        );
    }

    /// Fails only the `n`th call of `op` from now (1: the next).
    pub fn fail_nth(&self, op: &'static str, n: usize) {
        self.armed.lock().unwrap().insert(
            op,
            Armed {
                skip: n - 1,
                times: Some(1),
            },
        );
    }

    pub fn heal(&self, op: &'static str) {
        self.armed.lock().unwrap().remove(op);
    }

    /// Every call so far, `op detail`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// How many calls of `op` were made.
    pub fn count(&self, op: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }

    /// Records a call of `op`; true when it must fail.
    fn call(&self, op: &'static str, detail: impl std::fmt::Display) -> bool {
        self.calls.lock().unwrap().push(format!("{op} {detail}"));
        let mut armed = self.armed.lock().unwrap();
        let Some(a) = armed.get_mut(op) else {
            return false;
        };
        if a.skip > 0 {
            a.skip -= 1;
            return false;
        }
        if let Some(n) = &mut a.times {
            *n -= 1;
            if *n == 0 {
                armed.remove(op);
            }
        }
        true
    }
}

fn injected(op: &str) -> String {
    format!("injected failure of {op}")
}

// ---------------------------------------------------------------------------
// pdisk

/// A pdisk server in memory: volumes by UUID, the set exported to us.
#[derive(Default)]
pub struct FakeVolumes {
    pub failures: Failures,
    state: Mutex<PdiskState>,
    /// How long each export takes (none by default), for callers that give
    /// up half-way.
    pub export_delay: Mutex<Duration>,
    /// The CHAP credentials of every export asked for, in order.
    pub export_chaps: Mutex<Vec<Option<pdpb::ChapCredentials>>>,
    /// The whole server is unreachable: every call fails Unavailable (as
    /// when its host is down), and is still recorded.
    down: std::sync::atomic::AtomicBool,
    /// Set: a pool of RBD images (pdiskd --backend rbd). Exports answer
    /// this attachment, its image the volume's `pd-vol-UUID`, and no target.
    pub export_rbd: Mutex<Option<pdpb::RbdAttachment>>,
    /// Set: exports are pdiskd's nvmet exporter's (NVMe/TCP, port 4420).
    pub export_nvmet: Mutex<bool>,
    /// Set: pdiskd runs on the host with this id, its volumes `DIR/vol-UUID`
    /// files: an export asked with that host id answers a local attachment.
    pub export_local: Mutex<Option<(String, PathBuf)>>,
    /// The host id of every export asked for, in order.
    pub export_host_ids: Mutex<Vec<String>>,
}

#[derive(Default)]
struct PdiskState {
    volumes: BTreeMap<String, pdpb::Volume>,
    exported: BTreeSet<String>,
}

impl PdiskState {
    fn resolve(&self, r: &str) -> std::result::Result<String, Status> {
        if self.volumes.contains_key(r) {
            return Ok(r.to_string());
        }
        self.volumes
            .values()
            .find(|v| v.name == r)
            .map(|v| v.uuid.clone())
            .ok_or_else(|| Status::not_found(format!("volume {r} not found")))
    }

    /// [`Self::resolve`] in a project, as pdiskd scopes it: a volume of
    /// another project is NotFound ("" = every project).
    fn resolve_in(&self, r: &str, project: &str) -> std::result::Result<String, Status> {
        let id = self.resolve(r)?;
        if project.is_empty() || self.volumes[&id].project == project {
            Ok(id)
        } else {
            Err(Status::not_found(format!("volume {r} not found")))
        }
    }

    fn add(&mut self, name: &str, labels: HashMap<String, String>, source: String) -> pdpb::Volume {
        let v = pdpb::Volume {
            uuid: Uuid::new_v4().to_string(),
            name: name.to_string(),
            size_bytes: 1 << 30,
            state: pdpb::VolumeState::Ready as i32,
            image_sha256: match labels.get(LABEL_IMAGE_SHA256) {
                Some(sha) if !labels.contains_key(LABEL_VM) => sha.clone(),
                _ => String::new(),
            },
            labels,
            source,
            ..Default::default()
        };
        self.volumes.insert(v.uuid.clone(), v.clone());
        v
    }
}

impl FakeVolumes {
    pub fn new() -> Arc<FakeVolumes> {
        Arc::default()
    }

    /// Adds a ready volume named `name`; returns its UUID.
    pub fn add_volume(&self, name: &str) -> String {
        self.state
            .lock()
            .unwrap()
            .add(name, HashMap::new(), String::new())
            .uuid
    }

    /// Adds a ready volume named `name` of `project`; returns its UUID.
    pub fn add_volume_in(&self, name: &str, project: &str) -> String {
        let mut st = self.state.lock().unwrap();
        let uuid = st.add(name, HashMap::new(), String::new()).uuid;
        st.volumes.get_mut(&uuid).unwrap().project = project.to_owned();
        uuid
    }

    /// Adds the ready pdisk base volume of the image with checksum `sha`
    /// (as an import by agentd makes it); returns its UUID.
    pub fn add_image_base(&self, name: &str, sha: &str) -> String {
        self.state
            .lock()
            .unwrap()
            .add(
                name,
                HashMap::from([(LABEL_IMAGE_SHA256.to_string(), sha.to_string())]),
                String::new(),
            )
            .uuid
    }

    /// UUIDs of the volumes exported to us.
    pub fn exported(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .exported
            .iter()
            .cloned()
            .collect()
    }

    /// Names of all volumes.
    pub fn volume_names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.volumes.values().map(|v| v.name.clone()).collect()
    }

    /// Takes the whole server down (every call Unavailable) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self, op: &'static str, detail: &str) -> std::result::Result<(), Status> {
        if self.failures.call(op, detail) || self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable(injected(op)));
        }
        Ok(())
    }
}

type Answer<'a, T> = BoxFuture<'a, std::result::Result<T, Status>>;

impl VolumeClient for FakeVolumes {
    /// Grows only, as pdisk does.
    fn resize_volume(
        &self,
        volume: String,
        size: u64,
        project: String,
    ) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("resize_volume", &volume)?;
            let mut st = self.state.lock().unwrap();
            let id = st.resolve_in(&volume, &project)?;
            let v = st.volumes.get_mut(&id).expect("resolved");
            if size < v.size_bytes {
                return Err(Status::invalid_argument(format!(
                    "volume {volume}: {size} is smaller than its {} bytes",
                    v.size_bytes
                )));
            }
            v.size_bytes = size;
            Ok(v.clone())
        })
    }

    fn get_volume(&self, volume: String, project: String) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("get_volume", &volume)?;
            let st = self.state.lock().unwrap();
            let id = st.resolve_in(&volume, &project)?;
            Ok(st.volumes[&id].clone())
        })
    }

    fn list_volumes(&self, req: pdpb::ListVolumesRequest) -> Answer<'_, Vec<pdpb::Volume>> {
        Box::pin(async move {
            self.check("list_volumes", "")?;
            let st = self.state.lock().unwrap();
            Ok(st
                .volumes
                .values()
                .filter(|v| {
                    req.label_selector
                        .iter()
                        .all(|(k, val)| v.labels.get(k) == Some(val))
                })
                .cloned()
                .collect())
        })
    }

    fn export_volume(&self, req: pdpb::ExportVolumeRequest) -> Answer<'_, pdpb::Export> {
        Box::pin(async move {
            self.check("export_volume", &req.volume)?;
            self.export_chaps.lock().unwrap().push(req.chap.clone());
            let delay = *self.export_delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut st = self.state.lock().unwrap();
            let id = st.resolve_in(&req.volume, &req.project)?;
            let name = st.volumes[&id].name.clone();
            st.exported.insert(id.clone());
            self.export_host_ids
                .lock()
                .unwrap()
                .push(req.host_id.clone());
            if let Some((host, dir)) = self.export_local.lock().unwrap().clone() {
                if !req.host_id.is_empty() && req.host_id == host {
                    let path = dir.join(format!("vol-{id}"));
                    return Ok(pdpb::Export {
                        url: format!("file:{}", path.display()),
                        volume_uuid: id,
                        volume_name: name,
                        initiators: req.initiators,
                        exporter: "local".into(),
                        local: Some(pdpb::LocalAttachment {
                            path: path.display().to_string(),
                            format: "raw".into(),
                            block_device: false,
                        }),
                        ..Default::default()
                    });
                }
            }
            if let Some(mut rbd) = self.export_rbd.lock().unwrap().clone() {
                rbd.image = format!("pd-vol-{id}");
                return Ok(pdpb::Export {
                    url: format!("rbd:{}/{}", rbd.pool, rbd.image),
                    volume_uuid: id,
                    volume_name: name,
                    initiators: req.initiators,
                    exporter: "rbd".into(),
                    rbd: Some(rbd),
                    ..Default::default()
                });
            }
            let target_iqn = format!("iqn.2026-11.io.stratus.pdisk:{name}");
            if *self.export_nvmet.lock().unwrap() {
                let nqn = target_iqn.replacen("iqn.", "nqn.", 1);
                return Ok(pdpb::Export {
                    volume_uuid: id,
                    volume_name: name,
                    url: format!("nvme+tcp://127.0.0.1:4420/{nqn}/1"),
                    target_iqn,
                    portal: "127.0.0.1:4420".into(),
                    lun: 1,
                    initiators: req.initiators,
                    exporter: "nvmet".into(),
                    ..Default::default()
                });
            }
            Ok(pdpb::Export {
                volume_uuid: id,
                volume_name: name,
                url: format!("iscsi://127.0.0.1:3260/{target_iqn}/1"),
                target_iqn,
                portal: "127.0.0.1:3260".into(),
                lun: 1,
                initiators: req.initiators,
                ..Default::default()
            })
        })
    }

    fn unexport_volume(&self, req: pdpb::UnexportVolumeRequest) -> Answer<'_, ()> {
        Box::pin(async move {
            self.check("unexport_volume", &req.volume)?;
            let mut st = self.state.lock().unwrap();
            let id = st.resolve(&req.volume)?;
            if !st.exported.remove(&id) {
                return Err(Status::not_found(format!("volume {id} is not exported")));
            }
            Ok(())
        })
    }

    fn clone_volume(&self, req: pdpb::CloneVolumeRequest) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("clone_volume", &req.name)?;
            let mut st = self.state.lock().unwrap();
            if st.volumes.values().any(|v| v.name == req.name) {
                return Err(Status::already_exists(format!(
                    "volume {} already exists",
                    req.name
                )));
            }
            let (source, of_volume, of_snapshot) = if req.source_is_snapshot {
                (
                    format!("snapshot:{}", req.source),
                    String::new(),
                    req.source,
                )
            } else {
                let id = st.resolve(&req.source)?;
                (format!("volume:{id}"), id, String::new())
            };
            let mut v = st.add(&req.name, req.labels, source);
            v.clone_of_volume = of_volume;
            v.clone_of_snapshot = of_snapshot;
            v.project = req.project;
            st.volumes.insert(v.uuid.clone(), v.clone());
            Ok(v)
        })
    }

    fn delete_volume(&self, volume: String) -> Answer<'_, ()> {
        Box::pin(async move {
            self.check("delete_volume", &volume)?;
            let mut st = self.state.lock().unwrap();
            let id = st.resolve(&volume)?;
            if st.exported.contains(&id) {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is exported"
                )));
            }
            st.volumes.remove(&id);
            Ok(())
        })
    }

    fn upload_volume(
        &self,
        header: pdpb::UploadHeader,
        _path: PathBuf,
    ) -> Answer<'_, pdpb::Volume> {
        Box::pin(async move {
            self.check("upload_volume", &header.name)?;
            let mut st = self.state.lock().unwrap();
            Ok(st.add(&header.name, header.labels, String::new()))
        })
    }

    fn create_snapshot(&self, req: pdpb::CreateSnapshotRequest) -> Answer<'_, pdpb::Snapshot> {
        Box::pin(async move {
            self.check("create_snapshot", &req.volume)?;
            Ok(pdpb::Snapshot {
                uuid: Uuid::new_v4().to_string(),
                name: req.name,
                volume_uuid: req.volume,
                ..Default::default()
            })
        })
    }

    fn delete_snapshot(&self, snapshot: String) -> Answer<'_, ()> {
        Box::pin(async move { self.check("delete_snapshot", &snapshot) })
    }

    fn checksum_volume(&self, req: pdpb::ChecksumVolumeRequest) -> Answer<'_, String> {
        Box::pin(async move {
            self.check("checksum_volume", &req.volume)?;
            Ok("0".repeat(64))
        })
    }

    fn watch_progress(
        &self,
        _request_id: String,
    ) -> BoxFuture<'_, BoxStream<'static, pdpb::Progress>> {
        Box::pin(async { Box::pin(futures::stream::empty()) as BoxStream<'static, pdpb::Progress> })
    }
}

// ---------------------------------------------------------------------------
// host network

/// Taps in memory: name → (bridge, vlan).
#[derive(Default)]
pub struct FakeNet {
    pub failures: Failures,
    taps: Mutex<BTreeMap<String, (Option<String>, u16)>>,
}

impl FakeNet {
    pub fn new() -> Arc<FakeNet> {
        Arc::default()
    }

    /// Names of the taps that exist.
    pub fn taps(&self) -> Vec<String> {
        self.taps.lock().unwrap().keys().cloned().collect()
    }

    /// A tap made by someone else (an operator, or a guest agentd forgot).
    pub fn add_tap(&self, name: &str) {
        self.taps.lock().unwrap().insert(name.into(), (None, 0));
    }

    fn check(&self, op: &'static str, tap: &TapName) -> Result<()> {
        if self.failures.call(op, tap) {
            return Err(Error::internal(injected(op)));
        }
        Ok(())
    }

    /// The bridge tap `name` is a port of, if it exists and is one.
    pub fn bridge_of(&self, name: &str) -> Option<String> {
        self.taps
            .lock()
            .unwrap()
            .get(name)
            .and_then(|t| t.0.clone())
    }
}

impl HostNet for FakeNet {
    fn create_tap(&self, name: &TapName) -> Result<()> {
        self.check("create_tap", name)?;
        self.taps
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default();
        Ok(())
    }

    fn delete_tap(&self, name: &TapName) -> Result<()> {
        self.check("delete_tap", name)?;
        self.taps.lock().unwrap().remove(name.as_str());
        Ok(())
    }

    fn attach_to_bridge(&self, tap: &TapName, bridge: &str, _vlan: u16) -> Result<()> {
        self.check("attach_to_bridge", tap)?;
        match self.taps.lock().unwrap().get_mut(tap.as_str()) {
            Some(t) => {
                t.0 = Some(bridge.to_string());
                Ok(())
            }
            None => Err(Error::not_found(format!("tap {tap} does not exist"))),
        }
    }

    fn set_vlan(&self, tap: &TapName, vlan: u16) -> Result<()> {
        self.check("set_vlan", tap)?;
        match self.taps.lock().unwrap().get_mut(tap.as_str()) {
            Some(t) => {
                t.1 = vlan;
                Ok(())
            }
            None => Err(Error::not_found(format!("tap {tap} does not exist"))),
        }
    }

    fn list_taps_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.taps()
            .into_iter()
            .filter(|t| t.starts_with(prefix))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// QEMU

/// A host file a fake launch read: its path on the command line, and its
/// bytes or why it could not be opened.
pub type HostRead = (PathBuf, std::result::Result<Vec<u8>, String>);

/// QEMU processes in memory. A guest shuts down when asked (ACPI
/// powerdown, quit) and its QMP connection then closes, as QEMU's does.
#[derive(Default)]
pub struct FakeVmm {
    /// Also fails QMP commands: `query_status`, `stop`, `cont`,
    /// `system_powerdown`, `system_reset`, `quit`.
    pub failures: Arc<Failures>,
    inner: Arc<Mutex<Processes>>,
    /// What each launch's QEMU would have read from the host files it was
    /// given (raw file disks, host devices, kernel, initrd), read at launch time: (path
    /// on the command line, its bytes or the error).
    host_reads: Arc<Mutex<Vec<HostRead>>>,
    /// Per-guest cgroups on the fake host that no launch made (strays for
    /// the sweep at reconciliation), by guest UUID.
    stray_cgroups: Arc<Mutex<std::collections::BTreeSet<Uuid>>>,
}

#[derive(Default)]
struct Processes {
    next_pid: u32,
    by_pid: BTreeMap<u32, FakeQemu>,
}

struct FakeQemu {
    uuid: Uuid,
    /// As it was launched: its user and sandbox; None: unconfined.
    confinement: Option<crate::confine::Confinement>,
    qmp_socket: PathBuf,
    running: bool,
    /// The connected QMP client's events, if one is connected.
    events: Option<mpsc::UnboundedSender<QmpEvent>>,
    /// Its devices with an id: (driver, root port), cold-plugged at
    /// launch or hot-plugged since.
    devices: BTreeMap<String, (String, Option<String>)>,
    /// Its guest ignores unplug requests (no hot-plug support).
    keeps_devices: bool,
    /// Disk sizes `block_resize` told it, by device.
    sizes: BTreeMap<String, u64>,
    /// Its throttle groups' limits, by object id.
    groups: BTreeMap<String, crate::qos::Limits>,
}

impl FakeQemu {
    fn emit(&self, kind: QmpEventKind) {
        if let Some(tx) = &self.events {
            let _ = tx.send(QmpEvent {
                timestamp: SystemTime::now(),
                kind,
            });
        }
    }
}

impl Processes {
    /// The process exits: its QMP client sees the close.
    fn exit(&mut self, pid: u32) {
        if let Some(q) = self.by_pid.remove(&pid) {
            q.emit(QmpEventKind::Closed);
        }
    }
}

impl FakeVmm {
    pub fn new() -> Arc<FakeVmm> {
        Arc::default()
    }

    /// A cgroup of guest `uuid` on the fake host, for the sweep.
    pub fn add_cgroup(&self, uuid: Uuid) {
        self.stray_cgroups.lock().unwrap().insert(uuid);
    }

    /// The cgroups [`Self::add_cgroup`] made that no sweep removed.
    pub fn stray_cgroups(&self) -> Vec<Uuid> {
        self.stray_cgroups.lock().unwrap().iter().copied().collect()
    }

    /// Pids of live QEMUs.
    pub fn pids(&self) -> Vec<u32> {
        self.inner.lock().unwrap().by_pid.keys().copied().collect()
    }

    /// Pids of live QEMUs of guest `uuid`.
    pub fn pids_of(&self, uuid: Uuid) -> Vec<u32> {
        let p = self.inner.lock().unwrap();
        p.by_pid
            .iter()
            .filter(|(_, q)| q.uuid == uuid)
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// The host files launches read (see `host_reads`), oldest first.
    pub fn host_reads(&self) -> Vec<HostRead> {
        self.host_reads.lock().unwrap().clone()
    }

    /// How live QEMU `pid` was confined at launch; None when it runs
    /// unconfined or does not run.
    pub fn confinement_of(&self, pid: u32) -> Option<crate::confine::Confinement> {
        self.inner
            .lock()
            .unwrap()
            .by_pid
            .get(&pid)?
            .confinement
            .clone()
    }

    /// True when live QEMU `pid` was launched unconfined (as root).
    pub fn launched_unconfined(&self, pid: u32) -> bool {
        matches!(self.inner.lock().unwrap().by_pid.get(&pid), Some(q) if q.confinement.is_none())
    }

    /// QEMU `pid` dies on its own (a crash, an OOM kill).
    pub fn die(&self, pid: u32) {
        self.inner.lock().unwrap().exit(pid);
    }

    /// The devices QEMU `pid` has: id → root port (None: on the root bus),
    /// root ports left out.
    pub fn devices_of(&self, pid: u32) -> BTreeMap<String, Option<String>> {
        let p = self.inner.lock().unwrap();
        p.by_pid
            .get(&pid)
            .map(|q| {
                q.devices
                    .iter()
                    .filter(|(_, (driver, _))| driver != "pcie-root-port")
                    .map(|(id, (_, port))| (id.clone(), port.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The limits of throttle group `id` in QEMU `pid`.
    pub fn throttle_group(&self, pid: u32, id: &str) -> Option<crate::qos::Limits> {
        let p = self.inner.lock().unwrap();
        p.by_pid.get(&pid)?.groups.get(id).cloned()
    }

    /// Changes throttle group `id` of QEMU `pid` behind agentd's back.
    pub fn set_throttle_group(&self, pid: u32, id: &str, limits: crate::qos::Limits) {
        let mut p = self.inner.lock().unwrap();
        p.by_pid
            .get_mut(&pid)
            .unwrap()
            .groups
            .insert(id.into(), limits);
    }

    /// The size `block_resize` last told QEMU `pid` of disk `device`.
    pub fn size_of(&self, pid: u32, device: &str) -> Option<u64> {
        let p = self.inner.lock().unwrap();
        p.by_pid.get(&pid)?.sizes.get(device).copied()
    }

    /// The guest of QEMU `pid` ignores unplug requests from now on (or,
    /// with false, releases devices again).
    pub fn keep_devices(&self, pid: u32, keep: bool) {
        if let Some(q) = self.inner.lock().unwrap().by_pid.get_mut(&pid) {
            q.keeps_devices = keep;
        }
    }

    /// The guest of QEMU `pid` releases device `id` on its own, late.
    pub fn release_device(&self, pid: u32, id: &str) {
        if let Some(q) = self.inner.lock().unwrap().by_pid.get_mut(&pid) {
            q.devices.remove(id);
        }
    }

    /// QEMU `pid` emits `kind`, as if the guest or QEMU did something.
    pub fn emit(&self, pid: u32, kind: QmpEventKind) {
        if let Some(q) = self.inner.lock().unwrap().by_pid.get(&pid) {
            q.emit(kind);
        }
    }

    fn check(&self, op: &'static str, detail: impl std::fmt::Display) -> Result<()> {
        if self.failures.call(op, detail) {
            return Err(Error::precondition(injected(op)));
        }
        Ok(())
    }
}

impl Vmm for FakeVmm {
    fn check_raw<'a>(&'a self, path: &'a Path) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.check("check_image", path.display()) })
    }

    fn check_overlay<'a>(
        &'a self,
        overlay: &'a Path,
        _base: &'a Path,
        _base_format: stratus_core::image::ImageFormat,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.check("check_image", overlay.display()) })
    }

    fn launch<'a>(&'a self, plan: &'a LaunchPlan) -> BoxFuture<'a, Result<u32>> {
        Box::pin(async move {
            self.check("launch", &plan.name)?;
            // Read what a real QEMU would open by path at its start.
            let mut paths: Vec<PathBuf> = plan
                .disks
                .iter()
                .filter_map(|d| match &d.backend {
                    crate::vmm::DiskBackend::RawFile { path }
                    | crate::vmm::DiskBackend::Local { path, .. }
                    | crate::vmm::DiskBackend::HostDevice { path } => Some(path.clone()),
                    _ => None,
                })
                .collect();
            if let Some(k) = &plan.kernel {
                paths.push(k.kernel.clone());
                paths.extend(k.initrd.clone());
            }
            self.host_reads.lock().unwrap().extend(
                paths
                    .into_iter()
                    .map(|p| (p.clone(), std::fs::read(&p).map_err(|e| e.to_string()))),
            );
            let mut p = self.inner.lock().unwrap();
            p.next_pid += 1;
            let pid = 1000 + p.next_pid;
            p.by_pid.insert(
                pid,
                FakeQemu {
                    uuid: plan.uuid,
                    confinement: plan.confinement.clone(),
                    qmp_socket: plan.qmp_socket(),
                    running: true,
                    events: None,
                    devices: plan
                        .disks
                        .iter()
                        .map(|d| (format!("{}-dev", d.device), "virtio-blk-pci"))
                        .chain(
                            (0..plan.nics.len()).map(|i| (format!("net{i}-dev"), "virtio-net-pci")),
                        )
                        .map(|(id, driver)| (id, (driver.to_owned(), None)))
                        .chain((0..plan.hotplug_ports).map(|i| {
                            (
                                crate::vmm::root_port_id(i),
                                ("pcie-root-port".to_owned(), None),
                            )
                        }))
                        .collect(),
                    keeps_devices: false,
                    sizes: BTreeMap::new(),
                    groups: plan
                        .disks
                        .iter()
                        .filter_map(|d| d.qos.as_ref())
                        .map(|q| (q.group_id.clone(), q.limits.clone()))
                        .collect(),
                },
            );
            Ok(pid)
        })
    }

    fn connect_qmp<'a>(
        &'a self,
        socket: &'a Path,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<(Arc<dyn QmpCommands>, QmpEvents)>> {
        Box::pin(async move {
            self.check("connect_qmp", socket.display())?;
            let mut p = self.inner.lock().unwrap();
            let Some((&pid, q)) = p.by_pid.iter_mut().find(|(_, q)| q.qmp_socket == socket) else {
                return Err(Error::unavailable(format!(
                    "QMP socket {} does not answer",
                    socket.display()
                )));
            };
            // QEMU serves one client: a new one replaces the old.
            let (tx, events) = QmpEvents::channel();
            q.events = Some(tx);
            let qmp = FakeQmp {
                pid,
                processes: self.inner.clone(),
                failures: self.failures.clone(),
            };
            Ok((Arc::new(qmp) as Arc<dyn QmpCommands>, events))
        })
    }

    fn is_our_qemu(&self, pid: u32, uuid: Uuid) -> bool {
        matches!(self.inner.lock().unwrap().by_pid.get(&pid), Some(q) if q.uuid == uuid)
    }

    fn find_qemus(&self, uuid: Uuid) -> Vec<u32> {
        self.pids_of(uuid)
    }

    /// A failing kill leaves the process running, as a QEMU stuck in the
    /// kernel outlives SIGKILL for a while.
    fn kill(&self, pid: u32) {
        if !self.failures.call("kill", pid) {
            self.inner.lock().unwrap().exit(pid);
        }
    }

    fn wait_gone(&self, pid: u32, uuid: Uuid, _limit: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move { !self.is_our_qemu(pid, uuid) })
    }

    fn readopt_cgroup(
        &self,
        uuid: Uuid,
        pid: u32,
        _limits: crate::cgroup::Limits,
    ) -> Result<Option<String>> {
        self.failures
            .call("readopt_cgroup", format!("{uuid} {pid}"));
        Ok(None)
    }

    fn release_cgroup(&self, uuid: Uuid) -> BoxFuture<'_, Result<bool>> {
        self.failures.call("release_cgroup", uuid);
        Box::pin(async { Ok(false) })
    }

    fn cgroups(&self) -> Option<String> {
        None
    }

    fn sweep_cgroups(
        &self,
        known: &std::collections::HashSet<Uuid>,
    ) -> Vec<std::result::Result<String, String>> {
        let mut strays = self.stray_cgroups.lock().unwrap();
        let gone: Vec<Uuid> = strays
            .iter()
            .filter(|u| !known.contains(u))
            .copied()
            .collect();
        gone.iter()
            .map(|u| {
                strays.remove(u);
                Ok(format!("removed cgroup vm-{u} of no recorded guest"))
            })
            .collect()
    }

    fn follow_console<'a>(
        &'a self,
        dir: &'a Path,
        _max: u64,
        _vm: String,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.check("follow_console", dir.display()) })
    }
}

/// A QMP connection to one [`FakeVmm`] process.
struct FakeQmp {
    pid: u32,
    processes: Arc<Mutex<Processes>>,
    failures: Arc<Failures>,
}

impl FakeQmp {
    /// Runs command `op` on the process, if it still lives.
    fn command<T: Send + 'static>(
        &self,
        op: &'static str,
        act: impl FnOnce(&mut Processes, u32) -> T,
    ) -> BoxFuture<'_, Result<T>> {
        let r = if self.failures.call(op, self.pid) {
            Err(Error::internal(injected(op)))
        } else {
            let mut p = self.processes.lock().unwrap();
            if p.by_pid.contains_key(&self.pid) {
                Ok(act(&mut p, self.pid))
            } else {
                Err(Error::unavailable(format!("QEMU {} is gone", self.pid)))
            }
        };
        Box::pin(async move { r })
    }
}

fn process(p: &mut Processes, pid: u32) -> &mut FakeQemu {
    p.by_pid.get_mut(&pid).expect("checked by command")
}

impl QmpCommands for FakeQmp {
    /// A migration destination's commands: capabilities and
    /// `migrate-incoming` taken, `query-migrate` answering that no stream
    /// connected (the unit tier's QEMU never gets one); anything else
    /// Unavailable, as by default.
    fn execute<'a>(
        &'a self,
        command: &'a str,
        _arguments: Option<serde_json::Value>,
    ) -> BoxFuture<'a, Result<serde_json::Value>> {
        match command {
            "migrate-set-capabilities" | "migrate-incoming" | "query-migrate" => {
                self.command("execute", |_, _| serde_json::json!({}))
            }
            _ => Box::pin(async move {
                Err(Error::unavailable(format!(
                    "QMP {command}: not supported here"
                )))
            }),
        }
    }

    fn query_status(&self) -> BoxFuture<'_, Result<RunState>> {
        self.command("query_status", |p, pid| {
            let running = process(p, pid).running;
            RunState {
                status: if running {
                    RunStatus::Running
                } else {
                    RunStatus::Paused
                },
                running,
            }
        })
    }

    fn stop(&self) -> BoxFuture<'_, Result<()>> {
        self.command("stop", |p, pid| {
            let q = process(p, pid);
            q.running = false;
            q.emit(QmpEventKind::Stop);
        })
    }

    fn cont(&self) -> BoxFuture<'_, Result<()>> {
        self.command("cont", |p, pid| {
            let q = process(p, pid);
            q.running = true;
            q.emit(QmpEventKind::Resume);
        })
    }

    /// The guest obeys at once: it powers off and QEMU exits.
    fn system_powerdown(&self) -> BoxFuture<'_, Result<()>> {
        self.command("system_powerdown", |p, pid| {
            let q = process(p, pid);
            q.emit(QmpEventKind::Powerdown);
            q.emit(QmpEventKind::Shutdown {
                guest: true,
                reason: ShutdownCause::GuestShutdown,
            });
            p.exit(pid);
        })
    }

    fn system_reset(&self) -> BoxFuture<'_, Result<()>> {
        self.command("system_reset", |p, pid| {
            process(p, pid).emit(QmpEventKind::Reset {
                guest: false,
                reason: ShutdownCause::HostQmpSystemReset,
            });
        })
    }

    fn quit(&self) -> BoxFuture<'_, Result<()>> {
        self.command("quit", |p, pid| {
            process(p, pid).emit(QmpEventKind::Shutdown {
                guest: false,
                reason: ShutdownCause::HostQmpQuit,
            });
            p.exit(pid);
        })
    }

    fn peripherals(&self) -> BoxFuture<'_, Result<Vec<crate::qmp::Peripheral>>> {
        self.command("peripherals", |p, pid| {
            process(p, pid)
                .devices
                .iter()
                .map(|(id, (driver, port))| crate::qmp::Peripheral {
                    id: id.clone(),
                    driver: driver.clone(),
                    port: port.clone(),
                })
                .collect()
        })
    }

    fn add_disk<'a>(
        &'a self,
        d: &'a crate::vmm::PlannedDisk,
        _io: &'a crate::disk_io::DiskIo,
        _vcpus: u32,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let id = format!("{}-dev", d.device);
        let port = port.to_owned();
        let qos = d.qos.clone();
        Box::pin(async move {
            self.command("add_disk", move |p, pid| {
                let q = process(p, pid);
                if let Some(g) = qos {
                    q.groups.insert(g.group_id, g.limits);
                }
                plug(q, id, "virtio-blk-pci", port)
            })
            .await?
        })
    }

    fn remove_disk<'a>(&'a self, device: &'a str, _wait: Duration) -> BoxFuture<'a, Result<bool>> {
        let id = format!("{device}-dev");
        self.command("remove_disk", move |p, pid| unplug(process(p, pid), &id))
    }

    fn add_nic<'a>(
        &'a self,
        _n: &'a crate::vmm::PlannedNic,
        netdev: &'a str,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let id = format!("{netdev}-dev");
        let port = port.to_owned();
        Box::pin(async move {
            self.command("add_nic", move |p, pid| {
                plug(process(p, pid), id, "virtio-net-pci", port)
            })
            .await?
        })
    }

    fn remove_nic<'a>(&'a self, netdev: &'a str, _wait: Duration) -> BoxFuture<'a, Result<bool>> {
        let id = format!("{netdev}-dev");
        self.command("remove_nic", move |p, pid| unplug(process(p, pid), &id))
    }

    fn block_resize<'a>(&'a self, device: &'a str, size: u64) -> BoxFuture<'a, Result<()>> {
        let device = device.to_owned();
        self.command("block_resize", move |p, pid| {
            process(p, pid).sizes.insert(device, size);
        })
    }

    fn set_throttle_limits<'a>(
        &'a self,
        id: &'a str,
        limits: &'a crate::qos::Limits,
    ) -> BoxFuture<'a, Result<()>> {
        let (id, limits) = (id.to_owned(), limits.clone());
        Box::pin(async move {
            self.command("set_throttle_limits", move |p, pid| {
                match process(p, pid).groups.get_mut(&id) {
                    Some(l) => {
                        *l = limits;
                        Ok(())
                    }
                    None => Err(Error::not_found(format!("object {id} not found"))),
                }
            })
            .await?
        })
    }

    fn throttle_limits<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<crate::qos::Limits>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.command("throttle_limits", move |p, pid| {
                process(p, pid)
                    .groups
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Error::not_found(format!("object {id} not found")))
            })
            .await?
        })
    }
}

/// `device_add` on the fake: one device per id and per root port.
fn plug(q: &mut FakeQemu, id: String, driver: &str, port: String) -> Result<()> {
    if q.devices.contains_key(&id) {
        return Err(Error::invalid(format!("Duplicate device ID '{id}'")));
    }
    if q.devices
        .values()
        .any(|(_, p)| p.as_deref() == Some(port.as_str()))
    {
        return Err(Error::invalid(format!("Bus '{port}' is full")));
    }
    q.devices.insert(id, (driver.to_owned(), Some(port)));
    Ok(())
}

/// `device_del` and the wait: gone unless the guest keeps its devices.
fn unplug(q: &mut FakeQemu, id: &str) -> bool {
    if q.keeps_devices && q.devices.contains_key(id) {
        return false;
    }
    q.devices.remove(id);
    true
}
