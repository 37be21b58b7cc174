//! `herd-node run`: the contributor daemon. It joins a coordinator's network, then works one
//! lease after another ([`lease`]) until the run ends; it asks again with backoff while the
//! coordinator cannot be reached, takes no work outside its availability, and on Ctrl-C hands
//! its lease back and exits.
//!
//! Layout: `admission` is the proof of work a new identity pays once per run; `join` links the node to a run (identity, blob cache, network loop); `network` is
//! that libp2p loop; `lease` is one lease's life and `worker` its training; `fetch` and `cache`
//! get and keep blobs; `seed` fetches announced checkpoints for other peers; `residual` keeps
//! error feedback; `availability` says when the machine may be used; `status` is
//! `status.json`; `journal` is `leases.jsonl`, where each lease's time went.

mod admission;
pub mod availability;
pub mod cache;
pub mod fetch;
mod join;
mod journal;
mod lease;
pub mod network;
mod residual;
mod seed;
pub mod status;
mod worker;

use std::time::Duration;

use anyhow::{Result, bail};
use libp2p::Multiaddr;

use crate::commands::ComputeArgs;
use admission::Admission;
use availability::Availability;
pub use join::{Joined, PeerArgs, default_data_dir, join, unreachable_message};
use lease::{Contributor, Ended, Offer};
use network::{NetFailure, SharedStore};
use status::NodeStatus;
use worker::Worker;

/// Failed dials before a node that never reached its coordinator gives up.
const FIRST_CONTACT_ATTEMPTS: u32 = 3;
/// Longest wait before trying the coordinator again, for a lease request or a submission.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait at exit for work on blocking threads (a training step, a model load).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);
/// Longest wait at exit for the last submission's verdict.
const LAST_VERDICT_WAIT: Duration = Duration::from_secs(30);

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

pub fn run(args: RunArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run_async(args));
    // Training that Ctrl-C interrupted stops at its next step: wait for it, since libtorch
    // must not be torn down under a running thread (that crashes the exit).
    runtime.shutdown_timeout(SHUTDOWN_WAIT);
    result
}

/// Joins, works leases until [`contribute`] returns, then stops in order: the status file
/// says so, the seeder ends, and the network loop is waited for once no client holds it.
async fn run_async(args: RunArgs) -> Result<()> {
    let device = args.compute.apply()?;
    let Joined {
        data_dir,
        keypair,
        addr,
        coordinator,
        cache,
        client,
        net,
        announced,
    } = join(&args.coordinator, &args.peer).await?;
    let store = cache.shared();
    let seeding = tokio::spawn(seed::seed_announced(
        client.clone(),
        store.clone(),
        announced,
    ));
    let worker = Worker::new(&data_dir, cache, device)?;
    let device = format!("{device:?}, {} threads", tch::get_num_threads());
    let status = NodeStatus::resume(
        &data_dir,
        keypair.public().to_peer_id().to_string(),
        addr.to_string(),
        device.clone(),
    );
    let admission = Admission::load(&data_dir, coordinator, keypair.public().to_peer_id());
    let mut node = Contributor {
        client,
        keypair,
        worker,
        status,
        data_dir,
        device,
        admission,
        pending: None,
    };
    node.report("connecting to the coordinator");
    let availability = Availability::new(args.active_hours.clone(), &node.data_dir);
    let result = contribute(&args, &mut node, &availability, &addr, &store).await;
    // The last submission's verdict, so its residual and journal line are kept; not for
    // ever: without it the residual stays as before that delta, as if it was rejected.
    if tokio::time::timeout(LAST_VERDICT_WAIT, node.settle())
        .await
        .is_err()
    {
        tracing::warn!("stopping without the last submission's verdict");
    }
    node.report(match &result {
        Ok(()) => "stopped".to_string(),
        Err(e) => format!("stopped: {e:#}"),
    });
    seeding.abort(); // it holds a client: the network loop ends only when all are gone
    let _ = seeding.await;
    drop(node);
    let _ = net.await;
    result
}

/// What the daemon knows of its link to the coordinator.
#[derive(Debug, Default)]
struct Contact {
    /// Whether the coordinator has answered at least once.
    reached: bool,
    /// Lease requests that did not get through since the last lease; sets the backoff.
    failures: u32,
}

