//! Camera and file ingest through GStreamer: each stream becomes RGB frames at its `fps`, fed
//! into a [`crate::window::Windower`], with a supervisor that reconnects live sources forever.
//!
//! Reference: the GStreamer element docs (uridecodebin3, rtspsrc, videorate, appsink).
//!
//! * [`pipeline`] builds one attempt's pipeline: `uridecodebin3` (rtsp, http) or
//!   `filesrc`/`v4l2src ! decodebin3` → `videorate → videoconvert → videoscale →
//!   capsfilter(RGB, fps, size) → appsink`. Rate limiting comes first so conversion and scaling
//!   are only spent on kept frames.
//! * [`supervisor`] runs each stream on its own thread (bus loop, backoff) so one stream's
//!   failure never stalls another, and [`SourceManager`] adds/removes streams at run time.
//! * [`probe`] is the library side of `vigil probe`.

pub mod pipeline;
pub mod probe;
pub mod supervisor;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{redact_uri, SourceKind, StreamConfig, StreamDefaults};

pub use supervisor::{SourceManager, StreamStats};

/// Why a source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("GStreamer could not be initialised: {0}")]
    Init(#[source] gstreamer::glib::Error),
    #[error("stream {stream}: {message}")]
    Spec { stream: String, message: String },
    #[error("stream {0:?} already exists")]
    Duplicate(String),
    #[error("stream {stream}: cannot read password_file {path}: {source}")]
    PasswordFile {
        stream: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a thread for stream {stream}: {source}")]
    Thread {
        stream: String,
        #[source]
        source: std::io::Error,
    },
}

/// Initialise GStreamer once (idempotent).
pub fn init() -> Result<(), SourceError> {
    gstreamer::init().map_err(SourceError::Init)
}

/// What a supervisor needs to run one stream. `Debug` never shows the password.
#[derive(Clone)]
pub struct SourceSpec {
    pub name: String,
    /// As configured, less any `user:password@` (moved to `username`/`password`).
    pub uri: String,
    pub kind: SourceKind,
    pub username: Option<String>,
    pub password: Option<String>,
    pub settings: StreamDefaults,
    /// The model's input size for this stream's frames, when a model will read them: frames
    /// are then decoded at their native size and resized once, with the processor's own
    /// resize, so a buffered frame *is* the model input. Without it (`probe`), frames are
    /// scaled to `max_frame_pixels`.
    pub model_size: Option<ModelSize>,
}

/// (native height, width) → the model's input (height, width), or `None` if the model cannot
/// take such a frame at all.
pub type ModelSize = std::sync::Arc<dyn Fn(usize, usize) -> Option<(usize, usize)> + Send + Sync>;

impl fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceSpec")
            .field("name", &self.name)
            .field("uri", &self.redacted_uri())
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("settings", &self.settings)
            .field("model_size", &self.model_size.is_some())
            .finish()
    }
}

