//! Check leases in the shell (docs/checking.md): handing a trusted peer a check instead of a
//! shard, taking its report, doing the replays the [`CheckBook`] asks of the coordinator, and
//! carrying out what it decides: verdicts for submitters, credit or bans for checkers.

use std::collections::HashMap;

use herd_protocol::messages::{
    CheckReport, Lease, LeaseTask, RejectReason, RpcResponse, Verdict, now_ms,
};
use herd_protocol::net::Behaviour;
use herd_protocol::sketch::Agreement;
use herd_protocol::{LeaseId, Round, ShardId};
use libp2p::Swarm;
use libp2p::request_response::ResponseChannel;

use super::Coordinator;
use super::engine_slot::EngineDone;
use crate::checks::{CheckAction, CheckBook, CheckGrant, OwnReplay, ReportRefused};
use crate::lease::lease_for;
use crate::round::{Grant, PeerKey};
use crate::verify::log::VerdictRecord;
use crate::verify::reputation::Standing;

/// The check book and what waits on it in the shell.
pub(super) struct Checking {
    pub(super) book: CheckBook,
    /// Replays the book asked of the coordinator, in order.
    own_replays: std::collections::VecDeque<(LeaseId, OwnReplay)>,
    /// Reports waiting for their answer (an arbitration decides them), by check id.
    answers: HashMap<LeaseId, ResponseChannel<RpcResponse>>,
}

impl Checking {
    pub(super) fn new(book: CheckBook) -> Self {
        Checking {
            book,
            own_replays: Default::default(),
            answers: HashMap::new(),
        }
    }

    /// Whether a replay of the coordinator's own is waiting for the engine.
    pub(super) fn has_own_replay(&self) -> bool {
        !self.own_replays.is_empty()
    }
}

impl Coordinator {
    /// How many peers check a drawn submission of `submitter`: its standing's number, no more
    /// than the trusted peers connected besides it (0: the coordinator replays it itself).
    pub(super) fn checkers_for(&self, submitter: &PeerKey) -> u32 {
        if !self.cfg.checks.enabled {
            return 0;
        }
        let reputation = self.ledger.reputation();
        let wanted = match reputation.standing(submitter) {
            Standing::Trusted => self.cfg.checks.checkers_trusted,
            _ => self.cfg.checks.checkers_new,
        };
        let available = self
            .peers
            .iter()
            .filter(|(p, presence)| {
                presence.connected && *p != submitter && reputation.standing(p) == Standing::Trusted
            })
            .count() as u32;
        wanted.min(available)
    }

    /// A check lease for `peer` (trusted, asking for work), if the book has one for it.
    pub(super) fn check_lease_for(&mut self, peer: PeerKey, now: u64) -> Option<Lease> {
        if !self.cfg.checks.enabled || !self.machine.is_open() {
            return None;
        }
        let g = self.checking.book.assign(peer, self.machine.round(), now)?;
        tracing::info!(%peer, check = %g.check, round = g.round.0, shard = g.shard.0, "check lease");
        self.status_tx.send_modify(|s| s.checks_granted += 1);
        Some(self.check_lease(&g))
    }

    /// The lease message of a check: the shard's training lease as any peer would get it, under
    /// the check's id and expiry. Real checks and canaries are built here alike.
    fn check_lease(&self, g: &CheckGrant) -> Lease {
        let grant = self.shard_grant(g.check, g.round, g.shard, g.expires_at_ms);
        let mut lease = lease_for(&self.cfg, &self.publisher.assets, &grant);
        lease.task = LeaseTask::Check;
        lease
    }

    /// A grant of `shard` of the open round under `id`, as the round machine cuts shards.
    fn shard_grant(&self, id: LeaseId, round: Round, shard: ShardId, expires_at_ms: u64) -> Grant {
        Grant {
            lease: id,
            round,
            shard,
            ranges: self.machine.shard_ranges(round, shard),
            seed: self.machine.shard_seed(round, shard),
            expires_at_ms,
            base_adapter: self.machine.adapter(),
        }
    }

