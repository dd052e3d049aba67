//! The model side of the engine: a batch of windows × prompts → answers, with the three exact
//! optimisations (per-frame feature cache, one video prefill per window, cross-stream batches),
//! and the plain one-request path they must agree with.
//!
//! Source of truth for what a single request computes: `VideoLlama3Processor` +
//! `VideoLlama3ForConditionalGeneration.generate` (transformers 5.24), as implemented in
//! `processor` and `model::generate`: one user turn holding the video then the question, the
//! chat template with the generation prompt, the window's frames as a video at the stream's fps
//! (timestamps `i / fps`).
//!
//! Why the batched path is the same computation:
//! - vision: see [`super::features`] (attention is per frame).
//! - prefix sharing: the decoder is causal, so the keys/values of a token depend only on the
//!   tokens before it. Every prompt of a window renders as `head ++ tail` where `head` ends with
//!   the video placeholder; the prompt's full `input_ids` are checked to start with the
//!   tokenized (expanded) head, so the head's KV is literally a prefix of each prompt's
//!   prefill. A prompt failing the check is prefilled on its own (`prefix_fallbacks`).
//! - batching: rows are left-padded (prefix) or mid-padded (suffix); padded keys are masked and
//!   every row keeps the RoPE positions it has alone (`0..len`), as in `generate`.
//! - decoding: per-row EOS, `max_new_tokens`, repetition penalty and one seeded RNG per row
//!   (a row samples as it would in a batch of one).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::features::{FeatureCache, FrameKey, LruCache};
use super::pixels::PixelNorm;
use super::{EngineError, PromptResult};
use crate::config::{PromptConfig, PruningConfig};
use crate::model::text::DecoderInputs;
use crate::model::{
    DecodeRow, Decoding, GenerationParams, KvCache, ModelError, MultimodalInputs, VideoLlama3ForConditionalGeneration,
    VisualInputs,
};
use crate::processor::video::FrameRef;
use crate::processor::{
    py_format_1f, CallOptions, ContentPart, Message, PaddingSide, Processor, ProcessorError, RgbImage, Video,
    VideoInputs,
};
use crate::window::Window;

/// Which optimisations the batched path uses (all on in the daemon; the bench and tests turn
/// them off to compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Re-use per-frame vision features across windows (needs `feature_cache_frames > 0`).
    pub feature_cache: bool,
    /// Prefill a window's video once for all its prompts.
    pub share_prefix: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { feature_cache: true, share_prefix: true }
    }
}

/// Counter increments from one batch (folded into `EngineCounters` by the engine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunStats {
    pub vision_cache_hits: u64,
    pub vision_cache_misses: u64,
    /// Frames run through the vision tower.
    pub frames_encoded: u64,
    pub prefix_shared: u64,
    pub prefix_fallbacks: u64,
    pub video_prefills: u64,
    /// Real (unpadded) tokens prefilled as video prefixes, and as per-prompt suffixes.
    pub prefix_tokens: u64,
    pub suffix_tokens: u64,
    /// Padding positions the packed prefix prefill did not compute (what left-padding the
    /// batch's prefixes to the longest would have added).
    pub prefix_padding_skipped: u64,
    pub sequences: u64,
    pub visual_tokens_total: u64,
    pub visual_tokens_kept: u64,
    pub tokens_generated: u64,
    /// Frames whose preprocessed pixels came from the cache / were resized and normalized.
    pub pixel_cache_hits: u64,
    pub pixel_cache_misses: u64,
    /// Wall time of the batch's stages: processor (resize, normalize, template, tokenize),
    /// vision tower, prefills, decoding.
    pub preprocess: Duration,
    pub vision: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    /// The most KV-cache bytes the batch held at once (the prefix cache and its fork overlap).
    pub kv_cache_bytes: u64,
}

/// One window and the prompts due for it.
#[derive(Debug, Clone)]
pub struct WindowWork {
    pub stream: String,
    pub window: Arc<Window>,
    /// Frame rate the window was sampled at (timestamps are `i / fps`).
    pub fps: f64,
    pub prompts: Vec<PromptConfig>,
    /// Time the job waited in the queue (reported with each answer).
    pub queue: Duration,
}

/// Why a window's prompts could not be answered. Shared (`Arc`) by every prompt a failure
/// touches: a batch that fails fails each of its prompts with the same error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The window or a prompt cannot be run as given (no frames, a bad fps, a template that
    /// does not fit the video).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizers::Error),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("engine shutting down")]
    ShuttingDown,
    #[error("engine panic")]
    Panicked,
    /// A broken invariant of the runner itself.
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// One prompt's outcome: an answer or why it failed.
pub type PromptOutcome = Result<PromptResult, Arc<RunError>>;

