//! How one tensor's values travel: signs of a seeded random subset of blocks with one scale
//! per block (~1 bit per value sent), top-k by magnitude (blockwise int8 values, LEB128
//! delta-encoded indices), dense blockwise int8, or raw fp32 (for tests and baselines).
//!
//! Names and shapes never travel: both sides know the run's layout, so a tensor is only its
//! values. Decoding trusts nothing: every count, index and scale is checked against the
//! expected number of values before anything is allocated for it.

use serde::{Deserialize, Serialize};

/// Largest quantization block accepted.
pub const MAX_BLOCK: u32 = 1 << 16;

/// A run's choice of codec, sent to nodes in each lease.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum CodecSpec {
    /// Uncompressed fp32: for tests and as the baseline of benchmarks.
    RawF32,
    /// Every value, int8 with one absmax scale per `block` values (~3.9× smaller).
    DenseInt8 { block: u32 },
    /// The `fraction` of values largest in magnitude, int8 per `block` kept values, with
    /// their positions as LEB128 gaps. What is not sent stays in the node's residual.
    TopK { fraction: f32, block: u32 },
    /// One bit per value (its sign) and one scale (the mean magnitude) per block, for a
    /// random `keep` fraction of each tensor's blocks drawn from the lease's seed, so
    /// positions cost nothing; the other blocks wait in the residual (EF-signSGD, Karimireddy et al. 2019,
    /// with random-k sparsification, Stich et al. 2018).
    Sign { keep: f32, block: u32 },
}

impl Default for CodecSpec {
    /// Signs of 70% of the blocks: ~35× smaller than fp32 on the embedded default's adapter,
    /// with a held-out loss close to the uncompressed run's (figures in the README).
    fn default() -> Self {
        CodecSpec::Sign {
            keep: 0.7,
            block: 256,
        }
    }
}

impl std::fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecSpec::RawF32 => f.write_str("raw"),
            CodecSpec::DenseInt8 { block } => write!(f, "int8:{block}"),
            CodecSpec::TopK { fraction, block } => write!(f, "topk:{fraction}:{block}"),
            CodecSpec::Sign { keep, block } => write!(f, "sign:{keep}:{block}"),
        }
    }
}

impl std::str::FromStr for CodecSpec {
    type Err = CodecError;

    /// `raw`, `int8[:block]`, `topk[:fraction[:block]]`, `sign[:keep[:block]]`.
    fn from_str(s: &str) -> Result<Self, CodecError> {
        let bad = || {
            CodecError::Spec(format!(
                "`{s}`: expected raw, int8[:BLOCK], topk[:FRACTION[:BLOCK]] or sign[:KEEP[:BLOCK]]"
            ))
        };
        let mut parts = s.split(':');
        // The next `:`-separated field, or `default` when there is none.
        fn field<T: std::str::FromStr>(part: Option<&str>, default: T) -> Option<T> {
            part.map_or(Some(default), |p| p.parse().ok())
        }
        let spec = match parts.next() {
            Some("raw") => Some(CodecSpec::RawF32),
            Some("int8") => field(parts.next(), 64).map(|block| CodecSpec::DenseInt8 { block }),
            Some("topk") => field(parts.next(), 0.04)
                .zip(field(parts.next(), 64))
                .map(|(fraction, block)| CodecSpec::TopK { fraction, block }),
            Some("sign") => field(parts.next(), 0.7)
                .zip(field(parts.next(), 256))
                .map(|(keep, block)| CodecSpec::Sign { keep, block }),
            _ => None,
        }
        .ok_or_else(bad)?;
        if parts.next().is_some() {
            return Err(bad());
        }
        spec.validate()?;
        Ok(spec)
    }
}

