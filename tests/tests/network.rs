//! The walking network end to end: real `herd-coordinator` and `herd-node` processes, libp2p
//! on 127.0.0.1 port 0, libtorch on CPU, the embedded default.

use std::time::Duration;

use herd_tests::{Coordinator, Reaper, bin, default_asset, free_port, run, wait_until};
use serde_json::Value;

const ROUND: &str = "[round]\nshards = 3\ninner_steps = 40\nlr = 3e-3\nbatch_size = 16\nmax_seq_len = 128\n\
                     lease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.9\ncheckpoint_every = 5\n";

/// A finished command: whether it succeeded, and what it printed.
#[derive(Debug)]
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn of(cmd: &mut std::process::Command) -> Ran {
        let (out, stdout, stderr) = run(cmd);
        Ran {
            ok: out.status.success(),
            stdout,
            stderr,
        }
    }
}

/// Three nodes train one model for five rounds, and the result is checked from every side: the
/// coordinator's figures, the nodes' own accounts, the checkpoint over HTTP, `eval`, `pull` and
/// `verify-checkpoint`. The run takes minutes, so it runs once (a [`Scenario`]) and each test
/// here judges one property of what it recorded. The module's name sorts after this binary's
/// other tests, as [`Scenario`] asks.
mod with_three_nodes_training_one_model {
    use std::time::Duration;

    use herd_tests::{
        Coordinator, Reaper, Scenario, bin, default_asset, get_bytes, get_json, observe_until,
        wait_until,
    };
    use serde_json::Value;

    use super::{ROUND, Ran};

    static RUN: Scenario<Outcome> = Scenario::new("the three-node run", train_and_inspect);

    /// What the run left to judge, all gathered before its processes stopped.
    #[derive(Debug)]
    struct Outcome {
        /// `/v1/status` once the run finished.
        status: Value,
        /// Each node's `herd-node status --json`, as last polled: until they added up (see
        /// [`accounts_add_up`]) or for 10 s, since a node counts a verdict when it hears it,
        /// which may trail the coordinator a little. `Err`: a call failed, with its stderr.
        accounts: Result<Vec<Value>, String>,
        /// Node 0's `herd-node status`, in words.
        account_in_words: Ran,
        /// `/v1/contributors`.
        credit: Option<Value>,
        /// `/metrics`.
        metrics: Result<String, String>,
        /// The last entry of `/v1/checkpoints`.
        checkpoint: Value,
        /// Each file the checkpoint lists: its name, its BLAKE3 as listed, that of what was served.
        downloaded: Vec<(String, String, String)>,
        /// What `GET /v1/checkpoints/round-00005/..%2Fidentity.key` served, in bytes (`None`:
        /// refused).
        outside: Option<usize>,
        /// `herd-node eval --json` of the downloaded checkpoint on the held-out data.
        eval: Ran,
        /// `herd-node pull` of the checkpoint into a dir that holds its weights' first 1000 bytes.
        pull: Ran,
        /// Each listed file that `pull` did not reproduce byte for byte, and how.
        pulled_differently: Vec<String>,
        /// `herd-node verify-checkpoint` of the download as served.
        verify: Ran,
        /// The same, with the weights' last byte changed.
        verify_changed_weights: Ran,
        /// The same, weights restored, with the manifest's round changed.
        verify_changed_manifest: Ran,
    }

    impl Outcome {
        /// The held-out loss of θ_0 and after each round.
        fn losses(&self) -> Vec<f64> {
            self.status["heldout_loss"]
                .as_array()
                .unwrap_or_else(|| panic!("no heldout_loss in the status: {}", self.status))
                .iter()
                .map(|v| v.as_f64().unwrap_or_else(|| panic!("a loss of {v}")))
                .collect()
        }
    }

    /// The nodes' accepted shards add up to the 15 the coordinator accepted, and each earned
    /// tokens.
    fn accounts_add_up(accounts: &[Value]) -> bool {
        let shards: u64 = accounts
            .iter()
            .map(|a| a["accepted"].as_u64().unwrap_or(0))
            .sum();
        shards == 15 && accounts.iter().all(|a| a["tokens"].as_u64() > Some(0))
    }

