//! Prometheus metrics, the same way in pdiskd and agentd: the `/metrics`
//! endpoint ([`serve`], on `--metrics-listen`, off by default) and the RPC
//! latency histogram every gRPC call goes through ([`RpcMetricsLayer`],
//! beside the audit layer).
//!
//! The text is Prometheus' exposition format 0.0.4, encoded by
//! `prometheus-client` from one [`Registry`] per daemon. What a daemon
//! reads from the host at scrape time (pool usage, guests' counters) comes
//! from collectors in that registry, refreshed by the daemon's [`Refresh`]
//! just before each encoding, so a scrape always shows the present.
//!
//! Label cardinality stays bounded: the RPC histogram's `method` is one of
//! the service's declared methods (anything else is `other`, so a caller
//! sending made-up paths cannot grow the series), and `code` one of gRPC's
//! seventeen codes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tonic::body::Body;
use tonic::codegen::http;

use crate::authz::Table;

/// What a daemon reads from the host before each scrape (its collectors
/// then encode what it read).
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A refresh that reads nothing.
pub fn no_refresh() -> Refresh {
    Arc::new(|| Box::pin(async {}))
}

/// The content type of the text [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The registry as Prometheus text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Buckets for calls and operations from half a millisecond to about 30 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

/// Buckets for slow operations (a launch under TCG, an import): 50 ms to
/// about 7 min.
pub fn slow_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.05, 2.0, 14)
}

/// A histogram of seconds with [`latency_buckets`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// A histogram of seconds with [`slow_buckets`].
pub fn slow_histogram() -> Histogram {
    Histogram::new(slow_buckets())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: String,
    method: String,
    code: String,
}

type RpcFamily = Family<RpcLabels, Histogram, fn() -> Histogram>;

/// Times every gRPC call: `stratus_rpc_duration_seconds{service, method,
/// code}`. For a streaming answer (WatchEvents, WatchProgress) it is the
/// time to the response's start, not the stream's life.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    services: Arc<Vec<(String, Vec<String>)>>,
    family: RpcFamily,
}

impl RpcMetricsLayer {
    /// Registers the histogram in `registry`; `table`'s service and methods
    /// (and the health service's) are the ones named in labels.
    pub fn register(registry: &mut Registry, table: &Table) -> RpcMetricsLayer {
        let family: RpcFamily = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "stratus_rpc_duration",
            "gRPC calls by method and outcome (time to the response's start)",
            Unit::Seconds,
            family.clone(),
        );
        let methods = table.rules.iter().map(|r| r.method.to_owned()).collect();
        RpcMetricsLayer {
            services: Arc::new(vec![
                (table.service.to_owned(), methods),
                (
                    "grpc.health.v1.Health".to_owned(),
                    vec!["Check".to_owned(), "Watch".to_owned()],
                ),
            ]),
            family,
        }
    }

    /// `(service, method)` of a request path, `other` for what the daemon
    /// does not declare.
    fn labels(&self, path: &str) -> (String, String) {
        let known = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(s, m)| {
                self.services
                    .iter()
                    .find(|(name, methods)| name == s && methods.iter().any(|x| x == m))
                    .map(|_| (s.to_owned(), m.to_owned()))
            });
        known.unwrap_or_else(|| ("other".to_owned(), "other".to_owned()))
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl<S> tower::Service<http::Request<Body>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (service, method) = self.layer.labels(req.uri().path());
        let family = self.layer.family.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = crate::audit::outcome(&res);
            family
                .get_or_create(&RpcLabels {
                    service,
                    method,
                    code,
                })
                .observe(started.elapsed().as_secs_f64());
            res
        })
    }
}

/// Labels of one sample a collector writes: a few `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Whether a family a collector writes counts up (a `_total` is appended)
/// or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Writes one metric family of values read at scrape time (a collector's
/// `encode`): `name` carries its unit (`_bytes`, `_seconds`), a counter's
/// `_total` is added by the encoder. A family without samples is left out.
pub fn write_family(
    enc: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    samples: &[(Labels, f64)],
) -> std::fmt::Result {
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::MetricType;
    if samples.is_empty() {
        return Ok(());
    }
    let ty = match kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
    };
    let mut family = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, value) in samples {
        let write = |m: prometheus_client::encoding::MetricEncoder<'_>| match kind {
            Kind::Counter => ConstCounter::new(value.max(0.0)).encode(m),
            Kind::Gauge => ConstGauge::new(*value).encode(m),
        };
        if labels.is_empty() {
            // Only a family of one sample has no labels.
            return write(family);
        }
        write(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Where one outbox publisher of a daemon is (`stratus_core::outbox`), read
/// at each scrape: the journal's last seq against the last one the broker
/// acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherFigures {
    /// What it publishes: `events`, `usage`.
    pub stream: &'static str,
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Its last round failed (the broker is away or refused).
    pub failing: bool,
    /// Messages compacted out of the journal before the broker had them.
    pub lost: u64,
}

