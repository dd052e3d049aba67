//! The element: properties ([`Settings`]), what lives between `start()` and `stop()`
//! ([`State`]: the shared engine, the sampler, the windower, the worker), and the streaming
//! thread's work — sample a frame, convert it to RGB at the model's input size, close windows
//! and queue them for the worker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer::subclass::prelude::*;
use gstreamer_base as gst_base;
use gstreamer_base::subclass::prelude::*;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use vigil::config::{DType, GapPolicy, PromptConfig, PromptKind, StreamDefaults};
use vigil::engine::VideoInput;
use vigil::lock::lock;
use vigil::window::{Frame, Window, WindowSpec, Windower};

use super::engines::{self, EngineKey, Lease};
use super::sampler::Sampler;
use super::text::TextOut;
use super::worker::{self, Outlet, Pending, Shared, TextTimestamps};

pub static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new("vigilvlm", gst::DebugColorFlags::empty(), Some("VideoLLaMA3 answers about video windows"))
});

const DEFAULT_PROMPT: &str = "Describe what happens in the video.";
/// The most prompts one element asks per window.
const MAX_PROMPTS: usize = 16;
/// A window whose frames are mostly missing is not worth asking about; frames per window at most
/// (the daemon's bound).
const MAX_WINDOW_FRAMES: f64 = vigil::config::MAX_WINDOW_FRAMES;

/// Properties, as set (read when the element starts; prompts also while it plays).
#[derive(Debug, Clone)]
struct Settings {
    model: Option<PathBuf>,
    device: String,
    dtype: String,
    prompt: String,
    prompts_json: String,
    /// The `prompts` list as last parsed successfully, and why the last value was refused.
    prompts: Vec<PromptConfig>,
    prompts_error: Option<String>,
    fps: f64,
    window_seconds: f64,
    stride_seconds: f64,
    max_new_tokens: u32,
    pruning: bool,
    pruning_threshold: f64,
    max_frame_pixels: u64,
    queue_size: u32,
    eos_timeout_s: f64,
    text_timestamps: TextTimestamps,
}

impl Default for Settings {
    fn default() -> Self {
        let d = StreamDefaults::default();
        let m = vigil::config::ModelConfig::default();
        let p = vigil::config::PruningConfig::default();
        Settings {
            model: None,
            device: m.device.to_string(),
            dtype: "bf16".into(),
            prompt: DEFAULT_PROMPT.into(),
            prompts_json: String::new(),
            prompts: Vec::new(),
            prompts_error: None,
            fps: d.fps,
            window_seconds: d.window_seconds,
            stride_seconds: d.stride_seconds,
            max_new_tokens: m.max_new_tokens as u32,
            pruning: p.enabled,
            pruning_threshold: p.threshold,
            max_frame_pixels: d.max_frame_pixels,
            queue_size: vigil::config::EngineConfig::default().queue_capacity as u32,
            eos_timeout_s: 120.0,
            text_timestamps: TextTimestamps::Window,
        }
    }
}

impl Settings {
    /// The prompts asked about each window: the `prompts` list, else the single `prompt`.
    fn questions(&self) -> Vec<PromptConfig> {
        let mut list = if self.prompts.is_empty() {
            vec![prompt_config("prompt", &self.prompt, PromptKind::Caption)]
        } else {
            self.prompts.clone()
        };
        for p in &mut list {
            p.max_new_tokens.get_or_insert(self.max_new_tokens as usize);
        }
        list
    }
}

fn prompt_config(name: &str, text: &str, kind: PromptKind) -> PromptConfig {
    let json = serde_json::json!({ "name": name, "text": text, "kind": kind });
    serde_json::from_value(json).expect("a name, a text and a kind make a prompt")
}

