//! Checkpoint discovery: processor settings, tokenizer and chat template from a model directory.
//!
//! Source of truth: transformers 5 `ProcessorMixin.get_processor_dict` / `from_pretrained`
//! (`processing_utils.py`) and the `__init__` of `VideoLlama3ImageProcessor` /
//! `VideoLlama3VideoProcessor` (class defaults, `min_pixels` / `max_pixels` overriding `size`).
//!
//! Layouts:
//! * transformers 5: `processor_config.json` with nested `image_processor` / `video_processor`
//!   objects using `size: {shortest_edge, longest_edge}`;
//! * older: `preprocessor_config.json` (image) + `video_preprocessor_config.json` (video) with
//!   `min_pixels` / `max_pixels`.
//!
//! Chat template, in transformers' order of preference: a `chat_template` key inside
//! `processor_config.json`, `chat_template.json` (legacy processor file), `chat_template.jinja`.
//! As a last resort the tokenizer's template from `tokenizer_config.json` is used (transformers'
//! processor itself would refuse to render in that case; we accept it and say so at debug level).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::ProcessorError;

/// Which resize implementation the image processor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeBackend {
    /// `VideoLlama3ImageProcessor` (default): torchvision antialiased bicubic on uint8.
    Torchvision,
    /// `VideoLlama3ImageProcessorPil`: Pillow bicubic.
    Pil,
}

/// Settings shared by the image and the video processor.
#[derive(Debug, Clone)]
pub struct ImageProcessorConfig {
    pub backend: ResizeBackend,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub do_convert_rgb: bool,
    /// `size.shortest_edge` (a pixel count, despite the name).
    pub min_pixels: usize,
    /// `size.longest_edge` (a pixel count; for videos, the budget of the whole clip).
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
}

impl ImageProcessorConfig {
    pub(crate) fn norm(&self) -> super::image::Norm {
        super::image::Norm {
            backend: self.backend,
            do_rescale: self.do_rescale,
            rescale_factor: self.rescale_factor,
            do_normalize: self.do_normalize,
            mean: self.image_mean,
            std: self.image_std,
        }
    }
}

/// Video processor settings (`VideoLlama3VideoProcessor`).
#[derive(Debug, Clone)]
pub struct VideoProcessorConfig {
    pub base: ImageProcessorConfig,
    pub min_frames: usize,
    pub max_frames: usize,
    pub use_token_compression: bool,
    pub do_sample_frames: bool,
    pub fps: Option<f64>,
    pub num_frames: Option<usize>,
}

/// Tokens and files found in a checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub image: ImageProcessorConfig,
    pub video: VideoProcessorConfig,
    pub chat_template: Option<String>,
    /// File the chat template was read from.
    pub chat_template_source: Option<PathBuf>,
    pub tokenizer_json: PathBuf,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_token: Option<String>,
    pub image_token: String,
    pub video_token: String,
}

fn read_json(path: &Path) -> Result<Option<Value>, ProcessorError> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| ProcessorError::File { path: path.into(), msg: e.to_string() })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ProcessorError::File { path: path.into(), msg: format!("invalid JSON: {e}") })?;
    if !v.is_object() {
        return Err(ProcessorError::File { path: path.into(), msg: "expected a JSON object".into() });
    }
    Ok(Some(v))
}

/// Typed getters that name the file and key on error.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
    prefix: &'a str,
}

impl Obj<'_> {
    fn bad(&self, key: &str, want: &str) -> ProcessorError {
        ProcessorError::File { path: self.file.into(), msg: format!("`{}{key}` must be {want}", self.prefix) }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn bool(&self, key: &str, default: bool) -> Result<bool, ProcessorError> {
        self.get(key).map_or(Ok(default), |v| v.as_bool().ok_or_else(|| self.bad(key, "a boolean")))
    }
    fn usize(&self, key: &str) -> Result<Option<usize>, ProcessorError> {
        self.get(key)
            .map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| self.bad(key, "a non-negative integer")))
            .transpose()
    }
    fn f64(&self, key: &str) -> Result<Option<f64>, ProcessorError> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.bad(key, "a number"))).transpose()
    }
    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3], ProcessorError> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => {
                let x = n.as_f64().ok_or_else(|| self.bad(key, "a number or 3 numbers"))?;
                Ok([x; 3])
            }
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut o = [0.0; 3];
                for (i, x) in a.iter().enumerate() {
                    o[i] = x.as_f64().ok_or_else(|| self.bad(key, "a number or 3 numbers"))?;
                }
                Ok(o)
            }
            Some(_) => Err(self.bad(key, "a number or 3 numbers")),
        }
    }
}

