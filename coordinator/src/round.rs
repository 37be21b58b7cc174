//! The round state machine: pure and deterministic. It gets events and the time, and returns
//! actions; the I/O shell ([`crate::shell`]) does the networking, tensor work and storage around it.
//! That keeps every rule about leases and rounds testable with thousands of simulated peers.
//!
//! A round has `shards` shards. A peer asking for work gets an exclusive lease on an open
//! shard; the lease expires after `lease_ms` and the shard is reissued. A submission that
//! passes the lease rules and the shell's cheap checks is handed to verification (the
//! lease then no longer expires); the verification's outcome decides the verdict, and a
//! rejected shard is reissued at once. The round closes when `quorum` shards are accepted, or
//! past its straggler deadline (a multiple of recent rounds' durations) with at least
//! `deadline_quorum`; then the shell aggregates and reports back, and the next round opens.
//! A banned peer's accepted shards of the open round are dropped and reissued.
//!
//! Anyone may ask for work, so shards are shared fairly ([`LeasePolicy`], `leases.rs`): one
//! live lease per peer, a capped share for peers not yet trusted, backups by trusted peers of
//! shards a newcomer sits on, and a backoff, then a ban, for leases that end without a
//! submission (`fairness.rs`).

mod config;
mod events;
mod fairness;
mod leases;

use std::collections::{BTreeMap, HashMap};

use herd_protocol::messages::{RejectReason, Verdict};
use herd_protocol::{ContentId, LeaseId, Round, SampleRange, ShardId};

pub use config::{LeasePolicy, MachineConfig};
pub use events::{Accepted, Action, Event, Grant, PeerKey};

/// Quorum-closed rounds whose durations set the deadline, and how many must be known first.
const DURATION_WINDOW: usize = 16;
const DURATION_WARMUP: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    Active,
    /// Submitted and being verified; does not expire.
    Verifying,
    /// Verified and accepted: its delta counts for the shard.
    Accepted,
    /// Submitted and rejected; the shard was reissued.
    Rejected,
    Expired,
    Returned,
    /// Another lease's delta for the same shard was accepted first.
    Superseded,
}

#[derive(Debug, Clone)]
struct LeaseRecord {
    peer: PeerKey,
    round: Round,
    shard: ShardId,
    expires_at_ms: u64,
    state: LeaseState,
    /// Tokens the submission claims (known once submitted).
    tokens: u64,
    /// Whether its peer was trusted when it was granted.
    trusted: bool,
    granted_at_ms: u64,
    submitted_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Aggregating,
    Finished,
}

/// The coordinator's round logic. No I/O, no clock, no randomness beyond `cfg.seed`.
#[derive(Debug)]
pub struct RoundMachine {
    cfg: MachineConfig,
    round: Round,
    phase: Phase,
    adapter: ContentId,
    /// Per shard of the current round: the live lease, if any.
    holders: Vec<Option<LeaseId>>,
    /// Per shard: a trusted peer's second lease on a shard its holder sits on.
    backups: Vec<Option<LeaseId>>,
    /// Per peer: its leases among `holders` and `backups` (so a request needs no scan).
    by_peer: HashMap<PeerKey, Vec<LeaseId>>,
    /// Per shard: since when it has been free (for the idle grace of [`LeasePolicy`]).
    free_since_ms: Vec<u64>,
    /// Misses, backoffs and bans of peers.
    fairness: fairness::Fairness,
    /// How long recent accepted shards took from grant to submission.
    submit_times: std::collections::VecDeque<u64>,
    /// The time of the event being handled.
    now_ms: u64,
    accepted: BTreeMap<ShardId, Accepted>,
    leases: HashMap<LeaseId, LeaseRecord>,
    next_lease: u64,
    /// When the open round opened (set by the first event after it did: the machine has no
    /// clock of its own).
    opened_at_ms: Option<u64>,
    /// How long recent rounds took to reach quorum.
    durations: std::collections::VecDeque<u64>,
    /// No active lease expires before this: a lower bound (leases that end early leave it
    /// low until the next scan), so events before it skip the scan of every lease record.
    earliest_expiry_ms: u64,
}

