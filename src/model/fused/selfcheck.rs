//! The fused kernels checked against the reference path on the device they will run on.
//!
//! **What is compared.** Each kernel runs on small random inputs (uniform in [-2, 2), fixed
//! seeds) in the model's dtype, and so does the reference ([`crate::model::attention`]'s
//! matmul–softmax–matmul with an additive mask), on the same device:
//! - vision: 106 rows packed as frames of 37, 64 and 5 rows (`cu_seqlens`, non-causal), the
//!   model's vision head dim; the reference runs each frame alone;
//! - prefill: batch 2, 40 new rows after 24 cached positions, the model's GQA ratio and text head
//!   dim, a key mask with left and middle padding that leaves some query rows with no visible
//!   key;
//! - decode: batch 3, one row over 300 keys with padding, keys split across blocks.
//!
//! Prefill and decode read their operands as the decoder passes them: K/V through views that
//! start some positions into a larger buffer (a cache with room after it, or a packed sequence's
//! keys), the queries through a transposed view of RoPE rows that starts some rows in.
//!
//! Rows that see no key are skipped: the kernels write zeros there and the reference an average
//! of the values; the decoder never reads such rows (they are padding).
//!
//! **Tolerance** ([`tolerance`]): the largest absolute difference of any compared output element
//! (outputs are averages of values in [-2, 2)): f32 1e-4, f16 5e-3, bf16 3e-2. The reference
//! rounds scores and probabilities to the model dtype where the kernels keep f32; on these
//! inputs the kernels' CPU twin differs from it by about 1e-6 (f32), 1.5e-3 (f16) and 1.2e-2
//! (bf16), so each bound leaves 2.5× or more of margin, while a layout or masking error moves
//! some output by O(1) (the cases include rows that see a single key). A bound too tight only
//! costs speed: the kernel falls back to the reference.
//!
//! **On failure** (difference over tolerance, or the kernel failing to load or run): the kernel
//! is not used ([`super::configure`]), a warning is logged and
//! `vigil_attention_selfcheck_failures_total{kernel}` counts it.

use candle_core::{DType, Device, Tensor};

use super::layout::Problem;
use super::{fused_attention, Kernel};
use crate::model::attention::attention;

/// The model's attention shapes the checks run at (head counts are capped to keep them small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckShapes {
    pub vision_heads: usize,
    pub vision_head_dim: usize,
    pub text_heads: usize,
    pub text_kv_heads: usize,
    pub text_head_dim: usize,
}

impl Default for CheckShapes {
    /// VideoLLaMA3-2B: vision 16 × 72, text 12 query / 2 kv heads × 128.
    fn default() -> Self {
        Self { vision_heads: 16, vision_head_dim: 72, text_heads: 12, text_kv_heads: 2, text_head_dim: 128 }
    }
}

impl CheckShapes {
    pub fn of(cfg: &crate::model::VideoLlama3Config) -> Self {
        let (v, t) = (&cfg.vision_config, &cfg.text_config);
        Self {
            vision_heads: v.num_attention_heads,
            vision_head_dim: v.head_dim(),
            text_heads: t.num_attention_heads,
            text_kv_heads: t.num_key_value_heads,
            text_head_dim: t.head_dim,
        }
    }
}

/// One kernel's check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub kernel: Kernel,
    pub dtype: DType,
    pub passed: bool,
    /// Largest |fused − reference| over the compared elements (NaN if it did not run).
    pub max_abs_diff: f32,
    pub tolerance: f32,
    /// Output rows (query row × head) compared.
    pub rows: usize,
    /// Why the kernel could not run, if it could not.
    pub error: Option<String>,
    /// Under `auto` on a GPU, after passing: one call's time fused and reference at a working
    /// size ([`speed`]).
    pub speed: Option<Speed>,
    /// Whether calls take the fused kernel after this check.
    pub used: bool,
}

/// One attention call's time in milliseconds, fused and reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    pub fused_ms: f64,
    pub reference_ms: f64,
}

impl Speed {
    /// `auto` keeps a verified kernel only where it is not slower than the reference.
    pub fn fused_wins(&self) -> bool {
        self.fused_ms <= self.reference_ms
    }
}

