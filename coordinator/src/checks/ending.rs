//! How checks end without a report: expiry (handed out again, or replayed by the coordinator
//! when nobody took them in time), a ban (of a checker or a submitter), the round's close.

use herd_protocol::{LeaseId, Round};

use super::{CheckAction, CheckBook, OwnReplay, void_waiting};
use crate::round::PeerKey;

impl CheckBook {
    /// Checks past their lease end (handed out again), and targets that waited past
    /// `take_ms` without all their checks taken (replayed by the coordinator).
    pub fn expire(&mut self, now_ms: u64) -> Vec<CheckAction> {
        let expired: Vec<LeaseId> = self
            .out
            .iter()
            .filter(|(_, o)| o.expires_at_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            // Handed out again; a target that has waited past `take_ms` goes to the
            // coordinator below.
            self.release(id);
        }
        let mut actions = Vec::new();
        for (lease, t) in &mut self.targets {
            let waiting = !t.decided && !t.replaying && t.truth.is_none() && t.needed > 0;
            if waiting && now_ms.saturating_sub(t.since_ms) >= self.policy.take_ms {
                t.replaying = true;
                actions.push(CheckAction::ReplayYourself {
                    lease: *lease,
                    why: OwnReplay::NoChecker,
                });
            }
        }
        actions
    }

    /// `peer` was banned: its checks out are void, its reports on undecided targets do not
    /// count (their checks are handed out again), its own undecided submissions need no
    /// checks, and every target it vouched for is reopened: replayed by the coordinator if it
    /// is still in the open round, and its submitter loses the trust those checks earned.
    /// Reports waiting on what is dropped are answered unjudged.
    pub fn banned(&mut self, peer: PeerKey) -> Vec<CheckAction> {
        let mut actions = Vec::new();
        let dropped: Vec<LeaseId> = self
            .targets
            .iter()
            .filter(|(_, t)| t.submitter == peer && !t.decided)
            .map(|(lease, _)| *lease)
            .collect();
        for lease in dropped {
            if let Some(t) = self.targets.remove(&lease) {
                actions.extend(void_waiting(t.reports));
            }
        }
        let voided: Vec<LeaseId> = self
            .out
            .iter()
            .filter(|(_, o)| o.checker == peer || !self.targets.contains_key(&o.target))
            .map(|(id, _)| *id)
            .collect();
        for id in voided {
            self.release(id);
        }
        for t in self.targets.values_mut() {
            let (its, others): (Vec<_>, Vec<_>) = std::mem::take(&mut t.reports)
                .into_iter()
                .partition(|r| r.checker == peer);
            t.reports = others;
            if !its.is_empty() && t.truth.is_none() && !t.decided {
                t.needed += 1;
            }
            actions.extend(void_waiting(its));
        }
        for (lease, submitter) in self.vouched.remove(&peer).unwrap_or_default() {
            actions.push(CheckAction::Distrust { submitter });
            if let Some(t) = self.targets.get_mut(&lease)
                && t.truth.is_none()
                && !t.replaying
            {
                t.replaying = true;
                actions.push(CheckAction::ReplayYourself {
                    lease,
                    why: OwnReplay::Reopened,
                });
            }
        }
        actions
    }

    /// The round closed: its targets and checks are moot (late reports are refused as
    /// unknown, which is no strike). Returns the submissions that were still undecided: they
    /// are stale now.
    pub fn close_round(&mut self, round: Round) -> Vec<LeaseId> {
        let undecided = self
            .targets
            .iter()
            .filter(|(_, t)| t.round <= round && !t.decided)
            .map(|(lease, _)| *lease)
            .collect();
        self.targets.retain(|_, t| t.round > round);
        let targets = &self.targets;
        self.out.retain(|_, o| targets.contains_key(&o.target));
        undecided
    }

    /// Takes back the check `id` unreported: its target needs it handed out again (unless
    /// the target's truth is known already).
    fn release(&mut self, id: LeaseId) {
        let Some(o) = self.out.remove(&id) else {
            return;
        };
        if let Some(t) = self.targets.get_mut(&o.target) {
            t.out -= 1;
            if t.truth.is_none() {
                t.needed += 1;
            }
        }
    }
}
