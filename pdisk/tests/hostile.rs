//! The hostile-input suite for pdiskd: well over 100 requests from an
//! authenticated but unprivileged caller (a `project/eve` certificate from
//! stratus-pki) — bad names, sizes, paths, IQNs, CHAP secrets, labels,
//! oversized and control-character fields, another project's objects,
//! admin-only RPCs. Each must be refused with its code, the pool (store
//! listing, exports, pool files, the live targets) must be the same before
//! and after, and pdiskd must still be the same process. Needs root; run
//! by scripts/test.

use stratus_pki::identity::Role;
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;

type Client = VolumeServiceClient<Channel>;

/// One hostile request: what it is, the codes that are a correct refusal.
struct Case {
    what: String,
    call: Call,
    want: &'static [Code],
}

enum Call {
    Create(pb::CreateVolumeRequest),
    Get(pb::GetVolumeRequest),
    Delete(pb::DeleteVolumeRequest),
    Resize(pb::ResizeVolumeRequest),
    Clone(pb::CloneVolumeRequest),
    Snapshot(pb::CreateSnapshotRequest),
    Export(pb::ExportVolumeRequest),
    Unexport(pb::UnexportVolumeRequest),
    Checksum(pb::ChecksumVolumeRequest),
    Restore(pb::RestoreVolumeRequest),
    Pool,
    Quota(pb::SetQuotaRequest),
}

async fn run(c: &mut Client, call: Call) -> Code {
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    match call {
        Call::Create(r) => code(c.create_volume(r).await.map(|_| ())),
        Call::Get(r) => code(c.get_volume(r).await.map(|_| ())),
        Call::Delete(r) => code(c.delete_volume(r).await.map(|_| ())),
        Call::Resize(r) => code(c.resize_volume(r).await.map(|_| ())),
        Call::Clone(r) => code(c.clone_volume(r).await.map(|_| ())),
        Call::Snapshot(r) => code(c.create_snapshot(r).await.map(|_| ())),
        Call::Export(r) => code(c.export_volume(r).await.map(|_| ())),
        Call::Unexport(r) => code(c.unexport_volume(r).await.map(|_| ())),
        Call::Checksum(r) => code(c.checksum_volume(r).await.map(|_| ())),
        Call::Restore(r) => code(c.restore_volume(r).await.map(|_| ())),
        Call::Pool => code(c.get_pool(pb::GetPoolRequest {}).await.map(|_| ())),
        Call::Quota(r) => code(c.set_quota(r).await.map(|_| ())),
    }
}

const INVALID: &[Code] = &[Code::InvalidArgument];
const NOT_FOUND: &[Code] = &[Code::NotFound];
const DENIED: &[Code] = &[Code::PermissionDenied];

