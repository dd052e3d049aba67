//! The TOML configuration: schema, defaults, and validation.
//!
//! Every error names the file, line, column and key (`file:line:col: key: message`), so a user can
//! jump straight to the mistake. Secrets (passwords, credentials inside URIs) are scrubbed from
//! every message before it leaves this module.
//!
//! Relative paths in the file (`model.path`, `password_file`, stream files, ...) are resolved
//! against the directory of the config file, so the daemon behaves the same whatever its working
//! directory (systemd starts it in `/`).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration problem, located in the source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when the problem has no location (e.g. an empty file).
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// Dotted key path, e.g. `stream[1].fps` or `mqtt.qos`.
    pub key: String,
    pub message: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// One or more located problems; `Display` prints one `file:line:col: key: message` per line.
    #[error("{}", format_problems(.file, .problems))]
    Invalid { file: String, problems: Vec<Problem> },
}

impl ConfigError {
    /// The located problems (empty for read errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            ConfigError::Read { .. } => &[],
        }
    }
}

fn format_problems(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{file}:{}:{}: {}: {}", p.line, p.col, p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------------

/// The whole configuration file, with defaults applied to every stream.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub model: ModelConfig,
    pub pruning: PruningConfig,
    pub mqtt: MqttConfig,
    pub metrics: MetricsConfig,
    pub engine: EngineConfig,
    pub defaults: StreamDefaults,
    pub prompts: Vec<PromptConfig>,
    pub streams: Vec<StreamConfig>,
    /// Directory that relative paths were resolved against.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    /// Local Hugging Face layout directory.
    pub path: Option<PathBuf>,
    /// Hub repository id, fetched with hf-hub into the HF cache (alternative to `path`).
    pub repo: Option<String>,
    /// Hub revision used with `repo`.
    pub revision: Option<String>,
    pub device: Device,
    pub dtype: DType,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: u64,
    /// Model id reported in answers; defaults to the repo id or the directory name.
    pub id: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: None,
            repo: None,
            revision: None,
            device: Device::Cuda(0),
            dtype: DType::Bf16,
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            id: None,
        }
    }
}

impl ModelConfig {
    /// A stable identifier for answers: `id`, else the repo, else the directory name.
    pub fn model_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        if let Some(repo) = &self.repo {
            return repo.clone();
        }
        self.path
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unknown".into())
    }
}

