//! Fetching one image: stream it from its URL into a `.partial-*` file of
//! the cache directory, hashing SHA-256 on the way, and hand back the file
//! only when the digest matches the reference.
//!
//! The bytes flow network (or file) → bounded channel → one blocking thread
//! that hashes and writes, so the runtime's threads never hash or block on
//! the disk, and reading the next chunk overlaps writing the last one.
//! Every failure (HTTP status, connect or idle timeout, truncated body,
//! checksum mismatch, disk full) drops the partial file: nothing of a failed
//! download is left in the directory.
//!
//! HTTP client: `reqwest` (0.13, `default-features = false`, features
//! `rustls-no-provider` and `stream`) with rustls' `ring` provider. Chosen
//! over a hand-rolled hyper-util + hyper-rustls client because reqwest
//! brings what marketplace downloads need and we would otherwise write
//! ourselves: redirects, `HTTP(S)_PROXY`/`NO_PROXY`, the system trust store
//! (rustls-platform-verifier, so an operator's CA in /etc/ssl/certs works).
//! `ring` instead of reqwest's default aws-lc-rs avoids a C/CMake build.
//! Compression features are off: the bytes hashed are the bytes published.
//!
//! The trust store is loaded when the client is built, and a host without one
//! (no ca-certificates) makes that fail. agentd still starts: the verifying
//! client is built on first use and retried until it can be, https:// pulls
//! fail with FailedPrecondition naming the cause, and http:// pulls use a
//! client that trusts no certificate at all (it never needs one).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha2::Digest;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::egress::Egress;
use super::reference::{ImageRef, ImageSource, Sha256};
use super::staging::Partial;
use stratus_core::error::{Error, ErrorKind, Result};
use stratus_core::rooted::Roots;

/// Progress is reported at most once per this many bytes (plus start and end).
pub const PROGRESS_STEP: u64 = 1 << 20;
/// Read size for file:// sources.
const FILE_CHUNK: usize = 1 << 20;
/// Chunks in flight between the reader and the writer thread.
const PIPE_DEPTH: usize = 16;

/// How long a download may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchTimeouts {
    /// To establish a TCP (and TLS) connection.
    pub connect: Duration,
    /// For the response headers, and then for each next piece of the body.
    pub idle: Duration,
}

