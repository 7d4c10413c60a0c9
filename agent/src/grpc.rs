//! The gRPC face of the agent: checks who calls and in which project,
//! runs mutating calls as agentd's own tasks (idempotent by `request_id`),
//! and streams the event journal. Message conversions live in
//! [`convert`]; errors become statuses through `From<Error> for
//! tonic::Status`, the one map in the project.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::journal::EventFilter;
use futures::Stream;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_server::VmService;
use tonic::{Request, Response, Status};

use crate::service::Agent;
use crate::spec::{ServerName, VmState};
use crate::store::{Event, QuotaLimits, VmRecord};
use stratus_core::error::{Error, ErrorKind};
use stratus_core::quota;
use stratus_core::requests::{fingerprint, Answer, Attempt, RequestLog};
use stratus_pki::tenancy::{check_reserved_labels, Scope};
use stratus_pki::Identity;

mod convert;
pub use convert::event_pb;
use convert::{image_pb, image_spec, parse_disk, parse_nic, quota_pb, server_pb, vm_pb};
pub(crate) use convert::{layout_pb, parse_spec, spec_pb};

pub struct Api {
    agent: Arc<Agent>,
    /// Mutating calls run here, as agentd's own tasks, and their outcomes
    /// are kept for retries by `request_id`, in memory and in agentd's
    /// store (so a retry after a restart of agentd is answered too).
    requests: RequestLog,
}

impl Api {
    pub fn new(agent: Arc<Agent>) -> Self {
        let requests = RequestLog::default().with_durable(agent.shared_store());
        Api { agent, requests }
    }

    /// Runs the mutating operation `op` of `rpc` as agentd's own task (a
    /// caller that goes away does not stop it half-way); with a
    /// `request_id`, a retry of the same request by the same caller in the
    /// same project (`caller`, from [`caller_key`]) gets the first
    /// attempt's result, also after a restart of agentd. `msg` is the
    /// request with its request_id already taken out.
    async fn run<T, M, F>(
        &self,
        caller: String,
        rpc: &'static str,
        request_id: &str,
        msg: &M,
        op: F,
    ) -> Result<T, Status>
    where
        T: Answer,
        M: prost::Message,
        F: std::future::Future<Output = stratus_core::error::Result<T>> + Send + 'static,
    {
        let fp = fingerprint(&msg.encode_to_vec());
        Ok(self
            .requests
            .run_resolved(&caller, request_id, rpc, fp, |_| Ok((String::new(), op)))
            .await?)
    }

    /// The guest `r` names, if a call in `scope` may see it: any other is
    /// NotFound with the message a missing guest gets (no existence leak).
    fn vm(&self, scope: &Scope, r: &str) -> Result<VmRecord, Status> {
        Ok(self.find(scope, r)?)
    }

    /// [`Self::vm`] with the service's error.
    fn find(&self, scope: &Scope, r: &str) -> stratus_core::error::Result<VmRecord> {
        let vm = self.agent.get_vm_in(names_in(scope), r)?;
        if scope.sees(&vm.project) {
            Ok(vm)
        } else {
            Err(Error::not_found(format!("vm {r} not found")))
        }
    }