/// Compute device for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("expected \"cpu\", \"cuda\" or \"cuda:N\", got {s:?}")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Written as in the config file (`"cpu"`, `"cuda:N"`).
impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Compares with the config's spelling (`"cpu"`, `"cuda:N"`).
impl PartialEq<&str> for Device {
    fn eq(&self, other: &&str) -> bool {
        self.to_string() == *other
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::Bf16),
            _ => Err(format!("expected f32, f16 or bf16, got {s:?}")),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruningConfig {
    pub enabled: bool,
    /// Mean |Δpixel| (0-255 scale) of a merged patch against the previous frame under which the
    /// video token is dropped.
    pub threshold: f64,
    pub min_tokens_per_frame: usize,
}

impl Default for PruningConfig {
    fn default() -> Self {
        Self { enabled: true, threshold: 0.1, min_tokens_per_frame: 1 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `"embedded"` (in-process broker) or `mqtt://host[:port]` / `mqtts://host[:port]`.
    pub broker: String,
    pub topic_prefix: String,
    pub client_id: String,
    pub qos: u8,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keepalive_s: u64,
    pub outbox_capacity: usize,
    pub homeassistant_discovery: bool,
    /// Discovery prefix Home Assistant listens on.
    pub discovery_prefix: String,
    /// Port of the embedded broker (only with `broker = "embedded"`).
    pub embedded_port: u16,
    /// Address the embedded broker binds; loopback unless set explicitly.
    pub embedded_listen: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            broker: "embedded".into(),
            topic_prefix: "vigil".into(),
            client_id: "vigil".into(),
            qos: 1,
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keepalive_s: 30,
            outbox_capacity: 1000,
            homeassistant_discovery: false,
            discovery_prefix: "homeassistant".into(),
            embedded_port: 1883,
            embedded_listen: None,
        }
    }
}

impl MqttConfig {
    pub fn is_embedded(&self) -> bool {
        self.broker == "embedded"
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` for Prometheus `/metrics` and `/healthz`; empty disables the endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".into() }
    }
}

impl MetricsConfig {
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        if self.listen.is_empty() {
            None
        } else {
            self.listen.parse().ok()
        }
    }
}

/// Scheduling of windows × prompts onto the model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one batch.
    pub max_batch_tokens: usize,
    /// Frames whose vision features are kept for overlapping windows (0 disables the cache).
    pub feature_cache_frames: usize,
    /// Jobs waiting longer than this are dropped instead of answered late.
    pub max_queue_age_s: f64,
    /// Jobs waiting for the engine at most.
    pub queue_capacity: usize,
    /// On SIGTERM, how long in-flight jobs may take to finish.
    pub shutdown_timeout_s: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_batch_tokens: 16384,
            feature_cache_frames: 256,
            max_queue_age_s: 60.0,
            queue_capacity: 64,
            shutdown_timeout_s: 30.0,
        }
    }
}

/// Per-stream settings that `[defaults]` supplies and each `[[stream]]` may override.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamDefaults {
    pub fps: f64,
    pub window_seconds: f64,
    pub stride_seconds: f64,
    pub max_frame_pixels: u64,
    pub gap_policy: GapPolicy,
    pub transport: RtspTransport,
    pub latency_ms: u32,
    pub reconnect_min_s: f64,
    pub reconnect_max_s: f64,
    pub realtime: bool,
    #[serde(rename = "loop")]
    pub loop_: bool,
    /// Skip the model for a window where (almost) nothing changed.
    pub skip_static: bool,
    /// With `skip_static`: the share of a window's video tokens that must have changed (beyond
    /// each frame's minimum) for the model to run.
    pub min_changed_fraction: f64,
    /// With `skip_static`: publish nothing for a skipped window (else captions re-publish their
    /// last answer marked `"skipped": "static"`).
    pub skip_publish: bool,
    /// Snapshots: JPEG quality (1-100).
    pub snapshot_quality: u8,
    /// Snapshots: scale larger frames down to this many pixels (default: as buffered).
    pub snapshot_max_pixels: Option<u64>,
    /// Snapshots: also write `<answer id>.jpg` here, keeping the newest `snapshot_keep`.
    pub snapshot_dir: Option<PathBuf>,
    pub snapshot_keep: usize,
}

impl Default for StreamDefaults {
    fn default() -> Self {
        Self {
            fps: 1.0,
            window_seconds: 8.0,
            stride_seconds: 8.0,
            max_frame_pixels: 200_704,
            gap_policy: GapPolicy::Emit,
            transport: RtspTransport::Tcp,
            latency_ms: 200,
            reconnect_min_s: 1.0,
            reconnect_max_s: 30.0,
            realtime: true,
            loop_: false,
            skip_static: false,
            min_changed_fraction: 0.02,
            skip_publish: false,
            snapshot_quality: 80,
            snapshot_max_pixels: None,
            snapshot_dir: None,
            snapshot_keep: 100,
        }
    }
}

/// What to do with a window that has missing frames (a gap left by a reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GapPolicy {
    /// Emit it with the frames it has and their real timestamps (default).
    Emit,
    /// Drop it (counted).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    Tcp,
    Udp,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptKind {
    /// Free text.
    Caption,
    /// A yes/no question; rising edges are published as alerts.
    Alert,
    /// A structured answer; the first JSON object in the text is parsed.
    Json,
}

impl PromptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PromptKind::Caption => "caption",
            PromptKind::Alert => "alert",
            PromptKind::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    pub name: String,
    pub text: String,
    #[serde(default = "default_kind")]
    pub kind: PromptKind,
    /// Run on every Nth window.
    #[serde(default = "default_every")]
    pub every: u64,
    pub max_new_tokens: Option<usize>,
    /// Alert prompts: consecutive positive windows that start an event (default 1).
    pub confirm_windows: Option<u32>,
    /// Alert prompts: consecutive negative windows that end it (default 2).
    pub clear_windows: Option<u32>,
    /// Alert prompts: seconds after an end during which no event starts (default 0).
    pub cooldown_s: Option<f64>,
    /// Alert prompts: publish `update` on each positive window of an open event (default false).
    pub event_updates: Option<bool>,
    /// Local-time ranges in which the prompt runs (`"07:00-22:00"`; see [`crate::schedule`]).
    #[serde(default)]
    pub active: Vec<String>,
    /// Days on which its ranges start (`"mon"` … `"sun"`); empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Publish a JPEG of the window's key frame with each answer.
    #[serde(default)]
    pub snapshot: bool,
}

impl PromptConfig {
    /// When the prompt may run (`None`: always). Validated when the config is loaded.
    pub fn schedule(&self) -> Option<crate::schedule::Schedule> {
        crate::schedule::Schedule::parse(&self.active, &self.days).ok().flatten()
    }

    /// How this prompt's answers become events (alert prompts).
    pub fn event_policy(&self) -> crate::publish::events::EventPolicy {
        let d = crate::publish::events::EventPolicy::default();
        crate::publish::events::EventPolicy {
            confirm_windows: self.confirm_windows.unwrap_or(d.confirm_windows),
            clear_windows: self.clear_windows.unwrap_or(d.clear_windows),
            cooldown_s: self.cooldown_s.unwrap_or(d.cooldown_s),
            updates: self.event_updates.unwrap_or(d.updates),
        }
    }
}

fn default_kind() -> PromptKind {
    PromptKind::Caption
}
fn default_every() -> u64 {
    1
}

/// One camera or file, with `[defaults]` applied.
#[derive(Debug, Clone, Serialize)]
pub struct StreamConfig {
    pub name: String,
    /// As written in the file (may hold credentials: use [`redact_uri`] before showing it).
    pub uri: String,
    pub prompts: Vec<String>,
    pub enabled: bool,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    #[serde(flatten)]
    pub settings: StreamDefaults,
}

impl StreamConfig {
    /// What kind of source the URI names (validated at load time).
    pub fn source_kind(&self) -> SourceKind {
        SourceKind::of(&self.uri).unwrap_or(SourceKind::File)
    }
}

/// The stream as written, overrides optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFile {
    name: String,
    uri: String,
    #[serde(default)]
    prompts: Vec<String>,
    #[serde(default = "default_true")]
    enabled: bool,
    username: Option<String>,
    password_file: Option<PathBuf>,
    fps: Option<f64>,
    window_seconds: Option<f64>,
    stride_seconds: Option<f64>,
    max_frame_pixels: Option<u64>,
    gap_policy: Option<GapPolicy>,
    transport: Option<RtspTransport>,
    latency_ms: Option<u32>,
    reconnect_min_s: Option<f64>,
    reconnect_max_s: Option<f64>,
    realtime: Option<bool>,
    #[serde(rename = "loop")]
    loop_: Option<bool>,
    skip_static: Option<bool>,
    min_changed_fraction: Option<f64>,
    skip_publish: Option<bool>,
    snapshot_quality: Option<u8>,
    snapshot_max_pixels: Option<u64>,
    snapshot_dir: Option<PathBuf>,
    snapshot_keep: Option<usize>,
}

fn default_true() -> bool {
    true
}

impl StreamFile {
    fn resolve(self, d: &StreamDefaults) -> StreamConfig {
        StreamConfig {
            name: self.name,
            uri: self.uri,
            prompts: self.prompts,
            enabled: self.enabled,
            username: self.username,
            password_file: self.password_file,
            settings: StreamDefaults {
                fps: self.fps.unwrap_or(d.fps),
                window_seconds: self.window_seconds.unwrap_or(d.window_seconds),
                stride_seconds: self.stride_seconds.unwrap_or(d.stride_seconds),
                max_frame_pixels: self.max_frame_pixels.unwrap_or(d.max_frame_pixels),
                gap_policy: self.gap_policy.unwrap_or(d.gap_policy),
                transport: self.transport.unwrap_or(d.transport),
                latency_ms: self.latency_ms.unwrap_or(d.latency_ms),
                reconnect_min_s: self.reconnect_min_s.unwrap_or(d.reconnect_min_s),
                reconnect_max_s: self.reconnect_max_s.unwrap_or(d.reconnect_max_s),
                realtime: self.realtime.unwrap_or(d.realtime),
                loop_: self.loop_.unwrap_or(d.loop_),
                skip_static: self.skip_static.unwrap_or(d.skip_static),
                min_changed_fraction: self.min_changed_fraction.unwrap_or(d.min_changed_fraction),
                skip_publish: self.skip_publish.unwrap_or(d.skip_publish),
                snapshot_quality: self.snapshot_quality.unwrap_or(d.snapshot_quality),
                snapshot_max_pixels: self.snapshot_max_pixels.or(d.snapshot_max_pixels),
                snapshot_dir: self.snapshot_dir.or_else(|| d.snapshot_dir.clone()),
                snapshot_keep: self.snapshot_keep.unwrap_or(d.snapshot_keep),
            },
        }
    }
}

/// `[model]` as written: `device` stays text until validation parses it, so a bad device is one
/// located problem among the others rather than the end of deserialization.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ModelFile {
    path: Option<PathBuf>,
    repo: Option<String>,
    revision: Option<String>,
    device: String,
    dtype: DType,
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    top_k: usize,
    seed: u64,
    id: Option<String>,
}

impl Default for ModelFile {
    fn default() -> Self {
        let m = ModelConfig::default();
        Self {
            path: m.path,
            repo: m.repo,
            revision: m.revision,
            device: m.device.to_string(),
            dtype: m.dtype,
            max_new_tokens: m.max_new_tokens,
            temperature: m.temperature,
            top_p: m.top_p,
            top_k: m.top_k,
            seed: m.seed,
            id: m.id,
        }
    }
}

impl ModelFile {
    /// The section with its device parsed (the default one if it does not parse), and the
    /// parse error for validation to report.
    fn resolve(self) -> (ModelConfig, Option<String>) {
        let (device, error) = match self.device.parse::<Device>() {
            Ok(d) => (d, None),
            Err(e) => (ModelConfig::default().device, Some(e)),
        };
        let m = ModelConfig {
            path: self.path,
            repo: self.repo,
            revision: self.revision,
            device,
            dtype: self.dtype,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            id: self.id,
        };
        (m, error)
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    model: ModelFile,
    #[serde(default)]
    pruning: PruningConfig,
    #[serde(default)]
    mqtt: MqttConfig,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    engine: EngineConfig,
    #[serde(default)]
    defaults: StreamDefaults,
    #[serde(default)]
    prompt: Vec<PromptConfig>,
    #[serde(default)]
    stream: Vec<StreamFile>,
}

/// Kinds of stream source, from the URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Rtsp,
    Http,
    File,
    V4l2,
}

impl SourceKind {
    /// Classify a stream URI; `Err` explains what is wrong with it.
    pub fn of(uri: &str) -> Result<SourceKind, String> {
        if uri.trim().is_empty() {
            return Err("is empty".into());
        }
        // A plain path (no scheme) is a local file.
        if !uri.contains("://") {
            return Ok(SourceKind::File);
        }
        let parsed = url::Url::parse(uri).map_err(|e| format!("is not a valid URI ({e})"))?;
        let kind = match parsed.scheme() {
            "rtsp" | "rtsps" | "rtspt" => SourceKind::Rtsp,
            "http" | "https" => SourceKind::Http,
            "file" => SourceKind::File,
            "v4l2" => SourceKind::V4l2,
            other => {
                return Err(format!(
                    "has unsupported scheme {other:?} (expected rtsp://, rtsps://, http(s)://, file://, v4l2:// or a path)"
                ))
            }
        };
        match kind {
            SourceKind::Rtsp | SourceKind::Http if parsed.host_str().unwrap_or("").is_empty() => {
                Err("has no host".into())
            }
            SourceKind::V4l2 if parsed.path().is_empty() || parsed.path() == "/" => {
                Err("names no device (expected v4l2:///dev/videoN)".into())
            }
            _ => Ok(kind),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Replace the password in a URI's userinfo with `***` (`rtsp://user:***@host/...`).
///
/// Works on anything that looks like `scheme://user:pass@`, so it is safe on strings that are
/// not valid URLs (e.g. inside error messages).
pub fn redact_uri(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote; the userinfo at its last '@'.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Secret substrings found in a config text (URI passwords), to scrub from any message.
fn secrets_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let tail = &rest[i + 3..];
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        if let Some(at) = authority.rfind('@') {
            if let Some(colon) = authority[..at].find(':') {
                let pw = &authority[colon + 1..at];
                if !pw.is_empty() {
                    found.push(pw.to_string());
                    // Percent-decoded form too, in case a message shows the decoded value.
                    if let Ok(dec) = url::Url::parse(&format!("x://u:{pw}@h")) {
                        if let Some(p) = dec.password() {
                            let d = percent_decode(p);
                            if d != pw {
                                found.push(d);
                            }
                        }
                    }
                }
            }
        }
        rest = &tail[end..];
    }
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    found.dedup();
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn scrub(message: &str, secrets: &[String]) -> String {
    let mut m = redact_uri(message);
    for s in secrets {
        if s.len() >= 2 {
            m = m.replace(s.as_str(), "***");
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Limits: every input has a bound, so no config can make memory grow without one
// ---------------------------------------------------------------------------------------------

/// Largest config file read (a config is a few KiB; this refuses `/dev/zero` and mistakes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest `password_file` read: a password is one short line.
pub const MAX_SECRET_BYTES: u64 = 4096;
/// Highest sampling rate of a stream, in frames per second.
pub const MAX_FPS: f64 = 30.0;
/// Most frames in one window (`fps × window_seconds`); VideoLLaMA3's processor takes 180 at most.
pub const MAX_WINDOW_FRAMES: f64 = 180.0;
/// Largest frame buffered (`max_frame_pixels`): 4096 × 4096.
pub const MAX_FRAME_PIXELS: u64 = 4096 * 4096;
/// Most bytes of RGB frames one window may hold (frames × `max_frame_pixels` × 3).
pub const MAX_WINDOW_BYTES: u64 = 1 << 30;
/// Longest prompt text, in characters (the model's context holds it beside the video).
pub const MAX_PROMPT_CHARS: usize = 4096;
/// Longest stream or prompt name: each is an MQTT topic level.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest `mqtt.topic_prefix`.
pub const MAX_TOPIC_PREFIX_CHARS: usize = 128;
/// Longest `mqtt.client_id`.
pub const MAX_CLIENT_ID_CHARS: usize = 128;

/// Prompt names that would land on a per-stream topic of their own
/// (`<prefix>/<stream>/<prompt>` shares its level with these).
pub const RESERVED_PROMPT_NAMES: [&str; 3] = ["status", "set", "enabled"];

/// Read a small text file: a regular file (not a device or a FIFO) of at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file" };
        return Err(Error::new(ErrorKind::InvalidInput, what));
    }
    let too_big = || Error::new(ErrorKind::InvalidData, format!("larger than {max} bytes"));
    if meta.len() > max {
        return Err(too_big());
    }
    // The size can change between the check and the read: never read past the bound.
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(too_big());
    }
    Ok(text)
}

/// Whether a file can be read by users other than its owner and group (for secrets).
pub fn world_readable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_bounded(path, MAX_CONFIG_BYTES).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        // Absolute, so that a path resolved once stays the same if resolved again.
        let base = std::path::absolute(&base).unwrap_or(base);
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// Parse and validate config text; `file` names it in messages, `base_dir` anchors relative
    /// paths.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let secrets = secrets_in(text);
        let invalid = |problems: Vec<Problem>| ConfigError::Invalid {
            file: file.to_string(),
            problems: problems
                .into_iter()
                .map(|p| Problem { message: scrub(&p.message, &secrets), key: scrub(&p.key, &secrets), ..p })
                .collect(),
        };

        let doc = match toml_edit::Document::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
                let key = e
                    .span()
                    .map(|s| key_path_in_line(text, s.start))
                    .unwrap_or_else(|| "<syntax>".into());
                return Err(invalid(vec![Problem {
                    line,
                    col,
                    key,
                    message: format!("TOML syntax error: {}", e.message().trim()),
                }]));
            }
        };

