//! Parity of `vigil::model` with transformers 5.24 on two tiny random VideoLLaMA3 checkpoints.
//!
//! Fixtures (checkpoints, inputs, expected outputs) are written by tests/reference/gen_model.py
//! and committed under tests/fixtures/model/. Tolerances: logits 1e-4, features 1e-5, greedy
//! tokens identical.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use vigil::model::{
    GenerationParams, KvCache, ModelError, MultimodalInputs, Sampling, VideoLlama3Config,
    VideoLlama3ForConditionalGeneration, VisualInputs,
};

const CHECKPOINTS: [&str; 2] = ["tiny_a", "tiny_b"];
const LOGITS_TOL: f32 = 1e-4;
const FEATURES_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model")
}

struct Fixture {
    model: VideoLlama3ForConditionalGeneration,
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn load(name: &str) -> Fixture {
    let dir = fixtures();
    let model = VideoLlama3ForConditionalGeneration::from_pretrained(&dir.join(name), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let tensors = candle_core::safetensors::load(dir.join(format!("{name}.cases.safetensors")), &Device::Cpu).unwrap();
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.cases.json"))).unwrap()).unwrap();
    Fixture { model, tensors, meta }
}

impl Fixture {
    fn get(&self, case: &str, key: &str) -> Option<&Tensor> {
        self.tensors.get(&format!("{case}.{key}"))
    }
    fn t(&self, case: &str, key: &str) -> &Tensor {
        self.get(case, key).unwrap_or_else(|| panic!("fixture lacks {case}.{key}"))
    }
    fn visual(&self, case: &str, pixels: &str, grid: &str, merge: &str) -> Option<VisualInputs> {
        let pixel_values = self.get(case, pixels)?.clone();
        let grid: Vec<Vec<i64>> = self.t(case, grid).to_vec2().unwrap();
        let merge: Vec<i64> = self.t(case, merge).to_vec1().unwrap();
        Some(VisualInputs {
            pixel_values,
            grid_thw: grid.iter().map(|g| [g[0] as usize, g[1] as usize, g[2] as usize]).collect(),
            merge_sizes: merge.iter().map(|&m| m as usize).collect(),
        })
    }
    fn inputs(&self, case: &str) -> MultimodalInputs {
        MultimodalInputs {
            input_ids: self.t(case, "input_ids").to_dtype(DType::U32).unwrap(),
            attention_mask: Some(self.t(case, "attention_mask").clone()),
            images: self.visual(case, "pixel_values", "image_grid_thw", "image_merge_sizes"),
            videos: self.visual(case, "pixel_values_videos", "video_grid_thw", "video_merge_sizes"),
            video_compression_mask: self
                .get(case, "video_compression_mask")
                .map(|m| m.to_vec1::<u8>().unwrap().into_iter().map(|v| v != 0).collect()),
            image_embeds: None,
            video_embeds: None,
        }
    }
    /// Expected greedy tokens per row, cut after the first EOS (transformers pads finished rows).
    fn expected_tokens(&self, case: &str) -> Vec<Vec<u32>> {
        self.expected(case, "greedy_tokens")
    }
    fn expected(&self, case: &str, key: &str) -> Vec<Vec<u32>> {
        let eos: Vec<u32> =
            self.meta["eos_token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let rows: Vec<Vec<i64>> = self.t(case, key).to_vec2().unwrap();
        rows.into_iter()
            .map(|r| {
                let mut out = Vec::new();
                for t in r {
                    out.push(t as u32);
                    if eos.contains(&(t as u32)) {
                        break;
                    }
                }
                out
            })
            .collect()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Logits of non-padding positions only (padding rows are never used by transformers either).
fn masked_logits_diff(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f32 {
    let mask: Vec<Vec<i64>> = mask.to_vec2().unwrap();
    let mut worst = 0f32;
    for (b, row) in mask.iter().enumerate() {
        for (p, &m) in row.iter().enumerate() {
            if m != 0 {
                let a = ours.get(b).unwrap().get(p).unwrap();
                let e = theirs.get(b).unwrap().get(p).unwrap();
                worst = worst.max(max_abs_diff(&a, &e));
            }
        }
    }
    worst
}

fn check_prefill(fx: &Fixture, name: &str, case: &str) -> f32 {
    let inputs = fx.inputs(case);
    let mut cache = KvCache::new();
    let logits = fx.model.forward(&inputs, &mut cache).unwrap().logits;
    let diff = masked_logits_diff(&logits, fx.t(case, "prefill_logits"), fx.t(case, "attention_mask"));
    eprintln!("{name} {case}: prefill logits max |diff| = {diff:.3e}");
    assert!(diff < LOGITS_TOL, "{name} {case}: prefill logits differ by {diff}");
    diff
}

fn check_decode_steps(fx: &Fixture, name: &str, case: &str) {
    let inputs = fx.inputs(case);
    let step_logits = fx.t(case, "step_logits");
    let steps = step_logits.dim(0).unwrap();
    let greedy: Vec<Vec<i64>> = fx.t(case, "greedy_tokens").to_vec2().unwrap();
    let mask: Vec<Vec<i64>> = fx.t(case, "attention_mask").to_vec2().unwrap();
    let mut next_pos: Vec<i64> = mask.iter().map(|r| r.iter().sum::<i64>()).collect();
    let mut cache = KvCache::new();
    let mut logits = fx.model.prefill_last(&inputs, &mut cache).unwrap();
    for s in 0..steps {
        let diff = max_abs_diff(&logits, &step_logits.get(s).unwrap());
        eprintln!("{name} {case}: step {s} logits max |diff| = {diff:.3e}");
        assert!(diff < LOGITS_TOL, "{name} {case}: step {s} logits differ by {diff}");
        if s + 1 == steps || greedy[0].len() <= s + 1 {
            break;
        }
        // Feed what transformers fed: the greedy token, or the pad id for finished rows.
        let tokens: Vec<u32> = greedy.iter().map(|r| r[s] as u32).collect();
        logits = fx.model.decode_step(&tokens, &next_pos, &mut cache).unwrap();
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
}

#[test]
fn text_decoder_parity() {
    for name in CHECKPOINTS {
        let fx = load(name);
        check_prefill(&fx, name, "text");
        check_decode_steps(&fx, name, "text");
    }
}

#[test]
fn vision_and_projector_parity() {
    for name in CHECKPOINTS {
        let fx = load(name);
        for (case, kind) in [
            ("image", "image"),
            ("video", "video"),
            ("batch", "image"),
            ("batch", "video"),
            ("multi", "image"),
            ("multi", "video"),
        ] {
            let visual = if kind == "image" {
                fx.visual(case, "pixel_values", "image_grid_thw", "image_merge_sizes")
            } else {
                fx.visual(case, "pixel_values_videos", "video_grid_thw", "video_merge_sizes")
            }
            .unwrap();
            let feats = fx.model.model.vision_model().forward(&visual).unwrap();
            let d = max_abs_diff(&feats, fx.t(case, &format!("{kind}_vision_features")));
            eprintln!("{name} {case}/{kind}: vision features max |diff| = {d:.3e}");
            assert!(d < FEATURES_TOL, "{name} {case} {kind}: vision features differ by {d}");
            let proj = fx.model.model.projector().forward(&feats).unwrap();
            let d = max_abs_diff(&proj, fx.t(case, &format!("{kind}_projected")));
            eprintln!("{name} {case}/{kind}: projector output max |diff| = {d:.3e}");
            assert!(d < FEATURES_TOL, "{name} {case} {kind}: projector outputs differ by {d}");
            let split = fx.model.model.get_image_features(&visual).unwrap();
            assert_eq!(split.len(), visual.grid_thw.len());
        }
    }
}

#[test]
fn multimodal_prefill_and_decode_parity() {
    for name in CHECKPOINTS {
        let fx = load(name);
        for case in ["image", "video", "batch"] {
            check_prefill(&fx, name, case);
            check_decode_steps(&fx, name, case);
        }
        // Several images and videos per row, across two rows (no stored full prefill logits:
        // step 0 is the last prefill row of each sequence).
        check_decode_steps(&fx, name, "multi");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in CHECKPOINTS {
        let fx = load(name);
        for case in ["text", "image", "video", "batch", "multi"] {
            let expected = fx.expected_tokens(case);
            let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); expected.len()];
            let out = fx
                .model
                .generate(&fx.inputs(case), &GenerationParams::greedy(16), &mut |ev| streamed[ev.row].push(ev.token))
                .unwrap();
            eprintln!("{name} {case}: {:?}", out.tokens);
            assert_eq!(out.tokens, expected, "{name} {case}: greedy tokens differ");
            assert_eq!(streamed, expected, "{name} {case}: streamed tokens differ");
        }
    }
}

#[test]
fn batch_equals_one_by_one() {
    for name in CHECKPOINTS {
        let fx = load(name);
        let batch = fx.model.generate(&fx.inputs("batch"), &GenerationParams::greedy(16), &mut |_| {}).unwrap();
        let singles: Vec<Vec<u32>> = ["image", "video", "text"]
            .iter()
            .map(|c| {
                fx.model.generate(&fx.inputs(c), &GenerationParams::greedy(16), &mut |_| {}).unwrap().tokens.remove(0)
            })
            .collect();
        assert_eq!(batch.tokens, singles, "{name}: batched and one-by-one generation differ");
        // The video row stops on the checkpoint's extra EOS while the others run to the limit.
        assert!(batch.stopped_on_eos[1], "{name}: video row should stop on EOS");
        assert!(batch.tokens[1].len() < 16);
        assert!(batch.tokens.iter().any(|t| t.len() == 16));
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() {
    let fx = load("tiny_b");
    let inputs = fx.inputs("batch");
    let sample = |seed, top_k| GenerationParams {
        sampling: Sampling::Sample { temperature: 1.5, top_k, top_p: Some(0.95), seed },
        ..GenerationParams::greedy(12)
    };
    let a = fx.model.generate(&inputs, &sample(5, None), &mut |_| {}).unwrap();
    let b = fx.model.generate(&inputs, &sample(5, None), &mut |_| {}).unwrap();
    let c = fx.model.generate(&inputs, &sample(6, None), &mut |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens, "different seeds gave identical samples");
    let greedy = fx.model.generate(&inputs, &GenerationParams::greedy(12), &mut |_| {}).unwrap();
    let k1 = fx.model.generate(&inputs, &sample(9, Some(1)), &mut |_| {}).unwrap();
    assert_eq!(k1.tokens, greedy.tokens);
}

#[test]
fn max_new_tokens_and_eos_override() {
    let fx = load("tiny_a");
    let inputs = fx.inputs("text");
    let out = fx.model.generate(&inputs, &GenerationParams::greedy(3), &mut |_| {}).unwrap();
    assert_eq!(out.tokens[0].len(), 3);
    assert!(!out.stopped_on_eos[0]);
    let first = out.tokens[0][1];
    let params = GenerationParams { eos_token_ids: Some(vec![first]), ..GenerationParams::greedy(16) };
    let out = fx.model.generate(&inputs, &params, &mut |_| {}).unwrap();
    assert_eq!(out.tokens[0].last(), Some(&first));
    assert!(out.stopped_on_eos[0]);
}

#[test]
fn config_layouts() {
    let a = VideoLlama3Config::from_file(&fixtures().join("tiny_a")).unwrap();
    assert_eq!(a.text_config.rope_theta, 1e6);
    assert_eq!(a.vision_config.rope_theta, 500.0);
    assert!(a.tie_word_embeddings, "tie_word_embeddings in text_config only must tie");
    assert_eq!(a.text_config.num_attention_heads / a.text_config.num_key_value_heads, 2);
    let b = VideoLlama3Config::from_file(&fixtures().join("tiny_b")).unwrap();
    assert_eq!(b.text_config.rope_theta, 5000.0, "legacy top-level rope_theta");
    assert_eq!(b.vision_config.rope_theta, 10000.0, "vision rope theta default");
    assert!(!b.tie_word_embeddings);
    let fx = load("tiny_b");
    assert_eq!(fx.model.generation_defaults().eos_token_ids.len(), 3, "EOS ids from generation_config.json");
}

fn copy_checkpoint(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// A copy of checkpoint `name` whose config.json has `from` replaced by `to`.
fn with_config_edit(name: &str, from: &str, to: &str) -> tempfile::TempDir {
    let tmp = copy_checkpoint(name);
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(cfg.contains(from), "{name}/config.json lacks {from:?}");
    std::fs::write(&cfg_path, cfg.replace(from, to)).unwrap();
    tmp
}

fn load_err(dir: &Path) -> ModelError {
    match VideoLlama3ForConditionalGeneration::from_pretrained(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn loading_errors_are_clear() {
    // Missing tensor, named.
    let tmp = copy_checkpoint("tiny_a");
    let path = tmp.path().join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let gone = "model.language_model.layers.1.mlp.up_proj.weight";
    assert!(weights.remove(gone).is_some());
    candle_core::safetensors::save(&weights, &path).unwrap();
    let err = load_err(tmp.path());
    assert!(matches!(&err, ModelError::MissingTensor(n) if n == gone), "{err}");
    assert!(err.to_string().contains(gone));

    // Shape mismatch: config disagrees with the weights.
    let tmp = with_config_edit("tiny_a", "\"intermediate_size\": 128", "\"intermediate_size\": 96");
    let err = load_err(tmp.path());
    assert!(matches!(&err, ModelError::ShapeMismatch { name, .. } if name.contains("mlp")), "{err}");

    // Unsupported model_type.
    let tmp = with_config_edit("tiny_b", "\"video_llama_3\"", "\"llava\"");
    let err = load_err(tmp.path());
    assert!(matches!(&err, ModelError::UnsupportedModelType(t) if t == "llava"), "{err}");

    // Missing shard of a sharded checkpoint.
    let tmp = copy_checkpoint("tiny_b");
    std::fs::remove_file(tmp.path().join("model-00002-of-00006.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(err.to_string().contains("model-00002-of-00006.safetensors"), "{err}");

    // No weights at all.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("tiny_a/config.json"), tmp.path().join("config.json")).unwrap();
    assert!(matches!(load_err(tmp.path()), ModelError::NoWeights(_)));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let fx = load("tiny_a");
    // Placeholder count disagrees with the image features.
    let mut inputs = fx.inputs("image");
    let ids: Vec<Vec<u32>> = inputs.input_ids.to_vec2().unwrap();
    let mut row = ids[0].clone();
    row.push(fx.model.config().image_token_id);
    inputs.input_ids = Tensor::new(vec![row.clone()], &Device::Cpu).unwrap();
    inputs.attention_mask = None;
    let err = fx.model.forward(&inputs, &mut KvCache::new()).unwrap_err();
    assert!(err.to_string().contains("Image features and image tokens do not match"), "{err}");
    // Wrong pixel row width.
    let mut inputs = fx.inputs("image");
    let images = inputs.images.as_mut().unwrap();
    images.pixel_values = images.pixel_values.narrow(1, 0, 10).unwrap();
    let err = fx.model.forward(&inputs, &mut KvCache::new()).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    // Token id outside the vocabulary.
    let inputs = MultimodalInputs::text(Tensor::new(&[[1u32, 100_000]], &Device::Cpu).unwrap());
    let err = fx.model.forward(&inputs, &mut KvCache::new()).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn reduced_precision_loads_and_tracks_f32() {
    let fx = load("tiny_b");
    let inputs = fx.inputs("batch");
    let reference = fx.model.prefill_last(&inputs, &mut KvCache::new()).unwrap();
    let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let model =
            VideoLlama3ForConditionalGeneration::from_pretrained(&fixtures().join("tiny_b"), dtype, &Device::Cpu)
                .unwrap();
        assert_eq!(model.dtype(), dtype);
        let logits = model.prefill_last(&inputs, &mut KvCache::new()).unwrap();
        let d = max_abs_diff(&logits, &reference);
        eprintln!("tiny_b batch {dtype:?}: last-position logits max |diff| vs f32 = {d:.3e} (max |logit| {scale:.2})");
        assert!(d.is_finite() && d < 0.1 * scale, "{dtype:?} drifted by {d}");
    }
}

#[test]
fn video_frames_attend_only_within_themselves() {
    let fx = load("tiny_a");
    let video = fx.visual("video", "pixel_values_videos", "video_grid_thw", "video_merge_sizes").unwrap();
    let [t, h, w] = video.grid_thw[0];
    let whole = fx.model.model.vision_model().forward(&video).unwrap();
    let per_frame = VisualInputs {
        pixel_values: video.pixel_values.clone(),
        grid_thw: vec![[1, h, w]; t],
        merge_sizes: vec![video.merge_sizes[0]; t],
    };
    let split = fx.model.model.vision_model().forward(&per_frame).unwrap();
    assert_eq!(max_abs_diff(&whole, &split), 0.0, "frames of one video must not attend to each other");
    // Changing one frame's pixels leaves the other frames' features untouched.
    let rows = h * w;
    let noise = Tensor::ones((rows, video.pixel_values.dim(1).unwrap()), DType::F32, &Device::Cpu).unwrap();
    let changed = video.pixel_values.slice_assign(&[0..rows, 0..video.pixel_values.dim(1).unwrap()], &noise).unwrap();
    let changed = VisualInputs { pixel_values: changed, ..video.clone() };
    let out = fx.model.model.vision_model().forward(&changed).unwrap();
    let per = out.dim(0).unwrap() / t;
    assert_eq!(
        max_abs_diff(&out.narrow(0, per, per * (t - 1)).unwrap(), &whole.narrow(0, per, per * (t - 1)).unwrap()),
        0.0
    );
    assert!(max_abs_diff(&out.narrow(0, 0, per).unwrap(), &whole.narrow(0, 0, per).unwrap()) > 1e-3);
}

#[test]
fn precomputed_visual_embeddings_give_the_same_logits() {
    let fx = load("tiny_b");
    let inputs = fx.inputs("batch");
    let reference = fx.model.forward(&inputs, &mut KvCache::new()).unwrap().logits;
    let m = &fx.model.model;
    let image = Tensor::cat(&m.get_image_features(inputs.images.as_ref().unwrap()).unwrap(), 0).unwrap();
    let video = Tensor::cat(&m.get_video_features(inputs.videos.as_ref().unwrap()).unwrap(), 0).unwrap();
    let pre = MultimodalInputs {
        images: None,
        videos: None,
        image_embeds: Some(image),
        video_embeds: Some(video),
        ..inputs.clone()
    };
    let logits = fx.model.forward(&pre, &mut KvCache::new()).unwrap().logits;
    assert_eq!(max_abs_diff(&logits, &reference), 0.0);
    let both = MultimodalInputs { image_embeds: pre.image_embeds.clone(), ..inputs.clone() };
    assert!(matches!(fx.model.forward(&both, &mut KvCache::new()), Err(ModelError::InvalidInput(_))));
}

#[test]
fn model_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<VideoLlama3ForConditionalGeneration>();
    assert_send_sync::<MultimodalInputs>();
    let fx = std::sync::Arc::new(load("tiny_a"));
    let expected = fx.expected_tokens("text");
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let fx = fx.clone();
            std::thread::spawn(move || {
                fx.model.generate(&fx.inputs("text"), &GenerationParams::greedy(16), &mut |_| {}).unwrap().tokens
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), expected);
    }
}

#[test]
fn repetition_penalty_matches_transformers() {
    for name in CHECKPOINTS {
        let fx = load(name);
        let penalty = fx.meta["cases"]["text"]["repetition_penalty"].as_f64().unwrap() as f32;
        for case in ["text", "image", "video", "batch", "multi"] {
            let params = GenerationParams { repetition_penalty: Some(penalty), ..GenerationParams::greedy(16) };
            let out = fx.model.generate(&fx.inputs(case), &params, &mut |_| {}).unwrap();
            assert_eq!(out.tokens, fx.expected(case, "greedy_tokens_rp"), "{name} {case}: penalized greedy differs");
        }
    }
    // The penalty can come from generation_config.json, as in Qwen2.5 releases.
    let tmp = copy_checkpoint("tiny_b");
    let gen_path = tmp.path().join("generation_config.json");
    let mut gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&gen_path).unwrap()).unwrap();
    gen["repetition_penalty"] = 1.3.into();
    std::fs::write(&gen_path, gen.to_string()).unwrap();
    let model = VideoLlama3ForConditionalGeneration::from_pretrained(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let fx = load("tiny_b");
    let out = model.generate(&fx.inputs("batch"), &GenerationParams::greedy(16), &mut |_| {}).unwrap();
    assert_eq!(out.tokens, fx.expected("batch", "greedy_tokens_rp"));
    assert_ne!(out.tokens, fx.expected("batch", "greedy_tokens"), "fixture must show the penalty's effect");
}
