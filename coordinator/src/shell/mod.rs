//! The I/O shell around the round machine: it owns the swarm, the store, the engine and the
//! HTTP server, feeds the pure [`RoundMachine`](crate::round::RoundMachine) events and carries
//! out the actions it returns. One job per file:
//!
//! - `mod.rs`: the coordinator's state and its event loop (swarm, timer, engine, blob reads).
//! - [`startup`]: opening or resuming a run (assets, store, engine, ledger, HTTP).
//! - [`rpc`]: lease requests (admission first), returns and "what is published?" queries;
//!   [`rate_limit`]: how many a peer may send.
//! - [`submissions`]: a submission's cheap checks, the verification queue and verdicts.
//! - [`checking`]: check leases: handing them to trusted peers, their reports, and the
//!   replays the check book asks of the coordinator.
//! - [`engine_slot`]: the engine, free or away on a blocking thread with one job.
//! - [`actions`]: the side effects of the machine's actions (aggregation, announcements).
//! - [`publish`]: a closed round committed, checkpoints, `/v1/status` and `summary.json`.
//!
//! Shutdown order: the event loop ends (finished run, or Ctrl-C), then the HTTP server is told
//! to stop and awaited, then `summary.json` is written.

mod actions;
mod checking;
mod engine_slot;
mod publish;
mod rate_limit;
mod rpc;
mod startup;
mod submissions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use herd_protocol::LeaseId;
use herd_protocol::blob_server::BlobServer;
use herd_protocol::blobs::BlobStore;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::messages::{BlobResponse, Lease, now_ms};
use herd_protocol::net::{Behaviour, BehaviourEvent};
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Swarm, gossipsub};
use tokio::sync::watch;

use crate::checkpoint::Publisher;
use crate::config::RunConfig;
use crate::ledger::Ledger;
use crate::round::{Event, PeerKey, RoundMachine};
use crate::status::{Contribution, Status};
use crate::store::{RunState, Store};
use crate::verify::log::VerdictLog;
use engine_slot::{EngineDone, EngineSlot};
use submissions::Verifications;

pub use startup::serve;

/// Prints a line for the operator (and for scripts that read addresses from stdout). A closed
/// stdout must not take the coordinator down, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use say;

/// How often peers gone for good are looked for.
const FORGET_EVERY_MS: u64 = 10_000;

/// How long a finished coordinator keeps answering "run finished" before it exits.
const LINGER_AFTER_FINISH: Duration = Duration::from_secs(3);

/// What the coordinator knows of a connected (or once connected) peer besides its credit.
#[derive(Debug, Clone, Default)]
struct PeerPresence {
    device: String,
    connected: bool,
    /// When the coordinator last heard from the peer (ms since the Unix epoch).
    last_seen_ms: u64,
    /// Tokens of its last accepted shard over the time from its lease to its submission.
    tokens_per_second: f64,
}

/// A running coordinator: everything the event loop's handlers work on.
struct Coordinator {
    cfg: RunConfig,
    layout: DeltaLayout,
    machine: RoundMachine,
    /// What the verdicts add up to: totals, credit, reputation, structure memory, answers.
    ledger: Ledger,
    engine: EngineSlot,
    /// Submissions waiting for the engine's checks, with their reply channels.
    verifications: Verifications,
    /// Check leases: which peers replay which submissions, and what waits on them.
    checking: checking::Checking,
    /// A closed round's deltas, waiting for the engine to come back from a verification.
    waiting_aggregation: Option<(herd_protocol::Round, Vec<(Delta, u64)>)>,
    /// Accepted deltas of the current round, with their token weights.
    round_deltas: HashMap<LeaseId, (Delta, u64)>,
    /// Leases granted and not yet decided, as sent (replays need them).
    leases: HashMap<LeaseId, Lease>,
    /// The durable state: every grant, verdict and accepted delta is committed here first.
    store: Store,
    /// `verdicts.jsonl`, for people to read.
    verdict_log: VerdictLog,
    /// Where the run is, as last committed.
    run_state: RunState,
    blobs: BlobStore,
    blob_server: BlobServer,
    publisher: Publisher,
    status_tx: watch::Sender<Status>,
    /// Every peer's credit, most tokens first, for `/v1/contributors` (after each verdict).
    contributors_tx: watch::Sender<Arc<Vec<Contribution>>>,
    /// Peers connected now, or gone within `network.forget_after_secs` with verdicts to their name.
    peers: HashMap<PeerKey, PeerPresence>,
    next_forget_ms: u64,
    rate_limits: rate_limit::RateLimits,
    finished_at: Option<tokio::time::Instant>,
    topic: gossipsub::IdentTopic,
    /// When the round in progress opened, for its line of `round_times`.
    round_opened: RoundOpened,
}