/// `prompts`: a JSON list of `{name, text, kind}` (kind: caption | alert | json; optional
/// `every`, `max_new_tokens`), checked as the daemon checks its config.
fn parse_prompts(s: &str) -> Result<Vec<PromptConfig>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<PromptConfig> = serde_json::from_str(s).map_err(|e| format!("prompts: {e}"))?;
    if list.len() > MAX_PROMPTS {
        return Err(format!("prompts: {} prompts, at most {MAX_PROMPTS}", list.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &list {
        let chars = p.name.chars().count();
        if chars == 0 || chars > vigil::config::MAX_NAME_CHARS {
            return Err(format!(
                "prompts: name {:?} must have 1 to {} characters",
                p.name,
                vigil::config::MAX_NAME_CHARS
            ));
        }
        if p.text.trim().is_empty() || p.text.chars().count() > vigil::config::MAX_PROMPT_CHARS {
            return Err(format!(
                "prompts: {}: text must have 1 to {} characters",
                p.name,
                vigil::config::MAX_PROMPT_CHARS
            ));
        }
        if p.every == 0 {
            return Err(format!("prompts: {}: every must be at least 1", p.name));
        }
        if !seen.insert(p.name.as_str()) {
            return Err(format!("prompts: name {:?} appears twice", p.name));
        }
    }
    Ok(list)
}

fn dtype_of(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::Bf16),
        _ => Err(format!("dtype: expected f32, f16 or bf16, got {s:?}")),
    }
}

/// The input format and its conversion to packed RGB (none when it is RGB already).
struct Input {
    info: gst_video::VideoInfo,
    rgb: Option<(gst_video::VideoConverter, gst_video::VideoInfo)>,
    /// The model's input size for this frame size.
    target: (usize, usize),
}

/// Everything between `start()` and `stop()`.
struct State {
    engine: Lease,
    video: VideoInput,
    frames_per_window: usize,
    max_frame_pixels: u64,
    fps: f64,
    input: Option<Input>,
    segment: gst::FormattedSegment<gst::ClockTime>,
    sampler: Sampler<gst::Buffer>,
    spec: WindowSpec,
    windower: Windower,
    /// Window numbers continue across segments (a windower starts at 0).
    next_seq: u64,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    key: String,
    text: TextOut,
}

pub struct VigilVlm {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    text_pad: OnceLock<gst::Pad>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

#[glib::object_subclass]
impl ObjectSubclass for VigilVlm {
    const NAME: &'static str = "GstVigilVlm";
    type Type = super::VigilVlm;
    type ParentType = gst_base::BaseTransform;

