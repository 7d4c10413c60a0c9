//! The authorization matrix of pdiskd, through the gate and the gRPC
//! handlers: every RPC × every role × an object of the caller's project or
//! of another → allowed, PermissionDenied or NotFound; and a refused call
//! changes nothing. File backend in a temp dir, the in-memory exporter.

use std::collections::BTreeMap;
use std::sync::Arc;

use stratus_core::quota::Book as _;
use stratus_pki::{Caller, Identity, Role, Transport};
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
use tonic::Code;

use crate::backend::file::FileBackend;
use crate::export::MemoryExporter;
use crate::grpc::Api;
use crate::runner::FakeRunner;
use crate::service::{NewVolume, NewVolumeSource, Owner, PoolService, ServiceSettings};
use crate::store::Store;
use crate::types::Iqn;

/// The project every caller of the matrix acts in, and the other one.
const OWN: &str = "astro";
const OTHER: &str = "bio";
const IQN: &str = "iqn.2026-11.io.stratus:host1";

pub(crate) struct Fixture {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) svc: Arc<PoolService>,
    pub(crate) api: Api,
}

/// Per project P: volume `P-vol` (with snapshot `P-snap`), `P-free` (for
/// deletes) and `P-exp` (exported to IQN); deletes are at once.
pub(crate) async fn fixture() -> Fixture {
    fixture_with(std::time::Duration::ZERO).await
}

/// The quarantine period of [`fixture_quarantined`].
const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

/// [`fixture`] with a quarantine period of an hour, and per project P a
/// volume `P-gone` deleted into quarantine (for restores).
async fn fixture_quarantined() -> Fixture {
    let f = fixture_with(HOUR).await;
    for p in [OWN, OTHER] {
        let name = format!("{p}-gone");
        f.svc
            .create_volume(NewVolume {
                allow_multi_attach: false,
                name: name.parse().unwrap(),
                size: 4 << 20,
                labels: Default::default(),
                source: NewVolumeSource::Empty,
                request_id: String::new(),
                owner: Owner {
                    project: p.into(),
                    creator: None,
                },
            })
            .await
            .unwrap();
        let done = f.svc.delete_volume(&name).await.unwrap();
        assert!(matches!(done, crate::service::Deleted::Quarantined { .. }));
    }
    f
}

async fn fixture_with(quarantine_period: std::time::Duration) -> Fixture {
    // 160 fixtures: on tmpfs when there is one, where fsync costs nothing.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let runner = Arc::new(FakeRunner::new());
    let backend = Arc::new(FileBackend::open(&dir.path().join("pool"), runner.clone()).unwrap());
    let store = Store::open(&dir.path().join("data")).unwrap();
    let svc = Arc::new(PoolService::new(
        store,
        backend,
        Arc::new(MemoryExporter::default()),
        runner,
        ServiceSettings {
            quarantine_period,
            ..Default::default()
        },
    ));
    for p in [OWN, OTHER] {
        for v in ["vol", "free", "exp"] {
            svc.create_volume(NewVolume {
                allow_multi_attach: false,
                name: format!("{p}-{v}").parse().unwrap(),
                size: 4 << 20,
                labels: Default::default(),
                source: NewVolumeSource::Empty,
                request_id: String::new(),
                owner: Owner {
                    project: p.into(),
                    creator: None,
                },
            })
            .await
            .unwrap();
        }
        svc.create_snapshot(
            &format!("{p}-vol"),
            format!("{p}-snap").parse().unwrap(),
            "",
        )
        .await
        .unwrap();
        let iqn: Iqn = IQN.parse().unwrap();
        svc.export_volume(
            &format!("{p}-exp"),
            &[iqn],
            None,
            &crate::ExportBy::admin("t"),
        )
        .await
        .unwrap();
    }
    Fixture {
        _dir: dir,
        api: Api::new(svc.clone()),
        svc,
    }
}

/// Everything a refused call must leave as it was.
fn state(svc: &PoolService) -> String {
    let s = svc.store();
    format!(
        "{:?}",
        (
            s.volumes().unwrap(),
            s.snapshots().unwrap(),
            s.exports().unwrap()
        )
    )
}

fn caller(role: Role) -> Caller {
    let name = if role == Role::Project { OWN } else { "x" };
    let mut identity = Identity::new(role, name);
    if role == Role::Agent {
        // An agent's certificate binds its host's initiator (export fencing).
        identity.iqn = Some(IQN.into());
    }
    Caller {
        transport: Transport::Mtls,
        identity: Ok(identity),
    }
}

pub(crate) fn request<T>(role: Role, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(caller(role));
    r
}

