//! Live migration (issue 15): a running guest moves to another host's
//! agentd, which owns it from QEMU's switchover on.
//!
//! The source ([`Agent::migrate_vm`]) journals its intent in the guest's
//! record ([`Migration`], MIGRATING), asks the destination to prepare an
//! incoming guest ([`Agent::prepare_incoming`]: a record of the same UUID
//! and spec, its own exports of the same pdisk volumes flagged
//! `migration`, the same taps on the same bridges behind its own rules,
//! its own uid and cgroup, QEMU with `-incoming defer` waiting on a TCP
//! port), then has its QEMU migrate there with the `events` and
//! `pause-before-switchover` capabilities, following `query-migrate`.
//! Once QEMU says `completed` the destination owns the guest: the source
//! journals that (phase completed), tells the destination
//! ([`Agent::finish_incoming`]), quits its QEMU and its monitor drops the
//! record after the tear-down (taps, the source's half of each export):
//! MIGRATED on both sides. Any failure before `completed` cancels QEMU's
//! migration, resumes the guest here, has the destination undo its half
//! ([`Agent::abort_incoming`]) and says why (MIGRATION_FAILED on both).
//!
//! After an agentd restart on either side, [`Agent::reconcile_migration`]
//! decides from the journal and QEMU's `query-migrate`/`query-status`, so
//! that exactly one side keeps the guest: a source whose QEMU completed
//! the migration drops it; one whose QEMU did not cancels it and keeps the
//! guest; a destination whose QEMU runs the guest keeps it, one whose
//! QEMU is gone drops the record, one whose QEMU still waits is followed
//! by its monitor (RESUME: MIGRATED, exit: MIGRATION_FAILED).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use tonic::transport::Channel;
use uuid::Uuid;

use super::migrate_stream::{with_times, Incoming};

mod reconcile;
use super::Agent;
use crate::layout::DeviceLayout;
use crate::migration_tls::{self, Endpoint};
use crate::spec::{Cause, DiskSource, EventType, VmSpec, VmState};
use crate::store::{
    Migration, MigrationDirection, MigrationPhase, NewEvent, OwnedVolume, Runtime, VmRecord,
};
use crate::vmm::QmpCommands;
use stratus_core::error::{Error, Result};

/// How long QEMU may take to move a guest before the source gives up.
const TRANSFER_LIMIT: Duration = Duration::from_secs(600);
/// How often the source reads `query-migrate`.
const POLL: Duration = Duration::from_millis(200);
/// How often the source journals MIGRATION_PROGRESS.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long FinishIncoming waits for the guest to run, and the source for
/// its record to go once its QEMU quit.
const SETTLE: Duration = Duration::from_secs(60);

/// How long an incoming QEMU may wait for the source's stream to connect
/// before the destination gives up on it (the source migrates within
/// moments of PrepareIncoming's answer; one that crashed or lost it never
/// will).
const STREAM_GRACE: Duration = Duration::from_secs(30);

/// What a finished migration measured.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    pub total: Duration,
    /// The guest's pause at the switchover (QEMU's `downtime`).
    pub downtime_ms: u64,
    /// Bytes QEMU sent (`ram.transferred`).
    pub transferred: u64,
    /// QEMU's own `total-time`.
    pub qemu_total_ms: u64,
    /// The stream was TLS.
    pub tls: bool,
}

/// What a source tells the destination of a guest it moves there.
pub struct IncomingGuest {
    pub id: Uuid,
    pub spec: VmSpec,
    pub project: String,
    pub owned_volumes: Vec<OwnedVolume>,
    /// The source agent, for events.
    pub source: String,
    /// The subject of the source agent's certificate (its QEMU's too).
    pub source_dn: Option<String>,
    pub created_at: String,
    /// The source's QEMU sends over TLS.
    pub tls: bool,
    /// Where the source's QEMU has each device (None: spec order).
    pub layout: Option<DeviceLayout>,
}

/// A TCP port the kernel has free now, for an incoming QEMU.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("0.0.0.0:0")
        .map_err(|e| Error::io("a free TCP port for the incoming guest", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("a free TCP port for the incoming guest", e))
}