    /// A checker's report: refused at once if it is for no check of this peer's, otherwise
    /// answered when the book has judged it (at once, or after an arbitration).
    pub(super) fn on_report(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerKey,
        report: CheckReport,
        channel: ResponseChannel<RpcResponse>,
    ) {
        let refuse = |reason: RejectReason| RpcResponse::Verdict(Verdict::Rejected(reason));
        let refusal = if !report.is_well_formed() {
            Some(refuse(RejectReason::Malformed(
                "check report over its caps or not finite".into(),
            )))
        } else if report.run != self.cfg.run {
            Some(refuse(RejectReason::LeaseMismatch))
        } else if report.base_adapter != self.machine.adapter() {
            Some(refuse(RejectReason::WrongBaseAdapter))
        } else {
            None
        };
        if let Some(answer) = refusal {
            let _ = swarm.behaviour_mut().rpc.send_response(channel, answer);
            return;
        }
        let (check, round, shard) = (report.lease, report.round, report.shard);
        match self
            .checking
            .book
            .report(check, peer, round, shard, report.sketch)
        {
            Err(why) => {
                let reason = match why {
                    ReportRefused::Unknown => RejectReason::UnknownLease,
                    ReportRefused::NotYours => RejectReason::NotYourLease,
                    ReportRefused::Mismatch => RejectReason::LeaseMismatch,
                };
                let _ = swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, refuse(reason));
            }
            Ok(actions) => {
                self.checking.answers.insert(check, channel);
                self.carry_out_checks(swarm, actions);
            }
        }
    }

    /// A drawn submission that passed the effect check goes to `checkers` peers.
    pub(super) fn send_to_checkers(
        &mut self,
        lease: LeaseId,
        submitter: PeerKey,
        sketch: Vec<f32>,
        checkers: u32,
    ) {
        let Some((round, shard)) = self.leases.get(&lease).map(|l| (l.round, l.shard)) else {
            return;
        };
        tracing::info!(%lease, checkers, "submission handed to checkers");
        self.checking
            .book
            .submit(lease, submitter, round, shard, sketch, checkers, now_ms());
    }

    /// The coordinator replayed a submission of the open round itself (a newcomer's): its
    /// answer is known, so it may go out again as a canary.
    pub(super) fn known_answer(&mut self, lease: LeaseId, submitter: PeerKey, sketch: Vec<f32>) {
        if let Some(l) = self.leases.get(&lease)
            && l.round == self.machine.round()
        {
            let (round, shard) = (l.round, l.shard);
            self.checking
                .book
                .known(lease, submitter, round, shard, sketch);
        }
    }

    /// A submission under checks was rejected on other grounds: the book drops it, and
    /// reports waiting for its arbitration are answered unjudged.
    pub(super) fn forget_checks(&mut self, swarm: &mut Swarm<Behaviour>, lease: LeaseId) {
        for action in self.checking.book.forget(lease) {
            if let CheckAction::Void { peer, check } = action {
                self.answer_void(swarm, peer, check);
            }
        }
    }

    /// Answers a report that will not be judged (no credit, no strike).
    fn answer_void(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerKey, check: LeaseId) {
        tracing::info!(%peer, %check, "check report not judged: its submission left the book");
        if let Some(channel) = self.checking.answers.remove(&check) {
            let answer = RpcResponse::Verdict(Verdict::Rejected(RejectReason::CheckVoid));
            let _ = swarm.behaviour_mut().rpc.send_response(channel, answer);
        }
    }

    /// Checks past their time (every tick).
    pub(super) fn expire_checks(&mut self, swarm: &mut Swarm<Behaviour>, now: u64) {
        let actions = self.checking.book.expire(now);
        self.carry_out_checks(swarm, actions);
    }

    /// A peer was banned (for anything): what the book does about its checks.
    pub(super) fn checker_banned(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerKey) {
        let actions = self.checking.book.banned(peer);
        self.carry_out_checks(swarm, actions);
    }

    /// The round closed: its checks are moot, reports still waiting are answered as stale.
    pub(super) fn close_checks(&mut self, swarm: &mut Swarm<Behaviour>, round: Round) {
        // Submissions still under checks are stale.
        for lease in self.checking.book.close_round(round) {
            self.verified(swarm, lease, Err(RejectReason::StaleRound));
        }
        let book = &self.checking.book;
        self.checking
            .own_replays
            .retain(|(lease, _)| book.target(*lease).is_some());
        let stale = RpcResponse::Verdict(Verdict::Rejected(RejectReason::StaleRound));
        for (_, channel) in self.checking.answers.drain() {
            let _ = swarm
                .behaviour_mut()
                .rpc
                .send_response(channel, stale.clone());
        }
    }

    /// Hands the engine the next replay the book asked for, if it is free; `true` if it did.
    pub(super) fn start_own_replay(&mut self) -> bool {
        while let Some((lease, why)) = self.checking.own_replays.pop_front() {
            let Some((round, shard)) = self.checking.book.target(lease) else {
                continue; // its round closed meanwhile
            };
            let grant = self.shard_grant(lease, round, shard, 0);
            let message = lease_for(&self.cfg, &self.publisher.assets, &grant);
            tracing::info!(%lease, ?why, "replaying a checked submission here");
            self.engine.start(move |engine| {
                let started = std::time::Instant::now();
                let sketch = engine.replay_sketch(&message);
                EngineDone::Replayed(lease, sketch, started.elapsed().as_secs_f64())
            });
            return true;
        }
        false
    }

    /// The engine's replay of `lease` is in: the book judges the submitter and its checkers.
    pub(super) fn on_replayed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        lease: LeaseId,
        sketch: anyhow::Result<Vec<f32>>,
        seconds: f64,
    ) {
        if let Some(p) = self.verifications.pending_mut(&lease) {
            p.detail.replay_seconds += seconds;
        } else {
            // A reopened submission, decided before: no verdict of its own will carry them.
            self.ledger.count_own_replay(seconds);
        }
        let actions = match sketch {
            Ok(sketch) => self.checking.book.truth(lease, sketch),
            Err(e) => {
                tracing::error!(error = %e, %lease, "replay failed; the submission stands on the other layers");
                self.checking.book.unjudged(lease)
            }
        };
        self.carry_out_checks(swarm, actions);
    }

    /// Carries out what the book decided.
    pub(super) fn carry_out_checks(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        actions: Vec<CheckAction>,
    ) {
        for action in actions {
            match action {
                CheckAction::Passed { lease, agreement } => {
                    if let Some(p) = self.verifications.pending_mut(&lease) {
                        p.detail.replay = Some(agreement);
                    }
                    self.verified(swarm, lease, Ok(()));
                }
                CheckAction::Failed { lease, agreement } => {
                    if let Some(p) = self.verifications.pending_mut(&lease) {
                        p.detail.replay = Some(agreement);
                    }
                    let reason = RejectReason::ReplayMismatch {
                        cosine: agreement.cosine,
                        rel_error: agreement.rel_error,
                    };
                    self.verified(swarm, lease, Err(reason));
                }
                CheckAction::ReplayYourself { lease, why } => {
                    self.checking.own_replays.push_back((lease, why));
                }
                CheckAction::Credit {
                    peer,
                    check,
                    shard,
                    agreement,
                } => {
                    let verdict = Verdict::Accepted;
                    self.check_verdict(swarm, peer, check, shard, verdict, Some(agreement));
                }
                CheckAction::BanChecker {
                    peer,
                    check,
                    shard,
                    reason,
                } => {
                    tracing::warn!(%peer, %check, %reason, "checker caught");
                    let verdict = Verdict::Rejected(RejectReason::CheckMismatch(reason));
                    self.check_verdict(swarm, peer, check, shard, verdict, None);
                }
                CheckAction::Void { peer, check } => self.answer_void(swarm, peer, check),
                CheckAction::Distrust { submitter } => {
                    tracing::warn!(peer = %submitter, "trust earned through a banned checker withdrawn");
                    self.ledger.distrust(&submitter);
                    self.publish_peer(&submitter);
                }
                CheckAction::Overturned {
                    lease,
                    submitter,
                    agreement,
                } => {
                    let reason = format!(
                        "delta {lease} accepted on a banned checker's word differs from the coordinator's replay (cosine {:.4})",
                        agreement.cosine
                    );
                    tracing::warn!(peer = %submitter, %reason, "verdict overturned");
                    self.ban(swarm, submitter, reason);
                }
            }
        }
        self.start_verification(swarm);
    }

    /// Records a checker's verdict (credit, or the ban a wrong check earns), answers its
    /// report if it waits, and bans it if this verdict did.
    fn check_verdict(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerKey,
        check: LeaseId,
        shard: ShardId,
        verdict: Verdict,
        agreement: Option<Agreement>,
    ) {
        let (label, reason) = match &verdict {
            Verdict::Accepted => ("check_accepted".to_string(), String::new()),
            Verdict::Rejected(r) => (r.label().to_string(), r.to_string()),
        };
        let record = VerdictRecord {
            time_ms: now_ms(),
            peer: peer.to_string(),
            lease: check.0,
            round: self.machine.round().0,
            shard: shard.0,
            verdict: label,
            reason,
            outcome: verdict.clone(),
            payload_hash: None,
            payload_bytes: 0,
            tokens: 0,
            norm: None,
            effect: None,
            replay: agreement,
            verify_seconds: 0.0,
            replay_seconds: 0.0,
        };
        if let Err(e) = self.store.record_verdict(&record, None) {
            tracing::error!(error = %e, "cannot record a check's verdict; not answering");
            return;
        }
        if let Err(e) = self.verdict_log.append(&record) {
            tracing::warn!(error = %e, "cannot append to verdicts.jsonl (the store has the verdict)");
        }
        let banned = self.ledger.apply(peer, &record);
        self.publish_totals();
        if let Some(channel) = self.checking.answers.remove(&check) {
            let _ = swarm
                .behaviour_mut()
                .rpc
                .send_response(channel, RpcResponse::Verdict(verdict));
        }
        self.publish_peer(&peer);
        if let Some(reason) = banned {
            tracing::warn!(%peer, reason = %reason, "peer banned");
            self.after_ban(swarm, peer, reason);
        }
    }
}
