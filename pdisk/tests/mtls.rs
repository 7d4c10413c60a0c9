//! pdiskd's transport security with real certificates from stratus-pki:
//! who gets through the TLS handshake, who gets past the gate, the local
//! socket, and certificate rotation by SIGHUP. Needs root (the harness's
//! XFS pool and tgtd); run by scripts/test.

use std::sync::Arc;
use std::time::Duration;

use stratus_pki::identity::{Identity, Role};
use stratus_pki::issue::{self, Request};
use stratus_pki::{Dialer, Target, TlsFiles};
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;

fn target(s: &Stack) -> Target {
    Target::parse(&s.pdiskd.url()).unwrap()
}

/// ListVolumes over a fresh connection made with `dialer`: Ok(count) or the
/// error's text (connection or status).
async fn list_with(dialer: &Dialer) -> Result<usize, String> {
    let channel = dialer
        .connect()
        .await
        .map_err(|e| format!("connect: {e:#}"))?;
    VolumeServiceClient::new(channel)
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .map(|r| r.into_inner().volumes.len())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

async fn code_as(s: &Stack, files: &TlsFiles) -> Result<usize, tonic::Code> {
    let channel = channel_as(&s.pdiskd.url(), files).await;
    VolumeServiceClient::new(channel)
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .map(|r| r.into_inner().volumes.len())
        .map_err(|s| s.code())
}

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(stratus_pki::tls::first_cert_der(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn only_valid_certificates_of_the_ca_get_through_the_handshake() {
    require_root();
    let s = Stack::start();
    let pki = TestPki::shared();
    let ca_pem = std::fs::read_to_string(pki.ca_path()).unwrap();

    // The test admin's certificate works.
    assert_eq!(code_as(&s, &pki.admin()).await, Ok(0));

    // No client certificate: refused by the server.
    let none = Dialer::with_client_config(target(&s), client_config(&ca_pem, None));
    let err = list_with(&none).await.unwrap_err();
    assert!(!err.starts_with("Ok"), "{err}");

    // A certificate of another CA: refused.
    let other_ca = issue::new_ca("not our CA", 1).unwrap();
    let stranger = issue::issue(
        &other_ca,
        &Request::new(Identity::new(Role::Admin, "mallory"), vec![], 1),
    )
    .unwrap();
    let dialer = Dialer::with_client_config(
        target(&s),
        client_config(&ca_pem, Some((&stranger.cert_pem, &stranger.key_pem))),
    );
    let err = list_with(&dialer).await.unwrap_err();
    assert!(
        !err.contains("Ok("),
        "another CA's certificate got in: {err}"
    );

    // An expired certificate of the right CA: refused.
    let mut req = Request::new(Identity::new(Role::Admin, "expired"), vec![], 1);
    req.not_before = time_ago(3 * 86_400);
    req.not_after = time_ago(86_400);
    let expired = issue::issue(pki.ca(), &req).unwrap();
    let dialer = Dialer::with_client_config(
        target(&s),
        client_config(&ca_pem, Some((&expired.cert_pem, &expired.key_pem))),
    );
    let err = list_with(&dialer).await.unwrap_err();
    assert!(!err.contains("Ok("), "an expired certificate got in: {err}");

    // The log says why, without a daemon restart.
    let log = s.pdiskd.log_text();
    assert!(log.contains("TLS handshake refused"), "{log}");
    assert_eq!(code_as(&s, &pki.admin()).await, Ok(0));
}

fn time_ago(secs: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - Duration::from_secs(secs)
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn roles_are_checked_before_anything_runs() {
    require_root();
    let s = Stack::start();
    let pki = TestPki::shared();
    // A daemon's server certificate grants nothing as a caller.
    let server = pki.issue(Role::Server, "other-daemon", None, &["127.0.0.1"]);
    assert_eq!(
        code_as(&s, &server).await,
        Err(tonic::Code::PermissionDenied)
    );
    // A project lists its own volumes (none); the pool is the admin's, and
    // a frontend must say for which project it acts (tests/tenancy.rs).
    let project = pki.issue(Role::Project, "astro", None, &[]);
    assert_eq!(code_as(&s, &project).await, Ok(0));
    let mut c = VolumeServiceClient::new(channel_as(&s.pdiskd.url(), &project).await);
    let err = c.get_pool(pb::GetPoolRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let frontend = pki.issue(Role::Frontend, "one", None, &[]);
    assert_eq!(
        code_as(&s, &frontend).await,
        Err(tonic::Code::InvalidArgument)
    );
    // An agent may list (its guests' disks); GetPool is the admin's.
    let agent = pki.agent();
    assert_eq!(code_as(&s, &agent).await, Ok(0));
    let mut c = VolumeServiceClient::new(channel_as(&s.pdiskd.url(), &agent).await);
    let err = c.get_pool(pb::GetPoolRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // Nothing was made by the refused calls.
    assert_eq!(code_as(&s, &pki.admin()).await, Ok(0));
}

/// Every RPC of pdiskd, read from its descriptor set, called over mTLS by
/// callers whose role does not allow it: `server` (no rights at all) and
/// `project`, `agent` and `frontend` where the table says no. Each gets
/// PermissionDenied from the gate, and nothing is made or changed.
#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn every_rpc_refuses_each_role_the_table_does_not_allow() {
    require_root();
    let s = Stack::start();
    let pki = TestPki::shared();
    let table = pdisk::authz::TABLE;
    let rpcs = table.rpcs(stratus_proto::FILE_DESCRIPTOR_SET);
    assert!(rpcs.len() >= 20, "{rpcs:?}");
    let mut admin = VolumeServiceClient::new(channel(&s.pdiskd.url()).await);
    admin
        .create_volume(pb::CreateVolumeRequest {
            name: "kept".into(),
            size_bytes: 16 << 20,
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let pool = || async {
        let mut c = VolumeServiceClient::new(channel(&s.pdiskd.url()).await);
        let v = c
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let q = c
            .list_quotas(pb::ListQuotasRequest::default())
            .await
            .unwrap()
            .into_inner();
        format!("{v:?} {q:?}")
    };
    let before = pool().await;
    let callers = [
        (
            Role::Server,
            pki.issue(Role::Server, "other-daemon", None, &["127.0.0.1"]),
        ),
        (Role::Project, pki.issue(Role::Project, "astro", None, &[])),
        (Role::Agent, pki.agent()),
        (Role::Frontend, pki.issue(Role::Frontend, "one", None, &[])),
    ];
    let mut wrong = Vec::new();
    let mut refused = 0;
    for (role, files) in &callers {
        let ch = channel_as(&s.pdiskd.url(), files).await;
        for m in &rpcs {
            if table.decision(m, *role).is_ok() {
                continue;
            }
            let got = call_empty(ch.clone(), pdisk::authz::SERVICE, m, m == "UploadVolume").await;
            refused += 1;
            if got != tonic::Code::PermissionDenied {
                wrong.push(format!("{m} by {role}: {got:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused by the gate:\n{}",
        wrong.join("\n")
    );
    // Every RPC at least once (a server certificate may call none).
    assert!(refused >= rpcs.len(), "{refused} refusals");
    assert_eq!(pool().await, before, "a refused call changed something");
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn root_is_admin_on_the_local_socket_and_the_cli_uses_it() {
    require_root();
    let s = Stack::start();
    let path = s.pdiskd.local_socket.clone();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{}", path.display());
    let url = format!("unix:{}", path.display());
    let mut c = VolumeServiceClient::new(channel(&url).await);
    c.create_volume(pb::CreateVolumeRequest {
        name: "local1".into(),
        size_bytes: 1 << 20,
        ..Default::default()
    })
    .await
    .unwrap();
    let pool = c
        .get_pool(pb::GetPoolRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(pool.capacity_bytes > 0);
    // The CLI over the socket, no certificate flags.
    let out = std::process::Command::new(bin("pdisk"))
        .args(["--server", &url, "--json", "volume", "list"])
        .env_remove("STRATUS_CERT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("local1"));
    // https without certificate flags is a usage error naming them.
    let out = std::process::Command::new(bin("pdisk"))
        .args(["--server", &s.pdiskd.url(), "volume", "list"])
        .env_remove("STRATUS_CERT")
        .env_remove("STRATUS_KEY")
        .env_remove("STRATUS_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cert"));
}

#[tokio::test]
#[ignore = "needs root: run by scripts/test"]
async fn sighup_rotates_the_certificate_and_keeps_open_streams() {
    require_root();
    let s = Stack::start();
    let pki = TestPki::shared();
    let url = s.pdiskd.url();
    let served_serial = || async {
        // The certificate a fresh handshake gets.
        let cfg = client_config(
            &std::fs::read_to_string(pki.ca_path()).unwrap(),
            Some((
                &std::fs::read_to_string(pki.admin().cert).unwrap(),
                &std::fs::read_to_string(pki.admin().key).unwrap(),
            )),
        );
        let tcp = tokio::net::TcpStream::connect(s.pdiskd.listen)
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    let before = served_serial().await;

    // A stream opened before the rotation.
    let mut old = VolumeServiceClient::new(channel(&url).await);
    let mut progress = old
        .watch_progress(pb::WatchProgressRequest {
            request_id: "rotation-1".into(),
            project: String::new(),
        })
        .await
        .unwrap()
        .into_inner();

    // Rotate: a new certificate for the same host, written in place; SIGHUP.
    let new = pki.issue(Role::Server, "pdiskd-rotated", None, &["127.0.0.1"]);
    std::fs::copy(&new.key, &s.pdiskd.tls.key).unwrap();
    std::fs::copy(&new.cert, &s.pdiskd.tls.cert).unwrap();
    // SAFETY: kill(2) of the test's own child process.
    assert_eq!(
        unsafe { libc::kill(s.pdiskd.pid() as i32, libc::SIGHUP) },
        0
    );
    wait_for("the reload", Duration::from_secs(10), || {
        s.pdiskd
            .log_text()
            .contains("TLS certificate, key and client CA reloaded")
            .then_some(())
    });
    let after = served_serial().await;
    assert_ne!(before, after, "new handshakes get the new certificate");
    assert_eq!(
        after,
        stratus_pki::tls::first_cert_der(&std::fs::read(&new.cert).unwrap())
            .unwrap()
            .to_vec()
    );

    // The old connection still works, and its stream sees an operation
    // started after the rotation over a new connection.
    let mut fresh = VolumeServiceClient::new(channel(&url).await);
    fresh
        .create_volume(pb::CreateVolumeRequest {
            name: "after-rotation".into(),
            size_bytes: 1 << 20,
            request_id: "rotation-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let last = tokio::time::timeout(Duration::from_secs(30), async {
        let mut last = None;
        while let Some(p) = progress.message().await.unwrap() {
            let done = p.finished;
            last = Some(p);
            if done {
                break;
            }
        }
        last
    })
    .await
    .expect("the old stream delivers the progress")
    .expect("at least one progress message");
    assert!(last.finished, "{last:?}");
    let n = old
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes
        .len();
    assert_eq!(n, 1);

    // A broken certificate file: the reload fails and the old one stays.
    std::fs::write(&s.pdiskd.tls.cert, "not a certificate").unwrap();
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(s.pdiskd.pid() as i32, libc::SIGHUP) },
        0
    );
    wait_for("the failed reload", Duration::from_secs(10), || {
        s.pdiskd
            .log_text()
            .contains("TLS reload failed")
            .then_some(())
    });
    assert_eq!(served_serial().await, after);
}

/// A Python virtualenv with grpcio and grpcio-reflection from PyPI, made
/// once in the workspace's var/ (what a front-end in Python would install).
fn python_with_grpcio() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join("var/py-grpc");
    let python = venv.join("bin/python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", "import grpc, grpc_reflection"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap()
            .success()
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "grpcio", "grpcio-reflection"])
                .status()
                .unwrap()
                .success();
        assert!(ok && ready(), "cannot install grpcio in {}", venv.display());
    }
    python
}

#[tokio::test]
#[ignore = "needs root and PyPI: run by scripts/test"]
async fn a_python_grpcio_client_with_only_reflection_v1alpha_creates_and_lists_volumes() {
    require_root();
    let python = python_with_grpcio();
    let s = Stack::start();
    let admin = TestPki::shared().admin();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/reflection_client.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(s.pdiskd.listen.to_string())
        .arg(&admin.ca)
        .arg(&admin.cert)
        .arg(&admin.key)
        .arg("from-python")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(services.contains(&"pdisk.v1.VolumeService"), "{v}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{v}");
    assert_eq!(v["created"]["name"], "from-python", "{v}");
    assert_eq!(v["volumes"], serde_json::json!(["from-python"]), "{v}");
    // The volume is real: the Rust admin sees it too.
    assert_eq!(code_as(&s, &admin).await, Ok(1));
}
