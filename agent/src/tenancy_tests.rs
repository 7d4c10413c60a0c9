//! The authorization matrix of agentd, through the gate and the gRPC
//! handlers, on the fakes of [`crate::fakes`]: every RPC × every role × a
//! guest of the caller's project or of another → allowed, PermissionDenied
//! or NotFound; a refused call changes nothing; a project sees only its
//! guests and their events.

use std::sync::Arc;

use stratus_core::quota::Book as _;
use stratus_core::runner::FakeRunner;
use stratus_pki::{Caller, Identity, Role, Transport};
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_server::VmService;
use tonic::Code;

use crate::attach::{AttachMode, KernelOptions};
use crate::fakes::{FakeNet, FakeVmm, FakeVolumes};
use crate::grpc::Api;
use crate::service::{Agent, AgentSettings, HostEffects, HostFacts};
use crate::store::AgentStore;
use crate::vmm::Accel;

const OWN: &str = "astro";
const OTHER: &str = "bio";

struct Fixture {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    api: Api,
    pdisk: Arc<FakeVolumes>,
}

pub(crate) fn agent(dir: &std::path::Path, pdisk: Arc<FakeVolumes>) -> Arc<Agent> {
    let state = dir.join("state");
    let mut kernel = KernelOptions::new("iqn.2026-11.io.stratus:unit");
    kernel.sys = dir.join("sys");
    kernel.dev = dir.join("dev");
    kernel.iscsi_db = dir.join("iscsi");
    Agent::with_effects(
        AgentStore::open(&state).unwrap(),
        Arc::new(FakeRunner::new()),
        AgentSettings {
            state_dir: state,
            default_bridge: "br0".into(),
            allowed_bridges: vec!["br1".into()],
            initiator_iqn: "iqn.2026-11.io.stratus:unit".into(),
            attach: AttachMode::Qemu,
            chap_mutual: false,
            local_host_id: None,
            pdisk: Vec::new(),
            ceph: Default::default(),
            cpu_overcommit: 4,
            reserved_memory: 0,
            image_quota: None,
            image_policy: None,
            image_file_roots: Vec::new(),
            host_file_roots: Vec::new(),
            image_allow_private: true,
            qemu_users: crate::confine::QemuUsers::pool("64000-64999").unwrap(),
            allow_unsandboxed: false,
            cgroup_parent: None,
            console_log_max: crate::console::DEFAULT_MAX,
            hotplug_ports: 8,
            disk_io: crate::disk_io::DiskIo::measured_default(false),
            peer_tls: None,
            migration_tls: None,
            migration_max_bandwidth: None,
        },
        HostFacts {
            hostname: "unit".into(),
            cpus: 4,
            memory: 8 << 30,
            accel: Accel::Tcg,
            accel_reason: "unit test".into(),
            qemu_version: "7.2.0".into(),
            io_uring: false,
            qemu_caps: crate::confine::QemuCaps {
                drop: crate::confine::PrivilegeDrop::Runas,
                seccomp: true,
            },
        },
        HostEffects {
            volumes: [(crate::spec::ServerName::default(), pdisk as _)].into(),
            net: FakeNet::new(),
            vmm: FakeVmm::new(),
            nvme: crate::attach::NvmeOptions::beside(&kernel),
            rbd_bus: Arc::new(crate::attach::SysfsKernel),
            kernel,
        },
    )
    .unwrap()
}