/// One family's samples: labels and value.
type Samples = Vec<(Labels, f64)>;

/// Reads every publisher's figures (none without a broker).
pub type PublisherSource = Arc<dyn Fn() -> Vec<PublisherFigures> + Send + Sync>;

#[derive(Clone)]
struct PublisherCollector {
    prefix: &'static str,
    source: PublisherSource,
}

impl std::fmt::Debug for PublisherCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherCollector")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl prometheus_client::collector::Collector for PublisherCollector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let figures = (self.source)();
        let per = |f: &dyn Fn(&PublisherFigures) -> f64| -> Samples {
            figures
                .iter()
                .map(|p| (vec![("stream", p.stream.to_string())], f(p)))
                .collect()
        };
        let families: [(&str, &str, Kind, Samples); 5] = [
            (
                "publisher_last_seq",
                "the last seq journaled for the broker",
                Kind::Gauge,
                per(&|p| p.last_seq as f64),
            ),
            (
                "publisher_acked_seq",
                "the last seq the broker acknowledged (stored)",
                Kind::Gauge,
                per(&|p| p.acked_seq as f64),
            ),
            (
                "publisher_lag",
                "messages journaled but not yet acknowledged by the broker",
                Kind::Gauge,
                per(&|p| p.last_seq.saturating_sub(p.acked_seq) as f64),
            ),
            (
                "publisher_failing",
                "1 while the publisher's last round failed (broker away or refusing)",
                Kind::Gauge,
                per(&|p| if p.failing { 1.0 } else { 0.0 }),
            ),
            (
                "publisher_lost",
                "messages compacted out of the journal before the broker had them",
                Kind::Counter,
                per(&|p| p.lost as f64),
            ),
        ];
        for (name, help, kind, samples) in &families {
            write_family(
                &mut enc,
                &format!("{}_{name}", self.prefix),
                help,
                *kind,
                samples,
            )?;
        }
        Ok(())
    }
}

/// Registers `<prefix>_publisher_{last_seq,acked_seq,lag,failing,lost}`
/// `{stream}`, read from `source` at each scrape.
pub fn register_publishers(registry: &mut Registry, prefix: &'static str, source: PublisherSource) {
    registry.register_collector(Box::new(PublisherCollector { prefix, source }));
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes: each
/// scrape runs `refresh`, then encodes `registry`. Any other path is 404,
/// any other method 405. HTTP/1.1 only, no TLS: bind it to loopback or a
/// management network (README "Metrics").
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    refresh: Refresh,
    shutdown: impl Future<Output = ()> + Send,
) {
    use hyper::server::conn::http1;
    use hyper_util::rt::TokioIo;
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let refresh = refresh.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    answer(req, registry.clone(), refresh.clone())
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(peer = %peer, error = %e, "metrics connection ended");
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
}

/// Binds `addr` and serves metrics there in a task of its own, until
/// `shutdown` completes. The bind happens now, so a daemon fails at start
/// when the address is taken.
pub async fn spawn(
    addr: SocketAddr,
    registry: Arc<Registry>,
    refresh: Refresh,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, registry, refresh, shutdown));
    Ok(bound)
}

