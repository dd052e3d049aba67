//! Benchmarks behind `vigil bench`.
//!
//! - [`shapes`]: `vigil bench --shape 2b|7b|CONFIG.json --random-weights`: the model at real
//!   shapes on synthetic camera windows; per-stage times, windows/s, tokens/s, memory. Its JSON
//!   is the input of the transformers peer (`tests/reference/bench_transformers.py`), which runs
//!   the identical workload on the same weights and prints the ratios.
//! - [`engine`]: `vigil bench engine --model DIR`: the engine's optimisations on vs off on the
//!   same windows, with a check that both give the same tokens.

pub mod engine;
pub mod shapes;

use std::sync::Arc;

use crate::window::{Frame, Window};

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
