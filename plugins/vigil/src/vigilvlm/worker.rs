//! The element's worker thread: takes the windows the streaming thread closed, submits them to
//! the shared engine (at most [`MAX_IN_FLIGHT`] at a time, so one element cannot fill the
//! engine's queue for the others), and turns the engine's outputs into bus messages and text
//! buffers. The streaming thread only queues windows: a full queue drops its oldest window.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;

use vigil::config::PromptConfig;
use vigil::engine::{Job, JobOutput, PromptResult};
use vigil::lock::{lock, wait_timeout};
use vigil::publish::{Answer, WindowInfo};
use vigil::window::Window;

use super::engines::SharedEngine;

/// Jobs of one element in the engine at once: enough for the engine to batch consecutive
/// windows of a stream, few enough that other elements' windows get their turn.
const MAX_IN_FLIGHT: usize = 2;

/// A closed window waiting for the engine.
pub struct Pending {
    pub window: Arc<Window>,
    pub prompts: Vec<PromptConfig>,
    /// When the window closed (answers report the time since then).
    pub closed_at: Instant,
    /// The window's span in buffer time (PTS, duration) for the text pad.
    pub pts: Option<gst::ClockTime>,
    pub duration: Option<gst::ClockTime>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// Engine outputs still expected (one per prompt of each submitted window).
    outstanding: usize,
    /// Leave now (the element is stopping).
    abandon: bool,
}

/// Counters the element exposes as read-only properties.
#[derive(Default)]
pub struct Counters {
    pub windows: AtomicU64,
    pub windows_dropped: AtomicU64,
    pub answers: AtomicU64,
    pub failures: AtomicU64,
}

/// What the streaming thread and the worker share.
pub struct Shared {
    queue: Mutex<Queue>,
    /// Signalled whenever the queue shrinks or an output arrives (EOS waits on it).
    progress: Condvar,
    wake: tokio::sync::Notify,
    pub counters: Counters,
    capacity: usize,
    /// Set during a flush: EOS waits give up.
    flushing: AtomicBool,
    /// PTS of the latest video buffer (ns; `u64::MAX`: none yet).
    pub last_pts: AtomicU64,
}

impl Shared {
    pub fn new(capacity: usize) -> Arc<Shared> {
        Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            progress: Condvar::new(),
            wake: tokio::sync::Notify::new(),
            counters: Counters::default(),
            capacity: capacity.max(1),
            flushing: AtomicBool::new(false),
            last_pts: AtomicU64::new(u64::MAX),
        })
    }

    /// Queue a closed window; returns the window dropped to make room, if any.
    pub fn push(&self, p: Pending) -> Option<Pending> {
        self.counters.windows.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        let dropped = if q.pending.len() >= self.capacity { q.pending.pop_front() } else { None };
        q.pending.push_back(p);
        drop(q);
        if dropped.is_some() {
            self.counters.windows_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.wake.notify_one();
        dropped
    }

    /// Drop every queued window (a flush); returns how many.
    pub fn clear(&self) -> usize {
        let n = std::mem::take(&mut lock(&self.queue).pending).len();
        self.counters.windows_dropped.fetch_add(n as u64, Ordering::Relaxed);
        self.progress.notify_all();
        n
    }

    pub fn set_flushing(&self, on: bool) {
        self.flushing.store(on, Ordering::SeqCst);
        // Take the lock so a waiter between its check and its wait sees the change.
        drop(lock(&self.queue));
        self.progress.notify_all();
    }

    /// Wait until every queued window is answered (or dropped), a flush starts, the element
    /// stops, or `timeout` passes. True if everything was answered.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.queue);
        loop {
            if q.pending.is_empty() && q.outstanding == 0 {
                return true;
            }
            let now = Instant::now();
            if q.abandon || self.flushing.load(Ordering::SeqCst) || now >= deadline {
                return false;
            }
            q = wait_timeout(&self.progress, q, deadline - now);
        }
    }

    /// Make the worker leave at once (queued windows are forgotten).
    pub fn abandon(&self) {
        let mut q = lock(&self.queue);
        q.abandon = true;
        q.pending.clear();
        drop(q);
        self.progress.notify_all();
        self.wake.notify_one();
    }
}

/// How text buffers are timestamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstVigilVlmTextTimestamps")]
pub enum TextTimestamps {
    /// PTS and duration span the window the answer is about (subtitle muxers, appsinks).
    #[enum_value(name = "Window: PTS and duration span the window", nick = "window")]
    Window,
    /// PTS is the video position when the answer arrives, duration the stride: an overlay
    /// shows each answer until the next one (live captions).
    #[enum_value(name = "Arrival: from the video position at arrival, for one stride", nick = "arrival")]
    Arrival,
}

/// Where the worker delivers answers.
pub struct Outlet {
    pub element: glib::WeakRef<super::VigilVlm>,
    pub text: super::text::TextOut,
    pub timestamps: TextTimestamps,
    pub stride: gst::ClockTime,
    /// The stream name answers report (the element's name).
    pub stream: String,
    /// The stream's key in the shared engine (unique in the process).
    pub key: String,
    pub fps: f64,
}

struct InFlight {
    window: Arc<Window>,
    closed_at: Instant,
    pts: Option<gst::ClockTime>,
    duration: Option<gst::ClockTime>,
    remaining: usize,
    prompts: usize,
}

/// Run the worker until the element stops.
pub fn run(shared: Arc<Shared>, engine: Arc<SharedEngine>, out: Outlet) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            if let Some(el) = out.element.upgrade() {
                gst::element_error!(el, gst::CoreError::Failed, ("cannot start the worker: {}", e));
            }
            return;
        }
    };
    rt.block_on(work(&shared, &engine, &out));
    // Queued jobs of ours would only be answered to nobody.
    engine.engine.forget_stream(&out.key);
}

