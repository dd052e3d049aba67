//! The daemon: config → sources → windows → engine → MQTT, as a well-mannered systemd service.
//!
//! [`run`] is the whole service (mini-redis style: the binary only maps signals to [`Control`]s).
//! Start order: broker connection, engine (model load), metrics endpoint, then streams;
//! `READY=1` once the model is loaded and the broker connected (or 30 s passed without it). A
//! shutdown is honoured at every step of the start too. Shutdown: stop the sources, let
//! in-flight jobs finish within `engine.shutdown_timeout_s`, publish `stopped`, flush the outbox.
//!
//! Health: [`liveness`] (`/healthz`, the systemd watchdog) fails when the engine thread or the
//! MQTT publisher's event loop stops showing life; [`readiness`] (`/readyz`) also needs the
//! broker connected and every running stream streaming (or finished).
//! Reload (SIGHUP) re-reads the config: streams and prompts change in place, the model stays
//! loaded; a config that fails validation is rejected and the running one kept.

mod metrics;
pub mod notify;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::{Config, PromptConfig, StreamConfig};
use crate::engine::{Engine, Job, JobOutput, PromptResult};
use crate::lock::lock;
use crate::metrics::{MetricsServer, Probe};
use crate::processor::video::{FrameChanges, Video};
use crate::publish::{
    rfc3339, Answer, Command, Component, Latency, LoopHealth, PublishOptions, Publisher, SetTarget, StatusPayload,
    StreamState as PubState, TokenCounts, VisualTokens, WindowInfo,
};
use crate::source::{EventKind, SourceEvent, SourceManager, SourceOptions, SourceSpec, StreamState};
use crate::window::{Window, WindowReceiver};
use metrics::{collect_stats, install_scrape_hook, Metrics};
use notify::Notifier;

/// What the outside world asks of a running daemon (signals, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config file (SIGHUP).
    Reload,
    /// Stop cleanly (SIGTERM, SIGINT).
    Shutdown,
}

/// How long the publisher's event loop may stay on one event before it counts as wedged: an
/// event is handled without awaiting, in microseconds.
const PUBLISHER_STALL_LIMIT: Duration = Duration::from_secs(10);

/// How long start-up waits for the broker before going on (answers queue in the outbox).
const BROKER_WAIT: Duration = Duration::from_secs(30);

