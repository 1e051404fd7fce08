//! One loaded ONNX model: its signature (names, element types, shapes, as the file declares
//! them) and a runnable tract plan. Loading checks the signature against the config, so a file
//! that does not fit the routes built on it never replaces a good one.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use tract_onnx::prelude::*;

use super::config::{DType, ModelConfig, TensorSpec};
use super::error::InferenceError;
use super::tensor::{Data, NamedTensor};

/// Largest model file read (a model this size would not be a sidecar's job).
const MAX_MODEL_BYTES: u64 = 512 * 1024 * 1024;

/// A tensor of the model's signature; `None` dimensions are dynamic.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Option<usize>>,
}

impl TensorInfo {
    /// Values per row (the product of the dimensions after the first), when all are static.
    pub fn row_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .skip(1)
            .try_fold(1usize, |acc, d| Some(acc * (*d)?))
    }

    /// The shape as OIP metadata shows it (`-1` for dynamic).
    pub fn oip_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| d.map_or(-1, |d| d as i64))
            .collect()
    }
}

type Plan = Arc<TypedRunnableModel>;

/// A model ready to run; replaced as a whole when its file changes.
pub struct LoadedModel {
    pub name: String,
    /// First 16 hex digits of the BLAKE3 of the file: names this version everywhere (OIP
    /// `versions`, `/models`, the metric, prediction cache keys).
    pub version: String,
    pub loaded_at: SystemTime,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// The first dimension of every input and output is dynamic, so rows of several requests
    /// can run together.
    pub batchable: bool,
    plan: Plan,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

fn dtype_of(datum: DatumType) -> Option<DType> {
    Some(match datum {
        DatumType::F32 => DType::Float32,
        DatumType::F64 => DType::Float64,
        DatumType::I32 => DType::Int32,
        DatumType::I64 => DType::Int64,
        _ => return None,
    })
}

/// Reads a model file (bounded), for [`LoadedModel::load`].
pub fn read_model_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(|e| e.to_string())?
        .take(MAX_MODEL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_MODEL_BYTES {
        return Err(format!("larger than {MAX_MODEL_BYTES} bytes"));
    }
    Ok(bytes)
}

impl LoadedModel {
    /// Parses, checks and optimizes a model from its file's bytes. The error is the reason
    /// shown after `FILE:` in logs, `/ready` and `/models`.
    pub fn load(name: &str, bytes: &[u8], config: &ModelConfig) -> Result<LoadedModel, String> {
        let version = blake3::hash(bytes).to_hex()[..16].to_owned();
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| format!("not a loadable ONNX model: {e}"))?;
        let typed = model
            .into_typed()
            .map_err(|e| format!("cannot type the model: {e}"))?;
        let inputs = signature(&typed, typed.input_outlets().map_err(|e| e.to_string())?)?;
        let outputs = signature(&typed, typed.output_outlets().map_err(|e| e.to_string())?)?;
        check_declared("input", &inputs, &config.inputs)?;
        check_declared("output", &outputs, &config.outputs)?;
        let batchable = inputs
            .iter()
            .chain(&outputs)
            .all(|t| t.shape.first().is_some_and(Option::is_none));
        if config.batch.max_size > 1 && !batchable {
            return Err(format!(
                "batch.max_size is {} but the model has no dynamic batch (first) dimension on every input and output; set batch.max_size: 1",
                config.batch.max_size
            ));
        }
        if let Some(t) = inputs.iter().find(|t| t.row_len().is_none()) {
            return Err(format!(
                "input {:?} has a dynamic dimension after the first; only the batch dimension may be dynamic",
                t.name
            ));
        }
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| format!("cannot optimize the model: {e}"))?;
        Ok(LoadedModel {
            name: name.to_owned(),
            version,
            loaded_at: SystemTime::now(),
            inputs,
            outputs,
            batchable,
            plan,
        })
    }

    /// Runs one batch: `inputs` in the model's input order, each with its rows first.
    pub fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let mut values: TVec<TValue> = TVec::new();
        for t in inputs {
            let tensor = match t.data {
                Data::F32(v) => Tensor::from_shape(&t.shape, &v),
                Data::F64(v) => Tensor::from_shape(&t.shape, &v),
                Data::I32(v) => Tensor::from_shape(&t.shape, &v),
                Data::I64(v) => Tensor::from_shape(&t.shape, &v),
            }
            .map_err(|e| InferenceError::Compute(e.to_string()))?;
            values.push(tensor.into_tvalue());
        }
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| InferenceError::Compute(e.to_string()))?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(value, info)| to_named(&info.name, value))
            .collect()
    }
}

fn to_named(name: &str, value: &Tensor) -> Result<NamedTensor, InferenceError> {
    let compute = |e: TractError| InferenceError::Compute(e.to_string());
    fn values<D: Datum + Copy>(t: &Tensor) -> TractResult<Vec<D>> {
        Ok(t.to_plain_array_view::<D>()?.iter().copied().collect())
    }
    let data = match value.datum_type() {
        DatumType::F32 => Data::F32(values(value).map_err(compute)?),
        DatumType::F64 => Data::F64(values(value).map_err(compute)?),
        DatumType::I32 => Data::I32(values(value).map_err(compute)?),
        DatumType::I64 => Data::I64(values(value).map_err(compute)?),
        _ => {
            let cast = value.cast_to::<f64>().map_err(compute)?;
            Data::F64(values(&cast).map_err(compute)?)
        }
    };
    Ok(NamedTensor {
        name: name.to_owned(),
        shape: value.shape().to_vec(),
        data,
    })
}

fn signature(model: &TypedModel, outlets: &[OutletId]) -> Result<Vec<TensorInfo>, String> {
    outlets
        .iter()
        .map(|outlet| {
            let fact = model.outlet_fact(*outlet).map_err(|e| e.to_string())?;
            let name = model
                .outlet_label(*outlet)
                .map(str::to_owned)
                .unwrap_or_else(|| model.node(outlet.node).name.clone());
            let dtype = dtype_of(fact.datum_type).ok_or_else(|| {
                format!(
                    "tensor {name:?} has element type {:?}; served types are float32, float64, int32, int64",
                    fact.datum_type
                )
            })?;
            let shape = fact
                .shape
                .iter()
                .map(|d| d.as_i64().and_then(|d| usize::try_from(d).ok()))
                .collect();
            Ok(TensorInfo { name, dtype, shape })
        })
        .collect()
}

/// Checks the tensors a config declares against the model's.
fn check_declared(
    kind: &str,
    actual: &[TensorInfo],
    declared: &std::collections::BTreeMap<String, TensorSpec>,
) -> Result<(), String> {
    for (name, spec) in declared {
        let Some(info) = actual.iter().find(|t| &t.name == name) else {
            let names: Vec<&str> = actual.iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "declared {kind} {name:?} is not in the model (its {kind}s: {})",
                names.join(", ")
            ));
        };
        if info.dtype != spec.dtype {
            return Err(format!(
                "{kind} {name:?} is {} in the model, declared {}",
                info.dtype.name(),
                spec.dtype.name()
            ));
        }
        if let Some(shape) = &spec.shape {
            let model_shape = info.oip_shape();
            if *shape != model_shape {
                return Err(format!(
                    "{kind} {name:?} has shape {model_shape:?} in the model, declared {shape:?}"
                ));
            }
        }
    }
    Ok(())
}
