//! A guest's life: create, start, stop, pause, resume, reboot, destroy.
//!
//! A start records each attachment before the next step and ends RUNNING
//! with a monitor following QEMU; when any step fails, everything attached
//! so far is undone and the guest is left in ERROR with the cause. A destroy
//! first marks the guest DESTROYING (durably), then undoes what it holds;
//! pdisk work it could not finish (an unexport, an image clone's delete)
//! stays in the record and is retried ([`Agent::finish_destroy`]) until done,
//! and only then does the record go.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use uuid::Uuid;

use super::Agent;
use crate::confine::Confinement;
use crate::journal::EventFilter;
use crate::spec::{Cause, DiskSource, EventType, KernelBoot, VmSpec, VmState};
use crate::store::{now_rfc3339, Event, NewEvent, Runtime, VmRecord};
use crate::vmm::{LaunchPlan, QmpCommands};
use stratus_core::error::{Error, ErrorKind, Result};
use stratus_core::quota::Book as _;
use stratus_core::rooted::RootedFile;

/// How long start waits for QEMU's QMP socket.
const QMP_CONNECT: Duration = Duration::from_secs(30);
/// How long pause/resume/reboot wait for QEMU to confirm.
const CONFIRM: Duration = Duration::from_secs(30);

impl Agent {
    // ---------- create ----------

    /// Defines a guest of `project` ("" = no project), within the host's
    /// capacity and the project's quota.
    /// A non-empty `request_id` is kept in the record: the same create
    /// again (a client's retry, even across a restart of agentd) answers
    /// with the guest it made instead of AlreadyExists.
    pub async fn create_vm(
        &self,
        spec: VmSpec,
        project: &str,
        request_id: &str,
    ) -> Result<VmRecord> {
        self.create_vm_by(spec, project, request_id, None).await
    }

    /// [`Self::create_vm`] by a caller, recorded as its creator.
    pub async fn create_vm_by(
        &self,
        spec: VmSpec,
        project: &str,
        request_id: &str,
        created_by: Option<stratus_pki::tenancy::Creator>,
    ) -> Result<VmRecord> {
        spec.validate()?;
        for n in &spec.nics {
            self.allowed_bridge(&n.bridge)?;
        }
        for d in &spec.disks {
            match &d.source {
                DiskSource::File(p) => {
                    // Opened to say now what a start would say; each start
                    // opens it again.
                    self.host_files.open_file("disk", p, !d.read_only)?;
                }
                DiskSource::Image {
                    image,
                    local,
                    server,
                    ..
                } => {
                    let r = image.to_ref()?;
                    if let Some(policy) = &self.policy {
                        policy.check(&r)?;
                    }
                    if !local {
                        self.pdisk(server)?;
                    }
                }
                DiskSource::Pdisk(v) => {
                    let pdisk = self.pdisk(&v.server)?;
                    pdisk
                        .get_volume(v.volume.to_string(), project.to_owned())
                        .await
                        .map_err(|s| pdisk.error(s, &format!("pdisk volume {v}")))?;
                }
            }
        }
        if let Some(k) = &spec.kernel {
            self.host_files.open_file("kernel", &k.kernel, false)?;
            if let Some(i) = &k.initrd {
                self.host_files.open_file("initrd", i, false)?;
            }
        }
        let _g = self.create_lock.lock().await;
        if !request_id.is_empty() {
            if let Some(done) = self.store.vms()?.into_iter().find(|v| {
                v.request_id == request_id && v.project == project && v.spec.name == spec.name
            }) {
                return Ok(done);
            }
        }
        // Names are unique per project: another project's guest of this
        // name is no obstacle, and so reveals nothing.
        if self
            .store
            .find_vm_in(Some(project), spec.name.as_str())
            .is_ok()
        {
            return Err(Error::exists(format!("vm {} already exists", spec.name)));
        }
        // Under the create lock, so no other create passes the quota with
        // this one.
        self.check_quota(project, &spec)?;
        let info = self.host_info()?;
        if spec.vcpus > info.free_vcpus || spec.memory.0 > info.free_memory {
            return Err(Error::exhausted(format!(
                "vm {}: needs {} vCPUs and {}, host has {} vCPUs and {} free",
                spec.name,
                spec.vcpus,
                spec.memory,
                info.free_vcpus,
                stratus_core::types::ByteSize(info.free_memory)
            )));
        }
        let mut vm = VmRecord {
            uuid: Uuid::new_v4(),
            spec,
            state: VmState::Defined,
            state_reason: String::new(),
            runtime: None,
            created_at: now_rfc3339(),
            last_event_seq: 0,
            owned_volumes: Vec::new(),
            pending_unexports: Vec::new(),
            project: project.to_owned(),
            request_id: request_id.to_owned(),
            created_by,
            hotplug: None,
            migration: None,
        };
        self.commit(
            &mut vm,
            &[NewEvent::new(EventType::Created, Cause::Api, "")],
        )?;
        self.crash_point("create.committed");
        Ok(vm)
    }

