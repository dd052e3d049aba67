//! `vigil bench --shape 2b|7b|CONFIG.json --random-weights`: the model at real shapes.
//!
//! Compute does not care what the weights are, so a checkpoint with random weights at the
//! published shapes ([`super::random`]) measures what the real one would. The workload is
//! synthetic camera windows: each frame's left `static_fraction` of columns never changes, the
//! rest changes every frame, so token pruning has the work a fixed camera gives it. Generation is
//! greedy for exactly `new_tokens` tokens (the bench checkpoint has no EOS), so runs compare.
//!
//! Three measurements, all on the configured device:
//! 1. the vision tower + projector on one window (ms, and TFLOP/s from the layer shapes);
//! 2. one (window, prompt) alone: prefill and decode at batch 1 (ms per token, and the weight
//!    bytes streamed per second, the bound of decoding);
//! 3. the serving path: the real [`Engine`] thread with `streams` cameras each submitting
//!    `windows` windows × `prompts` prompts; windows/s, generated tokens/s, and where the time
//!    went (preprocess / vision / prefill / decode).
//!
//! The frames are a formula, not a file, so the transformers peer rebuilds them exactly
//! (`tests/reference/bench_transformers.py`; a checksum in the JSON proves it):
//! frame `i` (counted over the whole stream) of stream `s`, pixel `(y, x)`, channel `c`:
//! `(3x + 5y + 50c + 7s) mod 256` where `x < floor(static_fraction · width)`, else
//! `(5x + 3y + 50c + 7s + 37i) mod 256`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::random::{bench_config, parameter_count, tensor_shapes, write_random_checkpoint};
use super::BenchError;
use crate::config::Config;
use crate::config::{DType, Device};
use crate::engine::{load_runner, Engine, EngineCounters, EngineError, Job, JobOutput};
use crate::model::VideoLlama3Config;
use crate::window::{Frame, Window};