/// Why the daemon could not start (problems after start are logged, published and retried).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics { addr: String, source: std::io::Error },
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
    #[error("model: {0}")]
    Engine(#[source] crate::engine::EngineError),
    /// The model-loading task panicked or was cancelled.
    #[error("model: {0}")]
    LoadTask(#[source] tokio::task::JoinError),
    #[error("sources: {0}")]
    Source(#[source] crate::source::SourceError),
}

/// Map SIGTERM/SIGINT to [`Control::Shutdown`] and SIGHUP to [`Control::Reload`].
pub fn signal_controls() -> std::io::Result<mpsc::Receiver<Control>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::channel(8);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = hup.recv() => Control::Reload,
            };
            if tx.send(c).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// A window whose answers are still outstanding.
struct Pending {
    info: WindowInfo,
    closed_at: Instant,
    remaining: usize,
    /// The key frame, kept only when a prompt wants a snapshot of it.
    key_frame: Option<Arc<crate::window::Frame>>,
}

/// Everything the tasks share.
///
/// Lock order: a task holds at most these nested, taken in this order: `states` → `cfg` →
/// `disabled_prompts` → `overrides`. Every other mutex here is taken alone and released before
/// the next one. Calls into the engine, the publisher, the sources and the metrics registry take
/// only their own internal locks, which never call back into this state, so holding one of the
/// above across such a call cannot deadlock.
///
/// Shutdown is cooperative: `shutdown` is announced to the tasks that wait (watchdog, ready
/// notice); dropping a stream's entry in `readers` stops its reader; every task holds a clone
/// of `done`, so `run` sees them all finished when its receiver reports every sender dropped.
struct State {
    cfg: Mutex<Config>,
    config_path: PathBuf,
    engine: Engine,
    publisher: Arc<Publisher>,
    sources: Mutex<SourceManager>,
    metrics: Metrics,
    started: Instant,
    /// Streams disabled with `set OFF` (kept across reloads).
    disabled_streams: Mutex<HashSet<String>>,
    disabled_prompts: Mutex<HashSet<(String, String)>>,
    /// `set ON/OFF` of a scheduled prompt: holds until the schedule's next boundary.
    overrides: Mutex<HashMap<(String, String), (bool, Instant)>>,
    /// Per stream: dropping the sender stops the stream's window-reading task.
    readers: Mutex<HashMap<String, oneshot::Sender<()>>>,
    pending: Mutex<HashMap<(String, u64), Pending>>,
    states: Mutex<BTreeMap<String, StreamState>>,
    /// Recent total latencies (s), for the stats' p50/p95.
    recent_latency: Mutex<VecDeque<f64>>,
    answers_tx: mpsc::UnboundedSender<JobOutput>,
    notifier: Notifier,
    /// How stale the engine's heartbeat may get before the daemon counts as dead.
    engine_limit: Duration,
    /// The checkpoint's video processor, to measure what changed in a window (`skip_static`).
    gate: Option<Arc<crate::processor::video::VideoProcessor>>,
    /// Each (stream, prompt)'s last answer, re-published for a window skipped as static.
    last_answers: Mutex<HashMap<(String, String), Answer>>,
    /// Announces the shutdown to the tasks that wait for something else meanwhile.
    shutdown: broadcast::Sender<()>,
    /// Handed to every task; `None` once stopping (no new tasks).
    done: Mutex<Option<mpsc::Sender<()>>>,
}

/// Run the daemon until a [`Control::Shutdown`] arrives (or `controls` closes).
pub async fn run(config_path: &Path, mut controls: mpsc::Receiver<Control>) -> Result<(), DaemonError> {
    let cfg = Config::load(config_path)?;
    let notifier = Notifier::from_env();
    let _ = notifier.status("starting: broker, model");
    let metrics = Metrics::new();

    let (publisher, mut commands) = Publisher::start(&cfg, PublishOptions::default()).await?;
    let publisher = Arc::new(publisher);
    // A reload asked for during start-up is applied once running.
    let mut reload_asked = false;

    let engine_cfg = cfg.clone();
    let load_started = Instant::now();
    // The load cannot be interrupted; on shutdown its thread is left behind (the binary does
    // not wait for blocking tasks when it exits).
    let load = tokio::task::spawn_blocking(move || Engine::start(&engine_cfg));
    let Some(loaded) = until_shutdown(&mut controls, &mut reload_asked, load).await else {
        info!("stopping during start-up (model loading)");
        publisher.shutdown(Duration::from_secs(2)).await;
        return Ok(());
    };
    let engine = loaded.map_err(DaemonError::LoadTask)?.map_err(DaemonError::Engine)?;
    info!("model {} loaded in {:.1} s", cfg.model.model_id(), load_started.elapsed().as_secs_f64());

    let (sources, mut events) = SourceManager::new(SourceOptions::default()).map_err(DaemonError::Source)?;
    let (answers_tx, mut answers_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let state = Arc::new(State {
        cfg: Mutex::new(cfg.clone()),
        config_path: config_path.to_path_buf(),
        engine,
        publisher: publisher.clone(),
        sources: Mutex::new(sources),
        metrics,
        started: Instant::now(),
        disabled_streams: Mutex::default(),
        disabled_prompts: Mutex::default(),
        overrides: Mutex::default(),
        readers: Mutex::default(),
        pending: Mutex::default(),
        states: Mutex::default(),
        recent_latency: Mutex::default(),
        answers_tx,
        engine_limit: Duration::from_secs(30).max(notifier.watchdog_timeout().unwrap_or_default()),
        gate: crate::model::load::model_dir(&cfg.model, &cfg.base_dir)
            .ok()
            .and_then(|dir| crate::processor::video::VideoProcessor::from_pretrained(&dir).ok())
            .map(Arc::new),
        last_answers: Mutex::default(),
        notifier,
        shutdown: broadcast::channel(1).0,
        done: Mutex::new(Some(done_tx)),
    });
    install_scrape_hook(&state);
    let _metrics_server = match cfg.metrics.listen_addr() {
        Some(addr) => {
            let weak = Arc::downgrade(&state);
            let probe = move |p: Probe| {
                let Some(state) = weak.upgrade() else { return Err("stopping".to_string()) };
                match p {
                    Probe::Live => liveness(&state),
                    Probe::Ready => readiness(&state),
                }
            };
            Some(
                MetricsServer::start(addr, state.metrics.registry.clone(), probe)
                    .map_err(|source| DaemonError::Metrics { addr: addr.to_string(), source })?,
            )
        }
        None => None,
    };

    for s in cfg.streams.iter().filter(|s| s.enabled) {
        start_stream(&state, s);
    }
    spawn_ready_notice(&state);
    update_status_line(&state);
    info!("vigil running: {}", cfg.summary());

    let stats_state = state.clone();
    let stats_task = publisher.stats_every(Duration::from_secs(60), move || collect_stats(&stats_state));
    spawn_watchdog(&state);
    if reload_asked {
        reload(&state);
    }

    loop {
        tokio::select! {
            c = controls.recv() => match c {
                Some(Control::Reload) => reload(&state),
                Some(Control::Shutdown) | None => break,
            },
            Some(ev) = events.recv() => on_source_event(&state, ev),
            Some(out) = answers_rx.recv() => on_output(&state, out),
            Some(cmd) = commands.recv() => on_command(&state, cmd),
        }
    }

    // Shutdown: sources first (no new windows), then the engine's in-flight jobs, then MQTT.
    info!("stopping");
    let _ = state.notifier.stopping();
    let timeout = Duration::from_secs_f64(lock(&state.cfg).engine.shutdown_timeout_s);
    let deadline = Instant::now() + timeout;
    let _ = state.shutdown.send(());
    lock(&state.readers).clear();
    drop(lock(&state.done).take());
    // Every task has ended once every `done` sender is gone (a reader finishes the window in hand).
    let _ = tokio::time::timeout_at(deadline.into(), done_rx.recv()).await;
    let src_state = state.clone();
    let _ = tokio::task::spawn_blocking(move || lock(&src_state.sources).shutdown(Duration::from_secs(5))).await;
    let eng = state.engine.clone();
    let left = deadline.saturating_duration_since(Instant::now());
    let clean = tokio::task::spawn_blocking(move || eng.shutdown(left)).await.unwrap_or(false);
    if !clean {
        warn!("in-flight jobs did not finish within {:.0} s", timeout.as_secs_f64());
    }
    // Publish what the engine finished before it stopped.
    while let Ok(out) = answers_rx.try_recv() {
        on_output(&state, out);
    }
    // The stats ticker ends when the publisher's shutdown begins.
    publisher.shutdown(Duration::from_secs(10)).await;
    let _ = stats_task.await;
    let o = publisher.outbox_stats();
    let a = publisher.answer_counts();
    info!(
        "stopped: {} answers produced, {} delivered, {} dropped, {} undelivered; {} MQTT messages dropped in all, {} left in the outbox",
        a.produced,
        a.delivered,
        a.dropped,
        a.pending(),
        o.dropped,
        o.depth
    );
    Ok(())
}

/// `READY=1` once the broker took us (the embedded one is up at once), or after
/// [`BROKER_WAIT`] without it: the streams run meanwhile and their answers wait in the outbox.
fn spawn_ready_notice(state: &Arc<State>) {
    let Some(done) = lock(&state.done).clone() else { return };
    let mut shutdown = state.shutdown.subscribe();
    // Only the bool leaves the closure: the `Ref` that `wait_for` returns holds the watch's
    // read lock, and kept alive it would block the publisher's next link update for good.
    let mut link = state.publisher.link();
    let state = state.clone();
    tokio::spawn(async move {
        let _done = done;
        let wait = tokio::time::timeout(BROKER_WAIT, async { link.wait_for(|l| l.connected).await.is_ok() });
        let connected = tokio::select! {
            c = wait => c,
            _ = shutdown.recv() => return,
        };
        if connected != Ok(true) {
            warn!("MQTT broker not reachable yet; answers queue in the outbox until it is");
        }
        let _ = state.notifier.ready();
    });
}

/// Await `fut` unless a shutdown arrives first (`None`); a reload is noted for later.
async fn until_shutdown<F: std::future::Future>(
    controls: &mut mpsc::Receiver<Control>,
    reload_asked: &mut bool,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            c = controls.recv() => match c {
                Some(Control::Reload) => *reload_asked = true,
                Some(Control::Shutdown) | None => return None,
            },
        }
    }
}