        let file_cfg: ConfigFile = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => return Err(invalid(vec![serde_problem(text, &doc, &e)])),
        };

        let locator = Locator { text, doc: &doc };
        let (model, device_error) = file_cfg.model.resolve();
        let cfg = Config {
            streams: file_cfg.stream.into_iter().map(|s| s.resolve(&file_cfg.defaults)).collect(),
            model,
            pruning: file_cfg.pruning,
            mqtt: file_cfg.mqtt,
            metrics: file_cfg.metrics,
            engine: file_cfg.engine,
            defaults: file_cfg.defaults,
            prompts: file_cfg.prompt,
            base_dir: base_dir.to_path_buf(),
        };
        let problems = cfg.validate(&locator, device_error.as_deref());
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(invalid(problems))
        }
    }

    /// Resolve a path from the config against the config file's directory.
    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The model directory, resolved (None when the model comes from `repo`).
    pub fn model_dir(&self) -> Option<PathBuf> {
        self.model.path.as_deref().map(|p| self.resolve_path(p))
    }

    pub fn prompt(&self, name: &str) -> Option<&PromptConfig> {
        self.prompts.iter().find(|p| p.name == name)
    }

    /// One-line summary, e.g. `2 streams, 3 prompts, broker embedded`.
    pub fn summary(&self) -> String {
        let broker = if self.mqtt.is_embedded() {
            let ip = self.mqtt.embedded_listen.as_deref().unwrap_or("127.0.0.1");
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
            format!("embedded ({host}:{})", self.mqtt.embedded_port)
        } else {
            redact_uri(&self.mqtt.broker)
        };
        let model = match (&self.model.path, &self.model.repo) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(r)) => r.clone(),
            _ => "?".into(),
        };
        format!(
            "{} stream{}, {} prompt{}, broker {}, model {} on {} ({})",
            self.streams.len(),
            plural(self.streams.len()),
            self.prompts.len(),
            plural(self.prompts.len()),
            broker,
            model,
            self.model.device,
            serde_json::to_value(self.model.dtype).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        )
    }

    /// Non-fatal observations (missing files that may appear later, ...).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(dir) = self.model_dir() {
            if !dir.join("config.json").is_file() {
                w.push(format!("model.path: {} has no config.json (yet)", dir.display()));
            }
        }
        for s in &self.streams {
            if s.source_kind() == SourceKind::File {
                let p = self.resolve_path(Path::new(s.uri.strip_prefix("file://").unwrap_or(&s.uri)));
                if !p.exists() {
                    w.push(format!("stream {:?}: file {} does not exist (yet)", s.name, p.display()));
                }
            }
            if s.enabled && s.prompts.is_empty() {
                w.push(format!("stream {:?} has no prompts: its windows will not be analysed", s.name));
            }
        }
        let secrets = self.mqtt.password_file.iter().map(|p| ("mqtt.password_file".to_string(), p));
        let stream_secrets =
            self.streams.iter().filter_map(|s| Some((format!("stream {:?} password_file", s.name), s.password_file.as_ref()?)));
        for (what, p) in secrets.chain(stream_secrets) {
            let full = self.resolve_path(p);
            if world_readable(&full) {
                w.push(format!("{what}: {} is readable by every user (chmod 600 or 640 it)", full.display()));
            }
        }
        w
    }

    /// Every problem of the config; `device_error` is why `model.device` did not parse.
    fn validate(&self, loc: &Locator, device_error: Option<&str>) -> Vec<Problem> {
        let mut v = Validator { loc, problems: Vec::new() };
        let m = &self.model;

        match (&m.path, &m.repo) {
            (None, None) => v.fail("model", "set one of model.path or model.repo"),
            (Some(_), Some(_)) => v.fail("model.repo", "set only one of model.path or model.repo"),
            _ => {}
        }
        if let Some(e) = device_error {
            v.fail("model.device", e);
        }
        if m.max_new_tokens == 0 {
            v.fail("model.max_new_tokens", "must be at least 1");
        }
        if !(m.temperature >= 0.0 && m.temperature.is_finite()) {
            v.fail("model.temperature", "must be >= 0 (0 = greedy)");
        }
        if !(m.top_p > 0.0 && m.top_p <= 1.0) {
            v.fail("model.top_p", "must be in (0, 1]");
        }

        let p = &self.pruning;
        if !(p.threshold >= 0.0 && p.threshold.is_finite()) {
            v.fail("pruning.threshold", "must be >= 0 (mean |Δpixel| on 0-255)");
        }
        if p.min_tokens_per_frame == 0 {
            v.fail("pruning.min_tokens_per_frame", "must be at least 1");
        }

        self.validate_mqtt(&mut v);

        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            v.fail("metrics.listen",
                &format!("{:?} is not host:port (e.g. \"127.0.0.1:9464\"; \"\" disables)", self.metrics.listen),
            );
        }

        let e = &self.engine;
        for (key, ok) in [
            ("max_batch", e.max_batch >= 1),
            ("max_batch_tokens", e.max_batch_tokens >= 1),
            ("queue_capacity", e.queue_capacity >= 1),
        ] {
            if !ok {
                v.fail(&format!("engine.{key}"), "must be at least 1");
            }
        }
        for (key, val) in [("max_queue_age_s", e.max_queue_age_s), ("shutdown_timeout_s", e.shutdown_timeout_s)] {
            if !(val > 0.0 && val.is_finite()) {
                v.fail(&format!("engine.{key}"), "must be > 0");
            }
        }

        self.validate_stream_settings(&mut v, "defaults", &self.defaults);
        let defaults_failed: HashSet<String> = v
            .problems
            .iter()
            .filter_map(|p| p.key.strip_prefix("defaults.").map(String::from))
            .collect();

        let mut prompt_names = HashSet::new();
        for (i, pr) in self.prompts.iter().enumerate() {
            let key = |k: &str| format!("prompt[{i}].{k}");
            if let Err(e) = check_name(&pr.name) {
                v.fail(&key("name"), &e);
            } else if RESERVED_PROMPT_NAMES.contains(&pr.name.as_str()) {
                v.fail(
                    &key("name"),
                    &format!("{:?} is reserved: it would collide with the topic <prefix>/<stream>/{}", pr.name, pr.name),
                );
            } else if !prompt_names.insert(pr.name.as_str()) {
                v.fail(&key("name"), &format!("duplicate prompt name {:?}", pr.name));
            }
            if pr.text.trim().is_empty() {
                v.fail(&key("text"), "must not be empty");
            } else if pr.text.chars().count() > MAX_PROMPT_CHARS {
                v.fail(
                    &key("text"),
                    &format!("is {} characters long; at most {MAX_PROMPT_CHARS}", pr.text.chars().count()),
                );
            }
            if pr.every == 0 {
                v.fail(&key("every"), "must be at least 1 (1 = every window)");
            }
            if pr.max_new_tokens == Some(0) {
                v.fail(&key("max_new_tokens"), "must be at least 1");
            }
            let event_keys = [
                ("confirm_windows", pr.confirm_windows.is_some()),
                ("clear_windows", pr.clear_windows.is_some()),
                ("cooldown_s", pr.cooldown_s.is_some()),
                ("event_updates", pr.event_updates.is_some()),
            ];
            for (k, set) in event_keys {
                if set && pr.kind != PromptKind::Alert {
                    v.fail(&key(k), "applies to alert prompts only (kind = \"alert\")");
                }
            }
            for (k, n) in [("confirm_windows", pr.confirm_windows), ("clear_windows", pr.clear_windows)] {
                if n == Some(0) {
                    v.fail(&key(k), "must be at least 1");
                }
            }
            if let Err(e) = crate::schedule::Schedule::parse(&pr.active, &pr.days) {
                let k = if e.contains("not a day") { "days" } else { "active" };
                v.fail(&key(k), &e);
            }
            if pr.cooldown_s.is_some_and(|c| !(0.0..=86_400.0).contains(&c)) {
                v.fail(&key("cooldown_s"), "must be between 0 and 86400 (a day)");
            }
        }

        let mut stream_names = HashSet::new();
        for (i, s) in self.streams.iter().enumerate() {
            let key = |k: &str| format!("stream[{i}].{k}");
            if let Err(e) = check_name(&s.name) {
                v.fail(&key("name"), &e);
            } else if !stream_names.insert(s.name.as_str()) {
                v.fail(&key("name"), &format!("duplicate stream name {:?}", s.name));
            }
            if let Err(e) = SourceKind::of(&s.uri) {
                v.fail(&key("uri"), &format!("{:?} {e}", redact_uri(&s.uri)));
            }
            for (j, name) in s.prompts.iter().enumerate() {
                if !prompt_names.contains(name.as_str()) {
                    let defined: Vec<&str> = self.prompts.iter().map(|p| p.name.as_str()).collect();
                    let mut msg = format!("names undefined prompt {name:?}");
                    if let Some(best) = did_you_mean(name, defined.iter().copied()) {
                        msg.push_str(&format!(" (did you mean {best:?}?)"));
                    } else if defined.is_empty() {
                        msg.push_str(" (no [[prompt]] is defined)");
                    }
                    // Point at the offending element, report the key the user wrote.
                    v.fail_at(&format!("stream[{i}].prompts[{j}]"), &key("prompts"), &msg);
                }
            }
            if let Some(pf) = &s.password_file {
                self.check_secret(&mut v, &key("password_file"), pf);
            }
            // A bad value inherited from [defaults] is reported once, there, not again per stream.
            let before = v.problems.len();
            self.validate_stream_settings(&mut v, &format!("stream[{i}]"), &s.settings);
            let found: Vec<Problem> = v.problems.drain(before..).collect();
            for p in found {
                let field = p.key.rsplit('.').next().unwrap_or_default().to_string();
                if v.loc.is_written(&p.key) || !defaults_failed.contains(&field) {
                    v.problems.push(p);
                }
            }
        }
        v.problems
    }

    fn validate_mqtt(&self, v: &mut Validator) {
        let q = &self.mqtt;
        if q.broker != "embedded" && !q.broker.contains("://") {
            v.fail("mqtt.broker",
                &format!("{:?} is not \"embedded\" or a broker URL like mqtt://host:1883", redact_uri(&q.broker)),
            );
        } else if q.broker != "embedded" {
            match url::Url::parse(&q.broker) {
                Ok(u) if matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl") && u.host_str().is_some_and(|h| !h.is_empty()) => {}
                Ok(u) if !matches!(u.scheme(), "mqtt" | "mqtts" | "tcp" | "ssl") => v.fail("mqtt.broker",
                    &format!("unsupported scheme {:?} (expected \"embedded\", mqtt://host:1883 or mqtts://host:8883)", u.scheme()),
                ),
                Ok(_) => v.fail("mqtt.broker", "has no host"),
                Err(e) => v.fail("mqtt.broker",
                    &format!("{:?} is not \"embedded\" or a broker URL like mqtt://host:1883 ({e})", redact_uri(&q.broker)),
                ),
            }
        }
        if q.qos > 2 {
            v.fail("mqtt.qos", &format!("must be 0, 1 or 2 (got {})", q.qos));
        }
        if q.topic_prefix.is_empty()
            || q.topic_prefix.contains(['+', '#'])
            || q.topic_prefix.starts_with('/')
            || q.topic_prefix.ends_with('/')
        {
            v.fail("mqtt.topic_prefix",
                "must be non-empty, without MQTT wildcards (+, #) or a leading/trailing '/'",
            );
        } else if q.topic_prefix.chars().count() > MAX_TOPIC_PREFIX_CHARS {
            v.fail("mqtt.topic_prefix", &format!("is longer than {MAX_TOPIC_PREFIX_CHARS} characters"));
        }
        if q.client_id.is_empty() {
            v.fail("mqtt.client_id", "must not be empty");
        } else if q.client_id.chars().count() > MAX_CLIENT_ID_CHARS {
            v.fail("mqtt.client_id", &format!("is longer than {MAX_CLIENT_ID_CHARS} characters"));
        }
        if q.keepalive_s == 0 {
            v.fail("mqtt.keepalive_s", "must be at least 1 (without keep-alive a dead broker goes unnoticed)");
        } else if q.keepalive_s > u64::from(u16::MAX) {
            v.fail("mqtt.keepalive_s", &format!("must be at most {} (MQTT's limit)", u16::MAX));
        }
        if q.broker == "embedded" && q.embedded_port == 0 {
            v.fail("mqtt.embedded_port", "must be a port number (1-65535); 0 would pick a random one nobody knows");
        }
        if q.outbox_capacity == 0 {
            v.fail("mqtt.outbox_capacity", "must be at least 1");
        }
        if let Some(pf) = &q.password_file {
            self.check_secret(v, "mqtt.password_file", pf);
            if q.username.is_none() {
                v.fail("mqtt.password_file", "needs mqtt.username");
            }
        }
        for key in ["ca_file", "cert_file", "key_file"] {
            let f = match key {
                "ca_file" => &q.ca_file,
                "cert_file" => &q.cert_file,
                _ => &q.key_file,
            };
            if let Some(f) = f {
                self.check_readable(v, &format!("mqtt.{key}"), f);
            }
        }
        if q.cert_file.is_some() != q.key_file.is_some() {
            v.fail("mqtt.cert_file", "cert_file and key_file go together");
        }
        if let Some(listen) = &q.embedded_listen {
            match listen.parse::<std::net::IpAddr>() {
                Err(_) => v.fail("mqtt.embedded_listen", &format!("{listen:?} is not an IP address")),
                Ok(ip) if q.broker == "embedded" && !ip.is_loopback() && q.username.is_none() => v.fail(
                    "mqtt.embedded_listen",
                    &format!(
                        "the embedded broker on {ip} would be open to the network: set mqtt.username and \
                         mqtt.password_file (it then requires them of every client)"
                    ),
                ),
                Ok(_) => {}
            }
        }
        if q.broker == "embedded" && q.username.is_some() && q.password_file.is_none() {
            v.fail("mqtt.username", "the embedded broker needs mqtt.password_file with it");
        }
    }

    fn check_readable(&self, v: &mut Validator, key: &str, p: &Path) {
        let full = self.resolve_path(p);
        if let Err(e) = std::fs::File::open(&full) {
            v.fail(key, &format!("cannot read {}: {e}", full.display()));
        }
    }

    /// A password file: regular, small, with a non-empty first line.
    fn check_secret(&self, v: &mut Validator, key: &str, p: &Path) {
        let full = self.resolve_path(p);
        match read_bounded(&full, MAX_SECRET_BYTES) {
            Err(e) => v.fail(key, &format!("cannot read {}: {e}", full.display())),
            Ok(text) if text.lines().next().unwrap_or("").is_empty() => {
                v.fail(key, &format!("{}: the first line (the password) is empty", full.display()))
            }
            Ok(_) => {}
        }
    }

    /// Settings of `[defaults]` or of one stream; `key` is the table (`defaults`, `stream[2]`).
    fn validate_stream_settings(&self, v: &mut Validator, key: &str, s: &StreamDefaults) {
        let name = |k: &str| format!("{key}.{k}");
        if !(s.fps > 0.0 && s.fps <= MAX_FPS) {
            v.fail(&name("fps"), &format!("must be > 0 and at most {MAX_FPS} (got {})", s.fps));
        } else if !(s.window_seconds.is_finite() && s.window_seconds * s.fps >= 1.0 - 1e-9) {
            v.fail(
                &name("window_seconds"),
                &format!(
                    "window of {} s holds less than one frame at {} fps (needs >= {} s)",
                    s.window_seconds,
                    s.fps,
                    1.0 / s.fps
                ),
            );
        } else if s.window_seconds * s.fps > MAX_WINDOW_FRAMES + 1e-9 {
            v.fail(
                &name("window_seconds"),
                &format!(
                    "window of {} s holds {:.0} frames at {} fps; at most {MAX_WINDOW_FRAMES} (needs <= {} s)",
                    s.window_seconds,
                    s.window_seconds * s.fps,
                    s.fps,
                    MAX_WINDOW_FRAMES / s.fps
                ),
            );
        } else if s.max_frame_pixels <= MAX_FRAME_PIXELS {
            let frames = (s.window_seconds * s.fps + 1e-9).floor() as u64;
            let bytes = frames * s.max_frame_pixels * 3;
            if bytes > MAX_WINDOW_BYTES {
                v.fail(
                    &name("max_frame_pixels"),
                    &format!(
                        "{frames} frames of {} pixels make {} MiB of RGB per window; at most {} MiB (fewer frames or pixels)",
                        s.max_frame_pixels,
                        bytes >> 20,
                        MAX_WINDOW_BYTES >> 20
                    ),
                );
            }
        }
        if !(s.stride_seconds > 0.0 && s.stride_seconds.is_finite()) {
            v.fail(&name("stride_seconds"), &format!("must be > 0 (got {})", s.stride_seconds));
        }
        // One 28×28 merged patch is the smallest frame the model can take.
        if s.max_frame_pixels < 28 * 28 {
            v.fail(&name("max_frame_pixels"), "must be at least 784 (28×28)");
        } else if s.max_frame_pixels > MAX_FRAME_PIXELS {
            v.fail(&name("max_frame_pixels"), &format!("must be at most {MAX_FRAME_PIXELS} (4096×4096)"));
        }
        if !(1..=100).contains(&s.snapshot_quality) {
            v.fail(&name("snapshot_quality"), "must be between 1 and 100");
        }
        if s.snapshot_max_pixels.is_some_and(|p| !(784..=MAX_FRAME_PIXELS).contains(&p)) {
            v.fail(&name("snapshot_max_pixels"), &format!("must be between 784 and {MAX_FRAME_PIXELS}"));
        }
        if s.snapshot_keep == 0 {
            v.fail(&name("snapshot_keep"), "must be at least 1");
        }
        if !(0.0..=1.0).contains(&s.min_changed_fraction) {
            v.fail(&name("min_changed_fraction"), "must be between 0 and 1");
        }
        if !(s.reconnect_min_s > 0.0 && s.reconnect_min_s.is_finite()) {
            v.fail(&name("reconnect_min_s"), "must be > 0");
        } else if !(s.reconnect_max_s >= s.reconnect_min_s) {
            v.fail(&name("reconnect_max_s"), "must be >= reconnect_min_s");
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Stream and prompt names become MQTT topic levels and metric labels.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("is {} characters long; at most {MAX_NAME_CHARS}", name.chars().count()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!(
            "{name:?} contains {c:?}: use letters, digits, '-', '_' or '.' (it becomes an MQTT topic level)"
        ));
    }
    Ok(())
}

