//! Rules of the round machine, driven with simulated peers and a simulated clock.

use super::*;

fn cfg(shards: u32, quorum: u32, rounds: u64) -> MachineConfig {
    MachineConfig {
        shards,
        quorum,
        lease_ms: 1000,
        rounds,
        data_len: 100,
        samples_per_shard: 10,
        seed: 7,
        straggler_multiple: 0.0,
        deadline_quorum: 1,
        leases: LeasePolicy::unlimited(shards),
    }
}

/// A peer identity named for the test: the same name gives the same id.
fn id(name: &str) -> PeerKey {
    let secret = *blake3::hash(name.as_bytes()).as_bytes();
    libp2p::identity::Keypair::ed25519_from_bytes(secret)
        .expect("32 bytes are an ed25519 secret")
        .public()
        .to_peer_id()
}

fn adapter(n: u8) -> ContentId {
    ContentId::of(&[n])
}

fn grant(m: &mut RoundMachine, peer: &str, now: u64) -> Grant {
    match m
        .handle(
            Event::LeaseRequested {
                peer: id(peer),
                trusted: true,
            },
            now,
        )
        .pop()
    {
        Some(Action::Grant { grant, .. }) => grant,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// Submits for `g` and, when the machine asks for verification, reports it passed.
fn submit(m: &mut RoundMachine, peer: &str, g: &Grant, now: u64) -> Vec<Action> {
    submit_verified(m, peer, g, now, Ok(()))
}

fn submit_verified(
    m: &mut RoundMachine,
    peer: &str,
    g: &Grant,
    now: u64,
    result: Result<(), RejectReason>,
) -> Vec<Action> {
    let mut actions = m.handle(
        Event::Submitted {
            peer: id(peer),
            lease: g.lease,
            round: g.round,
            shard: g.shard,
            base_adapter: g.base_adapter,
            tokens: 100,
            checked: Ok(()),
        },
        now,
    );
    if let Some(Action::Verify { lease, .. }) = actions.last().cloned() {
        actions.extend(m.handle(Event::Verified { lease, result }, now));
    }
    actions
}

fn verdict(actions: &[Action]) -> Verdict {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Verdict { verdict, .. } => Some(verdict.clone()),
            _ => None,
        })
        .expect("a verdict")
}

#[test]
fn rounds_close_at_quorum_and_open_after_aggregation() {
    let mut m = RoundMachine::new(cfg(3, 3, 2), adapter(0));
    let grants: Vec<Grant> = ["a", "b", "c"]
        .iter()
        .map(|p| grant(&mut m, p, 0))
        .collect();
    let shards: Vec<u32> = grants.iter().map(|g| g.shard.0).collect();
    assert_eq!(shards, vec![0, 1, 2]);
    assert!(matches!(
        m.handle(
            Event::LeaseRequested {
                peer: id("d"),
                trusted: true
            },
            0
        )[0],
        Action::NoWork {
            finished: false,
            ..
        }
    ));
    assert_eq!(
        verdict(&submit(&mut m, "a", &grants[0], 10)),
        Verdict::Accepted
    );
    assert_eq!(
        verdict(&submit(&mut m, "b", &grants[1], 10)),
        Verdict::Accepted
    );
    let last = submit(&mut m, "c", &grants[2], 10);
    let Some(Action::Aggregate { round, accepted }) = last.last() else {
        panic!("{last:?}")
    };
    assert_eq!((*round, accepted.len()), (Round(0), 3));
    // While aggregating there is no work.
    assert!(matches!(
        m.handle(
            Event::LeaseRequested {
                peer: id("a"),
                trusted: true
            },
            20
        )[0],
        Action::NoWork {
            finished: false,
            ..
        }
    ));
    let opened = m.handle(
        Event::Aggregated {
            round: Round(0),
            adapter: adapter(1),
        },
        30,
    );
    assert_eq!(
        opened,
        vec![Action::RoundOpened {
            round: Round(1),
            adapter: adapter(1)
        }]
    );
    let g = grant(&mut m, "a", 40);
    assert_eq!((g.round, g.base_adapter), (Round(1), adapter(1)));
    assert_ne!(
        g.ranges, grants[0].ranges,
        "a new round trains on new examples"
    );
    // Finish round 1 and the run.
    let rest: Vec<Grant> = ["b", "c"].iter().map(|p| grant(&mut m, p, 40)).collect();
    submit(&mut m, "a", &g, 50);
    submit(&mut m, "b", &rest[0], 50);
    submit(&mut m, "c", &rest[1], 50);
    assert_eq!(
        m.handle(
            Event::Aggregated {
                round: Round(1),
                adapter: adapter(2)
            },
            60
        ),
        vec![Action::Finished { rounds: 2 }]
    );
    assert!(matches!(
        m.handle(
            Event::LeaseRequested {
                peer: id("a"),
                trusted: true
            },
            70
        )[0],
        Action::NoWork { finished: true, .. }
    ));
}

