//! The daemon's metric families and the statistics it publishes: counters kept by the
//! sources, the engine and the outbox are copied into the registry at each scrape, and the
//! periodic `stats` payload is collected from the same places.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::State;
use crate::lock::lock;
use crate::metrics::{CounterVec, GaugeVec, HistogramVec, Registry, LATENCY_BUCKETS};
use crate::publish::{rfc3339, InferenceStats, StatsPayload, StreamStats as PubStreamStats, ANSWER_VERSION};

/// Prometheus families; names follow the conventions (`vigil_`, `_total`, `_seconds`).
pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) frames: CounterVec,
    pub(super) frames_dropped: CounterVec,
    pub(super) windows: CounterVec,
    pub(super) windows_dropped: CounterVec,
    pub(super) windows_skipped: CounterVec,
    pub(super) jobs_queued: CounterVec,
    pub(super) jobs_dropped: CounterVec,
    pub(super) answers: CounterVec,
    pub(super) answers_delivered: CounterVec,
    pub(super) answers_dropped: CounterVec,
    pub(super) answer_errors: CounterVec,
    pub(super) stage: HistogramVec,
    pub(super) tokens_generated: CounterVec,
    pub(super) visual_total: CounterVec,
    pub(super) visual_kept: CounterVec,
    pub(super) cache_hits: CounterVec,
    pub(super) cache_misses: CounterVec,
    pub(super) prefix_shared: CounterVec,
    pub(super) mqtt_published: CounterVec,
    pub(super) mqtt_queued: GaugeVec,
    pub(super) mqtt_dropped: CounterVec,
    pub(super) mqtt_connected: GaugeVec,
    pub(super) commands_rejected: CounterVec,
    pub(super) stream_up: GaugeVec,
    pub(super) engine_queue: GaugeVec,
    pub(super) heartbeat_age: GaugeVec,
    pub(super) attention_selfcheck_failures: CounterVec,
    pub(super) attention_verified: GaugeVec,
}

impl Metrics {
    pub(super) fn new() -> Metrics {
        let r = Registry::new();
        Metrics {
            frames: r.counter(
                "vigil_frames_total",
                "Frames delivered by the stream's pipeline (after rate limiting).",
                &["stream"],
            ),
            frames_dropped: r.counter(
                "vigil_frames_dropped_total",
                "Frames discarded by the windower (out of order after a reconnect or loop).",
                &["stream"],
            ),
            windows: r.counter("vigil_windows_total", "Windows emitted.", &["stream"]),
            windows_dropped: r.counter(
                "vigil_windows_dropped_total",
                "Windows dropped: gaps under gap_policy=drop, or the oldest when the consumer was behind.",
                &["stream"],
            ),
            windows_skipped: r.counter(
                "vigil_windows_skipped_total",
                "Windows no prompt ran on, by reason (schedule: every prompt out of its active hours).",
                &["stream", "reason"],
            ),
            jobs_queued: r.counter(
                "vigil_jobs_queued_total",
                "Jobs (window x due prompts) submitted to the engine.",
                &["stream"],
            ),
            jobs_dropped: r.counter("vigil_jobs_dropped_total", "Jobs dropped instead of answered late.", &["stream"]),
            answers: r.counter(
                "vigil_answers_total",
                "Answers produced (handed to the MQTT outbox).",
                &["stream", "prompt"],
            ),
            answers_delivered: r.counter(
                "vigil_mqtt_delivered_total",
                "Answers the broker acknowledged (PUBACK/PUBCOMP; written, for QoS 0).",
                &[],
            ),
            answers_dropped: r.counter(
                "vigil_answers_dropped_total",
                "Answers dropped undelivered: the oldest when the MQTT outbox was full.",
                &[],
            ),
            answer_errors: r.counter("vigil_answer_errors_total", "Prompts that failed in the engine.", &["stream"]),
            stage: r.histogram(
                "vigil_stage_seconds",
                "Time per stage: queue, vision, prefill, decode, and total from window close to publish.",
                &["stage"],
                LATENCY_BUCKETS,
            ),
            tokens_generated: r.counter("vigil_tokens_generated_total", "Tokens generated.", &[]),
            visual_total: r.counter("vigil_visual_tokens_total", "Video tokens before pruning.", &[]),
            visual_kept: r.counter("vigil_visual_tokens_kept_total", "Video tokens kept after pruning.", &[]),
            cache_hits: r.counter(
                "vigil_vision_cache_hits_total",
                "Frames whose vision features came from the cache.",
                &[],
            ),
            cache_misses: r.counter("vigil_vision_cache_misses_total", "Frames run through the vision encoder.", &[]),
            prefix_shared: r.counter(
                "vigil_prefix_shared_total",
                "Prompts that re-used a window's prefilled video prefix.",
                &[],
            ),
            mqtt_published: r.counter(
                "vigil_mqtt_published_total",
                "MQTT messages the broker took (QoS 0 written, QoS 1/2 acknowledged).",
                &[],
            ),
            mqtt_queued: r.gauge("vigil_mqtt_queued", "Messages waiting in the MQTT outbox.", &[]),
            mqtt_dropped: r.counter(
                "vigil_mqtt_dropped_total",
                "MQTT messages dropped because the outbox was full.",
                &[],
            ),
            mqtt_connected: r.gauge("vigil_mqtt_connected", "1 while the MQTT broker connection is up.", &[]),
            commands_rejected: r.counter(
                "vigil_mqtt_commands_rejected_total",
                "`set` messages refused: a payload other than ON/OFF, or an unknown stream or prompt.",
                &[],
            ),
            stream_up: r.gauge("vigil_stream_up", "1 while the stream delivers frames.", &["stream"]),
            engine_queue: r.gauge("vigil_engine_queue_depth", "Jobs waiting for the engine.", &[]),
            heartbeat_age: r.gauge(
                "vigil_engine_heartbeat_age_seconds",
                "Seconds since the engine thread last showed life.",
                &[],
            ),
            attention_selfcheck_failures: r.counter(
                "vigil_attention_selfcheck_failures_total",
                "Fused attention kernels that differed from the reference path in their self-check at model load (the reference is used instead).",
                &["kernel"],
            ),
            attention_verified: r.gauge(
                "vigil_attention_kernel_verified",
                "1 when the fused attention kernel passed its last self-check (and is used), 0 when it failed; absent when not checked.",
                &["kernel"],
            ),
            registry: r,
        }
    }
}