/// `Err(reason)` when a part of the daemon stopped showing life: the engine thread (its
/// heartbeat older than `engine_limit`) or the publisher's event loop (ended, or stuck on one
/// event). `/healthz` and the systemd watchdog follow it.
fn liveness(state: &State) -> Result<(), String> {
    let age = state.engine.heartbeat_age();
    if age >= state.engine_limit {
        return Err(format!("engine heartbeat is {:.0} s old", age.as_secs_f64()));
    }
    match state.publisher.loop_health() {
        LoopHealth::Ended => Err("MQTT publisher's event loop ended".into()),
        LoopHealth::Running { busy_for } if busy_for >= PUBLISHER_STALL_LIMIT => {
            Err(format!("MQTT publisher's event loop stuck for {:.0} s", busy_for.as_secs_f64()))
        }
        LoopHealth::Running { .. } => Ok(()),
    }
}

/// `Err(reason)` unless alive, connected to the broker and every running stream streaming (or
/// finished, for a file). `/readyz` follows it.
fn readiness(state: &State) -> Result<(), String> {
    liveness(state)?;
    let link = state.publisher.link().borrow().clone();
    if !link.connected {
        return Err(format!("MQTT broker not connected: {}", link.last_error.as_deref().unwrap_or("connecting")));
    }
    let running: Vec<String> = lock(&state.readers).keys().cloned().collect();
    let states = lock(&state.states);
    let not_running: Vec<String> = running
        .iter()
        .filter_map(|name| match states.get(name) {
            Some(StreamState::Streaming | StreamState::Stopped) => None,
            Some(s) => Some(format!("{name}: {}", s.as_str())),
            None => Some(format!("{name}: starting")),
        })
        .collect();
    if not_running.is_empty() {
        Ok(())
    } else {
        Err(format!("streams not streaming: {}", not_running.join(", ")))
    }
}

