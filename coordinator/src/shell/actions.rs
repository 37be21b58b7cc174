//! Carrying out what the round machine asks that answers no request: logging expiries and
//! deadlines, deciding verdicts, dropping a banned peer's deltas, aggregating a closed round,
//! and announcing rounds to subscribed nodes.

use herd_protocol::delta::Delta;
use herd_protocol::messages::RoundAnnouncement;
use herd_protocol::net::Behaviour;
use herd_protocol::{ContentId, LeaseId, Round};
use libp2p::Swarm;

use super::engine_slot::EngineDone;
use super::{Coordinator, say};
use crate::checkpoint::Checkpoint;
use crate::round::Action;

impl Coordinator {
    /// Side effects of actions that answer no request.
    pub(super) fn carry_out(&mut self, swarm: &mut Swarm<Behaviour>, actions: Vec<Action>) {
        if actions.is_empty() {
            return; // most ticks: nothing changed, nothing to republish
        }
        for action in actions {
            match action {
                Action::LeaseExpired { peer, lease, shard } => {
                    tracing::warn!(%peer, %lease, %shard, "lease expired; shard reissued");
                    self.end_lease_record(lease);
                }
                Action::Banned { peer, reason } => {
                    tracing::warn!(%peer, reason = %reason, "peer banned");
                    self.ledger.ban(peer, &reason);
                    self.publish_peer(&peer);
                    self.after_ban(swarm, peer, reason);
                }
                Action::DeadlinePassed {
                    round,
                    accepted,
                    waited_ms,
                } => {
                    tracing::warn!(
                        round = round.0,
                        accepted,
                        waited_ms,
                        "straggler deadline: closing the round without full quorum; later deltas for it are stale"
                    );
                }
                Action::Verdict {
                    peer,
                    lease,
                    verdict,
                } => self.give_verdict(swarm, peer, lease, verdict, None),
                Action::Excluded {
                    peer,
                    lease,
                    round,
                    shard,
                } => {
                    tracing::warn!(%peer, %lease, "accepted delta excluded: its peer was banned");
                    if let Err(e) = self.store.exclude(round.0, shard.0) {
                        tracing::error!(error = %e, "cannot record an exclusion");
                    }
                    self.round_deltas.remove(&lease);
                }
                Action::Aggregate { round, accepted } => {
                    let deltas: Vec<(Delta, u64)> = accepted
                        .iter()
                        .filter_map(|a| self.round_deltas.remove(&a.lease))
                        .collect();
                    self.round_deltas.clear();
                    // A round closed by its deadline may find the engine verifying: then the
                    // aggregation starts when it comes back.
                    self.waiting_aggregation = Some((round, deltas));
                    self.start_aggregation();
                }
                Action::RoundOpened { round, adapter } => {
                    // Leases of closed rounds are only needed while their verdict is pending.
                    let v = &self.verifications;
                    self.leases
                        .retain(|id, l| l.round == round || v.is_pending(id));
                    self.close_checks(swarm, Round(round.0 - 1));
                    self.announce(swarm, round, adapter);
                }
                Action::Finished { rounds } => {
                    say!("run finished after {rounds} rounds");
                    // The last checkpoint has no round opening after it to travel with.
                    self.announce(swarm, Round(rounds), self.run_state.adapter);
                    self.finished_at = Some(tokio::time::Instant::now());
                    self.status_tx.send_modify(|s| s.finished = true);
                }
                Action::Grant { .. }
                | Action::NoWork { .. }
                | Action::Verify { .. }
                | Action::Returned { .. } => {} // answers, sent by the request's handler
            }
        }
        self.publish_status();
    }

    /// Drops a lease that ended without a verdict from the store. Failing only leaves the
    /// record until its round closes (a restart would hold the shard until the lease's
    /// expiry), so it is logged, not fatal.
    pub(super) fn end_lease_record(&self, lease: LeaseId) {
        if let Err(e) = self.store.end_lease(lease.0) {
            tracing::error!(error = %e, %lease, "cannot drop an ended lease's record");
        }
    }

    /// Hands the closed round's deltas to the engine if one is waiting and the engine is
    /// free; a checkpoint round also saves the new adapter as a PEFT dir.
    pub(super) fn start_aggregation(&mut self) {
        if self.engine.is_working() {
            return;
        }
        let Some((round, deltas)) = self.waiting_aggregation.take() else {
            return;
        };
        let done = round.0 + 1;
        let checkpoint = (done == self.cfg.rounds || done % self.cfg.checkpoint_every() == 0)
            .then(|| self.publisher.dir.join(Checkpoint::name(done)));
        tracing::info!(round = round.0, deltas = deltas.len(), "aggregating");
        self.engine.start(move |engine| {
            let result = engine
                .finish_round(&deltas, checkpoint.as_deref())
                .and_then(|result| {
                    let saved = checkpoint
                        .map(|dir| Checkpoint::of_saved_adapter(&dir, done, result.heldout_loss))
                        .transpose()?;
                    Ok((result, saved))
                });
            EngineDone::Aggregated(round, result)
        });
    }

    /// Tells subscribed nodes about round `round` and the latest checkpoint (which nodes
    /// fetch and then serve to downloaders).
    fn announce(&self, swarm: &mut Swarm<Behaviour>, round: Round, adapter: ContentId) {
        let ann = RoundAnnouncement {
            run: self.cfg.run.clone(),
            round,
            adapter,
            checkpoint: self
                .run_state
                .checkpoints
                .last()
                .and_then(Checkpoint::reference),
        };
        if let Ok(bytes) = herd_protocol::framing::encode(&ann) {
            // No subscribers yet is fine: nodes also learn rounds from their leases.
            let _ = swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.topic.clone(), bytes);
        }
    }
}
