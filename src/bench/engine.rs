//! `vigil bench engine`: windows/s and ms per window for N streams × 2 prompts, with the engine's
//! optimisations on (feature cache, shared video prefix, cross-stream batches — the real
//! [`Engine`] thread) against off (each (window, prompt) run alone through the processor and
//! `generate`, one after another), in the same run on the same synthetic windows. It also checks
//! that both sides produced the same tokens.
//!
//! The windows are synthetic: per stream, a moving square over a gradient (each stream its own
//! frame size), cut into overlapping windows (`stride_frames < frames_per_window`), as a camera at
//! `fps` with `window_seconds > stride_seconds` produces.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::BenchError;
use crate::config::Config;
use crate::config::{DType, Device};
use crate::engine::runner::RunOptions;
use crate::engine::{load_runner, Engine, EngineCounters, EngineError, Job, JobOutput};
use crate::processor::video::Video;
use crate::window::{Frame, Window};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Complete checkpoint directory (model + processor files).
    pub model: PathBuf,
    pub device: Device,
    pub dtype: DType,
    /// `[model] attention` of the measured engines.
    pub attention: crate::config::AttentionMode,
    /// Stream counts to measure.
    pub streams: Vec<usize>,
    pub windows_per_stream: usize,
    pub frames_per_window: usize,
    pub stride_frames: usize,
    /// Frame size of stream 0 (later streams vary it a little).
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    pub max_new_tokens: usize,
    pub max_batch: usize,
}

impl BenchOptions {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            device: Device::Cpu,
            dtype: DType::F32,
            attention: crate::config::AttentionMode::Auto,
            streams: vec![1, 4, 8],
            windows_per_stream: 4,
            frames_per_window: 8,
            stride_frames: 4,
            width: 160,
            height: 120,
            fps: 2.0,
            max_new_tokens: 16,
            max_batch: 16,
        }
    }
}

/// One line of the result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub streams: usize,
    pub windows: usize,
    pub prompts_per_window: usize,
    pub on_s: f64,
    pub off_s: f64,
    pub on_windows_per_s: f64,
    pub off_windows_per_s: f64,
    pub on_ms_per_window: f64,
    pub off_ms_per_window: f64,
    /// `off_s / on_s`.
    pub speedup: f64,
    /// Answers whose tokens differ between on and off (must be 0).
    pub mismatches: usize,
    pub counters: EngineCounters,
}

const PROMPTS: &str = r#"
[[prompt]]
name = "caption"
text = "Describe this."

[[prompt]]
name = "person"
kind = "alert"
text = "Is there a person in the frame? Answer yes or no."
"#;

fn bench_config(o: &BenchOptions, streams: usize) -> Result<Config, BenchError> {
    let model = o.model.canonicalize().map_err(|source| BenchError::ModelDir { path: o.model.clone(), source })?;
    let mut text = format!(
        "[model]\npath = {path:?}\ndevice = {dev:?}\ndtype = {dt:?}\nattention = {att:?}\nmax_new_tokens = {mnt}\n\n\
         [engine]\nmax_batch = {mb}\nqueue_capacity = 4096\nmax_queue_age_s = 86400.0\nfeature_cache_frames = 1024\n{PROMPTS}",
        path = model.display().to_string(),
        dev = o.device.to_string(),
        dt = o.dtype.as_str(),
        att = o.attention.as_str(),
        mnt = o.max_new_tokens,
        mb = o.max_batch,
    );
    for s in 0..streams {
        text.push_str(&format!(
            "\n[[stream]]\nname = \"cam{s}\"\nuri = \"rtsp://127.0.0.1:8554/cam{s}\"\nprompts = [\"caption\", \"person\"]\nfps = {}\n",
            o.fps
        ));
    }
    Config::parse(&text, "bench.toml", std::path::Path::new(".")).map_err(BenchError::Config)
}

/// Frame `i` of stream `s`: a square moving over a gradient; stream `s` has its own size.
pub fn synthetic_frame(s: usize, i: usize, width: u32, height: u32, fps: f64) -> Frame {
    let (w, h) = (width + 16 * (s as u32 % 3), height + 8 * (s as u32 % 2));
    let mut data = vec![0u8; (w * h * 3) as usize];
    let (sx, sy) = ((i * 7 + s * 13) as u32 % (w - 24), (i * 3 + s * 5) as u32 % (h - 24));
    for y in 0..h {
        for x in 0..w {
            let o = ((y * w + x) * 3) as usize;
            let inside = x >= sx && x < sx + 24 && y >= sy && y < sy + 24;
            data[o] = if inside { 250 } else { (x * 255 / w) as u8 };
            data[o + 1] = if inside { 40 } else { (y * 255 / h) as u8 };
            data[o + 2] = ((s * 60) % 256) as u8;
        }
    }
    Frame { width: w, height: h, data, slot: i as u64, time_s: i as f64 / fps, captured_at: SystemTime::now() }
}

