//! Unit tests of the pool service: file backend in a temp dir (sparse-copy
//! or reflink, whatever the temp filesystem offers), the in-memory exporter,
//! and a fake runner. No root, no devices.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::file::FileBackend;
use crate::error::ErrorKind;
use crate::export::MemoryExporter;
use crate::runner::FakeRunner;
use crate::store::Source;
use crate::types::Chap;

struct Fixture {
    _dir: tempfile::TempDir,
    svc: Arc<PoolService>,
    exporter: Arc<MemoryExporter>,
    import: PathBuf,
}

fn fixture() -> Fixture {
    fixture_with(Duration::ZERO)
}

/// [`fixture`] whose deletes go to quarantine for `quarantine_period`.
fn fixture_with(quarantine_period: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let runner = Arc::new(FakeRunner::new());
    let backend = Arc::new(FileBackend::open(&dir.path().join("pool"), runner.clone()).unwrap());
    let exporter = Arc::new(MemoryExporter::default());
    let store = Store::open(&dir.path().join("data")).unwrap();
    let import = dir.path().join("import");
    std::fs::create_dir_all(&import).unwrap();
    let svc = Arc::new(PoolService::new(
        store,
        backend,
        exporter.clone(),
        runner,
        ServiceSettings {
            max_overcommit: 20.0,
            import_dirs: vec![import.clone()],
            quarantine_period,
            host_id: Some(STORAGE_HOST.into()),
        },
    ));
    Fixture {
        _dir: dir,
        svc,
        exporter,
        import,
    }
}

/// A name for a request, parsed as the gRPC edge does.
fn name(s: impl AsRef<str>) -> VolumeName {
    s.as_ref().parse().unwrap()
}

fn empty(volume: &str, size: u64) -> NewVolume {
    NewVolume {
        allow_multi_attach: false,
        name: name(volume),
        size,
        labels: Labels::new(),
        source: NewVolumeSource::Empty,
        request_id: String::new(),
        owner: Default::default(),
    }
}

const IQN: &str = "iqn.2026-11.io.stratus:host1";
/// The fixture's storage host id (pdiskd --host-id).
const STORAGE_HOST: &str = "storage-1";

/// A request as the host's admin sends it over the local socket.
fn as_admin<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(stratus_pki::Caller::admin(
        stratus_pki::Transport::Local,
        "root",
    ));
    req
}

/// An initiator name, parsed as the gRPC edge parses it.
fn iqn(s: &str) -> Iqn {
    s.parse().unwrap()
}

