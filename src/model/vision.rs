//! VideoLLaMA3 vision encoder and projector.
//!
//! Source of truth: transformers 5.24 `models/video_llama_3/modeling_video_llama_3.py`
//! (`VideoLlama3VisionModel`, `VideoLlama3Projector`) and `vision_utils.py`
//! (`get_vision_position_ids`, `get_vision_cu_seqlens`). Checkpoint names are mirrored by the
//! `VarBuilder` prefixes (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`, ...).
//!
//! `pixel_values` rows are flattened `C×p×p` patches, already ordered so that each `m×m` merge
//! block is contiguous (the processor's layout). Every image and every video frame is its own
//! attention sequence, exactly like transformers' `cu_seqlens` split: frames are batched along a
//! leading dimension, so no attention can cross a frame boundary.

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};

use super::config::{VideoLlama3Config, VideoLlama3VisionConfig};
use super::rotary::{apply_rotary, inverse_frequencies};
use super::ModelError;

/// Patches of one or more images, or of one or more videos, as the processor produces them.
#[derive(Debug, Clone)]
pub struct VisualInputs {
    /// `[num_patches, channels × patch × patch]`, all items concatenated.
    pub pixel_values: Tensor,
    /// Per item `[t, h, w]` in patches.
    pub grid_thw: Vec<[usize; 3]>,
    /// Per item spatial merge size (1 for images, 2 for video in VideoLLaMA3).
    pub merge_sizes: Vec<usize>,
}

impl VisualInputs {
    /// Number of merged tokens each item produces (before any video pruning).
    pub fn tokens_per_item(&self) -> Vec<usize> {
        self.grid_thw
            .iter()
            .zip(&self.merge_sizes)
            .map(|(g, &m)| g[0] * (g[1] / m.max(1)) * (g[2] / m.max(1)))
            .collect()
    }

    fn validate(&self, cfg: &VideoLlama3VisionConfig) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidInput(m));
        if self.grid_thw.len() != self.merge_sizes.len() {
            return bad(format!("{} grid_thw entries but {} merge sizes", self.grid_thw.len(), self.merge_sizes.len()));
        }
        let dims = self.pixel_values.dims();
        if dims.len() != 2 || dims[1] != cfg.patch_dim() {
            return bad(format!(
                "pixel_values must be [patches, {}] (channels × patch × patch), got {:?}",
                cfg.patch_dim(),
                dims
            ));
        }
        let mut total = 0;
        for (i, (g, &m)) in self.grid_thw.iter().zip(&self.merge_sizes).enumerate() {
            if m == 0 || g[1] % m != 0 || g[2] % m != 0 || g.contains(&0) {
                return bad(format!("item {i}: grid {g:?} is not divisible by merge size {m}"));
            }
            total += g[0] * g[1] * g[2];
        }
        if total != dims[0] {
            return bad(format!("grid_thw covers {total} patches but pixel_values has {} rows", dims[0]));
        }
        Ok(())
    }
}

struct VisionAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl VisionAttention {
    fn new(cfg: &VideoLlama3VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            scale: (cfg.head_dim() as f64).powf(-0.5),
        })
    }

    /// `xs`: `[frames, hw, dim]`; `cos`/`sin`: `[hw, head_dim]` (shared by every frame).
    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (f, n, d) = xs.dims3()?;
        let shape = (f, n, self.num_heads, self.head_dim);
        let q = self.q_proj.forward(xs)?.reshape(shape)?;
        let k = self.k_proj.forward(xs)?.reshape(shape)?;
        let v = self.v_proj.forward(xs)?.reshape(shape)?;
        // transformers applies the vision rotary in float32 whatever the model dtype.
        let cos = cos.unsqueeze(1)?.unsqueeze(0)?; // [1, hw, 1, hd]
        let sin = sin.unsqueeze(1)?.unsqueeze(0)?;
        let q = apply_rotary(&q, &cos, &sin)?; // [f, n, h, hd]
        let k = apply_rotary(&k, &cos, &sin)?;
        let out = super::fused::vision(&q, &k, &v, self.scale)?.reshape((f, n, d))?;
        self.out_proj.forward(&out)
    }
}