impl CodecSpec {
    /// Refuses blocks outside `1..=MAX_BLOCK` and fractions outside `(0, 1]`.
    pub fn validate(&self) -> Result<(), CodecError> {
        let block = match *self {
            CodecSpec::RawF32 => return Ok(()),
            CodecSpec::DenseInt8 { block } => block,
            CodecSpec::TopK {
                fraction: share,
                block,
            }
            | CodecSpec::Sign { keep: share, block } => {
                if !(share > 0.0 && share <= 1.0) {
                    return Err(CodecError::Spec(format!(
                        "fraction {share} is not in (0, 1]"
                    )));
                }
                block
            }
        };
        if block == 0 || block > MAX_BLOCK {
            return Err(CodecError::Spec(format!(
                "block {block} is not in 1..={MAX_BLOCK}"
            )));
        }
        Ok(())
    }

    /// How many of `numel` values top-k keeps (at least one of a non-empty tensor).
    pub fn kept(&self, numel: usize) -> usize {
        match *self {
            CodecSpec::TopK { fraction, .. } => {
                // Rounded, not ceiled: 0.1f32 is a hair above 0.1 and must keep 100 of 1000.
                ((numel as f64 * fraction as f64).round() as usize).clamp(numel.min(1), numel)
            }
            _ => numel,
        }
    }
}

/// One tensor's values on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Values {
    Raw(Vec<f32>),
    DenseInt8 {
        scales: Vec<f32>,
        q: Vec<i8>,
    },
    Sparse {
        /// First index, then `next − previous − 1` for each following one, as LEB128.
        gaps: Vec<u8>,
        scales: Vec<f32>,
        q: Vec<i8>,
    },
    Signs {
        /// One per chosen block.
        scales: Vec<f32>,
        /// One bit per value of the chosen blocks (1 = negative), LSB first, zero-padded.
        bits: Vec<u8>,
    },
}

/// Why values were refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum CodecError {
    #[error("codec: {0}")]
    Spec(String),
    #[error("sent as {found}, but the run uses {expected}")]
    WrongCodec {
        found: &'static str,
        expected: String,
    },
    #[error("{found} values, expected {expected}")]
    Count { found: usize, expected: usize },
    #[error("{found} scales for {values} values in blocks of {block}")]
    Scales {
        found: usize,
        values: usize,
        block: u32,
    },
    #[error("a non-finite value or scale at {0}")]
    NonFinite(usize),
    #[error("a negative scale at block {0}")]
    NegativeScale(usize),
    #[error("index {index} is outside {numel} values")]
    Index { index: u64, numel: usize },
    #[error("indices are truncated or overlong")]
    Varint,
}

