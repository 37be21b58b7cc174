//! Versioned messages of the `/herd/rpc/4` and `/herd/blob/2` protocols and the round
//! announcement, with the size cap of each.

use serde::{Deserialize, Serialize};

use crate::codec::CodecSpec;
use crate::ids::{ContentId, LeaseId, Round, SampleRange, ShardId};

mod verdict;
pub use verdict::{RejectReason, Verdict};

/// Bumped on any incompatible change of the messages below (and of the protocol names).
pub const PROTOCOL_VERSION: u32 = 4;
/// Control: leases, submissions, check reports, returns.
pub const RPC_PROTOCOL: &str = "/herd/rpc/4";
/// Blobs by content id, in hash-verified groups (see [`crate::outline`]).
pub const BLOB_PROTOCOL: &str = "/herd/blob/2";
/// Gossipsub topic of round announcements.
pub const ANNOUNCE_TOPIC: &str = "herd/rounds/1";

/// A request carries at most one delta; 64 MiB fits a rank-16 all-target LoRA of a 1B model in
/// fp32. A coordinator takes less: its run's largest honest submission (see
/// [`crate::net::RpcLimits`]).
pub const MAX_RPC_REQUEST_BYTES: usize = 64 << 20;
/// Every request but a submission: a lease request, a return, a "what is published?" query.
pub const MAX_SMALL_REQUEST_BYTES: usize = 4 << 10;
pub const MAX_RPC_RESPONSE_BYTES: usize = 1 << 20;
/// Chaining values per outline page: 512 KiB, so one page fits a response like one group does.
pub const OUTLINE_PAGE: usize = 16 << 10;
pub const MAX_BLOB_REQUEST_BYTES: usize = 1 << 10;
pub const MAX_BLOB_RESPONSE_BYTES: usize = crate::outline::GROUP_BYTES as usize + (1 << 10);
/// Room for a round and the latest checkpoint's file list.
pub const MAX_ANNOUNCE_BYTES: usize = 4 << 10;
/// Files a checkpoint may list in an announcement or an answer.
pub const MAX_CHECKPOINT_FILES: usize = 16;
/// Longest run name, device description or reason string accepted.
pub const MAX_TEXT_BYTES: usize = 256;

/// The first byte of an encoded [`RpcRequest::Submit`] (bincode's variant index): the one
/// request that may be large.
pub const SUBMIT_TAG: u8 = 1;
/// The first byte of an encoded [`RpcRequest::Report`]: a sketch of up to 4,096 floats, more
/// than a small request holds.
pub const REPORT_TAG: u8 = 4;
/// A check report: the largest sketch as fp32 and the report's other fields.
pub const MAX_REPORT_REQUEST_BYTES: usize = 20 << 10;

/// What a node asks the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Ask for work.
    Lease(LeaseRequest),
    /// Deliver the result of a lease.
    Submit(Box<Submission>),
    /// Give a lease back unfinished (the node is stopping), so it is reissued at once.
    Return { lease: LeaseId },
    /// What the run is built on and one of its checkpoints (`None`: the latest), to download
    /// them from peers.
    Published { checkpoint: Option<String> },
    /// Deliver the result of a check lease.
    Report(Box<CheckReport>),
}

/// What the coordinator answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RpcResponse {
    Lease(Box<Lease>),
    /// No work now; ask again after `retry_after_ms`. `finished` means the run is over.
    NoWork {
        retry_after_ms: u64,
        finished: bool,
        reason: String,
    },
    Verdict(Verdict),
    Returned,
    Published(Box<Published>),
    /// The request itself was refused (e.g. a version this coordinator does not speak).
    Refused {
        reason: String,
    },
    /// A new identity must first prove work: solve [`crate::admission::Challenge`] for
    /// `run` at `bits` and ask again with the proof.
    AdmissionRequired {
        run: String,
        bits: u8,
    },
}

/// A request for work, with what the node is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub version: u32,
    /// Free text for operators: "cpu x8", "cuda:0 NVIDIA RTX 4090"; at most
    /// [`MAX_TEXT_BYTES`].
    pub device: String,
    /// The identity's admission proof for this run, once it has one.
    pub admission: Option<crate::admission::AdmissionProof>,
    /// A submission of this node still waits for its verdict: a check, or no work. (Its next
    /// delta is encoded with the residual that verdict leaves, so it cannot train yet; a
    /// training lease would run out while it waits.)
    pub checks_only: bool,
}

impl LeaseRequest {
    /// Whether every field is within its cap.
    pub fn is_well_formed(&self) -> bool {
        self.device.len() <= MAX_TEXT_BYTES
    }
}

/// The blobs a node needs to train for a run, all by content id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAssets {
    pub config: ContentId,
    pub weights: ContentId,
    pub tokenizer: ContentId,
    pub data: ContentId,
}

/// LoRA shape every node of a run uses (PEFT names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub train_a: bool,
    pub init_seed: u64,
}

/// One peer's exclusive right to compute one shard of one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub run: String,
    pub round: Round,
    pub shard: ShardId,
    pub ranges: Vec<SampleRange>,
    /// Seeds the batch order: honest replays of the shard see the same batches.
    pub seed: u64,
    pub inner_steps: u32,
    pub lr: f64,
    pub batch_size: u32,
    pub max_seq_len: u32,
    /// Unix time in milliseconds after which the shard is given to someone else.
    pub expires_at_ms: u64,
    pub assets: RunAssets,
    pub lora: LoraSpec,
    /// How the delta must be encoded.
    pub codec: CodecSpec,
    /// The adapter θ_r to start from (a safetensors blob).
    pub base_adapter: ContentId,
    /// Train and submit, or train and report the sketch (a check).
    pub task: LeaseTask,
}

