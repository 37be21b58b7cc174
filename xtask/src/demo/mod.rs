//! `cargo xtask demo`: the main job on the embedded default, as a network. A coordinator and
//! three `herd-node` daemons run as separate processes on 127.0.0.1 and fine-tune the embedded
//! tiny LLaMA together; the coordinator prints the held-out loss after every round. Logs go to
//! the run folder, and the run ends with `summary: <path>`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util;

mod config;
pub use config::{Demo, DemoArgs};

/// A demo run, ended.
pub struct Finished {
    /// The coordinator's summary.json.
    pub summary: PathBuf,
    /// The run folder: run.toml, logs, the coordinator's and each node's data dir.
    pub run_dir: PathBuf,
    pub demo: Demo,
    /// The fine-tuned model's answers to the held-out instructions.
    pub exact: Option<Exact>,
}

/// Held-out instructions answered exactly, of all of them.
pub struct Exact {
    pub right: usize,
    pub total: usize,
    /// `herd-node generate --data`'s lines: instruction, input, expected, output.
    pub answers: Vec<Value>,
}

/// Runs the demo to its end.
pub fn run(root: &Path, args: DemoArgs) -> Result<Finished> {
    util::build_bins(root)?;
    let args = args.resolve(root)?;
    let started = Instant::now();
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let run_dir = args.runs.join(format!("demo-{stamp}"));
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let config = args.write_run_toml(&run_dir)?;
    println!(
        "herd demo: a coordinator and {} nodes on 127.0.0.1 fine-tune {}",
        args.nodes, args.title
    );
    println!("run folder: {}", run_dir.display());

    let mut coordinator = util::bin(root, "herd-coordinator");
    coordinator
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(log_file(&logs, "coordinator.log")?);
    let mut coordinator = Children(vec![
        coordinator.spawn().context("starting herd-coordinator")?,
    ]);
    let lines = forward_lines(coordinator.0[0].stdout.take().expect("piped"));
    let (addr, http) = wait_for_addresses(&lines, &mut coordinator.0[0])
        .with_context(|| format!("see {}", logs.join("coordinator.log").display()))?;
    println!("http: {http}");
    let mut nodes = Children(Vec::new());
    for i in 0..args.nodes {
        let threads = args.node_threads[i as usize % args.node_threads.len()];
        let mut node = util::bin(root, "herd-node");
        node.args(["run", "--threads", &threads.to_string()]);
        node.args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--coordinator",
            &addr,
            "--data-dir",
        ])
        .arg(run_dir.join(format!("node-{i}")))
        .stdout(log_file(&logs, &format!("node-{i}.log"))?)
        .stderr(log_file(&logs, &format!("node-{i}.log"))?);
        nodes.0.push(node.spawn().context("starting herd-node")?);
    }
    let mut summary_path = None;
    for line in lines.iter() {
        println!("  {line}");
        if let Some(p) = line.strip_prefix("summary: ") {
            summary_path = Some(PathBuf::from(p));
        }
    }
    let status = coordinator.0[0].wait()?;
    if !status.success() {
        bail!(
            "the coordinator failed ({status}); see {}",
            logs.join("coordinator.log").display()
        );
    }
    nodes.stop(Duration::from_secs(10));
    let summary_path = summary_path.context("the coordinator printed no summary")?;
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)?;
    let exact = report(root, &args, &summary)?;
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    println!("summary: {}", summary_path.display());
    Ok(Finished {
        summary: summary_path,
        run_dir,
        demo: args,
        exact,
    })
}