    fn new() -> Self {
        VigilVlm { settings: Mutex::new(Settings::default()), state: Mutex::new(None), text_pad: OnceLock::new() }
    }
}

impl ObjectImpl for VigilVlm {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let d = Settings::default();
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Checkpoint directory (Hugging Face layout: config.json, safetensors, tokenizer, processor)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("cpu, cuda or cuda:N")
                    .default_value(Some(d.device.as_str()))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("dtype")
                    .nick("Data type")
                    .blurb("f32, f16 or bf16")
                    .default_value(Some(d.dtype.as_str()))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("prompt")
                    .nick("Prompt")
                    .blurb("The question asked about each window (when prompts is empty); changeable while playing")
                    .default_value(Some(DEFAULT_PROMPT))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("prompts")
                    .nick("Prompts")
                    .blurb("Several questions, as a JSON list of {\"name\", \"text\", \"kind\": caption|alert|json}; overrides prompt; changeable while playing")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("fps")
                    .nick("Frames per second")
                    .blurb("Frames sampled per second of stream time")
                    .minimum(0.01)
                    .maximum(vigil::config::MAX_FPS)
                    .default_value(d.fps)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("window-seconds")
                    .nick("Window length")
                    .blurb("Seconds of video per window")
                    .minimum(0.01)
                    .maximum(3600.0)
                    .default_value(d.window_seconds)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("stride-seconds")
                    .nick("Window stride")
                    .blurb("Seconds between window starts (less than window-seconds: overlapping windows)")
                    .minimum(0.01)
                    .maximum(3600.0)
                    .default_value(d.stride_seconds)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-new-tokens")
                    .nick("Answer length")
                    .blurb("Most tokens generated per answer (a prompt's own max_new_tokens wins)")
                    .minimum(1)
                    .maximum(4096)
                    .default_value(d.max_new_tokens)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("pruning")
                    .nick("Pruning")
                    .blurb("Drop video tokens that did not change since the previous frame")
                    .default_value(d.pruning)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("pruning-threshold")
                    .nick("Pruning threshold")
                    .blurb("Mean absolute pixel difference (0-255) under which a video token is dropped")
                    .minimum(0.0)
                    .maximum(255.0)
                    .default_value(d.pruning_threshold)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("max-frame-pixels")
                    .nick("Frame size bound")
                    .blurb("Frames the model cannot take at their size are scaled to at most this many pixels")
                    .minimum(1)
                    .maximum(vigil::config::MAX_FRAME_PIXELS)
                    .default_value(d.max_frame_pixels)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("queue-size")
                    .nick("Queue size")
                    .blurb("Windows waiting for the model at most; beyond it the oldest is dropped")
                    .minimum(1)
                    .maximum(4096)
                    .default_value(d.queue_size)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("eos-timeout")
                    .nick("EOS timeout")
                    .blurb("Seconds EOS waits for the answers of the pending windows")
                    .minimum(0.0)
                    .maximum(86400.0)
                    .default_value(d.eos_timeout_s)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("text-timestamps", d.text_timestamps)
                    .nick("Text timestamps")
                    .blurb("window: text buffers span their window; arrival: they start at the video position when the answer arrives and last one stride (captions burned in live by textoverlay)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("windows").nick("Windows").blurb("Windows closed so far").read_only().build(),
                glib::ParamSpecUInt64::builder("windows-dropped")
                    .nick("Windows dropped")
                    .blurb("Windows dropped unanswered (queue full, flush, engine refused)")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("answers").nick("Answers").blurb("Answers posted so far").read_only().build(),
                glib::ParamSpecUInt::builder("engine-users")
                    .nick("Engine users")
                    .blurb("Elements sharing this element's engine (0 when stopped)")
                    .read_only()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = lock(&self.settings);
        match pspec.name() {
            "model" => s.model = value.get::<Option<String>>().expect("type checked upstream").map(PathBuf::from),
            "device" => s.device = value.get::<Option<String>>().expect("type checked upstream").unwrap_or_default(),
            "dtype" => s.dtype = value.get::<Option<String>>().expect("type checked upstream").unwrap_or_default(),
            "prompt" => s.prompt = value.get::<Option<String>>().expect("type checked upstream").unwrap_or_default(),
            "prompts" => {
                let text = value.get::<Option<String>>().expect("type checked upstream").unwrap_or_default();
                match parse_prompts(&text) {
                    Ok(list) => {
                        s.prompts = list;
                        s.prompts_error = None;
                    }
                    Err(e) => {
                        gst::error!(CAT, imp = self, "{e}; keeping the previous prompts");
                        s.prompts_error = Some(e);
                    }
                }
                s.prompts_json = text;
            }
            "fps" => s.fps = value.get().expect("type checked upstream"),
            "window-seconds" => s.window_seconds = value.get().expect("type checked upstream"),
            "stride-seconds" => s.stride_seconds = value.get().expect("type checked upstream"),
            "max-new-tokens" => s.max_new_tokens = value.get().expect("type checked upstream"),
            "pruning" => s.pruning = value.get().expect("type checked upstream"),
            "pruning-threshold" => s.pruning_threshold = value.get().expect("type checked upstream"),
            "max-frame-pixels" => s.max_frame_pixels = value.get().expect("type checked upstream"),
            "queue-size" => s.queue_size = value.get().expect("type checked upstream"),
            "eos-timeout" => s.eos_timeout_s = value.get().expect("type checked upstream"),
            "text-timestamps" => s.text_timestamps = value.get().expect("type checked upstream"),
            other => unreachable!("no property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let counter = |f: fn(&Shared) -> &AtomicU64| -> u64 {
            lock(&self.state).as_ref().map(|st| f(&st.shared).load(Ordering::Relaxed)).unwrap_or(0)
        };
        let s = lock(&self.settings);
        match pspec.name() {
            "model" => s.model.as_ref().map(|p| p.to_string_lossy().into_owned()).to_value(),
            "device" => s.device.to_value(),
            "dtype" => s.dtype.to_value(),
            "prompt" => s.prompt.to_value(),
            "prompts" => s.prompts_json.to_value(),
            "fps" => s.fps.to_value(),
            "window-seconds" => s.window_seconds.to_value(),
            "stride-seconds" => s.stride_seconds.to_value(),
            "max-new-tokens" => s.max_new_tokens.to_value(),
            "pruning" => s.pruning.to_value(),
            "pruning-threshold" => s.pruning_threshold.to_value(),
            "max-frame-pixels" => s.max_frame_pixels.to_value(),
            "queue-size" => s.queue_size.to_value(),
            "eos-timeout" => s.eos_timeout_s.to_value(),
            "text-timestamps" => s.text_timestamps.to_value(),
            "windows" => counter(|sh| &sh.counters.windows).to_value(),
            "windows-dropped" => counter(|sh| &sh.counters.windows_dropped).to_value(),
            "answers" => counter(|sh| &sh.counters.answers).to_value(),
            "engine-users" => lock(&self.state).as_ref().map(|st| st.engine.users() as u32).unwrap_or(0).to_value(),
            other => unreachable!("no property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        let templ = obj.pad_template("text").expect("the class has a text pad template");
        let pad = gst::Pad::builder_from_template(&templ).name("text").build();
        obj.add_pad(&pad).expect("a new element has no text pad yet");
        let _ = self.text_pad.set(pad);
    }
}

impl GstObjectImpl for VigilVlm {}

impl ElementImpl for VigilVlm {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "VideoLLaMA3 video questions",
                "Filter/Analyzer/Video",
                "Asks VideoLLaMA3 questions about windows of the video (passed through unchanged); posts each answer as a \
                 vigilvlm-answer element message and pushes it on the text pad",
                "vigil",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let video = gst_video::VideoCapsBuilder::new()
                .format_list([
                    gst_video::VideoFormat::Rgb,
                    gst_video::VideoFormat::Rgbx,
                    gst_video::VideoFormat::Bgrx,
                    gst_video::VideoFormat::I420,
                    gst_video::VideoFormat::Nv12,
                ])
                .build();
            let text = gst::Caps::builder("text/x-raw").field("format", "utf8").build();
            vec![
                gst::PadTemplate::new("sink", gst::PadDirection::Sink, gst::PadPresence::Always, &video)
                    .expect("valid template"),
                gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &video)
                    .expect("valid template"),
                gst::PadTemplate::new("text", gst::PadDirection::Src, gst::PadPresence::Always, &text)
                    .expect("valid template"),
            ]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseTransformImpl for VigilVlm {
    const MODE: gst_base::subclass::BaseTransformMode = gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = true;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = true;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let s = lock(&self.settings).clone();
        let Some(model) = s.model.clone() else {
            return Err(gst::error_msg!(
                gst::ResourceError::NotFound,
                ("vigilvlm: the model property is not set (a checkpoint directory)")
            ));
        };
        if let Some(e) = &s.prompts_error {
            return Err(gst::error_msg!(gst::ResourceError::Settings, ("vigilvlm: {}", e)));
        }
        let bad = |msg: String| gst::error_msg!(gst::ResourceError::Settings, ("vigilvlm: {}", msg));
        let dtype = dtype_of(&s.dtype).map_err(bad)?;
        let spec = WindowSpec::new(s.fps, s.window_seconds, s.stride_seconds, GapPolicy::Emit)
            .map_err(|e| bad(e.to_string()))?;
        let frames_per_window = (s.fps * s.window_seconds + 1e-9).floor().max(1.0);
        if frames_per_window > MAX_WINDOW_FRAMES {
            return Err(bad(format!(
                "fps × window-seconds = {frames_per_window} frames per window, at most {MAX_WINDOW_FRAMES}"
            )));
        }
        let model = std::fs::canonicalize(&model).unwrap_or(model);
        let key = EngineKey {
            model: model.clone(),
            device: s.device.clone(),
            dtype: s.dtype.clone(),
            pruning: s.pruning,
            threshold_bits: s.pruning_threshold.to_bits(),
        };
        let defaults = StreamDefaults {
            fps: s.fps,
            window_seconds: s.window_seconds,
            stride_seconds: s.stride_seconds,
            max_frame_pixels: s.max_frame_pixels,
            ..StreamDefaults::default()
        };
        let cfg = engines::engine_config(&key, dtype, defaults).map_err(bad)?;
        let engine = engines::acquire(&key, &cfg).map_err(|e| {
            gst::error_msg!(
                gst::ResourceError::OpenRead,
                ("vigilvlm: cannot load the model {}: {}", model.display(), e)
            )
        })?;
        let video =
            engine.engine.video_input().ok_or_else(|| bad("the engine did not report its video input".into()))?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let obj = self.obj();
        let stream = obj.name().to_string();
        let key = format!("{stream}#{id}");
        let shared = Shared::new(s.queue_size as usize);
        let text = TextOut::start(self.text_pad.get().expect("constructed").clone(), &format!("vigilvlm-text-{id}"))
            .map_err(|e| gst::error_msg!(gst::CoreError::Failed, ("vigilvlm: cannot start a thread: {}", e)))?;
        let outlet = Outlet {
            element: obj.downgrade(),
            text: text.clone(),
            timestamps: s.text_timestamps,
            stride: gst::ClockTime::from_nseconds((s.stride_seconds * 1e9).round() as u64),
            stream: stream.clone(),
            key: key.clone(),
            fps: s.fps,
        };
        let (sh, en) = (shared.clone(), engine.shared());
        let worker = std::thread::Builder::new()
            .name(format!("vigilvlm-{id}"))
            .spawn(move || worker::run(sh, en, outlet))
            .map_err(|e| gst::error_msg!(gst::CoreError::Failed, ("vigilvlm: cannot start a thread: {}", e)))?;
        gst::info!(
            CAT,
            imp = self,
            "model {} on {} ({}); {} frames per window",
            model.display(),
            s.device,
            s.dtype,
            frames_per_window
        );
        *lock(&self.state) = Some(State {
            engine,
            video,
            frames_per_window: frames_per_window as usize,
            max_frame_pixels: s.max_frame_pixels,
            fps: s.fps,
            input: None,
            segment: gst::FormattedSegment::new(),
            sampler: Sampler::new(s.fps, vigil::source::pipeline::max_duplication(s.fps).as_secs_f64()),
            spec,
            windower: Windower::new(stream, spec),
            next_seq: 0,
            shared,
            worker: Some(worker),
            key,
            text,
        });
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        let Some(mut st) = lock(&self.state).take() else { return Ok(()) };
        st.shared.abandon();
        st.engine.engine.forget_stream(&st.key);
        if let Some(h) = st.worker.take() {
            let _ = h.join();
        }
        st.text.stop();
        let (windows, dropped, answers) = (
            st.shared.counters.windows.load(Ordering::Relaxed),
            st.shared.counters.windows_dropped.load(Ordering::Relaxed),
            st.shared.counters.answers.load(Ordering::Relaxed),
        );
        gst::info!(CAT, imp = self, "stopped: {windows} windows, {answers} answers, {dropped} windows dropped");
        // The last element using the engine shuts it down here (in-flight work finishes first,
        // within the engine's shutdown timeout).
        drop(st);
        Ok(())
    }

    fn set_caps(&self, incaps: &gst::Caps, _outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_video::VideoInfo::from_caps(incaps)
            .map_err(|_| gst::loggable_error!(CAT, "not raw video: {}", incaps))?;
        let mut guard = lock(&self.state);
        let Some(st) = guard.as_mut() else { return Err(gst::loggable_error!(CAT, "caps before start")) };
        let (w, h) = (info.width() as usize, info.height() as usize);
        let target = match st.video.target(h, w, st.frames_per_window) {
            Some(t) => t,
            None => {
                let (fw, fh) = vigil::source::fit_size(w as u32, h as u32, (1, 1), st.max_frame_pixels);
                gst::warning!(
                    CAT,
                    imp = self,
                    "the model cannot take {w}x{h} frames as they are; they are scaled to {fw}x{fh}"
                );
                (fh as usize, fw as usize)
            }
        };
        let rgb = if info.format() == gst_video::VideoFormat::Rgb {
            None
        } else {
            let out = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, info.width(), info.height())
                .fps(info.fps())
                .interlace_mode(info.interlace_mode())
                .build()
                .map_err(|e| gst::loggable_error!(CAT, "RGB video info: {}", e))?;
            let conv = gst_video::VideoConverter::new(&info, &out, None)
                .map_err(|e| gst::loggable_error!(CAT, "converter to RGB: {}", e))?;
            Some((conv, out))
        };
        st.input = Some(Input { info, rgb, target });
        Ok(())
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        let text = lock(&self.state).as_ref().map(|st| st.text.clone());
        match event.view() {
            gst::EventView::StreamStart(s) => {
                if let Some(text) = &text {
                    let id = format!("{}/vigilvlm-text", s.stream_id());
                    let group = s.group_id().unwrap_or_else(gst::GroupId::next);
                    text.event(gst::event::StreamStart::builder(&id).group_id(group).build());
                    text.event(gst::event::Caps::new(
                        &gst::Caps::builder("text/x-raw").field("format", "utf8").build(),
                    ));
                }
            }
            gst::EventView::Segment(seg) => {
                if let Some(time) = seg.segment().downcast_ref::<gst::ClockTime>() {
                    self.new_segment(time.clone());
                }
                if let Some(text) = &text {
                    text.event(event.clone());
                }
            }
            gst::EventView::FlushStart(_) => {
                if let Some(st) = lock(&self.state).as_ref() {
                    st.shared.set_flushing(true);
                }
                if let Some(text) = &text {
                    text.flush_start(event.clone());
                }
            }
            gst::EventView::FlushStop(_) => {
                self.flush();
                if let Some(text) = &text {
                    text.event(event.clone());
                }
            }
            gst::EventView::Gap(_) => {
                if let Some(text) = &text {
                    text.event(event.clone());
                }
            }
            gst::EventView::Eos(_) => {
                // Every answer is posted (and its text queued) before EOS, on both pads.
                self.drain();
                if let Some(text) = &text {
                    text.event(gst::event::Eos::new());
                }
            }
            _ => {}
        }
        self.parent_sink_event(event)
    }

    fn transform_ip_passthrough(&self, buf: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.sample(buf);
        Ok(gst::FlowSuccess::Ok)
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        // Only reached if upstream forces a writable path; the frame is read, never changed.
        self.sample(&buf.copy());
        Ok(gst::FlowSuccess::Ok)
    }
}

impl VigilVlm {
    /// A video buffer: feed the sampler; convert the frames it picks; queue closed windows.
    fn sample(&self, buf: &gst::Buffer) {
        let mut guard = lock(&self.state);
        let Some(st) = guard.as_mut() else { return };
        let Some(pts) = buf.pts() else {
            gst::debug!(CAT, imp = self, "buffer without a timestamp: not sampled");
            return;
        };
        st.shared.last_pts.store(pts.nseconds(), Ordering::Relaxed);
        // The text stream keeps up with the video, so a textoverlay waiting for text
        // (its default) never holds the video back for an answer.
        if st.text.is_linked() {
            st.text.event(gst::event::Gap::builder(pts).duration(buf.duration()).build());
        }
        let Some(t) = st.segment.to_stream_time(pts) else { return };
        for (slot, picked) in st.sampler.push(t.nseconds() as f64 / 1e9, buf.clone()) {
            let Some(input) = &st.input else { return };
            let (data, w, h) = match rgb_frame(&picked, input) {
                Ok(f) => f,
                Err(e) => {
                    gst::element_imp_warning!(self, gst::StreamError::Decode, ("vigilvlm: frame not sampled: {}", e));
                    continue;
                }
            };
            let (data, w, h) = vigil::source::to_model_size(data, w, h, Some(input.target), st.max_frame_pixels);
            let frame = Frame {
                width: w as u32,
                height: h as u32,
                data,
                slot,
                time_s: slot as f64 / st.fps,
                captured_at: SystemTime::now(),
            };
            let windows = st.windower.push(Arc::new(frame));
            for w in windows {
                self.queue_window(st, w);
            }
        }
    }