/// What a lease asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseTask {
    /// Train the shard and submit the delta.
    #[default]
    Train,
    /// Train the shard exactly as the lease says and report the sketch of the result: a check
    /// of a submission, whose submitter and results are not given (docs/checking.md). The
    /// node's error-feedback residual is not touched.
    Check,
}

/// The result of a check lease, over the connection that authenticates its sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub lease: LeaseId,
    pub run: String,
    pub round: Round,
    pub shard: ShardId,
    pub base_adapter: ContentId,
    /// The CountSketch of the trained Δ under the lease's seed (`Delta::sketch`).
    pub sketch: Vec<f32>,
}

impl CheckReport {
    /// Whether every field is within its cap (a sketch has at most 4,096 values).
    pub fn is_well_formed(&self) -> bool {
        self.run.len() <= MAX_TEXT_BYTES
            && self.sketch.len() <= 4096
            && self.sketch.iter().all(|v| v.is_finite())
    }
}

/// Unix time in milliseconds: the clock lease expiries are stated in.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The result of a lease: a signed LoRA delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub lease: LeaseId,
    pub run: String,
    pub round: Round,
    pub shard: ShardId,
    pub base_adapter: ContentId,
    /// An encoded [`crate::delta::Payload`].
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub payload_hash: ContentId,
    pub loss_before: f64,
    pub loss_after: f64,
    /// Real tokens trained on; the delta's weight in the average (signed).
    pub tokens: u64,
    /// The signer's libp2p public key (protobuf encoding); must match the sending PeerId.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// ed25519 signature over [`crate::signing::submission_bytes`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What a peer asks of another's blobs: a page of a blob's outline (the hashes its groups are
/// checked against), or one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    Outline { id: ContentId, first: u64 },
    Group { id: ContentId, index: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// The blob's size and at most [`OUTLINE_PAGE`] chaining values from `first`.
    Outline {
        total: u64,
        cvs: Vec<[u8; 32]>,
    },
    /// One group's bytes. As bytes, not a sequence: the same wire format (length, then the
    /// bytes), but one copy instead of one serde call per byte, which costs 20% of a transfer.
    Group(#[serde(with = "serde_bytes")] Vec<u8>),
    NotFound,
}

/// A file by name and content id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedBlob {
    pub name: String,
    pub id: ContentId,
}

/// A published checkpoint: its name and every file of its dir (signed manifest included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub name: String,
    pub round: u64,
    pub files: Vec<NamedBlob>,
}

/// The answer to [`RpcRequest::Published`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub run: String,
    /// The base model's files (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub base_model: Vec<NamedBlob>,
    pub checkpoint: Option<CheckpointRef>,
}

impl CheckpointRef {
    /// Whether its names are plain file names and its size is within the caps: names become
    /// paths on the downloader's disk.
    pub fn is_well_formed(&self) -> bool {
        plain_name(&self.name)
            && self.files.len() <= MAX_CHECKPOINT_FILES
            && self.files.iter().all(|f| plain_name(&f.name))
    }
}

/// A name that is one path component: no separators, not `.` or `..`, not hidden, not long.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TEXT_BYTES
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Published on [`ANNOUNCE_TOPIC`] when a round opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    pub run: String,
    pub round: Round,
    pub adapter: ContentId,
    /// The latest checkpoint, for nodes that seed checkpoints to downloaders.
    pub checkpoint: Option<CheckpointRef>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::encode;

    #[test]
    fn only_a_submission_carries_the_submit_tag() {
        let submit = RpcRequest::Submit(Box::new(Submission {
            lease: LeaseId(1),
            run: "r".into(),
            round: Round(0),
            shard: ShardId(0),
            base_adapter: ContentId::of(b"a"),
            payload: vec![1, 2, 3],
            payload_hash: ContentId::of(b"p"),
            loss_before: 1.0,
            loss_after: 0.5,
            tokens: 3,
            public_key: Vec::new(),
            signature: Vec::new(),
        }));
        assert_eq!(encode(&submit).unwrap()[0], SUBMIT_TAG);
        let small = [
            RpcRequest::Lease(LeaseRequest {
                version: PROTOCOL_VERSION,
                device: "cpu".into(),
                admission: None,
                checks_only: false,
            }),
            RpcRequest::Return { lease: LeaseId(1) },
            RpcRequest::Published { checkpoint: None },
        ];
        let report = RpcRequest::Report(Box::new(CheckReport {
            lease: LeaseId(u64::MAX),
            run: "r".repeat(MAX_TEXT_BYTES),
            round: Round(u64::MAX),
            shard: ShardId(u32::MAX),
            base_adapter: ContentId::of(b"a"),
            sketch: vec![1.0; 4096],
        }));
        let bytes = encode(&report).unwrap();
        assert_eq!(bytes[0], REPORT_TAG);
        assert!(bytes.len() <= MAX_REPORT_REQUEST_BYTES, "{}", bytes.len());
        for request in small {
            let bytes = encode(&request).unwrap();
            assert_ne!(bytes[0], SUBMIT_TAG, "{request:?}");
            assert!(bytes.len() <= MAX_SMALL_REQUEST_BYTES);
        }
    }
}
