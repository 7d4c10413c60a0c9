//! TLS for live migration's stream (issue 15): both QEMUs get a
//! `tls-creds-x509` object made from the host's own PKI (agentd's
//! `--tls-cert`, `--tls-key`, `--tls-client-ca`), the destination as the
//! TLS server (`server-cert.pem`, verifying the source's certificate
//! against the CA), the source as the client (`client-cert.pem`, checking
//! the destination's certificate and its host name, `tls-hostname`).
//!
//! QEMU runs as the guest's own uid and may not enter the guest's
//! directory (root's, 0700), so agentd writes the files QEMU 7.2 reads
//! into a directory of the guest's uid (0700, files 0600) inside it, opens
//! that directory and hands QEMU the descriptor (`add-fd`): QEMU reads
//! `/proc/self/fd/N/*.pem`. QEMU loads the files when the object is made
//! and never again, so the directory goes right after `object-add`, before
//! any byte of the guest crosses the network: the key is on disk for the
//! few milliseconds it takes, and never in an argv, a log or a reply.
//! [`remove`] also runs at reconciliation, for a crash in between.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::confine::QemuUser;
use crate::qmp::Qmp;
use stratus_core::error::{Error, Result};
use stratus_pki::TlsFiles;

/// The id of the credentials object in both QEMUs.
pub const CREDS_ID: &str = "stratus-migration-tls";
/// The id of the destination's `authz-simple` object: the one client
/// certificate (the source agent's) its QEMU lets in.
pub const AUTHZ_ID: &str = "stratus-migration-authz";

/// Which end of the stream a QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The source: QEMU dials out (TLS client).
    Source,
    /// The destination: QEMU listens (TLS server).
    Destination,
}

impl Endpoint {
    fn qemu(self) -> &'static str {
        match self {
            Endpoint::Source => "client",
            Endpoint::Destination => "server",
        }
    }
    /// The names QEMU 7.2 looks for: certificate, key.
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Endpoint::Source => ("client-cert.pem", "client-key.pem"),
            Endpoint::Destination => ("server-cert.pem", "server-key.pem"),
        }
    }
}

/// RFC 7919's ffdhe2048 group: without `dh-params.pem` a server QEMU
/// generates its own at `object-add`, which takes seconds (and ECDHE is
/// what GnuTLS negotiates anyway).
const FFDHE2048: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// The credentials directory inside guest directory `guest_dir`.
pub fn dir_in(guest_dir: &Path) -> PathBuf {
    guest_dir.join("migration-tls")
}

/// Removes the credentials directory of `guest_dir`, if any.
pub fn remove(guest_dir: &Path) {
    let dir = dir_in(guest_dir);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove migration TLS files");
        }
    }
}

/// Writes the files QEMU reads as `endpoint` into a fresh credentials
/// directory of `guest_dir`, owned by `owner` (None: QEMU runs as root).
pub fn write(
    guest_dir: &Path,
    tls: &TlsFiles,
    endpoint: Endpoint,
    owner: Option<QemuUser>,
) -> Result<PathBuf> {
    let dir = dir_in(guest_dir);
    remove(guest_dir);
    std::fs::create_dir(&dir).map_err(|e| Error::io(dir.display(), e))?;
    if let Some(u) = owner {
        crate::confine::give_to(&dir, u, 0o700)?;
    }
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p.display(), e));
    let (cert, key) = endpoint.files();
    let mut files = vec![
        ("ca-cert.pem", read(&tls.ca)?),
        (cert, read(&tls.cert)?),
        (key, read(&tls.key)?),
    ];
    if endpoint == Endpoint::Destination {
        files.push(("dh-params.pem", FFDHE2048.as_bytes().to_vec()));
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(path.display(), e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(path.display(), e))?;
        if let Some(u) = owner {
            crate::confine::give_to(&path, u, 0o600)?;
        }
    }
    Ok(dir)
}

/// Makes QEMU's credentials object from directory `dir` (see [`write`]),
/// which it reads through a descriptor of agentd's.
pub async fn load(qmp: &Qmp, dir: &Path, endpoint: Endpoint) -> Result<()> {
    let fd: std::os::fd::OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| Error::io(dir.display(), e))?
        .into();
    // A QEMU that migrated before (and failed: the guest stayed) still
    // has its object; the new one replaces it.
    let _ = qmp
        .execute("migrate-set-parameters", Some(json!({"tls-creds": ""})))
        .await;
    qmp.object_del(CREDS_ID).await?;
    let added = qmp.add_fd(fd, None, "migration-tls").await?;
    let made = qmp
        .execute(
            "object-add",
            Some(json!({
                "qom-type": "tls-creds-x509",
                "id": CREDS_ID,
                "dir": format!("/proc/self/fd/{}", added.fd),
                "endpoint": endpoint.qemu(),
                "verify-peer": true,
            })),
        )
        .await;
    // Read at creation: QEMU needs the directory no more.
    let _ = qmp.remove_fd(added.fdset_id).await;
    made.map(drop)
        .map_err(|e| e.context("loading the migration's TLS credentials into QEMU"))
}

