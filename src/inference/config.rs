//! YAML types of the `models:` section and of a route's `inference:` block. Key names are the
//! contract in `docs/configuration.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{ByteSize, HumanDuration};

/// One model of the `models:` section (name → this).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// ONNX file, relative to the working directory. Loaded at start and on reload; a changed
    /// file is loaded in the background and swapped in atomically.
    pub path: String,
    /// Micro-batching of single requests.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Compute threads for this model (off the proxy's async workers).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Requests (not rows) waiting for a compute thread; beyond it requests get 503
    /// `overloaded`.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Prediction cache in the shared store (absent: predictions are not cached).
    #[serde(default)]
    pub cache: Option<PredictionCacheConfig>,
    /// Inputs the model must have (name → element type and shape); checked at every load.
    #[serde(default)]
    pub inputs: BTreeMap<String, TensorSpec>,
    /// Outputs the model must have (name → element type and shape); checked at every load.
    #[serde(default)]
    pub outputs: BTreeMap<String, TensorSpec>,
}

fn default_threads() -> usize {
    1
}

fn default_max_queue() -> usize {
    1024
}

/// Batching knobs: a batch runs when `max_size` rows are waiting or `max_wait` has passed
/// since its first request was queued.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most rows in one model run; 1 turns batching off. Above 1 the model needs a dynamic
    /// batch (first) dimension.
    #[serde(default = "default_batch_size")]
    pub max_size: usize,
    /// Longest time the first request of a batch waits for others.
    #[serde(default = "default_batch_wait")]
    pub max_wait: HumanDuration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_size: default_batch_size(),
            max_wait: default_batch_wait(),
        }
    }
}

fn default_batch_size() -> usize {
    32
}

fn default_batch_wait() -> HumanDuration {
    HumanDuration(Duration::from_millis(2))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictionCacheConfig {
    /// How long a prediction is kept (keyed by model version and input tensors).
    pub ttl: HumanDuration,
}

/// A declared tensor: element type and shape (`-1` for a dynamic dimension).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    #[serde(rename = "type")]
    pub dtype: DType,
    /// Dimensions; `-1` is a dynamic one (the batch dimension first).
    #[serde(default)]
    pub shape: Option<Vec<i64>>,
}

/// Element types served (OIP names in parentheses).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// FP32
    Float32,
    /// FP64
    Float64,
    /// INT32
    Int32,
    /// INT64
    Int64,
}

impl DType {
    /// The Open Inference Protocol's name.
    pub fn oip(self) -> &'static str {
        match self {
            DType::Float32 => "FP32",
            DType::Float64 => "FP64",
            DType::Int32 => "INT32",
            DType::Int64 => "INT64",
        }
    }

    pub fn from_oip(name: &str) -> Option<DType> {
        Some(match name {
            "FP32" => DType::Float32,
            "FP64" => DType::Float64,
            "INT32" => DType::Int32,
            "INT64" => DType::Int64,
            _ => return None,
        })
    }

    /// The YAML name.
    pub fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
        }
    }
}

/// A route's `inference:` block.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Model of the `models:` section. Required for `protocol: json`; with `oip` it limits the
    /// route to that model (absent: every model, by the name in the URL).
    #[serde(default)]
    pub model: Option<String>,
    /// `json`: an app endpoint's own request/response shape (see `json`); `oip`: the Open
    /// Inference Protocol v2 REST endpoints under `/v2/`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Keep the upstream answering while the model runs on a copy of each request and its
    /// outputs are compared with the upstream's (`protocol: json` only).
    #[serde(default)]
    pub shadow: bool,
    /// Largest absolute difference between a model output and the upstream's value that
    /// still counts as a match in shadow mode.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// When the model is not loaded or fails: `upstream` forwards to the route's upstream,
    /// `error` answers 503. Default: `upstream` when the route has one, else `error`.
    #[serde(default)]
    pub fallback: Option<Fallback>,
    /// The field mapping of `protocol: json`.
    #[serde(default)]
    pub json: JsonMapping,
    /// Largest request body; a larger one is bad input (400 in the protocol's error format).
    /// At most the route's `max_body`, past which the proxy answers 413 before reading it.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}

fn default_tolerance() -> f64 {
    1e-5
}

#[derive(
    Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Json,
    Oip,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    Upstream,
    Error,
}

/// How an app endpoint's JSON maps to the model: each request field holds one row (a flat
/// list) or a list of rows; each output becomes a response field with one value per row.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonMapping {
    /// Request field → model input. Empty: each model input is read from the field of its name.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Response field → model output. Empty: each model output under its own name.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// Constant fields added to every answer (e.g. `model: risk`).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
    /// The `error` code of 400 answers (the message says what is wrong).
    #[serde(default = "default_error_code")]
    pub error_code: String,
    /// Most rows one request may carry.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
}

impl Default for JsonMapping {
    fn default() -> Self {
        JsonMapping {
            inputs: BTreeMap::new(),
            outputs: BTreeMap::new(),
            extra: BTreeMap::new(),
            error_code: default_error_code(),
            max_rows: default_max_rows(),
        }
    }
}

fn default_error_code() -> String {
    "invalid_input".to_owned()
}

fn default_max_rows() -> usize {
    1024
}

impl InferenceConfig {
    /// The fallback in effect for a route with or without an upstream.
    pub fn fallback_for(&self, has_upstream: bool) -> Fallback {
        self.fallback.unwrap_or(if has_upstream {
            Fallback::Upstream
        } else {
            Fallback::Error
        })
    }
}
