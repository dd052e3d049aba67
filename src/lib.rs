//! vigil — watches camera streams and answers questions about them with VideoLLaMA3.
//!
//! Data flows through the modules in this order: [`config`] → `source` (GStreamer) → `window`
//! → `processor` (HF-exact preprocessing) → `model` (candle) → `engine` → `publish` (MQTT),
//! orchestrated by `daemon`.

pub mod config;
pub mod logging;
pub mod processor;

pub use config::Config;