impl Default for FetchTimeouts {
    fn default() -> Self {
        FetchTimeouts {
            connect: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

/// A verified download, still under its temporary name.
#[derive(Debug)]
pub(crate) struct Download {
    pub file: Partial,
    pub size: u64,
}

/// Space a download asks of the cache, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// The size the server (Content-Length) or the file announced.
    Announced(u64),
    /// The bytes received so far, about to be written.
    Received(u64),
}

/// Downloads images; one per cache, so connections are pooled.
#[derive(Debug, Clone)]
pub(crate) struct Fetcher {
    /// The addresses downloads may reach (checked at every hop).
    egress: Egress,
    clients: Arc<Clients>,
    idle: Duration,
    /// Directories file:// images may come from (opened beneath them,
    /// openat2 RESOLVE_BENEATH); `None`: anywhere (unit tests only).
    file_roots: Option<Roots>,
}

impl Fetcher {
    pub(crate) fn new(
        timeouts: FetchTimeouts,
        file_roots: Option<&[PathBuf]>,
        egress: Egress,
    ) -> Result<Fetcher> {
        let file_roots = file_roots
            .map(|roots| Roots::open("--image-file-root", roots))
            .transpose()?;
        // reqwest is built without a default crypto provider; ring is ours.
        // Err means a provider is already installed, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let clients = Clients {
            connect: timeouts.connect,
            egress,
            verifying: Mutex::new(None),
            // No roots: never asked to verify anything, so it needs no store.
            plain: client_builder(timeouts.connect, egress)
                .tls_certs_only(Vec::new())
                .build()
                .map_err(|e| Error::internal(format!("HTTP client: {}", causes(&e))))?,
        };
        if let Err(e) = clients.verifying() {
            tracing::warn!(
                error = %e,
                "no trust store: https:// image pulls will fail until one is installed"
            );
        }
        Ok(Fetcher {
            egress,
            clients: Arc::new(clients),
            idle: timeouts.idle,
            file_roots,
        })
    }

    /// Streams `image` into a new temporary in `dir` and verifies it.
    ///
    /// `room(need)` is asked for the space the download needs, and may
    /// refuse it: once with the announced size (Content-Length, or a file's
    /// length) before the body is read, then with the bytes received so far
    /// before each piece is written, so a refused piece never reaches the
    /// disk. That is how the cache holds its quota for a body whose size
    /// nobody announced. `progress(done, total)` (total 0 when unknown) is
    /// called at start, at most once per [`PROGRESS_STEP`] bytes, and at the
    /// end.
    pub(crate) async fn fetch(
        &self,
        image: &ImageRef,
        dir: &Path,
        room: &mut (dyn FnMut(Need) -> Result<()> + Send),
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Download> {
        let url = image.url();
        let mut body = self.open(image).await?;
        let announced = body.announced_size();
        if let Some(n) = announced {
            room(Need::Announced(n))?;
        }
        let (file, out) = Partial::create(dir, "")?;
        let (tx, rx) = mpsc::channel::<Bytes>(PIPE_DEPTH);
        let abandoned = Arc::new(AtomicBool::new(false));
        let writer = spawn_writer(
            out,
            rx,
            abandoned.clone(),
            file.path().display().to_string(),
        );

        let total = announced.unwrap_or(0);
        let fed = async {
            let mut done = 0u64;
            let mut reported = 0u64;
            progress(0, total);
            loop {
                let chunk = match tokio::time::timeout(self.idle, body.next()).await {
                    Err(_) => {
                        return Err(Error::unavailable(format!(
                            "image {url}: no data for {}s after {done} bytes",
                            self.idle.as_secs_f64()
                        )))
                    }
                    Ok(r) => r.map_err(|e| {
                        Error::new(
                            e.kind(),
                            format!(
                                "image {url}: download interrupted after {done} bytes: {}",
                                e.message()
                            ),
                        )
                    })?,
                };
                let Some(chunk) = chunk else { break };
                done += chunk.len() as u64;
                // Before the bytes reach the disk: a refused piece is never written.
                room(Need::Received(done))?;
                if tx.send(chunk).await.is_err() {
                    // The writer stopped; its error is the one to report.
                    break;
                }
                if done - reported >= PROGRESS_STEP {
                    progress(done, total);
                    reported = done;
                }
            }
            if announced.is_some_and(|n| n != done) {
                return Err(Error::unavailable(format!(
                    "image {url}: download ended after {done} of {total} bytes"
                )));
            }
            if done != reported {
                progress(done, total);
            }
            Ok(done)
        }
        .await;
        if fed.is_err() {
            abandoned.store(true, Ordering::Relaxed);
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Error::internal(format!("image {url}: writer thread: {e}")))?;
        let (size, digest) = match (fed, written) {
            // A writer error (disk full) is the cause of whatever the feed saw.
            (_, Err(e)) | (Err(e), Ok(_)) => return Err(e),
            (Ok(size), Ok(digest)) => (size, digest),
        };
        if &digest != image.sha256() {
            return Err(Error::invalid(format!(
                "image {url}: checksum mismatch: expected sha256 {}, got {digest} \
                 ({size} bytes downloaded and discarded)",
                image.sha256()
            )));
        }
        Ok(Download { file, size })
    }

    async fn open(&self, image: &ImageRef) -> Result<Body> {
        let url = image.url();
        match image.source() {
            ImageSource::Pdisk(volume) => Err(Error::precondition(format!(
                "image {url} lives only in pdisk (volume {volume}): use it for clone disks"
            ))),
            ImageSource::File(path) => {
                // Opened beneath a root in one step: the file read is the
                // file checked, whatever happens to the path meanwhile.
                let f = match &self.file_roots {
                    Some(roots) => roots
                        .open_file(&format!("image {url}:"), path, false)?
                        .try_clone_file()?,
                    None => std::fs::File::open(path)
                        .map_err(|e| Error::io(format!("image {url}"), e))?,
                };
                let f = tokio::fs::File::from_std(f);
                let md = f
                    .metadata()
                    .await
                    .map_err(|e| Error::io(format!("image {url}"), e))?;
                if !md.is_file() {
                    return Err(Error::invalid(format!("image {url}: not a regular file")));
                }
                Ok(Body::File(f, md.len()))
            }
            ImageSource::Http(u) => {
                self.egress.check_url(u)?;
                let client = match self.clients.verifying() {
                    Ok(c) => c,
                    Err(_) if u.scheme() == "http" => self.clients.plain.clone(),
                    Err(e) => {
                        return Err(Error::precondition(format!(
                            "image {url}: no HTTPS client on this host: {e} \
                             (install ca-certificates, or set SSL_CERT_FILE to a CA bundle)"
                        )))
                    }
                };
                let send = client.get(u.clone()).send();
                let resp = match tokio::time::timeout(self.idle, send).await {
                    Err(_) => {
                        return Err(Error::unavailable(format!(
                            "image {url}: no response within {}s",
                            self.idle.as_secs_f64()
                        )))
                    }
                    Ok(r) => r.map_err(|e| request_error(url, &e))?,
                };
                // The peer that answered, whatever path led there.
                if let Some(peer) = resp.remote_addr() {
                    self.egress.check_addr(url, peer)?;
                }
                let status = resp.status();
                if status.is_redirection() {
                    // reqwest hands back a redirect it would not follow (to
                    // a scheme other than http/https, or with no Location).
                    return Err(Error::denied(format!(
                        "image {url}: HTTP {status}: a redirect image downloads may not follow \
                         (only http and https)"
                    )));
                }
                if status != reqwest::StatusCode::OK {
                    let kind = match status.as_u16() {
                        404 | 410 => ErrorKind::NotFound,
                        408 | 429 | 500..=599 => ErrorKind::Unavailable,
                        _ => ErrorKind::FailedPrecondition,
                    };
                    return Err(Error::new(kind, format!("image {url}: HTTP {status}")));
                }
                Ok(Body::Http(resp))
            }
        }
    }
}

/// The bytes of an image as they arrive.
enum Body {
    Http(reqwest::Response),
    File(tokio::fs::File, u64),
}

impl Body {
    fn announced_size(&self) -> Option<u64> {
        match self {
            Body::Http(r) => r.content_length(),
            Body::File(_, len) => Some(*len),
        }
    }

    /// The next chunk; `None` at the end. A connection closed before the
    /// announced length is an error (hyper checks Content-Length).
    async fn next(&mut self) -> Result<Option<Bytes>> {
        match self {
            Body::Http(r) => r.chunk().await.map_err(|e| Error::unavailable(causes(&e))),
            Body::File(f, _) => {
                let mut buf = Vec::with_capacity(FILE_CHUNK);
                let n = f
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| Error::io("read error", e))?;
                Ok((n > 0).then(|| Bytes::from(buf)))
            }
        }
    }
}

/// Hashes and writes what arrives on `rx`, then syncs the file (unless the
/// download was abandoned). Returns the digest.
fn spawn_writer(
    file: std::fs::File,
    mut rx: mpsc::Receiver<Bytes>,
    abandoned: Arc<AtomicBool>,
    name: String,
) -> tokio::task::JoinHandle<Result<Sha256>> {
    tokio::task::spawn_blocking(move || {
        let io = |e| Error::io(&name, e);
        let mut hasher = sha2::Sha256::new();
        let mut out = std::io::BufWriter::with_capacity(FILE_CHUNK, file);
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            out.write_all(&chunk).map_err(io)?;
        }
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        if !abandoned.load(Ordering::Relaxed) {
            file.sync_all().map_err(io)?;
        }
        Ok(Sha256::from_digest(hasher.finalize().into()))
    })
}

