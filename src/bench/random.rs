//! Random-weight checkpoints at real VideoLLaMA3 shapes, written in the Hugging Face layout.
//!
//! Performance does not depend on the weights' values, and real checkpoints cannot be downloaded
//! on every machine, so `vigil bench --shape 2b|7b --random-weights` measures with weights drawn
//! here. The directory is a complete checkpoint (config, safetensors, processor, tokenizer) so
//! that transformers loads the very same weights for the same-run comparison
//! (`tests/reference/bench_transformers.py`).
//!
//! The tensor list is not written by hand: the model is constructed once on a recording
//! [`SimpleBackend`] that notes every name and shape our loader asks for (the loader mirrors the
//! checkpoint names, as the parity tests prove), so the list cannot drift from the model.
//!
//! Values follow transformers' `_init_weights` in spirit: normal-like weights of std
//! `initializer_range` (0.02; drawn uniform with the same std, which is faster), zero biases,
//! unit norm weights. The tokenizer, chat template and processor files are the shipped tiny
//! model's (its vocabulary is small; ids only have to be below `vocab_size`), with pixel budgets
//! raised so 448×448 frames are not downscaled. EOS is unset so every run generates exactly
//! `max_new_tokens`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::model::config::{GenerationDefaults, VideoLlama3Config};
use crate::model::{ModelError, VideoLlama3ForConditionalGeneration};

const TINY_TOKENIZER: &str = include_str!("../../models/tiny-videollama3/tokenizer.json");
const TINY_TOKENIZER_CONFIG: &str = include_str!("../../models/tiny-videollama3/tokenizer_config.json");
const TINY_CHAT_TEMPLATE: &str = include_str!("../../models/tiny-videollama3/chat_template.jinja");
const TINY_PROCESSOR: &str = include_str!("../../models/tiny-videollama3/processor_config.json");
/// The tiny tokenizer's placeholder and pad ids (its `tokenizer.json` added tokens).
const IMAGE_TOKEN_ID: u32 = 412;
const VIDEO_TOKEN_ID: u32 = 413;
const PAD_TOKEN_ID: u32 = 400;
/// Visual-token budget of the real processor (16384 merged tokens per video / image).
const MAX_VISUAL_TOKENS: u64 = 16384;

/// The `config.json` of a named preset: `2b` (VideoLLaMA3-2B: SigLIP 1152×27, Qwen2.5-1.5B) or
/// `7b` (same vision tower, Qwen2.5-7B).
pub fn preset(name: &str) -> Option<serde_json::Value> {
    // (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    let text = match name.to_ascii_lowercase().as_str() {
        "2b" => (1536, 8960, 28, 12, 2, 151936, true),
        "7b" => (3584, 18944, 28, 28, 4, 152064, false),
        _ => return None,
    };
    let (hidden, inter, layers, heads, kv, vocab, tied) = text;
    Some(serde_json::json!({
        "architectures": ["VideoLlama3ForConditionalGeneration"],
        "model_type": "video_llama_3",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "tie_word_embeddings": tied,
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "tie_word_embeddings": tied,
            "use_sliding_window": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643
        },
        "vision_config": {
            "model_type": "video_llama_3_vision",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_channels": 3,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
            "initializer_range": 0.02
        }
    }))
}

/// `config.json` for a bench checkpoint: a preset name or a path to any VideoLLaMA3 config,
/// with the placeholder ids of the bundled tokenizer and no EOS.
pub fn bench_config(shape: &str) -> Result<serde_json::Value, ModelError> {
    let mut v = match preset(shape) {
        Some(v) => v,
        None if !Path::new(shape).is_file() => {
            return Err(ModelError::InvalidConfig(format!(
                "shape {shape:?}: expected 2b, 7b or the path of a config.json"
            )))
        }
        None => {
            let text =
                std::fs::read_to_string(shape).map_err(|source| ModelError::Io { path: shape.to_string(), source })?;
            serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig(format!("{shape}: {e}")))?
        }
    };
    v["image_token_id"] = IMAGE_TOKEN_ID.into();
    v["video_token_id"] = VIDEO_TOKEN_ID.into();
    let t = &mut v["text_config"];
    t["eos_token_id"] = serde_json::Value::Null;
    t["bos_token_id"] = serde_json::Value::Null;
    t["pad_token_id"] = PAD_TOKEN_ID.into();
    let vocab = t["vocab_size"].as_u64().unwrap_or(0);
    if vocab <= VIDEO_TOKEN_ID as u64 {
        return Err(ModelError::InvalidConfig(format!(
            "{shape}: vocab_size {vocab} is too small for the bench tokenizer"
        )));
    }
    // Validate now, with the file name in the message.
    VideoLlama3Config::from_json(&v.to_string()).map_err(|e| match e {
        ModelError::InvalidConfig(m) => ModelError::InvalidConfig(format!("{shape}: {m}")),
        other => other,
    })?;
    Ok(v)
}

