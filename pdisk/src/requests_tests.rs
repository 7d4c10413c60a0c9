//! Retries by `request_id` get the first attempt's result: creates,
//! clones and snapshots through the gRPC handlers, each made once.

use stratus_pki::Role;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
use tonic::Code;

use super::tests::{fixture, request};

#[tokio::test]
async fn creates_clones_and_snapshots_retried_with_their_request_id_are_made_once() {
    let f = fixture().await;
    let create = |request_id: &str| pb::CreateVolumeRequest {
        name: "retried".into(),
        size_bytes: 4 << 20,
        request_id: request_id.into(),
        ..Default::default()
    };
    // Concurrent attempts and a late one: one volume, the same answer.
    let (a, b) = tokio::join!(
        f.api.create_volume(request(Role::Admin, create("c-1"))),
        f.api.create_volume(request(Role::Admin, create("c-1"))),
    );
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(a.uuid, b.uuid);
    let late = f
        .api
        .create_volume(request(Role::Admin, create("c-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.uuid, a.uuid);
    // Without the id the same request is a duplicate; with the id and
    // other arguments it is refused.
    let dup = f.api.create_volume(request(Role::Admin, create(""))).await;
    assert_eq!(dup.unwrap_err().code(), Code::AlreadyExists);
    let mut other = create("c-1");
    other.size_bytes = 8 << 20;
    let other = f.api.create_volume(request(Role::Admin, other)).await;
    assert_eq!(other.unwrap_err().code(), Code::InvalidArgument);

    let clone = || pb::CloneVolumeRequest {
        source: "retried".into(),
        name: "retried-clone".into(),
        request_id: "k-1".into(),
        ..Default::default()
    };
    let c1 = f
        .api
        .clone_volume(request(Role::Admin, clone()))
        .await
        .unwrap();
    let c2 = f
        .api
        .clone_volume(request(Role::Admin, clone()))
        .await
        .unwrap();
    assert_eq!(c1.into_inner().uuid, c2.into_inner().uuid);

    let snap = || pb::CreateSnapshotRequest {
        volume: "retried".into(),
        name: "retried-s".into(),
        request_id: "s-1".into(),
        ..Default::default()
    };
    let s1 = f
        .api
        .create_snapshot(request(Role::Admin, snap()))
        .await
        .unwrap();
    let s2 = f
        .api
        .create_snapshot(request(Role::Admin, snap()))
        .await
        .unwrap();
    assert_eq!(s1.into_inner().uuid, s2.into_inner().uuid);
    assert_eq!(f.svc.list_snapshots("retried").await.unwrap().len(), 1);

    // A failure is the answer too: the retry of a refused create is refused
    // the same way, even once the cause is gone.
    let taken = || pb::CreateVolumeRequest {
        name: "retried".into(),
        size_bytes: 4 << 20,
        request_id: "c-2".into(),
        ..Default::default()
    };
    let first = f.api.create_volume(request(Role::Admin, taken())).await;
    assert_eq!(first.unwrap_err().code(), Code::AlreadyExists);
    let vols = f.svc.list_volumes(&Default::default()).await.unwrap();
    assert_eq!(
        vols.iter()
            .filter(|v| v.record.name.as_str().starts_with("retried"))
            .count(),
        2
    );
    // The same request id in another project is another request: it runs
    // and makes that project's own volume.
    let in_other = f
        .api
        .create_volume(request(
            Role::Admin,
            pb::CreateVolumeRequest {
                project: "bio".into(),
                ..create("c-1")
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(in_other.uuid, a.uuid);
    assert_eq!(in_other.project, "bio");
}
