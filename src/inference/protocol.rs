//! The two request shapes: the Open Inference Protocol v2 (KServe/Triton REST) and an app's own
//! JSON (`protocol: json`, fields mapped to tensors). Both end in tensors checked against the
//! model's signature by [`check_inputs`]; nothing here runs a model.

use serde_json::{json, Map, Value};

use super::config::{DType, JsonMapping};
use super::error::InferenceError;
use super::model::{LoadedModel, TensorInfo};
use super::tensor::{Data, NamedTensor};

fn bad(message: impl Into<String>) -> InferenceError {
    InferenceError::BadInput(message.into())
}

/// Puts the request's tensors in the model's input order and checks names, types, shapes,
/// row counts and finiteness.
pub fn check_inputs(
    model: &LoadedModel,
    mut given: Vec<NamedTensor>,
) -> Result<Vec<NamedTensor>, InferenceError> {
    if let Some(extra) = given
        .iter()
        .find(|t| !model.inputs.iter().any(|i| i.name == t.name))
    {
        return Err(bad(format!(
            "unknown input {:?} (the model's inputs: {})",
            extra.name,
            names(&model.inputs)
        )));
    }
    let mut ordered = Vec::with_capacity(model.inputs.len());
    let mut rows = None;
    for info in &model.inputs {
        let position = given
            .iter()
            .position(|t| t.name == info.name)
            .ok_or_else(|| bad(format!("missing input {:?}", info.name)))?;
        let t = given.swap_remove(position);
        if t.data.dtype() != info.dtype {
            return Err(bad(format!(
                "input {:?} has datatype {}, the model wants {}",
                t.name,
                t.data.dtype().oip(),
                info.dtype.oip()
            )));
        }
        let shape_ok = t.shape.len() == info.shape.len()
            && t.shape
                .iter()
                .zip(&info.shape)
                .all(|(got, want)| want.is_none_or(|w| w == *got));
        if !shape_ok || t.rows() == 0 {
            return Err(bad(format!(
                "input {:?} has shape {:?}, the model wants {:?}",
                t.name,
                t.shape,
                info.oip_shape()
            )));
        }
        if t.data.len() != t.shape.iter().product::<usize>() {
            return Err(bad(format!(
                "input {:?}: shape {:?} needs {} values, got {}",
                t.name,
                t.shape,
                t.shape.iter().product::<usize>(),
                t.data.len()
            )));
        }
        if t.data.has_non_finite() {
            return Err(bad(format!(
                "input {:?} contains a non-finite value",
                t.name
            )));
        }
        match rows {
            None => rows = Some(t.rows()),
            Some(r) if r != t.rows() => {
                return Err(bad(format!(
                    "inputs have different batch sizes ({r} and {})",
                    t.rows()
                )))
            }
            Some(_) => {}
        }
        ordered.push(t);
    }
    Ok(ordered)
}

fn names(list: &[TensorInfo]) -> String {
    list.iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Flattens nested JSON arrays of numbers into `out`; `false` when something is not a number.
fn flatten(value: &Value, out: &mut Vec<f64>) -> bool {
    match value {
        Value::Array(items) => items.iter().all(|v| flatten(v, out)),
        Value::Number(n) => match n.as_f64() {
            Some(x) => {
                out.push(x);
                true
            }
            None => false,
        },
        _ => false,
    }
}

fn integral(dtype: DType, values: &[f64]) -> bool {
    match dtype {
        DType::Int32 => values
            .iter()
            .all(|v| v.fract() == 0.0 && *v >= f64::from(i32::MIN) && *v <= f64::from(i32::MAX)),
        DType::Int64 => values.iter().all(|v| v.fract() == 0.0 && v.abs() < 9.2e18),
        DType::Float32 | DType::Float64 => true,
    }
}

/// An OIP inference request: its tensors, the `id` to echo and the outputs asked for.
pub struct OipRequest {
    pub id: Option<Value>,
    pub inputs: Vec<NamedTensor>,
    pub outputs: Vec<String>,
}

pub fn parse_oip(body: &[u8]) -> Result<OipRequest, InferenceError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut request) = value else {
        return Err(bad("the body must be a JSON object"));
    };
    let id = request.remove("id");
    let Some(Value::Array(inputs)) = request.remove("inputs") else {
        return Err(bad("\"inputs\" must be a list of tensors"));
    };
    let inputs = inputs
        .iter()
        .map(parse_oip_tensor)
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = match request.remove("outputs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|o| {
                o.get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| bad("each of \"outputs\" needs a \"name\""))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("\"outputs\" must be a list")),
    };
    Ok(OipRequest {
        id,
        inputs,
        outputs,
    })
}