/// A window after preprocessing.
struct Prepared {
    /// Video patch rows `[rows, patch_dim]` flattened, of resized bytes (normalized on the
    /// device: [`PixelNorm`]); grid `[t, h, w]`, merge size.
    pixels: Vec<u8>,
    patch_dim: usize,
    grid: [usize; 3],
    merge: usize,
    keep: Vec<bool>,
    /// Tokenized head (ends with the last visual placeholder).
    prefix_ids: Vec<u32>,
    rows: Vec<PreparedPrompt>,
    visual_total: u32,
    visual_kept: u32,
    /// Per frame, the key of its RGB content and target size: the pixel cache and the vision
    /// cache both use it, so no frame is hashed twice.
    frame_keys: Vec<FrameKey>,
}

struct PreparedPrompt {
    full_ids: Vec<u32>,
    /// `full_ids[..split]` is computed as a (possibly shared) prefix, the rest as this row's suffix.
    split: usize,
    shared: bool,
}

/// Where a decoded row comes from: its window (job) and prompt.
struct RowOf {
    job: usize,
    prompt: usize,
    /// The row's prompt length (prefix + suffix).
    full_len: usize,
}

/// What the prefills hand to decoding: per row its origin and decode state, the cache and the
/// last position's logits.
struct Prefilled {
    of: Vec<RowOf>,
    rows: Vec<DecodeRow>,
    cache: KvCache,
    logits: Tensor,
}

/// A prefix prefilled once and forked into its rows: a window's shared video + head, or an
/// unshared prompt's own prefix.
struct Group {
    job: usize,
    ids: Vec<u32>,
}

/// Owns the model and processor; runs batches (on the engine thread).
pub struct Runner {
    pub model: VideoLlama3ForConditionalGeneration,
    pub processor: Arc<Processor>,
    params: GenerationParams,
    cache: FeatureCache,
    options: RunOptions,
    decoding: Decoding,
    /// Preprocessing for [`Runner::run_batch`]; a pipelined engine runs its own
    /// ([`Runner::preparer`]) on another thread.
    prep: Preparer,
    pixel_norm: PixelNorm,
}

/// The CPU side of a batch: processor work (template, tokenizer, resize, normalize, patches,
/// pruning mask, frame keys) with its cache of preprocessed frames. Independent of the model,
/// so it can prepare the next batch on its own thread while the model computes this one.
pub struct Preparer {
    processor: Arc<Processor>,
    pruning: PruningConfig,
    /// Resized patch rows (bytes) per (frame content, target size): overlapping windows resize
    /// each frame once.
    pixel_cache: LruCache<Arc<Vec<u8>>>,
    options: RunOptions,
}

/// A batch after preprocessing: per window its prepared inputs or why it failed.
pub struct PreparedBatch {
    preps: Vec<Result<Prepared, Arc<RunError>>>,
    stats: RunStats,
}

impl PreparedBatch {
    /// A batch of `n` windows that all failed with `error`.
    pub fn failed(n: usize, error: RunError) -> PreparedBatch {
        let error = Arc::new(error);
        PreparedBatch { preps: (0..n).map(|_| Err(error.clone())).collect(), stats: RunStats::default() }
    }
}

impl Runner {
    /// `params`: sampling and the default `max_new_tokens` (from `[model]`).
    pub fn new(
        model: VideoLlama3ForConditionalGeneration,
        processor: Processor,
        params: GenerationParams,
        pruning: PruningConfig,
        feature_cache_frames: usize,
    ) -> Result<Self, EngineError> {
        let decoding = Decoding::resolve(&params, model.generation_defaults())
            .map_err(|e| EngineError::checkpoint(e.to_string()))?;
        let cfg = model.config();
        if processor.video_token_id != cfg.video_token_id || processor.image_token_id != cfg.image_token_id {
            return Err(EngineError::checkpoint(format!(
                "tokenizer placeholder ids (image {}, video {}) differ from the model's (image {}, video {})",
                processor.image_token_id, processor.video_token_id, cfg.image_token_id, cfg.video_token_id
            )));
        }
        if processor.video_processor.config.base.temporal_patch_size != 1 {
            return Err(EngineError::checkpoint("video temporal_patch_size must be 1 (VideoLLaMA3)".into()));
        }
        let vp = &processor.video_processor;
        let pixel_norm = PixelNorm::new(&vp.config.base.norm(), vp.patch_dim(), model.device())
            .map_err(|e| EngineError::checkpoint(e.to_string()))?;
        let processor = Arc::new(processor);
        let options = RunOptions::default();
        let prep = Preparer {
            processor: processor.clone(),
            pruning,
            pixel_cache: LruCache::new(feature_cache_frames),
            options,
        };
        Ok(Self {
            model,
            processor,
            params,
            cache: FeatureCache::new(feature_cache_frames),
            options,
            decoding,
            prep,
            pixel_norm,
        })
    }

    pub fn feature_cache(&self) -> &FeatureCache {
        &self.cache
    }

    pub fn options(&self) -> RunOptions {
        self.options
    }