/// Copy counters that live in the sources, the engine and the outbox into the registry.
pub(super) fn install_scrape_hook(state: &Arc<State>) {
    let weak = Arc::downgrade(state);
    state.metrics.registry.on_scrape(move || {
        let Some(state) = weak.upgrade() else { return };
        let m = &state.metrics;
        {
            let sources = lock(&state.sources);
            for name in sources.names() {
                if let Some(st) = sources.stats(&name) {
                    m.frames.with(&[&name]).set_total(st.frames as f64);
                    m.frames_dropped.with(&[&name]).set_total(st.windows.frames_out_of_order as f64);
                    m.windows_dropped
                        .with(&[&name])
                        .set_total((st.windows.windows_dropped_gap + st.windows_dropped_queue) as f64);
                }
            }
        }
        let c = state.engine.counters();
        m.visual_total.with(&[]).set_total(c.visual_tokens_total as f64);
        m.visual_kept.with(&[]).set_total(c.visual_tokens_kept as f64);
        m.cache_hits.with(&[]).set_total(c.vision_cache_hits as f64);
        m.cache_misses.with(&[]).set_total(c.vision_cache_misses as f64);
        m.prefix_shared.with(&[]).set_total(c.prefix_shared as f64);
        let o = state.publisher.outbox_stats();
        m.mqtt_queued.with(&[]).set(o.depth as f64);
        m.mqtt_published.with(&[]).set_total(state.publisher.delivered() as f64);
        m.mqtt_dropped.with(&[]).set_total(o.dropped as f64);
        let a = state.publisher.answer_counts();
        m.answers_delivered.with(&[]).set_total(a.delivered as f64);
        m.answers_dropped.with(&[]).set_total(a.dropped as f64);
        m.commands_rejected.with(&[]).set_total(state.publisher.commands_rejected() as f64);
        m.mqtt_connected.with(&[]).set(if state.publisher.link().borrow().connected { 1.0 } else { 0.0 });
        m.engine_queue.with(&[]).set(state.engine.queue_len() as f64);
        m.heartbeat_age.with(&[]).set(state.engine.heartbeat_age().as_secs_f64());
        for k in crate::model::fused::status() {
            m.attention_selfcheck_failures.with(&[k.kernel.as_str()]).set_total(k.failures as f64);
            if let Some(passed) = k.verified {
                m.attention_verified.with(&[k.kernel.as_str()]).set(if passed { 1.0 } else { 0.0 });
            }
        }
    });
}

pub(super) fn collect_stats(state: &State) -> StatsPayload {
    let mut streams = BTreeMap::new();
    {
        let sources = lock(&state.sources);
        for name in sources.names() {
            if let Some(st) = sources.stats(&name) {
                let jobs_dropped = state.metrics.jobs_dropped.with(&[&name]).get() as u64;
                streams.insert(
                    name.clone(),
                    PubStreamStats {
                        frames: st.frames,
                        windows: st.windows.windows_emitted,
                        drops: st.windows.windows_dropped_gap + st.windows_dropped_queue + jobs_dropped,
                        skipped: ["static", "schedule"]
                            .iter()
                            .map(|r| state.metrics.windows_skipped.with(&[&name, r]).get() as u64)
                            .sum(),
                    },
                );
            }
        }
    }
    let mut lat: Vec<f64> = lock(&state.recent_latency).iter().copied().collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let q = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p).round() as usize] * 1e3 };
    let c = state.engine.counters();
    let uptime = state.started.elapsed().as_secs_f64();
    StatsPayload {
        v: ANSWER_VERSION,
        uptime_s: uptime,
        streams,
        inference: InferenceStats {
            latency_p50_ms: q(0.5),
            latency_p95_ms: q(0.95),
            tokens_per_s: if uptime > 0.0 { c.tokens_generated as f64 / uptime } else { 0.0 },
            pruning_ratio: if c.visual_tokens_total > 0 {
                1.0 - c.visual_tokens_kept as f64 / c.visual_tokens_total as f64
            } else {
                0.0
            },
        },
        outbox: Default::default(),
        answers: None,
        events: None,
        timestamp: rfc3339(SystemTime::now()),
    }
}
