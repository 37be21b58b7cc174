//! The payload of a submission: a LoRA update, compressed tensor by tensor with the run's
//! codec, plus the sketch of the uncompressed update (see [`crate::sketch`]). Decoding trusts
//! nothing: size, codec, counts, indices and finiteness are checked against the run's layout.
//!
//! Error feedback: the sender compresses `Δ + residual` and keeps what did not travel for its
//! next delta ([`Feedback`]). If the coordinator rejects the delta, nothing of it was applied,
//! and the shard goes to someone else: the residual stays what it was before, without this Δ
//! (keeping it would count the shard twice, and a rejected node's residual would snowball).

use serde::{Deserialize, Serialize};

use crate::codec::{CodecError, CodecSpec, Values};
use crate::framing::{FrameError, decode, encode};
use crate::sketch::{count_sketch, sketch_len};

/// Most tensors a delta may hold (a 100-layer model with 7 targets, A and B, is 1400).
pub const MAX_DELTA_TENSORS: usize = 4096;
/// Most bytes an encoded delta may take (the RPC request cap leaves room for the envelope).
pub const MAX_DELTA_BYTES: usize = crate::messages::MAX_RPC_REQUEST_BYTES - (1 << 16);
/// The sketch always travels as int8 in blocks of this size.
const SKETCH_CODEC: CodecSpec = CodecSpec::DenseInt8 { block: 64 };

/// One tensor's update, dense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaTensor {
    /// herd key, e.g. `model.layers.0.self_attn.q_proj.lora_B.weight`.
    pub name: String,
    pub shape: Vec<u32>,
    pub values: Vec<f32>,
}

/// A whole update `θ' − θ_r`, dense, in layout order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub tensors: Vec<DeltaTensor>,
}

/// What a run expects a delta to hold, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaLayout(pub Vec<(String, Vec<u32>)>);

impl DeltaLayout {
    /// A delta of this layout whose values come from `value(index within its tensor)`, in
    /// layout order (for tests, fuzzing and simulated peers).
    pub fn delta_from(&self, mut value: impl FnMut(usize) -> f32) -> Delta {
        Delta {
            tensors: self
                .0
                .iter()
                .map(|(name, shape)| DeltaTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    values: (0..shape.iter().product::<u32>() as usize)
                        .map(&mut value)
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn numel(&self) -> usize {
        self.0
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as usize).product::<usize>())
            .sum()
    }

    /// Largest payload an honest node can send for this layout: raw fp32 plus framing.
    pub fn payload_cap(&self) -> usize {
        (self.numel() * 4 + self.0.len() * 16 + sketch_len(self.numel()) * 2 + 4096)
            .min(MAX_DELTA_BYTES)
    }
}

/// The wire form of a delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    pub codec: CodecSpec,
    /// In layout order; names and shapes come from the layout.
    pub tensors: Vec<Values>,
    /// Sketch of the uncompressed update, without the residual.
    pub sketch: Values,
}

/// A payload that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// What the coordinator applies: the decompressed values.
    pub delta: Delta,
    /// The node's sketch of its uncompressed update.
    pub sketch: Vec<f32>,
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DeltaError {
    #[error("payload of {bytes} bytes exceeds the cap of {cap} bytes")]
    TooLarge { bytes: usize, cap: usize },
    #[error("{0}")]
    Frame(String),
    #[error("holds {found} tensors, expected {expected}")]
    Count { found: usize, expected: usize },
    #[error("{0}")]
    Codec(CodecError),
    #[error("tensor `{name}`: {error}")]
    Tensor { name: String, error: CodecError },
    #[error("sketch: {0}")]
    Sketch(CodecError),
}

impl DeltaError {
    /// Whether the payload was refused for NaN or infinite values (its own reject reason).
    pub fn is_non_finite(&self) -> bool {
        matches!(
            self,
            DeltaError::Tensor {
                error: CodecError::NonFinite(_),
                ..
            } | DeltaError::Sketch(CodecError::NonFinite(_))
        )
    }
}

impl From<FrameError> for DeltaError {
    fn from(e: FrameError) -> Self {
        DeltaError::Frame(e.to_string())
    }
}

/// A delta ready to send and what to keep as the residual afterwards.
#[derive(Debug, Clone)]
pub struct Feedback {
    /// The bytes to submit.
    pub payload: Vec<u8>,
    /// `Δ + residual`, per tensor.
    total: Vec<Vec<f32>>,
    /// The residual before this delta.
    previous: Vec<Vec<f32>>,
    /// What the coordinator will decode, per tensor.
    sent: Vec<Vec<f32>>,
}

impl Feedback {
    /// The residual to keep once the delta was accepted: what did not travel.
    pub fn residual_if_accepted(&self) -> Vec<Vec<f32>> {
        self.total
            .iter()
            .zip(&self.sent)
            .map(|(t, s)| t.iter().zip(s).map(|(t, s)| t - s).collect())
            .collect()
    }