/// Time `kernel` fused and reference on `device` at a working size of the model's shapes (vision
/// 4 frames × 1024 patches, prefill 2048 tokens, decode one row over 2048 keys, batch 1; `tiny`
/// shrinks them for tests): one warm-up call, then the mean of 3.
pub fn speed(
    kernel: Kernel,
    device: &Device,
    dtype: DType,
    shapes: &CheckShapes,
    tiny: bool,
) -> candle_core::Result<Speed> {
    let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype);
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
        f()?;
        device.synchronize()?;
        let t0 = std::time::Instant::now();
        for _ in 0..3 {
            f()?;
        }
        device.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3 / 3.0)
    };
    if kernel == Kernel::Vision {
        let (f, n) = if tiny { (2, 64) } else { (4, 1024) };
        let (h, d) = (shapes.vision_heads, shapes.vision_head_dim);
        let (q, k, v) = (rnd(&[f, n, h, d])?, rnd(&[f, n, h, d])?, rnd(&[f, n, h, d])?);
        let scale = (d as f64).powf(-0.5);
        return Ok(Speed {
            fused_ms: time(&|| super::vision_fused(&q, &k, &v, scale))?,
            reference_ms: time(&|| super::reference_vision(&q, &k, &v, scale))?,
        });
    }
    let s = if tiny { 64 } else { 2048 };
    let l = if kernel == Kernel::Decode { 1 } else { s };
    let (h, kv, d) = (shapes.text_heads, shapes.text_kv_heads, shapes.text_head_dim);
    let (q, k, v) = (rnd(&[1, h, l, d])?, rnd(&[1, kv, s, d])?, rnd(&[1, kv, s, d])?);
    let qpos = Tensor::arange((s - l) as u32, s as u32, device)?.unsqueeze(1)?;
    let kpos = Tensor::arange(0u32, s as u32, device)?.unsqueeze(0)?;
    let zero = Tensor::zeros((l, s), DType::F32, device)?;
    let neg = Tensor::full(f32::MIN, (l, s), device)?;
    let bias = kpos.broadcast_le(&qpos)?.where_cond(&zero, &neg)?.reshape((1, 1, l, s))?;
    let mask = Tensor::ones((1, s), DType::F32, device)?;
    let scale = (d as f64).powf(-0.5);
    let pick = |start: usize, len: usize| bias.narrow(2, start, len);
    Ok(Speed {
        fused_ms: time(&|| fused_attention(kernel, &q, &k, &v, scale, true, None, Some(&mask)))?,
        reference_ms: time(&|| attention(&q, &k, &v, scale, Some(&pick)))?,
    })
}

impl CheckResult {
    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "other",
        }
    }
}

/// Largest accepted |fused − reference| per output element for inputs in [-2, 2).
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 5e-3,
        _ => 3e-2,
    }
}

/// Check every kernel; `corrupt` lists kernels whose output is perturbed first (the test hook
/// that proves the fallback).
pub fn run(device: &Device, dtype: DType, shapes: &CheckShapes, corrupt: &[Kernel]) -> Vec<CheckResult> {
    Kernel::ALL.into_iter().map(|k| check(k, device, dtype, shapes, corrupt.contains(&k))).collect()
}

