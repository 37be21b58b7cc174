//! Layer 1: who sent it and what they signed. The sending PeerId is authenticated by noise;
//! the submission must carry that peer's public key, a signature with it over the canonical
//! lease binding, and a payload that hashes to the signed hash.

use herd_protocol::ContentId;
use herd_protocol::messages::{RejectReason, Submission};
use herd_protocol::signing::submission_bytes;
use libp2p::PeerId;
use libp2p::identity::PublicKey;

/// Checks `sub` as sent by `peer` for `run`.
pub fn check(run: &str, peer: &PeerId, sub: &Submission) -> Result<(), RejectReason> {
    if sub.run != run {
        return Err(RejectReason::LeaseMismatch);
    }
    let key =
        PublicKey::try_decode_protobuf(&sub.public_key).map_err(|_| RejectReason::BadSignature)?;
    if key.to_peer_id() != *peer {
        return Err(RejectReason::BadSignature);
    }
    if ContentId::of(&sub.payload) != sub.payload_hash {
        return Err(RejectReason::PayloadHashMismatch);
    }
    let signed = submission_bytes(
        &sub.run,
        sub.round,
        sub.shard,
        &sub.base_adapter,
        &sub.payload_hash,
        sub.tokens,
    );
    if !key.verify(&signed, &sub.signature) {
        return Err(RejectReason::BadSignature);
    }
    Ok(())
}