async fn work(shared: &Shared, engine: &SharedEngine, out: &Outlet) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<JobOutput>();
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    loop {
        // Submit what fits.
        loop {
            let next = {
                let mut q = lock(&shared.queue);
                if q.abandon || inflight.len() >= MAX_IN_FLIGHT {
                    None
                } else {
                    q.pending.pop_front()
                }
            };
            let Some(p) = next else { break };
            let seq = p.window.seq;
            let n = p.prompts.len();
            let job = Job {
                stream: out.key.clone(),
                window: p.window.clone(),
                prompts: p.prompts,
                fps: out.fps,
                closed_at: Instant::now(),
                reply: tx.clone(),
            };
            match engine.engine.submit(job) {
                Ok(()) => {
                    lock(&shared.queue).outstanding += n;
                    inflight.insert(
                        seq,
                        InFlight {
                            window: p.window,
                            closed_at: p.closed_at,
                            pts: p.pts,
                            duration: p.duration,
                            remaining: n,
                            prompts: n,
                        },
                    );
                }
                Err(e) => {
                    shared.counters.windows_dropped.fetch_add(1, Ordering::Relaxed);
                    post_dropped(out, seq, &e.to_string());
                }
            }
            shared.progress.notify_all();
        }
        {
            let q = lock(&shared.queue);
            if q.abandon {
                return;
            }
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            Some(o) = rx.recv() => deliver(shared, engine, out, &mut inflight, o),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// One engine output: post it, push it, count it.
fn deliver(shared: &Shared, engine: &SharedEngine, out: &Outlet, inflight: &mut HashMap<u64, InFlight>, o: JobOutput) {
    let (seq, done) = match o {
        JobOutput::Answer(r) => {
            let seq = r.window_seq;
            if let Some(f) = inflight.get(&seq) {
                shared.counters.answers.fetch_add(1, Ordering::Relaxed);
                answer(shared, out, engine, f, r);
            }
            (seq, 1)
        }
        JobOutput::Dropped { window_seq, prompts, reason, .. } => {
            shared.counters.windows_dropped.fetch_add(1, Ordering::Relaxed);
            post_dropped(out, window_seq, reason.as_str());
            (window_seq, prompts.len())
        }
        JobOutput::Failed { window_seq, prompt, error, .. } => {
            shared.counters.failures.fetch_add(1, Ordering::Relaxed);
            if let Some(el) = out.element.upgrade() {
                gst::element_warning!(
                    el,
                    gst::LibraryError::Failed,
                    ("window {} prompt {}: {}", window_seq, prompt, error)
                );
            }
            (window_seq, 1)
        }
    };
    if let Some(f) = inflight.get_mut(&seq) {
        f.remaining = f.remaining.saturating_sub(done);
        if f.remaining == 0 {
            inflight.remove(&seq);
        }
    }
    let mut q = lock(&shared.queue);
    q.outstanding = q.outstanding.saturating_sub(done);
    drop(q);
    shared.progress.notify_all();
}

/// Post an answer on the bus and push it on the text pad.
fn answer(shared: &Shared, out: &Outlet, engine: &SharedEngine, f: &InFlight, mut r: PromptResult) {
    r.stream = out.stream.clone();
    let name = r.prompt.clone();
    let several = f.prompts > 1;
    let window = WindowInfo::of(&f.window, out.fps);
    let a = Answer::of_result(r, window, f.closed_at.elapsed(), engine.model_id.clone());
    let json = serde_json::to_string(&a).unwrap_or_default();
    let value = serde_json::to_string(&a.value).unwrap_or_default();
    if let Some(el) = out.element.upgrade() {
        let s = gst::Structure::builder("vigilvlm-answer")
            .field("stream", a.stream.as_str())
            .field("seq", a.window.seq)
            .field("prompt", a.prompt.as_str())
            .field("question", a.question.as_str())
            .field("kind", a.kind.as_str())
            .field("answer", a.answer.as_str())
            .field("value", value.as_str())
            .field("start-s", a.window.start_s)
            .field("end-s", a.window.end_s)
            .field("frames", a.window.frames)
            .field("pts", f.pts)
            .field("duration", f.duration)
            .field("json", json.as_str())
            .build();
        let _ = el.post_message(gst::message::Element::builder(s).src(&el).build());
    }
    // Several prompts share one pad: each line says which prompt it answers.
    let text = if several { format!("{name}: {}", a.answer) } else { a.answer.clone() };
    let (pts, duration) = match out.timestamps {
        TextTimestamps::Window => (f.pts, f.duration),
        TextTimestamps::Arrival => {
            let now = shared.last_pts.load(Ordering::Relaxed);
            ((now != u64::MAX).then(|| gst::ClockTime::from_nseconds(now)), Some(out.stride))
        }
    };
    let mut buf = gst::Buffer::from_mut_slice(text.into_bytes());
    {
        let b = buf.get_mut().expect("a new buffer is writable");
        b.set_pts(pts);
        b.set_duration(duration);
    }
    out.text.buffer(buf);
}

fn post_dropped(out: &Outlet, seq: u64, reason: &str) {
    if let Some(el) = out.element.upgrade() {
        announce_drop(&el, seq, reason);
    }
}

/// Log a dropped window and post its `vigilvlm-dropped` message.
pub fn announce_drop(el: &super::VigilVlm, seq: u64, reason: &str) {
    gst::warning!(super::imp::CAT, obj = el, "window {seq} dropped: {reason}");
    let s = gst::Structure::builder("vigilvlm-dropped").field("seq", seq).field("reason", reason).build();
    let _ = el.post_message(gst::message::Element::builder(s).src(el).build());
}
