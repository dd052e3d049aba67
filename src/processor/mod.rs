//! HF-exact VideoLLaMA3 preprocessing: checkpoint discovery, tokenizer, chat template, image and
//! video processors, pruning mask, and the processor call that turns text + media into model
//! inputs (plain `Vec`s with shapes; the model converts them to tensors).
//!
//! Source of truth: transformers 5.24 `models/video_llama_3/{image_processing,
//! image_processing_pil, video_processing, processing}_video_llama_3.py`, `processing_utils.py`
//! (`ProcessorMixin.__call__`, `apply_chat_template`), `video_utils.py`, and torchvision / Pillow
//! for resizing (see [`resize`]). Parity is tested against transformers' own outputs in
//! `tests/processor_parity.rs` (fixtures from `tests/reference/gen_processor_fixtures.py`).
//!
//! Mirrors the transformers docs example:
//!
//! ```no_run
//! use vigil::processor::{Processor, Message, ContentPart, RgbImage, CallOptions};
//! let processor = Processor::from_pretrained("models/VideoLLaMA3-2B".as_ref())?;
//! let conversation = vec![Message::user(vec![
//!     ContentPart::Image,
//!     ContentPart::Text { text: "Describe the image.".into() },
//! ])];
//! let prompts = processor.apply_chat_template(&[conversation], true)?;
//! let image = RgbImage::open("cat.jpg".as_ref())?;
//! let inputs = processor.call(&prompts, &[image], &[], &CallOptions::default())?;
//! println!("{} tokens, grid {:?}", inputs.seq_len, inputs.images.image_grid_thw);
//! # Ok::<(), vigil::processor::ProcessorError>(())
//! ```
//!
//! Batched, mixed media, left padding:
//!
//! ```no_run
//! use vigil::processor::{Processor, Message, ContentPart, RgbImage, Video, CallOptions, PaddingSide};
//! let processor = Processor::from_pretrained("models/VideoLLaMA3-2B".as_ref())?;
//! let text = |t: &str| ContentPart::Text { text: t.into() };
//! let conversations = vec![
//!     vec![Message::user(vec![ContentPart::Image, text("What is shown?")])],
//!     vec![Message::user(vec![ContentPart::Video, text("Did anyone enter?")])],
//! ];
//! let prompts = processor.apply_chat_template(&conversations, true)?;
//! let frames: Vec<RgbImage> = (0..8).map(|i| RgbImage::open(format!("frame{i}.png").as_ref())).collect::<Result<_, _>>()?;
//! let video = Video::from_frames(frames, Some(1.0))?;
//! let opts = CallOptions { padding_side: PaddingSide::Left, ..Default::default() };
//! let inputs = processor.call(&prompts, &[RgbImage::open("door.jpg".as_ref())?], &[video], &opts)?;
//! assert_eq!(inputs.input_ids.len(), 2);
//! # Ok::<(), vigil::processor::ProcessorError>(())
//! ```

pub mod checkpoint;
pub mod image;
pub mod report;
pub mod resize;
pub mod template;
pub mod video;
pub mod video_file;

use std::path::{Path, PathBuf};

pub use checkpoint::{CheckpointFiles, ImageProcessorConfig, ResizeBackend, VideoProcessorConfig};
pub use image::{ImageInputs, ImageProcessor, RgbImage};
pub use template::{ChatTemplate, Content, ContentPart, Conversation, Message};
pub use video::{sample_frame_indices, FrameSampling, Video, VideoInputs, VideoProcessor};

use crate::config::PruningConfig;

/// Everything that can go wrong while preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("cannot read media {}: {msg}", path.display())]
    Media { path: PathBuf, msg: String },
    #[error("image of {height}x{width} pixels is empty")]
    EmptyImage { height: usize, width: usize },
    #[error("absolute aspect ratio must be at most 200, got {ratio} for a {height}x{width} image")]
    AspectRatio { height: usize, width: usize, ratio: f64 },
    #[error("processor settings: {0}")]
    Config(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Input(String),
}

/// Which side padding goes to in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// Pad at the start (what generation wants).
    #[default]
    Left,
    Right,
}

