//! Helpers for herd's workspace-level integration tests: find the real binaries that
//! `cargo xtask test` built, copy fixtures, and damage files in controlled ways.

pub mod abuse;
pub mod adversary;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};
use serde_json::Value;

/// The `[network]` and `[leases]` of a group of machines that trust each other.
const CLOSED_GROUP: &str = "[network]\nadmission_bits = 8\nrequests_per_second = 1000.0\n\
    request_burst = 1000.0\nrpc_streams_per_connection = 100\nmax_connections_per_peer = 8\n\
    [leases]\nper_peer = 64\nnewcomer_share = 1.0\nbackup_after = 0.0\nmiss_backoff_secs = 0.0\n\
    max_backoff_secs = 0.0\nban_after_expiries = 0\n";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A command for a workspace binary in the same profile dir as this test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`) or this binary
/// (`target/<profile>/<bin>`).
pub fn bin(name: &str) -> Command {
    Command::new(bin_path(name))
}

/// The path of a workspace binary (see [`bin`]).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let mut dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    path
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The embedded default (`model/default/<name>`).
pub fn default_asset(name: &str) -> PathBuf {
    root().join("model/default").join(name)
}

/// Copies the files of `src` (not sub-dirs) into a new dir `dst`.
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Runs a command, returning its output (stdout and stderr as text).
pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("start command");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stdout, stderr)
}

/// Rewrites a safetensors file, letting `edit` change the header (name → {dtype, shape,
/// data_offsets}); tensors it removes are dropped and offsets recomputed.
pub fn edit_safetensors(
    path: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<()> {
    let bytes = std::fs::read(path)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    let data = &bytes[8 + n..];
    let original = header.clone();
    edit(&mut header);
    let mut names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort_by_key(|k| original[k]["data_offsets"][0].as_u64());
    let mut body = Vec::new();
    for name in names {
        let offsets = &original[&name]["data_offsets"];
        let (s, e) = (
            offsets[0].as_u64().context("offset")? as usize,
            offsets[1].as_u64().context("offset")? as usize,
        );
        let start = body.len();
        body.extend_from_slice(&data[s..e]);
        header.get_mut(&name).unwrap()["data_offsets"] = serde_json::json!([start, body.len()]);
    }
    let mut head = serde_json::to_vec(&header)?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(head);
    out.extend(body);
    std::fs::write(path, out)?;
    Ok(())
}

/// Polls `check` every 200 ms until it returns `Some`, for at most `timeout`.
pub fn wait_until<T>(
    timeout: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Polls `observe` every 200 ms until `done` holds for what it saw, for at most `timeout`, and
/// returns the last observation either way: for a scenario that records what happened and
/// leaves the judging to the tests (see [`Scenario`]).
pub fn observe_until<T>(
    timeout: std::time::Duration,
    mut observe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let seen = observe();
        if done(&seen) || std::time::Instant::now() >= deadline {
            return seen;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// An expensive scenario (real processes, minutes of training) that several tests of one binary
/// judge, each test one property: it runs once, in whichever test asks first, and the others
/// wait for it (libtest runs the tests of a binary as threads of one process). The scenario
/// records what happened and stops its processes before it returns; the tests only read.
///
/// A panic in the scenario is caught and every test that asks fails with its message, rather
/// than with a poisoned lock or a second run.
///
/// libtest starts a binary's tests in name order: name the dependent tests to sort after the
/// binary's other tests, so that a test waiting here never holds a thread that other work could
/// use.
#[derive(Debug)]
pub struct Scenario<T> {
    /// What it is, for the message when it failed.
    what: &'static str,
    run: fn() -> T,
    outcome: std::sync::OnceLock<Result<T, String>>,
}

impl<T> Scenario<T> {
    pub const fn new(what: &'static str, run: fn() -> T) -> Self {
        Scenario {
            what,
            run,
            outcome: std::sync::OnceLock::new(),
        }
    }

    /// What the scenario recorded, running it first if no test has yet; panics, naming the
    /// scenario and its failure, when it could not run to the end.
    pub fn get(&self) -> &T {
        let outcome = self.outcome.get_or_init(|| {
            std::panic::catch_unwind(self.run).map_err(|payload| {
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".into())
            })
        });
        match outcome {
            Ok(outcome) => outcome,
            Err(why) => panic!(
                "not checked: {} failed before this property could be judged: {why}",
                self.what
            ),
        }
    }
}

/// GET `url` as JSON, or `None` when the server is not answering (yet).
pub fn get_json(url: &str) -> Option<Value> {
    let mut resp = ureq::get(url).call().ok()?;
    serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()
}

/// GET `url` as bytes.
pub fn get_bytes(url: &str) -> Result<Vec<u8>> {
    let mut resp = ureq::get(url).call()?;
    Ok(resp.body_mut().with_config().limit(1 << 30).read_to_vec()?)
}

/// A running `herd-coordinator serve`, killed on drop.
#[derive(Debug)]
pub struct Coordinator {
    pub child: std::process::Child,
    /// Its TCP multiaddr, ending in `/p2p/<PeerId>`.
    pub addr: String,
    pub http: String,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Coordinator {
    /// Writes `run.toml` (the given body after run/model/data lines) into `dir` and starts it on
    /// 127.0.0.1 port 0, waiting (bounded) for its addresses.
    pub fn start(dir: &Path, body: &str) -> Coordinator {
        Coordinator::start_on(dir, body, 0)
    }

    /// Like [`Coordinator::start`] on TCP port `port` (a coordinator restarted on the same
    /// dir and port is the same peer at the same address). Its stderr is appended to.
    pub fn start_on(dir: &Path, body: &str, port: u16) -> Coordinator {
        let listen = format!("/ip4/127.0.0.1/tcp/{port}");
        Coordinator::start_with(dir, body, &listen, bin("herd-coordinator"))
    }

    /// Starts `program` (herd-coordinator, perhaps run inside a network namespace) listening
    /// on `listen`.
    pub fn start_with(dir: &Path, body: &str, listen: &str, mut program: Command) -> Coordinator {
        use std::io::BufRead;
        let config = dir.join("run.toml");
        // A body may set `http` itself (e.g. "off").
        let http = if body.lines().any(|l| l.starts_with("http =")) {
            ""
        } else {
            "http = \"127.0.0.1:0\"\n"
        };
        // The scenarios that predate the open-network rules run a closed group's rules (cheap
        // admission, no per-peer limits); a body with its own sections keeps them.
        let open_network = if body.contains("[leases]") || body.contains("[network]") {
            ""
        } else {
            CLOSED_GROUP
        };
        let text = format!(
            "run = \"test\"\nbase_model = {:?}\ndata = {:?}\nheldout = {:?}\ndata_dir = \"coordinator\"\n\
             listen = [\"{listen}\"]\n{http}{body}\n{open_network}",
            default_asset("base"),
            default_asset("data/train.jsonl"),
            default_asset("data/heldout.jsonl"),
        );
        std::fs::write(&config, text).unwrap();
        let log = dir.join("coordinator.log");
        let mut child = program
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after the test stops listening, so the coordinator never sees a
            // closed pipe.
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut http) = (None, None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while addr.is_none() || http.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "coordinator did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
            if let Some(a) = line.strip_prefix("listening: ") {
                addr = Some(a.to_string());
            } else if let Some(u) = line.strip_prefix("http: ") {
                http = Some(u.to_string());
            }
        }
        Coordinator {
            child,
            addr: addr.unwrap(),
            http: http.unwrap(),
            log,
        }
    }

    pub fn status(&self) -> Option<Value> {
        get_json(&format!("{}/v1/status", self.http))
    }

    /// Starts a node for this coordinator with its own data dir; stdout to `<data_dir>.log`,
    /// stderr to `<data_dir>.err`.
    pub fn start_node(&self, data_dir: &Path) -> std::process::Child {
        self.start_node_with(data_dir, &[])
    }

    /// [`Coordinator::start_node`] with more `herd-node run` flags.
    pub fn start_node_with(&self, data_dir: &Path, flags: &[&str]) -> std::process::Child {
        let log = data_dir.with_extension("log");
        bin("herd-node")
            .args([
                "run",
                "--threads",
                "1",
                "--listen",
                LOOPBACK,
                "--coordinator",
            ])
            .arg(&self.addr)
            .arg("--data-dir")
            .arg(data_dir)
            .args(flags)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where test nodes listen: loopback, a port the system picks.
pub const LOOPBACK: &str = "/ip4/127.0.0.1/tcp/0";

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Child processes killed on drop (so a failing test leaves nothing running).
#[derive(Debug)]
pub struct Reaper(pub Vec<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
