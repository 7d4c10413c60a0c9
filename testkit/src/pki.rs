//! Certificates for tests: one CA per test process and the certificates the
//! harness's daemons and clients use, made in process with stratus-pki's
//! library (no binary needed, so this also works inside the lab VM).
//!
//! The files live in `/tmp/stratus-testkit-pki.<pid>`; directories of test
//! processes that have ended are removed when the next one starts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use stratus_pki::identity::{Identity, Role};
use stratus_pki::issue::{self, Issued, Request};
use stratus_pki::TlsFiles;
use tonic::transport::Channel;

use crate::INITIATOR;

/// The test process's CA and its standard certificates.
pub struct TestPki {
    pub dir: PathBuf,
    ca: Issued,
    /// The file names issued so far: tests of one process run in parallel
    /// and may issue the same identity, so a file is never replaced (one
    /// test would read another's key beside its own certificate).
    bases: Mutex<HashSet<String>>,
}

/// The name of the agent certificate's holder (role agent).
pub const AGENT_NAME: &str = "test-host";

impl TestPki {
    /// The process-wide test PKI: CA, `server-pdiskd` (127.0.0.1, localhost),
    /// `agent-test-host` (bound to [`INITIATOR`], serving on 127.0.0.1) and
    /// `admin-test`.
    pub fn shared() -> &'static TestPki {
        static PKI: OnceLock<TestPki> = OnceLock::new();
        PKI.get_or_init(|| {
            remove_stale_dirs();
            let dir = PathBuf::from(format!("/tmp/stratus-testkit-pki.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let ca = issue::init_dir(&dir, "Stratus test CA", 2).expect("test CA");
            let pki = TestPki {
                dir,
                ca,
                bases: Mutex::new(HashSet::new()),
            };
            // The migration addresses: the "two hosts" of agent/tests/migrate.rs.
            pki.issue(
                Role::Server,
                "pdiskd",
                None,
                &["127.0.0.1", "localhost", crate::MIGRATION_HOST_A],
            );
            pki.issue(
                Role::Agent,
                AGENT_NAME,
                Some(INITIATOR),
                &["127.0.0.1", "localhost", crate::MIGRATION_HOST_A],
            );
            pki.issue(Role::Admin, "test", None, &[]);
            pki
        })
    }

    pub fn ca_path(&self) -> PathBuf {
        issue::ca_cert_path(&self.dir)
    }

    /// Issues `ROLE-NAME.pem/.key` (`ROLE-NAME.N.pem/.key` when those exist
    /// already: files are never replaced) and returns the files.
    pub fn issue(&self, role: Role, name: &str, iqn: Option<&str>, hosts: &[&str]) -> TlsFiles {
        let identity = Identity {
            role,
            name: name.to_owned(),
            iqn: iqn.map(str::to_owned),
        };
        let hosts = hosts.iter().map(|h| h.to_string()).collect();
        let issued = issue::issue(&self.ca, &Request::new(identity, hosts, 2)).expect("issuing");
        let base = {
            let mut bases = self.bases.lock().unwrap();
            let first = format!("{role}-{name}");
            let base = (0..)
                .map(|n| match n {
                    0 => first.clone(),
                    n => format!("{first}.{n}"),
                })
                .find(|b| !bases.contains(b))
                .expect("a free name");
            bases.insert(base.clone());
            base
        };
        self.write(&base, &issued)
    }

    /// Writes a certificate issued by hand (e.g. an expired one) as `base`.
    pub fn write(&self, base: &str, issued: &Issued) -> TlsFiles {
        let cert = self.dir.join(format!("{base}.pem"));
        let key = self.dir.join(format!("{base}.key"));
        issue::write_new(&key, &issued.key_pem, 0o600, true).unwrap();
        issue::write_new(&cert, &issued.cert_pem, 0o644, true).unwrap();
        TlsFiles {
            cert,
            key,
            ca: self.ca_path(),
        }
    }

    /// The CA (to issue certificates with odd validity in tests).
    pub fn ca(&self) -> &Issued {
        &self.ca
    }

    /// The files of the standard certificate `ROLE-NAME`.
    pub fn files(&self, base: &str) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join(format!("{base}.pem")),
            key: self.dir.join(format!("{base}.key")),
            ca: self.ca_path(),
        }
    }

    pub fn admin(&self) -> TlsFiles {
        self.files("admin-test")
    }

    pub fn pdiskd(&self) -> TlsFiles {
        self.files("server-pdiskd")
    }

    pub fn agent(&self) -> TlsFiles {
        self.files(&format!("agent-{AGENT_NAME}"))
    }
}

/// Copies `files` into `dir` (server.pem, server.key, ca.pem), so one
/// daemon's certificate can be rotated without touching the others'.
pub fn own_copy(files: &TlsFiles, dir: &Path) -> TlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let own = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: dir.join("ca.pem"),
    };
    std::fs::copy(&files.cert, &own.cert).unwrap();
    std::fs::copy(&files.key, &own.key).unwrap();
    std::fs::copy(&files.ca, &own.ca).unwrap();
    own
}

/// `--tls-cert C --tls-key K --tls-client-ca CA` for a daemon.
pub fn daemon_tls_args(files: &TlsFiles) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        files.cert.display().to_string(),
        "--tls-key".into(),
        files.key.display().to_string(),
        "--tls-client-ca".into(),
        files.ca.display().to_string(),
    ]
}

/// `--cert C --key K --ca CA` for a CLI.
pub fn cli_tls_args(files: &TlsFiles) -> Vec<String> {
    vec![
        "--cert".into(),
        files.cert.display().to_string(),
        "--key".into(),
        files.key.display().to_string(),
        "--ca".into(),
        files.ca.display().to_string(),
    ]
}

/// A channel to the daemon at `url` (`https://`, `unix:` or `http://`) as
/// the test admin.
pub async fn channel(url: &str) -> Channel {
    channel_as(url, &TestPki::shared().admin()).await
}

/// A channel to the daemon at `url` with the certificate `files`.
pub async fn channel_as(url: &str, files: &TlsFiles) -> Channel {
    stratus_pki::Dialer::from_address(url, Some(files))
        .unwrap_or_else(|e| panic!("dialer for {url}: {e:#}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e:#}"))
}

fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("stratus-testkit-pki.") {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Calls `/SERVICE/METHOD` on `channel` with an empty request message (every
/// field at its default) and returns the status code it got back, whatever
/// the method's message types: for checking that a caller is refused every
/// RPC of a service, read from its descriptor set, before any handler runs.
/// Client-streaming methods get a stream of one empty message.
pub async fn call_empty(
    channel: Channel,
    service: &str,
    method: &str,
    client_streaming: bool,
) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready for {service}/{method}: {e}");
    }
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/{service}/{method}").parse().expect("a gRPC path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let got = if client_streaming {
        let one = tokio_stream::iter(vec![()]);
        grpc.client_streaming(tonic::Request::new(one), path, codec)
            .await
            .map(|_| ())
    } else {
        // A server-streaming method refused by the gate answers with its
        // status at once; a unary call reads it the same way.
        grpc.unary(tonic::Request::new(()), path, codec)
            .await
            .map(|_| ())
    };
    match got {
        Ok(()) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}
