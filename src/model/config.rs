//! `config.json` / `generation_config.json` of a Hugging Face VideoLLaMA3 checkpoint.
//!
//! Source of truth: transformers 5.24 `models/video_llama_3/configuration_video_llama_3.py` and
//! `models/qwen2/configuration_qwen2.py`. Both layouts seen in the wild are read: transformers 5
//! writes `rope_parameters: {rope_type, rope_theta}`, older checkpoints a top-level `rope_theta`.
//! The vision RoPE theta defaults to 10000 when absent; `tie_word_embeddings` may sit at the top
//! level or in `text_config` (transformers ORs them).

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

const DEFAULT_TEXT_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_VISION_ROPE_THETA: f64 = 10_000.0;

/// RoPE settings in the transformers-5 layout.
#[derive(Debug, Clone, Deserialize, Default)]
struct RawRope {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

/// A single id or a list of ids, as `eos_token_id` appears in configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

impl OneOrMany {
    fn ids(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(i) => vec![*i as u32],
            OneOrMany::Many(v) => v.iter().map(|&i| i as u32).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct RawText {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_silu")]
    hidden_act: String,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    use_sliding_window: bool,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    max_position_embeddings: Option<usize>,
}

/// `patch_size` may be an int or a `[h, w]` pair (square patches only are supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PatchSize {
    One(usize),
    Pair(Vec<usize>),
}

#[derive(Debug, Clone, Deserialize)]
struct RawVision {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "default_channels")]
    num_channels: usize,
    patch_size: PatchSize,
    #[serde(default = "default_gelu_tanh")]
    hidden_act: String,
    #[serde(default = "default_ln_eps")]
    layer_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawTop {
    model_type: Option<String>,
    text_config: RawText,
    vision_config: RawVision,
    #[serde(default = "default_image_token")]
    image_token_id: u32,
    #[serde(default = "default_video_token")]
    video_token_id: u32,
    tie_word_embeddings: Option<bool>,
    rope_theta: Option<f64>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_ln_eps() -> f64 {
    1e-6
}
fn default_silu() -> String {
    "silu".into()
}
fn default_gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_channels() -> usize {
    3
}
fn default_image_token() -> u32 {
    151655
}
fn default_video_token() -> u32 {
    151656
}

/// The Qwen2 language model's settings (`text_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VideoLlama3TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The context the checkpoint was trained for (prompt and answer together), if it says.
    pub max_position_embeddings: Option<usize>,
}

/// The SigLIP-style vision encoder's settings (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VideoLlama3VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub rope_theta: f64,
}

impl VideoLlama3VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// Length of one flattened patch row of `pixel_values`: channels × patch × patch.
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
}

/// A whole `VideoLlama3ForConditionalGeneration` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoLlama3Config {
    pub text_config: VideoLlama3TextConfig,
    pub vision_config: VideoLlama3VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub tie_word_embeddings: bool,
}

fn invalid(msg: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig(msg.into())
}

impl VideoLlama3Config {
    /// Read `config.json` from a checkpoint directory (or a path to the file itself).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let path = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::InvalidConfig(m) => ModelError::InvalidConfig(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse the contents of a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ModelError> {
        // Check model_type before the schema so an unsupported checkpoint says so, not "missing field".
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("<missing>");
        if model_type != "video_llama_3" {
            return Err(ModelError::UnsupportedModelType(model_type.to_string()));
        }
        let raw: RawTop = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawTop) -> Result<Self, ModelError> {
        let _ = raw.model_type;
        let t = raw.text_config;
        if let Some(mt) = t.model_type.as_deref() {
            if mt != "qwen2" {
                return Err(ModelError::UnsupportedModelType(format!("text_config.model_type = {mt}")));
            }
        }
        if t.hidden_act != "silu" {
            return Err(invalid(format!("text_config.hidden_act {:?} is not supported (only silu)", t.hidden_act)));
        }
        if t.use_sliding_window {
            return Err(invalid("text_config.use_sliding_window = true is not supported"));
        }
        if let Some(s) = &t.rope_scaling {
            if !s.is_null() {
                return Err(invalid("text_config.rope_scaling is not supported (default RoPE only)"));
            }
        }
        let text_rope = t.rope_parameters.clone().unwrap_or_default();
        if let Some(rt) = text_rope.rope_type.as_deref() {
            if rt != "default" {
                return Err(invalid(format!("text_config rope_type {rt:?} is not supported (default only)")));
            }
        }
        let rope_theta = text_rope.rope_theta.or(t.rope_theta).or(raw.rope_theta).unwrap_or(DEFAULT_TEXT_ROPE_THETA);
        let num_key_value_heads = t.num_key_value_heads.unwrap_or(t.num_attention_heads);
        if t.num_attention_heads == 0
            || num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(invalid(format!(
                "text_config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, num_key_value_heads
            )));
        }
        let head_dim = t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(invalid(format!("text_config: head_dim {head_dim} must be even for RoPE")));
        }
        let text_config = VideoLlama3TextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: t.rms_norm_eps,
            rope_theta,
            eos_token_ids: t.eos_token_id.as_ref().map(|e| e.ids()).unwrap_or_default(),
            pad_token_id: t.pad_token_id.filter(|&p| p >= 0).map(|p| p as u32),
            max_position_embeddings: t.max_position_embeddings,
        };

        let v = raw.vision_config;
        if let Some(mt) = v.model_type.as_deref() {
            if mt != "video_llama_3_vision" {
                return Err(ModelError::UnsupportedModelType(format!("vision_config.model_type = {mt}")));
            }
        }
        if v.hidden_act != "gelu_pytorch_tanh" {
            return Err(invalid(format!(
                "vision_config.hidden_act {:?} is not supported (only gelu_pytorch_tanh)",
                v.hidden_act
            )));
        }
        let vision_rope = v.rope_parameters.clone().unwrap_or_default();
        if let Some(rt) = vision_rope.rope_type.as_deref() {
            if rt != "axial" {
                return Err(invalid(format!("vision_config rope_type {rt:?} is not supported (axial only)")));
            }
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(invalid("vision_config: hidden_size must be a multiple of num_attention_heads"));
        }
        if !(v.hidden_size / v.num_attention_heads).is_multiple_of(4) {
            return Err(invalid("vision_config: head dim must be a multiple of 4 for axial 2-D RoPE"));
        }
        let patch_size = match &v.patch_size {
            PatchSize::One(p) => *p,
            PatchSize::Pair(p) if p.len() == 2 && p[0] == p[1] => p[0],
            PatchSize::Pair(p) => {
                return Err(invalid(format!("vision_config.patch_size {p:?}: only square patches are supported")))
            }
        };
        if patch_size == 0 {
            return Err(invalid("vision_config.patch_size must be positive"));
        }
        let vision_config = VideoLlama3VisionConfig {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            num_channels: v.num_channels,
            patch_size,
            layer_norm_eps: v.layer_norm_eps,
            rope_theta: vision_rope.rope_theta.or(v.rope_theta).unwrap_or(DEFAULT_VISION_ROPE_THETA),
        };
        for id in [raw.image_token_id, raw.video_token_id] {
            if id as usize >= text_config.vocab_size {
                return Err(invalid(format!("token id {id} is outside the vocabulary ({})", text_config.vocab_size)));
            }
        }
        // transformers: top-level flag, OR-ed with text_config's.
        let tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(false) || t.tie_word_embeddings.unwrap_or(false);
        Ok(Self {
            text_config,
            vision_config,
            image_token_id: raw.image_token_id,
            video_token_id: raw.video_token_id,
            tie_word_embeddings,
        })
    }
}