    /// Runs the three nodes to the end and records everything the tests below judge.
    fn train_and_inspect() -> Outcome {
        let tmp = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(
            tmp.path(),
            &format!("rounds = 5\nserve_after_finish = true\n{ROUND}"),
        );
        let node_dir = |i: usize| tmp.path().join(format!("node-{i}"));
        let _nodes = Reaper(
            (0..3)
                .map(|i| coordinator.start_node(&node_dir(i)))
                .collect(),
        );
        let status = wait_until(Duration::from_secs(300), "the run to finish", || {
            coordinator.status().filter(|s| s["finished"] == true)
        });

        let account = |i: usize| {
            let ran = Ran::of(
                bin("herd-node")
                    .args(["status", "--json", "--data-dir"])
                    .arg(node_dir(i)),
            );
            if !ran.ok {
                return Err(ran.stderr);
            }
            serde_json::from_str::<Value>(&ran.stdout).map_err(|e| format!("{e}: {}", ran.stdout))
        };
        let accounts = observe_until(
            Duration::from_secs(10),
            || (0..3).map(account).collect::<Result<Vec<_>, _>>(),
            |seen| seen.as_ref().map_or(true, |a| accounts_add_up(a)),
        );
        let account_in_words = Ran::of(
            bin("herd-node")
                .args(["status", "--data-dir"])
                .arg(node_dir(0)),
        );
        let credit = get_json(&format!("{}/v1/contributors", coordinator.http));
        let metrics = get_bytes(&format!("{}/metrics", coordinator.http))
            .and_then(|bytes| Ok(String::from_utf8(bytes)?))
            .map_err(|e| format!("{e:#}"));

        // Download the final checkpoint over HTTP.
        let list = get_json(&format!("{}/v1/checkpoints", coordinator.http))
            .expect("GET /v1/checkpoints answers");
        let checkpoint = list
            .as_array()
            .and_then(|l| l.last())
            .unwrap_or_else(|| panic!("no checkpoint listed: {list}"))
            .clone();
        let id = checkpoint["id"].as_str().expect("the checkpoint's id");
        let names: Vec<String> = checkpoint["files"]
            .as_array()
            .expect("the checkpoint's files")
            .iter()
            .map(|f| f["name"].as_str().expect("a file's name").to_string())
            .collect();
        let adapter = tmp.path().join("downloaded");
        std::fs::create_dir_all(&adapter).unwrap();
        let mut downloaded = Vec::new();
        for (name, file) in names.iter().zip(checkpoint["files"].as_array().unwrap()) {
            let url = format!("{}/v1/checkpoints/{id}/{name}", coordinator.http);
            let bytes = get_bytes(&url).unwrap_or_else(|e| panic!("GET {url}: {e:#}"));
            let listed = file["blake3"].as_str().unwrap_or_default().to_string();
            downloaded.push((
                name.clone(),
                listed,
                blake3::hash(&bytes).to_hex().to_string(),
            ));
            std::fs::write(adapter.join(name), bytes).unwrap();
        }
        let eval = Ran::of(
            bin("herd-node")
                .args(["eval", "--json", "--model"])
                .arg(default_asset("base"))
                .arg("--adapter")
                .arg(&adapter)
                .arg("--data")
                .arg(default_asset("data/heldout.jsonl")),
        );
        let outside = get_bytes(&format!(
            "{}/v1/checkpoints/round-00005/..%2Fidentity.key",
            coordinator.http
        ))
        .ok()
        .map(|bytes| bytes.len());

        // `herd-node pull` over HTTP, with a partial weights file to resume.
        let pulled = tmp.path().join("pulled/checkpoints/round-00005");
        std::fs::create_dir_all(&pulled).unwrap();
        let weights = adapter.join("adapter_model.safetensors");
        let good = std::fs::read(&weights).expect("the downloaded weights");
        std::fs::write(
            pulled.join(".adapter_model.safetensors.partial"),
            &good[..1000],
        )
        .unwrap();
        let pull = Ran::of(
            bin("herd-node")
                .args(["pull", "--checkpoint", "round-00005", "--from"])
                .arg(&coordinator.http)
                .arg("--out")
                .arg(tmp.path().join("pulled")),
        );
        let pulled_differently = names
            .iter()
            .filter_map(|name| {
                match (
                    std::fs::read(pulled.join(name)),
                    std::fs::read(adapter.join(name)),
                ) {
                    (Ok(a), Ok(b)) if a == b => None,
                    (Ok(_), Ok(_)) => Some(format!("{name}: other bytes")),
                    (Err(e), _) | (_, Err(e)) => Some(format!("{name}: {e}")),
                }
            })
            .collect();

        // Provenance, as served, then with a changed byte, then with a changed manifest.
        let addr: libp2p::Multiaddr = coordinator.addr.parse().unwrap();
        let signer = herd_protocol::net::pinned_peer(&addr).unwrap().to_string();
        let verify_checkpoint = || {
            Ran::of(
                bin("herd-node")
                    .args(["verify-checkpoint", "--coordinator", &signer])
                    .arg(&adapter),
            )
        };
        let verify = verify_checkpoint();
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&weights, &bad).unwrap();
        let verify_changed_weights = verify_checkpoint();
        std::fs::write(&weights, &good).unwrap();
        let manifest = adapter.join("manifest.json");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, text.replace("\"round\": 5", "\"round\": 6")).unwrap();
        let verify_changed_manifest = verify_checkpoint();

        Outcome {
            status,
            accounts,
            account_in_words,
            credit,
            metrics,
            checkpoint,
            downloaded,
            outside,
            eval,
            pull,
            pulled_differently,
            verify,
            verify_changed_weights,
            verify_changed_manifest,
        }
    }

    #[test]
    fn the_run_completes_five_rounds_and_the_heldout_loss_falls_clearly() {
        let run = RUN.get();
        assert_eq!(
            run.status["rounds_completed"], 5,
            "rounds completed: {}",
            run.status
        );
        let losses = run.losses();
        assert_eq!(
            losses.len(),
            6,
            "θ_0's held-out loss and 5 rounds': {losses:?}"
        );
        assert!(
            losses[5] < 0.6 * losses[0],
            "held-out loss should fall below 60% of θ_0's: {losses:?}"
        );
    }

    #[test]
    fn every_node_contributes() {
        let status = &RUN.get().status;
        let contributors = status["peers"]
            .as_array()
            .unwrap_or_else(|| panic!("no peers in the status: {status}"))
            .iter()
            .filter(|p| p["accepted"].as_u64() > Some(0))
            .count();
        assert_eq!(
            contributors, 3,
            "peers with an accepted delta, of 3 nodes: {status}"
        );
    }

    #[test]
    fn each_nodes_own_account_adds_up_to_what_the_coordinator_counted() {
        let run = RUN.get();
        let accounts = run
            .accounts
            .as_ref()
            .unwrap_or_else(|stderr| panic!("herd-node status --json failed: {stderr}"));
        assert!(
            accounts_add_up(accounts),
            "the nodes' accepted shards should add up to the coordinator's 15 and each node \
             have tokens of credit, within 10 s; `herd-node status --json` said: {accounts:?}"
        );
        let words = &run.account_in_words;
        assert!(
            words.ok
                && words.stdout.contains("accepted shards")
                && words.stdout.contains("tokens of credit"),
            "herd-node status should say the accepted shards and tokens of credit: {}{}",
            words.stdout,
            words.stderr
        );
    }

    #[test]
    fn credit_and_metrics_say_the_same_as_the_verdicts() {
        let run = RUN.get();
        let credit = run
            .credit
            .as_ref()
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("GET /v1/contributors: {:?}", run.credit));
        let shards: u64 = credit
            .iter()
            .map(|c| c["accepted_shards"].as_u64().unwrap())
            .sum();
        let tokens: Vec<u64> = credit
            .iter()
            .map(|c| c["tokens"].as_u64().unwrap())
            .collect();
        assert_eq!(
            (credit.len(), shards),
            (3, 15),
            "(contributors, their accepted shards) in /v1/contributors: {credit:?}"
        );
        assert!(
            tokens.windows(2).all(|w| w[0] >= w[1]) && tokens[2] > 0,
            "/v1/contributors should list the most tokens first, every contributor with some: \
             {credit:?}"
        );
        let metrics = run
            .metrics
            .as_ref()
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert!(
            metrics.contains("herd_verdicts_total{verdict=\"accepted\"} 15\n")
                && metrics.contains("herd_rounds_completed_total 5\n"),
            "/metrics should count 15 accepted verdicts and 5 rounds: {metrics}"
        );
    }

    #[test]
    fn the_final_checkpoint_downloads_over_http_as_listed() {
        let run = RUN.get();
        assert_eq!(
            run.checkpoint["round"], 5,
            "the last checkpoint listed: {}",
            run.checkpoint
        );
        for (name, listed, served) in &run.downloaded {
            assert_eq!(served, listed, "BLAKE3 of {name} as served, and as listed");
        }
    }

    #[test]
    fn the_checkpoint_endpoint_serves_nothing_outside_the_checkpoint() {
        assert_eq!(
            RUN.get().outside,
            None,
            "bytes served for /v1/checkpoints/round-00005/..%2Fidentity.key"
        );
    }

    #[test]
    fn herd_node_eval_of_the_checkpoint_reproduces_the_coordinators_heldout_loss() {
        let run = RUN.get();
        let eval = &run.eval;
        assert!(eval.ok, "herd-node eval: {}", eval.stderr);
        let report: Value = serde_json::from_str(eval.stdout.trim())
            .unwrap_or_else(|e| panic!("herd-node eval --json: {e}: {}", eval.stdout));
        let loss = report["loss"]
            .as_f64()
            .unwrap_or_else(|| panic!("no loss from herd-node eval: {report}"));
        let losses = run.losses();
        let theirs = *losses
            .get(5)
            .unwrap_or_else(|| panic!("no held-out loss for round 5: {losses:?}"));
        assert!(
            (loss - theirs).abs() < 1e-4,
            "eval {loss} vs coordinator {theirs}"
        );
    }

    #[test]
    fn herd_node_pull_resumes_a_partial_file_and_gets_the_same_files() {
        let run = RUN.get();
        let pull = &run.pull;
        assert!(
            pull.ok
                && pull.stdout.contains("signature and hashes ok")
                && pull.stderr.contains("resuming a download"),
            "herd-node pull should resume the partial file and check the signature and \
             hashes: {}{}",
            pull.stdout,
            pull.stderr
        );
        assert!(
            run.pulled_differently.is_empty(),
            "pulled files unlike the HTTP download: {:?}",
            run.pulled_differently
        );
    }

    #[test]
    fn verify_checkpoint_traces_the_checkpoint_to_15_deltas_of_3_peers() {
        let verify = &RUN.get().verify;
        assert!(
            verify.ok
                && verify
                    .stdout
                    .contains("15 verified deltas of 3 peers over rounds 0..5"),
            "herd-node verify-checkpoint: {}{}",
            verify.stdout,
            verify.stderr
        );
    }

    #[test]
    fn verify_checkpoint_fails_on_a_changed_byte_naming_the_file_or_a_changed_manifest() {
        let run = RUN.get();
        let changed = &run.verify_changed_weights;
        assert!(
            !changed.ok
                && changed.stderr.contains("adapter_model.safetensors")
                && changed.stderr.contains("was changed"),
            "herd-node verify-checkpoint with one byte of the weights changed should fail \
             naming the file: {}",
            changed.stderr
        );
        let changed = &run.verify_changed_manifest;
        assert!(
            !changed.ok && changed.stderr.contains("signature does not match"),
            "herd-node verify-checkpoint with the manifest's round changed should fail on the \
             signature: {}",
            changed.stderr
        );
    }
}

