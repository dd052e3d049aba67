//! `VideoLlama3Model` (vision → projector → stitch → Qwen2) and
//! `VideoLlama3ForConditionalGeneration` (plus the LM head and checkpoint loading).
//!
//! Source of truth: transformers 5.24 `modeling_video_llama_3.py` (`VideoLlama3Model.forward`,
//! `get_placeholder_mask`, `masked_scatter` stitching, `video_compression_mask`) and
//! `generation/utils.py` (position ids `cumsum(mask) - 1`, 0 on padding).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::config::{GenerationDefaults, VideoLlama3Config};
use super::text::{DecoderInputs, KvCache, Qwen2Decoder};
use super::vision::{VideoLlama3Projector, VideoLlama3VisionModel, VisualInputs};
use super::ModelError;

/// Everything one forward pass over a (possibly left-padded) batch needs.
#[derive(Debug, Clone)]
pub struct MultimodalInputs {
    /// `[batch, len]` token ids with one placeholder id per (kept) visual token.
    pub input_ids: Tensor,
    /// `[batch, len]`, 1 = token, 0 = left padding. `None` = no padding.
    pub attention_mask: Option<Tensor>,
    /// Patches of all images of the batch, in the order their placeholders appear.
    pub images: Option<VisualInputs>,
    /// Patches of all videos of the batch, in the order their placeholders appear.
    pub videos: Option<VisualInputs>,
    /// One flag per merged video token (all videos concatenated): `false` = pruned.
    pub video_compression_mask: Option<Vec<bool>>,
    /// Precomputed projected image embeddings `[tokens, text_hidden]` (from
    /// [`VideoLlama3Model::get_image_features`], concatenated), used instead of `images` — e.g.
    /// one window asked several prompts runs the vision tower once (transformers' `mm_encoder_outputs`).
    pub image_embeds: Option<Tensor>,
    /// Precomputed projected video embeddings before pruning; used instead of `videos`.
    pub video_embeds: Option<Tensor>,
}

impl MultimodalInputs {
    /// Text-only inputs without padding.
    pub fn text(input_ids: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            images: None,
            videos: None,
            video_compression_mask: None,
            image_embeds: None,
            video_embeds: None,
        }
    }
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `[batch, len, vocab]`, f32.
    pub logits: Tensor,
}

/// Positions transformers' `generate` derives from a padding mask: `cumsum - 1`, 0 on padding.
pub(crate) fn position_ids_from_mask(mask: &Tensor) -> Result<Tensor, ModelError> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (b, l) = mask.dims2()?;
    let mut out = Vec::with_capacity(b * l);
    for row in rows {
        let mut c: i64 = 0;
        for v in row {
            if v != 0.0 {
                c += 1;
                out.push(c - 1);
            } else {
                out.push(0);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, l), mask.device())?)
}

/// `model`: vision tower, projector and language model.
pub struct VideoLlama3Model {
    vision_model: VideoLlama3VisionModel,
    projector: VideoLlama3Projector,
    language_model: Qwen2Decoder,
    config: VideoLlama3Config,
}

impl VideoLlama3Model {
    /// `vb` points at `model`.
    pub fn new(config: &VideoLlama3Config, vb: VarBuilder) -> Result<Self, ModelError> {
        let build = || -> candle_core::Result<Self> {
            Ok(Self {
                vision_model: VideoLlama3VisionModel::new(&config.vision_config, vb.pp("vision_model"))?,
                projector: VideoLlama3Projector::new(config, vb.pp("projector"))?,
                language_model: Qwen2Decoder::new(&config.text_config, vb.pp("language_model"))?,
                config: config.clone(),
            })
        };
        build().map_err(ModelError::from_load)
    }

    pub fn config(&self) -> &VideoLlama3Config {
        &self.config
    }

    /// The decoder (token embeddings, layers, final norm).
    pub fn language_model(&self) -> &Qwen2Decoder {
        &self.language_model
    }

    /// The vision tower (patch embedding, encoder, post-layernorm).
    pub fn vision_model(&self) -> &VideoLlama3VisionModel {
        &self.vision_model
    }

