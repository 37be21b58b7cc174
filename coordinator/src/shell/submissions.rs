//! A submission's path through the coordinator: the cheap layers (envelope, structure) and
//! the lease rules at once; what passes waits in line for the engine's tensor layers (effect,
//! replay); then its verdict is committed to the store, applied to the ledger, and answered.

use std::collections::{HashMap, VecDeque};

use herd_protocol::LeaseId;
use herd_protocol::messages::{RejectReason, RpcResponse, Submission, Verdict, now_ms};
use herd_protocol::net::Behaviour;
use libp2p::Swarm;
use libp2p::request_response::ResponseChannel;

use super::Coordinator;
use super::engine_slot::EngineDone;
use super::rpc::split_answer;
use crate::engine::{VerifyDetail, VerifyJob, VerifyOutcome};
use crate::round::{Action, Event, PeerKey};
use crate::store::AcceptedRecord;
use crate::verify::effect::EffectConfig;
use crate::verify::envelope;
use crate::verify::log::VerdictRecord;
use crate::verify::structure::Checked;

/// Submissions that passed the cheap layers, waiting for the engine, in arrival order.
#[derive(Default)]
pub(super) struct Verifications {
    pending: HashMap<LeaseId, Pending>,
    queue: VecDeque<LeaseId>,
}

impl Verifications {
    pub(super) fn is_pending(&self, lease: &LeaseId) -> bool {
        self.pending.contains_key(lease)
    }

    pub(super) fn pending_mut(&mut self, lease: &LeaseId) -> Option<&mut Pending> {
        self.pending.get_mut(lease)
    }
}

/// A submission waiting for the tensor layers (and the checks peers do), with the channel its
/// verdict goes back on.
pub(super) struct Pending {
    peer: PeerKey,
    channel: ResponseChannel<RpcResponse>,
    /// The payload as it arrived: what is stored if it is accepted.
    payload: Vec<u8>,
    checked: Checked,
    facts: SubmissionFacts,
    claimed_drop: f64,
    replay: bool,
    /// Drawn for the effect check (always, unless its peer is trusted).
    effect: bool,
    /// Peers that replay it instead of the coordinator (0: the coordinator does, if drawn).
    checkers: u32,
    pub(super) detail: VerifyDetail,
}

/// What the verdict log records of a submission.
#[derive(Clone, Default)]
pub(super) struct SubmissionFacts {
    round: u64,
    shard: u32,
    payload_hash: Option<String>,
    payload_bytes: u64,
    tokens: u64,
    norm: Option<f64>,
    /// Tokens per second from the lease's grant to this submission.
    tokens_per_second: Option<f64>,
}

/// A verdict's request still waiting for it: its channel and what was submitted.
type Answer = (ResponseChannel<RpcResponse>, SubmissionFacts);

