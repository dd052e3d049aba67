//! Qwen2 decoder (the VideoLLaMA3 language model) with a KV cache and left-padded batches.
//!
//! Source of truth: transformers 5.24 `models/qwen2/modeling_qwen2.py` (RMSNorm, biased q/k/v,
//! GQA, default RoPE, SwiGLU MLP) and `masking_utils.create_causal_mask` /
//! `generation/utils.py::_prepare_position_ids_for_generation` for padding. Unlike
//! candle-transformers' qwen2.rs this decoder takes input embeddings (the multimodal stitch
//! happens before it), per-row position ids and a key padding mask.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{linear_no_bias, rms_norm, Linear, RmsNorm, VarBuilder};

use super::attention::rows_per_chunk;
use super::config::VideoLlama3TextConfig;
use super::rotary::inverse_frequencies;

/// A tensor that grows along `dim` in place: a buffer of which the first `len` positions along
/// `dim` are filled. Appending writes with `slice_set`; the buffer is reallocated only when it is
/// full, with room for [`KV_HEADROOM`] more positions, so decoding does not allocate or copy the
/// cache every step.
#[derive(Debug)]
struct Growing {
    buf: Tensor,
    dim: usize,
    len: usize,
}

/// Positions allocated beyond what a step needs (decoding 256 tokens reallocates once).
pub const KV_HEADROOM: usize = 256;

impl Growing {
    /// A buffer holding `x` with room for `headroom` more positions.
    fn new(x: &Tensor, dim: usize, headroom: usize) -> candle_core::Result<Self> {
        let mut g = Self { buf: Self::alloc(x, dim, x.dim(dim)? + headroom)?, dim, len: 0 };
        g.append(x)?;
        Ok(g)
    }

    fn alloc(like: &Tensor, dim: usize, cap: usize) -> candle_core::Result<Tensor> {
        let mut shape = like.dims().to_vec();
        shape[dim] = cap;
        Tensor::zeros(shape, like.dtype(), like.device())
    }

    fn capacity(&self) -> usize {
        self.buf.dim(self.dim).unwrap_or(0)
    }

    /// Write `x` after the filled positions; returns a view of everything filled.
    fn append(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        let l = x.dim(self.dim)?;
        if self.len + l > self.capacity() {
            let grown = Self::alloc(x, self.dim, self.len + l + KV_HEADROOM)?;
            if self.len > 0 {
                grown.slice_set(&self.view()?.contiguous()?, self.dim, 0)?;
            }
            self.buf = grown;
        }
        self.buf.slice_set(&x.contiguous()?, self.dim, self.len)?;
        self.len += l;
        self.view()
    }

    fn view(&self) -> candle_core::Result<Tensor> {
        self.buf.narrow(self.dim, 0, self.len)
    }

    /// Rows (dim 0) `idx` of the filled positions, in a new buffer with room for `headroom`
    /// more (`None`: the same capacity as this one).
    fn select_rows(&self, idx: &Tensor, headroom: Option<usize>) -> candle_core::Result<Self> {
        let buf = match headroom {
            None => self.buf.index_select(idx, 0)?,
            Some(extra) => {
                let rows = self.view()?.index_select(idx, 0)?;
                let buf = Self::alloc(&rows, self.dim, self.len + extra)?;
                buf.slice_set(&rows, self.dim, 0)?;
                buf
            }
        };
        Ok(Self { buf, dim: self.dim, len: self.len })
    }

    /// Bytes allocated, headroom included.
    fn bytes(&self) -> usize {
        self.buf.elem_count() * self.buf.dtype().size_in_bytes()
    }
}

/// One layer's keys and values, `[batch, kv_heads, positions, head_dim]`, grown in place.
#[derive(Debug)]
struct LayerKv {
    k: Growing,
    v: Growing,
}

impl LayerKv {
    fn new(k: &Tensor, v: &Tensor, headroom: usize) -> candle_core::Result<Self> {
        Ok(Self { k: Growing::new(k, 2, headroom)?, v: Growing::new(v, 2, headroom)? })
    }

    /// Write `k`/`v` `[batch, kv_heads, l, head_dim]` after the cached positions; returns views
    /// of everything cached.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.k.append(k)?, self.v.append(v)?))
    }

    fn view(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.k.view()?, self.v.view()?))
    }
}

