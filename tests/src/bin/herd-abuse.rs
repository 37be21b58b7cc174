//! `herd-abuse`: the attacks of `cargo xtask bench`'s abuse section at full size. It starts
//! its own coordinators (and an honest node) from the built binaries on 127.0.0.1, attacks
//! them as strangers would, and prints the figures as one JSON object on stdout (progress on
//! stderr).

use std::time::Duration;

use anyhow::{Context, Result};
use herd_protocol::messages::SUBMIT_TAG;
use herd_tests::Coordinator;
use herd_tests::abuse::{self, AdmissionCost, PeakRss};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The coordinator's default admission difficulty (`network.admission_bits`).
const DEFAULT_ADMISSION_BITS: u8 = 24;
/// The demo's layout is small: its submission frame is the 1 MiB floor.
const SUBMISSION_FRAME: u32 = 1 << 20;
const MIB: f64 = (1 << 20) as f64;

fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = json!({
        "admission": admission(),
        "honest_under_attack": honest_under_attack(&tmp.path().join("attack")),
        "stalled_frames": stalled_frames(&tmp.path().join("stall"), &runtime)?,
        "connection_flood": connection_flood(&tmp.path().join("flood"), &runtime)?,
        "identity_churn": identity_churn(&tmp.path().join("churn"), &runtime)?,
    });
    println!("{figures}");
    Ok(())
}

fn admission() -> Value {
    eprintln!("abuse: admission proof cost (blake3, one core)");
    let cost = AdmissionCost::measure(64, 16);
    eprintln!(
        "  {:.2} M hashes/s: {:.2} s per identity at the default {DEFAULT_ADMISSION_BITS} bits",
        cost.hashes_per_second() / 1e6,
        cost.seconds_per_identity(DEFAULT_ADMISSION_BITS)
    );
    json!({
        "hashes_per_second": cost.hashes_per_second(),
        "default_bits": DEFAULT_ADMISSION_BITS,
    })
}

fn honest_under_attack(dir: &std::path::Path) -> Value {
    let (sybils, alone, attacked) = (300, 120, 180);
    eprintln!(
        "abuse: an honest node alone for {alone} s, then {attacked} s against a hoarder and {sybils} Sybils"
    );
    std::fs::create_dir_all(dir).expect("a dir");
    let seen = abuse::honest_under_attack(
        dir,
        8,
        sybils,
        (Duration::from_secs(alone), Duration::from_secs(attacked)),
    );
    let ratio = seen.attacked_per_minute() / seen.alone_per_minute();
    eprintln!(
        "  {:.1} rounds/min alone, {:.1} under attack ({:.0}%)",
        seen.alone_per_minute(),
        seen.attacked_per_minute(),
        ratio * 100.0
    );
    json!({
        "sybils": sybils,
        "admission_bits": 8,
        "alone_seconds": seen.alone_seconds,
        "alone_rounds": seen.alone_rounds,
        "alone_rounds_per_minute": seen.alone_per_minute(),
        "attacked_seconds": seen.attacked_seconds,
        "attacked_rounds": seen.attacked_rounds,
        "attacked_rounds_per_minute": seen.attacked_per_minute(),
        "ratio": ratio,
        "hoarder_leases": seen.hoarder.held.len(),
        "hoarder_banned": seen.hoarder.banned,
        "sybil_leases": seen.sybils.held.len(),
        "sybils_banned": seen.sybils.banned,
        "attacker_leases_at_once": seen.sybils.most_held_at_once(&[&seen.hoarder]),
    })
}

fn stalled_frames(dir: &std::path::Path, runtime: &tokio::runtime::Runtime) -> Result<Value> {
    let (connections, streams, hold) = (10, 100, 40);
    eprintln!(
        "abuse: {connections} connections × {streams} streams announcing {SUBMISSION_FRAME} bytes, held {hold} s"
    );
    let (coordinator, report, before, peak) = measured_attack(dir, "", |coordinator| {
        runtime.block_on(abuse::stall(
            &coordinator.addr,
            connections,
            streams,
            (SUBMISSION_FRAME, SUBMIT_TAG),
            Duration::from_secs(hold),
        ))
    })?;
    let growth = peak.saturating_sub(before) as f64 / MIB;
    eprintln!(
        "  RSS {:.1} → peak {:.1} MiB (+{growth:.1}); {} streams cut, {} held to the end",
        before as f64 / MIB,
        peak as f64 / MIB,
        report.cut,
        report.held_to_end
    );
    coordinator
        .status()
        .context("the coordinator answers after the stall")?;
    Ok(json!({
        "connections": connections,
        "streams": report.streams,
        "frame_bytes": SUBMISSION_FRAME,
        "hold_seconds": hold,
        "cut": report.cut,
        "held_to_end": report.held_to_end,
        "rss_before_mib": before as f64 / MIB,
        "rss_peak_mib": peak as f64 / MIB,
        "rss_growth_mib": growth,
    }))
}

