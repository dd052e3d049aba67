//! The CPU twin against the reference path: the kernels' index and layout math (packing,
//! GQA head mapping, causal offsets, key masks, strided views, split keys and their merge).

use candle_core::{DType, Device, Tensor};

use super::layout::Problem;
use super::selfcheck::{self, CheckShapes};
use super::*;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.f32() * 4.0 - 2.0).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Every check case passes on the CPU twin in every dtype, with room to spare in f32.
#[test]
fn the_twin_passes_every_self_check_case() {
    for shapes in [
        CheckShapes::default(),
        CheckShapes { vision_heads: 2, vision_head_dim: 16, text_heads: 4, text_kv_heads: 4, text_head_dim: 8 },
    ] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for r in selfcheck::run(&Device::Cpu, dtype, &shapes, &[]) {
                assert!(r.passed, "{r:?}");
                assert!(r.rows > 0, "{r:?}");
                if dtype == DType::F32 {
                    assert!(r.max_abs_diff < 1e-5, "{r:?}");
                }
            }
        }
    }
}

#[test]
fn a_corrupted_kernel_fails_its_check_and_falls_back() {
    let shapes = CheckShapes::default();
    let results = selfcheck::run(&Device::Cpu, DType::F32, &shapes, &[Kernel::Prefill]);
    let mut policy = Policy::new(AttentionMode::Fused);
    for r in &results {
        assert_eq!(r.passed, r.kernel != Kernel::Prefill, "{r:?}");
        policy.record(&Device::Cpu, DType::F32, r.kernel, r.passed);
    }
    assert!(policy.use_fused(Kernel::Vision, &Device::Cpu, DType::F32, 72));
    assert!(!policy.use_fused(Kernel::Prefill, &Device::Cpu, DType::F32, 128));
    assert!(policy.use_fused(Kernel::Decode, &Device::Cpu, DType::F32, 128));
}

#[test]
fn the_policy_uses_only_verified_kernels_where_the_mode_wants_them() {
    let cpu = Device::Cpu;
    let mut p = Policy::new(AttentionMode::Fused);
    // Nothing checked yet: reference.
    assert!(!p.use_fused(Kernel::Decode, &cpu, DType::F32, 64));
    p.record(&cpu, DType::F32, Kernel::Decode, true);
    assert!(p.use_fused(Kernel::Decode, &cpu, DType::F32, 64));
    // Verified in f32 says nothing about bf16, nor about head dims the kernels do not hold.
    assert!(!p.use_fused(Kernel::Decode, &cpu, DType::BF16, 64));
    assert!(!p.use_fused(Kernel::Decode, &cpu, DType::F32, 256));
    // auto fuses on GPUs only; reference never.
    p.mode = AttentionMode::Auto;
    assert!(!p.use_fused(Kernel::Decode, &cpu, DType::F32, 64));
    p.mode = AttentionMode::Reference;
    assert!(!p.use_fused(Kernel::Decode, &cpu, DType::F32, 64));
    assert!(!Policy::wants_fused(AttentionMode::Auto, &cpu));
    assert!(Policy::wants_fused(AttentionMode::Fused, &cpu));
}

