//! The lease rules of the round machine: granting a shard fairly, checking a submission's
//! lease, ending leases (expiry, rejection, return, a backup's accepted first), and taking a
//! banned peer's leases and shards.

use herd_protocol::messages::{RejectReason, Verdict};
use herd_protocol::{ContentId, LeaseId, Round, ShardId};

use super::fairness::Barred;
use super::{
    Action, DURATION_WARMUP, Grant, LeaseRecord, LeaseState, PeerKey, Phase, RoundMachine,
};

/// How long a banned peer is told to wait before asking again.
const BANNED_RETRY_MS: u64 = 3600 * 1000;

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
            LeaseState::Superseded => return Err((RejectReason::ShardTaken, false)),
            LeaseState::Active => {}
        }
        if base_adapter != self.adapter {
            return Err((RejectReason::WrongBaseAdapter, true));
        }
        Ok(())
    }

    /// Marks `lease` finished in `state` and lets go of its shard if it still holds it (a
    /// backup lease on the shard, if any, becomes its holder).
    pub(super) fn end_lease(&mut self, lease: LeaseId, state: LeaseState) {
        let Some(r) = self.leases.get_mut(&lease) else {
            return;
        };
        r.state = state;
        if r.round != self.round {
            return;
        }
        let (s, peer) = (r.shard.0 as usize, r.peer);
        if self.holders[s] == Some(lease) {
            self.holders[s] = self.backups[s].take();
            if self.holders[s].is_none() {
                self.free_since_ms[s] = self.now_ms;
            }
        } else if self.backups[s] == Some(lease) {
            self.backups[s] = None;
        } else {
            return;
        }
        if let Some(held) = self.by_peer.get_mut(&peer) {
            held.retain(|l| *l != lease);
            if held.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }

    /// Ends the other live lease on `shard` once `accepted`'s delta counts for it.
    pub(super) fn supersede_others(&mut self, shard: ShardId, accepted: LeaseId) {
        let s = shard.0 as usize;
        let others = [self.holders[s], self.backups[s]];
        for other in others.into_iter().flatten().filter(|l| *l != accepted) {
            if self.leases.get(&other).map(|r| r.state) == Some(LeaseState::Active) {
                self.end_lease(other, LeaseState::Superseded);
            }
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

    /// A lease for `peer` (`trusted`: in good standing), or why not. In order: a peer backing
    /// off or banned gets nothing; a peer at its live-lease limit gets a free shard only if it
    /// is trusted and the shard has sat idle; peers not trusted share a capped number of
    /// shards; a free shard goes to whoever asks; with none free, a trusted peer may back up a
    /// shard that a peer not trusted has held for too long.
    pub(super) fn grant(&mut self, peer: PeerKey, trusted: bool, now_ms: u64) -> Action {
        let no_work = |retry_after_ms: u64, reason: String| Action::NoWork {
            peer,
            retry_after_ms,
            finished: false,
            reason,
        };
        match self.phase {
            Phase::Finished => {
                return Action::NoWork {
                    peer,
                    retry_after_ms: 0,
                    finished: true,
                    reason: "run finished".into(),
                };
            }
            Phase::Aggregating => return no_work(250, "aggregating the round".into()),
            Phase::Open => {}
        }
        match self.fairness.barred(&peer, now_ms) {
            Some(Barred::Banned) => {
                return no_work(
                    BANNED_RETRY_MS,
                    "banned: leases expired without a submission".into(),
                );
            }
            Some(Barred::BackingOff { until_ms, misses }) => {
                return no_work(
                    until_ms - now_ms,
                    format!("backing off: {misses} leases in a row ended without a submission"),
                );
            }
            None => {}
        }
        let policy = &self.cfg.leases;
        let held = self.live_leases_of(&peer);
        let free =
            |s: &ShardId| self.holders[s.0 as usize].is_none() && !self.accepted.contains_key(s);
        let shard = if held >= policy.per_peer as usize {
            let idle =
                |s: &ShardId| now_ms >= self.free_since_ms[s.0 as usize] + policy.idle_grace_ms;
            let extra = (0..self.cfg.shards)
                .map(ShardId)
                .find(|s| free(s) && idle(s));
            match extra {
                Some(shard) if trusted => shard,
                _ => {
                    return no_work(
                        self.soonest_free_ms(now_ms),
                        format!("this peer already holds {held} live lease(s)"),
                    );
                }
            }
        } else if let Some(shard) = (0..self.cfg.shards).map(ShardId).find(free) {
            let cap = policy.newcomer_cap(self.cfg.shards);
            if !trusted && self.newcomer_shards() >= cap as usize {
                return no_work(
                    self.soonest_free_ms(now_ms),
                    format!("peers not yet trusted hold the {cap} shard(s) they may hold at once"),
                );
            }
            shard
        } else if let Some(shard) = trusted.then(|| self.backup_candidate(now_ms)).flatten() {
            return self.issue(peer, shard, trusted, now_ms, true);
        } else {
            return no_work(
                self.soonest_free_ms(now_ms),
                "every shard of the round is leased".into(),
            );
        };
        self.issue(peer, shard, trusted, now_ms, false)
    }

    /// Records a new lease on `shard` (as its holder, or as its backup) and the grant to send.
    fn issue(
        &mut self,
        peer: PeerKey,
        shard: ShardId,
        trusted: bool,
        now_ms: u64,
        backup: bool,
    ) -> Action {
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
                trusted,
                granted_at_ms: now_ms,
                submitted_at_ms: 0,
            },
        );
        let slot = if backup {
            &mut self.backups
        } else {
            &mut self.holders
        };
        slot[shard.0 as usize] = Some(lease);
        self.by_peer.entry(peer).or_default().push(lease);
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

    /// The records of the leases holding shards of the open round (holders and backups).
    fn holding(&self) -> impl Iterator<Item = &LeaseRecord> {
        self.holders
            .iter()
            .chain(&self.backups)
            .flatten()
            .filter_map(|l| self.leases.get(l))
    }

    /// Live (not yet submitted) leases `peer` holds in the open round.
    fn live_leases_of(&self, peer: &PeerKey) -> usize {
        self.by_peer.get(peer).map_or(0, |held| {
            held.iter()
                .filter(|l| {
                    self.leases
                        .get(l)
                        .is_some_and(|r| r.state == LeaseState::Active)
                })
                .count()
        })
    }

    /// Shards held (live or being verified) by peers that were not trusted when they got them.
    fn newcomer_shards(&self) -> usize {
        self.holders
            .iter()
            .flatten()
            .filter_map(|l| self.leases.get(l))
            .filter(|r| !r.trusted)
            .count()
    }

    /// A shard whose holder is not trusted and has held it past `backup_after` times the
    /// median time from grant to accepted submission, and that has no backup yet.
    fn backup_candidate(&self, now_ms: u64) -> Option<ShardId> {
        let multiple = self.cfg.leases.backup_after;
        if multiple <= 0.0 || self.submit_times.len() < DURATION_WARMUP {
            return None;
        }
        let mut times: Vec<u64> = self.submit_times.iter().copied().collect();
        times.sort_unstable();
        let patience = (times[times.len() / 2] as f64 * multiple) as u64;
        (0..self.cfg.shards).map(ShardId).find(|s| {
            let i = s.0 as usize;
            let holder = self.holders[i].and_then(|l| self.leases.get(&l));
            self.backups[i].is_none()
                && holder.is_some_and(|r| {
                    !r.trusted
                        && r.state == LeaseState::Active
                        && now_ms >= r.granted_at_ms + patience
                })
        })
    }

    /// How long until a held shard's lease expires (bounded, as a retry hint).
    fn soonest_free_ms(&self, now_ms: u64) -> u64 {
        self.holding()
            .map(|r| r.expires_at_ms.saturating_sub(now_ms))
            .min()
            .unwrap_or(1000)
            .clamp(100, 2000)
    }

    /// Ends the live leases whose time is up; each counts against its peer (and may ban it).
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
        for lease in expired {
            self.end_lease(lease, LeaseState::Expired);
            let r = &self.leases[&lease];
            let (peer, shard) = (r.peer, r.shard);
            out.push(Action::LeaseExpired { peer, lease, shard });
            if let Some(reason) = self.fairness.missed(&self.cfg.leases, peer, true, now_ms) {
                out.push(Action::Banned { peer, reason });
            }
        }
        out
    }
}