    /// The MLP projector from vision features to the text width.
    pub fn projector(&self) -> &VideoLlama3Projector {
        &self.projector
    }

    /// Projected image embeddings, one `[tokens, text_hidden]` tensor per image.
    pub fn get_image_features(&self, images: &VisualInputs) -> Result<Vec<Tensor>, ModelError> {
        let feats = self.vision_model.forward(images)?;
        let projected = self.projector.forward(&feats)?;
        let mut out = Vec::new();
        let mut off = 0;
        for n in images.tokens_per_item() {
            out.push(projected.narrow(0, off, n)?);
            off += n;
        }
        Ok(out)
    }

    /// Projected video embeddings (before pruning), one tensor per video.
    pub fn get_video_features(&self, videos: &VisualInputs) -> Result<Vec<Tensor>, ModelError> {
        self.get_image_features(videos)
    }

    /// Token embeddings with visual embeddings stitched into the placeholder rows.
    pub fn input_embeddings(&self, inputs: &MultimodalInputs) -> Result<Tensor, ModelError> {
        let ids_t = &inputs.input_ids;
        let (b, l) = ids_t
            .dims2()
            .map_err(|_| ModelError::InvalidInput(format!("input_ids must be [batch, len], got {:?}", ids_t.dims())))?;
        if b == 0 || l == 0 {
            return Err(ModelError::InvalidInput(format!("empty input_ids {:?}", ids_t.dims())));
        }
        let ids: Vec<u32> = ids_t.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let vocab = self.config.text_config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        let device = self.language_model.embed_weight().device().clone();
        let text = self
            .language_model
            .embed(&ids_t.to_device(&device)?)?
            .reshape((b * l, self.config.text_config.hidden_size))?;
        let mut sources = vec![text];
        let mut next = b * l;

        let image_id = self.config.image_token_id;
        let video_id = self.config.video_token_id;
        let n_image_tokens = ids.iter().filter(|&&t| t == image_id).count();
        let n_video_tokens = ids.iter().filter(|&&t| t == video_id).count();
        let dtype = sources[0].dtype();

        if inputs.images.is_some() && inputs.image_embeds.is_some() {
            return Err(ModelError::InvalidInput("give images or image_embeds, not both".into()));
        }
        if inputs.videos.is_some() && inputs.video_embeds.is_some() {
            return Err(ModelError::InvalidInput("give videos or video_embeds, not both".into()));
        }
        let image_embeds = match (&inputs.images, &inputs.image_embeds) {
            (Some(images), _) => Some(Tensor::cat(&self.get_image_features(images)?, 0)?),
            (None, Some(e)) => Some(e.to_device(&device)?),
            (None, None) => None,
        };
        let video_embeds = match (&inputs.videos, &inputs.video_embeds) {
            (Some(videos), _) => Some(Tensor::cat(&self.get_video_features(videos)?, 0)?),
            (None, Some(e)) => Some(e.to_device(&device)?),
            (None, None) => None,
        };
        let hidden = self.config.text_config.hidden_size;
        for (what, e) in [("image_embeds", &image_embeds), ("video_embeds", &video_embeds)] {
            if let Some(e) = e {
                if e.rank() != 2 || e.dim(1)? != hidden {
                    return Err(ModelError::InvalidInput(format!(
                        "{what} must be [tokens, {hidden}], got {:?}",
                        e.dims()
                    )));
                }
            }
        }

        let image_base = next;
        match image_embeds {
            Some(emb) => {
                let emb = emb.to_dtype(dtype)?;
                if emb.dim(0)? != n_image_tokens {
                    return Err(ModelError::InvalidInput(format!(
                        "Image features and image tokens do not match, tokens: {n_image_tokens}, features: {}",
                        emb.dim(0)?
                    )));
                }
                next += emb.dim(0)?;
                sources.push(emb);
            }
            None if n_image_tokens > 0 => {
                return Err(ModelError::InvalidInput(format!(
                    "{n_image_tokens} image placeholder tokens but no images"
                )))
            }
            None => {}
        }
        let video_base = next;
        match video_embeds {
            Some(emb) => {
                let mut emb = emb.to_dtype(dtype)?;
                if let Some(keep) = &inputs.video_compression_mask {
                    if keep.len() != emb.dim(0)? {
                        return Err(ModelError::InvalidInput(format!(
                            "video_compression_mask has {} entries for {} video tokens",
                            keep.len(),
                            emb.dim(0)?
                        )));
                    }
                    let kept: Vec<u32> = keep.iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i as u32).collect();
                    let idx = Tensor::from_vec(kept.clone(), kept.len(), emb.device())?;
                    emb = emb.index_select(&idx, 0)?;
                }
                if emb.dim(0)? != n_video_tokens {
                    return Err(ModelError::InvalidInput(format!(
                        "Video features and video tokens do not match, tokens: {n_video_tokens}, features: {}",
                        emb.dim(0)?
                    )));
                }
                sources.push(emb);
            }
            None if n_video_tokens > 0 => {
                return Err(ModelError::InvalidInput(format!(
                    "{n_video_tokens} video placeholder tokens but no videos"
                )))
            }
            None => {}
        }
        if sources.len() == 1 {
            return Ok(sources.remove(0).reshape((b, l, ()))?);
        }
        // masked_scatter fills placeholders in row-major order: one gather over [text; image; video].
        let (mut ki, mut kv) = (0u32, 0u32);
        let gather: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(p, &t)| {
                if t == image_id {
                    ki += 1;
                    image_base as u32 + ki - 1
                } else if t == video_id {
                    kv += 1;
                    video_base as u32 + kv - 1
                } else {
                    p as u32
                }
            })
            .collect();
        let all = Tensor::cat(&sources, 0)?;
        let idx = Tensor::from_vec(gather, b * l, all.device())?;
        Ok(all.index_select(&idx, 0)?.reshape((b, l, ()))?)
    }

    /// Final hidden states `[batch, len, hidden]`. Positions come from the padding mask (as in
    /// `generate`); this is a prefill, so `cache` must be empty and is filled.
    pub fn forward(&self, inputs: &MultimodalInputs, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let embeds = self.input_embeddings(inputs)?;
        self.forward_embeds(&embeds, inputs.attention_mask.as_ref(), cache)
    }

    /// Prefill from already stitched embeddings `[batch, len, hidden]`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        if cache.seq_len() != 0 {
            return Err(ModelError::InvalidInput(
                "forward() runs a prefill on an empty cache; use decode_step for cached decoding".into(),
            ));
        }
        let (b, l, _) = embeds.dims3()?;
        let mask = match attention_mask {
            Some(m) if m.dims() != [b, l] => {
                return Err(ModelError::InvalidInput(format!(
                    "attention_mask shape {:?} differs from input_ids [{b}, {l}]",
                    m.dims()
                )))
            }
            Some(m) => m.to_device(embeds.device())?.to_dtype(DType::F32)?,
            None => Tensor::ones((b, l), DType::F32, embeds.device())?,
        };
        let pos = position_ids_from_mask(&mask)?;
        Ok(self
            .language_model
            .forward(&DecoderInputs { inputs_embeds: embeds, position_ids: &pos, attention_mask: &mask }, cache)?)
    }
}

