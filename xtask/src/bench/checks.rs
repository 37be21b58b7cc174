//! Verification that grows with the network (docs/checking.md): the demo with nodes at 1 and 2
//! threads checking each other (the coordinator's own share of the compute, and every honest
//! check's agreement), and `herd-coordinator simulate-checks` with lying checkers and colluding
//! pairs at 100, 1,000 and 10,000 peers, at the default check draw and with every delta
//! checked.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::num;
use crate::{demo, util};

/// First check lease id (the coordinator's `checks::FIRST_CHECK_ID`): verdicts.jsonl records
/// with ids from here on are checks.
const FIRST_CHECK_ID: u64 = 1 << 62;

/// (peers, replay_trusted, spot_rate); None: the default.
const SIMULATED: [(u32, Option<&str>, Option<&str>); 5] = [
    (100, None, None),
    (1_000, None, None),
    (10_000, None, None),
    (100, Some("1.0"), Some("0.01")),
    (10_000, Some("1.0"), Some("0.01")),
];

pub fn measure(root: &Path) -> Result<Value> {
    println!("bench checks: the demo with nodes at 1 and 2 threads, 160 rounds");
    let finished = demo::run(
        root,
        demo::DemoArgs::parse_from(&["--node-threads", "1,2", "--rounds", "160"])?,
    )?;
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&finished.summary)?)?;
    let verdicts = finished.run_dir.join("coordinator").join("verdicts.jsonl");
    let checks = check_agreement(&verdicts)?;
    println!(
        "  coordinator {:.3}× the training compute, checkers {:.3}×; {} checks, worst cosine {:.5}",
        num(&summary["verification"]["cost_vs_training"]),
        num(&summary["verification"]["checkers_cost_vs_training"]),
        checks["checks"],
        num(&checks["worst_cosine"]),
    );
    let mut simulated = Vec::new();
    for (peers, replay_trusted, spot_rate) in SIMULATED {
        let mut cmd = util::bin(root, "herd-coordinator");
        cmd.args(["simulate-checks", "--peers", &peers.to_string()])
            .args([
                "--rounds",
                "20",
                "--lying-checkers",
                "0.1",
                "--colluding",
                "0.05",
            ]);
        if let Some(q) = replay_trusted {
            cmd.args(["--replay-trusted", q]);
        }
        if let Some(s) = spot_rate {
            cmd.args(["--spot-rate", s]);
        }
        let mut report: Value =
            serde_json::from_str(&util::output(&mut cmd)?).context("simulate-checks' JSON")?;
        report["replay_trusted"] = json!(replay_trusted.unwrap_or("0.1 (default)"));
        report["spot_rate"] = json!(spot_rate.unwrap_or("0.05 (default)"));
        println!(
            "  {:>6} peers, replay_trusted {}: {:.1}% of forged deltas kept out, coordinator {:.1}%",
            peers,
            report["replay_trusted"].as_str().unwrap_or("?"),
            100.0 * num(&report["forged_kept_out_share"]),
            100.0 * num(&report["coordinator_share"]),
        );
        simulated.push(report);
    }
    Ok(json!({
        "demo": {
            "verification": summary["verification"],
            "heldout_loss": demo::heldout_losses(&summary).last(),
            "checks": checks,
        },
        "simulated": simulated,
    }))
}

/// The check verdicts of a run: how many, how many were rejected, and the worst agreement of
/// an accepted one with the submission it checked.
fn check_agreement(verdicts: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(verdicts)
        .with_context(|| format!("reading {}", verdicts.display()))?;
    let (mut checks, mut rejected) = (0u64, 0u64);
    let (mut worst_cosine, mut worst_error) = (f64::INFINITY, 0.0f64);
    for line in text.lines() {
        let record: Value = serde_json::from_str(line)?;
        if record["lease"].as_u64().is_none_or(|l| l < FIRST_CHECK_ID) {
            continue;
        }
        checks += 1;
        if record["verdict"] != "check_accepted" {
            rejected += 1;
        }
        if let Some(a) = record["replay"].as_object() {
            worst_cosine = worst_cosine.min(a["cosine"].as_f64().unwrap_or(f64::NAN));
            worst_error = worst_error.max(a["rel_error"].as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok(json!({
        "checks": checks,
        "rejected": rejected,
        "worst_cosine": worst_cosine,
        "worst_rel_error": worst_error,
    }))
}

pub fn markdown(results: &Value) -> String {
    let demo = &results["demo"];
    let v = &demo["verification"];
    let c = &demo["checks"];
    let mut md = format!(
        "## Verification that grows with the network\n\n\
         **The demo** (`cargo xtask demo --node-threads 1,2 --rounds 160`: 3 nodes at 1, 2 and 1 \
         threads on this 2-core machine, check leases once a node is trusted): the coordinator's \
         own verification compute **{:.3}×** the network's training (target ≤ 0.10; {} replays, \
         {:.1} s of effect checks), the checkers' {:.3}×; {} checks, {} rejected (target 0 false \
         rejects), worst agreement of an honest check with the submission: cosine {:.5}, \
         relative error {:.4} (tolerance 0.99 / 0.2); held-out loss {:.4}.\n\n\
         **Simulated** (`herd-coordinator simulate-checks`: the real check book and reputation, \
         no training; 20 rounds, 10% lying checkers, 5% of peers in colluding pairs, banned \
         adversaries back at once as new identities; effect checks counted at 0.23 of a shard's \
         training). Targets at 10,000 peers: ≥ 99% of forged deltas kept out, coordinator's \
         share ≤ 10%.\n\n\
         | peers | `replay_trusted` | `spot_rate` | forged deltas | kept out | coordinator's share | checkers' share | lying checkers banned (checks before ban, most) | honest peers banned | seconds |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        num(&v["cost_vs_training"]),
        v["replays"],
        num(&v["effect_seconds"]),
        num(&v["checkers_cost_vs_training"]),
        c["checks"],
        c["rejected"],
        num(&c["worst_cosine"]),
        num(&c["worst_rel_error"]),
        num(&demo["heldout_loss"]),
    );
    for r in results["simulated"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1}% | {:.1}% | {:.2}× | {} ({}) | {} | {:.0} |",
            r["peers"],
            r["replay_trusted"].as_str().unwrap_or("?"),
            r["spot_rate"].as_str().unwrap_or("?"),
            r["forged"],
            100.0 * num(&r["forged_kept_out_share"]),
            100.0 * num(&r["coordinator_share"]),
            num(&r["checkers_share"]),
            r["lying_checkers_banned"],
            r["liar_checks_before_ban_max"],
            r["honest_banned"],
            num(&r["seconds"]),
        );
    }
    md
}