/// The decoder's key/value cache for a batch (one [`LayerKv`] per layer) and its key mask.
///
/// Not `Clone`: appends write into shared buffers in place, so two handles on one buffer would
/// overwrite each other's next positions. [`KvCache::select_rows`] makes an independent copy.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// `[batch, cached_len]`, 1.0 = real token, 0.0 = padding; grown in place like the keys.
    key_mask: Option<Growing>,
    /// Positions reserved beyond the first forward's.
    headroom: usize,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::with_headroom(KV_HEADROOM)
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache whose first forward reserves room for `headroom` more positions: the tokens to
    /// be decoded (a prefix that is only forked needs none). Past it, buffers grow by
    /// [`KV_HEADROOM`].
    pub fn with_headroom(headroom: usize) -> Self {
        Self { layers: Vec::new(), key_mask: None, headroom }
    }
    /// Tokens cached so far (including padding columns).
    pub fn seq_len(&self) -> usize {
        self.key_mask.as_ref().map_or(0, |m| m.len)
    }
    pub fn clear(&mut self) {
        *self = Self::with_headroom(self.headroom);
    }

    /// Device bytes the cache holds (keys, values and key mask, headroom included).
    pub fn bytes(&self) -> usize {
        let kv: usize = self.layers.iter().flatten().map(|l| l.k.bytes() + l.v.bytes()).sum();
        kv + self.key_mask.as_ref().map_or(0, Growing::bytes)
    }

    /// Append `[batch, l]` mask columns; returns the whole key mask `[batch, cached_len]`.
    fn append_mask(&mut self, mask: &Tensor) -> candle_core::Result<Tensor> {
        match &mut self.key_mask {
            Some(m) => m.append(mask),
            None => {
                let m = Growing::new(mask, 1, self.headroom)?;
                let view = m.view();
                self.key_mask = Some(m);
                view
            }
        }
    }

    /// A new cache whose row `i` is a copy of row `rows[i]` of this one (rows may repeat): forks
    /// a shared prefix into several continuations, or drops finished rows from a batch. Keys,
    /// values and the key mask are copied unchanged, so continuing from the fork is the same
    /// computation as continuing from the original row.
    pub fn select_rows(&self, rows: &[usize]) -> candle_core::Result<KvCache> {
        self.select_rows_with(rows, None)
    }

    /// [`Self::select_rows`] into buffers with room for exactly `headroom` more positions
    /// (a fork's suffix and decoded tokens), instead of this cache's capacity.
    pub fn select_rows_reserving(&self, rows: &[usize], headroom: usize) -> candle_core::Result<KvCache> {
        self.select_rows_with(rows, Some(headroom))
    }

    fn select_rows_with(&self, rows: &[usize], headroom: Option<usize>) -> candle_core::Result<KvCache> {
        let Some(mask) = &self.key_mask else {
            candle_core::bail!("select_rows on an empty cache");
        };
        let b = mask.buf.dim(0)?;
        if let Some(bad) = rows.iter().find(|&&r| r >= b) {
            candle_core::bail!("select_rows: row {bad} out of a batch of {b}");
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), mask.buf.device())?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(layer) => Ok(Some(LayerKv {
                    k: layer.k.select_rows(&idx, headroom)?,
                    v: layer.v.select_rows(&idx, headroom)?,
                })),
                None => Ok(None),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            key_mask: Some(mask.select_rows(&idx, headroom)?),
            headroom: headroom.unwrap_or(self.headroom),
        })
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
        headroom: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let (q_dim, kv_dim) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let qkv = self.qkv_proj.forward(xs)?;
        // `[b, l, heads, d]` rows are what the fused rope kernel takes; the transposes to
        // `[b, heads, l, d]` are free views when `l == 1` (a decode step).
        let split = |start: usize, heads: usize| {
            qkv.narrow(D::Minus1, start, heads * self.head_dim)?.reshape((b, l, heads, self.head_dim))
        };
        let q = rope_thd(&split(0, self.num_heads)?, cos, sin)?.transpose(1, 2)?;
        let k = rope_thd(&split(q_dim, self.num_kv_heads)?, cos, sin)?.transpose(1, 2)?.contiguous()?;
        let v = split(q_dim + kv_dim, self.num_kv_heads)?.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(layer) => layer.append(&k, &v)?,
            None => {
                let layer = LayerKv::new(&k, &v, headroom)?;
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
        headroom: usize,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(xs)?, cos, sin, mask, cache, headroom)?;
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
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let past = cache.seq_len();
        let key_mask = cache.append_mask(&inputs.attention_mask.to_dtype(DType::F32)?)?;
        let rows = rows_per_chunk(b, self.cfg.num_attention_heads, past + l);
        let mask = ChunkedBias::new(&key_mask, past, l, rows)?;
        // RoPE tables in f32, as transformers computes them (then cast to the model dtype).
        let pos = inputs.position_ids.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, l, 1]
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let dtype = xs.dtype();
        // `[b, l, hd/2]`: both halves of transformers' `cat(freqs, freqs)` table are equal.
        let cos = freqs.cos()?.to_dtype(dtype)?;
        let sin = freqs.sin()?.to_dtype(dtype)?;
        let mut hidden = xs.clone();
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            hidden = layer.forward(&hidden, &cos, &sin, &mask, slot, cache.headroom)?;
        }
        let _ = b;
        self.norm.forward(&hidden)
    }
}

