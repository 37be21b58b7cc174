//! Mutation fuzzing of every decoder that reads bytes from the network: the delta payload
//! (each codec) and each message of the protocol, with their production caps.
//!
//! Inputs start from valid encodings and are mutated (bit flips, boundary bytes, cuts,
//! insertions, duplicated and deleted ranges) or are plain random bytes. A decoder passes if
//! it never panics and whatever it accepts satisfies the checks it promises. Deterministic for
//! a seed; `cargo xtask fuzz` runs millions of inputs, the unit test a few thousand.

use crate::codec::CodecSpec;
use crate::delta::{Delta, DeltaLayout};
use crate::framing::{decode, encode};
use crate::ids::{ContentId, LeaseId, Round, SampleRange, ShardId};
use crate::messages::*;

/// Inputs run per target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuzzReport {
    pub targets: Vec<(&'static str, u64)>,
    /// Inputs a decoder accepted (mutations that still form a valid message).
    pub accepted: u64,
}

impl FuzzReport {
    pub fn inputs(&self) -> u64 {
        self.targets.iter().map(|(_, n)| n).sum()
    }
}

/// The names of the targets [`run`] exercises.
pub const TARGETS: [&str; 9] = [
    "payload/raw",
    "payload/int8",
    "payload/topk",
    "payload/sign",
    "rpc_request",
    "rpc_response",
    "blob_request",
    "blob_response",
    "announcement",
];

/// Runs `per_target` inputs through each decoder. Panics (the failure) if a decoder panics or
/// accepts a delta that breaks its promises.
pub fn run(per_target: u64, seed: u64) -> FuzzReport {
    let mut rng = Rng(seed | 1);
    let mut accepted = 0u64;
    let layout = layout();
    let mut targets = Vec::new();
    for name in TARGETS {
        let seeds = seeds(name, &layout);
        for _ in 0..per_target {
            let base = &seeds[rng.below(seeds.len())];
            let input = rng.mutate(base);
            if decodes(name, &input, &layout) {
                accepted += 1;
            }
        }
        targets.push((name, per_target));
    }
    FuzzReport { targets, accepted }
}

fn codec_of(target: &str) -> CodecSpec {
    match target {
        "payload/raw" => CodecSpec::RawF32,
        "payload/int8" => CodecSpec::DenseInt8 { block: 8 },
        "payload/sign" => CodecSpec::Sign {
            keep: 0.6,
            block: 4,
        },
        _ => CodecSpec::TopK {
            fraction: 0.2,
            block: 4,
        },
    }
}

/// Whether the target's decoder accepted `input`, checking what it promises when it did.
fn decodes(target: &str, input: &[u8], layout: &DeltaLayout) -> bool {
    match target {
        t if t.starts_with("payload/") => match Delta::decode(input, layout, codec_of(t), 5) {
            Ok(d) => {
                assert_eq!(d.delta.tensors.len(), layout.0.len());
                for (t, (name, shape)) in d.delta.tensors.iter().zip(&layout.0) {
                    assert_eq!((&t.name, &t.shape), (name, shape));
                    assert_eq!(t.values.len(), shape.iter().product::<u32>() as usize);
                    assert!(t.values.iter().all(|v| v.is_finite()));
                }
                assert!(d.sketch.iter().all(|v| v.is_finite()));
                true
            }
            Err(_) => false,
        },
        "rpc_request" => decode::<RpcRequest, MAX_RPC_REQUEST_BYTES>(input).is_ok(),
        "rpc_response" => decode::<RpcResponse, MAX_RPC_RESPONSE_BYTES>(input).is_ok(),
        "blob_request" => decode::<BlobRequest, MAX_BLOB_REQUEST_BYTES>(input).is_ok(),
        "blob_response" => decode::<BlobResponse, MAX_BLOB_RESPONSE_BYTES>(input).is_ok(),
        "announcement" => decode::<RoundAnnouncement, MAX_ANNOUNCE_BYTES>(input).is_ok(),
        other => unreachable!("unknown fuzz target {other}"),
    }
}