impl Values {
    fn kind(&self) -> &'static str {
        match self {
            Values::Raw(_) => "raw",
            Values::DenseInt8 { .. } => "int8",
            Values::Sparse { .. } => "topk",
            Values::Signs { .. } => "sign",
        }
    }

    /// Encodes `values` with `spec` (`seed` draws the blocks `Sign` sends; both sides know
    /// it). Returns what travels and what the receiver will decode from it, so the sender can
    /// keep the difference as its error-feedback residual.
    pub fn compress(values: &[f32], spec: CodecSpec, seed: u64) -> (Values, Vec<f32>) {
        match spec {
            CodecSpec::Sign { keep, block } => {
                let mut decoded = vec![0.0; values.len()];
                let mut scales = Vec::new();
                let mut bits = Vec::new();
                let mut n = 0usize;
                for b in chosen_blocks(values.len(), block, keep, seed) {
                    let range = block_range(b, block, values.len());
                    let chunk = &values[range.clone()];
                    let scale = (chunk.iter().map(|v| v.abs() as f64).sum::<f64>()
                        / chunk.len() as f64) as f32;
                    scales.push(scale);
                    for (v, out) in chunk.iter().zip(&mut decoded[range]) {
                        if n.is_multiple_of(8) {
                            bits.push(0u8);
                        }
                        if *v < 0.0 {
                            *bits.last_mut().expect("pushed above") |= 1 << (n % 8);
                            *out = -scale;
                        } else {
                            *out = scale;
                        }
                        n += 1;
                    }
                }
                (Values::Signs { scales, bits }, decoded)
            }
            CodecSpec::RawF32 => (Values::Raw(values.to_vec()), values.to_vec()),
            CodecSpec::DenseInt8 { block } => {
                let (scales, q) = quantize(values, block);
                let decoded = dequantize(&scales, &q, block);
                (Values::DenseInt8 { scales, q }, decoded)
            }
            CodecSpec::TopK { block, .. } => {
                let k = spec.kept(values.len());
                let mut order: Vec<u32> = (0..values.len() as u32).collect();
                if k < values.len() {
                    order.select_nth_unstable_by(k, |&a, &b| {
                        values[b as usize]
                            .abs()
                            .total_cmp(&values[a as usize].abs())
                    });
                    order.truncate(k);
                }
                order.sort_unstable();
                let kept: Vec<f32> = order.iter().map(|&i| values[i as usize]).collect();
                let (scales, q) = quantize(&kept, block);
                let mut decoded = vec![0.0; values.len()];
                for (&i, v) in order.iter().zip(dequantize(&scales, &q, block)) {
                    decoded[i as usize] = v;
                }
                let mut gaps = Vec::with_capacity(k * 2);
                let mut next = 0u32;
                for &i in &order {
                    write_leb128(&mut gaps, (i - next) as u64);
                    next = i + 1;
                }
                (Values::Sparse { gaps, scales, q }, decoded)
            }
        }
    }

    /// Decodes `numel` values sent with `spec` and `seed`, checking everything against them
    /// first.
    pub fn decompress(
        &self,
        spec: CodecSpec,
        numel: usize,
        seed: u64,
    ) -> Result<Vec<f32>, CodecError> {
        let wrong = || CodecError::WrongCodec {
            found: self.kind(),
            expected: spec.to_string(),
        };
        match (self, spec) {
            (Values::Raw(v), CodecSpec::RawF32) => {
                check_count(v.len(), numel)?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(CodecError::NonFinite(i));
                }
                Ok(v.clone())
            }
            (Values::DenseInt8 { scales, q }, CodecSpec::DenseInt8 { block }) => {
                check_count(q.len(), numel)?;
                check_scales(scales, q.len(), block)?;
                Ok(dequantize(scales, q, block))
            }
            (Values::Sparse { gaps, scales, q }, CodecSpec::TopK { block, .. }) => {
                // A sparse tensor holds exactly as many values as top-k keeps: no more
                // (that would be a dense update in disguise), no fewer than one.
                check_count(q.len(), spec.kept(numel))?;
                check_scales(scales, q.len(), block)?;
                let mut out = vec![0.0f32; numel];
                let mut cursor = 0usize;
                let mut next: u64 = 0;
                for v in dequantize(scales, q, block) {
                    let gap = read_leb128(gaps, &mut cursor)?;
                    let index = next.checked_add(gap).ok_or(CodecError::Varint)?;
                    if index >= numel as u64 {
                        return Err(CodecError::Index { index, numel });
                    }
                    out[index as usize] = v;
                    next = index + 1;
                }
                if cursor != gaps.len() {
                    return Err(CodecError::Varint);
                }
                Ok(out)
            }
            (Values::Signs { scales, bits }, CodecSpec::Sign { keep, block }) => {
                let chosen = chosen_blocks(numel, block, keep, seed);
                if scales.len() != chosen.len() {
                    return Err(CodecError::Scales {
                        found: scales.len(),
                        values: numel,
                        block,
                    });
                }
                let sent: usize = chosen
                    .iter()
                    .map(|&b| block_range(b, block, numel).len())
                    .sum();
                check_count(bits.len(), sent.div_ceil(8))?;
                // Padding bits must be zero: one encoding per delta.
                if !sent.is_multiple_of(8)
                    && bits.last().is_some_and(|&last| last >> (sent % 8) != 0)
                {
                    return Err(CodecError::Count {
                        found: bits.len() * 8,
                        expected: sent,
                    });
                }
                check_scales(scales, scales.len(), 1)?;
                let mut out = vec![0.0f32; numel];
                let mut n = 0usize;
                for (&b, &scale) in chosen.iter().zip(scales) {
                    for v in &mut out[block_range(b, block, numel)] {
                        let negative = bits[n / 8] >> (n % 8) & 1 == 1;
                        *v = if negative { -scale } else { scale };
                        n += 1;
                    }
                }
                Ok(out)
            }
            _ => Err(wrong()),
        }
    }
}

