//! The TOML configuration: the schema and its defaults (`validate.rs` loads and checks a file,
//! `locate.rs` finds keys in its source, `redact.rs` keeps secrets out of messages).
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
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod locate;
mod redact;
mod validate;

pub use redact::redact_uri;
pub use validate::did_you_mean;

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
    /// Attention kernels: fused where verified on a GPU (`auto`), always verified fused, or the
    /// reference matmul path (see `model::fused`).
    pub attention: AttentionMode,
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
            attention: AttentionMode::Auto,
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

impl Device {
    /// What a command runs in when no dtype is given: bf16 on a GPU (as the checkpoints are
    /// trained and served), f32 on the CPU (which has no fast bf16 arithmetic).
    pub fn default_dtype(self) -> DType {
        match self {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::Bf16,
        }
    }
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
        match self {
            Device::Cpu => *other == "cpu",
            Device::Cuda(n) => other.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) == Some(*n),
        }
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

/// `[model] attention`: which attention implementation runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    /// The fused kernels that passed their self-check, on a GPU; the reference elsewhere.
    #[default]
    Auto,
    /// The fused kernels that passed their self-check, on any device (the CPU runs their
    /// plain-Rust twin: for testing).
    Fused,
    /// The reference matmul–softmax–matmul path only.
    Reference,
}

impl AttentionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionMode::Auto => "auto",
            AttentionMode::Fused => "fused",
            AttentionMode::Reference => "reference",
        }
    }
}

impl std::str::FromStr for AttentionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AttentionMode::Auto),
            "fused" => Ok(AttentionMode::Fused),
            "reference" => Ok(AttentionMode::Reference),
            _ => Err(format!("expected auto, fused or reference, got {s:?}")),
        }
    }
}

impl fmt::Display for AttentionMode {
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

impl EngineConfig {
    /// `max_batch` and `max_batch_tokens` when `[model] device` is a GPU and the file sets
    /// neither: one batch holds 8 streams × 2 prompts of 16-frame 448×448 windows (4096 visual
    /// tokens each before pruning, plus text). The CPU defaults stay small.
    pub const GPU_MAX_BATCH: usize = 16;
    pub const GPU_MAX_BATCH_TOKENS: usize = 40960;
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
    attention: AttentionMode,
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
            attention: m.attention,
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
            attention: self.attention,
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

impl Config {
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
        let stream_secrets = self
            .streams
            .iter()
            .filter_map(|s| Some((format!("stream {:?} password_file", s.name), s.password_file.as_ref()?)));
        for (what, p) in secrets.chain(stream_secrets) {
            let full = self.resolve_path(p);
            if world_readable(&full) {
                w.push(format!("{what}: {} is readable by every user (chmod 600 or 640 it)", full.display()));
            }
        }
        w
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

// ---------------------------------------------------------------------------------------------
// The commented example
// ---------------------------------------------------------------------------------------------

/// A complete, commented example configuration (what `vigil print-config` prints). It passes
/// `vigil check` as is.
pub const EXAMPLE_CONFIG: &str = include_str!("../../config/vigil.example.toml");

#[cfg(test)]
mod tests;
