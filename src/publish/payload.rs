//! JSON payloads published on MQTT. Their contract for subscribers is the schema in
//! `tests/schema/*.schema.json` (tests validate against it).
//!
//! Versioned with `"v"`: a field is only ever added within a version; renaming or removing one
//! bumps it, so subscribers can tell which shape they hold.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::PromptKind;

/// Version of the answer payload.
pub const ANSWER_VERSION: u32 = 1;

/// One answer of the model to one prompt on one window (`<prefix>/<stream>/<prompt>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// Always [`ANSWER_VERSION`].
    pub v: u32,
    /// `<stream>:<window seq>:<prompt>`, see [`Answer::make_id`].
    pub id: String,
    pub stream: String,
    /// Prompt name.
    pub prompt: String,
    /// Prompt text as asked.
    pub question: String,
    /// `caption` | `alert` | `json`.
    pub kind: PromptKind,
    /// The generated text.
    pub answer: String,
    /// Bool for alert prompts, the parsed object for json prompts, null when unparsable (then
    /// `parse_error` says why) or for captions.
    pub value: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parse_error: Option<String>,
    /// Why the model did not run for this window (`static`: nothing changed); the answer is
    /// then the prompt's previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The JPEG published with this answer, for prompts with `snapshot = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    pub window: WindowInfo,
    pub tokens: TokenCounts,
    pub visual_tokens: VisualTokens,
    pub latency_ms: Latency,
    /// Model id (`model.id`, else repo, else directory name).
    pub model: String,
    /// When the answer was published (RFC 3339 UTC).
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
}

impl Answer {
    /// The answer id: `<stream>:<window seq>:<prompt>`.
    pub fn make_id(stream: &str, seq: u64, prompt: &str) -> String {
        format!("{stream}:{seq}:{prompt}")
    }

    /// The answer to publish for an engine result about `window`, `total` after the window
    /// closed (no snapshot; the daemon adds one for prompts that ask).
    pub fn of_result(r: crate::engine::PromptResult, window: WindowInfo, total: Duration, model: String) -> Answer {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Answer {
            v: ANSWER_VERSION,
            id: Answer::make_id(&r.stream, r.window_seq, &r.prompt),
            stream: r.stream,
            prompt: r.prompt,
            question: r.question,
            kind: r.kind,
            answer: r.text,
            value: r.value,
            parse_error: r.parse_error,
            skipped: None,
            snapshot: None,
            window,
            tokens: TokenCounts { prompt: r.prompt_tokens, generated: r.generated_tokens },
            visual_tokens: VisualTokens { total: r.visual_total, kept: r.visual_kept },
            latency_ms: Latency {
                queue: ms(r.queue),
                vision: ms(r.vision),
                prefill: ms(r.prefill),
                decode: ms(r.decode),
                total: ms(total),
            },
            model,
            timestamp: rfc3339(SystemTime::now()),
        }
    }

    /// For alert prompts: whether the answer says "yes" (`value == true`).
    pub fn is_positive(&self) -> bool {
        self.value == serde_json::Value::Bool(true)
    }

    /// The state for `.../state`: `ON`/`OFF` for alerts, else the answer cut to 255 characters
    /// (Home Assistant rejects longer sensor states).
    pub fn short_state(&self) -> String {
        if self.kind == PromptKind::Alert {
            return if self.is_positive() { "ON" } else { "OFF" }.to_string();
        }
        truncate_chars(self.answer.trim(), 255)
    }
}

/// The window an answer is about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowInfo {
    pub seq: u64,
    /// Wall-clock time of the first frame (RFC 3339 UTC).
    pub start: String,
    /// Wall-clock time of the last frame (RFC 3339 UTC).
    pub end: String,
    /// Stream-relative seconds of the first frame.
    pub start_s: f64,
    /// Stream-relative seconds of the last frame.
    pub end_s: f64,
    pub frames: u32,
    pub fps: f64,
}