/// The host part of a destination agent's address (`https://HOST:PORT`):
/// QEMU migrates to that host too.
pub(crate) fn destination_host(url: &str) -> Result<String> {
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| Error::invalid(format!("destination {url:?}: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https" | "http"), Some(h)) if uri.port_u16().is_some() => Ok(h.to_string()),
        _ => Err(Error::invalid(format!(
            "destination {url:?}: an agent's address is https://HOST:PORT"
        ))),
    }
}

/// The disks that cannot follow a guest to another host.
fn refuse_host_bound_disks(spec: &VmSpec) -> Result<()> {
    for (i, d) in spec.disks.iter().enumerate() {
        let why = match &d.source {
            DiskSource::File(p) => format!("a file of this host ({})", p.display()),
            DiskSource::Image { local: true, .. } => {
                "a local image disk (an overlay on this host's cache)".to_string()
            }
            _ => continue,
        };
        return Err(Error::precondition(format!(
            "vm {}: disk {} is {why}; only pdisk disks migrate",
            spec.name,
            super::attachments::device_name(i)
        )));
    }
    Ok(())
}

/// How a migration's stream goes, for events.
fn over(tls: bool) -> &'static str {
    if tls {
        "over TLS"
    } else {
        "over plain TCP (--migration-insecure)"
    }
}

/// `query-migrate`'s status of this QEMU's outgoing migration. A QEMU that
/// got its guest by a migration answers that incoming one's `completed`
/// until its own outgoing migration has connected: a `completed` without
/// RAM figures is that one, not ours (taking it for ours quit the QEMU
/// and lost the guest on its way back, A → B → A).
pub(super) fn status_of(info: &Value) -> &str {
    match info["status"].as_str().unwrap_or("none") {
        "completed" if info.get("ram").is_none() => "none",
        s => s,
    }
}

impl Agent {
    /// A client of the agent at `url`, with this host's certificate.
    fn peer(&self, url: &str) -> Result<VmServiceClient<Channel>> {
        let dialer = stratus_pki::Dialer::from_address(url, self.settings.peer_tls.as_ref())
            .map_err(|e| Error::invalid(format!("destination {url}: {e:#}")))?
            .with_request_timeout(Duration::from_secs(120));
        Ok(VmServiceClient::new(dialer.connect_lazy()))
    }

    /// Re-reads guest `id`, applies `change` and commits it with `events`
    /// (the monitor may have committed meanwhile).
    fn update(
        &self,
        id: Uuid,
        change: impl FnOnce(&mut VmRecord),
        events: &[NewEvent],
    ) -> Result<VmRecord> {
        let mut vm = self
            .store
            .vm(id)?
            .ok_or_else(|| Error::not_found(format!("vm {id} not found")))?;
        change(&mut vm);
        self.commit(&mut vm, events)?;
        Ok(vm)
    }

    // ---------- the source ----------

