//! QEMU processes and their QMP in memory ([`FakeVmm`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::qmp::{QmpEvent, QmpEventKind, QmpEvents, RunState, RunStatus, ShutdownCause};
use crate::vmm::{LaunchPlan, QmpCommands, Vmm};
use stratus_core::error::{Error, Result};

use super::{injected, Failures};

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
