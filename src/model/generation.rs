//! Token generation: greedy or seeded sampling, per-row EOS in a batch, streaming callback.
//!
//! Source of truth: transformers 5.24 `generation/utils.py` (`_sample`: finished rows emit
//! `pad_token_id`, stop when every row finished or `max_new_tokens` reached; decode positions
//! continue from the last prompt position) and `generation/logits_process.py` (temperature →
//! top-k → top-p, applied in that order). Sampling uses our own seeded RNG, so sampled text is
//! reproducible per seed but not equal to torch's.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, D};

use super::text::KvCache;
use super::video_llama3::{position_ids_from_mask, MultimodalInputs, VideoLlama3ForConditionalGeneration};
use super::{GenerationDefaults, ModelError};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Arg-max (first index on ties, like `torch.argmax`).
    Greedy,
    /// Multinomial sampling after temperature, top-k and top-p filtering.
    Sample { temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64 },
}

/// Generation settings for one call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Overrides the checkpoint's EOS ids (generation_config.json, then config.json).
    pub eos_token_ids: Option<Vec<u32>>,
    /// Token fed for rows that already finished; defaults to the checkpoint's pad id, then EOS.
    pub pad_token_id: Option<u32>,
    /// Overrides the checkpoint's `repetition_penalty` (generation_config.json; 1.0 = off).
    /// Like transformers it applies to greedy decoding as well, over the prompt (left padding
    /// excluded) and the generated tokens.
    pub repetition_penalty: Option<f32>,
}

impl GenerationParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids: None,
            pad_token_id: None,
            repetition_penalty: None,
        }
    }
}

/// One generated token, reported as soon as it is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent {
    pub row: usize,
    pub step: usize,
    pub token: u32,
    /// This token ends the row's sequence.
    pub is_eos: bool,
}

/// Result of [`VideoLlama3ForConditionalGeneration::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// Generated ids per row (prompt excluded), including the EOS token when one ended the row.
    pub tokens: Vec<Vec<u32>>,
    /// Whether each row stopped on EOS (false = hit `max_new_tokens`).
    pub stopped_on_eos: Vec<bool>,
    /// Non-padding prompt tokens per row.
    pub prompt_tokens: Vec<usize>,
    /// Vision tower + projector + embedding stitch.
    pub vision_ms: f64,
    /// Language-model prefill (after the stitch).
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Turns a row's token stream into text deltas for a streaming callback.
///
/// `decode` maps all tokens so far to text (the processor's tokenizer, `skip_special_tokens`
/// as the caller likes). Each push re-decodes and emits only the new suffix; a decode ending in
/// U+FFFD (a multi-byte character split across tokens) is held back until it completes, as
/// transformers' `TextStreamer` does.
pub struct TextStreamer<F> {
    decode: F,
    tokens: Vec<u32>,
    emitted: usize,
}

impl<F, E> TextStreamer<F>
where
    F: FnMut(&[u32]) -> Result<String, E>,
{
    pub fn new(decode: F) -> Self {
        Self { decode, tokens: Vec::new(), emitted: 0 }
    }

    /// Add a token; returns the newly printable text, if any.
    pub fn push(&mut self, token: u32) -> Result<Option<String>, E> {
        self.tokens.push(token);
        let text = (self.decode)(&self.tokens)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(self.take_new(text))
    }

    /// Emit whatever is left (including a trailing incomplete character) at the end.
    pub fn finish(&mut self) -> Result<Option<String>, E> {
        let text = (self.decode)(&self.tokens)?;
        Ok(self.take_new(text))
    }

    fn take_new(&mut self, text: String) -> Option<String> {
        // A decoder may rewrite earlier text (e.g. cleanup of spaces): only emit past what was sent.
        let start =
            if text.is_char_boundary(self.emitted.min(text.len())) { self.emitted.min(text.len()) } else { text.len() };
        let delta = &text[start..];
        self.emitted = text.len().max(self.emitted);
        (!delta.is_empty()).then(|| delta.to_string())
    }
}

