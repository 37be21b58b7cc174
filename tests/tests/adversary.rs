//! The attack suite: an adversarial client (herd-protocol + real libp2p, see
//! `herd_tests::adversary`) against a real coordinator process. Every attack is refused with
//! its own reason, repeat offenders are banned, the coordinator keeps running; and a run with
//! one adversarial node of four ends where the honest run ends.

use std::time::Duration;

use herd_protocol::LeaseId;
use herd_protocol::codec::Values;
use herd_protocol::delta::{MAX_DELTA_BYTES, Payload};
use herd_protocol::framing::{decode, encode};
use herd_protocol::messages::*;
use herd_tests::adversary::{
    Adversary, Claim, World, blob_path, encode_for, noise_like, payload_with_sketch_of,
    wait_for_lease_expiry,
};
use herd_tests::{Coordinator, Reaper, get_json, wait_until};
use libp2p::request_response::OutboundFailure;
use serde_json::Value;

/// Round 0 never closes (quorum 32 of 32), so every attack meets the same θ_0.
const OPEN_ROUND: &str = "rounds = 1\n[round]\nshards = 32\nsamples_per_shard = 16\ninner_steps = 8\n\
                          lr = 3e-3\nbatch_size = 4\nmax_seq_len = 128\nlease_secs = 60\nouter_lr = 1.0\n\
                          outer_momentum = 0.0\ncheckpoint_every = 1\n";

fn payload_of(bytes: &[u8]) -> Payload {
    decode::<Payload, MAX_DELTA_BYTES>(bytes).unwrap()
}

/// The first quantization scale of a compressed tensor, whatever the codec.
fn first_scale(v: &mut Values) -> &mut f32 {
    match v {
        Values::Sparse { scales, .. }
        | Values::DenseInt8 { scales, .. }
        | Values::Signs { scales, .. } => &mut scales[0],
        other => panic!("the run's codec has scales, got {other:?}"),
    }
}

/// One coordinator whose round 0 never closes meets three honest peers, then every attack, each
/// from a fresh identity. The suite runs once (a [`Scenario`]) and records every answer; each
/// test here judges one part of it. The module's name sorts after this binary's other tests,
/// as [`Scenario`] asks.
mod under_attack {
    use herd_tests::Scenario;

    use super::*;

    static SUITE: Scenario<Record> = Scenario::new("the attack suite", run_the_suite);

    /// Whether a reject reason is the one an attack should get.
    type Expected = fn(&RejectReason) -> bool;

