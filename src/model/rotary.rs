//! Rotary position embeddings, shared by the decoder (1-D positions) and the vision encoder
//! (axial: height and width). Source of truth: transformers' `apply_rotary_pos_emb` /
//! `rotate_half` and the default RoPE initialisation, computed in f32 as torch does.

use candle_core::{DType, Tensor, D};

/// `1 / theta^(i / dim)` for even `i < dim`, in f32 like torch.
pub(crate) fn inverse_frequencies(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim).step_by(2).map(|i| 1.0f32 / (theta as f32).powf(i as f32 / dim as f32)).collect()
}

/// `x·cos + rotate_half(x)·sin`, computed in f32 and cast back.
pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = (x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    out.to_dtype(dtype)
}
