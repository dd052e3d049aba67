//! Qwen2 decoder (the VideoLLaMA3 language model) with a KV cache and left-padded batches, and
//! a prefill of unequal sequences packed back to back (no padding in the matmuls) that leaves
//! the same cache as the left-padded batch.
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

    /// A buffer of `rows.len()` rows (dim 0) and `len` filled positions: `rows[i]` (one row) at
    /// the end of row `i`, zeros before it, room for `headroom` more positions. Each row is
    /// written once, straight into the buffer.
    fn left_padded(rows: &[Tensor], dim: usize, len: usize, headroom: usize) -> candle_core::Result<Self> {
        let Some(first) = rows.first() else { candle_core::bail!("a left-padded buffer of no rows") };
        let mut shape = first.dims().to_vec();
        shape[0] = rows.len();
        shape[dim] = len + headroom;
        let buf = Tensor::zeros(shape, first.dtype(), first.device())?;
        for (i, row) in rows.iter().enumerate() {
            let Some(pad) = len.checked_sub(row.dim(dim)?) else {
                candle_core::bail!("row {i} holds {} positions, more than {len}", row.dim(dim)?)
            };
            buf.narrow(0, i, 1)?.slice_set(&row.contiguous()?, dim, pad)?;
        }
        Ok(Self { buf, dim, len })
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

    /// One row per sequence (`ks[i]`/`vs[i]` `[1, kv_heads, len_i, head_dim]`), each at the end
    /// of `len` positions as a left-padded batch's; see [`Growing::left_padded`].
    fn left_padded(ks: &[Tensor], vs: &[Tensor], len: usize, headroom: usize) -> candle_core::Result<Self> {
        Ok(Self { k: Growing::left_padded(ks, 2, len, headroom)?, v: Growing::left_padded(vs, 2, len, headroom)? })
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
        rows: &Rows,
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
        let out = match rows {
            Rows::Padded(mask) => self.attend_padded(&q, &k, &v, mask, cache, headroom)?,
            Rows::Packed(packed) => self.attend_packed(&q, &k, &v, packed, cache, headroom)?,
        };
        let out = out.transpose(1, 2)?.reshape((b, l, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    /// Rows of a batch (`[b, heads, l, d]`) after the cached positions, through the key mask.
    fn attend_padded(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &ChunkedBias,
        cache: &mut Option<LayerKv>,
        headroom: usize,
    ) -> candle_core::Result<Tensor> {
        let (k, v) = match cache {
            Some(layer) => layer.append(k, v)?,
            None => {
                let layer = LayerKv::new(k, v, headroom)?;
                let view = layer.view()?;
                *cache = Some(layer);
                view
            }
        };
        let pick = |start: usize, len: usize| mask.rows_at(start, len);
        super::fused::text(q, &k, &v, self.scale, &pick, &mask.key_mask)
    }

    /// Sequences packed back to back in one row (`[1, heads, Σlen, d]`), each attending only to
    /// itself, causally: the same call per sequence as a batch of one would make. The empty
    /// cache then holds them as the left-padded batch forward would: row `i`'s keys at the end
    /// of `max_len` positions, zeros (hidden by the key mask) before them.
    fn attend_packed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        packed: &Packed,
        cache: &mut Option<LayerKv>,
        headroom: usize,
    ) -> candle_core::Result<Tensor> {
        if cache.is_some() {
            candle_core::bail!("a packed prefill needs an empty cache");
        }
        let mut outs = Vec::with_capacity(packed.seqs.len());
        let (mut ks, mut vs) = (Vec::with_capacity(packed.seqs.len()), Vec::with_capacity(packed.seqs.len()));
        for seq in &packed.seqs {
            let part = |x: &Tensor| x.narrow(2, seq.start, seq.len);
            let (ki, vi) = (part(k)?, part(v)?);
            let pick = |start: usize, len: usize| seq.mask.rows_at(start, len);
            outs.push(super::fused::text(&part(q)?, &ki, &vi, self.scale, &pick, &seq.mask.key_mask)?);
            ks.push(ki);
            vs.push(vi);
        }
        *cache = Some(LayerKv::left_padded(&ks, &vs, packed.max_len, headroom)?);
        Tensor::cat(&outs, 2)
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
        rows: &Rows,
        cache: &mut Option<LayerKv>,
        headroom: usize,
    ) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(xs)?, cos, sin, rows, cache, headroom)?;
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
        self.run_layers(xs, inputs.position_ids, &Rows::Padded(mask), cache)
    }

    /// A prefill of several sequences packed back to back: `xs` `[1, Σlens, hidden]`, sequence
    /// `i` `lens[i]` tokens at positions `0..lens[i]`, attending only to itself. The linear
    /// layers see no padding. Leaves `cache` (which must be empty) exactly as [`Self::forward`]
    /// on the left-padded batch would, `[lens.len(), max(lens)]` rows with the padding hidden by
    /// the key mask, so decoding or forking continues from it unchanged. Returns the final
    /// hidden states, packed.
    pub fn prefill_packed(&self, xs: &Tensor, lens: &[usize], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let (one, total, _) = xs.dims3()?;
        if one != 1 || lens.iter().sum::<usize>() != total || lens.contains(&0) {
            candle_core::bail!("packed prefill: {:?} does not hold sequences of {lens:?} tokens", xs.dims());
        }
        if cache.seq_len() != 0 {
            candle_core::bail!("a packed prefill needs an empty cache");
        }
        cache.layers = (0..self.layers.len()).map(|_| None).collect();
        let dev = xs.device();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let mut key_mask = Vec::with_capacity(lens.len() * max_len);
        let mut positions = Vec::with_capacity(total);
        let mut seqs = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in lens {
            key_mask.extend((0..max_len).map(|j| if j < max_len - len { 0f32 } else { 1f32 }));
            positions.extend((0..len).map(|p| p as u32));
            let ones = Tensor::ones((1, len), DType::F32, dev)?;
            let rows = rows_per_chunk(1, self.cfg.num_attention_heads, len);
            seqs.push(PackedSeq { start, len, mask: ChunkedBias::new(&ones, 0, len, rows)? });
            start += len;
        }
        cache.append_mask(&Tensor::from_vec(key_mask, (lens.len(), max_len), dev)?)?;
        let positions = Tensor::from_vec(positions, (1, total), dev)?;
        self.run_layers(xs, &positions, &Rows::Packed(Packed { seqs, max_len }), cache)
    }

    fn run_layers(
        &self,
        xs: &Tensor,
        position_ids: &Tensor,
        rows: &Rows,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        // RoPE tables in f32, as transformers computes them (then cast to the model dtype).
        let pos = position_ids.to_dtype(DType::F32)?.unsqueeze(2)?; // [b, l, 1]
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let dtype = xs.dtype();
        // `[b, l, hd/2]`: both halves of transformers' `cat(freqs, freqs)` table are equal.
        let cos = freqs.cos()?.to_dtype(dtype)?;
        let sin = freqs.sin()?.to_dtype(dtype)?;
        let mut hidden = xs.clone();
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            hidden = layer.forward(&hidden, &cos, &sin, rows, slot, cache.headroom)?;
        }
        self.norm.forward(&hidden)
    }
}