impl Coordinator {
    /// The cheap layers here, the lease rules in the machine; what passes both waits for the
    /// engine. Everything else is answered at once.
    pub(super) fn on_submission(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerKey,
        sub: Submission,
        channel: ResponseChannel<RpcResponse>,
    ) {
        let received = sub.payload.len() as u64;
        self.status_tx.send_modify(|s| s.bytes_received += received);
        let mut facts = self.facts_of(&sub);
        // The same submission again (its answer was lost, or the coordinator restarted
        // meanwhile): the same verdict, counted once.
        if let Some(d) = self.ledger.decided(sub.lease)
            && d.is_resubmission(peer, &sub.payload_hash)
        {
            let answer = RpcResponse::Verdict(d.verdict.clone());
            let _ = swarm.behaviour_mut().rpc.send_response(channel, answer);
            return;
        }
        // The same submission while it is still being checked (its request timed out): the
        // verdict goes back on the new request when it is given.
        if let Some(p) = self.verifications.pending.get_mut(&sub.lease)
            && p.peer == peer
            && p.facts.payload_hash.as_deref() == Some(sub.payload_hash.to_hex().as_str())
        {
            p.channel = channel;
            return;
        }
        if let Some(why) = self.ledger.reputation().banned(&peer) {
            let verdict = Verdict::Rejected(RejectReason::Banned(why.to_string()));
            self.give_verdict(swarm, peer, sub.lease, verdict, Some((channel, facts)));
            return;
        }
        let checked = self.check_cheap_layers(&peer, &sub);
        let event = Event::Submitted {
            peer,
            lease: sub.lease,
            round: sub.round,
            shard: sub.shard,
            base_adapter: sub.base_adapter,
            tokens: facts.tokens,
            checked: checked.as_ref().map(|_| ()).map_err(Clone::clone),
        };
        let actions = self.machine.handle(event, now_ms());
        let (answer, rest) = split_answer(actions, |a| {
            matches!(a, Action::Verify { .. } | Action::Verdict { .. })
        });
        match (answer, checked) {
            (Some(Action::Verify { lease, .. }), Ok(checked)) => {
                facts.norm = Some(checked.norm);
                let reputation = self.ledger.reputation();
                let replay = reputation.should_replay(&peer, lease);
                // Independent of the replay draw: with every delta checked by a peer (an open
                // network's setting) the coordinator's effect checks stay at their own rate.
                let effect = reputation.should_check_effect(&peer, lease);
                let pending = Pending {
                    peer,
                    channel,
                    payload: sub.payload,
                    checked,
                    facts,
                    claimed_drop: sub.loss_before - sub.loss_after,
                    replay,
                    effect,
                    checkers: if replay { self.checkers_for(&peer) } else { 0 },
                    detail: VerifyDetail::default(),
                };
                self.verifications.pending.insert(lease, pending);
                self.verifications.queue.push_back(lease);
            }
            (Some(Action::Verdict { lease, verdict, .. }), _) => {
                self.give_verdict(swarm, peer, lease, verdict, Some((channel, facts)));
            }
            (other, _) => {
                // The machine answers every submission with one of the two, and asks for
                // verification only of one that passed the checks.
                tracing::error!(?other, "no answer for a submission; its node will retry");
            }
        }
        self.carry_out(swarm, rest);
        self.start_verification(swarm);
    }

    fn facts_of(&self, sub: &Submission) -> SubmissionFacts {
        let tokens = sub.tokens.min(self.max_tokens_per_shard());
        SubmissionFacts {
            round: sub.round.0,
            shard: sub.shard.0,
            payload_hash: Some(sub.payload_hash.to_hex()),
            payload_bytes: sub.payload.len() as u64,
            tokens,
            norm: None,
            tokens_per_second: self.leases.get(&sub.lease).and_then(|l| {
                let granted = l.expires_at_ms as f64 - self.cfg.round.lease_secs * 1000.0;
                let secs = (now_ms() as f64 - granted) / 1000.0;
                (secs > 0.0).then(|| tokens as f64 / secs)
            }),
        }
    }

    /// Layers 1 and 2: signature and hash, then what the payload is.
    fn check_cheap_layers(
        &mut self,
        peer: &PeerKey,
        sub: &Submission,
    ) -> Result<Checked, RejectReason> {
        envelope::check(&self.cfg.run, peer, sub)?;
        // An unknown lease fails the lease rules first; its seed does not matter.
        let seed = self.leases.get(&sub.lease).map_or(0, |l| l.seed);
        self.ledger.structure_mut().check(
            (sub.round, sub.shard),
            seed,
            sub.payload_hash,
            &sub.payload,
            &self.layout,
            self.cfg.round.codec,
            &self.cfg.verify,
        )
    }

    /// The most tokens one shard can hold; claims above it are cut to it.
    fn max_tokens_per_shard(&self) -> u64 {
        let r = &self.cfg.round;
        r.inner_steps as u64 * r.batch_size as u64 * r.max_seq_len as u64
    }

