//! Projects on a real agentd over mTLS, with certificates from stratus-pki:
//! two projects' guests (both named `web`: names are per project), seen and
//! touched only by their own project's callers and by frontends acting for
//! it, all of them by an admin; each project's WatchEvents carries only its
//! own guests' events; and certificate rotation by SIGHUP keeps an open
//! WatchEvents stream delivering while new handshakes get the new
//! certificate. No guest boots (guests are only defined). Needs root
//! (agentd in a test namespace, pdiskd on an XFS pool with tgtd); run by
//! scripts/test.

use std::sync::Arc;
use std::time::Duration;

use stratus_pki::identity::Role;
use stratus_pki::TlsFiles;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use stratus_proto::pdisk::v1 as pdpb;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use testkit::*;
use tonic::transport::Channel;
use tonic::Code;

const BRIDGE: &str = "stbr0";

fn spec(name: &str, disk: &str) -> pb::VmSpec {
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

/// The certificate a fresh TLS handshake with `addr` is served (DER).
async fn served_certificate(addr: std::net::SocketAddr, client: &TlsFiles) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let ca = std::fs::read(&client.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(stratus_pki::tls::first_cert_der(&ca).unwrap())
        .unwrap();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.err().map(|s| s.code()).unwrap_or(Code::Ok)
}

/// The next event of `s` within 10 s.
async fn next_event(s: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .expect("the stream goes on")
}

/// Every event `s` delivers until it is quiet for `quiet`.
async fn drain(s: &mut tonic::Streaming<pb::Event>, quiet: Duration) -> Vec<pb::Event> {
    let mut out = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(quiet, s.message()).await {
        out.push(e);
    }
    out
}

#[test]
#[ignore = "needs root, tgt and QEMU's tools: run by scripts/test"]
fn projects_see_and_touch_only_their_guests_and_rotation_keeps_event_streams() {
    require_root();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    // agentd's own copy of its certificate, to rotate it.
    let pki = TestPki::shared();
    let own = own_copy(&pki.agent(), &pool.dir.path().join("agentd-tls"));
    let tls_args = daemon_tls_args(&own);
    let extra: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let agentd = Agentd::start_in_with(pool.dir.path(), &ns, &pdiskd.url(), BRIDGE, &extra);

    let astro = pki.issue(Role::Project, "astro", None, &[]);
    let bio = pki.issue(Role::Project, "bio", None, &[]);
    let frontend = pki.issue(Role::Frontend, "one", None, &[]);
    let admin = pki.admin();
    let (pd_url, ag_url, ag_addr, pid) = (pdiskd.url(), agentd.url(), agentd.listen, agentd.pid());
    let log = agentd.log.clone();
    let own_files = own.clone();
    ns.block_on(move || async move {
        let mut pd = VolumeServiceClient::new(channel(&pd_url).await);
        for p in ["astro", "bio"] {
            pd.create_volume(pdpb::CreateVolumeRequest {
                name: "disk".into(),
                size_bytes: 16 << 20,
                project: p.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let client = |files: TlsFiles| {
            let url = ag_url.clone();
            async move { VmServiceClient::new(channel_as(&url, &files).await) }
        };
        let mut a: VmServiceClient<Channel> = client(astro.clone()).await;
        let mut b = client(bio.clone()).await;
        let mut f = client(frontend.clone()).await;
        let mut root = client(admin.clone()).await;

        // astro follows the journal before anything happens.
        let mut a_events = a
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();

        // Both projects define a guest named web (names are per project).
        let web_a = a
            .create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(spec("web", "disk")),
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let web_b = b
            .create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(spec("web", "disk")),
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (web_a.project.as_str(), web_b.project.as_str()),
            ("astro", "bio")
        );
        assert_eq!(
            code(
                a.create_vm(pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(spec("web", "disk")),
                    project: String::new(),
                })
                .await
            ),
            Code::AlreadyExists,
            "within a project a name is unique"
        );

        // astro's stream: its guest's CREATED, nothing of bio's.
        let e = next_event(&mut a_events).await;
        assert_eq!(
            (e.vm_uuid.as_str(), e.project.as_str()),
            (web_a.uuid.as_str(), "astro")
        );
        let more = drain(&mut a_events, Duration::from_millis(500)).await;
        assert!(
            more.iter().all(|e| e.project == "astro"),
            "astro saw another project's events: {more:?}"
        );

        // astro and a frontend acting for astro: bio's guest does not
        // exist, by name or UUID, for any verb.
        let as_astro = [(&mut a, ""), (&mut f, "astro")];
        for (c, project) in as_astro {
            let listed: Vec<String> = c
                .list_vms(pb::ListVmsRequest {
                    project: project.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .vms
                .into_iter()
                .map(|v| v.uuid)
                .collect();
            assert_eq!(listed, vec![web_a.uuid.clone()], "as astro ({project:?})");
            let by_name = c
                .get_vm(pb::VmRequest {
                    request_id: String::new(),
                    vm: "web".into(),
                    project: project.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(by_name.uuid, web_a.uuid, "web is astro's own");
            let vm = || pb::VmRequest {
                request_id: String::new(),
                vm: web_b.uuid.clone(),
                project: project.into(),
            };
            assert_eq!(code(c.get_vm(vm()).await), Code::NotFound);
            assert_eq!(code(c.start_vm(vm()).await), Code::NotFound);
            assert_eq!(code(c.pause_vm(vm()).await), Code::NotFound);
            let stop = pb::StopVmRequest {
                vm: web_b.uuid.clone(),
                project: project.into(),
                ..Default::default()
            };
            assert_eq!(code(c.stop_vm(stop).await), Code::NotFound);
            let destroy = pb::DestroyVmRequest {
                vm: web_b.uuid.clone(),
                project: project.into(),
                ..Default::default()
            };
            assert_eq!(code(c.destroy_vm(destroy).await), Code::NotFound);
            // Its events: none (as for a guest that never existed).
            let replay: Vec<_> = c
                .watch_events(pb::WatchEventsRequest {
                    vm: web_b.uuid.clone(),
                    no_follow: true,
                    project: project.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap()
                .into_iter()
                .collect();
            assert!(replay.is_empty(), "{replay:?}");
        }
        // A tenant may not act in another project.
        assert_eq!(
            code(
                a.get_vm(pb::VmRequest {
                    request_id: String::new(),
                    vm: "web".into(),
                    project: "bio".into(),
                })
                .await
            ),
            Code::PermissionDenied
        );
        // The frontend acting for bio sees bio's web.
        let got = f
            .get_vm(pb::VmRequest {
                request_id: String::new(),
                vm: "web".into(),
                project: "bio".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.uuid, web_b.uuid);

        // The admin sees both; naming no project, "web" is ambiguous.
        let all = root
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms;
        assert_eq!(all.len(), 2, "{all:?}");
        let err = root
            .get_vm(pb::VmRequest {
                request_id: String::new(),
                vm: "web".into(),
                project: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        // bio's guest is untouched.
        let still = root
            .get_vm(pb::VmRequest {
                request_id: String::new(),
                vm: web_b.uuid.clone(),
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(still.state(), pb::VmState::Defined);

        // Rotation: agentd gets a new certificate in place and a SIGHUP.
        let before = served_certificate(ag_addr, &admin).await;
        let new = pki.issue(
            Role::Agent,
            "test-host-rotated",
            Some(INITIATOR),
            &["127.0.0.1", "localhost"],
        );
        std::fs::copy(&new.key, &own_files.key).unwrap();
        std::fs::copy(&new.cert, &own_files.cert).unwrap();
        // SAFETY: kill(2) of the test's own child process.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
        wait_for("agentd's reload", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("TLS certificate, key and client CA reloaded")
                .then_some(())
        });
        let after = served_certificate(ag_addr, &admin).await;
        assert_ne!(before, after, "new handshakes get the new certificate");
        assert_eq!(
            after,
            stratus_pki::tls::first_cert_der(&std::fs::read(&new.cert).unwrap())
                .unwrap()
                .to_vec()
        );
        // astro's stream, opened before the rotation, still delivers: a
        // guest defined over a new connection shows up on it.
        let mut fresh = client(astro.clone()).await;
        let db = fresh
            .create_vm(pb::CreateVmRequest {
                request_id: String::new(),
                spec: Some(spec("db", "disk")),
                project: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let e = next_event(&mut a_events).await;
        assert_eq!(e.vm_uuid, db.uuid, "{e:?}");
        assert_eq!(e.r#type(), pb::EventType::Created);
        // And the old connections still answer.
        let n = a
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .len();
        assert_eq!(n, 2);
    });
    drop(agentd);
    drop(pdiskd);
    drop(tgtd);
}

/// A VM quota holds against 20 clients at once, each with its own mTLS
/// connection as project astro: exactly the quota's guests are made, every
/// other call is ResourceExhausted naming the quota and the usage, and
/// nothing of the refused ones is left (the admin's list, the usage).
#[test]
#[ignore = "needs root, tgt and QEMU's tools: run by scripts/test"]
fn a_vm_quota_holds_against_twenty_concurrent_clients() {
    require_root();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let agentd = Agentd::start_in(pool.dir.path(), &ns, &pdiskd.url(), BRIDGE);
    let astro = TestPki::shared().issue(Role::Project, "astro", None, &[]);
    let (pd_url, ag_url) = (pdiskd.url(), agentd.url());
    ns.block_on(move || async move {
        let mut pd = VolumeServiceClient::new(channel(&pd_url).await);
        pd.create_volume(pdpb::CreateVolumeRequest {
            name: "disk".into(),
            size_bytes: 16 << 20,
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut admin = VmServiceClient::new(channel(&ag_url).await);
        admin
            .set_quota(pb::SetQuotaRequest {
                project: "astro".into(),
                limits: Some(pb::QuotaLimits {
                    vms: Some(3),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(VmServiceClient::new(channel_as(&ag_url, &astro).await));
        }
        let calls = clients.into_iter().enumerate().map(|(i, mut c)| {
            tokio::spawn(async move {
                c.create_vm(pb::CreateVmRequest {
                    request_id: String::new(),
                    spec: Some(spec(&format!("q{i}"), "disk")),
                    project: String::new(),
                })
                .await
            })
        });
        let results = futures::future::join_all(calls).await;
        let mut made = Vec::new();
        for r in results {
            match r.unwrap() {
                Ok(vm) => made.push(vm.into_inner().name),
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    assert!(
                        s.message().contains("VM quota exceeded")
                            && s.message().contains("3 of 3 in use"),
                        "{s:?}"
                    );
                }
            }
        }
        assert_eq!(made.len(), 3, "{made:?}");
        let mut listed: Vec<String> = admin
            .list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .into_iter()
            .map(|v| v.name)
            .collect();
        listed.sort();
        made.sort();
        assert_eq!(listed, made, "only the guests the quota allowed exist");
        let q = admin
            .get_quota(pb::GetQuotaRequest {
                project: "astro".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(q.usage.unwrap().vms, 3);
    });
    drop(agentd);
    drop(pdiskd);
    drop(tgtd);
}

/// The list of services a reflection answer names (v1 or v1alpha: the
/// same messages in two packages).
macro_rules! list_services {
    ($pb:path, $channel:expr) => {{
        use $pb as r;
        let mut c = r::server_reflection_client::ServerReflectionClient::new($channel);
        let req = r::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let msg = c
            .server_reflection_info(futures::stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let Some(r::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
            msg.message_response
        else {
            panic!("unexpected reflection answer {msg:?}");
        };
        let mut names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }};
}

/// agentd serves reflection v1 and v1alpha (what Python's grpcio-reflection
/// speaks), naming only its own service and health, and health, over mTLS
/// and on its local socket; and with
/// `--audit-log` each mutating call, allowed or refused, is one JSON line
/// with the caller, its role and project, the RPC, the object and the
/// outcome, and reads are not audited.
#[test]
#[ignore = "needs root, tgt and QEMU's tools: run by scripts/test"]
fn reflection_health_and_the_audit_log_on_agentd() {
    require_root();
    let ns = NetNs::new();
    ns.add_bridge(BRIDGE);
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let audit = pool.dir.path().join("audit.jsonl");
    let agentd = Agentd::start_in_with(
        pool.dir.path(),
        &ns,
        &pdiskd.url(),
        BRIDGE,
        &["--audit-log", audit.to_str().unwrap()],
    );
    let astro = TestPki::shared().issue(Role::Project, "astro", None, &[]);
    let socket = format!("unix:{}", pool.dir.path().join("agentd.sock").display());
    let (pd_url, ag_url) = (pdiskd.url(), agentd.url());
    ns.block_on(move || async move {
        for url in [ag_url.clone(), socket] {
            let ch = channel(&url).await;
            // Exactly what agentd serves: not pdisk's service, whose proto
            // is in the same descriptor set.
            let want = ["agent.v1.VmService", "grpc.health.v1.Health"];
            let v1 = list_services!(tonic_reflection::pb::v1, ch.clone());
            let v1alpha = list_services!(tonic_reflection::pb::v1alpha, ch.clone());
            assert_eq!(v1, want, "{url}, v1");
            assert_eq!(v1alpha, want, "{url}, v1alpha");
            let st = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "agent.v1.VmService".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                st.status(),
                tonic_health::pb::health_check_response::ServingStatus::Serving,
                "{url}"
            );
        }

        let mut pd = VolumeServiceClient::new(channel(&pd_url).await);
        pd.create_volume(pdpb::CreateVolumeRequest {
            name: "disk".into(),
            size_bytes: 16 << 20,
            project: "astro".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut a = VmServiceClient::new(channel_as(&ag_url, &astro).await);
        a.create_vm(pb::CreateVmRequest {
            request_id: String::new(),
            spec: Some(spec("audited", "disk")),
            project: String::new(),
        })
        .await
        .unwrap();
        a.list_vms(pb::ListVmsRequest::default()).await.unwrap();
        let gone = pb::DestroyVmRequest {
            vm: "never-made".into(),
            ..Default::default()
        };
        assert_eq!(code(a.destroy_vm(gone).await), Code::NotFound);
        let quota = pb::SetQuotaRequest {
            project: "astro".into(),
            ..Default::default()
        };
        assert_eq!(code(a.set_quota(quota).await), Code::PermissionDenied);
    });

    let mut records: Vec<serde_json::Value> = Vec::new();
    wait_for("three audit records", Duration::from_secs(10), || {
        records = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (records.len() >= 3).then_some(())
    });
    let astro_lines: Vec<(String, String, String)> = records
        .iter()
        .filter(|r| r["caller"] == "project/astro")
        .map(|r| {
            assert_eq!(r["role"], "project", "{r}");
            assert!(r["duration_ms"].as_f64().is_some(), "{r}");
            (
                r["rpc"].as_str().unwrap().to_string(),
                r["object"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        astro_lines,
        vec![
            s("agent.v1.VmService/CreateVm", "vm audited", "Ok"),
            s("agent.v1.VmService/DestroyVm", "vm never-made", "NotFound"),
            s("agent.v1.VmService/SetQuota", "", "PermissionDenied"),
        ],
        "{records:#?}"
    );
    let create = records
        .iter()
        .find(|r| r["rpc"] == "agent.v1.VmService/CreateVm")
        .unwrap();
    assert_eq!(create["project"], "astro", "{create}");
    drop(agentd);
    drop(pdiskd);
    drop(tgtd);
}