/// splitmix64: tiny, seedable and good enough for token sampling.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: seen tokens' logits are divided by the
/// penalty when positive, multiplied when negative.
pub(crate) fn apply_repetition_penalty(row: &mut [f32], seen: &[bool], penalty: f32) {
    for (v, &s) in row.iter_mut().zip(seen) {
        if s {
            *v = if *v < 0.0 { *v * penalty } else { *v / penalty };
        }
    }
}

pub(crate) fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Temperature, then top-k, then top-p (nucleus), then a multinomial draw.
/// (Also used by the engine, which keeps one RNG per row so a batched row samples as it would alone.)
pub(crate) fn sample(row: &[f32], temperature: f64, top_k: Option<usize>, top_p: Option<f64>, rng: &mut Rng) -> u32 {
    let t = temperature.max(1e-6);
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
    let mut keep = order.len();
    if let Some(k) = top_k.filter(|&k| k > 0) {
        keep = keep.min(k);
    }
    let max = row[order[0]] as f64 / t;
    let weights: Vec<f64> = order[..keep].iter().map(|&i| (row[i] as f64 / t - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    if let Some(p) = top_p.filter(|&p| p < 1.0) {
        // Smallest prefix of the sorted distribution whose mass reaches p (at least one token).
        let mut acc = 0.0;
        let mut n = 0;
        for w in &weights {
            acc += w / total;
            n += 1;
            if acc >= p {
                break;
            }
        }
        keep = n.max(1);
    }
    let mass: f64 = weights[..keep].iter().sum();
    let mut r = rng.next_f64() * mass;
    for (j, w) in weights[..keep].iter().enumerate() {
        r -= w;
        if r <= 0.0 {
            return order[j] as u32;
        }
    }
    order[keep - 1] as u32
}

/// How every row of one generation chooses its tokens: EOS ids, the pad id, repetition penalty
/// and sampling, resolved once from the call's parameters and the checkpoint's
/// generation_config.json (the parameters win).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    pub sampling: Sampling,
    pub eos: Vec<u32>,
    /// Fed for padding (and, in transformers, for finished rows).
    pub pad: u32,
    /// Repetition penalty other than 1.
    pub penalty: Option<f32>,
}

impl Decoding {
    pub fn resolve(params: &GenerationParams, defaults: &GenerationDefaults) -> Result<Decoding, ModelError> {
        let eos = params.eos_token_ids.clone().unwrap_or_else(|| defaults.eos_token_ids.clone());
        let pad = params.pad_token_id.or(defaults.pad_token_id).or_else(|| eos.first().copied()).unwrap_or(0);
        let penalty = params.repetition_penalty.or(defaults.repetition_penalty).filter(|&p| p != 1.0);
        if let Some(p) = penalty {
            if !(p > 0.0 && p.is_finite()) {
                return Err(ModelError::InvalidInput(format!("repetition_penalty must be positive, got {p}")));
            }
        }
        Ok(Decoding { sampling: params.sampling.clone(), eos, pad, penalty })
    }

    /// Penalty, then arg-max or a draw from the row's own RNG; records the token as seen.
    fn choose(&self, row: &mut DecodeRow, logits: &mut [f32]) -> u32 {
        if let Some(p) = self.penalty {
            apply_repetition_penalty(logits, &row.seen, p);
        }
        let tok = match (&self.sampling, row.rng.as_mut()) {
            (Sampling::Sample { temperature, top_k, top_p, .. }, Some(rng)) => {
                sample(logits, *temperature, *top_k, *top_p, rng)
            }
            _ => argmax(logits),
        };
        if let Some(x) = row.seen.get_mut(tok as usize) {
            *x = true;
        }
        tok
    }
}

/// One sequence being decoded. Each row has its own RNG (seeded alike), so a row samples the
/// same tokens in any batch as it would alone.
#[derive(Debug)]
pub struct DecodeRow {
    pub max_new: usize,
    /// Position of the next token (the prompt's last position + 1, then on).
    pub position: i64,
    /// Generated ids, including the EOS that ended the row.
    pub tokens: Vec<u32>,
    pub stopped_on_eos: bool,
    pub done: bool,
    /// Decoding time until this row finished.
    pub decode: Duration,
    /// Ids the repetition penalty covers (the prompt, then the outputs); empty without one.
    seen: Vec<bool>,
    rng: Option<Rng>,
}

impl DecodeRow {
    /// `prompt`: the row's prompt ids without padding (what the repetition penalty covers).
    pub fn new(d: &Decoding, prompt: &[u32], vocab: usize, max_new: usize, position: i64) -> DecodeRow {
        let mut seen = Vec::new();
        if d.penalty.is_some() {
            seen = vec![false; vocab];
            for &t in prompt {
                if let Some(x) = seen.get_mut(t as usize) {
                    *x = true;
                }
            }
        }
        let rng = match &d.sampling {
            Sampling::Sample { seed, .. } => Some(Rng(*seed)),
            Sampling::Greedy => None,
        };
        DecodeRow {
            max_new,
            position,
            tokens: Vec::new(),
            stopped_on_eos: false,
            done: max_new == 0,
            decode: Duration::ZERO,
            seen,
            rng,
        }
    }
}

impl VideoLlama3ForConditionalGeneration {
    /// The decode loop, shared by [`Self::generate`] and the engine. `logits` `[rows, vocab]`
    /// come from the prefill and `cache` holds every row; each step chooses a token per active
    /// row, and rows that finish (EOS or `max_new`, or `max_new = 0` from the start) leave the
    /// batch with their cache rows.
    /// `step` runs before each decode step; returning false stops with
    /// [`ModelError::Interrupted`].
    pub fn decode_rows(
        &self,
        d: &Decoding,
        rows: &mut [DecodeRow],
        logits: Tensor,
        cache: &mut KvCache,
        on_token: &mut dyn FnMut(&TokenEvent),
        step: &mut dyn FnMut() -> bool,
    ) -> Result<(), ModelError> {
        let t0 = Instant::now();
        let mut active: Vec<usize> = (0..rows.len()).collect();
        let mut logits = logits;
        // Greedy without a penalty needs no logits on the host: the device picks, and only one
        // id per row comes back (not `rows × vocab` floats).
        let on_device = d.penalty.is_none() && d.sampling == Sampling::Greedy;
        while !active.is_empty() {
            let (mut lrows, ids) = if on_device {
                (Vec::new(), logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
            } else {
                (logits.to_dtype(DType::F32)?.to_vec2::<f32>()?, Vec::new())
            };
            let mut keep = Vec::with_capacity(active.len());
            let mut chosen = Vec::with_capacity(active.len());
            let mut positions = Vec::with_capacity(active.len());
            for (k, &ri) in active.iter().enumerate() {
                let r = &mut rows[ri];
                if r.done {
                    continue;
                }
                let tok = if on_device { ids[k] } else { d.choose(r, &mut lrows[k]) };
                let is_eos = d.eos.contains(&tok);
                r.tokens.push(tok);
                on_token(&TokenEvent { row: ri, step: r.tokens.len() - 1, token: tok, is_eos });
                if is_eos || r.tokens.len() >= r.max_new {
                    r.done = true;
                    r.stopped_on_eos = is_eos;
                    r.decode = t0.elapsed();
                } else {
                    keep.push(k);
                    chosen.push(tok);
                    positions.push(r.position);
                    r.position += 1;
                }
            }
            if keep.is_empty() {
                break;
            }
            if !step() {
                return Err(ModelError::Interrupted);
            }
            if keep.len() != active.len() {
                *cache = cache.select_rows(&keep)?;
                active = keep.iter().map(|&k| active[k]).collect();
            }
            logits = self.decode_step(&chosen, &positions, cache)?;
        }
        Ok(())
    }

    /// Generate up to `max_new_tokens` per row; `on_token` sees each token as it is chosen.
    pub fn generate(
        &self,
        inputs: &MultimodalInputs,
        params: &GenerationParams,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<GenerationOutput, ModelError> {
        let d = Decoding::resolve(params, self.generation_defaults())?;
        let (b, l) = inputs.input_ids.dims2()?;
        if b == 0 || l == 0 {
            return Err(ModelError::InvalidInput(format!("empty prompt batch {:?}", inputs.input_ids.dims())));
        }
        let mask = match &inputs.attention_mask {
            Some(m) => m.to_device(self.device())?.to_dtype(DType::F32)?,
            None => Tensor::ones((b, l), DType::F32, self.device())?,
        };
        let mask_rows = mask.to_vec2::<f32>()?;
        let prompt_tokens: Vec<usize> = mask_rows.iter().map(|r| r.iter().filter(|&&v| v != 0.0).count()).collect();
        // Decode positions continue from the last column's position (generate's `position_ids[..., -1:] + 1`).
        let pos = position_ids_from_mask(&mask)?.to_vec2::<i64>()?;
        let ids: Vec<Vec<u32>> = inputs.input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let vocab = self.config().text_config.vocab_size;
        let mut rows: Vec<DecodeRow> = ids
            .iter()
            .zip(&mask_rows)
            .zip(&pos)
            .map(|((row, m), p)| {
                // The penalty covers the prompt after its left padding.
                let first = m.iter().position(|&v| v != 0.0).unwrap_or(0);
                DecodeRow::new(&d, &row[first..], vocab, params.max_new_tokens, p[l - 1] + 1)
            })
            .collect();
        let mut cache = KvCache::new();
        let t0 = Instant::now();
        let embeds = self.model.input_embeddings(inputs)?;
        // GPU kernels are asynchronous: wait so each stage's time is its own.
        self.device().synchronize()?;
        let vision_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let logits = if params.max_new_tokens > 0 {
            Some(self.prefill_last_embeds(&embeds, Some(&mask), &mut cache)?)
        } else {
            None
        };
        self.device().synchronize()?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        if let Some(logits) = logits {
            self.decode_rows(&d, &mut rows, logits, &mut cache, on_token, &mut || true)?;
        }
        Ok(GenerationOutput {
            stopped_on_eos: rows.iter().map(|r| r.stopped_on_eos).collect(),
            tokens: rows.into_iter().map(|r| r.tokens).collect(),
            prompt_tokens,
            vision_ms,
            prefill_ms,
            decode_ms: t1.elapsed().as_secs_f64() * 1e3,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn sampling_respects_top_k_and_seed() {
        let row = [0.0f32, 5.0, 4.9, 4.8, -1.0];
        let draw = |seed| {
            let mut rng = Rng(seed);
            (0..50).map(|_| sample(&row, 1.0, Some(2), None, &mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert!(a.iter().all(|&t| t == 1 || t == 2), "{a:?}");
        assert!(a.contains(&1) && a.contains(&2));
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
    }

    #[test]
    fn streamer_holds_back_split_characters() {
        // Byte-level "tokenizer": each token is one byte of UTF-8.
        let decode = |t: &[u32]| -> Result<String, ()> {
            Ok(String::from_utf8_lossy(&t.iter().map(|&b| b as u8).collect::<Vec<_>>()).into_owned())
        };
        let mut s = TextStreamer::new(decode);
        let mut out = String::new();
        for b in "hé!".bytes() {
            if let Some(d) = s.push(b as u32).unwrap() {
                out.push_str(&d);
            }
        }
        assert_eq!(out, "hé!");
        assert_eq!(s.finish().unwrap(), None);
        let mut s = TextStreamer::new(decode);
        assert_eq!(s.push(b'a' as u32).unwrap().as_deref(), Some("a"));
        assert_eq!(s.push(0xC3).unwrap(), None, "half a character is held back");
        assert_eq!(s.push(0xA9).unwrap().as_deref(), Some("é"));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One dominant token holds > 0.99 of the mass: top_p = 0.9 must always pick it.
        let row = [10.0f32, 0.0, 0.0, 0.0];
        let mut rng = Rng(1);
        assert!((0..100).all(|_| sample(&row, 1.0, None, Some(0.9), &mut rng) == 0));
    }
}
