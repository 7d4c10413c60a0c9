//! The listeners of a daemon, merged into one stream of connections for
//! tonic, each connection carrying its [`Caller`]:
//!
//! - mTLS on `--listen` (TLS 1.3, client certificate required, identity from
//!   the certificate's SAN URIs);
//! - the local Unix socket (mode 0660, group `stratus`): the peer's uid from
//!   SO_PEERCRED, root or a member of the group being an admin;
//! - `--insecure-listen`: plain TCP, loopback only, callers are admins.
//!
//! TLS handshakes run in their own tasks (a slow or silent client never
//! holds up the others), bounded by [`HANDSHAKE_TIMEOUT`]. Reloading the TLS
//! settings ([`ReloadableServerConfig::reload`], on SIGHUP) changes what new
//! handshakes use; established connections and their streams are untouched.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::identity::{Caller, Identity, Transport};
use crate::tls::{ReloadableServerConfig, TlsFiles};

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The group whose members are admins on a daemon's local socket.
pub const LOCAL_GROUP: &str = "stratus";

/// The serving flags pdiskd and agentd share, flattened into each daemon's
/// flags (`#[command(flatten)]`, `#[serde(flatten)]`): the TOML keys are the
/// flags' names with `_` for `-`, at the top level of the daemon's file.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, serde::Deserialize)]
#[serde(default)]
pub struct ServeFlags {
    /// mTLS gRPC listen address; needs --tls-cert, --tls-key and
    /// --tls-client-ca [default when they are given: 127.0.0.1:7400 for
    /// pdiskd, 127.0.0.1:7401 for agentd]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// This daemon's certificate (PEM), served to clients (agentd also
    /// presents it to pdiskd); reloaded on SIGHUP
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This daemon's private key (PEM), reloaded on SIGHUP
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cloud's CA (PEM): verifies client certificates (and, for agentd,
    /// pdiskd's); reloaded on SIGHUP
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// The local admin socket ("none": no local socket)
    /// [default: /run/stratus/pdiskd.sock or /run/stratus/agentd.sock]
    #[arg(long, value_name = "PATH")]
    pub local_socket: Option<PathBuf>,
    /// Group of the local socket whose members are admins [default: stratus]
    #[arg(long, value_name = "GROUP")]
    pub local_group: Option<String>,
    /// Also serve plain-text gRPC on this loopback address (no TLS; every
    /// caller is an admin): for tests and benchmarks only
    #[arg(long, value_name = "ADDR")]
    pub insecure_listen: Option<SocketAddr>,
    /// Also write every mutating call's audit record to this file, as JSON
    /// Lines (appended, mode 0600, fsync'd in batches); the same records
    /// are logged at info with target `audit` either way
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no
    /// authentication: loopback or a management network) [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ServeFlags {
    /// These flags over the settings file's (`file`) over the daemon's
    /// defaults, checked: see [`ServeSettings::resolve`].
    pub fn resolve(
        &self,
        file: &ServeFlags,
        default_listen: SocketAddr,
        default_socket: &Path,
    ) -> Result<ServeSettings, String> {
        let tls = TlsFiles::from_parts(
            self.tls_cert.clone().or(file.tls_cert.clone()),
            self.tls_key.clone().or(file.tls_key.clone()),
            self.tls_client_ca.clone().or(file.tls_client_ca.clone()),
            ["tls-cert", "tls-key", "tls-client-ca"],
        )?;
        ServeSettings::resolve(
            self.listen.or(file.listen),
            default_listen,
            tls,
            Some(
                self.local_socket
                    .clone()
                    .or(file.local_socket.clone())
                    .unwrap_or_else(|| default_socket.to_path_buf()),
            ),
            self.local_group.clone().or(file.local_group.clone()),
            self.insecure_listen.or(file.insecure_listen),
        )
        .map(|s| ServeSettings {
            audit_log: self.audit_log.clone().or(file.audit_log.clone()),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            ..s
        })
    }
}

