//! The per-stream supervisor and the [`SourceManager`] that owns them.
//!
//! Each stream runs on its own OS thread: it builds a pipeline, watches the bus, and on error,
//! EOS or stall of a live source tears the pipeline down and tries again after an exponential
//! backoff with jitter — forever unless [`SourceOptions::max_retries`] says otherwise. Threads
//! share nothing but the event channel, so one stream's failure never stalls another.
//!
//! Backoff: attempt `n` waits a delay drawn uniformly from `[b/2, b]` with
//! `b = min(reconnect_max_s, reconnect_min_s · 2^(n-1))`; a run that streamed for
//! [`SourceOptions::stable_after`] resets `n`.
//!
//! Timestamps: within one attempt a frame's slot is `base + round((pts − first_pts) · fps)`.
//! The first attempt starts at slot 0; a looping file continues right after its last slot; a
//! reconnect continues after the real time that passed, so the windower sees the gap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video::prelude::*;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, info, warn};

use super::{pipeline, EventKind, SourceError, SourceEvent, SourceOptions, SourceSpec, StreamState};
use crate::lock::lock;
use crate::window::{window_queue, Frame, WindowReceiver, WindowSender, WindowSpec, Windower, WindowerStats};

/// The reconnect delay before attempt `attempt` (1-based), given a uniform `r` in `[0, 1)`.
pub fn backoff_delay(attempt: u32, min_s: f64, max_s: f64, r: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(40) as i32;
    let base = (min_s * 2f64.powi(exp)).min(max_s).max(0.0);
    Duration::from_secs_f64(base * (0.5 + 0.5 * r.clamp(0.0, 1.0)))
}

/// A snapshot of one stream's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStats {
    pub state: StreamState,
    /// Frames delivered by the appsink (after rate limiting).
    pub frames: u64,
    pub windows: WindowerStats,
    /// Windows dropped (oldest first) because the consumer was behind.
    pub windows_dropped_queue: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rebase {
    /// Continue right after the last slot (a looping file).
    Continue,
    /// Continue after the wall-clock time that passed (a reconnect).
    Gap,
}

/// Maps buffer PTS to slots and wall-clock times for the current attempt.
struct Timeline {
    fps: f64,
    mode: Rebase,
    run_first_pts: Option<u64>,
    run_base_slot: u64,
    run_wall_base: SystemTime,
    last_slot: Option<u64>,
    last_at: Option<Instant>,
}

impl Timeline {
    /// A timeline before its first frame; the first run starts at slot 0.
    fn new(fps: f64) -> Timeline {
        Timeline {
            fps,
            mode: Rebase::Gap,
            run_first_pts: None,
            run_base_slot: 0,
            run_wall_base: SystemTime::now(),
            last_slot: None,
            last_at: None,
        }
    }

    fn new_run(&mut self, mode: Rebase) {
        self.mode = mode;
        self.run_first_pts = None;
    }

    /// Slot and capture time of a buffer with `pts` (nanoseconds).
    fn place(&mut self, pts: Option<u64>) -> (u64, SystemTime) {
        let now = Instant::now();
        let first = match self.run_first_pts {
            Some(f) => f,
            None => {
                let base = match (self.last_slot, self.mode) {
                    (None, _) => 0,
                    (Some(l), Rebase::Continue) => l + 1,
                    (Some(l), Rebase::Gap) => {
                        let gap = self.last_at.map(|t| (now - t).as_secs_f64()).unwrap_or(0.0);
                        l + ((gap * self.fps).round() as u64).max(1)
                    }
                };
                let f = pts.unwrap_or(0);
                self.run_first_pts = Some(f);
                self.run_base_slot = base;
                self.run_wall_base = SystemTime::now();
                f
            }
        };
        let slot = match pts {
            Some(p) => self.run_base_slot + ((p.saturating_sub(first)) as f64 * self.fps / 1e9).round() as u64,
            // No timestamp: assume the next slot.
            None => self.last_slot.map(|l| l + 1).unwrap_or(self.run_base_slot),
        };
        let rel_s = (slot.saturating_sub(self.run_base_slot)) as f64 / self.fps;
        let wall = self.run_wall_base + Duration::from_secs_f64(rel_s);
        if self.last_slot.is_none_or(|l| slot > l) {
            self.last_slot = Some(slot);
        }
        self.last_at = Some(now);
        (slot, wall)
    }
}