/// Split `user:password@` off a URI. GStreamer's elements log the URI they open (souphttpsrc
/// and rtspsrc do at level 3 and up), so credentials travel in their properties instead.
fn split_credentials(uri: &str) -> (String, Option<String>, Option<String>) {
    let Ok(mut u) = url::Url::parse(uri) else { return (uri.to_string(), None, None) };
    if u.username().is_empty() && u.password().is_none() {
        return (uri.to_string(), None, None);
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let user = Some(decode(u.username())).filter(|s| !s.is_empty());
    let pass = u.password().map(decode);
    if u.set_username("").is_err() || u.set_password(None).is_err() {
        return (uri.to_string(), None, None);
    }
    (u.to_string(), user, pass)
}

impl SourceSpec {
    /// From a configured stream; relative paths (file URIs, `password_file`) resolve against
    /// `base_dir` (the config file's directory).
    pub fn from_config(cfg: &StreamConfig, base_dir: &Path) -> Result<Self, SourceError> {
        let kind = SourceKind::of(&cfg.uri)
            .map_err(|m| SourceError::Spec { stream: cfg.name.clone(), message: format!("uri {}", redact_uri(&m)) })?;
        let uri = if kind == SourceKind::File && !cfg.uri.contains("://") && Path::new(&cfg.uri).is_relative() {
            base_dir.join(&cfg.uri).to_string_lossy().into_owned()
        } else {
            cfg.uri.clone()
        };
        let password = match &cfg.password_file {
            Some(p) => {
                let path = if p.is_absolute() { p.clone() } else { base_dir.join(p) };
                let text = crate::config::read_bounded(&path, crate::config::MAX_SECRET_BYTES).map_err(|source| {
                    SourceError::PasswordFile { stream: cfg.name.clone(), path: path.clone(), source }
                })?;
                Some(text.trim_end_matches(['\n', '\r']).to_string())
            }
            None => None,
        };
        let (uri, uri_user, uri_pass) = split_credentials(&uri);
        // The config's username/password_file win over credentials written in the URI.
        let (username, password) = match (cfg.username.clone(), password) {
            (None, None) => (uri_user, uri_pass),
            (user, pass) => (user.or(uri_user), pass.or(uri_pass)),
        };
        Ok(SourceSpec {
            name: cfg.name.clone(),
            uri,
            kind,
            username,
            password,
            settings: cfg.settings.clone(),
            model_size: None,
        })
    }

    /// A spec for a bare URI with the given settings (used by `vigil probe` and tests).
    pub fn from_uri(name: &str, uri: &str, settings: StreamDefaults) -> Result<Self, SourceError> {
        let kind = SourceKind::of(uri)
            .map_err(|m| SourceError::Spec { stream: name.to_string(), message: format!("uri {}", redact_uri(&m)) })?;
        let (uri, username, password) = split_credentials(uri);
        Ok(SourceSpec { name: name.to_string(), uri, kind, username, password, settings, model_size: None })
    }

    pub fn redacted_uri(&self) -> String {
        redact_uri(&self.uri)
    }

    /// Live sources reconnect forever; files end (or loop).
    pub fn is_live(&self) -> bool {
        matches!(self.kind, SourceKind::Rtsp | SourceKind::Http | SourceKind::V4l2)
    }

    /// Remove every trace of the credentials from a message (GStreamer errors quote URIs).
    pub fn scrub(&self, message: &str) -> String {
        let mut m = redact_uri(message);
        if let Some(p) = self.password.as_deref().filter(|p| p.len() >= 2) {
            m = m.replace(p, "***");
        }
        m
    }
}

/// Supervisor tuning that is not part of the config file.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Windows pending toward the consumer before the oldest is dropped.
    pub queue_capacity: usize,
    /// A live source that delivers no frame for this long is restarted (covers servers that
    /// vanish without closing the connection). `None`: `max(10 s, 3 frame periods)`.
    pub stall_timeout: Option<Duration>,
    /// The first frame of an attempt must arrive within this (connect + preroll).
    pub start_timeout: Duration,
    /// A run that streamed this long resets the backoff to `reconnect_min_s`.
    pub stable_after: Duration,
    /// Give up (state `failed`) after this many consecutive failed attempts; `None` = forever.
    pub max_retries: Option<u32>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            queue_capacity: 4,
            stall_timeout: None,
            start_timeout: Duration::from_secs(20),
            stable_after: Duration::from_secs(10),
            max_retries: None,
        }
    }
}

/// A stream's lifecycle state, as published by the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamState {
    /// Opening the source for the first time.
    Starting,
    /// Frames are flowing.
    Streaming,
    /// The last attempt failed (`error`); the next one starts after `delay`.
    Reconnecting { attempt: u32, delay: Duration, error: String },
    /// Stopped on request, or a file reached its end.
    Stopped,
    /// Gave up (a file that cannot be played, or retries exhausted).
    Failed { error: String },
}