/// Where and how a daemon listens (resolved from flags and TOML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSettings {
    /// mTLS listener and its files (both or neither).
    pub mtls: Option<(SocketAddr, TlsFiles)>,
    /// The local Unix socket.
    pub local_socket: Option<PathBuf>,
    /// The group of the local socket whose members are admins.
    pub local_group: String,
    /// Plain TCP on loopback.
    pub insecure_listen: Option<SocketAddr>,
    /// The JSON Lines audit file (`crate::audit`), if any.
    pub audit_log: Option<PathBuf>,
    /// Where `/metrics` is served (`crate::metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl ServeSettings {
    /// Checks and combines a daemon's serving flags. `listen` without TLS
    /// files is an error (no plain TCP by accident), as is an insecure
    /// address off loopback.
    pub fn resolve(
        listen: Option<SocketAddr>,
        default_listen: SocketAddr,
        tls: Option<TlsFiles>,
        local_socket: Option<PathBuf>,
        local_group: Option<String>,
        insecure_listen: Option<SocketAddr>,
    ) -> Result<ServeSettings, String> {
        let mtls = match (listen, tls) {
            (l, Some(files)) => Some((l.unwrap_or(default_listen), files)),
            (Some(l), None) => {
                return Err(format!(
                    "listen address {l} needs --tls-cert, --tls-key and --tls-client-ca \
                     (plain TCP only with --insecure-listen on loopback)"
                ))
            }
            (None, None) => None,
        };
        if let Some(a) = insecure_listen {
            if !a.ip().is_loopback() {
                return Err(format!(
                    "--insecure-listen {a}: plain TCP is allowed on loopback only"
                ));
            }
        }
        let local_socket = local_socket.filter(|p| p.as_os_str() != "none");
        if mtls.is_none() && local_socket.is_none() && insecure_listen.is_none() {
            return Err(
                "nothing to listen on: give --tls-* files, a local socket or \
                        --insecure-listen"
                    .into(),
            );
        }
        Ok(ServeSettings {
            mtls,
            local_socket,
            local_group: local_group.unwrap_or_else(|| LOCAL_GROUP.to_owned()),
            insecure_listen,
            audit_log: None,
            metrics_listen: None,
        })
    }
}

/// One accepted connection of any listener.
pub enum Conn {
    Tls(Box<TlsStream<TcpStream>>, Caller),
    Local(UnixStream, Caller),
    Plain(TcpStream, Caller),
}

impl Conn {
    pub fn caller(&self) -> &Caller {
        match self {
            Conn::Tls(_, c) | Conn::Local(_, c) | Conn::Plain(_, c) => c,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller().clone()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Tls($s, _) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Conn::Local($s, _) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Plain($s, _) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tls(s, _) => s.is_write_vectored(),
            Conn::Local(s, _) => s.is_write_vectored(),
            Conn::Plain(s, _) => s.is_write_vectored(),
        }
    }
}

/// A daemon's bound listeners.
pub struct Listeners {
    rx: mpsc::Receiver<io::Result<Conn>>,
    tls: Option<Arc<ReloadableServerConfig>>,
    /// What is listening, for the daemon's ready line.
    pub description: Vec<String>,
}

impl Listeners {
    /// Binds every listener of `settings` and starts accepting.
    pub async fn bind(settings: &ServeSettings) -> anyhow::Result<Listeners> {
        let (tx, rx) = mpsc::channel(64);
        let mut description = Vec::new();
        let mut tls = None;
        // The local socket first: whoever sees the TCP port answer (testkit,
        // systemd's socket checks, an operator) finds the socket there too,
        // with its mode and group already set.
        if let Some(path) = &settings.local_socket {
            let listener = bind_local(path, &settings.local_group)?;
            description.push(format!("unix:{}", path.display()));
            tokio::spawn(accept_local(
                listener,
                settings.local_group.clone(),
                tx.clone(),
            ));
        }
        if let Some((addr, files)) = &settings.mtls {
            let config = Arc::new(ReloadableServerConfig::load(files.clone())?);
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            description.push(format!("mtls://{}", listener.local_addr()?));
            tokio::spawn(accept_tls(listener, config.clone(), tx.clone()));
            tls = Some(config);
        }
        if let Some(addr) = settings.insecure_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            description.push(format!("insecure-tcp://{}", listener.local_addr()?));
            tokio::spawn(accept_plain(listener, tx.clone()));
        }
        Ok(Listeners {
            rx,
            tls,
            description,
        })
    }

    /// The TLS settings SIGHUP reloads (None without an mTLS listener).
    pub fn tls(&self) -> Option<Arc<ReloadableServerConfig>> {
        self.tls.clone()
    }

    /// The connections, for `serve_with_incoming_shutdown`.
    pub fn incoming(self) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
        tokio_stream::wrappers::ReceiverStream::new(self.rx)
    }
}