fn sample_checkpoint() -> CheckpointRef {
    CheckpointRef {
        name: "round-0004".into(),
        round: 4,
        files: vec![NamedBlob {
            name: "manifest.json".into(),
            id: ContentId::of(b"m"),
        }],
    }
}

fn layout() -> DeltaLayout {
    DeltaLayout(vec![("a".into(), vec![4, 6]), ("b".into(), vec![10])])
}

fn sample_delta(layout: &DeltaLayout, k: f32) -> Delta {
    layout.delta_from(|i| (i as f32 * k).sin())
}

fn sample_lease() -> Lease {
    let id = ContentId::of(b"x");
    Lease {
        id: LeaseId(3),
        run: "run".into(),
        round: Round(2),
        shard: ShardId(1),
        ranges: vec![SampleRange { start: 0, end: 9 }],
        seed: 11,
        inner_steps: 4,
        lr: 1e-3,
        batch_size: 2,
        max_seq_len: 64,
        expires_at_ms: 1_000,
        assets: RunAssets {
            config: id,
            weights: id,
            tokenizer: id,
            data: id,
        },
        lora: LoraSpec {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into()],
            train_a: false,
            init_seed: 1,
        },
        codec: CodecSpec::default(),
        base_adapter: id,
        task: LeaseTask::Train,
    }
}

/// Valid encodings the mutations start from.
fn seeds(target: &str, layout: &DeltaLayout) -> Vec<Vec<u8>> {
    let enc = |v: &dyn erased::Encode| v.bytes();
    match target {
        t if t.starts_with("payload/") => [0.3f32, 1.7]
            .iter()
            .map(|&k| {
                sample_delta(layout, k)
                    .encode(codec_of(t), None, 5)
                    .expect("encodes")
                    .payload
            })
            .collect(),
        "rpc_request" => {
            let payload = sample_delta(layout, 0.5)
                .encode(CodecSpec::default(), None, 1)
                .expect("encodes")
                .payload;
            let sub = Submission {
                lease: LeaseId(3),
                run: "run".into(),
                round: Round(2),
                shard: ShardId(1),
                base_adapter: ContentId::of(b"a"),
                payload_hash: ContentId::of(&payload),
                payload,
                loss_before: 2.0,
                loss_after: 1.0,
                tokens: 100,
                public_key: vec![1; 36],
                signature: vec![2; 64],
            };
            vec![
                enc(&RpcRequest::Lease(LeaseRequest {
                    version: PROTOCOL_VERSION,
                    device: "cpu x2".into(),
                    admission: Some(crate::admission::AdmissionProof {
                        bits: 20,
                        nonce: 123_456,
                    }),
                    checks_only: true,
                })),
                enc(&RpcRequest::Submit(Box::new(sub))),
                enc(&RpcRequest::Return { lease: LeaseId(9) }),
                enc(&RpcRequest::Published { checkpoint: None }),
                enc(&RpcRequest::Published {
                    checkpoint: Some("round-00004".into()),
                }),
                enc(&RpcRequest::Report(Box::new(CheckReport {
                    lease: LeaseId(1 << 62),
                    run: "run".into(),
                    round: Round(2),
                    shard: ShardId(1),
                    base_adapter: ContentId::of(b"x"),
                    sketch: vec![0.5; 64],
                }))),
            ]
        }
        "rpc_response" => vec![
            enc(&RpcResponse::Lease(Box::new(sample_lease()))),
            enc(&RpcResponse::NoWork {
                retry_after_ms: 5,
                finished: false,
                reason: "wait".into(),
            }),
            enc(&RpcResponse::Verdict(Verdict::Accepted)),
            enc(&RpcResponse::Verdict(Verdict::Rejected(
                RejectReason::ReplayMismatch {
                    cosine: 0.5,
                    rel_error: 0.7,
                },
            ))),
            enc(&RpcResponse::Refused {
                reason: "no".into(),
            }),
            enc(&RpcResponse::Published(Box::new(Published {
                run: "run".into(),
                base_model: vec![NamedBlob {
                    name: "config.json".into(),
                    id: ContentId::of(b"c"),
                }],
                checkpoint: Some(sample_checkpoint()),
            }))),
        ],
        "blob_request" => vec![
            enc(&BlobRequest::Outline {
                id: ContentId::of(b"b"),
                first: 7,
            }),
            enc(&BlobRequest::Group {
                id: ContentId::of(b"b"),
                index: 2,
            }),
        ],
        "blob_response" => vec![
            enc(&BlobResponse::Outline {
                total: 10,
                cvs: vec![[3; 32]; 2],
            }),
            enc(&BlobResponse::Group(vec![1, 2, 3])),
            enc(&BlobResponse::NotFound),
        ],
        "announcement" => vec![
            enc(&RoundAnnouncement {
                run: "run".into(),
                round: Round(4),
                adapter: ContentId::of(b"c"),
                checkpoint: None,
            }),
            enc(&RoundAnnouncement {
                run: "run".into(),
                round: Round(4),
                adapter: ContentId::of(b"c"),
                checkpoint: Some(sample_checkpoint()),
            }),
        ],
        other => unreachable!("unknown fuzz target {other}"),
    }
}

