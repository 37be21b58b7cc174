//! `herd-node run`: the contributor daemon. Joins a coordinator, then loops lease → train →
//! submit; reconnects with backoff; on Ctrl-C hands its lease back and exits.

pub mod availability;
pub mod bench_transfer;
mod cache;
mod fetch;
mod network;
pub mod pull;
mod residual;
mod seed;
pub mod status;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use herd_protocol::messages::RoundAnnouncement;
use herd_protocol::messages::{
    LeaseRequest, PROTOCOL_VERSION, RpcRequest, RpcResponse, Submission, Verdict, now_ms,
};
use herd_protocol::net::{NetOptions, Role, build_swarm, load_or_create_identity, pinned_peer};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::commands::ComputeArgs;
use availability::Availability;
use cache::BlobCache;
use network::{Client, NetFailure};
use status::NodeStatus;
use worker::Worker;

/// Failed dials before a node that never reached its coordinator gives up.
const FIRST_CONTACT_ATTEMPTS: u32 = 3;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait at exit for work on blocking threads (a training step, a model load).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);
/// Deliveries of one submission tried while the coordinator is unreachable.
const SUBMIT_ATTEMPTS: u32 = 8;

/// Where this node keeps its state and listens: shared by `run` and `pull`.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// A TOML file of settings: the long flags as keys (default: ~/.config/herd/node.toml, if
    /// it exists); the command line and the environment win over it.
    #[arg(long, env = "HERD_CONFIG")]
    config: Option<PathBuf>,
    /// Where the identity key and the blob cache live (default: $XDG_DATA_HOME/herd-node).
    #[arg(long, env = "HERD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Addresses to listen on, so other peers can fetch blobs from this node (repeatable).
    #[arg(
        long,
        env = "HERD_LISTEN",
        value_delimiter = ',',
        default_values_t = ["/ip4/0.0.0.0/tcp/0".to_string(), "/ip4/0.0.0.0/udp/0/quic-v1".to_string()]
    )]
    listen: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The coordinator's multiaddr, ending in its PeerId: /ip4/1.2.3.4/tcp/4001/p2p/12D3KooW...
    #[arg(long, env = "HERD_COORDINATOR")]
    coordinator: String,
    #[command(flatten)]
    peer: PeerArgs,
    /// Stop after this many shards (default: until the run finishes).
    #[arg(long)]
    max_shards: Option<u64>,
    /// When the run is over, keep serving its checkpoints and base model to other peers until
    /// Ctrl-C.
    #[arg(long, env = "HERD_SEED_AFTER_FINISH")]
    seed_after_finish: bool,
    /// Only work in these daily windows of local time, e.g. 22:00-07:00 (comma-separated);
    /// outside them a shard in training is handed back. Default: any time.
    #[arg(long, env = "HERD_ACTIVE_HOURS", value_delimiter = ',')]
    active_hours: Vec<availability::Window>,
    #[command(flatten)]
    compute: ComputeArgs,
}

fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("herd-node")
}

pub fn run(args: RunArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run_async(args));
    // Training that Ctrl-C interrupted stops at its next step: wait for it, since libtorch
    // must not be torn down under a running thread (that crashes the exit).
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    result
}

/// A node's link to a run: its identity, its blob cache, and the network loop.
struct Joined {
    data_dir: PathBuf,
    keypair: Keypair,
    addr: Multiaddr,
    coordinator: PeerId,
    cache: BlobCache,
    client: Client,
    net: JoinHandle<()>,
    announced: mpsc::Receiver<RoundAnnouncement>,
}

