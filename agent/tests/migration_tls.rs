//! The migration stream's TLS against real QEMUs and real GnuTLS
//! (integration tier: QEMU, root, no guest image). Two QEMUs on loopback,
//! the destination waiting with `-incoming defer`, each given its
//! credentials the way agentd does ([`agent::migration_tls::install`]:
//! files of the guest's uid in a root-only guest directory, read by QEMU
//! through a descriptor, removed once loaded), from certificates
//! stratus-pki issues. A migration between two agents of one CA
//! completes; a destination whose certificate another CA signed, a source
//! sending plain TCP, a source expecting another host name, and another
//! agent of the same CA than the one the destination waits for all fail,
//! and the source's guest keeps running.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::confine::QemuUser;
use agent::migration_tls::{self, Endpoint};
use agent::qmp::Qmp;
use serde_json::{json, Value};
use stratus_pki::identity::{Identity, Role};
use stratus_pki::issue::{self, Request};
use stratus_pki::TlsFiles;
use testkit::TestPki;

const WAIT: Duration = Duration::from_secs(30);
/// The uid the test's QEMUs run as (as agentd's confined guests do).
const GUEST_UID: u32 = 64_990;

/// A guest's QEMU (TCG, 32 MiB, no disk) running as [`GUEST_UID`], with
/// a root-only guest directory like agentd's; killed on drop.
struct Guest {
    child: Child,
    qmp: Qmp,
    /// The guest's directory (root's, 0700).
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Guest {
    async fn start(incoming: bool) -> Guest {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("guest");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // QEMU makes its QMP socket where its uid may write.
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = run.join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "32",
            "-nodefaults",
        ])
        .args(["-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .uid(GUEST_UID)
        .gid(GUEST_UID);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let child = cmd.spawn().expect("qemu-system-x86_64 is installed");
        let (qmp, _events) = Qmp::connect(&socket, WAIT).await.unwrap();
        Guest {
            child,
            qmp,
            dir,
            _tmp: tmp,
        }
    }

    async fn tls(&self, tls: &TlsFiles, endpoint: Endpoint) {
        let owner = QemuUser {
            uid: GUEST_UID,
            gid: GUEST_UID,
        };
        migration_tls::install(&self.qmp, &self.dir, tls, endpoint, Some(owner))
            .await
            .unwrap();
        assert!(
            !migration_tls::dir_in(&self.dir).exists(),
            "the key stayed on disk"
        );
    }

    async fn running(&self) -> bool {
        self.qmp.query_status().await.unwrap().running
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The subject of agent `name`'s certificate.
fn agent_dn(name: &str) -> String {
    Identity {
        role: Role::Agent,
        name: name.into(),
        iqn: None,
    }
    .subject_dn()
}

/// Migrates `src` to `dst` (each with TLS files or plain; the destination
/// letting in only agent `allowed`), the source checking `host_name`;
/// `query-migrate`'s last answer on the source.
async fn migrate(
    src: &Guest,
    src_tls: Option<&TlsFiles>,
    dst: &Guest,
    dst_tls: Option<&TlsFiles>,
    host_name: &str,
    allowed: &str,
) -> Value {
    let port = free_port();
    if let Some(t) = dst_tls {
        dst.tls(t, Endpoint::Destination).await;
        migration_tls::allow_only(&dst.qmp, &agent_dn(allowed))
            .await
            .unwrap();
        dst.qmp
            .execute(
                "migrate-set-parameters",
                Some(migration_tls::destination_parameters(true)),
            )
            .await
            .unwrap();
    }
    dst.qmp
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
        )
        .await
        .unwrap();
    if let Some(t) = src_tls {
        src.tls(t, Endpoint::Source).await;
        src.qmp
            .execute(
                "migrate-set-parameters",
                Some(migration_tls::source_parameters(host_name)),
            )
            .await
            .unwrap();
    }
    src.qmp
        .execute(
            "migrate",
            Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let info = src.qmp.execute("query-migrate", None).await.unwrap();
        let status = info["status"].as_str().unwrap_or_default().to_string();
        if ["completed", "failed", "cancelled"].contains(&status.as_str()) {
            return info;
        }
        assert!(Instant::now() < deadline, "migration hangs: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An agent certificate of a CA of its own, in `dir`.
fn other_ca_agent(dir: &Path) -> TlsFiles {
    let ca = issue::init_dir(dir, "Another CA", 2).unwrap();
    let identity = Identity {
        role: Role::Agent,
        name: "impostor".into(),
        iqn: None,
    };
    let issued = issue::issue(&ca, &Request::new(identity, vec!["127.0.0.1".into()], 2)).unwrap();
    let files = TlsFiles {
        cert: dir.join("impostor.pem"),
        key: dir.join("impostor.key"),
        ca: issue::ca_cert_path(dir),
    };
    std::fs::write(&files.cert, issued.cert_pem).unwrap();
    std::fs::write(&files.key, issued.key_pem).unwrap();
    files
}

#[tokio::test]
#[ignore = "needs root and qemu-system-x86_64: run by scripts/test"]
async fn the_stream_is_tls_between_agents_of_one_ca_and_nothing_else_gets_through() {
    let pki = TestPki::shared();
    // Both ends as agentd's certificates are issued (role agent, serving
    // on an address): stratus-pki's key usages suit QEMU's GnuTLS.
    let a = pki.issue(Role::Agent, "mig-a", None, &["127.0.0.1"]);
    let b = pki.issue(Role::Agent, "mig-b", None, &["127.0.0.1"]);

    // One CA: the guest moves, over TLS.
    let src = Guest::start(false).await;
    let dst = Guest::start(true).await;
    let info = migrate(&src, Some(&a), &dst, Some(&b), "127.0.0.1", "mig-a").await;
    assert_eq!(info["status"], "completed", "{info}");
    let p = src
        .qmp
        .execute("query-migrate-parameters", None)
        .await
        .unwrap();
    assert_eq!(p["tls-creds"], migration_tls::CREDS_ID, "{p}");
    assert!(dst.running().await, "the guest runs on the destination");

    // A destination another CA vouches for: refused, the guest stays.
    let other = tempfile::tempdir().unwrap();
    let impostor = other_ca_agent(other.path());
    let src = Guest::start(false).await;
    let dst = Guest::start(true).await;
    let info = migrate(&src, Some(&a), &dst, Some(&impostor), "127.0.0.1", "mig-a").await;
    assert_eq!(info["status"], "failed", "{info}");
    assert!(src.running().await);

    // A plain-TCP source to a TLS destination: nothing gets through.
    let src = Guest::start(false).await;
    let dst = Guest::start(true).await;
    let info = migrate(&src, None, &dst, Some(&b), "127.0.0.1", "mig-a").await;
    assert_eq!(info["status"], "failed", "{info}");
    assert!(src.running().await);
    assert!(!dst.running().await);

    // The destination's certificate must name the host the source dials.
    let src = Guest::start(false).await;
    let dst = Guest::start(true).await;
    let info = migrate(&src, Some(&a), &dst, Some(&b), "192.0.2.7", "mig-a").await;
    assert_eq!(info["status"], "failed", "{info}");
    assert!(src.running().await);

    // Another agent of the same CA is not the source the destination
    // waits for: refused (QEMU's tls-authz).
    let c = pki.issue(Role::Agent, "mig-c", None, &["127.0.0.1"]);
    let src = Guest::start(false).await;
    let dst = Guest::start(true).await;
    let info = migrate(&src, Some(&c), &dst, Some(&b), "127.0.0.1", "mig-a").await;
    assert_eq!(info["status"], "failed", "{info}");
    assert!(src.running().await);

    // A source that failed once migrates again with fresh credentials.
    let dst = Guest::start(true).await;
    let info = migrate(&src, Some(&a), &dst, Some(&b), "127.0.0.1", "mig-a").await;
    assert_eq!(info["status"], "completed", "{info}");
}
