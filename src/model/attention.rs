//! Scaled dot-product attention with a bounded score buffer.
//!
//! Source of truth: transformers' `eager_attention_forward` (scores · scale + mask, softmax in
//! float32, · values). Queries are processed in row chunks so the `[batch, heads, rows, keys]`
//! score tensor never exceeds [`SCORE_BUDGET_BYTES`]: a long video (hundreds of frames) or a
//! multi-thousand-token prefill would otherwise allocate gigabytes at once. Rows are independent,
//! so chunking does not change the result.

use candle_core::{DType, Tensor};

/// Upper bound for one chunk's f32 score tensor.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;

/// Rows of queries per chunk for `batch × heads × keys` scores per row.
pub(crate) fn rows_per_chunk(batch: usize, heads: usize, keys: usize) -> usize {
    rows_for_budget(batch, heads, keys, SCORE_BUDGET_BYTES)
}

fn rows_for_budget(batch: usize, heads: usize, keys: usize, budget: usize) -> usize {
    let per_row = batch.max(1) * heads.max(1) * keys.max(1) * 4;
    (budget / per_row).max(1)
}

/// `q` `[b, h, l, d]`, `k`/`v` `[b, kv, s, d]` with `h = kv · groups` (GQA: query head `j` reads
/// kv head `j / groups`, transformers' `repeat_kv` order). The kv heads are never expanded:
/// each kv head's `groups` query heads are stacked into one `[groups·len, d]` matrix.
/// `bias(start, len)` returns the additive mask for query rows `start..start+len`, broadcastable
/// to `[b, h, len, s]`. Returns `[b, h, l, d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&dyn Fn(usize, usize) -> candle_core::Result<Tensor>>,
) -> candle_core::Result<Tensor> {
    attention_with_budget(q, k, v, scale, bias, SCORE_BUDGET_BYTES)
}

/// `q · kᵀ · scale` as f32. The product keeps the model dtype (as transformers' matmul does);
/// the scale is applied after the cast: scaling in bf16 would round `scale` itself
/// (`72^-0.5` → 0.117676) and every scaled score.
pub(crate) fn scaled_scores(q: &Tensor, kt: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    q.matmul(kt)?.to_dtype(DType::F32)? * scale
}

fn attention_with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&dyn Fn(usize, usize) -> candle_core::Result<Tensor>>,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    if kv == 0 || h % kv != 0 {
        candle_core::bail!("attention: {h} query heads are not a multiple of {kv} kv heads");
    }
    let groups = h / kv;
    let kt = k.t()?;
    let chunk = rows_for_budget(b, h, s, budget);
    let mut outs = Vec::with_capacity(l.div_ceil(chunk));
    let mut start = 0;
    while start < l {
        let len = chunk.min(l - start);
        let qc = if len == l { q.clone() } else { q.narrow(2, start, len)? };
        // [b, kv·groups, len, d] → [b, kv, groups·len, d]: same memory order, no copy when contiguous.
        let qc = qc.contiguous()?.reshape((b, kv, groups * len, d))?;
        let scores = scaled_scores(&qc, &kt, scale)?;
        let mut scores = scores.reshape((b, h, len, s))?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(&bias(start, len)?)?;
        }
        let probs =
            candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?.reshape((b, kv, groups * len, s))?;
        outs.push(probs.matmul(v)?.reshape((b, h, len, d))?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn bf16_scores_are_scaled_in_f32() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 3.0, (1, 1, 64, 72), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let kt = Tensor::randn(0f32, 3.0, (1, 1, 72, 64), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let scale = 72f64.powf(-0.5);
        let raw = q.matmul(&kt).unwrap().to_dtype(DType::F32).unwrap();
        let want = (&raw * scale).unwrap();
        assert_eq!(max_abs_diff(&scaled_scores(&q, &kt, scale).unwrap(), &want), 0.0);
        // Scaling in bf16 first is measurably different.
        let narrow = (q.matmul(&kt).unwrap() * scale).unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_abs_diff(&narrow, &want) > 1e-3);
    }

    #[test]
    fn chunked_rows_equal_one_shot() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 17, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 17, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 17, 8), &dev).unwrap();
        let full_bias = Tensor::randn(0f32, 1.0, (2, 1, 17, 17), &dev).unwrap();
        let bias = |start: usize, len: usize| full_bias.narrow(2, start, len);
        let one = attention_with_budget(&q, &k, &v, 0.3, Some(&bias), usize::MAX).unwrap();
        // 2·3·17·4 bytes per row: a 500-byte budget forces one row per chunk.
        let chunked = attention_with_budget(&q, &k, &v, 0.3, Some(&bias), 500).unwrap();
        assert!(max_abs_diff(&one, &chunked) < 1e-6);
    }

    #[test]
    fn grouped_kv_equals_repeated_heads() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 6, 5, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 2, 7, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 2, 7, 4), &dev).unwrap();
        let grouped = attention(&q, &k, &v, 0.5, None).unwrap();
        // Reference: repeat each kv head 3 times (transformers' repeat_kv), one head per query head.
        let rep =
            |x: &Tensor| x.unsqueeze(2).unwrap().broadcast_as((2, 2, 3, 7, 4)).unwrap().reshape((2, 6, 7, 4)).unwrap();
        let (k6, v6) = (rep(&k), rep(&v));
        let scores = (q.matmul(&k6.t().unwrap()).unwrap() * 0.5).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v6).unwrap();
        assert!(max_abs_diff(&grouped, &want) < 1e-6);
    }
}
