//! Glue from vigil's TOML `[model]` section to a loaded model: device, dtype, checkpoint
//! directory (local path, or a repo already in the Hugging Face cache) and generation settings.
//!
//! Source of truth for the cache layout: huggingface_hub's `file_download.py`
//! (`$HF_HUB_CACHE` or `$HF_HOME/hub` or `~/.cache/huggingface/hub`, then
//! `models--{org}--{name}/refs/{revision}` holding a commit hash and
//! `snapshots/{commit}/` holding the files).

use std::path::{Path, PathBuf};

use candle_core::DType;

use super::generation::{GenerationParams, Sampling};
use super::video_llama3::VideoLlama3ForConditionalGeneration;
use super::ModelError;
use crate::config::{self, ModelConfig};

/// candle device for a configured one; CUDA needs the `cuda` feature.
pub fn candle_device(device: config::Device) -> Result<candle_core::Device, ModelError> {
    match device {
        config::Device::Cpu => Ok(candle_core::Device::Cpu),
        config::Device::Cuda(n) => {
            let dev = candle_core::Device::new_cuda(n).map_err(|source| ModelError::Device { device, source })?;
            #[cfg(feature = "cuda")]
            if let candle_core::Device::Cuda(cuda) = &dev {
                tune_cuda(cuda).map_err(|source| ModelError::Device { device, source })?;
            }
            Ok(dev)
        }
    }
}

/// Allocation settings for a CUDA device, applied when it is opened.
///
/// - The stream-ordered memory pool keeps what is freed: its release threshold defaults to 0,
///   which hands freed memory back to the driver at every synchronisation — and the decode loop
///   synchronises every step (the chosen ids come back), so each step would map its activations
///   anew.
/// - cudarc's per-allocation event tracking is turned off. It orders a buffer's uses across
///   streams; all of a model's work is issued from its engine's model thread onto candle's one
///   stream, so the events would only add a record and a wait per kernel. (With candle's
///   per-thread stream cudarc does not track yet; this keeps it so if candle creates streams.)
#[cfg(feature = "cuda")]
fn tune_cuda(dev: &candle_core::CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    // SAFETY: vigil issues every kernel of a device from one thread onto one stream (see above).
    unsafe { dev.disable_event_tracking() };
    let ordinal = dev.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on valid out-pointers; the pool is the device's default one.
    let status = unsafe {
        match sys::cuDeviceGetDefaultMemPool(&mut pool, ordinal) {
            sys::CUresult::CUDA_SUCCESS => sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ),
            err => err,
        }
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        candle_core::bail!("setting the CUDA memory pool's release threshold: {status:?}");
    }
    tracing::debug!("CUDA device {ordinal}: memory pool keeps freed memory, event tracking off");
    Ok(())
}

pub fn candle_dtype(dtype: config::DType) -> DType {
    match dtype {
        config::DType::F32 => DType::F32,
        config::DType::F16 => DType::F16,
        config::DType::Bf16 => DType::BF16,
    }
}

/// The Hugging Face hub cache root, following huggingface_hub's environment variables.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Snapshot directory of `repo` at `revision` (branch, tag or commit; default `main`) inside
/// the cache at `cache`. Works offline; it does not download.
pub fn cached_snapshot(cache: &Path, repo: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    let revision = revision.unwrap_or("main");
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_cached = |why: &str| {
        ModelError::NotFound(format!(
            "model repo {repo:?} (revision {revision}) is not in the Hugging Face cache {} ({why}); \
             fetch it first, e.g. `huggingface-cli download {repo}`, or set model.path",
            cache.display()
        ))
    };
    if !repo_dir.is_dir() {
        return Err(not_cached("no cache entry"));
    }
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        // A commit hash is used as is.
        Err(_) => revision.to_string(),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.join("config.json").is_file() {
        return Err(not_cached("snapshot has no config.json"));
    }
    Ok(snapshot)
}

/// The checkpoint directory a `[model]` section names (`path` resolved against `base_dir`).
pub fn model_dir(model: &ModelConfig, base_dir: &Path) -> Result<PathBuf, ModelError> {
    match (&model.path, &model.repo) {
        (Some(p), _) => Ok(if p.is_absolute() { p.clone() } else { base_dir.join(p) }),
        (None, Some(repo)) => {
            let cache = hf_cache_dir()
                .ok_or_else(|| ModelError::NotFound("cannot locate the Hugging Face cache (no HOME)".into()))?;
            cached_snapshot(&cache, repo, model.revision.as_deref())
        }
        (None, None) => Err(ModelError::NotFound("set model.path or model.repo".into())),
    }
}

/// Files besides the weights that a VideoLLaMA3 directory carries (processor, tokenizer,
/// generation defaults); fetched when present, skipped when the repo lacks them.
#[cfg(feature = "hub")]
const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
];

/// Download `repo` at `revision` into the Hugging Face cache (huggingface_hub's layout, so
/// later runs find it offline) and return the snapshot directory. `HF_ENDPOINT`, `HF_HOME` and
/// the stored token apply, as in huggingface_hub.
#[cfg(feature = "hub")]
pub fn download_snapshot(repo: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    download_snapshot_from(None, None, repo, revision)
}

