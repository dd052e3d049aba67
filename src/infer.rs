//! `vigil infer`: prompt + media → processor → VideoLLaMA3 → generated text, one request or a
//! left-padded batch of many.
//!
//! Source of truth: the transformers docs' VideoLLaMA3 usage ("Single Media Inference", "Batch
//! Mixed Media Inference"): `processor.apply_chat_template` → `processor(text, images, videos,
//! padding=True, padding_side="left")` → `model.generate(**inputs)` → `batch_decode(..,
//! skip_special_tokens=True)`. End-to-end parity (token for token against `generate(do_sample=False)`)
//! is tested by `tests/infer_cli.rs` on fixtures from `tests/reference/make_checkpoints.py infer`.
//!
//! Requests are [`PromptRequest`]s (the same media flags and ordering as `vigil preprocess`):
//! media go before the prompt in one user turn — images, then the `video` clip, then the
//! `frames` clip. [`infer`] (paths) and [`infer_loaded`] (media in memory, see
//! [`LoadedRequest::new`]) are the library entry points the engine can call with an already loaded
//! model and processor:
//!
//! ```
//! use vigil::infer::{infer, InferOptions};
//! use vigil::model::{GenerationParams, VideoLlama3ForConditionalGeneration};
//! use vigil::processor::{report::PromptRequest, Processor};
//!
//! let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
//! let dir = root.join("models/tiny-videollama3");
//! let model = VideoLlama3ForConditionalGeneration::from_pretrained(&dir, candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let processor = Processor::from_pretrained(&dir)?;
//! let ask = |prompt: &str| PromptRequest { model: dir.clone(), prompt: prompt.into(), ..Default::default() };
//! let video = PromptRequest { video: Some(root.join("assets/demo.mp4")), fps: Some(1.0), max_frames: Some(4), ..ask("What happens?") };
//! let opts = InferOptions { generation: GenerationParams::greedy(8), ..Default::default() };
//! let out = infer(&model, &processor, &[video, ask("Hello?")], &opts, &mut |row, delta| print!("[{row}] {delta}"))?;
//! assert_eq!(out.results.len(), 2);
//! assert!(out.results[0].video_tokens_kept <= out.results[0].video_tokens_total);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::PruningConfig;
use crate::model::{GenerationParams, ModelError, MultimodalInputs, TextStreamer, VideoLlama3ForConditionalGeneration};
use crate::processor::report::{LoadedRequest, PromptRequest};
use crate::processor::{BatchInputs, CallOptions, PaddingSide, Processor, ProcessorError};

/// Why an inference failed.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}:{line}: {msg}", path.display())]
    Batch { path: PathBuf, line: usize, msg: String },
    #[error("{0}")]
    Input(String),
}

/// Settings shared by all requests of one [`infer`] call.
#[derive(Debug, Clone)]
pub struct InferOptions {
    pub generation: GenerationParams,
    /// Video token pruning for the whole batch (the processor applies one setting per call).
    pub pruning: PruningConfig,
}

impl Default for InferOptions {
    fn default() -> Self {
        Self { generation: GenerationParams::greedy(128), pruning: PruningConfig::default() }
    }
}

/// What one request produced.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InferResult {
    /// Decoded answer (`skip_special_tokens=True`).
    pub text: String,
    /// Generated ids only, including the EOS id when one ended the answer.
    pub token_ids: Vec<u32>,
    /// The prompt's ids without batch padding.
    pub input_ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Video tokens before pruning (all videos of the request).
    pub video_tokens_total: usize,
    /// Video tokens left in the prompt after pruning.
    pub video_tokens_kept: usize,
    pub stopped_on_eos: bool,
}

/// Results of one [`infer`] call, in request order, with the batch's timings.
#[derive(Debug, Clone, Serialize)]
pub struct InferOutput {
    pub results: Vec<InferResult>,
    /// Processor: media decoding, resizing, patches, template, tokenizer.
    pub preprocess_ms: f64,
    /// Vision tower + projector + embedding stitch.
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Generated tokens (all rows) per second of decoding.
    pub tokens_per_s: f64,
}

/// Prepare a batch: load each request's media, render the chat template, run the processor with
/// left padding. Returns the processor output and each row's video tokens before pruning.
pub fn prepare(
    processor: &Processor,
    requests: &[PromptRequest],
    pruning: &PruningConfig,
) -> Result<(BatchInputs, Vec<usize>), InferError> {
    let loaded = requests.iter().map(|r| r.load_media(processor)).collect::<Result<Vec<_>, _>>()?;
    prepare_loaded(processor, &loaded, pruning)
}

/// [`prepare`] for requests whose media are already in memory.
pub fn prepare_loaded(
    processor: &Processor,
    requests: &[LoadedRequest],
    pruning: &PruningConfig,
) -> Result<(BatchInputs, Vec<usize>), InferError> {
    if requests.is_empty() {
        return Err(InferError::Input("no requests".into()));
    }
    let mut texts = Vec::with_capacity(requests.len());
    let (mut images, mut videos) = (Vec::new(), Vec::new());
    for r in requests {
        texts.extend(processor.apply_chat_template(&[r.conversation()], true)?);
        images.extend(r.images.iter().cloned());
        videos.extend(r.videos.iter().cloned());
    }
    let opts = CallOptions { padding_side: PaddingSide::Left, pruning: pruning.clone() };
    let batch = processor.call(&texts, &images, &videos, &opts)?;
    let mut totals = vec![0; requests.len()];
    for (i, &row) in batch.video_sample.iter().enumerate() {
        totals[row] += batch.videos.mask_of(i).len();
    }
    Ok((batch, totals))
}