    /// A mutating call on one guest, the common case: the caller and the
    /// project it acts in, the guest checked in that scope, then `op` run
    /// through the request log with the agent, the guest's UUID (so the
    /// operation reaches only the guest that was checked), the request (to
    /// take its other fields from) and whether an earlier attempt with the
    /// same `request_id` was interrupted by a restart of agentd (`op` then
    /// answers from the state it finds: see [`Attempt::AfterRestart`]).
    /// Such a retry acts on the guest the first attempt resolved, by UUID;
    /// when that guest is gone, `op` gets its UUID all the same.
    async fn on_vm<R, T, F, Fut>(
        &self,
        req: Request<R>,
        rpc: &'static str,
        op: F,
    ) -> Result<T, Status>
    where
        R: VmCall,
        T: Answer,
        F: FnOnce(Arc<Agent>, String, &R, bool) -> Fut,
        Fut: Future<Output = stratus_core::error::Result<T>> + Send + 'static,
    {
        let (identity, scope, mut r) = split(req, |r| r.project())?;
        let request_id = std::mem::take(r.request_id());
        let caller = caller_key(&identity, scope.project());
        let fp = fingerprint(&r.encode_to_vec());
        let agent = self.agent.clone();
        let answer = self
            .requests
            .run_resolved(&caller, &request_id, rpc, fp, |attempt| {
                let (vm, again) = match attempt {
                    Attempt::AfterRestart { target } if !target.is_empty() => {
                        match self.find(&scope, &target) {
                            Ok(vm) => (vm.uuid.to_string(), true),
                            // Gone (in every project) since the first
                            // attempt: the operation says what that means.
                            Err(e)
                                if e.kind() == ErrorKind::NotFound
                                    && agent.get_vm(&target).is_err() =>
                            {
                                (target, true)
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    _ => (self.find(&scope, r.vm())?.uuid.to_string(), false),
                };
                Ok((vm.clone(), op(agent, vm, &r, again)))
            })
            .await?;
        Ok(answer)
    }
}

/// For a retry of an attempt a restart of agentd interrupted: the guest,
/// when it is already in one of `done` (the first attempt got there, or
/// reconciliation finished it), as the answer.
fn already(agent: &Agent, vm: &str, again: bool, done: &[VmState]) -> Option<pb::Vm> {
    if !again {
        return None;
    }
    let v = agent.get_vm(vm).ok()?;
    done.contains(&v.state).then(|| vm_pb(agent, &v))
}

/// The requests that act on one guest: they name it, the project the call
/// acts in, and carry an idempotency key.
trait VmCall: prost::Message + 'static {
    fn vm(&self) -> &str;
    fn project(&self) -> &str;
    fn request_id(&mut self) -> &mut String;
}

macro_rules! vm_call {
    ($($t:ty),*) => {$(
        impl VmCall for $t {
            fn vm(&self) -> &str { &self.vm }
            fn project(&self) -> &str { &self.project }
            fn request_id(&mut self) -> &mut String { &mut self.request_id }
        }
    )*};
}
vm_call!(
    pb::VmRequest,
    pb::StopVmRequest,
    pb::DestroyVmRequest,
    pb::SaveImageRequest,
    pb::AttachDiskRequest,
    pb::DetachDiskRequest,
    pb::AttachNicRequest,
    pb::DetachNicRequest,
    pb::MigrateVmRequest,
    pb::ResizeDiskRequest,
    pb::SetDiskQosRequest
);

/// Where a call's names are looked up: in the project it acts in (names
/// are unique per project), or every project for an admin naming none.
fn names_in(scope: &Scope) -> Option<&str> {
    match scope {
        Scope::All => None,
        Scope::Project(p) => Some(p),
    }
}

/// What a request names, for its audit record (never its other fields).
fn audit_object<T: std::any::Any>(msg: &T) -> String {
    let any = msg as &dyn std::any::Any;
    if let Some(r) = any.downcast_ref::<pb::VmRequest>() {
        format!("vm {}", r.vm)
    } else if let Some(r) = any.downcast_ref::<pb::StopVmRequest>() {
        format!("vm {}", r.vm)
    } else if let Some(r) = any.downcast_ref::<pb::DestroyVmRequest>() {
        format!("vm {}", r.vm)
    } else if let Some(r) = any.downcast_ref::<pb::SaveImageRequest>() {
        format!("vm {} disk {} as {}", r.vm, r.device, r.name)
    } else if let Some(r) = any.downcast_ref::<pb::AttachDiskRequest>() {
        let volume = match r.disk.as_ref().and_then(|d| d.source.as_ref()) {
            Some(pb::disk_spec::Source::PdiskVolume(v)) => v.as_str(),
            _ => "",
        };
        format!("vm {} volume {volume}", r.vm)
    } else if let Some(r) = any.downcast_ref::<pb::DetachDiskRequest>() {
        format!("vm {} disk {}", r.vm, r.device)
    } else if let Some(r) = any.downcast_ref::<pb::AttachNicRequest>() {
        let mac = r.nic.as_ref().map(|n| n.mac.as_str()).unwrap_or("");
        format!("vm {} nic {mac}", r.vm)
    } else if let Some(r) = any.downcast_ref::<pb::DetachNicRequest>() {
        format!("vm {} nic {}", r.vm, r.nic)
    } else if let Some(r) = any.downcast_ref::<pb::ResizeDiskRequest>() {
        format!("vm {} disk {} to {}", r.vm, r.device, r.size_bytes)
    } else if let Some(r) = any.downcast_ref::<pb::SetDiskQosRequest>() {
        format!("vm {} disk {} qos", r.vm, r.device)
    } else if let Some(r) = any.downcast_ref::<pb::MigrateVmRequest>() {
        format!("vm {} to {}", r.vm, r.destination)
    } else if let Some(r) = any.downcast_ref::<pb::PrepareIncomingRequest>() {
        format!("incoming vm {}", r.vm_uuid)
    } else if let Some(r) = any.downcast_ref::<pb::IncomingRequest>() {
        format!("incoming vm {}", r.vm_uuid)
    } else if let Some(r) = any.downcast_ref::<pb::CreateVmRequest>() {
        format!(
            "vm {}",
            r.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("")
        )
    } else {
        String::new()
    }
}

/// Whose retries share request ids: the caller's identity and the project
/// the call acts in.
fn caller_key(identity: &Identity, project: &str) -> String {
    format!("{identity}|{project}")
}

/// A request's caller, the project scope it acts in (its `project` field,
/// see [`stratus_pki::tenancy`]), and its message.
fn split<T: 'static>(
    req: Request<T>,
    project: impl Fn(&T) -> &str,
) -> Result<(Identity, Scope, T), Status> {
    let caller = stratus_pki::gate::caller(&req)?.clone();
    let identity = caller.identity.map_err(Status::unauthenticated)?;
    let scope = Scope::of(&identity, project(req.get_ref()))?;
    if let Some(n) = stratus_pki::audit::note(&req) {
        n.set_project(scope.project());
        n.set_object(audit_object(req.get_ref()));
    }
    Ok((identity, scope, req.into_inner()))
}

/// A detach's wait for the guest: 0 = the default.
fn detach_wait(secs: u32) -> Duration {
    if secs == 0 {
        crate::service::DETACH_WAIT
    } else {
        Duration::from_secs(secs as u64)
    }
}

fn timeout_of(secs: u32) -> Duration {
    Duration::from_secs(if secs == 0 { 60 } else { secs as u64 })
}

/// Host files (`file:` disks, kernels, initrds, `file://` images) are an
/// admin's to hand out: any other caller is refused before anything is
/// looked up, so a refusal says nothing about the host's files.
fn admit_host_files(identity: &Identity, named: &[String]) -> Result<(), Status> {
    match named.first() {
        Some(first) if identity.role != stratus_pki::Role::Admin => Err(Status::permission_denied(
            format!("{first}: only an admin may give a guest host files ({identity} is not one)"),
        )),
        _ => Ok(()),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl VmService for Api {
    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let spec = r
            .spec
            .clone()
            .ok_or_else(|| Error::invalid("spec is required"))?;
        check_reserved_labels(&identity, spec.labels.keys())?;
        let spec = parse_spec(spec)?;
        admit_host_files(&identity, &spec.host_files())?;
        let agent = self.agent.clone();
        let (project, id) = (scope.project().to_owned(), request_id.clone());
        let creator = stratus_pki::tenancy::Creator::of(&identity);
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "CreateVm",
                &request_id,
                &r,
                async move {
                    let vm = agent
                        .create_vm_by(spec, &project, &id, Some(creator))
                        .await?;
                    Ok(vm_pb(&agent, &vm))
                },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn start_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "StartVm", |agent, vm, _, again| async move {
                if let Some(v) = already(&agent, &vm, again, &[VmState::Running, VmState::Paused]) {
                    return Ok(v);
                }
                Ok(vm_pb(&agent, &agent.start_vm(&vm).await?))
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "StopVm", |agent, vm, r, again| {
                let (timeout, force) = (timeout_of(r.timeout_seconds), r.force);
                async move {
                    if let Some(v) = already(&agent, &vm, again, &[VmState::Stopped]) {
                        return Ok(v);
                    }
                    Ok(vm_pb(&agent, &agent.stop_vm(&vm, timeout, force).await?))
                }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn reboot_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "RebootVm", |agent, vm, _, _| async move {
                Ok(vm_pb(&agent, &agent.reboot_vm(&vm).await?))
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn pause_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "PauseVm", |agent, vm, _, again| async move {
                if let Some(v) = already(&agent, &vm, again, &[VmState::Paused]) {
                    return Ok(v);
                }
                Ok(vm_pb(&agent, &agent.pause_vm(&vm).await?))
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn resume_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "ResumeVm", |agent, vm, _, again| async move {
                if let Some(v) = already(&agent, &vm, again, &[VmState::Running]) {
                    return Ok(v);
                }
                Ok(vm_pb(&agent, &agent.resume_vm(&vm).await?))
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn destroy_vm(
        &self,
        req: Request<pb::DestroyVmRequest>,
    ) -> Result<Response<pb::DestroyVmResponse>, Status> {
        self.on_vm(req, "DestroyVm", |agent, vm, r, again| {
            let timeout = timeout_of(r.timeout_seconds);
            async move {
                // The first attempt's DESTROYING was durable: reconciliation
                // finished the destroy.
                if again && agent.get_vm(&vm).is_err() {
                    return Ok(());
                }
                agent.destroy_vm(&vm, timeout).await
            }
        })
        .await?;
        Ok(Response::new(pb::DestroyVmResponse {}))
    }

    async fn get_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (_, scope, r) = split(req, |r| &r.project)?;
        let vm = self.vm(&scope, &r.vm)?;
        Ok(Response::new(vm_pb(&self.agent, &vm)))
    }

    async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let (_, scope, _) = split(req, |r| &r.project)?;
        let vms = self
            .agent
            .list_vms()?
            .iter()
            .filter(|v| scope.sees(&v.project))
            .map(|v| vm_pb(&self.agent, v))
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    type WatchEventsStream = EventStream;

    /// Replays the journal from `since_seq`, then follows live events,
    /// exactly once and in order ([`crate::journal::EventJournal::follow`]).
    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let (_, scope, r) = split(req, |r| &r.project)?;
        let filter = if r.vm.is_empty() {
            EventFilter::all()
        } else {
            match self.agent.get_vm_in(names_in(&scope), &r.vm) {
                Ok(vm) if scope.sees(&vm.project) => EventFilter::vm(vm.uuid.to_string()),
                // A destroyed guest's events are still in the journal, each
                // with its project (narrowed below). Another project's guest
                // gets the same filter: its history is empty in this scope,
                // exactly as a guest's that never existed (no existence
                // leak, by name or by UUID).
                _ => EventFilter::vm(r.vm.clone()),
            }
        };
        // A call acting in one project sees only its guests' events (not
        // host events, which belong to no project).
        let filter = match scope {
            Scope::All => filter,
            Scope::Project(p) => filter.in_project(p),
        };
        let journal = self.agent.journal();
        let events = if r.no_follow {
            journal.replay(r.since_seq, filter)
        } else {
            journal.follow(r.since_seq, filter)
        };
        let stream = futures::StreamExt::map(events, |r: Result<Event, Error>| {
            r.map(|e| event_pb(&e)).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pull_image(
        &self,
        req: Request<pb::PullImageRequest>,
    ) -> Result<Response<pb::CachedImage>, Status> {
        let image = image_spec(
            req.get_ref()
                .image
                .clone()
                .ok_or_else(|| Error::invalid("image is required"))?,
        )?;
        let identity = stratus_pki::gate::caller(&req)?
            .identity
            .clone()
            .map_err(Status::unauthenticated)?;
        if image.is_host_file() {
            admit_host_files(&identity, &[format!("image {}", image.url)])?;
        }
        let mut r = req.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let agent = self.agent.clone();
        let to_pdisk = r.to_pdisk;
        let server = ServerName::from_request(&r.server)?;
        let info = self
            .run(
                caller_key(&identity, ""),
                "PullImage",
                &request_id,
                &r,
                async move { Ok(image_pb(agent.pull_image(image, to_pdisk, &server).await?)) },
            )
            .await?;
        Ok(Response::new(info))
    }

    async fn list_images(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let (images, unreachable) = self.agent.list_images().await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.into_iter().map(image_pb).collect(),
            unreachable: unreachable.into_iter().map(server_pb).collect(),
        }))
    }

    async fn evict_image(
        &self,
        req: Request<pb::EvictImageRequest>,
    ) -> Result<Response<pb::EvictImageResponse>, Status> {
        let identity = stratus_pki::gate::caller(&req)?
            .identity
            .clone()
            .map_err(Status::unauthenticated)?;
        let mut r = req.into_inner();
        let request_id = std::mem::take(&mut r.request_id);
        let (local, pdisk) = if !r.local && !r.pdisk {
            (true, true)
        } else {
            (r.local, r.pdisk)
        };
        let (agent, sha256) = (self.agent.clone(), r.sha256.clone());
        let server = ServerName::from_request(&r.server)?;
        let evicted = self
            .run(
                caller_key(&identity, ""),
                "EvictImage",
                &request_id,
                &r,
                async move {
                    let evicted = agent.evict_image(&sha256, local, pdisk, &server).await?;
                    Ok(pb::EvictImageResponse {
                        evicted: evicted.into_iter().map(image_pb).collect(),
                    })
                },
            )
            .await?;
        Ok(Response::new(evicted))
    }

    async fn save_image(
        &self,
        req: Request<pb::SaveImageRequest>,
    ) -> Result<Response<pb::SaveImageResponse>, Status> {
        let saved = self
            .on_vm(req, "SaveImage", |agent, vm, r, _| {
                let (device, name) = (r.device.clone(), r.name.clone());
                async move {
                    let (volume, server) = agent.save_image(&vm, &device, &name).await?;
                    Ok(pb::SaveImageResponse {
                        url: format!("pdisk:///{volume}"),
                        volume,
                        server: server.to_string(),
                    })
                }
            })
            .await?;
        Ok(Response::new(saved))
    }

    async fn attach_disk(
        &self,
        req: Request<pb::AttachDiskRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "AttachDisk", |agent, vm, r, _| {
                let disk = r.disk.clone();
                async move {
                    let name = agent.get_vm(&vm)?.spec.name;
                    let disk = disk.ok_or_else(|| Error::invalid("a disk is required"))?;
                    let disk = parse_disk(&name, disk)?;
                    Ok(vm_pb(&agent, &agent.attach_disk_to(&vm, disk).await?))
                }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn detach_disk(
        &self,
        req: Request<pb::DetachDiskRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "DetachDisk", |agent, vm, r, _| {
                let (device, wait) = (r.device.clone(), detach_wait(r.timeout_seconds));
                async move {
                    Ok(vm_pb(
                        &agent,
                        &agent.detach_disk_from(&vm, &device, wait).await?,
                    ))
                }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn attach_nic(
        &self,
        req: Request<pb::AttachNicRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "AttachNic", |agent, vm, r, _| {
                let nic = r.nic.clone();
                async move {
                    let nic = parse_nic(nic.ok_or_else(|| Error::invalid("a NIC is required"))?)?;
                    Ok(vm_pb(&agent, &agent.attach_nic_to(&vm, nic).await?))
                }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn detach_nic(
        &self,
        req: Request<pb::DetachNicRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "DetachNic", |agent, vm, r, _| {
                let (nic, wait) = (r.nic.clone(), detach_wait(r.timeout_seconds));
                async move {
                    Ok(vm_pb(
                        &agent,
                        &agent.detach_nic_from(&vm, &nic, wait).await?,
                    ))
                }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn resize_disk(
        &self,
        req: Request<pb::ResizeDiskRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "ResizeDisk", |agent, vm, r, _| {
                let (device, size) = (r.device.clone(), r.size_bytes);
                async move { Ok(vm_pb(&agent, &agent.resize_disk(&vm, &device, size).await?)) }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn set_disk_qos(
        &self,
        req: Request<pb::SetDiskQosRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let vm = self
            .on_vm(req, "SetDiskQos", |agent, vm, r, _| {
                let device = r.device.clone();
                let qos = crate::qos::DiskQos::from_pb(r.qos.clone().unwrap_or_default());
                async move { Ok(vm_pb(&agent, &agent.set_disk_qos(&vm, &device, qos).await?)) }
            })
            .await?;
        Ok(Response::new(vm))
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (project, limits, usage) = quota::set(self.agent.store(), req, |r| {
            let l = r.limits.unwrap_or_default();
            quota::Change {
                project: r.project,
                set: QuotaLimits {
                    vms: l.vms,
                    vcpus: l.vcpus,
                    memory: l.memory_bytes,
                },
                unlimited: r.unlimited,
            }
        })?;
        Ok(Response::new(quota_pb(project, limits, usage)))
    }

    async fn get_quota(
        &self,
        req: Request<pb::GetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (_, scope, _) = split(req, |r| &r.project)?;
        let (project, limits, usage) = quota::get(self.agent.store(), scope)?;
        Ok(Response::new(quota_pb(project, limits, usage)))
    }

    async fn list_quotas(
        &self,
        _req: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        let quotas = quota::all(self.agent.store())?
            .into_iter()
            .map(|(p, limits, usage)| quota_pb(p, limits, usage))
            .collect();
        Ok(Response::new(pb::ListQuotasResponse { quotas }))
    }

    /// Records of the guests the caller's project sees; one guest by
    /// name or UUID (a destroyed one's UUID too, while its tally is kept).
    async fn list_usage_records(
        &self,
        req: Request<pb::ListUsageRecordsRequest>,
    ) -> Result<Response<pb::ListUsageRecordsResponse>, Status> {
        let (_, scope, r) = split(req, |r| &r.project)?;
        let vm = match (r.vm.as_str(), uuid::Uuid::parse_str(&r.vm)) {
            ("", _) => None,
            // A UUID needs no live guest: the records filter by scope.
            (_, Ok(u)) => Some(u),
            (name, Err(_)) => Some(self.vm(&scope, name)?.uuid),
        };
        let until = (r.until != 0).then_some(r.until);
        let records = self
            .agent
            .usage_records(r.since, until, vm, |p| scope.sees(p))
            .await?;
        Ok(Response::new(pb::ListUsageRecordsResponse {
            records: records.iter().map(pb::UsageRecord::from).collect(),
        }))
    }

    async fn get_host(
        &self,
        _req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let h = self.agent.host_info()?;
        let s = self.agent.settings();
        // Probed together: a server that is down costs the answer at most
        // the probe's limit, whatever the number of servers.
        let servers = futures::future::join_all(
            self.agent
                .pdisk_servers()
                .iter()
                .map(|p| p.probe(std::time::Duration::from_secs(3))),
        )
        .await;
        Ok(Response::new(pb::Host {
            hostname: h.facts.hostname,
            cpus: h.facts.cpus,
            memory_bytes: h.facts.memory,
            free_vcpus: h.free_vcpus,
            free_memory_bytes: h.free_memory,
            accelerator: h.facts.accel.name().to_string(),
            accelerator_reason: h.facts.accel_reason,
            qemu_version: h.facts.qemu_version,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            initiator_iqn: s.initiator_iqn.clone(),
            vm_count: h.vm_count,
            running_vms: h.running,
            last_event_seq: h.last_seq,
            pdisk_server: s
                .pdisk
                .iter()
                .find(|p| p.name.is_default())
                .map(|p| p.url.clone())
                .unwrap_or_default(),
            pdisk_servers: servers.into_iter().map(server_pb).collect(),
            qemu_confinement: self.agent.confinement(),
            qemu_privilege_option: h.facts.qemu_caps.drop.option().to_string(),
            qemu_seccomp: h.facts.qemu_caps.seccomp,
        }))
    }

    async fn migrate_vm(
        &self,
        req: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<pb::MigrateVmResponse>, Status> {
        let answer = self
            .on_vm(req, "MigrateVm", |agent, vm, r, _| {
                let destination = r.destination.clone();
                async move {
                    let done = agent.migrate_vm(&vm, &destination).await?;
                    Ok(pb::MigrateVmResponse {
                        vm_uuid: vm,
                        destination,
                        total_ms: done.total.as_millis() as u64,
                        downtime_ms: done.downtime_ms,
                        transferred_bytes: done.transferred,
                        qemu_total_ms: done.qemu_total_ms,
                        tls: done.tls,
                    })
                }
            })
            .await?;
        Ok(Response::new(answer))
    }

    async fn prepare_incoming(
        &self,
        req: Request<pb::PrepareIncomingRequest>,
    ) -> Result<Response<pb::PrepareIncomingResponse>, Status> {
        let identity = peer_agent(&req)?;
        let r = req.into_inner();
        let id = incoming_uuid(&r.vm_uuid)?;
        let spec = parse_spec(
            r.spec
                .clone()
                .ok_or_else(|| Error::invalid("spec is required"))?,
        )?;
        let owned = r
            .owned_volumes
            .iter()
            .map(|o| {
                Ok(crate::store::OwnedVolume {
                    device: o.device.clone(),
                    volume: o.volume_uuid.clone(),
                    name: o.name.clone(),
                    server: ServerName::from_request(&o.server)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let agent = self.agent.clone();
        let source = format!("{identity}");
        let source_dn = Some(identity.subject_dn());
        // Agentd's own task: a source that goes away does not stop it
        // half-way (a failure undoes it whole).
        let port = tokio::spawn(async move {
            agent
                .prepare_incoming(crate::service::IncomingGuest {
                    id,
                    spec,
                    project: r.project,
                    owned_volumes: owned,
                    source,
                    source_dn,
                    created_at: r.created_at,
                    tls: r.tls,
                    layout: r.layout.map(convert::parse_layout),
                })
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("prepare task: {e}")))??;
        Ok(Response::new(pb::PrepareIncomingResponse {
            port: u32::from(port),
        }))
    }

    async fn finish_incoming(
        &self,
        req: Request<pb::IncomingRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        peer_agent(&req)?;
        let id = incoming_uuid(&req.get_ref().vm_uuid)?;
        let vm = self.agent.finish_incoming(id).await?;
        Ok(Response::new(vm_pb(&self.agent, &vm)))
    }

    async fn abort_incoming(
        &self,
        req: Request<pb::IncomingRequest>,
    ) -> Result<Response<pb::AbortIncomingResponse>, Status> {
        peer_agent(&req)?;
        let r = req.into_inner();
        let id = incoming_uuid(&r.vm_uuid)?;
        let agent = self.agent.clone();
        tokio::spawn(async move { agent.abort_incoming(id, &r.reason).await })
            .await
            .map_err(|e| Status::internal(format!("abort task: {e}")))??;
        Ok(Response::new(pb::AbortIncomingResponse {}))
    }
}

/// The caller of an agent-to-agent call (the gate admitted only agents and
/// admins), named in its audit record with the guest.
fn peer_agent<T: 'static>(req: &Request<T>) -> Result<Identity, Status> {
    let identity = stratus_pki::gate::caller(req)?
        .identity
        .clone()
        .map_err(Status::unauthenticated)?;
    if let Some(n) = stratus_pki::audit::note(req) {
        n.set_object(audit_object(req.get_ref()));
    }
    Ok(identity)
}

/// The guest UUID of an incoming migration's call.
fn incoming_uuid(s: &str) -> Result<uuid::Uuid, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("vm_uuid {s:?} is not a UUID")))
}

#[cfg(test)]
#[path = "tenancy_tests.rs"]
mod tenancy_tests;

#[cfg(test)]
#[path = "requests_tests.rs"]
mod requests_tests;
