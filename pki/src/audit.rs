//! The audit trail: one record per mutating call, the same for pdiskd and
//! agentd. [`AuditLayer`] sits outside the gate, so a call the gate refuses
//! is recorded too. A record says who called (identity, role, transport),
//! in which project, which RPC on which object, its outcome (the gRPC code)
//! and how long the handler took. It never holds a request's fields beyond
//! the object's ref, so no secret (a CHAP secret, user-data) reaches it.
//!
//! Each record is logged once at info with target `audit`, and, with
//! `--audit-log FILE`, appended to FILE as one JSON object per line by a
//! writer thread that fsyncs after each batch it writes (every record that
//! arrived while the previous batch was being synced): the cost of one
//! fsync is shared by the calls that came together.
//!
//! The handlers name the project and the object through [`AuditNote`],
//! which the layer puts in each request's extensions (`note` below); an RPC
//! whose handler names nothing is recorded with the caller's own project
//! and no object. The outcome is the code the handler answered with: a
//! unary handler that failed answers with `grpc-status` in the response
//! headers, and one that succeeded without it (OK in the trailers).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use serde::Serialize;
use tonic::body::Body;
use tonic::codegen::http;

use crate::identity::{Caller, Role, Transport};

/// Most records one fsync covers.
const BATCH: usize = 1024;

/// What a handler tells the audit about its call: the project it acted in
/// and the object it touched.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<(String, String)>>);

impl AuditNote {
    pub fn set_project(&self, project: &str) {
        self.0.lock().unwrap().0 = project.to_owned();
    }

    pub fn set_object(&self, object: impl Into<String>) {
        self.0.lock().unwrap().1 = object.into();
    }

    fn get(&self) -> (String, String) {
        self.0.lock().unwrap().clone()
    }
}

/// The request's [`AuditNote`], when the call is audited.
pub fn note<T>(req: &tonic::Request<T>) -> Option<AuditNote> {
    req.extensions().get::<AuditNote>().cloned()
}

/// One audit record, as logged and as written to the JSON Lines file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRecord {
    /// RFC 3339, microseconds.
    pub time: String,
    /// `ROLE/NAME`, or `unauthenticated`.
    pub caller: String,
    pub role: Option<Role>,
    pub transport: Option<Transport>,
    pub project: String,
    /// `pdisk.v1.VolumeService/CreateVolume`.
    pub rpc: String,
    pub object: String,
    /// The gRPC code's name: `Ok`, `NotFound`, `PermissionDenied`, ...
    pub outcome: String,
    pub duration_ms: f64,
}

/// Where records go besides the log.
#[derive(Clone)]
pub struct AuditSink {
    file: Option<mpsc::Sender<String>>,
}

impl AuditSink {
    /// Records go to the log only.
    pub fn log_only() -> AuditSink {
        AuditSink { file: None }
    }

    /// A daemon's `--audit-log`: the file when one is set, else the log
    /// only; the error names the file.
    pub fn from_setting(path: Option<&Path>) -> anyhow::Result<AuditSink> {
        use anyhow::Context;
        match path {
            Some(path) => AuditSink::open(path)
                .with_context(|| format!("opening the audit log {}", path.display())),
            None => Ok(AuditSink::log_only()),
        }
    }

    /// Records also go to `path` (created 0600 if missing, appended to),
    /// written and fsync'd in batches by a thread of their own.
    pub fn open(path: &Path) -> std::io::Result<AuditSink> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let (tx, rx) = mpsc::channel::<String>();
        let path: PathBuf = path.to_owned();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_batches(file, &path, rx))?;
        Ok(AuditSink { file: Some(tx) })
    }

    fn emit(&self, r: &AuditRecord) {
        tracing::info!(target: "audit", caller = %r.caller, role = ?r.role,
            transport = ?r.transport, project = %r.project, rpc = %r.rpc,
            object = %r.object, outcome = %r.outcome, duration_ms = r.duration_ms, "audit");
        if let Some(tx) = &self.file {
            let line = serde_json::to_string(r).expect("audit records serialize");
            if tx.send(line).is_err() {
                tracing::error!("the audit log writer is gone; record not written");
            }
        }
    }
}

/// The writer thread: waits for a record, takes every other one already
/// queued (up to [`BATCH`]), writes them, fsyncs once, and repeats until
/// the daemon drops its senders.
fn write_batches(file: std::fs::File, path: &Path, rx: mpsc::Receiver<String>) {
    let mut out = std::io::BufWriter::new(file);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let written = batch
            .iter()
            .try_for_each(|l| writeln!(out, "{l}"))
            .and_then(|()| out.flush())
            .and_then(|()| out.get_ref().sync_data());
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, lost = batch.len(), "audit log write failed");
        }
    }
}

/// Which calls are audited: `service` (e.g. `pdisk.v1.VolumeService`) and
/// the names of its mutating RPCs.
#[derive(Clone)]
pub struct AuditLayer {
    service: &'static str,
    mutating: &'static [&'static str],
    sink: AuditSink,
}

