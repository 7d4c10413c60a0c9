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

/// Deletes, snapshot deletes, exports, unexports and resizes retried with
/// their request id get the first answer without running again (the retry
/// of an answered delete is not NotFound, the retry of an export after its
/// unexport does not export again); the id with other arguments is
/// InvalidArgument and changes nothing.
#[tokio::test]
async fn deletes_exports_unexports_and_resizes_retried_with_their_request_id_run_once() {
    let f = fixture().await;
    let api = &f.api;
    let del = |volume: &str, id: &str| pb::DeleteVolumeRequest {
        volume: volume.into(),
        request_id: id.into(),
        ..Default::default()
    };
    api.delete_volume(request(Role::Admin, del("astro-free", "d-1")))
        .await
        .unwrap();
    api.delete_volume(request(Role::Admin, del("astro-free", "d-1")))
        .await
        .expect("the retry of an answered delete");
    let again = api.delete_volume(request(Role::Admin, del("astro-free", "")));
    assert_eq!(again.await.unwrap_err().code(), Code::NotFound);
    let other = api.delete_volume(request(Role::Admin, del("bio-free", "d-1")));
    assert_eq!(other.await.unwrap_err().code(), Code::InvalidArgument);
    assert!(
        f.svc.store().find_volume("bio-free").is_ok(),
        "bio-free deleted"
    );

    let dsnap = |id: &str| pb::DeleteSnapshotRequest {
        snapshot: "astro-snap".into(),
        request_id: id.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        api.delete_snapshot(request(Role::Admin, dsnap("ds-1")))
            .await
            .expect("a snapshot delete and its retry");
    }
    let again = api.delete_snapshot(request(Role::Admin, dsnap("")));
    assert_eq!(again.await.unwrap_err().code(), Code::NotFound);

    const HOST2: &str = "iqn.2026-11.io.stratus:host2";
    let export = |id: &str| pb::ExportVolumeRequest {
        volume: "astro-vol".into(),
        initiators: vec![HOST2.into()],
        request_id: id.into(),
        ..Default::default()
    };
    let unexport = |id: &str| pb::UnexportVolumeRequest {
        volume: "astro-vol".into(),
        request_id: id.into(),
        ..Default::default()
    };
    let e1 = api
        .export_volume(request(Role::Admin, export("e-1")))
        .await
        .unwrap()
        .into_inner();
    let e2 = api
        .export_volume(request(Role::Admin, export("e-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e1, e2);
    let exports = || f.svc.store().exports().unwrap().len();
    let exported = exports();
    for _ in 0..2 {
        let u = api
            .unexport_volume(request(Role::Admin, unexport("u-1")))
            .await
            .expect("an unexport and its retry");
        assert_eq!(u.into_inner().remaining, None);
    }
    assert_eq!(exports(), exported - 1);
    // The export's retry answers as before and grants nothing again.
    let late = api
        .export_volume(request(Role::Admin, export("e-1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late, e1);
    assert_eq!(exports(), exported - 1, "a retry exported again");
    let mut other = export("e-1");
    other.initiators = vec![IQN2_OTHER.into()];
    let refused = api.export_volume(request(Role::Admin, other)).await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(exports(), exported - 1);

    let resize = |size: u64, id: &str| pb::ResizeVolumeRequest {
        volume: "astro-vol".into(),
        size_bytes: size,
        request_id: id.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        let v = api
            .resize_volume(request(Role::Admin, resize(8 << 20, "r-1")))
            .await
            .unwrap();
        assert_eq!(v.into_inner().size_bytes, 8 << 20);
    }
    let refused = api.resize_volume(request(Role::Admin, resize(16 << 20, "r-1")));
    assert_eq!(refused.await.unwrap_err().code(), Code::InvalidArgument);
    let size = f.svc.store().find_volume("astro-vol").unwrap().size.0;
    assert_eq!(size, 8 << 20, "a refused retry resized");
}

const IQN2_OTHER: &str = "iqn.2026-11.io.stratus:host3";

/// The retry of a delete a restart interrupted (kept as begun, with the
/// volume it resolved, and no outcome), once the volume is gone (the
/// interrupted delete finished), answers as the delete would have, not
/// NotFound; a volume still there is deleted by the retry.
#[tokio::test]
async fn the_retry_of_a_delete_a_restart_interrupted_answers_from_what_it_finds() {
    use stratus_core::requests::{fingerprint, DurableOutcomes, StoredRequest};

    let f = fixture().await;
    let scope = format!("{}|", stratus_pki::Identity::new(Role::Admin, "x"));
    let interrupted = |volume: &str, id: &str| {
        let asked = pb::DeleteVolumeRequest {
            volume: volume.into(),
            ..Default::default()
        };
        let uuid = f.svc.store().find_volume(volume).unwrap().uuid;
        let row = StoredRequest {
            rpc: "DeleteVolume".into(),
            fingerprint: fingerprint(&prost::Message::encode_to_vec(&asked)),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            target: uuid.to_string(),
            outcome: None,
        };
        f.svc.shared_store().put(&scope, id, &row).unwrap();
        pb::DeleteVolumeRequest {
            request_id: id.into(),
            ..asked
        }
    };
    // astro-free's delete went through before the crash.
    let retry = interrupted("astro-free", "d-crash-1");
    f.svc.delete_volume("astro-free").await.unwrap();
    let answer = f.api.delete_volume(request(Role::Admin, retry)).await;
    assert_eq!(answer.unwrap().into_inner().purge_at, "");
    // bio-free's did not: the retry deletes it.
    let retry = interrupted("bio-free", "d-crash-2");
    f.api
        .delete_volume(request(Role::Admin, retry))
        .await
        .unwrap();
    assert!(f.svc.store().find_volume("bio-free").is_err());
}

/// 50 clients × 200 mixed operations (create, delete, snapshot, delete
/// snapshot, clone, resize, export to one of two hosts, unexport, checksum)
/// on ten overlapping volume names and ten snapshot names, through the gRPC
/// handlers, each operation under a 60 s watchdog: only the documented
/// refusals, and at the end the store equals the backend (every record's
/// data and nothing else, `staging/` empty) and the exporter (each stored
/// export's target with its ACL, nothing else), every volume `ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_times_two_hundred_operations_end_with_store_backend_and_exporter_equal() {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::backend::ObjectId;
    use crate::store::VolumeState;

    const CLIENTS: usize = 50;
    const OPS: usize = 200;
    const NAMES: usize = 10;
    const HOSTS: [&str; 2] = [
        "iqn.2026-11.io.stratus:host1",
        "iqn.2026-11.io.stratus:host2",
    ];
    let f = fixture().await;
    let api = Arc::new(f.api);
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let api = api.clone();
        clients.push(tokio::spawn(async move {
            let mut seed = c as u64 * 7919 + 1;
            let mut next = move |n: usize| {
                // xorshift: a fixed sequence per client, no dependency.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            let mut counts = [0u32; 10];
            for i in 0..OPS {
                let (g, h) = (next(NAMES), next(NAMES));
                let (vol, other, snap) = (format!("v{g}"), format!("v{h}"), format!("s{h}"));
                let op = next(10);
                let what = format!("client {c} op {i}: {op} on {vol}/{other}/{snap}");
                let call = async {
                    match op {
                        0 | 1 => api
                            .create_volume(request(
                                Role::Admin,
                                pb::CreateVolumeRequest {
                                    name: vol.clone(),
                                    size_bytes: 4 << 20,
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        2 => api
                            .delete_volume(request(
                                Role::Admin,
                                pb::DeleteVolumeRequest {
                                    volume: vol.clone(),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        3 => api
                            .create_snapshot(request(
                                Role::Admin,
                                pb::CreateSnapshotRequest {
                                    volume: vol.clone(),
                                    name: snap.clone(),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        4 => api
                            .delete_snapshot(request(
                                Role::Admin,
                                pb::DeleteSnapshotRequest {
                                    snapshot: snap.clone(),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        5 => {
                            let from_snapshot = next(2) == 0;
                            api.clone_volume(request(
                                Role::Admin,
                                pb::CloneVolumeRequest {
                                    source: if from_snapshot {
                                        snap.clone()
                                    } else {
                                        other.clone()
                                    },
                                    source_is_snapshot: from_snapshot,
                                    name: vol.clone(),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop)
                        }
                        6 => api
                            .resize_volume(request(
                                Role::Admin,
                                pb::ResizeVolumeRequest {
                                    volume: vol.clone(),
                                    size_bytes: (4 + next(4) as u64) << 20,
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        7 => api
                            .export_volume(request(
                                Role::Admin,
                                pb::ExportVolumeRequest {
                                    volume: vol.clone(),
                                    initiators: vec![HOSTS[next(2)].into()],
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        8 => api
                            .unexport_volume(request(
                                Role::Admin,
                                pb::UnexportVolumeRequest {
                                    volume: vol.clone(),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                        _ => api
                            .checksum_volume(request(
                                Role::Admin,
                                pb::ChecksumVolumeRequest {
                                    volume: vol.clone(),
                                    ..Default::default()
                                },
                            ))
                            .await
                            .map(drop),
                    }
                };
                match tokio::time::timeout(Duration::from_secs(60), call).await {
                    Err(_) => panic!("{what}: took over 60 s (deadlock?)"),
                    Ok(Ok(())) => counts[op] += 1,
                    Ok(Err(s)) => assert!(
                        matches!(
                            s.code(),
                            Code::NotFound
                                | Code::AlreadyExists
                                | Code::FailedPrecondition
                                | Code::ResourceExhausted
                        ) || (op == 6 && s.code() == Code::InvalidArgument),
                        "{what}: {s:?}"
                    ),
                }
            }
            counts
        }));
    }
    let mut succeeded = [0u32; 10];
    for c in clients {
        for (op, n) in c.await.unwrap().iter().enumerate() {
            succeeded[op] += n;
        }
    }
    // Each kind of operation succeeded sometimes: the mix really mixed.
    assert!(succeeded.iter().all(|&n| n > 0), "{succeeded:?}");

    let svc = &f.svc;
    let volumes = svc.store().volumes().unwrap();
    let snapshots = svc.store().snapshots().unwrap();
    for v in &volumes {
        assert_eq!(v.state, VolumeState::Ready, "{} {:?}", v.name, v.state);
    }
    for s in &snapshots {
        assert!(s.complete, "snapshot {} incomplete", s.name);
    }
    // Store == backend.
    let recorded: BTreeSet<ObjectId> = volumes
        .iter()
        .map(|v| ObjectId::Volume(v.uuid))
        .chain(snapshots.iter().map(|s| ObjectId::Snapshot(s.uuid)))
        .collect();
    let listing = svc.backend().list().await.unwrap();
    let held: BTreeSet<ObjectId> = listing.objects.into_iter().collect();
    assert_eq!(held, recorded, "pool objects differ from the records");
    assert!(listing.foreign.is_empty(), "{:?}", listing.foreign);
    let staging = f._dir.path().join("pool").join("staging");
    if staging.exists() {
        let left: Vec<_> = std::fs::read_dir(&staging).unwrap().flatten().collect();
        assert!(left.is_empty(), "staging/ holds {left:?}");
    }
    // Store == exporter.
    let stored: BTreeSet<(String, Vec<String>)> = svc
        .store()
        .exports()
        .unwrap()
        .into_iter()
        .map(|e| {
            assert!(!e.unexporting, "{} left unexporting", e.target_iqn);
            let mut i: Vec<String> = e.initiators.iter().map(|i| i.to_string()).collect();
            i.sort();
            (e.target_iqn.to_string(), i)
        })
        .collect();
    let live: BTreeSet<(String, Vec<String>)> = svc
        .exporter()
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|l| {
            let mut i = l.initiators;
            i.sort();
            (l.target_iqn, i)
        })
        .collect();
    assert_eq!(live, stored, "live targets differ from the stored exports");
    // Every stored export names a volume that exists.
    let uuids: BTreeSet<_> = volumes.iter().map(|v| v.uuid).collect();
    for e in svc.store().exports().unwrap() {
        assert!(uuids.contains(&e.volume), "export of a deleted volume");
    }
}