pub(crate) fn spec(name: &str, disk: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![pb::DiskSpec {
            source: Some(pb::disk_spec::Source::PdiskVolume(disk.into())),
            boot_index: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Per project P: a pdisk volume `P-disk`, a VM `P-vm` on it, defined.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pdisk = FakeVolumes::new();
    let agent = agent(dir.path(), pdisk.clone());
    for p in [OWN, OTHER] {
        pdisk.add_volume_in(&format!("{p}-disk"), p);
        pdisk.add_volume_in(&format!("{p}-disk2"), p);
        let spec = crate::grpc::parse_spec(spec(&format!("{p}-vm"), &format!("{p}-disk"))).unwrap();
        agent.create_vm(spec, p, "").await.unwrap();
    }
    Fixture {
        _dir: dir,
        api: Api::new(agent.clone()),
        agent,
        pdisk,
    }
}

/// What a refused call must leave as it was: the guests, their states and
/// the journal's end.
fn state(f: &Fixture) -> String {
    let vms: Vec<_> = f
        .agent
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|v| (v.spec.name.to_string(), v.state, v.project))
        .collect();
    format!(
        "{vms:?} {:?} {:?}",
        f.agent.host_info().map(|h| h.last_seq),
        f.pdisk.exported()
    )
}

fn caller(role: Role) -> Caller {
    let name = if role == Role::Project { OWN } else { "x" };
    Caller {
        transport: Transport::Mtls,
        identity: Ok(Identity::new(role, name)),
    }
}

pub(crate) fn request<T>(role: Role, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(caller(role));
    r
}

/// Authorization's part of an answer: refused (its code) or let through
/// (whatever the lifecycle then said: a defined guest cannot be paused).
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Refused(Code),
    Through,
    Listed(Vec<String>),
}

fn outcome<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Outcome {
    match r {
        Err(s)
            if matches!(
                s.code(),
                Code::NotFound | Code::PermissionDenied | Code::Unauthenticated
            ) =>
        {
            Outcome::Refused(s.code())
        }
        _ => Outcome::Through,
    }
}

