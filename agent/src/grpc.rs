//! The gRPC face of the agent: converts `agent.v1` messages to and from the
//! domain, and streams the event journal. Errors become statuses through
//! pdisk's `From<Error> for tonic::Status`, the one map in the project.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::images::DeclaredFormat;
use crate::journal::EventFilter;
use futures::Stream;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_server::VmService;
use tonic::{Request, Response, Status};

use crate::net::Mac;
use crate::service::Agent;
use crate::spec::{
    self, Cause, Context, Disk, DiskSource, EventType, ImageSpec, KernelBoot, Nic, VmSpec, VmState,
};
use crate::store::{Event, QuotaLimits, QuotaUsage, VmRecord};
use stratus_core::error::Error;
use stratus_core::requests::{fingerprint, RequestLog};
use stratus_core::types::ByteSize;
use stratus_pki::tenancy::{check_reserved_labels, Scope};
use stratus_pki::Identity;

pub struct Api {
    agent: Arc<Agent>,
    /// Mutating calls run here, as agentd's own tasks, and their outcomes
    /// are kept for retries by `request_id`.
    requests: RequestLog,
}

impl Api {
    pub fn new(agent: Arc<Agent>) -> Self {
        Api {
            agent,
            requests: RequestLog::default(),
        }
    }

    /// Runs the mutating operation `op` of `rpc` as agentd's own task (a
    /// caller that goes away does not stop it half-way); with a
    /// `request_id`, a retry of the same request by the same caller in the
    /// same project (`caller`, from [`caller_key`]) gets the first
    /// attempt's result. `msg` is the request
    /// with its request_id already taken out.
    async fn run<T, M, F>(
        &self,
        caller: String,
        rpc: &'static str,
        request_id: &str,
        msg: &M,
        op: F,
    ) -> Result<T, Status>
    where
        T: Clone + Send + Sync + 'static,
        M: prost::Message,
        F: std::future::Future<Output = stratus_core::error::Result<T>> + Send + 'static,
    {
        let fp = fingerprint(&msg.encode_to_vec());
        Ok(self.requests.run(&caller, request_id, rpc, fp, op).await?)
    }

    /// The guest `r` names, if a call in `scope` may see it: any other is
    /// NotFound with the message a missing guest gets (no existence leak).
    fn vm(&self, scope: &Scope, r: &str) -> Result<VmRecord, Status> {
        let vm = self.agent.get_vm_in(names_in(scope), r)?;
        if scope.sees(&vm.project) {
            Ok(vm)
        } else {
            Err(Error::not_found(format!("vm {r} not found")).into())
        }
    }

    /// [`Self::vm`] as the UUID the service is then called with, so an
    /// operation reaches only the guest that was checked.
    fn vm_ref(&self, scope: &Scope, r: &str) -> Result<String, Status> {
        Ok(self.vm(scope, r)?.uuid.to_string())
    }
}

/// Where a call's names are looked up: in the project it acts in (names
/// are unique per project), or every project for an admin naming none.
fn names_in(scope: &Scope) -> Option<&str> {
    match scope {
        Scope::All => None,
        Scope::Project(p) => Some(p),
    }
}