/// The closest candidate within a small edit distance.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------------
// Locating keys in the source
// ---------------------------------------------------------------------------------------------

/// One step of a key path such as `stream[1].prompts[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PathSeg<'k> {
    Key(&'k str),
    Index(usize),
}

/// Split a dotted key path (`stream[1].prompts[0]`) into steps.
fn path_segs(key: &str) -> Vec<PathSeg<'_>> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            out.push(PathSeg::Key(name));
        }
        for idx in pieces {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(PathSeg::Index(i));
            }
        }
    }
    out
}

struct Locator<'a> {
    text: &'a str,
    doc: &'a toml_edit::Document<&'a str>,
}

impl Locator<'_> {
    /// Whether `key` is written in the file (rather than defaulted).
    fn is_written(&self, key: &str) -> bool {
        let mut item = Some(self.doc.as_item());
        for seg in path_segs(key) {
            item = match seg {
                PathSeg::Key(k) => item.and_then(|it| it.get(k)),
                PathSeg::Index(i) => item.and_then(|it| it.get(i)),
            };
        }
        item.is_some()
    }

    /// Line and column of the value at `key`, or of its nearest ancestor that is written down
    /// (a default that was never written is reported at the table that would hold it).
    fn find(&self, key: &str) -> (usize, usize) {
        let mut best: Option<Range<usize>> = None;
        let mut item: Option<&toml_edit::Item> = Some(self.doc.as_item());
        for seg in path_segs(key) {
            let Some(cur) = item else { break };
            let (next, key_span) = match seg {
                PathSeg::Key(k) => {
                    let key_span = match cur {
                        toml_edit::Item::Table(t) => t.key(k).and_then(|k| k.span()),
                        toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => t.key(k).and_then(|k| k.span()),
                        _ => None,
                    };
                    (cur.get(k), key_span)
                }
                PathSeg::Index(i) => (cur.get(i), None),
            };
            // Tables have no value span of their own; their header key stands in.
            if let Some(s) = next.and_then(|n| n.span()).or(key_span) {
                best = Some(s);
            }
            item = next;
        }
        match best {
            Some(r) => line_col(self.text, r.start),
            None => (1, 1),
        }
    }
}