struct Shared {
    spec: SourceSpec,
    opts: SourceOptions,
    stop: AtomicBool,
    windower: Mutex<Windower>,
    timeline: Mutex<Timeline>,
    tx: WindowSender,
    frames: AtomicU64,
    run_frames: AtomicU64,
    last_frame: Mutex<Option<Instant>>,
    reconnects: AtomicU64,
    state: Mutex<StreamState>,
    events: UnboundedSender<SourceEvent>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn set_state(&self, state: StreamState) {
        {
            let mut cur = lock(&self.state);
            if *cur == state {
                return;
            }
            *cur = state.clone();
        }
        match &state {
            StreamState::Reconnecting { .. } | StreamState::Failed { .. } => {
                warn!(stream = %self.spec.name, uri = %self.spec.redacted_uri(), "{state}")
            }
            _ => info!(stream = %self.spec.name, uri = %self.spec.redacted_uri(), "{state}"),
        }
        self.emit(EventKind::State(state));
    }

    fn emit(&self, kind: EventKind) {
        // The daemon may have dropped the receiver while shutting down; nothing to do then.
        let _ = self.events.send(SourceEvent { stream: self.spec.name.clone(), at: SystemTime::now(), kind });
    }

    /// Batch files (not live, not real time) must not lose windows: they wait for the consumer.
    fn blocking_queue(&self) -> bool {
        !self.spec.is_live() && !self.spec.settings.realtime
    }

    fn stall_timeout(&self) -> Duration {
        self.opts.stall_timeout.unwrap_or_else(|| Duration::from_secs_f64((3.0 / self.spec.settings.fps).max(10.0)))
    }

    /// Emit the final windows of a finite stream.
    fn flush(&self) {
        let windows = lock(&self.windower).finish();
        for w in windows {
            if self.blocking_queue() {
                self.tx.push_blocking(w, &self.stop);
            } else {
                self.tx.push(w);
            }
        }
    }

    /// A native frame resized to the model's input size (see [`super::to_model_size`]).
    fn to_model_size(&self, data: Vec<u8>, w: usize, h: usize) -> (Vec<u8>, usize, usize) {
        match &self.spec.model_size {
            Some(size) => super::to_model_size(data, w, h, size(h, w), self.spec.settings.max_frame_pixels),
            None => (data, w, h),
        }
    }

    /// The appsink callback: copy the frame (respecting the row stride), window it, queue.
    fn on_sample(&self, sink: &gst_app::AppSink) -> Result<gst::FlowSuccess, gst::FlowError> {
        let sample = sink.pull_sample().map_err(|_| gst::FlowError::Flushing)?;
        if self.stopped() {
            return Err(gst::FlowError::Flushing);
        }
        let (Some(buffer), Some(caps)) = (sample.buffer(), sample.caps()) else {
            gst::element_error!(sink, gst::StreamError::Failed, ("appsink sample without buffer or caps"));
            return Err(gst::FlowError::Error);
        };
        let info = gstreamer_video::VideoInfo::from_caps(caps).map_err(|_| {
            gst::element_error!(sink, gst::StreamError::Format, ("appsink caps are not raw video: {}", caps));
            gst::FlowError::NotNegotiated
        })?;
        let vframe = gstreamer_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).map_err(|_| {
            gst::element_error!(sink, gst::StreamError::Failed, ("cannot map the video frame"));
            gst::FlowError::Error
        })?;
        let (w, h) = (info.width() as usize, info.height() as usize);
        let stride = vframe.plane_stride()[0] as usize;
        let plane = vframe.plane_data(0).map_err(|_| gst::FlowError::Error)?;
        let Some(data) = super::packed_rgb(plane, stride, w, h) else {
            gst::element_error!(sink, gst::StreamError::Failed, ("video plane smaller than {}x{} RGB", w, h));
            return Err(gst::FlowError::Error);
        };
        drop(vframe);
        let (data, w, h) = self.to_model_size(data, w, h);
        let pts = buffer.pts().map(|t| t.nseconds());
        let (slot, captured_at) = lock(&self.timeline).place(pts);
        let frame = Arc::new(Frame {
            width: w as u32,
            height: h as u32,
            data,
            slot,
            time_s: slot as f64 / self.spec.settings.fps,
            captured_at,
        });
        let windows = lock(&self.windower).push(frame);
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.run_frames.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_frame) = Some(Instant::now());
        for win in windows {
            if self.blocking_queue() {
                if !self.tx.push_blocking(win, &self.stop) {
                    return Err(gst::FlowError::Flushing);
                }
            } else if self.tx.push(win) {
                debug!(stream = %self.spec.name, "consumer behind: dropped the oldest window");
            }
        }
        Ok(gst::FlowSuccess::Ok)
    }
}