#[test]
fn expired_leases_are_reissued_and_late_results_rejected() {
    let mut m = RoundMachine::new(cfg(1, 1, 5), adapter(0));
    let first = grant(&mut m, "slow", 0);
    let actions = m.handle(Event::Tick, 1000);
    assert_eq!(
        actions,
        vec![Action::LeaseExpired {
            peer: id("slow"),
            lease: first.lease,
            shard: ShardId(0)
        }]
    );
    let second = grant(&mut m, "fast", 1001);
    assert_eq!(second.shard, first.shard);
    assert_ne!(second.lease, first.lease);
    assert_eq!(
        verdict(&submit(&mut m, "slow", &first, 1002)),
        Verdict::Rejected(RejectReason::ExpiredLease)
    );
    assert_eq!(
        verdict(&submit(&mut m, "fast", &second, 1003)),
        Verdict::Accepted
    );
}

#[test]
fn submissions_are_bound_to_their_lease() {
    let mut m = RoundMachine::new(cfg(2, 2, 3), adapter(0));
    let g = grant(&mut m, "a", 0);
    let reject = |m: &mut RoundMachine, peer: &str, g: &Grant| verdict(&submit(m, peer, g, 1));
    assert_eq!(
        reject(&mut m, "mallory", &g),
        Verdict::Rejected(RejectReason::NotYourLease)
    );
    let unknown = Grant {
        lease: LeaseId(999),
        ..g.clone()
    };
    assert_eq!(
        reject(&mut m, "a", &unknown),
        Verdict::Rejected(RejectReason::UnknownLease)
    );
    let g2 = grant(&mut m, "a", 0);
    let wrong_base = Grant {
        base_adapter: adapter(9),
        ..g2.clone()
    };
    assert_eq!(
        reject(&mut m, "a", &wrong_base),
        Verdict::Rejected(RejectReason::WrongBaseAdapter)
    );
    let wrong_shard = Grant {
        shard: ShardId(1),
        ..g.clone()
    };
    assert_eq!(
        reject(&mut m, "a", &wrong_shard),
        Verdict::Rejected(RejectReason::LeaseMismatch)
    );
    let bad = m.handle(
        Event::Submitted {
            peer: id("a"),
            lease: g.lease,
            round: g.round,
            shard: g.shard,
            base_adapter: g.base_adapter,
            tokens: 1,
            checked: Err(RejectReason::BadSignature),
        },
        1,
    );
    assert_eq!(verdict(&bad), Verdict::Rejected(RejectReason::BadSignature));
    // A rejection ends the lease (resubmitting is a duplicate) and reissues the shard at once.
    assert_eq!(
        reject(&mut m, "a", &g),
        Verdict::Rejected(RejectReason::Duplicate)
    );
    let again = grant(&mut m, "b", 2);
    assert_eq!(again.shard, g.shard);
    assert_eq!(verdict(&submit(&mut m, "b", &again, 3)), Verdict::Accepted);
    assert_eq!(
        reject(&mut m, "b", &again),
        Verdict::Rejected(RejectReason::Duplicate)
    );
}

