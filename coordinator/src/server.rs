//! The I/O shell around the round machine: libp2p (leases, submissions, blobs, announcements),
//! the HTTP server, the blob store, and the engine doing tensor work off the async runtime.
//!
//! Shutdown order: the swarm loop ends (finished run, or Ctrl-C), then the HTTP server is told
//! to stop and awaited, then `summary.json` is written.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use herd_protocol::blobs::{Answer, BlobStore};
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::manifest;
use herd_protocol::messages::*;
use herd_protocol::net::{
    Behaviour, BehaviourEvent, NetOptions, Role, build_swarm, load_or_create_identity,
};
use herd_protocol::{LeaseId, Round};
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::RunConfig;
use crate::engine::{
    Engine, RoundResult, VerifyDetail, VerifyJob, VerifyOutcome, count_examples, lease_for,
};
use crate::resume::{self, Decided};
use crate::round::{Action, Event, RoundMachine};
use crate::status::{Checkpoint, PeerStatus, Status};
use crate::store::{AcceptedRecord, LeaseRecord, RunState, Store};
use crate::verify::effect::EffectConfig;
use crate::verify::envelope;
use crate::verify::log::{VerdictLog, VerdictRecord};
use crate::verify::replay::ReplayTolerance;
use crate::verify::reputation::{Reputation, ReputationConfig};
use crate::verify::structure::{Checked, StructureState};

/// Prints a line for the operator (and for scripts that read addresses from stdout). A closed
/// stdout must not take the coordinator down, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// How long a finished coordinator keeps answering "run finished" before it exits.
const LINGER_AFTER_FINISH: Duration = Duration::from_secs(3);

/// Runs the coordinator until the run finishes (and, with `serve_after_finish`, until
/// `shutdown` resolves) or `shutdown` resolves.
pub async fn serve(cfg: RunConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let keypair = load_or_create_identity(&cfg.data_dir.join("identity.key"))?;
    let local_peer = keypair.public().to_peer_id();
    let identity = keypair.clone(); // signs checkpoint manifests
    let mut swarm = build_swarm(keypair, Role::Coordinator, NetOptions { lan: cfg.lan })?;
    // The coordinator is every run's DHT bootstrap: it answers queries from the start.
    swarm
        .behaviour_mut()
        .kad
        .set_mode(Some(libp2p::kad::Mode::Server));
    for addr in &cfg.listen {
        let addr: Multiaddr = addr
            .parse()
            .with_context(|| format!("listen address `{addr}`"))?;
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
    }
    let topic = gossipsub::IdentTopic::new(ANNOUNCE_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic)?;

    tracing::info!(model = %cfg.base_model.display(), "loading the base model");
    let mut engine = Engine::new(&cfg)?;
    let layout = engine.layout();
    let mut blobs = BlobStore::open(&cfg.data_dir.join("blobs"))?;
    let weights = cfg.base_model.join("model.safetensors");
    anyhow::ensure!(
        weights.exists(),
        "{}: herd serves single-file base models for now",
        weights.display()
    );
    let assets = RunAssets {
        config: blobs.put_file(&cfg.base_model.join("config.json"))?,
        weights: blobs.put_file(&weights)?,
        tokenizer: blobs.put_file(&cfg.base_model.join("tokenizer.json"))?,
        data: blobs.put_file(&cfg.data)?,
    };
    let store = Store::open(&cfg.data_dir.join("state.redb"))?;
    let snapshot = store.load()?;
    let run_state = match snapshot.run.clone() {
        Some(mut run) => {
            let adapter = blobs
                .path(&run.adapter)
                .with_context(|| format!("the run's adapter {} is missing", run.adapter))?
                .to_path_buf();
            let outer = run.outer_state.map(|id| blobs.read(&id)).transpose()?;
            let loss = run.heldout_loss.last().copied().unwrap_or(f64::NAN);
            engine.restore(&adapter, outer.as_deref(), loss)?;
            run.epoch += 1;
            say!(
                "resuming at round {} (held-out loss {:.4})",
                run.round,
                engine.heldout_loss()
            );
            run
        }
        None => {
            engine.start()?;
            let loss0 = engine.heldout_loss();
            say!("round 0: held-out loss {loss0:.4} (before training)");
            RunState {
                round: 0,
                adapter: blobs.put_bytes(&engine.adapter_bytes()?)?,
                outer_state: None,
                heldout_loss: vec![loss0],
                checkpoints: Vec::new(),
                epoch: 1,
            }
        }
    };
    store.set_run(&run_state)?;
    let machine_cfg = cfg.machine_config(count_examples(&cfg.data)?);
    let round = Round(run_state.round);
    let open_round = resume::open_round(
        &snapshot,
        round,
        run_state.adapter,
        &machine_cfg,
        &cfg,
        &layout,
        &blobs,
    )?;
    let (machine, due) = RoundMachine::resume(
        machine_cfg,
        round,
        run_state.adapter,
        open_round.accepted,
        open_round
            .live
            .iter()
            .map(|(g, peer)| (g.lease, peer.clone(), g.shard, g.expires_at_ms))
            .collect(),
        (run_state.epoch as u64) << 32 | 1,
    );

    let checkpoints_dir = cfg.data_dir.join("checkpoints");
    for c in &run_state.checkpoints {
        register_checkpoint_files(&mut blobs, &checkpoints_dir, c)?;
    }
    let mut status = Status {
        run: cfg.run.clone(),
        peer_id: local_peer.to_string(),
        rounds_total: cfg.rounds,
        round: run_state.round,
        rounds_completed: run_state.round,
        shards: cfg.round.shards as u64,
        quorum: cfg.quorum() as u64,
        heldout_loss: run_state.heldout_loss.clone(),
        checkpoints: run_state.checkpoints.clone(),
        ..Status::default()
    };
    let v = &cfg.verify;
    let mut reputation = Reputation::new(
        ReputationConfig {
            replay_new: v.replay_new,
            replay_trusted: v.replay_trusted,
            trusted_after: v.trusted_after,
            ban_after: v.ban_after,
        },
        cfg.seed,
    );
    let mut structure = StructureState::default();
    let mut peers = HashMap::new();
    let decided = resume::replay_verdicts(
        &snapshot.verdicts,
        &mut reputation,
        &mut structure,
        &mut status,
        &mut peers,
        layout.numel() as u64 * 4,
    );
    let (status_tx, status_rx) = watch::channel(status);
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http: Option<JoinHandle<std::io::Result<()>>> = match cfg.http_addr() {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding HTTP on {addr}"))?;
            say!("http: http://{}", listener.local_addr()?);
            let app = crate::http::router(status_rx, checkpoints_dir.clone());
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = http_stop_rx.await;
                    })
                    .await
            }))
        }
        None => {
            say!("http: off (checkpoints are served over libp2p only)");
            None
        }
    };
    let verdicts = VerdictLog::open(&cfg.data_dir.join("verdicts.jsonl"))?;
    let leases = open_round
        .live
        .iter()
        .map(|(g, _)| (g.lease, lease_for(&cfg, &assets, g)))
        .collect();
    let mut shell = Shell {
        cfg,
        assets,
        layout,
        machine,
        blobs,
        engine: Some(engine),
        waiting_aggregation: None,
        engine_task: None,
        deltas: open_round.deltas,
        leases,
        pending: HashMap::new(),
        queue: VecDeque::new(),
        structure,
        reputation,
        verdicts,
        store,
        run_state,
        decided,
        identity,
        status_tx,
        checkpoints_dir,
        peers,
        finished_at: None,
        topic,
        served: mpsc::unbounded_channel(),
    };
    // A round that reached quorum before a stop aggregates now; a finished run says so.
    shell.perform(&mut swarm, due);
    let result = shell.run(&mut swarm, shutdown).await;
    let _ = http_stop_tx.send(());
    if let Some(http) = http {
        http.await.context("HTTP task")??;
    }
    result?;
    let summary = shell.write_summary()?;
    say!("summary: {}", summary.display());
    Ok(())
}

