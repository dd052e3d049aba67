//! Fused attention: one pass over the keys per query tile with an online softmax in f32, instead
//! of the reference path's score matrix, f32 cast, bias add and softmax as separate kernels
//! ([`super::attention`]). Three kernels, all CUDA C of this crate compiled to PTX by nvcc in
//! `build.rs` with `--features cuda` (`kernels/attention.cu`):
//!
//! - **vision**: non-causal, every frame its own sequence (`cu_seqlens` over the packed
//!   `[frames·patches, heads, head_dim]` projections, read in place);
//! - **prefill**: causal at the cache offset, GQA (a block reads each K/V tile once for all query
//!   heads of its kv head), the KV cache's key mask read on the device, packed sequences
//!   (`cu_seqlens`) supported;
//! - **decode**: one query row, the keys split across blocks ([`layout::choose_splits`]) so batch
//!   1 still fills the GPU, the splits' partial softmax states merged by a second kernel.
//!
//! Inputs and outputs are f32, f16 or bf16; scores, softmax and accumulation are f32. Head dims
//! up to [`layout::MAX_HEAD_DIM`]; anything else takes the reference path.
//!
//! **Self-check** ([`selfcheck`]): when a model loads, each kernel runs against the reference on
//! small random inputs (ragged `cu_seqlens`, GQA, left and middle padding, a cache offset,
//! strided KV views, split keys) in the model's dtype. A kernel that differs beyond the dtype's
//! tolerance is logged (`warn`), counted (`vigil_attention_selfcheck_failures_total{kernel}`)
//! and not used: its calls take the reference path, so an unverified kernel never changes an
//! answer. `[model] attention` / `--attention` choose: `auto` (default) uses the verified kernels
//! on a GPU where they are not slower than the reference (timed at load) and the reference
//! elsewhere; `fused` uses the verified kernels on any device (on the CPU that is [`cpu`], the
//! kernels' plain-Rust twin, for testing); `reference` never fuses.
//!
//! The choice is process-wide state ([`configure`]): the attention layers dispatch through
//! [`vision`] and [`text`] without carrying a handle.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod layout;
mod op;
pub mod selfcheck;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};

use candle_core::{DType, Device, DeviceLocation, Tensor};

pub use crate::config::AttentionMode;
pub use op::fused_attention;
pub use selfcheck::{CheckResult, CheckShapes, Speed};

use super::attention::{attention, SCORE_BUDGET_BYTES};

/// The fused kernels, each verified on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Vision,
    Prefill,
    Decode,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::Vision, Kernel::Prefill, Kernel::Decode];

    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Vision => "vision",
            Kernel::Prefill => "prefill",
            Kernel::Decode => "decode",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which path each attention call takes: the mode and the self-check verdicts per device,
/// dtype and kernel. No verdict = not verified = reference.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    pub mode: AttentionMode,
    verdicts: HashMap<(DeviceLocation, DType, Kernel), bool>,
}

impl Policy {
    pub fn new(mode: AttentionMode) -> Self {
        Self { mode, verdicts: HashMap::new() }
    }

    /// Whether `mode` wants the kernels checked (and used) on `device`.
    pub fn wants_fused(mode: AttentionMode, device: &Device) -> bool {
        match mode {
            AttentionMode::Reference => false,
            AttentionMode::Fused => true,
            AttentionMode::Auto => device.is_cuda(),
        }
    }

    pub fn record(&mut self, device: &Device, dtype: DType, kernel: Kernel, passed: bool) {
        self.verdicts.insert((device.location(), dtype, kernel), passed);
    }

    /// The fused kernel for this call, or the reference.
    pub fn use_fused(&self, kernel: Kernel, device: &Device, dtype: DType, head_dim: usize) -> bool {
        Self::wants_fused(self.mode, device)
            && head_dim <= layout::MAX_HEAD_DIM
            && self.verdicts.get(&(device.location(), dtype, kernel)).copied().unwrap_or(false)
    }
}