enum Outcome {
    Stopped,
    Eos,
    Error(String),
    /// No frame within the start timeout (and no error either).
    NoStart(String),
}

/// A local file shows its first frame quickly; one that does not is retried (GStreamer 1.22's
/// decodebin3 occasionally stalls before exposing its pads when many pipelines start at once).
const FILE_START_TIMEOUT: Duration = Duration::from_secs(8);
const FILE_START_RETRIES: u32 = 2;

/// A readable sentence from a GStreamer error message, credentials removed.
fn error_text(spec: &SourceSpec, err: &gst::message::Error) -> String {
    let src = err.src().map(|s| s.name().to_string()).unwrap_or_else(|| "pipeline".into());
    let mut text = format!("{} (from {src})", err.error().message().trim_end_matches('.'));
    if let Some(d) = err.debug() {
        // The first line of the debug text usually names the real cause (404, refused, ...).
        let first = d.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
        if !first.is_empty() {
            text.push_str(": ");
            text.push_str(&first);
        }
    }
    spec.scrub(&text)
}

fn run_once(shared: &Arc<Shared>) -> Outcome {
    let spec = &shared.spec;
    let built = match pipeline::build(spec) {
        Ok(b) => b,
        Err(e) => return Outcome::Error(spec.scrub(&e)),
    };
    let weak = Arc::downgrade(shared);
    built.appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| match weak.upgrade() {
                Some(s) => s.on_sample(sink),
                None => Err(gst::FlowError::Flushing),
            })
            .build(),
    );
    let pipeline = built.pipeline;
    let Some(bus) = pipeline.bus() else {
        return Outcome::Error("pipeline has no bus".into());
    };
    let outcome = watch(shared, &pipeline, &bus, &built.native_caps);
    // Tear down on this thread; the callback sees `stop` or simply stops being called.
    let _ = pipeline.set_state(gst::State::Null);
    outcome
}

fn watch(
    shared: &Arc<Shared>,
    pipeline: &gst::Pipeline,
    bus: &gst::Bus,
    native_caps: &Arc<Mutex<Option<super::NativeCaps>>>,
) -> Outcome {
    let spec = &shared.spec;
    let live = spec.is_live();
    if pipeline.set_state(gst::State::Playing).is_err() {
        // The reason is on the bus.
        while let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(500)) {
            if let gst::MessageView::Error(err) = msg.view() {
                return Outcome::Error(error_text(spec, err));
            }
        }
        return Outcome::Error("the pipeline could not be started".into());
    }
    let start = Instant::now();
    let mut reported = false;
    // `Streaming` (and the caps) go out once the first frame is in, before anything that ends
    // the run: a short file can reach its end within one poll of the bus.
    let report = |reported: &mut bool| {
        if !*reported && shared.run_frames.load(Ordering::Relaxed) > 0 {
            *reported = true;
            if let Some(c) = lock(native_caps).clone() {
                shared.emit(EventKind::Caps(c));
            }
            shared.set_state(StreamState::Streaming);
        }
    };
    loop {
        if shared.stopped() {
            return Outcome::Stopped;
        }
        report(&mut reported);
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) {
            report(&mut reported);
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    if !live && spec.settings.loop_ {
                        lock(&shared.timeline).new_run(Rebase::Continue);
                        if pipeline
                            .seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT, gst::ClockTime::ZERO)
                            .is_err()
                        {
                            return Outcome::Error("cannot loop: seeking back to the start failed".into());
                        }
                        debug!(stream = %spec.name, "end of file: looping");
                        continue;
                    }
                    return Outcome::Eos;
                }
                gst::MessageView::Error(err) => return Outcome::Error(error_text(spec, err)),
                gst::MessageView::Warning(w) => {
                    debug!(stream = %spec.name, "GStreamer warning: {}", spec.scrub(&w.error().to_string()))
                }
                gst::MessageView::Latency(_) => {
                    let _ = pipeline.recalculate_latency();
                }
                _ => {}
            }
        }
        let n = shared.run_frames.load(Ordering::Relaxed);
        report(&mut reported);
        // Also for files: a pipeline that never produces a frame must not hang the stream.
        let start_timeout =
            if live { shared.opts.start_timeout } else { shared.opts.start_timeout.min(FILE_START_TIMEOUT) };
        if n == 0 && start.elapsed() > start_timeout {
            let secs = start_timeout.as_secs_f64();
            return Outcome::NoStart(if lock(native_caps).is_some() {
                format!("no video frame within {secs:.0} s")
            } else {
                format!("no video stream found within {secs:.0} s (audio only, or a codec without a decoder?)")
            });
        }
        if live {
            let stall = shared.stall_timeout();
            if n > 0 && lock(&shared.last_frame).is_some_and(|t| t.elapsed() > stall) {
                return Outcome::Error(format!("stream stalled: no frame for {:.0} s", stall.as_secs_f64()));
            }
        }
    }
}

