//! The inference engine: windows × prompts → answers.
//!
//! One engine thread owns the model ([`runner::Runner`]); the daemon hands it [`Job`]s (a
//! window plus the prompts due for it) through [`Engine::submit`], which never blocks: jobs wait
//! in the bounded, per-stream round-robin [`queue::JobQueue`] (a full queue evicts the oldest job
//! of the longest stream; jobs older than `max_queue_age_s` are dropped, not answered late).
//! Each job carries its reply channel; every prompt gets exactly one [`JobOutput`].
//!
//! The thread takes batches of jobs from several streams (up to `max_batch` sequences and
//! `max_batch_tokens` prompt tokens) and runs them with the exact optimisations described in
//! [`runner`]: per-frame preprocessed pixels and vision features cached by content
//! ([`features`]), one video prefill
//! per window shared by all its prompts, one prefill/decode batch across streams. Answers are
//! token-for-token those of running each (window, prompt) alone (`tests/engine_exact.rs`).
//!
//! Also: answer-kind parsing ([`answer`]); the benchmarks live in [`crate::bench`].

pub mod answer;
pub mod features;
pub mod pixels;
pub mod preflight;
pub mod queue;
pub mod runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{Config, PromptConfig, PromptKind};
use crate::lock::{lock, wait_timeout};
use crate::model::GenerationParams;
use crate::processor::Processor;
use crate::window::Window;
pub use queue::DropReason;
use queue::{JobQueue, QueuedJob};
pub use runner::RunError;
use runner::{PreparedBatch, Preparer, RunOptions, RunStats, Runner, WindowWork};

/// Why the engine could not start or take a job.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load the model: {0}")]
    Load(#[source] LoadError),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the engine thread has stopped")]
    Stopped,
    #[error("invalid job: {0}")]
    InvalidJob(String),
}

impl EngineError {
    /// A checkpoint the engine cannot run ([`LoadError::Checkpoint`]).
    pub(crate) fn checkpoint(why: String) -> Self {
        EngineError::Load(LoadError::Checkpoint(why))
    }
}

/// Why the model and processor a config names could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No checkpoint directory (not found, not in the cache, the download failed).
    #[error("{0}")]
    Locate(#[source] crate::model::ModelError),
    #[error("{}: {source}", dir.display())]
    Model {
        dir: PathBuf,
        #[source]
        source: crate::model::ModelError,
    },
    #[error("{}: {source}", dir.display())]
    Processor {
        dir: PathBuf,
        #[source]
        source: crate::processor::ProcessorError,
    },
    /// Requests of the config that cannot fit the model's context.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    TooLong(Vec<preflight::PreflightError>),
    /// The checkpoint's parts disagree, or it asks for what the engine does not do.
    #[error("{0}")]
    Checkpoint(String),
    #[error("cannot spawn the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the model loader panicked")]
    Panicked,
    #[error("the engine thread died while loading")]
    ThreadDied,
}

/// A window and the prompts due for it (per each prompt's `every`).
#[derive(Debug, Clone)]
pub struct Job {
    pub stream: String,
    pub window: Arc<Window>,
    pub prompts: Vec<PromptConfig>,
    /// The stream's sampling rate: frame `i` of the window is at `i / fps` s. Carried by the job
    /// (not looked up in the config the engine started with) so a reload that changes a stream's
    /// fps takes effect; `0` derives it from the frames' grid (`slot / time_s`).
    pub fps: f64,
    /// When the window closed (queue latency is measured from here).
    pub closed_at: Instant,
    pub reply: tokio::sync::mpsc::UnboundedSender<JobOutput>,
}

/// What the engine says about each prompt of a job.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // answers are the common case; boxing them buys nothing
pub enum JobOutput {
    Answer(PromptResult),
    /// The job left the queue unanswered (too old, evicted, stream removed, shutdown).
    Dropped {
        stream: String,
        window_seq: u64,
        prompts: Vec<String>,
        reason: DropReason,
    },
    Failed {
        stream: String,
        window_seq: u64,
        prompt: String,
        error: Arc<RunError>,
    },
}

