//! The coordinator's durable state, in redb (`state.redb` in the data dir): where the run is
//! (round, adapter θ_r, outer momentum, held-out losses, checkpoints), every lease granted,
//! every verdict, and every accepted delta (its payload lives in the blob store). Each write
//! is one transaction committed to disk before the coordinator acts on it, so a coordinator
//! killed at any moment restarts where it was, and nothing it accepted is lost or counted
//! twice.
//!
//! Reading the state back is here too: [`resume`] picks a run up after a restart, [`audit`]
//! rebuilds its adapter from the recorded deltas, and both decode a stored delta with
//! [`AcceptedRecord::delta`].

pub mod audit;
pub mod resume;

use std::path::Path;

use anyhow::{Context, Result};
use herd_protocol::blobs::BlobStore;
use herd_protocol::codec::CodecSpec;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::{ContentId, Round, ShardId};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::round::MachineConfig;
use crate::verify::log::VerdictRecord;

/// Where the run is: changes once per round, atomically.
const RUN: TableDefinition<&str, &[u8]> = TableDefinition::new("run");
/// Lease id → the grant, while it is live: a lease leaves when it is returned, expires or gets
/// a deciding verdict, and whatever is left of a round leaves when it closes, so the table
/// holds about one record per shard however many identities come and go (resume is its only
/// reader; audit needs the verdicts and accepted deltas, not the grants).
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
/// Every verdict, numbered in the order given.
const VERDICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("verdicts");
/// (round, shard) → the accepted delta that counts for it.
const ACCEPTED: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("accepted");

const RUN_STATE: &str = "state";

/// Where the run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The round open now (or the number of rounds done when finished).
    pub round: u64,
    /// θ_round, in the blob store.
    pub adapter: ContentId,
    /// The outer optimizer's momentum after the last round, in the blob store.
    pub outer_state: Option<ContentId>,
    /// Held-out loss after each round; index 0 = before training.
    pub heldout_loss: Vec<f64>,
    pub checkpoints: Vec<Checkpoint>,
    /// Bumped at every start; lease ids carry it so ids never repeat across restarts.
    pub epoch: u32,
}

/// A lease as granted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub peer: String,
    pub round: u64,
    pub shard: u32,
    pub expires_at_ms: u64,
}

/// An accepted delta: enough to apply it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcceptedRecord {
    pub lease: u64,
    pub peer: String,
    pub round: u64,
    pub shard: u32,
    /// The payload as it arrived, in the blob store.
    pub payload: ContentId,
    pub tokens: u64,
    pub norm: f64,
}

impl AcceptedRecord {
    /// The delta as it was accepted: its payload read from `blobs` and decoded for the run's
    /// `layout` and `codec` with its shard's seed.
    pub fn delta(
        &self,
        blobs: &BlobStore,
        layout: &DeltaLayout,
        codec: CodecSpec,
        machine: &MachineConfig,
    ) -> Result<Delta> {
        let seed = machine.shard_seed(Round(self.round), ShardId(self.shard));
        let bytes = blobs.read(&self.payload)?;
        let decoded = Delta::decode(&bytes, layout, codec, seed).with_context(|| {
            format!("stored delta of round {} shard {}", self.round, self.shard)
        })?;
        Ok(decoded.delta)
    }
}

/// Everything stored, as a restart needs it.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub run: Option<RunState>,
    pub leases: Vec<(u64, GrantRecord)>,
    /// In the order they were given.
    pub verdicts: Vec<VerdictRecord>,
    /// In (round, shard) order.
    pub accepted: Vec<AcceptedRecord>,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