/// Start a stream's pipeline and the task that turns its windows into jobs.
fn start_stream(state: &Arc<State>, s: &StreamConfig) {
    let Some(done) = lock(&state.done).clone() else { return };
    let base = lock(&state.cfg).base_dir.clone();
    let spec = match SourceSpec::from_config(s, &base) {
        Ok(mut spec) => {
            // Frames are resized once, at ingest, to what the model takes for this stream's
            // windows: the buffered frame is the model input.
            if let Some(v) = state.engine.video_input() {
                let frames = (s.settings.fps * s.settings.window_seconds + 1e-9).floor().max(1.0) as usize;
                spec.model_size = Some(Arc::new(move |h, w| v.target(h, w, frames)));
            }
            spec
        }
        Err(e) => {
            let msg = e.to_string();
            error!("stream {}: {msg}", s.name);
            state.publisher.error(Component::Source, Some(&s.name), &msg);
            return;
        }
    };
    let rx = match lock(&state.sources).add(spec) {
        Ok(rx) => rx,
        Err(e) => {
            let msg = e.to_string();
            error!("stream {}: {msg}", s.name);
            state.publisher.error(Component::Source, Some(&s.name), &msg);
            return;
        }
    };
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(read_windows(state.clone(), s.name.clone(), rx, stopped, done));
    // Replacing the entry drops the old reader's sender: it stops.
    lock(&state.readers).insert(s.name.clone(), stop);
}

fn stop_stream(state: &Arc<State>, name: &str) {
    // Dropping the sender stops the reader.
    lock(&state.readers).remove(name);
    lock(&state.sources).remove(name);
    state.engine.forget_stream(name);
    lock(&state.states).remove(name);
    state.metrics.stream_up.remove(&[name]);
}

/// Windows → jobs with the prompts due for them, until the window channel closes or the
/// stream's `readers` entry is dropped (`stop`). Holds `_done` while it runs.
async fn read_windows(
    state: Arc<State>,
    stream: String,
    rx: WindowReceiver,
    mut stop: oneshot::Receiver<()>,
    _done: mpsc::Sender<()>,
) {
    loop {
        let w = tokio::select! {
            biased;
            _ = &mut stop => return,
            w = rx.recv() => match w {
                Some(w) => w,
                None => return,
            },
        };
        let closed_at = Instant::now();
        state.metrics.windows.with(&[&stream]).inc();
        let (prompts, scheduled_out) = due_prompts(&state, &stream, w.seq);
        if prompts.is_empty() {
            if scheduled_out {
                state.metrics.windows_skipped.with(&[&stream, "schedule"]).inc();
            }
            continue;
        }
        let info = window_info(&w, &lock(&state.cfg));
        let fps = info.fps;
        let w = Arc::new(w);
        let settings = lock(&state.cfg).streams.iter().find(|s| s.name == stream).map(|s| s.settings.clone());
        let Some(settings) = settings else { continue };
        let snapshots = prompts.iter().any(|p| p.snapshot);
        let gated = settings.skip_static && has_last_answers(&state, &stream, &prompts);
        // One measure of what changed serves the gate and the snapshots' key frame.
        let changes = if gated || snapshots { measure_changes(&state, &w, fps).await } else { None };
        if gated && is_static(&settings, &w, changes.as_ref()) {
            state.metrics.windows_skipped.with(&[&stream, "static"]).inc();
            republish_static(&state, &stream, &prompts, &info);
            continue;
        }
        let key_frame = snapshots.then(|| {
            let by_measure = changes
                .as_ref()
                .and_then(|c| crate::snapshot::key_frame_by_changes(&c.per_frame))
                .and_then(|i| w.frames.get(i));
            by_measure.cloned().or_else(|| crate::snapshot::key_frame(&w.frames).map(|f| Arc::new(f.clone())))
        });
        // Stopped while measuring: the stream is gone, its window with it.
        if !matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
            return;
        }
        lock(&state.pending).insert(
            (stream.clone(), w.seq),
            Pending { info, closed_at, remaining: prompts.len(), key_frame: key_frame.flatten() },
        );
        let job = Job { stream: stream.clone(), window: w, prompts, fps, closed_at, reply: state.answers_tx.clone() };
        state.metrics.jobs_queued.with(&[&stream]).inc();
        if let Err(e) = state.engine.submit(job) {
            warn!("stream {stream}: engine refused a job: {e}");
        }
    }
}

