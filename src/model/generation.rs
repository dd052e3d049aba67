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

/// transformers' `RepetitionPenaltyLogitsProcessor` on the device: the logits `[rows, vocab]`
/// (f32) of ids each row has seen — its prompt, then its outputs — are divided by the penalty
/// when positive, multiplied when negative. The seen ids are a `[rows, vocab]` u8 mask that
/// stays on the device: each step marks the chosen ids in place, and nothing but the chosen ids
/// crosses to the host.
struct Penalty {
    seen: Tensor,
    penalty: Tensor,
}

impl Penalty {
    fn new(rows: &[&DecodeRow], vocab: usize, penalty: f32, device: &candle_core::Device) -> candle_core::Result<Self> {
        let mut seen = vec![0u8; rows.len() * vocab];
        for (r, row) in rows.iter().enumerate() {
            for &t in row.prompt.iter().filter(|&&t| (t as usize) < vocab) {
                seen[r * vocab + t as usize] = 1;
            }
        }
        Ok(Self { seen: Tensor::from_vec(seen, (rows.len(), vocab), device)?, penalty: Tensor::new(penalty, device)? })
    }

    fn apply(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        // True division (`Tensor / f64` would multiply by the rounded reciprocal).
        let penalized = logits
            .lt(0f32)?
            .where_cond(&logits.broadcast_mul(&self.penalty)?, &logits.broadcast_div(&self.penalty)?)?;
        self.seen.where_cond(&penalized, logits)
    }

    /// Marks `ids` (one per row) as seen.
    fn see(&self, ids: &Tensor) -> candle_core::Result<()> {
        let ids = ids.unsqueeze(1)?;
        let ones = Tensor::ones(ids.shape(), DType::U8, ids.device())?;
        self.seen.scatter_set(&ids, &ones, 1)
    }

