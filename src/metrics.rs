//! Prometheus metrics: a small registry of labelled counters, gauges and histograms, rendered in
//! the text exposition format (version 0.0.4), and the `/metrics`, `/healthz` and `/readyz` HTTP
//! endpoint.
//!
//! Hand-written rather than a client crate: the daemon needs a dozen families, and this keeps the
//! build lean. Names follow Prometheus conventions (`vigil_` prefix, `_total` counters,
//! `_seconds` histograms).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Labels = Vec<String>;

/// A family that can render itself.
trait Family: Send + Sync {
    fn render(&self, out: &mut String);
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// The set of metric families the daemon exposes.
#[derive(Default, Clone)]
pub struct Registry {
    families: Arc<Mutex<Vec<Arc<dyn Family>>>>,
    /// Run before each render: they copy counters kept elsewhere (sources, engine, outbox) in.
    hooks: Arc<Mutex<Vec<Hook>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        let c = CounterVec(Arc::new(Inner::new(name, help, labels, "counter")));
        self.families.lock().unwrap().push(c.0.clone());
        c
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let g = GaugeVec(Arc::new(Inner::new(name, help, labels, "gauge")));
        self.families.lock().unwrap().push(g.0.clone());
        g
    }

    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let mut b = buckets.to_vec();
        b.sort_by(|a, c| a.partial_cmp(c).unwrap());
        let h = HistogramVec(Arc::new(HistInner { name: name.into(), help: help.into(), labels: own(labels), buckets: b, series: Mutex::default() }));
        self.families.lock().unwrap().push(h.0.clone());
        h
    }

    /// Run `hook` before every render (to mirror counters that live in other components).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks.lock().unwrap().push(Box::new(hook));
    }

    /// The whole registry in Prometheus text format.
    pub fn render(&self) -> String {
        for h in self.hooks.lock().unwrap().iter() {
            h();
        }
        let mut out = String::new();
        for f in self.families.lock().unwrap().iter() {
            f.render(&mut out);
        }
        out
    }
}

fn own(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|s| s.to_string()).collect()
}

/// Counter and gauge values are f64 bit patterns in an atomic.
struct Inner {
    name: String,
    help: String,
    labels: Vec<String>,
    kind: &'static str,
    series: Mutex<BTreeMap<Labels, Arc<AtomicU64>>>,
}

impl Inner {
    fn new(name: &str, help: &str, labels: &[&str], kind: &'static str) -> Self {
        Self { name: name.into(), help: help.into(), labels: own(labels), kind, series: Mutex::default() }
    }

    fn cell(&self, values: &[&str]) -> Arc<AtomicU64> {
        assert_eq!(values.len(), self.labels.len(), "metric {}: label count", self.name);
        self.series
            .lock()
            .unwrap()
            .entry(own(values))
            .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())))
            .clone()
    }
}

impl Family for Inner {
    fn render(&self, out: &mut String) {
        header(out, &self.name, &self.help, self.kind);
        let series = self.series.lock().unwrap();
        if series.is_empty() && self.labels.is_empty() {
            let _ = writeln!(out, "{} 0", self.name);
        }
        for (values, v) in series.iter() {
            let _ = writeln!(out, "{}{} {}", self.name, label_set(&self.labels, values, None), fmt_f64(f64::from_bits(v.load(Ordering::Relaxed))));
        }
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn label_set(names: &[String], values: &[String], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape_label(v)))
        .collect();
    if let Some((n, v)) = extra {
        parts.push(format!("{n}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn add_f64(cell: &AtomicU64, d: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some((f64::from_bits(b) + d).to_bits()));
}

/// A monotonically increasing count.
#[derive(Clone)]
pub struct CounterVec(Arc<Inner>);

#[derive(Clone)]
pub struct Counter(Arc<AtomicU64>);

impl CounterVec {
    pub fn with(&self, labels: &[&str]) -> Counter {
        Counter(self.0.cell(labels))
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
        add_f64(&self.0, v.max(0.0));
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    /// Mirror a monotonic total counted elsewhere; never moves the counter backwards.
    pub fn set_total(&self, v: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(f64::from_bits(b).max(v).to_bits()));
    }
}

/// A value that goes up and down.
#[derive(Clone)]
pub struct GaugeVec(Arc<Inner>);

#[derive(Clone)]
pub struct Gauge(Arc<AtomicU64>);

impl GaugeVec {
    pub fn with(&self, labels: &[&str]) -> Gauge {
        Gauge(self.0.cell(labels))
    }
    /// Drop a labelled series (a removed stream).
    pub fn remove(&self, labels: &[&str]) {
        self.0.series.lock().unwrap().remove(&own(labels));
    }
}

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed)
    }
    pub fn add(&self, d: f64) {
        add_f64(&self.0, d)
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Latency distributions (cumulative buckets, sum and count).
#[derive(Clone)]
pub struct HistogramVec(Arc<HistInner>);

struct HistInner {
    name: String,
    help: String,
    labels: Vec<String>,
    buckets: Vec<f64>,
    series: Mutex<BTreeMap<Labels, Arc<Mutex<HistState>>>>,
}

#[derive(Default)]
struct HistState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Clone)]
pub struct Histogram {
    buckets: Arc<[f64]>,
    state: Arc<Mutex<HistState>>,
}