/// How a forward's rows are laid out.
enum Rows {
    /// `[batch, len]` rows (left- or mid-padded) after the cached positions, through the key mask.
    Padded(ChunkedBias),
    /// Sequences back to back in one row, each attending only to itself.
    Packed(Packed),
}

struct Packed {
    seqs: Vec<PackedSeq>,
    /// The longest sequence: the cache's length.
    max_len: usize,
}

/// One packed sequence: where it starts in the row, its length and its own causal mask (no padding).
struct PackedSeq {
    start: usize,
    len: usize,
    mask: ChunkedBias,
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

    /// The packed prefill computes what the left-padded batch forward computes, and leaves a
    /// cache that continues the same way: checked on the demo model's decoder with sequences
    /// of unequal lengths (one of them the longest, one of a single token), then a decode step
    /// from each cache.
    #[test]
    fn packed_prefill_equals_the_left_padded_batch() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-videollama3"));
        let dev = Device::Cpu;
        let model = crate::model::VideoLlama3ForConditionalGeneration::from_pretrained(dir, DType::F32, &dev).unwrap();
        let lm = model.model.language_model();
        let h = lm.config().hidden_size;
        let lens = [5usize, 17, 1, 9];
        let lp = 17;
        let seqs: Vec<Tensor> = lens.iter().map(|&l| Tensor::randn(0f32, 1.0, (l, h), &dev).unwrap()).collect();

