//! Layer 2: what the payload is, without running the model: it decodes within the layout's
//! cap with the run's codec, every value is finite, it is not all zeros, its norm is within a
//! multiple of the running median of accepted norms, it points where its sketch says, and it is
//! not a byte-for-byte copy of a submission for another shard. (The same shard trained again after a reissue gives the same
//! bytes when the training is deterministic: that is honest, and exactly what replays expect.)

use std::collections::{HashMap, VecDeque};

use herd_protocol::codec::CodecSpec;
use herd_protocol::delta::{Decoded, Delta, DeltaError, DeltaLayout};
use herd_protocol::messages::RejectReason;
use herd_protocol::sketch::agreement;
use herd_protocol::{ContentId, Round, ShardId};

use crate::aggregate::median;
use crate::config::VerifySection;

/// Accepted norms the median is taken over.
const NORM_WINDOW: usize = 64;
/// Accepted norms needed before the norm bound applies (until then, effect and replay guard).
const NORM_WARMUP: usize = 3;

/// A payload that passed this layer.
#[derive(Debug)]
pub struct Checked {
    pub decoded: Decoded,
    pub norm: f64,
    /// Cosine between the sketch of the payload and the sketch the node sent.
    pub sketch_cosine: f64,
}

/// Run-wide memory of this layer: recent accepted norms and payload hashes seen.
#[derive(Debug, Default, PartialEq)]
pub struct StructureState {
    norms: VecDeque<f64>,
    /// Payload hash → the (round, shard) it was first submitted for.
    seen: HashMap<ContentId, (Round, ShardId)>,
}

impl StructureState {
    /// The norm bound now, if enough deltas were accepted to have one.
    pub fn norm_bound(&self, multiple: f64) -> Option<f64> {
        let norms: Vec<f64> = self.norms.iter().copied().collect();
        (norms.len() >= NORM_WARMUP).then(|| multiple * median(&norms))
    }

    /// Remembers an accepted delta's norm.
    pub fn accepted(&mut self, norm: f64) {
        if self.norms.len() == NORM_WINDOW {
            self.norms.pop_front();
        }
        self.norms.push_back(norm);
    }

    /// Remembers that `hash` was submitted for `(round, shard)` (rebuilding after a restart).
    pub fn remember(&mut self, hash: ContentId, at: (Round, ShardId)) {
        self.seen.entry(hash).or_insert(at);
    }

