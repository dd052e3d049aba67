//! The daemon: tokio orchestration of sources → windows → engine → MQTT, signals, reload,
//! systemd integration and metrics (see issue "The daemon").
//!
//! So far: the systemd notify protocol ([`notify`]).

pub mod notify;
