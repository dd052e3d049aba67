//! Alert events: a lifecycle per (stream, alert prompt), published on
//! `<prefix>/<stream>/<prompt>/event`, so that a flickering answer does not spam.
//!
//! Policy ([`EventPolicy`], per prompt):
//! - **start** after `confirm_windows` consecutive positive windows. The event starts at the first
//!   of them.
//! - **update** on each further positive window while open, only with `event_updates`.
//! - **end** after `clear_windows` consecutive negative windows (reason `cleared`). The event ends
//!   at the end of its last positive window.
//! - **cooldown**: for `cooldown_s` after an end, a start is suppressed (counted). Positive
//!   windows during it do not count toward a later confirmation.
//! - [`EventTracker::close`] ends an open event at once, with a reason (`stream_down`,
//!   `disabled`).
//!
//! Pure: answers and the current time in, payloads out. The caller publishes them.

use serde::{Deserialize, Serialize};

use super::payload::{Answer, ANSWER_VERSION};

/// How one alert prompt turns answers into events.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventPolicy {
    pub confirm_windows: u32,
    pub clear_windows: u32,
    pub cooldown_s: f64,
    pub updates: bool,
}

impl Default for EventPolicy {
    fn default() -> Self {
        EventPolicy { confirm_windows: 1, clear_windows: 2, cooldown_s: 0.0, updates: false }
    }
}

/// `start`, `update` or `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Start,
    Update,
    End,
}

/// `<prefix>/<stream>/<prompt>/event` (schema: tests/schema/event.v1.schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPayload {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// `<stream>:<prompt>:<seq of the first window>`: the same for all messages of one event.
    pub event_id: String,
    pub stream: String,
    pub prompt: String,
    /// Start of the event's first window (RFC 3339).
    pub start: String,
    /// End of the event's last positive window, on `end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    /// Positive windows in the event so far.
    pub windows: u32,
    /// The latest positive answer.
    pub answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<serde_json::Value>,
    /// Why an event ended: `cleared`, `stream_down` or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
}

/// Counts over all trackers, for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventCounts {
    pub started: u64,
    pub ended: u64,
    /// Starts suppressed by a cooldown.
    pub suppressed: u64,
}

#[derive(Debug, Clone)]
struct Open {
    id: String,
    start: String,
    windows: u32,
    negatives: u32,
    last_end: String,
    answer: String,
}

/// The event state of one (stream, alert prompt).
#[derive(Debug, Clone, Default)]
pub struct EventTracker {
    /// Consecutive positive windows while idle, and the first of them (id seq, start).
    positives: u32,
    first: Option<(u64, String)>,
    open: Option<Open>,
    /// Unix time of the last end, for the cooldown.
    ended_at: Option<f64>,
    counts: EventCounts,
}