const IMAGENET_STANDARD: [f64; 3] = [0.5, 0.5, 0.5];

fn parse_image_like(
    map: &Map<String, Value>,
    file: &Path,
    prefix: &str,
    default_min: usize,
    default_max: usize,
    default_merge: usize,
) -> Result<ImageProcessorConfig, ProcessorError> {
    let o = Obj { map, file, prefix };
    // `size` first, then `min_pixels` / `max_pixels` override it (backward compatibility in
    // `VideoLlama3ImageProcessor.__init__`).
    let (mut min_pixels, mut max_pixels) = (default_min, default_max);
    if let Some(size) = o.get("size") {
        let s = size.as_object().ok_or_else(|| o.bad("size", "an object"))?;
        let so = Obj { map: s, file, prefix: &format!("{prefix}size.") };
        // Older files sometimes carry `size.min_pixels` / `size.max_pixels`.
        if let Some(v) = so.usize("shortest_edge")?.or(so.usize("min_pixels")?) {
            min_pixels = v;
        }
        if let Some(v) = so.usize("longest_edge")?.or(so.usize("max_pixels")?) {
            max_pixels = v;
        }
    }
    if let Some(v) = o.usize("min_pixels")? {
        min_pixels = v;
    }
    if let Some(v) = o.usize("max_pixels")? {
        max_pixels = v;
    }
    if min_pixels == 0 || max_pixels == 0 {
        return Err(o.bad("size", "non-zero shortest_edge and longest_edge"));
    }
    let ty = o.get("image_processor_type").and_then(|v| v.as_str()).unwrap_or("");
    let backend = if ty.ends_with("Pil") { ResizeBackend::Pil } else { ResizeBackend::Torchvision };
    if let Some(r) = o.usize("resample")? {
        // Only BICUBIC (3) is implemented; that is what every VideoLLaMA3 checkpoint uses.
        if r != 3 {
            return Err(o.bad("resample", "3 (bicubic), the only resampling vigil implements"));
        }
    }
    let cfg = ImageProcessorConfig {
        backend,
        do_resize: o.bool("do_resize", true)?,
        do_rescale: o.bool("do_rescale", true)?,
        rescale_factor: o.f64("rescale_factor")?.unwrap_or(1.0 / 255.0),
        do_normalize: o.bool("do_normalize", true)?,
        image_mean: o.triple("image_mean", IMAGENET_STANDARD)?,
        image_std: o.triple("image_std", IMAGENET_STANDARD)?,
        do_convert_rgb: o.bool("do_convert_rgb", true)?,
        min_pixels,
        max_pixels,
        patch_size: o.usize("patch_size")?.unwrap_or(14),
        temporal_patch_size: o.usize("temporal_patch_size")?.unwrap_or(1),
        merge_size: o.usize("merge_size")?.unwrap_or(default_merge),
    };
    if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
        return Err(o.bad("patch_size/merge_size/temporal_patch_size", "positive"));
    }
    if cfg.image_std.contains(&0.0) {
        return Err(o.bad("image_std", "non-zero"));
    }
    Ok(cfg)
}