/// [`download_snapshot`] with an explicit endpoint and cache directory (mirrors, tests).
#[cfg(feature = "hub")]
pub fn download_snapshot_from(
    endpoint: Option<&str>,
    cache_dir: Option<&Path>,
    repo: &str,
    revision: Option<&str>,
) -> Result<PathBuf, ModelError> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    let hub_err = |file: &str, e: hf_hub::api::sync::ApiError| ModelError::Download {
        repo: repo.to_string(),
        file: file.to_string(),
        source: Box::new(e),
    };
    let mut builder = ApiBuilder::from_env().with_progress(false);
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint.to_string());
    }
    if let Some(cache_dir) = cache_dir {
        builder = builder.with_cache_dir(cache_dir.to_path_buf());
    }
    let api = builder.build().map_err(|e| hub_err("(connect)", e))?;
    let api = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.unwrap_or("main").to_string()));
    let config = api.get("config.json").map_err(|e| hub_err("config.json", e))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| ModelError::NotFound(format!("odd cache path {}", config.display())))?;
    for file in OPTIONAL_FILES {
        let _ = api.get(file);
    }
    match api.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in crate::model::video_llama3::index_shards(&index)? {
                api.get(&shard).map_err(|e| hub_err(&shard, e))?;
            }
        }
        Err(_) => {
            api.get("model.safetensors").map_err(|e| hub_err("model.safetensors", e))?;
        }
    }
    Ok(dir)
}

/// Load the model a `[model]` section describes.
pub fn load_model(model: &ModelConfig, base_dir: &Path) -> Result<VideoLlama3ForConditionalGeneration, ModelError> {
    let device = candle_device(model.device)?;
    let dir = model_dir(model, base_dir)?;
    let dtype = candle_dtype(model.dtype);
    let loaded = VideoLlama3ForConditionalGeneration::from_pretrained(&dir, dtype, &device)?;
    // The attention kernels are checked on this device and dtype before any answer uses them.
    super::fused::configure(model.attention, &device, dtype, &super::fused::CheckShapes::of(loaded.config()));
    Ok(loaded)
}

/// Check a checkpoint directory as [`VideoLlama3ForConditionalGeneration::from_pretrained`]
/// would load it, without reading the weights' data: `config.json`, the safetensors headers
/// (every tensor the model asks for is there, with its shape; a truncated file fails here),
/// and the generation defaults.
pub fn check_pretrained(dir: &Path) -> Result<super::config::VideoLlama3Config, ModelError> {
    use candle_core::safetensors::MmapedSafetensors;
    use candle_core::{Device, Shape, Tensor};
    use candle_nn::var_builder::SimpleBackend;

    /// Answers each request from the headers with a zero-stride view: no tensor data is read.
    struct Headers(MmapedSafetensors);
    impl SimpleBackend for Headers {
        fn get(
            &self,
            s: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let got: Shape = self.0.get(name)?.shape().into();
            if got != s {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got,
                }
                .bt());
            }
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
            let shape: Shape = self.0.get(name)?.shape().into();
            Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.get(name).is_ok()
        }
    }

    let config = super::config::VideoLlama3Config::from_file(dir)?;
    let files = super::video_llama3::weight_files(dir)?;
    // SAFETY: as in `from_pretrained`: checkpoint files are not modified while mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(ModelError::from_load)?;
    let vb = candle_nn::VarBuilder::from_backend(Box::new(Headers(st)), DType::F32, Device::Cpu);
    let generation = super::config::GenerationDefaults::load(dir, &config)?;
    VideoLlama3ForConditionalGeneration::new(&config, vb, generation)?;
    Ok(config)
}

impl GenerationParams {
    /// `temperature = 0` means greedy; `top_k = 0` and `top_p = 1` disable those filters.
    pub fn from_model_config(model: &ModelConfig) -> Self {
        let sampling = if model.temperature <= 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample {
                temperature: model.temperature,
                top_k: (model.top_k > 0).then_some(model.top_k),
                top_p: (model.top_p < 1.0).then_some(model.top_p),
                seed: model.seed,
            }
        };
        Self {
            max_new_tokens: model.max_new_tokens,
            sampling,
            eos_token_ids: None,
            pad_token_id: None,
            repetition_penalty: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lookup_follows_the_hub_cache_layout() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--lkhl--VideoLLaMA3-2B-Image-HF");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        std::fs::write(repo.join("snapshots").join(commit).join("config.json"), "{}").unwrap();
        let got = cached_snapshot(cache.path(), "lkhl/VideoLLaMA3-2B-Image-HF", None).unwrap();
        assert_eq!(got, repo.join("snapshots").join(commit));
        let got = cached_snapshot(cache.path(), "lkhl/VideoLLaMA3-2B-Image-HF", Some(commit)).unwrap();
        assert_eq!(got, repo.join("snapshots").join(commit));
        let err = cached_snapshot(cache.path(), "lkhl/other", None).unwrap_err().to_string();
        assert!(err.contains("not in the Hugging Face cache") && err.contains("lkhl/other"), "{err}");
        let err = cached_snapshot(cache.path(), "lkhl/VideoLLaMA3-2B-Image-HF", Some("v2")).unwrap_err();
        assert!(err.to_string().contains("revision v2"));
    }

    #[test]
    fn generation_params_from_toml_settings() {
        let mut m = ModelConfig::default();
        assert_eq!(GenerationParams::from_model_config(&m).sampling, Sampling::Greedy);
        m.temperature = 0.7;
        m.top_k = 20;
        m.seed = 3;
        let p = GenerationParams::from_model_config(&m);
        assert_eq!(p.sampling, Sampling::Sample { temperature: 0.7, top_k: Some(20), top_p: None, seed: 3 });
        assert_eq!(p.max_new_tokens, m.max_new_tokens);
    }

    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        if cfg!(feature = "cuda") {
            return;
        }
        let err = candle_device(config::Device::Cuda(0)).unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(matches!(candle_device(config::Device::Cpu), Ok(candle_core::Device::Cpu)));
    }
}
