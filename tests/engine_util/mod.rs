//! Shared helpers of the engine tests: a config on the committed tiny checkpoint
//! (tests/fixtures/engine/ckpt) and synthetic windows.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil::bench::engine::synthetic_frame;
use vigil::config::Config;
use vigil::engine::runner::{RunStats, WindowWork};
use vigil::engine::{load_runner, Engine, Job, JobOutput, PromptResult};
use vigil::window::{Frame, Window};

pub fn ckpt() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine/ckpt")
}

pub const PROMPTS: &str = r#"
[[prompt]]
name = "caption"
text = "Describe this."
max_new_tokens = 12

[[prompt]]
name = "person"
kind = "alert"
text = "Is there a person in the frame? Answer yes or no."

[[prompt]]
name = "count"
kind = "json"
text = "How many cars are parked in the driveway? Answer with a number."
max_new_tokens = 5
"#;

/// A config on the tiny checkpoint; `model_extra` / `engine` go into those sections.
pub fn config(model_extra: &str, engine: &str) -> Config {
    let text = format!(
        "[model]\npath = {:?}\ndevice = \"cpu\"\ndtype = \"f32\"\n{default_mnt}{model_extra}\n\n[engine]\n{engine}\n{PROMPTS}\n\
         [[stream]]\nname = \"a\"\nuri = \"rtsp://127.0.0.1:8554/a\"\nprompts = [\"caption\", \"person\", \"count\"]\nfps = 2.0\n\n\
         [[stream]]\nname = \"b\"\nuri = \"rtsp://127.0.0.1:8554/b\"\nprompts = [\"caption\", \"person\", \"count\"]\nfps = 1.0\n",
        ckpt().display().to_string(),
        default_mnt = if model_extra.contains("max_new_tokens") { "" } else { "max_new_tokens = 8\n" },
    );
    Config::parse(&text, "engine-test.toml", std::path::Path::new(".")).expect("test config")
}

/// Frames of a stream of `w`x`h` pixels at `fps`.
pub fn frames(stream: usize, n: usize, w: u32, h: u32, fps: f64) -> Vec<Arc<Frame>> {
    (0..n).map(|i| Arc::new(synthetic_frame(stream, i, w, h, fps))).collect()
}

/// Window `seq` of `stream` over `frames[start..start + len]`.
pub fn window(stream: &str, seq: u64, frames: &[Arc<Frame>], start: usize, len: usize, fps: f64) -> Arc<Window> {
    Arc::new(Window {
        stream: stream.into(),
        seq,
        index: seq,
        start_s: start as f64 / fps,
        end_s: (start + len) as f64 / fps,
        frames: frames[start..start + len].to_vec(),
        expected_frames: len,
        missing: 0,
        partial: false,
    })
}

pub fn job(
    w: &Arc<Window>,
    cfg: &Config,
    names: &[&str],
    reply: &tokio::sync::mpsc::UnboundedSender<JobOutput>,
) -> Job {
    Job {
        stream: w.stream.clone(),
        window: w.clone(),
        prompts: names.iter().map(|n| cfg.prompt(n).expect("prompt").clone()).collect(),
        fps: stream_fps(cfg, &w.stream),
        closed_at: Instant::now(),
        reply: reply.clone(),
    }
}

/// Receive `n` outputs (bounded in time).
pub fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<JobOutput>, n: usize) -> Vec<JobOutput> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    while out.len() < n {
        match rx.try_recv() {
            Ok(o) => out.push(o),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "timed out after {} of {n} outputs", out.len());
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("reply channel: {e}"),
        }
    }
    out
}

pub fn answers(outs: Vec<JobOutput>) -> Vec<PromptResult> {
    outs.into_iter()
        .map(|o| match o {
            JobOutput::Answer(r) => r,
            other => panic!("expected an answer, got {other:?}"),
        })
        .collect()
}

pub fn start(cfg: &Config) -> Engine {
    Engine::start(cfg).expect("engine starts on the tiny checkpoint")
}

/// Windows and the prompts due for each.
pub type Workload = Vec<(Arc<Window>, Vec<&'static str>)>;

/// The frame rate `cfg` gives `stream`.
pub fn stream_fps(cfg: &Config, stream: &str) -> f64 {
    cfg.streams.iter().find(|s| s.name == stream).map(|s| s.settings.fps).unwrap_or(0.0)
}

/// Every answer equals the one of its (window, prompt) run alone through the processor and
/// `generate` (`Runner::run_alone`).
pub fn assert_same_as_alone(cfg: &Config, work: &[(Arc<Window>, Vec<&str>)], got: &[PromptResult]) {
    let runner = load_runner(cfg).unwrap();
    let by_key: HashMap<(String, u64, String), &PromptResult> =
        got.iter().map(|r| ((r.stream.clone(), r.window_seq, r.prompt.clone()), r)).collect();
    let mut generated = 0;
    for (w, names) in work {
        for name in names {
            let p = cfg.prompt(name).unwrap();
            let alone = runner.run_alone(&w.stream, w, stream_fps(cfg, &w.stream), p).unwrap();
            let r = by_key[&(w.stream.clone(), w.seq, name.to_string())];
            assert_eq!(r.tokens, alone.tokens, "{} window {} prompt {name}", w.stream, w.seq);
            assert_eq!(r.text, alone.text);
            assert_eq!(r.value, alone.value);
            assert_eq!(r.parse_error, alone.parse_error);
            assert_eq!(r.prompt_tokens, alone.prompt_tokens);
            assert_eq!((r.visual_total, r.visual_kept), (alone.visual_total, alone.visual_kept));
            assert_eq!(r.kind, p.kind);
            assert!(r.generated_tokens as usize <= p.max_new_tokens.unwrap_or(cfg.model.max_new_tokens));
            generated += r.generated_tokens;
        }
    }
    assert!(generated > 20, "the comparison must cover real generations ({generated} tokens)");
}

/// One batch, run directly on a runner, of two windows whose video prefixes differ in length
/// (streams `a` and `b`, two frame sizes), two prompts each; the answers in order and the stats.
pub fn unequal_batch(cfg: &Config) -> (Workload, Vec<PromptResult>, RunStats) {
    let a = frames(0, 6, 160, 120, 2.0);
    let b = frames(1, 4, 96, 128, 1.0);
    let work = vec![
        (window("a", 0, &a, 0, 6, 2.0), vec!["caption", "count"]),
        (window("b", 0, &b, 0, 4, 1.0), vec!["person", "caption"]),
    ];
    let batch: Vec<WindowWork> = work
        .iter()
        .map(|(w, names)| WindowWork {
            stream: w.stream.clone(),
            window: w.clone(),
            fps: stream_fps(cfg, &w.stream),
            prompts: names.iter().map(|n| cfg.prompt(n).unwrap().clone()).collect(),
            queue: Duration::ZERO,
        })
        .collect();
    let mut runner = load_runner(cfg).unwrap();
    let (out, stats) = runner.run_batch(&batch, &|| {}, &std::sync::atomic::AtomicBool::new(false));
    let got: Vec<PromptResult> = out.into_iter().flatten().map(|r| r.unwrap()).collect();
    assert_eq!(got.len(), 4);
    (work, got, stats)
}