impl StreamState {
    /// `starting`, `streaming`, `reconnecting`, `stopped` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StreamState::Starting => "starting",
            StreamState::Streaming => "streaming",
            StreamState::Reconnecting { .. } => "reconnecting",
            StreamState::Stopped => "stopped",
            StreamState::Failed { .. } => "failed",
        }
    }

    /// The GStreamer error text, for `reconnecting` and `failed`.
    pub fn error(&self) -> Option<&str> {
        match self {
            StreamState::Reconnecting { error, .. } | StreamState::Failed { error } => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamState::Reconnecting { attempt, delay, error } => {
                write!(f, "reconnecting (attempt {attempt}, in {:.1} s): {error}", delay.as_secs_f64())
            }
            StreamState::Failed { error } => write!(f, "failed: {error}"),
            s => f.write_str(s.as_str()),
        }
    }
}

/// The source's native video format, seen at the decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NativeCaps {
    /// Human name of the codec (`H.264`, `VP8`, ...), or the caps name when unknown.
    pub codec: String,
    /// Decoder input caps name, e.g. `video/x-h264` (empty when not found).
    pub codec_caps: String,
    pub width: u32,
    pub height: u32,
    /// Native frame rate as a fraction (0/1 when variable or unknown).
    pub framerate_num: i32,
    pub framerate_den: i32,
    /// Frame size after scaling to `max_frame_pixels`.
    pub out_width: u32,
    pub out_height: u32,
}

/// Something a stream reports.
#[derive(Debug, Clone)]
pub enum EventKind {
    State(StreamState),
    Caps(NativeCaps),
}

#[derive(Debug, Clone)]
pub struct SourceEvent {
    pub stream: String,
    pub at: SystemTime,
    pub kind: EventKind,
}

/// Output size for a `width × height` source with pixel aspect `par`, scaled (aspect kept) so
/// that it holds at most `max_pixels`; never upscaled, never below 1×1.
/// The tightly packed RGB bytes (`w × 3` per row) of a plane whose rows are `stride` bytes apart,
/// or `None` if the plane is too small for `w`x`h`.
pub fn packed_rgb(plane: &[u8], stride: usize, w: usize, h: usize) -> Option<Vec<u8>> {
    let row = w * 3;
    if stride < row || plane.len() < stride * (h.max(1) - 1) + row {
        return None;
    }
    let mut data = Vec::with_capacity(row * h);
    for y in 0..h {
        data.extend_from_slice(&plane[y * stride..y * stride + row]);
    }
    Some(data)
}

/// A native RGB frame resized to the model's input `target` (height, width) with the
/// processor's own resize (the one transformers' video processor uses), so the buffered frame is
/// the model input. `None` (a frame the model cannot take; the caller reports it) scales it to
/// `max_frame_pixels` instead, which keeps it bounded.
pub fn to_model_size(
    data: Vec<u8>,
    w: usize,
    h: usize,
    target: Option<(usize, usize)>,
    max_frame_pixels: u64,
) -> (Vec<u8>, usize, usize) {
    let (th, tw) = target.unwrap_or_else(|| {
        let (fw, fh) = fit_size(w as u32, h as u32, (1, 1), max_frame_pixels);
        (fh as usize, fw as usize)
    });
    if (th, tw) == (h, w) {
        return (data, w, h);
    }
    (crate::processor::resize::resize_torchvision_bicubic_u8(&data, h, w, 3, th, tw), tw, th)
}

pub fn fit_size(width: u32, height: u32, par: (i32, i32), max_pixels: u64) -> (u32, u32) {
    // Square pixels first: widen (or narrow) by the pixel aspect ratio.
    let (pn, pd) = if par.0 > 0 && par.1 > 0 { par } else { (1, 1) };
    let dw = (width as f64 * pn as f64 / pd as f64).max(1.0);
    let dh = (height as f64).max(1.0);
    let area = dw * dh;
    let scale = if area > max_pixels as f64 { (max_pixels as f64 / area).sqrt() } else { 1.0 };
    let mut w = (dw * scale).floor().max(1.0) as u32;
    let mut h = (dh * scale).floor().max(1.0) as u32;
    // Rounding can leave us one row/column over the budget.
    while (w as u64) * (h as u64) > max_pixels && (w > 1 || h > 1) {
        if w >= h {
            w -= 1;
        } else {
            h -= 1;
        }
    }
    (w, h)
}

