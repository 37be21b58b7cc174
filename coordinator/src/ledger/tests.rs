//! The ledger live and restarted: the same verdicts, as given and as read back from the store,
//! leave the same state.

use herd_protocol::sketch::Agreement;

use super::*;
use crate::store::Store;
use crate::verify::reputation::{ReputationConfig, Standing};

const DENSE: u64 = 24_576;

fn reputation() -> Reputation {
    Reputation::new(
        ReputationConfig {
            replay_new: 1.0,
            replay_trusted: 0.1,
            effect_trusted: 0.1,
            trusted_after: 2,
            ban_after: 3,
        },
        7,
    )
}

fn peer(n: u8) -> PeerKey {
    libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
        .expect("32 bytes")
        .public()
        .to_peer_id()
}

/// A verdict of `peer` on `lease` (shard = lease % 3) with a payload of its own.
fn record(peer: PeerKey, lease: u64, outcome: Verdict, replayed: bool) -> VerdictRecord {
    let (label, reason) = match &outcome {
        Verdict::Accepted => ("accepted".to_string(), String::new()),
        Verdict::Rejected(r) => (r.label().to_string(), r.to_string()),
    };
    VerdictRecord {
        time_ms: 1_000 + lease,
        peer: peer.to_string(),
        lease,
        round: lease / 3,
        shard: (lease % 3) as u32,
        verdict: label,
        reason,
        payload_hash: Some(ContentId::of(&lease.to_le_bytes()).to_hex()),
        payload_bytes: 700 + lease,
        tokens: 160,
        norm: (outcome == Verdict::Accepted).then_some(0.5 + lease as f64 / 100.0),
        effect: None,
        replay: replayed.then_some(Agreement {
            cosine: 0.999,
            rel_error: 0.01,
        }),
        verify_seconds: 0.25,
        replay_seconds: if replayed { 1.5 } else { 0.0 },
        outcome,
    }
}

/// A run's worth of verdicts: honest work (replayed until trusted), timing rejections, strays
/// that do not settle their lease, and a peer struck out by zero deltas.
fn history() -> Vec<VerdictRecord> {
    let (honest, other, cheat) = (peer(1), peer(2), peer(3));
    let zero = || Verdict::Rejected(RejectReason::ZeroDelta);
    vec![
        record(honest, 1, Verdict::Accepted, true),
        record(other, 2, Verdict::Accepted, true),
        record(cheat, 3, zero(), false),
        record(honest, 4, Verdict::Accepted, true),
        record(other, 5, Verdict::Rejected(RejectReason::StaleRound), false),
        record(
            cheat,
            5,
            Verdict::Rejected(RejectReason::NotYourLease),
            false,
        ),
        record(cheat, 6, zero(), false),
        record(honest, 7, Verdict::Accepted, false),
        record(cheat, 8, zero(), false),
        record(other, 9, Verdict::Accepted, true),
    ]
}

#[test]
fn a_restarted_ledger_equals_the_live_one() {
    // Live: each verdict applied as it is given.
    let mut live = Ledger::new(reputation(), DENSE);
    let live_bans: Vec<(PeerKey, String)> = history()
        .iter()
        .filter_map(|v| {
            let p: PeerKey = v.peer.parse().unwrap();
            live.apply(p, v).map(|why| (p, why))
        })
        .collect();
    assert_eq!(
        live_bans.len(),
        1,
        "the third zero delta bans: {live_bans:?}"
    );
    assert_eq!(live_bans[0].0, peer(3));

    // The same verdicts through the real store, read back as a restarted coordinator does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    {
        let store = Store::open(&path).unwrap();
        for v in history() {
            store.record_verdict(&v, None).unwrap();
        }
    }
    let stored = Store::open(&path).unwrap().load().unwrap().verdicts;
    let restarted = Ledger::restore(reputation(), DENSE, &stored).unwrap();

    assert_eq!(live, restarted, "the whole state, live vs restarted");

    // And the state is what the verdicts say, not merely equal.
    let t = restarted.totals();
    assert_eq!(t.accepted_deltas, 5);
    assert_eq!(t.bytes_dense_fp32, 5 * DENSE);
    assert_eq!(t.bytes_uploaded, 701 + 702 + 704 + 707 + 709);
    assert_eq!(t.replays, 4);
    assert_eq!(t.rejects_by_reason["zero_delta"], 3);
    assert_eq!(restarted.credit(&peer(1)).tokens, 3 * 160);
    assert_eq!(restarted.credit(&peer(3)).rejected, 4);
    assert_eq!(restarted.reputation().standing(&peer(1)), Standing::Trusted);
    assert_eq!(restarted.reputation().standing(&peer(3)), Standing::Banned);
    // Lease 5: the stray NotYourLease left the owner's stale-round verdict in place.
    let five = restarted.decided(LeaseId(5)).expect("lease 5 was decided");
    assert_eq!(five.peer, peer(2));
    assert_eq!(five.verdict, Verdict::Rejected(RejectReason::StaleRound));
    let hash = ContentId::of(&7u64.to_le_bytes());
    assert!(
        restarted
            .decided(LeaseId(7))
            .unwrap()
            .is_resubmission(peer(1), &hash)
    );
    assert!(
        !restarted
            .decided(LeaseId(7))
            .unwrap()
            .is_resubmission(peer(2), &hash)
    );
}

#[test]
fn a_verdict_applied_once_more_changes_the_ledger() {
    // The comparison above can tell states apart: one verdict too many is seen.
    let mut once = Ledger::new(reputation(), DENSE);
    let mut twice = Ledger::new(reputation(), DENSE);
    let v = record(peer(1), 1, Verdict::Accepted, true);
    once.apply(peer(1), &v);
    twice.apply(peer(1), &v);
    twice.apply(peer(1), &v);
    assert_ne!(once, twice);
}

#[test]
fn a_corrupt_stored_peer_is_an_error_not_a_skip() {
    let mut v = record(peer(1), 1, Verdict::Accepted, false);
    v.peer = "not-a-peer-id".into();
    let err = Ledger::restore(reputation(), DENSE, &[v]).unwrap_err();
    assert!(format!("{err:#}").contains("not-a-peer-id"), "{err:#}");
}