/// One answer with its timing and token accounting.
#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    pub stream: String,
    pub window_seq: u64,
    /// Prompt name.
    pub prompt: String,
    pub question: String,
    pub kind: PromptKind,
    /// Generated text (special tokens skipped, trimmed).
    pub text: String,
    /// Parsed value (bool for alerts, object for json); `Null` when none.
    pub value: serde_json::Value,
    pub parse_error: Option<String>,
    /// Generated token ids (including the EOS that ended the answer, if any).
    #[serde(skip)]
    pub tokens: Vec<u32>,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub visual_total: u32,
    pub visual_kept: u32,
    /// Window closed → its batch started.
    pub queue: Duration,
    /// Preprocessing + vision tower of the batch this answer was part of.
    pub vision: Duration,
    /// Video prefix + question prefill of the batch.
    pub prefill: Duration,
    /// Decoding until this answer finished.
    pub decode: Duration,
}

/// Counters since start (a snapshot; the daemon's metrics read it).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EngineCounters {
    pub jobs_queued: u64,
    pub jobs_done: u64,
    /// Jobs dropped, by reason (`too_old`, `queue_full`, `stream_removed`, `shutdown`).
    pub jobs_dropped: BTreeMap<DropReason, u64>,
    /// Prompts answered / failed.
    pub prompts_done: u64,
    pub prompts_failed: u64,
    /// Frames whose features came from the cache (or from another window of the same batch).
    pub vision_cache_hits: u64,
    pub vision_cache_misses: u64,
    pub frames_encoded: u64,
    /// Frames whose resized, normalized pixels came from the cache / were preprocessed.
    pub pixel_cache_hits: u64,
    pub pixel_cache_misses: u64,
    /// Prompts that re-used a window's prefilled video prefix (a window's first prompt is not counted).
    pub prefix_shared: u64,
    /// Prompts whose ids did not extend the shared prefix (BPE across the boundary): prefilled alone.
    pub prefix_fallbacks: u64,
    /// Video prefixes prefilled.
    pub video_prefills: u64,
    /// Tokens prefilled as video prefixes (once per window) and as per-prompt questions.
    pub prefix_tokens: u64,
    pub suffix_tokens: u64,
    /// Padding positions the packed prefix prefills did not compute.
    pub prefix_padding_skipped: u64,
    pub batches: u64,
    /// Sequences over all batches (`batch_size_sum / batches` = mean batch size).
    pub batch_size_sum: u64,
    pub visual_tokens_total: u64,
    pub visual_tokens_kept: u64,
    pub tokens_generated: u64,
    /// Time spent running batches, and its split over the stages (processor; vision tower;
    /// video + question prefills; decoding).
    pub busy_ms: u64,
    pub preprocess_ms: u64,
    pub vision_ms: u64,
    pub prefill_ms: u64,
    pub decode_ms: u64,
    /// The most KV-cache bytes one batch held at once.
    pub kv_cache_peak_bytes: u64,
}

