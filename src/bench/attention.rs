//! `vigil bench attention`: the fused attention kernels' self-check, then attention time per
//! layer, fused against the reference path, at the shapes the 2B model runs:
//! - vision: 16 frames × 1024 patches (448² frames), 16 heads × 72;
//! - prefill: 8 rows × 2300 tokens, 12 query / 2 kv heads × 128, causal;
//! - decode: batch 1 and 16, one token over 2400 cached keys.
//!
//! With `--tiny` (what the CPU dry run uses) the same cases shrink to seconds of CPU work. Each
//! case also compares the fused output with the reference at full size (largest absolute
//! difference), a second check at the real shapes.

use std::time::Instant;

use candle_core::{DType as CDType, Device as CDevice, Tensor};
use serde::Serialize;

use super::BenchError;
use crate::config::{AttentionMode, DType, Device};
use crate::model::fused::{self, CheckShapes, Kernel};

/// What to run.
#[derive(Debug, Clone)]
pub struct AttentionBenchOptions {
    pub device: Device,
    /// Default: bf16 on a GPU, f32 on the CPU.
    pub dtype: Option<DType>,
    /// `reference` skips the fused timings; `fused` self-checks and times the kernels that pass;
    /// `auto` times only those it would use (on the CPU none: the twin is a test path).
    pub attention: AttentionMode,
    /// Small shapes (a CPU dry run).
    pub tiny: bool,
    /// Timed calls per case and path (after one warm-up call).
    pub iters: usize,
}

/// One kernel's self-check, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub kernel: &'static str,
    pub passed: bool,
    pub max_abs_diff: f32,
    pub tolerance: f32,
    pub rows: usize,
    pub error: Option<String>,
    /// Whether the mode uses the kernel after the check (`auto`: also not slower at load).
    pub used: bool,
}

/// One workload's timings per layer.
#[derive(Debug, Clone, Serialize)]
pub struct CaseRow {
    pub case: String,
    pub kernel: &'static str,
    /// Which path `fused_ms` measured: `fused`, or `reference` when the kernel is not verified.
    pub path: &'static str,
    pub reference_ms: f64,
    pub fused_ms: Option<f64>,
    pub speedup: Option<f64>,
    /// Attention FLOPs per layer (QKᵀ and PV; causal counts the visible half).
    pub gflop: f64,
    /// K and V bytes read per layer (the decode bound).
    pub kv_mb: f64,
    pub fused_tflop_per_s: Option<f64>,
    pub fused_kv_gb_per_s: Option<f64>,
    /// Largest |fused − reference| over the whole output.
    pub max_abs_diff: Option<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttentionReport {
    pub device: String,
    pub dtype: String,
    pub attention: String,
    pub tiny: bool,
    pub selfcheck: Vec<CheckRow>,
    pub cases: Vec<CaseRow>,
}

struct Case {
    name: String,
    kernel: Kernel,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Vision: frames × patches; text: none.
    frames: Option<(usize, usize)>,
    key_mask: Option<Tensor>,
    bias: Option<Tensor>,
    scale: f64,
    gflop: f64,
    kv_bytes: f64,
}

fn randn(shape: &[usize], dtype: CDType, dev: &CDevice) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)
}

fn cases(tiny: bool, dtype: CDType, dev: &CDevice) -> candle_core::Result<Vec<Case>> {
    let elem = dtype.size_in_bytes() as f64;
    let mut out = Vec::new();
    // Vision: q, k, v as the tower passes them, [frames, patches, heads, d].
    let (f, n, h, d) = if tiny { (2, 64, 4, 72) } else { (16, 1024, 16, 72) };
    out.push(Case {
        name: format!("vision {f}x{n}"),
        kernel: Kernel::Vision,
        q: randn(&[f, n, h, d], dtype, dev)?,
        k: randn(&[f, n, h, d], dtype, dev)?,
        v: randn(&[f, n, h, d], dtype, dev)?,
        frames: Some((f, n)),
        key_mask: None,
        bias: None,
        scale: (d as f64).powf(-0.5),
        gflop: 4.0 * (f * n * n * h * d) as f64 / 1e9,
        kv_bytes: 2.0 * (f * n * h * d) as f64 * elem,
    });
    // Text: [b, h, l, d] queries over cache views [b, kv, s, d] of a buffer with headroom.
    let (h, kv, d) = if tiny { (6, 2, 64) } else { (12, 2, 128) };
    let text = |b: usize, l: usize, s: usize| -> candle_core::Result<Case> {
        let cache = |_: ()| -> candle_core::Result<Tensor> { randn(&[b, kv, s + 256, d], dtype, dev)?.narrow(2, 0, s) };
        let past = s - l;
        // The decoder's additive mask: causal at the cache offset, nothing padded.
        let qpos = Tensor::arange(past as u32, s as u32, dev)?.unsqueeze(1)?;
        let kpos = Tensor::arange(0u32, s as u32, dev)?.unsqueeze(0)?;
        let allowed = kpos.broadcast_le(&qpos)?;
        let zero = Tensor::zeros((l, s), CDType::F32, dev)?;
        let neg = Tensor::full(f32::MIN, (l, s), dev)?;
        let bias = allowed.where_cond(&zero, &neg)?.reshape((1, 1, l, s))?.broadcast_as((b, 1, l, s))?.contiguous()?;
        let visible = (0..l).map(|i| (past + i + 1) as f64).sum::<f64>();
        Ok(Case {
            name: if l == 1 { format!("decode b{b} over {s}") } else { format!("prefill {b}x{l}") },
            kernel: if l == 1 { Kernel::Decode } else { Kernel::Prefill },
            q: randn(&[b, h, l, d], dtype, dev)?,
            k: cache(())?,
            v: cache(())?,
            frames: None,
            key_mask: Some(Tensor::ones((b, s), CDType::F32, dev)?),
            bias: Some(bias),
            scale: (d as f64).powf(-0.5),
            gflop: 4.0 * b as f64 * visible * (h * d) as f64 / 1e9,
            kv_bytes: 2.0 * (b * kv * s * d) as f64 * elem,
        })
    };
    if tiny {
        out.push(text(2, 100, 100)?);
        out.push(text(1, 1, 200)?);
        out.push(text(4, 1, 200)?);
    } else {
        out.push(text(8, 2300, 2300)?);
        out.push(text(1, 1, 2400)?);
        out.push(text(16, 1, 2400)?);
    }
    Ok(out)
}