static POLICY: LazyLock<RwLock<Policy>> = LazyLock::new(|| RwLock::new(Policy::default()));
static FAILURES: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
/// The last self-check verdict per kernel (`None`: not checked).
static LAST: RwLock<[Option<bool>; 3]> = RwLock::new([None; 3]);

fn policy() -> std::sync::RwLockReadGuard<'static, Policy> {
    POLICY.read().unwrap_or_else(|e| e.into_inner())
}

/// Environment hook for tests and drills: a comma-separated list of kernels (or `all`) whose
/// self-check output is perturbed before the comparison, forcing a mismatch and the fallback.
/// Read only by [`configure`].
pub const CORRUPT_ENV: &str = "VIGIL_ATTENTION_SELFCHECK_CORRUPT";

fn corrupt_from_env() -> Vec<Kernel> {
    let Ok(v) = std::env::var(CORRUPT_ENV) else { return Vec::new() };
    Kernel::ALL.into_iter().filter(|k| v.split(',').map(str::trim).any(|w| w == "all" || w == k.as_str())).collect()
}

/// Set the process's attention mode and, where it wants the kernels on `device`, self-check
/// them in `dtype` at `shapes` (the loaded model's head counts and dims). Failures are logged,
/// counted ([`status`]) and leave that kernel on the reference path; under `auto` a verified
/// kernel is also timed against the reference ([`selfcheck::speed`]) and used only if it is not
/// slower. Returns the checks run (none under `reference`, or `auto` off a GPU).
pub fn configure(mode: AttentionMode, device: &Device, dtype: DType, shapes: &CheckShapes) -> Vec<CheckResult> {
    let mut results = if Policy::wants_fused(mode, device) {
        selfcheck::run(device, dtype, shapes, &corrupt_from_env())
    } else {
        Vec::new()
    };
    for r in &mut results {
        r.used = r.passed;
        // `auto` is about speed: a verified kernel slower than the reference on this GPU (the
        // kernels favour obvious correctness over tensor cores) is not used. `fused` uses it.
        if r.passed && mode == AttentionMode::Auto {
            match selfcheck::speed(r.kernel, device, dtype, shapes, false) {
                Ok(s) => {
                    r.speed = Some(s);
                    r.used = s.fused_wins();
                }
                Err(e) => {
                    r.used = false;
                    r.error = Some(format!("timing: {e}"));
                }
            }
        }
    }
    let mut p = POLICY.write().unwrap_or_else(|e| e.into_inner());
    let mut last = LAST.write().unwrap_or_else(|e| e.into_inner());
    p.mode = mode;
    for r in &results {
        p.record(device, dtype, r.kernel, r.used);
        last[r.kernel.index()] = Some(r.passed);
        let (fused_ms, reference_ms) = r.speed.map_or((f64::NAN, f64::NAN), |s| (s.fused_ms, s.reference_ms));
        if !r.passed {
            FAILURES[r.kernel.index()].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(kernel = %r.kernel, dtype = r.dtype_name(), max_abs_diff = r.max_abs_diff, tolerance = r.tolerance,
                error = r.error.as_deref().unwrap_or(""),
                "fused attention kernel failed its self-check against the reference; using the reference path");
        } else if r.used {
            tracing::info!(kernel = %r.kernel, dtype = r.dtype_name(), max_abs_diff = r.max_abs_diff, tolerance = r.tolerance,
                fused_ms, reference_ms, "fused attention kernel verified");
        } else {
            tracing::info!(kernel = %r.kernel, dtype = r.dtype_name(), max_abs_diff = r.max_abs_diff, fused_ms, reference_ms,
                error = r.error.as_deref().unwrap_or(""),
                "fused attention kernel verified but not faster than the reference here; attention = \"auto\" keeps the reference");
        }
    }
    results
}