impl EngineCounters {
    fn add(&mut self, s: &RunStats) {
        self.vision_cache_hits += s.vision_cache_hits;
        self.vision_cache_misses += s.vision_cache_misses;
        self.frames_encoded += s.frames_encoded;
        self.pixel_cache_hits += s.pixel_cache_hits;
        self.pixel_cache_misses += s.pixel_cache_misses;
        self.prefix_shared += s.prefix_shared;
        self.prefix_fallbacks += s.prefix_fallbacks;
        self.video_prefills += s.video_prefills;
        self.prefix_tokens += s.prefix_tokens;
        self.suffix_tokens += s.suffix_tokens;
        self.prefix_padding_skipped += s.prefix_padding_skipped;
        self.batch_size_sum += s.sequences;
        self.visual_tokens_total += s.visual_tokens_total;
        self.visual_tokens_kept += s.visual_tokens_kept;
        self.tokens_generated += s.tokens_generated;
        self.preprocess_ms += s.preprocess.as_millis() as u64;
        self.vision_ms += s.vision.as_millis() as u64;
        self.prefill_ms += s.prefill.as_millis() as u64;
        self.decode_ms += s.decode.as_millis() as u64;
        self.kv_cache_peak_bytes = self.kv_cache_peak_bytes.max(s.kv_cache_bytes);
    }
    fn dropped(&mut self, reason: DropReason, n: u64) {
        *self.jobs_dropped.entry(reason).or_default() += n;
    }
}

/// A job in the queue, with its cost estimate.
struct Queued {
    job: Job,
    fps: f64,
    tokens: usize,
}

impl QueuedJob for Queued {
    fn stream(&self) -> &str {
        &self.job.stream
    }
    fn enqueued_at(&self) -> Instant {
        self.job.closed_at
    }
    fn tokens(&self) -> usize {
        self.tokens
    }
    fn sequences(&self) -> usize {
        self.job.prompts.len().max(1)
    }
}

struct State {
    queue: JobQueue<Queued>,
    stopping: bool,
    /// Jobs dropped by age since the last log line (logged once per burst).
    too_old_burst: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    counters: Mutex<EngineCounters>,
    epoch: Instant,
    /// Milliseconds since `epoch` when the model thread, and the preprocessing thread, last
    /// showed life.
    heartbeat_ms: AtomicU64,
    prep_heartbeat_ms: AtomicU64,
    /// The preprocessing thread is blocked handing a batch to the model thread: its liveness is
    /// then the model thread's.
    prep_waiting: AtomicBool,
    abort: AtomicBool,
    finished: Mutex<bool>,
    finished_cv: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    default_fps: f64,
    max_batch: usize,
    max_batch_tokens: usize,
    /// How the checkpoint's video processor sizes frames (ingest, job token estimates).
    video: std::sync::OnceLock<VideoInput>,
}

/// How the checkpoint's video processor sizes a clip's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoInput {
    pub patch: usize,
    pub merge: usize,
    pub min_pixels: usize,
    /// The pixel budget of a whole clip, shared by its frames.
    pub max_pixels: usize,
    pub do_resize: bool,
}

impl VideoInput {
    /// The sizing a job's token estimate uses if the checkpoint's is not known. Unreachable in
    /// practice ([`Engine::start`] returns after the load sets it), so a small budget at
    /// VideoLLaMA3's patch and merge sizes: an estimate, never a refusal.
    pub const FALLBACK: VideoInput =
        VideoInput { patch: 14, merge: 2, min_pixels: 28 * 28, max_pixels: 112 * 112, do_resize: true };

    /// The sizing of a checkpoint's video processor settings.
    pub fn of(c: &crate::processor::checkpoint::ImageProcessorConfig) -> VideoInput {
        VideoInput {
            patch: c.patch_size,
            merge: c.merge_size,
            min_pixels: c.min_pixels,
            max_pixels: c.max_pixels,
            do_resize: c.do_resize,
        }
    }

    /// The processor's (height, width) for a frame of a clip of `frames` frames, or `None` if
    /// it refuses the frame (too elongated, empty).
    pub fn target(&self, height: usize, width: usize, frames: usize) -> Option<(usize, usize)> {
        if !self.do_resize {
            return Some((height, width));
        }
        crate::processor::resize::smart_resize(
            height,
            width,
            self.patch * self.merge,
            self.min_pixels,
            self.max_pixels / frames.max(1),
        )
        .ok()
    }
}