/// When a round opened, and the verification seconds spent until then.
#[derive(Debug, Clone, Copy)]
struct RoundOpened {
    at: std::time::Instant,
    verification_seconds: f64,
}

impl RoundOpened {
    fn now(totals: &crate::ledger::Totals) -> Self {
        RoundOpened {
            at: std::time::Instant::now(),
            verification_seconds: totals.verify_seconds + totals.replay_seconds,
        }
    }
}

impl Coordinator {
    /// The event loop: runs until the run is finished (and has lingered) or `shutdown`.
    async fn run(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                event = swarm.select_next_some() => self.on_swarm_event(swarm, event),
                _ = tick.tick() => {
                    let now = now_ms();
                    let actions = self.machine.handle(Event::Tick, now);
                    self.carry_out(swarm, actions);
                    self.expire_checks(swarm, now);
                    if now >= self.next_forget_ms {
                        self.forget_gone_peers(now);
                        self.next_forget_ms = now + FORGET_EVERY_MS;
                    }
                    if let Some(at) = self.finished_at
                        && !self.cfg.serve_after_finish
                        && at.elapsed() >= LINGER_AFTER_FINISH
                    {
                        return Ok(());
                    }
                }
                done = self.engine.done(), if self.engine.is_working() => {
                    match done? {
                        EngineDone::Verified(lease, outcome) => self.on_verified(swarm, lease, *outcome),
                        EngineDone::Replayed(lease, sketch, seconds) => {
                            self.on_replayed(swarm, lease, sketch, seconds)
                        }
                        EngineDone::Aggregated(round, result) => {
                            let (result, checkpoint) = result?;
                            self.on_round_result(swarm, round, result, checkpoint)?;
                        }
                    }
                    self.start_aggregation();
                    self.start_verification(swarm);
                }
                (channel, response) = self.blob_server.next() => self.send_blob(swarm, channel, response),
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    return Ok(());
                }
            }
        }
    }

    fn on_swarm_event(&mut self, swarm: &mut Swarm<Behaviour>, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = format!("{address}/p2p/{}", swarm.local_peer_id());
                say!("listening: {full}");
                self.status_tx.send_modify(|s| s.addresses.push(full));
                // A coordinator is reachable where its operator makes it listen; saying so
                // lets it relay for nodes behind NAT (libp2p's relay serves only then).
                swarm.add_external_address(address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                let p = self.peers.entry(peer_id).or_default();
                p.connected = true;
                p.last_seen_ms = now_ms();
                self.publish_peer(&peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                // A peer that leaves without a verdict to its name leaves the live status at
                // once: connecting is cheap, and a churn of fresh identities must not grow
                // it. One with verdicts stays `forget_after_secs` (see `forget_gone_peers`).
                let credit = self.ledger.credit(&peer_id);
                if credit.accepted + credit.rejected == 0 {
                    self.peers.remove(&peer_id);
                } else if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.connected = false;
                    p.last_seen_ms = now_ms();
                }
                self.rate_limits.forget(&peer_id);
                self.publish_peer(&peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => self.on_rpc(swarm, peer, request, channel),
            SwarmEvent::Behaviour(BehaviourEvent::Blob(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                if let Some((channel, response)) =
                    self.blob_server.answer(&mut self.blobs, &request, channel)
                {
                    self.send_blob(swarm, channel, response);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(
                request_response::Event::InboundFailure { peer, error, .. },
            )) => {
                // Oversized or malformed requests end here: refused before allocation, logged,
                // and the coordinator carries on.
                tracing::warn!(%peer, %error, "inbound request failed");
            }
            _ => {}
        }
    }

    /// Sends a blob answer, counting the bytes of a group.
    fn send_blob(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        channel: ResponseChannel<BlobResponse>,
        response: BlobResponse,
    ) {
        if let BlobResponse::Group(bytes) = &response {
            let n = bytes.len() as u64;
            self.status_tx.send_modify(|s| s.blob_bytes_served += n);
        }
        let _ = swarm.behaviour_mut().blob.send_response(channel, response);
    }
}