/// Random problems through the twin at several split counts against the reference with the
/// decoder's additive mask.
#[test]
fn the_twin_equals_the_reference_across_gqa_offsets_masks_and_splits() {
    let cases = [
        // (batch, heads, kv, q_len, k_len, d, causal)
        (1, 1, 1, 1, 1, 4, true),
        (2, 6, 2, 1, 77, 8, true),
        (2, 6, 2, 19, 19, 16, true),
        (1, 4, 4, 33, 70, 12, true),
        (3, 2, 1, 5, 40, 72, false),
        (1, 12, 2, 17, 129, 128, true),
    ];
    for (n, &(b, h, kv, l, s, d, causal)) in cases.iter().enumerate() {
        let seed = n as u64 * 10;
        let q = randn(&[b, h, l, d], seed);
        let k = randn(&[b, kv, s, d], seed + 1);
        let v = randn(&[b, kv, s, d], seed + 2);
        let mut rng = fastrand::Rng::with_seed(seed + 3);
        // Random padding, but the last key of each row stays valid so every row sees a key.
        let mask: Vec<f32> = (0..b * s).map(|i| if i % s == s - 1 || rng.f32() > 0.3 { 1.0 } else { 0.0 }).collect();
        let mut p = Problem::contiguous(b, h, kv, l, s, d, 0.3, causal);
        let mut bias = vec![f32::MIN; b * l * s];
        let mut sees = vec![false; b * l];
        for bi in 0..b {
            for i in 0..l {
                for key in p.visible(i) {
                    if mask[bi * s + key] != 0.0 {
                        bias[(bi * l + i) * s + key] = 0.0;
                        sees[bi * l + i] = true;
                    }
                }
            }
        }
        let bias_t = Tensor::from_vec(bias, (b, 1, l, s), &Device::Cpu).unwrap();
        let pick = |start: usize, len: usize| bias_t.narrow(2, start, len);
        let want = crate::model::attention::attention(&q, &k, &v, 0.3, Some(&pick)).unwrap(); // [b,h,l,d]
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for splits in [1, 2, 3, 7] {
            p.splits = splits;
            let got = cpu::attend(&p, &flat(&q), &flat(&k), &flat(&v), Some(&mask)); // [b,l,h,d]
            let mut worst = 0f32;
            for bi in 0..b {
                for i in 0..l {
                    for hh in 0..h {
                        for e in 0..d {
                            let g = got[((bi * l + i) * h + hh) * d + e];
                            if !sees[bi * l + i] {
                                assert_eq!(g, 0.0, "a row without keys outputs zeros");
                                continue;
                            }
                            worst = worst.max((g - want[((bi * h + hh) * l + i) * d + e]).abs());
                        }
                    }
                }
            }
            assert!(worst < 1e-5, "case {n} splits {splits}: {worst}");
        }
    }
}