/// Registers checkpoint `c`'s files in the blob store (in place), so peers can fetch them by
/// the hashes its manifest lists.
fn register_checkpoint_files(
    blobs: &mut BlobStore,
    checkpoints_dir: &std::path::Path,
    c: &Checkpoint,
) -> Result<()> {
    let dir = checkpoints_dir.join(&c.id);
    for f in &c.files {
        let id = blobs.put_file(&dir.join(&f.name))?;
        anyhow::ensure!(
            id.to_hex() == f.blake3,
            "checkpoint {}: {} does not match the hash it was published with",
            c.id,
            f.name
        );
    }
    Ok(())
}

/// Work the engine does in `spawn_blocking`; the engine comes back with the result.
enum EngineDone {
    Verified(LeaseId, Box<VerifyOutcome>),
    Aggregated(Round, Result<RoundResult>),
}

type EngineTask = JoinHandle<(Engine, EngineDone)>;

/// A submission that passed the cheap layers, waiting for the tensor layers, with the
/// channel its verdict goes back on.
struct Pending {
    channel: ResponseChannel<RpcResponse>,
    /// The payload as it arrived: what is stored if it is accepted.
    payload: Vec<u8>,
    checked: Checked,
    facts: SubmissionFacts,
    claimed_drop: f64,
    replay: bool,
    detail: VerifyDetail,
}

/// What the verdict log records of a submission.
#[derive(Clone, Default)]
struct SubmissionFacts {
    round: u64,
    shard: u32,
    payload_hash: Option<String>,
    payload_bytes: u64,
    tokens: u64,
    norm: Option<f64>,
    /// Tokens per second from the lease's grant to this submission.
    tokens_per_second: Option<f64>,
}