impl Shared {
    fn beat(&self) {
        self.heartbeat_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn beat_prep(&self) {
        self.prep_heartbeat_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Handle to the engine thread (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

/// Report a job that will not run.
fn drop_job(job: &Job, reason: DropReason) {
    let _ = job.reply.send(JobOutput::Dropped {
        stream: job.stream.clone(),
        window_seq: job.window.seq,
        prompts: job.prompts.iter().map(|p| p.name.clone()).collect(),
        reason,
    });
}

/// Load the model and processor a config names.
pub fn load_runner(cfg: &Config) -> Result<Runner, EngineError> {
    let dir = model_dir(cfg).map_err(|e| EngineError::Load(LoadError::Locate(e)))?;
    let model = crate::model::load::load_model(
        &crate::config::ModelConfig { path: Some(dir.clone()), ..cfg.model.clone() },
        &cfg.base_dir,
    )
    .map_err(|source| EngineError::Load(LoadError::Model { dir: dir.clone(), source }))?;
    let processor = Processor::from_pretrained(&dir)
        .map_err(|source| EngineError::Load(LoadError::Processor { dir: dir.clone(), source }))?;
    let (too_long, _) = preflight::context_fit(cfg, &processor, model.config().text_config.max_position_embeddings);
    if !too_long.is_empty() {
        return Err(EngineError::Load(LoadError::TooLong(too_long)));
    }
    Runner::new(
        model,
        processor,
        GenerationParams::from_model_config(&cfg.model),
        cfg.pruning.clone(),
        cfg.engine.feature_cache_frames,
    )
}

/// The checkpoint directory: `path`, the cached `repo`, else (with `hub`) the downloaded one.
fn model_dir(cfg: &Config) -> Result<PathBuf, crate::model::ModelError> {
    match crate::model::load::model_dir(&cfg.model, &cfg.base_dir) {
        Ok(d) => Ok(d),
        #[cfg(feature = "hub")]
        Err(_) if cfg.model.path.is_none() && cfg.model.repo.is_some() => {
            let repo = cfg.model.repo.as_deref().unwrap_or_default();
            crate::model::load::download_snapshot(repo, cfg.model.revision.as_deref())
        }
        Err(e) => Err(e),
    }
}

/// Tokens a job adds to a prefill (for `max_batch_tokens`): visual tokens before pruning at the
/// processor's pixel budget, plus a rough text allowance per prompt.
fn estimate_tokens(job: &Job, v: &VideoInput) -> usize {
    let n = job.window.frames.len().max(1);
    let visual = job
        .window
        .frames
        .first()
        .and_then(|f| v.target(f.height as usize, f.width as usize, n))
        .map(|(h, w)| n * (h / v.patch.max(1)) * (w / v.patch.max(1)) / (v.merge * v.merge).max(1))
        .unwrap_or(0);
    visual + n * 8 + job.prompts.iter().map(|p| p.text.len() / 2 + 16).sum::<usize>()
}

impl Engine {
    /// Loads the model (per `cfg.model`) and processor on a dedicated engine thread; returns once
    /// it is loaded, or the load error.
    pub fn start(cfg: &Config) -> Result<Engine, EngineError> {
        Self::start_with(cfg, RunOptions::default())
    }

    /// [`Engine::start`] with chosen optimisations (tests and the bench compare them).
    pub fn start_with(cfg: &Config, options: RunOptions) -> Result<Engine, EngineError> {
        let e = &cfg.engine;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: JobQueue::new(e.queue_capacity, Duration::from_secs_f64(e.max_queue_age_s.max(0.0))),
                stopping: false,
                too_old_burst: 0,
            }),
            wake: Condvar::new(),
            counters: Mutex::new(EngineCounters::default()),
            epoch: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            prep_heartbeat_ms: AtomicU64::new(0),
            prep_waiting: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            finished: Mutex::new(false),
            finished_cv: Condvar::new(),
            thread: Mutex::new(None),
            default_fps: cfg.defaults.fps,
            max_batch: e.max_batch.max(1),
            max_batch_tokens: e.max_batch_tokens.max(1),
            video: std::sync::OnceLock::new(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), EngineError>>(1);
        let cfg = cfg.clone();
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("vigil-engine".into())
            .spawn(move || {
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_runner(&cfg)))
                    .unwrap_or_else(|_| Err(EngineError::Load(LoadError::Panicked)));
                let mut runner = match loaded {
                    Ok(r) => {
                        let _ = sh.video.set(VideoInput::of(&r.processor.video_processor.config.base));
                        let _ = ready_tx.send(Ok(()));
                        r
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        mark_finished(&sh);
                        return;
                    }
                };
                runner.set_options(options);
                engine_loop(&sh, &mut runner);
                // Free the model before saying we are done.
                drop(runner);
                mark_finished(&sh);
            })
            .map_err(|e| EngineError::Load(LoadError::Spawn(e)))?;
        *lock(&shared.thread) = Some(handle);
        match ready_rx.recv() {
            Ok(Ok(())) => {
                shared.beat();
                shared.beat_prep();
                Ok(Engine { shared })
            }
            Ok(Err(e)) => {
                join(&shared);
                Err(e)
            }
            Err(_) => {
                join(&shared);
                Err(EngineError::Load(LoadError::ThreadDied))
            }
        }
    }