/// Default latency buckets in seconds, 5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl HistogramVec {
    pub fn with(&self, labels: &[&str]) -> Histogram {
        assert_eq!(labels.len(), self.0.labels.len(), "metric {}: label count", self.0.name);
        let state = self
            .0
            .series
            .lock()
            .unwrap()
            .entry(own(labels))
            .or_insert_with(|| Arc::new(Mutex::new(HistState { counts: vec![0; self.0.buckets.len()], ..Default::default() })))
            .clone();
        Histogram { buckets: self.0.buckets.clone().into(), state }
    }
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let mut s = self.state.lock().unwrap();
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                s.counts[i] += 1;
            }
        }
        s.sum += v;
        s.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.state.lock().unwrap().count
    }
}

impl Family for HistInner {
    fn render(&self, out: &mut String) {
        header(out, &self.name, &self.help, "histogram");
        for (values, s) in self.series.lock().unwrap().iter() {
            let s = s.lock().unwrap();
            for (b, c) in self.buckets.iter().zip(&s.counts) {
                let le = fmt_f64(*b);
                let _ = writeln!(out, "{}_bucket{} {c}", self.name, label_set(&self.labels, values, Some(("le", &le))));
            }
            let _ = writeln!(out, "{}_bucket{} {}", self.name, label_set(&self.labels, values, Some(("le", "+Inf"))), s.count);
            let _ = writeln!(out, "{}_sum{} {}", self.name, label_set(&self.labels, values, None), fmt_f64(s.sum));
            let _ = writeln!(out, "{}_count{} {}", self.name, label_set(&self.labels, values, None), s.count);
        }
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
            (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", registry.render())
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
    use std::sync::atomic::AtomicBool;

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
# HELP vigil_windows_total Windows emitted.
# TYPE vigil_windows_total counter
vigil_windows_total{stream=\"back\\\"yard\"} 3
vigil_windows_total{stream=\"front\"} 2
# HELP vigil_stream_up 1 while streaming.
# TYPE vigil_stream_up gauge
vigil_stream_up{stream=\"front\"} 1
# HELP vigil_answers_total Answers published.
# TYPE vigil_answers_total counter
vigil_answers_total 0
# HELP vigil_vision_seconds Vision encoder time.
# TYPE vigil_vision_seconds histogram
vigil_vision_seconds_bucket{le=\"0.1\"} 1
vigil_vision_seconds_bucket{le=\"1\"} 2
vigil_vision_seconds_bucket{le=\"+Inf\"} 3
vigil_vision_seconds_sum 5.55
vigil_vision_seconds_count 3
";
        assert_eq!(text, want);
        plain.inc();
        assert!(r.render().contains("vigil_answers_total 1\n"));
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
        assert!(body.contains("vigil_jobs_dropped_total 2\n"), "{body}");
        assert_eq!(get(srv.local_addr(), "/healthz").0, "HTTP/1.1 200 OK");
        healthy.store(false, Ordering::Relaxed);
        assert_eq!(get(srv.local_addr(), "/healthz"), ("HTTP/1.1 503 Service Unavailable".into(), "engine heartbeat is stale\n".into()));
        assert_eq!(get(srv.local_addr(), "/readyz"), ("HTTP/1.1 503 Service Unavailable".into(), "broker disconnected\n".into()));
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
