//! The open-network lease rules (see [`LeasePolicy`]), with simulated peers and clock.

use super::*;

fn open_cfg(shards: u32) -> MachineConfig {
    MachineConfig {
        shards,
        quorum: shards,
        lease_ms: 1000,
        rounds: 10,
        data_len: 100,
        samples_per_shard: 10,
        seed: 7,
        straggler_multiple: 0.0,
        deadline_quorum: 1,
        leases: LeasePolicy {
            per_peer: 1,
            idle_grace_ms: 500,
            newcomer_share: 0.5,
            backup_after: 2.0,
            miss_backoff_ms: 100,
            max_backoff_ms: 10_000,
            ban_after_expiries: 3,
        },
    }
}

fn peer(n: u8) -> PeerKey {
    libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
        .unwrap()
        .public()
        .to_peer_id()
}

fn ask(m: &mut RoundMachine, p: PeerKey, trusted: bool, now: u64) -> Result<Grant, String> {
    let actions = m.handle(Event::LeaseRequested { peer: p, trusted }, now);
    match actions
        .into_iter()
        .rev()
        .find(|a| matches!(a, Action::Grant { .. } | Action::NoWork { .. }))
    {
        Some(Action::Grant { grant, .. }) => Ok(grant),
        Some(Action::NoWork { reason, .. }) => Err(reason),
        other => panic!("{other:?}"),
    }
}

fn deliver(m: &mut RoundMachine, p: PeerKey, g: &Grant, now: u64) -> Vec<Action> {
    let mut actions = m.handle(
        Event::Submitted {
            peer: p,
            lease: g.lease,
            round: g.round,
            shard: g.shard,
            base_adapter: g.base_adapter,
            tokens: 10,
            checked: Ok(()),
        },
        now,
    );
    actions.extend(m.handle(
        Event::Verified {
            lease: g.lease,
            result: Ok(()),
        },
        now,
    ));
    actions
}

#[test]
fn one_live_lease_per_peer_unless_a_trusted_peer_finds_a_shard_idle() {
    let mut m = RoundMachine::new(open_cfg(4), ContentId::of(b"a"));
    let (a, t) = (peer(1), peer(2));
    ask(&mut m, a, false, 0).unwrap();
    assert!(
        ask(&mut m, a, false, 10)
            .unwrap_err()
            .contains("already holds 1")
    );
    ask(&mut m, t, true, 10).unwrap();
    assert!(
        ask(&mut m, t, true, 20).is_err(),
        "shards free for 20 ms are not idle yet"
    );
    let extra = ask(&mut m, t, true, 600).unwrap();
    assert_eq!(
        extra.round,
        Round(0),
        "idle past the grace: a trusted peer takes it"
    );
    assert!(ask(&mut m, a, false, 600).is_err(), "a newcomer never does");
}

#[test]
fn newcomers_together_hold_at_most_their_share() {
    let mut m = RoundMachine::new(open_cfg(4), ContentId::of(b"a"));
    // 300 fresh identities ask: two of four shards (the share, 0.5) go to them.
    let granted = (10..=255u8)
        .filter(|n| ask(&mut m, peer(*n), false, 0).is_ok())
        .count();
    assert_eq!(granted, 2);
    let refused = ask(&mut m, peer(3), false, 0).unwrap_err();
    assert!(refused.contains("not yet trusted"), "{refused}");
    // The rest is there for peers in good standing.
    ask(&mut m, peer(4), true, 0).unwrap();
    ask(&mut m, peer(5), true, 0).unwrap();
}

#[test]
fn unused_leases_back_off_then_ban() {
    let mut m = RoundMachine::new(open_cfg(2), ContentId::of(b"a"));
    let h = peer(9);
    let mut now = 0;
    let mut waits = Vec::new();
    for _ in 0..3 {
        let g = ask(&mut m, h, false, now).unwrap();
        now = g.expires_at_ms;
        let actions = m.handle(Event::Tick, now);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::LeaseExpired { .. }))
        );
        if let Some(Action::Banned { reason, .. }) =
            actions.iter().find(|a| matches!(a, Action::Banned { .. }))
        {
            assert!(reason.contains("3 leases in a row expired"), "{reason}");
            assert!(
                ask(&mut m, h, false, now + 1_000_000)
                    .unwrap_err()
                    .contains("banned")
            );
            // Expired, handed back (the probe), expired: the third miss in a row waits 4×.
            assert_eq!(waits, vec![100, 400], "the wait doubles with each miss");
            return;
        }
        let refused = ask(&mut m, h, false, now).unwrap_err();
        assert!(refused.contains("backing off"), "{refused}");
        let mut wait = 1;
        while ask(&mut m, h, false, now + wait).is_err() {
            wait += 1;
        }
        // The probe above took a lease: handing it back is a miss too.
        waits.push(wait);
        m.handle(
            Event::Returned {
                peer: h,
                lease: LeaseId(m.next_lease - 1),
            },
            now + wait,
        );
        now += 100_000;
    }
    panic!("three expiries did not ban: {waits:?}");
}

#[test]
fn a_trusted_peer_backs_up_a_shard_a_newcomer_sits_on_and_the_first_delta_counts() {
    let mut cfg = open_cfg(1);
    cfg.leases.newcomer_share = 1.0;
    let mut m = RoundMachine::new(cfg, ContentId::of(b"a"));
    let (t, n) = (peer(1), peer(2));
    // Three rounds delivered by the trusted peer in 100 ms each: the usual time is known.
    let mut now = 0;
    for _ in 0..3 {
        let g = ask(&mut m, t, true, now).unwrap();
        now += 100;
        deliver(&mut m, t, &g, now);
        let round = m.round();
        m.handle(
            Event::Aggregated {
                round,
                adapter: ContentId::of(&[round.0 as u8]),
            },
            now,
        );
    }
    let sat_on = ask(&mut m, n, false, now).unwrap();
    assert!(
        ask(&mut m, t, true, now + 100).is_err(),
        "not past twice the usual time"
    );
    let backup = ask(&mut m, t, true, now + 250).unwrap();
    assert_eq!(backup.shard, sat_on.shard);
    let actions = deliver(&mut m, t, &backup, now + 300);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Aggregate { .. }))
    );
    // The newcomer's late delta is no strike: the shard was taken.
    let late = m.handle(
        Event::Submitted {
            peer: n,
            lease: sat_on.lease,
            round: sat_on.round,
            shard: sat_on.shard,
            base_adapter: sat_on.base_adapter,
            tokens: 10,
            checked: Ok(()),
        },
        now + 400,
    );
    assert!(
        late.iter().any(
            |a| matches!(a, Action::Verdict { verdict: Verdict::Rejected(r), .. } if !r.is_strike())
        ),
        "{late:?}"
    );
}

#[test]
fn identities_that_missed_once_and_left_are_forgotten_within_the_hour() {
    let mut m = RoundMachine::new(open_cfg(1), ContentId::of(b"a"));
    for n in 10..60u8 {
        let g = ask(&mut m, peer(n), false, 0).unwrap();
        m.handle(
            Event::Returned {
                peer: peer(n),
                lease: g.lease,
            },
            0,
        );
    }
    assert_eq!(m.fairness.len(), 50, "each is backing off");
    // A round opens two hours later: the records whose backoff ended an hour ago go.
    let g = ask(&mut m, peer(1), true, 7_200_000).unwrap();
    deliver(&mut m, peer(1), &g, 7_200_000);
    m.handle(
        Event::Aggregated {
            round: Round(0),
            adapter: ContentId::of(b"b"),
        },
        7_200_000,
    );
    assert_eq!(m.fairness.len(), 0);
}