    /// Refuses a guest of `project` that would pass one of its quotas
    /// (ResourceExhausted naming the quota and the usage). Guests of no
    /// project have none. The caller holds the create lock.
    fn check_quota(&self, project: &str, spec: &VmSpec) -> Result<()> {
        if project.is_empty() {
            return Ok(());
        }
        let (limits, used) = self.store.quota(project)?;
        let what = |q: &str, used: String, limit: String, more: String| {
            Error::exhausted(format!(
                "vm {}: project {project}: {q} quota exceeded: {more} more requested, {used} of {limit} in use",
                spec.name
            ))
        };
        if let Some(l) = limits.vms.filter(|&l| used.vms + 1 > l) {
            return Err(what("VM", used.vms.to_string(), l.to_string(), "1".into()));
        }
        let vcpus = u64::from(spec.vcpus);
        if let Some(l) = limits.vcpus.filter(|&l| used.vcpus + vcpus > l) {
            return Err(what(
                "vCPU",
                used.vcpus.to_string(),
                l.to_string(),
                vcpus.to_string(),
            ));
        }
        if let Some(l) = limits
            .memory
            .filter(|&l| used.memory.saturating_add(spec.memory.0) > l)
        {
            use stratus_core::types::ByteSize;
            return Err(what(
                "memory",
                ByteSize(used.memory).to_string(),
                ByteSize(l).to_string(),
                spec.memory.to_string(),
            ));
        }
        Ok(())
    }

    // ---------- start ----------

    pub async fn start_vm(self: &Arc<Self>, r: &str) -> Result<VmRecord> {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let mut vm = self.store.find_vm(&vm.uuid.to_string())?;
        if vm.state.is_active() || vm.state == VmState::Destroying {
            return Err(Error::precondition(format!(
                "vm {} is {:?}",
                vm.spec.name, vm.state
            )));
        }
        // What the last run left (a QEMU that outlived SIGKILL, a tap that
        // would not go) is undone first; a new run never starts beside it.
        if vm.runtime.is_some() {
            let events = self.tear_down(&mut vm).await;
            self.commit(&mut vm, &events)?;
            if let Some(rt) = &vm.runtime {
                return Err(Error::precondition(format!(
                    "vm {}: its last run is not undone yet ({}); retried every minute",
                    vm.spec.name,
                    leftovers(rt)
                )));
            }
        }
        vm.runtime = Some(Runtime::default());
        // The guest's uid is recorded with STARTING, in one transaction;
        // a refusal (no sandbox, no uid left) changes nothing.
        let confinement = self.confine(&mut vm)?;
        vm.state = VmState::Starting;
        vm.state_reason.clear();
        if let Err(e) = self.commit(
            &mut vm,
            &[NewEvent::new(EventType::Starting, Cause::Api, "")],
        ) {
            self.uids.release(vm.uuid);
            return Err(e);
        }
        self.crash_point("start.starting");
        let started = std::time::Instant::now();
        let brought_up = self.bring_up(&mut vm, confinement, None).await;
        self.launches.observe(brought_up.is_ok(), started);
        match brought_up {
            Ok(()) => Ok(vm),
            Err(e) => {
                tracing::warn!(vm = %vm.spec.name, error = %e, "start failed; undoing attachments");
                let mut events = self.tear_down(&mut vm).await;
                vm.state = VmState::Error;
                vm.state_reason = e.to_string();
                events.push(NewEvent::new(EventType::Error, Cause::Qemu, e.to_string()));
                self.commit(&mut vm, &events)?;
                Err(e)
            }
        }
    }

    /// The spec's kernel and initrd, opened beneath a `--host-file-root`
    /// and named by their `/proc` paths (the files stay open in `held`).
    fn open_kernel(&self, vm: &VmRecord, held: &mut Vec<RootedFile>) -> Result<Option<KernelBoot>> {
        let Some(k) = &vm.spec.kernel else {
            return Ok(None);
        };
        let kernel = self.host_files.open_file("kernel", &k.kernel, false)?;
        let initrd = match &k.initrd {
            Some(i) => Some(self.host_files.open_file("initrd", i, false)?),
            None => None,
        };
        let boot = KernelBoot {
            kernel: kernel.proc_path(),
            initrd: initrd.as_ref().map(RootedFile::proc_path),
            cmdline: k.cmdline.clone(),
        };
        held.push(kernel);
        held.extend(initrd);
        Ok(Some(boot))
    }