/// Per frame, the video tokens that changed against the frame before (the checkpoint
/// processor's pruning measure), and the window's token count; `None` if the processor cannot
/// take the window (it then runs, and fails there with the reason). Off the async threads.
async fn measure_changes(state: &Arc<State>, w: &Arc<Window>, fps: f64) -> Option<FrameChanges> {
    let gate = state.gate.clone()?;
    let pruning = lock(&state.cfg).pruning.clone();
    let window = w.clone();
    tokio::task::spawn_blocking(move || gate.changes_of(Video::from_window(&window, fps).ok()?, &pruning).ok())
        .await
        .ok()
        .flatten()
}

/// With `skip_static`: whether less than `min_changed_fraction` of the window's video tokens
/// changed. A stream's first window always runs.
fn is_static(settings: &crate::config::StreamDefaults, w: &Window, changes: Option<&FrameChanges>) -> bool {
    if !settings.skip_static || w.seq == 0 || w.frames.len() < 2 {
        return false;
    }
    changes.is_some_and(|c| c.total > 0 && c.fraction() < settings.min_changed_fraction)
}

/// Whether every caption and JSON prompt due has an answer to re-publish: until then, windows
/// run (a skipped window must not leave a prompt without any answer).
fn has_last_answers(state: &State, stream: &str, prompts: &[PromptConfig]) -> bool {
    let last = lock(&state.last_answers);
    prompts
        .iter()
        .filter(|p| p.kind != crate::config::PromptKind::Alert)
        .all(|p| last.contains_key(&(stream.to_string(), p.name.clone())))
}

/// A window skipped as static: captions and JSON prompts re-publish their last answer marked
/// `"skipped": "static"` (unless `skip_publish`); alert prompts keep their state (an open event
/// stays open).
fn republish_static(state: &Arc<State>, stream: &str, prompts: &[PromptConfig], window: &WindowInfo) {
    let skip_publish =
        lock(&state.cfg).streams.iter().find(|s| s.name == stream).is_some_and(|s| s.settings.skip_publish);
    if skip_publish {
        return;
    }
    for p in prompts.iter().filter(|p| p.kind != crate::config::PromptKind::Alert) {
        let last = lock(&state.last_answers).get(&(stream.to_string(), p.name.clone())).cloned();
        let Some(mut a) = last else { continue };
        a.id = Answer::make_id(stream, window.seq, &p.name);
        a.window = window.clone();
        a.skipped = Some("static".into());
        a.tokens = TokenCounts { prompt: 0, generated: 0 };
        a.visual_tokens = VisualTokens { total: 0, kept: 0 };
        a.latency_ms = Latency { queue: 0.0, vision: 0.0, prefill: 0.0, decode: 0.0, total: 0.0 };
        a.timestamp = rfc3339(SystemTime::now());
        state.publisher.answer(&a);
        state.metrics.answers.with(&[stream, &p.name]).inc();
        tracing::debug!("answer {} produced", a.id);
    }
}

/// The stream's prompts whose `every` divides the window's sequence number, minus disabled ones
/// and those out of their schedule (a `set` override wins until the schedule's next boundary);
/// and whether a schedule kept any prompt out.
fn due_prompts(state: &State, stream: &str, seq: u64) -> (Vec<PromptConfig>, bool) {
    let cfg = lock(&state.cfg);
    let disabled = lock(&state.disabled_prompts);
    let overrides = lock(&state.overrides);
    let Some(s) = cfg.streams.iter().find(|s| s.name == stream) else { return (Vec::new(), false) };
    let now = crate::schedule::WeekTime::now_local();
    let mut scheduled_out = false;
    let due = s
        .prompts
        .iter()
        .filter_map(|p| cfg.prompt(p))
        .filter(|p| seq.is_multiple_of(p.every.max(1)))
        .filter(|p| {
            let key = (stream.to_string(), p.name.clone());
            if let Some((on, _)) = overrides.get(&key).filter(|(_, until)| Instant::now() < *until) {
                return *on;
            }
            if disabled.contains(&key) {
                return false;
            }
            let active = p.schedule().is_none_or(|s| s.is_active(now));
            scheduled_out |= !active;
            active
        })
        .cloned()
        .collect();
    (due, scheduled_out)
}