    /// Moves running guest `r` to the agent at `destination`; returns once
    /// it runs there and nothing of it is left here.
    pub async fn migrate_vm(
        self: &Arc<Self>,
        r: &str,
        destination: &str,
    ) -> Result<MigrationReport> {
        let host = destination_host(destination)?;
        let started = Instant::now();
        let vm = self.store.find_vm(r)?;
        let _g = self.lock(vm.uuid).await;
        let vm = self.store.find_vm(&vm.uuid.to_string())?;
        if vm.state != VmState::Running || vm.migration.is_some() {
            return Err(Error::precondition(format!(
                "vm {} is {:?}{}: only a running guest migrates",
                vm.spec.name,
                vm.state,
                if vm.migration.is_some() {
                    " and migrating"
                } else {
                    ""
                }
            )));
        }
        refuse_host_bound_disks(&vm.spec)?;
        if vm.hotplug.is_some() {
            return Err(Error::precondition(format!(
                "vm {}: a hot-plug is in progress; migrate once it is done",
                vm.spec.name
            )));
        }
        let qmp = self.active_qmp(&vm)?;
        let mut client = self.peer(destination)?;
        let id = vm.uuid;
        let tls = self.settings.migration_tls.is_some();
        self.update(
            id,
            |v| {
                v.migration = Some(Migration {
                    direction: MigrationDirection::Outgoing,
                    peer: destination.to_string(),
                    phase: MigrationPhase::Preparing,
                    port: 0,
                })
            },
            &[NewEvent::new(
                EventType::Migrating,
                Cause::Api,
                format!("to {destination} {}", over(tls)),
            )],
        )?;
        self.crash_point("migrate.intent");
        let moved = self
            .migrate_out(&vm, qmp.as_ref(), &mut client, &host)
            .await;
        let info = match moved {
            Ok(info) => info,
            Err(e) => {
                // Unless QEMU completed after all (then it is the
                // destination's), the guest stays here, running.
                match self
                    .cancel_outgoing(id, qmp.as_ref(), &mut client, &e.to_string(), Cause::Api)
                    .await?
                {
                    Some(info) => info,
                    None => return Err(e.context(format!("migrating vm {}", vm.spec.name))),
                }
            }
        };
        self.finish_outgoing(id, Some(qmp), &mut client, Cause::Api)
            .await?;
        let ms = |k: &str| info[k].as_u64().unwrap_or(0);
        Ok(MigrationReport {
            total: started.elapsed(),
            downtime_ms: ms("downtime"),
            transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
            qemu_total_ms: ms("total-time"),
            tls,
        })
    }