struct Validator<'a, 'b> {
    loc: &'a Locator<'b>,
    problems: Vec<Problem>,
}

impl Validator<'_, '_> {
    /// Report a problem with `key`, located where the file writes it.
    fn fail(&mut self, key: &str, message: &str) {
        self.fail_at(key, key, message);
    }

    /// Report a problem with `key`, located at `locate` (a more precise path inside it).
    fn fail_at(&mut self, locate: &str, key: &str, message: &str) {
        let (line, col) = self.loc.find(locate);
        self.problems.push(Problem { line, col, key: key.to_string(), message: message.to_string() });
    }
}

/// 1-based line and character column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, text[line_start..offset].chars().count() + 1)
}

/// Dotted key path of the innermost key/value whose span contains `offset`.
fn key_path_at(doc: &toml_edit::Document<&str>, offset: usize) -> Option<String> {
    fn walk(item: &toml_edit::Item, offset: usize, prefix: &str, best: &mut Option<String>) {
        match item {
            toml_edit::Item::Table(t) => {
                for (k, v) in t.iter() {
                    let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                    let key_hit = t.key(k).and_then(|key| key.span()).is_some_and(|s| s.contains(&offset));
                    let val_hit = v.span().is_some_and(|s| s.start <= offset && offset <= s.end);
                    if key_hit || val_hit {
                        *best = Some(path.clone());
                    }
                    walk(v, offset, &path, best);
                }
            }
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let path = format!("{prefix}[{i}]");
                    if t.span().is_some_and(|s| s.contains(&offset)) {
                        *best = Some(path.clone());
                    }
                    walk(&toml_edit::Item::Table(t.clone()), offset, &path, best);
                }
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                for (k, v) in t.iter() {
                    let path = format!("{prefix}.{k}");
                    if v.span().is_some_and(|s| s.start <= offset && offset <= s.end) {
                        *best = Some(path.clone());
                    }
                }
            }
            toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    if v.span().is_some_and(|s| s.start <= offset && offset <= s.end) {
                        *best = Some(format!("{prefix}[{i}]"));
                    }
                }
            }
            _ => {}
        }
    }
    let mut best = None;
    walk(doc.as_item(), offset, "", &mut best);
    best
}