/// Additive attention mask `[b, 1, rows, past + l]` per chunk of query rows: causal within the
/// new tokens, padded keys hidden. Built on the first layer that asks (the reference path;
/// the fused kernels read the key mask itself and never do) and shared by every layer after.
/// Hidden entries get f32::MIN rather than -inf so a fully padded query row stays finite
/// (its output is never used, but NaN would poison later layers through 0·NaN).
struct ChunkedBias {
    rows: usize,
    past: usize,
    l: usize,
    chunks: std::cell::OnceCell<Vec<Tensor>>,
    /// The `[b, past + l]` key mask (contiguous) the chunks are built from.
    key_mask: Tensor,
}

impl ChunkedBias {
    fn new(key_mask: &Tensor, past: usize, l: usize, rows: usize) -> candle_core::Result<Self> {
        // Contiguous once here, not per layer (the cache's mask is a view of its buffer).
        Ok(Self { rows, past, l, chunks: std::cell::OnceCell::new(), key_mask: key_mask.contiguous()? })
    }

    /// The chunks, built on the device from the key mask: no host loops, no copy of the mask back.
    fn build(&self) -> candle_core::Result<Vec<Tensor>> {
        let (b, total) = self.key_mask.dims2()?;
        let device = self.key_mask.device();
        let valid = self.key_mask.ne(0f32)?.unsqueeze(1)?; // [b, 1, total]
        let kpos = Tensor::arange(0u32, total as u32, device)?.unsqueeze(0)?; // [1, total]
        let zero = Tensor::new(0f32, device)?;
        let neg = Tensor::new(f32::MIN, device)?;
        let mut chunks = Vec::with_capacity(self.l.div_ceil(self.rows));
        let mut start = 0;
        while start < self.l {
            let len = self.rows.min(self.l - start);
            let q0 = (self.past + start) as u32;
            let qpos = Tensor::arange(q0, q0 + len as u32, device)?.unsqueeze(1)?; // [len, 1]
                                                                                   // A query sees the valid keys at or before its own position.
            let allowed = kpos.broadcast_le(&qpos)?.unsqueeze(0)?.broadcast_mul(&valid)?; // [b, len, total]
            let shape = (b, len, total);
            let bias = allowed.where_cond(&zero.broadcast_as(shape)?, &neg.broadcast_as(shape)?)?;
            chunks.push(bias.unsqueeze(1)?);
            start += len;
        }
        Ok(chunks)
    }

    /// The bias for query rows `start..start+len`, which must be one of the chunks.
    fn rows_at(&self, start: usize, len: usize) -> candle_core::Result<Tensor> {
        if self.chunks.get().is_none() {
            let _ = self.chunks.set(self.build()?);
        }
        let chunks = self.chunks.get().expect("built above");
        let chunk = chunks.get(start / self.rows).filter(|_| start.is_multiple_of(self.rows));
        match chunk {
            Some(c) if c.dim(2)? == len => Ok(c.clone()),
            _ => candle_core::bail!("attention chunking mismatch at rows {start}+{len} (chunk {})", self.rows),
        }
    }
}

