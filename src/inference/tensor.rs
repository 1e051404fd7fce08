//! Tensors as the protocols carry them: a shape and row-major values of one element type.
//! Kept apart from tract's `Tensor` so protocol code and the batcher are tested without a model.

use super::config::DType;

/// Row-major values of one element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::Float32,
            Data::F64(_) => DType::Float64,
            Data::I32(_) => DType::Int32,
            Data::I64(_) => DType::Int64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty vector of `dtype`.
    pub fn empty(dtype: DType) -> Data {
        match dtype {
            DType::Float32 => Data::F32(Vec::new()),
            DType::Float64 => Data::F64(Vec::new()),
            DType::Int32 => Data::I32(Vec::new()),
            DType::Int64 => Data::I64(Vec::new()),
        }
    }

    /// Values converted from JSON numbers (already checked to be numbers of the right kind).
    pub fn from_f64s(dtype: DType, values: &[f64]) -> Data {
        match dtype {
            DType::Float32 => Data::F32(values.iter().map(|v| *v as f32).collect()),
            DType::Float64 => Data::F64(values.to_vec()),
            DType::Int32 => Data::I32(values.iter().map(|v| *v as i32).collect()),
            DType::Int64 => Data::I64(values.iter().map(|v| *v as i64).collect()),
        }
    }

    /// Element `i` as a JSON number (NaN and infinities become `null`, as JSON has none).
    pub fn json_at(&self, i: usize) -> serde_json::Value {
        match self {
            Data::F32(v) => v
                .get(i)
                .and_then(|x| serde_json::Number::from_f64(f64::from(*x)))
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Data::F64(v) => v
                .get(i)
                .and_then(|x| serde_json::Number::from_f64(*x))
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Data::I32(v) => v.get(i).map_or(serde_json::Value::Null, |x| (*x).into()),
            Data::I64(v) => v.get(i).map_or(serde_json::Value::Null, |x| (*x).into()),
        }
    }

    /// Element `i` as `f64` (for comparisons).
    pub fn f64_at(&self, i: usize) -> Option<f64> {
        match self {
            Data::F32(v) => v.get(i).map(|x| f64::from(*x)),
            Data::F64(v) => v.get(i).copied(),
            Data::I32(v) => v.get(i).map(|x| f64::from(*x)),
            Data::I64(v) => v.get(i).map(|x| *x as f64),
        }
    }

    /// Whether any value is NaN or infinite.
    pub fn has_non_finite(&self) -> bool {
        match self {
            Data::F32(v) => v.iter().any(|x| !x.is_finite()),
            Data::F64(v) => v.iter().any(|x| !x.is_finite()),
            Data::I32(_) | Data::I64(_) => false,
        }
    }

    /// Appends `other` (same type; a mismatch is a caller bug and appends nothing).
    pub fn extend(&mut self, other: &Data) {
        match (self, other) {
            (Data::F32(a), Data::F32(b)) => a.extend_from_slice(b),
            (Data::F64(a), Data::F64(b)) => a.extend_from_slice(b),
            (Data::I32(a), Data::I32(b)) => a.extend_from_slice(b),
            (Data::I64(a), Data::I64(b)) => a.extend_from_slice(b),
            _ => {}
        }
    }

    /// Elements `start..end` (clamped: never panics).
    pub fn slice(&self, start: usize, end: usize) -> Data {
        let end = end.min(self.len());
        let range = start.min(end)..end;
        match self {
            Data::F32(v) => Data::F32(v[range].to_vec()),
            Data::F64(v) => Data::F64(v[range].to_vec()),
            Data::I32(v) => Data::I32(v[range].to_vec()),
            Data::I64(v) => Data::I64(v[range].to_vec()),
        }
    }

    /// Little-endian bytes, for cache keys.
    pub fn key_bytes(&self, out: &mut Vec<u8>) {
        match self {
            Data::F32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }
}

/// A named tensor: what requests carry in and answers carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl NamedTensor {
    /// Rows along the first (batch) dimension.
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Values per row.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The JSON encoding used for cached predictions.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "shape": self.shape,
            "datatype": self.data.dtype().oip(),
            "data": (0..self.data.len()).map(|i| self.data.json_at(i)).collect::<Vec<_>>(),
        })
    }

    /// Reads [`NamedTensor::to_json`] back (`None` for anything else).
    pub fn from_json(value: &serde_json::Value) -> Option<NamedTensor> {
        let name = value.get("name")?.as_str()?.to_owned();
        let shape = value
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()?;
        let dtype = DType::from_oip(value.get("datatype")?.as_str()?)?;
        let values = value
            .get("data")?
            .as_array()?
            .iter()
            .map(|v| v.as_f64().or(v.is_null().then_some(f64::NAN)))
            .collect::<Option<Vec<f64>>>()?;
        Some(NamedTensor {
            name,
            shape,
            data: Data::from_f64s(dtype, &values),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_extend_and_json_round_trip() {
        let mut a = Data::F32(vec![1.0, 2.0]);
        a.extend(&Data::F32(vec![3.5]));
        assert_eq!(a.slice(1, 3), Data::F32(vec![2.0, 3.5]));
        assert_eq!(a.slice(2, 9), Data::F32(vec![3.5]));
        assert_eq!(a.slice(5, 1), Data::F32(vec![]));
        let t = NamedTensor {
            name: "risk".into(),
            shape: vec![3, 1],
            data: a,
        };
        assert_eq!((t.rows(), t.row_len()), (3, 1));
        assert_eq!(NamedTensor::from_json(&t.to_json()), Some(t));
        assert!(Data::F64(vec![f64::NAN]).has_non_finite());
        assert!(!Data::I64(vec![1]).has_non_finite());
    }
}
