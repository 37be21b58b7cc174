//! The check book's rules, one scenario each.

use super::*;

fn policy() -> CheckPolicy {
    CheckPolicy {
        checkers_new: 2,
        checkers_trusted: 1,
        spot_rate: 0.0,
        canary_rate: 1.0,
        take_ms: 1_000,
        lease_ms: 10_000,
        tolerance: ReplayTolerance {
            min_cosine: 0.99,
            max_rel_error: 0.2,
        },
    }
}

/// A sketch: what an honest replay of "shard `n`" gives, up to `noise` (pseudo-random
/// values, so different shards' sketches are unrelated).
fn sketch(n: u32, noise: f32) -> Vec<f32> {
    (0..64u64)
        .map(|i| {
            let mut h = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (n as u64 + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
            h ^= h >> 29;
            h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let value = (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            value + noise * ((i % 3) as f32 - 1.0)
        })
        .collect()
}

const R: Round = Round(4);

fn peers<const N: usize>() -> [PeerKey; N] {
    [(); N].map(|()| PeerKey::random())
}

#[test]
fn an_agreeing_check_passes_the_submission_and_credits_the_checker() {
    let [s, c] = peers();
    let mut book = CheckBook::new(policy(), 1);
    book.submit(LeaseId(7), s, R, ShardId(2), sketch(2, 0.0), 1, 0);
    // Never the submitter; only checks of the open round.
    assert_eq!(book.assign(s, R, 0), None);
    assert_eq!(book.assign(c, Round(3), 0), None);
    let g = book.assign(c, R, 10).expect("a check for c");
    assert!(CheckBook::is_check(g.check) && !CheckBook::is_check(LeaseId(7)));
    assert_eq!((g.target, g.round, g.shard), (LeaseId(7), R, ShardId(2)));
    assert_eq!(g.expires_at_ms, 10 + policy().lease_ms);
    // One check at a time, and the target needs no second one.
    assert_eq!(book.assign(c, R, 10), None);
    let actions = book.report(g.check, c, R, ShardId(2), sketch(2, 0.001));
    assert!(matches!(&actions.unwrap()[..], [
        CheckAction::Credit { peer, check, shard: ShardId(2), .. },
        CheckAction::Passed { lease: LeaseId(7), agreement },
    ] if *peer == c && *check == g.check && agreement.cosine > 0.999));
    assert_eq!(book.out_count(), 0);
}

#[test]
fn a_new_peers_submission_waits_for_two_different_checkers() {
    let [s, c1, c2] = peers();
    let mut book = CheckBook::new(policy(), 1);
    book.submit(LeaseId(7), s, R, ShardId(0), sketch(0, 0.0), 2, 0);
    let g1 = book.assign(c1, R, 0).unwrap();
    let first = book.report(g1.check, c1, R, ShardId(0), sketch(0, 0.0));
    assert_eq!(
        first.unwrap().len(),
        1,
        "credit only: one check still to come"
    );
    assert_eq!(book.assign(c1, R, 0), None, "not the same peer twice");
    let g2 = book.assign(c2, R, 0).unwrap();
    let second = book
        .report(g2.check, c2, R, ShardId(0), sketch(0, 0.0))
        .unwrap();
    assert!(matches!(
        second.last(),
        Some(CheckAction::Passed {
            lease: LeaseId(7),
            ..
        })
    ));
}

#[test]
fn a_disagreement_goes_to_the_coordinator_whose_replay_decides_both_ways() {
    let [s, liar, forger, honest] = peers();
    let mut book = CheckBook::new(policy(), 1);
    // An honest submission, a lying checker: the checker is banned, the submission passes.
    book.submit(LeaseId(1), s, R, ShardId(0), sketch(0, 0.0), 1, 0);
    let g = book.assign(liar, R, 0).unwrap();
    let noise = sketch(9, 0.0);
    let actions = book.report(g.check, liar, R, ShardId(0), noise).unwrap();
    assert_eq!(
        actions,
        vec![CheckAction::ReplayYourself {
            lease: LeaseId(1),
            why: OwnReplay::Arbitration
        }]
    );
    let decided = book.truth(LeaseId(1), sketch(0, 0.001));
    assert!(matches!(&decided[0], CheckAction::BanChecker { peer, .. } if *peer == liar));
    assert!(matches!(
        decided[1],
        CheckAction::Passed {
            lease: LeaseId(1),
            ..
        }
    ));
    // A forged submission, an honest checker: the submission fails, the checker is credited.
    book.submit(LeaseId(2), forger, R, ShardId(1), sketch(5, 0.0), 1, 0);
    let g = book.assign(honest, R, 0).unwrap();
    let actions = book.report(g.check, honest, R, ShardId(1), sketch(1, 0.0));
    assert!(matches!(
        actions.unwrap()[..],
        [CheckAction::ReplayYourself {
            lease: LeaseId(2),
            why: OwnReplay::Arbitration
        }]
    ));
    let decided = book.truth(LeaseId(2), sketch(1, 0.0));
    assert!(matches!(
        decided[0],
        CheckAction::Credit {
            peer,
            check,
            shard: ShardId(1),
            agreement,
        } if peer == honest && check == g.check && agreement.cosine > 0.9999
    ));
    assert!(matches!(
        decided[1],
        CheckAction::Failed {
            lease: LeaseId(2),
            ..
        }
    ));
}

#[test]
fn a_spot_check_catches_a_colluding_pair() {
    let [forger, accomplice] = peers();
    let mut book = CheckBook::new(
        CheckPolicy {
            spot_rate: 1.0,
            ..policy()
        },
        1,
    );
    let forged = sketch(5, 0.0);
    book.submit(LeaseId(3), forger, R, ShardId(0), forged.clone(), 1, 0);
    let g = book.assign(accomplice, R, 0).unwrap();
    let actions = book
        .report(g.check, accomplice, R, ShardId(0), forged)
        .unwrap();
    assert_eq!(
        actions[1],
        CheckAction::ReplayYourself {
            lease: LeaseId(3),
            why: OwnReplay::Spot
        }
    );
    let decided = book.truth(LeaseId(3), sketch(0, 0.0));
    assert!(matches!(&decided[0], CheckAction::BanChecker { peer, .. } if *peer == accomplice));
    assert!(matches!(
        decided[1],
        CheckAction::Failed {
            lease: LeaseId(3),
            ..
        }
    ));
}

#[test]
fn a_canary_is_a_known_submission_handed_out_like_a_real_check() {
    let [s, c1, c2, liar] = peers();
    let mut book = CheckBook::new(policy(), 1);
    // A newcomer's shard the coordinator replayed itself.
    book.known(LeaseId(5), s, R, ShardId(3), sketch(3, 0.0));
    // The same submission as a real check (to c1) and as a canary (to c2): the grants differ
    // only in id and expiry, and the lease the shell builds from a grant holds no more.
    book.submit(LeaseId(6), s, R, ShardId(3), sketch(3, 0.0), 1, 0);
    let real = book.assign(c1, R, 0).unwrap();
    let canary = book.assign(c2, R, 0).unwrap();
    assert_eq!(
        (real.round, real.shard, canary.round, canary.shard),
        (R, ShardId(3), R, ShardId(3))
    );
    assert_eq!(canary.target, LeaseId(5));
    assert_eq!(canary.check.0, real.check.0 + 1, "one counter for both");
    let right = book.report(canary.check, c2, R, ShardId(3), sketch(3, 0.001));
    assert!(matches!(
        &right.unwrap()[..],
        [CheckAction::Credit {
            peer,
            check,
            shard: ShardId(3),
            agreement,
        }] if *peer == c2 && *check == canary.check && agreement.cosine > 0.999
    ));
    let lie = book.assign(liar, R, 0).unwrap();
    let caught = book
        .report(lie.check, liar, R, ShardId(3), vec![0.0; 64])
        .unwrap();
    assert!(matches!(&caught[..], [CheckAction::BanChecker { peer, .. }] if *peer == liar));
    // With canary_rate 0 there is no canary: no work.
    let mut quiet = CheckBook::new(
        CheckPolicy {
            canary_rate: 0.0,
            ..policy()
        },
        1,
    );
    quiet.known(LeaseId(5), s, R, ShardId(3), sketch(3, 0.0));
    assert_eq!(quiet.assign(c1, R, 0), None);
}

#[test]
fn unchecked_targets_and_expired_checks_fall_back_to_the_coordinator() {
    let [s, c] = peers();
    let mut book = CheckBook::new(policy(), 1);
    book.submit(LeaseId(1), s, R, ShardId(0), sketch(0, 0.0), 1, 0);
    assert!(book.expire(999).is_empty());
    assert_eq!(
        book.expire(1_000),
        vec![CheckAction::ReplayYourself {
            lease: LeaseId(1),
            why: OwnReplay::NoChecker
        }]
    );
    // Taken in time, but the checker never reports: handed out again, and past `take_ms` the
    // coordinator replays it.
    book.submit(LeaseId(2), s, R, ShardId(1), sketch(1, 0.0), 1, 2_000);
    let g = book.assign(c, R, 2_000).unwrap();
    assert!(book.expire(2_500).is_empty());
    let expired = book.expire(g.expires_at_ms);
    assert_eq!(
        expired,
        vec![CheckAction::ReplayYourself {
            lease: LeaseId(2),
            why: OwnReplay::NoChecker
        }]
    );
    assert_eq!(
        book.report(g.check, c, R, ShardId(1), sketch(1, 0.0)),
        Err(ReportRefused::Unknown)
    );
}

#[test]
fn a_banned_checkers_approvals_are_reopened() {
    let [forger, accomplice, other, s] = peers();
    let mut book = CheckBook::new(policy(), 1);
    // The accomplice and another colluder vouch for a forgery; later the accomplice is caught.
    let forged = sketch(5, 0.0);
    book.submit(LeaseId(1), forger, R, ShardId(0), forged.clone(), 2, 0);
    for peer in [accomplice, other] {
        let g = book.assign(peer, R, 0).unwrap();
        book.report(g.check, peer, R, ShardId(0), forged.clone())
            .unwrap();
    }
    // An honest submission the accomplice checked as well.
    book.submit(LeaseId(2), s, R, ShardId(1), sketch(1, 0.0), 1, 0);
    let g = book.assign(accomplice, R, 0).unwrap();
    let passed = book.report(g.check, accomplice, R, ShardId(1), sketch(1, 0.0));
    assert!(matches!(
        passed.unwrap()[1],
        CheckAction::Passed {
            lease: LeaseId(2),
            ..
        }
    ));
    let reopened = book.banned(accomplice);
    assert_eq!(
        reopened,
        vec![
            CheckAction::Distrust { submitter: forger },
            CheckAction::ReplayYourself {
                lease: LeaseId(1),
                why: OwnReplay::Reopened
            },
            CheckAction::Distrust { submitter: s },
            CheckAction::ReplayYourself {
                lease: LeaseId(2),
                why: OwnReplay::Reopened
            },
        ]
    );
    let truth = book.truth(LeaseId(1), sketch(0, 0.0));
    assert!(matches!(&truth[..], [
        CheckAction::BanChecker { peer, .. },
        CheckAction::Overturned { lease: LeaseId(1), submitter, .. },
    ] if *peer == other && *submitter == forger));
    assert!(book.truth(LeaseId(2), sketch(1, 0.0)).is_empty(), "upheld");
}

#[test]
fn reports_are_refused_for_others_checks_and_banned_for_a_wrong_shape() {
    let [s, c, d] = peers();
    let mut book = CheckBook::new(policy(), 1);
    book.submit(LeaseId(1), s, R, ShardId(0), sketch(0, 0.0), 1, 0);
    let g = book.assign(c, R, 0).unwrap();
    let ok = sketch(0, 0.0);
    assert_eq!(
        book.report(LeaseId(FIRST_CHECK_ID + 99), c, R, ShardId(0), ok.clone()),
        Err(ReportRefused::Unknown)
    );
    assert_eq!(
        book.report(g.check, d, R, ShardId(0), ok.clone()),
        Err(ReportRefused::NotYours)
    );
    assert_eq!(
        book.report(g.check, c, R, ShardId(1), ok),
        Err(ReportRefused::Mismatch)
    );
    let short = book
        .report(g.check, c, R, ShardId(0), vec![1.0; 3])
        .unwrap();
    assert!(matches!(&short[..], [CheckAction::BanChecker { peer, .. }] if *peer == c));
    // A closed round's checks are moot.
    let g = book.assign(d, R, 0).unwrap();
    assert_eq!(
        book.close_round(R),
        vec![LeaseId(1)],
        "undecided: stale now"
    );
    assert_eq!(
        book.report(g.check, d, R, ShardId(0), sketch(0, 0.0)),
        Err(ReportRefused::Unknown)
    );
    assert_eq!(book.out_count(), 0);
}

#[test]
fn a_replay_the_coordinator_cannot_do_judges_nobody() {
    let [s, c] = peers();
    let mut book = CheckBook::new(policy(), 1);
    book.submit(LeaseId(1), s, R, ShardId(0), sketch(0, 0.0), 1, 0);
    let g = book.assign(c, R, 0).unwrap();
    book.report(g.check, c, R, ShardId(0), sketch(8, 0.0))
        .unwrap();
    assert_eq!(book.target(LeaseId(1)), Some((R, ShardId(0))));
    let actions = book.unjudged(LeaseId(1));
    assert!(
        matches!(
            &actions[..],
            [CheckAction::Void { peer, check }, CheckAction::Passed {
                lease: LeaseId(1),
                ..
            }] if *peer == c && *check == g.check
        ),
        "the waiting report is answered, unjudged: {actions:?}"
    );
    assert!(
        book.truth(LeaseId(1), sketch(0, 0.0)).is_empty(),
        "decided, no report left"
    );
}

/// What the book says of `checker`'s report on `grant` that will not be judged.
fn void(checker: PeerKey, grant: &CheckGrant) -> Vec<CheckAction> {
    vec![CheckAction::Void {
        peer: checker,
        check: grant.check,
    }]
}

#[test]
fn reports_waiting_on_a_target_that_leaves_the_book_are_answered() {
    let [s1, s2, c1, c2, c3] = peers();
    let mut book = CheckBook::new(policy(), 1);
    // c1 disagrees with s1's submission; s1's submission is then rejected on other grounds.
    book.submit(LeaseId(1), s1, R, ShardId(0), sketch(0, 0.0), 1, 0);
    let g1 = book.assign(c1, R, 0).unwrap();
    let waiting = book.report(g1.check, c1, R, ShardId(0), sketch(8, 0.0));
    assert!(matches!(
        waiting.unwrap()[..],
        [CheckAction::ReplayYourself { .. }]
    ));
    assert_eq!(book.forget(LeaseId(1)), void(c1, &g1));
    // c2 disagrees with s2's; s2 is banned for something else.
    book.submit(LeaseId(2), s2, R, ShardId(1), sketch(1, 0.0), 2, 0);
    let g2 = book.assign(c2, R, 0).unwrap();
    let g3 = book.assign(c3, R, 0).unwrap();
    book.report(g2.check, c2, R, ShardId(1), sketch(8, 0.0))
        .unwrap();
    assert_eq!(book.banned(s2), void(c2, &g2));
    assert_eq!(book.target(LeaseId(2)), None);
    assert_eq!(
        book.report(g3.check, c3, R, ShardId(1), sketch(1, 0.0)),
        Err(ReportRefused::Unknown),
        "the check still out is moot"
    );
}

#[test]
fn a_banned_checkers_waiting_report_is_answered_and_the_arbitration_still_decides() {
    let [s, liar, honest] = peers();
    let mut book = CheckBook::new(policy(), 1);
    book.submit(LeaseId(1), s, R, ShardId(0), sketch(0, 0.0), 1, 0);
    let g = book.assign(liar, R, 0).unwrap();
    book.report(g.check, liar, R, ShardId(0), sketch(8, 0.0))
        .unwrap();
    assert_eq!(book.banned(liar), void(liar, &g));
    // The arbitration it asked for still decides the submitter, and judges nobody else.
    assert_eq!(
        book.assign(honest, R, 0),
        None,
        "being replayed: no check of it"
    );
    let decided = book.truth(LeaseId(1), sketch(0, 0.0));
    assert!(
        matches!(
            decided[..],
            [CheckAction::Passed {
                lease: LeaseId(1),
                ..
            }]
        ),
        "{decided:?}"
    );
}