/// Qwen2's `apply_rotary_pos_emb` on `[b, l, heads, d]`: `x·cos + rotate_half(x)·sin` in the
/// model dtype with `cos`/`sin` `[b, l, d/2]` already cast to it, as transformers computes it
/// (the vision tower's rotary, unlike this one, runs in f32). candle's fused kernel rounds each
/// product and the sum to the dtype exactly as the unfused expression does (a test checks it
/// bit for bit), in one launch instead of six.
fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)
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
        let mut layer = LayerKv::new(&k0, &v0, KV_HEADROOM).unwrap();
        assert_eq!(layer.k.capacity(), 5 + KV_HEADROOM);
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
        assert!(layer.k.capacity() >= layer.k.len && layer.k.capacity() <= layer.k.len + 2 * KV_HEADROOM);
    }

    /// transformers' expression, unfused: `x·cos + rotate_half(x)·sin` on `[b, h, l, d]` with
    /// `cat(freqs, freqs)` tables.
    fn rotary_unfused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let (x1, x2) = (x.narrow(D::Minus1, 0, half).unwrap(), x.narrow(D::Minus1, half, half).unwrap());
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1).unwrap().unsqueeze(1).unwrap();
        (x.broadcast_mul(&full(cos)).unwrap() + rotated.broadcast_mul(&full(sin)).unwrap()).unwrap()
    }

    #[test]
    fn fused_rope_equals_the_unfused_expression_bit_for_bit() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = (rand((2, 5, 3, 8)) * 4.0).unwrap().to_dtype(dtype).unwrap(); // [b, l, h, d]
            let pos = Tensor::new(&[[0f32, 1., 2., 3., 4.], [7., 8., 9., 10., 1000.]], &dev).unwrap();
            let inv = Tensor::from_vec(inverse_frequencies(8, 1e6), (1, 1, 4), &dev).unwrap();
            let freqs = pos.unsqueeze(2).unwrap().broadcast_mul(&inv).unwrap();
            let (cos, sin) =
                (freqs.cos().unwrap().to_dtype(dtype).unwrap(), freqs.sin().unwrap().to_dtype(dtype).unwrap());
            let fused = rope_thd(&x, &cos, &sin).unwrap().transpose(1, 2).unwrap();
            let want = rotary_unfused(&x.transpose(1, 2).unwrap(), &cos, &sin);
            let bits = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(bits(&fused) == bits(&want), "{dtype:?}");
        }
    }

    #[test]
    fn key_mask_grows_in_place_like_concatenation() {
        let mut cache = KvCache::new();
        let first = Tensor::new(&[[0f32, 1.0, 1.0], [1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
        let mut want = cache.append_mask(&first).unwrap();
        let buffer = cache.key_mask.as_ref().unwrap().buf.clone();
        for step in 0..KV_HEADROOM + 2 {
            let col = Tensor::new(&[[(step % 2) as f32], [1.0]], &Device::Cpu).unwrap();
            let got = cache.append_mask(&col).unwrap();
            want = Tensor::cat(&[&want, &col], 1).unwrap();
            assert!(got.to_vec2::<f32>().unwrap() == want.to_vec2::<f32>().unwrap(), "step {step}");
            assert_eq!(cache.seq_len(), 3 + step + 1);
            if step < KV_HEADROOM {
                // Within the headroom the columns land in the first buffer (no reallocation): a
                // handle on it sees them.
                let seen = buffer.narrow(1, 0, cache.seq_len()).unwrap().to_vec2::<f32>().unwrap();
                assert!(seen == want.to_vec2::<f32>().unwrap(), "step {step}");
            }
        }
    }

    #[test]
    fn reserved_forks_hold_the_same_rows_with_the_room_asked_for() {
        let (k, v) = (rand((2, 1, 3, 2)), rand((2, 1, 3, 2)));
        let cache = KvCache {
            layers: vec![Some(LayerKv::new(&k, &v, 0).unwrap())],
            key_mask: Some(Growing::new(&Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(), 1, 0).unwrap()),
            headroom: 0,
        };
        let mut fork = cache.select_rows_reserving(&[1, 0, 1], 5).unwrap();
        let layer = fork.layers[0].as_mut().unwrap();
        assert_eq!((layer.k.len, layer.k.capacity()), (3, 8));
        let idx = Tensor::new(&[1u32, 0, 1], &Device::Cpu).unwrap();
        assert!(same(&layer.view().unwrap().0, &k.index_select(&idx, 0).unwrap()));
        // Appends within the reserved room stay in the buffer.
        let extra = rand((3, 1, 5, 2));
        layer.append(&extra, &extra).unwrap();
        assert_eq!(layer.k.capacity(), 8);
        assert_eq!(fork.key_mask.as_ref().unwrap().capacity(), 8);
        // Exactly the rows plus the room: 5 positions × (k + v of 2 f32 each + one mask f32) × 3 rows.
        assert_eq!(fork.bytes(), cache.select_rows(&[1, 0, 1]).unwrap().bytes() + 3 * 5 * (2 * 2 * 4 + 4));
    }

    #[test]
    fn selected_rows_are_an_independent_copy() {
        let (k, v) = (rand((2, 1, 3, 2)), rand((2, 1, 3, 2)));
        let cache = KvCache {
            layers: vec![Some(LayerKv::new(&k, &v, KV_HEADROOM).unwrap())],
            key_mask: Some(
                Growing::new(&Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(), 1, KV_HEADROOM).unwrap(),
            ),
            headroom: KV_HEADROOM,
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
        assert_eq!(a.layers[0].as_ref().unwrap().k.len, 4);
    }
}
