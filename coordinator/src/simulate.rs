//! Simulated peers against the coordinator's real round logic: the pure round machine, the real
//! codec and the structure layer of verification, with no network and no training. `cargo xtask
//! bench` runs it at several peer counts to see how fast the coordinator's bookkeeping goes and
//! how much memory it takes as the network grows.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use herd_protocol::codec::CodecSpec;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::ids::ContentId;
use herd_protocol::messages::Verdict;
use serde::Serialize;

use crate::round::{Action, Event, MachineConfig, PeerKey, RoundMachine};
use crate::verify::structure::StructureState;

pub mod checks;

/// What to simulate.
#[derive(Debug, Clone, Copy)]
pub struct ScaleConfig {
    /// Peers; each round has one shard per peer and closes when all are in.
    pub peers: u32,
    pub rounds: u64,
    pub codec: CodecSpec,
    /// The adapter's layout: this many tensors of this many values.
    pub tensors: usize,
    pub values_per_tensor: usize,
}

/// What it measured. Only the coordinator's side is timed: the nodes' encoding is not.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub peers: u32,
    pub rounds: u64,
    pub submissions: u64,
    pub payload_bytes: u64,
    /// Seconds in the round machine and the structure checks.
    pub coordinator_seconds: f64,
    pub rounds_per_second: f64,
    pub verifications_per_second: f64,
    /// The process's peak resident memory (Linux `VmHWM`), if known.
    pub peak_rss_bytes: Option<u64>,
}

/// Runs `cfg.rounds` rounds with `cfg.peers` simulated peers.
pub fn simulate(cfg: ScaleConfig) -> Result<ScaleReport> {
    let layout = DeltaLayout(
        (0..cfg.tensors)
            .map(|i| {
                (
                    format!("t{i}.lora_B.weight"),
                    vec![cfg.values_per_tensor as u32],
                )
            })
            .collect(),
    );
    let mut machine = RoundMachine::new(
        MachineConfig {
            shards: cfg.peers,
            quorum: cfg.peers,
            lease_ms: 3_600_000,
            rounds: cfg.rounds,
            data_len: cfg.peers as u64 * 16,
            samples_per_shard: 16,
            seed: 1,
            straggler_multiple: 0.0,
            deadline_quorum: 1,
            // The rules a run has, for peers that are established (trusted).
            leases: crate::config::LeasesSection::default().policy(),
        },
        ContentId::of(b"round 0"),
    );
    let mut structure = StructureState::default();
    // Identities made before the clock starts: minting keys is the peers' cost, not ours.
    let peers: Vec<PeerKey> = (0..cfg.peers).map(|_| PeerKey::random()).collect();
    let mut timed = Duration::ZERO;
    let (mut submissions, mut payload_bytes, mut rounds) = (0u64, 0u64, 0u64);
    let now = 1_000;
    while !machine.is_finished() {
        let round = machine.round();
        let mut grants = Vec::with_capacity(cfg.peers as usize);
        let started = Instant::now();
        for &peer in &peers {
            for action in machine.handle(
                Event::LeaseRequested {
                    peer,
                    trusted: true,
                },
                now,
            ) {
                if let Action::Grant { grant, .. } = action {
                    grants.push((peer, grant));
                }
            }
        }
        timed += started.elapsed();
        if grants.len() != cfg.peers as usize {
            bail!(
                "round {}: {} grants for {} peers",
                round.0,
                grants.len(),
                cfg.peers
            );
        }
        for (peer, grant) in grants {
            // The node's side, not timed: an update of its own, encoded for its lease.
            let payload = node_delta(&layout, grant.seed)
                .encode(cfg.codec, None, grant.seed)?
                .payload;
            payload_bytes += payload.len() as u64;
            submissions += 1;
            let started = Instant::now();
            let checked = structure.check(
                (grant.round, grant.shard),
                grant.seed,
                ContentId::of(&payload),
                &payload,
                &layout,
                cfg.codec,
                &crate::config::VerifySection::default(),
            );
            let norm = checked.as_ref().map(|c| c.norm).ok();
            let mut pending = machine.handle(
                Event::Submitted {
                    peer,
                    lease: grant.lease,
                    round: grant.round,
                    shard: grant.shard,
                    base_adapter: grant.base_adapter,
                    tokens: 1000,
                    checked: checked.map(|_| ()),
                },
                now,
            );
            while let Some(action) = pending.pop() {
                match action {
                    Action::Verify { lease, .. } => pending.extend(machine.handle(
                        Event::Verified {
                            lease,
                            result: Ok(()),
                        },
                        now,
                    )),
                    Action::Verdict { verdict, .. } => {
                        if verdict != Verdict::Accepted {
                            bail!("an honest simulated delta was rejected: {verdict:?}");
                        }
                        structure.accepted(norm.expect("accepted deltas passed the checks"));
                    }
                    Action::Aggregate { round, .. } => {
                        rounds += 1;
                        let adapter = ContentId::of(&(round.0 + 1).to_le_bytes());
                        pending.extend(machine.handle(Event::Aggregated { round, adapter }, now));
                    }
                    _ => {}
                }
            }
            timed += started.elapsed();
        }
    }
    let seconds = timed.as_secs_f64().max(1e-9);
    Ok(ScaleReport {
        peers: cfg.peers,
        rounds,
        submissions,
        payload_bytes,
        coordinator_seconds: seconds,
        rounds_per_second: rounds as f64 / seconds,
        verifications_per_second: submissions as f64 / seconds,
        peak_rss_bytes: peak_rss(),
    })
}

/// A peer's update: small values from a per-lease generator (distinct bytes per peer, so
/// the copy check stays quiet, and near-equal norms, so the norm bound does).
fn node_delta(layout: &DeltaLayout, seed: u64) -> Delta {
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64*: cheap and good enough to look like noise.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        (bits as f32 / (1u64 << 24) as f32 - 0.5) * 1e-3
    };
    layout.delta_from(|_| next())
}

/// Peak resident set of this process, from `/proc/self/status` (Linux only).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_simulated_round_closes_with_every_peer_accepted() {
        let report = simulate(ScaleConfig {
            peers: 20,
            rounds: 3,
            codec: CodecSpec::default(),
            tensors: 4,
            values_per_tensor: 512,
        })
        .unwrap();
        assert_eq!((report.rounds, report.submissions), (3, 60));
        assert!(report.payload_bytes > 0 && report.verifications_per_second > 0.0);
    }
}