#[test]
fn a_node_killed_mid_shard_has_its_shard_reissued() {
    let tmp = tempfile::tempdir().unwrap();
    // The victim's lease must expire soon, yet every other lease must be met by nodes that
    // share two busy cores with the rest of the suite: 20 steps (~1 s alone) in 20 s. A lease
    // a node misses counts against it, so a margin too thin fails the run, not just the test.
    let round = ROUND
        .replace("shards = 3", "shards = 2")
        .replace("lease_secs = 60", "lease_secs = 20")
        .replace("inner_steps = 40", "inner_steps = 20");
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
    let times = summary["round_times"].as_array().expect("round_times");
    assert_eq!(times.len(), 2, "{summary}");
    assert!(
        times.iter().all(|t| t["seconds"].as_f64() > Some(0.0)
            && t["aggregation_seconds"].as_f64() > Some(0.0)
            && t["verification_seconds"].as_f64() > Some(0.0)),
        "each round's time and where it went: {summary}"
    );
    // The survivors' journals account for every accepted delta (a verdict reaches its node a
    // moment after the coordinator counts it, hence the wait).
    let accepted = summary["compression"]["accepted_deltas"].as_u64().unwrap();
    wait_until(Duration::from_secs(30), "the nodes' journals", || {
        let journaled = (0..2)
            .flat_map(|i| {
                let path = tmp.path().join(format!("node-{i}/leases.jsonl"));
                let text = std::fs::read_to_string(path).unwrap_or_default();
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .filter(|r| r["verdict"] == "accepted" && r["train_seconds"].as_f64() > Some(0.0))
            .count() as u64;
        (journaled >= accepted).then_some(())
    });
}

/// SIGKILLs of the coordinator `HERD_CRASHES` times (default 5; `cargo xtask soak` runs 20).
fn crashes() -> u32 {
    std::env::var("HERD_CRASHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

#[test]
fn a_coordinator_killed_at_random_moments_loses_no_accepted_work() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let crashes = crashes();
    // Rounds enough that every kill lands in a running round even on an idle machine (a round
    // takes ~0.5 s there, a kill comes every ~2.5 s with the restart).
    let rounds = 2 + 3 * crashes as u64;
    let body = format!(
        "rounds = {rounds}\nserve_after_finish = true\n[round]\nshards = 3\nsamples_per_shard = 32\n\
         inner_steps = 6\nlr = 3e-3\nbatch_size = 8\nmax_seq_len = 128\nlease_secs = 60\nouter_lr = 0.7\n\
         outer_momentum = 0.5\ncheckpoint_every = 2\nstraggler_multiple = 0\n"
    );
    let mut coordinator = Coordinator::start_on(tmp.path(), &body, port);
    let _nodes = Reaper(
        (0..3)
            .map(|i| coordinator.start_node(&tmp.path().join(format!("node-{i}"))))
            .collect(),
    );
    // Kill at seeded random moments, 0.5 to 4 s after each start: while loading, leasing,
    // verifying, aggregating — wherever it happens to be.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut mid_run = 0;
    for crash in 0..crashes {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let wait = Duration::from_millis(500 + (state >> 33) % 3500);
        std::thread::sleep(wait);
        let status = coordinator.status();
        if status.as_ref().is_some_and(|s| s["finished"] == false) {
            mid_run += 1;
        }
        let round = status.map(|s| s["round"].clone());
        eprintln!(
            "crash {}: SIGKILL after {wait:?} (round {round:?})",
            crash + 1
        );
        coordinator.child.kill().unwrap();
        coordinator.child.wait().unwrap();
        coordinator = Coordinator::start_on(tmp.path(), &body, port);
    }
    let status = wait_until(Duration::from_secs(600), "the run to finish", || {
        coordinator.status().filter(|s| s["finished"] == true)
    });
    assert_eq!(status["rounds_completed"], rounds, "{status}");
    drop(coordinator); // the audit reads a stopped coordinator's state
    // Every round counted exactly its quorum of accepted deltas, once each, and the adapter
    // equals θ_0 with the recorded deltas applied again, bit for bit.
    let (out, stdout, stderr) = run(bin("herd-coordinator")
        .args(["audit", "--config"])
        .arg(tmp.path().join("run.toml")));
    let expected = format!("{:?}", vec![3; rounds as usize]);
    assert!(
        out.status.success() && stdout.contains("bit for bit") && stdout.contains(&expected),
        "{stdout}{stderr}"
    );
    assert!(
        mid_run * 2 >= crashes,
        "only {mid_run} of {crashes} kills hit a running round"
    );
}

#[test]
fn a_node_frozen_longer_than_its_lease_loses_the_shard_and_rejoins_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    // Long enough that the other node cannot finish the run alone while node 1 is away.
    let body = "rounds = 60\nserve_after_finish = true\n[round]\nshards = 2\nsamples_per_shard = 32\n\
                inner_steps = 6\nlr = 3e-3\nbatch_size = 8\nmax_seq_len = 128\nlease_secs = 3\n\
                outer_lr = 0.7\nouter_momentum = 0.5\ncheckpoint_every = 100\nstraggler_multiple = 0\n";
    let coordinator = Coordinator::start(tmp.path(), body);
    let mut nodes = Reaper(
        (0..2)
            .map(|i| coordinator.start_node(&tmp.path().join(format!("node-{i}"))))
            .collect(),
    );
    let log = tmp.path().join("node-1.err");
    let count = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(what)
            .count()
    };
    // Freeze node 1 (SIGSTOP) as it starts a shard of round 1 or later, for over two leases:
    // cut off as if its network were gone.
    wait_until(Duration::from_secs(120), "round 1", || {
        coordinator
            .status()
            .filter(|s| s["round"].as_u64() >= Some(1))
    });
    let started = count("training shard");
    wait_until(Duration::from_secs(60), "node 1 to start a shard", || {
        (count("training shard") > started).then_some(())
    });
    let pid = nodes.0[1].id().to_string();
    run(std::process::Command::new("kill").args(["-STOP", &pid]));
    std::thread::sleep(Duration::from_secs(8));
    let coordinator_log = std::fs::read_to_string(&coordinator.log).unwrap();
    assert!(
        coordinator_log.contains("lease expired; shard reissued"),
        "{coordinator_log}"
    );
    let accepted_before = count("delta accepted");
    run(std::process::Command::new("kill").args(["-CONT", &pid]));
    // Back, it takes new leases and contributes again, with no one's help.
    wait_until(
        Duration::from_secs(120),
        "node 1 to contribute again",
        || (count("delta accepted") > accepted_before).then_some(()),
    );
    let status = coordinator.status().unwrap();
    assert_eq!(
        status["finished"], false,
        "the run outlasted the freeze: {status}"
    );
    assert!(
        nodes.0[1].try_wait().unwrap().is_none(),
        "node 1 still runs"
    );
}

#[test]
fn with_http_off_a_fresh_node_pulls_the_base_model_and_latest_checkpoint_from_other_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    // `lan`: the coordinator confirms nodes on 127.0.0.1 as reachable, so the DHT hands them
    // out as providers.
    let body = "rounds = 2\nhttp = \"off\"\nlan = true\nserve_after_finish = true\n[round]\nshards = 2\n\
                samples_per_shard = 16\ninner_steps = 4\nlr = 3e-3\nbatch_size = 8\nmax_seq_len = 128\n\
                lease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.5\ncheckpoint_every = 1\n";
    let coordinator = Coordinator::start(tmp.path(), body);
    let _nodes = Reaper(
        (0..2)
            .map(|i| {
                coordinator.start_node_with(
                    &tmp.path().join(format!("node-{i}")),
                    &["--seed-after-finish"],
                )
            })
            .collect(),
    );
    // Both nodes hold the final checkpoint (announced when the run finished) and serve it.
    for i in 0..2 {
        let log = tmp.path().join(format!("node-{i}.err"));
        wait_until(
            Duration::from_secs(240),
            "the nodes to seed the final checkpoint",
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains("seeding checkpoint") && l.contains("round-00002"))
                    .then_some(())
            },
        );
    }
    let out = tmp.path().join("pulled");
    let report = tmp.path().join("pull.json");
    let (status, stdout, stderr) = run(bin("herd-node")
        .args(["pull", "--listen", herd_tests::LOOPBACK, "--from"])
        .arg(&coordinator.addr)
        .arg("--data-dir")
        .arg(tmp.path().join("fresh"))
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report));
    assert!(status.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("round-00002") && stdout.contains("signature and hashes ok"),
        "{stdout}"
    );
    // The base model, byte for byte.
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(out.join("base-model").join(name)).unwrap(),
            std::fs::read(default_asset("base").join(name)).unwrap(),
            "{name}"
        );
    }
    // The checkpoint, as the coordinator wrote it, and it checks out against this coordinator.
    let published = tmp.path().join("coordinator/checkpoints/round-00002");
    let pulled = out.join("checkpoints/round-00002");
    for entry in std::fs::read_dir(&published).unwrap() {
        let name = entry.unwrap().file_name();
        assert_eq!(
            std::fs::read(pulled.join(&name)).unwrap(),
            std::fs::read(published.join(&name)).unwrap(),
            "{name:?}"
        );
    }
    let addr: libp2p::Multiaddr = coordinator.addr.parse().unwrap();
    let signer = herd_protocol::net::pinned_peer(&addr).unwrap().to_string();
    let (verified, vout, verr) = run(bin("herd-node")
        .args(["verify-checkpoint", "--coordinator", &signer])
        .arg(&pulled));
    assert!(verified.status.success(), "{vout}{verr}");
    // Every byte came from the nodes; the coordinator only said what is current.
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let from = report["bytes_from"].as_object().unwrap();
    assert_eq!(from.get(&signer), None, "{report}");
    let total: u64 = from.values().map(|v| v.as_u64().unwrap()).sum();
    let weights = std::fs::metadata(default_asset("base/model.safetensors"))
        .unwrap()
        .len();
    assert!(total > weights, "{report}");
    println!("{stdout}{report}");
}