/// Check one kernel.
pub fn check(kernel: Kernel, device: &Device, dtype: DType, shapes: &CheckShapes, corrupt: bool) -> CheckResult {
    let tolerance = tolerance(dtype);
    let mut result = CheckResult {
        kernel,
        dtype,
        passed: false,
        max_abs_diff: f32::NAN,
        tolerance,
        rows: 0,
        error: None,
        speed: None,
        used: false,
    };
    match compare(kernel, device, dtype, shapes, corrupt) {
        Ok((diff, rows)) => {
            result.max_abs_diff = diff;
            result.rows = rows;
            result.passed = diff <= tolerance && rows > 0;
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result
}

/// A check's inputs, built on the host.
pub(crate) struct Case {
    pub problem: Problem,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// `[batch, k_len]`, 1 = valid.
    pub key_mask: Option<Vec<f32>>,
}

fn random(rng: &mut fastrand::Rng, shape: &[usize]) -> candle_core::Result<Tensor> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.f32() * 4.0 - 2.0).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn base(heads: usize, kv: usize, q_len: usize, k_len: usize, d: usize) -> Problem {
    Problem::contiguous(1, heads, kv, q_len, k_len, d, (d as f32).powf(-0.5), false)
}

/// The inputs of `kernel`'s check (also used by the tests against the CPU twin).
pub(crate) fn case(kernel: Kernel, shapes: &CheckShapes) -> candle_core::Result<Case> {
    let mut rng = fastrand::Rng::with_seed(0x5e1f_c4ec + kernel as u64);
    let kv = shapes.text_kv_heads.clamp(1, 2);
    let groups = (shapes.text_heads / shapes.text_kv_heads.max(1)).max(1);
    let td = shapes.text_head_dim;
    match kernel {
        Kernel::Vision => {
            let (h, d) = (shapes.vision_heads.clamp(1, 4), shapes.vision_head_dim);
            let cu = vec![0u32, 37, 101, 106];
            let n = 106;
            let mut problem = base(h, h, n, n, d);
            problem.cu_seqlens = Some(cu);
            // Packed [1, rows, heads, d], read as a transposed view (as the tower passes them).
            let packed = |rng: &mut fastrand::Rng| random(rng, &[1, n, h, d])?.transpose(1, 2);
            let (q, k, v) = (packed(&mut rng)?, packed(&mut rng)?, packed(&mut rng)?);
            Ok(Case { problem, q, k, v, key_mask: None })
        }
        Kernel::Prefill | Kernel::Decode => {
            let (b, l, s) = if kernel == Kernel::Prefill { (2, 40, 64) } else { (3, 1, 300) };
            let h = kv * groups;
            let mut problem = base(h, kv, l, s, td);
            problem.batch = b;
            problem.causal = true;
            let q = random(&mut rng, &[b, h, l, td])?;
            let k = random(&mut rng, &[b, kv, s, td])?;
            let v = random(&mut rng, &[b, kv, s, td])?;
            let mut mask = vec![1f32; b * s];
            // Row 1: a left-padded prefix, then padding before the suffix (a forked cache).
            let pads: &[(usize, std::ops::Range<usize>)] = if kernel == Kernel::Prefill {
                &[(1, 0..30), (1, 50..53)]
            } else {
                &[(1, 0..17), (2, 100..140), (2, 299..300)]
            };
            for (row, keys) in pads {
                for key in keys.clone() {
                    mask[row * s + key] = 0.0;
                }
            }
            Ok(Case { problem, q, k, v, key_mask: Some(mask) })
        }
    }
}

/// Rows before a prefill or decode case's queries, and positions before its keys, in their buffers.
const QUERY_OFFSET: usize = 7;

impl Case {
    /// Whether output row `i` of batch row `b` sees any key (only those are compared).
    pub(crate) fn sees_a_key(&self, b: usize, i: usize) -> bool {
        let p = &self.problem;
        p.visible(i).any(|key| self.key_mask.as_ref().is_none_or(|m| m[b * p.k_len + key] != 0.0))
    }

    fn on(&self, device: &Device, dtype: DType) -> candle_core::Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        let put = |t: &Tensor| t.to_dtype(dtype)?.to_device(device);
        // Keep the views' strides: convert the underlying buffer, then re-narrow/transpose.
        let (q, k, v) = match self.problem.cu_seqlens {
            Some(_) => {
                let back = |t: &Tensor| put(&t.transpose(1, 2)?.contiguous()?)?.transpose(1, 2);
                (back(&self.q)?, back(&self.k)?, back(&self.v)?)
            }
            None => {
                let s = self.problem.k_len;
                // K/V as narrowed views of a larger buffer, as the decoder passes them: a cache
                // with room after the filled positions, or a packed sequence's keys after the
                // sequences before it.
                let cache = |t: &Tensor| -> candle_core::Result<Tensor> {
                    let (b, kv, _, d) = t.dims4()?;
                    let zeros = |n: usize| Tensor::zeros((b, kv, n, d), DType::F32, &Device::Cpu);
                    let buffer = Tensor::cat(&[&zeros(QUERY_OFFSET)?, &t.contiguous()?, &zeros(30.min(s))?], 2)?;
                    put(&buffer)?.narrow(2, QUERY_OFFSET, s)
                };
                // Q as the decoder passes it: a `[b, h, l, d]` view of the RoPE output's
                // `[b, rows, h, d]` rows, starting some rows in (a packed sequence's queries).
                let query = |t: &Tensor| -> candle_core::Result<Tensor> {
                    let (b, h, l, d) = t.dims4()?;
                    let before = Tensor::zeros((b, QUERY_OFFSET, h, d), DType::F32, &Device::Cpu)?;
                    let rows = Tensor::cat(&[&before, &t.transpose(1, 2)?.contiguous()?], 1)?;
                    put(&rows)?.narrow(1, QUERY_OFFSET, l)?.transpose(1, 2)
                };
                (query(&self.q)?, cache(&self.k)?, cache(&self.v)?)
            }
        };
        let mask = match &self.key_mask {
            Some(m) => Some(
                Tensor::from_vec(m.clone(), (self.problem.batch, self.problem.k_len), &Device::Cpu)?
                    .to_device(device)?,
            ),
            None => None,
        };
        Ok((q, k, v, mask))
    }

    /// The reference path on the case: per sequence for `cu_seqlens`, else with the additive
    /// mask the decoder builds (0 = visible, `f32::MIN` = hidden). `[b, h, l, d]`.
    pub(crate) fn reference(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let p = &self.problem;
        let scale = p.scale as f64;
        if let Some(cu) = &p.cu_seqlens {
            let mut outs = Vec::new();
            for w in cu.windows(2) {
                let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
                if len == 0 {
                    continue;
                }
                let part = |t: &Tensor| t.narrow(2, start, len)?.contiguous();
                outs.push(attention(&part(q)?, &part(k)?, &part(v)?, scale, None)?);
            }
            return Tensor::cat(&outs, 2);
        }
        let mut bias = vec![f32::MIN; p.batch * p.q_len * p.k_len];
        for b in 0..p.batch {
            for i in 0..p.q_len {
                for key in p.visible(i) {
                    if self.key_mask.as_ref().is_none_or(|m| m[b * p.k_len + key] != 0.0) {
                        bias[(b * p.q_len + i) * p.k_len + key] = 0.0;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (p.batch, 1, p.q_len, p.k_len), &Device::Cpu)?.to_device(q.device())?;
        let pick = |start: usize, len: usize| bias.narrow(2, start, len);
        attention(q, k, v, scale, Some(&pick))
    }

    /// The fused kernel on the case. `[b, h, l, d]`.
    pub(crate) fn fused(
        &self,
        kernel: Kernel,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let p = &self.problem;
        fused_attention(kernel, q, k, v, p.scale as f64, p.causal, p.cu_seqlens.clone(), mask)
    }

    /// Largest difference over the rows that see a key, and how many (row × head) were compared.
    pub(crate) fn max_diff(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<(f32, usize)> {
        let p = &self.problem;
        let host =
            |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (a, b) = (host(a)?, host(b)?);
        let (mut diff, mut rows) = (0f32, 0);
        let d = p.head_dim;
        for bi in 0..p.batch {
            for h in 0..p.heads {
                for i in 0..p.q_len {
                    if !self.sees_a_key(bi, i) {
                        continue;
                    }
                    rows += 1;
                    let o = ((bi * p.heads + h) * p.q_len + i) * d;
                    for e in o..o + d {
                        let x = (a[e] - b[e]).abs();
                        // NaN never passes.
                        diff = if x.is_nan() { f32::INFINITY } else { diff.max(x) };
                    }
                }
            }
        }
        Ok((diff, rows))
    }
}

fn compare(
    kernel: Kernel,
    device: &Device,
    dtype: DType,
    shapes: &CheckShapes,
    corrupt: bool,
) -> candle_core::Result<(f32, usize)> {
    let case = case(kernel, shapes)?;
    let (q, k, v, mask) = case.on(device, dtype)?;
    let reference = case.reference(&q, &k, &v)?;
    let mut fused = case.fused(kernel, &q, &k, &v, mask.as_ref())?;
    if corrupt {
        fused = (fused + 1.0)?;
    }
    case.max_diff(&fused, &reference)
}