fn connection_flood(dir: &std::path::Path, runtime: &tokio::runtime::Runtime) -> Result<Value> {
    let (connections, hold) = (1500, 20);
    eprintln!("abuse: {connections} connections at once, held {hold} s (default limits)");
    let (coordinator, report, before, peak) =
        measured_attack(dir, "admission_bits = 8", |coordinator| {
            runtime.block_on(abuse::flood(
                &coordinator.addr,
                connections,
                Instant::now() + Duration::from_secs(hold),
            ))
        })?;
    // How long until a newcomer is served once the flood has left.
    let served = runtime.block_on(async {
        let start = Instant::now();
        let mut honest = herd_tests::adversary::Adversary::new(
            &coordinator.addr,
            herd_protocol::messages::RPC_PROTOCOL,
        );
        let got = tokio::time::timeout(Duration::from_secs(60), honest.ask_for_lease()).await;
        matches!(got, Ok(Ok(Ok(_)))).then(|| start.elapsed().as_secs_f64())
    });
    eprintln!(
        "  {} established, {} held to the end; RSS +{:.1} MiB; a newcomer served {:?} s after",
        report.established,
        report.held_to_end,
        peak.saturating_sub(before) as f64 / MIB,
        served
    );
    Ok(json!({
        "attempted": report.attempted,
        "established": report.established,
        "held_to_end": report.held_to_end,
        "rss_growth_mib": peak.saturating_sub(before) as f64 / MIB,
        "newcomer_served_after_seconds": served,
    }))
}

/// A coordinator in `dir` (the open network's defaults but for the `[network]` keys in
/// `network`), given 2 s to settle, with its resident memory sampled while `attack` runs:
/// (the coordinator, what the attack reported, RSS before, peak RSS during).
fn measured_attack<R>(
    dir: &std::path::Path,
    network: &str,
    attack: impl FnOnce(&Coordinator) -> R,
) -> Result<(Coordinator, R, u64, u64)> {
    std::fs::create_dir_all(dir)?;
    let coordinator = Coordinator::start(dir, &abuse::endless_run(network));
    let pid = coordinator.child.id();
    std::thread::sleep(Duration::from_secs(2));
    let before = abuse::rss_bytes(pid);
    let peak = PeakRss::start(pid);
    let report = attack(&coordinator);
    Ok((coordinator, report, before, peak.finish()))
}

fn identity_churn(dir: &std::path::Path, runtime: &tokio::runtime::Runtime) -> Result<Value> {
    let identities = 10_000;
    eprintln!("abuse: {identities} identities connect, lease, return and leave (64 at a time)");
    std::fs::create_dir_all(dir)?;
    let coordinator = Coordinator::start(dir, &abuse::endless_run("admission_bits = 8"));
    let store = dir.join("coordinator/state.redb");
    let size = || std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
    let status_bytes =
        || herd_tests::get_bytes(&format!("{}/v1/status", coordinator.http)).map(|b| b.len());
    let (store_before, status_before) = (size(), status_bytes()?);
    let start = std::time::Instant::now();
    let mut stages = Vec::new();
    let mut done = 0;
    for upto in [1_000, 5_000, 10_000] {
        let report = runtime.block_on(abuse::churn(&coordinator.addr, upto - done, 64));
        done = upto;
        let (store_now, status_now) = (size(), status_bytes()?);
        eprintln!(
            "  {done} identities ({} leased): store {store_now} bytes, status {status_now} bytes",
            report.leased
        );
        stages.push(json!({
            "identities": done,
            "leased": report.leased,
            "returned": report.returned,
            "store_bytes": store_now,
            "status_bytes": status_now,
        }));
    }
    Ok(json!({
        "identities": identities,
        "seconds": start.elapsed().as_secs_f64(),
        "store_bytes_before": store_before,
        "status_bytes_before": status_before,
        "stages": stages,
    }))
}