    fn select_rows(&mut self, keep: &[usize]) -> candle_core::Result<()> {
        let idx: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
        self.seen = self.seen.index_select(&Tensor::from_vec(idx, keep.len(), self.seen.device())?, 0)?;
        Ok(())
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

/// The `n` largest logits' ids, largest first (ties: lower id first), without sorting the rest
/// of the vocabulary: a linear-time selection, then a sort of the `n` selected.
fn top_ids(row: &[f32], n: usize) -> Vec<usize> {
    let before = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    let mut ids: Vec<usize> = (0..row.len()).collect();
    if n < ids.len() {
        ids.select_nth_unstable_by(n, before);
        ids.truncate(n);
    }
    ids.sort_unstable_by(before);
    ids
}

/// Candidates taken per round when top-p runs without top-k; rounds grow 4× until the nucleus
/// fits (a peaked distribution needs one round over a few hundred ids, not a 152k-entry sort).
const NUCLEUS_ROUND: usize = 256;

/// Temperature, then top-k, then top-p (nucleus), then a multinomial draw.
/// (Also used by the engine, which keeps one RNG per row so a batched row samples as it would alone.)
pub(crate) fn sample(row: &[f32], temperature: f64, top_k: Option<usize>, top_p: Option<f64>, rng: &mut Rng) -> u32 {
    let t = temperature.max(1e-6);
    let max = row[argmax(row) as usize] as f64 / t;
    let weight = |i: usize| (row[i] as f64 / t - max).exp();
    let top_k = top_k.filter(|&k| k > 0 && k < row.len());
    let top_p = top_p.filter(|&p| p < 1.0);
    // The candidates in descending order with their weights; the total mass they are filtered from.
    let (order, weights, total) = match (top_k, top_p) {
        (None, None) => {
            // No filter: every id is a candidate, in id order (any fixed order draws correctly).
            let weights: Vec<f64> = (0..row.len()).map(weight).collect();
            let total = weights.iter().sum();
            ((0..row.len()).collect::<Vec<_>>(), weights, total)
        }
        (Some(k), _) => {
            let order = top_ids(row, k);
            let weights: Vec<f64> = order.iter().map(|&i| weight(i)).collect();
            let total = weights.iter().sum();
            (order, weights, total)
        }
        (None, Some(p)) => {
            let total: f64 = (0..row.len()).map(weight).sum();
            let mut n = NUCLEUS_ROUND.min(row.len());
            loop {
                let order = top_ids(row, n);
                let weights: Vec<f64> = order.iter().map(|&i| weight(i)).collect();
                if n == row.len() || weights.iter().sum::<f64>() / total >= p {
                    break (order, weights, total);
                }
                n = (n * 4).min(row.len());
            }
        }
    };
    let mut keep = order.len();
    if let Some(p) = top_p {
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

    /// A draw from the row's own RNG (the penalty was applied on the device).
    fn draw(&self, row: &mut DecodeRow, logits: &[f32]) -> u32 {
        match (&self.sampling, row.rng.as_mut()) {
            (Sampling::Sample { temperature, top_k, top_p, .. }, Some(rng)) => {
                sample(logits, *temperature, *top_k, *top_p, rng)
            }
            _ => argmax(logits),
        }
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
    /// The prompt ids the repetition penalty covers (with the outputs); empty without one.
    prompt: Vec<u32>,
    rng: Option<Rng>,
}

impl DecodeRow {
    /// `prompt`: the row's prompt ids without padding (what the repetition penalty covers).
    pub fn new(d: &Decoding, prompt: &[u32], max_new: usize, position: i64) -> DecodeRow {
        let prompt = if d.penalty.is_some() { prompt.to_vec() } else { Vec::new() };
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
            prompt,
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
        let vocab = logits.dim(D::Minus1)?;
        let mut penalty = match d.penalty {
            Some(p) => Some(Penalty::new(&rows.iter().collect::<Vec<_>>(), vocab, p, logits.device())?),
            None => None,
        };
        // Greedy picks happen on the device: only one id per row comes back (not `rows × vocab`
        // floats). Sampling draws on the host from the (penalized) logits.
        let on_device = d.sampling == Sampling::Greedy;
        while !active.is_empty() {
            // The penalty works on f32 logits, as transformers' processors do; a plain arg-max
            // needs no cast (it is exact and keeps the order).
            let scores = match &penalty {
                Some(p) => p.apply(&logits.to_dtype(DType::F32)?)?,
                None => logits.clone(),
            };
            let ids = if on_device {
                let picked = scores.argmax(D::Minus1)?;
                if let Some(p) = &penalty {
                    p.see(&picked)?;
                }
                picked.to_vec1::<u32>()?
            } else {
                let lrows = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let ids: Vec<u32> = active
                    .iter()
                    .zip(&lrows)
                    .map(|(&ri, l)| if rows[ri].done { d.pad } else { d.draw(&mut rows[ri], l) })
                    .collect();
                if let Some(p) = &penalty {
                    p.see(&Tensor::from_slice(&ids, ids.len(), logits.device())?)?;
                }
                ids
            };
            let mut keep = Vec::with_capacity(active.len());
            let mut chosen = Vec::with_capacity(active.len());
            let mut positions = Vec::with_capacity(active.len());
            for (k, &ri) in active.iter().enumerate() {
                let r = &mut rows[ri];
                if r.done {
                    continue;
                }
                let tok = ids[k];
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
                if let Some(p) = &mut penalty {
                    p.select_rows(&keep)?;
                }
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
        let mut rows: Vec<DecodeRow> = ids
            .iter()
            .zip(&mask_rows)
            .zip(&pos)
            .map(|((row, m), p)| {
                // The penalty covers the prompt after its left padding.
                let first = m.iter().position(|&v| v != 0.0).unwrap_or(0);
                DecodeRow::new(&d, &row[first..], params.max_new_tokens, p[l - 1] + 1)
            })
            .collect();
        let mut cache = KvCache::with_headroom(params.max_new_tokens);
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

    /// The previous full-sort sampler, kept as the reference for the selection-based one.
    fn sample_by_full_sort(row: &[f32], t: f64, top_k: Option<usize>, top_p: Option<f64>, rng: &mut Rng) -> u32 {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let keep = top_k.filter(|&k| k > 0).map_or(order.len(), |k| k.min(order.len()));
        let max = row[order[0]] as f64 / t;
        let weights: Vec<f64> = order[..keep].iter().map(|&i| (row[i] as f64 / t - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut keep = keep;
        if let Some(p) = top_p.filter(|&p| p < 1.0) {
            let (mut acc, mut n) = (0.0, 0);
            for w in &weights {
                acc += w / total;
                n += 1;
                if acc >= p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mut r = rng.next_f64() * weights[..keep].iter().sum::<f64>();
        for (j, w) in weights[..keep].iter().enumerate() {
            r -= w;
            if r <= 0.0 {
                return order[j] as u32;
            }
        }
        order[keep - 1] as u32
    }

    #[test]
    fn selection_sampler_draws_what_the_full_sort_drew() {
        // A vocabulary large enough for several nucleus rounds, with ties.
        let mut state = Rng(3);
        let row: Vec<f32> = (0..20_000).map(|_| ((state.next_f64() * 16.0).floor() as f32) * 0.75).collect();
        for (t, k, p) in
            [(1.0, Some(5), None), (0.7, Some(40), Some(0.8)), (1.0, None, Some(0.9)), (2.0, None, Some(0.999))]
        {
            let (mut a, mut b) = (Rng(11), Rng(11));
            for i in 0..200 {
                assert_eq!(
                    sample(&row, t, k, p, &mut a),
                    sample_by_full_sort(&row, t, k, p, &mut b),
                    "{t} {k:?} {p:?} draw {i}"
                );
            }
        }
        // Without filters every id is a candidate; the draw follows the distribution.
        let row = [0.0f32, 2.0, 1.0];
        let mut rng = Rng(5);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[sample(&row, 1.0, None, None, &mut rng) as usize] += 1;
        }
        let z = 1.0 + 2f64.exp() + 1f64.exp();
        for (i, c) in counts.iter().enumerate() {
            let want = [1.0, 2f64.exp(), 1f64.exp()][i] / z * 3000.0;
            assert!((*c as f64 - want).abs() < 0.1 * 3000.0, "{counts:?}");
        }
    }

    #[test]
    fn penalty_on_the_device_equals_transformers_rule() {
        let dev = candle_core::Device::Cpu;
        let d = Decoding { sampling: Sampling::Greedy, eos: vec![], pad: 0, penalty: Some(1.3) };
        let rows = [DecodeRow::new(&d, &[1, 3, 9], 4, 0), DecodeRow::new(&d, &[0], 4, 0)];
        let logits = Tensor::new(&[[0.7f32, -1.1, 2.0, -0.3, 5.0], [3.0, 1.0, -2.0, 0.1, 0.0]], &dev).unwrap();
        let mut p = Penalty::new(&rows.iter().collect::<Vec<_>>(), 5, 1.3, &dev).unwrap();
        // transformers: seen logits divided by the penalty when positive, multiplied when negative;
        // ids outside the vocabulary (9) are ignored.
        let host = |l: &[f32], seen: &[usize]| -> Vec<f32> {
            l.iter()
                .enumerate()
                .map(|(i, &v)| {
                    if !seen.contains(&i) {
                        v
                    } else if v < 0.0 {
                        v * 1.3
                    } else {
                        v / 1.3
                    }
                })
                .collect()
        };
        let got = p.apply(&logits).unwrap().to_vec2::<f32>().unwrap();
        let rows_l = logits.to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![host(&rows_l[0], &[1, 3]), host(&rows_l[1], &[0])]);
        // Chosen ids become seen; dropping a row keeps the other's mask.
        p.see(&Tensor::new(&[4u32, 2], &dev).unwrap()).unwrap();
        let got = p.apply(&logits).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![host(&rows_l[0], &[1, 3, 4]), host(&rows_l[1], &[0, 2])]);
        p.select_rows(&[1]).unwrap();
        let got = p.apply(&logits.narrow(0, 1, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![host(&rows_l[1], &[0, 2])]);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One dominant token holds > 0.99 of the mass: top_p = 0.9 must always pick it.
        let row = [10.0f32, 0.0, 0.0, 0.0];
        let mut rng = Rng(1);
        assert!((0..100).all(|_| sample(&row, 1.0, None, Some(0.9), &mut rng) == 0));
    }
}
