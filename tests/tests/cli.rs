//! `herd-node`'s local tools end to end through the real binary: training on the embedded
//! default, JSON output, determinism, and a clear error (never a panic) for each kind of bad input.

use std::path::Path;

use herd_tests::{
    Coordinator, LOOPBACK, bin, copy_dir, default_asset, edit_safetensors, fixture, free_port, run,
};
use serde_json::Value;

fn node() -> std::process::Command {
    let mut cmd = bin("herd-node");
    cmd.env("HERD_LOG", "warn");
    cmd
}

fn eval_json(model: &Path, adapter: Option<&Path>, data: &Path) -> Value {
    let mut cmd = node();
    cmd.args(["eval", "--json", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "eval failed: {stderr}");
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {stdout}"))
}

/// Asserts the command failed with a message containing every `needle`, and did not panic.
fn assert_clear_error(cmd: &mut std::process::Command, needles: &[&str]) {
    let (out, _, stderr) = run(cmd);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panicked instead of a clear error: {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "error should mention {needle:?}: {stderr}"
        );
    }
    assert!(
        stderr
            .lines()
            .filter(|l| l.starts_with("herd-node: error"))
            .count()
            == 1,
        "{stderr}"
    );
}

#[test]
fn train_local_learns_the_default_task_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let base = default_asset("base");
    let heldout = default_asset("data/heldout.jsonl");
    let before = eval_json(&base, None, &heldout);
    assert!(before["tokens"].as_u64().unwrap() > 0);
    let mut hashes = Vec::new();
    for name in ["a", "b"] {
        let out_dir = tmp.path().join(name);
        let mut cmd = node();
        cmd.args([
            "train-local",
            "--steps",
            "60",
            "--lr",
            "3e-3",
            "--threads",
            "1",
            "--json",
            "--model",
        ])
        .arg(&base)
        .arg("--data")
        .arg(default_asset("data/train.jsonl"))
        .arg("--out")
        .arg(&out_dir);
        let (out, stdout, stderr) = run(&mut cmd);
        assert!(out.status.success(), "train-local failed: {stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(
            report["train_loss_after"].as_f64() < report["train_loss_before"].as_f64(),
            "{report}"
        );
        hashes.push(std::fs::read(out_dir.join("adapter_model.safetensors")).unwrap());
        assert!(out_dir.join("adapter_config.json").exists());
    }
    assert!(
        hashes[0] == hashes[1],
        "same seed, device and threads must give the same adapter bytes"
    );
    let after = eval_json(&base, Some(&tmp.path().join("a")), &heldout);
    let (l0, l1) = (
        before["loss"].as_f64().unwrap(),
        after["loss"].as_f64().unwrap(),
    );
    assert!(
        l1 < 0.8 * l0,
        "held-out loss should fall clearly: {l0} -> {l1}"
    );
}

/// `--max-gpu-mem` restarts the node once with the cap in libtorch's allocator settings (kept
/// beside what the user set there), the restarted node does the same work, and a bad share is
/// refused by name. On this CPU machine the node then says the cap has no effect.
#[test]
fn max_gpu_mem_restarts_the_node_once_with_the_allocator_cap() {
    let heldout = default_asset("data/heldout.jsonl");
    let plain = eval_json(&default_asset("base"), None, &heldout);
    let mut cmd = node();
    cmd.env("HERD_LOG", "herd_node=debug")
        .env("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        .args(["eval", "--json", "--max-gpu-mem", "40%", "--model"])
        .arg(default_asset("base"))
        .arg("--data")
        .arg(&heldout);
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "{stderr}");
    let capped: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        capped["loss"], plain["loss"],
        "the restarted node evaluates the same"
    );
    let conf = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,per_process_memory_fraction:0.4";
    assert_eq!(stderr.matches(conf).count(), 1, "{stderr}");
    assert!(
        stderr.contains("no GPU in use: --max-gpu-mem 40% has no effect"),
        "{stderr}"
    );
    // clap's own error for a bad flag value: non-zero, names the flag and the expected form.
    let (out, _, stderr) = run(node().args(["run", "--max-gpu-mem", "8GiB"]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--max-gpu-mem") && stderr.contains("like 60% or 0.6"),
        "{stderr}"
    );
}