/// Checks the coordinator's address, loads (or makes) this node's identity and cache, and
/// starts the network loop; blobs already cached are announced in the DHT.
async fn join(coordinator: &str, args: &PeerArgs) -> Result<Joined> {
    let addr: Multiaddr = coordinator
        .parse()
        .with_context(|| format!("--coordinator `{coordinator}` is not a multiaddr"))?;
    let Some(peer) = pinned_peer(&addr) else {
        bail!(
            "--coordinator must end with /p2p/<PeerId> so the node knows whom it talks to (the coordinator prints its full address at start)"
        );
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let keypair = load_or_create_identity(&data_dir.join("identity.key"))?;
    tracing::info!(peer = %keypair.public().to_peer_id(), data_dir = %data_dir.display(), "herd node starting");
    let mut swarm = build_swarm(keypair.clone(), Role::Node, NetOptions::default())?;
    // Listening lets other peers fetch blobs from this node (AutoNAT tells whether they can).
    for listen in &args.listen {
        let listen: Multiaddr = listen
            .parse()
            .with_context(|| format!("--listen `{listen}` is not a multiaddr"))?;
        swarm
            .listen_on(listen.clone())
            .with_context(|| format!("listening on {listen}"))?;
    }
    let topic = libp2p::gossipsub::IdentTopic::new(herd_protocol::messages::ANNOUNCE_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
    let cache = BlobCache::open(data_dir.join("cache"))?;
    let (client, event_loop, announced) = network::new(swarm, peer, addr.clone(), cache.shared());
    let net = tokio::spawn(event_loop.run());
    for id in cache.ids() {
        client.provide(id).await;
    }
    Ok(Joined {
        data_dir,
        keypair,
        addr,
        coordinator: peer,
        cache,
        client,
        net,
        announced,
    })
}

async fn run_async(args: RunArgs) -> Result<()> {
    let device = args.compute.apply()?;
    let Joined {
        data_dir,
        keypair,
        addr,
        cache,
        client,
        net,
        announced,
        ..
    } = join(&args.coordinator, &args.peer).await?;
    let seeding = tokio::spawn(seed::seed_announced(
        client.clone(),
        cache.shared(),
        announced,
    ));
    let mut worker = Worker::new(&data_dir, cache, device)?;
    let device_text = format!("{device:?}, {} threads", tch::get_num_threads());
    let mut status = NodeStatus::resume(
        &data_dir,
        keypair.public().to_peer_id().to_string(),
        addr.to_string(),
        device_text.clone(),
    );
    status.set(&data_dir, "connecting to the coordinator");
    let availability = Availability::new(args.active_hours.clone(), &data_dir);

    let mut contacted = false;
    let mut failures = 0u32;
    let mut shards = 0u64;
    let result: Result<()> = async {
        loop {
            if args.max_shards.is_some_and(|m| shards >= m) {
                tracing::info!(shards, "done: --max-shards reached");
                return Ok(());
            }
            status.set_reachability(&data_dir, client.reachability());
            if let Some(why) = availability.blocked() {
                let idle = format!("idle: {why}");
                if status.doing != idle {
                    tracing::info!(%why, "taking no work");
                    status.set(&data_dir, idle);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            let request = RpcRequest::Lease(LeaseRequest { version: PROTOCOL_VERSION, device: device_text.clone() });
            let response = tokio::select! {
                r = client.rpc(request) => r,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let lease = match response {
                Ok(RpcResponse::Lease(lease)) => *lease,
                Ok(RpcResponse::NoWork { finished: true, reason, .. }) => {
                    println!("the run is over ({reason}); {shards} shards contributed");
                    status.set(&data_dir, format!("done: the run is over ({reason})"));
                    if args.seed_after_finish {
                        status.set(&data_dir, "seeding checkpoints to other peers");
                        println!("seeding the run's checkpoints to other peers until Ctrl-C");
                        let _ = tokio::signal::ctrl_c().await;
                    }
                    return Ok(());
                }
                Ok(RpcResponse::NoWork { retry_after_ms, reason, .. }) => {
                    if !contacted || status.doing.starts_with("training") {
                        status.set(&data_dir, format!("waiting for work ({reason})"));
                    }
                    contacted = true;
                    tracing::debug!(%reason, retry_after_ms, "no work yet");
                    tokio::time::sleep(Duration::from_millis(retry_after_ms.max(50))).await;
                    continue;
                }
                Ok(RpcResponse::Refused { reason }) => bail!("the coordinator refused this node: {reason}"),
                Ok(other) => bail!("unexpected answer to a lease request: {other:?}"),
                Err(e) => {
                    failures += 1;
                    if !contacted && failures >= FIRST_CONTACT_ATTEMPTS {
                        bail!(unreachable_message(&addr, &e));
                    }
                    let backoff = Duration::from_secs(1 << failures.min(5)).min(MAX_BACKOFF);
                    status.set(&data_dir, format!("cannot reach the coordinator ({e}); retrying"));
                    tracing::warn!(error = %e, retry_in = ?backoff, "coordinator unreachable; retrying");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            contacted = true;
            failures = 0;
            tracing::info!(lease = %lease.id, round = %lease.round, shard = %lease.shard, steps = lease.inner_steps, "training shard");
            status.set(&data_dir, format!("training round {}, shard {}", lease.round, lease.shard));
            let outcome = tokio::select! {
                o = worker.work(&client, &keypair, &lease) => o?,
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!(lease = %lease.id, "interrupted: returning the lease");
                    return_lease(&client, lease.id).await;
                    return Ok(());
                }
                why = availability.stopped() => {
                    tracing::info!(lease = %lease.id, %why, "stopping: returning the lease");
                    return_lease(&client, lease.id).await;
                    continue;
                }
            };
            let bytes = outcome.submission.payload.len();
            let tokens = outcome.submission.tokens;
            let verdict = submit(&client, outcome.submission, lease.expires_at_ms).await;
            shards += 1;
            let accepted = matches!(verdict, Ok(RpcResponse::Verdict(Verdict::Accepted)));
            match verdict {
                Ok(RpcResponse::Verdict(Verdict::Accepted)) => {
                    status.verdict(&data_dir, None, tokens, bytes as u64);
                    tracing::info!(
                        lease = %lease.id, loss_before = format!("{:.4}", outcome.loss_before),
                        loss_after = format!("{:.4}", outcome.loss_after), bytes, seconds = format!("{:.1}", outcome.seconds),
                        "delta accepted"
                    )
                }
                Ok(RpcResponse::Verdict(Verdict::Rejected(reason))) => {
                    status.verdict(&data_dir, Some(&reason), tokens, bytes as u64);
                    tracing::warn!(lease = %lease.id, reason = %reason, "delta rejected")
                }
                Ok(other) => tracing::warn!(?other, "unexpected answer to a submission"),
                Err(e) => tracing::warn!(error = %e, "submission lost; the lease will expire and be reissued"),
            }
            // Error feedback: keep what did not reach the model for the next delta.
            let residual = if accepted {
                outcome.feedback.residual_if_accepted()
            } else {
                outcome.feedback.residual_if_rejected()
            };
            if let Err(e) = worker.residuals.save(&lease.run, residual) {
                tracing::warn!(error = %e, "could not keep the error-feedback residual");
            }
        }
    }
    .await;
    status.set(
        &data_dir,
        match &result {
            Ok(()) => "stopped".to_string(),
            Err(e) => format!("stopped: {e:#}"),
        },
    );
    seeding.abort(); // it holds a client: the network loop ends only when all are gone
    let _ = seeding.await;
    drop(client);
    let _ = net.await;
    result
}

/// Hands a lease back so the coordinator reissues its shard at once rather than at expiry.
async fn return_lease(client: &Client, lease: herd_protocol::LeaseId) {
    let back = tokio::time::timeout(
        Duration::from_secs(5),
        client.rpc(RpcRequest::Return { lease }),
    )
    .await;
    if !matches!(back, Ok(Ok(RpcResponse::Returned))) {
        tracing::warn!(%lease, "could not return the lease; it will expire");
    }
}

/// Sends `submission`, and again while the coordinator cannot be reached (it may be
/// restarting) and its lease is not over: the coordinator answers a repeated submission with
/// the verdict it already gave, so a retry never counts twice.
async fn submit(
    client: &Client,
    submission: Submission,
    expires_at_ms: u64,
) -> Result<RpcResponse, NetFailure> {
    let mut wait = Duration::from_millis(500);
    for attempt in 1.. {
        match client
            .rpc(RpcRequest::Submit(Box::new(submission.clone())))
            .await
        {
            Err(NetFailure::Stopped) => return Err(NetFailure::Stopped),
            Err(e)
                if now_ms() + wait.as_millis() as u64 <= expires_at_ms
                    && attempt < SUBMIT_ATTEMPTS =>
            {
                tracing::warn!(error = %e, attempt, retry_in = ?wait, "submission not delivered; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

fn unreachable_message(addr: &Multiaddr, e: &NetFailure) -> String {
    let detail = e.to_string();
    if detail.contains("WrongPeerId") || detail.to_lowercase().contains("peer id") {
        format!(
            "the peer at {addr} is not the coordinator named in the address ({detail}). Copy the full address the coordinator prints at start."
        )
    } else {
        format!(
            "cannot reach the coordinator at {addr} ({detail}). Is it running, and are the address and port right?"
        )
    }
}