/// Questions the bench asks, in order (`--prompts P` takes the first P, cycling).
pub const QUESTIONS: [&str; 4] = [
    "Describe what happens in this video.",
    "Is there a person in the frame? Answer yes or no.",
    "What color is the largest object?",
    "How many vehicles are visible?",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct ShapeOptions {
    /// `2b`, `7b` or a config.json path: random weights at these shapes.
    pub shape: Option<String>,
    /// Or an existing checkpoint directory (real weights, or one saved by `--save-weights`).
    pub model: Option<PathBuf>,
    pub device: Device,
    /// Default: bf16 on a GPU, f32 on the CPU.
    pub dtype: Option<DType>,
    /// `[model] attention` of the measured engine.
    pub attention: crate::config::AttentionMode,
    /// Stream counts to measure the serving path at.
    pub streams: Vec<usize>,
    pub windows: usize,
    pub frames: usize,
    pub width: u32,
    pub height: u32,
    pub prompts: usize,
    pub new_tokens: usize,
    pub pruning: bool,
    pub static_fraction: f64,
    pub fps: f64,
    /// Keep the random checkpoint here (the peer loads it); re-used when it already matches.
    pub save_weights: Option<PathBuf>,
    pub seed: u64,
}

impl Default for ShapeOptions {
    fn default() -> Self {
        Self {
            shape: None,
            model: None,
            device: Device::Cpu,
            dtype: None,
            attention: crate::config::AttentionMode::Auto,
            streams: vec![1, 8],
            windows: 2,
            frames: 16,
            width: 448,
            height: 448,
            prompts: 2,
            new_tokens: 32,
            pruning: true,
            static_fraction: 0.5,
            fps: 1.0,
            save_weights: None,
            seed: 0,
        }
    }
}

/// The workload, exactly as the peer needs it to run the same thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub frames: usize,
    pub width: u32,
    pub height: u32,
    pub static_fraction: f64,
    pub fps: f64,
    pub streams: Vec<usize>,
    pub windows: usize,
    pub questions: Vec<String>,
    pub new_tokens: usize,
    pub pruning: bool,
    pub threshold: f64,
    pub min_tokens_per_frame: usize,
    /// [`checksum`] of stream 0's first window.
    pub checksum: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VisionFigures {
    pub ms: f64,
    pub visual_tokens: usize,
    pub tflops: f64,
    pub tflop_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SingleFigures {
    pub prompt_tokens: u32,
    pub visual_tokens_total: u32,
    pub visual_tokens_kept: u32,
    /// Processor and vision tower (with projector and embedding stitch).
    pub preprocess_and_vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub generated: u32,
    pub decode_ms_per_token: f64,
    pub decode_tok_per_s: f64,
    /// Text weights read per decode step × steps per second.
    pub decode_weight_gb_per_s: f64,
    /// Whole request (preprocess to last token), seconds.
    pub total_s: f64,
    /// The greedy tokens (the peer reports where its own first differ).
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamFigures {
    pub streams: usize,
    pub windows: usize,
    pub prompts_per_window: usize,
    pub seconds: f64,
    pub windows_per_s: f64,
    pub generated_tok_per_s: f64,
    /// Engine busy time split (ms summed over batches).
    pub preprocess_ms: u64,
    pub vision_ms: u64,
    pub prefill_ms: u64,
    pub decode_ms: u64,
    pub batches: u64,
    pub mean_batch: f64,
    pub visual_tokens_total: u64,
    pub visual_tokens_kept: u64,
}

/// Everything `vigil bench --shape` reports (`--json` prints it; the peer prints the same keys).
#[derive(Debug, Clone, Serialize)]
pub struct ShapeReport {
    pub implementation: String,
    pub shape: String,
    pub checkpoint: String,
    pub device: String,
    pub dtype: String,
    pub parameters: u64,
    pub text_weight_bytes: u64,
    pub workload: Workload,
    pub load_s: f64,
    pub vision: VisionFigures,
    pub single: SingleFigures,
    pub stream: Vec<StreamFigures>,
    /// Peak device memory over the run above the pre-load baseline (GPU: nvidia-smi; CPU: RSS).
    pub memory_peak_mib: f64,
    pub memory_source: String,
    /// The peak's split: the weights (parameters × dtype size), the largest KV cache a batch
    /// held (measured by the engine, headroom included), and the rest — activations, the
    /// allocator's cache and the runtime (CUDA context, libraries).
    pub memory_weights_mib: f64,
    pub memory_kv_cache_mib: f64,
    pub memory_activations_mib: f64,
}

/// Pixel value of the synthetic frame formula (see the module doc).
pub fn pixel(s: usize, i: usize, y: u32, x: u32, c: u32, static_cols: u32) -> u8 {
    let (x, y, c, s, i) = (x as u64, y as u64, c as u64, s as u64, i as u64);
    let v =
        if x < static_cols as u64 { 3 * x + 5 * y + 50 * c + 7 * s } else { 5 * x + 3 * y + 50 * c + 7 * s + 37 * i };
    (v % 256) as u8
}

fn static_cols(width: u32, fraction: f64) -> u32 {
    (fraction.clamp(0.0, 1.0) * width as f64).floor() as u32
}

/// Frame `i` of stream `s`.
pub fn frame(s: usize, i: usize, w: &Workload) -> Frame {
    let sc = static_cols(w.width, w.static_fraction);
    let mut data = Vec::with_capacity((w.width * w.height * 3) as usize);
    for y in 0..w.height {
        for x in 0..w.width {
            for c in 0..3 {
                data.push(pixel(s, i, y, x, c, sc));
            }
        }
    }
    Frame {
        width: w.width,
        height: w.height,
        data,
        slot: i as u64,
        time_s: i as f64 / w.fps,
        captured_at: SystemTime::now(),
    }
}

/// Window `k` of stream `s` (windows do not overlap: the peer has no feature cache to match).
pub fn window(s: usize, k: usize, w: &Workload) -> Arc<Window> {
    let start = k * w.frames;
    super::window_of(s, k, start, (start..start + w.frames).map(|i| Arc::new(frame(s, i, w))).collect(), w.fps)
}

/// `Σ byte · (p mod 251 + 1)` over each frame's HWC bytes (p counted from 0 per frame).
pub fn checksum(window: &Window) -> u64 {
    window
        .frames
        .iter()
        .flat_map(|f| f.data.iter().enumerate().map(|(p, &b)| b as u64 * (p as u64 % 251 + 1)))
        .fold(0u64, u64::wrapping_add)
}

/// FLOPs of the vision tower + projector on `frames` frames of `gh × gw` patches.
pub fn vision_flops(cfg: &VideoLlama3Config, frames: usize, gh: usize, gw: usize) -> f64 {
    let v = &cfg.vision_config;
    let (n, d, i) = ((gh * gw) as f64, v.hidden_size as f64, v.intermediate_size as f64);
    let per_layer = 2.0 * n * d * 4.0 * d + 4.0 * n * d * i + 4.0 * n * n * d;
    let embed = 2.0 * n * v.patch_dim() as f64 * d;
    let merged = n / 4.0;
    let t = cfg.text_config.hidden_size as f64;
    let projector = 2.0 * merged * (d * t + t * t);
    frames as f64 * (embed + v.num_hidden_layers as f64 * per_layer + projector)
}

/// Samples peak memory in the background: the GPU's used memory via `nvidia-smi` for `cuda`
/// devices (it sees the CUDA context and the allocator's cache, as a user would), the process's
/// peak RSS on the CPU.
struct MemorySampler {
    stop: Arc<AtomicBool>,
    peak_mib: Arc<AtomicU64>,
    baseline_mib: u64,
    thread: Option<std::thread::JoinHandle<()>>,
    source: &'static str,
}

fn gpu_used_mib(index: &str) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn rss_peak_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

impl MemorySampler {
    fn start(device: Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let gpu = match device {
            Device::Cuda(n) => Some(n.to_string()),
            Device::Cpu => None,
        };
        if let Some(index) = gpu.filter(|i| gpu_used_mib(i).is_some()) {
            let baseline = gpu_used_mib(&index).unwrap_or(0);
            let (s, p) = (stop.clone(), peak.clone());
            let thread = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Some(m) = gpu_used_mib(&index) {
                        p.fetch_max(m, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            return Self {
                stop,
                peak_mib: peak,
                baseline_mib: baseline,
                thread: Some(thread),
                source: "nvidia-smi memory.used",
            };
        }
        // Reset the process's peak RSS (writing the random checkpoint is not part of the run).
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Self { stop, peak_mib: peak, baseline_mib: rss_peak_mib(), thread: None, source: "process peak RSS (VmHWM)" }
    }

    fn finish(mut self) -> (f64, String) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        } else {
            self.peak_mib.store(rss_peak_mib(), Ordering::Relaxed);
        }
        let peak = self.peak_mib.load(Ordering::Relaxed).saturating_sub(self.baseline_mib);
        (peak as f64, self.source.to_string())
    }
}

fn engine_config(dir: &Path, o: &ShapeOptions, dtype: DType, w: &Workload) -> Result<Config, BenchError> {
    let max_streams = w.streams.iter().copied().max().unwrap_or(1);
    let mut text = format!(
        "[model]\npath = {path:?}\ndevice = {dev:?}\ndtype = {dtype:?}\nattention = {att:?}\nmax_new_tokens = {t}\n\n\
         [pruning]\nenabled = {pr}\n\n\
         [engine]\nmax_batch = {mb}\nmax_batch_tokens = 1000000\nqueue_capacity = 100000\nmax_queue_age_s = 86400.0\nfeature_cache_frames = 1024\n",
        path = dir.display().to_string(),
        dev = o.device.to_string(),
        dtype = dtype.as_str(),
        att = o.attention.as_str(),
        t = w.new_tokens,
        pr = w.pruning,
        mb = max_streams * w.questions.len(),
    );
    let names: Vec<String> = (0..w.questions.len()).map(|p| format!("q{p}")).collect();
    for (name, q) in names.iter().zip(&w.questions) {
        text.push_str(&format!("\n[[prompt]]\nname = {name:?}\ntext = {q:?}\n"));
    }
    for s in 0..max_streams {
        text.push_str(&format!(
            "\n[[stream]]\nname = \"cam{s}\"\nuri = \"rtsp://127.0.0.1:8554/cam{s}\"\nprompts = {names:?}\nfps = {}\n",
            w.fps
        ));
    }
    Config::parse(&text, "bench.toml", Path::new(".")).map_err(BenchError::Config)
}

/// Run the benchmark.
pub fn run(o: &ShapeOptions, progress: &mut dyn FnMut(&str)) -> Result<ShapeReport, BenchError> {
    if o.frames == 0 || o.windows == 0 || o.prompts == 0 || o.new_tokens < 2 || o.streams.contains(&0) {
        return Err(BenchError::Options(
            "frames, windows, prompts and streams must be positive and new tokens at least 2".into(),
        ));
    }
    let dtype = o.dtype.unwrap_or(o.device.default_dtype());
    let candle_dtype = crate::model::load::candle_dtype(dtype);

    // Fail before writing gigabytes of weights when the device cannot be opened.
    crate::model::load::candle_device(o.device)?;

    // The checkpoint: an existing directory, or random weights written (or re-used) on disk so
    // the very same weights load through the normal path here and in the peer.
    let mut temp = None;
    let (dir, shape) = match (&o.model, &o.shape) {
        (Some(m), None) => (m.clone(), m.display().to_string()),
        (None, Some(shape)) => {
            let cfg = bench_config(shape)?;
            let dir = match &o.save_weights {
                Some(d) => d.clone(),
                None => {
                    let d = std::env::temp_dir().join(format!("vigil-bench-{}", std::process::id()));
                    temp = Some(d.clone());
                    d
                }
            };
            progress(&format!("writing random {shape} weights ({dtype}) to {}", dir.display()));
            write_random_checkpoint(&dir, &cfg, candle_dtype, o.seed)?;
            (dir, shape.clone())
        }
        _ => return Err(BenchError::Options("give either --shape (with --random-weights) or --model".into())),
    };
    let memory = MemorySampler::start(o.device);
    let result = measure(o, &dir, &shape, dtype, progress);
    if let Some(t) = temp {
        let _ = std::fs::remove_dir_all(t);
    }
    let (peak, source) = memory.finish();
    let mut report = result?;
    if o.save_weights.is_none() && o.model.is_none() {
        report.checkpoint = "(temporary; use --save-weights DIR to keep it for the peer)".into();
    }
    (report.memory_peak_mib, report.memory_source) = (peak, source);
    report.memory_activations_mib = (peak - report.memory_weights_mib - report.memory_kv_cache_mib).max(0.0);
    Ok(report)
}

fn measure(
    o: &ShapeOptions,
    dir: &Path,
    shape: &str,
    dtype: DType,
    progress: &mut dyn FnMut(&str),
) -> Result<ShapeReport, BenchError> {
    let model_cfg = VideoLlama3Config::from_file(dir)?;
    let shapes = tensor_shapes(&model_cfg)?;
    let elem = dtype.size() as u64;
    // What a decode step reads: the decoder and the output head (the embedding when tied).
    let tied = model_cfg.tie_word_embeddings;
    let text_params: u64 = shapes
        .iter()
        .filter(|(n, _)| {
            n == "lm_head.weight"
                || n.starts_with("model.language_model.") && (tied || !n.ends_with("embed_tokens.weight"))
        })
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let mut w = Workload {
        frames: o.frames,
        width: o.width,
        height: o.height,
        static_fraction: o.static_fraction,
        fps: o.fps,
        streams: o.streams.clone(),
        windows: o.windows,
        questions: (0..o.prompts).map(|p| QUESTIONS[p % QUESTIONS.len()].to_string()).collect(),
        new_tokens: o.new_tokens,
        pruning: o.pruning,
        threshold: 0.0,
        min_tokens_per_frame: 0,
        checksum: 0,
    };
    let cfg = engine_config(dir, o, dtype, &w)?;
    w.threshold = cfg.pruning.threshold;
    w.min_tokens_per_frame = cfg.pruning.min_tokens_per_frame;
    let first = window(0, 0, &w);
    w.checksum = checksum(&first);
    let prompt0 = cfg.prompts[0].clone();

    // 1 + 2: the model alone.
    progress("loading");
    let t0 = Instant::now();
    let runner = load_runner(&cfg)?;
    let load_s = t0.elapsed().as_secs_f64();
    progress("warming up (first GPU use compiles kernels)");
    runner.run_alone("cam0", &first, w.fps, &prompt0).map_err(|e| BenchError::Run(e.to_string()))?;
    let mut vision_runs = Vec::new();
    let (mut visual_tokens, mut grid) = (0, [0; 3]);
    for _ in 0..3 {
        let (n, g, d) = runner.time_vision(&first, w.fps).map_err(|e| BenchError::Run(e.to_string()))?;
        (visual_tokens, grid) = (n, g);
        vision_runs.push(d.as_secs_f64());
    }
    vision_runs.sort_by(f64::total_cmp);
    let vision_s = vision_runs[1];
    let tflops = vision_flops(&model_cfg, grid[0], grid[1], grid[2]) / 1e12;
    let vision = VisionFigures { ms: vision_s * 1e3, visual_tokens, tflops, tflop_per_s: tflops / vision_s };
    progress(&format!("vision: {:.1} ms per window, {:.1} TFLOP/s", vision.ms, vision.tflop_per_s));

    let t0 = Instant::now();
    let r = runner.run_alone("cam0", &first, w.fps, &prompt0).map_err(|e| BenchError::Run(e.to_string()))?;
    let total_s = t0.elapsed().as_secs_f64();
    let steps = r.generated_tokens.saturating_sub(1).max(1) as f64;
    let decode_s = r.decode.as_secs_f64();
    let tok_s = steps / decode_s.max(1e-9);
    let single = SingleFigures {
        prompt_tokens: r.prompt_tokens,
        visual_tokens_total: r.visual_total,
        visual_tokens_kept: r.visual_kept,
        preprocess_and_vision_ms: r.vision.as_secs_f64() * 1e3,
        prefill_ms: r.prefill.as_secs_f64() * 1e3,
        decode_ms: decode_s * 1e3,
        generated: r.generated_tokens,
        decode_ms_per_token: decode_s * 1e3 / steps,
        decode_tok_per_s: tok_s,
        decode_weight_gb_per_s: tok_s * (text_params * elem) as f64 / 1e9,
        total_s,
        tokens: r.tokens.clone(),
    };
    progress(&format!(
        "batch 1: prefill {:.1} ms, decode {:.2} ms/token",
        single.prefill_ms, single.decode_ms_per_token
    ));
    drop(runner);
    // The engine loads its own copy on its own thread, from another malloc arena: without this
    // the first copy's freed pages would stay resident and count in the serving peak.
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };

    // 3. The serving path.
    let engine = Engine::start(&cfg)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let submit = |win: Arc<Window>| {
        engine.submit(Job {
            stream: win.stream.clone(),
            window: win,
            prompts: cfg.prompts.clone(),
            fps: w.fps,
            closed_at: Instant::now(),
            reply: tx.clone(),
        })
    };
    let mut wait = |n: usize| -> Result<(), BenchError> {
        let mut got = 0;
        while got < n {
            match rx.blocking_recv() {
                Some(JobOutput::Answer(_)) => got += 1,
                Some(other) => return Err(BenchError::Run(format!("bench job did not complete: {other:?}"))),
                None => return Err(EngineError::Stopped.into()),
            }
        }
        Ok(())
    };
    submit(first.clone())?;
    wait(w.questions.len())?;
    let mut stream = Vec::new();
    for &n in &w.streams {
        // Frames are built before the clock starts: a camera delivers them for free.
        let windows: Vec<Arc<Window>> =
            (0..w.windows).flat_map(|k| (0..n).map(move |s| (s, k))).map(|(s, k)| window(s, k + 1, &w)).collect();
        let before = engine.counters();
        let t0 = Instant::now();
        for win in windows {
            submit(win)?;
        }
        wait(n * w.windows * w.questions.len())?;
        let seconds = t0.elapsed().as_secs_f64();
        let c = delta(&engine.counters(), &before);
        let figures = StreamFigures {
            streams: n,
            windows: n * w.windows,
            prompts_per_window: w.questions.len(),
            seconds,
            windows_per_s: (n * w.windows) as f64 / seconds,
            generated_tok_per_s: c.tokens_generated as f64 / seconds,
            preprocess_ms: c.preprocess_ms,
            vision_ms: c.vision_ms,
            prefill_ms: c.prefill_ms,
            decode_ms: c.decode_ms,
            batches: c.batches,
            mean_batch: c.batch_size_sum as f64 / c.batches.max(1) as f64,
            visual_tokens_total: c.visual_tokens_total,
            visual_tokens_kept: c.visual_tokens_kept,
        };
        progress(&format!("{n} streams: {:.2} windows/s", figures.windows_per_s));
        stream.push(figures);
    }
    let kv_cache_bytes = engine.counters().kv_cache_peak_bytes;
    engine.shutdown(Duration::from_secs(30));
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;

    Ok(ShapeReport {
        implementation: "vigil".into(),
        shape: shape.to_string(),
        checkpoint: dir.display().to_string(),
        device: o.device.to_string(),
        dtype: dtype.to_string(),
        parameters: parameter_count(&shapes),
        text_weight_bytes: text_params * elem,
        workload: w,
        load_s,
        vision,
        single,
        stream,
        memory_peak_mib: 0.0,
        memory_source: String::new(),
        memory_weights_mib: mib(parameter_count(&shapes) * elem),
        memory_kv_cache_mib: mib(kv_cache_bytes),
        memory_activations_mib: 0.0,
    })
}

fn delta(after: &EngineCounters, before: &EngineCounters) -> EngineCounters {
    EngineCounters {
        batches: after.batches - before.batches,
        batch_size_sum: after.batch_size_sum - before.batch_size_sum,
        tokens_generated: after.tokens_generated - before.tokens_generated,
        preprocess_ms: after.preprocess_ms - before.preprocess_ms,
        vision_ms: after.vision_ms - before.vision_ms,
        prefill_ms: after.prefill_ms - before.prefill_ms,
        decode_ms: after.decode_ms - before.decode_ms,
        visual_tokens_total: after.visual_tokens_total - before.visual_tokens_total,
        visual_tokens_kept: after.visual_tokens_kept - before.visual_tokens_kept,
        ..EngineCounters::default()
    }
}

/// The report as text.
pub fn table(r: &ShapeReport) -> String {
    let w = &r.workload;
    let mut s = format!(
        "vigil bench: {} ({:.2} B parameters) on {} {}; {} frames of {}x{} per window ({}% static), {} prompts, {} new tokens, pruning {}\n",
        r.shape,
        r.parameters as f64 / 1e9,
        r.device,
        r.dtype,
        w.frames,
        w.width,
        w.height,
        (w.static_fraction * 100.0).round(),
        w.questions.len(),
        w.new_tokens,
        if w.pruning { "on" } else { "off" }
    );
    s.push_str(&format!("load {:.1} s; memory peak {:.0} MiB ({})\n", r.load_s, r.memory_peak_mib, r.memory_source));
    s.push_str(&format!(
        "  of which weights {:.0} MiB, KV cache {:.0} MiB, activations and runtime {:.0} MiB\n",
        r.memory_weights_mib, r.memory_kv_cache_mib, r.memory_activations_mib
    ));
    s.push_str(&format!(
        "vision tower + projector, one window: {:.1} ms, {} tokens, {:.2} TFLOP -> {:.1} TFLOP/s\n",
        r.vision.ms, r.vision.visual_tokens, r.vision.tflops, r.vision.tflop_per_s
    ));
    let b = &r.single;
    s.push_str(&format!(
        "one window x one prompt: {} prompt tokens ({} of {} visual kept); preprocess + vision {:.1} ms, prefill {:.1} ms, decode {:.2} ms/token ({:.1} tok/s, {:.0} GB/s of weights); {:.2} s in all\n",
        b.prompt_tokens, b.visual_tokens_kept, b.visual_tokens_total, b.preprocess_and_vision_ms, b.prefill_ms, b.decode_ms_per_token, b.decode_tok_per_s, b.decode_weight_gb_per_s, b.total_s
    ));
    s.push_str(
        "streams  windows  seconds  windows/s  gen tok/s  mean batch  time split prep/vision/prefill/decode %\n",
    );
    for f in &r.stream {
        let busy = (f.preprocess_ms + f.vision_ms + f.prefill_ms + f.decode_ms).max(1) as f64 / 100.0;
        s.push_str(&format!(
            "{:>7}  {:>7}  {:>7.2}  {:>9.2}  {:>9.1}  {:>10.1}  {:.0}/{:.0}/{:.0}/{:.0}\n",
            f.streams,
            f.windows,
            f.seconds,
            f.windows_per_s,
            f.generated_tok_per_s,
            f.mean_batch,
            f.preprocess_ms as f64 / busy,
            f.vision_ms as f64 / busy,
            f.prefill_ms as f64 / busy,
            f.decode_ms as f64 / busy
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            frames: 4,
            width: 56,
            height: 28,
            static_fraction: 0.5,
            fps: 2.0,
            streams: vec![1],
            windows: 1,
            questions: vec!["q".into()],
            new_tokens: 4,
            pruning: true,
            threshold: 0.1,
            min_tokens_per_frame: 1,
            checksum: 0,
        }
    }

    #[test]
    fn static_columns_never_change_and_the_rest_always_does() {
        let w = workload();
        let (a, b) = (frame(0, 0, &w), frame(0, 1, &w));
        let row = (w.width * 3) as usize;
        for y in 0..w.height as usize {
            let (ra, rb) = (&a.data[y * row..(y + 1) * row], &b.data[y * row..(y + 1) * row]);
            assert_eq!(ra[..row / 2], rb[..row / 2]);
            assert!(ra[row / 2..].iter().zip(&rb[row / 2..]).all(|(x, y)| x != y));
        }
        assert_ne!(frame(1, 0, &w).data, a.data, "streams differ");
        // Pinned: the peer rebuilds frames from the formula and compares this checksum.
        assert_eq!(pixel(3, 9, 7, 40, 2, 28), ((5 * 40 + 3 * 7 + 100 + 21 + 37 * 9) % 256) as u8);
        assert_eq!(pixel(3, 9, 7, 10, 2, 28), (3 * 10 + 5 * 7 + 100 + 21) as u8);
    }

    #[test]
    fn windows_do_not_overlap_and_carry_stream_time() {
        let w = workload();
        let (w0, w1) = (window(0, 0, &w), window(0, 1, &w));
        assert_eq!(w0.frames.len(), 4);
        assert_eq!(w1.start_s, 2.0);
        assert_eq!(w1.frames[0].slot, 4);
        assert_ne!(checksum(&w0), checksum(&w1));
    }

    #[test]
    fn vision_flops_follow_the_layer_shapes() {
        let cfg = VideoLlama3Config::from_json(&bench_config("2b").unwrap().to_string()).unwrap();
        // 16 frames of 448x448: 1024 patches per frame. Dominated by the 27 layers' matmuls:
        // 2·n·d·(4d + 2i) per layer plus attention 4·n²·d.
        let f = vision_flops(&cfg, 16, 32, 32);
        let (n, d, i) = (1024f64, 1152f64, 4304f64);
        let layers = 27.0 * (2.0 * n * d * (4.0 * d + 2.0 * i) + 4.0 * n * n * d);
        assert!(f > 16.0 * layers && f < 16.0 * layers * 1.05, "{f}");
    }
}