fn quota_pb(project: String, l: QuotaLimits, u: QuotaUsage) -> pb::Quota {
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

pub fn state_pb(s: VmState) -> pb::VmState {
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

fn spec_pb(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: s.name.to_string(),
        vcpus: s.vcpus,
        memory_bytes: s.memory.0,
        disks: s
            .disks
            .iter()
            .map(|d| {
                let (source, size_bytes, local) = match &d.source {
                    DiskSource::Pdisk(v) => {
                        (pb::disk_spec::Source::PdiskVolume(v.to_string()), 0, false)
                    }
                    DiskSource::File(p) => (
                        pb::disk_spec::Source::File(p.display().to_string()),
                        0,
                        false,
                    ),
                    DiskSource::Image { image, size, local } => (
                        pb::disk_spec::Source::Image(pb::ImageRef {
                            url: image.url.clone(),
                            sha256: image.sha256.clone(),
                            format: match image.format {
                                DeclaredFormat::Raw => pb::ImageFormat::Raw,
                                DeclaredFormat::Qcow2 => pb::ImageFormat::Qcow2,
                                DeclaredFormat::Auto => pb::ImageFormat::Auto,
                            } as i32,
                            endorser: image.endorser.clone().unwrap_or_default(),
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

fn vm_pb(agent: &Agent, v: &VmRecord) -> pb::Vm {
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
fn image_spec(i: pb::ImageRef) -> Result<ImageSpec, Error> {
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
    };
    spec.to_ref()?;
    Ok(spec)
}

fn image_pb(i: crate::service::ImageInfo) -> pb::CachedImage {
    pb::CachedImage {
        sha256: i.sha256,
        url: i.url,
        size_bytes: i.size,
        format: i.format.map(|f| f.as_str()).unwrap_or_default().into(),
        location: i.location,
        volume: i.volume,
        users: i.users,
        last_used: i.last_used,
    }
}

/// Parses a request's spec into the validated domain form.
fn parse_spec(s: pb::VmSpec) -> Result<VmSpec, Error> {
    let name: spec::VmName = s.name.parse()?;
    let mut disks = Vec::new();
    for d in s.disks {
        let source = match d.source {
            Some(pb::disk_spec::Source::PdiskVolume(v)) if !v.is_empty() => DiskSource::Pdisk(
                v.parse()
                    .map_err(|e: Error| Error::invalid(format!("vm {name}: pdisk volume {e}")))?,
            ),
            Some(pb::disk_spec::Source::File(f)) => {
                DiskSource::File(spec::check_host_file("disk", &f)?)
            }
            Some(pb::disk_spec::Source::Image(i)) => {
                let image = image_spec(i)?;
                DiskSource::Image {
                    image,
                    size: d.size_bytes,
                    local: d.persistence == pb::DiskPersistence::Local as i32,
                }
            }
            _ => {
                return Err(Error::invalid(format!(
                    "vm {name}: every disk needs a pdisk volume, a file or an image"
                )))
            }
        };
        disks.push(Disk {
            source,
            read_only: d.read_only,
            boot_index: d.boot_index,
        });
    }
    if !disks.is_empty() && disks.iter().all(|d| d.boot_index == 0) && s.kernel.is_none() {
        disks[0].boot_index = 1;
    }
    let mut nics = Vec::new();
    for n in s.nics {
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
        nics.push(Nic {
            bridge: n.bridge,
            mac,
            vlan: n.vlan as u16,
            ips,
        });
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
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "CreateVm",
                &request_id,
                &r,
                async move {
                    let vm = agent.create_vm(spec, &project, &id).await?;
                    Ok(vm_pb(&agent, &vm))
                },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn start_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "StartVm",
                &request_id,
                &r,
                async move { Ok(vm_pb(&agent, &agent.start_vm(&vm).await?)) },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let (timeout, force) = (timeout_of(r.timeout_seconds), r.force);
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "StopVm",
                &request_id,
                &r,
                async move { Ok(vm_pb(&agent, &agent.stop_vm(&vm, timeout, force).await?)) },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn reboot_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "RebootVm",
                &request_id,
                &r,
                async move { Ok(vm_pb(&agent, &agent.reboot_vm(&vm).await?)) },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn pause_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "PauseVm",
                &request_id,
                &r,
                async move { Ok(vm_pb(&agent, &agent.pause_vm(&vm).await?)) },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn resume_vm(&self, req: Request<pb::VmRequest>) -> Result<Response<pb::Vm>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let vm = self
            .run(
                caller_key(&identity, scope.project()),
                "ResumeVm",
                &request_id,
                &r,
                async move { Ok(vm_pb(&agent, &agent.resume_vm(&vm).await?)) },
            )
            .await?;
        Ok(Response::new(vm))
    }

    async fn destroy_vm(
        &self,
        req: Request<pb::DestroyVmRequest>,
    ) -> Result<Response<pb::DestroyVmResponse>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let timeout = timeout_of(r.timeout_seconds);
        self.run(
            caller_key(&identity, scope.project()),
            "DestroyVm",
            &request_id,
            &r,
            async move { agent.destroy_vm(&vm, timeout).await },
        )
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
        let info = self
            .run(
                caller_key(&identity, ""),
                "PullImage",
                &request_id,
                &r,
                async move { Ok(image_pb(agent.pull_image(image, to_pdisk).await?)) },
            )
            .await?;
        Ok(Response::new(info))
    }

    async fn list_images(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self
            .agent
            .list_images()
            .await?
            .into_iter()
            .map(image_pb)
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
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
        let evicted = self
            .run(
                caller_key(&identity, ""),
                "EvictImage",
                &request_id,
                &r,
                async move {
                    let evicted = agent.evict_image(&sha256, local, pdisk).await?;
                    Ok(evicted.into_iter().map(image_pb).collect::<Vec<_>>())
                },
            )
            .await?;
        Ok(Response::new(pb::EvictImageResponse { evicted }))
    }

    async fn save_image(
        &self,
        req: Request<pb::SaveImageRequest>,
    ) -> Result<Response<pb::SaveImageResponse>, Status> {
        let (identity, scope, mut r) = split(req, |r| &r.project)?;
        let request_id = std::mem::take(&mut r.request_id);
        let (agent, vm) = (self.agent.clone(), self.vm_ref(&scope, &r.vm)?);
        let (device, name) = (r.device.clone(), r.name.clone());
        let volume = self
            .run(
                caller_key(&identity, scope.project()),
                "SaveImage",
                &request_id,
                &r,
                async move { agent.save_image(&vm, &device, &name).await },
            )
            .await?;
        Ok(Response::new(pb::SaveImageResponse {
            url: format!("pdisk:///{volume}"),
            volume,
        }))
    }

    async fn set_quota(
        &self,
        req: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let note = stratus_pki::audit::note(&req);
        let r = req.into_inner();
        if let Some(n) = note {
            n.set_project(&r.project);
            n.set_object(format!("quota {}", r.project));
        }
        stratus_pki::identity::check_name(&r.project)
            .map_err(|why| Error::invalid(format!("project: {why}")))?;
        let l = r.limits.unwrap_or_default();
        let set = QuotaLimits {
            vms: l.vms,
            vcpus: l.vcpus,
            memory: l.memory_bytes,
        };
        let mut clear = QuotaLimits::default();
        stratus_pki::tenancy::clear_quotas(
            &r.unlimited,
            [
                ("vms", &mut clear.vms),
                ("vcpus", &mut clear.vcpus),
                ("memory_bytes", &mut clear.memory),
            ],
        )
        .map_err(Error::invalid)?;
        let store = self.agent.store();
        let limits = store.set_quota(&r.project, set, clear)?;
        let (_, usage) = store.quota(&r.project)?;
        tracing::info!(project = %r.project, ?limits, "quota set");
        Ok(Response::new(quota_pb(r.project, limits, usage)))
    }

    async fn get_quota(
        &self,
        req: Request<pb::GetQuotaRequest>,
    ) -> Result<Response<pb::Quota>, Status> {
        let (_, scope, _) = split(req, |r| &r.project)?;
        let Scope::Project(project) = scope else {
            return Err(Error::invalid("GetQuota: name the project").into());
        };
        let (limits, usage) = self.agent.store().quota(&project)?;
        Ok(Response::new(quota_pb(project, limits, usage)))
    }

    async fn list_quotas(
        &self,
        _req: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        let store = self.agent.store();
        let mut quotas = Vec::new();
        for p in store.quota_projects()? {
            let (limits, usage) = store.quota(&p)?;
            quotas.push(quota_pb(p, limits, usage));
        }
        Ok(Response::new(pb::ListQuotasResponse { quotas }))
    }

    async fn get_host(
        &self,
        _req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let h = self.agent.host_info()?;
        let s = self.agent.settings();
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
            pdisk_server: s.pdisk_url.clone().unwrap_or_default(),
            qemu_confinement: self.agent.confinement(),
            qemu_privilege_option: h.facts.qemu_caps.drop.option().to_string(),
            qemu_seccomp: h.facts.qemu_caps.seccomp,
        }))
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
            DiskSource::Pdisk(stratus_core::types::ObjectRef::Name(n)) if n.as_str() == "data"
        ));
        assert!(matches!(
            &spec.disks[1].source,
            DiskSource::Pdisk(stratus_core::types::ObjectRef::Uuid(_))
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

#[cfg(test)]
#[path = "tenancy_tests.rs"]
mod tenancy_tests;

#[cfg(test)]
#[path = "requests_tests.rs"]
mod requests_tests;
