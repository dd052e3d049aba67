//! The fused attention as a candle `CustomOp3` over (q, k, v): the CPU twin on the CPU, the
//! PTX kernels on CUDA. The key mask rides along as a tensor and the sequence boundaries as a
//! host vector (a handful of integers, uploaded per call).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::layout::{choose_splits, Problem, Strides};
use super::Kernel;

pub(crate) struct FusedAttention {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) kernel: Kernel,
    /// Shapes and masking; strides are taken from the operands' layouts at run time.
    pub(crate) problem: Problem,
    /// `[batch, k_len]` f32, contiguous, nonzero = valid.
    pub(crate) key_mask: Option<Tensor>,
}

/// `[b, heads, rows, d]` strides of a layout whose last dimension is contiguous.
pub(crate) fn strides_of(l: &Layout, what: &str) -> candle_core::Result<Strides> {
    match l.stride() {
        [sb, sh, sr, 1] => Ok(Strides { batch: *sb, head: *sh, row: *sr }),
        s => candle_core::bail!("fused attention: {what} needs a contiguous last dimension, strides {s:?}"),
    }
}

impl FusedAttention {
    pub(crate) fn with_layouts(&self, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Problem> {
        let mut p = self.problem.clone();
        p.q = strides_of(q, "q")?;
        p.k = strides_of(k, "k")?;
        p.v = strides_of(v, "v")?;
        Ok(p)
    }

    pub(crate) fn out_shape(&self) -> Shape {
        let p = &self.problem;
        Shape::from((p.batch, p.q_len, p.heads, p.head_dim))
    }
}

/// The operand as f32: borrowed when it is f32 already (q, k and v may be whole KV-cache
/// buffers: no copy per call).
fn to_f32(s: &CpuStorage) -> candle_core::Result<std::borrow::Cow<'_, [f32]>> {
    Ok(match s {
        CpuStorage::F32(v) => std::borrow::Cow::Borrowed(v.as_slice()),
        CpuStorage::BF16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        other => candle_core::bail!("fused attention: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "vigil-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = self.with_layouts(l1, l2, l3)?;
        let (q, k, v) = (to_f32(s1)?, to_f32(s2)?, to_f32(s3)?);
        let mask = match &self.key_mask {
            Some(m) => Some(m.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let out = super::cpu::attend(
            &p,
            &q[l1.start_offset()..],
            &k[l2.start_offset()..],
            &v[l3.start_offset()..],
            mask.as_deref(),
        );
        let storage = match s1.dtype() {
            DType::F32 => CpuStorage::F32(out),
            DType::BF16 => CpuStorage::BF16(out.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(out.into_iter().map(half::f16::from_f32).collect()),
            d => candle_core::bail!("fused attention: unsupported dtype {d:?}"),
        };
        Ok((storage, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let p = self.with_layouts(l1, l2, l3)?;
        let out = super::cuda::launch(self.kernel, &p, self.key_mask.as_ref(), (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, self.out_shape()))
    }
}

/// Fused attention of `q` `[b, h, l, d]` over `k`/`v` `[b, kv, s, d]` (any strides with a
/// contiguous last dimension): `causal` at offset `s - l`, optional `cu_seqlens` over the rows
/// (then `l == s`) and key mask `[b, s]`. Returns `[b, h, l, d]`, a transposed view of a
/// contiguous `[b, l, h, d]` buffer. The decode kernel splits the keys ([`choose_splits`]).
#[allow(clippy::too_many_arguments)]
pub fn fused_attention(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    cu_seqlens: Option<Vec<u32>>,
    key_mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let (bk, kv, s, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims() != k.dims() {
        candle_core::bail!("fused attention: q {:?} k {:?} v {:?} do not match", q.dims(), k.dims(), v.dims());
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() || q.device().location() != k.device().location() {
        candle_core::bail!("fused attention: q, k and v must share dtype and device");
    }
    let key_mask = match key_mask {
        Some(m) => {
            if m.dims() != [b, s] {
                candle_core::bail!("fused attention: key mask {:?}, expected [{b}, {s}]", m.dims());
            }
            Some(m.to_dtype(DType::F32)?.contiguous()?)
        }
        None => None,
    };
    let mut problem = Problem { cu_seqlens, ..Problem::contiguous(b, h, kv, l, s, d, scale as f32, causal) };
    if kernel == Kernel::Decode {
        problem.splits = choose_splits(problem.blocks(), s);
    }
    problem.check().map_err(|e| candle_core::Error::Msg(format!("fused attention: {e}")))?;
    let op = FusedAttention { kernel, problem, key_mask };
    q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2)
}