    /// How the loaded checkpoint sizes video frames (set once the model is loaded).
    pub fn video_input(&self) -> Option<VideoInput> {
        self.shared.video.get().copied()
    }

    /// Queue a job (never blocks). A full queue evicts the oldest job of the longest stream,
    /// which gets `JobOutput::Dropped`.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        if job.prompts.is_empty() {
            return Err(EngineError::InvalidJob("a job needs at least one prompt".into()));
        }
        if job.window.frames.is_empty() {
            return Err(EngineError::InvalidJob(format!("window {} of {} has no frames", job.window.seq, job.stream)));
        }
        if *lock(&self.shared.finished) {
            return Err(EngineError::Stopped);
        }
        let fps = self.fps_of(&job);
        let mut st = lock(&self.shared.state);
        if st.stopping {
            return Err(EngineError::ShuttingDown);
        }
        let v = self.shared.video.get().copied().unwrap_or(VideoInput::FALLBACK);
        let tokens = estimate_tokens(&job, &v);
        let evicted = st.queue.push(Queued { job, fps, tokens });
        drop(st);
        let mut c = lock(&self.shared.counters);
        c.jobs_queued += 1;
        if let Some((old, why)) = evicted {
            c.dropped(why, 1);
            drop(c);
            tracing::warn!(stream = %old.job.stream, window = old.job.window.seq, "engine queue full; dropped the oldest job of the busiest stream");
            drop_job(&old.job, why);
        }
        self.shared.wake.notify_all();
        Ok(())
    }

    fn fps_of(&self, job: &Job) -> f64 {
        if job.fps > 0.0 && job.fps.is_finite() {
            return job.fps;
        }
        // Not given: the frames sit on the grid slot / fps.
        job.window
            .frames
            .iter()
            .find(|f| f.slot > 0 && f.time_s > 0.0)
            .map(|f| f.slot as f64 / f.time_s)
            .map(|f| (f * 1e6).round() / 1e6)
            .unwrap_or(self.shared.default_fps)
    }

    /// Time since the engine thread last showed life (updated at least every ~250 ms while
    /// idle, and between prefill/decode steps while busy).
    pub fn heartbeat_age(&self) -> Duration {
        let now = self.shared.epoch.elapsed().as_millis() as u64;
        // The older of the two threads' signs of life (either one stuck is the engine stuck),
        // except while preprocessing waits on the model.
        let model = self.shared.heartbeat_ms.load(Ordering::Relaxed);
        let last = if self.shared.prep_waiting.load(Ordering::Relaxed) {
            model
        } else {
            model.min(self.shared.prep_heartbeat_ms.load(Ordering::Relaxed))
        };
        Duration::from_millis(now.saturating_sub(last))
    }

    pub fn counters(&self) -> EngineCounters {
        lock(&self.shared.counters).clone()
    }

    pub fn queue_len(&self) -> usize {
        lock(&self.shared.state).queue.len()
    }

    /// Remove a stream's queued jobs (stream removed or disabled at run time).
    pub fn forget_stream(&self, stream: &str) {
        let jobs = lock(&self.shared.state).queue.remove_stream(stream);
        if !jobs.is_empty() {
            lock(&self.shared.counters).dropped(DropReason::StreamRemoved, jobs.len() as u64);
            for q in &jobs {
                drop_job(&q.job, DropReason::StreamRemoved);
            }
        }
    }

    /// Stop taking jobs, finish the queued and in-flight ones within `timeout`, join the thread.
    /// Jobs still waiting at the deadline are dropped (`shutdown`) and a running batch is cut
    /// short (its prompts fail). True if everything finished in time.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        lock(&self.shared.state).stopping = true;
        self.shared.wake.notify_all();
        let clean = wait_finished(&self.shared, deadline);
        if !clean {
            self.shared.abort.store(true, Ordering::Relaxed);
            self.shared.wake.notify_all();
            // The running batch stops at its next decode step; queued jobs are dropped.
            wait_finished(&self.shared, Instant::now() + Duration::from_secs(5));
        }
        let finished = *lock(&self.shared.finished);
        if finished {
            join(&self.shared);
        }
        clean && finished
    }
}