/// Gives QEMU `qmp` the credentials of `tls` as `endpoint`: the files
/// written for the guest's uid, loaded, removed again (whatever happened).
pub async fn install(
    qmp: &Qmp,
    guest_dir: &Path,
    tls: &TlsFiles,
    endpoint: Endpoint,
    owner: Option<QemuUser>,
) -> Result<()> {
    let r = async {
        let dir = write(guest_dir, tls, endpoint, owner)?;
        load(qmp, &dir, endpoint).await
    }
    .await;
    remove(guest_dir);
    r
}

/// Lets only the client certificate whose subject is `dn` (see
/// `stratus_pki::Identity::subject_dn`) into destination QEMU `qmp`:
/// any other certificate of the CA is refused at the handshake.
pub async fn allow_only(qmp: &dyn crate::vmm::QmpCommands, dn: &str) -> Result<()> {
    qmp.execute(
        "object-add",
        Some(json!({"qom-type": "authz-simple", "id": AUTHZ_ID, "identity": dn})),
    )
    .await
    .map(drop)
}

/// `migrate-set-parameters` arguments of a migration over TLS, at the
/// source: `host_name` is what the destination's certificate must name.
pub fn source_parameters(host_name: &str) -> serde_json::Value {
    json!({ "tls-creds": CREDS_ID, "tls-hostname": host_name })
}

/// The same at the destination: with `authz` (see [`allow_only`]) only
/// that source gets in.
pub fn destination_parameters(authz: bool) -> serde_json::Value {
    let mut p = json!({ "tls-creds": CREDS_ID });
    if authz {
        p["tls-authz"] = json!(AUTHZ_ID);
    }
    p
}

/// The TLS files a destination's QEMU listens with when the source sends
/// over TLS (`tls`) or not, given this host's `migration` files (None:
/// `--migration-insecure` or no certificate) and its own certificate
/// `host`. Refused: a TLS source to a host without a certificate, and a
/// plain-TCP source to a host that has TLS on (it would accept guest
/// memory anyone on the network may have read or changed).
pub fn for_incoming(
    tls: bool,
    migration: Option<&TlsFiles>,
    host: Option<&TlsFiles>,
) -> Result<Option<TlsFiles>> {
    match (tls, migration) {
        (true, files) => files.or(host).cloned().map(Some).ok_or_else(|| {
            Error::precondition(
                "the source migrates over TLS and this host has no certificate (agentd --tls-cert)",
            )
        }),
        (false, None) => Ok(None),
        (false, Some(_)) => Err(Error::precondition(
            "this host takes migrations over TLS only and the source runs with \
             --migration-insecure (give it to this host's agentd too, on a trusted network)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tls_files(dir: &Path) -> TlsFiles {
        for (n, t) in [("c.pem", "CERT"), ("k.pem", "KEY"), ("ca.pem", "CA")] {
            std::fs::write(dir.join(n), t).unwrap();
        }
        TlsFiles {
            cert: dir.join("c.pem"),
            key: dir.join("k.pem"),
            ca: dir.join("ca.pem"),
        }
    }

    #[test]
    fn each_end_gets_the_files_qemu_reads_private_and_they_go_again() {
        let t = tempfile::tempdir().unwrap();
        let tls = tls_files(t.path());
        let guest = t.path().join("guest");
        std::fs::create_dir(&guest).unwrap();
        let dir = write(&guest, &tls, Endpoint::Destination, None).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ca-cert.pem",
                "dh-params.pem",
                "server-cert.pem",
                "server-key.pem"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("server-key.pem")).unwrap(),
            "KEY"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("server-key.pem")), 0o600);
        // A second write replaces a leftover whole (the other end's names).
        let dir = write(&guest, &tls, Endpoint::Source, None).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ca-cert.pem", "client-cert.pem", "client-key.pem"]);
        remove(&guest);
        assert!(!dir.exists());
        remove(&guest);
    }

    #[test]
    fn a_destination_listens_as_the_source_sends_or_refuses() {
        let t = tempfile::tempdir().unwrap();
        let files = tls_files(t.path());
        // TLS on both: the host's files.
        assert_eq!(
            for_incoming(true, Some(&files), Some(&files)).unwrap(),
            Some(files.clone())
        );
        // An insecure destination still speaks TLS to a source that does.
        assert_eq!(
            for_incoming(true, None, Some(&files)).unwrap(),
            Some(files.clone())
        );
        let e = for_incoming(true, None, None).unwrap_err();
        assert!(e.to_string().contains("--tls-cert"), "{e}");
        // Plain TCP only where the destination allows it too.
        assert_eq!(for_incoming(false, None, Some(&files)).unwrap(), None);
        let e = for_incoming(false, Some(&files), Some(&files)).unwrap_err();
        assert_eq!(e.kind(), stratus_core::error::ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("--migration-insecure"), "{e}");
    }

    #[test]
    fn the_source_names_the_host_it_checks() {
        assert_eq!(
            source_parameters("10.0.0.2"),
            json!({"tls-creds": CREDS_ID, "tls-hostname": "10.0.0.2"})
        );
        assert_eq!(
            destination_parameters(true),
            json!({"tls-creds": CREDS_ID, "tls-authz": AUTHZ_ID})
        );
    }
}