impl EventTracker {
    pub fn counts(&self) -> EventCounts {
        self.counts
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Feed one answer of the prompt (`now`: Unix seconds). Returns the message to publish, if any.
    pub fn on_answer(&mut self, a: &Answer, policy: &EventPolicy, now: f64) -> Option<EventPayload> {
        let positive = a.is_positive();
        if let Some(open) = &mut self.open {
            if positive {
                open.negatives = 0;
                open.windows += 1;
                open.last_end = a.window.end.clone();
                open.answer = a.answer.clone();
                return policy.updates.then(|| payload(EventType::Update, open, a, None));
            }
            open.negatives += 1;
            if open.negatives >= policy.clear_windows.max(1) {
                return self.end(a, now, "cleared");
            }
            return None;
        }
        if !positive {
            self.positives = 0;
            self.first = None;
            return None;
        }
        if self.ended_at.is_some_and(|t| now - t < policy.cooldown_s) {
            self.counts.suppressed += 1;
            self.positives = 0;
            self.first = None;
            return None;
        }
        self.positives += 1;
        let (seq, start) = self.first.get_or_insert_with(|| (a.window.seq, a.window.start.clone())).clone();
        if self.positives < policy.confirm_windows.max(1) {
            return None;
        }
        let open = Open {
            id: format!("{}:{}:{seq}", a.stream, a.prompt),
            start,
            windows: self.positives,
            negatives: 0,
            last_end: a.window.end.clone(),
            answer: a.answer.clone(),
        };
        self.positives = 0;
        self.first = None;
        self.counts.started += 1;
        let p = payload(EventType::Start, &open, a, None);
        self.open = Some(open);
        Some(p)
    }

    /// End an open event at once (the stream went down, or was disabled).
    pub fn close(&mut self, stream: &str, prompt: &str, now: f64, reason: &str) -> Option<EventPayload> {
        self.positives = 0;
        self.first = None;
        let open = self.open.take()?;
        self.ended_at = Some(now);
        self.counts.ended += 1;
        Some(EventPayload {
            v: ANSWER_VERSION,
            kind: EventType::End,
            event_id: open.id,
            stream: stream.to_string(),
            prompt: prompt.to_string(),
            start: open.start,
            end: Some(open.last_end),
            windows: open.windows,
            answer: open.answer,
            snapshot: None,
            reason: Some(reason.to_string()),
            timestamp: super::now_rfc3339(),
        })
    }

    fn end(&mut self, a: &Answer, now: f64, reason: &str) -> Option<EventPayload> {
        self.close(&a.stream, &a.prompt, now, reason)
    }
}

fn payload(kind: EventType, open: &Open, a: &Answer, reason: Option<&str>) -> EventPayload {
    EventPayload {
        v: ANSWER_VERSION,
        kind,
        event_id: open.id.clone(),
        stream: a.stream.clone(),
        prompt: a.prompt.clone(),
        start: open.start.clone(),
        end: None,
        windows: open.windows,
        answer: open.answer.clone(),
        snapshot: None,
        reason: reason.map(str::to_string),
        timestamp: a.timestamp.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::payload::{Latency, TokenCounts, VisualTokens, WindowInfo};

    fn answer(seq: u64, yes: bool) -> Answer {
        Answer {
            v: 1,
            id: Answer::make_id("cam", seq, "person"),
            stream: "cam".into(),
            prompt: "person".into(),
            question: "Person?".into(),
            kind: crate::config::PromptKind::Alert,
            answer: if yes { format!("yes {seq}") } else { format!("no {seq}") },
            value: serde_json::json!(yes),
            parse_error: None,
            skipped: None,
            snapshot: None,
            window: WindowInfo {
                seq,
                start: format!("t{seq}"),
                end: format!("t{seq}e"),
                start_s: seq as f64,
                end_s: seq as f64 + 1.0,
                frames: 1,
                fps: 1.0,
            },
            tokens: TokenCounts { prompt: 1, generated: 1 },
            visual_tokens: VisualTokens { total: 1, kept: 1 },
            latency_ms: Latency { queue: 0.0, vision: 0.0, prefill: 0.0, decode: 0.0, total: 0.0 },
            model: "m".into(),
            timestamp: "now".into(),
        }
    }

    /// Feed a yes/no sequence (one window a second); the events that came out, as (seq, type).
    fn run(t: &mut EventTracker, policy: &EventPolicy, first_seq: u64, pattern: &str) -> Vec<(u64, EventType)> {
        pattern
            .chars()
            .enumerate()
            .filter_map(|(i, c)| {
                let seq = first_seq + i as u64;
                t.on_answer(&answer(seq, c == 'y'), policy, seq as f64).map(|e| (seq, e.kind))
            })
            .collect()
    }

    #[test]
    fn confirm_and_clear_windows() {
        let p = EventPolicy { confirm_windows: 2, clear_windows: 2, ..Default::default() };
        let mut t = EventTracker::default();
        // A lone yes is not confirmed; two in a row start; one no does not clear; two do.
        let got = run(&mut t, &p, 0, "ynyyynyynnn");
        assert_eq!(got, vec![(3, EventType::Start), (9, EventType::End)]);
        assert_eq!(t.counts(), EventCounts { started: 1, ended: 1, suppressed: 0 });
    }

    #[test]
    fn the_event_spans_its_windows() {
        let p = EventPolicy { confirm_windows: 2, clear_windows: 1, updates: true, ..Default::default() };
        let mut t = EventTracker::default();
        let start = [answer(5, true), answer(6, true)].iter().filter_map(|a| t.on_answer(a, &p, 0.0)).next().unwrap();
        assert_eq!((start.event_id.as_str(), start.start.as_str(), start.windows), ("cam:person:5", "t5", 2));
        let upd = t.on_answer(&answer(7, true), &p, 0.0).unwrap();
        assert_eq!((upd.kind, upd.windows, upd.answer.as_str()), (EventType::Update, 3, "yes 7"));
        let end = t.on_answer(&answer(8, false), &p, 0.0).unwrap();
        assert_eq!((end.kind, end.end.as_deref(), end.windows), (EventType::End, Some("t7e"), 3));
        assert_eq!(
            (end.reason.as_deref(), end.answer.as_str(), end.event_id.as_str()),
            (Some("cleared"), "yes 7", "cam:person:5")
        );
    }

    #[test]
    fn cooldown_suppresses_and_counts_starts() {
        let p = EventPolicy { confirm_windows: 1, clear_windows: 1, cooldown_s: 5.0, ..Default::default() };
        let mut t = EventTracker::default();
        // Start at 0, end at 1 (cooldown until 6): yes at 2..=5 are suppressed, 6 starts.
        let got = run(&mut t, &p, 0, "ynyyyyy");
        assert_eq!(got, vec![(0, EventType::Start), (1, EventType::End), (6, EventType::Start)]);
        assert_eq!(t.counts().suppressed, 4);
    }

    #[test]
    fn close_ends_an_open_event_with_its_reason() {
        let p = EventPolicy::default();
        let mut t = EventTracker::default();
        assert!(t.close("cam", "person", 0.0, "stream_down").is_none(), "nothing open");
        run(&mut t, &p, 0, "y");
        let e = t.close("cam", "person", 1.0, "stream_down").unwrap();
        assert_eq!((e.kind, e.reason.as_deref()), (EventType::End, Some("stream_down")));
        assert!(!t.is_open());
        // Without updates, further yes answers of a new event start it again.
        assert_eq!(run(&mut t, &p, 10, "y"), vec![(10, EventType::Start)]);
    }
}
