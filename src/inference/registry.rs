//! The process-wide model registry: one entry per name of the `models:` section, kept across
//! config reloads. Each entry holds the serving version (swapped atomically), the last load
//! problem (`FILE: reason`), and its batcher. A reload applies the section; a poller thread
//! notices a changed model file and loads it in the background. A failed load never replaces a
//! serving version.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::{Mutex, RwLock};
use serde_json::{json, Value};

use super::batcher::{Batcher, Knobs};
use super::config::ModelConfig;
use super::metrics::InferenceMetrics;
use super::model::{read_model_file, LoadedModel, TensorInfo};

/// How often model files are checked for changes.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// What identifies a file's content cheaply: modification time and length.
type FileStamp = Option<(SystemTime, u64)>;

fn stamp(path: &str) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

pub struct ModelEntry {
    pub name: String,
    config: RwLock<ModelConfig>,
    current: ArcSwapOption<LoadedModel>,
    error: RwLock<Option<String>>,
    /// The file as it was at the last load attempt.
    stamp: Mutex<FileStamp>,
    batcher: ArcSwap<Batcher>,
    metrics: Arc<InferenceMetrics>,
}

impl std::fmt::Debug for ModelEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEntry")
            .field("name", &self.name)
            .finish()
    }
}

impl ModelEntry {
    /// The version serving now, if any.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current.load_full()
    }

    pub fn batcher(&self) -> Arc<Batcher> {
        self.batcher.load_full()
    }

    /// The prediction cache lifetime, when the model's predictions are cached.
    pub fn cache_ttl(&self) -> Option<Duration> {
        self.config.read().cache.as_ref().map(|c| c.ttl.get())
    }

    /// The last load problem as `FILE: reason`.
    pub fn error(&self) -> Option<String> {
        self.error.read().clone()
    }

    pub fn metrics(&self) -> &InferenceMetrics {
        &self.metrics
    }

    /// Loads the file now (at start, on reload, on change); keeps the serving version on failure.
    fn load(&self) {
        let config = self.config.read().clone();
        // Held for the whole load: a reload and the poller never load the same model at once.
        let mut last = self.stamp.lock();
        *last = stamp(&config.path);
        let result = read_model_file(Path::new(&config.path))
            .and_then(|bytes| LoadedModel::load(&self.name, &bytes, &config));
        match result {
            Ok(model) => {
                if let Some(old) = self.current() {
                    self.metrics
                        .info
                        .remove_label_values(&[&self.name, &old.version])
                        .ok();
                }
                self.metrics
                    .info
                    .with_label_values(&[&self.name, &model.version])
                    .set(1);
                self.metrics.loaded.with_label_values(&[&self.name]).set(1);
                self.metrics
                    .loads
                    .with_label_values(&[&self.name, "ok"])
                    .inc();
                tracing::info!(model = %self.name, path = %config.path, version = %model.version, "model loaded");
                self.current.store(Some(Arc::new(model)));
                *self.error.write() = None;
            }
            Err(reason) => {
                let problem = format!("{}: {reason}", config.path);
                self.metrics
                    .loads
                    .with_label_values(&[&self.name, "failed"])
                    .inc();
                match self.current() {
                    Some(serving) => {
                        tracing::error!(model = %self.name, problem = %problem, serving = %serving.version, "model load failed; the previous version keeps serving")
                    }
                    None => {
                        tracing::error!(model = %self.name, problem = %problem, "model load failed; the model is not serving")
                    }
                }
                *self.error.write() = Some(problem);
            }
        }
    }

    /// Loads the file again if it changed since the last attempt.
    fn poll(&self) {
        let path = self.config.read().path.clone();
        let now = stamp(&path);
        if now != *self.stamp.lock() {
            self.load();
        }
    }

    fn status(&self) -> Value {
        let config = self.config.read().clone();
        let tensors = |list: &[TensorInfo]| -> Vec<Value> {
            list.iter()
                .map(|t| json!({ "name": t.name, "type": t.dtype.name(), "shape": t.oip_shape() }))
                .collect()
        };
        let batcher = self.batcher();
        let mut out = json!({
            "path": config.path,
            "loaded": false,
            "error": self.error(),
            "batch": {
                "max_size": config.batch.max_size,
                "max_wait_ms": config.batch.max_wait.get().as_secs_f64() * 1000.0,
            },
            "threads": batcher.threads,
            "queue": { "depth": batcher.depth(), "max": batcher.max_queue() },
        });
        if let Some(model) = self.current() {
            out["loaded"] = json!(true);
            out["version"] = json!(model.version);
            out["loaded_at"] = json!(model
                .loaded_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0));
            out["batchable"] = json!(model.batchable);
            out["inputs"] = json!(tensors(&model.inputs));
            out["outputs"] = json!(tensors(&model.outputs));
        }
        out
    }
}

fn knobs(config: &ModelConfig) -> Knobs {
    Knobs {
        max_size: config.batch.max_size.max(1),
        max_wait: config.batch.max_wait.get(),
    }
}