/// (name, shape) of each tensor asked for, in order.
type Seen = std::sync::Arc<Mutex<Vec<(String, Vec<usize>)>>>;

/// Notes every tensor the loader asks for; hands back a zero-stride view (no allocation).
struct Recorder(Seen);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        crate::lock::lock(&self.0).push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random checkpoint: {name} requested without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Every tensor (name, shape) a checkpoint with this config holds, in load order.
pub fn tensor_shapes(config: &VideoLlama3Config) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(seen.clone())), DType::F32, Device::Cpu);
    VideoLlama3ForConditionalGeneration::new(config, vb, GenerationDefaults::default())?;
    let seen = std::mem::take(&mut *crate::lock::lock(&seen));
    let mut out: Vec<(String, Vec<usize>)> = Vec::with_capacity(seen.len());
    for (name, shape) in seen {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, shape));
        }
    }
    Ok(out)
}

/// Parameter count of a checkpoint (tied embeddings counted once).
pub fn parameter_count(shapes: &[(String, Vec<usize>)]) -> u64 {
    shapes.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Fill {
    Zeros,
    Ones,
    Uniform,
}

fn fill_of(name: &str) -> Fill {
    let module = name.rsplit('.').nth(1).unwrap_or("");
    if name.ends_with(".bias") {
        Fill::Zeros
    } else if module.contains("norm") {
        Fill::Ones
    } else {
        Fill::Uniform
    }
}

/// splitmix64: seeds one independent stream per (tensor, chunk).
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Values of one tensor, uniform in ±`std·√3`, filled on all cores; the same for any core count.
fn random_values<T: WithDType>(n: usize, std: f64, seed: u64) -> Vec<T> {
    const CHUNK: usize = 1 << 20;
    let half = std * 3f64.sqrt();
    let mut out = vec![T::from_f64(0.0); n];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunks: Vec<(usize, &mut [T])> = out.chunks_mut(CHUNK).enumerate().collect();
    let per = chunks.len().div_ceil(threads).max(1);
    let mut groups: Vec<Vec<(usize, &mut [T])>> = Vec::new();
    let mut it = chunks.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        for group in groups {
            s.spawn(move || {
                for (i, chunk) in group {
                    let mut x = splitmix(seed ^ splitmix(i as u64));
                    for v in chunk.iter_mut() {
                        // xorshift64*: plenty for benchmark weights.
                        x ^= x >> 12;
                        x ^= x << 25;
                        x ^= x >> 27;
                        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
                        let u = r as f64 / (1u64 << 53) as f64;
                        *v = T::from_f64((2.0 * u - 1.0) * half);
                    }
                }
            });
        }
    });
    out
}

fn random_tensor(name: &str, shape: &[usize], dtype: DType, seed: u64) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let fill = fill_of(name);
    let value = |v: f64| Tensor::full(v as f32, shape, &Device::Cpu)?.to_dtype(dtype);
    match fill {
        Fill::Zeros => value(0.0),
        Fill::Ones => value(1.0),
        Fill::Uniform => match dtype {
            DType::BF16 => Tensor::from_vec(random_values::<half::bf16>(n, 0.02, seed), shape, &Device::Cpu),
            DType::F16 => Tensor::from_vec(random_values::<half::f16>(n, 0.02, seed), shape, &Device::Cpu),
            _ => Tensor::from_vec(random_values::<f32>(n, 0.02, seed), shape, &Device::Cpu)?.to_dtype(dtype),
        },
    }
}

fn write(path: &Path, text: &str) -> Result<(), ModelError> {
    std::fs::write(path, text).map_err(|source| ModelError::Io { path: path.display().to_string(), source })
}

/// What a written checkpoint is (kept next to it so a second run re-uses it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RandomCheckpointInfo {
    pub config: serde_json::Value,
    pub dtype: String,
    pub seed: u64,
    pub parameters: u64,
}