    /// Which optimisations run (the bench and tests compare them).
    pub fn set_options(&mut self, options: RunOptions) {
        self.options = options;
        self.prep.options = options;
    }

    /// A preprocessor for another thread: the same processor and settings, its own frame cache.
    pub fn preparer(&self) -> Preparer {
        Preparer {
            processor: self.processor.clone(),
            pruning: self.prep.pruning.clone(),
            pixel_cache: LruCache::new(self.prep.pixel_cache.capacity()),
            options: self.options,
        }
    }

    fn max_new(&self, p: &PromptConfig) -> usize {
        p.max_new_tokens.unwrap_or(self.params.max_new_tokens)
    }

    /// The chat-template text of one (window, prompt) request: the video, then the question.
    pub fn render(&self, question: &str) -> Result<String, RunError> {
        self.prep.render(question)
    }

    /// The plain path: one (window, prompt) through the processor and `generate`, exactly as a
    /// single `vigil infer --frames ... --fps F --prompt Q` request. The reference the batched
    /// path must equal, and the "optimisations off" side of the bench.
    pub fn run_alone(
        &self,
        stream: &str,
        window: &Window,
        fps: f64,
        prompt: &PromptConfig,
    ) -> Result<PromptResult, RunError> {
        let t0 = Instant::now();
        let text = self.render(&prompt.text)?;
        let video = Preparer::video_of(window, fps)?;
        let inputs = self.processor.call(&[text], &[], &[video], &self.prep.call_options())?;
        let dev = self.model.device();
        let ids = inputs.input_ids[0].clone();
        let n = ids.len();
        let v = &inputs.videos;
        let mm = MultimodalInputs {
            videos: Some(VisualInputs {
                pixel_values: Tensor::from_vec(v.pixel_values_videos.clone(), (v.rows(), v.patch_dim), dev)?,
                grid_thw: v.video_grid_thw.clone(),
                merge_sizes: v.video_merge_sizes.clone(),
            }),
            video_compression_mask: Some(v.video_compression_mask.clone()),
            ..MultimodalInputs::text(Tensor::from_vec(ids, (1, n), dev)?)
        };
        let prep = t0.elapsed();
        let params = GenerationParams { max_new_tokens: self.max_new(prompt), ..self.params.clone() };
        let out = self.model.generate(&mm, &params, &mut |_| {})?;
        let tokens = out.tokens[0].clone();
        let kept = v.video_compression_mask.iter().filter(|k| **k).count() as u32;
        self.result(
            stream,
            window.seq,
            prompt,
            &tokens,
            n as u32,
            v.video_compression_mask.len() as u32,
            kept,
            [
                Duration::ZERO,
                prep + Duration::from_secs_f64(out.vision_ms / 1e3),
                Duration::from_secs_f64(out.prefill_ms / 1e3),
                Duration::from_secs_f64(out.decode_ms / 1e3),
            ],
        )
    }

    /// The vision tower and projector alone on one window (preprocessing excluded), for
    /// `vigil bench`: returns the merged visual tokens before pruning, the patch grid
    /// `[frames, h, w]` and the time taken.
    pub fn time_vision(&self, window: &Window, fps: f64) -> Result<(usize, [usize; 3], Duration), RunError> {
        let text = self.render("")?;
        let video = Preparer::video_of(window, fps)?;
        let v = self.processor.call(&[text], &[], &[video], &self.prep.call_options())?.videos;
        let dev = self.model.device();
        let vi = VisualInputs {
            pixel_values: Tensor::from_vec(v.pixel_values_videos.clone(), (v.rows(), v.patch_dim), dev)?,
            grid_thw: v.video_grid_thw.clone(),
            merge_sizes: v.video_merge_sizes.clone(),
        };
        dev.synchronize()?;
        let t0 = Instant::now();
        let feats = self.model.model.get_video_features(&vi)?;
        dev.synchronize()?;
        let took = t0.elapsed();
        let grid =
            v.video_grid_thw.first().copied().ok_or(RunError::Internal("the processor returned no video grid"))?;
        Ok((feats.iter().map(|f| f.dim(0).unwrap_or(0)).sum(), grid, took))
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        stream: &str,
        window_seq: u64,
        prompt: &PromptConfig,
        tokens: &[u32],
        prompt_tokens: u32,
        visual_total: u32,
        visual_kept: u32,
        [queue, vision, prefill, decode]: [Duration; 4],
    ) -> Result<PromptResult, RunError> {
        let text = self.processor.decode(tokens, true)?.trim().to_string();
        let parsed = super::answer::parse_answer(prompt.kind, &text);
        Ok(PromptResult {
            stream: stream.to_string(),
            window_seq,
            prompt: prompt.name.clone(),
            question: prompt.text.clone(),
            kind: prompt.kind,
            text,
            value: parsed.value.unwrap_or(serde_json::Value::Null),
            parse_error: parsed.parse_error,
            tokens: tokens.to_vec(),
            prompt_tokens,
            generated_tokens: tokens.len() as u32,
            visual_total,
            visual_kept,
            queue,
            vision,
            prefill,
            decode,
        })
    }