#[test]
fn verification_decides_and_failed_shards_are_reissued() {
    let mut m = RoundMachine::new(cfg(2, 2, 1), adapter(0));
    let a = grant(&mut m, "a", 0);
    let b = grant(&mut m, "b", 0);
    // While verifying, the lease does not expire and the shard is not handed out.
    let pending = m.handle(
        Event::Submitted {
            peer: id("a"),
            lease: a.lease,
            round: a.round,
            shard: a.shard,
            base_adapter: a.base_adapter,
            tokens: 5,
            checked: Ok(()),
        },
        1,
    );
    assert!(matches!(pending.as_slice(), [Action::Verify { .. }]));
    let later = m.handle(Event::Tick, 5_000);
    assert!(
        later
            .iter()
            .all(|x| !matches!(x, Action::LeaseExpired { lease, .. } if *lease == a.lease)),
        "{later:?}"
    );
    let failed = m.handle(
        Event::Verified {
            lease: a.lease,
            result: Err(RejectReason::ZeroDelta),
        },
        5_001,
    );
    assert_eq!(verdict(&failed), Verdict::Rejected(RejectReason::ZeroDelta));
    let again = grant(&mut m, "c", 5_002);
    assert_eq!(again.shard, a.shard);
    // b's lease expired at 1000: its late result is refused.
    assert_eq!(
        verdict(&submit(&mut m, "b", &b, 5_003)),
        Verdict::Rejected(RejectReason::ExpiredLease)
    );
}

#[test]
fn a_banned_peer_loses_its_accepted_shards_and_leases() {
    let mut m = RoundMachine::new(cfg(3, 3, 1), adapter(0));
    let a = grant(&mut m, "a", 0);
    let a2 = grant(&mut m, "a", 0);
    let b = grant(&mut m, "b", 0);
    assert_eq!(verdict(&submit(&mut m, "a", &a, 1)), Verdict::Accepted);
    assert_eq!(verdict(&submit(&mut m, "b", &b, 1)), Verdict::Accepted);
    let banned = m.handle(
        Event::Banned {
            peer: id("a"),
            reason: "test".into(),
        },
        2,
    );
    assert_eq!(
        banned,
        vec![Action::Excluded {
            peer: id("a"),
            lease: a.lease,
            round: a.round,
            shard: a.shard,
        }]
    );
    assert_eq!(m.accepted_count(), 1);
    // Both of a's shards are open again.
    let c1 = grant(&mut m, "c", 3);
    let c2 = grant(&mut m, "c", 3);
    let mut shards = vec![c1.shard, c2.shard];
    shards.sort();
    let mut expected = vec![a.shard, a2.shard];
    expected.sort();
    assert_eq!(shards, expected);
}

#[test]
fn leases_of_a_closed_round_are_stale() {
    let mut m = RoundMachine::new(cfg(2, 1, 3), adapter(0));
    let a = grant(&mut m, "a", 0);
    let b = grant(&mut m, "b", 0);
    submit(&mut m, "a", &a, 1);
    m.handle(
        Event::Aggregated {
            round: Round(0),
            adapter: adapter(1),
        },
        2,
    );
    assert_eq!(
        verdict(&submit(&mut m, "b", &b, 3)),
        Verdict::Rejected(RejectReason::StaleRound)
    );
}

#[test]
fn returned_leases_are_reissued_at_once() {
    let mut m = RoundMachine::new(cfg(1, 1, 1), adapter(0));
    let g = grant(&mut m, "a", 0);
    let back = m.handle(
        Event::Returned {
            peer: id("a"),
            lease: g.lease,
        },
        5,
    );
    assert_eq!(
        back,
        vec![Action::Returned {
            peer: id("a"),
            lease: g.lease,
            released: true
        }]
    );
    assert_eq!(grant(&mut m, "b", 6).shard, g.shard);
    let again = m.handle(
        Event::Returned {
            peer: id("a"),
            lease: g.lease,
        },
        7,
    );
    assert!(matches!(
        again[0],
        Action::Returned {
            released: false,
            ..
        }
    ));
}

