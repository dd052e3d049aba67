//! GELU as transformers computes it for any model dtype: PyTorch evaluates `gelu` (both the tanh
//! approximation and the erf form) in float32 and rounds the result once to the tensor's dtype.
//! candle's bf16/f16 kernels evaluate it in the narrow type with constants rounded to it, which
//! drifts from transformers, so narrow tensors go through f32 here.

use candle_core::{DType, Tensor};

/// `gelu_pytorch_tanh`.
pub(crate) fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    in_f32(x, |x| x.gelu())
}

/// `nn.GELU()` (erf).
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    in_f32(x, |x| x.gelu_erf())
}

fn in_f32(x: &Tensor, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => f(x),
        dt => f(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// bf16 GELU is the f32 GELU of the same bf16 inputs, rounded once; candle's own bf16
    /// kernel is not (the reason this module exists).
    #[test]
    fn narrow_gelu_is_f32_gelu_rounded_once() {
        let x = Tensor::arange(-4000i64, 4000, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let x = (x / 1000.0).unwrap().to_dtype(DType::BF16).unwrap();
        for (ours, f32_op, bf16_op) in [
            (gelu_tanh(&x).unwrap(), x.to_dtype(DType::F32).unwrap().gelu().unwrap(), x.gelu().unwrap()),
            (gelu_erf(&x).unwrap(), x.to_dtype(DType::F32).unwrap().gelu_erf().unwrap(), x.gelu_erf().unwrap()),
        ] {
            let want = f32_op.to_dtype(DType::BF16).unwrap();
            let same = |a: &Tensor, b: &Tensor| -> usize {
                let a = a.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let b = b.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                a.iter().zip(&b).filter(|(x, y)| x != y).count()
            };
            assert_eq!(same(&ours, &want), 0);
            let _ = bf16_op;
        }
        // The tanh form in candle's bf16 arithmetic differs somewhere in this range.
        let native = x.gelu().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        let ours = gelu_tanh(&x).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            native.iter().zip(&ours).any(|(a, b)| a != b),
            "candle's bf16 gelu now matches f32: this module may be unnecessary"
        );
    }
}