    /// Projected video features `[tokens, hidden]` per prepared window (pre-pruning), one
    /// vision-tower call per distinct frame size for the frames not in the cache.
    fn vision(&mut self, preps: &[Option<Prepared>], stats: &mut RunStats) -> Result<Vec<Option<Tensor>>, RunError> {
        let use_cache = self.options.feature_cache && self.cache.capacity() > 0;
        if !use_cache {
            // The plain path: each window's video through the tower as one item.
            return preps
                .iter()
                .map(|p| {
                    let Some(p) = p else { return Ok(None) };
                    stats.frames_encoded += p.grid[0] as u64;
                    let vi = VisualInputs {
                        pixel_values: self.pixel_norm.upload(p.pixels.clone(), p.patch_dim)?,
                        grid_thw: vec![p.grid],
                        merge_sizes: vec![p.merge],
                    };
                    let mut f = self.model.model.get_video_features(&vi)?;
                    Ok(Some(f.remove(0)))
                })
                .collect();
        }
        // Frame keys; misses de-duplicated across the batch (a frame shared by two windows of
        // one batch is encoded once and counts as a hit for the second).
        let mut found: HashMap<FrameKey, Tensor> = HashMap::new();
        let mut missing: Vec<(FrameKey, usize, usize, usize)> = Vec::new(); // key, prep, frame, patch_dim
        let mut keys: Vec<Vec<FrameKey>> = Vec::with_capacity(preps.len());
        for (pi, p) in preps.iter().enumerate() {
            let Some(p) = p else {
                keys.push(Vec::new());
                continue;
            };
            let t = p.grid[0];
            let mut ks = Vec::with_capacity(t);
            for f in 0..t {
                let key = *p.frame_keys.get(f).ok_or(RunError::Internal("a frame without its key"))?;
                if found.contains_key(&key) || missing.iter().any(|m| m.0 == key) {
                    stats.vision_cache_hits += 1;
                } else if let Some(feat) = self.cache.get(&key) {
                    stats.vision_cache_hits += 1;
                    found.insert(key, feat);
                } else {
                    stats.vision_cache_misses += 1;
                    missing.push((key, pi, f, p.patch_dim));
                }
                ks.push(key);
            }
            keys.push(ks);
        }
        // Encode the misses, grouped by (grid, merge): frames of one size form one item.
        // (grid h, grid w, merge, patch_dim) → (key, window, frame) of the frames to encode.
        type Size = (usize, usize, usize, usize);
        type Frames = Vec<(FrameKey, usize, usize)>;
        let mut by_size: Vec<(Size, Frames)> = Vec::new();
        for &(key, pi, f, pd) in &missing {
            let p = preps[pi].as_ref().expect("missing frames come from prepared windows");
            let size = (p.grid[1], p.grid[2], p.merge, pd);
            match by_size.iter_mut().find(|(s, _)| *s == size) {
                Some((_, v)) => v.push((key, pi, f)),
                None => by_size.push((size, vec![(key, pi, f)])),
            }
        }
        for ((gh, gw, merge, pd), frames) in by_size {
            let per = gh * gw * pd;
            let mut pixels = Vec::with_capacity(per * frames.len());
            for &(_, pi, f) in &frames {
                let p = preps[pi].as_ref().expect("prepared");
                pixels.extend_from_slice(&p.pixels[f * per..(f + 1) * per]);
            }
            stats.frames_encoded += frames.len() as u64;
            let vi = VisualInputs {
                pixel_values: self.pixel_norm.upload(pixels, pd)?,
                grid_thw: vec![[frames.len(), gh, gw]],
                merge_sizes: vec![merge],
            };
            let feats = self.model.model.get_video_features(&vi)?.remove(0);
            let tok = gh * gw / (merge * merge);
            for (i, &(key, _, _)) in frames.iter().enumerate() {
                // A copy, so a cached frame does not pin the whole batch's feature tensor.
                let one = feats.narrow(0, i * tok, tok)?.copy()?;
                self.cache.insert(key, one.clone());
                found.insert(key, one);
            }
        }
        Ok(keys
            .iter()
            .zip(preps)
            .map(|(ks, p)| {
                p.as_ref()?;
                let parts: Vec<Tensor> = ks.iter().map(|k| found[k].clone()).collect();
                Tensor::cat(&parts, 0).ok()
            })
            .collect())
    }

    /// Run a batch of windows; one outcome per (window, prompt), in order. `alive` is called
    /// between steps (heartbeat); `abort` stops generation early (shutdown).
    pub fn run_batch(
        &mut self,
        work: &[WindowWork],
        alive: &dyn Fn(),
        abort: &AtomicBool,
    ) -> (Vec<Vec<PromptOutcome>>, RunStats) {
        let prepared = self.prep.prepare_batch(work);
        alive();
        self.compute_batch(work, prepared, alive, abort)
    }