fn window_info(w: &Window, cfg: &Config) -> WindowInfo {
    let fps = cfg.streams.iter().find(|s| s.name == w.stream).map(|s| s.settings.fps).unwrap_or(0.0);
    WindowInfo::of(w, fps)
}

fn on_output(state: &Arc<State>, out: JobOutput) {
    match out {
        JobOutput::Answer(r) => publish_answer(state, r),
        JobOutput::Dropped { stream, window_seq, prompts, reason } => {
            state.metrics.jobs_dropped.with(&[&stream]).inc();
            warn!("stream {stream}: window {window_seq} dropped ({reason}); prompts {prompts:?} not answered");
            lock(&state.pending).remove(&(stream, window_seq));
        }
        JobOutput::Failed { stream, window_seq, prompt, error } => {
            state.metrics.answer_errors.with(&[&stream]).inc();
            error!("stream {stream}: window {window_seq} prompt {prompt}: {error}");
            state.publisher.error(
                Component::Engine,
                Some(&stream),
                &format!("window {window_seq} prompt {prompt}: {error}"),
            );
            settle(state, &stream, window_seq);
        }
    }
}

/// One prompt of a window is done; forget the window when all are.
fn settle(state: &State, stream: &str, seq: u64) -> Option<(WindowInfo, Instant, Option<Arc<crate::window::Frame>>)> {
    let mut pending = lock(&state.pending);
    let key = (stream.to_string(), seq);
    let p = pending.get_mut(&key)?;
    let found = (p.info.clone(), p.closed_at, p.key_frame.clone());
    p.remaining = p.remaining.saturating_sub(1);
    if p.remaining == 0 {
        pending.remove(&key);
    }
    Some(found)
}

fn publish_answer(state: &Arc<State>, r: PromptResult) {
    let Some((window, closed_at, key_frame)) = settle(state, &r.stream, r.window_seq) else {
        warn!("stream {}: answer for unknown window {}", r.stream, r.window_seq);
        return;
    };
    let total = closed_at.elapsed();
    let m = &state.metrics;
    m.answers.with(&[&r.stream, &r.prompt]).inc();
    for (stage, d) in
        [("queue", r.queue), ("vision", r.vision), ("prefill", r.prefill), ("decode", r.decode), ("total", total)]
    {
        m.stage.with(&[stage]).observe(d.as_secs_f64());
    }
    m.tokens_generated.inc_by(r.generated_tokens as f64);
    {
        let mut recent = lock(&state.recent_latency);
        if recent.len() >= 512 {
            recent.pop_front();
        }
        recent.push_back(total.as_secs_f64());
    }

    let model = lock(&state.cfg).model.model_id();
    let key = (r.stream.clone(), r.prompt.clone());
    let mut answer = Answer::of_result(r, window, total, model);
    if let Some(frame) = key_frame {
        answer.snapshot = snapshot(state, &key.0, &key.1, &answer.id, &frame);
    }
    state.publisher.answer(&answer);
    tracing::debug!("answer {} produced", answer.id);
    lock(&state.last_answers).insert(key, answer);
}

/// For a prompt with `snapshot = true`: a JPEG of the window's key frame, published (and saved
/// to `snapshot_dir`). Encoded on this task's thread, not the engine's.
fn snapshot(
    state: &Arc<State>,
    stream: &str,
    prompt: &str,
    id: &str,
    frame: &crate::window::Frame,
) -> Option<crate::publish::SnapshotInfo> {
    let (s, base) = {
        let cfg = lock(&state.cfg);
        if !cfg.prompt(prompt).is_some_and(|p| p.snapshot) {
            return None;
        }
        (cfg.streams.iter().find(|s| s.name == stream)?.settings.clone(), cfg.base_dir.clone())
    };
    let encoded =
        tokio::task::block_in_place(|| crate::snapshot::encode_jpeg(frame, s.snapshot_quality, s.snapshot_max_pixels));
    let (jpeg, width, height) = match encoded {
        Ok(e) => e,
        Err(e) => {
            warn!("stream {stream}: snapshot for {prompt}: {e}");
            return None;
        }
    };
    if let Some(dir) = &s.snapshot_dir {
        let dir = if dir.is_absolute() { dir.clone() } else { base.join(dir) };
        if let Err(e) = crate::snapshot::save(&dir, id, &jpeg, s.snapshot_keep) {
            warn!("stream {stream}: cannot save a snapshot in {}: {e}", dir.display());
        }
    }
    state.publisher.snapshot(stream, prompt, jpeg, width, height)
}

