//! VideoLLaMA3 (`VideoLlama3ForConditionalGeneration`) in candle.
//!
//! Source of truth: transformers 5.24 `models/video_llama_3/modeling_video_llama_3.py`,
//! `configuration_video_llama_3.py` and `models/qwen2/`. Parity against transformers is checked
//! by `tests/model_parity.rs` on fixtures written by `tests/reference/gen_model.py`.
//!
//! Inputs mirror what `VideoLlama3Processor` returns: `input_ids` holding one placeholder id per
//! kept visual token, `pixel_values` rows of flattened patches in merge-block order with
//! `grid_thw` and merge sizes (1 for images, 2 for video), and the video compression mask.
//!
//! Image inference (the processor supplies ids and patches):
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use vigil::model::{
//!     GenerationParams, MultimodalInputs, VideoLlama3ForConditionalGeneration, VisualInputs,
//! };
//!
//! # fn main() -> Result<(), vigil::model::ModelError> {
//! # let (ids, pixels): (Vec<u32>, Vec<f32>) = (vec![], vec![]);
//! let device = Device::Cpu;
//! let model =
//!     VideoLlama3ForConditionalGeneration::from_pretrained("VideoLLaMA3-2B-Image-HF".as_ref(), DType::F32, &device)?;
//! let n = ids.len();
//! let inputs = MultimodalInputs {
//!     images: Some(VisualInputs {
//!         pixel_values: Tensor::from_vec(pixels, (28 * 28, 3 * 14 * 14), &device)?,
//!         grid_thw: vec![[1, 28, 28]],
//!         merge_sizes: vec![1],
//!     }),
//!     ..MultimodalInputs::text(Tensor::from_vec(ids, (1, n), &device)?)
//! };
//! let out = model.generate(&inputs, &GenerationParams::greedy(128), &mut |_| {})?;
//! println!("{:?}", out.tokens[0]);
//! # Ok(()) }
//! ```
//!
//! Streaming text while generating, with any tokenizer's decode function:
//!
//! ```no_run
//! # use vigil::model::*;
//! # fn run(model: &VideoLlama3ForConditionalGeneration, inputs: &MultimodalInputs,
//! #        decode: impl FnMut(&[u32]) -> Result<String, std::fmt::Error>) -> Result<(), ModelError> {
//! let mut streamer = TextStreamer::new(decode);
//! model.generate(inputs, &GenerationParams::greedy(128), &mut |ev| {
//!     if !ev.is_eos {
//!         if let Ok(Some(text)) = streamer.push(ev.token) {
//!             print!("{text}");
//!         }
//!     }
//! })?;
//! # Ok(()) }
//! ```
//!
//! A left-padded batch (`attention_mask` 0 on padding) mixes images, videos and text in one
//! call; each row stops on its own EOS and yields the same tokens as when run alone.

mod activation;
pub(crate) mod attention;
pub mod config;
pub mod fused;
pub mod generation;
mod inputs;
pub mod load;
mod rotary;
pub mod text;
pub mod vision;
mod weights;

mod video_llama3;

pub use config::{GenerationDefaults, VideoLlama3Config, VideoLlama3TextConfig, VideoLlama3VisionConfig};
pub use generation::{DecodeRow, Decoding, GenerationOutput, GenerationParams, Sampling, TextStreamer, TokenEvent};
pub use text::{KvCache, Qwen2Decoder};
pub use video_llama3::{ModelOutput, MultimodalInputs, VideoLlama3ForConditionalGeneration, VideoLlama3Model};
pub use vision::{VideoLlama3Projector, VideoLlama3VisionModel, VisualInputs};

/// Why loading or running the model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error(
        "unsupported model_type {0:?}: expected a transformers-native VideoLLaMA3 checkpoint \
         (model_type \"video_llama_3\" with a qwen2 text model, e.g. lkhl/VideoLLaMA3-2B-Image-HF); \
         the remote-code DAMO-NLP-SG releases (\"videollama3_qwen2\") are not supported"
    )]
    UnsupportedModelType(String),
    #[error("checkpoint is missing tensor {0:?}")]
    MissingTensor(String),
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("no safetensors weights in {0} (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights(String),
    #[error("generation interrupted")]
    Interrupted,
    #[error("invalid model input: {0}")]
    InvalidInput(String),
    /// The configured device cannot be opened (a GPU without the `cuda` build, or no such GPU).
    #[error("cannot open {device} ({source}); vigil must be built with `--features cuda` for GPU inference")]
    Device {
        device: crate::config::Device,
        #[source]
        source: candle_core::Error,
    },
    /// No checkpoint directory: neither `path` nor `repo`, or a repo not in the Hugging Face cache.
    #[error("{0}")]
    NotFound(String),
    /// Fetching a file of a Hub repo failed.
    #[cfg(feature = "hub")]
    #[error("downloading {file} of {repo}: {source}")]
    Download {
        repo: String,
        file: String,
        #[source]
        source: Box<hf_hub::api::sync::ApiError>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Turn candle's loading errors into the named variants (candle wraps them in backtraces).
    pub(crate) fn from_load(err: candle_core::Error) -> Self {
        let mut cur = &err;
        loop {
            match cur {
                candle_core::Error::WithBacktrace { inner, .. }
                | candle_core::Error::Context { inner, .. }
                | candle_core::Error::WithPath { inner, .. } => cur = inner,
                candle_core::Error::CannotFindTensor { path } => return Self::MissingTensor(path.clone()),
                candle_core::Error::UnexpectedShape { msg, expected, got } => {
                    let name = msg.strip_prefix("shape mismatch for ").unwrap_or(msg).to_string();
                    return Self::ShapeMismatch { name, expected: expected.dims().to_vec(), got: got.dims().to_vec() };
                }
                _ => return Self::Candle(err),
            }
        }
    }
}