/// Reloads the TLS files on every SIGHUP, for as long as the daemon runs.
pub fn reload_on_sighup(tls: Option<Arc<ReloadableServerConfig>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match &tls {
                None => tracing::info!("SIGHUP: no TLS listener, nothing to reload"),
                Some(t) => match t.reload() {
                    Ok(()) => tracing::info!(
                        cert = %t.files().cert.display(),
                        "SIGHUP: TLS certificate, key and client CA reloaded; new handshakes use them"
                    ),
                    Err(e) => tracing::error!(
                        "SIGHUP: TLS reload failed, the previous certificate stays in use: {e:#}"
                    ),
                },
            }
        }
    });
    Ok(())
}

/// Accept errors (EMFILE, ENFILE) are waited out instead of ending the loop.
async fn pause_after(e: &io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn accept_tls(
    listener: TcpListener,
    config: Arc<ReloadableServerConfig>,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                pause_after(&e).await;
                continue;
            }
        };
        // TCP_NODELAY: without it the last segment of every answer waits
        // for the client's delayed ACK, 40 ms per call (stratus-bench found it).
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(config.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| "no client certificate".to_owned())
                .and_then(|der| Identity::from_certificate_der(der).map_err(|e| e.to_string()));
            if let Err(why) = &identity {
                tracing::info!(%peer, "client certificate names no identity: {why}");
            }
            let caller = Caller {
                transport: Transport::Mtls,
                identity,
            };
            let _ = tx.send(Ok(Conn::Tls(Box::new(tls), caller))).await;
        });
    }
}

async fn accept_plain(listener: TcpListener, tx: mpsc::Sender<io::Result<Conn>>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                let caller = Caller::admin(Transport::InsecureTcp, "insecure-tcp");
                if tx.send(Ok(Conn::Plain(tcp, caller))).await.is_err() {
                    return;
                }
            }
            Err(e) => pause_after(&e).await,
        }
    }
}

async fn accept_local(listener: UnixListener, group: String, tx: mpsc::Sender<io::Result<Conn>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let caller = match stream.peer_cred() {
                    Ok(cred) => local_caller(cred.uid(), cred.gid(), &group),
                    Err(e) => Caller {
                        transport: Transport::Local,
                        identity: Err(format!("no peer credentials: {e}")),
                    },
                };
                if tx.send(Ok(Conn::Local(stream, caller))).await.is_err() {
                    return;
                }
            }
            Err(e) => pause_after(&e).await,
        }
    }
}

