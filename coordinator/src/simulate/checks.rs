//! Simulated adversaries against the real check book and reputation (docs/checking.md): an
//! established network of trusted peers, some of them forgers (they send deltas they did not
//! train as their lease says), lying checkers (their checks are not the replay they claim) and
//! colluding pairs (a forger whose accomplice echoes its forged sketch when drawn as its
//! checker). Training is not simulated: a shard's honest sketch is a fixed pseudo-random vector
//! and each honest training of it lands within hardware noise of it. What is measured: the
//! share of forged deltas kept out of the model, the coordinator's tensor work (its own replays
//! and effect checks) as a share of the network's training, the checkers' share, and how long a
//! lying checker lasts. A banned adversary comes back as a new identity of the same kind.

use std::collections::HashMap;

use herd_protocol::sketch::agreement;
use herd_protocol::{LeaseId, Round, ShardId};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::checks::{CheckAction, CheckBook, CheckPolicy};
use crate::round::PeerKey;
use crate::verify::reputation::{Reputation, ReputationConfig, Standing};
use herd_protocol::messages::{RejectReason, Verdict};

/// Values per simulated sketch (a run's are 4,096; agreement does not depend on the length).
const SKETCH_LEN: usize = 256;
/// Relative hardware noise of an honest training (calibrated: 1 vs 2 threads ≈ 0.9%).
const HONEST_NOISE: f32 = 0.01;
/// At most this many checks a peer does in a round besides its own shard.
const CHECKS_PER_ROUND: usize = 8;

/// The network and the rules.
#[derive(Debug, Clone)]
pub struct CheckSimConfig {
    pub peers: u32,
    pub rounds: u64,
    /// Shares of the peers: lone forgers, lying checkers, and peers in colluding pairs (half
    /// of them forgers, half accomplices).
    pub forgers: f64,
    pub lying_checkers: f64,
    pub colluding: f64,
    pub policy: CheckPolicy,
    pub reputation: ReputationConfig,
    /// An effect check's compute as a share of a shard's training (the demo's: 0.23).
    pub effect_cost: f64,
    pub seed: u64,
}

/// What happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckSimReport {
    pub peers: u32,
    pub rounds: u64,
    /// Deltas submitted (shards trained by the network).
    pub deltas: u64,
    pub forged: u64,
    /// Forged deltas rejected, or dropped with their round still open when their submitter
    /// was banned.
    pub forged_kept_out: u64,
    /// Forged deltas averaged in, and of those found later (their submitter banned after).
    pub forged_averaged: u64,
    pub forged_averaged_found_later: u64,
    pub forged_kept_out_share: f64,
    pub own_replays: u64,
    pub effect_checks: u64,
    /// (own replays + effect checks × effect cost) / deltas.
    pub coordinator_share: f64,
    pub checks: u64,
    /// Of those, checks of a submission already decided: canaries.
    pub canaries: u64,
    /// Checks / deltas: the network's extra training for checking.
    pub checkers_share: f64,
    pub lying_checkers_banned: u64,
    /// Checks a lying checker got done before its ban: mean and most.
    pub liar_checks_before_ban_mean: f64,
    pub liar_checks_before_ban_max: u64,
    pub forgers_banned: u64,
    pub honest_banned: u64,
    pub honest_rejected: u64,
    /// Submissions still undecided when their round closed.
    pub stale: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Honest,
    Forger,
    Liar,
    /// A forger with an accomplice (the index of the accomplice's slot).
    PairForger(usize),
    /// The accomplice of the forger in the given slot.
    Accomplice(usize),
}

/// A slot keeps its kind; its identity changes when it is banned (a new one joins).
struct Slot {
    kind: Kind,
    key: PeerKey,
    checks_done: u64,
}

struct Submission {
    slot: usize,
    peer: PeerKey,
    forged: bool,
    /// Its verdict was given (or it was dropped with its banned submitter).
    decided: bool,
    sketch: Vec<f32>,
    round: Round,
    shard: ShardId,
}