/// The blocks of a `numel`-value tensor that `Sign` sends under `seed`, in order: exactly
/// `round(keep × blocks)` of them (at least one), ranked by a seeded hash, so every delta of a
/// layout has the same size.
fn chosen_blocks(numel: usize, block: u32, keep: f32, seed: u64) -> Vec<usize> {
    let blocks = numel.div_ceil(block as usize);
    let count = ((blocks as f64 * keep as f64).round() as usize).clamp(blocks.min(1), blocks);
    let rank =
        |b: usize| crate::sketch::splitmix64(seed ^ (b as u64).wrapping_mul(0xa076_1d64_78bd_642f));
    let mut order: Vec<usize> = (0..blocks).collect();
    order.sort_unstable_by_key(|&b| rank(b));
    order.truncate(count);
    order.sort_unstable();
    order
}

fn block_range(b: usize, block: u32, numel: usize) -> std::ops::Range<usize> {
    let start = b * block as usize;
    start..(start + block as usize).min(numel)
}

fn check_count(found: usize, expected: usize) -> Result<(), CodecError> {
    if found != expected {
        return Err(CodecError::Count { found, expected });
    }
    Ok(())
}

fn check_scales(scales: &[f32], values: usize, block: u32) -> Result<(), CodecError> {
    if scales.len() != values.div_ceil(block as usize) {
        return Err(CodecError::Scales {
            found: scales.len(),
            values,
            block,
        });
    }
    for (i, s) in scales.iter().enumerate() {
        // A finite scale so large that q × scale overflows (|q| ≤ 128 on the wire) would
        // decode to infinity (the fuzz targets assert every decoded value is finite).
        if !(s * 128.0).is_finite() {
            return Err(CodecError::NonFinite(i));
        }
        if *s < 0.0 {
            return Err(CodecError::NegativeScale(i));
        }
    }
    Ok(())
}

/// Symmetric int8 per block: `q = round(v / s)`, `s = absmax / 127`.
fn quantize(values: &[f32], block: u32) -> (Vec<f32>, Vec<i8>) {
    let mut scales = Vec::with_capacity(values.len().div_ceil(block as usize));
    let mut q = Vec::with_capacity(values.len());
    for chunk in values.chunks(block as usize) {
        let absmax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = absmax / 127.0;
        scales.push(scale);
        for v in chunk {
            q.push(if scale > 0.0 {
                (v / scale).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            });
        }
    }
    (scales, q)
}

fn dequantize(scales: &[f32], q: &[i8], block: u32) -> Vec<f32> {
    q.chunks(block as usize)
        .zip(scales)
        .flat_map(|(chunk, &s)| chunk.iter().map(move |&v| v as f32 * s))
        .collect()
}

fn write_leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Reads one LEB128 number of at most 10 bytes at `*cursor`.
fn read_leb128(bytes: &[u8], cursor: &mut usize) -> Result<u64, CodecError> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*cursor).ok_or(CodecError::Varint)?;
        *cursor += 1;
        let part = (byte & 0x7f) as u64;
        if shift == 63 && part > 1 {
            return Err(CodecError::Varint);
        }
        v |= part << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CodecError::Varint)
}

#[cfg(test)]
mod tests;
