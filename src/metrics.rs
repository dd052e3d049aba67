//! Prometheus metrics: labelled counters, gauges and histograms, rendered as OpenMetrics text,
//! and the `/metrics`, `/healthz` and `/readyz` HTTP endpoint.
//!
//! The families live in a `prometheus-client` registry behind a small facade (`CounterVec::with`,
//! `GaugeVec::remove`, ...). Names follow Prometheus conventions (`vigil_` prefix, `_total`
//! counters, `_seconds` histograms); the exposition is OpenMetrics text.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock::lock;

/// A series' labels, in the family's label order.
type Labels = Vec<(String, String)>;
type F64Counter = prometheus_client::metrics::counter::Counter<f64, AtomicU64>;
type F64Gauge = prometheus_client::metrics::gauge::Gauge<f64, AtomicU64>;
type HistogramFamily = Family<Labels, PcHistogram, Box<dyn Fn() -> PcHistogram + Send + Sync>>;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram as PcHistogram;

type Hook = Box<dyn Fn() + Send + Sync>;

/// The metric families the daemon exposes: a `prometheus-client` registry (OpenMetrics text),
/// shared by clones, plus hooks that copy counters kept by other components in before each
/// scrape.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<prometheus_client::registry::Registry>>,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

/// OpenMetrics names a counter family without its `_total` suffix (and adds it to samples).
fn family_name<'a>(name: &'a str, kind: &str) -> &'a str {
    if kind == "counter" {
        name.strip_suffix("_total").unwrap_or(name)
    } else {
        name
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, name: &str, help: &str, kind: &str, metric: impl prometheus_client::registry::Metric) {
        // The encoder ends the help text with a period of its own.
        lock(&self.inner).register(family_name(name, kind), help.trim_end_matches('.'), metric);
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        let c = CounterVec(Vec::from_iter(labels.iter().map(|l| l.to_string())), Family::default());
        self.register(name, help, "counter", c.1.clone());
        if labels.is_empty() {
            // A family without labels shows its 0 from the start.
            c.with(&[]);
        }
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec(labels.iter().map(|l| l.to_string()).collect(), Family::default());
        self.register(name, help, "gauge", g.1.clone());
        g
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let buckets = buckets.to_vec();
        let make: Box<dyn Fn() -> PcHistogram + Send + Sync> =
            Box::new(move || PcHistogram::new(buckets.iter().copied()));
        let h =
            HistogramVec(labels.iter().map(|l| l.to_string()).collect(), Arc::new(Family::new_with_constructor(make)));
        self.register(name, help, "histogram", SharedHistograms(h.1.clone()));
        h
    }

    /// Run `hook` before every render (to mirror counters that live in other components).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        lock(&self.hooks).push(Box::new(hook));
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        for h in lock(&self.hooks).iter() {
            h();
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &lock(&self.inner)) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }
}

fn labels(names: &[String], values: &[&str]) -> Labels {
    assert_eq!(names.len(), values.len(), "metric labels {names:?}: got {values:?}");
    names.iter().cloned().zip(values.iter().map(|v| v.to_string())).collect()
}

/// A monotonically increasing count.
#[derive(Clone)]
pub struct CounterVec(Vec<String>, Family<Labels, F64Counter>);

#[derive(Clone)]
pub struct Counter(F64Counter);

impl CounterVec {
    pub fn with(&self, values: &[&str]) -> Counter {
        Counter(self.1.get_or_create_owned(&labels(&self.0, values)))
    }
    /// For families without labels.
    pub fn inc(&self) {
        self.with(&[]).inc()
    }
    pub fn inc_by(&self, v: f64) {
        self.with(&[]).inc_by(v)
    }
}

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1.0)
    }
    pub fn inc_by(&self, v: f64) {
        debug_assert!(v >= 0.0, "counters only go up");
        self.0.inc_by(v.max(0.0));
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
    /// Mirror a monotonic total counted elsewhere; never moves the counter backwards.
    pub fn set_total(&self, v: f64) {
        let now = self.0.get();
        if v > now {
            self.0.inc_by(v - now);
        }
    }
}

/// A value that goes up and down.
#[derive(Clone)]
pub struct GaugeVec(Vec<String>, Family<Labels, F64Gauge>);

#[derive(Clone)]
pub struct Gauge(F64Gauge);