        let mut packed_cache = KvCache::with_headroom(0);
        let packed = lm.prefill_packed(&Tensor::cat(&seqs, 0).unwrap().unsqueeze(0).unwrap(), &lens, &mut packed_cache);
        let packed = packed.unwrap().squeeze(0).unwrap();

        let mut rows = Vec::new();
        let (mut mask, mut pos) = (Vec::new(), Vec::new());
        for (x, &l) in seqs.iter().zip(&lens) {
            rows.push(Tensor::cat(&[&Tensor::zeros((lp - l, h), DType::F32, &dev).unwrap(), x], 0).unwrap());
            mask.extend((0..lp).map(|j| if j < lp - l { 0f32 } else { 1.0 }));
            pos.extend((0..lp).map(|j| (j + l).saturating_sub(lp) as i64));
        }
        let padded_in = Tensor::stack(&rows, 0).unwrap();
        let mask = Tensor::from_vec(mask, (lens.len(), lp), &dev).unwrap();
        let pos = Tensor::from_vec(pos, (lens.len(), lp), &dev).unwrap();
        let mut padded_cache = KvCache::with_headroom(0);
        let inputs = DecoderInputs { inputs_embeds: &padded_in, position_ids: &pos, attention_mask: &mask };
        let padded = lm.forward(&inputs, &mut padded_cache).unwrap();
        assert_eq!(packed_cache.seq_len(), padded_cache.seq_len());

        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        let mut start = 0;
        for (i, &l) in lens.iter().enumerate() {
            let got = packed.narrow(0, start, l).unwrap();
            let want = padded.get(i).unwrap().narrow(0, lp - l, l).unwrap();
            assert!(diff(&got, &want) < 1e-4, "sequence {i}: {}", diff(&got, &want));
            start += l;
        }

        // One more token per row from each cache: the same continuation.
        let step = Tensor::randn(0f32, 1.0, (lens.len(), 1, h), &dev).unwrap();
        let step_pos = Tensor::from_vec(lens.iter().map(|&l| l as i64).collect(), (lens.len(), 1), &dev).unwrap();
        let ones = Tensor::ones((lens.len(), 1), DType::F32, &dev).unwrap();
        let next = |cache: &mut KvCache| {
            let inputs = DecoderInputs { inputs_embeds: &step, position_ids: &step_pos, attention_mask: &ones };
            lm.forward(&inputs, cache).unwrap()
        };
        let (a, b) = (next(&mut packed_cache), next(&mut padded_cache));
        assert!(diff(&a, &b) < 1e-4, "decode step: {}", diff(&a, &b));
    }

    #[test]
    fn packed_prefill_refuses_lengths_that_do_not_add_up() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-videollama3"));
        let model =
            crate::model::VideoLlama3ForConditionalGeneration::from_pretrained(dir, DType::F32, &Device::Cpu).unwrap();
        let lm = model.model.language_model();
        let xs = Tensor::zeros((1, 6, lm.config().hidden_size), DType::F32, &Device::Cpu).unwrap();
        for lens in [&[2usize, 3][..], &[6, 0], &[]] {
            assert!(lm.prefill_packed(&xs, lens, &mut KvCache::new()).is_err(), "{lens:?}");
        }
    }

    #[test]
    fn left_padded_rows_sit_at_the_end_of_the_buffer_with_zeros_before_and_room_after() {
        // Views that start positions into a larger tensor, as a packed sequence's keys are.
        let packed = rand((1, 2, 9, 3));
        let rows = [packed.narrow(2, 0, 4).unwrap(), packed.narrow(2, 4, 5).unwrap(), packed.narrow(2, 4, 1).unwrap()];
        let g = Growing::left_padded(&rows, 2, 5, 2).unwrap();
        assert_eq!((g.len, g.capacity(), g.buf.dim(0).unwrap()), (5, 7, 3));
        for (i, row) in rows.iter().enumerate() {
            let pad = 5 - row.dim(2).unwrap();
            let want =
                Tensor::cat(&[&Tensor::zeros((1, 2, pad, 3), DType::F32, &Device::Cpu).unwrap(), row], 2).unwrap();
            assert!(same(&g.view().unwrap().narrow(0, i, 1).unwrap(), &want), "row {i}");
        }
        assert!(Growing::left_padded(&rows, 2, 4, 0).is_err(), "a row longer than the buffer");
        assert!(Growing::left_padded(&[], 2, 4, 0).is_err());
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