/// The held-out loss after each round of a summary.json (or a bench record holding it), index 0
/// before training.
pub fn heldout_losses(summary: &Value) -> Vec<f64> {
    summary["heldout_loss"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect()
}

/// Prints the before/after figures and the fine-tuned model's answers to held-out instructions.
fn report(root: &Path, args: &Demo, summary: &Value) -> Result<Option<Exact>> {
    let losses = heldout_losses(summary);
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "held-out loss: {first:.4} before, {last:.4} after {} rounds ({:.0}% lower)",
            losses.len() - 1,
            100.0 * (1.0 - last / first)
        );
    }
    let c = &summary["compression"];
    println!(
        "codec {}: {} bytes per delta, {:.1}× smaller than dense fp32 ({} bytes)",
        c["codec"].as_str().unwrap_or("?"),
        c["bytes_per_delta"].as_f64().unwrap_or(0.0).round(),
        c["ratio"].as_f64().unwrap_or(0.0),
        c["dense_fp32_bytes_per_delta"]
            .as_f64()
            .unwrap_or(0.0)
            .round(),
    );
    let v = &summary["verification"];
    println!(
        "verification: {} submissions replayed, cost {:.2}× the training compute; rejects {}",
        v["replays"],
        v["cost_vs_training"].as_f64().unwrap_or(f64::NAN),
        v["rejects_by_reason"]
    );
    let Some(adapter) = summary["final_adapter"].as_str() else {
        return Ok(None);
    };
    println!("final adapter: {adapter}");
    let exact = exact_answers(root, args, Some(Path::new(adapter)))?;
    println!(
        "held-out instructions answered exactly: {}/{}",
        exact.right, exact.total
    );
    for a in exact.answers.iter().take(4) {
        println!(
            "  {} [{}] -> {}",
            a["instruction"].as_str().unwrap_or(""),
            a["input"].as_str().unwrap_or(""),
            a["output"].as_str().unwrap_or("")
        );
    }
    Ok(Some(exact))
}

/// Greedy answers of the base model (with `adapter` when given) to the demo's held-out
/// instructions, checked against the expected ones.
pub fn exact_answers(root: &Path, args: &Demo, adapter: Option<&Path>) -> Result<Exact> {
    let mut generate = util::bin(root, "herd-node");
    generate
        .args(["generate", "--max-new-tokens"])
        .arg(args.answer_tokens.to_string())
        .arg("--model")
        .arg(&args.model)
        .arg("--data")
        .arg(&args.heldout);
    if let Some(adapter) = adapter {
        generate.arg("--adapter").arg(adapter);
    }
    let answers: Vec<Value> = util::output(&mut generate)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let right = answers
        .iter()
        .filter(|a| a["output"] == a["expected"])
        .count();
    Ok(Exact {
        right,
        total: answers.len(),
        answers,
    })
}

fn log_file(dir: &Path, name: &str) -> Result<Stdio> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?;
    Ok(Stdio::from(file))
}

/// Lines of a child's stdout, read on a thread.
fn forward_lines(out: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for the coordinator's TCP multiaddr and HTTP URL lines, echoing what it prints.
fn wait_for_addresses(
    lines: &mpsc::Receiver<String>,
    child: &mut Child,
) -> Result<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut addr, mut http) = (None, None);
    while addr.is_none() || http.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                bail!("the coordinator exited ({status}) before it listened");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                bail!("the coordinator did not start listening within 120 s");
            }
        };
        if let Some(a) = line.strip_prefix("listening: ") {
            if a.contains("/tcp/") && addr.is_none() {
                addr = Some(a.to_string());
            }
        } else if let Some(u) = line.strip_prefix("http: ") {
            http = Some(u.to_string());
        } else {
            println!("  {line}");
        }
    }
    Ok((addr.expect("loop condition"), http.expect("loop condition")))
}

/// Child processes that are killed if still running when dropped.
struct Children(Vec<Child>);

impl Children {
    /// Waits up to `grace` for the children to exit, then kills the rest.
    fn stop(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for child in &mut self.0 {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `cargo xtask calibrate`: the demo's run config (same flags), each shard trained at 1 and
/// 2 threads.
pub fn calibrate(root: &Path, replays: usize, devices: &str, args: DemoArgs) -> Result<()> {
    util::build_bins(root)?;
    let args = args.resolve(root)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = args.runs.join(format!("calibration-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let config = args.write_run_toml(&dir)?;
    util::run(
        util::bin(root, "herd-coordinator")
            .args(["calibrate", "--replays", &replays.to_string()])
            .args(["--devices", devices, "--config"])
            .arg(&config)
            .arg("--out")
            .arg(dir.join("calibration.json")),
    )
}
