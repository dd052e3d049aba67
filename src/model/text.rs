//! Qwen2 decoder (the VideoLLaMA3 language model) with a KV cache and left-padded batches.
//!
//! Source of truth: transformers 5.24 `models/qwen2/modeling_qwen2.py` (RMSNorm, biased q/k/v,
//! GQA, default RoPE, SwiGLU MLP) and `masking_utils.create_causal_mask` /
//! `generation/utils.py::_prepare_position_ids_for_generation` for padding. Unlike
//! candle-transformers' qwen2.rs this decoder takes input embeddings (the multimodal stitch
//! happens before it), per-row position ids and a key padding mask.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear_no_bias, rms_norm, Linear, RmsNorm, VarBuilder};

use super::attention::rows_per_chunk;
use super::config::VideoLlama3TextConfig;
use super::rotary::inverse_frequencies;

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]` buffers of which the
/// first `len` positions are filled. Appending writes in place (`slice_set`); the buffer is
/// reallocated only when it is full, with room for [`KV_HEADROOM`] more tokens, so decoding does
/// not allocate or copy the cache every step.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Positions allocated beyond what a step needs (decoding 256 tokens reallocates once).
pub const KV_HEADROOM: usize = 256;

impl LayerKv {
    fn with_capacity(like: &Tensor, cap: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, h, _, d) = like.dims4()?;
        let z = || Tensor::zeros((b, h, cap, d), like.dtype(), like.device());
        Ok((z()?, z()?))
    }

    fn new(k: &Tensor, v: &Tensor) -> candle_core::Result<Self> {
        let (bk, bv) = Self::with_capacity(k, k.dim(2)? + KV_HEADROOM)?;
        let mut layer = Self { k: bk, v: bv, len: 0 };
        layer.append(k, v)?;
        Ok(layer)
    }

    fn capacity(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// Write `k`/`v` `[batch, kv_heads, l, head_dim]` after the cached positions; returns views
    /// of everything cached.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let l = k.dim(2)?;
        if self.len + l > self.capacity() {
            let (nk, nv) = Self::with_capacity(k, self.len + l + KV_HEADROOM)?;
            if self.len > 0 {
                nk.slice_set(&self.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&self.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            (self.k, self.v) = (nk, nv);
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += l;
        self.view()
    }

    fn view(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }
}

/// The decoder's key/value cache for a batch (one [`LayerKv`] per layer) and its key mask.
///
/// Not `Clone`: appends write into shared buffers in place, so two handles on one buffer would
/// overwrite each other's next positions. [`KvCache::select_rows`] makes an independent copy.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// `[batch, cached_len]`, 1.0 = real token, 0.0 = padding.
    key_mask: Option<Tensor>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Tokens cached so far (including padding columns).
    pub fn seq_len(&self) -> usize {
        self.key_mask.as_ref().and_then(|m| m.dim(1).ok()).unwrap_or(0)
    }
    pub fn clear(&mut self) {
        *self = Self::default();
    }
    /// A new cache whose row `i` is a copy of row `rows[i]` of this one (rows may repeat): forks
    /// a shared prefix into several continuations, or drops finished rows from a batch. Keys,
    /// values and the key mask are copied unchanged, so continuing from the fork is the same
    /// computation as continuing from the original row.
    pub fn select_rows(&self, rows: &[usize]) -> candle_core::Result<KvCache> {
        let Some(mask) = &self.key_mask else {
            candle_core::bail!("select_rows on an empty cache");
        };
        let b = mask.dim(0)?;
        if let Some(bad) = rows.iter().find(|&&r| r >= b) {
            candle_core::bail!("select_rows: row {bad} out of a batch of {b}");
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), mask.device())?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                // Whole buffers (contiguous; the copies keep the headroom).
                Some(layer) => Ok(Some(LayerKv {
                    k: layer.k.index_select(&idx, 0)?,
                    v: layer.v.index_select(&idx, 0)?,
                    len: layer.len,
                })),
                None => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache { layers, key_mask: Some(mask.index_select(&idx, 0)?) })
    }
}

/// One matmul for several projections of the same input: their weights (and biases) stacked
/// along the output dimension at load (the checkpoint's names are unchanged). Each output
/// column is the same dot product as in its own projection; a decode step launches one matmul
/// instead of several.
fn stacked_linear(
    vb: &VarBuilder,
    names: &[&str],
    in_dim: usize,
    out_dims: &[usize],
    bias: bool,
) -> candle_core::Result<Linear> {
    let mut ws = Vec::with_capacity(names.len());
    let mut bs = Vec::with_capacity(names.len());
    for (name, &out) in names.iter().zip(out_dims) {
        ws.push(vb.pp(*name).get((out, in_dim), "weight")?);
        if bias {
            bs.push(vb.pp(*name).get(out, "bias")?);
        }
    }
    let w = Tensor::cat(&ws, 0)?;
    let b = if bias { Some(Tensor::cat(&bs, 0)?) } else { None };
    Ok(Linear::new(w, b))
}

struct Attention {
    /// q, k and v stacked.
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &VideoLlama3TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        Ok(Self {
            qkv_proj: stacked_linear(&vb, &["q_proj", "k_proj", "v_proj"], h, &[q, kv, kv], true)?,
            o_proj: linear_no_bias(cfg.num_attention_heads * hd, h, vb.pp("o_proj"))?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            scale: (hd as f64).powf(-0.5),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &ChunkedBias,
        cache: &mut Option<LayerKv>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let (q_dim, kv_dim) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let qkv = self.qkv_proj.forward(xs)?;
        let q = qkv.narrow(D::Minus1, 0, q_dim)?.reshape((b, l, self.num_heads, self.head_dim))?.transpose(1, 2)?;
        let k =
            qkv.narrow(D::Minus1, q_dim, kv_dim)?.reshape((b, l, self.num_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let v = qkv
            .narrow(D::Minus1, q_dim + kv_dim, kv_dim)?
            .reshape((b, l, self.num_kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let q = apply_rotary_in_dtype(&q, cos, sin)?.contiguous()?;
        let k = apply_rotary_in_dtype(&k, cos, sin)?.contiguous()?;
        let v = v.contiguous()?;
        let (k, v) = match cache {
            Some(layer) => layer.append(&k, &v)?,
            None => {
                let layer = LayerKv::new(&k, &v)?;
                let view = layer.view()?;
                *cache = Some(layer);
                view
            }
        };
        let pick = |start: usize, len: usize| mask.rows_at(start, len);
        let out = super::fused::text(&q, &k, &v, self.scale, &pick, &mask.key_mask)?;
        let out = out.transpose(1, 2)?.reshape((b, l, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

struct Mlp {
    /// gate and up stacked.
    gate_up_proj: Linear,
    intermediate: usize,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &VideoLlama3TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: stacked_linear(&vb, &["gate_proj", "up_proj"], h, &[i, i], false)?,
            intermediate: i,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(xs)?;
        let gate = candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, self.intermediate)?)?;
        let up = gate_up.narrow(D::Minus1, self.intermediate, self.intermediate)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &VideoLlama3TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &ChunkedBias,
        cache: &mut Option<LayerKv>,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(xs)?, cos, sin, mask, cache)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + h
    }
}

/// One decoder step's inputs.
#[derive(Debug, Clone)]
pub struct DecoderInputs<'a> {
    /// `[batch, len, hidden]`.
    pub inputs_embeds: &'a Tensor,
    /// `[batch, len]` (u32/i64): RoPE positions per row.
    pub position_ids: &'a Tensor,
    /// `[batch, len]`: 1 = token, 0 = padding. Appended to the cached key mask.
    pub attention_mask: &'a Tensor,
}

/// `model.language_model` (a `Qwen2Model`).
pub struct Qwen2Decoder {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    inv_freq: Tensor,
    cfg: VideoLlama3TextConfig,
}

impl Qwen2Decoder {
    /// `vb` points at `model.language_model`.
    pub fn new(cfg: &VideoLlama3TextConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embed_tokens = vb.pp("embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta);
        let n = inv.len();
        let inv_freq = Tensor::from_vec(inv, (1, 1, n), vb.device())?;
        Ok(Self { embed_tokens, layers, norm, inv_freq, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &VideoLlama3TextConfig {
        &self.cfg
    }

    /// The `[vocab, hidden]` embedding matrix (also the LM head when tied).
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Token embeddings for `[batch, len]` ids.
    pub fn embed(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?.to_dtype(DType::U32)?;
        self.embed_tokens.index_select(&flat, 0)?.reshape((b, l, self.cfg.hidden_size))
    }

    /// Final hidden states `[batch, len, hidden]` (after the last RMSNorm); extends `cache`.
    pub fn forward(&self, inputs: &DecoderInputs, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let xs = inputs.inputs_embeds;
        let (b, l, _) = xs.dims3()?;
        let device = xs.device();
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let past = cache.seq_len();
        let new_mask = inputs.attention_mask.to_dtype(DType::F32)?;
        let key_mask = match cache.key_mask.take() {
            Some(prev) => Tensor::cat(&[&prev, &new_mask], 1)?,
            None => new_mask,
        };
        cache.key_mask = Some(key_mask.clone());
        let rows = rows_per_chunk(b, self.cfg.num_attention_heads, past + l);
        let mask = ChunkedBias::new(&key_mask, past, l, rows, device)?;
        // RoPE tables in f32, as transformers computes them (then cast to the model dtype).
        let pos = inputs.position_ids.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, l, 1]
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let dtype = xs.dtype();
        let cos = emb.cos()?.to_dtype(dtype)?.unsqueeze(1)?; // [b, 1, l, hd]
        let sin = emb.sin()?.to_dtype(dtype)?.unsqueeze(1)?;
        let mut hidden = xs.clone();
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            hidden = layer.forward(&hidden, &cos, &sin, &mask, slot)?;
        }
        let _ = b;
        self.norm.forward(&hidden)
    }
}

/// Additive attention mask `[b, 1, rows, past + l]` per chunk of query rows: causal within the
/// new tokens, padded keys hidden. Built once per forward and shared by every layer.
/// Hidden entries get f32::MIN rather than -inf so a fully padded query row stays finite
/// (its output is never used, but NaN would poison later layers through 0·NaN).
struct ChunkedBias {
    rows: usize,
    chunks: Vec<Tensor>,
    /// The `[b, past + l]` key mask the chunks were built from (the fused kernels read it).
    key_mask: Tensor,
}

impl ChunkedBias {
    fn new(key_mask: &Tensor, past: usize, l: usize, rows: usize, device: &Device) -> candle_core::Result<Self> {
        // Built on the device from the key mask: no host loops, no copy of the mask back.
        let (b, total) = key_mask.dims2()?;
        let valid = key_mask.ne(0f32)?.unsqueeze(1)?; // [b, 1, total]
        let kpos = Tensor::arange(0u32, total as u32, device)?.unsqueeze(0)?; // [1, total]
        let zero = Tensor::new(0f32, device)?;
        let neg = Tensor::new(f32::MIN, device)?;
        let mut chunks = Vec::with_capacity(l.div_ceil(rows));
        let mut start = 0;
        while start < l {
            let len = rows.min(l - start);
            let q0 = (past + start) as u32;
            let qpos = Tensor::arange(q0, q0 + len as u32, device)?.unsqueeze(1)?; // [len, 1]
                                                                                   // A query sees the valid keys at or before its own position.
            let allowed = kpos.broadcast_le(&qpos)?.unsqueeze(0)?.broadcast_mul(&valid)?; // [b, len, total]
            let shape = (b, len, total);
            let bias = allowed.where_cond(&zero.broadcast_as(shape)?, &neg.broadcast_as(shape)?)?;
            chunks.push(bias.unsqueeze(1)?);
            start += len;
        }
        Ok(Self { rows, chunks, key_mask: key_mask.clone() })
    }

    /// The bias for query rows `start..start+len`, which must be one of the chunks built.
    fn rows_at(&self, start: usize, len: usize) -> candle_core::Result<Tensor> {
        let chunk = self.chunks.get(start / self.rows).filter(|_| start.is_multiple_of(self.rows));
        match chunk {
            Some(c) if c.dim(2)? == len => Ok(c.clone()),
            _ => candle_core::bail!("attention chunking mismatch at rows {start}+{len} (chunk {})", self.rows),
        }
    }
}

/// Qwen2's `apply_rotary_pos_emb`: `x·cos + rotate_half(x)·sin` in the model dtype, with
/// `cos`/`sin` already cast to it — each product and the sum rounded to that dtype, as
/// transformers computes it (the vision tower's rotary, unlike this one, runs in f32).
fn apply_rotary_in_dtype(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn appends_equal_concatenation_across_reallocations() {
        let (k0, v0) = (rand((2, 3, 5, 4)), rand((2, 3, 5, 4)));
        let mut layer = LayerKv::new(&k0, &v0).unwrap();
        assert_eq!(layer.capacity(), 5 + KV_HEADROOM);
        let (mut want_k, mut want_v) = (k0, v0);
        // Past the headroom, so the buffer is reallocated once on the way.
        for step in 0..KV_HEADROOM + 3 {
            let l = if step % 50 == 0 { 7 } else { 1 };
            let (k, v) = (rand((2, 3, l, 4)), rand((2, 3, l, 4)));
            let (gk, gv) = layer.append(&k, &v).unwrap();
            want_k = Tensor::cat(&[&want_k, &k], 2).unwrap();
            want_v = Tensor::cat(&[&want_v, &v], 2).unwrap();
            assert!(same(&gk, &want_k) && same(&gv, &want_v), "step {step}");
        }
        assert!(layer.capacity() >= layer.len && layer.capacity() <= layer.len + 2 * KV_HEADROOM);
    }

    #[test]
    fn selected_rows_are_an_independent_copy() {
        let (k, v) = (rand((2, 1, 3, 2)), rand((2, 1, 3, 2)));
        let cache = KvCache {
            layers: vec![Some(LayerKv::new(&k, &v).unwrap())],
            key_mask: Some(Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap()),
        };
        let mut a = cache.select_rows(&[1, 1]).unwrap();
        let b = cache.select_rows(&[1]).unwrap();
        // Appending to one fork leaves the other and the original untouched.
        let extra = rand((2, 1, 1, 2));
        a.layers[0].as_mut().unwrap().append(&extra, &extra).unwrap();
        let (bk, _) = b.layers[0].as_ref().unwrap().view().unwrap();
        assert!(same(&bk, &k.narrow(0, 1, 1).unwrap()));
        let (ok, _) = cache.layers[0].as_ref().unwrap().view().unwrap();
        assert!(same(&ok, &k));
        assert_eq!(a.layers[0].as_ref().unwrap().len, 4);
    }
}