    /// The residual to keep when it was rejected or lost: the one from before.
    pub fn residual_if_rejected(self) -> Vec<Vec<f32>> {
        self.previous
    }
}

impl Delta {
    /// Encodes `self + residual` with `codec` and the sketch of `self` under `sketch_seed`.
    /// A residual of another shape (another run, another layout) is ignored.
    pub fn encode(
        &self,
        codec: CodecSpec,
        residual: Option<&[Vec<f32>]>,
        sketch_seed: u64,
    ) -> Result<Feedback, DeltaError> {
        codec.validate().map_err(DeltaError::Codec)?;
        let residual = residual.filter(|r| {
            r.len() == self.tensors.len()
                && r.iter()
                    .zip(&self.tensors)
                    .all(|(r, t)| r.len() == t.values.len())
        });
        let total: Vec<Vec<f32>> = match residual {
            Some(r) => self
                .tensors
                .iter()
                .zip(r)
                .map(|(t, r)| t.values.iter().zip(r).map(|(v, r)| v + r).collect())
                .collect(),
            None => self.tensors.iter().map(|t| t.values.clone()).collect(),
        };
        let (tensors, sent): (Vec<Values>, Vec<Vec<f32>>) = total
            .iter()
            .enumerate()
            .map(|(i, values)| Values::compress(values, codec, tensor_seed(sketch_seed, i)))
            .unzip();
        let sketch = count_sketch(
            self.tensors.iter().map(|t| t.values.as_slice()),
            sketch_seed,
        );
        let payload = Payload {
            codec,
            tensors,
            sketch: Values::compress(&sketch, SKETCH_CODEC, 0).0,
        };
        Ok(Feedback {
            payload: encode(&payload)?,
            previous: residual.map_or_else(Vec::new, <[Vec<f32>]>::to_vec),
            total,
            sent,
        })
    }

    /// Decodes and checks `bytes` against `layout`, the run's `codec` and the lease's `seed`:
    /// size within the layout's cap, the same codec, as many tensors as the layout, each with
    /// exactly the values its shape and the codec allow, all finite; a sketch of the right
    /// length.
    pub fn decode(
        bytes: &[u8],
        layout: &DeltaLayout,
        codec: CodecSpec,
        seed: u64,
    ) -> Result<Decoded, DeltaError> {
        let cap = layout.payload_cap();
        if bytes.len() > cap {
            return Err(DeltaError::TooLarge {
                bytes: bytes.len(),
                cap,
            });
        }
        let payload: Payload = decode::<_, MAX_DELTA_BYTES>(bytes)?;
        if payload.codec != codec {
            return Err(DeltaError::Codec(CodecError::Spec(format!(
                "sent with {}, but the run uses {codec}",
                payload.codec
            ))));
        }
        if payload.tensors.len() != layout.0.len() || payload.tensors.len() > MAX_DELTA_TENSORS {
            return Err(DeltaError::Count {
                found: payload.tensors.len(),
                expected: layout.0.len(),
            });
        }
        let mut tensors = Vec::with_capacity(layout.0.len());
        for (i, (values, (name, shape))) in payload.tensors.iter().zip(&layout.0).enumerate() {
            let numel = shape.iter().map(|&d| d as usize).product();
            let values = values
                .decompress(codec, numel, tensor_seed(seed, i))
                .map_err(|error| DeltaError::Tensor {
                    name: name.clone(),
                    error,
                })?;
            tensors.push(DeltaTensor {
                name: name.clone(),
                shape: shape.clone(),
                values,
            });
        }
        let sketch = payload
            .sketch
            .decompress(SKETCH_CODEC, sketch_len(layout.numel()), 0)
            .map_err(DeltaError::Sketch)?;
        Ok(Decoded {
            delta: Delta { tensors },
            sketch,
        })
    }

    /// Bytes the same values would take as dense fp32.
    pub fn dense_fp32_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.values.len() as u64 * 4).sum()
    }

    /// Global L2 norm.
    pub fn norm(&self) -> f64 {
        self.tensors
            .iter()
            .flat_map(|t| &t.values)
            .map(|&v| v as f64 * v as f64)
            .sum::<f64>()
            .sqrt()
    }

    /// The sketch of these values under `seed` (what an honest node sends for them).
    pub fn sketch(&self, seed: u64) -> Vec<f32> {
        count_sketch(self.tensors.iter().map(|t| t.values.as_slice()), seed)
    }

    /// `self · factor`, for tests and attack simulations.
    pub fn scaled(&self, factor: f32) -> Delta {
        Delta {
            tensors: self
                .tensors
                .iter()
                .map(|t| DeltaTensor {
                    values: t.values.iter().map(|v| v * factor).collect(),
                    ..t.clone()
                })
                .collect(),
        }
    }
}

/// The codec seed of tensor `i` of a delta whose lease seed is `seed`.
fn tensor_seed(seed: u64, i: usize) -> u64 {
    crate::sketch::splitmix64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

#[cfg(test)]
mod tests;
