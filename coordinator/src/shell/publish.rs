//! What the coordinator makes public: a closed round committed (θ_r+1, its loss, a signed
//! checkpoint on checkpoint rounds), `/v1/status` as it changes, and `summary.json` at the end.

use anyhow::Result;
use herd_protocol::Round;
use herd_protocol::messages::now_ms;
use herd_protocol::net::Behaviour;
use libp2p::Swarm;
use serde_json::json;

use super::{Coordinator, say};
use crate::checkpoint::Checkpoint;
use crate::engine::RoundResult;
use crate::round::Event;
use crate::round::PeerKey;
use crate::status::{PeerStatus, RoundTime, contributions};
use std::sync::Arc;

/// Rounds whose times `/v1/status` keeps, the latest: a run of thousands of rounds keeps a
/// status of bounded size (each is ~120 bytes of JSON).
const ROUND_TIMES_KEPT: usize = 256;

impl Coordinator {
    /// Commits the aggregated round, then opens the next: a stop from the commit on resumes
    /// at the next round.
    pub(super) fn on_round_result(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        round: Round,
        result: RoundResult,
        mut checkpoint: Option<Checkpoint>,
    ) -> Result<()> {
        let adapter = self.blobs.put_bytes(&result.adapter_bytes)?;
        let outer_state = self.blobs.put_bytes(&result.outer_state)?;
        let mut next = self.run_state.clone();
        next.round = round.0 + 1;
        next.adapter = adapter;
        next.outer_state = Some(outer_state);
        next.heldout_loss.push(result.heldout_loss);
        if let Some(c) = checkpoint.as_mut() {
            let parent = self.run_state.checkpoints.last();
            let accepted = self
                .store
                .accepted_between(parent.map_or(0, |p| p.round), c.round)?;
            self.publisher.sign(c, parent, &accepted)?;
            self.publisher.register(&mut self.blobs, c)?;
        }
        next.checkpoints.extend(checkpoint.clone());
        self.store.set_run(&next)?;
        self.run_state = next;
        say!(
            "round {}: held-out loss {:.4}",
            round.0 + 1,
            result.heldout_loss
        );
        let opened = std::mem::replace(
            &mut self.round_opened,
            super::RoundOpened::now(self.ledger.totals()),
        );
        let time = RoundTime {
            round: round.0,
            seconds: opened.at.elapsed().as_secs_f64(),
            verification_seconds: self.round_opened.verification_seconds
                - opened.verification_seconds,
            aggregation_seconds: result.seconds,
        };
        self.status_tx.send_modify(|s| {
            s.round_times.push(time);
            if s.round_times.len() > ROUND_TIMES_KEPT {
                s.round_times.remove(0);
            }
            s.heldout_loss.push(result.heldout_loss);
            s.rounds_completed = round.0 + 1;
            s.checkpoints.extend(checkpoint);
        });
        let actions = self
            .machine
            .handle(Event::Aggregated { round, adapter }, now_ms());
        self.carry_out(swarm, actions);
        Ok(())
    }

    /// Brings `/v1/status`'s round figures up to date with the machine: a few counters, so it
    /// can run on every grant, return and connection (peers: `publish_peer`; totals:
    /// `publish_totals`).
    pub(super) fn publish_status(&self) {
        self.status_tx.send_modify(|s| {
            s.round = self.machine.round().0;
            s.accepted_this_round = self.machine.accepted_count() as u64;
            s.active_leases = self.machine.active_lease_count() as u64;
        });
    }

    /// `peer`'s line of `/v1/status`, if it is connected or seen lately.
    fn peer_line(&self, peer: &PeerKey) -> Option<PeerStatus> {
        self.peers.get(peer).map(|presence| PeerStatus {
            peer: peer.to_string(),
            device: presence.device.clone(),
            connected: presence.connected,
            credit: self.ledger.credit(peer),
            standing: self.ledger.reputation().standing(peer).label().to_string(),
            last_seen_ms: presence.last_seen_ms,
            tokens_per_second: presence.tokens_per_second,
        })
    }