#[test]
fn missing_or_corrupt_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("gqa"), &model).unwrap();
    let data = default_asset("data/heldout.jsonl");
    std::fs::remove_file(model.join("config.json")).unwrap();
    let eval = || {
        let mut cmd = node();
        cmd.args(["eval", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data);
        cmd
    };
    assert_clear_error(&mut eval(), &["config.json", "not found"]);
    std::fs::write(model.join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    assert_clear_error(&mut eval(), &["config.json", "invalid JSON"]);
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("gqa"), &model).unwrap();
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    let cfg = cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    std::fs::write(model.join("config.json"), cfg).unwrap();
    let mut cmd = node();
    cmd.args(["generate", "--prompt", "hi", "--model"])
        .arg(&model);
    assert_clear_error(&mut cmd, &["config.json", "unsupported model", "gpt2"]);
}

#[test]
fn missing_or_misshapen_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("gqa"), &model).unwrap();
    let weights = model.join("model.safetensors");
    edit_safetensors(&weights, |h| {
        h.remove("model.layers.1.mlp.up_proj.weight");
    })
    .unwrap();
    let eval = || {
        let mut cmd = node();
        cmd.args(["eval", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(default_asset("data/heldout.jsonl"));
        cmd
    };
    assert_clear_error(
        &mut eval(),
        &[
            "model.safetensors",
            "model.layers.1.mlp.up_proj.weight",
            "missing",
        ],
    );

    copy_dir(&fixture("gqa"), &model).unwrap();
    edit_safetensors(&weights, |h| {
        // Same number of bytes, wrong shape: only a shape check can catch it.
        h["model.layers.0.self_attn.q_proj.weight"]["shape"] = serde_json::json!([16, 64]);
    })
    .unwrap();
    assert_clear_error(
        &mut eval(),
        &[
            "model.safetensors",
            "model.layers.0.self_attn.q_proj.weight",
            "[16, 64]",
            "[32, 32]",
        ],
    );

    std::fs::write(&weights, b"not a safetensors file").unwrap();
    assert_clear_error(
        &mut eval(),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn malformed_data_line_is_named_with_its_number() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"the cat sat .\"}\n{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\", \"output\": 7}\n",
    )
    .unwrap();
    let mut cmd = node();
    cmd.args(["eval", "--model"])
        .arg(fixture("gqa"))
        .arg("--data")
        .arg(&data);
    assert_clear_error(&mut cmd, &["data.jsonl:3", "`output` must be a string"]);
}

#[test]
fn adapter_that_does_not_fit_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    copy_dir(&fixture("gqa/adapter"), &adapter).unwrap();
    let config_path = adapter.join("adapter_config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let eval = || {
        let mut cmd = node();
        cmd.args(["eval", "--model"])
            .arg(fixture("gqa"))
            .arg("--adapter")
            .arg(&adapter)
            .arg("--data")
            .arg(default_asset("data/heldout.jsonl"));
        cmd
    };
    let mut cfg: Value = serde_json::from_str(&original).unwrap();
    cfg["r"] = 8.into();
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    assert_clear_error(&mut eval(), &["adapter_model.safetensors", "rank r=8"]);

    let mut cfg: Value = serde_json::from_str(&original).unwrap();
    cfg["target_modules"] = serde_json::json!(["q_proj", "lm_head"]);
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    assert_clear_error(&mut eval(), &["adapter_config.json", "`lm_head`"]);

    // Targets the model has, but the file holds no factors for.
    let mut cfg: Value = serde_json::from_str(&original).unwrap();
    cfg["target_modules"] =
        serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]);
    std::fs::write(&config_path, cfg.to_string()).unwrap();
    assert_clear_error(
        &mut eval(),
        &[
            "adapter_model.safetensors",
            "gate_proj.lora_A.weight",
            "missing",
        ],
    );
}