struct VisionMlp {
    fc1: Linear,
    fc2: Linear,
}

impl VisionMlp {
    fn new(cfg: &VideoLlama3VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
        })
    }
}

impl Module for VisionMlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // gelu_pytorch_tanh, evaluated in f32 as PyTorch does.
        self.fc2.forward(&super::activation::gelu_tanh(&self.fc1.forward(xs)?)?)
    }
}

struct VisionEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: VisionAttention,
    layer_norm2: LayerNorm,
    mlp: VisionMlp,
}

fn ln_config(eps: f64) -> LayerNormConfig {
    LayerNormConfig { eps, ..Default::default() }
}

impl VisionEncoderLayer {
    fn new(cfg: &VideoLlama3VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            layer_norm1: layer_norm(d, ln_config(cfg.layer_norm_eps), vb.pp("layer_norm1"))?,
            self_attn: VisionAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: layer_norm(d, ln_config(cfg.layer_norm_eps), vb.pp("layer_norm2"))?,
            mlp: VisionMlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(xs)?, cos, sin)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        xs + h
    }
}

/// The vision tower: patch embedding, encoder layers, post-LayerNorm, `pixel_unshuffle`.
pub struct VideoLlama3VisionModel {
    patch_weight: Tensor, // [dim, C·p·p]: the stride = kernel conv as one matmul
    patch_bias: Tensor,
    layers: Vec<VisionEncoderLayer>,
    post_layernorm: LayerNorm,
    inv_freq: Vec<f32>,
    cfg: VideoLlama3VisionConfig,
}

impl VideoLlama3VisionModel {
    /// `vb` points at `model.vision_model`.
    pub fn new(cfg: &VideoLlama3VisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let pe = vb.pp("embeddings").pp("patch_embedding");
        let patch_weight = pe.get((d, cfg.num_channels, p, p), "weight")?.reshape((d, cfg.patch_dim()))?;
        let patch_bias = pe.get(d, "bias")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VisionEncoderLayer::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(d, ln_config(cfg.layer_norm_eps), vb.pp("post_layernorm"))?;
        // Axial RoPE: head_dim/2 per axis, frequencies over that half (transformers'
        // compute_axial_rope_parameters), computed in f32 like torch.
        let inv_freq = inverse_frequencies(cfg.head_dim() / 2, cfg.rope_theta);
        Ok(Self { patch_weight, patch_bias, layers, post_layernorm, inv_freq, cfg: cfg.clone() })
    }

    pub fn config(&self) -> &VideoLlama3VisionConfig {
        &self.cfg
    }

    /// cos/sin `[h·w, head_dim]` for one frame, positions in merge-block order.
    fn rotary(&self, h: usize, w: usize, m: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let nf = self.inv_freq.len();
        let hd = 4 * nf;
        let mut cos = Vec::with_capacity(h * w * hd);
        let mut sin = Vec::with_capacity(h * w * hd);
        let mut row = vec![0f32; hd];
        for bh in 0..h / m {
            for bw in 0..w / m {
                for ih in 0..m {
                    for iw in 0..m {
                        let (ph, pw) = ((bh * m + ih) as f32, (bw * m + iw) as f32);
                        for (j, f) in self.inv_freq.iter().enumerate() {
                            row[j] = ph * f;
                            row[nf + j] = pw * f;
                        }
                        row.copy_within(0..2 * nf, 2 * nf);
                        cos.extend(row.iter().map(|a| a.cos()));
                        sin.extend(row.iter().map(|a| a.sin()));
                    }
                }
            }
        }
        Ok((Tensor::from_vec(cos, (h * w, hd), device)?, Tensor::from_vec(sin, (h * w, hd), device)?))
    }

