//! `herd-node pull`: downloads a run's base model and a checkpoint (the latest by default).
//! From a coordinator's multiaddr it goes over libp2p: the coordinator says what the files are
//! (a few hundred bytes), the bytes come from whichever peers hold them (the DHT names them),
//! in groups checked against each file's blake3 on arrival, and the checkpoint is checked
//! against its manifest signed by that coordinator. From an `http(s)://` URL it fetches the
//! checkpoint from the coordinator's HTTP API, resuming partial files with `Range`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use herd_protocol::manifest::{Manifest, ManifestFile, verify_checkpoint};
use herd_protocol::messages::{Published, RpcRequest, RpcResponse, plain_name};
use libp2p::PeerId;
use serde::Deserialize;
use serde_json::json;

use crate::daemon::cache::link_files;
use crate::daemon::fetch::fetch_all;
use crate::daemon::network::Client;
use crate::daemon::{Joined, PeerArgs, join, unreachable_message};
use crate::progress::ByteProgress;

/// Attempts at asking the coordinator what is published before giving up.
const ASK_ATTEMPTS: u32 = 3;

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The coordinator: its multiaddr ending in /p2p/<PeerId> (peer-to-peer: base model and
    /// checkpoint), or its HTTP URL (the checkpoint only).
    #[arg(long, env = "HERD_COORDINATOR")]
    from: String,
    /// Which checkpoint: its id (e.g. round-00020) or `latest`.
    #[arg(long, default_value = "latest")]
    checkpoint: String,
    /// Where the files go: `base-model/` and `checkpoints/<id>/`.
    #[arg(long)]
    out: PathBuf,
    /// Only the checkpoint, not the base model.
    #[arg(long)]
    checkpoint_only: bool,
    #[command(flatten)]
    peer: PeerArgs,
    /// Also write what was fetched, and how many bytes each peer sent, as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(args: PullArgs) -> Result<()> {
    let wanted = (args.checkpoint != "latest").then(|| args.checkpoint.clone());
    if args.from.starts_with("http://") || args.from.starts_with("https://") {
        let dir = pull_http(&args.from, wanted.as_deref(), &args.out)?;
        let m =
            verify_checkpoint(&dir, None).with_context(|| format!("checking {}", dir.display()))?;
        report_checkpoint(&m, &dir);
        println!(
            "(over HTTP the base model is not served: pull from the coordinator's multiaddr for it)"
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(pull_p2p(args, wanted))
}

fn report_checkpoint(m: &Manifest, dir: &Path) {
    println!(
        "checkpoint {} (round {}, {} verified deltas, signed by {}): {} — signature and hashes ok",
        m.checkpoint,
        m.round,
        m.deltas.len(),
        m.coordinator,
        dir.display()
    );
}

async fn pull_p2p(args: PullArgs, wanted: Option<String>) -> Result<()> {
    let Joined {
        addr,
        coordinator,
        cache,
        client,
        net,
        ..
    } = join(&args.from, &args.peer).await?;
    let published = ask_published(&client, &addr, wanted).await?;
    let store = cache.shared();
    let mut bytes_from: BTreeMap<PeerId, u64> = BTreeMap::new();
    let mut add = |from: BTreeMap<PeerId, u64>| {
        for (peer, n) in from {
            *bytes_from.entry(peer).or_default() += n;
        }
    };

    let base_dir = args.out.join("base-model");
    if !args.checkpoint_only {
        let (files, from) = fetch_all(&client, &store, &published.base_model).await?;
        add(from);
        link_files(
            &base_dir,
            files.iter().map(|(n, p)| (p.as_path(), n.as_str())),
        )?;
        println!("base model: {}", base_dir.display());
    }

    let mut checkpoint_dir = None;
    match &published.checkpoint {
        Some(c) if c.is_well_formed() => {
            let dir = args.out.join("checkpoints").join(&c.name);
            let (files, from) = fetch_all(&client, &store, &c.files).await?;
            add(from);
            link_files(&dir, files.iter().map(|(n, p)| (p.as_path(), n.as_str())))?;
            let m = verify_checkpoint(&dir, Some(&coordinator))
                .with_context(|| format!("checking {}", dir.display()))?;
            report_checkpoint(&m, &dir);
            checkpoint_dir = Some(dir);
        }
        Some(_) => bail!("the coordinator named a checkpoint with unusable file names"),
        None => println!("run `{}` has no checkpoint yet", published.run),
    }

    let total: u64 = bytes_from.values().sum();
    let from_coordinator = bytes_from.get(&coordinator).copied().unwrap_or(0);
    println!(
        "{total} bytes from {} peers ({from_coordinator} from the coordinator)",
        bytes_from.len()
    );
    if let Some(path) = &args.report {
        let report = json!({
            "run": published.run,
            "coordinator": coordinator.to_string(),
            "base_model": (!args.checkpoint_only).then(|| base_dir.display().to_string()),
            "checkpoint": checkpoint_dir.map(|d| d.display().to_string()),
            "bytes_from": bytes_from
                .iter()
                .map(|(p, n)| (p.to_string(), json!(n)))
                .collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop((client, store, cache));
    let _ = net.await;
    Ok(())
}

/// What the run is built on and checkpoint `wanted` (the latest if `None`), asked of the
/// coordinator.
async fn ask_published(
    client: &Client,
    addr: &libp2p::Multiaddr,
    wanted: Option<String>,
) -> Result<Published> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let request = RpcRequest::Published {
            checkpoint: wanted.clone(),
        };
        match client.rpc(request).await {
            Ok(RpcResponse::Published(published)) => return Ok(*published),
            Ok(RpcResponse::Refused { reason }) => bail!("the coordinator refused: {reason}"),
            Ok(other) => bail!("unexpected answer from the coordinator: {other:?}"),
            Err(e) if attempt >= ASK_ATTEMPTS => bail!(unreachable_message(addr, &e)),
            Err(e) => {
                tracing::warn!(error = %e, "coordinator unreachable; retrying");
                tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
            }
        }
    }
}

/// A checkpoint as `GET /v1/checkpoints` lists it.
#[derive(Debug, Deserialize)]
struct HttpCheckpoint {
    id: String,
    files: Vec<ManifestFile>,
}

/// Fetches checkpoint `wanted` (or the latest) from the coordinator's HTTP API into
/// `out/checkpoints/<id>/`; files already there with the right hash are kept, partial ones
/// resumed.
fn pull_http(url: &str, wanted: Option<&str>, out: &Path) -> Result<PathBuf> {
    let base = url.trim_end_matches('/');
    let list: Vec<HttpCheckpoint> = ureq::get(format!("{base}/v1/checkpoints"))
        .call()
        .with_context(|| format!("asking {base} for its checkpoints"))?
        .body_mut()
        .read_json()
        .context("reading the checkpoint list")?;
    let c = match wanted {
        None => list.last(),
        Some(id) => list.iter().find(|c| c.id == id),
    }
    .with_context(|| format!("{base} has no checkpoint {}", wanted.unwrap_or("yet")))?;
    if !plain_name(&c.id) || !c.files.iter().all(|f| plain_name(&f.name)) {
        bail!("{base} lists a checkpoint with unusable file names");
    }
    let dir = out.join("checkpoints").join(&c.id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for f in &c.files {
        let url = format!("{base}/v1/checkpoints/{}/{}", c.id, f.name);
        download_http(&url, f, &dir)?;
    }
    Ok(dir)
}

/// Downloads one file into `dir`, resuming `.<name>.partial` with a `Range` request, and
/// keeps it only if its blake3 is the listed one.
fn download_http(url: &str, f: &ManifestFile, dir: &Path) -> Result<()> {
    let dst = dir.join(&f.name);
    if std::fs::read(&dst).is_ok_and(|b| blake3::hash(&b).to_hex().as_str() == f.blake3) {
        return Ok(());
    }
    let partial = dir.join(format!(".{}.partial", f.name));
    let have = std::fs::metadata(&partial)
        .map_or(0, |m| m.len())
        .min(f.size);
    let mut request = ureq::get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = request.call().with_context(|| format!("GET {url}"))?;
    let resumed = response.status() == 206;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(resumed)
        .write(true)
        .truncate(!resumed)
        .open(&partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let start = if resumed { have } else { 0 };
    if resumed {
        tracing::info!(file = %f.name, from = have, "resuming a download");
    }
    let mut progress = ByteProgress::new(f.size, start, &f.name);
    // Never more than the listed size: a server that sends more is wrong.
    let mut body = response
        .body_mut()
        .with_config()
        .limit(f.size - start)
        .reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut body, &mut buf).with_context(|| format!("GET {url}"))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        progress.add(n as u64);
    }
    progress.finish();
    file.sync_all()?;
    drop(file);
    let got = blake3::hash(&std::fs::read(&partial)?).to_hex().to_string();
    if got != f.blake3 {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "{url}: downloaded bytes hash to {got}, the list says {}; discarded",
            f.blake3
        );
    }
    std::fs::rename(&partial, &dst)?;
    Ok(())
}
