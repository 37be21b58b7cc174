//! Picking a run up after a restart: the open round's accepted deltas and live leases from the
//! store. What the verdicts imply (totals, credit, standing, the norm window, payloads seen, the
//! answer each decided lease got) is rebuilt by [`crate::ledger::Ledger::restore`], the same
//! code that applied them live.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use herd_protocol::blobs::BlobStore;
use herd_protocol::codec::CodecSpec;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::{ContentId, LeaseId, Round, ShardId};

use crate::ledger::decides_lease;
use crate::round::{Accepted, Grant, MachineConfig, PeerKey};
use crate::store::Snapshot;

/// The open round as stored.
#[derive(Debug)]
pub struct OpenRound {
    /// Its accepted shards, for the round machine.
    pub accepted: Vec<Accepted>,
    /// Their deltas with token weights, decoded from the stored payloads.
    pub deltas: HashMap<LeaseId, (Delta, u64)>,
    /// Leases granted in it that got no verdict, with their peers.
    pub live: Vec<(Grant, PeerKey)>,
}

/// Reads the open `round` (whose adapter is `adapter`) back from `snapshot`.
pub fn open_round(
    snapshot: &Snapshot,
    round: Round,
    adapter: ContentId,
    machine: &MachineConfig,
    (layout, codec): (&DeltaLayout, CodecSpec),
    blobs: &BlobStore,
) -> Result<OpenRound> {
    let mut accepted = Vec::new();
    let mut deltas = HashMap::new();
    for a in snapshot.accepted.iter().filter(|a| a.round == round.0) {
        let delta = a.delta(blobs, layout, codec, machine)?;
        deltas.insert(LeaseId(a.lease), (delta, a.tokens));
        accepted.push(Accepted {
            lease: LeaseId(a.lease),
            peer: parse_peer(&a.peer, a.lease)?,
            shard: ShardId(a.shard),
            tokens: a.tokens,
        });
    }
    let decided: HashSet<u64> = snapshot
        .verdicts
        .iter()
        .filter(|v| decides_lease(&v.outcome))
        .map(|v| v.lease)
        .collect();
    let live = snapshot
        .leases
        .iter()
        .filter(|(id, l)| l.round == round.0 && !decided.contains(id))
        .map(|(id, l)| {
            let shard = ShardId(l.shard);
            let grant = Grant {
                lease: LeaseId(*id),
                round,
                shard,
                ranges: machine.shard_ranges(round, shard),
                seed: machine.shard_seed(round, shard),
                expires_at_ms: l.expires_at_ms,
                base_adapter: adapter,
            };
            Ok((grant, parse_peer(&l.peer, *id)?))
        })
        .collect::<Result<_>>()?;
    Ok(OpenRound {
        accepted,
        deltas,
        live,
    })
}

fn parse_peer(peer: &str, lease: u64) -> Result<PeerKey> {
    peer.parse()
        .with_context(|| format!("stored lease {lease}: peer `{peer}`"))
}
