//! A small linear fingerprint of a raw delta (a CountSketch, Charikar et al. 2002), sent with
//! every submission so a replay can be compared with what the node actually trained.
//!
//! Why not compare with the payload itself: with error feedback the payload is
//! `compress(Δ + residual)`, and the residual is the node's private history. The sketch is of
//! `Δ` alone, so an honest node's sketch matches the coordinator's replay up to floating-point
//! noise, whatever its residual holds. Each value lands in one of `m` buckets with a random sign
//! (both from the lease's seed), so inner products, norms and cosines are preserved in
//! expectation, with an error of about `1/sqrt(m)` of the norms.

/// Buckets for a delta of `numel` values: one per 256 values, between 64 and 4096.
pub fn sketch_len(numel: usize) -> usize {
    (numel / 256).clamp(64, 4096)
}

/// The sketch of `tensors` (in layout order, as if concatenated) under `seed`.
pub fn count_sketch<'a>(tensors: impl IntoIterator<Item = &'a [f32]>, seed: u64) -> Vec<f32> {
    let tensors: Vec<&[f32]> = tensors.into_iter().collect();
    let m = sketch_len(tensors.iter().map(|t| t.len()).sum());
    let mut out = vec![0.0f64; m];
    let mut index: u64 = 0;
    for t in tensors {
        for &v in t {
            let h = splitmix64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let bucket = ((h >> 1) % m as u64) as usize;
            let sign = if h & 1 == 0 { 1.0 } else { -1.0 };
            out[bucket] += sign * v as f64;
            index += 1;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// How close a submitted sketch is to a reference (the replay's).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    pub cosine: f64,
    /// `‖submitted − reference‖ / ‖reference‖`.
    pub rel_error: f64,
}

/// Cosine and relative error of `submitted` against `reference` (equal lengths).
pub fn agreement(submitted: &[f32], reference: &[f32]) -> Agreement {
    let (mut dot, mut ns, mut nr, mut nd) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&s, &r) in submitted.iter().zip(reference) {
        let (s, r) = (s as f64, r as f64);
        dot += s * r;
        ns += s * s;
        nr += r * r;
        nd += (s - r) * (s - r);
    }
    let cosine = if ns > 0.0 && nr > 0.0 {
        dot / (ns.sqrt() * nr.sqrt())
    } else {
        0.0
    };
    let rel_error = if nr > 0.0 {
        (nd / nr).sqrt()
    } else {
        f64::INFINITY
    };
    Agreement { cosine, rel_error }
}

/// Steele et al.'s SplitMix64 finaliser: a fast, well-mixed hash of a 64-bit word.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, phase: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37 + phase).sin()).collect()
    }

    #[test]
    fn sketch_is_linear_and_seeded() {
        let a = wave(5000, 0.0);
        let b = wave(5000, 1.0);
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let (sa, sb, ss) = (
            count_sketch([a.as_slice()], 7),
            count_sketch([b.as_slice()], 7),
            count_sketch([sum.as_slice()], 7),
        );
        for i in 0..sa.len() {
            assert!((sa[i] + sb[i] - ss[i]).abs() < 1e-3);
        }
        assert_ne!(sa, count_sketch([a.as_slice()], 8));
        // Splitting into tensors does not change the sketch.
        assert_eq!(sa, count_sketch([&a[..1000], &a[1000..]], 7));
    }

    #[test]
    fn sketch_separates_close_and_unrelated_deltas() {
        let n = 20_000;
        let honest = wave(n, 0.0);
        let noisy: Vec<f32> = honest
            .iter()
            .enumerate()
            .map(|(i, v)| v + 1e-3 * ((i * 7919 % 13) as f32 - 6.0))
            .collect();
        let other = wave(n, 2.0);
        let reference = count_sketch([honest.as_slice()], 1);
        let close = agreement(&count_sketch([noisy.as_slice()], 1), &reference);
        let far = agreement(&count_sketch([other.as_slice()], 1), &reference);
        assert!(close.cosine > 0.999 && close.rel_error < 0.01, "{close:?}");
        assert!(far.cosine < 0.9 && far.rel_error > 0.3, "{far:?}");
        let zero = agreement(&vec![0.0; reference.len()], &reference);
        assert_eq!(zero.cosine, 0.0);
        assert!((zero.rel_error - 1.0).abs() < 1e-9);
    }
}
