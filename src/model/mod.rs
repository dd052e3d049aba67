//! VideoLLaMA3 (`VideoLlama3ForConditionalGeneration`) in candle.
//!
//! Source of truth: transformers 5.24 `models/video_llama_3/modeling_video_llama_3.py`,
//! `configuration_video_llama_3.py` and `models/qwen2/`. Parity against transformers is checked
//! by `tests/model_parity.rs` on fixtures written by `tests/reference/gen_model.py`.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use vigil::model::{GenerationParams, MultimodalInputs, VideoLlama3ForConditionalGeneration};
//!
//! # fn main() -> Result<(), vigil::model::ModelError> {
//! let device = Device::Cpu;
//! let model = VideoLlama3ForConditionalGeneration::from_pretrained("VideoLLaMA3-2B".as_ref(), DType::F32, &device)?;
//! // input ids (with image/video placeholders) and pixel rows come from the processor.
//! let input_ids = Tensor::new(&[[151644u32, 872, 198]], &device)?;
//! let inputs = MultimodalInputs::text(input_ids);
//! let out = model.generate(&inputs, &GenerationParams::greedy(64), &mut |_ev| {})?;
//! println!("{:?}", out.tokens[0]);
//! # Ok(()) }
//! ```

mod attention;
pub mod config;
pub mod generation;
pub mod load;
pub mod text;
pub mod vision;

mod video_llama3;

pub use config::{
    GenerationDefaults, VideoLlama3Config, VideoLlama3TextConfig, VideoLlama3VisionConfig,
};
pub use generation::{GenerationOutput, GenerationParams, Sampling, TextStreamer, TokenEvent};
pub use text::{KvCache, Qwen2Decoder};
pub use video_llama3::{
    ModelOutput, MultimodalInputs, VideoLlama3ForConditionalGeneration, VideoLlama3Model,
};
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
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("no safetensors weights in {0} (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights(String),
    #[error("invalid model input: {0}")]
    InvalidInput(String),
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
                candle_core::Error::CannotFindTensor { path } => {
                    return Self::MissingTensor(path.clone())
                }
                candle_core::Error::UnexpectedShape { msg, expected, got } => {
                    let name = msg
                        .strip_prefix("shape mismatch for ")
                        .unwrap_or(msg)
                        .to_string();
                    return Self::ShapeMismatch {
                        name,
                        expected: expected.dims().to_vec(),
                        got: got.dims().to_vec(),
                    };
                }
                _ => return Self::Candle(err),
            }
        }
    }
}