    /// Checks `payload` (already hash-checked as `hash`) for shard `shard` of `round`, whose
    /// lease seed is `seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &mut self,
        (round, shard): (Round, ShardId),
        seed: u64,
        hash: ContentId,
        payload: &[u8],
        layout: &DeltaLayout,
        codec: CodecSpec,
        rules: &VerifySection,
    ) -> Result<Checked, RejectReason> {
        let decoded = Delta::decode(payload, layout, codec, seed).map_err(|e| match e {
            DeltaError::TooLarge { bytes, cap } => RejectReason::PayloadTooLarge {
                bytes: bytes as u64,
                cap: cap as u64,
            },
            e if e.is_non_finite() => RejectReason::NonFinite(e.to_string()),
            e => RejectReason::Malformed(e.to_string()),
        })?;
        let norm = decoded.delta.norm();
        if norm == 0.0 {
            return Err(RejectReason::ZeroDelta);
        }
        // A copy: the same bytes were submitted for another shard.
        match self.seen.get(&hash) {
            Some(first) if *first != (round, shard) => return Err(RejectReason::CopiedDelta),
            _ => {
                self.seen.insert(hash, (round, shard));
            }
        }
        if let Some(bound) = self.norm_bound(rules.norm_multiple)
            && norm > bound
        {
            return Err(RejectReason::NormTooLarge { norm, bound });
        }
        // The replay vouches for the raw Δ through the sketch; this ties the payload to it.
        // With error feedback the payload is compress(Δ + residual), so honest cosines are
        // well below 1 but not below 0, except by the sketch's own error (docs/checking.md
        // has the measured ones).
        let sketch_cosine = agreement(&decoded.delta.sketch(seed), &decoded.sketch).cosine;
        let min = -rules.sketch_noise_margin / (decoded.sketch.len().max(1) as f64).sqrt();
        if sketch_cosine < min || sketch_cosine.is_nan() {
            return Err(RejectReason::OffSketch {
                cosine: sketch_cosine,
                min,
            });
        }
        Ok(Checked {
            decoded,
            norm,
            sketch_cosine,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_protocol::delta::DeltaTensor;

    fn layout() -> DeltaLayout {
        DeltaLayout(vec![("t".into(), vec![100])])
    }

    fn payload(values: Vec<f32>) -> Vec<u8> {
        Delta {
            tensors: vec![DeltaTensor {
                name: "t".into(),
                shape: vec![100],
                values,
            }],
        }
        .encode(CodecSpec::RawF32, None, 1)
        .unwrap()
        .payload
    }

    fn check(state: &mut StructureState, shard: u32, p: &[u8]) -> Result<Checked, RejectReason> {
        state.check(
            (Round(0), ShardId(shard)),
            1,
            ContentId::of(p),
            p,
            &layout(),
            CodecSpec::RawF32,
            &VerifySection::default(),
        )
    }

    #[test]
    fn each_structural_fault_has_its_reason() {
        let mut s = StructureState::default();
        let honest = payload(vec![0.1; 100]);
        assert!(check(&mut s, 1, &honest).is_ok());
        // The same shard again is honest (deterministic retraining); another shard's is a copy.
        assert!(check(&mut s, 1, &honest).is_ok());
        assert_eq!(
            check(&mut s, 2, &honest).unwrap_err(),
            RejectReason::CopiedDelta
        );
        assert_eq!(
            check(&mut s, 3, &payload(vec![0.0; 100])).unwrap_err(),
            RejectReason::ZeroDelta
        );
        assert!(matches!(
            check(&mut s, 4, &payload(vec![f32::NAN; 100])).unwrap_err(),
            RejectReason::NonFinite(_)
        ));
        assert!(matches!(
            check(&mut s, 5, &payload(vec![0.1; 99])).unwrap_err(),
            RejectReason::Malformed(_)
        ));
        assert!(matches!(
            check(&mut s, 6, &vec![0u8; 10_000]).unwrap_err(),
            RejectReason::PayloadTooLarge { .. }
        ));
        // No bound until three norms are known; then 4 × the median.
        assert_eq!(s.norm_bound(4.0), None);
        for _ in 0..3 {
            s.accepted(1.0);
        }
        assert_eq!(s.norm_bound(4.0), Some(4.0));
        // 0.5 × 10 = 5 > 4.
        assert!(matches!(
            check(&mut s, 7, &payload(vec![0.5; 100])).unwrap_err(),
            RejectReason::NormTooLarge { .. }
        ));
        assert!(check(&mut s, 8, &payload(vec![0.3; 100])).is_ok());
    }

    #[test]
    fn a_payload_must_point_where_its_sketch_says() {
        let mut s = StructureState::default();
        let honest: Vec<f32> = (0..100)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 50.0)
            .collect();
        let checked = check(&mut s, 1, &payload(honest.clone())).unwrap();
        assert!(checked.sketch_cosine > 0.99, "{}", checked.sketch_cosine);
        // The honest sketch on the payload × −1 (what a replay alone would pass).
        let flipped: Vec<f32> = honest.iter().map(|v| -v).collect();
        let mut forged: herd_protocol::delta::Payload =
            herd_protocol::framing::decode::<_, { 1 << 20 }>(&payload(flipped)).unwrap();
        let honest_payload: herd_protocol::delta::Payload =
            herd_protocol::framing::decode::<_, { 1 << 20 }>(&payload(honest)).unwrap();
        forged.sketch = honest_payload.sketch;
        let forged = herd_protocol::framing::encode(&forged).unwrap();
        assert!(matches!(
            check(&mut s, 2, &forged).unwrap_err(),
            RejectReason::OffSketch { cosine, .. } if cosine < -0.99
        ));
    }
}
