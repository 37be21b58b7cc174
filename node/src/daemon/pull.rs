//! `herd-node pull`: downloads a run's base model and latest checkpoint over libp2p. The
//! coordinator says what is current (a few hundred bytes); the bytes come from whichever peers
//! hold them (the DHT names them), in groups checked against each file's blake3 on arrival; the
//! checkpoint is then checked against its manifest, signed by that coordinator.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use herd_protocol::manifest::verify_checkpoint;
use herd_protocol::messages::{Latest, RpcRequest, RpcResponse};
use libp2p::PeerId;
use serde_json::json;

use super::cache::link_files;
use super::fetch::fetch_all;
use super::{JoinArgs, Joined, join, unreachable_message};

/// Attempts at asking the coordinator what is current before giving up.
const ASK_ATTEMPTS: u32 = 3;

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    join: JoinArgs,
    /// Where the files go: `base-model/` and `checkpoints/<name>/`.
    #[arg(long, default_value = "herd-pull")]
    out: PathBuf,
    /// Only the latest checkpoint, not the base model.
    #[arg(long)]
    checkpoint_only: bool,
    /// Also write what was fetched, and how many bytes each peer sent, as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(args: PullArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(pull(args))
}

async fn pull(args: PullArgs) -> Result<()> {
    let Joined {
        addr,
        coordinator,
        cache,
        client,
        net,
        ..
    } = join(&args.join).await?;
    let latest = ask_latest(&client, &addr).await?;
    let store = cache.shared();
    let mut bytes_from: BTreeMap<PeerId, u64> = BTreeMap::new();
    let mut add = |from: BTreeMap<PeerId, u64>| {
        for (peer, n) in from {
            *bytes_from.entry(peer).or_default() += n;
        }
    };

    let base_dir = args.out.join("base-model");
    if !args.checkpoint_only {
        let (files, from) = fetch_all(&client, &store, &latest.base_model).await?;
        add(from);
        link_files(
            &base_dir,
            files.iter().map(|(n, p)| (p.as_path(), n.as_str())),
        )?;
        println!("base model: {}", base_dir.display());
    }

    let mut checkpoint_dir = None;
    match &latest.checkpoint {
        Some(c) if c.is_well_formed() => {
            let dir = args.out.join("checkpoints").join(&c.name);
            let (files, from) = fetch_all(&client, &store, &c.files).await?;
            add(from);
            link_files(&dir, files.iter().map(|(n, p)| (p.as_path(), n.as_str())))?;
            let m = verify_checkpoint(&dir, Some(&coordinator))
                .with_context(|| format!("checking {}", dir.display()))?;
            println!(
                "checkpoint {} (round {}, {} verified deltas): {} — signature and hashes ok",
                m.checkpoint,
                m.round,
                m.deltas.len(),
                dir.display()
            );
            checkpoint_dir = Some(dir);
        }
        Some(_) => bail!("the coordinator named a checkpoint with unusable file names"),
        None => println!("run `{}` has no checkpoint yet", latest.run),
    }

    let total: u64 = bytes_from.values().sum();
    let from_coordinator = bytes_from.get(&coordinator).copied().unwrap_or(0);
    println!(
        "{total} bytes from {} peers ({from_coordinator} from the coordinator)",
        bytes_from.len()
    );
    if let Some(path) = &args.report {
        let report = json!({
            "run": latest.run,
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

/// What the run is built on and its latest checkpoint, asked of the coordinator.
async fn ask_latest(client: &super::Client, addr: &libp2p::Multiaddr) -> Result<Latest> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.rpc(RpcRequest::Latest).await {
            Ok(RpcResponse::Latest(latest)) => return Ok(*latest),
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
