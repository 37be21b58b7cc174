//! The payload of a submission: a LoRA update, tensor by tensor. Decoding trusts nothing:
//! counts, names, shapes and finiteness are checked against what the run expects.

use serde::{Deserialize, Serialize};

use crate::framing::{FrameError, decode, encode};

/// Most tensors a delta may hold (a 100-layer model with 7 targets, A and B, is 1400).
pub const MAX_DELTA_TENSORS: usize = 4096;
/// Most bytes an encoded delta may take (the RPC request cap leaves room for the envelope).
pub const MAX_DELTA_BYTES: usize = crate::messages::MAX_RPC_REQUEST_BYTES - (1 << 16);

/// How the values are encoded. Only raw fp32 so far; compressed codecs come with verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    RawF32,
}

/// One tensor's update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaTensor {
    /// herd key, e.g. `model.layers.0.self_attn.q_proj.lora_B.weight`.
    pub name: String,
    pub shape: Vec<u32>,
    pub values: Vec<f32>,
}

/// A whole update `θ' − θ_r`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub codec: Codec,
    pub tensors: Vec<DeltaTensor>,
}

/// What a run expects a delta to hold, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaLayout(pub Vec<(String, Vec<u32>)>);

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DeltaError {
    #[error("{0}")]
    Frame(String),
    #[error("holds {found} tensors, expected {expected}")]
    Count { found: usize, expected: usize },
    #[error("tensor {index} is `{found}`, expected `{expected}`")]
    Name {
        index: usize,
        found: String,
        expected: String,
    },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<u32>,
        expected: Vec<u32>,
    },
    #[error("tensor `{name}` holds {found} values for shape {shape:?}")]
    Length {
        name: String,
        found: usize,
        shape: Vec<u32>,
    },
    #[error("tensor `{name}` has a non-finite value at {index}")]
    NonFinite { name: String, index: usize },
}

impl From<FrameError> for DeltaError {
    fn from(e: FrameError) -> Self {
        DeltaError::Frame(e.to_string())
    }
}

impl Delta {
    pub fn encode(&self) -> Result<Vec<u8>, DeltaError> {
        Ok(encode(self)?)
    }

    /// Decodes and checks `bytes` against `layout`: same tensors in the same order, same
    /// shapes, as many values as the shape says, all finite.
    pub fn decode(bytes: &[u8], layout: &DeltaLayout) -> Result<Self, DeltaError> {
        let delta: Delta = decode::<_, MAX_DELTA_BYTES>(bytes)?;
        if delta.tensors.len() != layout.0.len() || delta.tensors.len() > MAX_DELTA_TENSORS {
            return Err(DeltaError::Count {
                found: delta.tensors.len(),
                expected: layout.0.len(),
            });
        }
        for (index, (t, (name, shape))) in delta.tensors.iter().zip(&layout.0).enumerate() {
            if &t.name != name {
                return Err(DeltaError::Name {
                    index,
                    found: t.name.chars().take(200).collect(),
                    expected: name.clone(),
                });
            }
            if &t.shape != shape {
                return Err(DeltaError::Shape {
                    name: name.clone(),
                    found: t.shape.iter().copied().take(8).collect(),
                    expected: shape.clone(),
                });
            }
            let numel: u64 = shape.iter().map(|&d| d as u64).product();
            if t.values.len() as u64 != numel {
                return Err(DeltaError::Length {
                    name: name.clone(),
                    found: t.values.len(),
                    shape: shape.clone(),
                });
            }
            if let Some(index) = t.values.iter().position(|v| !v.is_finite()) {
                return Err(DeltaError::NonFinite {
                    name: name.clone(),
                    index,
                });
            }
        }
        Ok(delta)
    }

    /// Bytes the same values would take as dense fp32.
    pub fn dense_fp32_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.values.len() as u64 * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> DeltaLayout {
        DeltaLayout(vec![("a".into(), vec![2, 2]), ("b".into(), vec![3])])
    }

    fn delta() -> Delta {
        Delta {
            codec: Codec::RawF32,
            tensors: vec![
                DeltaTensor {
                    name: "a".into(),
                    shape: vec![2, 2],
                    values: vec![1.0, 2.0, 3.0, 4.0],
                },
                DeltaTensor {
                    name: "b".into(),
                    shape: vec![3],
                    values: vec![0.5; 3],
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_checks_layout() {
        let bytes = delta().encode().unwrap();
        assert_eq!(Delta::decode(&bytes, &layout()).unwrap(), delta());
        let mut wrong = delta();
        wrong.tensors[0].shape = vec![4, 1];
        assert!(matches!(
            Delta::decode(&wrong.encode().unwrap(), &layout()),
            Err(DeltaError::Shape { .. })
        ));
        let mut nan = delta();
        nan.tensors[1].values[2] = f32::NAN;
        assert!(matches!(
            Delta::decode(&nan.encode().unwrap(), &layout()),
            Err(DeltaError::NonFinite { index: 2, .. })
        ));
        let mut short = delta();
        short.tensors[1].values.pop();
        assert!(matches!(
            Delta::decode(&short.encode().unwrap(), &layout()),
            Err(DeltaError::Length { .. })
        ));
        let mut renamed = delta();
        renamed.tensors.swap(0, 1);
        assert!(Delta::decode(&renamed.encode().unwrap(), &layout()).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap property test: every prefix and every single-byte corruption of a valid
        // payload decodes to an error or a checked delta, never a panic.
        let bytes = delta().encode().unwrap();
        for cut in 0..bytes.len() {
            let _ = Delta::decode(&bytes[..cut], &layout());
        }
        for i in 0..bytes.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = Delta::decode(&b, &layout());
            }
        }
    }
}