/// Options of [`Processor::call`].
#[derive(Debug, Clone)]
pub struct CallOptions {
    pub padding_side: PaddingSide,
    /// Token pruning of videos (`enabled = false` is `use_token_compression=False`).
    pub pruning: PruningConfig,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self { padding_side: PaddingSide::Left, pruning: PruningConfig::default() }
    }
}

/// Model inputs for a batch, like transformers' `BatchFeature`, plus the bookkeeping the model
/// needs to scatter visual features into the text sequence.
#[derive(Debug, Clone, Default)]
pub struct BatchInputs {
    /// `batch x seq_len`, padded with the pad token.
    pub input_ids: Vec<Vec<u32>>,
    /// `batch x seq_len`, 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u8>>,
    pub seq_len: usize,
    pub images: ImageInputs,
    pub videos: VideoInputs,
    /// Batch row each image belongs to (images are numbered in prompt order across the batch).
    pub image_sample: Vec<usize>,
    /// Batch row each video belongs to.
    pub video_sample: Vec<usize>,
    pub image_token_id: u32,
    pub video_token_id: u32,
    /// Texts after placeholder expansion (what was tokenized).
    pub expanded_texts: Vec<String>,
}

impl BatchInputs {
    /// f64 sum of all pixel values fed to the model (images then videos).
    pub fn pixel_values_sum(&self) -> f64 {
        self.images.pixel_values.iter().map(|&v| v as f64).sum::<f64>()
            + self.videos.pixel_values_videos.iter().map(|&v| v as f64).sum::<f64>()
    }
}

/// Rust counterpart of `VideoLlama3Processor`.
///
/// On the bundled demo checkpoint (see [`crate::model::VideoLlama3ForConditionalGeneration`] for
/// generation from its output):
///
/// ```
/// use vigil::processor::{CallOptions, ContentPart, Message, Processor, RgbImage};
/// let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-videollama3"));
/// let processor = Processor::from_pretrained(dir)?;
/// let conversation = vec![Message::user(vec![
///     ContentPart::Image,
///     ContentPart::Text { text: "Describe the image.".into() },
/// ])];
/// let prompts = processor.apply_chat_template(&[conversation], true)?;
/// let image = RgbImage::new(56, 56, vec![128; 56 * 56 * 3])?;
/// let inputs = processor.call(&prompts, &[image], &[], &CallOptions::default())?;
/// // A 56x56 image is 4x4 patches of 14 px; merge size 1 for images: 16 placeholder tokens.
/// assert_eq!(inputs.images.image_grid_thw, vec![[1, 4, 4]]);
/// assert_eq!(inputs.input_ids[0].iter().filter(|&&t| t == processor.image_token_id).count(), 16);
/// # Ok::<(), vigil::processor::ProcessorError>(())
/// ```
#[derive(Debug)]
pub struct Processor {
    pub files: CheckpointFiles,
    pub image_processor: ImageProcessor,
    pub video_processor: VideoProcessor,
    pub tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub pad_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Processor {
    /// Load processor settings, tokenizer and chat template from a checkpoint directory.
    pub fn from_pretrained(dir: &Path) -> Result<Self, ProcessorError> {
        let files = CheckpointFiles::discover(dir)?;
        let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer_json).map_err(|e| ProcessorError::File {
            path: files.tokenizer_json.clone(),
            msg: format!("cannot load tokenizer: {e}"),
        })?;
        let id = |tok: &str| tokenizer.token_to_id(tok);
        let image_token_id = id(&files.image_token).ok_or_else(|| ProcessorError::File {
            path: files.tokenizer_json.clone(),
            msg: format!("image token {} is not in the vocabulary", files.image_token),
        })?;
        let video_token_id = id(&files.video_token).ok_or_else(|| ProcessorError::File {
            path: files.tokenizer_json.clone(),
            msg: format!("video token {} is not in the vocabulary", files.video_token),
        })?;
        let pad_token_id = files.pad_token.as_deref().and_then(id);
        let eos_token_id = files.eos_token.as_deref().and_then(id);
        let template = files.chat_template.clone().map(ChatTemplate::new).transpose().map_err(|e| {
            match &files.chat_template_source {
                Some(path) => ProcessorError::File { path: path.clone(), msg: e.to_string() },
                None => e,
            }
        })?;
        Ok(Self {
            image_processor: ImageProcessor::new(files.image.clone()),
            video_processor: VideoProcessor::new(files.video.clone()),
            files,
            tokenizer,
            template,
            image_token_id,
            video_token_id,
            pad_token_id,
            eos_token_id,
        })
    }