/// The parts of `generation_config.json` generation uses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub max_new_tokens: Option<usize>,
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// transformers' `RepetitionPenaltyLogitsProcessor` factor (applied in greedy mode too).
    pub repetition_penalty: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawGeneration {
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<i64>,
    max_new_tokens: Option<usize>,
    #[serde(default)]
    do_sample: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// Read `generation_config.json` when present; fall back to `config`'s ids otherwise.
    pub fn load(dir: &Path, config: &VideoLlama3Config) -> Result<Self, ModelError> {
        let path = dir.join("generation_config.json");
        let mut out = if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
            let raw: RawGeneration =
                serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            Self {
                eos_token_ids: raw.eos_token_id.map(|e| e.ids()).unwrap_or_default(),
                pad_token_id: raw.pad_token_id.filter(|&p| p >= 0).map(|p| p as u32),
                max_new_tokens: raw.max_new_tokens,
                do_sample: raw.do_sample,
                temperature: raw.temperature,
                top_p: raw.top_p,
                top_k: raw.top_k,
                repetition_penalty: raw.repetition_penalty,
            }
        } else {
            Self::default()
        };
        if out.eos_token_ids.is_empty() {
            out.eos_token_ids = config.text_config.eos_token_ids.clone();
        }
        if out.pad_token_id.is_none() {
            out.pad_token_id = config.text_config.pad_token_id;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "video_llama_3",
            "image_token_id": 10, "video_token_id": 11,
            "text_config": {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 2},
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "patch_size": 14}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<VideoLlama3Config, ModelError> {
        VideoLlama3Config::from_json(&v.to_string())
    }

    #[test]
    fn defaults_and_both_rope_layouts() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.text_config.rope_theta, 10000.0);
        assert_eq!(c.vision_config.rope_theta, 10000.0);
        assert_eq!(c.text_config.head_dim, 4);
        assert!(!c.tie_word_embeddings);
        let mut v = base();
        v["text_config"]["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e6});
        v["vision_config"]["rope_parameters"] = serde_json::json!({"rope_type": "axial", "rope_theta": 123.0});
        v["tie_word_embeddings"] = true.into();
        let c = parse(&v).unwrap();
        assert_eq!((c.text_config.rope_theta, c.vision_config.rope_theta), (1e6, 123.0));
        assert!(c.tie_word_embeddings);
        let mut v = base();
        v["text_config"]["rope_theta"] = 5e5.into();
        v["text_config"]["tie_word_embeddings"] = true.into();
        v["vision_config"]["patch_size"] = serde_json::json!([14, 14]);
        let c = parse(&v).unwrap();
        assert_eq!(c.text_config.rope_theta, 5e5);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.vision_config.patch_size, 14);
    }

    #[test]
    fn unsupported_settings_are_named() {
        let mut v = base();
        v["model_type"] = "qwen2_vl".into();
        assert!(matches!(parse(&v), Err(ModelError::UnsupportedModelType(t)) if t == "qwen2_vl"));
        let mut v = base();
        v["text_config"]["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 1e6});
        assert!(parse(&v).unwrap_err().to_string().contains("yarn"));
        let mut v = base();
        v["text_config"]["num_key_value_heads"] = 3.into();
        assert!(parse(&v).unwrap_err().to_string().contains("num_key_value_heads"));
        let mut v = base();
        v["image_token_id"] = 99.into();
        assert!(parse(&v).unwrap_err().to_string().contains("outside the vocabulary"));
        let mut v = base();
        v["vision_config"]["patch_size"] = serde_json::json!([14, 16]);
        assert!(parse(&v).unwrap_err().to_string().contains("square"));
        let mut v = base();
        v["text_config"].as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(&v).unwrap_err().to_string().contains("hidden_size"));
    }
}