/// The caller on the local socket: root, or a user whose primary group is
/// `group` or who is listed as its member, is an admin named `local:USER`.
/// Looked up at every connection, so group changes apply at once.
pub fn local_caller(uid: u32, gid: u32, group: &str) -> Caller {
    let user = user_name(uid);
    let label = user.clone().unwrap_or_else(|| format!("uid{uid}"));
    let admin = uid == 0
        || group_of(group).is_some_and(|(ggid, members)| {
            gid == ggid || user.as_ref().is_some_and(|u| members.contains(u))
        });
    if admin {
        // Local names may hold characters certificate names may not.
        Caller::admin(Transport::Local, &format!("local:{label}"))
    } else {
        Caller {
            transport: Transport::Local,
            identity: Err(format!(
                "local user {label} is neither root nor a member of group {group}"
            )),
        }
    }
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data; zeroed is a valid value that getpwuid_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of
    // pwd's string fields below.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name is a NUL-terminated string in buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// The gid and member names of `group`, if it exists.
fn group_of(group: &str) -> Option<(u32, Vec<String>)> {
    let cname = CString::new(group).ok()?;
    let mut buf = vec![0u8; 16384];
    // SAFETY: group is plain data; zeroed is a valid value getgrnam_r overwrites.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the reads below.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    let mut members = Vec::new();
    let mut p = grp.gr_mem;
    // SAFETY: gr_mem is a NULL-terminated array of NUL-terminated strings in buf.
    unsafe {
        while !p.is_null() && !(*p).is_null() {
            members.push(std::ffi::CStr::from_ptr(*p).to_string_lossy().into_owned());
            p = p.add(1);
        }
    }
    Some((grp.gr_gid, members))
}

/// Binds the local socket: its directory made if missing, a stale socket
/// replaced (one a live daemon answers on is not), mode 0660, group `group`
/// when that group exists (else root's group: only root gets in).
fn bind_local(path: &Path, group: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    match group_of(group) {
        Some((gid, _)) => {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("chgrp {group} {}", path.display()))?;
        }
        None => tracing::warn!(
            socket = %path.display(),
            "group {group} does not exist: only root can use the local socket \
             (groupadd --system {group} to let its members in)"
        ),
    }
    Ok(listener)
}

/// The gRPC reflection services of a daemon serving `service` (and the
/// health service), described by `descriptors` (stratus-proto's
/// `FILE_DESCRIPTOR_SET`: this crate stays below it), in both versions:
/// grpcurl and grpcui speak v1, Python's grpcio-reflection and older tools
/// only v1alpha. The descriptor set holds both daemons' protos, so only the
/// services served here are named (a client following reflection would
/// call the other's).
#[allow(clippy::type_complexity)]
pub fn reflection(
    service: &'static str,
    descriptors: &'static [u8],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    const HEALTH: &str = "grpc.health.v1.Health";
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service)
            .with_service_name(HEALTH)
    };
    let v1 = builder().build_v1().context("reflection service")?;
    let v1alpha = builder()
        .build_v1alpha()
        .context("reflection service v1alpha")?;
    Ok((v1, v1alpha))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> TlsFiles {
        TlsFiles {
            cert: "c".into(),
            key: "k".into(),
            ca: "a".into(),
        }
    }

    #[test]
    fn plain_tcp_needs_asking_and_loopback() {
        let d: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let err = ServeSettings::resolve(Some(d), d, None, None, None, None).unwrap_err();
        assert!(err.contains("--insecure-listen"), "{err}");
        let err = ServeSettings::resolve(
            None,
            d,
            None,
            None,
            None,
            Some("0.0.0.0:7400".parse().unwrap()),
        )
        .unwrap_err();
        assert!(err.contains("loopback only"), "{err}");
        let ok = ServeSettings::resolve(
            None,
            d,
            None,
            None,
            None,
            Some("[::1]:7400".parse().unwrap()),
        )
        .unwrap();
        assert!(ok.mtls.is_none());
        let tls = ServeSettings::resolve(None, d, Some(files()), None, None, None).unwrap();
        assert_eq!(tls.mtls.unwrap().0, d);
        assert!(ServeSettings::resolve(None, d, None, Some("none".into()), None, None).is_err());
    }

    #[test]
    fn root_is_a_local_admin_and_strangers_are_not() {
        let root = local_caller(0, 0, "no-such-group-here");
        assert_eq!(root.identity.unwrap().role, crate::identity::Role::Admin);
        let stranger = local_caller(4_000_000, 4_000_000, "no-such-group-here");
        assert!(stranger.identity.is_err());
        // Primary group membership counts (root's group exists everywhere).
        let by_group = local_caller(4_000_000, 0, "root");
        assert!(by_group.identity.is_ok());
    }
}