/// Overlapping windows of stream `s`.
pub fn synthetic_windows(s: usize, o: &BenchOptions) -> Vec<Arc<Window>> {
    let n = o.stride_frames * (o.windows_per_stream - 1) + o.frames_per_window;
    let frames: Vec<Arc<Frame>> = (0..n).map(|i| Arc::new(synthetic_frame(s, i, o.width, o.height, o.fps))).collect();
    (0..o.windows_per_stream)
        .map(|k| {
            let start = k * o.stride_frames;
            super::window_of(s, k, start, frames[start..start + o.frames_per_window].to_vec(), o.fps)
        })
        .collect()
}

/// Run the benchmark; one row per stream count.
pub fn run(o: &BenchOptions) -> Result<Vec<BenchRow>, BenchError> {
    if o.windows_per_stream == 0 || o.frames_per_window == 0 || o.stride_frames == 0 {
        return Err(BenchError::Options("windows, frames and stride must be positive".into()));
    }
    let mut rows = Vec::new();
    for &n in &o.streams {
        let cfg = bench_config(o, n)?;
        let windows: Vec<Arc<Window>> = (0..n).flat_map(|s| synthetic_windows(s, o)).collect();
        let prompts = cfg.prompts.clone();

        // Off: every (window, prompt) alone, in order.
        let runner = load_runner(&cfg)?;
        let t0 = Instant::now();
        let mut off_tokens = Vec::new();
        for w in &windows {
            for p in &prompts {
                let r = runner.run_alone(&w.stream, w, o.fps, p).map_err(|e| BenchError::Run(e.to_string()))?;
                off_tokens.push(((w.stream.clone(), w.seq, p.name.clone()), r.tokens));
            }
        }
        let off_s = t0.elapsed().as_secs_f64();
        drop(runner);

        // On: the engine thread with every optimisation; all windows submitted at once.
        let engine = Engine::start_with(&cfg, RunOptions::default())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t0 = Instant::now();
        for w in &windows {
            engine.submit(Job {
                stream: w.stream.clone(),
                window: w.clone(),
                prompts: prompts.clone(),
                fps: o.fps,
                closed_at: Instant::now(),
                reply: tx.clone(),
            })?;
        }
        let mut on_tokens = std::collections::HashMap::new();
        let want = windows.len() * prompts.len();
        while on_tokens.len() < want {
            match rx.blocking_recv() {
                Some(JobOutput::Answer(r)) => {
                    on_tokens.insert((r.stream, r.window_seq, r.prompt), r.tokens);
                }
                Some(other) => return Err(BenchError::Run(format!("bench job did not complete: {other:?}"))),
                None => return Err(EngineError::Stopped.into()),
            }
        }
        let on_s = t0.elapsed().as_secs_f64();
        let counters = engine.counters();
        engine.shutdown(Duration::from_secs(10));
        let mismatches = off_tokens.iter().filter(|(k, t)| on_tokens.get(k) != Some(t)).count();
        let nw = windows.len() as f64;
        rows.push(BenchRow {
            streams: n,
            windows: windows.len(),
            prompts_per_window: prompts.len(),
            on_s,
            off_s,
            on_windows_per_s: nw / on_s,
            off_windows_per_s: nw / off_s,
            on_ms_per_window: on_s * 1e3 / nw,
            off_ms_per_window: off_s * 1e3 / nw,
            speedup: off_s / on_s,
            mismatches,
            counters,
        });
    }
    Ok(rows)
}

/// The motion gate on a mixed workload: half the streams film a frozen scene, half a moving one.
#[derive(Debug, Clone, Serialize)]
pub struct GateRow {
    pub streams: usize,
    pub static_streams: usize,
    pub windows: usize,
    /// Windows the gate skipped (every static stream's after its first).
    pub skipped: usize,
    pub on_s: f64,
    pub off_s: f64,
    pub on_windows_per_s: f64,
    pub off_windows_per_s: f64,
    /// `off_s / on_s`.
    pub speedup: f64,
}