/// Runs the simulation.
pub fn simulate_checks(cfg: &CheckSimConfig) -> CheckSimReport {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let n = cfg.peers as usize;
    let count = |share: f64| ((share * n as f64).round() as usize).min(n);
    let pairs = count(cfg.colluding) / 2;
    let mut kinds = Vec::with_capacity(n);
    for p in 0..pairs {
        kinds.push(Kind::PairForger(2 * p + 1));
        kinds.push(Kind::Accomplice(2 * p));
    }
    kinds.extend(std::iter::repeat_n(Kind::Forger, count(cfg.forgers)));
    kinds.extend(std::iter::repeat_n(Kind::Liar, count(cfg.lying_checkers)));
    kinds.resize(n, Kind::Honest);
    let mut reputation = Reputation::new(cfg.reputation, cfg.seed);
    let mut slots: Vec<Slot> = kinds
        .into_iter()
        .map(|kind| Slot {
            kind,
            key: PeerKey::random(),
            checks_done: 0,
        })
        .collect();
    // An established network: everyone starts trusted (what it costs to get there is the
    // newcomers' rule, paid again by every adversary that comes back).
    for s in &slots {
        earn_trust(&mut reputation, s.key, cfg.reputation.trusted_after);
    }
    let mut book = CheckBook::new(cfg.policy, cfg.seed);
    let mut report = CheckSimReport {
        peers: cfg.peers,
        rounds: cfg.rounds,
        ..CheckSimReport::default()
    };
    let mut liar_checks = Vec::new();
    // Forged deltas averaged in, by submitter: found later if it is banned.
    let mut averaged_by: HashMap<PeerKey, u64> = HashMap::new();
    let mut next_lease = 1u64;
    let mut now = 0u64;
    for r in 0..cfg.rounds {
        let round = Round(r);
        let mut subs: HashMap<LeaseId, Submission> = HashMap::new();
        let mut accepted_forged: HashMap<LeaseId, PeerKey> = HashMap::new();
        let mut world = World {
            reputation: &mut reputation,
            book: &mut book,
            report: &mut report,
            subs: &mut subs,
            accepted_forged: &mut accepted_forged,
            averaged_by: &mut averaged_by,
            slots: &mut slots,
            liar_checks: &mut liar_checks,
        };
        // Every peer trains its shard.
        for slot in 0..n {
            let peer = world.slots[slot].key;
            let lease = LeaseId(next_lease);
            next_lease += 1;
            let shard = ShardId(slot as u32);
            let standing = world.reputation.standing(&peer);
            // Adversaries behave until trusted: a new identity's deltas are all checked.
            let forges = matches!(world.slots[slot].kind, Kind::Forger | Kind::PairForger(_))
                && standing == Standing::Trusted;
            let sketch = if forges {
                noise_vector(&mut rng, 1.0)
            } else {
                honest(round, shard, &mut rng)
            };
            world.report.deltas += 1;
            world.report.forged += forges as u64;
            if world.reputation.should_check_effect(&peer, lease) {
                world.report.effect_checks += 1;
            }
            let sub = Submission {
                slot,
                peer,
                forged: forges,
                decided: false,
                sketch: sketch.clone(),
                round,
                shard,
            };
            world.subs.insert(lease, sub);
            if !world.reputation.should_replay(&peer, lease) {
                let actions = world.decide(lease, true, false);
                world.carry_out(actions, &mut rng);
                continue;
            }
            let wanted = match standing {
                Standing::Trusted => cfg.policy.checkers_trusted,
                _ => cfg.policy.checkers_new,
            };
            if wanted == 0 {
                world.report.own_replays += 1;
                let agrees = passes(&sketch, &honest(round, shard, &mut rng), cfg);
                let actions = world.decide(lease, agrees, true);
                world.carry_out(actions, &mut rng);
                continue;
            }
            world
                .book
                .submit(lease, peer, round, shard, sketch, wanted, now);
        }
        // Each peer asks for work once its shard is in, in a random order, and again after
        // each check it was given (a peer with nothing to do waits for the next round).
        let mut asking: Vec<usize> = (0..n).collect();
        for _ in 0..CHECKS_PER_ROUND {
            asking.shuffle(&mut rng);
            let mut again = Vec::new();
            for slot in asking {
                let peer = world.slots[slot].key;
                if world.reputation.standing(&peer) != Standing::Trusted {
                    continue;
                }
                let Some(g) = world.book.assign(peer, round, now) else {
                    continue;
                };
                again.push(slot);
                world.report.checks += 1;
                world.report.canaries += world.subs[&g.target].decided as u64;
                world.slots[slot].checks_done += 1;
                let target = &world.subs[&g.target];
                let answer = match world.slots[slot].kind {
                    Kind::Liar => noise_vector(&mut rng, 1.0),
                    Kind::Accomplice(partner) if partner == target.slot => target.sketch.clone(),
                    _ => honest(g.round, g.shard, &mut rng),
                };
                let actions = world
                    .book
                    .report(g.check, peer, g.round, g.shard, answer)
                    .expect("a check just granted is the checker's");
                world.carry_out(actions, &mut rng);
            }
            asking = again;
        }
        // Checks nobody took in time fall to the coordinator.
        now += cfg.policy.take_ms;
        let late = world.book.expire(now);
        world.carry_out(late, &mut rng);
        for lease in world.book.close_round(round) {
            // Stale: neither accepted nor a strike (rare: every check is answered at once).
            world.report.stale += 1;
            if world.subs[&lease].forged {
                world.report.forged_kept_out += 1;
            }
        }
        // What is left accepted and forged is averaged in.
        for peer in world.accepted_forged.values() {
            world.report.forged_averaged += 1;
            *world.averaged_by.entry(*peer).or_default() += 1;
        }
        now += 1;
    }
    let r = &mut report;
    r.forged_kept_out_share = if r.forged == 0 {
        1.0
    } else {
        r.forged_kept_out as f64 / r.forged as f64
    };
    r.coordinator_share =
        (r.own_replays as f64 + r.effect_checks as f64 * cfg.effect_cost) / r.deltas as f64;
    r.checkers_share = r.checks as f64 / r.deltas as f64;
    r.lying_checkers_banned = liar_checks.len() as u64;
    r.liar_checks_before_ban_max = liar_checks.iter().copied().max().unwrap_or(0);
    r.liar_checks_before_ban_mean = if liar_checks.is_empty() {
        0.0
    } else {
        liar_checks.iter().sum::<u64>() as f64 / liar_checks.len() as f64
    };
    report
}