/// Write a complete random checkpoint for `config` (from [`bench_config`]) into `dir`, unless
/// `dir` already holds one with the same config, dtype and seed. Returns its description.
pub fn write_random_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    dtype: DType,
    seed: u64,
) -> Result<RandomCheckpointInfo, ModelError> {
    let io = |source, p: &Path| ModelError::Io { path: p.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(|e| io(e, dir))?;
    let cfg = VideoLlama3Config::from_json(&config.to_string())?;
    let shapes = tensor_shapes(&cfg)?;
    let info = RandomCheckpointInfo {
        config: config.clone(),
        dtype: dtype.as_str().to_string(),
        seed,
        parameters: parameter_count(&shapes),
    };
    let marker = dir.join("random_checkpoint.json");
    if let Ok(text) = std::fs::read_to_string(&marker) {
        if serde_json::from_str::<RandomCheckpointInfo>(&text).ok().as_ref() == Some(&info)
            && dir.join("model.safetensors").is_file()
        {
            return Ok(info);
        }
    }
    let _ = std::fs::remove_file(&marker);

    let mut tensors = HashMap::with_capacity(shapes.len());
    for (i, (name, shape)) in shapes.iter().enumerate() {
        tensors.insert(name.clone(), random_tensor(name, shape, dtype, splitmix(seed ^ splitmix(i as u64 + 1)))?);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    drop(tensors);

    let mut config = config.clone();
    config["dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    write(&dir.join("config.json"), &serde_json::to_string_pretty(&config).unwrap_or_default())?;
    write(
        &dir.join("generation_config.json"),
        &serde_json::to_string_pretty(&serde_json::json!({"pad_token_id": PAD_TOKEN_ID, "do_sample": false}))
            .unwrap_or_default(),
    )?;
    write(&dir.join("tokenizer.json"), TINY_TOKENIZER)?;
    write(&dir.join("tokenizer_config.json"), TINY_TOKENIZER_CONFIG)?;
    write(&dir.join("chat_template.jinja"), TINY_CHAT_TEMPLATE)?;
    let mut proc: serde_json::Value = serde_json::from_str(TINY_PROCESSOR)
        .map_err(|e| ModelError::InvalidConfig(format!("bundled processor_config.json: {e}")))?;
    proc["image_processor"]["size"] =
        serde_json::json!({"shortest_edge": 14 * 14 * 4, "longest_edge": MAX_VISUAL_TOKENS * 14 * 14});
    proc["video_processor"]["size"] =
        serde_json::json!({"shortest_edge": 28 * 28, "longest_edge": MAX_VISUAL_TOKENS * 28 * 28});
    proc["video_processor"]["max_frames"] = 180.into();
    write(&dir.join("processor_config.json"), &serde_json::to_string_pretty(&proc).unwrap_or_default())?;
    write(&marker, &serde_json::to_string_pretty(&info).unwrap_or_default())?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_sizes() {
        let two = VideoLlama3Config::from_json(&bench_config("2b").unwrap().to_string()).unwrap();
        let shapes = tensor_shapes(&two).unwrap();
        let n = parameter_count(&shapes);
        // VideoLLaMA3-2B: ~1.54 B (Qwen2.5-1.5B, tied) + ~0.41 B (SigLIP) + projector ≈ 1.97 B.
        assert!((1.9e9..2.1e9).contains(&(n as f64)), "2b has {n} parameters");
        assert!(!shapes.iter().any(|(n, _)| n == "lm_head.weight"), "2b ties its embeddings");
        let seven = VideoLlama3Config::from_json(&bench_config("7b").unwrap().to_string()).unwrap();
        let shapes = tensor_shapes(&seven).unwrap();
        let n = parameter_count(&shapes);
        assert!((7.9e9..8.3e9).contains(&(n as f64)), "7b has {n} parameters");
        assert!(shapes.iter().any(|(n, s)| n == "lm_head.weight" && s == &[152064, 3584]));
        assert!(preset("13b").is_none());
    }

    #[test]
    fn values_are_deterministic_and_have_the_requested_spread() {
        let a = random_values::<f32>(3 << 20, 0.02, 7);
        let b = random_values::<f32>(3 << 20, 0.02, 7);
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 1e-4, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 2e-4, "std {}", var.sqrt());
        assert_ne!(a[..1 << 20], a[1 << 20..2 << 20], "chunks must not repeat");
        assert_eq!(fill_of("model.vision_model.encoder.layers.0.layer_norm1.weight") as u8, Fill::Ones as u8);
        assert_eq!(fill_of("model.language_model.norm.weight") as u8, Fill::Ones as u8);
        assert_eq!(fill_of("model.language_model.layers.0.self_attn.q_proj.bias") as u8, Fill::Zeros as u8);
        assert_eq!(fill_of("model.language_model.embed_tokens.weight") as u8, Fill::Uniform as u8);
    }

    #[test]
    fn a_small_random_checkpoint_loads_and_is_reused() {
        let tiny: serde_json::Value =
            serde_json::from_str(include_str!("../../models/tiny-videollama3/config.json")).unwrap();
        let dir = std::env::temp_dir().join(format!("vigil-random-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("cfg.json");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, tiny.to_string()).unwrap();
        let cfg = bench_config(path.to_str().unwrap()).unwrap();
        let ck = dir.join("ck");
        let info = write_random_checkpoint(&ck, &cfg, DType::F32, 3).unwrap();
        let model = VideoLlama3ForConditionalGeneration::from_pretrained(&ck, DType::F32, &Device::Cpu).unwrap();
        assert!(model.generation_defaults().eos_token_ids.is_empty(), "bench checkpoints never stop early");
        let processor = crate::processor::Processor::from_pretrained(&ck).unwrap();
        assert_eq!(processor.video_token_id, model.config().video_token_id);
        let stamp = std::fs::metadata(ck.join("model.safetensors")).unwrap().modified().unwrap();
        assert_eq!(write_random_checkpoint(&ck, &cfg, DType::F32, 3).unwrap(), info);
        assert_eq!(std::fs::metadata(ck.join("model.safetensors")).unwrap().modified().unwrap(), stamp, "re-used");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