impl AuditLayer {
    pub fn new(
        service: &'static str,
        mutating: &'static [&'static str],
        sink: AuditSink,
    ) -> AuditLayer {
        AuditLayer {
            service,
            mutating,
            sink,
        }
    }

    fn audited(&self, path: &str) -> bool {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(self.service))
            .and_then(|p| p.strip_prefix('/'))
            .is_some_and(|m| self.mutating.contains(&m))
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Audit<S> {
        Audit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    layer: AuditLayer,
}

impl<S> tower::Service<http::Request<Body>> for Audit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        if !self.layer.audited(&path) {
            return Box::pin(self.inner.call(req));
        }
        let caller = req.extensions().get::<Caller>().cloned();
        let note = AuditNote::default();
        if let Some(Ok(i)) = caller.as_ref().map(|c| &c.identity) {
            if i.role == Role::Project {
                note.set_project(&i.name);
            }
        }
        req.extensions_mut().insert(note.clone());
        let sink = self.layer.sink.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let outcome = outcome(&res);
            let (project, object) = note.get();
            let (who, role, transport) = match &caller {
                Some(c) => match &c.identity {
                    Ok(i) => (
                        format!("{}/{}", i.role, i.name),
                        Some(i.role),
                        Some(c.transport),
                    ),
                    Err(_) => ("unauthenticated".to_owned(), None, Some(c.transport)),
                },
                None => ("unauthenticated".to_owned(), None, None),
            };
            sink.emit(&AuditRecord {
                time: humantime_now(),
                caller: who,
                role,
                transport,
                project,
                rpc: path.trim_start_matches('/').to_owned(),
                object,
                outcome,
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            });
            res
        })
    }
}

/// The gRPC code a call ended with, by name (`Ok`, `NotFound`, ...): a
/// unary handler that failed answers with `grpc-status` in the response
/// headers, one that succeeded without it; `TransportError` when the
/// service itself failed. Shared with [`crate::metrics`].
pub(crate) fn outcome<E>(res: &Result<http::Response<Body>, E>) -> String {
    match res {
        Ok(resp) => match resp.headers().get("grpc-status") {
            None => "Ok".to_owned(),
            Some(v) => {
                let code = v
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Unknown);
                format!("{code:?}")
            }
        },
        Err(_) => "TransportError".to_owned(),
    }
}

fn humantime_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use std::convert::Infallible;
    use tower::{Layer, Service, ServiceExt};

    const SERVICE: &str = "a.v1.S";

    type Answer = std::future::Ready<Result<http::Response<Body>, Infallible>>;
    type Handler = tower::util::ServiceFn<fn(http::Request<Body>) -> Answer>;

    /// A handler that notes its object and answers OK, or fails with
    /// `grpc-status` in its headers as tonic's unary errors do.
    fn handler(req: http::Request<Body>) -> Answer {
        let note = req.extensions().get::<AuditNote>().cloned();
        if let Some(n) = note {
            n.set_object("volume db1");
        }
        let resp = if req.uri().path().ends_with("/Fail") {
            tonic::Status::not_found("volume db1 not found").into_http()
        } else {
            http::Response::new(Body::empty())
        };
        std::future::ready(Ok(resp))
    }

    async fn send(svc: &mut Audit<Handler>, path: &str, role: Role) {
        let mut req = http::Request::builder()
            .uri(format!("http://x{path}"))
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(Caller {
            transport: Transport::Mtls,
            identity: Ok(Identity::new(role, "astro")),
        });
        svc.ready().await.unwrap().call(req).await.unwrap();
    }

    #[tokio::test]
    async fn mutating_calls_are_written_once_as_json_lines_and_reads_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::open(&path).unwrap();
        let layer = AuditLayer::new(SERVICE, &["Create", "Fail"], sink);
        let f: fn(http::Request<Body>) -> _ = handler;
        let mut svc = layer.layer(tower::service_fn(f));
        send(&mut svc, "/a.v1.S/Create", Role::Project).await;
        send(&mut svc, "/a.v1.S/Get", Role::Project).await;
        send(&mut svc, "/a.v1.S/Fail", Role::Admin).await;
        drop(svc);
        drop(layer);
        // The writer syncs each batch; wait for both records.
        let mut lines = Vec::new();
        for _ in 0..200 {
            lines = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect();
            if lines.len() >= 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["rpc"], "a.v1.S/Create");
        assert_eq!(lines[0]["caller"], "project/astro");
        assert_eq!(lines[0]["role"], "project");
        assert_eq!(lines[0]["project"], "astro", "a project caller's own");
        assert_eq!(lines[0]["object"], "volume db1");
        assert_eq!(lines[0]["outcome"], "Ok");
        assert_eq!(lines[1]["outcome"], "NotFound");
        assert_eq!(lines[1]["project"], "", "an admin naming none");
        assert!(lines[1]["duration_ms"].as_f64().unwrap() >= 0.0);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