fn parse_oip_tensor(value: &Value) -> Result<NamedTensor, InferenceError> {
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("each input needs a \"name\""))?
        .to_owned();
    let shape = value
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| {
            bad(format!(
                "input {name:?}: \"shape\" must be a list of non-negative integers"
            ))
        })?;
    let datatype = value
        .get("datatype")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let dtype = DType::from_oip(datatype).ok_or_else(|| {
        bad(format!(
            "input {name:?}: datatype {datatype:?} is not served (FP32, FP64, INT32, INT64)"
        ))
    })?;
    let mut values = Vec::new();
    let data = value
        .get("data")
        .ok_or_else(|| bad(format!("input {name:?} has no \"data\"")))?;
    if !flatten(data, &mut values) {
        return Err(bad(format!(
            "input {name:?}: \"data\" must hold only numbers"
        )));
    }
    if !integral(dtype, &values) {
        return Err(bad(format!(
            "input {name:?}: {datatype} data must be integers in range"
        )));
    }
    Ok(NamedTensor {
        name,
        shape,
        data: Data::from_f64s(dtype, &values),
    })
}

fn tensor_json(t: &NamedTensor) -> Value {
    t.to_json()
}

/// The OIP inference response.
pub fn oip_response(
    model: &LoadedModel,
    id: Option<&Value>,
    outputs: &[NamedTensor],
    wanted: &[String],
) -> Result<Value, InferenceError> {
    if let Some(unknown) = wanted
        .iter()
        .find(|w| !outputs.iter().any(|o| &o.name == *w))
    {
        return Err(bad(format!(
            "unknown output {unknown:?} (the model's outputs: {})",
            names(&model.outputs)
        )));
    }
    let list: Vec<Value> = outputs
        .iter()
        .filter(|o| wanted.is_empty() || wanted.contains(&o.name))
        .map(tensor_json)
        .collect();
    let mut out = json!({
        "model_name": model.name,
        "model_version": model.version,
        "outputs": list,
    });
    if let Some(id) = id {
        out["id"] = id.clone();
    }
    Ok(out)
}

/// OIP model metadata (`GET /v2/models/{name}`).
pub fn oip_metadata(model: &LoadedModel) -> Value {
    let tensors = |list: &[TensorInfo]| -> Vec<Value> {
        list.iter()
            .map(|t| json!({ "name": t.name, "datatype": t.dtype.oip(), "shape": t.oip_shape() }))
            .collect()
    };
    json!({
        "name": model.name,
        "versions": [model.version],
        "platform": "onnx",
        "inputs": tensors(&model.inputs),
        "outputs": tensors(&model.outputs),
    })
}

/// Field → tensor pairs of a mapping; an empty mapping maps each tensor under its own name.
fn mapped<'a>(
    mapping: &'a std::collections::BTreeMap<String, String>,
    tensors: &'a [TensorInfo],
) -> Vec<(&'a str, &'a str)> {
    if mapping.is_empty() {
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.name.as_str()))
            .collect()
    } else {
        mapping
            .iter()
            .map(|(f, t)| (f.as_str(), t.as_str()))
            .collect()
    }
}

/// Request field → model input pairs of a mapping.
pub fn mapped_inputs<'a>(
    mapping: &'a JsonMapping,
    model: &'a LoadedModel,
) -> Vec<(&'a str, &'a str)> {
    mapped(&mapping.inputs, &model.inputs)
}

/// Response field → model output pairs of a mapping.
pub fn mapped_outputs<'a>(
    mapping: &'a JsonMapping,
    model: &'a LoadedModel,
) -> Vec<(&'a str, &'a str)> {
    mapped(&mapping.outputs, &model.outputs)
}

/// Reads an app-shaped request: each mapped field holds one row (a flat list) or a list of rows.
pub fn parse_json(
    body: &[u8],
    mapping: &JsonMapping,
    model: &LoadedModel,
) -> Result<Vec<NamedTensor>, InferenceError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(request) = value else {
        return Err(bad("the body must be a JSON object"));
    };
    let mut tensors = Vec::new();
    for (field, input) in mapped_inputs(mapping, model) {
        let Some(info) = model.inputs.iter().find(|t| t.name == input) else {
            return Err(InferenceError::Compute(format!(
                "json.inputs names {input:?}, which the model does not have"
            )));
        };
        let row_len = info.row_len().unwrap_or(1);
        let value = request
            .get(field)
            .ok_or_else(|| bad(format!("{field}: field required")))?;
        let Value::Array(items) = value else {
            return Err(bad(format!("{field} must be a list of numbers or of rows")));
        };
        if items.is_empty() {
            return Err(bad(format!("{field} must contain at least one row")));
        }
        let rows: Vec<&Value> = if items.first().is_some_and(Value::is_array) {
            items.iter().collect()
        } else {
            vec![value]
        };
        if rows.len() > mapping.max_rows {
            return Err(bad(format!(
                "at most {} rows per request",
                mapping.max_rows
            )));
        }
        let mut values = Vec::with_capacity(rows.len() * row_len);
        for (i, row) in rows.iter().enumerate() {
            let before = values.len();
            if !flatten(row, &mut values) {
                return Err(bad(format!("row {i} must hold only numbers")));
            }
            let n = values.len() - before;
            if n != row_len {
                return Err(bad(format!("row {i} has {n} values, expected {row_len}")));
            }
            let data = Data::from_f64s(info.dtype, &values[before..]);
            if data.has_non_finite() {
                return Err(bad(format!("row {i} contains a non-finite value")));
            }
            if !integral(info.dtype, &values[before..]) {
                return Err(bad(format!("row {i} must hold integers")));
            }
        }
        let mut shape: Vec<usize> = info.shape.iter().map(|d| d.unwrap_or(1)).collect();
        if let Some(first) = shape.first_mut() {
            *first = rows.len();
        }
        tensors.push(NamedTensor {
            name: input.to_owned(),
            shape,
            data: Data::from_f64s(info.dtype, &values),
        });
    }
    Ok(tensors)
}