impl RoundMachine {
    /// Opens round 0 on `adapter`.
    pub fn new(cfg: MachineConfig, adapter: ContentId) -> Self {
        assert!(
            cfg.shards > 0 && cfg.quorum > 0 && cfg.quorum <= cfg.shards,
            "invalid shard/quorum config"
        );
        let phase = if cfg.rounds == 0 {
            Phase::Finished
        } else {
            Phase::Open
        };
        RoundMachine {
            holders: vec![None; cfg.shards as usize],
            backups: vec![None; cfg.shards as usize],
            by_peer: HashMap::new(),
            free_since_ms: vec![0; cfg.shards as usize],
            fairness: fairness::Fairness::default(),
            submit_times: std::collections::VecDeque::new(),
            now_ms: 0,
            cfg,
            round: Round(0),
            phase,
            adapter,
            accepted: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 1,
            opened_at_ms: None,
            durations: std::collections::VecDeque::new(),
            // The first event scans (and so sees leases a resume put in).
            earliest_expiry_ms: 0,
        }
    }

    /// Picks a run up where a stopped coordinator left it: `round` open on `adapter`, with
    /// the shards `accepted` so far and the leases still out (`(lease, peer, shard,
    /// expires_at_ms)`); new leases are numbered from `first_lease`. Returns the actions due at
    /// once: [`Action::Aggregate`] if the round had reached quorum before the stop, or
    /// [`Action::Finished`].
    pub fn resume(
        cfg: MachineConfig,
        round: Round,
        adapter: ContentId,
        accepted: Vec<Accepted>,
        live: Vec<(LeaseId, PeerKey, ShardId, u64)>,
        first_lease: u64,
    ) -> (Self, Vec<Action>) {
        let mut m = RoundMachine::new(cfg, adapter);
        m.round = round;
        m.next_lease = first_lease;
        if round.0 >= m.cfg.rounds {
            m.phase = Phase::Finished;
            return (m, vec![Action::Finished { rounds: round.0 }]);
        }
        for a in accepted {
            if a.shard.0 < m.cfg.shards {
                m.accepted.insert(a.shard, a);
            }
        }
        if m.accepted.len() >= m.cfg.quorum as usize {
            let actions = m.close_round();
            return (m, actions);
        }
        for (lease, peer, shard, expires_at_ms) in live {
            let free = shard.0 < m.cfg.shards
                && !m.accepted.contains_key(&shard)
                && m.holders[shard.0 as usize].is_none();
            if !free {
                continue;
            }
            m.holders[shard.0 as usize] = Some(lease);
            m.by_peer.entry(peer).or_default().push(lease);
            m.leases.insert(
                lease,
                LeaseRecord {
                    peer,
                    round,
                    shard,
                    expires_at_ms,
                    state: LeaseState::Active,
                    tokens: 0,
                    trusted: false,
                    granted_at_ms: expires_at_ms.saturating_sub(m.cfg.lease_ms),
                    submitted_at_ms: 0,
                },
            );
        }
        (m, Vec::new())
    }

    pub fn round(&self) -> Round {
        self.round
    }

