//! The lease rules of the round machine: granting a shard, checking a submission's lease,
//! ending leases (expiry, rejection, return), and taking a banned peer's leases and shards.

use herd_protocol::messages::{RejectReason, Verdict};
use herd_protocol::{ContentId, LeaseId, Round, ShardId};

use super::{Action, Grant, LeaseRecord, LeaseState, PeerKey, Phase, RoundMachine};

impl RoundMachine {
    /// The lease rules. The error says whether the lease was live and the peer's (then a
    /// rejection ends it and the shard is reissued).
    pub(super) fn check_lease(
        &self,
        peer: PeerKey,
        lease: LeaseId,
        round: Round,
        shard: ShardId,
        base_adapter: ContentId,
    ) -> Result<(), (RejectReason, bool)> {
        let record = self
            .leases
            .get(&lease)
            .ok_or((RejectReason::UnknownLease, false))?;
        if record.peer != peer {
            return Err((RejectReason::NotYourLease, false));
        }
        if record.round != round || record.shard != shard {
            return Err((RejectReason::LeaseMismatch, false));
        }
        match record.state {
            LeaseState::Verifying | LeaseState::Accepted | LeaseState::Rejected => {
                return Err((RejectReason::Duplicate, false));
            }
            _ if record.round != self.round || self.phase != Phase::Open => {
                return Err((RejectReason::StaleRound, false));
            }
            LeaseState::Expired => return Err((RejectReason::ExpiredLease, false)),
            LeaseState::Returned => return Err((RejectReason::UnknownLease, false)),
            LeaseState::Active => {}
        }
        if base_adapter != self.adapter {
            return Err((RejectReason::WrongBaseAdapter, true));
        }
        Ok(())
    }

    /// Marks `lease` finished in `state` and frees its shard if it still holds it.
    pub(super) fn end_lease(&mut self, lease: LeaseId, state: LeaseState) {
        let Some(r) = self.leases.get_mut(&lease) else {
            return;
        };
        r.state = state;
        if r.round == self.round && self.holders[r.shard.0 as usize] == Some(lease) {
            self.holders[r.shard.0 as usize] = None;
        }
    }

    pub(super) fn ban(&mut self, peer: PeerKey, reason: &str) -> Vec<Action> {
        let mut actions = Vec::new();
        // Submissions still being verified are decided now.
        let mut verifying: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, r)| r.peer == peer && r.state == LeaseState::Verifying)
            .map(|(id, _)| *id)
            .collect();
        verifying.sort();
        for lease in verifying {
            self.end_lease(lease, LeaseState::Rejected);
            actions.push(Action::Verdict {
                peer,
                lease,
                verdict: Verdict::Rejected(RejectReason::Banned(reason.to_string())),
            });
        }
        if self.phase == Phase::Open {
            let dropped: Vec<ShardId> = self
                .accepted
                .iter()
                .filter(|(_, a)| a.peer == peer)
                .map(|(s, _)| *s)
                .collect();
            for shard in dropped {
                let a = self.accepted.remove(&shard).expect("listed above");
                actions.push(Action::Excluded {
                    peer: a.peer,
                    lease: a.lease,
                    round: self.round,
                    shard,
                });
            }
        }
        let live: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, r)| r.peer == peer && r.state == LeaseState::Active)
            .map(|(id, _)| *id)
            .collect();
        for lease in live {
            self.end_lease(lease, LeaseState::Returned);
        }
        actions
    }

    pub(super) fn grant(&mut self, peer: PeerKey, now_ms: u64) -> Action {
        match self.phase {
            Phase::Finished => {
                return Action::NoWork {
                    peer,
                    retry_after_ms: 0,
                    finished: true,
                    reason: "run finished".into(),
                };
            }
            Phase::Aggregating => {
                return Action::NoWork {
                    peer,
                    retry_after_ms: 250,
                    finished: false,
                    reason: "aggregating the round".into(),
                };
            }
            Phase::Open => {}
        }
        let open = (0..self.cfg.shards)
            .map(ShardId)
            .find(|s| self.holders[s.0 as usize].is_none() && !self.accepted.contains_key(s));
        let Some(shard) = open else {
            let soonest = self
                .holders
                .iter()
                .flatten()
                .filter_map(|l| self.leases.get(l))
                .map(|r| r.expires_at_ms.saturating_sub(now_ms))
                .min()
                .unwrap_or(1000);
            return Action::NoWork {
                peer,
                retry_after_ms: soonest.clamp(100, 2000),
                finished: false,
                reason: "every shard of the round is leased".into(),
            };
        };
        let lease = LeaseId(self.next_lease);
        self.next_lease += 1;
        let expires_at_ms = now_ms + self.cfg.lease_ms;
        self.earliest_expiry_ms = self.earliest_expiry_ms.min(expires_at_ms);
        self.leases.insert(
            lease,
            LeaseRecord {
                peer,
                round: self.round,
                shard,
                expires_at_ms,
                state: LeaseState::Active,
                tokens: 0,
            },
        );
        self.holders[shard.0 as usize] = Some(lease);
        Action::Grant {
            peer,
            grant: Grant {
                lease,
                round: self.round,
                shard,
                ranges: self.shard_ranges(self.round, shard),
                seed: self.shard_seed(self.round, shard),
                expires_at_ms,
                base_adapter: self.adapter,
            },
        }
    }

    pub(super) fn expire(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if now_ms < self.earliest_expiry_ms {
            return out;
        }
        let active = || {
            self.leases
                .iter()
                .filter(|(_, r)| r.state == LeaseState::Active)
        };
        self.earliest_expiry_ms = active()
            .map(|(_, r)| r.expires_at_ms)
            .filter(|&at| at > now_ms)
            .min()
            .unwrap_or(u64::MAX);
        let mut expired: Vec<LeaseId> = active()
            .filter(|(_, r)| now_ms >= r.expires_at_ms)
            .map(|(id, _)| *id)
            .collect();
        expired.sort();
        for id in expired {
            let r = self.leases.get_mut(&id).expect("listed above");
            r.state = LeaseState::Expired;
            if r.round == self.round && self.holders[r.shard.0 as usize] == Some(id) {
                self.holders[r.shard.0 as usize] = None;
            }
            out.push(Action::LeaseExpired {
                peer: r.peer,
                lease: id,
                shard: r.shard,
            });
        }
        out
    }
}