/// Run `requests` as one left-padded batch. `on_text(row, delta)` receives each row's decoded
/// answer as it is generated (special tokens skipped; split UTF-8 characters held back).
pub fn infer(
    model: &VideoLlama3ForConditionalGeneration,
    processor: &Processor,
    requests: &[PromptRequest],
    opts: &InferOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<InferOutput, InferError> {
    let t0 = Instant::now();
    let loaded = requests.iter().map(|r| r.load_media(processor)).collect::<Result<Vec<_>, _>>()?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut out = infer_loaded(model, processor, &loaded, opts, on_text)?;
    out.preprocess_ms += load_ms;
    Ok(out)
}

/// [`infer`] for requests whose media are already in memory (the engine's windows of frames).
pub fn infer_loaded(
    model: &VideoLlama3ForConditionalGeneration,
    processor: &Processor,
    requests: &[LoadedRequest],
    opts: &InferOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<InferOutput, InferError> {
    let t0 = Instant::now();
    let (batch, video_totals) = prepare_loaded(processor, requests, &opts.pruning)?;
    let preprocess_ms = t0.elapsed().as_secs_f64() * 1e3;
    let inputs = MultimodalInputs::from_batch(&batch, model.device())?;
    let mut streamers: Vec<_> =
        (0..requests.len()).map(|_| TextStreamer::new(|ids: &[u32]| processor.decode(ids, true))).collect();
    let mut on_token = |ev: &crate::model::TokenEvent| {
        // A decode error only costs the live preview; the final text is decoded again below.
        if let Some(s) = streamers.get_mut(ev.row) {
            if let Ok(Some(delta)) = s.push(ev.token) {
                on_text(ev.row, &delta);
            }
        }
    };
    let out = model.generate(&inputs, &opts.generation, &mut on_token)?;
    for (row, s) in streamers.iter_mut().enumerate() {
        if let Ok(Some(delta)) = s.finish() {
            on_text(row, &delta);
        }
    }
    let mut results = Vec::with_capacity(requests.len());
    for (row, tokens) in out.tokens.iter().enumerate() {
        let input_ids: Vec<u32> = batch.input_ids[row]
            .iter()
            .zip(&batch.attention_mask[row])
            .filter(|(_, &m)| m != 0)
            .map(|(&t, _)| t)
            .collect();
        results.push(InferResult {
            text: processor.decode(tokens, true)?,
            token_ids: tokens.clone(),
            prompt_tokens: input_ids.len(),
            video_tokens_total: video_totals[row],
            video_tokens_kept: input_ids.iter().filter(|&&t| t == batch.video_token_id).count(),
            input_ids,
            stopped_on_eos: out.stopped_on_eos[row],
        });
    }
    let generated: usize = out.tokens.iter().map(Vec::len).sum();
    Ok(InferOutput {
        results,
        preprocess_ms,
        vision_ms: out.vision_ms,
        prefill_ms: out.prefill_ms,
        decode_ms: out.decode_ms,
        tokens_per_s: if out.decode_ms > 0.0 { generated as f64 / (out.decode_ms / 1e3) } else { 0.0 },
    })
}

/// One line of a `--batch` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    prompt: String,
    #[serde(default)]
    images: Vec<PathBuf>,
    #[serde(default)]
    video: Option<PathBuf>,
    #[serde(default)]
    fps: Option<f64>,
    #[serde(default)]
    frames: Vec<PathBuf>,
    #[serde(default)]
    max_frames: Option<usize>,
}

/// Read a `--batch` JSONL file: one request per non-empty line,
/// `{"prompt": ..., "images": [...], "video": ..., "fps": ..., "frames": [...], "max_frames": ...}`,
/// media paths relative to the file's directory.
pub fn read_batch(path: &Path, model: &Path) -> Result<Vec<PromptRequest>, InferError> {
    let text = std::fs::read_to_string(path).map_err(|e| InferError::Batch {
        path: path.to_path_buf(),
        line: 0,
        msg: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| InferError::Batch { path: path.to_path_buf(), line: i + 1, msg };
        let l: BatchLine = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if l.max_frames.is_some() && l.video.is_none() {
            return Err(err("max_frames needs a video".into()));
        }
        out.push(PromptRequest {
            model: model.to_path_buf(),
            prompt: l.prompt,
            images: l.images.into_iter().map(rel).collect(),
            video: l.video.map(rel),
            fps: l.fps,
            max_frames: l.max_frames,
            frames: l.frames.into_iter().map(rel).collect(),
            pruning: PruningConfig::default(),
        });
    }
    if out.is_empty() {
        return Err(InferError::Batch { path: path.to_path_buf(), line: 0, msg: "no requests in the file".into() });
    }
    Ok(out)
}

/// Open `device`, with a clear error when CUDA was not compiled in.
pub fn open_device(device: crate::config::Device) -> Result<candle_core::Device, InferError> {
    if matches!(device, crate::config::Device::Cuda(_)) && !cfg!(feature = "cuda") {
        return Err(InferError::Input(format!(
            "--device {device}: this vigil was built without CUDA support; rebuild with `cargo build --release --features cuda` or use --device cpu"
        )));
    }
    Ok(crate::model::load::candle_device(device)?)
}