/// A kernel's self-check record in this process (the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelStatus {
    pub kernel: Kernel,
    /// The last self-check's verdict; `None` when it never ran.
    pub verified: Option<bool>,
    /// Self-checks it failed since the process started.
    pub failures: u64,
}

pub fn status() -> Vec<KernelStatus> {
    let last = LAST.read().unwrap_or_else(|e| e.into_inner());
    Kernel::ALL
        .into_iter()
        .map(|k| KernelStatus {
            kernel: k,
            verified: last[k.index()],
            failures: FAILURES[k.index()].load(Ordering::Relaxed),
        })
        .collect()
}

/// Whether calls of `kernel` on `device` in `dtype` at `head_dim` take the fused path now.
pub fn uses_fused(kernel: Kernel, device: &Device, dtype: DType, head_dim: usize) -> bool {
    policy().use_fused(kernel, device, dtype, head_dim)
}

/// The vision tower's attention. `q`, `k`, `v`: `[frames, patches, heads, head_dim]`; each frame
/// attends only to itself. Returns `[frames, patches, heads·head_dim]`.
pub(crate) fn vision(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (_, _, _, d) = q.dims4()?;
    if uses_fused(Kernel::Vision, q.device(), q.dtype(), d) {
        return vision_fused(q, k, v, scale);
    }
    reference_vision(q, k, v, scale)
}

/// [`vision`] on the fused kernel, whatever the policy (benchmarks and tests).
#[doc(hidden)]
pub fn vision_fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (f, n, h, d) = q.dims4()?;
    // The frames packed along the rows, read in place through a transposed view.
    let packed = |x: &Tensor| x.contiguous()?.reshape((1, f * n, h, d))?.transpose(1, 2);
    let cu = layout::uniform_cu_seqlens(f, n);
    let out = fused_attention(Kernel::Vision, &packed(q)?, &packed(k)?, &packed(v)?, scale, false, Some(cu), None)?;
    out.transpose(1, 2)?.reshape((f, n, h * d))
}

/// The reference path for [`vision`]: frames batched, whole frames per score-budget chunk.
#[doc(hidden)]
pub fn reference_vision(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (f, n, h, d) = q.dims4()?;
    let q = q.transpose(1, 2)?.contiguous()?; // [f, h, n, d]
    let k = k.transpose(1, 2)?.contiguous()?;
    let v = v.transpose(1, 2)?.contiguous()?;
    // Whole frames per chunk so no score tensor spans more frames than the budget allows.
    let frames_per_chunk = (SCORE_BUDGET_BYTES / (h * n * n * 4).max(1)).max(1);
    let mut outs = Vec::with_capacity(f.div_ceil(frames_per_chunk));
    let mut start = 0;
    while start < f {
        let len = frames_per_chunk.min(f - start);
        let (qc, kc, vc) = (q.narrow(0, start, len)?, k.narrow(0, start, len)?, v.narrow(0, start, len)?);
        outs.push(attention(&qc, &kc, &vc, scale, None)?);
        start += len;
    }
    Tensor::cat(&outs, 0)?.transpose(1, 2)?.reshape((f, n, h * d))
}

/// The decoder's attention. `q` `[b, h, l, d]`, `k`/`v` `[b, kv, past + l, d]` (the cache's
/// views), `key_mask` `[b, past + l]` (1 = token, 0 = padding): a query at position `p` sees
/// the valid keys at positions `≤ p`. `bias(start, len)` is the reference path's additive mask
/// for query rows `start..start+len` (the same rule). Returns `[b, h, l, d]`.
pub(crate) fn text(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &dyn Fn(usize, usize) -> candle_core::Result<Tensor>,
    key_mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (_, _, l, d) = q.dims4()?;
    let kernel = if l == 1 { Kernel::Decode } else { Kernel::Prefill };
    if uses_fused(kernel, q.device(), q.dtype(), d) {
        return fused_attention(kernel, q, k, v, scale, true, None, Some(key_mask));
    }
    attention(q, k, v, scale, Some(bias))
}

#[cfg(test)]
mod tests;