/// `VideoLlama3ForConditionalGeneration`: the base model plus the LM head.
///
/// Single media inference (transformers docs: chat template → processor → `generate` →
/// `batch_decode(skip_special_tokens=True)`), here on the bundled demo checkpoint and clip:
///
/// ```
/// use candle_core::{DType, Device};
/// use vigil::model::{GenerationParams, MultimodalInputs, VideoLlama3ForConditionalGeneration};
/// use vigil::processor::{CallOptions, ContentPart, FrameSampling, Message, Processor, Video};
///
/// let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-videollama3"));
/// let device = Device::Cpu;
/// let model = VideoLlama3ForConditionalGeneration::from_pretrained(dir, DType::F32, &device)?;
/// let processor = Processor::from_pretrained(dir)?;
///
/// let conversation = vec![Message::user(vec![
///     ContentPart::Video,
///     ContentPart::Text { text: "What is happening in this video?".into() },
/// ])];
/// let prompts = processor.apply_chat_template(&[conversation], true)?;
/// let clip = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo.mp4"));
/// let sampling = FrameSampling { fps: Some(1.0), max_frames: Some(4), ..Default::default() };
/// let video = Video::from_file(clip, &sampling, &processor.video_processor.config)?;
/// let batch = processor.call(&prompts, &[], &[video], &CallOptions::default())?;
///
/// let inputs = MultimodalInputs::from_batch(&batch, &device)?;
/// let out = model.generate(&inputs, &GenerationParams::greedy(16), &mut |_| {})?;
/// let answer = processor.decode(&out.tokens[0], true)?;
/// println!("{answer}");
/// assert!(!out.tokens[0].is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Batch mixed media inference: one left-padded batch of an image, a video and a text-only
/// prompt; each row gets the tokens it would get alone.
///
/// ```
/// use candle_core::{DType, Device};
/// use vigil::model::{GenerationParams, MultimodalInputs, VideoLlama3ForConditionalGeneration};
/// use vigil::processor::{CallOptions, ContentPart, Message, PaddingSide, Processor, RgbImage, Video};
///
/// let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-videollama3"));
/// let device = Device::Cpu;
/// let model = VideoLlama3ForConditionalGeneration::from_pretrained(dir, DType::F32, &device)?;
/// let processor = Processor::from_pretrained(dir)?;
///
/// let text = |t: &str| ContentPart::Text { text: t.into() };
/// let conversations = vec![
///     vec![Message::user(vec![ContentPart::Image, text("Describe the image.")])],
///     vec![Message::user(vec![ContentPart::Video, text("What is happening?")])],
///     vec![Message::user(vec![text("What color is the sky?")])],
/// ];
/// let prompts = processor.apply_chat_template(&conversations, true)?;
/// let pixels = |w: usize, h: usize, k: usize| RgbImage::new(w, h, (0..w * h * 3).map(|i| ((i * k) % 251) as u8).collect());
/// let image = pixels(64, 48, 1)?;
/// let video = Video::from_frames((1..=4).map(|k| pixels(96, 72, k)).collect::<Result<_, _>>()?, Some(1.0))?;
/// let opts = CallOptions { padding_side: PaddingSide::Left, ..Default::default() };
/// let batch = processor.call(&prompts, &[image], &[video], &opts)?;
///
/// let params = GenerationParams::greedy(8);
/// let out = model.generate(&MultimodalInputs::from_batch(&batch, &device)?, &params, &mut |_| {})?;
/// for tokens in &out.tokens {
///     println!("{}", processor.decode(tokens, true)?);
/// }
/// // The text-only row alone gives the same tokens.
/// let alone = processor.call(&prompts[2..], &[], &[], &opts)?;
/// let single = model.generate(&MultimodalInputs::from_batch(&alone, &device)?, &params, &mut |_| {})?;
/// assert_eq!(single.tokens[0], out.tokens[2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct VideoLlama3ForConditionalGeneration {
    pub model: VideoLlama3Model,
    lm_head: Tensor, // [vocab, hidden]
    generation: GenerationDefaults,
    device: Device,
    dtype: DType,
}