impl Case {
    fn reference(&self) -> candle_core::Result<Tensor> {
        match (self.frames, &self.bias) {
            (Some(_), _) => fused::reference_vision(&self.q, &self.k, &self.v, self.scale),
            (None, Some(bias)) => {
                let pick = |start: usize, len: usize| bias.narrow(2, start, len);
                crate::model::attention::attention(&self.q, &self.k, &self.v, self.scale, Some(&pick))
            }
            (None, None) => candle_core::bail!("text case without a bias"),
        }
    }

    fn fused(&self) -> candle_core::Result<Tensor> {
        match self.frames {
            Some(_) => fused::vision_fused(&self.q, &self.k, &self.v, self.scale),
            None => fused::fused_attention(
                self.kernel,
                &self.q,
                &self.k,
                &self.v,
                self.scale,
                true,
                None,
                self.key_mask.as_ref(),
            ),
        }
    }
}

/// Mean wall time of `iters` calls after one warm-up, the device synchronised around them.
fn time(
    dev: &CDevice,
    iters: usize,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<(f64, Tensor)> {
    let out = f()?;
    dev.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok((t0.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64, out))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(CDType::F32)?;
    let b = b.to_dtype(CDType::F32)?;
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Run the self-check and the timings.
pub fn run(o: &AttentionBenchOptions) -> Result<AttentionReport, BenchError> {
    let dtype = o.dtype.unwrap_or(o.device.default_dtype());
    let cdtype = crate::model::load::candle_dtype(dtype);
    let dev = crate::model::load::candle_device(o.device)?;
    let checks = fused::configure(o.attention, &dev, cdtype, &CheckShapes::default());
    let selfcheck = checks
        .iter()
        .map(|r| CheckRow {
            kernel: r.kernel.as_str(),
            passed: r.passed,
            max_abs_diff: r.max_abs_diff,
            tolerance: r.tolerance,
            rows: r.rows,
            error: r.error.clone(),
            used: r.used,
        })
        .collect();
    let model = |e: candle_core::Error| BenchError::Model(e.into());
    let mut rows = Vec::new();
    for case in cases(o.tiny, cdtype, &dev).map_err(model)? {
        let head_dim = case.q.dim(3).map_err(model)?;
        let (reference_ms, want) = time(&dev, o.iters, || case.reference()).map_err(model)?;
        let verified = fused::uses_fused(case.kernel, &dev, cdtype, head_dim);
        let (fused_ms, diff) = if verified {
            let (ms, got) = time(&dev, o.iters, || case.fused()).map_err(model)?;
            (Some(ms), Some(max_abs_diff(&got, &want).map_err(model)?))
        } else {
            (None, None)
        };
        rows.push(CaseRow {
            case: case.name.clone(),
            kernel: case.kernel.as_str(),
            path: if verified { "fused" } else { "reference" },
            reference_ms,
            fused_ms,
            speedup: fused_ms.map(|f| reference_ms / f),
            gflop: case.gflop,
            kv_mb: case.kv_bytes / 1e6,
            fused_tflop_per_s: fused_ms.map(|ms| case.gflop / ms),
            fused_kv_gb_per_s: fused_ms.map(|ms| case.kv_bytes / 1e6 / ms),
            max_abs_diff: diff,
        });
    }
    Ok(AttentionReport {
        device: o.device.to_string(),
        dtype: dtype.to_string(),
        attention: o.attention.to_string(),
        tiny: o.tiny,
        selfcheck,
        cases: rows,
    })
}

/// The report as a table.
pub fn table(r: &AttentionReport) -> String {
    let mut s = format!("attention on {} ({}, attention = {})\n", r.device, r.dtype, r.attention);
    if r.selfcheck.is_empty() {
        s.push_str("self-check: not run (the mode does not use the fused kernels here)\n");
    }
    for c in &r.selfcheck {
        s.push_str(&format!(
            "self-check {:<8} {}  max |diff| {:.3e} (tolerance {:.1e}, {} rows){}\n",
            c.kernel,
            if c.passed { "passed" } else { "FAILED: reference used" },
            c.max_abs_diff,
            c.tolerance,
            c.rows,
            c.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }
    s.push_str(
        "\ncase                    | reference ms | fused ms | speedup | fused TFLOP/s | fused KV GB/s | max |diff|\n",
    );
    s.push_str(
        "------------------------|--------------|----------|---------|---------------|---------------|----------\n",
    );
    let opt = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
    for c in &r.cases {
        s.push_str(&format!(
            "{:<24}| {:>12.3} | {:>8} | {:>7} | {:>13} | {:>13} | {}\n",
            c.case,
            c.reference_ms,
            opt(c.fused_ms, 3),
            opt(c.speedup, 2),
            opt(c.fused_tflop_per_s, 2),
            opt(c.fused_kv_gb_per_s, 1),
            c.max_abs_diff.map(|d| format!("{d:.3e}")).unwrap_or_else(|| "-".into()),
        ));
    }
    s
}