// bincode, not JSON: figures can be NaN (a loss not measured), which JSON cannot carry.
fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(bincode::serde::encode_to_vec(
        v,
        bincode::config::standard(),
    )?)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .with_context(|| format!("corrupt {what} record in the state"))
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).with_context(|| format!("opening {}", path.display()))?;
        // Create the tables, so reads of a fresh store find them empty.
        let tx = db.begin_write()?;
        tx.open_table(RUN)?;
        tx.open_table(LEASES)?;
        tx.open_table(VERDICTS)?;
        tx.open_table(ACCEPTED)?;
        tx.commit()?;
        Ok(Store { db })
    }

    /// Reads everything back.
    pub fn load(&self) -> Result<Snapshot> {
        let tx = self.db.begin_read()?;
        let run = tx
            .open_table(RUN)?
            .get(RUN_STATE)?
            .map(|v| decode(v.value(), "run"))
            .transpose()?;
        let mut leases = Vec::new();
        for item in tx.open_table(LEASES)?.iter()? {
            let (k, v) = item?;
            leases.push((k.value(), decode(v.value(), "lease")?));
        }
        let mut verdicts = Vec::new();
        for item in tx.open_table(VERDICTS)?.iter()? {
            verdicts.push(decode(item?.1.value(), "verdict")?);
        }
        let mut accepted = Vec::new();
        for item in tx.open_table(ACCEPTED)?.iter()? {
            accepted.push(decode(item?.1.value(), "accepted delta")?);
        }
        Ok(Snapshot {
            run,
            leases,
            verdicts,
            accepted,
        })
    }

    /// Writes where the run is (at the start, and when a round closes), and drops the lease
    /// records of the rounds before `state.round` in the same transaction.
    pub fn set_run(&self, state: &RunState) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(RUN)?
            .insert(RUN_STATE, encode(state)?.as_slice())?;
        {
            let mut leases = tx.open_table(LEASES)?;
            let mut closed = Vec::new();
            for item in leases.iter()? {
                let (id, record) = item?;
                let record: GrantRecord = decode(record.value(), "lease")?;
                if record.round < state.round {
                    closed.push(id.value());
                }
            }
            for id in closed {
                leases.remove(id)?;
            }
        }
        tx.commit().context("committing the run state")?;
        Ok(())
    }

    pub fn record_lease(&self, lease: u64, record: &GrantRecord) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(LEASES)?
            .insert(lease, encode(record)?.as_slice())?;
        tx.commit().context("committing a lease")?;
        Ok(())
    }

    /// Forgets a lease that ended without a verdict (returned or expired): a restart has
    /// nothing to resume of it.
    pub fn end_lease(&self, lease: u64) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(LEASES)?.remove(lease)?;
        tx.commit().context("committing a lease's end")?;
        Ok(())
    }

    /// Records a verdict and, when accepted, the delta that now counts for its shard: both or
    /// neither. A verdict that decides its lease ends the lease's record too.
    pub fn record_verdict(
        &self,
        verdict: &VerdictRecord,
        accepted: Option<&AcceptedRecord>,
    ) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut verdicts = tx.open_table(VERDICTS)?;
            let next = verdicts.last()?.map_or(0, |(k, _)| k.value() + 1);
            verdicts.insert(next, encode(verdict)?.as_slice())?;
        }
        if crate::ledger::decides_lease(&verdict.outcome) {
            tx.open_table(LEASES)?.remove(verdict.lease)?;
        }
        if let Some(a) = accepted {
            tx.open_table(ACCEPTED)?
                .insert((a.round, a.shard), encode(a)?.as_slice())?;
        }
        tx.commit().context("committing a verdict")?;
        Ok(())
    }

    /// The accepted deltas of rounds `from..to`, in (round, shard) order.
    pub fn accepted_between(&self, from: u64, to: u64) -> Result<Vec<AcceptedRecord>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(ACCEPTED)?;
        let mut out = Vec::new();
        for item in table.range((from, 0)..(to, 0))? {
            out.push(decode(item?.1.value(), "accepted delta")?);
        }
        Ok(out)
    }

    /// Forgets the accepted delta of `(round, shard)` (its peer was banned before the round
    /// closed); its verdict stays.
    pub fn exclude(&self, round: u64, shard: u32) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(ACCEPTED)?.remove((round, shard))?;
        tx.commit().context("committing an exclusion")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(lease: u64, verdict: &str) -> VerdictRecord {
        VerdictRecord {
            time_ms: 1,
            peer: "p".into(),
            lease,
            round: 0,
            shard: 1,
            verdict: verdict.into(),
            reason: String::new(),
            outcome: herd_protocol::messages::Verdict::Accepted,
            payload_hash: Some("ab".into()),
            payload_bytes: 3,
            tokens: 4,
            norm: Some(f64::NAN),
            effect: None,
            replay: None,
            verify_seconds: 0.0,
            replay_seconds: 0.0,
        }
    }

    #[test]
    fn what_is_committed_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let run = RunState {
            round: 2,
            adapter: ContentId::of(b"a"),
            outer_state: Some(ContentId::of(b"m")),
            heldout_loss: vec![3.0, 2.0, 1.5],
            checkpoints: Vec::new(),
            epoch: 1,
        };
        let accepted = AcceptedRecord {
            lease: 7,
            peer: "p".into(),
            round: 2,
            shard: 1,
            payload: ContentId::of(b"d"),
            tokens: 4,
            norm: 0.5,
        };
        {
            let store = Store::open(&path).unwrap();
            assert!(
                store.load().unwrap().run.is_none(),
                "a fresh store is empty"
            );
            store.set_run(&run).unwrap();
            let lease = GrantRecord {
                peer: "p".into(),
                round: 2,
                shard: 1,
                expires_at_ms: 9,
            };
            for id in [7, 8, 9, 10] {
                store.record_lease(id, &lease).unwrap();
            }
            store.end_lease(10).unwrap(); // returned
            store
                .record_verdict(&verdict(7, "accepted"), Some(&accepted))
                .unwrap();
            store
                .record_verdict(&verdict(8, "zero_delta"), None)
                .unwrap();
        }
        let snap = Store::open(&path).unwrap().load().unwrap();
        assert_eq!(snap.run, Some(run.clone()));
        let live: Vec<u64> = snap.leases.iter().map(|(id, _)| *id).collect();
        assert_eq!(live, [9], "decided and returned leases leave the store");
        assert_eq!(snap.verdicts.len(), 2);
        assert_eq!(snap.verdicts[1].verdict, "zero_delta");
        assert!(
            snap.verdicts[0].norm.unwrap().is_nan(),
            "NaN figures survive"
        );
        assert_eq!(snap.accepted, vec![accepted.clone()]);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.accepted_between(2, 3).unwrap(), vec![accepted]);
        assert!(store.accepted_between(0, 2).unwrap().is_empty());
        store.set_run(&RunState { round: 3, ..run }).unwrap();
        assert!(
            store.load().unwrap().leases.is_empty(),
            "a closed round's leases leave with it"
        );
        drop(store);
        Store::open(&path).unwrap().exclude(2, 1).unwrap();
        assert!(
            Store::open(&path)
                .unwrap()
                .load()
                .unwrap()
                .accepted
                .is_empty()
        );
    }
}