impl WindowInfo {
    /// The window's description, sampled at `fps` (0 when unknown).
    pub fn of(w: &crate::window::Window, fps: f64) -> WindowInfo {
        let first = w.frames.first().map(|f| f.captured_at).unwrap_or_else(SystemTime::now);
        let last = w.frames.last().map(|f| f.captured_at).unwrap_or(first);
        WindowInfo {
            seq: w.seq,
            start: rfc3339(first),
            end: rfc3339(last),
            start_s: w.first_time_s(),
            end_s: w.last_time_s(),
            frames: w.frames.len() as u32,
            fps,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Prompt tokens fed to the language model (text + kept visual tokens).
    pub prompt: u32,
    pub generated: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisualTokens {
    /// Before pruning.
    pub total: u32,
    /// After pruning.
    pub kept: u32,
}

/// Milliseconds spent per stage; `total` runs from window close to publish.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub queue: f64,
    pub vision: f64,
    pub prefill: f64,
    pub decode: f64,
    pub total: f64,
}

/// Where an answer's snapshot went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub topic: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
}

/// `<prefix>/<stream>/<prompt>/alert`: sent on a false → true change of an alert prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertPayload {
    pub v: u32,
    /// The id of the answer that raised the alert.
    pub id: String,
    pub stream: String,
    pub prompt: String,
    pub answer: String,
    pub window: WindowInfo,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
}

impl AlertPayload {
    pub fn from_answer(a: &Answer) -> Self {
        AlertPayload {
            v: ANSWER_VERSION,
            id: a.id.clone(),
            stream: a.stream.clone(),
            prompt: a.prompt.clone(),
            answer: a.answer.clone(),
            window: a.window.clone(),
            timestamp: a.timestamp.clone(),
        }
    }
}

/// State of a stream's source, as the source supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamState {
    Starting,
    Streaming,
    Reconnecting,
    Stopped,
    Disabled,
    Failed,
}

/// `<prefix>/<stream>/status` (retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPayload {
    pub state: StreamState,
    /// Since when the stream is in this state (RFC 3339 UTC).
    pub since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `<prefix>/stats`, every 60 s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsPayload {
    pub v: u32,
    pub uptime_s: f64,
    pub streams: std::collections::BTreeMap<String, StreamStats>,
    pub inference: InferenceStats,
    /// Filled in by the publisher itself when it sends the stats.
    pub outbox: OutboxStats,
    /// Answers produced, delivered and dropped since start; filled in by the publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<super::AnswerCounts>,
    /// Alert events started, ended, and starts suppressed by a cooldown; filled in by the
    /// publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<super::events::EventCounts>,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    pub frames: u64,
    pub windows: u64,
    /// Frames or windows dropped (gaps, queue overflow, stale jobs).
    pub drops: u64,
    /// Windows the model did not run on: nothing moved (`skip_static`) or no prompt in schedule.
    #[serde(default)]
    pub skipped: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceStats {
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub tokens_per_s: f64,
    /// Fraction of visual tokens pruned (0..1).
    pub pruning_ratio: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Messages waiting for the broker.
    pub depth: u64,
    pub capacity: u64,
    /// Messages dropped (oldest first) because the outbox was full, since start.
    pub dropped: u64,
}

/// `<prefix>/errors`: failures worth a human's attention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPayload {
    /// Which part failed: `mqtt`, `source`, `engine`, ...
    pub component: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    pub message: String,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
}

/// Cut a string to at most `max` characters (not bytes, so it never splits a code point).
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-24T20:31:05.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

/// Now, as [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Gregorian date of a day count since 1970-01-01 (proleptic calendar, 400-year eras).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468; // shift the epoch to 0000-03-01 so leap days end each year
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year [0, 365]
    let mp = (5 * doy + 2) / 153; // March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day in a year divisible by 400) 12:34:56.789
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.789Z");
        // 2100-03-01: 2100 is not a leap year.
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400);
        assert_eq!(rfc3339(t), "2100-03-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(t), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn truncate_counts_characters() {
        assert_eq!(truncate_chars("héllo", 2), "hé");
        assert_eq!(truncate_chars("ab", 5), "ab");
    }
}