/// Encoding behind a trait object so the seed lists above stay short.
mod erased {
    pub trait Encode {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn bytes(&self) -> Vec<u8> {
            super::encode(self).expect("sample messages encode")
        }
    }
}

/// xorshift64*: small, fast, deterministic; quality is plenty for choosing mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn mutate(&mut self, base: &[u8]) -> Vec<u8> {
        if self.below(16) == 0 {
            let len = self.below(64);
            return (0..len).map(|_| self.next() as u8).collect();
        }
        let mut b = base.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.below(b.len() + 1);
            match self.below(6) {
                0 if !b.is_empty() => {
                    let i = self.below(b.len());
                    b[i] ^= 1 << self.below(8);
                }
                1 if !b.is_empty() => {
                    const EDGES: [u8; 9] = [0, 1, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, 0xfe, 0xff];
                    let i = self.below(b.len());
                    b[i] = EDGES[self.below(EDGES.len())];
                }
                2 => b.truncate(at),
                3 => {
                    let n = 1 + self.below(8);
                    let extra: Vec<u8> = (0..n).map(|_| self.next() as u8).collect();
                    b.splice(at..at, extra);
                }
                4 if at < b.len() => {
                    let end = (at + 1 + self.below(16)).min(b.len());
                    b.drain(at..end);
                }
                _ if at < b.len() => {
                    let end = (at + 1 + self.below(16)).min(b.len());
                    let copy = b[at..end].to_vec();
                    let to = self.below(b.len() + 1);
                    b.splice(to..to, copy);
                }
                _ => {}
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    /// A few thousand inputs per decoder in the test suite; `cargo xtask fuzz` sets
    /// `HERD_FUZZ_INPUTS` (inputs in all) for the long run.
    #[test]
    fn every_decoder_survives_mutated_input() {
        let total: u64 = std::env::var("HERD_FUZZ_INPUTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(27_000);
        let per_target = total.div_ceil(super::TARGETS.len() as u64);
        let started = std::time::Instant::now();
        let report = super::run(per_target, 42);
        assert_eq!(report.inputs(), per_target * super::TARGETS.len() as u64);
        // Some mutations must still decode, or the mutator only exercises the first check.
        assert!(report.accepted > per_target / 100, "{report:?}");
        println!(
            "fuzz: {} inputs over {} decoders, {} accepted, no panic ({:.1} s)",
            report.inputs(),
            super::TARGETS.len(),
            report.accepted,
            started.elapsed().as_secs_f64()
        );
    }
}