/// The app-shaped answer: mapped outputs (one value per row, a list per row when a row has
/// several) and the mapping's constant fields.
pub fn json_response(mapping: &JsonMapping, model: &LoadedModel, outputs: &[NamedTensor]) -> Value {
    let mut out: Map<String, Value> = mapping
        .extra
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (field, output) in mapped_outputs(mapping, model) {
        let Some(t) = outputs.iter().find(|t| t.name == output) else {
            continue;
        };
        out.insert(field.to_owned(), rows_json(t));
    }
    Value::Object(out)
}

/// One JSON value per row of `t`.
pub fn rows_json(t: &NamedTensor) -> Value {
    let per_row = t.row_len().max(1);
    let rows = t.data.len() / per_row;
    Value::Array(
        (0..rows)
            .map(|r| {
                if per_row == 1 {
                    t.data.json_at(r)
                } else {
                    Value::Array(
                        (r * per_row..(r + 1) * per_row)
                            .map(|i| t.data.json_at(i))
                            .collect(),
                    )
                }
            })
            .collect(),
    )
}

/// Numbers of a JSON value, flattened (for shadow comparisons).
pub fn numbers(value: &Value) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    flatten(value, &mut out).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::config::ModelConfig;

    fn model() -> LoadedModel {
        let config: ModelConfig = serde_json::from_value(json!({ "path": "risk.onnx" })).unwrap();
        let bytes = include_bytes!("../../examples/models/risk.onnx");
        LoadedModel::load("risk", bytes, &config).unwrap()
    }

    #[test]
    fn app_json_rows_become_one_tensor_and_outputs_one_value_per_row() {
        let model = model();
        let mapping = JsonMapping::default();
        let flat = parse_json(br#"{"features": [1, 2, 3, 4]}"#, &mapping, &model).unwrap();
        assert_eq!(flat[0].shape, vec![1, 4]);
        let rows = parse_json(br#"{"features": [[1,2,3,4],[5,6,7,8]]}"#, &mapping, &model).unwrap();
        assert_eq!(rows[0].shape, vec![2, 4]);
        assert_eq!(
            rows[0].data,
            Data::F32(vec![1., 2., 3., 4., 5., 6., 7., 8.])
        );
        let outputs = model.run(check_inputs(&model, rows).unwrap()).unwrap();
        let answer = json_response(&mapping, &model, &outputs);
        assert_eq!(answer["risk"].as_array().unwrap().len(), 2);
        let err = |body: &[u8]| parse_json(body, &mapping, &model).unwrap_err().to_string();
        assert_eq!(
            err(br#"{"features": [[1,2,3,4],[1]]}"#),
            "row 1 has 1 values, expected 4"
        );
        assert_eq!(err(br#"{"x": 1}"#), "features: field required");
        assert_eq!(
            err(br#"{"features": [1,2,3,1e300]}"#),
            "row 0 contains a non-finite value"
        );
    }

    #[test]
    fn oip_tensors_are_checked_against_the_signature() {
        let model = model();
        let request = parse_oip(
            br#"{"id": 3, "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]}]}"#,
        )
        .unwrap();
        assert_eq!(request.id, Some(json!(3)));
        assert!(check_inputs(&model, request.inputs).is_ok());
        let bad = |body: &[u8]| {
            parse_oip(body)
                .and_then(|r| check_inputs(&model, r.inputs))
                .unwrap_err()
                .to_string()
        };
        assert!(bad(br#"{"inputs": [{"name": "features", "shape": [4], "datatype": "FP32", "data": [1,2,3,4]}]}"#)
            .contains("has shape [4]"));
        assert!(bad(br#"{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "INT32", "data": [1.5,2,3,4]}]}"#)
            .contains("must be integers"));
        assert!(bad(br#"{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1,true,3,4]}]}"#)
            .contains("only numbers"));
    }
}