/// Works leases until the run is over, `--max-shards` are done, Ctrl-C, or an error.
async fn contribute(
    args: &RunArgs,
    node: &mut Contributor,
    availability: &Availability,
    addr: &Multiaddr,
    store: &SharedStore,
) -> Result<()> {
    let mut contact = Contact::default();
    let mut shards = 0u64;
    loop {
        if args.max_shards.is_some_and(|m| shards >= m) {
            tracing::info!(shards, "done: --max-shards reached");
            return Ok(());
        }
        node.status
            .set_reachability(&node.data_dir, node.client.reachability());
        if let Some(why) = availability.blocked() {
            report_idle(node, &why);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
        node.settle_if_answered().await;
        let offer = tokio::select! {
            offer = node.ask() => offer?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let lease = match offer {
            Offer::Lease(lease) => lease,
            Offer::Finished { reason } => {
                run_over(
                    node,
                    &reason,
                    shards,
                    args.seed_after_finish.then_some(store),
                )
                .await;
                return Ok(());
            }
            Offer::Wait {
                reason,
                retry_after_ms,
            } => {
                wait_for_work(node, &mut contact, &reason, retry_after_ms).await;
                continue;
            }
            Offer::Unreachable(e) => {
                back_off(node, &mut contact, addr, &e).await?;
                continue;
            }
            Offer::Admission { run, bits } => {
                node.report(format!(
                    "proving work to join run `{run}` ({bits} bits, once)"
                ));
                tokio::select! {
                    solved = node.admission.solve(&run, bits) => solved?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
                continue;
            }
        };
        contact = Contact {
            reached: true,
            failures: 0,
        };
        match node.work(&lease, availability).await? {
            Ended::Submitted => shards += 1,
            Ended::Checked | Ended::HandedBack => {}
            Ended::Interrupted => return Ok(()),
        }
    }
}

/// Says in the status file, once, why the node takes no work.
fn report_idle(node: &mut Contributor, why: &str) {
    let idle = format!("idle: {why}");
    if node.status.doing != idle {
        tracing::info!(%why, "taking no work");
        node.report(idle);
    }
}

/// No work yet: says so on first contact or after training, then waits as long as the
/// coordinator asked (50 ms at least), or until the last submission's verdict is in.
async fn wait_for_work(
    node: &mut Contributor,
    contact: &mut Contact,
    reason: &str,
    retry_after_ms: u64,
) {
    if !contact.reached || node.status.doing.starts_with("training") {
        node.report(format!("waiting for work ({reason})"));
    }
    contact.reached = true;
    tracing::debug!(%reason, retry_after_ms, "no work yet");
    // A node waiting for its verdict asks again as soon as it is in: then it may train.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(retry_after_ms.max(50))) => {}
        _ = node.answered(), if node.pending.is_some() => {}
    }
}

/// Waits longer after each failed lease request, up to [`MAX_BACKOFF`]; a node that never
/// reached its coordinator gives up after [`FIRST_CONTACT_ATTEMPTS`].
async fn back_off(
    node: &mut Contributor,
    contact: &mut Contact,
    addr: &Multiaddr,
    e: &NetFailure,
) -> Result<()> {
    contact.failures += 1;
    if !contact.reached && contact.failures >= FIRST_CONTACT_ATTEMPTS {
        bail!(unreachable_message(addr, e));
    }
    let backoff = Duration::from_secs(1 << contact.failures.min(5)).min(MAX_BACKOFF);
    node.report(format!("cannot reach the coordinator ({e}); retrying"));
    tracing::warn!(error = %e, retry_in = ?backoff, "coordinator unreachable; retrying");
    tokio::time::sleep(backoff).await;
    Ok(())
}

/// The run is over: says so, and with `--seed-after-finish` keeps serving the run's
/// checkpoints and base model to other peers until Ctrl-C.
async fn run_over(
    node: &mut Contributor,
    reason: &str,
    shards: u64,
    seed_into: Option<&SharedStore>,
) {
    println!("the run is over ({reason}); {shards} shards contributed");
    node.report(format!("done: the run is over ({reason})"));
    if let Some(store) = seed_into {
        node.report("seeding checkpoints to other peers");
        seed::seed_latest(&node.client, store).await;
        println!("seeding the run's checkpoints to other peers until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
}