impl GaugeVec {
    pub fn with(&self, values: &[&str]) -> Gauge {
        Gauge(self.1.get_or_create_owned(&labels(&self.0, values)))
    }
    /// Drop a labelled series (a removed stream).
    pub fn remove(&self, values: &[&str]) {
        self.1.remove(&labels(&self.0, values));
    }
}

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.set(v);
    }
    pub fn add(&self, d: f64) {
        self.0.inc_by(d);
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// Latency distributions (cumulative buckets, sum and count).
#[derive(Clone)]
pub struct HistogramVec(Vec<String>, Arc<HistogramFamily>);

/// The histogram family as registered (the registry wants an owned, `Debug` metric).
#[derive(Clone)]
struct SharedHistograms(Arc<HistogramFamily>);

impl std::fmt::Debug for SharedHistograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("histograms")
    }
}

impl prometheus_client::encoding::EncodeMetric for SharedHistograms {
    fn encode(&self, encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

impl prometheus_client::metrics::TypedMetric for SharedHistograms {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Histogram;
}

#[derive(Clone)]
pub struct Histogram(PcHistogram);

/// Default latency buckets in seconds, 5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl HistogramVec {
    pub fn with(&self, values: &[&str]) -> Histogram {
        Histogram(self.1.get_or_create_owned(&labels(&self.0, values)))
    }
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        self.0.observe(v);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP endpoint
// ---------------------------------------------------------------------------------------------

/// What a probe endpoint asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: the process works (a failing answer means: restart it).
    Live,
    /// `/readyz`: it does its job right now (connected, streams running).
    Ready,
}

/// Connections served at once at most; beyond, new ones are closed at once.
const MAX_CONNECTIONS: usize = 512;
/// A client must send its request head within this, or its connection is closed: an idle
/// connection cannot hold the endpoint.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

type ProbeFn = dyn Fn(Probe) -> Result<(), String> + Send + Sync;

/// A running `/metrics` + `/healthz` + `/readyz` server; dropping it stops it.
///
/// hyper on a runtime of its own, on its own thread: the endpoint keeps answering even if the
/// daemon's runtime is wedged (that is what `/healthz` is for), and connections are served
/// concurrently, each with a deadline for its request, so idle or slow clients cannot block it.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Bind `addr` and serve `registry`; `probe` answers `/healthz` and `/readyz`: `Ok` is a
    /// 200, `Err(reason)` a 503 with the reason as the body.
    pub fn start(
        addr: SocketAddr,
        registry: Registry,
        probe: impl Fn(Probe) -> Result<(), String> + Send + Sync + 'static,
    ) -> std::io::Result<MetricsServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let probe: Arc<ProbeFn> = Arc::new(probe);
        let thread = std::thread::Builder::new().name("vigil-metrics".into()).spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, registry, probe, stop_rx).await,
                    Err(e) => tracing::error!("metrics endpoint: {e}"),
                }
            })
        })?;
        Ok(MetricsServer { addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    registry: Registry,
    probe: Arc<ProbeFn>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = &mut stop => return,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let (registry, probe) = (registry.clone(), probe.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let reply = respond(&req, &registry, &*probe);
                async move { Ok::<_, std::convert::Infallible>(reply) }
            });
            // One request per connection: scrapes are rare, and a client cannot park on it.
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!("metrics connection: {e}");
            }
            drop(permit);
        });
    }
}

