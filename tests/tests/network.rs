//! The walking network end to end: real `herd-coordinator` and `herd-node` processes, libp2p
//! on 127.0.0.1 port 0, libtorch on CPU, the embedded default.

use std::time::Duration;

use herd_tests::{Coordinator, Reaper, bin, default_asset, get_bytes, get_json, run, wait_until};
use serde_json::Value;

const ROUND: &str = "[round]\nshards = 3\ninner_steps = 40\nlr = 3e-3\nbatch_size = 16\nmax_seq_len = 128\n\
                     lease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.9\ncheckpoint_every = 5\n";

#[test]
fn three_nodes_train_one_model_whose_checkpoint_downloads_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(
        tmp.path(),
        &format!("rounds = 5\nserve_after_finish = true\n{ROUND}"),
    );
    let _nodes = Reaper(
        (0..3)
            .map(|i| coordinator.start_node(&tmp.path().join(format!("node-{i}"))))
            .collect(),
    );
    let status = wait_until(Duration::from_secs(300), "the run to finish", || {
        coordinator.status().filter(|s| s["finished"] == true)
    });
    assert_eq!(status["rounds_completed"], 5);
    let losses: Vec<f64> = status["heldout_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 6, "{losses:?}");
    assert!(
        losses[5] < 0.6 * losses[0],
        "held-out loss should fall clearly: {losses:?}"
    );
    let contributors = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["accepted"].as_u64() > Some(0))
        .count();
    assert_eq!(contributors, 3, "every node contributed: {status}");

    // Download the final checkpoint over HTTP and check it against the list.
    let list = get_json(&format!("{}/v1/checkpoints", coordinator.http)).unwrap();
    let last = list.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["round"], 5);
    let adapter = tmp.path().join("downloaded");
    std::fs::create_dir_all(&adapter).unwrap();
    for file in last["files"].as_array().unwrap() {
        let name = file["name"].as_str().unwrap();
        let bytes = get_bytes(&format!(
            "{}/v1/checkpoints/{}/{name}",
            coordinator.http,
            last["id"].as_str().unwrap()
        ))
        .unwrap();
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            file["blake3"].as_str().unwrap(),
            "{name}"
        );
        std::fs::write(adapter.join(name), bytes).unwrap();
    }
    // `herd-node eval` with it reproduces the coordinator's held-out loss.
    let (out, stdout, stderr) = run(bin("herd-node")
        .args(["eval", "--json", "--model"])
        .arg(default_asset("base"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(default_asset("data/heldout.jsonl")));
    assert!(out.status.success(), "{stderr}");
    let eval: Value = serde_json::from_str(stdout.trim()).unwrap();
    let loss = eval["loss"].as_f64().unwrap();
    assert!(
        (loss - losses[5]).abs() < 1e-4,
        "eval {loss} vs coordinator {}",
        losses[5]
    );
    assert!(
        get_bytes(&format!(
            "{}/v1/checkpoints/round-00005/..%2Fidentity.key",
            coordinator.http
        ))
        .is_err()
    );
}

#[test]
fn a_node_killed_mid_shard_has_its_shard_reissued() {
    let tmp = tempfile::tempdir().unwrap();
    let round = ROUND
        .replace("shards = 3", "shards = 2")
        .replace("lease_secs = 60", "lease_secs = 6")
        .replace("inner_steps = 40", "inner_steps = 60");
    let coordinator = Coordinator::start(tmp.path(), &format!("rounds = 2\n{round}"));
    let mut victim = coordinator.start_node(&tmp.path().join("victim"));
    wait_until(
        Duration::from_secs(60),
        "the victim to hold a lease",
        || {
            coordinator
                .status()
                .filter(|s| s["active_leases"].as_u64() >= Some(1))
        },
    );
    victim.kill().unwrap(); // SIGKILL, mid-shard: the model is still loading or training
    victim.wait().unwrap();
    let _nodes = Reaper(
        (0..2)
            .map(|i| coordinator.start_node(&tmp.path().join(format!("node-{i}"))))
            .collect(),
    );
    let mut coordinator = coordinator;
    let exit = wait_until(Duration::from_secs(240), "the run to finish", || {
        coordinator.child.try_wait().unwrap()
    });
    let log = std::fs::read_to_string(&coordinator.log).unwrap();
    assert!(exit.success(), "{log}");
    assert!(
        log.contains("lease expired; shard reissued"),
        "the victim's lease must expire: {log}"
    );
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("coordinator/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["rounds_completed"], 2);
}