/// The shard file names a `model.safetensors.index.json` maps weights to (sorted, unique).
pub fn index_shards(index: &Path) -> Result<Vec<String>, ModelError> {
    let text = std::fs::read_to_string(index)
        .map_err(|source| ModelError::Io { path: index.display().to_string(), source })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", index.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::InvalidConfig(format!("{}: no weight_map object", index.display())))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Safetensors files of a checkpoint directory: the shards of the index, or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let paths: Vec<PathBuf> = index_shards(&index)?.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                return Err(ModelError::Io {
                    path: p.display().to_string(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "shard listed in the index is missing"),
                });
            }
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::NoWeights(dir.display().to_string()))
}

impl VideoLlama3ForConditionalGeneration {
    /// Load a Hugging Face checkpoint directory (config.json, generation_config.json, single or
    /// sharded safetensors), converting weights to `dtype`.
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let config = VideoLlama3Config::from_file(dir)?;
        let files = weight_files(dir)?;
        // Read tensor by tensor (not memory-mapped): the peak stays one copy of the weights.
        let st = super::weights::ReadSafetensors::open(&files).map_err(ModelError::from_load)?;
        let vb = VarBuilder::from_backend(Box::new(st), dtype, device.clone());
        let generation = GenerationDefaults::load(dir, &config)?;
        Self::new(&config, vb, generation)
    }

    /// Build from an already opened `VarBuilder` rooted at the checkpoint's top level.
    pub fn new(config: &VideoLlama3Config, vb: VarBuilder, generation: GenerationDefaults) -> Result<Self, ModelError> {
        let model = VideoLlama3Model::new(config, vb.pp("model"))?;
        let t = &config.text_config;
        let lm_head = if config.tie_word_embeddings {
            model.language_model.embed_weight().clone()
        } else {
            vb.pp("lm_head").get((t.vocab_size, t.hidden_size), "weight").map_err(ModelError::from_load)?
        };
        Ok(Self { model, lm_head, generation, device: vb.device().clone(), dtype: vb.dtype() })
    }

    pub fn config(&self) -> &VideoLlama3Config {
        self.model.config()
    }
    pub fn generation_defaults(&self) -> &GenerationDefaults {
        &self.generation
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Logits `[batch, len, vocab]` (f32) for hidden states `[batch, len, hidden]`.
    ///
    /// One 2-D matmul over contiguous rows: a batched matmul of a strided view (the last
    /// position of a prefill) against the broadcast `[vocab, hidden]` matrix materialises that
    /// matrix once per row (gigabytes at the 2B's vocabulary).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let (b, l, h) = hidden.dims3()?;
        let rows = hidden.contiguous()?.reshape((b * l, h))?;
        let logits = rows.matmul(&self.lm_head.t()?)?;
        let vocab = logits.dim(1)?;
        Ok(logits.reshape((b, l, vocab))?.to_dtype(DType::F32)?)
    }

    /// Prefill forward over all positions: logits `[batch, len, vocab]`; fills `cache`.
    pub fn forward(&self, inputs: &MultimodalInputs, cache: &mut KvCache) -> Result<ModelOutput, ModelError> {
        let hidden = self.model.forward(inputs, cache)?;
        Ok(ModelOutput { logits: self.lm_head(&hidden)? })
    }

    /// Prefill returning only the last position's logits `[batch, vocab]` (what generation needs).
    pub fn prefill_last(&self, inputs: &MultimodalInputs, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let embeds = self.model.input_embeddings(inputs)?;
        self.prefill_last_embeds(&embeds, inputs.attention_mask.as_ref(), cache)
    }

    /// [`Self::prefill_last`] from stitched embeddings (see [`VideoLlama3Model::input_embeddings`]).
    pub fn prefill_last_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let hidden = self.model.forward_embeds(embeds, attention_mask, cache)?;
        let l = hidden.dim(1)?;
        Ok(self.lm_head(&hidden.narrow(1, l - 1, 1)?)?.squeeze(1)?)
    }

    /// One cached decode step: `tokens` `[batch]` at `positions` `[batch]`; logits `[batch, vocab]`.
    pub fn decode_step(&self, tokens: &[u32], positions: &[i64], cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let b = tokens.len();
        let vocab = self.config().text_config.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        if positions.len() != b || cache.seq_len() == 0 {
            return Err(ModelError::InvalidInput(
                "decode_step needs a prefilled cache and one position per row".into(),
            ));
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &self.device)?;
        let embeds = self.model.language_model.embed(&ids)?;
        let pos = Tensor::from_vec(positions.to_vec(), (b, 1), &self.device)?;
        let mask = Tensor::ones((b, 1), DType::F32, &self.device)?;
        let hidden = self
            .model
            .language_model
            .forward(&DecoderInputs { inputs_embeds: &embeds, position_ids: &pos, attention_mask: &mask }, cache)?;
        Ok(self.lm_head(&hidden)?.squeeze(1)?)
    }
}