    /// Render each conversation with the checkpoint's chat template.
    pub fn apply_chat_template(
        &self,
        conversations: &[Conversation],
        add_generation_prompt: bool,
    ) -> Result<Vec<String>, ProcessorError> {
        self.apply_chat_template_with(conversations, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`Processor::apply_chat_template`] with extra template variables (transformers'
    /// `**kwargs`, e.g. `{"add_system_prompt": true}` for VideoLLaMA3's default system prompt).
    pub fn apply_chat_template_with(
        &self,
        conversations: &[Conversation],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<String>, ProcessorError> {
        let t = self.template.as_ref().ok_or_else(|| {
            ProcessorError::Template(format!(
                "{} has no chat template (looked for chat_template in processor_config.json, chat_template.json, chat_template.jinja, tokenizer_config.json)",
                self.files.dir.display()
            ))
        })?;
        // Special tokens first, then the caller's variables (they win, as in transformers).
        let mut base = serde_json::Map::new();
        for (k, v) in [
            ("bos_token", self.files.bos_token.as_deref()),
            ("eos_token", self.files.eos_token.as_deref()),
            ("pad_token", self.files.pad_token.as_deref()),
            ("image_token", Some(self.files.image_token.as_str())),
            ("video_token", Some(self.files.video_token.as_str())),
        ] {
            if let Some(v) = v {
                base.insert(k.into(), v.into());
            }
        }
        base.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        conversations
            .iter()
            .map(|c| {
                let mut ctx = base.clone();
                ctx.insert(
                    "messages".into(),
                    serde_json::to_value(c).map_err(|e| ProcessorError::Template(e.to_string()))?,
                );
                ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
                t.render_context(&ctx)
            })
            .collect()
    }

    /// Turn prompts (with one image / video placeholder per media item) plus the media, in the
    /// order their placeholders appear across the batch, into model inputs.
    pub fn call(
        &self,
        texts: &[String],
        images: &[RgbImage],
        videos: &[Video],
        opts: &CallOptions,
    ) -> Result<BatchInputs, ProcessorError> {
        let (itok, vtok) = (self.files.image_token.as_str(), self.files.video_token.as_str());
        let n_img: usize = texts.iter().map(|t| t.matches(itok).count()).sum();
        let n_vid: usize = texts.iter().map(|t| t.matches(vtok).count()).sum();
        if n_img != images.len() {
            return Err(ProcessorError::Input(format!(
                "the prompts contain {n_img} {itok} placeholders but {} images were passed",
                images.len()
            )));
        }
        if n_vid != videos.len() {
            return Err(ProcessorError::Input(format!(
                "the prompts contain {n_vid} {vtok} placeholders but {} videos were passed",
                videos.len()
            )));
        }
        let img = self.image_processor.preprocess(images)?;
        let vid = self.video_processor.preprocess(videos, &opts.pruning)?;

        // Replacement strings (`replace_image_token` / `replace_video_token`).
        let m = self.image_processor.config.merge_size;
        let img_repl: Vec<String> =
            img.image_grid_thw.iter().map(|g| itok.repeat(g[0] * g[1] * g[2] / (m * m))).collect();
        let mut vid_repl = Vec::with_capacity(videos.len());
        for (i, ts) in vid.timestamps.iter().enumerate() {
            let mask = vid.mask_of(i);
            if ts.is_empty() || mask.len() % ts.len() != 0 {
                return Err(ProcessorError::Input(format!(
                    "video {i}: {} tokens cannot be split over {} frames",
                    mask.len(),
                    ts.len()
                )));
            }
            let per = mask.len() / ts.len();
            let parts: Vec<String> = mask
                .chunks(per)
                .zip(ts)
                .map(|(chunk, t)| {
                    format!("Time {}s:{}", py_format_1f(*t), vtok.repeat(chunk.iter().filter(|k| **k).count()))
                })
                .collect();
            vid_repl.push(parts.join(","));
        }

        // Expand placeholders left to right, per modality in order (`get_text_with_replacements`).
        let (mut ii, mut vi) = (0usize, 0usize);
        let mut image_sample = Vec::new();
        let mut video_sample = Vec::new();
        let mut expanded = Vec::with_capacity(texts.len());
        for (row, t) in texts.iter().enumerate() {
            let mut out = String::with_capacity(t.len());
            let mut rest = t.as_str();
            loop {
                let pi = rest.find(itok);
                let pv = rest.find(vtok);
                let (pos, is_img) = match (pi, pv) {
                    (Some(a), Some(b)) => {
                        if a <= b {
                            (a, true)
                        } else {
                            (b, false)
                        }
                    }
                    (Some(a), None) => (a, true),
                    (None, Some(b)) => (b, false),
                    (None, None) => break,
                };
                out.push_str(&rest[..pos]);
                if is_img {
                    out.push_str(&img_repl[ii]);
                    image_sample.push(row);
                    ii += 1;
                    rest = &rest[pos + itok.len()..];
                } else {
                    out.push_str(&vid_repl[vi]);
                    video_sample.push(row);
                    vi += 1;
                    rest = &rest[pos + vtok.len()..];
                }
            }
            out.push_str(rest);
            expanded.push(out);
        }

        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
        for t in &expanded {
            let enc = self.tokenizer.encode(t.as_str(), true).map_err(|e| ProcessorError::Tokenizer(e.to_string()))?;
            ids.push(enc.get_ids().to_vec());
        }
        let seq_len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let needs_pad = ids.iter().any(|r| r.len() != seq_len);
        let pad = match (needs_pad, self.pad_token_id) {
            (false, p) => p.unwrap_or(0),
            (true, Some(p)) => p,
            (true, None) => {
                return Err(ProcessorError::Tokenizer(
                    "batch needs padding but the checkpoint defines no pad_token".into(),
                ))
            }
        };
        let mut input_ids = Vec::with_capacity(ids.len());
        let mut attention_mask = Vec::with_capacity(ids.len());
        for r in ids {
            let n = seq_len - r.len();
            let (mut row, mut mask) = (Vec::with_capacity(seq_len), Vec::with_capacity(seq_len));
            if opts.padding_side == PaddingSide::Left {
                row.extend(std::iter::repeat_n(pad, n));
                mask.extend(std::iter::repeat_n(0u8, n));
            }
            mask.extend(std::iter::repeat_n(1u8, r.len()));
            row.extend(r);
            if opts.padding_side == PaddingSide::Right {
                row.extend(std::iter::repeat_n(pad, n));
                mask.extend(std::iter::repeat_n(0u8, n));
            }
            input_ids.push(row);
            attention_mask.push(mask);
        }
        Ok(BatchInputs {
            input_ids,
            attention_mask,
            seq_len,
            images: img,
            videos: vid,
            image_sample,
            video_sample,
            image_token_id: self.image_token_id,
            video_token_id: self.video_token_id,
            expanded_texts: expanded,
        })
    }

    /// Decode token ids to text (`batch_decode(skip_special_tokens=...)`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ProcessorError> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| ProcessorError::Tokenizer(e.to_string()))
    }
}

/// Python's `f"{t:.1f}"`: correctly rounded, ties to even on the exact binary value.
pub fn py_format_1f(t: f64) -> String {
    // Rust's `{:.1}` formats the exact binary value with round-half-to-even, like Python.
    format!("{t:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_decimal_rounding_matches_python() {
        // Python: f"{0.25:.1f}" == "0.2", f"{0.35:.1f}" == "0.3" (0.35 is below 0.35 in binary),
        // f"{1.25:.1f}" == "1.2", f"{0.75:.1f}" == "0.8".
        assert_eq!(py_format_1f(0.25), "0.2");
        assert_eq!(py_format_1f(0.35), "0.3");
        assert_eq!(py_format_1f(1.25), "1.2");
        assert_eq!(py_format_1f(0.75), "0.8");
        assert_eq!(py_format_1f(1.1666666269302368), "1.2");
    }
}
