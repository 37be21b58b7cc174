//! Admission of new identities: a proof of work bound to one identity and one run.
//!
//! A libp2p identity costs nothing to make, so without a price a stranger can show up as
//! thousands of peers. Before its first lease a node finds a `nonce` such that
//! `blake3("herd/admission/1" ‖ run ‖ coordinator ‖ peer ‖ nonce)` starts with `bits` zero
//! bits; the coordinator checks it with one hash. The proof names the run and the coordinator,
//! so it cannot be mined before the run exists nor reused on another; it names the peer, so
//! every identity pays for itself. An honest node pays once per run (it keeps the proof); a
//! farm pays for every identity it mints. Costs measured on this project's machines are in
//! `docs/open-network.md`.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Most difficulty a coordinator may ask: 2^40 hashes is days of a CPU core.
pub const MAX_ADMISSION_BITS: u8 = 40;

/// A solved proof of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionProof {
    /// The difficulty it was solved for.
    pub bits: u8,
    pub nonce: u64,
}

/// What a proof is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Challenge<'a> {
    pub run: &'a str,
    pub coordinator: &'a PeerId,
    pub peer: &'a PeerId,
}

impl Challenge<'_> {
    /// The hasher state with everything but the nonce absorbed (each field length-prefixed,
    /// so no two challenges share bytes).
    fn prefix(&self) -> blake3::Hasher {
        let mut h = blake3::Hasher::new();
        h.update(b"herd/admission/1");
        for field in [
            self.run.as_bytes(),
            &self.coordinator.to_bytes(),
            &self.peer.to_bytes(),
        ] {
            h.update(&(field.len() as u64).to_le_bytes());
            h.update(field);
        }
        h
    }

    /// Leading zero bits of the proof hash for `nonce`.
    fn zero_bits(prefix: &blake3::Hasher, nonce: u64) -> u32 {
        let mut h = prefix.clone();
        h.update(&nonce.to_le_bytes());
        let first = h.finalize().as_bytes()[..16].try_into().expect("16 bytes");
        u128::from_be_bytes(first).leading_zeros()
    }

    /// Whether `proof` meets `bits` for this challenge (one hash).
    pub fn accepts(&self, proof: &AdmissionProof, bits: u8) -> bool {
        bits == 0 || Self::zero_bits(&self.prefix(), proof.nonce) >= u32::from(bits)
    }

    /// Finds a nonce meeting `bits`, trying `2^bits` nonces on average (and stopping early
    /// when `keep_going` says so, checked every 65,536 tries). `None` if stopped.
    pub fn solve(&self, bits: u8, keep_going: impl Fn() -> bool) -> Option<AdmissionProof> {
        let prefix = self.prefix();
        let bits = bits.min(MAX_ADMISSION_BITS);
        for nonce in 0u64.. {
            if nonce % 65_536 == 0 && !keep_going() {
                return None;
            }
            if Self::zero_bits(&prefix, nonce) >= u32::from(bits) {
                return Some(AdmissionProof { bits, nonce });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed identities: the tests are deterministic.
    fn peer(n: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
            .unwrap()
            .public()
            .to_peer_id()
    }

    #[test]
    fn a_proof_holds_for_its_own_challenge_only() {
        let (coordinator, peer, other) = (peer(1), peer(2), peer(3));
        let challenge = Challenge {
            run: "r",
            coordinator: &coordinator,
            peer: &peer,
        };
        let proof = challenge.solve(16, || true).unwrap();
        assert!(challenge.accepts(&proof, 16));
        assert!(challenge.accepts(&proof, 0));
        assert!(
            !challenge.accepts(
                &AdmissionProof {
                    nonce: proof.nonce + 1,
                    ..proof
                },
                16
            ),
            "the next nonce is no proof"
        );
        // Another identity, run or coordinator: the nonce is worthless there.
        for elsewhere in [
            Challenge {
                peer: &other,
                ..challenge
            },
            Challenge {
                run: "other",
                ..challenge
            },
            Challenge {
                coordinator: &other,
                ..challenge
            },
        ] {
            assert!(!elsewhere.accepts(&proof, 16));
        }
    }

    #[test]
    fn difficulty_is_what_it_says() {
        let coordinator = peer(1);
        // Mean tries for 8 bits is 256; over 40 identities the mean nonce is near it.
        let total: u64 = (10..50)
            .map(|n| {
                let peer = peer(n);
                let c = Challenge {
                    run: "r",
                    coordinator: &coordinator,
                    peer: &peer,
                };
                let p = c.solve(8, || true).unwrap();
                assert!(c.accepts(&p, 8));
                p.nonce + 1
            })
            .sum();
        let mean = total as f64 / 40.0;
        assert!((100.0..600.0).contains(&mean), "{mean}");
    }

    #[test]
    fn solving_stops_when_told() {
        let (coordinator, peer) = (peer(1), peer(2));
        let c = Challenge {
            run: "r",
            coordinator: &coordinator,
            peer: &peer,
        };
        assert_eq!(c.solve(40, || false), None);
    }
}
