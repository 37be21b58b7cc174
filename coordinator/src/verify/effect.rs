//! Layer 3: what the delta does, applied alone to θ_r at the weight it would have in the
//! update (`outer_lr / quorum`). The loss on a sample of the shard's own examples must move by
//! at least a fraction of the drop the node claims, less a noise allowance, and the loss on a
//! fixed sample of the held-out set must not rise past a threshold: a delta that does harm
//! fails here.
//!
//! Why only harm, not "must drop": with error feedback the payload is
//! `compress(Δ + residual)`, and the residual carries what earlier rounds did not send. That
//! sum need not lower this shard's loss even when Δ does (measured: honest deltas raising the
//! shard loss by 0.4% mid-run). Whether Δ itself was honestly trained is the replay's
//! question, which recomputes it.
//!
//! Why scaled: a single delta at full size is one node's whole step, and with error feedback
//! it also carries what earlier rounds did not send. Late in a run such a step overshoots on
//! its own (measured: honest deltas then raise the shard loss), while at the weight it enters
//! the average it still points downhill. The test is of direction, not of step size; the norm
//! bound and the replay cover size.

use herd_model::Llama;
use herd_model::data::Example;
use herd_model::eval::evaluate;
use herd_model::lora::Lora;
use herd_protocol::delta::Delta;
use herd_protocol::messages::RejectReason;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tch::Tensor;

/// Batch size of the evaluation passes.
const EVAL_BATCH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EffectConfig {
    /// The delta is applied times this (`outer_lr / quorum`).
    pub scale: f64,
    pub min_fraction: f64,
    /// The noise allowance: the shard loss may end up this fraction of itself above what the
    /// claim requires (and so may rise by at most this much).
    pub shard_max_rise: f64,
    pub heldout_max_rise: f64,
}

/// The losses behind an effect verdict (logged with it).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EffectReport {
    pub shard_before: f64,
    pub shard_after: f64,
    /// `loss_before − loss_after` as the node reported it (for the whole delta).
    pub claimed_drop: f64,
    /// How much of the delta was applied.
    pub scale: f64,
    pub heldout_before: f64,
    pub heldout_after: f64,
}

/// Up to `n` of the shard's example indices, drawn with `seed` (the node cannot know which).
pub fn shard_sample(indices: &[usize], n: usize, seed: u64) -> Vec<usize> {
    let mut v = indices.to_vec();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6566_6665_6374); // "effect"
    v.shuffle(&mut rng);
    v.truncate(n);
    v
}

/// `theta + scale · delta`, as a separate adapter.
pub fn apply(model: &Llama, theta: &Lora, delta: &Delta, scale: f64) -> herd_model::Result<Lora> {
    let lora = theta.try_clone(model.config())?;
    for t in &delta.tensors {
        let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let values = Tensor::from_slice(&t.values).reshape(&shape) * scale;
        lora.add_to_factor(&t.name, &values)?;
    }
    Ok(lora)
}

/// Losses of θ_r and of `θ_r + scale · delta`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Losses {
    pub shard_before: f64,
    pub shard_after: f64,
    pub heldout_after: f64,
}

/// Evaluates the shard sample before and after, and the held-out set after (its loss before
/// is the round's, computed once).
pub fn measure(
    model: &Llama,
    theta: &Lora,
    delta: &Delta,
    scale: f64,
    shard: &[&Example],
    heldout: &[&Example],
) -> herd_model::Result<Losses> {
    let after = apply(model, theta, delta, scale)?;
    Ok(Losses {
        shard_before: evaluate(model, Some(theta), shard, EVAL_BATCH)?.loss,
        shard_after: evaluate(model, Some(&after), shard, EVAL_BATCH)?.loss,
        heldout_after: evaluate(model, Some(&after), heldout, EVAL_BATCH)?.loss,
    })
}

/// The verdict of this layer on `r`.
pub fn judge(r: &EffectReport, cfg: &EffectConfig) -> Result<(), RejectReason> {
    let measured = r.shard_before - r.shard_after;
    let required =
        cfg.min_fraction * r.scale * r.claimed_drop.max(0.0) - cfg.shard_max_rise * r.shard_before;
    if measured.is_nan() || measured < required {
        return Err(RejectReason::NoImprovement { measured, required });
    }
    let bound = r.heldout_before * (1.0 + cfg.heldout_max_rise);
    if r.heldout_after.is_nan() || r.heldout_after > bound {
        return Err(RejectReason::HeldoutRegression {
            before: r.heldout_before,
            after: r.heldout_after,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(shard_after: f64, claimed: f64, heldout_after: f64) -> EffectReport {
        EffectReport {
            shard_before: 2.0,
            shard_after,
            claimed_drop: claimed,
            scale: 1.0,
            heldout_before: 3.0,
            heldout_after,
        }
    }

    #[test]
    fn judges_drop_against_the_claim_and_the_heldout_rise() {
        let cfg = EffectConfig {
            scale: 1.0,
            min_fraction: 0.1,
            shard_max_rise: 0.01,
            heldout_max_rise: 0.02,
        };
        assert!(judge(&report(1.5, 1.0, 2.9), &cfg).is_ok());
        // Required: 0.1 × 1.0 (claimed) − 0.01 × 2.0 (allowance) = 0.08 of drop.
        assert!(judge(&report(1.92, 1.0, 2.9), &cfg).is_ok());
        for after in [1.93, 2.0, 2.5, f64::NAN] {
            assert!(matches!(
                judge(&report(after, 1.0, 2.9), &cfg),
                Err(RejectReason::NoImprovement { .. })
            ));
        }
        // No claim: a little noise either way passes, a rise past 1% of the loss does not.
        assert!(judge(&report(2.01, 0.0, 2.9), &cfg).is_ok());
        assert!(judge(&report(2.019, -1.0, 2.9), &cfg).is_ok());
        assert!(judge(&report(2.03, 0.0, 2.9), &cfg).is_err());
        assert!(matches!(
            judge(&report(1.5, 1.0, 3.1), &cfg),
            Err(RejectReason::HeldoutRegression { .. })
        ));
        let sample = shard_sample(&(0..100).collect::<Vec<_>>(), 10, 3);
        assert_eq!(sample.len(), 10);
        assert_eq!(sample, shard_sample(&(0..100).collect::<Vec<_>>(), 10, 3));
        assert_ne!(sample, shard_sample(&(0..100).collect::<Vec<_>>(), 10, 4));
    }
}