    /// A closed window: number it, attach the prompts due for it, hand it to the worker.
    fn queue_window(&self, st: &mut State, mut w: Window) {
        w.seq = st.next_seq;
        st.next_seq += 1;
        let prompts: Vec<PromptConfig> =
            lock(&self.settings).questions().into_iter().filter(|p| w.seq.is_multiple_of(p.every.max(1))).collect();
        if prompts.is_empty() || w.frames.is_empty() {
            return;
        }
        let to_pts = |s: f64| {
            st.segment.position_from_stream_time(gst::ClockTime::from_nseconds((s.max(0.0) * 1e9).round() as u64))
        };
        let pts = to_pts(w.first_time_s());
        let end = to_pts(w.last_time_s() + 1.0 / st.fps);
        let duration = match (pts, end) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        };
        let seq = w.seq;
        let pending = Pending { window: Arc::new(w), prompts, closed_at: Instant::now(), pts, duration };
        if let Some(old) = st.shared.push(pending) {
            worker::announce_drop(&self.obj(), old.window.seq, "queue_full");
        }
        gst::debug!(CAT, imp = self, "window {seq} queued");
    }

    /// A new time segment: windows so far are closed as they are; sampling starts over.
    fn new_segment(&self, seg: gst::FormattedSegment<gst::ClockTime>) {
        let mut guard = lock(&self.state);
        let Some(st) = guard.as_mut() else { return };
        let rest = st.windower.finish();
        for w in rest {
            self.queue_window(st, w);
        }
        st.segment = seg;
        st.sampler.reset();
        st.windower = Windower::new(self.obj().name().to_string(), st.spec);
    }