    /// Hands the engine its next job if it is free: a replay the check book asked for first
    /// (a round waits on it), else the next queued verification. Submissions whose round
    /// closed while they waited are answered without tensor work.
    pub(super) fn start_verification(&mut self, swarm: &mut Swarm<Behaviour>) {
        while !self.engine.is_working() {
            if self.checking.has_own_replay() && self.start_own_replay() {
                return;
            }
            let Some(lease) = self.verifications.queue.pop_front() else {
                return;
            };
            let (Some(p), Some(lease_msg)) = (
                self.verifications.pending.get(&lease),
                self.leases.get(&lease),
            ) else {
                continue; // decided meanwhile (its peer was banned)
            };
            if lease_msg.round != self.machine.round() {
                let stale = Event::Verified {
                    lease,
                    result: Err(RejectReason::StaleRound),
                };
                let actions = self.machine.handle(stale, now_ms());
                self.carry_out(swarm, actions);
                continue;
            }
            let job = self.verify_job(p, lease_msg.clone());
            self.engine.start(move |engine| {
                let outcome = engine.verify(&job);
                EngineDone::Verified(lease, Box::new(outcome))
            });
        }
    }

    fn verify_job(&self, p: &Pending, lease: herd_protocol::messages::Lease) -> VerifyJob {
        let v = &self.cfg.verify;
        VerifyJob {
            lease,
            delta: p.checked.decoded.delta.clone(),
            sketch: p.checked.decoded.sketch.clone(),
            claimed_drop: p.claimed_drop,
            // Checkers replay it; the coordinator only if none are at hand.
            replay: p.replay && p.checkers == 0,
            check_effect: p.effect,
            effect_samples: v.effect_samples,
            effect: EffectConfig {
                scale: self.cfg.round.outer_lr / self.cfg.quorum() as f64,
                min_fraction: v.effect_min_fraction,
                shard_max_rise: v.shard_max_rise,
                heldout_max_rise: v.heldout_max_rise,
            },
            tolerance: self.cfg.replay_tolerance(),
        }
    }