/// Human codec name for a decoder's input caps name.
pub fn codec_name(caps_name: &str) -> String {
    match caps_name {
        "video/x-h264" => "H.264",
        "video/x-h265" => "H.265",
        "video/x-vp8" => "VP8",
        "video/x-vp9" => "VP9",
        "video/x-av1" => "AV1",
        "image/jpeg" => "MJPEG",
        "video/mpeg" => "MPEG video",
        "video/x-raw" => "raw",
        "video/x-theora" => "Theora",
        other => other,
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_size_keeps_aspect_and_budget() {
        assert_eq!(fit_size(320, 240, (1, 1), 200_704), (320, 240));
        let (w, h) = fit_size(1920, 1080, (1, 1), 200_704);
        assert!((w as u64) * (h as u64) <= 200_704);
        assert!(((w as f64 / h as f64) - 16.0 / 9.0).abs() < 0.01, "{w}x{h}");
        assert_eq!((w, h), (597, 336));
        // Anamorphic 720x576 with 16:15 pixels displays as 768x576.
        let (w, h) = fit_size(720, 576, (16, 15), 10_000_000);
        assert_eq!((w, h), (768, 576));
        assert_eq!(fit_size(100, 1, (1, 1), 784), (100, 1));
        assert_eq!(fit_size(10000, 10000, (1, 1), 784), (28, 28));
    }

    #[test]
    fn credentials_leave_the_uri() {
        let (uri, user, pass) = split_credentials("rtsp://ad%40min:p%3Ass@cam.local:554/live?x=1");
        assert_eq!(uri, "rtsp://cam.local:554/live?x=1");
        assert_eq!((user.as_deref(), pass.as_deref()), (Some("ad@min"), Some("p:ss")));
        let plain = "http://cam.local/mjpg";
        assert_eq!(split_credentials(plain), (plain.to_string(), None, None));
        let spec = SourceSpec::from_uri("c", "http://u:secret@cam.local/mjpg", StreamDefaults::default()).unwrap();
        assert!(!spec.uri.contains("secret") && spec.password.as_deref() == Some("secret"));
        assert_eq!(spec.scrub("GET http://cam.local/?secret failed"), "GET http://cam.local/?*** failed");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let dir = std::env::temp_dir().join(format!("vigil-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret\r\n").unwrap();
        let cfg = StreamConfig {
            name: "c".into(),
            uri: "clips/a.mp4".into(),
            prompts: vec![],
            enabled: true,
            username: Some("u".into()),
            password_file: Some("pw".into()),
            settings: StreamDefaults::default(),
        };
        let spec = SourceSpec::from_config(&cfg, &dir).unwrap();
        assert_eq!(Path::new(&spec.uri), dir.join("clips/a.mp4"));
        assert_eq!(spec.password.as_deref(), Some("s3cret"));
        assert!(!spec.is_live());
        let missing = StreamConfig { password_file: Some("nope".into()), ..cfg };
        assert!(matches!(SourceSpec::from_config(&missing, &dir), Err(SourceError::PasswordFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_and_scrub_hide_passwords() {
        let mut spec =
            SourceSpec::from_uri("cam", "rtsp://admin:hunter22@10.0.0.1/live", StreamDefaults::default()).unwrap();
        let dbg = format!("{spec:?}");
        assert!(!dbg.contains("hunter22"), "{dbg}");
        let m = spec.scrub("could not open rtsp://admin:hunter22@10.0.0.1/live (pw hunter22)");
        assert!(!m.contains("hunter22"), "{m}");
        spec.password = Some("filepass".into());
        assert!(!format!("{spec:?}").contains("filepass"));
        assert!(!spec.scrub("pw filepass").contains("filepass"));
    }
}