    /// After a flush: the windows waiting for the model are about the old position; drop them
    /// (counted), and start sampling over.
    fn flush(&self) {
        let mut guard = lock(&self.state);
        let Some(st) = guard.as_mut() else { return };
        let n = st.shared.clear();
        st.engine.engine.forget_stream(&st.key);
        st.sampler.reset();
        st.windower = Windower::new(self.obj().name().to_string(), st.spec);
        st.shared.set_flushing(false);
        if n > 0 {
            gst::info!(CAT, imp = self, "flush: dropped {n} queued windows");
        }
    }

    /// EOS: close the last (partial) window and wait, bounded, for every answer.
    fn drain(&self) {
        let (shared, timeout) = {
            let mut guard = lock(&self.state);
            let Some(st) = guard.as_mut() else { return };
            for w in st.windower.finish() {
                self.queue_window(st, w);
            }
            (st.shared.clone(), lock(&self.settings).eos_timeout_s)
        };
        let t0 = Instant::now();
        if !shared.wait_idle(Duration::from_secs_f64(timeout)) {
            gst::warning!(
                CAT,
                imp = self,
                "EOS: answers still pending after {:.1} s; EOS goes on without them",
                t0.elapsed().as_secs_f64()
            );
        }
    }
}

/// Packed RGB bytes of a video buffer (converted when it is not RGB), tightly packed.
fn rgb_frame(buf: &gst::Buffer, input: &Input) -> Result<(Vec<u8>, usize, usize), String> {
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buf.as_ref(), &input.info)
        .map_err(|_| "cannot map the frame".to_string())?;
    let (w, h) = (input.info.width() as usize, input.info.height() as usize);
    let copy = |f: &gst_video::VideoFrameRef<&gst::BufferRef>| -> Result<Vec<u8>, String> {
        let stride = f.plane_stride()[0] as usize;
        let plane = f.plane_data(0).map_err(|_| "cannot read the RGB plane".to_string())?;
        vigil::source::packed_rgb(plane, stride, w, h).ok_or_else(|| format!("plane smaller than {w}x{h} RGB"))
    };
    let data = match &input.rgb {
        None => copy(&frame)?,
        Some((conv, out_info)) => {
            let mut out =
                gst::Buffer::with_size(out_info.size()).map_err(|_| "cannot allocate an RGB frame".to_string())?;
            {
                let out_ref = out.get_mut().expect("a new buffer is writable");
                let mut dest = gst_video::VideoFrameRef::from_buffer_ref_writable(out_ref, out_info)
                    .map_err(|_| "cannot map the RGB frame".to_string())?;
                conv.frame_ref(&frame, &mut dest);
            }
            let rgb = gst_video::VideoFrameRef::from_buffer_ref_readable(out.as_ref(), out_info)
                .map_err(|_| "cannot map the RGB frame".to_string())?;
            copy(&rgb)?
        }
    };
    Ok((data, w, h))
}