    /// Every answer the coordinator gave, and what it showed at the end.
    #[derive(Debug)]
    struct Record {
        /// The three honest peers' verdicts.
        honest: Vec<Verdict>,
        /// The first honest submission sent again (its answer was lost, or the coordinator
        /// restarted).
        resent: Verdict,
        /// Other bytes for that decided lease.
        other_bytes: Verdict,
        /// `/v1/status` after those two.
        status_after_resending: Option<Value>,
        /// Each attack: what it was, its verdict, the reasons it should get.
        attacks: Vec<(&'static str, Verdict, Expected)>,
        /// Each submission that breaks the envelope or the lease binding: what it was, its
        /// verdict, the verdict it should get.
        unbound: Vec<(&'static str, Verdict, Verdict)>,
        /// A frame whose length is over the RPC cap.
        oversized: Result<RpcResponse, OutboundFailure>,
        /// A frame of garbage.
        garbage: Result<RpcResponse, OutboundFailure>,
        /// A lease request for protocol version 99.
        version_99: RpcResponse,
        /// A request on `/herd/rpc/4` (a version nobody speaks yet).
        unsupported: Result<RpcResponse, OutboundFailure>,
        /// One peer's three zero deltas.
        zeros: Vec<Verdict>,
        /// That peer's next lease request.
        after_zeros: Result<Lease, RpcResponse>,
        /// Whether the coordinator still ran at the end.
        still_running: bool,
        /// `/v1/status` at the end.
        status: Option<Value>,
        /// `verdicts.jsonl` at the end.
        verdict_log: String,
        /// The coordinator's stderr at the end.
        stderr: String,
    }

    fn run_the_suite() -> Record {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(attack())
    }

    async fn attack() -> Record {
        let tmp = tempfile::tempdir().unwrap();
        let mut coordinator = Coordinator::start(tmp.path(), OPEN_ROUND);
        let addr = coordinator.addr.clone();
        let fresh = || Adversary::new(&addr, RPC_PROTOCOL);
        let world = World::load(128);

        // Three honest peers first: their norms give the norm bound its median, and the first
        // one's delta is what the copiers copy.
        let mut honest = Vec::new();
        let mut honest_verdicts = Vec::new();
        for _ in 0..3 {
            let mut peer = fresh();
            let lease = peer.lease().await;
            let out = world.train(&lease);
            let payload = encode_for(&lease, &out.delta);
            let verdict = peer
                .submit(peer.sign(&lease, payload.clone(), &(&out).into()))
                .await;
            honest_verdicts.push(verdict);
            honest.push((lease, out, payload, peer));
        }
        // The same submission again: the same verdict, counted once. Other bytes for a
        // decided lease: a duplicate.
        let (resent, other_bytes, status_after_resending) = {
            let (lease, out, payload, peer) = &mut honest[0];
            let sub = peer.sign(lease, payload.clone(), &(&*out).into());
            let resent = peer.submit(sub).await;
            let other = encode_for(lease, &out.delta.scaled(0.5));
            let sub = peer.sign(lease, other, &(&*out).into());
            let other_bytes = peer.submit(sub).await;
            (resent, other_bytes, coordinator.status())
        };
        let (_, first_out, first_payload, _) = &honest[0];

        // One attack per fresh identity: (name, how the payload is made, the reason expected).
        // Each closure gets the attacker's lease and its honestly trained outcome. Noise and a
        // negated delta fail the effect check when their weight in the update (outer_lr /
        // quorum, here 1/32) lets the harm show; otherwise the replay (new peers: always)
        // catches them.
        type Make<'a> = Box<dyn Fn(&Lease, &herd_model::shard::ShardOutcome) -> Vec<u8> + 'a>;
        let attacks: Vec<(&'static str, Make, Expected)> = vec![
            (
                "noise with an honest norm",
                Box::new(|l, o| encode_for(l, &noise_like(&o.delta, 7))),
                |r| {
                    matches!(
                        r,
                        RejectReason::NoImprovement { .. } | RejectReason::ReplayMismatch { .. }
                    )
                },
            ),
            (
                "honest delta × 10",
                Box::new(|l, o| encode_for(l, &o.delta.scaled(10.0))),
                |r| matches!(r, RejectReason::NormTooLarge { .. }),
            ),
            (
                "honest delta × −1",
                Box::new(|l, o| encode_for(l, &o.delta.scaled(-1.0))),
                |r| {
                    matches!(
                        r,
                        RejectReason::NoImprovement { .. } | RejectReason::ReplayMismatch { .. }
                    )
                },
            ),
            (
                "zero delta",
                Box::new(|l, o| encode_for(l, &o.delta.scaled(0.0))),
                |r| *r == RejectReason::ZeroDelta,
            ),
            (
                "wrong shapes (a tensor twice its size)",
                Box::new(|l, o| {
                    let mut d = o.delta.clone();
                    d.tensors[3].values.extend_from_within(..);
                    encode_for(l, &d)
                }),
                |r| matches!(r, RejectReason::Malformed(why) if why.contains("values")),
            ),
            (
                "NaN and infinite scales",
                Box::new(|l, o| {
                    let mut p = payload_of(&encode_for(l, &o.delta));
                    *first_scale(&mut p.tensors[0]) = f32::NAN;
                    *first_scale(&mut p.tensors[1]) = f32::INFINITY;
                    encode(&p).unwrap()
                }),
                |r| matches!(r, RejectReason::NonFinite(_)),
            ),
            (
                "a payload over the layout's cap",
                Box::new(|_, _| vec![7u8; 200_000]),
                |r| matches!(r, RejectReason::PayloadTooLarge { .. }),
            ),
            (
                "a copy of another peer's delta",
                Box::new(|_, _| first_payload.clone()),
                |r| *r == RejectReason::CopiedDelta,
            ),
            (
                "a copy of another peer's delta, re-encoded so the bytes differ",
                Box::new(|_, _| {
                    let mut p = payload_of(first_payload);
                    *first_scale(&mut p.tensors[0]) *= 1.001;
                    encode(&p).unwrap()
                }),
                |r| matches!(r, RejectReason::ReplayMismatch { .. }),
            ),
            (
                "a delta trained on other data than the shard",
                Box::new(|l, _| {
                    let mut other = l.clone();
                    for r in &mut other.ranges {
                        // Shift the shard by half the data set: other examples, same task.
                        r.start = (r.start + 63) % 110;
                        r.end = r.start + 16;
                    }
                    encode_for(l, &world.train(&other).delta)
                }),
                |r| matches!(r, RejectReason::ReplayMismatch { .. }),
            ),
        ];
        let mut attack_verdicts = Vec::new();
        for (name, make, expected) in &attacks {
            let mut attacker = fresh();
            let lease = attacker.lease().await;
            let out = world.train(&lease);
            let payload = make(&lease, &out);
            let verdict = attacker
                .submit(attacker.sign(&lease, payload, &(&out).into()))
                .await;
            attack_verdicts.push((*name, verdict, *expected));
        }

        // Envelope and lease binding, each from a fresh identity.
        let claim: Claim = first_out.into();
        let mut unbound = Vec::new();
        let mut mallory = fresh();
        let lease = mallory.lease().await;
        let mut stale = lease.clone();
        stale.base_adapter = herd_protocol::ContentId::of(b"an older adapter");
        let sub = mallory.sign(&stale, first_payload.clone(), &claim);
        unbound.push((
            "wrong base hash",
            mallory.submit(sub).await,
            Verdict::Rejected(RejectReason::WrongBaseAdapter),
        ));
        let mut mallory = fresh();
        let lease = mallory.lease().await;
        let mut forged = mallory.sign(&lease, first_payload.clone(), &claim);
        forged.signature = mallory.key.sign(b"something else").unwrap();
        unbound.push((
            "forged signature",
            mallory.submit(forged).await,
            Verdict::Rejected(RejectReason::BadSignature),
        ));
        let (mut mallory, eve) = (fresh(), fresh());
        let lease = mallory.lease().await;
        let theirs = eve.sign(&lease, first_payload.clone(), &claim);
        unbound.push((
            "another peer's key",
            mallory.submit(theirs).await,
            Verdict::Rejected(RejectReason::BadSignature),
        ));
        let (mut mallory, mut eve) = (fresh(), fresh());
        let lease = mallory.lease().await;
        unbound.push((
            "another peer's lease",
            eve.submit(eve.sign(&lease, first_payload.clone(), &claim))
                .await,
            Verdict::Rejected(RejectReason::NotYourLease),
        ));
        let unknown = Lease {
            id: LeaseId(424_242),
            ..lease.clone()
        };
        unbound.push((
            "a lease the coordinator never gave",
            mallory
                .submit(mallory.sign(&unknown, first_payload.clone(), &claim))
                .await,
            Verdict::Rejected(RejectReason::UnknownLease),
        ));
        let mut tampered = mallory.sign(&lease, first_payload.clone(), &claim);
        tampered.payload[10] ^= 0xff;
        unbound.push((
            "a payload changed after signing",
            mallory.submit(tampered).await,
            Verdict::Rejected(RejectReason::PayloadHashMismatch),
        ));

        // Frames: over the RPC cap (refused on the length, unanswered), garbage, other versions.
        let mut mallory = fresh();
        let oversized = mallory
            .send_raw(vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
            .await;
        let garbage = mallory.send_raw(vec![3, 0, 0, 0, 0xfe, 0xfe, 0xfe]).await;
        let version_99 = mallory
            .send(&RpcRequest::Lease(LeaseRequest {
                version: 99,
                device: String::new(),
                admission: None,
                checks_only: false,
            }))
            .await;
        let mut future = Adversary::new(&addr, "/herd/rpc/99");
        let unsupported = future.send_raw(vec![0, 0, 0, 0]).await;

        // A peer that keeps failing: three zero deltas, then another lease request.
        let mut repeat = fresh();
        let mut zeros = Vec::new();
        for _ in 0..3 {
            let lease = repeat.lease().await;
            let zero = encode_for(&lease, &first_out.delta.scaled(0.0));
            zeros.push(repeat.submit(repeat.sign(&lease, zero, &claim)).await);
        }
        let after_zeros = repeat.try_lease().await;

        let still_running = coordinator.child.try_wait().unwrap().is_none();
        let status = tokio::task::spawn_blocking({
            let url = coordinator.http.clone();
            move || get_json(&format!("{url}/v1/status"))
        })
        .await
        .unwrap();
        let verdict_log =
            std::fs::read_to_string(tmp.path().join("coordinator/verdicts.jsonl")).unwrap();
        let stderr = std::fs::read_to_string(&coordinator.log).unwrap();
        Record {
            honest: honest_verdicts,
            resent,
            other_bytes,
            status_after_resending,
            attacks: attack_verdicts,
            unbound,
            oversized,
            garbage,
            version_99,
            unsupported,
            zeros,
            after_zeros,
            still_running,
            status,
            verdict_log,
            stderr,
        }
    }

    #[test]
    fn honest_deltas_are_accepted() {
        for (i, verdict) in SUITE.get().honest.iter().enumerate() {
            assert_eq!(
                *verdict,
                Verdict::Accepted,
                "honest peer {i}'s delta should be accepted"
            );
        }
    }

    #[test]
    fn a_resent_submission_gets_its_verdict_again_and_counts_once() {
        let suite = SUITE.get();
        assert_eq!(
            suite.resent,
            Verdict::Accepted,
            "an accepted submission sent again"
        );
        assert_eq!(
            suite.other_bytes,
            Verdict::Rejected(RejectReason::Duplicate),
            "other bytes for a decided lease"
        );
        let status = suite
            .status_after_resending
            .as_ref()
            .expect("the status answers after the resending");
        assert_eq!(status["accepted_deltas"], 3, "counted once: {status}");
    }

    #[test]
    fn every_attack_is_rejected_with_its_reason() {
        let wrong: Vec<String> = SUITE
            .get()
            .attacks
            .iter()
            .filter(
                |(_, verdict, expected)| !matches!(verdict, Verdict::Rejected(r) if expected(r)),
            )
            .map(|(name, verdict, _)| format!("{name}: {verdict:?}"))
            .collect();
        assert!(
            wrong.is_empty(),
            "attacks not rejected with their reason:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn a_submission_unbound_from_its_lease_signer_or_base_is_rejected_with_its_reason() {
        let wrong: Vec<String> = SUITE
            .get()
            .unbound
            .iter()
            .filter(|(_, verdict, expected)| verdict != expected)
            .map(|(what, verdict, expected)| format!("{what}: {verdict:?}, not {expected:?}"))
            .collect();
        assert!(
            wrong.is_empty(),
            "submissions not rejected with their reason:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn oversized_garbage_and_unknown_version_frames_are_refused() {
        let suite = SUITE.get();
        assert!(
            suite.oversized.is_err(),
            "an oversized frame is not answered: {:?}",
            suite.oversized
        );
        assert!(
            suite.stderr.contains("exceeds the cap"),
            "oversized frames are logged: {}",
            suite.stderr
        );
        assert!(
            suite.garbage.is_err(),
            "a frame of garbage is not answered: {:?}",
            suite.garbage
        );
        assert!(
            matches!(&suite.version_99, RpcResponse::Refused { reason }
                if reason.contains("version 99")),
            "protocol version 99: {:?}",
            suite.version_99
        );
        assert!(
            matches!(
                suite.unsupported,
                Err(OutboundFailure::UnsupportedProtocols)
            ),
            "/herd/rpc/4: {:?}",
            suite.unsupported
        );
    }

    #[test]
    fn a_peer_that_keeps_failing_is_banned() {
        let suite = SUITE.get();
        for (i, verdict) in suite.zeros.iter().enumerate() {
            assert_eq!(
                *verdict,
                Verdict::Rejected(RejectReason::ZeroDelta),
                "zero #{i}"
            );
        }
        assert!(
            matches!(&suite.after_zeros, Err(RpcResponse::Refused { reason })
                if reason.contains("banned")),
            "a lease after three rejects: {:?}",
            suite.after_zeros
        );
    }

    #[test]
    fn the_coordinator_keeps_running_and_its_status_counts_every_reason() {
        let suite = SUITE.get();
        assert!(
            suite.still_running,
            "the coordinator exited: {}",
            suite.stderr
        );
        let status = suite.status.as_ref().expect("status still answers");
        for label in [
            "norm_too_large",
            "zero_delta",
            "malformed",
            "non_finite",
            "payload_too_large",
            "copied_delta",
            "replay_mismatch",
            "wrong_base_adapter",
            "bad_signature",
            "not_your_lease",
            "unknown_lease",
            "payload_hash_mismatch",
        ] {
            assert!(
                status["rejects_by_reason"][label].as_u64() > Some(0),
                "{label} missing: {}",
                status["rejects_by_reason"]
            );
        }
    }

    #[test]
    fn every_verdict_is_in_the_durable_log() {
        let suite = SUITE.get();
        let log = &suite.verdict_log;
        assert_eq!(
            log.lines().filter(|l| l.contains("\"accepted\"")).count(),
            3,
            "accepted verdicts in verdicts.jsonl: {log}"
        );
        // A verdict for each honest peer, attack, unbound submission and zero delta.
        let decided =
            suite.honest.len() + suite.attacks.len() + suite.unbound.len() + suite.zeros.len();
        assert!(
            log.lines().count() >= decided,
            "verdicts.jsonl should hold at least {decided} verdicts: {log}"
        );
    }
}

/// Check leases with liars among the checkers (docs/checking.md). A round that never closes;
/// trust after one passed replay; one checker per submission; no spot checks or canaries, so
/// only the checks themselves and the coordinator's arbitration are at work.
mod lying_checkers {
    use super::*;

    const CHECKED: &str = "rounds = 1\n[round]\nshards = 32\nsamples_per_shard = 16\ninner_steps = 8\n\
                           lr = 3e-3\nbatch_size = 4\nmax_seq_len = 128\nlease_secs = 60\nouter_lr = 1.0\n\
                           outer_momentum = 0.0\ncheckpoint_every = 1\n[verify]\ntrusted_after = 1\n\
                           [checks]\ncheckers_new = 1\nspot_rate = 0.0\ncanary_rate = 0.0\ntake_secs = 60\n";

    /// Asks for work until a check comes (a minute at most); training leases that come first,
    /// while the check is not ready, are left to lie.
    async fn take_check(peer: &mut Adversary) -> Lease {
        for _ in 0..240 {
            if let Ok(Ok(lease)) = peer.ask_for_lease().await
                && lease.task == LeaseTask::Check
            {
                return lease;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("no check lease within a minute");
    }

    /// An honest shard: leased, trained, submitted; its verdict.
    async fn honest(peer: &mut Adversary, world: &World) -> Verdict {
        let lease = peer.lease().await;
        let out = world.train(&lease);
        let sub = peer.sign(&lease, encode_for(&lease, &out.delta), &(&out).into());
        peer.submit(sub).await
    }

    fn is_check_mismatch(v: &Verdict) -> bool {
        matches!(v, Verdict::Rejected(RejectReason::CheckMismatch(_)))
    }

    /// A checker that approves its accomplice's forgery (and does no work for anyone else)
    /// and a checker that rejects everything are both caught by the coordinator's arbitration
    /// and banned; the forgery the first approved is reopened, found, and its forger banned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_approving_and_a_rejecting_checker_are_banned_and_their_approvals_reopened() {
        let tmp = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(tmp.path(), CHECKED);
        let world = World::load(128);
        let fresh = || Adversary::new(&coordinator.addr, RPC_PROTOCOL);
        let (mut approver, mut forger, mut rejecter, mut honest_peer) =
            (fresh(), fresh(), fresh(), fresh());

        // No one is trusted yet: the coordinator replays the approver's first shard itself,
        // and trusts it after.
        assert_eq!(honest(&mut approver, &world).await, Verdict::Accepted);

        // The forger trains other data than its lease says; its accomplice, drawn as its
        // checker, reports the forgery's own sketch.
        let lease = forger.lease().await;
        let mut other_data = lease.clone();
        for r in &mut other_data.ranges {
            (r.start, r.end) = ((r.start + 64) % 126, (r.end + 64 - 1) % 126 + 1);
        }
        let forged = world.train(&other_data);
        let sub = forger.sign(&lease, encode_for(&lease, &forged.delta), &(&forged).into());
        let sketch_len = forged.delta.sketch(lease.seed).len();
        let (forger_verdict, approval) = tokio::join!(forger.submit(sub), async {
            let check = take_check(&mut approver).await;
            assert_eq!(
                (check.round, check.shard, check.seed),
                (lease.round, lease.shard, lease.seed)
            );
            approver
                .report(&check, forged.delta.sketch(check.seed))
                .await
        });
        assert_eq!(
            forger_verdict,
            Verdict::Accepted,
            "its only checker vouched for it"
        );
        assert_eq!(approval, Verdict::Accepted);

        // The accomplice does no work for others: its zeros on an honest shard disagree, the
        // coordinator's replay decides for the submitter, and the accomplice is banned.
        let (rejecter_verdict, lazy) = tokio::join!(honest(&mut rejecter, &world), async {
            let check = take_check(&mut approver).await;
            approver.report(&check, vec![0.0; sketch_len]).await
        });
        assert_eq!(rejecter_verdict, Verdict::Accepted);
        assert!(is_check_mismatch(&lazy), "{lazy:?}");
        // What it vouched for is reopened: the coordinator replays the forgery and bans its
        // forger.
        let banned = |peer: &Adversary| {
            let id = peer.key.public().to_peer_id().to_string();
            move |status: &Value| {
                status["peers"]
                    .as_array()?
                    .iter()
                    .find(|p| p["peer"] == id.as_str() && p["standing"] == "banned")
                    .cloned()
            }
        };
        let is_banned = banned(&forger);
        wait_until(Duration::from_secs(60), "the forger banned", || {
            is_banned(&coordinator.status()?)
        });
        match forger.try_lease().await {
            Err(RpcResponse::Refused { reason }) => assert!(
                reason.contains("banned checker"),
                "the forger's ban says why: {reason}"
            ),
            other => panic!("the forger should be refused, got {other:?}"),
        }

        // The rejecter, trusted now, rejects everything: its first check is arbitrated and it
        // is banned; the honest submission stands.
        let (honest_verdict, rejection) = tokio::join!(honest(&mut honest_peer, &world), async {
            let check = take_check(&mut rejecter).await;
            rejecter.report(&check, vec![1.0; sketch_len]).await
        });
        assert_eq!(honest_verdict, Verdict::Accepted);
        assert!(is_check_mismatch(&rejection), "{rejection:?}");

        let status = coordinator.status().expect("status");
        for (who, peer) in [("approver", &approver), ("rejecter", &rejecter)] {
            assert!(
                banned(peer)(&status).is_some(),
                "the {who} is banned: {status}"
            );
        }
        assert_eq!(status["rejects_by_reason"]["check_mismatch"], 2, "{status}");
        assert!(
            status["checks"].as_u64() >= Some(1),
            "the approval was credited: {status}"
        );
        let log = std::fs::read_to_string(tmp.path().join("coordinator/verdicts.jsonl")).unwrap();
        assert_eq!(log.matches("\"check_mismatch\"").count(), 2, "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_for_a_lease_that_expired_is_rejected_as_late() {
    let tmp = tempfile::tempdir().unwrap();
    // One-second leases, so the wait is short.
    let short = OPEN_ROUND.replace("lease_secs = 60", "lease_secs = 1");
    let coordinator = Coordinator::start(tmp.path(), &short);
    let world = World::load(128);
    let mut late = Adversary::new(&coordinator.addr, RPC_PROTOCOL);
    let lease = late.lease().await;
    let out = world.train(&lease);
    tokio::time::sleep(wait_for_lease_expiry(&lease)).await;
    let sub = late.sign(&lease, encode_for(&lease, &out.delta), &(&out).into());
    assert_eq!(
        late.submit(sub).await,
        Verdict::Rejected(RejectReason::ExpiredLease),
        "an honest delta for a lease that expired before it arrived"
    );
}

/// A demo-sized run (the demo's model, data and outer rates: three shards of all 126 examples,
/// 20 inner steps, a constant inner rate of 3e-3), for `rounds` rounds.
///
/// With error feedback, which node trains which shard changes each node's residual and so the
/// result, even between two honest runs (a few percent at 20 rounds with the default codec).
/// Without it (`raw`, the default here) an honest shard's delta depends only on the shard, so
/// the honest and the attacked run can only differ by what the attacker got in. No straggler
/// deadline either: both runs wait for every shard, so they aggregate the same ones.
/// `HERD_ATTACK_CODEC` picks another codec.
fn run_config(rounds: u64) -> String {
    let codec = std::env::var("HERD_ATTACK_CODEC").unwrap_or_else(|_| "raw".into());
    format!(
        "rounds = {rounds}\n[round]\nshards = 3\nsamples_per_shard = 126\ninner_steps = 20\nlr = 3e-3\n\
         batch_size = 16\nmax_seq_len = 128\nlease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.5\n\
         checkpoint_every = 100\nstraggler_multiple = 0\ncodec = {codec:?}\n\
         [verify]\ntrusted_after = {TRUSTED_AFTER}\n"
    )
}

/// Who joins the three honest nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attacker {
    Nobody,
    /// Cycles noise, ×−1 and ×10 of a stale delta, and a new identity after each ban.
    Noisy,
    /// Trains honestly until trusted (`trusted_after` accepted deltas, every one replayed or
    /// checked), then sends its honest delta ×−1 under the honest sketch (which a replay
    /// agrees with), and checks others honestly; banned, it comes back as someone new and
    /// starts over.
    Patient,
}

/// Accepted deltas that make a new peer trusted (`[verify] trusted_after` in [`run_config`]:
/// 1, the attacker's best case, so that a short run sees it trusted and forging).
const TRUSTED_AFTER: u32 = 1;

/// What an attacker got done in a run.
#[derive(Debug, Default)]
struct Tally {
    identities: u32,
    honest_accepted: u32,
    checks: u32,
    forged_sent: u32,
    forged_accepted: u32,
}

/// Runs three honest nodes (and `attacker`) to the end; returns the final held-out loss, the
/// status and what the attacker got done.
async fn run_to_the_end(rounds: u64, attacker: Attacker) -> (f64, serde_json::Value, Tally) {
    let tmp = tempfile::tempdir().unwrap();
    // Loaded before the run starts, so that the attacker starts with the nodes.
    let world = (attacker != Attacker::Nobody).then(|| World::load(128));
    let coordinator = Coordinator::start(tmp.path(), &run_config(rounds));
    let _nodes = Reaper(
        (0..3)
            .map(|i| coordinator.start_node(&tmp.path().join(format!("node-{i}"))))
            .collect(),
    );
    let addr = coordinator.addr.clone();
    let tally = match (attacker, &world) {
        (Attacker::Noisy, Some(world)) => noisy(&addr, world).await,
        (Attacker::Patient, Some(world)) => {
            patient(&addr, &tmp.path().join("coordinator"), world).await
        }
        _ => Tally::default(),
    };
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_until(Duration::from_secs(600), "the run to finish", || {
            coordinator.status().filter(|s| s["finished"] == true)
        });
        drop(coordinator);
        status
    })
    .await
    .unwrap();
    let last = status["heldout_loss"].as_array().unwrap().last().unwrap();
    (last.as_f64().unwrap(), status, tally)
}

/// A lease for `attacker`, until the run is over (`None`); a banned one comes back as someone
/// new (a Sybil), counted in `tally`.
async fn next_lease(attacker: &mut Adversary, addr: &str, tally: &mut Tally) -> Option<Lease> {
    // Bounded: far more requests than a run has leases.
    for _ in 0..5_000 {
        match attacker.try_lease().await {
            Ok(lease) => return Some(lease),
            Err(RpcResponse::NoWork { finished: true, .. }) => return None,
            Err(RpcResponse::NoWork { retry_after_ms, .. }) => {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.max(50))).await;
            }
            Err(RpcResponse::Refused { .. }) => {
                *attacker = Adversary::new(addr, RPC_PROTOCOL);
                tally.identities += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    panic!("the run did not end within 5,000 lease requests")
}

/// The noisy attacker: a delta of honest size, trained once from θ_0 (stale after round 0),
/// then bent; none may get through.
async fn noisy(addr: &str, world: &World) -> Tally {
    let mut attacker = Adversary::new(addr, RPC_PROTOCOL);
    let mut tally = Tally {
        identities: 1,
        ..Tally::default()
    };
    let mut trained: Option<herd_model::shard::ShardOutcome> = None;
    for i in 0..500u64 {
        let Some(lease) = next_lease(&mut attacker, addr, &mut tally).await else {
            break;
        };
        let out = trained.get_or_insert_with(|| world.train(&lease));
        let wobble = 1.0 + i as f32 * 1e-3; // distinct bytes each time
        let bad = match i % 3 {
            0 => noise_like(&out.delta, i),
            1 => out.delta.scaled(-wobble),
            _ => out.delta.scaled(10.0 * wobble),
        };
        let sub = attacker.sign(&lease, encode_for(&lease, &bad), &(&*out).into());
        tally.forged_sent += 1;
        let verdict = attacker.submit(sub).await;
        assert_ne!(verdict, Verdict::Accepted, "attack {i} got through");
        // Ask again at a node's pace rather than hoard every freed shard.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tally
}

/// The patient attacker (see [`Attacker::Patient`]). It trains from θ_r read off the
/// coordinator's blob store in `coordinator_dir`, as a node would have fetched it.
async fn patient(addr: &str, coordinator_dir: &std::path::Path, world: &World) -> Tally {
    let mut attacker = Adversary::new(addr, RPC_PROTOCOL);
    let mut tally = Tally {
        identities: 1,
        ..Tally::default()
    };
    let (mut identity, mut accepted) = (1, 0);
    for _ in 0..500 {
        let Some(lease) = next_lease(&mut attacker, addr, &mut tally).await else {
            break;
        };
        if tally.identities != identity {
            (identity, accepted) = (tally.identities, 0); // starts over
        }
        let adapter = blob_path(coordinator_dir, &lease.base_adapter);
        let out = tokio::task::block_in_place(|| world.train_from(&lease, Some(&adapter)));
        if lease.task == LeaseTask::Check {
            tally.checks += 1;
            attacker.report(&lease, out.delta.sketch(lease.seed)).await;
            continue;
        }
        let forge = accepted >= TRUSTED_AFTER;
        let payload = if forge {
            payload_with_sketch_of(&lease, &out.delta.scaled(-1.0), &out.delta)
        } else {
            encode_for(&lease, &out.delta)
        };
        let sub = attacker.sign(&lease, payload, &(&out).into());
        let taken = attacker.submit(sub).await == Verdict::Accepted;
        match (forge, taken) {
            (false, true) => {
                accepted += 1;
                tally.honest_accepted += 1;
            }
            (true, _) => {
                tally.forged_sent += 1;
                tally.forged_accepted += taken as u32;
            }
            (false, false) => {}
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_adversary_of_four_does_not_move_the_final_loss() {
    // HERD_ATTACK_ROUNDS=20 gives the demo-sized figures quoted in the README.
    let rounds = std::env::var("HERD_ATTACK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let (honest, _, _) = run_to_the_end(rounds, Attacker::Nobody).await;
    for attacker in [Attacker::Noisy, Attacker::Patient] {
        let (attacked, status, tally) = run_to_the_end(rounds, attacker).await;
        let diff = (attacked - honest).abs() / honest;
        println!(
            "final held-out loss: honest {honest:.4}, with a {attacker:?} adversary {attacked:.4} \
             ({:.2}%); {tally:?}",
            100.0 * diff
        );
        let rejects = &status["rejects_by_reason"];
        assert!(
            tally.forged_sent > 0,
            "{attacker:?} never attacked: {tally:?}"
        );
        assert_eq!(tally.forged_accepted, 0, "{attacker:?}: {tally:?}");
        assert!(
            rejects.as_object().is_some_and(|r| !r.is_empty()),
            "{status}"
        );
        assert!(
            diff < 0.01,
            "{attacker:?}: honest {honest}, attacked {attacked}: {rejects}, {tally:?}"
        );
    }
}
