//! Check leases: which peer replays which submission, which checks are canaries, and what a
//! checker's report means (docs/checking.md). Pure and deterministic like the round machine:
//! the shell feeds it submissions, requests, reports, the coordinator's own replays and the
//! time, and carries out the [`CheckAction`]s it returns. Draws (spot checks, canaries) are
//! hashes of the run seed and the check's id, reproducible for tests and unknown to peers.
//!
//! A submission drawn for a replay becomes a *target*: `needed` checks are handed to trusted
//! peers that ask for work (never its submitter, never the same peer twice). Each report is
//! compared with the submitter's sketch. All agree: the target passes (after a spot check by the
//! coordinator, drawn at `spot_rate`). One disagrees, no checker takes it in time, or a check
//! expires: the coordinator replays it itself, and its replay (the *truth*) decides for the
//! submitter and for every checker that reported on it. A target with a truth stays known for
//! the rest of its round, and may be handed out again as a canary.

use std::collections::{BTreeMap, HashMap, VecDeque};

use herd_protocol::sketch::{Agreement, agreement};
use herd_protocol::{LeaseId, Round, ShardId};

use crate::round::PeerKey;
use crate::verify::replay::ReplayTolerance;
use crate::verify::reputation::seeded_draw;

/// Check ids start here, apart from the round machine's lease ids (which count from 1).
pub const FIRST_CHECK_ID: u64 = 1 << 62;
/// Submitters a checker's agreement is remembered for, to reopen them if it is banned.
const VOUCHED_MEMORY: usize = 256;

pub use types::{CheckAction, CheckGrant, CheckPolicy, OwnReplay, ReportRefused};

#[derive(Debug)]
struct Target {
    submitter: PeerKey,
    round: Round,
    shard: ShardId,
    sketch: Vec<f32>,
    /// Checks still to hand out.
    needed: u32,
    /// Peers that were given a check of it (out, agreed or disagreed).
    checkers: Vec<PeerKey>,
    /// Reports in, kept until the target is decided or has a truth.
    reports: Vec<Report>,
    /// Checks out, not reported yet.
    out: u32,
    since_ms: u64,
    /// The coordinator's own replay, once it did one.
    truth: Option<Vec<f32>>,
    /// A replay of our own has been asked for and not reported yet.
    replaying: bool,
    /// Its verdict was given (passed or failed).
    decided: bool,
}

impl Target {
    /// A target with nothing handed out, reported or decided yet.
    fn new(submitter: PeerKey, round: Round, shard: ShardId, sketch: Vec<f32>) -> Self {
        Target {
            submitter,
            round,
            shard,
            sketch,
            needed: 0,
            checkers: Vec::new(),
            reports: Vec::new(),
            out: 0,
            since_ms: 0,
            truth: None,
            replaying: false,
            decided: false,
        }
    }
}

#[derive(Debug)]
struct Report {
    checker: PeerKey,
    check: LeaseId,
    sketch: Vec<f32>,
    /// It agreed with the submitter and was credited then.
    credited: bool,
}

#[derive(Debug)]
struct Out {
    checker: PeerKey,
    target: LeaseId,
    expires_at_ms: u64,
}

/// The check leases of the open round and what is known of them.
#[derive(Debug)]
pub struct CheckBook {
    policy: CheckPolicy,
    seed: u64,
    next_id: u64,
    /// Requests for a check so far: each canary draw is a fresh one.
    asks: u64,
    /// Submissions being checked, and decided ones of the open round (canary material).
    targets: BTreeMap<LeaseId, Target>,
    out: HashMap<LeaseId, Out>,
    /// Per checker: the submitters whose targets it agreed with, newest last.
    vouched: HashMap<PeerKey, VecDeque<(LeaseId, PeerKey)>>,
}