#[tokio::test]
async fn bad_input_gets_invalid_argument_and_changes_nothing() {
    let f = fixture();
    // Names are parsed at the gRPC edge, before the service sees them.
    let api = crate::grpc::Api::new(f.svc.clone());
    for bad in ["Bad Name", "../escape"] {
        use stratus_proto::pdisk::v1 as pb;
        use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
        let create = pb::CreateVolumeRequest {
            name: bad.into(),
            size_bytes: 1 << 20,
            ..Default::default()
        };
        let s = api.create_volume(as_admin(create)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{bad:?}: {s:?}");
    }
    let cases = [
        empty("ok", 0),
        NewVolume {
            allow_multi_attach: false,
            labels: [("bad key".to_string(), "v".to_string())].into(),
            ..empty("ok", 1 << 20)
        },
        NewVolume {
            allow_multi_attach: false,
            source: NewVolumeSource::ImageFile {
                path: "/etc/passwd".into(),
                format: None,
            },
            ..empty("ok", 0)
        },
        NewVolume {
            allow_multi_attach: false,
            source: NewVolumeSource::ImageFile {
                path: f.import.join("../data/pdisk.redb"),
                format: None,
            },
            ..empty("ok", 0)
        },
    ];
    for c in cases {
        let e = f.svc.create_volume(c.clone()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{c:?}: {e}");
    }
    assert!(f.svc.list_volumes(&Labels::new()).await.unwrap().is_empty());
    assert!(f.svc.backend().list().await.unwrap().objects.is_empty());
    // Initiators are parsed at the gRPC edge too.
    {
        use stratus_proto::pdisk::v1 as pb;
        use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
        let export = pb::ExportVolumeRequest {
            multi_attach: false,
            volume: "nope".into(),
            initiators: vec!["not-an-iqn".into()],
            ..Default::default()
        };
        let s = api.export_volume(as_admin(export)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        // A CHAP secret tgt and LIO would refuse (under 12 characters).
        let export = pb::ExportVolumeRequest {
            host_id: String::new(),
            multi_attach: false,
            project: String::new(),
            migration: false,
            volume: "nope".into(),
            initiators: vec![IQN.into()],
            chap: Some(pb::ChapCredentials {
                user: "u".into(),
                secret: "short".into(),
                target: None,
            }),
            request_id: String::new(),
        };
        let s = api.export_volume(as_admin(export)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(!s.message().contains("short"), "{s:?}");
        let unexport = pb::UnexportVolumeRequest {
            project: String::new(),
            volume: "nope".into(),
            initiators: vec!["not-an-iqn".into()],
            request_id: String::new(),
        };
        let s = api.unexport_volume(as_admin(unexport)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    }
}

#[tokio::test]
async fn names_uuids_and_duplicates() {
    let f = fixture();
    let v = f.svc.create_volume(empty("db", 1 << 30)).await.unwrap();
    assert_eq!(v.record.size.0, 1 << 30);
    let by_uuid = f.svc.get_volume(&v.record.uuid.to_string()).await.unwrap();
    assert_eq!(by_uuid.record.name.as_str(), "db");
    let e = f.svc.create_volume(empty("db", 1 << 20)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let e = f.svc.delete_volume("missing").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    // Sizes round up to 1 MiB.
    let v = f.svc.create_volume(empty("odd", 1_000_001)).await.unwrap();
    assert_eq!(v.record.size.0, 1 << 20);
}

#[tokio::test]
async fn exported_or_snapshotted_volumes_cannot_be_deleted() {
    let f = fixture();
    f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    f.svc.create_snapshot("v", name("v-s1"), "").await.unwrap();
    let e = f.svc.delete_volume("v").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.message().contains("v-s1"), "{e}");
    f.svc.delete_snapshot("v-s1").await.unwrap();

    f.svc
        .export_volume("v", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap();
    let e = f.svc.delete_volume("v").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.message().contains("exported"), "{e}");
    f.svc.unexport_volume("v", &[]).await.unwrap();
    f.svc.delete_volume("v").await.unwrap();
    assert!(f.exporter.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_migration_adds_one_second_host_until_either_is_unexported() {
    let f = fixture();
    f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    let (src, dst, third) = (
        "iqn.2026-11.io.stratus:src",
        "iqn.2026-11.io.stratus:dst",
        "iqn.2026-11.io.stratus:third",
    );
    let agent = |name: &str| ExportBy {
        caller: format!("agent/{name}"),
        admin: false,
        multi_attach: false,
        migration: false,
        host_id: None,
    };
    let chap = |s: &str| Some(Chap::new("u", s).unwrap());
    let stored = |f: &Fixture| {
        let vol = f.svc.store.find_volume("v").unwrap();
        f.svc.store.export(vol.uuid).unwrap().unwrap()
    };
    f.svc
        .export_volume("v", &[iqn(src)], chap("source-secret-0001"), &agent("src"))
        .await
        .unwrap();
    // Without the migration flag the volume stays single-host.
    let e = f
        .svc
        .export_volume("v", &[iqn(dst)], None, &agent("dst").multi_attach())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    // The flag without multi_attach, or for two initiators, is bad input.
    let mut no_multi = agent("dst");
    no_multi.migration = true;
    let e = f
        .svc
        .export_volume("v", &[iqn(dst)], None, &no_multi)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(stored(&f).initiators, vec![iqn(src)]);

    // Failed migration: the destination joins with its own account, then
    // leaves; the source's account comes back and fencing is single-host.
    f.svc
        .export_volume(
            "v",
            &[iqn(dst)],
            chap("dest-secret-00001"),
            &agent("dst").migration(),
        )
        .await
        .unwrap();
    let rec = stored(&f);
    assert_eq!(rec.initiators, vec![iqn(src), iqn(dst)]);
    assert_eq!(rec.chap.as_ref().unwrap().secret(), "dest-secret-00001");
    assert_eq!(f.exporter.list().await.unwrap()[0].initiators.len(), 2);
    // No third host while the migration lasts, migration or not.
    let e = f
        .svc
        .export_volume("v", &[iqn(third)], None, &agent("third").migration())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    f.svc.unexport_volume("v", &[iqn(dst)]).await.unwrap();
    let rec = stored(&f);
    assert_eq!(rec.initiators, vec![iqn(src)]);
    assert_eq!(rec.chap.as_ref().unwrap().secret(), "source-secret-0001");
    assert_eq!(rec.chap_set_by.as_deref(), Some("agent/src"));
    assert!(rec.migration.is_none());
    assert_eq!(f.exporter.list().await.unwrap()[0].initiators, vec![src]);

    // Done migration: the source leaves; the destination keeps its account
    // and is the single host, so the source cannot come back unflagged.
    f.svc
        .export_volume(
            "v",
            &[iqn(dst)],
            chap("dest-secret-00002"),
            &agent("dst").migration(),
        )
        .await
        .unwrap();
    f.svc.unexport_volume("v", &[iqn(src)]).await.unwrap();
    let rec = stored(&f);
    assert_eq!(rec.initiators, vec![iqn(dst)]);
    assert_eq!(rec.chap.as_ref().unwrap().secret(), "dest-secret-00002");
    assert_eq!(rec.chap_set_by.as_deref(), Some("agent/dst"));
    assert!(rec.migration.is_none());
    let e = f
        .svc
        .export_volume("v", &[iqn(src)], None, &agent("src").multi_attach())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
}

#[tokio::test]
async fn an_exporter_without_authentication_gets_no_chap_and_the_reply_says_so() {
    let f = fixture();
    f.exporter.no_auth.store(true, Ordering::SeqCst);
    f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    let by = ExportBy {
        caller: "agent/a".into(),
        admin: false,
        multi_attach: false,
        migration: false,
        host_id: None,
    };
    let chap = Chap::new("agent", "s3cr3t-Pa55word").unwrap();
    let e = f
        .svc
        .export_volume("v", &[iqn(IQN)], Some(chap), &by)
        .await
        .unwrap();
    // No CHAP kept or claimed: the initiator list is the only control.
    assert!(e.record.chap.is_none());
    let live = f.exporter.list().await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].chap_user, None);
    assert_eq!(live[0].initiators, vec![IQN.to_string()]);
}

#[tokio::test]
async fn export_merges_initiators_and_unexport_removes_them() {
    let f = fixture();
    f.svc.create_volume(empty("single", 4 << 20)).await.unwrap();
    f.svc
        .create_volume(NewVolume {
            allow_multi_attach: true,
            ..empty("v", 4 << 20)
        })
        .await
        .unwrap();
    let other = "iqn.2026-11.io.stratus:host2";
    let agent = |iqn_of: &str| ExportBy {
        caller: format!("agent/{iqn_of}"),
        admin: false,
        multi_attach: false,
        migration: false,
        host_id: None,
    };
    // Fencing: a second host on a read-write volume needs multi_attach
    // and a volume that allows it; nothing changes when refused.
    f.svc
        .export_volume("single", &[iqn(IQN)], None, &agent("a"))
        .await
        .unwrap();
    for by in [agent("b"), agent("b").multi_attach()] {
        let e = f
            .svc
            .export_volume("single", &[iqn(other)], None, &by)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    }
    let e = f
        .svc
        .export_volume("single", &[iqn(IQN), iqn(other)], None, &agent("a"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert_eq!(f.exporter.list().await.unwrap()[0].initiators.len(), 1);
    // The same host again is no second host.
    f.svc
        .export_volume("single", &[iqn(IQN)], None, &agent("a"))
        .await
        .unwrap();

    // CHAP: set by agent a; replaced by a again or an admin, not by b.
    let chap = |s: &str| Some(Chap::new("u", s).unwrap());
    f.svc
        .export_volume("single", &[iqn(IQN)], chap("0123456789abcdef"), &agent("a"))
        .await
        .unwrap();
    let e = f
        .svc
        .export_volume("single", &[iqn(IQN)], chap("fedcba9876543210"), &agent("b"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.message().contains("agent/a"), "{e}");
    f.svc
        .export_volume("single", &[iqn(IQN)], chap("fedcba9876543210"), &agent("a"))
        .await
        .unwrap();
    f.svc
        .export_volume(
            "single",
            &[iqn(IQN)],
            chap("0011223344556677"),
            &ExportBy::admin("t"),
        )
        .await
        .unwrap();
    let e = f
        .svc
        .export_volume("single", &[iqn(IQN)], chap("8899aabbccddeeff"), &agent("a"))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::PermissionDenied,
        "now the admin's: {e}"
    );

    f.svc
        .export_volume("v", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap();
    let e = f
        .svc
        .export_volume(
            "v",
            &[iqn(other)],
            Some(Chap::new("u", "0123456789abcd").unwrap()),
            &ExportBy::admin("t").multi_attach(),
        )
        .await
        .unwrap();
    assert_eq!(e.record.initiators.len(), 2);
    assert!(e
        .url()
        .starts_with("iscsi://127.0.0.1:3260/iqn.2026-11.io.stratus.test:"));
    let live = f.exporter.list().await.unwrap();
    let live = live
        .iter()
        .find(|l| l.target_iqn == e.record.target_iqn.as_str())
        .unwrap();
    assert_eq!(live.initiators.len(), 2);
    assert_eq!(live.chap_user.as_deref(), Some("u"));

    let rest = f
        .svc
        .unexport_volume("v", &[iqn(IQN)])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.record.initiators.len(), 1);
    let e = f.svc.unexport_volume("v", &[iqn(IQN)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(f
        .svc
        .unexport_volume("v", &[iqn(other)])
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        f.svc.unexport_volume("v", &[]).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn exporter_down_is_unavailable_and_changes_nothing() {
    let f = fixture();
    f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    f.exporter.down.store(true, Ordering::SeqCst);
    let e = f
        .svc
        .export_volume("v", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(f.svc.list_exports().unwrap().is_empty());
}

#[tokio::test]
async fn an_agent_on_the_storage_host_gets_the_volume_itself_and_no_target() {
    use std::sync::atomic::Ordering::SeqCst;
    let f = fixture();
    f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    let here = || {
        ExportBy {
            caller: "agent/a".into(),
            admin: false,
            multi_attach: false,
            migration: false,
            host_id: None,
        }
        .on_host(STORAGE_HOST)
    };
    // The exporter is down: a local export never calls it.
    f.exporter.down.store(true, SeqCst);
    let e = f
        .svc
        .export_volume("v", &[iqn(IQN)], None, &here())
        .await
        .unwrap();
    let path = f.svc.get_volume("v").await.unwrap().device_path;
    let l = e.local.clone().expect("a local attachment");
    assert_eq!(l.path, path);
    assert!(!l.block_device);
    assert_eq!(e.url(), format!("file:{}", path.display()));
    assert_eq!(e.exporter, "local");
    // The export is pdisk's record all the same: listed, holding the host.
    let listed = f.svc.list_exports().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].exporter, "local");
    assert_eq!(listed[0].record.initiators, vec![iqn(IQN)]);
    // Resizing tells no target; a second host is fenced as ever.
    f.svc.resize_volume("v", 8 << 20).await.unwrap();
    let e = f
        .svc
        .export_volume(
            "v",
            &[iqn("iqn.2026-11.io.stratus:host2")],
            None,
            &ExportBy::admin("t").on_host("elsewhere"),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert_eq!(f.svc.list_exports().unwrap()[0].record.initiators.len(), 1);
    // Reconciliation makes no target for it; unexport needs none.
    f.exporter.down.store(false, SeqCst);
    f.svc.reconcile().await.unwrap();
    assert!(f.exporter.list().await.unwrap().is_empty());
    f.exporter.down.store(true, SeqCst);
    assert!(f.svc.unexport_volume("v", &[]).await.unwrap().is_none());
    assert!(f.svc.list_exports().unwrap().is_empty());

    // Another host id, or none, gets iSCSI as ever.
    f.exporter.down.store(false, SeqCst);
    for by in [
        ExportBy::admin("t").on_host("elsewhere"),
        ExportBy::admin("t"),
    ] {
        let e = f
            .svc
            .export_volume("v", &[iqn(IQN)], None, &by)
            .await
            .unwrap();
        assert!(e.local.is_none());
        assert!(e.url().starts_with("iscsi://"), "{}", e.url());
        assert_eq!(e.exporter, "memory");
        assert_eq!(f.exporter.list().await.unwrap().len(), 1);
    }
    // The storage host's agent then still opens the file; the target
    // stays for the export's record.
    let e = f
        .svc
        .export_volume("v", &[iqn(IQN)], None, &here())
        .await
        .unwrap();
    assert_eq!(e.local.unwrap().path, path);
    assert_eq!(f.exporter.list().await.unwrap().len(), 1);
    f.svc.unexport_volume("v", &[]).await.unwrap();
    assert!(f.exporter.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn reconcile_restores_lost_exports_and_reports_drift() {
    let f = fixture();
    f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    f.svc
        .export_volume("v", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap();
    f.exporter.forget_all(); // tgtd restarted
    let stray = f.svc.backend().staging_dir().join("../volumes/stray.txt");
    std::fs::write(&stray, b"not ours").unwrap();
    let r = f.svc.reconcile().await.unwrap();
    assert_eq!(f.exporter.list().await.unwrap().len(), 1);
    assert!(
        r.actions.iter().any(|a| a.contains("re-created export")),
        "{r:?}"
    );
    assert!(
        r.drift
            .iter()
            .any(|d| d.object.contains("stray.txt") && d.kind == DriftKind::File),
        "{r:?}"
    );
    assert!(stray.exists(), "drift must never be deleted");
    let pool = f.svc.pool().await.unwrap();
    assert_eq!(pool.drift.len(), r.drift.len());

    // A volume whose data vanished is reported and marked error.
    let v = f.svc.get_volume("v").await.unwrap();
    std::fs::remove_file(&v.device_path).unwrap();
    let r = f.svc.reconcile().await.unwrap();
    assert!(
        r.drift
            .iter()
            .any(|d| d.object == "v" && d.kind == DriftKind::Volume),
        "{r:?}"
    );
    assert_eq!(
        f.svc.get_volume("v").await.unwrap().record.state,
        VolumeState::Error
    );
}

#[tokio::test]
async fn snapshot_keeps_content_and_clone_is_independent() {
    use std::os::unix::fs::FileExt;
    let f = fixture();
    let v = f.svc.create_volume(empty("v", 8 << 20)).await.unwrap();
    let write = |p: &Path, data: &[u8]| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .write_all_at(data, 1 << 20)
            .unwrap()
    };
    let read = |p: &Path| {
        let mut b = [0u8; 5];
        std::fs::File::open(p)
            .unwrap()
            .read_exact_at(&mut b, 1 << 20)
            .unwrap();
        b
    };
    write(&v.device_path, b"first");
    f.svc.create_snapshot("v", name("snap"), "").await.unwrap();
    write(&v.device_path, b"again");
    let c = f
        .svc
        .clone_volume("snap", true, name("c"), Labels::new(), 16 << 20, "")
        .await
        .unwrap();
    assert_eq!(&read(&c.device_path), b"first");
    assert_eq!(c.record.size.0, 16 << 20);
    write(&c.device_path, b"clone");
    assert_eq!(&read(&v.device_path), b"again");
    let e = f
        .svc
        .clone_volume("v", false, name("small"), Labels::new(), 1 << 20, "")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn resize_grows_and_refuses_shrink() {
    let f = fixture();
    f.svc.create_volume(empty("v", 8 << 20)).await.unwrap();
    let v = f.svc.resize_volume("v", 16 << 20).await.unwrap();
    assert_eq!(std::fs::metadata(&v.device_path).unwrap().len(), 16 << 20);
    let e = f.svc.resize_volume("v", 4 << 20).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert_eq!(f.svc.get_volume("v").await.unwrap().record.size.0, 16 << 20);
}

#[tokio::test]
async fn pool_overcommit_is_resource_exhausted() {
    let f = fixture();
    let cap = f.svc.backend().usage().await.unwrap().capacity;
    let e = f
        .svc
        .create_volume(empty("huge", cap.saturating_mul(21)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(f.svc.list_volumes(&Labels::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn raw_import_keeps_holes_and_reports_progress() {
    use std::os::unix::fs::FileExt;
    let f = fixture();
    let img = f.import.join("disk.raw");
    let file = std::fs::File::create(&img).unwrap();
    file.set_len(32 << 20).unwrap();
    file.write_all_at(&[7u8; 8192], 3 << 20).unwrap();
    let mut rx = f.svc.progress.watch("imp-1").unwrap();
    let v = f
        .svc
        .create_volume(NewVolume {
            allow_multi_attach: false,
            source: NewVolumeSource::ImageFile {
                path: img.clone(),
                format: None,
            },
            request_id: "imp-1".into(),
            ..empty("imported", 0)
        })
        .await
        .unwrap();
    assert_eq!(v.record.size.0, 32 << 20);
    assert!(v.allocated < 1 << 20, "holes kept: {}", v.allocated);
    assert_eq!(
        std::fs::read(&v.device_path).unwrap(),
        std::fs::read(&img).unwrap()
    );
    let last = rx.borrow_and_update().clone();
    assert!(last.finished && last.error.is_none() && last.done == last.total);
}

#[tokio::test]
async fn concurrent_clients_leave_a_consistent_store() {
    let f = fixture();
    f.svc.create_volume(empty("base", 4 << 20)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let svc = f.svc.clone();
        tasks.push(tokio::spawn(async move {
            let vol = format!("v{i}");
            svc.create_volume(empty(&vol, 2 << 20)).await.unwrap();
            svc.create_snapshot(&vol, name(format!("s{i}")), "")
                .await
                .unwrap();
            svc.create_snapshot("base", name(format!("b{i}")), "")
                .await
                .unwrap();
            // Half of them race a delete against their own snapshot.
            if i % 2 == 0 {
                svc.delete_snapshot(&format!("s{i}")).await.unwrap();
                svc.delete_volume(&vol).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let vols = f.svc.list_volumes(&Labels::new()).await.unwrap();
    assert_eq!(vols.len(), 11);
    let snaps = f.svc.list_snapshots("").await.unwrap();
    assert_eq!(snaps.len(), 30);
    let listing = f.svc.backend().list().await.unwrap();
    assert_eq!(listing.objects.len(), 41);
    let r = f.svc.reconcile().await.unwrap();
    assert!(r.drift.is_empty(), "{r:?}");
}

#[tokio::test]
async fn checksum_hashes_holes_as_zeros_and_reports_progress() {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let f = fixture();
    let v = f.svc.create_volume(empty("v", 24 << 20)).await.unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&v.device_path)
        .unwrap();
    // Data at 3 MiB (across a MiB boundary) and at the very end; holes around.
    file.write_all_at(&[0xa5; 1 << 20], (3 << 20) + 4096)
        .unwrap();
    file.write_all_at(b"last bytes", (24 << 20) - 10).unwrap();
    file.sync_all().unwrap();
    let whole = |p: &Path| format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()));
    let expected = whole(&v.device_path);

    let mut rx = f.svc.progress.watch("sum-1").unwrap();
    let c = f.svc.checksum("v", false, "sum-1").await.unwrap();
    assert_eq!(c.sha256, expected);
    assert_eq!(c.size, 24 << 20);
    let last = rx.borrow_and_update().clone();
    assert_eq!(last.phase, "checksum");
    assert!(last.finished && last.error.is_none(), "{last:?}");
    assert_eq!((last.done, last.total), (24 << 20, 24 << 20));

    // By UUID too; and a snapshot keeps the checksum of its moment.
    let by_uuid = f
        .svc
        .checksum(&v.record.uuid.to_string(), false, "")
        .await
        .unwrap();
    assert_eq!(by_uuid, c);
    f.svc.create_snapshot("v", name("v-s1"), "").await.unwrap();
    file.write_all_at(b"changed", 0).unwrap();
    let s = f.svc.checksum("v-s1", true, "").await.unwrap();
    assert_eq!(s, c);
    let now = f.svc.checksum("v", false, "").await.unwrap();
    assert_ne!(now.sha256, c.sha256);
    assert_eq!(now.sha256, whole(&v.device_path));
}

#[tokio::test]
async fn checksum_needs_a_ready_object() {
    let f = fixture();
    let e = f.svc.checksum("nope", false, "").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = f.svc.checksum("nope", true, "").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = f.svc.checksum("v", false, "bad id!").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // A volume whose data vanished is marked error by reconciliation.
    let v = f.svc.create_volume(empty("v", 4 << 20)).await.unwrap();
    std::fs::remove_file(&v.device_path).unwrap();
    f.svc.reconcile().await.unwrap();
    let mut rx = f.svc.progress.watch("sum-2").unwrap();
    let e = f.svc.checksum("v", false, "sum-2").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{e}");
    assert!(e.message().contains("volume v is Error"), "{e}");
    let last = rx.borrow_and_update().clone();
    assert!(last.finished && last.error.is_some(), "{last:?}");
}

#[tokio::test]
async fn image_bases_are_read_only_and_clones_are_not() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    let labels: Labels = [(
        crate::types::LABEL_IMAGE_SHA256.to_string(),
        "ab".repeat(32),
    )]
    .into();
    let base = f
        .svc
        .create_volume(NewVolume {
            allow_multi_attach: false,
            labels,
            ..empty("image-base", 4 << 20)
        })
        .await
        .unwrap();
    let mode = std::fs::metadata(&base.device_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
    let e = f
        .svc
        .export_volume("image-base", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(e.message().contains("read-only"), "{e}");
    let e = f
        .svc
        .resize_volume("image-base", 8 << 20)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    let c = f
        .svc
        .clone_volume(
            "image-base",
            false,
            name("guest-disk"),
            Labels::new(),
            8 << 20,
            "",
        )
        .await
        .unwrap();
    let mode = std::fs::metadata(&c.device_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    f.svc
        .export_volume("guest-disk", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap();
    f.svc.unexport_volume("guest-disk", &[]).await.unwrap();

    // The API says what is a base and what is a clone of what, once.
    {
        use stratus_proto::pdisk::v1 as pb;
        use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
        let api = crate::grpc::Api::new(f.svc.clone());
        let listed = api
            .list_volumes(as_admin(pb::ListVolumesRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let of = |n: &str| listed.iter().find(|v| v.name == n).unwrap().clone();
        let (b, g) = (of("image-base"), of("guest-disk"));
        assert_eq!(b.image_sha256, "ab".repeat(32));
        assert_eq!(
            (b.clone_of_volume.as_str(), b.clone_of_snapshot.as_str()),
            ("", "")
        );
        assert_eq!(g.image_sha256, "", "a clone is not a base");
        assert_eq!(g.clone_of_volume, b.uuid);
        assert_eq!(g.clone_of_snapshot, "");
        assert_eq!(
            g.source,
            format!("volume:{}", b.uuid),
            "the display form stays"
        );
    }
    f.svc.delete_volume("guest-disk").await.unwrap();
    f.svc.delete_volume("image-base").await.unwrap();
}

/// The service on the lvm backend over a scripted LVM whose thin pool is
/// as full as `fill` says (data %, metadata %).
struct LvmFixture {
    _dir: tempfile::TempDir,
    svc: Arc<PoolService>,
    lvm: Arc<crate::backend::lvm::tests::Script>,
    fill: Arc<std::sync::Mutex<(&'static str, &'static str)>>,
}

async fn lvm_fixture() -> LvmFixture {
    use crate::backend::lvm::tests::{lvs_json, open, pool_row, settings, thin_row, Script};
    use crate::runner::Output;
    let dir = tempfile::tempdir().unwrap();
    let fill = Arc::new(std::sync::Mutex::new(("50.00", "10.00")));
    let f2 = fill.clone();
    // The LVs lvcreate made (each reported 1 GiB, 1% mapped).
    let lvs = std::sync::Mutex::new(Vec::<String>::new());
    let lvm = Script::new(move |argv| {
        let (data, meta) = *f2.lock().unwrap();
        let target = argv.last().unwrap().as_str();
        let thin = |lv: &str| thin_row(lv, "Vwi-a-tz--", 1 << 30, "1.00");
        let mut made = lvs.lock().unwrap();
        match argv[0].as_str() {
            "vgs" => Output::ok(crate::backend::lvm::tests::VGS_JSON),
            "lvs" => match target.split_once('/') {
                None => {
                    let rows =
                        std::iter::once(pool_row(data, meta)).chain(made.iter().map(|l| thin(l)));
                    Output::ok(lvs_json(&rows.collect::<Vec<_>>()))
                }
                Some((_, "pool")) => Output::ok(lvs_json(&[pool_row(data, meta)])),
                Some((_, lv)) => Output::ok(lvs_json(&[thin(lv)])),
            },
            "lvcreate" => {
                let i = argv.iter().position(|a| a == "--name").unwrap();
                made.push(argv[i + 1].clone());
                Output::ok("")
            }
            "lvremove" => {
                made.retain(|l| !target.ends_with(l.as_str()));
                Output::ok("")
            }
            _ => Output::ok(""),
        }
    });
    let backend = Arc::new(open(lvm.clone(), settings(&dir.path().join("staging"))).await);
    let store = Store::open(&dir.path().join("data")).unwrap();
    let svc = Arc::new(PoolService::new(
        store,
        backend,
        Arc::new(MemoryExporter::default()),
        lvm.clone(),
        ServiceSettings::default(),
    ));
    LvmFixture {
        _dir: dir,
        svc,
        lvm,
        fill,
    }
}

#[tokio::test]
async fn lvm_sizes_round_up_to_whole_extents() {
    let f = lvm_fixture().await;
    let v = f.svc.create_volume(empty("v", 1 << 20)).await.unwrap();
    assert_eq!(v.record.size.0, 4 << 20);
    assert!(
        f.lvm.lines()[1].contains("--virtualsize 4194304b"),
        "{:?}",
        f.lvm.lines()
    );
    let v = f.svc.create_volume(empty("g", 1 << 30)).await.unwrap();
    f.lvm.clear();
    let v2 = f.svc.resize_volume("g", (1 << 30) + 1).await.unwrap();
    assert_eq!(v2.record.size.0, (1 << 30) + (4 << 20));
    assert_eq!(
        f.lvm.lines()[2],
        format!(
            "lvextend --size 1077936128b stratus/pd-vol-{}",
            v.record.uuid
        )
    );
}

#[tokio::test]
async fn lvm_pool_past_its_threshold_refuses_provisioning_and_runs_nothing_after() {
    use crate::backend::lvm::tests::LVS;
    let f = lvm_fixture().await;
    f.svc.create_volume(empty("v", 1 << 30)).await.unwrap();
    let pool = f.svc.pool().await.unwrap();
    let t = pool.thin.unwrap();
    assert_eq!((t.data_percent, t.threshold_percent), (50.0, 90.0));

    *f.fill.lock().unwrap() = ("91.00", "10.00");
    f.lvm.clear();
    let only_the_report = vec![format!("{LVS} stratus/pool")];
    let refused = |e: Error| {
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
        assert!(
            e.message()
                .contains("thin pool stratus/pool data usage is 91.00%, past the 90% threshold"),
            "{e}"
        );
        assert_eq!(f.lvm.lines(), only_the_report);
        f.lvm.clear();
    };
    refused(f.svc.create_volume(empty("w", 1 << 30)).await.unwrap_err());
    refused(f.svc.create_snapshot("v", name("s"), "").await.unwrap_err());
    refused(
        f.svc
            .clone_volume("v", false, name("c"), Labels::new(), 0, "")
            .await
            .unwrap_err(),
    );
    refused(f.svc.resize_volume("v", 2 << 30).await.unwrap_err());
    assert_eq!(
        f.svc.get_volume("w").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(f.svc.list_snapshots("").await.unwrap().is_empty());

    *f.fill.lock().unwrap() = ("10.00", "95.00");
    let e = f.svc.create_volume(empty("w", 1 << 30)).await.unwrap_err();
    assert!(e.message().contains("metadata usage is 95.00%"), "{e}");
    f.lvm.clear();

    // Deleting is what frees the pool: never refused.
    f.svc.delete_volume("v").await.unwrap();
    assert!(f.lvm.lines().iter().any(|l| l.starts_with("lvremove")));
}

/// An operation that waited for a volume's lock reads the volume again by
/// its UUID: when the volume went meanwhile, the operation fails NotFound
/// and never falls back to a volume *named* like that UUID (a name may look
/// like a UUID once no volume has that UUID).
#[tokio::test]
async fn a_volume_gone_while_waiting_is_not_confused_with_one_named_like_its_uuid() {
    let f = fixture();
    let a = f
        .svc
        .create_volume(empty("a", 1 << 20))
        .await
        .unwrap()
        .record;
    let twin = a.uuid.to_string();

    let held = f.svc.locks.lock(a.uuid).await;
    let svc = f.svc.clone();
    let by_uuid = twin.clone();
    let delete = tokio::spawn(async move { svc.delete_volume(&by_uuid).await });
    // Wait until the delete resolved `a` and queued for its lock: the map,
    // our guard and the waiter each hold the lock's Arc.
    let waiting = || Arc::strong_count(&f.svc.locks.map.lock().unwrap()[&a.uuid]) == 3;
    for _ in 0..500 {
        if waiting() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(waiting(), "the delete never queued for the lock");
    // Meanwhile `a` goes (as if another delete finished first) and a new
    // volume takes its UUID as its name.
    f.svc.store.remove_volume(a.uuid, &[]).unwrap();
    let b = f
        .svc
        .create_volume(empty(&twin, 1 << 20))
        .await
        .unwrap()
        .record;
    drop(held);

    let e = delete.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let still = f.svc.get_volume(&b.uuid.to_string()).await.unwrap();
    assert_eq!(still.record.name.as_str(), twin);
}

/// A record as a crash left it: stored `creating`, never acknowledged.
fn interrupted_create(f: &Fixture, volume: &str) -> VolumeRecord {
    let rec = VolumeRecord {
        allow_multi_attach: false,
        uuid: Uuid::new_v4(),
        name: name(volume),
        size: ByteSize(8 << 20),
        labels: Labels::new(),
        state: VolumeState::Creating,
        state_reason: String::new(),
        source: Source::Empty,
        created_at: now(),
        project: String::new(),
        created_by: None,
        quarantine: None,
        flatten_pending: false,
    };
    f.svc.store.insert_volume(&rec).unwrap();
    rec
}

#[tokio::test]
async fn interrupted_creates_are_rolled_back_and_acknowledged_objects_kept() {
    let f = fixture();
    let kept = f.svc.create_volume(empty("kept", 8 << 20)).await.unwrap();
    let snap = f
        .svc
        .create_snapshot("kept", name("kept-1"), "")
        .await
        .unwrap();
    // One create crashed after publishing its file, one mid-copy in staging.
    let published = interrupted_create(&f, "published");
    let pub_path = f.svc.backend.device_path(ObjectId::Volume(published.uuid));
    std::fs::write(&pub_path, b"partial").unwrap();
    let staged = interrupted_create(&f, "staged");
    let staging = f.svc.backend.staging_dir();
    let tmp = staging.join(format!("volume-{}.tmp", staged.uuid));
    std::fs::write(&tmp, b"partial").unwrap();
    // A snapshot interrupted while being taken.
    let half = SnapshotRecord {
        uuid: Uuid::new_v4(),
        name: name("kept-2"),
        volume: kept.record.uuid,
        size: kept.record.size,
        complete: false,
        created_at: now(),
    };
    f.svc.store.insert_snapshot(&half).unwrap();
    let half_path = f.svc.backend.device_path(ObjectId::Snapshot(half.uuid));
    std::fs::write(&half_path, b"partial").unwrap();

    let r = f.svc.reconcile().await.unwrap();

    for (what, object) in [
        ("published", DriftKind::Volume),
        ("staged", DriftKind::Volume),
        ("kept-2", DriftKind::Snapshot),
    ] {
        assert!(
            r.actions
                .iter()
                .any(|a| a.contains("rolled back") && a.contains(what)),
            "{what}: {r:?}"
        );
        assert!(
            r.drift.iter().any(|d| d.kind == object
                && d.object == what
                && d.detail.starts_with("rolled back")),
            "{what}: {r:?}"
        );
    }
    let pool = f.svc.pool().await.unwrap();
    assert!(
        pool.drift
            .iter()
            .any(|d| d.detail.starts_with("rolled back")),
        "{:?}",
        pool.drift
    );
    // Records and data of the unacknowledged objects are gone, names free.
    for v in ["published", "staged"] {
        assert_eq!(
            f.svc.get_volume(v).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
    assert!(!pub_path.exists() && !tmp.exists() && !half_path.exists());
    assert!(f.svc.store.snapshot(half.uuid).unwrap().is_none());
    f.svc
        .create_volume(empty("published", 1 << 20))
        .await
        .unwrap();
    // Acknowledged objects are untouched.
    let v = f.svc.get_volume("kept").await.unwrap();
    assert_eq!(v.record.state, VolumeState::Ready);
    assert!(v.device_path.exists());
    let snaps = f.svc.list_snapshots("kept").await.unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].record.uuid, snap.record.uuid);
    // A second pass has nothing left to roll back.
    let r = f.svc.reconcile().await.unwrap();
    assert!(
        !r.actions.iter().any(|a| a.contains("rolled back")),
        "{r:?}"
    );
}

#[tokio::test]
async fn unexport_commits_before_the_exporter_so_revoked_access_never_returns() {
    let f = fixture();
    const OTHER: &str = "iqn.2026-11.io.stratus:host2";
    f.svc
        .create_volume(NewVolume {
            allow_multi_attach: true,
            ..empty("v", 8 << 20)
        })
        .await
        .unwrap();
    f.svc
        .export_volume(
            "v",
            &[iqn(IQN), iqn(OTHER)],
            None,
            &ExportBy::admin("t").multi_attach(),
        )
        .await
        .unwrap();
    let live_initiators = |f: &Fixture| -> Vec<String> {
        futures::executor::block_on(f.exporter.list())
            .unwrap()
            .into_iter()
            .flat_map(|l| l.initiators)
            .collect()
    };

    // Removing one initiator while the exporter is down: the smaller ACL is
    // committed; the watchdog applies it, not the old one.
    f.exporter.down.store(true, Ordering::SeqCst);
    let e = f.svc.unexport_volume("v", &[iqn(OTHER)]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let stored = f.svc.list_exports().unwrap();
    assert_eq!(stored[0].record.initiators.len(), 1);
    f.exporter.down.store(false, Ordering::SeqCst);
    f.svc.restore_exports().await.unwrap();
    assert_eq!(live_initiators(&f), vec![IQN.to_string()]);

    // The whole export, exporter down: revoked in the store at once (not
    // listed, volume not exported), the target removed when it returns.
    f.exporter.down.store(true, Ordering::SeqCst);
    f.svc.unexport_volume("v", &[]).await.unwrap_err();
    assert!(f.svc.list_exports().unwrap().is_empty());
    assert!(!f.svc.get_volume("v").await.unwrap().exported);
    f.exporter.down.store(false, Ordering::SeqCst);
    assert!(!live_initiators(&f).is_empty(), "target still live");
    let r = f.svc.reconcile().await.unwrap();
    assert!(
        r.actions
            .iter()
            .any(|a| a.contains("finished the interrupted unexport")),
        "{r:?}"
    );
    assert!(futures::executor::block_on(f.exporter.list())
        .unwrap()
        .is_empty());
    assert!(f.svc.store.exports().unwrap().is_empty());
    f.svc.delete_volume("v").await.unwrap();
}

/// Each committed change is journaled with it, in order, with the volume,
/// its project and the object; WatchEvents replays them, then goes live;
/// the outbox's message ids and subjects carry host and seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_journaled_in_order_and_followed_live() {
    use crate::events::{PoolEventFilter, PoolEventKind as K};
    use futures::StreamExt;
    let f = fixture();
    f.svc.create_volume(empty("v", 1 << 20)).await.unwrap();
    f.svc.create_snapshot("v", name("s"), "").await.unwrap();
    f.svc
        .clone_volume("s", true, name("c"), Labels::new(), 0, "")
        .await
        .unwrap();
    f.svc.resize_volume("v", 2 << 20).await.unwrap();
    f.svc
        .export_volume("v", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap();
    f.svc.unexport_volume("v", &[]).await.unwrap();
    f.svc.delete_snapshot("s").await.unwrap();
    f.svc.delete_volume("c").await.unwrap();
    let store = f.svc.shared_store();
    let events = store.events_after(0, 100, false).unwrap();
    let kinds: Vec<K> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            K::VolumeCreated,
            K::SnapshotCreated,
            K::VolumeCloned,
            K::VolumeResized,
            K::ExportAdded,
            K::ExportRemoved,
            K::SnapshotDeleted,
            K::VolumeDeleted
        ]
    );
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(events[1].object_name, "s");
    assert_eq!(events[2].volume_name, "c");
    assert_eq!(events[2].object_name, "s", "a clone names its source");
    assert_eq!(events[3].bytes, 2 << 20);
    assert!(events[4].detail.contains(IQN), "{}", events[4].detail);

    // Replay from 6, then live: exactly once, in order.
    let mut s = stratus_core::journal::follow(
        store.clone(),
        6,
        move |e| PoolEventFilter::default().matches(e),
        true,
    );
    f.svc.delete_volume("v").await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seqs.push((e.seq, e.kind));
    }
    assert_eq!(
        seqs,
        vec![
            (7, K::SnapshotDeleted),
            (8, K::VolumeDeleted),
            (9, K::VolumeDeleted)
        ]
    );

    let out = crate::events::PoolOutbox::new(store, "st1");
    use stratus_core::outbox::Outbox;
    let m = &out.messages_after(8, 10).unwrap()[0];
    assert_eq!(m.message.msg_id, "pdisk.st1:9");
    assert_eq!(
        m.message.subject,
        format!(
            "stratus.pdisk.st1.volume.{}.VOLUME_DELETED",
            events[0].volume_uuid
        )
    );
    let back = crate::events::event_from_payload(&m.message.payload).unwrap();
    assert_eq!(back.seq, 9);
    assert_eq!(back.volume_name, "v");
}

/// Reconciliation's drift is journaled as DRIFT_FOUND.
#[tokio::test]
async fn drift_is_journaled() {
    use crate::events::PoolEventKind as K;
    let f = fixture();
    // A file in the pool nobody recorded is drift.
    let pool = f._dir.path().join("pool/volumes");
    std::fs::create_dir_all(&pool).unwrap();
    std::fs::write(pool.join(format!("{}.raw", uuid::Uuid::new_v4())), b"x").unwrap();
    f.svc.reconcile().await.unwrap();
    let kinds: Vec<K> = f
        .svc
        .shared_store()
        .events_after(0, 100, false)
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&K::DriftFound), "{kinds:?}");
}

// ---------- quarantine ----------

const HOUR: Duration = Duration::from_secs(3600);

fn in_project(volume: &str, size: u64, project: &str) -> NewVolume {
    NewVolume {
        owner: Owner {
            project: project.into(),
            creator: None,
        },
        ..empty(volume, size)
    }
}

/// Writes `byte` over the first MiB of the volume's file.
fn fill(v: &VolumeInfo, byte: u8) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v.device_path)
        .unwrap();
    f.write_all(&vec![byte; 1 << 20]).unwrap();
}

fn kinds(svc: &PoolService) -> Vec<crate::events::PoolEventKind> {
    svc.shared_store()
        .events_after(0, 1000, false)
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect()
}

#[tokio::test]
async fn a_deleted_volume_waits_in_quarantine_and_comes_back_whole() {
    use crate::events::PoolEventKind as K;
    let f = fixture_with(HOUR);
    let v = f.svc.create_volume(empty("db", 4 << 20)).await.unwrap();
    fill(&v, 0x5a);
    let uuid = v.record.uuid.to_string();
    let before = f.svc.checksum(&uuid, false, "").await.unwrap();

    let done = f.svc.delete_volume("db").await.unwrap();
    let Deleted::Quarantined { purge_at } = done else {
        panic!("{done:?}");
    };
    let purge = humantime::parse_rfc3339(&purge_at).unwrap();
    let left = purge.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > HOUR - Duration::from_secs(60) && left <= HOUR,
        "{left:?}"
    );
    // Gone for every call but the quarantine's; the data stays.
    for r in ["db", uuid.as_str()] {
        assert_eq!(
            f.svc.get_volume(r).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let e = f.svc.resize_volume(r, 8 << 20).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = f
            .svc
            .export_volume(r, &[iqn(IQN)], None, &ExportBy::admin("t"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = f.svc.create_snapshot(r, name("s"), "").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = f.svc.delete_volume(r).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "a second delete");
    }
    assert!(f.svc.list_volumes(&Labels::new()).await.unwrap().is_empty());
    assert!(v.device_path.exists());
    let q = f.svc.list_quarantined().await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].record.state, VolumeState::Quarantined);
    assert_eq!(
        q[0].record.quarantine.as_ref().unwrap().purge_at(),
        purge_at
    );
    assert!(q[0].allocated > 0, "its data is still allocated");

    // Its name is free: a new volume takes it; the restore then needs
    // another name, and a refused restore changes nothing.
    let new = f.svc.create_volume(empty("db", 4 << 20)).await.unwrap();
    let store_before = format!("{:?}", f.svc.store().volumes().unwrap());
    let e = f.svc.restore_volume("db", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.message().contains("--as"), "{e}");
    assert_eq!(
        format!("{:?}", f.svc.store().volumes().unwrap()),
        store_before
    );
    let back = f
        .svc
        .restore_volume(&uuid, Some(name("db-old")))
        .await
        .unwrap();
    assert_eq!(back.record.state, VolumeState::Ready);
    assert_eq!(back.record.quarantine, None);
    assert_eq!(back.record.name.as_str(), "db-old");
    assert_eq!(f.svc.checksum("db-old", false, "").await.unwrap(), before);
    assert_eq!(
        f.svc.get_volume("db").await.unwrap().record.uuid,
        new.record.uuid
    );
    assert!(f.svc.list_quarantined().await.unwrap().is_empty());
    assert_eq!(
        f.svc.restore_volume(&uuid, None).await.unwrap_err().kind(),
        ErrorKind::NotFound,
        "restored once"
    );
    assert_eq!(
        kinds(&f.svc),
        vec![
            K::VolumeCreated,
            K::VolumeQuarantined,
            K::VolumeCreated,
            K::VolumeRestored
        ]
    );
    let events = f.svc.shared_store().events_after(0, 10, false).unwrap();
    assert_eq!(events[1].detail, format!("purge at {purge_at}"));
    assert_eq!(
        (events[3].volume_name.as_str(), events[3].detail.as_str()),
        ("db-old", "deleted as db")
    );
    // Restored volumes are whole volumes again.
    f.svc.resize_volume("db-old", 8 << 20).await.unwrap();
}

#[tokio::test]
async fn the_purge_comes_at_the_purge_time_and_gives_the_space_back() {
    use crate::events::PoolEventKind as K;
    let f = fixture_with(HOUR);
    let v = f.svc.create_volume(empty("db", 4 << 20)).await.unwrap();
    fill(&v, 1);
    f.svc.delete_volume("db").await.unwrap();
    let purge_at_ms = f.svc.store().quarantined_volumes().unwrap()[0]
        .quarantine
        .as_ref()
        .unwrap()
        .purge_at_ms;
    assert!(f.svc.purge_due(purge_at_ms - 1).await.unwrap().is_empty());
    assert!(v.device_path.exists());
    assert_eq!(f.svc.pool().await.unwrap().quarantined, 1);
    let purged = f.svc.purge_due(purge_at_ms).await.unwrap();
    assert_eq!(purged, vec!["db".to_string()]);
    assert!(!v.device_path.exists());
    assert!(f.svc.store().volume(v.record.uuid).unwrap().is_none());
    let p = f.svc.pool().await.unwrap();
    assert_eq!(
        (p.quarantined, p.quarantined_bytes, p.provisioned),
        (0, 0, 0)
    );
    assert!(f.svc.backend().list().await.unwrap().objects.is_empty());
    let events = f.svc.shared_store().events_after(0, 10, false).unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, K::VolumeDeleted);
    assert!(last.detail.contains("quarantine ended"), "{}", last.detail);
    assert!(f.svc.restore_volume("db", None).await.is_err());
}

/// The purge task, in real time: a short period, and a volume restored
/// before it ends is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_task_purges_what_is_due_and_spares_what_was_restored() {
    let f = fixture_with(Duration::from_millis(1500));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(f.svc.clone().watch_quarantine(stopped));
    let gone = f.svc.create_volume(empty("gone", 1 << 20)).await.unwrap();
    let kept = f.svc.create_volume(empty("kept", 1 << 20)).await.unwrap();
    f.svc.delete_volume("gone").await.unwrap();
    f.svc.delete_volume("kept").await.unwrap();
    f.svc.restore_volume("kept", None).await.unwrap();
    let started = std::time::Instant::now();
    while f.svc.store().volume(gone.record.uuid).unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(20), "never purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "purged early"
    );
    assert!(!gone.device_path.exists());
    assert!(kept.device_path.exists());
    assert_eq!(
        f.svc.get_volume("kept").await.unwrap().record.state,
        VolumeState::Ready
    );
}

#[tokio::test]
async fn an_interrupted_purge_is_finished_and_reported_at_start() {
    let f = fixture_with(HOUR);
    let old = f.svc.create_volume(empty("db", 1 << 20)).await.unwrap();
    f.svc.delete_volume("db").await.unwrap();
    let new = f.svc.create_volume(empty("db", 1 << 20)).await.unwrap();
    // A purge that stopped after its intent (as a crash there leaves it).
    let mut rec = f.svc.store().volume(old.record.uuid).unwrap().unwrap();
    rec.state = VolumeState::Deleting;
    f.svc.store().update_volume(&rec, &[]).unwrap();
    let r = f.svc.reconcile().await.unwrap();
    assert!(
        r.actions
            .iter()
            .any(|a| a.contains("finished the interrupted purge of quarantined volume db")),
        "{r:?}"
    );
    assert!(r.drift.is_empty(), "{r:?}");
    assert!(!old.device_path.exists());
    assert!(f.svc.store().volume(old.record.uuid).unwrap().is_none());
    // The new volume keeps the name (the purge removed only its own).
    assert_eq!(
        f.svc.get_volume("db").await.unwrap().record.uuid,
        new.record.uuid
    );
    assert!(new.device_path.exists());
}

#[tokio::test]
async fn what_quarantine_does_not_keep() {
    let f = fixture_with(HOUR);
    // A volume with snapshots is refused, as without quarantine.
    f.svc.create_volume(empty("v", 1 << 20)).await.unwrap();
    f.svc.create_snapshot("v", name("v-s"), "").await.unwrap();
    let e = f.svc.delete_volume("v").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    assert!(f.svc.list_quarantined().await.unwrap().is_empty());
    // So is an exported one.
    f.svc.create_volume(empty("x", 1 << 20)).await.unwrap();
    f.svc
        .export_volume("x", &[iqn(IQN)], None, &ExportBy::admin("t"))
        .await
        .unwrap();
    let e = f.svc.delete_volume("x").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    // An image base goes at once (it is the image, imported again when
    // needed), and so does anything deleted `at once`.
    let base = f
        .svc
        .create_volume(NewVolume {
            labels: [(
                crate::types::LABEL_IMAGE_SHA256.to_string(),
                "ab".repeat(32),
            )]
            .into(),
            ..empty("base", 1 << 20)
        })
        .await
        .unwrap();
    assert_eq!(f.svc.delete_volume("base").await.unwrap(), Deleted::Gone);
    assert!(!base.device_path.exists());
    let now = f.svc.create_volume(empty("now", 1 << 20)).await.unwrap();
    assert_eq!(
        f.svc.delete_volume_as("now", true).await.unwrap(),
        Deleted::Gone
    );
    assert!(!now.device_path.exists());
    assert!(f.svc.list_quarantined().await.unwrap().is_empty());
}

/// A quarantined volume counts in its project's bytes, not its volumes; a
/// restore counts it again and is refused past the volume quota.
#[tokio::test]
async fn quarantine_keeps_the_bytes_quota_and_frees_the_volume_count() {
    use crate::store::QuotaLimits;
    use stratus_core::quota::Book as _;
    let f = fixture_with(HOUR);
    f.svc
        .store()
        .set_quota(
            "astro",
            QuotaLimits {
                volumes: Some(1),
                bytes: Some(12 << 20),
                ..Default::default()
            },
            QuotaLimits::default(),
        )
        .unwrap();
    f.svc
        .create_volume(in_project("a", 4 << 20, "astro"))
        .await
        .unwrap();
    f.svc.delete_volume("a").await.unwrap();
    let (_, used) = f.svc.store().quota("astro").unwrap();
    assert_eq!((used.volumes, used.bytes), (0, 4 << 20));
    // The volume count is free again, the bytes are not.
    f.svc
        .create_volume(in_project("b", 4 << 20, "astro"))
        .await
        .unwrap();
    let e = f
        .svc
        .create_volume(in_project("c", 8 << 20, "astro"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
    let before = format!("{:?}", f.svc.store().volumes().unwrap());
    let e = f.svc.restore_volume("a", None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.message().contains("volume quota"), "{e}");
    assert_eq!(format!("{:?}", f.svc.store().volumes().unwrap()), before);
    f.svc.delete_volume("b").await.unwrap();
    f.svc.restore_volume("a", None).await.unwrap();
    let (_, used) = f.svc.store().quota("astro").unwrap();
    assert_eq!((used.volumes, used.bytes), (1, 8 << 20));
}

/// Two quarantined volumes of one name: the name is ambiguous, each UUID
/// is not; the store rebuilds its name index without them.
#[tokio::test]
async fn quarantined_names_are_not_unique_and_hold_no_name_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (u1, u2);
    {
        let f = fixture_with(HOUR);
        let a = f.svc.create_volume(empty("db", 1 << 20)).await.unwrap();
        f.svc.delete_volume("db").await.unwrap();
        let b = f.svc.create_volume(empty("db", 1 << 20)).await.unwrap();
        f.svc.delete_volume("db").await.unwrap();
        let e = f.svc.restore_volume("db", None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("UUID"), "{e}");
        (u1, u2) = (a.record.uuid, b.record.uuid);
        // Copy the store aside (the fixture's dir goes with it).
        std::fs::copy(
            f._dir.path().join("data/pdisk.redb"),
            dir.path().join("pdisk.redb"),
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert!(!store.volume_name_taken("", &name("db")).unwrap());
    assert_eq!(
        store.find_volume("db").unwrap_err().kind(),
        ErrorKind::NotFound
    );
    for u in [u1, u2] {
        let q = store
            .find_quarantined_in(crate::store::NameScope::All, &u.to_string())
            .unwrap();
        assert_eq!(q.state, VolumeState::Quarantined);
    }
}