/// Run the engine over `n` streams' windows (half of them frozen) with the motion gate
/// (`skip_static`, default `min_changed_fraction`) on and off, in the same run. Gate time is
/// part of "on".
pub fn run_gated(o: &BenchOptions, n: usize) -> Result<GateRow, BenchError> {
    let cfg = bench_config(o, n)?;
    let statics = n / 2;
    let windows: Vec<Arc<Window>> = (0..n)
        .flat_map(|s| {
            let mut w = synthetic_windows(s, o);
            if s < statics {
                // A frozen scene: every frame is the stream's first.
                let still = Arc::new(synthetic_frame(s, 0, o.width, o.height, o.fps));
                for win in &mut w {
                    let frames = win
                        .frames
                        .iter()
                        .map(|f| Arc::new(Frame { slot: f.slot, time_s: f.time_s, ..(*still).clone() }))
                        .collect();
                    *win = Arc::new(Window { frames, ..(**win).clone() });
                }
            }
            w
        })
        .collect();
    let gate = crate::processor::video::VideoProcessor::from_pretrained(&cfg.model_dir().unwrap_or_default())?;
    let min_changed = crate::config::StreamDefaults::default().min_changed_fraction;
    // A fresh engine per side: neither profits from the other's feature cache.
    let timed = |gated: bool| -> Result<(f64, usize), BenchError> {
        let engine = Engine::start_with(&cfg, RunOptions::default())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t0 = Instant::now();
        let mut submitted = 0;
        for w in &windows {
            if gated && w.seq > 0 {
                let video = Video::from_window(w, o.fps)?;
                let changes = gate.changes_of(video, &cfg.pruning)?;
                if changes.fraction() < min_changed {
                    continue;
                }
            }
            engine.submit(Job {
                stream: w.stream.clone(),
                window: w.clone(),
                prompts: cfg.prompts.clone(),
                fps: o.fps,
                closed_at: Instant::now(),
                reply: tx.clone(),
            })?;
            submitted += 1;
        }
        for _ in 0..submitted * cfg.prompts.len() {
            match rx.blocking_recv() {
                Some(JobOutput::Answer(_)) => {}
                Some(other) => return Err(BenchError::Run(format!("bench job did not complete: {other:?}"))),
                None => return Err(EngineError::Stopped.into()),
            }
        }
        let took = t0.elapsed().as_secs_f64();
        engine.shutdown(Duration::from_secs(10));
        Ok((took, windows.len() - submitted))
    };
    let (off_s, _) = timed(false)?;
    let (on_s, skipped) = timed(true)?;
    let nw = windows.len() as f64;
    Ok(GateRow {
        streams: n,
        static_streams: statics,
        windows: windows.len(),
        skipped,
        on_s,
        off_s,
        on_windows_per_s: nw / on_s,
        off_windows_per_s: nw / off_s,
        speedup: off_s / on_s,
    })
}

/// The motion-gate result as a line of text.
pub fn gate_line(r: &GateRow) -> String {
    format!(
        "motion gate: {} streams ({} frozen), {} windows, {} skipped: {:.2} windows/s gated vs {:.2} ungated ({:.2}x)\n",
        r.streams, r.static_streams, r.windows, r.skipped, r.on_windows_per_s, r.off_windows_per_s, r.speedup
    )
}

/// The result as a table.
pub fn table(o: &BenchOptions, rows: &[BenchRow]) -> String {
    let mut s = format!(
        "engine bench: {} ({} {}), {} windows/stream of {} frames (stride {}), {}x{}+, {} prompts, max_new_tokens {}\n",
        o.model.display(),
        o.device,
        o.dtype,
        o.windows_per_stream,
        o.frames_per_window,
        o.stride_frames,
        o.width,
        o.height,
        rows.first().map(|r| r.prompts_per_window).unwrap_or(2),
        o.max_new_tokens
    );
    s.push_str("streams  windows   on win/s  on ms/win   off win/s  off ms/win   on/off speedup  cache hit/miss  prefills  mean batch  on time: prep/vision/prefill/decode %  identical\n");
    for r in rows {
        let c = &r.counters;
        s.push_str(&format!(
            "{:>7}  {:>7}  {:>9.2}  {:>9.1}  {:>10.2}  {:>10.1}  {:>15.2}x  {:>8}/{:<5}  {:>8}  {:>10.1}  {:>36}  {}\n",
            r.streams,
            r.windows,
            r.on_windows_per_s,
            r.on_ms_per_window,
            r.off_windows_per_s,
            r.off_ms_per_window,
            r.speedup,
            c.vision_cache_hits,
            c.vision_cache_misses,
            c.video_prefills,
            c.batch_size_sum as f64 / c.batches.max(1) as f64,
            {
                let t = c.busy_ms.max(1) as f64 / 100.0;
                format!(
                    "{:.0}/{:.0}/{:.0}/{:.0}",
                    c.preprocess_ms as f64 / t,
                    c.vision_ms as f64 / t,
                    c.prefill_ms as f64 / t,
                    c.decode_ms as f64 / t
                )
            },
            if r.mismatches == 0 { "yes".to_string() } else { format!("NO ({} differ)", r.mismatches) }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_skips_the_frozen_streams_windows_after_their_first() {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-videollama3");
        let o = BenchOptions { max_new_tokens: 2, ..BenchOptions::new(model) };
        let r = run_gated(&o, 2).unwrap();
        assert_eq!((r.static_streams, r.windows), (1, 2 * o.windows_per_stream));
        assert_eq!(r.skipped, o.windows_per_stream - 1, "the moving stream is never skipped");
    }
}