impl CheckBook {
    pub fn new(policy: CheckPolicy, seed: u64) -> Self {
        CheckBook {
            policy,
            seed,
            next_id: FIRST_CHECK_ID,
            asks: 0,
            targets: BTreeMap::new(),
            out: HashMap::new(),
            vouched: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &CheckPolicy {
        &self.policy
    }

    /// Whether `lease` is a check id (not a training lease's).
    pub fn is_check(lease: LeaseId) -> bool {
        lease.0 >= FIRST_CHECK_ID
    }

    /// Checks handed out and not reported.
    pub fn out_count(&self) -> usize {
        self.out.len()
    }

    /// A submission to be checked by `checkers` peers.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        lease: LeaseId,
        submitter: PeerKey,
        round: Round,
        shard: ShardId,
        sketch: Vec<f32>,
        checkers: u32,
        now_ms: u64,
    ) {
        let mut target = Target::new(submitter, round, shard, sketch);
        target.needed = checkers.max(1);
        target.since_ms = now_ms;
        self.targets.insert(lease, target);
    }

    /// A check for `peer` (trusted, asking for work in `round`), if one is waiting: the oldest
    /// target it may check, or else, drawn at `canary_rate`, a canary.
    pub fn assign(&mut self, peer: PeerKey, round: Round, now_ms: u64) -> Option<CheckGrant> {
        if self.out.values().any(|o| o.checker == peer) {
            return None; // one check at a time
        }
        self.asks += 1;
        let may_check = |t: &Target| {
            t.round == round && t.submitter != peer && !t.checkers.contains(&peer) && !t.decided
        };
        let real = self
            .targets
            .iter()
            .find(|(_, t)| may_check(t) && t.needed > 0 && t.truth.is_none() && !t.replaying)
            .map(|(lease, _)| *lease);
        let target = match real {
            Some(lease) => lease,
            None => {
                let ask = self.asks;
                let canary = self
                    .targets
                    .iter()
                    .find(|(_, t)| {
                        t.round == round
                            && t.submitter != peer
                            && !t.checkers.contains(&peer)
                            && t.truth.is_some()
                    })
                    .map(|(lease, _)| *lease);
                match canary {
                    Some(lease) if self.draw(b"herd/canary", ask) < self.policy.canary_rate => {
                        lease
                    }
                    _ => return None,
                }
            }
        };
        let check = LeaseId(self.next_id);
        self.next_id += 1;
        let t = self.targets.get_mut(&target).expect("found above");
        if t.truth.is_none() {
            t.needed -= 1;
        }
        t.out += 1;
        t.checkers.push(peer);
        let expires_at_ms = now_ms + self.policy.lease_ms;
        self.out.insert(
            check,
            Out {
                checker: peer,
                target,
                expires_at_ms,
            },
        );
        Some(CheckGrant {
            check,
            target,
            round: t.round,
            shard: t.shard,
            expires_at_ms,
        })
    }

    /// A checker's sketch for `check`.
    pub fn report(
        &mut self,
        check: LeaseId,
        peer: PeerKey,
        round: Round,
        shard: ShardId,
        sketch: Vec<f32>,
    ) -> Result<Vec<CheckAction>, ReportRefused> {
        let out = self.out.get(&check).ok_or(ReportRefused::Unknown)?;
        if out.checker != peer {
            return Err(ReportRefused::NotYours);
        }
        let t = self
            .targets
            .get(&out.target)
            .ok_or(ReportRefused::Unknown)?;
        if t.round != round || t.shard != shard {
            return Err(ReportRefused::Mismatch);
        }
        let target = out.target;
        self.out.remove(&check);
        let tolerance = self.policy.tolerance;
        let t = self.targets.get_mut(&target).expect("checked above");
        t.out -= 1;
        if sketch.len() != t.sketch.len() {
            if t.truth.is_none() {
                t.needed += 1; // handed out again
            }
            return Ok(vec![CheckAction::BanChecker {
                peer,
                check,
                shard,
                reason: format!(
                    "check report of {} sketch values, {} expected",
                    sketch.len(),
                    t.sketch.len()
                ),
            }]);
        }
        if let Some(truth) = &t.truth {
            return Ok(vec![judge_checker(
                peer, check, shard, &sketch, truth, &tolerance,
            )]);
        }
        let with_submitter = agreement(&t.sketch, &sketch);
        let agrees = tolerance.accepts(&with_submitter);
        t.reports.push(Report {
            checker: peer,
            check,
            sketch,
            credited: agrees,
        });
        let mut actions = Vec::new();
        if !agrees {
            if !t.replaying {
                t.replaying = true;
                actions.push(CheckAction::ReplayYourself {
                    lease: target,
                    why: OwnReplay::Arbitration,
                });
            }
            return Ok(actions);
        }
        actions.push(CheckAction::Credit {
            peer,
            check,
            shard,
            agreement: with_submitter,
        });
        if t.needed == 0 && t.out == 0 && !t.replaying && !t.decided {
            if self.draw(b"herd/spot", target.0) < self.policy.spot_rate {
                let t = self.targets.get_mut(&target).expect("checked above");
                t.replaying = true;
                actions.push(CheckAction::ReplayYourself {
                    lease: target,
                    why: OwnReplay::Spot,
                });
            } else {
                actions.extend(self.pass(target, with_submitter));
            }
        }
        Ok(actions)
    }

    /// The coordinator's own replay of `lease`: it decides for the submitter (unless its
    /// verdict was already given) and for every checker that reported on it.
    pub fn truth(&mut self, lease: LeaseId, truth: Vec<f32>) -> Vec<CheckAction> {
        let tolerance = self.policy.tolerance;
        let Some(t) = self.targets.get_mut(&lease) else {
            return Vec::new(); // its round closed meanwhile
        };
        t.replaying = false;
        let mut actions = Vec::new();
        let shard = t.shard;
        for r in std::mem::take(&mut t.reports) {
            match judge_checker(r.checker, r.check, shard, &r.sketch, &truth, &tolerance) {
                CheckAction::Credit { .. } if r.credited => {}
                judged => actions.push(judged),
            }
        }
        let submitter = agreement(&t.sketch, &truth);
        let honest = tolerance.accepts(&submitter);
        t.truth = Some(truth);
        if !t.decided {
            t.decided = true;
            actions.push(if honest {
                CheckAction::Passed {
                    lease,
                    agreement: submitter,
                }
            } else {
                CheckAction::Failed {
                    lease,
                    agreement: submitter,
                }
            });
        } else if !honest {
            actions.push(CheckAction::Overturned {
                lease,
                submitter: t.submitter,
                agreement: submitter,
            });
        }
        actions
    }

    /// A submission of the open round the coordinator replayed itself outside the book (a
    /// newcomer's, with no checkers yet): its truth is known, so it can serve as a canary.
    pub fn known(
        &mut self,
        lease: LeaseId,
        submitter: PeerKey,
        round: Round,
        shard: ShardId,
        truth: Vec<f32>,
    ) {
        let mut target = Target::new(submitter, round, shard, truth.clone());
        target.truth = Some(truth);
        target.decided = true;
        self.targets.insert(lease, target);
    }

    /// The coordinator could not replay `lease` (its own failure, not anyone's fault): the
    /// submission passes on the earlier layers, and no checker is judged by it.
    pub fn unjudged(&mut self, lease: LeaseId) -> Vec<CheckAction> {
        let Some(t) = self.targets.get_mut(&lease) else {
            return Vec::new();
        };
        t.replaying = false;
        let mut actions = void_waiting(std::mem::take(&mut t.reports));
        if t.decided {
            return actions;
        }
        t.decided = true;
        let agreement = Agreement {
            cosine: f64::NAN,
            rel_error: f64::NAN,
        };
        actions.push(CheckAction::Passed { lease, agreement });
        actions
    }

    /// Drops `lease` from the book (its submission was rejected outside it): its checks out
    /// are moot, and reports waiting for its arbitration are answered unjudged.
    pub fn forget(&mut self, lease: LeaseId) -> Vec<CheckAction> {
        self.out.retain(|_, o| o.target != lease);
        self.targets
            .remove(&lease)
            .map(|t| void_waiting(t.reports))
            .unwrap_or_default()
    }

    /// Round and shard of a target still in the book.
    pub fn target(&self, lease: LeaseId) -> Option<(Round, ShardId)> {
        self.targets.get(&lease).map(|t| (t.round, t.shard))
    }

    fn pass(&mut self, lease: LeaseId, agreement: Agreement) -> Vec<CheckAction> {
        let t = self.targets.get_mut(&lease).expect("caller checked");
        t.decided = true;
        let submitter = t.submitter;
        // The reports stay: a reopened replay judges every checker that vouched.
        for r in &t.reports {
            let v = self.vouched.entry(r.checker).or_default();
            if v.len() == VOUCHED_MEMORY {
                v.pop_front();
            }
            v.push_back((lease, submitter));
        }
        vec![CheckAction::Passed { lease, agreement }]
    }

    /// A draw in [0, 1) fixed by the run seed, a label and `n`.
    fn draw(&self, label: &[u8], n: u64) -> f64 {
        seeded_draw(self.seed, label, n)
    }
}

/// [`CheckAction::Void`] for the reports among `reports` still waiting for their answer (an
/// agreeing report was answered when it was credited).
fn void_waiting(reports: Vec<Report>) -> Vec<CheckAction> {
    reports
        .into_iter()
        .filter(|r| !r.credited)
        .map(|r| CheckAction::Void {
            peer: r.checker,
            check: r.check,
        })
        .collect()
}

/// Credit for a report that agrees with the truth, a ban for one that does not.
fn judge_checker(
    peer: PeerKey,
    check: LeaseId,
    shard: ShardId,
    sketch: &[f32],
    truth: &[f32],
    tol: &ReplayTolerance,
) -> CheckAction {
    let a = agreement(sketch, truth);
    if tol.accepts(&a) {
        CheckAction::Credit {
            peer,
            check,
            shard,
            agreement: a,
        }
    } else {
        CheckAction::BanChecker {
            peer,
            check,
            shard,
            reason: format!(
                "check differs from the coordinator's replay: cosine {:.4}, relative error {:.4}",
                a.cosine, a.rel_error
            ),
        }
    }
}

mod ending;
mod types;

#[cfg(test)]
mod tests;
