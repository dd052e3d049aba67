//! Benchmarks behind `vigil bench`.
//!
//! - [`shapes`]: `vigil bench --shape 2b|7b|CONFIG.json --random-weights`: the model at real
//!   shapes on synthetic camera windows; per-stage times, windows/s, tokens/s, memory. Its JSON
//!   is the input of the transformers peer (`tests/reference/bench_transformers.py`), which runs
//!   the identical workload on the same weights and prints the ratios.
//! - [`attention`]: `vigil bench attention`: the fused attention kernels' self-check and their
//!   time per layer against the reference path at the 2B model's shapes.
//! - [`engine`]: `vigil bench engine --model DIR`: the engine's optimisations on vs off on the
//!   same windows, with a check that both give the same tokens.
//! - [`random`]: the random-weight checkpoints `shapes` measures.

pub mod attention;
pub mod engine;
pub mod random;
pub mod shapes;

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::EngineError;
use crate::model::ModelError;
use crate::window::{Frame, Window};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The `--model` directory cannot be read.
    #[error("cannot load the model: {}: {source}", path.display())]
    ModelDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bench config: {0}")]
    Config(#[source] crate::config::ConfigError),
    #[error("{0}")]
    Processor(#[from] crate::processor::ProcessorError),
    /// Options that cannot make a benchmark.
    #[error("{0}")]
    Options(String),
    /// A prompt or job of the run failed (the runner's reason).
    #[error("{0}")]
    Run(String),
}

/// A gap-free synthetic window of stream `cam{s}`: window `k` whose first frame is stream frame
/// `start`, at `fps`.
pub(crate) fn window_of(s: usize, k: usize, start: usize, frames: Vec<Arc<Frame>>, fps: f64) -> Arc<Window> {
    let n = frames.len();
    Arc::new(Window {
        stream: format!("cam{s}"),
        seq: k as u64,
        index: k as u64,
        start_s: start as f64 / fps,
        end_s: (start + n) as f64 / fps,
        frames,
        expected_frames: n,
        missing: 0,
        partial: false,
    })
}
