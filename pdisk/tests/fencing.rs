//! Export fencing with a real pdiskd, real tgt (or LIO in the lab) and real
//! agent certificates from stratus-pki: an agent exports only to the
//! initiator IQN its certificate binds (SAN URI `stratus://iqn/IQN`), a
//! volume is exported read-write to one host unless the request says
//! `multi_attach` and the volume allows it, one agent's unexport never
//! takes another host's access, and an export's CHAP is replaced only by
//! whoever set it. Needs root; run by scripts/test.

use stratus_pki::identity::Role;
use stratus_pki::TlsFiles;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;

type Client = VolumeServiceClient<Channel>;

async fn as_caller(s: &Stack, files: &TlsFiles) -> Client {
    VolumeServiceClient::new(channel_as(&s.pdiskd.url(), files).await)
}

fn export_req(vol: &str, iqn: &str, multi: bool, chap: Option<&str>) -> pb::ExportVolumeRequest {
    pb::ExportVolumeRequest {
        volume: vol.into(),
        initiators: vec![iqn.into()],
        multi_attach: multi,
        chap: chap.map(|secret| pb::ChapCredentials {
            user: "guest".into(),
            secret: secret.into(),
            target: None,
        }),
        ..Default::default()
    }
}

async fn export(c: &mut Client, r: pb::ExportVolumeRequest) -> Result<pb::Export, Code> {
    c.export_volume(r)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.code())
}

/// The stored ACL of `vol`'s export (empty when it has none).
async fn acl(c: &mut Client, vol: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .list_exports(pb::ListExportsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .exports
        .into_iter()
        .filter(|e| e.volume_name == vol)
        .flat_map(|e| e.initiators)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn agents_are_fenced_to_their_own_initiator_and_one_host_per_volume() {
    require_root();
    let s = Stack::start();
    let pki = TestPki::shared();
    let mut admin = s.pdiskd.client().await;
    // Host a: the shared test agent (bound to INITIATOR); host b: a second
    // agent bound to OTHER_INITIATOR; and an agent certificate with no IQN.
    let mut a = as_caller(&s, &pki.agent()).await;
    let mut b = as_caller(
        &s,
        &pki.issue(Role::Agent, "fence-b", Some(OTHER_INITIATOR), &[]),
    )
    .await;
    let mut unbound = as_caller(&s, &pki.issue(Role::Agent, "fence-c", None, &[])).await;
    for (name, multi) in [("solo", false), ("shared", true)] {
        admin
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes: 16 << 20,
                allow_multi_attach: multi,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // An agent exports only to its own initiator; nothing is made otherwise.
    assert_eq!(
        export(&mut a, export_req("solo", OTHER_INITIATOR, false, None))
            .await
            .err(),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        export(&mut unbound, export_req("solo", INITIATOR, false, None))
            .await
            .err(),
        Some(Code::PermissionDenied)
    );
    assert!(acl(&mut admin, "solo").await.is_empty());
    let e = export(&mut a, export_req("solo", INITIATOR, false, None))
        .await
        .unwrap();

    // A second host on a read-write volume: refused without multi_attach,
    // and with it on a volume that does not allow it; the ACL and the live
    // target keep only host a.
    for multi in [false, true] {
        assert_eq!(
            export(&mut b, export_req("solo", OTHER_INITIATOR, multi, None))
                .await
                .err(),
            Some(Code::FailedPrecondition),
            "multi_attach {multi}"
        );
    }
    assert_eq!(acl(&mut admin, "solo").await, [INITIATOR]);
    assert!(!s.exports.show().contains(OTHER_INITIATOR));
    s.initiator(&e.target_iqn, INITIATOR)
        .io(&["read 0 4k"])
        .unwrap();
    assert!(s
        .initiator(&e.target_iqn, OTHER_INITIATOR)
        .io(&["read 0 4k"])
        .is_err());

    // multi_attach on a volume that allows it: both hosts.
    let secret_a = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let shared = export(
        &mut a,
        export_req("shared", INITIATOR, false, Some(secret_a)),
    )
    .await
    .unwrap();
    assert_eq!(
        export(&mut b, export_req("shared", OTHER_INITIATOR, false, None))
            .await
            .err(),
        Some(Code::FailedPrecondition)
    );
    export(&mut b, export_req("shared", OTHER_INITIATOR, true, None))
        .await
        .unwrap();
    let mut both = vec![INITIATOR.to_string(), OTHER_INITIATOR.to_string()];
    both.sort();
    assert_eq!(acl(&mut admin, "shared").await, both);

    // Host b may not replace the CHAP account host a set.
    assert_eq!(
        export(
            &mut b,
            export_req(
                "shared",
                OTHER_INITIATOR,
                true,
                Some("ffffffffffffffffffffffffffffffff")
            )
        )
        .await
        .err(),
        Some(Code::PermissionDenied)
    );

    // Host b's unexport (of "the whole export", as an agent sends it)
    // removes only b; removing a's access is refused.
    let err = b
        .unexport_volume(pb::UnexportVolumeRequest {
            volume: "shared".into(),
            initiators: vec![INITIATOR.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let rest = b
        .unexport_volume(pb::UnexportVolumeRequest {
            volume: "shared".into(),
            initiators: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.remaining.unwrap().initiators, [INITIATOR]);
    assert_eq!(acl(&mut admin, "shared").await, [INITIATOR]);
    let live = s.exports.show();
    assert!(live.contains(&shared.target_iqn), "{live}");
    assert!(!live.contains(OTHER_INITIATOR), "{live}");
    // Host a still reads through its export, with its own CHAP.
    let secret_file = s.scratch().join("fencing-chap-a");
    std::fs::write(&secret_file, secret_a).unwrap();
    let mut a_login = s.initiator(&shared.target_iqn, INITIATOR);
    a_login.chap = Some(("guest".into(), secret_file));
    a_login.io(&["read 0 4k"]).unwrap();
}