/// For syntax errors (no document): the `key =` written on the error's line, if any.
fn key_path_in_line(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let end = text[offset..].find('\n').map(|i| offset + i).unwrap_or(text.len());
    let line = &text[start..end];
    match line.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.trim_start().starts_with('#') => k.trim().to_string(),
        _ => line.trim().trim_start_matches('[').trim_end_matches(']').trim().to_string(),
    }
}

/// Turn a serde/toml deserialisation error into a located problem, with "did you mean".
fn serde_problem(text: &str, doc: &toml_edit::Document<&str>, e: &toml::de::Error) -> Problem {
    let span = e.span();
    let (line, col) = span.as_ref().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    let mut message = e.message().trim().to_string();
    let mut key = span
        .as_ref()
        .and_then(|s| key_path_at(doc, s.start))
        .unwrap_or_else(|| "<root>".into());

    // serde: "unknown field `fsp`, expected one of `fps`, `window_seconds`" / "... expected `x`"
    //        "unknown variant `x`, expected one of ..."
    for what in ["unknown field", "unknown variant"] {
        if let Some(rest) = message.strip_prefix(&format!("{what} `")) {
            if let Some((word, expected)) = rest.split_once('`') {
                let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
                let word = word.to_string();
                if what == "unknown field" {
                    // The span covers the table; point at the offending key itself.
                    if let Some((l, c, k)) = find_key_in_span(text, doc, span.clone(), &word) {
                        return Problem {
                            line: l,
                            col: c,
                            key: k,
                            message: unknown_key_message(&word, &candidates),
                        };
                    }
                    if !key.ends_with(&word) {
                        key = if key == "<root>" { word.clone() } else { format!("{key}.{word}") };
                    }
                    message = unknown_key_message(&word, &candidates);
                } else if let Some(best) = did_you_mean(&word, candidates.iter().copied()) {
                    message.push_str(&format!(" (did you mean `{best}`?)"));
                }
            }
        }
    }
    if message.starts_with("missing field") {
        // A missing field is reported at the table that lacks it.
        if let Some(field) = message.split('`').nth(1) {
            if !key.ends_with(field) {
                message = format!("required key `{field}` is missing");
            }
        }
    }
    Problem { line, col, key, message }
}