/// Packed sequences (ragged, one empty) equal each sequence run alone, causal or not.
#[test]
fn packed_sequences_equal_separate_runs() {
    let (h, kv, d) = (4, 2, 8);
    let cu = vec![0u32, 5, 5, 38, 40];
    let n = 40;
    let q = randn(&[1, h, n, d], 1);
    let k = randn(&[1, kv, n, d], 2);
    let v = randn(&[1, kv, n, d], 3);
    for causal in [false, true] {
        let got = fused_attention(Kernel::Prefill, &q, &k, &v, 0.4, causal, Some(cu.clone()), None).unwrap();
        for w in cu.windows(2) {
            let (a, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            if len == 0 {
                continue;
            }
            let part = |t: &Tensor| t.narrow(2, a, len).unwrap().contiguous().unwrap();
            let causal_bias =
                (0..len * len).map(|x| if !causal || x % len <= x / len { 0f32 } else { f32::MIN }).collect::<Vec<_>>();
            let bias_t = Tensor::from_vec(causal_bias, (1, 1, len, len), &Device::Cpu).unwrap();
            let pick = |start: usize, rows: usize| bias_t.narrow(2, start, rows);
            let want = crate::model::attention::attention(&part(&q), &part(&k), &part(&v), 0.4, Some(&pick)).unwrap();
            let diff = max_abs_diff(&got.narrow(2, a, len).unwrap(), &want);
            assert!(diff < 1e-5, "causal {causal} sequence at {a}: {diff}");
        }
    }
}

/// The vision dispatch's packing (frames along the rows, transposed views) equals the
/// reference's frame batching.
#[test]
fn vision_packing_equals_frame_batching() {
    let (f, n, h, d) = (3, 21, 2, 72);
    let q = randn(&[f, n, h, d], 4);
    let k = randn(&[f, n, h, d], 5);
    let v = randn(&[f, n, h, d], 6);
    let scale = (d as f64).powf(-0.5);
    let fused = vision_fused(&q, &k, &v, scale).unwrap();
    let reference = reference_vision(&q, &k, &v, scale).unwrap();
    assert_eq!(fused.dims(), [f, n, h * d]);
    assert!(max_abs_diff(&fused, &reference) < 1e-5);
    // The packing must not let frames see each other: changing frame 0's keys moves frame 0 only.
    let k2 = Tensor::cat(&[&randn(&[1, n, h, d], 7), &k.narrow(0, 1, f - 1).unwrap()], 0).unwrap();
    let moved = vision_fused(&q, &k2, &v, scale).unwrap();
    assert!(max_abs_diff(&moved.narrow(0, 0, 1).unwrap(), &fused.narrow(0, 0, 1).unwrap()) > 1e-3);
    assert_eq!(max_abs_diff(&moved.narrow(0, 1, f - 1).unwrap(), &fused.narrow(0, 1, f - 1).unwrap()), 0.0);
}

/// The decoder's dispatch on the fused path: KV cache views (narrowed, strided) and the key
/// mask give the reference's answer for prefill and decode rows.
#[test]
fn text_attention_on_cache_views_equals_the_reference() {
    let (b, h, kv, d, cap) = (2, 6, 2, 16, 50);
    let k_buf = randn(&[b, kv, cap, d], 8);
    let v_buf = randn(&[b, kv, cap, d], 9);
    for (l, s) in [(7, 30), (1, 31)] {
        let q = randn(&[b, h, l, d], 10 + l as u64);
        let (k, v) = (k_buf.narrow(2, 0, s).unwrap(), v_buf.narrow(2, 0, s).unwrap());
        let past = s - l;
        // Row 1 left-padded by 3.
        let mask: Vec<f32> = (0..b * s).map(|i| if i / s == 1 && i % s < 3 { 0.0 } else { 1.0 }).collect();
        let key_mask = Tensor::from_vec(mask.clone(), (b, s), &Device::Cpu).unwrap();
        let mut bias = vec![f32::MIN; b * l * s];
        for bi in 0..b {
            for i in 0..l {
                for key in 0..=past + i {
                    if mask[bi * s + key] != 0.0 {
                        bias[(bi * l + i) * s + key] = 0.0;
                    }
                }
            }
        }
        let bias_t = Tensor::from_vec(bias, (b, 1, l, s), &Device::Cpu).unwrap();
        let pick = |start: usize, len: usize| bias_t.narrow(2, start, len);
        let kernel = if l == 1 { Kernel::Decode } else { Kernel::Prefill };
        let fused = fused_attention(kernel, &q, &k, &v, 0.25, true, None, Some(&key_mask)).unwrap();
        let want = crate::model::attention::attention(&q, &k, &v, 0.25, Some(&pick)).unwrap();
        assert_eq!(fused.dims(), want.dims());
        assert!(max_abs_diff(&fused, &want) < 1e-5, "l {l}");
        // The output is a transposed view of [b, l, h, d]: the decoder's transpose back is free.
        assert!(fused.transpose(1, 2).unwrap().is_contiguous());
    }
}

#[test]
fn unsupported_problems_are_errors_not_answers() {
    let q = randn(&[1, 3, 4, 8], 1);
    let k = randn(&[1, 2, 4, 8], 2);
    assert!(fused_attention(Kernel::Prefill, &q, &k, &k, 1.0, true, None, None).is_err());
    let q = randn(&[1, 2, 4, 8], 1);
    let bad_mask = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(fused_attention(Kernel::Prefill, &q, &k, &k, 1.0, true, None, Some(&bad_mask)).is_err());
    assert!(fused_attention(Kernel::Vision, &q, &k, &k, 1.0, false, Some(vec![0, 3]), None).is_err());
}

/// The speed probe `auto` runs on a GPU works on any device (here the twin against the
/// reference at tiny sizes).
#[test]
fn the_speed_probe_times_both_paths() {
    let shapes =
        CheckShapes { vision_heads: 2, vision_head_dim: 16, text_heads: 4, text_kv_heads: 2, text_head_dim: 16 };
    for k in Kernel::ALL {
        let s = selfcheck::speed(k, &Device::Cpu, DType::F32, &shapes, true).unwrap();
        assert!(s.fused_ms > 0.0 && s.reference_ms > 0.0, "{k}: {s:?}");
    }
    assert!(Speed { fused_ms: 1.0, reference_ms: 2.0 }.fused_wins());
    assert!(!Speed { fused_ms: 2.0, reference_ms: 1.0 }.fused_wins());
}
