//! The open network under abuse, with the open network's default rules: a hoarder and a swarm
//! of Sybils against an honest node, stalled large frames, a connection flood and a churn of
//! identities, each against a real coordinator process over real libp2p on 127.0.0.1. These
//! are shortened versions of `cargo xtask bench`'s abuse section (`herd-abuse`), which
//! measures the same attacks at full size.

use std::time::Duration;

use herd_protocol::messages::{RPC_PROTOCOL, SUBMIT_TAG};
use herd_tests::abuse::{self, PeakRss};
use herd_tests::adversary::Adversary;
use herd_tests::{Coordinator, wait_until};
use tokio::time::Instant;

const MIB: u64 = 1 << 20;

/// The demo's layout is small: its submission frame is the 1 MiB floor.
const SUBMISSION_FRAME: u32 = 1 << 20;

#[test]
fn a_hoarder_and_sybils_cannot_take_a_round_from_an_honest_node() {
    let tmp = tempfile::tempdir().unwrap();
    let seen = abuse::honest_under_attack(
        tmp.path(),
        8,
        100,
        (Duration::from_secs(30), Duration::from_secs(60)),
    );
    eprintln!(
        "honest node: {:.1} rounds/min alone, {:.1} under attack; sybils {:?} hoarder {:?}",
        seen.alone_per_minute(),
        seen.attacked_per_minute(),
        (seen.sybils.held.len(), seen.sybils.lost),
        seen.hoarder.held,
    );
    assert!(
        seen.sybils.held.len() + seen.hoarder.held.len() > 0,
        "the attackers got leases (else nothing was tested)"
    );
    assert!(
        seen.hoarder.most_held_at_once(&[]) <= 1,
        "one live lease per peer: {:?}",
        seen.hoarder.held
    );
    // Newcomers share half of a round's 3 shards: 1 at a time.
    assert_eq!(
        seen.sybils.most_held_at_once(&[&seen.hoarder]),
        1,
        "new identities together held more than their share"
    );
    assert!(
        seen.attacked_rounds >= 3,
        "the honest node closed only {} rounds in a minute of attack ({} in 30 s alone)",
        seen.attacked_rounds,
        seen.alone_rounds
    );
}

#[test]
fn stalled_large_frames_hold_little_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(tmp.path(), &abuse::endless_run(""));
    let pid = coordinator.child.id();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A frame one byte over the run's submission cap is cut at its first byte.
    let over = runtime.block_on(abuse::stall(
        &coordinator.addr,
        1,
        4,
        (SUBMISSION_FRAME + 1, SUBMIT_TAG),
        Duration::from_secs(8),
    ));
    assert_eq!((over.cut, over.held_to_end), (4, 0), "{over:?}");

    let before = abuse::rss_bytes(pid);
    let peak = PeakRss::start(pid);
    let report = runtime.block_on(abuse::stall(
        &coordinator.addr,
        10,
        100,
        (SUBMISSION_FRAME, SUBMIT_TAG),
        Duration::from_secs(25),
    ));
    let peak = peak.finish();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "stalled frames: {report:?}; RSS {} → peak {} MiB",
        before / MIB,
        peak / MIB
    );
    assert!(
        growth < 64 * MIB,
        "RSS grew by {} MiB under {report:?}",
        growth / MIB
    );
    // At most 4 streams per connection are read at once; the rest are refused.
    assert!(report.cut >= 10 * 96, "{report:?}");
    assert!(
        coordinator.status().is_some(),
        "the coordinator still answers"
    );
}

#[test]
fn a_connection_flood_is_capped_and_the_coordinator_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let body = abuse::endless_run(
        "admission_bits = 8\nmax_connections = 50\nmax_pending_connections = 16",
    );
    let coordinator = Coordinator::start(tmp.path(), &body);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(async {
        let until = Instant::now() + Duration::from_secs(15);
        let flood = abuse::flood(&coordinator.addr, 200, until);
        let http = async {
            // Meanwhile the HTTP side answers.
            tokio::time::sleep(Duration::from_secs(8)).await;
            let url = format!("{}/v1/status", coordinator.http);
            tokio::task::spawn_blocking(move || herd_tests::get_json(&url)).await
        };
        let (report, status) = tokio::join!(flood, http);
        assert!(
            status.unwrap().is_some(),
            "the status answers during a flood"
        );
        report
    });
    eprintln!("connection flood: {report:?}");
    assert!(
        report.held_to_end <= 50,
        "more connections held than the limit: {report:?}"
    );
    assert!(
        report.held_to_end > 0 && report.established > 50,
        "the flood did not reach the limit: {report:?}"
    );
    // Once the flood has left, a newcomer gets in and is served.
    let lease = runtime.block_on(async {
        let mut honest = Adversary::new(&coordinator.addr, RPC_PROTOCOL);
        tokio::time::timeout(Duration::from_secs(60), honest.ask_for_lease()).await
    });
    assert!(
        matches!(lease, Ok(Ok(Ok(_)))),
        "no lease after the flood: {lease:?}"
    );
}

#[test]
fn a_churn_of_identities_leaves_the_status_and_the_store_small() {
    let tmp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(tmp.path(), &abuse::endless_run("admission_bits = 8"));
    let store = tmp.path().join("coordinator/state.redb");
    let size = || std::fs::metadata(&store).unwrap().len();
    let status_bytes = || {
        herd_tests::get_bytes(&format!("{}/v1/status", coordinator.http))
            .unwrap()
            .len()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let first = runtime.block_on(abuse::churn(&coordinator.addr, 500, 32));
    let after_first = size();
    let second = runtime.block_on(abuse::churn(&coordinator.addr, 1500, 32));
    let after_second = size();
    eprintln!(
        "churn: {first:?} {second:?}; store {after_first} → {after_second} bytes, status {} bytes",
        status_bytes()
    );
    assert!(
        first.leased > 0 && second.leased > 0,
        "{first:?} {second:?}"
    );
    assert_eq!(second.returned, second.leased, "{second:?}");
    // Peers that left without a verdict leave the live status at once.
    let peers = wait_until(Duration::from_secs(30), "the status to forget them", || {
        let s = coordinator.status()?;
        let peers = s["peers"].as_array()?.len();
        (peers == 0).then_some(peers)
    });
    assert_eq!(peers, 0);
    assert!(status_bytes() <= 64 << 10);
    // No round closed: the grants of 1,500 identities grew the store by no more than the
    // first 500 did (redb reuses the pages of records it dropped).
    assert!(
        after_second <= after_first + (after_first / 4),
        "the store grew with grants: {after_first} → {after_second} bytes"
    );
}