fn unknown_key_message(word: &str, candidates: &[&str]) -> String {
    let mut m = format!("unknown key `{word}`");
    if let Some(best) = did_you_mean(word, candidates.iter().copied()) {
        m.push_str(&format!(" (did you mean `{best}`?)"));
    } else if !candidates.is_empty() {
        m.push_str(&format!("; expected one of {}", candidates.join(", ")));
    }
    m
}

/// Find the key named `word` whose span lies inside `span` (the enclosing table).
fn find_key_in_span(
    text: &str,
    doc: &toml_edit::Document<&str>,
    span: Option<Range<usize>>,
    word: &str,
) -> Option<(usize, usize, String)> {
    fn walk(item: &toml_edit::Item, prefix: &str, word: &str, span: &Option<Range<usize>>, out: &mut Vec<(usize, String)>) {
        let visit_table = |t: &toml_edit::Table, prefix: &str, out: &mut Vec<(usize, String)>| {
            for (k, v) in t.iter() {
                let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                if k == word {
                    if let Some(s) = t.key(k).and_then(|key| key.span()) {
                        if span.as_ref().is_none_or(|sp| sp.start <= s.start && s.start <= sp.end) {
                            out.push((s.start, path.clone()));
                        }
                    }
                }
                walk(v, &path, word, span, out);
            }
        };
        match item {
            toml_edit::Item::Table(t) => visit_table(t, prefix, out),
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    visit_table(t, &format!("{prefix}[{i}]"), out);
                }
            }
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                for (k, _) in t.iter() {
                    if k == word {
                        if let Some(s) = t.key(k).and_then(|key| key.span()) {
                            out.push((s.start, format!("{prefix}.{k}")));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(doc.as_item(), "", word, &span, &mut out);
    out.sort();
    let (off, path) = out.into_iter().next()?;
    let (l, c) = line_col(text, off);
    Some((l, c, path))
}

// ---------------------------------------------------------------------------------------------
// The commented example
// ---------------------------------------------------------------------------------------------

/// A complete, commented example configuration (what `vigil print-config` prints). It passes
/// `vigil check` as is.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/vigil.example.toml");

#[cfg(test)]
mod tests;