    /// The destination prepared, QEMU's migration until it completed
    /// (`query-migrate`'s answer then); Err before that.
    async fn migrate_out(
        &self,
        vm: &VmRecord,
        qmp: &dyn QmpCommands,
        client: &mut VmServiceClient<Channel>,
        host: &str,
    ) -> Result<Value> {
        let id = vm.uuid;
        let owned_volumes = vm
            .owned_volumes
            .iter()
            .map(|o| pb::OwnedVolume {
                device: o.device.clone(),
                volume_uuid: o.volume.clone(),
                name: o.name.clone(),
                server: o.server.to_string(),
            })
            .collect();
        let layout = self.device_layout(vm, qmp).await?;
        let port = client
            .prepare_incoming(pb::PrepareIncomingRequest {
                vm_uuid: id.to_string(),
                spec: Some(crate::grpc::spec_pb(&vm.spec)),
                project: vm.project.clone(),
                owned_volumes,
                source: self.settings.initiator_iqn.clone(),
                created_at: vm.created_at.clone(),
                tls: self.settings.migration_tls.is_some(),
                layout: Some(crate::grpc::layout_pb(&layout)),
            })
            .await
            .map_err(|s| Error::from_status(s, "the destination agent", "preparing the guest"))?
            .into_inner()
            .port;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::internal(format!("the destination answered port {port}")))?;
        self.update(
            id,
            |v| {
                if let Some(m) = &mut v.migration {
                    m.phase = MigrationPhase::Transferring;
                    m.port = port;
                }
            },
            &[],
        )?;
        self.crash_point("migrate.prepared");
        qmp.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [
                {"capability": "events", "state": true},
                {"capability": "pause-before-switchover", "state": true}
            ]})),
        )
        .await?;
        let mut parameters = match &self.settings.migration_tls {
            Some(tls) => {
                let owner = vm.runtime.as_ref().and_then(|r| r.qemu_user);
                qmp.install_migration_tls(&self.vm_dir(id), tls, Endpoint::Source, owner)
                    .await?;
                migration_tls::source_parameters(host)
            }
            // No credentials left from an earlier migration over TLS.
            None => json!({"tls-creds": ""}),
        };
        if let Some(b) = self.settings.migration_max_bandwidth {
            parameters["max-bandwidth"] = json!(b);
        }
        qmp.execute("migrate-set-parameters", Some(parameters))
            .await?;
        qmp.execute(
            "migrate",
            Some(json!({ "uri": format!("tcp:{host}:{port}") })),
        )
        .await?;
        let deadline = Instant::now() + TRANSFER_LIMIT;
        let mut progress = Instant::now();
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match status_of(&info) {
                "completed" => return Ok(with_times(qmp, info).await),
                s @ ("failed" | "cancelled") => {
                    return Err(Error::unavailable(format!(
                        "QEMU's migration {s}: {}",
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                "pre-switchover" => {
                    self.crash_point("migrate.pre_switchover");
                    qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
                        .await?;
                }
                _ if progress.elapsed() >= PROGRESS_EVERY => {
                    progress = Instant::now();
                    let ram = &info["ram"];
                    let mut e = NewEvent::new(
                        EventType::MigrationProgress,
                        Cause::Api,
                        format!(
                            "{}: pass {}, {} dirty pages/s",
                            status_of(&info),
                            ram["dirty-sync-count"].as_u64().unwrap_or(0),
                            ram["dirty-pages-rate"].as_u64().unwrap_or(0)
                        ),
                    );
                    e.bytes = ram["transferred"].as_u64().unwrap_or(0);
                    e.total_bytes = ram["total"].as_u64().unwrap_or(0);
                    self.update(id, |_| {}, &[e])?;
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::unavailable(format!(
                    "QEMU's migration did not complete within {TRANSFER_LIMIT:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Where guest `vm`'s QEMU has its devices now (hot-plugged ones
    /// behind their root ports).
    async fn device_layout(&self, vm: &VmRecord, qmp: &dyn QmpCommands) -> Result<DeviceLayout> {
        let disks: Vec<String> = super::hotplug::spec_disks(vm)
            .iter()
            .map(|d| format!("{}-dev", d.device))
            .collect();
        let seed = vm
            .runtime
            .iter()
            .flat_map(|r| &r.disks)
            .find(|d| d.source == "seed")
            .map(|d| format!("{}-dev", d.device));
        let nics: Vec<String> = vm
            .runtime
            .iter()
            .flat_map(|r| &r.nics)
            .map(|n| format!("{}-dev", super::hotplug::netdev_of(&n.tap)))
            .collect();
        DeviceLayout::read(qmp, &disks, seed.as_deref(), &nics).await
    }

    /// A failed migration on the source: QEMU's migration cancelled, the
    /// guest running here again, the destination's half undone,
    /// MIGRATION_FAILED. Returns `query-migrate`'s answer instead when
    /// QEMU had completed after all (the destination owns the guest).
    async fn cancel_outgoing(
        &self,
        id: Uuid,
        qmp: &dyn QmpCommands,
        client: &mut VmServiceClient<Channel>,
        reason: &str,
        cause: Cause,
    ) -> Result<Option<Value>> {
        let _ = qmp.execute("migrate_cancel", None).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match qmp.execute("query-migrate", None).await {
                Ok(info) if status_of(&info) == "completed" => return Ok(Some(info)),
                Ok(info)
                    if matches!(
                        status_of(&info),
                        "active" | "setup" | "device" | "pre-switchover" | "cancelling"
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                _ => break,
            }
        }
        let alive = match qmp.query_status().await {
            Ok(s) => {
                if !s.running {
                    if let Err(e) = qmp.cont().await {
                        tracing::error!(vm = %id, error = %e, "could not resume the guest after a failed migration");
                    }
                }
                true
            }
            // QEMU killed mid-migration (or its QMP gone): nothing to resume.
            Err(_) => {
                let pid = self
                    .store
                    .vm(id)?
                    .and_then(|v| v.runtime)
                    .map_or(0, |r| r.pid);
                pid != 0 && self.vmm.is_our_qemu(pid, id)
            }
        };
        if let Err(s) = client
            .abort_incoming(pb::IncomingRequest {
                vm_uuid: id.to_string(),
                reason: reason.to_string(),
            })
            .await
        {
            tracing::warn!(vm = %id, error = %s.message(),
                "the destination did not undo its half of a failed migration; \
                 its incoming QEMU ends on its own and its agent drops the guest then");
        }
        // A QEMU that ended is its monitor's to record (CRASHED, its
        // tear-down): the journal only says why the migration failed, and
        // never RUNNING for a guest nothing runs.
        let outcome = if alive {
            "the guest runs here"
        } else {
            "the guest's QEMU ended during the migration"
        };
        self.update(
            id,
            |v| {
                v.migration = None;
                if alive {
                    v.state = VmState::Running;
                }
            },
            &[NewEvent::new(
                EventType::MigrationFailed,
                cause,
                format!("{reason}; {outcome}"),
            )],
        )?;
        Ok(None)
    }

    /// QEMU completed: the guest is the destination's. Journaled first;
    /// then the destination is told, this QEMU quits and the record goes
    /// with the tear-down (MIGRATED). `qmp`: the guest's live connection
    /// (its monitor then records the exit), or None (torn down here).
    async fn finish_outgoing(
        &self,
        id: Uuid,
        qmp: Option<Arc<dyn QmpCommands>>,
        client: &mut VmServiceClient<Channel>,
        cause: Cause,
    ) -> Result<()> {
        let mut events = self.follow_vm(id)?;
        self.update(
            id,
            |v| {
                if let Some(m) = &mut v.migration {
                    m.phase = MigrationPhase::Completed;
                }
            },
            &[],
        )?;
        self.crash_point("migrate.completed");
        if let Err(s) = client
            .finish_incoming(pb::IncomingRequest {
                vm_uuid: id.to_string(),
                reason: String::new(),
            })
            .await
        {
            tracing::warn!(vm = %id, error = %s.message(),
                "the destination did not confirm the guest; it records it itself once its QEMU resumes it");
        }
        if let Some(q) = qmp {
            let _ = q.quit().await;
            if self
                .await_event(&mut events, id, &[EventType::Migrated], SETTLE)
                .await
                .is_ok()
            {
                return Ok(());
            }
            tracing::warn!(vm = %id, "the migrated guest's monitor did not drop it; dropping it here");
        }
        if let Some(mut vm) = self.store.vm(id)? {
            self.drop_migrated(&mut vm, cause).await?;
        }
        Ok(())
    }

    /// Tears down what the source still holds of a migrated guest and
    /// drops its record (MIGRATED).
    async fn drop_migrated(&self, vm: &mut VmRecord, cause: Cause) -> Result<()> {
        let peer = vm
            .migration
            .as_ref()
            .map(|m| m.peer.clone())
            .unwrap_or_default();
        let mut events = self.tear_down(vm).await;
        if !vm.pending_unexports.is_empty() {
            tracing::warn!(vm = %vm.spec.name, left = ?vm.pending_unexports,
                "exports of the migrated guest not undone here; pdisk keeps this host in their ACL");
        }
        events.push(NewEvent::new(
            EventType::Migrated,
            cause,
            format!("running on {peer}"),
        ));
        if self.store.remove_existing(vm, &events)?.is_some() {
            self.remove_guest_dir(vm.uuid);
        }
        Ok(())
    }

    /// The monitor's exit path for a guest with a migration journaled:
    /// true when it handled the exit (the record is gone).
    pub(super) async fn migration_exit(&self, vm: &mut VmRecord, while_away: bool) -> Result<bool> {
        let Some(m) = vm.migration.clone() else {
            return Ok(false);
        };
        let cause = if while_away {
            Cause::Reconciliation
        } else {
            Cause::Api
        };
        match (m.direction, m.phase) {
            (MigrationDirection::Outgoing, MigrationPhase::Completed) => {
                self.drop_migrated(vm, cause).await?;
                Ok(true)
            }
            (MigrationDirection::Incoming, _) => {
                // An undo (AbortIncoming, the stream watch) may be what
                // ended QEMU: it holds the guest's lock until its record
                // is gone, and its MIGRATION_FAILED says why. Otherwise
                // the exit is QEMU's own (the stream failed).
                let _g = self.lock(vm.uuid).await;
                let Some(current) = self.store.vm(vm.uuid)? else {
                    return Ok(true);
                };
                *vm = current;
                if !vm.is_incoming() {
                    // It ran here meanwhile (MIGRATED): an exit like any other.
                    return Ok(false);
                }
                let mut events = self.tear_down(vm).await;
                events.push(NewEvent::new(
                    EventType::MigrationFailed,
                    cause,
                    format!(
                        "the incoming QEMU ended before the guest ran here (from {})",
                        m.peer
                    ),
                ));
                if self.store.remove_existing(vm, &events)?.is_some() {
                    self.remove_guest_dir(vm.uuid);
                }
                Ok(true)
            }
            // The source's QEMU ended mid-migration: an exit like any other.
            (MigrationDirection::Outgoing, _) => {
                vm.migration = None;
                Ok(false)
            }
        }
    }

    // ---------- the destination ----------

    /// Prepares incoming guest `g.id` (a record with the source's UUID,
    /// spec, project and clones; STARTING with the journal's incoming
    /// migration) and answers the port its QEMU waits on. A failure undoes
    /// everything and leaves no record.
    pub async fn prepare_incoming(self: &Arc<Self>, g: IncomingGuest) -> Result<u16> {
        let IncomingGuest {
            id,
            spec,
            project,
            owned_volumes,
            source,
            source_dn,
            created_at,
            tls,
            layout,
        } = g;
        spec.validate()?;
        if let Some(l) = &layout {
            l.check(spec.disks.len(), spec.nics.len())?;
        }
        let tls = migration_tls::for_incoming(
            tls,
            self.settings.migration_tls.as_ref(),
            self.settings.peer_tls.as_ref(),
        )?;
        for n in &spec.nics {
            self.allowed_bridge(&n.bridge)?;
        }
        let create = self.create_lock.lock().await;
        let _g = self.lock(id).await;
        if self.store.vm(id)?.is_some() {
            return Err(Error::exists(format!("vm {id} is already on this host")));
        }
        if self
            .store
            .find_vm_in(Some(&project), spec.name.as_str())
            .is_ok()
        {
            return Err(Error::exists(format!(
                "vm {}: a guest of that name is already on this host",
                spec.name
            )));
        }
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
        let port = free_port()?;
        let mut vm = VmRecord {
            uuid: id,
            spec,
            state: VmState::Starting,
            state_reason: String::new(),
            runtime: Some(Runtime::default()),
            created_at,
            last_event_seq: 0,
            owned_volumes,
            pending_unexports: Vec::new(),
            project,
            request_id: String::new(),
            created_by: None,
            hotplug: None,
            migration: Some(Migration {
                direction: MigrationDirection::Incoming,
                peer: source.clone(),
                phase: MigrationPhase::Transferring,
                port,
            }),
        };
        // Its own uid, recorded with the record (as a start's with STARTING).
        let confinement = self.confine(&mut vm)?;
        if let Err(e) = self.commit(
            &mut vm,
            &[NewEvent::new(
                EventType::Migrating,
                Cause::Api,
                format!(
                    "from {source}, QEMU waits on port {port} {}",
                    over(tls.is_some())
                ),
            )],
        ) {
            self.uids.release(id);
            return Err(e);
        }
        drop(create);
        self.crash_point("incoming.recorded");
        let incoming = Incoming {
            port,
            tls,
            source_dn,
            layout,
        };
        match self.bring_up(&mut vm, confinement, Some(incoming)).await {
            Ok(()) => {
                self.watch_incoming(id);
                self.crash_point("incoming.prepared");
                Ok(port)
            }
            Err(e) => {
                tracing::warn!(vm = %vm.spec.name, error = %e, "incoming guest not prepared; undoing");
                let mut events = self.tear_down(&mut vm).await;
                events.push(NewEvent::new(
                    EventType::MigrationFailed,
                    Cause::Api,
                    e.to_string(),
                ));
                if self.store.remove_existing(&vm, &events)?.is_some() {
                    self.remove_guest_dir(vm.uuid);
                }
                Err(e)
            }
        }
    }

    /// Waits until incoming guest `id` runs here (its QEMU resumed it:
    /// MIGRATED, see the monitor) and answers it.
    pub async fn finish_incoming(&self, id: Uuid) -> Result<VmRecord> {
        let mut events = self.follow_vm(id)?;
        let vm = self.store.vm(id)?.ok_or_else(|| {
            Error::not_found(format!(
                "vm {id} is not on this host (its incoming migration failed)"
            ))
        })?;
        if vm.migration.is_none() {
            return if vm.state.is_active() {
                Ok(vm)
            } else {
                Err(Error::precondition(format!(
                    "vm {} is {:?}",
                    vm.spec.name, vm.state
                )))
            };
        }
        if !vm.is_incoming() {
            return Err(Error::precondition(format!(
                "vm {} is migrating out of this host",
                vm.spec.name
            )));
        }
        let e = self
            .await_event(
                &mut events,
                id,
                &[EventType::Migrated, EventType::MigrationFailed],
                SETTLE,
            )
            .await?;
        if e.kind == EventType::MigrationFailed {
            return Err(Error::unavailable(format!(
                "vm {}: {}",
                vm.spec.name, e.detail
            )));
        }
        self.store.find_vm(&id.to_string())
    }

    /// Undoes incoming guest `id` (a failed migration): its QEMU, taps and
    /// exports go, then its record (MIGRATION_FAILED). Ok when it is not
    /// here; refused for a guest that runs here.
    pub async fn abort_incoming(&self, id: Uuid, reason: &str) -> Result<()> {
        let _g = self.lock(id).await;
        let Some(mut vm) = self.store.vm(id)? else {
            return Ok(());
        };
        if !vm.is_incoming() {
            return Err(Error::precondition(format!(
                "vm {} runs on this host: not an incoming migration to undo",
                vm.spec.name
            )));
        }
        let reason = if reason.is_empty() {
            "aborted by the source"
        } else {
            reason
        };
        self.undo_incoming(&mut vm, reason, Cause::Api).await
    }

    /// Tears down incoming guest `vm` (QEMU, taps, exports) and drops its
    /// record with MIGRATION_FAILED saying `reason`.
    async fn undo_incoming(&self, vm: &mut VmRecord, reason: &str, cause: Cause) -> Result<()> {
        let mut events = self.tear_down(vm).await;
        events.push(NewEvent::new(
            EventType::MigrationFailed,
            cause,
            reason.to_string(),
        ));
        if self.store.remove_existing(vm, &events)?.is_some() {
            self.remove_guest_dir(vm.uuid);
        }
        Ok(())
    }

    /// Gives incoming guest `id` [`STREAM_GRACE`] for the source's stream
    /// to connect, then undoes it if none did: a source that crashed or
    /// gave up (its PrepareIncoming answer lost with this agentd) never
    /// sends one, and its QEMU would wait here forever with the guest's
    /// exports and taps. A stream that connected is the monitor's to
    /// follow (RESUME: MIGRATED; exit: MIGRATION_FAILED). Undoing it is
    /// safe: the guest runs on the source until a switchover, which needs
    /// this QEMU.
    pub(super) fn watch_incoming(self: &Arc<Self>, id: Uuid) {
        let agent = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STREAM_GRACE).await;
            if let Err(e) = agent.undo_if_no_stream(id, STREAM_GRACE).await {
                tracing::warn!(vm = %id, error = %e, "could not check the incoming migration's stream");
            }
        });
    }

    /// [`Agent::watch_incoming`]'s check, after `waited`.
    pub(super) async fn undo_if_no_stream(&self, id: Uuid, waited: Duration) -> Result<()> {
        let _g = self.lock(id).await;
        let Some(mut vm) = self.store.vm(id)? else {
            return Ok(());
        };
        if !vm.is_incoming() {
            return Ok(());
        }
        if let Some(qmp) = self.qmp_of(id) {
            let info = qmp.execute("query-migrate", None).await?;
            // No status: nothing connected (an incoming QEMU's own states
            // start at `setup`, when the stream arrives).
            if info.get("status").is_some_and(|s| s != "none") {
                return Ok(());
            }
        }
        let peer = vm
            .migration
            .as_ref()
            .map(|m| m.peer.clone())
            .unwrap_or_default();
        tracing::warn!(vm = %vm.spec.name, source = %peer, ?waited,
            "no migration stream arrived; undoing the incoming guest");
        self.undo_incoming(
            &mut vm,
            &format!("no migration stream from {peer} within {waited:?}; undone here"),
            Cause::Reconciliation,
        )
        .await
    }

    /// The directory of a guest that left this host (console log, QEMU's
    /// log): nothing of it stays.
    fn remove_guest_dir(&self, id: Uuid) {
        let dir = self.vm_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %id, dir = %dir.display(), error = %e, "could not remove the guest's directory");
            }
        }
    }
}