    /// Brings `peer`'s line of `/v1/status` up to date, or takes it out once the peer is
    /// forgotten: one line in place (the list stays in peer order), not the whole list.
    pub(super) fn publish_peer(&self, peer: &PeerKey) {
        let line = self.peer_line(peer);
        let key = peer.to_string();
        self.status_tx.send_modify(|s| {
            let at = s.peers.binary_search_by(|p| p.peer.as_str().cmp(&key));
            match (at, line) {
                (Ok(i), Some(line)) => s.peers[i] = line,
                (Err(i), Some(line)) => s.peers.insert(i, line),
                (Ok(i), None) => {
                    s.peers.remove(i);
                }
                (Err(_), None) => {}
            }
        });
    }

    /// Builds every peer's line at once, in peer order (at start: one sort, not an insert
    /// per peer).
    pub(super) fn publish_peers(&self) {
        let mut lines: Vec<PeerStatus> = self
            .peers
            .keys()
            .filter_map(|p| self.peer_line(p))
            .collect();
        lines.sort_by(|a, b| a.peer.cmp(&b.peer));
        self.status_tx.send_modify(|s| s.peers = lines);
    }

    /// Forgets peers gone for longer than `network.forget_after_secs`: they leave the live
    /// status (their credit stays in the ledger and `/v1/contributors`), in one pass over it.
    pub(super) fn forget_gone_peers(&mut self, now_ms: u64) {
        let keep_ms = self.cfg.network.forget_after_secs * 1000;
        let before = self.peers.len();
        self.peers
            .retain(|_, p| p.connected || p.last_seen_ms + keep_ms >= now_ms);
        if self.peers.len() == before {
            return;
        }
        let kept: std::collections::HashSet<String> =
            self.peers.keys().map(|p| p.to_string()).collect();
        self.status_tx
            .send_modify(|s| s.peers.retain(|line| kept.contains(&line.peer)));
    }

    /// Brings the status's totals and the credit list up to date with the ledger: after a
    /// verdict, and at start.
    pub(super) fn publish_totals(&self) {
        let totals = self.ledger.totals().clone();
        self.status_tx.send_modify(|s| s.totals = totals);
        let credit = contributions(self.ledger.peers().map(|p| (p, self.ledger.credit(p))));
        self.contributors_tx.send_replace(Arc::new(credit));
    }

    /// Writes `summary.json` (see `../shared/INTERFACES.md`, beside the repository) into the
    /// data dir; returns its path.
    pub(super) fn write_summary(&self) -> Result<std::path::PathBuf> {
        let s = self.status_tx.borrow().clone();
        let contributors = self.contributors_tx.borrow().clone();
        let t = &s.totals;
        let final_adapter = s.checkpoints.last().map(|c| self.publisher.dir.join(&c.id));
        let per_delta = |bytes: u64| bytes as f64 / t.accepted_deltas.max(1) as f64;
        // A replay runs the node's training code on the same shard, so the mean replay time
        // is the training compute of one shard on this machine.
        let shard_seconds = t.replay_seconds / t.replays.max(1) as f64;
        let training_seconds = shard_seconds * t.accepted_deltas as f64;
        let summary = json!({
            "run": s.run,
            "rounds_completed": s.rounds_completed,
            "heldout_loss": s.heldout_loss,
            "base_model": self.cfg.base_model,
            "final_adapter": final_adapter,
            "bytes_uploaded": t.bytes_uploaded,
            "bytes_dense_fp32": t.bytes_dense_fp32,
            "compression": {
                "codec": self.cfg.round.codec.to_string(),
                "accepted_deltas": t.accepted_deltas,
                "bytes_per_delta": per_delta(t.bytes_uploaded),
                "dense_fp32_bytes_per_delta": per_delta(t.bytes_dense_fp32),
                "ratio": t.bytes_dense_fp32 as f64 / t.bytes_uploaded.max(1) as f64,
            },
            "verification": {
                "replays": t.replays,
                "replay_seconds": t.replay_seconds,
                "effect_seconds": t.verify_seconds,
                "cost_vs_training": if t.replays > 0 {
                    (t.replay_seconds + t.verify_seconds) / training_seconds
                } else {
                    f64::NAN
                },
                // A check is the shard's training done again by a peer.
                "peer_checked": t.peer_checked,
                "checks": t.checks,
                "checks_granted": s.checks_granted,
                "checkers_cost_vs_training": t.checks as f64 / t.accepted_deltas.max(1) as f64,
                "rejects_by_reason": t.rejects_by_reason,
            },
            "peers": s.peers,
            "contributors": contributors.as_slice(),
            "checkpoints": s.checkpoints,
            "round_times": s.round_times,
        });
        let path = self.cfg.data_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
        Ok(path)
    }
}
