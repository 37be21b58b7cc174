//! The canonical bytes a submission's signature covers, so that a signature for one
//! `(run, round, shard, base adapter, payload)` can never be replayed for another.

use crate::ids::{ContentId, Round, ShardId};

/// Domain separation: these bytes mean "a herd submission, version 2" and nothing else.
const DOMAIN: &[u8] = b"herd/submission/v2\0";

/// `DOMAIN || len(run) u32 LE || run || round u64 LE || shard u32 LE || base || payload ||
/// tokens u64 LE`. The token count is signed because it weighs the delta in the average.
pub fn submission_bytes(
    run: &str,
    round: Round,
    shard: ShardId,
    base_adapter: &ContentId,
    payload: &ContentId,
    tokens: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + 4 + run.len() + 8 + 4 + 64 + 8);
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&(run.len() as u32).to_le_bytes());
    out.extend_from_slice(run.as_bytes());
    out.extend_from_slice(&round.0.to_le_bytes());
    out.extend_from_slice(&shard.0.to_le_bytes());
    out.extend_from_slice(&base_adapter.0);
    out.extend_from_slice(&payload.0);
    out.extend_from_slice(&tokens.to_le_bytes());
    out
}

impl crate::messages::Submission {
    /// A submission of `payload` for `lease`, signed by `key` over [`submission_bytes`].
    pub fn signed(
        lease: &crate::messages::Lease,
        payload: Vec<u8>,
        loss_before: f64,
        loss_after: f64,
        tokens: u64,
        key: &libp2p::identity::Keypair,
    ) -> Result<Self, libp2p::identity::SigningError> {
        let payload_hash = ContentId::of(&payload);
        let signed = submission_bytes(
            &lease.run,
            lease.round,
            lease.shard,
            &lease.base_adapter,
            &payload_hash,
            tokens,
        );
        Ok(crate::messages::Submission {
            lease: lease.id,
            run: lease.run.clone(),
            round: lease.round,
            shard: lease.shard,
            base_adapter: lease.base_adapter,
            payload,
            payload_hash,
            loss_before,
            loss_after,
            tokens,
            public_key: key.public().encode_protobuf(),
            signature: key.sign(&signed)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_bytes() {
        let (a, b) = (ContentId::of(b"a"), ContentId::of(b"b"));
        let base = submission_bytes("run", Round(1), ShardId(2), &a, &b, 7);
        for other in [
            submission_bytes("run2", Round(1), ShardId(2), &a, &b, 7),
            submission_bytes("run", Round(2), ShardId(2), &a, &b, 7),
            submission_bytes("run", Round(1), ShardId(3), &a, &b, 7),
            submission_bytes("run", Round(1), ShardId(2), &b, &b, 7),
            submission_bytes("run", Round(1), ShardId(2), &a, &a, 7),
            submission_bytes("run", Round(1), ShardId(2), &a, &b, 8),
        ] {
            assert_ne!(base, other);
        }
    }
}