/// What one call saw: its code, and for listings the projects of what it
/// listed.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Code(Code),
    Listed(Vec<String>),
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Outcome {
    Outcome::Code(match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    })
}

/// Calls `method` as `role` acting in OWN (a project caller names none: its
/// own), on the object of project `target`.
async fn call(f: &Fixture, method: &str, role: Role, target: &str) -> Outcome {
    let project = if role == Role::Project { "" } else { OWN }.to_string();
    let api = &f.api;
    let vol = format!("{target}-vol");
    match method {
        "CreateVolume" => code(
            api.create_volume(request(
                role,
                pb::CreateVolumeRequest {
                    name: "new".into(),
                    source: Some(pb::create_volume_request::Source::FromVolume(vol)),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        // A client stream cannot be made in process: the gate's rule alone
        // (tests/tenancy.rs uploads over the wire).
        "UploadVolume" => Outcome::Code(Code::Ok),
        "GetVolume" => code(
            api.get_volume(request(
                role,
                pb::GetVolumeRequest {
                    volume: vol,
                    project,
                },
            ))
            .await,
        ),
        "ListVolumes" => match api
            .list_volumes(request(
                role,
                pb::ListVolumesRequest {
                    project,
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(l) => Outcome::Listed(
                l.into_inner()
                    .volumes
                    .into_iter()
                    .map(|v| v.project)
                    .collect(),
            ),
            Err(s) => Outcome::Code(s.code()),
        },
        "DeleteVolume" => code(
            api.delete_volume(request(
                role,
                pb::DeleteVolumeRequest {
                    volume: format!("{target}-free"),
                    project,
                    now: false,
                    request_id: String::new(),
                },
            ))
            .await,
        ),
        "RestoreVolume" => code(
            api.restore_volume(request(
                role,
                pb::RestoreVolumeRequest {
                    volume: format!("{target}-gone"),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "ResizeVolume" => code(
            api.resize_volume(request(
                role,
                pb::ResizeVolumeRequest {
                    volume: vol,
                    size_bytes: 8 << 20,
                    project,
                    request_id: String::new(),
                },
            ))
            .await,
        ),
        "FlattenVolume" => code(
            api.flatten_volume(request(
                role,
                pb::FlattenVolumeRequest {
                    volume: vol,
                    request_id: String::new(),
                    project,
                },
            ))
            .await,
        ),
        "CloneVolume" => code(
            api.clone_volume(request(
                role,
                pb::CloneVolumeRequest {
                    source: format!("{target}-snap"),
                    source_is_snapshot: true,
                    name: "new".into(),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "CreateSnapshot" => code(
            api.create_snapshot(request(
                role,
                pb::CreateSnapshotRequest {
                    volume: vol,
                    name: "new-snap".into(),
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "ListSnapshots" => match api
            .list_snapshots(request(
                role,
                pb::ListSnapshotsRequest {
                    volume: vol,
                    project,
                },
            ))
            .await
        {
            Ok(l) => Outcome::Listed(
                l.into_inner()
                    .snapshots
                    .into_iter()
                    .map(|s| s.project)
                    .collect(),
            ),
            Err(s) => Outcome::Code(s.code()),
        },
        "DeleteSnapshot" => code(
            api.delete_snapshot(request(
                role,
                pb::DeleteSnapshotRequest {
                    snapshot: format!("{target}-snap"),
                    project,
                    request_id: String::new(),
                },
            ))
            .await,
        ),
        "ExportVolume" => code(
            api.export_volume(request(
                role,
                pb::ExportVolumeRequest {
                    multi_attach: false,
                    volume: vol,
                    initiators: vec![IQN.into()],
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "UnexportVolume" => code(
            api.unexport_volume(request(
                role,
                pb::UnexportVolumeRequest {
                    volume: format!("{target}-exp"),
                    initiators: vec![],
                    project,
                    request_id: String::new(),
                },
            ))
            .await,
        ),
        "ListExports" => match api
            .list_exports(request(role, pb::ListExportsRequest { project }))
            .await
        {
            Ok(l) => Outcome::Listed(
                l.into_inner()
                    .exports
                    .into_iter()
                    .map(|e| e.project)
                    .collect(),
            ),
            Err(s) => Outcome::Code(s.code()),
        },
        "ChecksumVolume" => code(
            api.checksum_volume(request(
                role,
                pb::ChecksumVolumeRequest {
                    volume: vol,
                    project,
                    ..Default::default()
                },
            ))
            .await,
        ),
        "GetPool" => code(api.get_pool(request(role, pb::GetPoolRequest {})).await),
        "WatchProgress" => code(
            api.watch_progress(request(
                role,
                pb::WatchProgressRequest {
                    request_id: "r1".into(),
                    project,
                },
            ))
            .await,
        ),
        // Quotas are per project, not per object: the caller's own.
        "SetQuota" => code(
            api.set_quota(request(
                role,
                pb::SetQuotaRequest {
                    project: OWN.into(),
                    limits: Some(pb::QuotaLimits {
                        volumes: Some(100),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ))
            .await,
        ),
        "GetQuota" => code(
            api.get_quota(request(role, pb::GetQuotaRequest { project }))
                .await,
        ),
        "ListQuotas" => code(
            api.list_quotas(request(role, pb::ListQuotasRequest {}))
                .await,
        ),
        // The projects of the events of the target's volume (replayed).
        "WatchEvents" => match api
            .watch_events(request(
                role,
                pb::WatchEventsRequest {
                    volume: vol,
                    no_follow: true,
                    project,
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(s) => Outcome::Listed(event_projects(s.into_inner()).await),
            Err(s) => Outcome::Code(s.code()),
        },
        // The projects of the records listed (every project sampled now).
        "ListStorageUsage" => match api
            .list_storage_usage(request(
                role,
                pb::ListStorageUsageRequest {
                    project,
                    ..Default::default()
                },
            ))
            .await
        {
            Ok(r) => {
                let groups: std::collections::BTreeSet<String> = r
                    .into_inner()
                    .records
                    .into_iter()
                    .map(|r| r.group)
                    .collect();
                Outcome::Listed(groups.into_iter().collect())
            }
            Err(s) => Outcome::Code(s.code()),
        },
        other => panic!("the matrix has no call for {other}: add one"),
    }
}

/// The distinct projects of a replayed event stream, sorted.
async fn event_projects(
    mut s: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::PoolEvent, tonic::Status>> + Send>,
    >,
) -> Vec<String> {
    use futures::StreamExt;
    let mut projects = std::collections::BTreeSet::new();
    while let Some(e) = s.next().await {
        projects.insert(e.unwrap().project);
    }
    projects.into_iter().collect()
}

/// WatchEvents without a volume: a project's caller replays its own
/// volumes' events only, an admin every project's; another project's volume
/// is NotFound like a missing one.
#[tokio::test]
async fn watch_events_shows_a_project_only_its_own_volumes() {
    let f = fixture().await;
    let watch = |role, project: &str, volume: &str| {
        request(
            role,
            pb::WatchEventsRequest {
                volume: volume.into(),
                no_follow: true,
                project: project.into(),
                ..Default::default()
            },
        )
    };
    let own = f
        .api
        .watch_events(watch(Role::Project, "", ""))
        .await
        .unwrap();
    assert_eq!(
        event_projects(own.into_inner()).await,
        vec![OWN.to_string()]
    );
    let all = f
        .api
        .watch_events(watch(Role::Admin, "", ""))
        .await
        .unwrap();
    assert_eq!(
        event_projects(all.into_inner()).await,
        vec![OWN.to_string(), OTHER.to_string()]
    );
    let hidden = f
        .api
        .watch_events(watch(Role::Project, "", &format!("{OTHER}-vol")))
        .await
        .err()
        .unwrap();
    let missing = f
        .api
        .watch_events(watch(Role::Project, "", "nobody-vol"))
        .await
        .map(|s| s.into_inner());
    assert_eq!(hidden.code(), Code::NotFound);
    // A name nobody has is no error (a deleted volume's events stay): it
    // replays nothing.
    assert!(event_projects(missing.unwrap()).await.is_empty());
    assert_eq!(
        f.api
            .watch_events(watch(Role::Project, OTHER, ""))
            .await
            .err()
            .unwrap()
            .code(),
        Code::PermissionDenied
    );
}

/// The gate, then (when it lets the call through) the handler.
async fn through_gate(f: &Fixture, method: &str, role: Role, target: &str) -> Outcome {
    let path = format!("/{}/{method}", crate::authz::SERVICE);
    match crate::authz::check(&path, Some(&caller(role))) {
        Err(s) => Outcome::Code(s.code()),
        Ok(()) => call(f, method, role, target).await,
    }
}

fn rpcs() -> Vec<String> {
    crate::authz::TABLE.rpcs(stratus_proto::FILE_DESCRIPTOR_SET)
}

/// What the table says: the roles of the RPC's rule, then the scope.
fn expected(method: &str, role: Role, target: &str) -> Outcome {
    let rule = crate::authz::RULES
        .iter()
        .find(|r| r.method == method)
        .unwrap();
    if !rule.roles.contains(&role) {
        return Outcome::Code(Code::PermissionDenied);
    }
    let own = target == OWN;
    match method {
        // Only OWN's objects are listed, whatever the target.
        "ListVolumes" => Outcome::Listed(vec![OWN.into(); 3]),
        "ListExports" => Outcome::Listed(vec![OWN.into()]),
        "ListSnapshots" if own => Outcome::Listed(vec![OWN.into()]),
        "WatchEvents" if own => Outcome::Listed(vec![OWN.into()]),
        "ListStorageUsage" => Outcome::Listed(vec![OWN.into()]),
        "UploadVolume" | "GetPool" | "WatchProgress" | "SetQuota" | "GetQuota" | "ListQuotas" => {
            Outcome::Code(Code::Ok)
        }
        // An agent grows only a volume exported to its own initiator
        // (`P-vol` is not; see agents_grow_only_volumes_exported_to_them).
        "ResizeVolume" if own && role == Role::Agent => Outcome::Code(Code::PermissionDenied),
        _ if own => Outcome::Code(Code::Ok),
        _ => Outcome::Code(Code::NotFound),
    }
}

/// ResizeVolume by an agent (agentd's ResizeDisk): it grows a volume of
/// the project exported to the initiator its certificate binds; a volume
/// not exported to it is PermissionDenied and unchanged, a shrink is
/// InvalidArgument, growth past the project's byte quota ResourceExhausted.
#[tokio::test]
async fn agents_grow_only_volumes_exported_to_them() {
    let f = fixture().await;
    let resize = |volume: &str, size: u64| {
        request(
            Role::Agent,
            pb::ResizeVolumeRequest {
                volume: volume.into(),
                size_bytes: size,
                project: OWN.into(),
                ..Default::default()
            },
        )
    };
    let size = |f: &Fixture, v: &str| f.svc.store().find_volume(v).unwrap().size.0;
    let grown = f
        .api
        .resize_volume(resize(&format!("{OWN}-exp"), 8 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.size_bytes, 8 << 20);
    assert_eq!(size(&f, &format!("{OWN}-exp")), 8 << 20);

    let before = state(&f.svc);
    let not_ours = f
        .api
        .resize_volume(resize(&format!("{OWN}-vol"), 8 << 20))
        .await
        .unwrap_err();
    assert_eq!(not_ours.code(), Code::PermissionDenied, "{not_ours:?}");
    assert!(not_ours.message().contains("not"), "{not_ours:?}");
    assert_eq!(state(&f.svc), before, "a refused resize changed something");
    // Exported to another host only: refused too.
    f.svc
        .export_volume(
            &format!("{OWN}-vol"),
            &["iqn.2026-11.io.stratus:host9".parse().unwrap()],
            None,
            &crate::ExportBy::admin("t"),
        )
        .await
        .unwrap();
    let before = state(&f.svc);
    let other_host = f
        .api
        .resize_volume(resize(&format!("{OWN}-vol"), 8 << 20))
        .await
        .unwrap_err();
    assert_eq!(other_host.code(), Code::PermissionDenied, "{other_host:?}");
    assert_eq!(state(&f.svc), before);

    let shrink = f
        .api
        .resize_volume(resize(&format!("{OWN}-exp"), 4 << 20))
        .await
        .unwrap_err();
    assert_eq!(shrink.code(), Code::InvalidArgument, "{shrink:?}");
    assert_eq!(size(&f, &format!("{OWN}-exp")), 8 << 20);

    // astro: 4 + 4 + 8 MiB volumes + a 4 MiB snapshot = 20 MiB of 24.
    set_quota(
        &f,
        OWN,
        pb::QuotaLimits {
            bytes: Some(24 << 20),
            ..Default::default()
        },
    )
    .await;
    let over = f
        .api
        .resize_volume(resize(&format!("{OWN}-exp"), 16 << 20))
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert_eq!(size(&f, &format!("{OWN}-exp")), 8 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_by_every_role_on_its_own_and_another_projects_objects() {
    let rpcs = rpcs();
    assert!(rpcs.len() >= 16, "{rpcs:?}");
    let mut seen = BTreeMap::new();
    for m in &rpcs {
        for role in Role::ALL {
            for target in [OWN, OTHER] {
                let f = fixture_quarantined().await;
                let before = state(&f.svc);
                let got = through_gate(&f, m, role, target).await;
                let want = expected(m, role, target);
                assert_eq!(got, want, "{m} by {role} on {target}'s object");
                if !matches!(got, Outcome::Code(Code::Ok) | Outcome::Listed(_)) {
                    assert_eq!(state(&f.svc), before, "{m} by {role} changed something");
                }
                *seen.entry(format!("{got:?}")).or_insert(0) += 1;
            }
        }
    }
    // The matrix exercised every kind of answer.
    for k in ["Code(Ok)", "Code(PermissionDenied)", "Code(NotFound)"] {
        assert!(seen.contains_key(k), "{k} never seen: {seen:?}");
    }
}

#[tokio::test]
async fn a_frontend_must_name_a_project_and_a_tenant_only_its_own() {
    let f = fixture().await;
    let before = state(&f.svc);
    let get = |role, project: &str| {
        request(
            role,
            pb::GetVolumeRequest {
                volume: format!("{OWN}-vol"),
                project: project.into(),
            },
        )
    };
    let code =
        |r: Result<tonic::Response<pb::Volume>, tonic::Status>| r.map(|_| ()).map_err(|s| s.code());
    assert_eq!(
        code(f.api.get_volume(get(Role::Frontend, "")).await),
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        code(f.api.get_volume(get(Role::Project, OTHER)).await),
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        code(f.api.get_volume(get(Role::Project, OWN)).await),
        Ok(())
    );
    // An admin or agent naming no project sees every project.
    for role in [Role::Admin, Role::Agent] {
        let all = f
            .api
            .list_volumes(request(role, pb::ListVolumesRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .volumes;
        assert_eq!(all.len(), 6, "{role}");
    }
    // Not knowing and not being allowed to see answer alike.
    let missing = f
        .api
        .get_volume(request(
            Role::Project,
            pb::GetVolumeRequest {
                volume: "nobody-vol".into(),
                project: String::new(),
            },
        ))
        .await
        .unwrap_err();
    let hidden = f
        .api
        .get_volume(request(
            Role::Project,
            pb::GetVolumeRequest {
                volume: format!("{OTHER}-vol"),
                project: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), hidden.code());
    assert_eq!(
        missing.message().replace("nobody-vol", "X"),
        hidden.message().replace(&format!("{OTHER}-vol"), "X")
    );
    assert_eq!(state(&f.svc), before);
}

#[tokio::test]
async fn volumes_record_their_project_and_creator_and_tenants_cannot_forge_image_bases() {
    let f = fixture().await;
    let sha = "ab".repeat(32);
    let base_labels = || {
        std::collections::HashMap::from([(
            crate::types::LABEL_IMAGE_SHA256.to_string(),
            sha.clone(),
        )])
    };
    // A tenant may not set stratus.io/ labels, on create or clone.
    for role in [Role::Project, Role::Frontend] {
        let before = state(&f.svc);
        let s = f
            .api
            .create_volume(request(
                role,
                pb::CreateVolumeRequest {
                    name: "fake-base".into(),
                    size_bytes: 4 << 20,
                    labels: base_labels(),
                    project: OWN.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{role}: {s:?}");
        assert!(s.message().contains("stratus.io/"), "{s:?}");
        let s = f
            .api
            .clone_volume(request(
                role,
                pb::CloneVolumeRequest {
                    source: format!("{OWN}-vol"),
                    name: "fake-base".into(),
                    labels: base_labels(),
                    project: OWN.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{role}: {s:?}");
        assert_eq!(state(&f.svc), before);
    }
    // A tenant's volume carries its project and creator.
    let v = f
        .api
        .create_volume(request(
            Role::Project,
            pb::CreateVolumeRequest {
                name: "mine".into(),
                size_bytes: 4 << 20,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.project.as_str(), v.created_by.as_str()),
        (OWN, "project/astro")
    );
    // An agent's image base is a base (project "", read-only); a record
    // with the same labels made by a tenant (as a store could hold from a
    // forged request) is not one: agentd, which trusts only image_sha256,
    // never launches from it.
    let base = f
        .api
        .create_volume(request(
            Role::Agent,
            pb::CreateVolumeRequest {
                name: "image-base".into(),
                size_bytes: 4 << 20,
                labels: base_labels(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(base.image_sha256, sha);
    assert_eq!(
        (base.project.as_str(), base.created_by.as_str()),
        ("", "agent/x")
    );
    let mut forged = f.svc.store().find_volume("mine").unwrap();
    forged.labels = base_labels().into_iter().collect();
    f.svc.store().update_volume(&forged, &[]).unwrap();
    let listed = f
        .api
        .list_volumes(request(
            Role::Agent,
            pb::ListVolumesRequest {
                label_selector: base_labels(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .volumes;
    let by_name = |n: &str| listed.iter().find(|v| v.name == n).unwrap();
    assert_eq!(by_name("image-base").image_sha256, sha);
    assert_eq!(
        by_name("mine").image_sha256,
        "",
        "a tenant's volume is never a base"
    );
    // An agent clones the base into the project it acts in; a tenant
    // cannot see the base at all.
    let clone = f
        .api
        .clone_volume(request(
            Role::Agent,
            pb::CloneVolumeRequest {
                source: "image-base".into(),
                name: "guest-disk".into(),
                project: OWN.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clone.project, OWN);
    let s = f
        .api
        .clone_volume(request(
            Role::Project,
            pb::CloneVolumeRequest {
                source: "image-base".into(),
                name: "stolen".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
}

async fn set_quota(f: &Fixture, project: &str, limits: pb::QuotaLimits) -> pb::Quota {
    f.api
        .set_quota(request(
            Role::Admin,
            pb::SetQuotaRequest {
                project: project.into(),
                limits: Some(limits),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

fn create_in(project: &str, name: &str, size: u64) -> tonic::Request<pb::CreateVolumeRequest> {
    request(
        Role::Frontend,
        pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            project: project.into(),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_creates_against_a_quota_of_five_make_exactly_five() {
    let f = Arc::new(fixture().await);
    // astro holds 3 volumes and 1 snapshot: 5 more volumes fit.
    set_quota(
        &f,
        OWN,
        pb::QuotaLimits {
            volumes: Some(8),
            ..Default::default()
        },
    )
    .await;
    let files_before = f.svc.backend().list().await.unwrap().objects.len();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move {
                f.api
                    .create_volume(create_in(OWN, &format!("c{i}"), 4 << 20))
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
                    s.message()
                        .contains("project astro: volume quota reached (8 of 8 volumes)"),
                    "{s:?}"
                );
            }
        }
    }
    assert_eq!(made, 5);
    let (_, usage) = f.svc.store().quota(OWN).unwrap();
    assert_eq!(usage.volumes, 8);
    // Nothing half-created: no record left creating, no data without one.
    let vols = f.svc.store().volumes().unwrap();
    assert!(vols
        .iter()
        .all(|v| v.state == crate::store::VolumeState::Ready));
    assert_eq!(
        f.svc.backend().list().await.unwrap().objects.len(),
        files_before + 5
    );
    // Another project is not held back by astro's quota.
    f.api
        .create_volume(create_in(OTHER, "free-rider", 4 << 20))
        .await
        .unwrap();
}

#[tokio::test]
async fn byte_and_snapshot_quotas_cover_creates_clones_snapshots_and_growth() {
    let f = fixture().await;
    // astro: 3 volumes of 4 MiB + a 4 MiB snapshot = 16 MiB provisioned.
    let q = set_quota(
        &f,
        OWN,
        pb::QuotaLimits {
            bytes: Some(24 << 20),
            snapshots: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        q.usage.unwrap(),
        pb::QuotaUsage {
            volumes: 3,
            snapshots: 1,
            bytes: 16 << 20
        }
    );
    let before = state(&f.svc);
    let code = |r: Result<tonic::Response<pb::Volume>, tonic::Status>| {
        r.map(|_| ())
            .map_err(|s| (s.code(), s.message().to_owned()))
    };
    let (c, m) = code(f.api.create_volume(create_in(OWN, "big", 12 << 20)).await).unwrap_err();
    assert_eq!(c, Code::ResourceExhausted);
    assert!(
        m.contains("byte quota exceeded: 12M more requested, 16M of 24M provisioned"),
        "{m}"
    );
    let grow = f
        .api
        .resize_volume(request(
            Role::Frontend,
            pb::ResizeVolumeRequest {
                volume: format!("{OWN}-vol"),
                size_bytes: 16 << 20,
                project: OWN.into(),
                request_id: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(grow.code(), Code::ResourceExhausted, "{grow:?}");
    let snap = f
        .api
        .create_snapshot(request(
            Role::Frontend,
            pb::CreateSnapshotRequest {
                volume: format!("{OWN}-free"),
                name: "one-too-many".into(),
                project: OWN.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(snap.code(), Code::ResourceExhausted, "{snap:?}");
    assert!(
        snap.message()
            .contains("snapshot quota reached (1 of 1 snapshots)"),
        "{snap:?}"
    );
    assert_eq!(state(&f.svc), before, "refusals changed nothing");
    // Within the quota, and then without it.
    code(f.api.create_volume(create_in(OWN, "fits", 8 << 20)).await).unwrap();
    f.api
        .set_quota(request(
            Role::Admin,
            pb::SetQuotaRequest {
                project: OWN.into(),
                unlimited: vec!["bytes".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    code(f.api.create_volume(create_in(OWN, "big", 12 << 20)).await).unwrap();
    let q = f
        .api
        .get_quota(request(Role::Project, pb::GetQuotaRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.project, OWN);
    let limits = q.limits.unwrap();
    assert_eq!((limits.bytes, limits.snapshots), (None, Some(1)));
    assert_eq!(q.usage.unwrap().bytes, 36 << 20);
}

#[tokio::test]
async fn names_are_per_project_so_a_taken_name_elsewhere_reveals_nothing() {
    let f = fixture().await;
    // OTHER's names, used by a tenant of OWN: each create succeeds in OWN
    // (an AlreadyExists would tell OWN what OTHER calls its volumes).
    fn own<T>(msg: T) -> tonic::Request<T> {
        request(Role::Project, msg)
    }
    let v = f
        .api
        .create_volume(own(pb::CreateVolumeRequest {
            name: format!("{OTHER}-vol"),
            size_bytes: 1 << 20,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.project, OWN);
    let c = f
        .api
        .clone_volume(own(pb::CloneVolumeRequest {
            source: format!("{OTHER}-vol"),
            name: format!("{OTHER}-free"),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c.clone_of_volume, v.uuid,
        "the name resolves in the caller's project"
    );
    f.api
        .create_snapshot(own(pb::CreateSnapshotRequest {
            volume: format!("{OTHER}-vol"),
            name: format!("{OTHER}-snap"),
            ..Default::default()
        }))
        .await
        .unwrap();
    // In its own project a name is still unique.
    let again = f
        .api
        .create_volume(own(pb::CreateVolumeRequest {
            name: format!("{OTHER}-vol"),
            size_bytes: 1 << 20,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    // Each project's caller gets its own object by the shared name.
    let get = |role, project: &str| {
        request(
            role,
            pb::GetVolumeRequest {
                volume: format!("{OTHER}-vol"),
                project: project.into(),
            },
        )
    };
    let mine = f.api.get_volume(get(Role::Project, "")).await.unwrap();
    assert_eq!(mine.into_inner().uuid, v.uuid);
    let theirs = f.api.get_volume(get(Role::Frontend, OTHER)).await.unwrap();
    assert_eq!(theirs.into_inner().project, OTHER);
    // An admin naming no project must say which one (or use the UUID).
    let err = f.api.get_volume(get(Role::Admin, "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ambiguous"), "{err}");
    let by_uuid = f
        .api
        .get_volume(request(
            Role::Admin,
            pb::GetVolumeRequest {
                volume: v.uuid.clone(),
                project: String::new(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(by_uuid.into_inner().project, OWN);
}

#[tokio::test]
async fn progress_is_seen_only_by_calls_acting_in_the_operations_project() {
    use futures::StreamExt;
    use std::time::Duration;
    let f = fixture().await;
    let watch = |role, project: &str| {
        request(
            role,
            pb::WatchProgressRequest {
                request_id: "same-id".into(),
                project: project.into(),
            },
        )
    };
    let checksum = |role, project: &str, volume: String| {
        request(
            role,
            pb::ChecksumVolumeRequest {
                volume,
                request_id: "same-id".into(),
                project: project.into(),
                ..Default::default()
            },
        )
    };
    // OWN's tenant and an admin naming no project watch "same-id" before
    // anything runs.
    let mut own = f
        .api
        .watch_progress(watch(Role::Project, ""))
        .await
        .unwrap()
        .into_inner();
    let mut admin = f
        .api
        .watch_progress(watch(Role::Admin, ""))
        .await
        .unwrap()
        .into_inner();
    for s in [&mut own, &mut admin] {
        let first = s.next().await.unwrap().unwrap();
        assert!(!first.finished && first.phase.is_empty(), "{first:?}");
    }
    // OTHER's frontend runs an operation with the same id: neither watcher
    // hears of it (no progress, no existence).
    f.api
        .checksum_volume(checksum(Role::Frontend, OTHER, format!("{OTHER}-vol")))
        .await
        .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), own.next()).await;
    assert!(quiet.is_err(), "OWN saw OTHER's operation: {quiet:?}");
    let quiet = tokio::time::timeout(Duration::from_millis(300), admin.next()).await;
    assert!(
        quiet.is_err(),
        "a call naming no project saw OTHER's: {quiet:?}"
    );
    // OWN's own operation with that id (here by a frontend acting in OWN)
    // reaches OWN's watcher.
    f.api
        .checksum_volume(checksum(Role::Frontend, OWN, format!("{OWN}-vol")))
        .await
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let p = own.next().await.unwrap().unwrap();
            if p.finished {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert!(last.error.is_empty(), "{last:?}");
    assert_eq!(last.request_id, "same-id");
    // And an admin naming no project sees the operations of calls naming
    // none, e.g. its own.
    f.api
        .checksum_volume(checksum(Role::Admin, "", format!("{OTHER}-vol")))
        .await
        .unwrap();
    let p = tokio::time::timeout(Duration::from_secs(10), admin.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(p.phase == "checksum" || p.finished, "{p:?}");
}

/// `now` (delete without quarantine) is the storage admin's: any other
/// role is refused and nothing changes; an admin's destroys the data at
/// once, also of a volume already in quarantine (named by UUID).
#[tokio::test]
async fn only_an_admin_deletes_without_quarantine() {
    let f = fixture_quarantined().await;
    let delete_now = |role, volume: String| {
        request(
            role,
            pb::DeleteVolumeRequest {
                volume,
                now: true,
                project: if role == Role::Project { "" } else { OWN }.into(),
                request_id: String::new(),
            },
        )
    };
    for role in [Role::Project, Role::Frontend, Role::Agent] {
        let before = state(&f.svc);
        let s = f
            .api
            .delete_volume(delete_now(role, format!("{OWN}-free")))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{role}: {s:?}");
        assert!(s.message().contains("only admins"), "{s:?}");
        assert_eq!(
            state(&f.svc),
            before,
            "{role}'s refused delete changed something"
        );
    }
    let free = f.svc.store().find_volume(&format!("{OWN}-free")).unwrap();
    let path = f
        .svc
        .backend()
        .device_path(crate::backend::ObjectId::Volume(free.uuid));
    assert!(path.exists());
    let r = f
        .api
        .delete_volume(delete_now(Role::Admin, format!("{OWN}-free")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.purge_at, "", "deleted at once, not quarantined");
    assert!(!path.exists());
    assert!(f.svc.store().volume(free.uuid).unwrap().is_none());
    // A quarantined volume is purged at once by its UUID.
    let gone = f
        .svc
        .store()
        .find_quarantined_in(
            crate::store::NameScope::Project(OWN),
            &format!("{OWN}-gone"),
        )
        .unwrap();
    let path = f
        .svc
        .backend()
        .device_path(crate::backend::ObjectId::Volume(gone.uuid));
    assert!(path.exists(), "quarantine keeps the data");
    f.api
        .delete_volume(delete_now(Role::Admin, gone.uuid.to_string()))
        .await
        .unwrap();
    assert!(!path.exists());
    assert!(f.svc.store().volume(gone.uuid).unwrap().is_none());
}

/// Hostile restores: another project's quarantined volume, by name or by
/// UUID, is NotFound exactly like a missing one, and nothing changes; its
/// listing of the quarantine shows only its own project's.
#[tokio::test]
async fn a_tenant_cannot_see_or_restore_another_projects_quarantined_volume() {
    let f = fixture_quarantined().await;
    let other = f
        .svc
        .store()
        .find_quarantined_in(
            crate::store::NameScope::Project(OTHER),
            &format!("{OTHER}-gone"),
        )
        .unwrap();
    let restore = |volume: String, new_name: &str| {
        request(
            Role::Project,
            pb::RestoreVolumeRequest {
                volume,
                new_name: new_name.into(),
                project: String::new(),
            },
        )
    };
    let before = state(&f.svc);
    let missing = f
        .api
        .restore_volume(restore("nobody-gone".into(), ""))
        .await
        .unwrap_err();
    for (r, new_name) in [
        (format!("{OTHER}-gone"), ""),
        (other.uuid.to_string(), ""),
        (other.uuid.to_string(), "stolen"),
    ] {
        let s = f
            .api
            .restore_volume(restore(r.clone(), new_name))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::NotFound, "{r}: {s:?}");
        assert_eq!(
            s.message().replace(&r, "X"),
            missing.message().replace("nobody-gone", "X")
        );
        assert_eq!(state(&f.svc), before, "restore of {r} changed something");
    }
    // A bad new name is refused before anything is looked up.
    let s = f
        .api
        .restore_volume(restore(format!("{OWN}-gone"), "Bad Name"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(state(&f.svc), before);
    let listed = f
        .api
        .list_volumes(request(
            Role::Project,
            pb::ListVolumesRequest {
                quarantined: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .volumes;
    let names: Vec<_> = listed.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, [format!("{OWN}-gone")]);
    assert_eq!(listed[0].state, pb::VolumeState::Quarantined as i32);
    assert!(!listed[0].purge_at.is_empty());
    // Its own comes back.
    let v = f
        .api
        .restore_volume(restore(format!("{OWN}-gone"), ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v.name.as_str(), v.project.as_str()), ("astro-gone", OWN));
    assert_eq!(v.state, pb::VolumeState::Ready as i32);
}