    pub(super) fn on_verified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        lease: LeaseId,
        outcome: VerifyOutcome,
    ) {
        let Some(p) = self.verifications.pending.get_mut(&lease) else {
            return self.verified(swarm, lease, outcome.result);
        };
        p.detail = outcome.detail;
        let (peer, checkers) = (p.peer, p.checkers);
        let round_open = self.machine.is_open()
            && self
                .leases
                .get(&lease)
                .is_some_and(|l| l.round == self.machine.round());
        if outcome.result.is_ok() && p.replay && checkers > 0 && round_open {
            let sketch = p.checked.decoded.sketch.clone();
            return self.send_to_checkers(lease, peer, sketch, checkers);
        }
        if outcome.result.is_ok()
            && let Some(sketch) = p.detail.replayed_sketch.take()
        {
            self.known_answer(lease, peer, sketch);
        }
        self.verified(swarm, lease, outcome.result);
    }

    /// Tells the round machine how `lease`'s verification ended.
    pub(super) fn verified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        lease: LeaseId,
        result: Result<(), RejectReason>,
    ) {
        let actions = self
            .machine
            .handle(Event::Verified { lease, result }, now_ms());
        self.carry_out(swarm, actions);
    }

    /// Records a verdict durably, applies it to the ledger, then answers the node: on
    /// `answer` for a request decided at once, or on the channel of its pending verification.
    /// An accepted delta's payload goes to the blob store and its record into the same
    /// transaction as the verdict, before the node hears "accepted".
    pub(super) fn give_verdict(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerKey,
        lease: LeaseId,
        verdict: Verdict,
        answer: Option<Answer>,
    ) {
        let (channel, facts, detail, checked) = match self.verifications.pending.remove(&lease) {
            Some(p) => (
                p.channel,
                p.facts,
                p.detail,
                Some((
                    p.checked.decoded.delta,
                    p.checked.norm,
                    p.payload,
                    p.checked.sketch_cosine,
                )),
            ),
            None => match answer {
                Some((channel, facts)) => (channel, facts, VerifyDetail::default(), None),
                None => return, // nobody is waiting and nothing was checked: nothing to record
            },
        };
        if crate::ledger::decides_lease(&verdict) {
            // Not for another peer's stray submission: the lease's own is still to come.
            self.leases.remove(&lease);
        }
        let record = verdict_record(peer, lease, &verdict, &facts, &detail);
        let accepted = checked.filter(|_| verdict == Verdict::Accepted);
        if let Err(e) = self.commit(&record, accepted.as_ref().map(|(_, n, p, _)| (*n, &p[..]))) {
            // Without a durable record the verdict is not given: the node's request times out,
            // it submits again or its lease is reissued.
            tracing::error!(error = %e, "cannot record a verdict; not answering");
            return;
        }
        if let Err(e) = self.verdict_log.append(&record) {
            tracing::warn!(error = %e, "cannot append to verdicts.jsonl (the store has the verdict)");
        }
        let banned = self.ledger.apply(peer, &record);
        if self.checking.book.target(lease).is_some() && !matches!(verdict, Verdict::Accepted) {
            // Rejected while checkers were on it (its round closed, its peer was banned).
            self.forget_checks(swarm, lease);
        }
        self.publish_totals();
        let replayed = detail.replay.is_some();
        let round = self.machine.round().0;
        match &verdict {
            Verdict::Accepted => {
                let sketch_cosine = accepted.as_ref().map(|a| format!("{:.4}", a.3));
                tracing::info!(%peer, %lease, round, tokens = facts.tokens, replayed, sketch_cosine, "accepted delta");
                if let Some(rate) = facts.tokens_per_second {
                    self.peers.entry(peer).or_default().tokens_per_second = rate;
                }
                if let Some((delta, _, _, _)) = accepted {
                    self.round_deltas.insert(lease, (delta, facts.tokens));
                }
            }
            Verdict::Rejected(reason) => {
                tracing::warn!(%peer, %lease, round, reason = %reason, "rejected submission");
            }
        }
        let response = RpcResponse::Verdict(verdict);
        let _ = swarm.behaviour_mut().rpc.send_response(channel, response);
        if let Some(reason) = banned {
            tracing::warn!(%peer, reason = %reason, "peer banned");
            self.after_ban(swarm, peer, reason);
        }
        self.publish_status();
        self.publish_peer(&peer);
    }

    /// Bans `peer` for something no verdict of its own says (a verdict overturned), then
    /// does what follows a ban.
    pub(super) fn ban(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerKey, reason: String) {
        self.ledger.ban(peer, &reason);
        self.publish_peer(&peer);
        self.after_ban(swarm, peer, reason);
    }

    /// What follows a ban: the machine drops the peer's leases and its accepted shards of the
    /// open round, and the check book its checks (reopening what it vouched for).
    pub(super) fn after_ban(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerKey,
        reason: String,
    ) {
        let actions = self
            .machine
            .handle(Event::Banned { peer, reason }, now_ms());
        self.carry_out(swarm, actions);
        self.checker_banned(swarm, peer);
    }

    /// Commits `record` (and an accepted delta: its norm and payload) to the store.
    fn commit(
        &mut self,
        record: &VerdictRecord,
        accepted: Option<(f64, &[u8])>,
    ) -> anyhow::Result<()> {
        let accepted = match accepted {
            Some((norm, payload)) => Some(AcceptedRecord {
                lease: record.lease,
                peer: record.peer.clone(),
                round: record.round,
                shard: record.shard,
                payload: self.blobs.put_bytes(payload)?,
                tokens: record.tokens,
                norm,
            }),
            None => None,
        };
        self.store.record_verdict(record, accepted.as_ref())
    }
}

/// The verdict as the store and the verdict log keep it.
fn verdict_record(
    peer: PeerKey,
    lease: LeaseId,
    verdict: &Verdict,
    facts: &SubmissionFacts,
    detail: &VerifyDetail,
) -> VerdictRecord {
    let (label, reason) = match verdict {
        Verdict::Accepted => ("accepted".to_string(), String::new()),
        Verdict::Rejected(r) => (r.label().to_string(), r.to_string()),
    };
    VerdictRecord {
        time_ms: now_ms(),
        peer: peer.to_string(),
        lease: lease.0,
        round: facts.round,
        shard: facts.shard,
        verdict: label,
        reason,
        outcome: verdict.clone(),
        payload_hash: facts.payload_hash.clone(),
        payload_bytes: facts.payload_bytes,
        tokens: facts.tokens,
        norm: facts.norm,
        effect: detail.effect.clone(),
        replay: detail.replay,
        verify_seconds: detail.effect_seconds,
        replay_seconds: detail.replay_seconds,
    }
}