#[test]
fn shards_cover_the_data_and_wrap() {
    let m = RoundMachine::new(cfg(3, 3, 10), adapter(0));
    assert_eq!(
        m.shard_ranges(Round(0), ShardId(1)),
        vec![SampleRange { start: 10, end: 20 }]
    );
    // Round 3, shard 1: slice 10 of 10-example slices over 100 examples wraps to the start.
    assert_eq!(
        m.shard_ranges(Round(3), ShardId(1)),
        vec![SampleRange { start: 0, end: 10 }]
    );
    assert_ne!(
        m.shard_seed(Round(0), ShardId(0)),
        m.shard_seed(Round(0), ShardId(1))
    );
    assert_ne!(
        m.shard_seed(Round(0), ShardId(0)),
        m.shard_seed(Round(1), ShardId(0))
    );
}

#[test]
fn thousands_of_simulated_peers_with_failures_complete_every_round() {
    // 2,000 peers, 64 shards a round, quorum 48; a third of the peers never submit. Every
    // loop is bounded; the run must finish all rounds with each round's quorum accepted.
    let peers: Vec<String> = (0..2000).map(|i| format!("p{i}")).collect();
    let mut m = RoundMachine::new(
        MachineConfig {
            shards: 64,
            quorum: 48,
            lease_ms: 50,
            rounds: 20,
            data_len: 10_000,
            samples_per_shard: 8,
            seed: 1,
            straggler_multiple: 0.0,
            deadline_quorum: 1,
            leases: LeasePolicy::unlimited(64),
        },
        adapter(0),
    );
    let mut now = 0u64;
    let mut aggregated = 0;
    'outer: for step in 0..200_000usize {
        now += 1;
        let peer = &peers[step % peers.len()];
        let actions = m.handle(
            Event::LeaseRequested {
                peer: id(peer),
                trusted: true,
            },
            now,
        );
        for action in actions {
            match action {
                Action::Grant { grant, .. } if step % 3 != 0 => {
                    for a in submit(&mut m, peer, &grant, now) {
                        if let Action::Aggregate { round, accepted } = a {
                            assert_eq!(accepted.len(), 48);
                            aggregated += 1;
                            let next = m.handle(
                                Event::Aggregated {
                                    round,
                                    adapter: adapter(round.0 as u8 + 1),
                                },
                                now,
                            );
                            if matches!(next.last(), Some(Action::Finished { .. })) {
                                break 'outer;
                            }
                        }
                    }
                }
                Action::NoWork { finished: true, .. } => break 'outer,
                _ => {}
            }
        }
    }
    assert_eq!(aggregated, 20);
    assert!(m.is_finished());
}

#[test]
fn a_resumed_machine_keeps_its_round_accepted_shards_and_live_leases() {
    let accepted = |shard: u32| Accepted {
        lease: LeaseId(shard as u64 + 1),
        peer: id("a"),
        shard: ShardId(shard),
        tokens: 100,
    };
    // Round 2 of 5 with shard 0 accepted and shard 1 leased to b until t = 5000.
    let (mut m, due) = RoundMachine::resume(
        cfg(3, 3, 5),
        Round(2),
        adapter(2),
        vec![accepted(0)],
        vec![(LeaseId(9), id("b"), ShardId(1), 5000)],
        1 << 32,
    );
    assert!(due.is_empty());
    assert_eq!(
        (m.round(), m.adapter(), m.accepted_count()),
        (Round(2), adapter(2), 1)
    );
    let g = grant(&mut m, "c", 1000);
    assert_eq!(
        (g.shard, g.lease),
        (ShardId(2), LeaseId(1 << 32)),
        "new ids, free shard"
    );
    assert!(matches!(
        m.handle(
            Event::LeaseRequested {
                peer: id("d"),
                trusted: true
            },
            1000
        )
        .pop(),
        Some(Action::NoWork { .. })
    ));
    // b's lease from before the stop is honoured.
    let old = Grant {
        lease: LeaseId(9),
        round: Round(2),
        shard: ShardId(1),
        ranges: m.shard_ranges(Round(2), ShardId(1)),
        seed: m.shard_seed(Round(2), ShardId(1)),
        expires_at_ms: 5000,
        base_adapter: adapter(2),
    };
    assert_eq!(verdict(&submit(&mut m, "b", &old, 2000)), Verdict::Accepted);

    // A round that had reached quorum aggregates at once; a finished run stays finished.
    let (_, due) = RoundMachine::resume(
        cfg(2, 2, 5),
        Round(1),
        adapter(1),
        vec![accepted(0), accepted(1)],
        Vec::new(),
        1,
    );
    assert!(
        matches!(due.as_slice(), [Action::Aggregate { round: Round(1), accepted }] if accepted.len() == 2)
    );
    let (m, due) = RoundMachine::resume(
        cfg(2, 2, 5),
        Round(5),
        adapter(5),
        Vec::new(),
        Vec::new(),
        1,
    );
    assert!(m.is_finished() && matches!(due.as_slice(), [Action::Finished { rounds: 5 }]));
}