struct Shell {
    cfg: RunConfig,
    assets: RunAssets,
    layout: DeltaLayout,
    machine: RoundMachine,
    blobs: BlobStore,
    /// `None` while a task owns it.
    engine: Option<Engine>,
    /// A closed round's deltas, waiting for the engine to come back from a verification.
    waiting_aggregation: Option<(Round, Vec<(Delta, u64)>)>,
    engine_task: Option<EngineTask>,
    /// Accepted deltas of the current round, with their token weights.
    deltas: HashMap<LeaseId, (Delta, u64)>,
    /// Leases granted and not yet decided, as sent (replays need them).
    leases: HashMap<LeaseId, Lease>,
    pending: HashMap<LeaseId, Pending>,
    /// Verifications waiting for the engine, in arrival order.
    queue: VecDeque<LeaseId>,
    structure: StructureState,
    reputation: Reputation,
    verdicts: VerdictLog,
    /// The durable state: every grant, verdict and accepted delta is committed here first.
    store: Store,
    /// Where the run is, as last committed.
    run_state: RunState,
    /// Decided submissions by lease: a resubmission of the same payload gets the same answer.
    decided: HashMap<LeaseId, Decided>,
    /// The coordinator's key: signs checkpoint manifests.
    identity: libp2p::identity::Keypair,
    status_tx: watch::Sender<Status>,
    checkpoints_dir: std::path::PathBuf,
    peers: HashMap<PeerId, PeerStatus>,
    finished_at: Option<tokio::time::Instant>,
    topic: gossipsub::IdentTopic,
    /// Blob groups read off the loop, on their way back to be sent: reading and hashing a MiB
    /// on the loop would hold up leases and submissions meanwhile.
    served: (
        mpsc::UnboundedSender<ServedBlob>,
        mpsc::UnboundedReceiver<ServedBlob>,
    ),
}

/// A blob request's channel and its answer.
type ServedBlob = (ResponseChannel<BlobResponse>, BlobResponse);