    /// The model side of [`Runner::run_batch`] for a batch [`Preparer::prepare_batch`] prepared.
    pub fn compute_batch(
        &mut self,
        work: &[WindowWork],
        prepared: PreparedBatch,
        alive: &dyn Fn(),
        abort: &AtomicBool,
    ) -> (Vec<Vec<PromptOutcome>>, RunStats) {
        let PreparedBatch { preps, mut stats } = prepared;
        let mut out: Vec<Vec<Option<PromptOutcome>>> = work.iter().map(|w| vec![None; w.prompts.len()]).collect();
        let preps: Vec<Option<Prepared>> = preps
            .into_iter()
            .enumerate()
            .map(|(j, p)| match p {
                Ok(p) => Some(p),
                Err(e) => {
                    for o in out[j].iter_mut() {
                        *o = Some(Err(e.clone()));
                    }
                    None
                }
            })
            .collect();
        let t_tower = Instant::now();
        let feats = match self.vision(&preps, &mut stats) {
            Ok(f) => f,
            Err(e) => {
                return (fill(out, &Arc::new(e)), stats);
            }
        };
        // Kernels run asynchronously on a GPU: wait, so the stage times are the stages'.
        let _ = self.model.device().synchronize();
        stats.vision = t_tower.elapsed();
        let vision = stats.preprocess + stats.vision;
        alive();
        match self.generate_batch(work, &preps, &feats, vision, alive, abort, &mut stats) {
            Ok(results) => {
                for (j, p, r) in results {
                    out[j][p] = Some(r);
                }
                (fill(out, &Arc::new(RunError::Internal("no result"))), stats)
            }
            Err(e) => (fill(out, &Arc::new(e)), stats),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn generate_batch(
        &self,
        work: &[WindowWork],
        preps: &[Option<Prepared>],
        feats: &[Option<Tensor>],
        vision: Duration,
        alive: &dyn Fn(),
        abort: &AtomicBool,
        stats: &mut RunStats,
    ) -> Result<Vec<(usize, usize, PromptOutcome)>, RunError> {
        let (groups, row_group, of) = self.group(preps, stats);
        if of.is_empty() {
            return Ok(Vec::new());
        }
        let t_prefill = Instant::now();
        let prefix_cache = self.prefill_prefixes(&groups, preps, feats)?;
        alive();
        let Prefilled { of, mut rows, mut cache, logits } =
            self.prefill_suffixes(work, preps, prefix_cache, &row_group, of, stats)?;
        let _ = self.model.device().synchronize();
        let prefill = t_prefill.elapsed();
        stats.prefill = prefill;
        alive();

        let t_decode = Instant::now();
        let mut step = || {
            alive();
            !abort.load(Ordering::Relaxed)
        };
        match self.model.decode_rows(&self.decoding, &mut rows, logits, &mut cache, &mut |_| {}, &mut step) {
            Ok(()) => {}
            Err(ModelError::Interrupted) => return Err(RunError::ShuttingDown),
            Err(e) => return Err(e.into()),
        }
        stats.decode = t_decode.elapsed();
        let mut results = Vec::with_capacity(rows.len());
        for (o, r) in of.iter().zip(&rows) {
            let p = preps[o.job].as_ref().expect("prepared");
            stats.tokens_generated += r.tokens.len() as u64;
            let res = self.result(
                &work[o.job].stream,
                work[o.job].window.seq,
                &work[o.job].prompts[o.prompt],
                &r.tokens,
                o.full_len as u32,
                p.visual_total,
                p.visual_kept,
                [work[o.job].queue, vision, prefill, r.decode],
            );
            results.push((o.job, o.prompt, res.map_err(Arc::new)));
        }
        Ok(results)
    }

    /// The batch's prefix groups (one per window for its shared rows, one per unshared row),
    /// each row's group, and where each row comes from.
    fn group(&self, preps: &[Option<Prepared>], stats: &mut RunStats) -> (Vec<Group>, Vec<usize>, Vec<RowOf>) {
        let mut groups: Vec<Group> = Vec::new();
        let mut row_group: Vec<usize> = Vec::new();
        let mut of: Vec<RowOf> = Vec::new();
        for (j, p) in preps.iter().enumerate() {
            let Some(p) = p else { continue };
            stats.visual_tokens_total += p.visual_total as u64;
            stats.visual_tokens_kept += p.visual_kept as u64;
            let mut shared_group = None;
            for (pi, r) in p.rows.iter().enumerate() {
                let g = if r.shared {
                    match shared_group {
                        Some(g) => {
                            stats.prefix_shared += 1;
                            g
                        }
                        None => {
                            groups.push(Group { job: j, ids: p.prefix_ids.clone() });
                            shared_group = Some(groups.len() - 1);
                            groups.len() - 1
                        }
                    }
                } else {
                    groups.push(Group { job: j, ids: r.full_ids[..r.split].to_vec() });
                    groups.len() - 1
                };
                row_group.push(g);
                of.push(RowOf { job: j, prompt: pi, full_len: r.full_ids.len() });
            }
        }
        if !of.is_empty() {
            stats.video_prefills += groups.len() as u64;
            let real = groups.iter().map(|g| g.ids.len() as u64).sum::<u64>();
            let longest = groups.iter().map(|g| g.ids.len() as u64).max().unwrap_or(0);
            stats.prefix_tokens += real;
            stats.prefix_padding_skipped += longest * groups.len() as u64 - real;
            stats.sequences += of.len() as u64;
        }
        (groups, row_group, of)
    }

    /// Prefix prefill (video + head) of all groups of the batch at once, packed back to back:
    /// the linear layers see only real tokens, however unequal the groups' lengths (pruning
    /// makes them so). The cache comes out left-padded to the longest group, as the suffix
    /// prefill's fork expects.
    fn prefill_prefixes(
        &self,
        groups: &[Group],
        preps: &[Option<Prepared>],
        feats: &[Option<Tensor>],
    ) -> Result<KvCache, RunError> {
        let dev = self.model.device().clone();
        let pad_id = self.decoding.pad;
        let lens: Vec<usize> = groups.iter().map(|g| g.ids.len()).collect();
        let lp = lens.iter().copied().max().unwrap_or(0);
        let mut ids = Vec::with_capacity(groups.len() * lp);
        let mut embeds = Vec::with_capacity(groups.len());
        let mut keep = Vec::new();
        // Where each group's real tokens sit in the padded `[groups·lp]` rows.
        let mut real = Vec::with_capacity(lens.iter().sum());
        for (i, (g, &len)) in groups.iter().zip(&lens).enumerate() {
            let pad = lp - len;
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(&g.ids);
            real.extend((i * lp + pad..(i + 1) * lp).map(|r| r as u32));
            embeds.push(feats[g.job].clone().ok_or(RunError::Internal("no features"))?);
            keep.extend_from_slice(&preps[g.job].as_ref().ok_or(RunError::Internal("no prep"))?.keep);
        }
        let ng = groups.len();
        let mm = MultimodalInputs {
            video_embeds: Some(Tensor::cat(&embeds, 0)?),
            video_compression_mask: Some(keep),
            ..MultimodalInputs::text(Tensor::from_vec(ids, (ng, lp), &dev)?)
        };
        // The stitch is the model's own (placeholders in order across rows); only its real rows
        // go on.
        let stitched = self.model.model.input_embeddings(&mm)?;
        let hidden = stitched.dim(2)?;
        let n = real.len();
        let packed = stitched.reshape((ng * lp, hidden))?.index_select(&Tensor::from_vec(real, n, &dev)?, 0)?;
        // Only forked, never appended to: no room reserved.
        let mut cache = KvCache::with_headroom(0);
        self.model.model.language_model().prefill_packed(&packed.unsqueeze(0)?, &lens, &mut cache)?;
        Ok(cache)
    }

    /// Fork each group's cache into its rows, then prefill the rows' suffixes (mid-padded: each
    /// row keeps the positions it has alone); the last position's logits start decoding.
    fn prefill_suffixes(
        &self,
        work: &[WindowWork],
        preps: &[Option<Prepared>],
        prefix_cache: KvCache,
        row_group: &[usize],
        of: Vec<RowOf>,
        stats: &mut RunStats,
    ) -> Result<Prefilled, RunError> {
        let dev = self.model.device().clone();
        let nr = of.len();
        let suffix_of = |o: &RowOf| {
            let pr = &preps[o.job].as_ref().expect("prepared").rows[o.prompt];
            (&pr.full_ids[pr.split..], pr.split)
        };
        let ls = of.iter().map(|o| suffix_of(o).0.len()).max().unwrap_or(1);
        // Each fork has room for exactly its suffix and the tokens it may decode.
        let decode = of.iter().map(|o| self.max_new(&work[o.job].prompts[o.prompt])).max().unwrap_or(0);
        let mut cache = prefix_cache.select_rows_reserving(row_group, ls + decode)?;
        stats.kv_cache_bytes = stats.kv_cache_bytes.max((prefix_cache.bytes() + cache.bytes()) as u64);
        drop(prefix_cache);
        let (mut sids, mut smask, mut spos) = (Vec::new(), Vec::new(), Vec::new());
        for o in &of {
            let (suf, start) = suffix_of(o);
            stats.suffix_tokens += suf.len() as u64;
            let pad = ls - suf.len();
            sids.extend(std::iter::repeat_n(self.decoding.pad, pad));
            sids.extend_from_slice(suf);
            smask.extend(std::iter::repeat_n(0f32, pad));
            smask.extend(std::iter::repeat_n(1f32, suf.len()));
            spos.extend(std::iter::repeat_n(0i64, pad));
            spos.extend((0..suf.len()).map(|i| (start + i) as i64));
        }
        let sids = Tensor::from_vec(sids, (nr, ls), &dev)?;
        let lm = self.model.model.language_model();
        let emb = lm.embed(&sids)?;
        let smask = Tensor::from_vec(smask, (nr, ls), &dev)?;
        let spos = Tensor::from_vec(spos, (nr, ls), &dev)?;
        let hidden = lm
            .forward(&DecoderInputs { inputs_embeds: &emb, position_ids: &spos, attention_mask: &smask }, &mut cache)?;
        stats.kv_cache_bytes = stats.kv_cache_bytes.max(cache.bytes() as u64);
        let logits = self.model.lm_head(&hidden.narrow(1, ls - 1, 1)?)?.squeeze(1)?;
        let rows = of
            .iter()
            .map(|o| {
                let full = &preps[o.job].as_ref().expect("prepared").rows[o.prompt].full_ids;
                DecodeRow::new(&self.decoding, full, self.max_new(&work[o.job].prompts[o.prompt]), full.len() as i64)
            })
            .collect();
        Ok(Prefilled { of, rows, cache, logits })
    }
}

impl Preparer {
    /// Processor work for every window of a batch.
    pub fn prepare_batch(&mut self, work: &[WindowWork]) -> PreparedBatch {
        let mut stats = RunStats::default();
        let t0 = Instant::now();
        let preps = work.iter().map(|w| self.prepare(w, &mut stats).map_err(Arc::new)).collect();
        stats.preprocess = t0.elapsed();
        PreparedBatch { preps, stats }
    }

    fn video_of(window: &Window, fps: f64) -> Result<Video, RunError> {
        if window.frames.is_empty() {
            return Err(RunError::Input(format!("window {} of {} has no frames", window.seq, window.stream)));
        }
        let frames = window
            .frames
            .iter()
            .map(|f| RgbImage::new(f.width as usize, f.height as usize, f.data.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Video::from_frames(frames, Some(fps))?)
    }

    /// The chat-template text of one (window, prompt) request: the video, then the question.
    pub fn render(&self, question: &str) -> Result<String, RunError> {
        let conv = vec![Message::user(vec![ContentPart::Video, ContentPart::Text { text: question.to_string() }])];
        let mut r = self.processor.apply_chat_template(&[conv], true)?;
        Ok(r.remove(0))
    }

    fn call_options(&self) -> CallOptions {
        CallOptions { padding_side: PaddingSide::Left, pruning: self.pruning.clone() }
    }

    /// Processor work for one window: the video's patches and mask, the tokenized head and each
    /// prompt's full ids with where its suffix starts.
    fn prepare(&mut self, work: &WindowWork, stats: &mut RunStats) -> Result<Prepared, RunError> {
        let vtok = self.processor.files.video_token.clone();
        let itok = self.processor.files.image_token.clone();
        let mut heads = Vec::with_capacity(work.prompts.len());
        for p in &work.prompts {
            let text = self.render(&p.text)?;
            if text.matches(&vtok).count() != 1 || text.contains(&itok) {
                return Err(RunError::Input(format!(
                    "prompt {:?}: the rendered conversation must hold exactly one {vtok} and no {itok} (does the question contain a placeholder?)",
                    p.name
                )));
            }
            let cut = text.find(&vtok).unwrap_or(0) + vtok.len();
            let (head, tail) = text.split_at(cut);
            heads.push((head.to_string(), tail.to_string()));
        }
        let video = || Self::video_of(&work.window, work.fps);
        let opts = self.call_options();
        let first = heads.first().ok_or_else(|| RunError::Input("a job without prompts".into()))?.0.clone();
        let first = &first;
        let (v, pixels, frame_keys) = self.video_rows(&work.window, work.fps, stats)?;
        // The processor's placeholder expansion (`replace_video_token`) of the head.
        let per = v.mask_of(0).len() / v.timestamps[0].len().max(1);
        let repl: Vec<String> = v
            .mask_of(0)
            .chunks(per.max(1))
            .zip(&v.timestamps[0])
            .map(|(chunk, t)| {
                format!("Time {}s:{}", py_format_1f(*t), vtok.repeat(chunk.iter().filter(|k| **k).count()))
            })
            .collect();
        let expanded_head = first.replacen(&vtok, &repl.join(","), 1);
        let prefix_ids = self.processor.tokenizer.encode(expanded_head.as_str(), true)?.get_ids().to_vec();
        let encode = |s: &str| -> Result<Vec<u32>, RunError> {
            Ok(self.processor.tokenizer.encode(s, true)?.get_ids().to_vec())
        };
        let (vid, iid) = (self.processor.video_token_id, self.processor.image_token_id);
        let mut rows = Vec::with_capacity(heads.len());
        for (head, tail) in &heads {
            let full_ids = if head == first {
                encode(&format!("{expanded_head}{tail}"))?
            } else {
                // The template put something prompt-specific before the video: its own expansion.
                let own = self.processor.call(&[format!("{head}{tail}")], &[], &[video()?], &opts)?;
                own.input_ids[0].clone()
            };
            if full_ids.len() < 2 {
                return Err(RunError::Input("the rendered prompt is too short".into()));
            }
            // Sharing is exact only if the prompt's own ids start with the shared head's ids
            // (no BPE merge across the boundary) and the suffix holds no visual placeholder.
            let n = prefix_ids.len();
            let can_share = head == first
                && full_ids.len() > n
                && full_ids[..n] == prefix_ids[..]
                && !full_ids[n..].iter().any(|&t| t == vid || t == iid);
            if self.options.share_prefix && can_share {
                rows.push(PreparedPrompt { full_ids, split: n, shared: true });
            } else {
                if self.options.share_prefix {
                    stats.prefix_fallbacks += 1;
                    tracing::debug!(stream = %work.stream, "prompt ids do not extend the shared video prefix; prefilled alone");
                }
                let split = full_ids.len() - 1;
                if full_ids[split..].iter().any(|&t| t == vid || t == iid) {
                    return Err(RunError::Input("the rendered prompt ends with a visual placeholder".into()));
                }
                rows.push(PreparedPrompt { full_ids, split, shared: false });
            }
        }
        if v.video_grid_thw.len() != 1 {
            return Err(RunError::Internal("expected one video"));
        }
        let kept = v.video_compression_mask.iter().filter(|k| **k).count() as u32;
        Ok(Prepared {
            patch_dim: v.patch_dim,
            grid: v.video_grid_thw[0],
            merge: v.video_merge_sizes[0],
            visual_total: v.video_compression_mask.len() as u32,
            visual_kept: kept,
            keep: v.video_compression_mask,
            pixels,
            prefix_ids,
            rows,
            frame_keys,
        })
    }

    /// `VideoProcessor::preprocess` for one window's frames, by the processor's own clip steps,
    /// except that the patch rows stay resized bytes (normalized on the device; the pruning
    /// mask reads them through the same tables). Each frame's rows are cached by content and
    /// target size when the feature cache is on. Returns the video (without pixels), the byte
    /// rows and the frame keys.
    fn video_rows(
        &mut self,
        window: &Window,
        fps: f64,
        stats: &mut RunStats,
    ) -> Result<(VideoInputs, Vec<u8>, Vec<FrameKey>), RunError> {
        if !(fps.is_finite() && fps > 0.0) {
            return Err(RunError::Input(format!("video fps must be a positive number, got {fps}")));
        }
        let frames: Vec<FrameRef> = window
            .frames
            .iter()
            .map(|f| FrameRef { width: f.width as usize, height: f.height as usize, data: &f.data })
            .collect();
        let vp = &self.processor.video_processor;
        let size = vp.clip_size(0, &frames)?;
        let use_cache = self.options.feature_cache && self.pixel_cache.capacity() > 0;
        let mut keys = Vec::with_capacity(frames.len());
        let cache = &mut self.pixel_cache;
        let planes = |f: FrameRef, s| vp.resized_planes(f, s);
        let rows = vp.clip_rows(&frames, size, &planes, &mut |f, (h, w)| {
            let key = FrameKey::of_rgb(f.data, f.width, f.height, h, w);
            keys.push(key);
            if !use_cache {
                return Ok(Arc::new(vp.frame_rows(planes(f, (h, w)), (h, w))?));
            }
            if let Some(rows) = cache.get(&key) {
                stats.pixel_cache_hits += 1;
                return Ok(rows);
            }
            stats.pixel_cache_misses += 1;
            let rows = Arc::new(vp.frame_rows(planes(f, (h, w)), (h, w))?);
            cache.insert(key, rows.clone());
            Ok(rows)
        })?;
        let c = &vp.config.base;
        let norm = c.norm();
        let tables = [norm.table(0), norm.table(1), norm.table(2)];
        let per_channel = vp.patch_dim() / 3;
        let (grid, mask) = vp.grid_and_mask(&rows, frames.len(), size, &self.pruning, |col, v: u8| {
            tables[col / per_channel][v as usize]
        });
        let video = VideoInputs {
            pixel_values_videos: Vec::new(),
            patch_dim: vp.patch_dim(),
            video_grid_thw: vec![grid],
            video_merge_sizes: vec![c.merge_size],
            video_compression_mask: mask,
            timestamps: vec![(0..frames.len()).map(|i| i as f64 / fps).collect()],
        };
        Ok((video, rows, keys))
    }
}

fn fill(out: Vec<Vec<Option<PromptOutcome>>>, err: &Arc<RunError>) -> Vec<Vec<PromptOutcome>> {
    out.into_iter().map(|v| v.into_iter().map(|o| o.unwrap_or_else(|| Err(err.clone()))).collect()).collect()
}
