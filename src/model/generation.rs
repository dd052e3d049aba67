//! Token generation: greedy or seeded sampling, per-row EOS in a batch, streaming callback.
//!
//! Source of truth: transformers 5.24 `generation/utils.py` (`_sample`: finished rows emit
//! `pad_token_id`, stop when every row finished or `max_new_tokens` reached; decode positions
//! continue from the last prompt position) and `generation/logits_process.py` (temperature →
//! top-k → top-p, applied in that order). Sampling uses our own seeded RNG, so sampled text is
//! reproducible per seed but not equal to torch's.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::text::KvCache;
use super::video_llama3::{
    position_ids_from_mask, MultimodalInputs, VideoLlama3ForConditionalGeneration,
};
use super::ModelError;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// Arg-max (first index on ties, like `torch.argmax`).
    Greedy,
    /// Multinomial sampling after temperature, top-k and top-p filtering.
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    },
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
        Self {
            decode,
            tokens: Vec::new(),
            emitted: 0,
        }
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
        let start = if text.is_char_boundary(self.emitted.min(text.len())) {
            self.emitted.min(text.len())
        } else {
            text.len()
        };
        let delta = &text[start..];
        self.emitted = text.len().max(self.emitted);
        (!delta.is_empty()).then(|| delta.to_string())
    }
}

/// splitmix64: tiny, seedable and good enough for token sampling.
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
pub(crate) fn sample(
    row: &[f32],
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    rng: &mut Rng,
) -> u32 {
    let t = temperature.max(1e-6);
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| {
        row[b]
            .partial_cmp(&row[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut keep = order.len();
    if let Some(k) = top_k.filter(|&k| k > 0) {
        keep = keep.min(k);
    }
    let max = row[order[0]] as f64 / t;
    let weights: Vec<f64> = order[..keep]
        .iter()
        .map(|&i| (row[i] as f64 / t - max).exp())
        .collect();
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

impl VideoLlama3ForConditionalGeneration {
    /// Generate up to `max_new_tokens` per row; `on_token` sees each token as it is chosen.
    pub fn generate(
        &self,
        inputs: &MultimodalInputs,
        params: &GenerationParams,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<GenerationOutput, ModelError> {
        let defaults = self.generation_defaults();
        let eos: Vec<u32> = params
            .eos_token_ids
            .clone()
            .unwrap_or_else(|| defaults.eos_token_ids.clone());
        let pad = params
            .pad_token_id
            .or(defaults.pad_token_id)
            .or_else(|| eos.first().copied())
            .unwrap_or(0);
        let (b, l) = inputs.input_ids.dims2()?;
        if b == 0 || l == 0 {
            return Err(ModelError::InvalidInput(format!(
                "empty prompt batch {:?}",
                inputs.input_ids.dims()
            )));
        }
        let mask = match &inputs.attention_mask {
            Some(m) => m.to_device(self.device())?.to_dtype(DType::F32)?,
            None => Tensor::ones((b, l), DType::F32, self.device())?,
        };
        let prompt_tokens: Vec<usize> = mask
            .to_vec2::<f32>()?
            .iter()
            .map(|r| r.iter().filter(|&&v| v != 0.0).count())
            .collect();
        // Decode positions continue from the last column's position (generate's `position_ids[..., -1:] + 1`).
        let pos = position_ids_from_mask(&mask)?.to_vec2::<i64>()?;
        let mut next_pos: Vec<i64> = pos.iter().map(|r| r[l - 1] + 1).collect();

        let penalty = params
            .repetition_penalty
            .or(defaults.repetition_penalty)
            .filter(|&p| p != 1.0);
        if let Some(p) = penalty {
            if !(p > 0.0 && p.is_finite()) {
                return Err(ModelError::InvalidInput(format!(
                    "repetition_penalty must be positive, got {p}"
                )));
            }
        }
        // Per row: which ids the penalty covers (prompt after its left padding, then outputs).
        let mut seen: Vec<Vec<bool>> = Vec::new();
        if penalty.is_some() {
            let vocab = self.config().text_config.vocab_size;
            let ids: Vec<Vec<u32>> = inputs.input_ids.to_dtype(DType::U32)?.to_vec2()?;
            let mask_rows = mask.to_vec2::<f32>()?;
            for (row, m) in ids.iter().zip(&mask_rows) {
                let first = m.iter().position(|&v| v != 0.0).unwrap_or(0);
                let mut s = vec![false; vocab];
                for &t in &row[first..] {
                    if let Some(x) = s.get_mut(t as usize) {
                        *x = true;
                    }
                }
                seen.push(s);
            }
        }
        let mut rng = match &params.sampling {
            Sampling::Sample { seed, .. } => Some(Rng(*seed)),
            Sampling::Greedy => None,
        };
        let mut cache = KvCache::new();
        let t0 = Instant::now();
        let embeds = self.model.input_embeddings(inputs)?;
        // GPU kernels are asynchronous: wait so each stage's time is its own.
        self.device().synchronize()?;
        let vision_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t0 = Instant::now();
        let mut logits = if params.max_new_tokens > 0 {
            Some(self.prefill_last_embeds(&embeds, Some(&mask), &mut cache)?)
        } else {
            None
        };
        self.device().synchronize()?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();

        let mut tokens = vec![Vec::new(); b];
        let mut finished = vec![false; b];
        let mut stopped_on_eos = vec![false; b];
        for step in 0..params.max_new_tokens {
            let mut rows = logits
                .take()
                .ok_or_else(|| {
                    ModelError::InvalidInput("internal: no logits for this step".into())
                })?
                .to_vec2::<f32>()?;
            let mut chosen = Vec::with_capacity(b);
            for (r, row) in rows.iter_mut().enumerate() {
                if finished[r] {
                    chosen.push(pad);
                    continue;
                }
                if let Some(p) = penalty {
                    apply_repetition_penalty(row, &seen[r], p);
                }
                let tok = match (&params.sampling, rng.as_mut()) {
                    (
                        Sampling::Sample {
                            temperature,
                            top_k,
                            top_p,
                            ..
                        },
                        Some(rng),
                    ) => sample(row, *temperature, *top_k, *top_p, rng),
                    _ => argmax(row),
                };
                let is_eos = eos.contains(&tok);
                if let Some(x) = seen.get_mut(r).and_then(|s| s.get_mut(tok as usize)) {
                    *x = true;
                }
                tokens[r].push(tok);
                on_token(&TokenEvent {
                    row: r,
                    step,
                    token: tok,
                    is_eos,
                });
                if is_eos {
                    finished[r] = true;
                    stopped_on_eos[r] = true;
                }
                chosen.push(tok);
            }
            if finished.iter().all(|&f| f) || step + 1 == params.max_new_tokens {
                break;
            }
            logits = Some(self.decode_step(&chosen, &next_pos, &mut cache)?);
            for p in next_pos.iter_mut() {
                *p += 1;
            }
        }
        Ok(GenerationOutput {
            tokens,
            stopped_on_eos,
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
            (0..50)
                .map(|_| sample(&row, 1.0, Some(2), None, &mut rng))
                .collect::<Vec<_>>()
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
            Ok(
                String::from_utf8_lossy(&t.iter().map(|&b| b as u8).collect::<Vec<_>>())
                    .into_owned(),
            )
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