fn respond(
    req: &hyper::Request<hyper::body::Incoming>,
    registry: &Registry,
    probe: &ProbeFn,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use hyper::{Method, StatusCode};
    let path = req.uri().path();
    let (status, ctype, body) = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", registry.render())
        }
        (&Method::GET | &Method::HEAD, "/healthz" | "/readyz") => {
            match probe(if path == "/healthz" { Probe::Live } else { Probe::Ready }) {
                Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
                Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
            }
        }
        (&Method::GET | &Method::HEAD, _) => {
            (StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".to_string())
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".to_string()),
    };
    let body = if req.method() == Method::HEAD { String::new() } else { body };
    let mut resp = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[test]
    fn exposition_format() {
        let r = Registry::new();
        let w = r.counter("vigil_windows_total", "Windows emitted.", &["stream"]);
        w.with(&["front"]).inc();
        w.with(&["front"]).inc();
        w.with(&["back\"yard"]).inc_by(3.0);
        let up = r.gauge("vigil_stream_up", "1 while streaming.", &["stream"]);
        up.with(&["front"]).set(1.0);
        let plain = r.counter("vigil_answers_total", "Answers published.", &[]);
        let h = r.histogram("vigil_vision_seconds", "Vision encoder time.", &[], &[0.1, 1.0]);
        h.with(&[]).observe(0.05);
        h.with(&[]).observe(0.5);
        h.with(&[]).observe(5.0);
        let text = r.render();
        let want = "\
# HELP vigil_windows Windows emitted.
# TYPE vigil_windows counter
vigil_windows_total{stream=\"front\"} 2.0
vigil_windows_total{stream=\"back\\\"yard\"} 3.0
# HELP vigil_stream_up 1 while streaming.
# TYPE vigil_stream_up gauge
vigil_stream_up{stream=\"front\"} 1.0
# HELP vigil_answers Answers published.
# TYPE vigil_answers counter
vigil_answers_total 0.0
# HELP vigil_vision_seconds Vision encoder time.
# TYPE vigil_vision_seconds histogram
vigil_vision_seconds_sum 5.55
vigil_vision_seconds_count 3
vigil_vision_seconds_bucket{le=\"0.1\"} 1
vigil_vision_seconds_bucket{le=\"1.0\"} 2
vigil_vision_seconds_bucket{le=\"+Inf\"} 3
# EOF
";
        // Series within a family come in no fixed order.
        let sorted = |t: &str| {
            let mut l: Vec<&str> = t.lines().collect();
            l.sort();
            l.join("\n")
        };
        assert_eq!(sorted(&text), sorted(want), "{text}");
        assert!(text.find("vigil_windows_total").unwrap() < text.find("vigil_stream_up").unwrap(), "families in order");
        plain.inc();
        assert!(r.render().contains("vigil_answers_total 1.0\n"));
        up.remove(&["front"]);
        assert!(!r.render().contains("vigil_stream_up{"));
    }

    #[test]
    fn http_endpoint_serves_metrics_and_health() {
        let r = Registry::new();
        r.counter("vigil_jobs_dropped_total", "Jobs dropped.", &[]).inc_by(2.0);
        let healthy = Arc::new(AtomicBool::new(true));
        let h2 = healthy.clone();
        let probe = move |p: Probe| match p {
            Probe::Live if h2.load(Ordering::Relaxed) => Ok(()),
            Probe::Live => Err("engine heartbeat is stale".to_string()),
            Probe::Ready => Err("broker disconnected".to_string()),
        };
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), r, probe).unwrap();
        let (status, body) = get(srv.local_addr(), "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("vigil_jobs_dropped_total 2.0\n"), "{body}");
        assert_eq!(get(srv.local_addr(), "/healthz").0, "HTTP/1.1 200 OK");
        healthy.store(false, Ordering::Relaxed);
        assert_eq!(
            get(srv.local_addr(), "/healthz"),
            ("HTTP/1.1 503 Service Unavailable".into(), "engine heartbeat is stale\n".into())
        );
        assert_eq!(
            get(srv.local_addr(), "/readyz"),
            ("HTTP/1.1 503 Service Unavailable".into(), "broker disconnected\n".into())
        );
        assert_eq!(get(srv.local_addr(), "/nope").0, "HTTP/1.1 404 Not Found");
    }

    #[test]
    fn idle_connections_cannot_hold_the_endpoint() {
        let srv = MetricsServer::start("127.0.0.1:0".parse().unwrap(), Registry::new(), |_| Ok(())).unwrap();
        // 200 clients that connect and say nothing.
        let idle: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(srv.local_addr()).unwrap()).collect();
        let t0 = std::time::Instant::now();
        assert_eq!(get(srv.local_addr(), "/healthz").0, "HTTP/1.1 200 OK");
        assert!(t0.elapsed() < Duration::from_secs(1), "answered in {:?}", t0.elapsed());
        // A client that never finishes its request head is cut off after HEADER_TIMEOUT.
        let mut slow = idle.into_iter().next().unwrap();
        slow.set_read_timeout(Some(HEADER_TIMEOUT + Duration::from_secs(5))).unwrap();
        let t0 = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = slow.read(&mut buf).unwrap_or(0);
        assert!(t0.elapsed() < HEADER_TIMEOUT + Duration::from_secs(2), "closed after {:?}", t0.elapsed());
        let _ = n; // hyper may answer 408 or just close
    }
}