/// Sleep up to `d`, returning early (false) when asked to stop.
fn sleep_unless_stopped(shared: &Shared, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if shared.stopped() {
            return false;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    !shared.stopped()
}

fn supervise(shared: Arc<Shared>) {
    let spec = &shared.spec;
    let live = spec.is_live();
    shared.set_state(StreamState::Starting);
    let mut failures: u32 = 0;
    let mut file_retries: u32 = 0;
    let mut first = true;
    let final_state = loop {
        if shared.stopped() {
            break StreamState::Stopped;
        }
        if !first {
            lock(&shared.timeline).new_run(Rebase::Gap);
        }
        first = false;
        shared.run_frames.store(0, Ordering::Relaxed);
        let outcome = run_once(&shared);
        let streamed_for = match (*lock(&shared.last_frame), shared.run_frames.load(Ordering::Relaxed)) {
            (Some(_), n) if n > 0 => n as f64 / spec.settings.fps,
            _ => 0.0,
        };
        match outcome {
            Outcome::Stopped => break StreamState::Stopped,
            // A file that ends without one frame is broken for vigil, not done.
            Outcome::Eos if !live && shared.frames.load(Ordering::Relaxed) == 0 => {
                shared.flush();
                break StreamState::Failed { error: "the file ended before any video frame".into() };
            }
            Outcome::Eos if !live => {
                shared.flush();
                break StreamState::Stopped;
            }
            Outcome::NoStart(error) if !live && file_retries < FILE_START_RETRIES => {
                file_retries += 1;
                warn!(stream = %spec.name, "{error}; retrying ({file_retries}/{FILE_START_RETRIES})");
            }
            Outcome::Error(error) | Outcome::NoStart(error) if !live => {
                shared.flush();
                break StreamState::Failed { error };
            }
            Outcome::Eos | Outcome::Error(_) | Outcome::NoStart(_) => {
                let error = match outcome {
                    Outcome::Error(e) | Outcome::NoStart(e) => e,
                    _ => "the source ended the stream (EOS)".into(),
                };
                if streamed_for >= shared.opts.stable_after.as_secs_f64() {
                    failures = 0;
                }
                failures += 1;
                if shared.opts.max_retries.is_some_and(|m| failures > m) {
                    break StreamState::Failed { error };
                }
                let s = &spec.settings;
                let delay = backoff_delay(failures, s.reconnect_min_s, s.reconnect_max_s, fastrand::f64());
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                shared.set_state(StreamState::Reconnecting { attempt: failures, delay, error });
                if !sleep_unless_stopped(&shared, delay) {
                    break StreamState::Stopped;
                }
            }
        }
    };
    shared.set_state(final_state);
    shared.tx.close();
}

struct Running {
    shared: Arc<Shared>,
    handle: JoinHandle<()>,
}

/// Owns the running streams; the daemon adds and removes them at run time.
pub struct SourceManager {
    streams: HashMap<String, Running>,
    stopping: Vec<JoinHandle<()>>,
    events: UnboundedSender<SourceEvent>,
    opts: SourceOptions,
}

impl SourceManager {
    /// A manager and the receiver of every stream's [`SourceEvent`]s.
    pub fn new(opts: SourceOptions) -> Result<(Self, UnboundedReceiver<SourceEvent>), SourceError> {
        super::init()?;
        let (tx, rx) = unbounded_channel();
        Ok((SourceManager { streams: HashMap::new(), stopping: Vec::new(), events: tx, opts }, rx))
    }

    /// Start a stream; its windows arrive on the returned receiver (closed when the stream
    /// ends or is removed).
    pub fn add(&mut self, spec: SourceSpec) -> Result<WindowReceiver, SourceError> {
        self.reap();
        if self.streams.contains_key(&spec.name) {
            return Err(SourceError::Duplicate(spec.name.clone()));
        }
        let s = &spec.settings;
        let wspec = WindowSpec::new(s.fps, s.window_seconds, s.stride_seconds, s.gap_policy)
            .map_err(|e| SourceError::Spec { stream: spec.name.clone(), message: e.to_string() })?;
        gst::Fraction::approximate_f64(s.fps).ok_or_else(|| SourceError::Spec {
            stream: spec.name.clone(),
            message: format!("fps {} is not representable", s.fps),
        })?;
        let (tx, rx) = window_queue(self.opts.queue_capacity);
        let shared = Arc::new(Shared {
            windower: Mutex::new(Windower::new(spec.name.clone(), wspec)),
            timeline: Mutex::new(Timeline::new(s.fps)),
            tx,
            frames: AtomicU64::new(0),
            run_frames: AtomicU64::new(0),
            last_frame: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            state: Mutex::new(StreamState::Stopped),
            events: self.events.clone(),
            stop: AtomicBool::new(false),
            opts: self.opts.clone(),
            spec,
        });
        let name = shared.spec.name.clone();
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vigil-src-{name}"))
            .spawn(move || supervise(thread_shared))
            .map_err(|source| SourceError::Thread { stream: name.clone(), source })?;
        self.streams.insert(name, Running { shared, handle });
        Ok(rx)
    }

    /// Ask a stream to stop and forget it; its thread finishes in the background (see
    /// [`SourceManager::shutdown`]). Returns false for an unknown name.
    pub fn remove(&mut self, name: &str) -> bool {
        match self.streams.remove(name) {
            Some(r) => {
                r.shared.stop.store(true, Ordering::Relaxed);
                self.stopping.push(r.handle);
                true
            }
            None => false,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.streams.contains_key(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.streams.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn stats(&self, name: &str) -> Option<StreamStats> {
        let s = &self.streams.get(name)?.shared;
        Some(StreamStats {
            state: lock(&s.state).clone(),
            frames: s.frames.load(Ordering::Relaxed),
            windows: lock(&s.windower).stats(),
            windows_dropped_queue: s.tx.dropped(),
            reconnects: s.reconnects.load(Ordering::Relaxed),
        })
    }

    /// Stop every stream and wait up to `timeout` for their threads; true when all ended.
    pub fn shutdown(&mut self, timeout: Duration) -> bool {
        let names: Vec<String> = self.streams.keys().cloned().collect();
        for n in names {
            self.remove(&n);
        }
        let end = Instant::now() + timeout;
        while Instant::now() < end && self.stopping.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.reap();
        self.stopping.is_empty()
    }

    fn reap(&mut self) {
        let (done, pending): (Vec<_>, Vec<_>) = self.stopping.drain(..).partition(|h| h.is_finished());
        for h in done {
            let _ = h.join();
        }
        self.stopping = pending;
    }
}

impl Drop for SourceManager {
    fn drop(&mut self) {
        for r in self.streams.values() {
            r.shared.stop.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_into_async_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SourceManager>();
        send_sync::<WindowReceiver>();
        send_sync::<SourceEvent>();
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff_delay(1, 1.0, 30.0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(1, 1.0, 30.0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff_delay(4, 1.0, 30.0, 1.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(10, 1.0, 30.0, 1.0), Duration::from_secs(30));
        assert_eq!(backoff_delay(u32::MAX, 1.0, 30.0, 0.0), Duration::from_secs(15));
    }

    #[test]
    fn timeline_rebases_runs() {
        let mut t = Timeline::new(2.0);
        // First run starts at slot 0 whatever the first PTS.
        assert_eq!(t.place(Some(3_000_000_000)).0, 0);
        assert_eq!(t.place(Some(3_500_000_000)).0, 1);
        assert_eq!(t.place(Some(4_000_000_000)).0, 2);
        // A loop continues right after.
        t.new_run(Rebase::Continue);
        assert_eq!(t.place(Some(0)).0, 3);
        assert_eq!(t.place(Some(500_000_000)).0, 4);
        // A reconnect right away still advances by at least one slot.
        t.new_run(Rebase::Gap);
        assert_eq!(t.place(Some(7)).0, 5);
        assert_eq!(t.place(None).0, 6);
    }
}