    pub fn adapter(&self) -> ContentId {
        self.adapter
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether the current round takes submissions (not aggregating, not finished).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Shards of the current round accepted so far.
    pub fn accepted_count(&self) -> usize {
        self.accepted.len()
    }

    /// Live leases of the open round (holders and backups that have not submitted yet).
    pub fn active_lease_count(&self) -> usize {
        self.holders
            .iter()
            .chain(&self.backups)
            .flatten()
            .filter(|l| {
                self.leases
                    .get(l)
                    .is_some_and(|r| r.state == LeaseState::Active)
            })
            .count()
    }

    /// See [`MachineConfig::shard_ranges`].
    pub fn shard_ranges(&self, round: Round, shard: ShardId) -> Vec<SampleRange> {
        self.cfg.shard_ranges(round, shard)
    }

    /// See [`MachineConfig::shard_seed`].
    pub fn shard_seed(&self, round: Round, shard: ShardId) -> u64 {
        self.cfg.shard_seed(round, shard)
    }

    /// The time the open round closes without quorum, if there is one yet.
    pub fn deadline_ms(&self) -> Option<u64> {
        if self.phase != Phase::Open
            || self.cfg.straggler_multiple <= 0.0
            || self.durations.len() < DURATION_WARMUP
        {
            return None;
        }
        let mut d: Vec<u64> = self.durations.iter().copied().collect();
        d.sort_unstable();
        let median = d[d.len() / 2];
        Some(self.opened_at_ms? + (median as f64 * self.cfg.straggler_multiple) as u64)
    }

    /// Feeds one event at time `now_ms`; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Vec<Action> {
        self.now_ms = now_ms;
        if self.phase == Phase::Open && self.opened_at_ms.is_none() {
            self.opened_at_ms = Some(now_ms);
            for t in &mut self.free_since_ms {
                *t = (*t).max(now_ms);
            }
        }
        let mut actions = self.expire(now_ms);
        actions.extend(self.check_deadline(now_ms));
        match event {
            Event::Tick => {}
            Event::LeaseRequested { peer, trusted } => {
                actions.push(self.grant(peer, trusted, now_ms))
            }
            Event::Submitted {
                peer,
                lease,
                round,
                shard,
                base_adapter,
                tokens,
                checked,
            } => {
                let lease_ok = self.check_lease(peer, lease, round, shard, base_adapter);
                match lease_ok.and_then(|()| checked.map_err(|r| (r, true))) {
                    Ok(()) => {
                        let record = self.leases.get_mut(&lease).expect("checked above");
                        record.state = LeaseState::Verifying;
                        record.tokens = tokens;
                        record.submitted_at_ms = now_ms;
                        actions.push(Action::Verify {
                            peer,
                            lease,
                            round,
                            shard,
                        });
                    }
                    Err((reason, lease_was_live)) => {
                        if lease_was_live {
                            self.end_lease(lease, LeaseState::Rejected);
                        }
                        actions.push(Action::Verdict {
                            peer,
                            lease,
                            verdict: Verdict::Rejected(reason),
                        });
                    }
                }
            }
            Event::Verified { lease, result } => {
                actions.extend(self.verified(lease, result, now_ms));
            }
            Event::Banned { peer, reason } => actions.extend(self.ban(peer, &reason)),
            Event::Returned { peer, lease } => {
                let released = matches!(
                    self.leases.get(&lease),
                    Some(r) if r.peer == peer && r.state == LeaseState::Active
                );
                if released {
                    self.end_lease(lease, LeaseState::Returned);
                    let policy = &self.cfg.leases;
                    // Handing back is honest but still a shard someone else could have had:
                    // it backs the peer off, and never bans.
                    self.fairness.missed(policy, peer, false, now_ms);
                }
                actions.push(Action::Returned {
                    peer,
                    lease,
                    released,
                });
            }
            Event::Aggregated { round, adapter } => {
                if self.phase == Phase::Aggregating && round == self.round {
                    actions.extend(self.open_next(adapter));
                }
            }
        }
        actions
    }