/// A transport error, classified: every one means the server could not be
/// reached or did not answer (Unavailable).
/// The fetcher's HTTP clients, shared by its clones.
#[derive(Debug)]
struct Clients {
    connect: Duration,
    egress: Egress,
    /// Verifies servers against the system trust store; built on first use.
    verifying: Mutex<Option<reqwest::Client>>,
    /// For http:// when there is no trust store.
    plain: reqwest::Client,
}

impl Clients {
    /// The verifying client, built now if it has not been yet.
    fn verifying(&self) -> std::result::Result<reqwest::Client, String> {
        let mut slot = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = client_builder(self.connect, self.egress)
            .build()
            .map_err(|e| causes(&e))?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

fn client_builder(connect: Duration, egress: Egress) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .dns_resolver(egress.resolver())
        .redirect(egress.redirect_policy())
        .user_agent(concat!("stratus-agent/", env!("CARGO_PKG_VERSION")))
}

fn request_error(url: &str, e: &reqwest::Error) -> Error {
    // Refused by the address rule (a redirect, or a name resolving only to
    // refused addresses): the caller's request, not the network, is at fault.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<super::egress::RefusedAddress>() {
            return Error::denied(format!("image {url}: {r}"));
        }
        cur = c.source();
    }
    if e.is_redirect() {
        return Error::denied(format!("image {url}: {}", causes(e)));
    }
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_redirect() {
        "redirect failed"
    } else {
        "request failed"
    };
    Error::unavailable(format!("image {url}: {what}: {}", causes(e)))
}

/// The error's sources joined with ": ", without reqwest's top line (which
/// repeats the URL that our messages already name).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}