    /// Vision features after `pixel_unshuffle`: `[Σ t·(h/m)·(w/m), hidden]`.
    pub fn forward(&self, inputs: &VisualInputs) -> Result<Tensor, ModelError> {
        inputs.validate(&self.cfg)?;
        // Inputs may come from the CPU-side processor; compute where the weights live.
        let device = self.patch_weight.device().clone();
        let dtype = self.patch_weight.dtype();
        let pixels = inputs.pixel_values.to_device(&device)?.to_dtype(dtype)?;
        let embeds = pixels.matmul(&self.patch_weight.t()?)?.broadcast_add(&self.patch_bias)?;
        let d = self.cfg.hidden_size;
        let mut offset = 0;
        let mut outputs = Vec::with_capacity(inputs.grid_thw.len());
        for (&[t, h, w], &m) in inputs.grid_thw.iter().zip(&inputs.merge_sizes) {
            let n = t * h * w;
            let mut xs = embeds.narrow(0, offset, n)?.reshape((t, h * w, d))?;
            offset += n;
            let (cos, sin) = self.rotary(h, w, m, &device)?;
            for layer in &self.layers {
                xs = layer.forward(&xs, &cos, &sin)?;
            }
            let xs = self.post_layernorm.forward(&xs)?;
            outputs.push(pixel_unshuffle(&xs, t, h, w, m)?);
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }
}

/// Un-permute merge blocks to raster order, then bilinear-downsample by `m`
/// (`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`).
fn pixel_unshuffle(xs: &Tensor, t: usize, h: usize, w: usize, m: usize) -> candle_core::Result<Tensor> {
    let c = xs.dim(D::Minus1)?;
    let (ho, wo) = (h / m, w / m);
    let raster = xs.reshape((t, ho, wo, m, m, c))?.permute((0, 1, 3, 2, 4, 5))?.contiguous()?.reshape((t, h, w * c))?;
    let dev = xs.device();
    let dtype = xs.dtype();
    let wh = Tensor::from_vec(bilinear_matrix(h, ho), (ho, h), dev)?.to_dtype(dtype)?;
    let ww = Tensor::from_vec(bilinear_matrix(w, wo), (wo, w), dev)?.to_dtype(dtype)?;
    // Rows: [t, ho, w·c]; then columns on [t·ho, c, w] → [t·ho, c, wo].
    let rows = wh.unsqueeze(0)?.broadcast_as((t, ho, h))?.contiguous()?.matmul(&raster)?;
    let rows = rows.reshape((t * ho, w, c))?.transpose(1, 2)?.contiguous()?;
    let cols = rows.matmul(&ww.t()?.unsqueeze(0)?.broadcast_as((t * ho, w, wo))?.contiguous()?)?;
    cols.transpose(1, 2)?.contiguous()?.reshape((t * ho * wo, c))
}

/// Row-interpolation matrix `[out, in]` with torch's half-pixel bilinear weights (f32 arithmetic).
fn bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    let scale = input as f32 / output as f32;
    for o in 0..output {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(input - 1);
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        let l1 = src - i0 as f32;
        let l0 = 1.0 - l1;
        m[o * input + i0] += l0;
        m[o * input + i1] += l1;
    }
    m
}

/// `model.projector.readout`: Linear → exact (erf) GELU → Linear.
pub struct VideoLlama3Projector {
    fc1: Linear,
    fc2: Linear,
}

impl VideoLlama3Projector {
    /// `vb` points at `model.projector`.
    pub fn new(cfg: &VideoLlama3Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let vin = cfg.vision_config.hidden_size;
        let out = cfg.text_config.hidden_size;
        let vb = vb.pp("readout");
        // nn.Sequential indices: 0 = Linear, 1 = GELU, 2 = Linear.
        Ok(Self { fc1: linear(vin, out, vb.pp(0))?, fc2: linear(out, out, vb.pp(2))? })
    }
}

impl Module for VideoLlama3Projector {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&super::activation::gelu_erf(&self.fc1.forward(xs)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_by_two_averages_pairs() {
        let m = bilinear_matrix(4, 2);
        assert_eq!(m, vec![0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
    }

    #[test]
    fn bilinear_same_size_is_identity() {
        let m = bilinear_matrix(3, 3);
        assert_eq!(m, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    }
}