async fn answer(
    req: http::Request<hyper::body::Incoming>,
    registry: Arc<Registry>,
    refresh: Refresh,
) -> Result<http::Response<String>, Infallible> {
    let reply = |status: http::StatusCode, body: String| {
        let mut r = http::Response::new(body);
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            http::StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".into(),
        ));
    }
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return Ok(reply(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".into(),
        ));
    }
    refresh().await;
    let mut r = reply(http::StatusCode::OK, encode(&registry));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(CONTENT_TYPE),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::Rule;
    use tower::{Layer, Service, ServiceExt};

    #[test]
    fn publisher_lag_is_the_journaled_seq_past_the_acknowledged_one() {
        let mut registry = Registry::default();
        let figures = Arc::new(std::sync::Mutex::new(vec![PublisherFigures {
            stream: "events",
            last_seq: 120,
            acked_seq: 100,
            failing: true,
            lost: 3,
        }]));
        let f = figures.clone();
        register_publishers(
            &mut registry,
            "stratus_test",
            Arc::new(move || f.lock().unwrap().clone()),
        );
        let text = encode(&registry);
        for line in [
            "stratus_test_publisher_last_seq{stream=\"events\"} 120",
            "stratus_test_publisher_acked_seq{stream=\"events\"} 100",
            "stratus_test_publisher_lag{stream=\"events\"} 20",
            "stratus_test_publisher_failing{stream=\"events\"} 1",
            "stratus_test_publisher_lost_total{stream=\"events\"} 3",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // Read at each scrape: caught up, the lag is 0.
        figures.lock().unwrap()[0].acked_seq = 120;
        figures.lock().unwrap()[0].failing = false;
        let text = encode(&registry);
        assert!(
            text.contains("stratus_test_publisher_lag{stream=\"events\"} 0"),
            "{text}"
        );
        // No broker, no publisher: no series.
        let mut empty = Registry::default();
        register_publishers(&mut empty, "stratus_test", Arc::new(Vec::new));
        assert!(!encode(&empty).contains("publisher"));
    }

    const TABLE: Table = Table {
        service: "a.v1.S",
        rules: &[
            Rule {
                method: "Create",
                roles: &[],
                note: "",
            },
            Rule {
                method: "Fail",
                roles: &[],
                note: "",
            },
        ],
    };

    type Answer = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn handler(req: http::Request<Body>) -> Answer {
        let resp = if req.uri().path().ends_with("/Fail") {
            tonic::Status::not_found("volume db1 not found").into_http()
        } else {
            http::Response::new(Body::empty())
        };
        std::future::ready(Ok(resp))
    }

    async fn send<S>(svc: &mut S, path: &str)
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    {
        let req = http::Request::builder()
            .uri(format!("http://x{path}"))
            .body(Body::empty())
            .unwrap();
        svc.ready().await.unwrap().call(req).await.unwrap();
    }

    #[tokio::test]
    async fn calls_are_counted_by_declared_method_and_code_and_the_rest_is_other() {
        let mut registry = Registry::default();
        let layer = RpcMetricsLayer::register(&mut registry, &TABLE);
        let f: fn(http::Request<Body>) -> Answer = handler;
        let mut svc = layer.layer(tower::service_fn(f));
        send(&mut svc, "/a.v1.S/Create").await;
        send(&mut svc, "/a.v1.S/Create").await;
        send(&mut svc, "/a.v1.S/Fail").await;
        for i in 0..50 {
            send(&mut svc, &format!("/a.v1.S/Made{i}")).await;
        }
        send(&mut svc, "/grpc.health.v1.Health/Check").await;
        let text = encode(&registry);
        let count = |labels: &str| -> u64 {
            let needle = format!("stratus_rpc_duration_seconds_count{{{labels}}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&needle))
                .unwrap_or_else(|| panic!("no {needle} in\n{text}"))
                .parse()
                .unwrap()
        };
        assert_eq!(
            count(r#"service="a.v1.S",method="Create",code="Ok""#),
            2,
            "{text}"
        );
        assert_eq!(
            count(r#"service="a.v1.S",method="Fail",code="NotFound""#),
            1
        );
        assert_eq!(count(r#"service="other",method="other",code="Ok""#), 50);
        assert_eq!(
            count(r#"service="grpc.health.v1.Health",method="Check",code="Ok""#),
            1
        );
        assert!(text.contains("# TYPE stratus_rpc_duration_seconds histogram"));
        assert_eq!(
            text.matches("stratus_rpc_duration_seconds_count{").count(),
            4,
            "made-up methods share one series: {text}"
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_after_refreshing_and_refuses_other_paths() {
        let mut registry = Registry::default();
        let scrapes = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("test_scrapes", "scrapes seen", scrapes.clone());
        let refresh: Refresh = Arc::new(move || {
            let s = scrapes.clone();
            Box::pin(async move {
                s.inc();
            })
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let addr = spawn(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(registry),
            refresh,
            async {
                let _ = stop_rx.await;
            },
        )
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let first = get("/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(
            first.contains("content-type: text/plain; version=0.0.4"),
            "{first}"
        );
        assert!(first.contains("test_scrapes_total 1\n"), "{first}");
        let second = get("/metrics").await;
        assert!(second.contains("test_scrapes_total 2\n"), "{second}");
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        let _ = stop_tx.send(());
    }
}