fn parse_video(map: &Map<String, Value>, file: &Path, prefix: &str) -> Result<VideoProcessorConfig, ProcessorError> {
    let base = parse_image_like(map, file, prefix, 128 * 28 * 28, 28 * 28 * 768, 2)?;
    let o = Obj { map, file, prefix };
    Ok(VideoProcessorConfig {
        base,
        min_frames: o.usize("min_frames")?.unwrap_or(4),
        max_frames: o.usize("max_frames")?.unwrap_or(180),
        use_token_compression: o.bool("use_token_compression", true)?,
        do_sample_frames: o.bool("do_sample_frames", false)?,
        fps: o.f64("fps")?,
        num_frames: o.usize("num_frames")?,
    })
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl CheckpointFiles {
    /// Find and parse the processor files of a checkpoint directory.
    pub fn discover(dir: &Path) -> Result<Self, ProcessorError> {
        if !dir.is_dir() {
            return Err(ProcessorError::File { path: dir.into(), msg: "not a directory".into() });
        }
        let pc_path = dir.join("processor_config.json");
        let pre_path = dir.join("preprocessor_config.json");
        let vid_path = dir.join("video_preprocessor_config.json");
        let pc = read_json(&pc_path)?;
        let pc_obj = pc.as_ref().and_then(|v| v.as_object());
        let empty = Map::new();

        let image = match pc_obj.and_then(|o| o.get("image_processor")) {
            Some(Value::Object(m)) => parse_image_like(m, &pc_path, "image_processor.", 56 * 56, 28 * 28 * 1280, 1)?,
            Some(_) => return Err(ProcessorError::File { path: pc_path, msg: "`image_processor` must be an object".into() }),
            None => match read_json(&pre_path)? {
                Some(v) => parse_image_like(v.as_object().unwrap_or(&empty), &pre_path, "", 56 * 56, 28 * 28 * 1280, 1)?,
                None => {
                    return Err(ProcessorError::File {
                        path: dir.into(),
                        msg: "no image processor settings: expected processor_config.json with `image_processor` or preprocessor_config.json".into(),
                    })
                }
            },
        };
        let video = match pc_obj.and_then(|o| o.get("video_processor")) {
            Some(Value::Object(m)) => parse_video(m, &pc_path, "video_processor.")?,
            Some(_) => {
                return Err(ProcessorError::File { path: pc_path, msg: "`video_processor` must be an object".into() })
            }
            None => match read_json(&vid_path)? {
                Some(v) => parse_video(v.as_object().unwrap_or(&empty), &vid_path, "")?,
                // No video settings at all: the class defaults, like transformers.
                None => parse_video(&empty, &vid_path, "")?,
            },
        };

        let tok_cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = read_json(&tok_cfg_path)?;
        let tok_obj = tok_cfg.as_ref().and_then(|v| v.as_object());

        // Chat template, transformers' order of preference.
        let mut chat_template = None;
        let mut chat_template_source = None;
        if let Some(t) = pc_obj.and_then(|o| o.get("chat_template")).filter(|v| !v.is_null()) {
            let s = t.as_str().ok_or_else(|| ProcessorError::File {
                path: pc_path.clone(),
                msg: "`chat_template` must be a string".into(),
            })?;
            chat_template = Some(s.to_string());
            chat_template_source = Some(pc_path.clone());
        }
        let ct_json = dir.join("chat_template.json");
        if chat_template.is_none() {
            if let Some(v) = read_json(&ct_json)? {
                let s = v.get("chat_template").and_then(|t| t.as_str()).ok_or_else(|| ProcessorError::File {
                    path: ct_json.clone(),
                    msg: "`chat_template` must be a string".into(),
                })?;
                chat_template = Some(s.to_string());
                chat_template_source = Some(ct_json);
            }
        }
        let ct_jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && ct_jinja.exists() {
            let s = std::fs::read_to_string(&ct_jinja)
                .map_err(|e| ProcessorError::File { path: ct_jinja.clone(), msg: e.to_string() })?;
            chat_template = Some(s);
            chat_template_source = Some(ct_jinja);
        }
        if chat_template.is_none() {
            if let Some(t) = tok_obj.and_then(|o| o.get("chat_template")).and_then(|t| t.as_str()) {
                tracing::debug!("using the tokenizer's chat template from {}", tok_cfg_path.display());
                chat_template = Some(t.to_string());
                chat_template_source = Some(tok_cfg_path.clone());
            }
        }

        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.exists() {
            return Err(ProcessorError::File {
                path: tokenizer_json,
                msg: "missing (vigil needs the fast tokenizer file)".into(),
            });
        }
        let extra = tok_obj.and_then(|o| o.get("extra_special_tokens")).and_then(|v| v.as_object());
        let special =
            |k: &str| token_str(tok_obj.and_then(|o| o.get(k))).or_else(|| token_str(extra.and_then(|e| e.get(k))));
        Ok(Self {
            dir: dir.into(),
            image,
            video,
            chat_template,
            chat_template_source,
            tokenizer_json,
            eos_token: special("eos_token"),
            pad_token: special("pad_token"),
            bos_token: special("bos_token"),
            image_token: special("image_token").unwrap_or_else(|| "<|image_pad|>".into()),
            video_token: special("video_token").unwrap_or_else(|| "<|video_pad|>".into()),
        })
    }
}