fn pub_state(s: &StreamState) -> PubState {
    match s {
        StreamState::Starting => PubState::Starting,
        StreamState::Streaming => PubState::Streaming,
        StreamState::Reconnecting { .. } => PubState::Reconnecting,
        StreamState::Stopped => PubState::Stopped,
        StreamState::Failed { .. } => PubState::Failed,
    }
}

fn on_source_event(state: &Arc<State>, ev: SourceEvent) {
    // A stream removed at reload may still report its last state.
    if !lock(&state.readers).contains_key(&ev.stream) {
        return;
    }
    let s = match ev.kind {
        EventKind::State(s) => s,
        EventKind::Caps(c) => return check_frame_shape(state, &ev.stream, &c),
    };
    let error = s.error().map(str::to_string);
    if matches!(s, StreamState::Reconnecting { .. } | StreamState::Failed { .. }) {
        state.publisher.close_events(&ev.stream, None, "stream_down");
    }
    match &s {
        StreamState::Failed { error } => state.publisher.error(Component::Source, Some(&ev.stream), error),
        StreamState::Reconnecting { attempt, delay, error } => {
            warn!("stream {}: reconnecting (attempt {attempt}, in {:.1} s): {error}", ev.stream, delay.as_secs_f64())
        }
        _ => info!("stream {}: {}", ev.stream, s.as_str()),
    }
    state.publisher.status(&ev.stream, &StatusPayload { state: pub_state(&s), since: rfc3339(ev.at), error });
    state.metrics.stream_up.with(&[&ev.stream]).set(if s == StreamState::Streaming { 1.0 } else { 0.0 });
    lock(&state.states).insert(ev.stream, s);
    update_status_line(state);
}

/// A stream whose frames the model can never take (too elongated) fails once, with the reason,
/// instead of failing every window.
fn check_frame_shape(state: &Arc<State>, stream: &str, c: &crate::source::NativeCaps) {
    let (w, h) = (c.out_width.max(1) as f64, c.out_height.max(1) as f64);
    let ratio = w.max(h) / w.min(h);
    if ratio <= crate::processor::resize::MAX_ASPECT_RATIO {
        return;
    }
    let error = format!(
        "frames of {}x{} have an aspect ratio of {ratio:.0}; the model takes at most {:.0}: stream stopped",
        c.out_width,
        c.out_height,
        crate::processor::resize::MAX_ASPECT_RATIO
    );
    error!("stream {stream}: {error}");
    stop_stream(state, stream);
    state.publisher.error(Component::Source, Some(stream), &error);
    let failed = StreamState::Failed { error: error.clone() };
    state.publisher.status(
        stream,
        &StatusPayload { state: pub_state(&failed), since: rfc3339(SystemTime::now()), error: Some(error) },
    );
    lock(&state.states).insert(stream.to_string(), failed);
    update_status_line(state);
}

fn update_status_line(state: &State) {
    let states = lock(&state.states);
    let streaming = states.values().filter(|s| **s == StreamState::Streaming).count();
    let configured = lock(&state.cfg).streams.len();
    let _ = state
        .notifier
        .status(&format!("{streaming}/{configured} streams streaming, {} jobs queued", state.engine.queue_len()));
}

fn on_command(state: &Arc<State>, cmd: Command) {
    match cmd {
        Command::SetStream { stream, enabled } => {
            let configured = lock(&state.cfg).streams.iter().find(|s| s.name == stream).cloned();
            let Some(s) = configured else { return };
            if enabled {
                lock(&state.disabled_streams).remove(&stream);
                if !lock(&state.readers).contains_key(&stream) && s.enabled {
                    start_stream(state, &s);
                }
            } else {
                lock(&state.disabled_streams).insert(stream.clone());
                stop_stream(state, &stream);
                state.publisher.close_events(&stream, None, "disabled");
                state.publisher.status(
                    &stream,
                    &StatusPayload { state: PubState::Disabled, since: rfc3339(SystemTime::now()), error: None },
                );
            }
            info!("stream {stream}: {}", if enabled { "enabled" } else { "disabled" });
            state.publisher.enabled(&SetTarget::Stream(stream), enabled);
        }
        Command::SetPrompt { stream, prompt, enabled } => {
            let schedule = lock(&state.cfg).prompt(&prompt).and_then(PromptConfig::schedule);
            if let Some(schedule) = schedule {
                // A scheduled prompt: the switch holds until the schedule's next boundary.
                let now = crate::schedule::WeekTime::now_local();
                let minutes = schedule.next_change(now).map(|t| crate::schedule::Schedule::minutes_between(now, t));
                let until = Instant::now() + Duration::from_secs(60 * u64::from(minutes.unwrap_or(7 * 24 * 60)));
                lock(&state.overrides).insert((stream.clone(), prompt.clone()), (enabled, until));
                lock(&state.disabled_prompts).remove(&(stream.clone(), prompt.clone()));
                if !enabled {
                    state.publisher.close_events(&stream, Some(&prompt), "disabled");
                }
                info!(
                    "stream {stream} prompt {prompt}: {} until its schedule's next boundary (in {} min)",
                    if enabled { "enabled" } else { "disabled" },
                    minutes.unwrap_or(0)
                );
                state.publisher.enabled(&SetTarget::Prompt { stream, prompt }, enabled);
                return;
            }
            if enabled {
                lock(&state.disabled_prompts).remove(&(stream.clone(), prompt.clone()));
            } else {
                lock(&state.disabled_prompts).insert((stream.clone(), prompt.clone()));
                state.publisher.close_events(&stream, Some(&prompt), "disabled");
            }
            info!("stream {stream} prompt {prompt}: {}", if enabled { "enabled" } else { "disabled" });
            state.publisher.enabled(&SetTarget::Prompt { stream, prompt }, enabled);
        }
    }
}

