//! Kernels launched per decoder layer in a decode step.
//!
//! Every candle op that computes writes a fresh output buffer (on the GPU each is one kernel
//! launch, at least); views (narrow, transpose, reshape of contiguous data) only allocate a few
//! bytes of shape metadata, and appending to the KV cache writes in place. So on the CPU
//! backend, counting the tensor buffers allocated during a decode step counts the step's
//! kernels. Tensor buffers are told apart by size (at least [`MIN_BUFFER`] bytes) and alignment
//! (2 to 8: bf16 to i64 elements); the CPU matmul's own byte workspaces (alignment 1 or 64+) are
//! not kernels. Two checkpoints that differ by one decoder layer give the count of one layer.
//!
//! The f32 reference path counts 21 per layer: RMSNorm, q/k/v matmul and its bias, q and k copied
//! out of it and rotated (fused RoPE), v copied, scores, scale, mask, softmax, probabilities · v,
//! output projection, residual, RMSNorm, gate/up matmul, SiLU, product, down projection,
//! residual. bf16 adds two casts around the f32 softmax. The fused decode attention (one kernel
//! and its split-merge, on the CPU its plain-Rust twin) replaces the five attention kernels and
//! the casts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use vigil::model::fused::{self, AttentionMode, CheckShapes};
use vigil::model::{KvCache, MultimodalInputs, VideoLlama3ForConditionalGeneration};

/// Smaller than any activation of the step below (batch 8), larger than shape metadata.
const MIN_BUFFER: usize = 512;

struct Counting;
static ON: AtomicBool = AtomicBool::new(false);
static BUFFERS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MIN_BUFFER && (2..=8).contains(&layout.align()) && ON.load(Ordering::Relaxed) {
            BUFFERS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// `tests/fixtures/model/tiny_b` with its config cut to `layers` decoder layers (the extra
/// weights on disk are not read).
fn model_with_layers(layers: usize) -> VideoLlama3ForConditionalGeneration {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/tiny_b");
    let dir = std::env::temp_dir().join(format!("vigil-launches-{}-{layers}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let to = dir.join(e.file_name());
        if e.file_name() == "config.json" {
            let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            cfg["text_config"]["num_hidden_layers"] = layers.into();
            std::fs::write(&to, serde_json::to_vec(&cfg).unwrap()).unwrap();
        } else if !to.exists() {
            std::os::unix::fs::symlink(e.path(), &to).unwrap();
        }
    }
    let model = VideoLlama3ForConditionalGeneration::from_pretrained(&dir, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    model
}

/// Buffers allocated by one decode step of a batch of 8 left-padded rows (the median of 5 steps).
fn buffers_per_step(model: &VideoLlama3ForConditionalGeneration) -> usize {
    let (b, l) = (8, 12);
    let ids: Vec<u32> = (0..b * l).map(|i| 20 + (i * 7 % 300) as u32).collect();
    let mask: Vec<f32> = (0..b * l).map(|i| if i % l < i / l { 0.0 } else { 1.0 }).collect();
    let inputs = MultimodalInputs {
        attention_mask: Some(Tensor::from_vec(mask, (b, l), &Device::Cpu).unwrap()),
        ..MultimodalInputs::text(Tensor::from_vec(ids, (b, l), &Device::Cpu).unwrap())
    };
    let mut cache = KvCache::new();
    model.prefill_last(&inputs, &mut cache).unwrap();
    let mut counts: Vec<usize> = (0..5)
        .map(|step| {
            let tokens = vec![30 + step as u32; b];
            let positions: Vec<i64> = (0..b).map(|r| (l - r + step) as i64).collect();
            BUFFERS.store(0, Ordering::SeqCst);
            ON.store(true, Ordering::SeqCst);
            model.decode_step(&tokens, &positions, &mut cache).unwrap();
            ON.store(false, Ordering::SeqCst);
            BUFFERS.load(Ordering::SeqCst)
        })
        .collect();
    counts.sort_unstable();
    counts[2]
}

/// Buffers one decoder layer allocates per decode step.
fn per_layer(two: &VideoLlama3ForConditionalGeneration, three: &VideoLlama3ForConditionalGeneration) -> usize {
    let (a, b) = (buffers_per_step(two), buffers_per_step(three));
    eprintln!("decode step: {a} buffers with 2 layers, {b} with 3: {} per layer", b - a);
    b - a
}

#[test]
fn a_decoder_layer_launches_few_kernels_per_decode_step() {
    // candle's CPU matmul looks the thread count up per call, reading /proc/cpuinfo unless this
    // is set: not a kernel. (The only test in this binary: no other thread reads the variable.)
    std::env::set_var("RAYON_NUM_THREADS", "2");
    let (two, three) = (model_with_layers(2), model_with_layers(3));
    // The attention mode is process-wide: the reference first, then the fused kernels.
    fused::configure(AttentionMode::Reference, &Device::Cpu, DType::F32, &CheckShapes::of(three.config()));
    let reference = per_layer(&two, &three);
    assert!(reference <= 21, "reference path: {reference} kernels per decoder layer in a decode step");
    let checks = fused::configure(AttentionMode::Fused, &Device::Cpu, DType::F32, &CheckShapes::of(three.config()));
    assert!(checks.iter().all(|c| c.passed), "{checks:?}");
    let with_fused = per_layer(&two, &three);
    assert!(with_fused <= 20, "fused attention: {with_fused} kernels per decoder layer in a decode step");
    assert!(with_fused < reference);
}