fn mark_finished(sh: &Shared) {
    *lock(&sh.finished) = true;
    sh.finished_cv.notify_all();
}

fn wait_finished(sh: &Shared, deadline: Instant) -> bool {
    let mut f = lock(&sh.finished);
    while !*f {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        f = wait_timeout(&sh.finished_cv, f, deadline - now);
    }
    true
}

fn join(sh: &Shared) {
    if let Some(h) = lock(&sh.thread).take() {
        let _ = h.join();
    }
}

/// A batch taken from the queue and preprocessed, on its way to the model.
struct Ready {
    batch: Vec<Queued>,
    work: Vec<WindowWork>,
    prepared: PreparedBatch,
}

/// The engine runs on two threads: this one computes with the model; a preprocessing thread
/// takes batches from the queue and prepares them (template, tokenizer, resize, normalize,
/// pruning mask) one batch ahead, so the model does not wait for the CPU between batches.
fn engine_loop(sh: &Arc<Shared>, runner: &mut Runner) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Ready>(1);
    let (psh, prep) = (sh.clone(), runner.preparer());
    let prep_thread =
        match std::thread::Builder::new().name("vigil-prep".into()).spawn(move || prep_loop(&psh, prep, tx)) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("cannot start the preprocessing thread ({e}); the engine stops");
                return;
            }
        };
    loop {
        sh.beat();
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(ready) => run_ready(sh, runner, ready),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = prep_thread.join();
}

/// `Arc<Shared>` references the engine's own threads hold: more means an `Engine` handle lives.
const OWN_REFS: usize = 2;