#[test]
fn a_node_behind_nat_serves_what_it_holds_by_dialling_back_a_peer_that_came_through_the_relay() {
    use herd_tests::netns::{HOME_IP, INET_IP, NatLab};
    let lab = match NatLab::create() {
        Ok(lab) => lab,
        // Network namespaces need root; CI runs as root and installs iptables.
        Err(why) => {
            eprintln!("skipped: cannot build the NAT lab: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let body = "rounds = 2\nhttp = \"off\"\nlan = true\nserve_after_finish = true\n[round]\nshards = 2\n\
                samples_per_shard = 16\ninner_steps = 4\nlr = 3e-3\nbatch_size = 8\nmax_seq_len = 128\n\
                lease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.5\ncheckpoint_every = 1\n";
    let coordinator = Coordinator::start_with(
        tmp.path(),
        body,
        &format!("/ip4/{INET_IP}/tcp/0"),
        lab.inet(&herd_tests::bin_path("herd-coordinator")),
    );
    // The only contributor, at home behind the NAT.
    let err = tmp.path().join("home.err");
    let _home = Reaper(vec![
        lab.home(&herd_tests::bin_path("herd-node"))
            .args(["run", "--threads", "1", "--seed-after-finish", "--listen"])
            .arg(format!("/ip4/{HOME_IP}/tcp/0"))
            .arg("--coordinator")
            .arg(&coordinator.addr)
            .arg("--data-dir")
            .arg(tmp.path().join("home"))
            .env(
                "HERD_LOG",
                std::env::var("HERD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::fs::File::create(tmp.path().join("home.log")).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    ]);
    let log = || std::fs::read_to_string(&err).unwrap_or_default();
    // It finds out it is behind NAT, listens through the relay, and seeds the checkpoint.
    let seeded_via_relay = |text: &str| {
        text.contains("reachability: behind NAT")
            && text.contains("reachable through the coordinator's relay")
            && text
                .lines()
                .any(|l| l.contains("seeding checkpoint") && l.contains("round-00002"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !seeded_via_relay(&log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = log();
    assert!(
        seeded_via_relay(&text),
        "the home node did not seed through the relay:\n{text}\ncoordinator:\n{}",
        std::fs::read_to_string(&coordinator.log).unwrap_or_default()
    );
    let home_peer = text
        .lines()
        .find_map(|l| l.split("peer=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the node logs its peer id")
        .to_string();

    // A fresh node on the internet side pulls: every byte from the node behind the NAT.
    let report = tmp.path().join("pull.json");
    let (status, stdout, stderr) = run(lab
        .inet(&herd_tests::bin_path("herd-node"))
        .args(["pull", "--listen"])
        .arg(format!("/ip4/{INET_IP}/tcp/0"))
        .arg("--from")
        .arg(&coordinator.addr)
        .arg("--data-dir")
        .arg(tmp.path().join("fresh"))
        .arg("--out")
        .arg(tmp.path().join("pulled"))
        .arg("--report")
        .arg(&report));
    assert!(
        status.status.success(),
        "{stdout}{stderr}\nhome node:\n{}",
        log()
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let from = report["bytes_from"].as_object().unwrap();
    let weights = std::fs::metadata(default_asset("base/model.safetensors"))
        .unwrap()
        .len();
    // The weights come from the node behind the NAT. A file asked for before its dial-back
    // has landed may come from the coordinator, the last resort (seen on a loaded machine:
    // config.json, 537 bytes): only the small files, never the bulk.
    let from_others: u64 = from
        .iter()
        .filter(|(peer, _)| **peer != home_peer)
        .filter_map(|(_, bytes)| bytes.as_u64())
        .sum();
    assert!(
        from.get(&home_peer).and_then(Value::as_u64) > Some(weights) && from_others < weights / 8,
        "{report}\n{stderr}\nhome node:\n{}",
        log()
    );
    println!("{stdout}{report}");
}

#[test]
fn pause_and_ctrl_c_mid_shard_return_the_lease_and_the_shard_is_reissued_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    // Leases that outlast the test: only the return can explain a quick reissue.
    let body = "rounds = 1\nserve_after_finish = true\n[round]\nshards = 2\nsamples_per_shard = 32\n\
                inner_steps = 400\nlr = 3e-3\nbatch_size = 8\nmax_seq_len = 128\nlease_secs = 600\n\
                outer_lr = 0.7\nouter_momentum = 0.5\ncheckpoint_every = 1\nstraggler_multiple = 0\n";
    let coordinator = Coordinator::start(tmp.path(), body);
    let dir = tmp.path().join("first");
    let mut first = Reaper(vec![coordinator.start_node(&dir)]);
    let log = tmp.path().join("first.err");
    let count_in = |path: &std::path::Path, needle: &str| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .matches(needle)
            .count()
    };
    let wait_for = |path: &std::path::Path, needle: &str, n: usize, what: &str| {
        wait_until(Duration::from_secs(60), what, || {
            (count_in(path, needle) >= n).then_some(())
        })
    };
    let node_cmd = |cmd: &str| {
        let (out, stdout, stderr) = run(bin("herd-node").args([cmd, "--data-dir"]).arg(&dir));
        assert!(out.status.success(), "herd-node {cmd}: {stderr}");
        stdout
    };
    wait_for(&log, "training shard", 1, "the node to start a shard");

    // Paused: the shard goes back at once and the node waits, saying why.
    assert!(node_cmd("pause").contains("paused"));
    wait_for(
        &coordinator.log,
        "lease returned",
        1,
        "the paused node's lease to come back",
    );
    assert!(count_in(&log, "stopping: returning the lease") == 1);
    let (out, stdout, _) = run(bin("herd-node")
        .args(["status", "--json", "--data-dir"])
        .arg(&dir));
    assert!(out.status.success());
    let doing = serde_json::from_str::<Value>(&stdout).unwrap()["doing"].clone();
    assert!(
        doing.as_str().unwrap().starts_with("idle: paused"),
        "{doing}"
    );
    // Resumed: it takes a shard again by itself.
    assert!(node_cmd("resume").contains("resumed"));
    wait_for(&log, "training shard", 2, "the resumed node to train again");

    // Ctrl-C: the lease goes back and the node exits within seconds.
    let pid = first.0[0].id().to_string();
    run(std::process::Command::new("kill").args(["-INT", &pid]));
    let stopped = std::time::Instant::now();
    let exit = wait_until(Duration::from_secs(10), "the node to stop", || {
        first.0[0].try_wait().unwrap()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        exit.success() && text.contains("interrupted: returning the lease"),
        "{exit:?}\n{text}"
    );
    println!(
        "stopped {:.1} s after Ctrl-C",
        stopped.elapsed().as_secs_f64()
    );
    wait_for(
        &coordinator.log,
        "lease returned",
        2,
        "the coordinator to take the lease back",
    );
    // Another node gets both shards long before the returned leases would have expired.
    let _second = Reaper(vec![coordinator.start_node(&tmp.path().join("second"))]);
    let status = wait_until(Duration::from_secs(240), "the run to finish", || {
        coordinator.status().filter(|s| s["finished"] == true)
    });
    assert_eq!(status["accepted_deltas"], 2, "{status}");
}