/// SIGHUP: apply stream and prompt changes; keep the model, broker and engine as they are.
fn reload(state: &Arc<State>) {
    let _ = state.notifier.reloading();
    let new = match Config::load(&state.config_path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload rejected, keeping the running config:\n{e}");
            state.publisher.error(Component::Config, None, &format!("reload rejected: {e}"));
            let _ = state.notifier.ready();
            return;
        }
    };
    let old = lock(&state.cfg).clone();
    let same = |a: &dyn erased::Ser, b: &dyn erased::Ser| a.json() == b.json();
    for (section, changed) in [
        ("model", !same(&old.model, &new.model)),
        ("mqtt", !same(&old.mqtt, &new.mqtt)),
        ("metrics", !same(&old.metrics, &new.metrics)),
        ("engine", !same(&old.engine, &new.engine)),
        ("pruning", !same(&old.pruning, &new.pruning)),
    ] {
        if changed {
            warn!("reload: [{section}] changed; it takes effect at the next restart");
        }
    }
    let mut kept = new.clone();
    kept.model = old.model.clone();
    kept.mqtt = old.mqtt.clone();
    kept.metrics = old.metrics.clone();
    kept.engine = old.engine.clone();
    kept.pruning = old.pruning.clone();
    state.publisher.reconfigure(&kept);
    *lock(&state.cfg) = kept;

    let old_streams: HashMap<&str, &StreamConfig> = old.streams.iter().map(|s| (s.name.as_str(), s)).collect();
    let disabled = lock(&state.disabled_streams).clone();
    let (mut added, mut removed, mut changed) = (0, 0, 0);
    for s in &new.streams {
        let run = s.enabled && !disabled.contains(&s.name);
        match old_streams.get(s.name.as_str()) {
            None if run => {
                start_stream(state, s);
                added += 1;
            }
            Some(o) if !same(*o, s) => {
                stop_stream(state, &s.name);
                if run {
                    start_stream(state, s);
                }
                changed += 1;
            }
            _ => {}
        }
    }
    for name in old_streams.keys() {
        if !new.streams.iter().any(|s| s.name == *name) {
            stop_stream(state, name);
            state.publisher.close_events(name, None, "removed");
            removed += 1;
        }
    }
    info!(
        "reloaded {}: {added} stream(s) added, {changed} changed, {removed} removed; {} prompts",
        state.config_path.display(),
        new.prompts.len()
    );
    let _ = state.notifier.ready();
    update_status_line(state);
}

/// Compare config sections by their serialised form.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

/// WATCHDOG=1 at half the systemd timeout, only while [`liveness`] holds: a wedged engine or
/// publisher stops the pings and systemd restarts the service.
fn spawn_watchdog(state: &Arc<State>) {
    let Some(timeout) = state.notifier.watchdog_timeout() else { return };
    let Some(done) = lock(&state.done).clone() else { return };
    let mut shutdown = state.shutdown.subscribe();
    let state = state.clone();
    tokio::spawn(async move {
        let _done = done;
        let mut tick = tokio::time::interval(timeout / 2);
        let mut withheld = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.recv() => return,
            }
            match liveness(&state) {
                Ok(()) => {
                    withheld = false;
                    let _ = state.notifier.watchdog();
                }
                Err(why) if !withheld => {
                    withheld = true;
                    error!("{why}: withholding the watchdog ping");
                }
                Err(_) => {}
            }
        }
    });
}