async fn call(f: &Fixture, method: &str, role: Role, target: &str) -> Outcome {
    let project = if role == Role::Project { "" } else { OWN }.to_string();
    let api = &f.api;
    let vm = format!("{target}-vm");
    let vm_req = || {
        request(
            role,
            pb::VmRequest {
                request_id: String::new(),
                vm: vm.clone(),
                project: project.clone(),
            },
        )
    };
    match method {
        // The object a create names: a pdisk disk of a project.
        "CreateVm" => outcome(
            api.create_vm(request(
                role,
                pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(spec("new-vm", &format!("{target}-disk2"))),
                    project,
                },
            ))
            .await,
        ),
        "StartVm" => outcome(api.start_vm(vm_req()).await),
        "RebootVm" => outcome(api.reboot_vm(vm_req()).await),
        "PauseVm" => outcome(api.pause_vm(vm_req()).await),
        "ResumeVm" => outcome(api.resume_vm(vm_req()).await),
        "GetVm" => outcome(api.get_vm(vm_req()).await),
        "StopVm" => outcome(
            api.stop_vm(request(
                role,
                pb::StopVmRequest {
                    vm,
                    force: true,
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "DestroyVm" => outcome(
            api.destroy_vm(request(
                role,
                pb::DestroyVmRequest {
                    vm,
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "ListVms" => match api
            .list_vms(request(role, pb::ListVmsRequest { project }))
            .await
        {
            Ok(l) => Outcome::Listed(l.into_inner().vms.into_iter().map(|v| v.project).collect()),
            Err(s) => Outcome::Refused(s.code()),
        },
        "WatchEvents" => match api
            .watch_events(request(
                role,
                pb::WatchEventsRequest {
                    vm,
                    no_follow: true,
                    project,
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(s) => {
                let events: Vec<_> = futures::StreamExt::collect(s.into_inner()).await;
                Outcome::Listed(events.into_iter().map(|e| e.unwrap().project).collect())
            }
            Err(s) => Outcome::Refused(s.code()),
        },
        "SaveImage" => outcome(
            api.save_image(request(
                role,
                pb::SaveImageRequest {
                    request_id: String::new(),
                    vm,
                    device: "vda".into(),
                    name: "saved".into(),
                    project,
                },
            ))
            .await,
        ),
        // Host-wide: no project's object; the gate's rule alone.
        "GetHost" | "PullImage" | "ListImages" | "EvictImage" => Outcome::Through,
        // Quotas are per project: the caller's own.
        "SetQuota" => outcome(
            api.set_quota(request(
                role,
                pb::SetQuotaRequest {
                    project: OWN.into(),
                    limits: Some(pb::QuotaLimits {
                        vms: Some(10),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))
            .await,
        ),
        "GetQuota" => outcome(
            api.get_quota(request(role, pb::GetQuotaRequest { project }))
                .await,
        ),
        "ListQuotas" => outcome(
            api.list_quotas(request(role, pb::ListQuotasRequest {}))
                .await,
        ),
        // One guest's records, by name: another project's is NotFound.
        "ListUsageRecords" => outcome(
            api.list_usage_records(request(
                role,
                pb::ListUsageRecordsRequest {
                    project,
                    vm,
                    ..Default::default()
                },
            ))
            .await,
        ),
        // Hot-plug on the (defined) guest: its spec; the disk is a volume
        // of the guest's project.
        "AttachDisk" => outcome(
            api.attach_disk(request(
                role,
                pb::AttachDiskRequest {
                    vm,
                    disk: Some(pb::DiskSpec {
                        source: Some(pb::disk_spec::Source::PdiskVolume(format!(
                            "{target}-disk2"
                        ))),
                        ..Default::default()
                    }),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "DetachDisk" => outcome(
            api.detach_disk(request(
                role,
                pb::DetachDiskRequest {
                    vm,
                    device: "vda".into(),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "AttachNic" => outcome(
            api.attach_nic(request(
                role,
                pb::AttachNicRequest {
                    vm,
                    nic: Some(pb::NicSpec::default()),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        // A stopped guest's NICs are named by MAC: a tap name is refused
        // (InvalidArgument) once the guest was found.
        "DetachNic" => outcome(
            api.detach_nic(request(
                role,
                pb::DetachNicRequest {
                    vm,
                    nic: "stdeadbeefn0".into(),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "MigrateVm" => outcome(
            api.migrate_vm(request(
                role,
                pb::MigrateVmRequest {
                    vm,
                    destination: "https://127.0.0.1:1".into(),
                    project,
                    request_id: String::new(),
                },
            ))
            .await,
        ),
        // Agent to agent: no project's call; the gate's rule, then the
        // guest by UUID (an incoming one only: a guest that lives here is
        // never finished or aborted as one).
        "PrepareIncoming" => outcome(
            api.prepare_incoming(request(
                role,
                pb::PrepareIncomingRequest {
                    vm_uuid: uuid::Uuid::new_v4().to_string(),
                    spec: Some(spec(&format!("{target}-in"), &format!("{target}-disk2"))),
                    project: target.into(),
                    ..Default::default()
                },
            ))
            .await,
        ),
        "FinishIncoming" | "AbortIncoming" => {
            let req = pb::IncomingRequest {
                vm_uuid: f
                    .agent
                    .get_vm(&format!("{target}-vm"))
                    .unwrap()
                    .uuid
                    .to_string(),
                reason: String::new(),
            };
            let r = if method == "FinishIncoming" {
                outcome(api.finish_incoming(request(role, req)).await)
            } else {
                outcome(api.abort_incoming(request(role, req)).await)
            };
            assert!(
                f.agent.get_vm(&format!("{target}-vm")).is_ok(),
                "{method} took a guest"
            );
            r
        }
        "ResizeDisk" => outcome(
            api.resize_disk(request(
                role,
                pb::ResizeDiskRequest {
                    vm,
                    device: "vda".into(),
                    size_bytes: 2 << 30,
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "SetDiskQos" => outcome(
            api.set_disk_qos(request(
                role,
                pb::SetDiskQosRequest {
                    vm,
                    device: "vda".into(),
                    qos: Some(pb::DiskQos {
                        iops_total: 100,
                        ..Default::default()
                    }),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        other => panic!("the matrix has no call for {other}: add one"),
    }
}

async fn through_gate(f: &Fixture, method: &str, role: Role, target: &str) -> Outcome {
    let path = format!("/{}/{method}", crate::authz::SERVICE);
    match crate::authz::check(&path, Some(&caller(role))) {
        Err(s) => Outcome::Refused(s.code()),
        Ok(()) => call(f, method, role, target).await,
    }
}

fn expected(method: &str, role: Role, target: &str) -> Outcome {
    let rule = crate::authz::RULES
        .iter()
        .find(|r| r.method == method)
        .unwrap();
    if !rule.roles.contains(&role) {
        return Outcome::Refused(Code::PermissionDenied);
    }
    let own = target == OWN;
    match method {
        "ListVms" => Outcome::Listed(vec![OWN.into()]),
        // The own guest's one event (CREATED), never another project's:
        // another project's guest has no history in this scope, as one
        // that never existed.
        "WatchEvents" if own => Outcome::Listed(vec![OWN.into()]),
        "WatchEvents" => Outcome::Listed(vec![]),
        "GetHost" | "PullImage" | "ListImages" | "EvictImage" | "SetQuota" | "GetQuota"
        | "ListQuotas" | "PrepareIncoming" | "FinishIncoming" | "AbortIncoming" => Outcome::Through,
        _ if own => Outcome::Through,
        _ => Outcome::Refused(Code::NotFound),
    }
}

fn rpcs() -> Vec<String> {
    crate::authz::TABLE.rpcs(stratus_proto::FILE_DESCRIPTOR_SET)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_by_every_role_on_its_own_and_another_projects_guests() {
    let rpcs = rpcs();
    assert!(rpcs.len() >= 15, "{rpcs:?}");
    let mut kinds = std::collections::BTreeSet::new();
    for m in &rpcs {
        for role in Role::ALL {
            for target in [OWN, OTHER] {
                let f = fixture().await;
                let before = state(&f);
                let got = through_gate(&f, m, role, target).await;
                assert_eq!(
                    got,
                    expected(m, role, target),
                    "{m} by {role} on {target}'s guest"
                );
                if let Outcome::Refused(_) = got {
                    assert_eq!(state(&f), before, "{m} by {role} changed something");
                }
                kinds.insert(format!("{got:?}"));
            }
        }
    }
    for k in ["Through", "Refused(PermissionDenied)", "Refused(NotFound)"] {
        assert!(kinds.contains(k), "{k} never seen: {kinds:?}");
    }
}

#[tokio::test]
async fn guests_belong_to_the_project_they_were_created_in() {
    let f = fixture().await;
    // A project caller creates in its own project; a frontend in the one
    // it names; an admin naming none, in none.
    for (role, project, want) in [
        (Role::Project, "", OWN),
        (Role::Frontend, OTHER, OTHER),
        (Role::Admin, "", ""),
    ] {
        let disk = if want.is_empty() { "" } else { want };
        if want.is_empty() {
            f.pdisk.add_volume_in("shared-disk", "");
        }
        let name = format!("made-by-{role}");
        let vm = f
            .api
            .create_vm(request(
                role,
                pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(spec(
                        &name,
                        &if disk.is_empty() {
                            "shared-disk".to_string()
                        } else {
                            format!("{disk}-disk2")
                        },
                    )),
                    project: project.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(vm.project, want, "{role}");
    }
    // Reserved labels are the admin's.
    let mut s = spec("labelled", &format!("{OWN}-disk2"));
    s.labels.insert("stratus.io/vm".into(), "x".into());
    for role in [Role::Project, Role::Frontend] {
        let err = f
            .api
            .create_vm(request(
                role,
                pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(s.clone()),
                    project: OWN.into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{role}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creates_against_a_vm_quota_make_exactly_the_quota() {
    let f = Arc::new(fixture().await);
    // astro holds one guest (1 vCPU, 64 MiB): room for 3 more VMs.
    let q = f
        .api
        .set_quota(request(
            Role::Admin,
            pb::SetQuotaRequest {
                project: OWN.into(),
                limits: Some(pb::QuotaLimits {
                    vms: Some(4),
                    memory_bytes: Some(1 << 30),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        q.usage.unwrap(),
        pb::QuotaUsage {
            vms: 1,
            vcpus: 1,
            memory_bytes: 64 << 20
        }
    );
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move {
                f.api
                    .create_vm(request(
                        Role::Frontend,
                        pb::CreateVmRequest {
                            request_id: String::new(),
                            spec: Some(spec(&format!("q{i}"), &format!("{OWN}-disk2"))),
                            project: OWN.into(),
                        },
                    ))
                    .await
            })
        })
        .collect();
    let mut made = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => made += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message().contains(
                        "project astro: VM quota exceeded: 1 more requested, 4 of 4 in use"
                    ),
                    "{s:?}"
                );
            }
        }
    }
    assert_eq!(made, 3);
    let (_, used) = f.agent.store().quota(OWN).unwrap();
    assert_eq!(used.vms, 4);
    // Memory: a guest larger than what is left is refused, naming it.
    let mut big = spec("big", &format!("{OWN}-disk2"));
    big.memory_bytes = 1 << 30;
    f.api
        .set_quota(request(
            Role::Admin,
            pb::SetQuotaRequest {
                project: OWN.into(),
                unlimited: vec!["vms".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let s = f
        .api
        .create_vm(request(
            Role::Project,
            pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(big),
                project: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(
        s.message()
            .contains("memory quota exceeded: 1G more requested, 256M of 1G in use"),
        "{s:?}"
    );
    // Another project is not held back.
    f.api
        .create_vm(request(
            Role::Frontend,
            pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(spec("other-new", &format!("{OTHER}-disk2"))),
                project: OTHER.into(),
            },
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn guest_names_are_per_project_so_a_taken_name_elsewhere_reveals_nothing() {
    let f = fixture().await;
    let create = |role, project: &str, disk: &str| {
        request(
            role,
            pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(spec(&format!("{OTHER}-vm"), disk)),
                project: project.into(),
            },
        )
    };
    // OTHER's guest name, used in OWN: no AlreadyExists (which would tell
    // OWN what OTHER calls its guests); a second time in OWN it is.
    let mine = f
        .api
        .create_vm(create(Role::Project, "", &format!("{OWN}-disk2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.project, OWN);
    let again = f
        .api
        .create_vm(create(Role::Frontend, OWN, &format!("{OWN}-disk2")))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    // The name means the caller's project's guest, for every RPC.
    let get = |role, project: &str| {
        request(
            role,
            pb::VmRequest {
                request_id: String::new(),
                vm: format!("{OTHER}-vm"),
                project: project.into(),
            },
        )
    };
    let got = f.api.get_vm(get(Role::Project, "")).await.unwrap();
    assert_eq!(got.into_inner().uuid, mine.uuid);
    let got = f.api.get_vm(get(Role::Frontend, OTHER)).await.unwrap();
    assert_eq!(got.into_inner().project, OTHER);
    f.api
        .destroy_vm(request(
            Role::Project,
            pb::DestroyVmRequest {
                vm: format!("{OTHER}-vm"),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let theirs = f.api.get_vm(get(Role::Frontend, OTHER)).await.unwrap();
    assert_eq!(theirs.into_inner().state, pb::VmState::Defined as i32);
    // An admin naming no project: ambiguous while both exist, named by
    // UUID always.
    f.api
        .create_vm(create(Role::Project, "", &format!("{OWN}-disk2")))
        .await
        .unwrap();
    let err = f.api.get_vm(get(Role::Admin, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ambiguous"), "{err}");
}

/// CreateVm records its caller as the guest's creator, durably, and the
/// guest's usage record names it (APEL LocalUserId, GlobalUserName, FQAN);
/// a guest defined without a caller has none.
#[tokio::test]
async fn the_creator_of_a_guest_is_recorded_and_named_in_its_usage_record() {
    let f = fixture().await;
    let vm = f
        .api
        .create_vm(request(
            Role::Project,
            pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(spec("made-by-astro", &format!("{OWN}-disk2"))),
                project: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let uuid: uuid::Uuid = vm.uuid.parse().unwrap();
    let rec = f.agent.store().vm(uuid).unwrap().unwrap();
    assert_eq!(
        rec.created_by.as_ref().map(|c| c.to_string()).as_deref(),
        Some("project/astro")
    );
    f.agent.sample_usage(&rec).await.unwrap();
    // Only guests that ran have records: read the tally's rendering.
    let t = f
        .agent
        .usage_book()
        .tallies()
        .unwrap()
        .into_iter()
        .find(|t| t.vm_uuid == uuid)
        .unwrap();
    let site = f.agent.usage_book().site();
    let r = crate::usage::UsageRecord::from_tally(&t, &site, 0);
    assert_eq!(
        (
            r.local_user_id.as_str(),
            r.global_user_name.as_str(),
            r.fqan.as_str()
        ),
        (
            "project/astro",
            "stratus://project/astro",
            "/astro/Role=project/Capability=NULL"
        )
    );
    // The fixture's guests were defined without a caller.
    let other = f
        .agent
        .list_vms()
        .unwrap()
        .into_iter()
        .find(|v| v.spec.name.to_string() == format!("{OWN}-vm"))
        .unwrap();
    assert_eq!(other.created_by, None);
}