/// A machine with the straggler deadline on, after three rounds of 100 ms each (peers a and b
/// one shard each); returns it and the time.
fn after_three_quick_rounds(multiple: f64, deadline_quorum: u32) -> (RoundMachine, u64) {
    let mut c = cfg(2, 2, 10);
    c.straggler_multiple = multiple;
    c.deadline_quorum = deadline_quorum;
    let mut m = RoundMachine::new(c, adapter(0));
    let mut now = 0;
    for round in 0..3u8 {
        m.handle(Event::Tick, now);
        let a = grant(&mut m, "a", now);
        let b = grant(&mut m, "b", now);
        now += 100;
        submit(&mut m, "a", &a, now);
        let closed = submit(&mut m, "b", &b, now);
        assert!(closed.iter().any(|x| matches!(x, Action::Aggregate { .. })));
        assert!(m.deadline_ms().is_none(), "no deadline while aggregating");
        m.handle(
            Event::Aggregated {
                round: Round(round as u64),
                adapter: adapter(round + 1),
            },
            now,
        );
    }
    (m, now)
}

#[test]
fn a_round_held_up_by_a_straggler_closes_at_its_deadline() {
    // Rounds took 100 ms: the deadline is 300 ms after a round opens.
    let (mut m, now) = after_three_quick_rounds(3.0, 1);
    // Round 3: a is quick, b straggles.
    m.handle(Event::Tick, now);
    let opened = now;
    assert_eq!(m.deadline_ms(), Some(opened + 300));
    let a = grant(&mut m, "a", now);
    let b = grant(&mut m, "b", now);
    submit(&mut m, "a", &a, now + 50);
    assert!(
        m.handle(Event::Tick, opened + 299).is_empty(),
        "not before the deadline"
    );
    let late = m.handle(Event::Tick, opened + 300);
    assert!(
        matches!(late.as_slice(), [Action::DeadlinePassed { round: Round(3), accepted: 1, .. }, Action::Aggregate { accepted, .. }] if accepted.len() == 1),
        "{late:?}"
    );
    // The straggler's delta arrives after the round closed: stale, with its reason.
    assert_eq!(
        verdict(&submit(&mut m, "b", &b, opened + 400)),
        Verdict::Rejected(RejectReason::StaleRound)
    );
}

#[test]
fn without_enough_accepted_shards_the_deadline_waits() {
    let (mut m, now) = after_three_quick_rounds(2.0, 2);
    m.handle(Event::Tick, now);
    let a = grant(&mut m, "a", now);
    submit(&mut m, "a", &a, now + 10);
    // One shard of the two it needs: the round stays open past the deadline.
    assert!(
        m.handle(Event::Tick, now + 10_000)
            .iter()
            .all(|x| !matches!(x, Action::Aggregate { .. }))
    );
}
