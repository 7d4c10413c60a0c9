//! How clients reach a daemon: `unix:/PATH` (or a bare `/PATH`: the local
//! socket), `https://HOST:PORT` (mTLS with the client's certificate) or
//! `http://HOST:PORT` (a daemon's `--insecure-listen`).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::TlsFiles;

/// Where a daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local(PathBuf),
    Mtls { host: String, port: u16 },
    Plain { host: String, port: u16 },
}

impl Target {
    /// `unix:/PATH`, `/PATH`, `https://HOST:PORT`, `http://HOST:PORT`, or
    /// `HOST:PORT` (taken as https).
    pub fn parse(s: &str) -> Result<Target, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            return Ok(Target::Local(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(Target::Local(PathBuf::from(s)));
        }
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if s.contains("://") {
            return Err(format!(
                "{s:?}: expected unix:/PATH, https://HOST:PORT or http://HOST:PORT"
            ));
        } else {
            (true, s)
        };
        let rest = rest.trim_end_matches('/');
        let uri: Uri = format!("http://{rest}")
            .parse()
            .map_err(|e| format!("{s:?}: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("{s:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = uri.port_u16().ok_or_else(|| format!("{s:?} has no port"))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("{s:?}: a server address has no path"));
        }
        Ok(if tls {
            Target::Mtls { host, port }
        } else {
            Target::Plain { host, port }
        })
    }

    /// The URL tonic is given (the connector, not tonic, does TLS).
    fn endpoint_uri(&self) -> String {
        match self {
            Target::Local(_) => "http://localhost".into(),
            Target::Mtls { host, port } | Target::Plain { host, port } => {
                if host.contains(':') {
                    format!("http://[{host}]:{port}")
                } else {
                    format!("http://{host}:{port}")
                }
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Local(p) => write!(f, "unix:{}", p.display()),
            Target::Mtls { .. } => write!(f, "https{}", &self.endpoint_uri()[4..]),
            Target::Plain { .. } => f.write_str(&self.endpoint_uri()),
        }
    }
}

/// A target and, for mTLS, the client's TLS settings: everything needed to
/// open channels to one daemon.
#[derive(Clone)]
pub struct Dialer {
    target: Target,
    tls: Option<Arc<ClientConfig>>,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Dialer {
    /// `tls` is required for an https target and ignored otherwise.
    pub fn new(target: Target, tls: Option<&TlsFiles>) -> anyhow::Result<Dialer> {
        let tls = match (&target, tls) {
            (Target::Mtls { .. }, Some(files)) => Some(Arc::new(files.client_config()?)),
            (Target::Mtls { .. }, None) => bail!(
                "{target} needs a client certificate: --cert, --key and --ca \
                 (or their environment variables)"
            ),
            _ => None,
        };
        Ok(Dialer {
            target,
            tls,
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
        })
    }

    /// An mTLS dialer with TLS settings made by hand (tests of refused
    /// handshakes: no certificate, another CA).
    pub fn with_client_config(target: Target, tls: Arc<ClientConfig>) -> Dialer {
        Dialer {
            target,
            tls: Some(tls),
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
        }
    }

    /// Parses `address` and loads the TLS files.
    pub fn from_address(address: &str, tls: Option<&TlsFiles>) -> anyhow::Result<Dialer> {
        let target = Target::parse(address).map_err(anyhow::Error::msg)?;
        Dialer::new(target, tls)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn with_connect_timeout(mut self, t: Duration) -> Dialer {
        self.connect_timeout = t;
        self
    }

    /// Every call on the channel fails after `t` (unary calls of agentd to pdiskd).
    pub fn with_request_timeout(mut self, t: Duration) -> Dialer {
        self.request_timeout = Some(t);
        self
    }

    fn endpoint(&self) -> Endpoint {
        let e = Endpoint::from_shared(self.target.endpoint_uri())
            .expect("a parsed target makes a valid URI")
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        match self.request_timeout {
            Some(t) => e.timeout(t),
            None => e,
        }
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<Box<dyn Io>>,
        Error = io::Error,
        Future = DialFuture,
    > + Clone
           + Send
           + 'static {
        let target = self.target.clone();
        let tls = self.tls.clone();
        tower::service_fn(move |_: Uri| {
            let target = target.clone();
            let tls = tls.clone();
            Box::pin(async move { dial(&target, tls).await.map(TokioIo::new) }) as DialFuture
        })
    }

    /// Connects now (errors name the cause: refused, handshake, ...).
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        self.endpoint()
            .connect_with_connector(self.connector())
            .await
            .map_err(|e| anyhow::anyhow!("{}", crate::root_cause(&e)))
    }

    /// A channel that connects on first use and reconnects after failures.
    pub fn connect_lazy(&self) -> Channel {
        self.endpoint()
            .connect_with_connector_lazy(self.connector())
    }
}

/// A connection being made by [`dial`].
type DialFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<TokioIo<Box<dyn Io>>>> + Send>>;

/// The byte stream of one connection, whatever the transport.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

async fn dial(target: &Target, tls: Option<Arc<ClientConfig>>) -> io::Result<Box<dyn Io>> {
    match target {
        Target::Local(path) => {
            Ok(Box::new(UnixStream::connect(path).await.map_err(|e| {
                io::Error::new(e.kind(), format!("{}: {e}", path.display()))
            })?))
        }
        Target::Plain { host, port } => {
            let tcp = TcpStream::connect((host.as_str(), *port)).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp))
        }
        Target::Mtls { host, port } => {
            let tls = tls.ok_or_else(|| io::Error::other("no client TLS settings"))?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tcp = TcpStream::connect((host.as_str(), *port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
            Ok(Box::new(stream))
        }
    }
}

/// The client's TLS files (all three or none).
pub fn client_tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Option<TlsFiles>> {
    TlsFiles::from_parts(cert, key, ca, ["--cert", "--key", "--ca"])
        .map_err(anyhow::Error::msg)
        .context("client certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_into_targets() {
        assert_eq!(
            Target::parse("unix:/run/stratus/pdiskd.sock").unwrap(),
            Target::Local("/run/stratus/pdiskd.sock".into())
        );
        assert_eq!(
            Target::parse("/tmp/x.sock").unwrap(),
            Target::Local("/tmp/x.sock".into())
        );
        assert_eq!(
            Target::parse("https://storage-1.example.org:7400").unwrap(),
            Target::Mtls {
                host: "storage-1.example.org".into(),
                port: 7400
            }
        );
        assert_eq!(
            Target::parse("10.0.0.1:7401").unwrap(),
            Target::Mtls {
                host: "10.0.0.1".into(),
                port: 7401
            }
        );
        assert_eq!(
            Target::parse("http://[::1]:7400").unwrap(),
            Target::Plain {
                host: "::1".into(),
                port: 7400
            }
        );
        assert_eq!(
            Target::parse("https://[::1]:7400").unwrap().to_string(),
            "https://[::1]:7400"
        );
        for bad in ["ftp://h:1", "https://h", "https://h:1/x", "https://:1"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn https_needs_a_certificate() {
        let err = Dialer::from_address("https://h:1", None).unwrap_err();
        assert!(err.to_string().contains("--cert"), "{err}");
        Dialer::from_address("unix:/nonexistent", None).unwrap();
    }
}