    fn verified(
        &mut self,
        lease: LeaseId,
        result: Result<(), RejectReason>,
        now_ms: u64,
    ) -> Vec<Action> {
        let Some(record) = self.leases.get(&lease) else {
            return Vec::new();
        };
        if record.state != LeaseState::Verifying {
            return Vec::new(); // e.g. its peer was banned meanwhile
        }
        let (peer, shard, tokens) = (record.peer, record.shard, record.tokens);
        let took_ms = record.submitted_at_ms.saturating_sub(record.granted_at_ms);
        let current = record.round == self.round && self.phase == Phase::Open;
        let verdict = match result {
            Ok(()) if current && self.accepted.contains_key(&shard) => {
                self.end_lease(lease, LeaseState::Superseded);
                Verdict::Rejected(RejectReason::ShardTaken)
            }
            Ok(()) if current => {
                self.end_lease(lease, LeaseState::Accepted);
                self.supersede_others(shard, lease);
                self.fairness.delivered(&peer);
                if self.submit_times.len() == DURATION_WINDOW {
                    self.submit_times.pop_front();
                }
                self.submit_times.push_back(took_ms);
                self.accepted.insert(
                    shard,
                    Accepted {
                        lease,
                        peer,
                        shard,
                        tokens,
                    },
                );
                Verdict::Accepted
            }
            Ok(()) => {
                self.end_lease(lease, LeaseState::Rejected);
                Verdict::Rejected(RejectReason::StaleRound)
            }
            Err(reason) => {
                self.end_lease(lease, LeaseState::Rejected);
                Verdict::Rejected(reason)
            }
        };
        let close = verdict == Verdict::Accepted && self.accepted.len() >= self.cfg.quorum as usize;
        let mut actions = vec![Action::Verdict {
            peer,
            lease,
            verdict,
        }];
        if close {
            if let Some(opened) = self.opened_at_ms {
                if self.durations.len() == DURATION_WINDOW {
                    self.durations.pop_front();
                }
                self.durations.push_back(now_ms.saturating_sub(opened));
            }
            actions.extend(self.close_round());
        }
        actions
    }

    /// Closes the open round with what it has once its straggler deadline has passed.
    /// Shards still out are not waited for: their deltas would come from an older θ than the
    /// next round's, so they are rejected as stale rather than merged with a weight.
    fn check_deadline(&mut self, now_ms: u64) -> Vec<Action> {
        let Some(deadline) = self.deadline_ms() else {
            return Vec::new();
        };
        if now_ms < deadline || self.accepted.len() < self.cfg.deadline_quorum.max(1) as usize {
            return Vec::new();
        }
        let mut actions = vec![Action::DeadlinePassed {
            round: self.round,
            accepted: self.accepted.len(),
            waited_ms: now_ms.saturating_sub(self.opened_at_ms.unwrap_or(now_ms)),
        }];
        // Live leases of the closed round end now, so their shards are not counted as held.
        let live: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, r)| r.round == self.round && r.state == LeaseState::Active)
            .map(|(id, _)| *id)
            .collect();
        for lease in live {
            self.end_lease(lease, LeaseState::Expired);
        }
        actions.extend(self.close_round());
        actions
    }

    fn close_round(&mut self) -> Vec<Action> {
        self.phase = Phase::Aggregating;
        let accepted = self.accepted.values().cloned().collect();
        vec![Action::Aggregate {
            round: self.round,
            accepted,
        }]
    }

    fn open_next(&mut self, adapter: ContentId) -> Vec<Action> {
        self.adapter = adapter;
        self.round = Round(self.round.0 + 1);
        self.opened_at_ms = None; // set by the next event
        self.accepted.clear();
        self.holders = vec![None; self.cfg.shards as usize];
        self.backups = vec![None; self.cfg.shards as usize];
        self.by_peer.clear();
        self.free_since_ms = vec![self.now_ms; self.cfg.shards as usize];
        self.fairness.forget_old(self.now_ms);
        // Leases of the closed round can only be rejected now; forget the finished ones.
        self.leases
            .retain(|_, r| matches!(r.state, LeaseState::Active | LeaseState::Verifying));
        if self.round.0 >= self.cfg.rounds {
            self.phase = Phase::Finished;
            return vec![Action::Finished {
                rounds: self.round.0,
            }];
        }
        self.phase = Phase::Open;
        vec![Action::RoundOpened {
            round: self.round,
            adapter,
        }]
    }
}

#[cfg(test)]
mod fair_tests;
#[cfg(test)]
mod tests;
