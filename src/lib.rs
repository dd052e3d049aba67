//! vigil — watches camera streams and answers questions about them with VideoLLaMA3.
//!
//! Data flows through the modules in this order: [`config`] → `source` (GStreamer) → `window`
//! → `processor` (HF-exact preprocessing) → `model` (candle) → `engine` → `publish` (MQTT),
//! orchestrated by `daemon`.

// Errors carry their causes by value (paths, configs, sources); they are built on cold paths
// only, so their size costs nothing worth a box at every site.
#![allow(clippy::result_large_err)]

pub mod bench;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod fault;
pub mod infer;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod processor;
pub mod publish;
pub mod schedule;
pub mod snapshot;
pub mod source;
pub mod window;

pub use config::Config;