/// A round's mutable state, so that actions can be carried out by one function.
struct World<'a> {
    reputation: &'a mut Reputation,
    book: &'a mut CheckBook,
    report: &'a mut CheckSimReport,
    subs: &'a mut HashMap<LeaseId, Submission>,
    accepted_forged: &'a mut HashMap<LeaseId, PeerKey>,
    averaged_by: &'a mut HashMap<PeerKey, u64>,
    slots: &'a mut [Slot],
    liar_checks: &'a mut Vec<u64>,
}

impl World<'_> {
    /// A submission's verdict: accepted, or rejected as a failed replay (which bans).
    fn decide(&mut self, lease: LeaseId, passed: bool, replayed: bool) -> Vec<CheckAction> {
        let Some(sub) = self.subs.get_mut(&lease).filter(|s| !s.decided) else {
            return Vec::new();
        };
        sub.decided = true;
        let (peer, forged, slot) = (sub.peer, sub.forged, sub.slot);
        if passed {
            self.reputation.record(peer, &Verdict::Accepted, replayed);
            if forged {
                self.accepted_forged.insert(lease, peer);
            }
            return Vec::new();
        }
        if forged {
            self.report.forged_kept_out += 1;
        } else {
            self.report.honest_rejected += 1;
        }
        let mismatch = Verdict::Rejected(RejectReason::ReplayMismatch {
            cosine: 0.0,
            rel_error: 1.0,
        });
        if self.reputation.record(peer, &mismatch, true).is_some() {
            return self.banned(slot);
        }
        Vec::new()
    }

    fn carry_out(&mut self, actions: Vec<CheckAction>, rng: &mut ChaCha8Rng) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                CheckAction::Passed { lease, .. } => queue.extend(self.decide(lease, true, true)),
                CheckAction::Failed { lease, .. } => queue.extend(self.decide(lease, false, true)),
                CheckAction::ReplayYourself { lease, .. } => {
                    self.report.own_replays += 1;
                    let sub = &self.subs[&lease];
                    let truth = honest(sub.round, sub.shard, rng);
                    queue.extend(self.book.truth(lease, truth));
                }
                CheckAction::BanChecker { peer, .. } => {
                    if let Some(slot) = self.slot_of(peer) {
                        self.reputation.ban(peer, "check differs from the truth");
                        queue.extend(self.banned(slot));
                    }
                }
                CheckAction::Credit { .. } | CheckAction::Void { .. } => {}
                CheckAction::Distrust { submitter } => self.reputation.distrust(&submitter),
                CheckAction::Overturned { submitter, .. } => {
                    if let Some(slot) = self.slot_of(submitter) {
                        self.reputation.ban(submitter, "overturned");
                        queue.extend(self.banned(slot));
                    }
                }
            }
        }
    }

    fn slot_of(&self, peer: PeerKey) -> Option<usize> {
        self.slots.iter().position(|s| s.key == peer)
    }

    /// The identity in `slot` is banned: its accepted forged deltas of the open round are
    /// dropped, the ones already averaged in are found, and a new identity takes the slot.
    fn banned(&mut self, slot: usize) -> Vec<CheckAction> {
        let peer = self.slots[slot].key;
        match self.slots[slot].kind {
            Kind::Honest => self.report.honest_banned += 1,
            Kind::Liar => self.liar_checks.push(self.slots[slot].checks_done),
            Kind::Forger | Kind::PairForger(_) => self.report.forgers_banned += 1,
            Kind::Accomplice(_) => {}
        }
        let dropped: Vec<LeaseId> = self
            .accepted_forged
            .iter()
            .filter(|(_, p)| **p == peer)
            .map(|(l, _)| *l)
            .collect();
        for lease in dropped {
            self.accepted_forged.remove(&lease);
            self.report.forged_kept_out += 1;
        }
        if let Some(found) = self.averaged_by.remove(&peer) {
            self.report.forged_averaged_found_later += found;
        }
        // Its undecided submissions go with it (the round machine drops a banned peer's).
        for s in self.subs.values_mut() {
            if s.peer == peer && !s.decided {
                s.decided = true;
                self.report.forged_kept_out += s.forged as u64;
            }
        }
        self.slots[slot].key = PeerKey::random();
        self.slots[slot].checks_done = 0;
        self.book.banned(peer)
    }
}

/// Records `n` passed replays for `peer`.
fn earn_trust(reputation: &mut Reputation, peer: PeerKey, n: u32) {
    for _ in 0..n {
        reputation.record(peer, &Verdict::Accepted, true);
    }
}

/// An honest training's sketch of `shard` in `round`: the truth within hardware noise.
fn honest(round: Round, shard: ShardId, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut truth_rng = ChaCha8Rng::seed_from_u64((round.0 << 32) ^ shard.0 as u64);
    (0..SKETCH_LEN)
        .map(|_| {
            let v: f32 = truth_rng.random_range(-1.0..1.0);
            v * (1.0 + HONEST_NOISE * rng.random_range(-1.0..1.0))
        })
        .collect()
}

fn noise_vector(rng: &mut ChaCha8Rng, scale: f32) -> Vec<f32> {
    (0..SKETCH_LEN)
        .map(|_| scale * rng.random_range(-1.0f32..1.0))
        .collect()
}

fn passes(sketch: &[f32], truth: &[f32], cfg: &CheckSimConfig) -> bool {
    cfg.policy.tolerance.accepts(&agreement(sketch, truth))
}

#[cfg(test)]
mod tests;