fn prep_loop(sh: &Arc<Shared>, mut prep: Preparer, tx: std::sync::mpsc::SyncSender<Ready>) {
    loop {
        sh.beat_prep();
        let batch = {
            let mut st = lock(&sh.state);
            let old = st.queue.expire(Instant::now());
            if !old.is_empty() {
                lock(&sh.counters).dropped(DropReason::TooOld, old.len() as u64);
                if st.too_old_burst == 0 {
                    tracing::warn!(
                        jobs = old.len(),
                        "engine is behind: dropping jobs older than max_queue_age_s (logged once per burst)"
                    );
                }
                st.too_old_burst += old.len() as u64;
                for q in &old {
                    drop_job(&q.job, DropReason::TooOld);
                }
            }
            if sh.abort.load(Ordering::Relaxed) {
                let mut rest: Vec<Queued> = Vec::new();
                while !st.queue.is_empty() {
                    rest.extend(st.queue.take_batch(usize::MAX, usize::MAX));
                }
                if !rest.is_empty() {
                    lock(&sh.counters).dropped(DropReason::Shutdown, rest.len() as u64);
                }
                for q in &rest {
                    drop_job(&q.job, DropReason::Shutdown);
                }
                return;
            }
            if st.queue.is_empty() {
                // Stopping, or every `Engine` handle is gone (only the engine's threads hold `Shared`).
                if st.stopping || Arc::strong_count(sh) <= OWN_REFS {
                    return;
                }
                drop(wait_timeout(&sh.wake, st, Duration::from_millis(250)));
                continue;
            }
            if st.too_old_burst > 0 && old.is_empty() {
                tracing::info!(dropped = st.too_old_burst, "engine caught up; jobs dropped for age in the last burst");
                st.too_old_burst = 0;
            }
            st.queue.take_batch(sh.max_batch, sh.max_batch_tokens)
        };
        let start = Instant::now();
        let work: Vec<WindowWork> = batch
            .iter()
            .map(|q| WindowWork {
                stream: q.job.stream.clone(),
                window: q.job.window.clone(),
                fps: q.fps,
                prompts: q.job.prompts.clone(),
                queue: start.saturating_duration_since(q.job.closed_at),
            })
            .collect();
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prep.prepare_batch(&work)))
            .unwrap_or_else(|_| {
                tracing::error!("the engine panicked while preprocessing a batch; its prompts fail");
                PreparedBatch::failed(work.len(), RunError::Panicked)
            });
        // Blocks until the model thread takes it (no polling while the model computes).
        sh.prep_waiting.store(true, Ordering::Relaxed);
        let sent = tx.send(Ready { batch, work, prepared });
        sh.beat_prep();
        sh.prep_waiting.store(false, Ordering::Relaxed);
        if sent.is_err() {
            return;
        }
    }
}

fn run_ready(sh: &Shared, runner: &mut Runner, ready: Ready) {
    let Ready { batch, work, prepared } = ready;
    let start = Instant::now();
    let alive = || sh.beat();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runner.compute_batch(&work, prepared, &alive, &sh.abort)
    }));
    let (outcomes, stats) = match ran {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("the engine panicked while running a batch; its prompts fail");
            (
                {
                    let error = Arc::new(RunError::Panicked);
                    work.iter().map(|w| w.prompts.iter().map(|_| Err(error.clone())).collect()).collect()
                },
                RunStats::default(),
            )
        }
    };
    // Counters first, so whoever has received every answer also sees them counted.
    let mut msgs = Vec::new();
    let (mut done, mut failed) = (0u64, 0u64);
    for (q, outs) in batch.iter().zip(outcomes) {
        for (p, o) in q.job.prompts.iter().zip(outs) {
            let msg = match o {
                Ok(r) => {
                    done += 1;
                    JobOutput::Answer(r)
                }
                Err(error) => {
                    failed += 1;
                    tracing::warn!(stream = %q.job.stream, window = q.job.window.seq, prompt = %p.name, %error, "prompt failed");
                    JobOutput::Failed {
                        stream: q.job.stream.clone(),
                        window_seq: q.job.window.seq,
                        prompt: p.name.clone(),
                        error,
                    }
                }
            };
            msgs.push((&q.job.reply, msg));
        }
    }
    {
        let mut c = lock(&sh.counters);
        c.add(&stats);
        c.batches += 1;
        c.jobs_done += batch.len() as u64;
        c.prompts_done += done;
        c.prompts_failed += failed;
        c.busy_ms += start.elapsed().as_millis() as u64;
    }
    for (reply, msg) in msgs {
        let _ = reply.send(msg);
    }
}