impl Shell {
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
                    let actions = self.machine.handle(Event::Tick, now_ms());
                    self.perform(swarm, actions);
                    if let Some(at) = self.finished_at
                        && !self.cfg.serve_after_finish
                        && at.elapsed() >= LINGER_AFTER_FINISH
                    {
                        return Ok(());
                    }
                }
                joined = async { self.engine_task.as_mut().expect("guarded").await }, if self.engine_task.is_some() => {
                    self.engine_task = None;
                    let (engine, done) = joined.context("engine task panicked")?;
                    self.engine = Some(engine);
                    match done {
                        EngineDone::Verified(lease, outcome) => self.on_verified(swarm, lease, *outcome),
                        EngineDone::Aggregated(round, result) => self.on_round_result(swarm, round, result?)?,
                    }
                    self.start_aggregation();
                    self.start_verification(swarm);
                }
                Some((channel, response)) = self.served.1.recv() => {
                    self.send_blob(swarm, channel, response)
                }
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    return Ok(());
                }
            }
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
                let p = self.peers.entry(peer_id).or_insert_with(|| PeerStatus {
                    peer: peer_id.to_string(),
                    ..Default::default()
                });
                p.connected = true;
                p.last_seen_ms = now_ms();
                self.publish_status();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.connected = false;
                    p.last_seen_ms = now_ms();
                }
                self.publish_status();
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
            })) => match self.blobs.answer(&request) {
                Answer::Ready(response) => self.send_blob(swarm, channel, response),
                Answer::Read(group) => {
                    let served = self.served.0.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = served.send((channel, Answer::Read(group).finish()));
                    });
                }
            },
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

    fn on_rpc(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request: RpcRequest,
        channel: ResponseChannel<RpcResponse>,
    ) {
        let key = peer.to_string();
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_seen_ms = now_ms();
        }
        let event = match request {
            RpcRequest::Lease(req) => {
                let refused = if req.version != PROTOCOL_VERSION {
                    tracing::warn!(%peer, version = req.version, "refused a node speaking another protocol version");
                    Some(format!(
                        "protocol version {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
                        req.version
                    ))
                } else {
                    self.reputation
                        .banned(&key)
                        .map(|why| format!("this node is banned from the run: {why}"))
                };
                if let Some(reason) = refused {
                    let _ = swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, RpcResponse::Refused { reason });
                    return;
                }
                let p = self.peers.entry(peer).or_default();
                p.peer = key.clone();
                p.device = req.device.chars().take(MAX_TEXT_BYTES).collect();
                Event::LeaseRequested { peer: key }
            }
            RpcRequest::Return { lease } => Event::Returned { peer: key, lease },
            RpcRequest::Submit(sub) => return self.on_submission(swarm, peer, *sub, channel),
            RpcRequest::Published { checkpoint } => {
                let response = match self.published(checkpoint.as_deref()) {
                    Some(published) => RpcResponse::Published(Box::new(published)),
                    None => RpcResponse::Refused {
                        reason: format!(
                            "run `{}` has no checkpoint {:?}",
                            self.cfg.run,
                            checkpoint.unwrap_or_default()
                        ),
                    },
                };
                let _ = swarm.behaviour_mut().rpc.send_response(channel, response);
                return;
            }
        };
        let actions = self.machine.handle(event, now_ms());
        let mut channel = Some(channel);
        let mut rest = Vec::new();
        for action in actions {
            let response = match &action {
                Action::Grant { grant, peer } => {
                    let record = LeaseRecord {
                        peer: peer.clone(),
                        round: grant.round.0,
                        shard: grant.shard.0,
                        expires_at_ms: grant.expires_at_ms,
                    };
                    match self.store.record_lease(grant.lease.0, &record) {
                        Ok(()) => {
                            let lease = lease_for(&self.cfg, &self.assets, grant);
                            self.leases.insert(lease.id, lease.clone());
                            self.status_tx.send_modify(|s| s.leases_granted += 1);
                            Some(RpcResponse::Lease(Box::new(lease)))
                        }
                        Err(e) => {
                            // Not answering: the node asks again, and the lease expires here.
                            tracing::error!(error = %e, "cannot record a lease; not answering");
                            None
                        }
                    }
                }
                Action::NoWork {
                    retry_after_ms,
                    finished,
                    reason,
                    ..
                } => Some(RpcResponse::NoWork {
                    retry_after_ms: *retry_after_ms,
                    finished: *finished,
                    reason: reason.clone(),
                }),
                Action::Returned {
                    lease, released, ..
                } => {
                    if *released {
                        tracing::info!(%lease, "lease returned; its shard goes to the next node that asks");
                    }
                    Some(RpcResponse::Returned)
                }
                _ => None,
            };
            match (response, channel.take()) {
                (Some(r), Some(ch)) => {
                    let _ = swarm.behaviour_mut().rpc.send_response(ch, r);
                }
                (None, ch) => {
                    channel = ch;
                    rest.push(action);
                }
                (Some(_), None) => unreachable!("the machine answers each request once"),
            }
        }
        self.perform(swarm, rest);
        self.publish_status(); // a grant or return changed the leases even without other actions
    }

    /// The cheap layers here, the lease rules in the machine; what passes both waits for the
    /// engine. Everything else is answered at once.
    fn on_submission(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        sub: Submission,
        channel: ResponseChannel<RpcResponse>,
    ) {
        let key = peer.to_string();
        let received = sub.payload.len() as u64;
        self.status_tx.send_modify(|s| s.bytes_received += received);
        let tokens = sub.tokens.min(self.max_tokens_per_shard());
        let mut facts = SubmissionFacts {
            round: sub.round.0,
            shard: sub.shard.0,
            payload_hash: Some(sub.payload_hash.to_hex()),
            payload_bytes: sub.payload.len() as u64,
            tokens,
            norm: None,
            tokens_per_second: self.leases.get(&sub.lease).and_then(|l| {
                let granted = l.expires_at_ms as f64 - self.cfg.round.lease_secs * 1000.0;
                let secs = (now_ms() as f64 - granted) / 1000.0;
                (secs > 0.0).then(|| tokens as f64 / secs)
            }),
        };
        // The same submission again (its answer was lost, or the coordinator restarted
        // meanwhile): the same verdict, counted once.
        if let Some(d) = self.decided.get(&sub.lease)
            && d.is_resubmission(&key, &sub.payload_hash)
        {
            let answer = RpcResponse::Verdict(d.verdict.clone());
            let _ = swarm.behaviour_mut().rpc.send_response(channel, answer);
            return;
        }
        if let Some(why) = self.reputation.banned(&key) {
            let verdict = Verdict::Rejected(RejectReason::Banned(why.to_string()));
            self.decide(swarm, &key, sub.lease, verdict, Some((channel, facts)));
            return;
        }
        let checked = envelope::check(&self.cfg.run, &peer, &sub).and_then(|()| {
            // An unknown lease fails the lease rules first; its seed does not matter.
            let seed = self.leases.get(&sub.lease).map_or(0, |l| l.seed);
            self.structure.check(
                (sub.round, sub.shard),
                seed,
                sub.payload_hash,
                &sub.payload,
                &self.layout,
                self.cfg.round.codec,
                self.cfg.verify.norm_multiple,
            )
        });
        let event = Event::Submitted {
            peer: key.clone(),
            lease: sub.lease,
            round: sub.round,
            shard: sub.shard,
            base_adapter: sub.base_adapter,
            tokens,
            checked: checked.as_ref().map(|_| ()).map_err(Clone::clone),
        };
        let actions = self.machine.handle(event, now_ms());
        let mut payload = sub.payload;
        let mut answer = Some((channel, facts.clone()));
        let mut checked = checked.ok();
        let mut rest = Vec::new();
        for action in actions {
            match action {
                Action::Verify { lease, .. } => {
                    let (channel, _) = answer.take().expect("one answer per request");
                    let checked = checked.take().expect("verification follows passed checks");
                    facts.norm = Some(checked.norm);
                    self.pending.insert(
                        lease,
                        Pending {
                            channel,
                            payload: std::mem::take(&mut payload),
                            checked,
                            facts: facts.clone(),
                            claimed_drop: sub.loss_before - sub.loss_after,
                            replay: self.reputation.should_replay(&key, lease),
                            detail: VerifyDetail::default(),
                        },
                    );
                    self.queue.push_back(lease);
                }
                Action::Verdict { lease, verdict, .. } => {
                    self.decide(swarm, &key, lease, verdict, answer.take());
                }
                other => rest.push(other),
            }
        }
        self.perform(swarm, rest);
        self.start_verification(swarm);
    }

    /// Hands the next queued verification to the engine, if it is free. Submissions whose
    /// round closed while they waited are answered without tensor work.
    fn start_verification(&mut self, swarm: &mut Swarm<Behaviour>) {
        while self.engine_task.is_none() {
            let Some(lease) = self.queue.pop_front() else {
                return;
            };
            let (Some(p), Some(lease_msg)) = (self.pending.get(&lease), self.leases.get(&lease))
            else {
                continue; // decided meanwhile (its peer was banned)
            };
            if lease_msg.round != self.machine.round() {
                let stale = Err(RejectReason::StaleRound);
                let actions = self.machine.handle(
                    Event::Verified {
                        lease,
                        result: stale,
                    },
                    now_ms(),
                );
                self.perform(swarm, actions);
                continue;
            }
            let v = &self.cfg.verify;
            let job = VerifyJob {
                lease: lease_msg.clone(),
                delta: p.checked.decoded.delta.clone(),
                sketch: p.checked.decoded.sketch.clone(),
                claimed_drop: p.claimed_drop,
                replay: p.replay,
                effect_samples: v.effect_samples,
                effect: EffectConfig {
                    scale: self.cfg.round.outer_lr / self.cfg.quorum() as f64,
                    min_fraction: v.effect_min_fraction,
                    shard_max_rise: v.shard_max_rise,
                    heldout_max_rise: v.heldout_max_rise,
                },
                tolerance: ReplayTolerance {
                    min_cosine: v.replay_min_cosine,
                    max_rel_error: v.replay_max_rel_error,
                },
            };
            let engine = self
                .engine
                .take()
                .expect("the engine is free when no task runs");
            self.engine_task = Some(tokio::task::spawn_blocking(move || {
                let outcome = engine.verify(&job);
                (engine, EngineDone::Verified(lease, Box::new(outcome)))
            }));
        }
    }

    fn on_verified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        lease: LeaseId,
        outcome: VerifyOutcome,
    ) {
        if let Some(p) = self.pending.get_mut(&lease) {
            p.detail = outcome.detail;
        }
        let actions = self.machine.handle(
            Event::Verified {
                lease,
                result: outcome.result,
            },
            now_ms(),
        );
        self.perform(swarm, actions);
    }

    /// Records a verdict durably, updates the peer's standing, then answers the node: on
    /// `answer` for a request decided at once, or on the channel of its pending verification.
    /// An accepted delta's payload goes to the blob store and its record into the same
    /// transaction as the verdict, before the node hears "accepted".
    fn decide(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        key: &str,
        lease: LeaseId,
        verdict: Verdict,
        answer: Option<(ResponseChannel<RpcResponse>, SubmissionFacts)>,
    ) {
        let (channel, facts, detail, checked) = match self.pending.remove(&lease) {
            Some(p) => (
                Some(p.channel),
                p.facts,
                p.detail,
                Some((p.checked.decoded.delta, p.checked.norm, p.payload)),
            ),
            None => match answer {
                Some((channel, facts)) => (Some(channel), facts, VerifyDetail::default(), None),
                None => return, // nobody is waiting and nothing was checked: nothing to record
            },
        };
        if resume::decides_lease(&verdict) {
            // Not for another peer's stray submission: the lease's own is still to come.
            self.leases.remove(&lease);
        }
        let record = VerdictRecord {
            time_ms: now_ms(),
            peer: key.to_string(),
            lease: lease.0,
            round: facts.round,
            shard: facts.shard,
            verdict: match &verdict {
                Verdict::Accepted => "accepted".into(),
                Verdict::Rejected(r) => r.label().into(),
            },
            reason: match &verdict {
                Verdict::Accepted => String::new(),
                Verdict::Rejected(r) => r.to_string(),
            },
            outcome: verdict.clone(),
            payload_hash: facts.payload_hash.clone(),
            payload_bytes: facts.payload_bytes,
            tokens: facts.tokens,
            norm: facts.norm,
            effect: detail.effect.clone(),
            replay: detail.replay,
            verify_seconds: detail.effect_seconds,
            replay_seconds: detail.replay_seconds,
        };
        let accepted = match (&verdict, checked) {
            (Verdict::Accepted, Some((delta, norm, payload))) => Some((delta, norm, payload)),
            _ => None,
        };
        if let Err(e) = self.record(
            &record,
            accepted.as_ref().map(|(_, n, p)| (*n, p.as_slice())),
        ) {
            // Without a durable record the verdict is not given: the node's request times out,
            // it submits again or its lease is reissued.
            tracing::error!(error = %e, "cannot record a verdict; not answering");
            return;
        }
        if let Err(e) = self.verdicts.append(&record) {
            tracing::warn!(error = %e, "cannot append to verdicts.jsonl (the store has the verdict)");
        }
        let replayed = detail.replay.is_some();
        let round = self.machine.round().0;
        let dense = accepted
            .as_ref()
            .map_or(0, |(d, _, _)| d.dense_fp32_bytes());
        self.status_tx.send_modify(|s| s.tally(&record, dense));
        if let Ok(id) = key.parse::<PeerId>() {
            self.peers
                .entry(id)
                .or_insert_with(|| PeerStatus {
                    peer: key.to_string(),
                    ..Default::default()
                })
                .tally(&record);
            if let (Verdict::Accepted, Some(rate), Some(p)) =
                (&verdict, facts.tokens_per_second, self.peers.get_mut(&id))
            {
                p.tokens_per_second = rate;
            }
        }
        match &verdict {
            Verdict::Accepted => {
                tracing::info!(peer = key, %lease, round, tokens = facts.tokens, replayed, "accepted delta");
                if let Some((delta, norm, _)) = accepted {
                    self.structure.accepted(norm);
                    self.deltas.insert(lease, (delta, facts.tokens));
                }
            }
            Verdict::Rejected(reason) => {
                tracing::warn!(peer = key, %lease, round, reason = %reason, "rejected submission");
            }
        }
        if resume::decides_lease(&verdict) {
            self.decided.entry(lease).or_insert_with(|| Decided {
                peer: key.to_string(),
                payload_hash: facts.payload_hash,
                verdict: verdict.clone(),
            });
        }
        let banned = self.reputation.record(key, &verdict, replayed);
        if let Some(ch) = channel {
            let _ = swarm
                .behaviour_mut()
                .rpc
                .send_response(ch, RpcResponse::Verdict(verdict));
        }
        if let Some(why) = banned {
            tracing::warn!(peer = key, reason = %why, "peer banned");
            let actions = self.machine.handle(
                Event::Banned {
                    peer: key.to_string(),
                    reason: why,
                },
                now_ms(),
            );
            self.perform(swarm, actions);
        }
        self.publish_status();
    }

    /// Commits `record` (and an accepted delta: its norm and payload) to the store.
    fn record(&mut self, record: &VerdictRecord, accepted: Option<(f64, &[u8])>) -> Result<()> {
        let accepted = match accepted {
            Some((norm, payload)) => Some(AcceptedRecord {
                lease: record.lease,
                peer: record.peer.clone(),
                round: record.round,
                shard: record.shard,
                payload: self.blobs.put_bytes(payload)?,
                tokens: record.tokens,
                norm,
            }),
            None => None,
        };
        self.store.record_verdict(record, accepted.as_ref())
    }

    /// The most tokens one shard can hold; claims above it are cut to it.
    fn max_tokens_per_shard(&self) -> u64 {
        let r = &self.cfg.round;
        r.inner_steps as u64 * r.batch_size as u64 * r.max_seq_len as u64
    }

    /// Hands the closed round's deltas to the engine if one is waiting and the engine is free.
    fn start_aggregation(&mut self) {
        if self.engine.is_none() {
            return;
        }
        let Some((round, deltas)) = self.waiting_aggregation.take() else {
            return;
        };
        let mut engine = self.engine.take().expect("checked above");
        let dir = (round.0 + 1 == self.cfg.rounds
            || (round.0 + 1) % self.cfg.checkpoint_every() == 0)
            .then(|| self.checkpoints_dir.clone());
        tracing::info!(round = round.0, deltas = deltas.len(), "aggregating");
        self.engine_task = Some(tokio::task::spawn_blocking(move || {
            let result = engine.finish_round(&deltas, round.0 + 1, dir.as_deref());
            (engine, EngineDone::Aggregated(round, result))
        }));
    }

    /// Side effects of actions that answer no request.
    fn perform(&mut self, swarm: &mut Swarm<Behaviour>, actions: Vec<Action>) {
        if actions.is_empty() {
            return; // most ticks: nothing changed, nothing to republish
        }
        for action in actions {
            match action {
                Action::LeaseExpired { peer, lease, shard } => {
                    tracing::warn!(%peer, %lease, %shard, "lease expired; shard reissued");
                }
                Action::DeadlinePassed {
                    round,
                    accepted,
                    waited_ms,
                } => {
                    tracing::warn!(
                        round = round.0,
                        accepted,
                        waited_ms,
                        "straggler deadline: closing the round without full quorum; later deltas for it are stale"
                    );
                }
                Action::Verdict {
                    peer,
                    lease,
                    verdict,
                } => self.decide(swarm, &peer, lease, verdict, None),
                Action::Excluded {
                    peer,
                    lease,
                    round,
                    shard,
                } => {
                    tracing::warn!(%peer, %lease, "accepted delta excluded: its peer was banned");
                    if let Err(e) = self.store.exclude(round.0, shard.0) {
                        tracing::error!(error = %e, "cannot record an exclusion");
                    }
                    self.deltas.remove(&lease);
                }
                Action::Aggregate { round, accepted } => {
                    let deltas: Vec<(Delta, u64)> = accepted
                        .iter()
                        .filter_map(|a| self.deltas.remove(&a.lease))
                        .collect();
                    self.deltas.clear();
                    // A round closed by its deadline may find the engine verifying: then the
                    // aggregation starts when it comes back.
                    self.waiting_aggregation = Some((round, deltas));
                    self.start_aggregation();
                }
                Action::RoundOpened { round, adapter } => {
                    // Leases of closed rounds are only needed while their verdict is pending.
                    let pending = &self.pending;
                    self.leases
                        .retain(|id, l| l.round == round || pending.contains_key(id));
                    self.announce(swarm, round, adapter);
                }
                Action::Finished { rounds } => {
                    say!("run finished after {rounds} rounds");
                    // The last checkpoint has no round opening after it to travel with.
                    self.announce(swarm, Round(rounds), self.run_state.adapter);
                    self.finished_at = Some(tokio::time::Instant::now());
                    self.status_tx.send_modify(|s| s.finished = true);
                }
                _ => {}
            }
        }
        self.publish_status();
    }

    /// Tells subscribed nodes about round `round` and the latest checkpoint (which nodes
    /// fetch and then serve to downloaders).
    fn announce(
        &self,
        swarm: &mut Swarm<Behaviour>,
        round: Round,
        adapter: herd_protocol::ContentId,
    ) {
        let ann = RoundAnnouncement {
            run: self.cfg.run.clone(),
            round,
            adapter,
            checkpoint: self.latest_checkpoint(),
        };
        if let Ok(bytes) = herd_protocol::framing::encode(&ann) {
            // No subscribers yet is fine: nodes also learn rounds from their leases.
            let _ = swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.topic.clone(), bytes);
        }
    }

    /// The newest checkpoint as peers fetch it: every file of its dir by content id.
    fn latest_checkpoint(&self) -> Option<CheckpointRef> {
        self.checkpoint_ref(self.run_state.checkpoints.last()?)
    }

    fn checkpoint_ref(&self, c: &Checkpoint) -> Option<CheckpointRef> {
        let files = c
            .files
            .iter()
            .map(|f| {
                Some(NamedBlob {
                    name: f.name.clone(),
                    id: f.blake3.parse().ok()?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(CheckpointRef {
            name: c.id.clone(),
            round: c.round,
            files,
        })
    }

    /// What `herd-node pull` asks first: the base model's files and checkpoint `name` (the
    /// latest if `None`); `None` if there is no such checkpoint.
    fn published(&self, name: Option<&str>) -> Option<Published> {
        let checkpoint = match name {
            None => self.latest_checkpoint(),
            Some(name) => Some(
                self.run_state
                    .checkpoints
                    .iter()
                    .find(|c| c.id == name)
                    .and_then(|c| self.checkpoint_ref(c))?,
            ),
        };
        Some(Published {
            run: self.cfg.run.clone(),
            base_model: vec![
                NamedBlob {
                    name: "config.json".into(),
                    id: self.assets.config,
                },
                NamedBlob {
                    name: "model.safetensors".into(),
                    id: self.assets.weights,
                },
                NamedBlob {
                    name: "tokenizer.json".into(),
                    id: self.assets.tokenizer,
                },
            ],
            checkpoint,
        })
    }

    fn on_round_result(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        round: Round,
        result: RoundResult,
    ) -> Result<()> {
        let adapter = self.blobs.put_bytes(&result.adapter_bytes)?;
        let outer_state = self.blobs.put_bytes(&result.outer_state)?;
        let mut next = self.run_state.clone();
        next.round = round.0 + 1;
        next.adapter = adapter;
        next.outer_state = Some(outer_state);
        next.heldout_loss.push(result.heldout_loss);
        let mut checkpoint = result.checkpoint.clone();
        if let Some(c) = checkpoint.as_mut() {
            self.write_manifest(c)?;
            register_checkpoint_files(&mut self.blobs, &self.checkpoints_dir, c)?;
        }
        next.checkpoints.extend(checkpoint.clone());
        // Committed before the round opens: a stop from here on resumes at the next round.
        self.store.set_run(&next)?;
        self.run_state = next;
        say!(
            "round {}: held-out loss {:.4}",
            round.0 + 1,
            result.heldout_loss
        );
        self.status_tx.send_modify(|s| {
            s.heldout_loss.push(result.heldout_loss);
            s.rounds_completed = round.0 + 1;
            if let Some(c) = checkpoint {
                s.checkpoints.push(c);
            }
        });
        let actions = self
            .machine
            .handle(Event::Aggregated { round, adapter }, now_ms());
        self.perform(swarm, actions);
        Ok(())
    }

    /// Signs what checkpoint `c` is built from into its dir (`manifest.json`, see
    /// `herd_protocol::manifest`) and lists the two files with the checkpoint's.
    fn write_manifest(&self, c: &mut Checkpoint) -> Result<()> {
        let dir = self.checkpoints_dir.join(&c.id);
        let parent = self.run_state.checkpoints.last();
        let parent_manifest = parent
            .map(|p| {
                p.files
                    .iter()
                    .find(|f| f.name == manifest::MANIFEST_FILE)
                    .map(|f| manifest::Parent {
                        checkpoint: p.id.clone(),
                        manifest_blake3: f.blake3.clone(),
                    })
                    .with_context(|| format!("checkpoint {} lists no manifest", p.id))
            })
            .transpose()?;
        let from = parent.map_or(0, |p| p.round);
        let accepted = self.store.accepted_between(from, c.round)?;
        let mut round_tokens: HashMap<u64, u64> = HashMap::new();
        for a in &accepted {
            *round_tokens.entry(a.round).or_default() += a.tokens;
        }
        let deltas = accepted
            .iter()
            .map(|a| manifest::ManifestDelta {
                round: a.round,
                shard: a.shard,
                peer: a.peer.clone(),
                lease: a.lease,
                payload_blake3: a.payload.to_hex(),
                tokens: a.tokens,
                weight: a.tokens as f64 / round_tokens[&a.round].max(1) as f64,
            })
            .collect();
        let m = manifest::Manifest {
            run: self.cfg.run.clone(),
            checkpoint: c.id.clone(),
            round: c.round,
            coordinator: self.identity.public().to_peer_id().to_string(),
            base_model: manifest::BaseModel {
                config: self.assets.config.to_hex(),
                weights: self.assets.weights.to_hex(),
                tokenizer: self.assets.tokenizer.to_hex(),
            },
            parent: parent_manifest,
            rounds: manifest::RoundSpan { from, to: c.round },
            deltas,
            files: c.files.clone(),
        };
        c.files.extend(m.write_signed(&dir, &self.identity)?);
        Ok(())
    }

    fn publish_status(&self) {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                standing: self.reputation.standing(&p.peer).label().to_string(),
                ..p.clone()
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        self.status_tx.send_modify(|s| {
            s.round = self.machine.round().0;
            s.accepted_this_round = self.machine.accepted_count() as u64;
            s.active_leases = self.machine.active_leases().len() as u64;
            s.peers = peers;
        });
    }

    fn write_summary(&self) -> Result<std::path::PathBuf> {
        let s = self.status_tx.borrow().clone();
        let final_adapter = s
            .checkpoints
            .last()
            .map(|c| self.checkpoints_dir.join(&c.id));
        let per_delta = |bytes: u64| bytes as f64 / s.accepted_deltas.max(1) as f64;
        // A replay runs the node's training code on the same shard, so the mean replay time
        // is the training compute of one shard on this machine.
        let shard_seconds = s.replay_seconds / s.replays.max(1) as f64;
        let training_seconds = shard_seconds * s.accepted_deltas as f64;
        let summary = json!({
            "run": s.run,
            "rounds_completed": s.rounds_completed,
            "heldout_loss": s.heldout_loss,
            "base_model": self.cfg.base_model,
            "final_adapter": final_adapter,
            "bytes_uploaded": s.bytes_uploaded,
            "bytes_dense_fp32": s.bytes_dense_fp32,
            "compression": {
                "codec": self.cfg.round.codec.to_string(),
                "accepted_deltas": s.accepted_deltas,
                "bytes_per_delta": per_delta(s.bytes_uploaded),
                "dense_fp32_bytes_per_delta": per_delta(s.bytes_dense_fp32),
                "ratio": s.bytes_dense_fp32 as f64 / s.bytes_uploaded.max(1) as f64,
            },
            "verification": {
                "replays": s.replays,
                "replay_seconds": s.replay_seconds,
                "effect_seconds": s.verify_seconds,
                "cost_vs_training": if s.replays > 0 {
                    (s.replay_seconds + s.verify_seconds) / training_seconds
                } else {
                    f64::NAN
                },
                "rejects_by_reason": s.rejects_by_reason,
            },
            "peers": s.peers,
            "checkpoints": s.checkpoints,
        });
        let path = self.cfg.data_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
        Ok(path)
    }
}
