//! One engine per (model, device, dtype, pruning) in the process: every `vigilvlm` element that
//! names the same model shares it, so a four-camera pipeline loads the weights once and its
//! windows are batched together, as the daemon's streams are. The engine is shut down when the
//! last element using it stops.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use vigil::config::{Config, DType, EngineConfig, ModelConfig, PruningConfig, StreamDefaults};
use vigil::engine::{Engine, EngineError};

/// What decides whether two elements can share an engine. Pruning is applied by the engine's
/// processor for every job, so elements that prune differently need their own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EngineKey {
    pub model: PathBuf,
    pub device: String,
    pub dtype: String,
    pub pruning: bool,
    /// `pruning-threshold` bits (f64 is not `Eq`).
    pub threshold_bits: u64,
}

/// A loaded engine and the model id answers report.
pub struct SharedEngine {
    pub engine: Engine,
    pub model_id: String,
    shutdown_timeout: Duration,
    /// Elements holding a [`Lease`].
    users: AtomicUsize,
}

/// An element's hold on a shared engine (between its `start()` and `stop()`).
pub struct Lease(Arc<SharedEngine>);

impl Lease {
    fn new(e: Arc<SharedEngine>) -> Lease {
        e.users.fetch_add(1, Ordering::SeqCst);
        Lease(e)
    }

    /// Elements using this engine now.
    pub fn users(&self) -> usize {
        self.0.users.load(Ordering::SeqCst)
    }

    /// The engine, for the element's worker thread.
    pub fn shared(&self) -> Arc<SharedEngine> {
        self.0.clone()
    }
}

impl std::ops::Deref for Lease {
    type Target = SharedEngine;
    fn deref(&self) -> &SharedEngine {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for SharedEngine {
    fn drop(&mut self) {
        self.engine.shutdown(self.shutdown_timeout);
    }
}

static ENGINES: Mutex<Option<HashMap<EngineKey, Weak<SharedEngine>>>> = Mutex::new(None);
static LOADS: AtomicU64 = AtomicU64::new(0);

/// Models loaded by this process so far (tests check that elements share one).
pub fn models_loaded() -> u64 {
    LOADS.load(Ordering::Relaxed)
}

/// The daemon's configuration for an engine with these settings (everything else at the
/// daemon's defaults).
pub fn engine_config(key: &EngineKey, dtype: DType, defaults: StreamDefaults) -> Result<Config, String> {
    let device: vigil::config::Device = key.device.parse()?;
    Ok(Config {
        model: ModelConfig { path: Some(key.model.clone()), device, dtype, ..ModelConfig::default() },
        pruning: PruningConfig {
            enabled: key.pruning,
            threshold: f64::from_bits(key.threshold_bits),
            ..PruningConfig::default()
        },
        mqtt: Default::default(),
        metrics: Default::default(),
        engine: EngineConfig::default(),
        defaults,
        prompts: Vec::new(),
        streams: Vec::new(),
        base_dir: std::env::current_dir().unwrap_or_default(),
    })
}

/// The engine for `key`: the one another element already uses, or a newly loaded one (the
/// lock is held while loading, so two elements starting at once still load the model once).
pub fn acquire(key: &EngineKey, cfg: &Config) -> Result<Lease, EngineError> {
    let mut all = vigil::lock::lock(&ENGINES);
    let all = all.get_or_insert_with(HashMap::new);
    all.retain(|_, w| w.strong_count() > 0);
    if let Some(e) = all.get(key).and_then(Weak::upgrade) {
        return Ok(Lease::new(e));
    }
    let engine = Engine::start(cfg)?;
    LOADS.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(SharedEngine {
        engine,
        model_id: cfg.model.model_id(),
        shutdown_timeout: Duration::from_secs_f64(cfg.engine.shutdown_timeout_s),
        users: AtomicUsize::new(0),
    });
    all.insert(key.clone(), Arc::downgrade(&shared));
    Ok(Lease::new(shared))
}