#[derive(Debug)]
pub struct ModelRegistry {
    entries: RwLock<BTreeMap<String, Arc<ModelEntry>>>,
    metrics: Arc<InferenceMetrics>,
}

impl ModelRegistry {
    /// A registry with its file poller (which ends when the registry is dropped).
    pub fn new(registry: &prometheus::Registry) -> Result<Arc<ModelRegistry>, String> {
        let metrics = Arc::new(InferenceMetrics::new(registry).map_err(|e| e.to_string())?);
        let this = Arc::new(ModelRegistry {
            entries: RwLock::new(BTreeMap::new()),
            metrics,
        });
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("outrider-models".to_owned())
            .spawn(move || poll_files(weak))
            .map_err(|e| format!("cannot start the model file poller: {e}"))?;
        Ok(this)
    }

    pub fn metrics(&self) -> &Arc<InferenceMetrics> {
        &self.metrics
    }

    pub fn get(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.entries.read().get(name).cloned()
    }

    /// Makes the registry match a config's `models:` section: new models are loaded, changed
    /// ones reloaded (a failed load keeps the serving version), removed ones dropped.
    pub fn apply(&self, models: &BTreeMap<String, ModelConfig>) -> Result<(), String> {
        // Files are read and compiled after the map's lock is released: requests look models
        // up through it and must not wait for a load.
        let mut to_load = Vec::new();
        {
            let mut entries = self.entries.write();
            entries.retain(|name, _| {
                let keep = models.contains_key(name);
                if !keep {
                    self.metrics.loaded.with_label_values(&[name]).set(0);
                }
                keep
            });
            for (name, config) in models {
                match entries.get(name) {
                    Some(entry) => {
                        let old = entry.config.read().clone();
                        if old == *config {
                            continue;
                        }
                        *entry.config.write() = config.clone();
                        if old.threads != config.threads || old.max_queue != config.max_queue {
                            entry.batcher.store(Arc::new(self.batcher(name, config)?));
                        } else {
                            entry.batcher().set_knobs(knobs(config));
                        }
                        if old.path != config.path
                            || old.inputs != config.inputs
                            || old.outputs != config.outputs
                            || old.batch.max_size != config.batch.max_size
                        {
                            to_load.push(entry.clone());
                        }
                    }
                    None => {
                        let entry = Arc::new(ModelEntry {
                            name: name.clone(),
                            config: RwLock::new(config.clone()),
                            current: ArcSwapOption::empty(),
                            error: RwLock::new(None),
                            stamp: Mutex::new(None),
                            batcher: ArcSwap::from_pointee(self.batcher(name, config)?),
                            metrics: self.metrics.clone(),
                        });
                        to_load.push(entry.clone());
                        entries.insert(name.clone(), entry);
                    }
                }
            }
        }
        for entry in to_load {
            entry.load();
        }
        Ok(())
    }

    fn batcher(&self, name: &str, config: &ModelConfig) -> Result<Batcher, String> {
        Batcher::start(
            name,
            config.threads,
            config.max_queue,
            knobs(config),
            Arc::new(self.metrics.model(name)),
        )
        .map_err(|e| format!("cannot start compute threads for model {name}: {e}"))
    }

    /// `GET /models`.
    pub fn status(&self) -> Value {
        let models: serde_json::Map<String, Value> = self
            .entries
            .read()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.status()))
            .collect();
        json!({ "models": models })
    }

    /// Readiness checks: one per model; a model with no serving version blocks readiness.
    pub fn readiness(&self) -> Vec<(String, Value, bool)> {
        self.entries
            .read()
            .iter()
            .map(|(name, entry)| {
                let serving = entry.current();
                let status = match (&serving, entry.error()) {
                    (Some(model), None) => json!(format!("ok (version {})", model.version)),
                    (Some(model), Some(problem)) => {
                        json!(format!(
                            "{problem} (version {} keeps serving)",
                            model.version
                        ))
                    }
                    (None, Some(problem)) => json!(problem),
                    (None, None) => json!("not loaded"),
                };
                (format!("model:{name}"), status, serving.is_none())
            })
            .collect()
    }

    /// Sets the queue depth gauges (before a scrape: read, not tracked, so they never drift).
    pub fn refresh_gauges(&self) {
        for (name, entry) in self.entries.read().iter() {
            self.metrics
                .queue_depth
                .with_label_values(&[name])
                .set(entry.batcher().depth() as i64);
        }
    }

    /// Whether every model has a serving version (OIP `/v2/health/ready`).
    pub fn all_ready(&self) -> bool {
        self.entries.read().values().all(|e| e.current().is_some())
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.read().keys().cloned().collect()
    }
}

fn poll_files(registry: Weak<ModelRegistry>) {
    loop {
        std::thread::sleep(POLL_EVERY);
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let entries: Vec<Arc<ModelEntry>> = registry.entries.read().values().cloned().collect();
        drop(registry);
        for entry in entries {
            entry.poll();
        }
    }
}