/// The cases; `gone` is the UUID of astro's quarantined volume "victim-gone".
fn cases(gone: &str) -> Vec<Case> {
    let mut v = Vec::new();
    let mut add =
        |what: String, call: Call, want: &'static [Code]| v.push(Case { what, call, want });
    let bad_names = [
        "".to_string(),
        "A".into(),
        "Upper".into(),
        "-lead".into(),
        ".dot".into(),
        "_under".into(),
        "a/b".into(),
        "../etc".into(),
        "..".into(),
        "a b".into(),
        "a\tb".into(),
        "a\nb".into(),
        "a\0b".into(),
        "é".into(),
        "vol\u{202e}gpj".into(),
        "💾".into(),
        "a".repeat(64),
        "a".repeat(4096),
        "a,b".into(),
        "a;rm -rf /".into(),
        "$(reboot)".into(),
        "`id`".into(),
        "a=b".into(),
        "a:b".into(),
        "a@b".into(),
    ];
    for n in &bad_names {
        add(
            format!("create named {n:?}"),
            Call::Create(pb::CreateVolumeRequest {
                name: n.clone(),
                size_bytes: 1 << 20,
                ..Default::default()
            }),
            INVALID,
        );
    }
    for (what, size) in [
        ("size 0", 0u64),
        ("size u64::MAX", u64::MAX),
        ("size 2^63", 1 << 63),
        ("size 2^62", 1 << 62),
    ] {
        add(
            format!("create with {what}"),
            Call::Create(pb::CreateVolumeRequest {
                name: "eve-size".into(),
                size_bytes: size,
                ..Default::default()
            }),
            &[Code::InvalidArgument, Code::ResourceExhausted],
        );
    }
    let reserved = [
        "stratus.io/image-sha256",
        "stratus.io/vm",
        "stratus.io/anything",
    ];
    for k in reserved {
        add(
            format!("create with reserved label {k}"),
            Call::Create(pb::CreateVolumeRequest {
                name: "eve-label".into(),
                size_bytes: 1 << 20,
                labels: [(k.to_string(), "x".to_string())].into(),
                ..Default::default()
            }),
            DENIED,
        );
    }
    let bad_labels: Vec<(String, String)> = vec![
        ("".into(), "v".into()),
        ("k".repeat(64), "v".into()),
        ("a b".into(), "v".into()),
        ("k\n".into(), "v".into()),
        ("é".into(), "v".into()),
        ("k".into(), "v".repeat(256)),
        ("k".into(), "line\nbreak".into()),
        ("k".into(), "bell\u{7}".into()),
        ("k".into(), "nul\0".into()),
    ];
    for (k, val) in bad_labels {
        add(
            format!("create with label {k:?}={val:?}"),
            Call::Create(pb::CreateVolumeRequest {
                name: "eve-label".into(),
                size_bytes: 1 << 20,
                labels: [(k, val)].into(),
                ..Default::default()
            }),
            INVALID,
        );
    }
    add(
        "create with 33 labels".into(),
        Call::Create(pb::CreateVolumeRequest {
            name: "eve-labels".into(),
            size_bytes: 1 << 20,
            labels: (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
            ..Default::default()
        }),
        INVALID,
    );
    for path in [
        "/etc/shadow",
        "/proc/self/environ",
        "/dev/sda",
        "relative.raw",
        "../../etc/passwd",
        "",
        "/srv/pdisk/import/../../../etc/shadow",
    ] {
        add(
            format!("import from {path:?}"),
            Call::Create(pb::CreateVolumeRequest {
                name: "eve-import".into(),
                source: Some(pb::create_volume_request::Source::FromImage(
                    pb::ImageSource {
                        path: path.into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            &[
                Code::InvalidArgument,
                Code::PermissionDenied,
                Code::NotFound,
            ],
        );
    }
    // Another project's volume (astro's "victim"), by name and by UUID-like
    // refs: NotFound for every verb, as if it did not exist.
    for r in [
        "victim",
        "victim-snap",
        "00000000-0000-0000-0000-000000000000",
    ] {
        add(
            format!("get {r}"),
            Call::Get(pb::GetVolumeRequest {
                volume: r.into(),
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("delete {r}"),
            Call::Delete(pb::DeleteVolumeRequest {
                volume: r.into(),
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("resize {r}"),
            Call::Resize(pb::ResizeVolumeRequest {
                volume: r.into(),
                size_bytes: 1 << 30,
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("clone {r}"),
            Call::Clone(pb::CloneVolumeRequest {
                source: r.into(),
                name: "eve-clone".into(),
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("snapshot {r}"),
            Call::Snapshot(pb::CreateSnapshotRequest {
                volume: r.into(),
                name: "eve-snap".into(),
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("export {r}"),
            Call::Export(pb::ExportVolumeRequest {
                volume: r.into(),
                initiators: vec!["iqn.2026-11.org.evil:thief".into()],
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("unexport {r}"),
            Call::Unexport(pb::UnexportVolumeRequest {
                volume: r.into(),
                ..Default::default()
            }),
            NOT_FOUND,
        );
        add(
            format!("checksum {r}"),
            Call::Checksum(pb::ChecksumVolumeRequest {
                volume: r.into(),
                ..Default::default()
            }),
            NOT_FOUND,
        );
    }
    // Another project's quarantined volume: NotFound by its name or UUID,
    // under its name or a new one; a restore of a live volume or of nothing
    // likewise. Skipping quarantine is the admin's alone.
    for r in [
        "victim-gone",
        gone,
        "victim",
        "00000000-0000-0000-0000-000000000000",
    ] {
        for new_name in ["", "eve-stolen"] {
            add(
                format!("restore {r} as {new_name:?}"),
                Call::Restore(pb::RestoreVolumeRequest {
                    volume: r.into(),
                    new_name: new_name.into(),
                    ..Default::default()
                }),
                NOT_FOUND,
            );
        }
    }
    for bad in ["../etc", "Upper", "a\nb"] {
        add(
            format!("restore as {bad:?}"),
            Call::Restore(pb::RestoreVolumeRequest {
                volume: gone.into(),
                new_name: bad.into(),
                ..Default::default()
            }),
            INVALID,
        );
    }
    for r in ["victim", gone] {
        add(
            format!("delete {r} now"),
            Call::Delete(pb::DeleteVolumeRequest {
                volume: r.into(),
                now: true,
                ..Default::default()
            }),
            DENIED,
        );
    }
    // Acting in another project is refused outright.
    add(
        "create in project astro".into(),
        Call::Create(pb::CreateVolumeRequest {
            name: "eve-in-astro".into(),
            size_bytes: 1 << 20,
            project: "astro".into(),
            ..Default::default()
        }),
        DENIED,
    );
    add(
        "get victim in project astro".into(),
        Call::Get(pb::GetVolumeRequest {
            volume: "victim".into(),
            project: "astro".into(),
        }),
        DENIED,
    );
    for p in ["ASTRO", "a/b", "a\nb", "x".repeat(300).as_str()] {
        add(
            format!("create in project {p:?}"),
            Call::Create(pb::CreateVolumeRequest {
                name: "eve-p".into(),
                size_bytes: 1 << 20,
                project: p.into(),
                ..Default::default()
            }),
            &[Code::InvalidArgument, Code::PermissionDenied],
        );
    }
    // Bad initiators and CHAP secrets: refused at the edge.
    for iqn in [
        "",
        "not-an-iqn",
        "iqn.",
        "iqn.2026-11",
        "iqn.2026-11.org.x:a b",
        "iqn.2026-11.org.x:a\nb",
        "eui.123",
        "naa.60014050000000000000000000000000",
        &format!("iqn.2026-11.org.x:{}", "a".repeat(300)),
        "iqn.2026-11.org.x:a,b",
    ] {
        add(
            format!("export to {iqn:?}"),
            Call::Export(pb::ExportVolumeRequest {
                volume: "victim".into(),
                initiators: vec![iqn.to_string()],
                ..Default::default()
            }),
            INVALID,
        );
    }
    for (user, secret) in [
        ("u", "short"),
        ("u", &*"x".repeat(65)),
        ("u", "has space in it"),
        ("u", "comma,secret00"),
        ("u", "equals=secret0"),
        ("", "0123456789abcdef"),
        ("bad user", "0123456789abcdef"),
        ("u", "tab\tsecret0000"),
    ] {
        add(
            format!("export with CHAP {user:?}"),
            Call::Export(pb::ExportVolumeRequest {
                volume: "victim".into(),
                initiators: vec!["iqn.2026-11.org.evil:thief".into()],
                chap: Some(pb::ChapCredentials {
                    user: user.into(),
                    secret: secret.into(),
                    target: None,
                }),
                ..Default::default()
            }),
            INVALID,
        );
    }
    add("get the pool".into(), Call::Pool, DENIED);
    add(
        "set its own quota".into(),
        Call::Quota(pb::SetQuotaRequest {
            project: "eve".into(),
            ..Default::default()
        }),
        DENIED,
    );
    add(
        "set astro's quota".into(),
        Call::Quota(pb::SetQuotaRequest {
            project: "astro".into(),
            ..Default::default()
        }),
        DENIED,
    );
    v
}

/// What must not change: stored volumes and exports (seen by the admin),
/// pool files, and the exporter's live targets.
async fn state(s: &Stack, admin: &mut Client) -> (Vec<String>, Vec<String>, Vec<String>, String) {
    let mut vols = Vec::new();
    for quarantined in [false, true] {
        vols.extend(
            admin
                .list_volumes(pb::ListVolumesRequest {
                    quarantined,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .volumes
                .into_iter()
                .map(|v| {
                    format!(
                        "{} {} {} {:?} {}",
                        v.uuid, v.name, v.size_bytes, v.labels, v.state
                    )
                }),
        );
    }
    vols.sort();
    let mut exports: Vec<String> = admin
        .list_exports(pb::ListExportsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .exports
        .into_iter()
        .map(|e| format!("{} {:?}", e.target_iqn, e.initiators))
        .collect();
    exports.sort();
    (vols, exports, s.backing_objects(), s.exports.show())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and a storage stack (loop + tgtd, or the lab VM): run by scripts/test"]
async fn an_unprivileged_caller_gets_only_refusals_and_changes_nothing() {
    require_root();
    let s = Stack::start_with(&["--quarantine-period", "1h"]);
    let pki = TestPki::shared();
    let mut admin = s.pdiskd.client().await;
    admin
        .create_volume(pb::CreateVolumeRequest {
            name: "victim-gone".into(),
            size_bytes: 16 << 20,
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let gone = admin
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .into_iter()
        .find(|v| v.name == "victim-gone")
        .unwrap()
        .uuid;
    let r = admin
        .delete_volume(pb::DeleteVolumeRequest {
            volume: "victim-gone".into(),
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.purge_at.is_empty(), "victim-gone is in quarantine");
    admin
        .create_volume(pb::CreateVolumeRequest {
            name: "victim".into(),
            size_bytes: 16 << 20,
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: "victim".into(),
            name: "victim-snap".into(),
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .export_volume(pb::ExportVolumeRequest {
            volume: "victim".into(),
            initiators: vec![INITIATOR.into()],
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let eve = pki.issue(Role::Project, "eve", None, &[]);
    let mut c = VolumeServiceClient::new(channel_as(&s.pdiskd.url(), &eve).await);
    let pid = s.pdiskd.pid();
    let before = state(&s, &mut admin).await;

    let cases = cases(&gone);
    assert!(cases.len() >= 100, "only {} cases", cases.len());
    let mut wrong = Vec::new();
    let n = cases.len();
    for case in cases {
        let got = run(&mut c, case.call).await;
        if !case.want.contains(&got) {
            wrong.push(format!("{}: got {got:?}, want {:?}", case.what, case.want));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    let after = state(&s, &mut admin).await;
    assert_eq!(before.0, after.0, "volumes changed");
    assert_eq!(before.1, after.1, "exports changed");
    assert_eq!(before.2, after.2, "pool files changed");
    assert_eq!(before.3, after.3, "live targets changed");
    assert_eq!(s.pdiskd.pid(), pid, "pdiskd restarted");
    // Still serving.
    assert_eq!(run(&mut c, Call::Pool).await, Code::PermissionDenied);
}
