//! Layer 5: what the coordinator knows of each peer. New and suspect peers are replayed
//! often, trusted ones rarely; strikes (rejections that speak to honesty or health, see
//! [`RejectReason::is_strike`]) within a window ban a peer, and a failed replay, a copied
//! delta or a wrong check bans at once. Pure: the replay draw is a hash of the run seed and the lease, so it is
//! reproducible for tests and unpredictable for peers, who never see the seed.

use std::collections::{HashMap, VecDeque};

use herd_protocol::LeaseId;
use herd_protocol::messages::{RejectReason, Verdict};
use serde::Serialize;

use crate::round::PeerKey;

/// Verdicts the strike count looks back over.
const STRIKE_WINDOW: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReputationConfig {
    pub replay_new: f64,
    pub replay_trusted: f64,
    /// Effect-check probability for trusted peers (new and suspect ones: always).
    pub effect_trusted: f64,
    pub trusted_after: u32,
    pub ban_after: u32,
}

/// A peer's standing, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    New,
    Trusted,
    /// A strike within the window: replayed like a new peer.
    Suspect,
    Banned,
}

impl Standing {
    /// The word `/v1/status` and the dashboard show.
    pub fn label(&self) -> &'static str {
        match self {
            Standing::New => "new",
            Standing::Trusted => "trusted",
            Standing::Suspect => "suspect",
            Standing::Banned => "banned",
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Record {
    /// `true` for a strike, newest last.
    recent: VecDeque<bool>,
    replays_passed: u32,
    banned: Option<String>,
}

#[derive(Debug, PartialEq)]
pub struct Reputation {
    cfg: ReputationConfig,
    seed: u64,
    peers: HashMap<PeerKey, Record>,
}

impl Reputation {
    pub fn new(cfg: ReputationConfig, seed: u64) -> Self {
        Reputation {
            cfg,
            seed,
            peers: HashMap::new(),
        }
    }

    pub fn standing(&self, peer: &PeerKey) -> Standing {
        match self.peers.get(peer) {
            None => Standing::New,
            Some(r) if r.banned.is_some() => Standing::Banned,
            Some(r) if r.recent.contains(&true) => Standing::Suspect,
            Some(r) if r.replays_passed >= self.cfg.trusted_after => Standing::Trusted,
            Some(_) => Standing::New,
        }
    }

    /// Why `peer` is banned, if it is.
    pub fn banned(&self, peer: &PeerKey) -> Option<&str> {
        self.peers.get(peer)?.banned.as_deref()
    }

    pub fn replay_rate(&self, peer: &PeerKey) -> f64 {
        match self.standing(peer) {
            Standing::Trusted => self.cfg.replay_trusted,
            _ => self.cfg.replay_new,
        }
    }

    /// Whether `lease` of `peer` is replayed: a draw at the peer's rate, fixed per lease.
    pub fn should_replay(&self, peer: &PeerKey, lease: LeaseId) -> bool {
        self.draw(b"herd/replay-draw", lease) < self.replay_rate(peer)
    }

    /// Whether `lease` of `peer` gets the effect check: always unless `peer` is trusted, then
    /// a draw at `effect_trusted`, fixed per lease and independent of the replay draw.
    pub fn should_check_effect(&self, peer: &PeerKey, lease: LeaseId) -> bool {
        match self.standing(peer) {
            Standing::Trusted => self.draw(b"herd/effect-draw", lease) < self.cfg.effect_trusted,
            _ => true,
        }
    }

    /// A draw in [0, 1] fixed by the run seed, a label and the lease (unknown to peers).
    fn draw(&self, label: &[u8], lease: LeaseId) -> f64 {
        seeded_draw(self.seed, label, lease.0)
    }

    /// Forgets the replays `peer` passed: it is replayed like a new peer until it earns
    /// trust again.
    pub fn distrust(&mut self, peer: &PeerKey) {
        if let Some(r) = self.peers.get_mut(peer) {
            r.replays_passed = 0;
        }
    }

    /// Bans `peer` (unless it already is) for `reason`.
    pub fn ban(&mut self, peer: PeerKey, reason: &str) {
        let r = self.peers.entry(peer).or_default();
        if r.banned.is_none() {
            r.banned = Some(reason.to_string());
        }
    }

    /// Records a verdict; returns the ban reason if this verdict banned the peer.
    pub fn record(&mut self, peer: PeerKey, verdict: &Verdict, replayed: bool) -> Option<String> {
        let ban_after = self.cfg.ban_after as usize;
        let r = self.peers.entry(peer).or_default();
        if r.banned.is_some() {
            return None;
        }
        let strike = matches!(verdict, Verdict::Rejected(reason) if reason.is_strike());
        if r.recent.len() == STRIKE_WINDOW {
            r.recent.pop_front();
        }
        r.recent.push_back(strike);
        if replayed && *verdict == Verdict::Accepted {
            r.replays_passed += 1;
        }
        let ban = match verdict {
            Verdict::Rejected(
                reason @ (RejectReason::ReplayMismatch { .. }
                | RejectReason::CopiedDelta
                | RejectReason::CheckMismatch(_)),
            ) => Some(format!("{reason}")),
            _ if r.recent.iter().filter(|s| **s).count() >= ban_after => Some(format!(
                "{ban_after} rejected submissions within the last {STRIKE_WINDOW}"
            )),
            _ => None,
        };
        r.banned.clone_from(&ban);
        ban
    }
}

/// A draw in [0, 1) fixed by the run's `seed`, a `label` and `n`: reproducible for tests,
/// unpredictable for peers, who never see the seed.
pub fn seeded_draw(seed: u64, label: &[u8], n: u64) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(label);
    h.update(&seed.to_le_bytes());
    h.update(&n.to_le_bytes());
    let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    x as f64 / (u64::MAX as f64 + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ReputationConfig {
        ReputationConfig {
            replay_new: 1.0,
            replay_trusted: 0.1,
            effect_trusted: 0.25,
            trusted_after: 2,
            ban_after: 3,
        }
    }

    #[test]
    fn peers_earn_trust_and_lose_it() {
        let mut r = Reputation::new(cfg(), 1);
        let a = PeerKey::random();
        assert_eq!(r.standing(&a), Standing::New);
        assert!(r.should_replay(&a, LeaseId(1)));
        assert!((0..100).all(|l| r.should_check_effect(&a, LeaseId(l))));
        r.record(a, &Verdict::Accepted, true);
        r.record(a, &Verdict::Accepted, false); // not replayed: no trust earned
        assert_eq!(r.standing(&a), Standing::New);
        r.record(a, &Verdict::Accepted, true);
        assert_eq!(r.standing(&a), Standing::Trusted);
        // Trusted peers are replayed at ~10%.
        let drawn = (0..10_000)
            .filter(|&l| r.should_replay(&a, LeaseId(l)))
            .count();
        assert!((700..1300).contains(&drawn), "{drawn}");
        // ... and effect-checked at ~25%, by a draw of its own.
        let effect: Vec<bool> = (0..10_000)
            .map(|l| r.should_check_effect(&a, LeaseId(l)))
            .collect();
        let checked = effect.iter().filter(|&&e| e).count();
        assert!((2200..2800).contains(&checked), "{checked}");
        let both = (0..10_000)
            .filter(|&l| effect[l as usize] && r.should_replay(&a, LeaseId(l)))
            .count();
        assert!(
            (150..350).contains(&both),
            "independent draws: {both} of 10,000 both"
        );
        // Timing rejections are no strike; a failed effect check is.
        r.record(a, &Verdict::Rejected(RejectReason::StaleRound), false);
        assert_eq!(r.standing(&a), Standing::Trusted);
        r.record(
            a,
            &Verdict::Rejected(RejectReason::NoImprovement {
                measured: 0.0,
                required: 0.1,
            }),
            false,
        );
        assert_eq!(r.standing(&a), Standing::Suspect);
        assert_eq!(r.replay_rate(&a), 1.0);
        assert!((0..100).all(|l| r.should_check_effect(&a, LeaseId(l))));
    }

    #[test]
    fn strikes_and_failed_replays_ban() {
        let mut r = Reputation::new(cfg(), 1);
        let [b, c, d] = [(); 3].map(|()| PeerKey::random());
        let zero = Verdict::Rejected(RejectReason::ZeroDelta);
        assert_eq!(r.record(b, &zero, false), None);
        assert_eq!(r.record(b, &zero, false), None);
        assert!(r.record(b, &zero, false).is_some());
        assert_eq!(r.standing(&b), Standing::Banned);
        assert!(r.banned(&b).unwrap().contains("3 rejected"));
        let replay = Verdict::Rejected(RejectReason::ReplayMismatch {
            cosine: 0.2,
            rel_error: 0.9,
        });
        assert!(
            r.record(c, &replay, true)
                .unwrap()
                .contains("replay differs")
        );
        assert_eq!(r.banned(&d), None);
    }
}
