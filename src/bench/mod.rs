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
