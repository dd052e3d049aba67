//! Launching the PTX kernels that `build.rs` compiles from `kernels/attention.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Storage, Tensor};

use super::layout::Problem;
use super::Kernel;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "vigil_fused_attention";
/// Threads per attention block: 4 warps (`NWARPS` in the kernel).
const THREADS: u32 = 128;

/// `struct Params` of the kernel, field for field (64-bit fields first: no padding).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Params {
    q_sb: i64,
    q_sh: i64,
    q_sr: i64,
    k_sb: i64,
    k_sh: i64,
    k_sr: i64,
    v_sb: i64,
    v_sh: i64,
    v_sr: i64,
    batch: i32,
    heads: i32,
    kv_heads: i32,
    q_len: i32,
    k_len: i32,
    head_dim: i32,
    causal: i32,
    splits: i32,
    num_seqs: i32,
    scale: f32,
}

// SAFETY: plain old data with the kernel's layout, passed by value.
unsafe impl DeviceRepr for Params {}

// The C struct: 9 × 8 + 10 × 4 bytes, 8-aligned, no padding.
const _: () = assert!(std::mem::size_of::<Params>() == 112 && std::mem::align_of::<Params>() == 8);

fn params(p: &Problem) -> candle_core::Result<Params> {
    let int =
        |x: usize| i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("fused attention: {x} overflows i32")));
    Ok(Params {
        q_sb: p.q.batch as i64,
        q_sh: p.q.head as i64,
        q_sr: p.q.row as i64,
        k_sb: p.k.batch as i64,
        k_sh: p.k.head as i64,
        k_sr: p.k.row as i64,
        v_sb: p.v.batch as i64,
        v_sh: p.v.head as i64,
        v_sr: p.v.row as i64,
        batch: int(p.batch)?,
        heads: int(p.heads)?,
        kv_heads: int(p.kv_heads)?,
        q_len: int(p.q_len)?,
        k_len: int(p.k_len)?,
        head_dim: int(p.head_dim)?,
        causal: p.causal as i32,
        splits: int(p.splits)?,
        num_seqs: int(p.cu_seqlens.as_ref().map_or(0, |c| c.len().saturating_sub(1)))?,
        scale: p.scale,
    })
}

pub(super) fn launch(
    kernel: Kernel,
    p: &Problem,
    key_mask: Option<&Tensor>,
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage> {
    match q.0.dtype() {
        DType::F32 => launch_as::<f32>(kernel, p, key_mask, q, k, v, "f32"),
        DType::F16 => launch_as::<half::f16>(kernel, p, key_mask, q, k, v, "f16"),
        DType::BF16 => launch_as::<half::bf16>(kernel, p, key_mask, q, k, v, "bf16"),
        d => candle_core::bail!("fused attention: unsupported dtype {d:?}"),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_as<T: CudaDType + DeviceRepr>(
    kernel: Kernel,
    p: &Problem,
    key_mask: Option<&Tensor>,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    suffix: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = qs.device().clone();
    let params = params(p)?;
    let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
    let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    // Optional inputs are null pointers when absent.
    let null: u64 = 0;
    let mask_storage = key_mask.map(|m| m.storage_and_layout());
    let mask = match &mask_storage {
        Some((st, ml)) => match &**st {
            Storage::Cuda(c) => Some(c.as_cuda_slice::<f32>()?.slice(ml.start_offset()..)),
            _ => candle_core::bail!("fused attention: the key mask is not on the GPU"),
        },
        None => None,
    };
    let cu = match &p.cu_seqlens {
        Some(c) => Some(dev.clone_htod(c.as_slice())?),
        None => None,
    };
    let out_len = p.batch * p.q_len * p.heads * p.head_dim;
    // SAFETY: every element is written (by the attention kernel, or by the merge).
    let out = unsafe { dev.alloc::<T>(out_len)? };
    let grid = (p.row_tiles() as u32, p.kv_heads as u32, (p.batch * p.splits) as u32);
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let name = format!("attn_{kernel}_{suffix}");
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&params);
    b.arg(&q);
    b.arg(&k);
    b.arg(&v);
    match &mask {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    match &cu {
        Some(c) => b.arg(c),
        None => b.arg(&null),
    };
    if kernel != Kernel::Decode {
        b.arg(&out);
        // SAFETY: arguments match the kernel's signature; bounds come from `Problem::check`.
        unsafe { b.launch(cfg) }.w()?;
        return Ok(CudaStorage::wrap_cuda_slice(out, dev));
    }
    let rows = p.batch * p.splits * p.heads * p.q_len;
    let part_acc = dev.alloc_zeros::<f32>(rows * p.head_dim)?;
    let part_ml = dev.alloc_zeros::<f32>(rows * 2)?;
    b.arg(&part_acc);
    b.arg(&part_ml);
    // SAFETY: as above.
    unsafe { b.launch(cfg) }.w()?;
    let merge = dev.get_or_load_custom_func(&format!("attn_merge_{suffix}"), MODULE, PTX)?;
    let mut m = merge.builder();
    m.arg(&params);
    m.arg(&part_acc);
    m.arg(&part_ml);
    m.arg(&out);
    let cfg = LaunchConfig {
        grid_dim: ((p.batch * p.q_len * p.heads) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above.
    unsafe { m.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
