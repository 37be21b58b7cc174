//! Abuse: the open network's defences measured under attack (`herd-abuse`, tests/src/bin):
//! an honest node's pace alone and against a hoarder plus 300 Sybils, coordinator memory under
//! 10 connections × 100 stalled streams, a connection flood, a churn of 10,000 identities,
//! and what the admission proof costs an honest node and a farm.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};
use serde_json::Value;

use super::num;
use crate::util;

pub fn measure(root: &Path) -> Result<Value> {
    println!(
        "bench abuse: attacks on a real coordinator over libp2p on 127.0.0.1 (about 8 minutes)"
    );
    let text = util::output(
        util::bin(root, "herd-abuse")
            .env("HERD_LOG", "warn")
            .stderr(Stdio::inherit()),
    )?;
    serde_json::from_str(text.trim()).context("herd-abuse's JSON")
}

pub fn markdown(r: &Value) -> String {
    let mut md = String::from(
        "## Abuse\n\nThe open network's defences (docs/open-network.md) under attack by `herd-abuse`: real \
         coordinator and node processes, attackers on real libp2p connections to 127.0.0.1, the \
         coordinator's default `[network]` and `[leases]` rules.\n\n",
    );
    let a = &r["admission"];
    let _ = writeln!(
        md,
        "**Admission.** blake3 proofs at {:.2} M hashes/s on one core here. An honest node pays once \
         per run; a farm pays per identity it mints (default: {} bits).\n\n\
         | bits | an honest node, once | a farm, per 1,000 identities |\n|---|---|---|",
        num(&a["hashes_per_second"]) / 1e6,
        a["default_bits"],
    );
    // 2^bits hashes per identity on average.
    for bits in (20..=28).step_by(2) {
        let seconds = 2f64.powi(bits) / num(&a["hashes_per_second"]);
        let _ = writeln!(
            md,
            "| {bits} | {seconds:.2} s | {:.2} core-hours |",
            seconds * 1000.0 / 3600.0
        );
    }
    md.push('\n');
    let h = &r["honest_under_attack"];
    let _ = writeln!(
        md,
        "**Hoarder and Sybils.** One honest node (1 thread) in good standing, alone and then against \
         one hoarder and {} fresh identities arriving within 3.6 s, every attacker taking every lease \
         it may and never submitting. Admission was lowered to {} bits so that every Sybil gets in: \
         the lease rules are measured alone. Target: ≥ 80% of the pace alone.\n\n\
         | | seconds | rounds | rounds/min |\n|---|---|---|---|\n\
         | alone | {:.0} | {} | {:.1} |\n| attacked | {:.0} | {} | {:.1} |\n\n\
         Under attack: **{:.0}%** of the pace alone. The attackers got {} leases (the hoarder {}), \
         never more than {} at once; {} of them were banned for letting leases expire (a lease \
         whose shard a backup finished first ends with its round, which is no strike).\n",
        h["sybils"],
        h["admission_bits"],
        num(&h["alone_seconds"]),
        h["alone_rounds"],
        num(&h["alone_rounds_per_minute"]),
        num(&h["attacked_seconds"]),
        h["attacked_rounds"],
        num(&h["attacked_rounds_per_minute"]),
        num(&h["ratio"]) * 100.0,
        num(&h["sybil_leases"]) + num(&h["hoarder_leases"]),
        h["hoarder_leases"],
        h["attacker_leases_at_once"],
        num(&h["sybils_banned"]) + num(&h["hoarder_banned"]),
    );
    let s = &r["stalled_frames"];
    let _ = writeln!(
        md,
        "**Stalled frames.** {} connections × {} streams, each announcing a {}-byte submission frame \
         (the run's cap), sending all but its last bytes and then a byte every 5 s for {} s: {} \
         streams refused or cut, {} held to the end. Coordinator RSS {:.1} → peak {:.1} MiB: \
         **+{:.1} MiB** (target < 64 MiB).\n",
        s["connections"],
        num(&s["streams"]) / num(&s["connections"]),
        s["frame_bytes"],
        s["hold_seconds"],
        s["cut"],
        s["held_to_end"],
        num(&s["rss_before_mib"]),
        num(&s["rss_peak_mib"]),
        num(&s["rss_growth_mib"]),
    );
    let f = &r["connection_flood"];
    let _ = writeln!(
        md,
        "**Connection flood.** {} fresh identities dialing at once and holding their connections: {} \
         established, {} held to the end (limit 1,024); RSS +{:.1} MiB; a newcomer was served {} \
         after the flood left.\n",
        f["attempted"],
        f["established"],
        f["held_to_end"],
        num(&f["rss_growth_mib"]),
        f["newcomer_served_after_seconds"]
            .as_f64()
            .map_or("never (within 60 s)".to_string(), |s| format!("{s:.3} s")),
    );
    let c = &r["identity_churn"];
    let _ = writeln!(
        md,
        "**Churn.** {} identities, 64 at a time, each connecting, paying admission, taking a lease when \
         a newcomer may and returning it, then leaving ({:.0} s); no round closed meanwhile. Before: \
         store {} bytes, `/v1/status` {} bytes (target ≤ 64 KiB after).\n\n\
         | identities | leased | store bytes | status bytes |\n|---|---|---|---|",
        c["identities"],
        num(&c["seconds"]),
        c["store_bytes_before"],
        c["status_bytes_before"],
    );
    for stage in c["stages"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            stage["identities"], stage["leased"], stage["store_bytes"], stage["status_bytes"]
        );
    }
    md
}