#[test]
fn a_node_says_when_the_coordinator_cannot_be_reached_or_is_not_who_the_address_says() {
    let tmp = tempfile::tempdir().unwrap();
    let someone = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    // Nothing listens there.
    let nowhere = format!("/ip4/127.0.0.1/tcp/{}/p2p/{someone}", free_port());
    let run_node = |coordinator: &str, dir: &str| {
        let mut cmd = node();
        cmd.args([
            "run",
            "--listen",
            LOOPBACK,
            "--coordinator",
            coordinator,
            "--data-dir",
        ])
        .arg(tmp.path().join(dir));
        cmd
    };
    assert_clear_error(
        &mut run_node(&nowhere, "a"),
        &["cannot reach the coordinator", "Is it running"],
    );
    // A coordinator listens there, but it is not the peer the address names.
    std::fs::create_dir_all(tmp.path().join("c")).unwrap();
    let coordinator = Coordinator::start(&tmp.path().join("c"), "rounds = 1\n");
    let (real, _) = coordinator.addr.rsplit_once("/p2p/").unwrap();
    let impostor = format!("{real}/p2p/{someone}");
    assert_clear_error(
        &mut run_node(&impostor, "b"),
        &["is not the coordinator named in the address"],
    );
    // An address without the PeerId.
    assert_clear_error(
        node().args(["run", "--coordinator", real]),
        &["must end with /p2p/<PeerId>"],
    );
}

#[test]
fn a_node_reads_its_config_file_below_the_environment_and_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = || {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer}", free_port())
    };
    let (in_file, in_env, on_line) = (nowhere(), nowhere(), nowhere());
    let config = tmp.path().join("node.toml");
    std::fs::write(
        &config,
        format!("coordinator = {in_file:?}\nlisten = [{LOOPBACK:?}]\nthreads = 1\n"),
    )
    .unwrap();
    let run_node = |env: Option<&str>, line: Option<&str>| {
        let mut cmd = node();
        cmd.args(["run", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(tmp.path().join("d"));
        if let Some(c) = env {
            cmd.env("HERD_COORDINATOR", c);
        }
        if let Some(c) = line {
            cmd.args(["--coordinator", c]);
        }
        cmd
    };
    // Each source in turn decides where the node goes (and fails to find anyone there).
    assert_clear_error(&mut run_node(None, None), &[&in_file]);
    assert_clear_error(&mut run_node(Some(&in_env), None), &[&in_env]);
    assert_clear_error(&mut run_node(Some(&in_env), Some(&on_line)), &[&on_line]);

    // A bad file is named, with what is wrong in it.
    let config_str = config.display().to_string();
    for (text, needle) in [
        ("coordinator = \"unclosed\n", "is not valid TOML"),
        ("colour = \"blue\"\n", "unknown setting `colour`"),
        ("threads = \"many\"\n", "--threads"),
    ] {
        std::fs::write(&config, text).unwrap();
        assert_clear_error(
            node()
                .args(["run", "--coordinator", &on_line, "--config"])
                .arg(&config),
            &[&config_str, needle],
        );
    }
    assert_clear_error(
        node().args(["run", "--config", "/nonexistent/node.toml"]),
        &["cannot read the config file /nonexistent/node.toml"],
    );
    // The example in deploy/ is a valid file: the node gets as far as dialling.
    assert_clear_error(
        node()
            .args([
                "run",
                "--listen",
                LOOPBACK,
                "--coordinator",
                &on_line,
                "--config",
            ])
            .arg(herd_tests::root().join("deploy/node.toml"))
            .arg("--data-dir")
            .arg(tmp.path().join("e")),
        &["cannot reach the coordinator"],
    );
}