    /// Attaches disks, the seed and NICs (recording each before the next
    /// step), then launches QEMU and connects its monitor. With `incoming`
    /// (a live migration's destination) QEMU waits on that TCP port for
    /// the guest's state instead of booting it, and the guest stays
    /// STARTING until it runs ([`Agent::prepare_incoming`]).
    pub(super) async fn bring_up(
        self: &Arc<Self>,
        vm: &mut VmRecord,
        confinement: Option<Confinement>,
        incoming: Option<super::migrate_stream::Incoming>,
    ) -> Result<()> {
        let dir = self.vm_dir(vm.uuid);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        // Root's alone: QEMU gets what it needs from it as descriptors, and
        // no guest's uid may enter it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(dir.display(), e))?;
        }
        let mut disks = Vec::new();
        // Host files agentd opened for this start, named by their /proc
        // paths; the launch opens them again from there and hands QEMU its
        // own descriptors, so they stay open until the launch returns.
        let mut held = Vec::new();
        for (i, d) in vm.spec.disks.clone().iter().enumerate() {
            disks.push(self.attach_disk(vm, i, d, &mut held).await?);
            self.crash_point("start.disk_attached");
        }
        if let Some(seed) = self.attach_seed(vm, &dir, disks.len())? {
            disks.push(seed);
        }
        let mut nics = Vec::new();
        for (i, n) in vm.spec.nics.clone().iter().enumerate() {
            nics.push(self.attach_nic(vm, i, n).await?);
            self.crash_point("start.nic_attached");
        }
        let plan = LaunchPlan {
            uuid: vm.uuid,
            name: vm.spec.name.to_string(),
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory.0 >> 20,
            accel: self.host.accel,
            disks,
            nics,
            kernel: self.open_kernel(vm, &mut held)?,
            dir: dir.clone(),
            disk_io: self.settings.disk_io,
            confinement,
            console_log_max: self.settings.console_log_max,
            hotplug_ports: self.settings.hotplug_ports,
            incoming: incoming.is_some(),
            layout: incoming.as_ref().and_then(|i| i.layout.clone()),
        };
        // A new boot, a new log.
        let _ = std::fs::remove_file(plan.console_log());
        let _ = std::fs::remove_file(crate::console::rotated(&plan.console_log()));
        let pid = self.vmm.launch(&plan).await?;
        // QEMU holds its own descriptors now.
        drop(held);
        {
            let rt = vm.runtime.as_mut().expect("runtime");
            rt.pid = pid;
            rt.qmp_socket = plan.qmp_socket();
        }
        self.commit(vm, &[])?;
        self.crash_point("start.launched");
        let (qmp, events) = self
            .vmm
            .connect_qmp(&plan.qmp_socket(), QMP_CONNECT)
            .await?;
        if let Some(incoming) = &incoming {
            let owner = vm.runtime.as_ref().and_then(|r| r.qemu_user);
            super::migrate_stream::listen_incoming(qmp.as_ref(), incoming, &dir, owner).await?;
            self.qmp.lock().unwrap().insert(vm.uuid, qmp);
            self.spawn_monitor(vm.uuid, pid, events);
            return Ok(());
        }
        let status = qmp.query_status().await?;
        vm.state = if status.running {
            VmState::Running
        } else {
            VmState::Paused
        };
        self.qmp.lock().unwrap().insert(vm.uuid, qmp);
        self.commit(
            vm,
            &[NewEvent::new(
                EventType::Running,
                Cause::Api,
                format!("qemu pid {pid}, accel {}", self.host.accel.name()),
            )],
        )?;
        self.spawn_monitor(vm.uuid, pid, events);
        self.crash_point("start.running");
        Ok(())
    }

    // ---------- stop, pause, resume, reboot ----------

    /// The events of guest `id` from now on; taken *before* the action whose
    /// confirmation [`Agent::await_event`] then waits for.
    pub(super) fn follow_vm(
        &self,
        id: Uuid,
    ) -> Result<futures::stream::BoxStream<'static, Result<Event>>> {
        let since = self.store.last_seq()?;
        Ok(self.journal.follow(since, EventFilter::vm(id.to_string())))
    }

    /// Waits for an event of `kinds` on `events` (from [`Agent::follow_vm`]).
    pub(super) async fn await_event(
        &self,
        events: &mut futures::stream::BoxStream<'static, Result<Event>>,
        id: Uuid,
        kinds: &[EventType],
        limit: Duration,
    ) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Err(_) => {
                    return Err(Error::unavailable(format!(
                        "vm {id}: QEMU did not confirm within {limit:?}"
                    )))
                }
                Ok(Some(Ok(e))) if kinds.contains(&e.kind) => return Ok(e),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Err(Error::internal("event stream closed")),
            }
        }
    }

    pub(super) fn active_qmp(&self, vm: &VmRecord) -> Result<Arc<dyn QmpCommands>> {
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(Error::precondition(format!(
                "vm {} is {:?}",
                vm.spec.name, vm.state
            )));
        }
        self.qmp_of(vm.uuid).ok_or_else(|| {
            Error::unavailable(format!(
                "vm {}: no QMP connection to its QEMU",
                vm.spec.name
            ))
        })
    }

    pub async fn stop_vm(&self, r: &str, timeout: Duration, force: bool) -> Result<VmRecord> {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let vm = self.store.find_vm(&vm.uuid.to_string())?;
        self.stop_locked(vm, timeout, force, Cause::Api).await
    }

    async fn stop_locked(
        &self,
        mut vm: VmRecord,
        timeout: Duration,
        force: bool,
        cause: Cause,
    ) -> Result<VmRecord> {
        let qmp = match self.active_qmp(&vm) {
            Ok(q) => q,
            // Its QEMU lives but agentd has no QMP connection to it (its
            // socket did not answer at adoption): stopped by force, here.
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                tracing::warn!(vm = %vm.spec.name, error = %e, "stopping by SIGKILL");
                vm.state = VmState::Stopping;
                self.commit(
                    &mut vm,
                    &[NewEvent::new(
                        EventType::Stopping,
                        cause,
                        "forced: no QMP connection",
                    )],
                )?;
                self.record_exit(vm.uuid, None, false, false).await?;
                return self.store.find_vm(&vm.uuid.to_string());
            }
            Err(e) => return Err(e),
        };
        let id = vm.uuid;
        let mut events = self.follow_vm(id)?;
        vm.state = VmState::Stopping;
        self.commit(
            &mut vm,
            &[NewEvent::new(
                EventType::Stopping,
                cause,
                if force { "forced" } else { "ACPI powerdown" },
            )],
        )?;
        self.crash_point("stop.stopping");
        let ended = [EventType::Stopped, EventType::Crashed];
        if !force {
            match qmp.system_powerdown().await {
                Ok(_) => {
                    if self
                        .await_event(&mut events, id, &ended, timeout)
                        .await
                        .is_ok()
                    {
                        return self.store.find_vm(&id.to_string());
                    }
                    tracing::warn!(vm = %vm.spec.name, ?timeout, "guest ignored ACPI powerdown; forcing");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.spec.name, error = %e, "powerdown failed; forcing")
                }
            }
        }
        if let Err(e) = qmp.quit().await {
            tracing::warn!(vm = %vm.spec.name, error = %e, "QMP quit failed; killing QEMU");
            if let Some(pid) = vm.runtime.as_ref().map(|r| r.pid) {
                self.vmm.kill(pid);
            }
        }
        self.crash_point("stop.exited");
        self.await_event(&mut events, id, &ended, Duration::from_secs(30))
            .await?;
        self.store.find_vm(&id.to_string())
    }

    pub async fn pause_vm(&self, r: &str) -> Result<VmRecord> {
        self.qmp_action(r, VmState::Running, EventType::Paused, |q| async move {
            q.stop().await
        })
        .await
    }

    pub async fn resume_vm(&self, r: &str) -> Result<VmRecord> {
        self.qmp_action(r, VmState::Paused, EventType::Resumed, |q| async move {
            q.cont().await
        })
        .await
    }

    pub async fn reboot_vm(&self, r: &str) -> Result<VmRecord> {
        self.qmp_action(r, VmState::Running, EventType::Rebooted, |q| async move {
            q.system_reset().await
        })
        .await
    }

    async fn qmp_action<F, Fut>(
        &self,
        r: &str,
        from: VmState,
        confirm: EventType,
        act: F,
    ) -> Result<VmRecord>
    where
        F: FnOnce(Arc<dyn QmpCommands>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let vm = self.store.find_vm(&vm.uuid.to_string())?;
        if vm.state != from {
            return Err(Error::precondition(format!(
                "vm {} is {:?}, not {:?}",
                vm.spec.name, vm.state, from
            )));
        }
        let qmp = self.active_qmp(&vm)?;
        let mut events = self.follow_vm(vm.uuid)?;
        act(qmp).await?;
        self.await_event(&mut events, vm.uuid, &[confirm], CONFIRM)
            .await?;
        self.store.find_vm(&vm.uuid.to_string())
    }

    // ---------- destroy ----------

    /// Stops the guest if it runs, marks it DESTROYING, and undoes what it
    /// holds ([`Agent::finish_destroy`]). When pdisk work is left (pdisk
    /// unreachable, say), the record stays DESTROYING and the call fails
    /// naming it; agentd retries it at start and every few minutes.
    pub async fn destroy_vm(&self, r: &str, timeout: Duration) -> Result<()> {
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let mut vm = self.store.find_vm(&vm.uuid.to_string())?;
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            vm = self.stop_locked(vm, timeout, false, Cause::Api).await?;
        }
        if vm.state != VmState::Destroying {
            vm.state = VmState::Destroying;
            self.commit(&mut vm, &[])?;
        }
        self.crash_point("destroy.marked");
        self.finish_destroy(vm, Cause::Api).await
    }

    /// Retries the unexports in `vm.pending_unexports`; those that fail
    /// again stay there.
    pub(super) async fn retry_unexports(&self, vm: &mut VmRecord) {
        let mut still_exported = Vec::new();
        for v in std::mem::take(&mut vm.pending_unexports) {
            if let Err(e) = self.unexport(&v).await {
                tracing::warn!(vm = %vm.spec.name, volume = %v, error = %e,
                    "could not unexport the guest's volume; retried later");
                still_exported.push(v);
            }
        }
        vm.pending_unexports = still_exported;
    }

    /// Undoes what a DESTROYING guest still holds: its attachments, its
    /// pdisk exports and image clones, its directory and pins; then drops
    /// the record with DESTROYED. What pdisk could not do is kept in the
    /// record for the next try. The caller holds the guest's lock.
    pub(super) async fn finish_destroy(&self, mut vm: VmRecord, cause: Cause) -> Result<()> {
        let mut events = self.tear_down(&mut vm).await;
        // Clones are deleted only once no export of the guest is left on
        // their server (pdisk refuses to delete an exported volume).
        self.delete_owned_volumes(&mut vm).await;
        self.crash_point("destroy.torn_down");
        if let Some(rt) = &vm.runtime {
            // A QEMU of the guest still runs (or a tap would not go): its
            // directory and record stay, and the destroy is tried again.
            vm.state_reason = format!("not yet undone on this host: {}", leftovers(rt));
            self.commit(&mut vm, &events)?;
            return Err(Error::unavailable(format!(
                "vm {}: {}; agentd retries every minute",
                vm.spec.name, vm.state_reason
            )));
        }
        let dir = self.vm_dir(vm.uuid);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        }
        self.crash_point("destroy.dir_removed");
        self.unpin(vm.uuid);
        if !vm.pending_unexports.is_empty() || !vm.owned_volumes.is_empty() {
            let left: Vec<String> = vm
                .pending_unexports
                .iter()
                .map(|v| format!("the export of volume {v}"))
                .chain(vm.owned_volumes.iter().map(|o| {
                    let id = if o.volume.is_empty() {
                        &o.name
                    } else {
                        &o.volume
                    };
                    if o.server.is_default() {
                        format!("image clone {id} ({})", o.device)
                    } else {
                        format!("image clone {}/{id} ({})", o.server, o.device)
                    }
                }))
                .collect();
            let mut servers: Vec<&str> = vm
                .pending_unexports
                .iter()
                .map(|p| p.server.as_str())
                .chain(vm.owned_volumes.iter().map(|o| o.server.as_str()))
                .collect();
            servers.sort();
            servers.dedup();
            vm.state_reason = format!(
                "pdisk server {} still holds {}",
                servers.join(", "),
                left.join(", ")
            );
            self.commit(&mut vm, &events)?;
            return Err(Error::unavailable(format!(
                "vm {}: destroyed on this host, but {}; agentd retries until pdisk answers",
                vm.spec.name, vm.state_reason
            )));
        }
        vm.state = VmState::Destroyed;
        events.push(NewEvent::new(EventType::Destroyed, cause, ""));
        self.store.remove(&vm, &events)?;
        tracing::info!(vm = %vm.spec.name, "destroyed");
        self.locks.lock().unwrap().remove(&vm.uuid);
        Ok(())
    }
}

/// What a run left that tear-down could not undo, for messages.
fn leftovers(rt: &Runtime) -> String {
    let mut left = Vec::new();
    if rt.pid != 0 {
        left.push(format!("QEMU pid {} outlived SIGKILL", rt.pid));
    }
    for n in &rt.nics {
        left.push(format!("tap {}", n.tap));
    }
    left.join(", ")
}
