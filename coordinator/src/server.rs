//! The I/O shell around the round machine: libp2p (leases, submissions, blobs, announcements),
//! the HTTP server, the blob store, and the engine doing tensor work off the async runtime.
//!
//! Shutdown order: the swarm loop ends (finished run, or Ctrl-C), then the HTTP server is told
//! to stop and awaited, then `summary.json` is written.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures::StreamExt;
use herd_protocol::delta::{Delta, DeltaLayout};
use herd_protocol::messages::*;
use herd_protocol::net::{Behaviour, BehaviourEvent, Role, build_swarm, load_or_create_identity};
use herd_protocol::signing::submission_bytes;
use herd_protocol::{ContentId, LeaseId, Round};
use libp2p::identity::PublicKey;
use libp2p::request_response::{self, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::blobs::BlobStore;
use crate::config::RunConfig;
use crate::engine::{Engine, RoundResult, count_examples, lora_spec};
use crate::round::{Action, Event, MachineConfig, RoundMachine};
use crate::status::{PeerStatus, RejectRecord, Status};

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
const RECENT_REJECTS: usize = 50;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the coordinator until the run finishes (and, with `serve_after_finish`, until
/// `shutdown` resolves) or `shutdown` resolves.
pub async fn serve(cfg: RunConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let keypair = load_or_create_identity(&cfg.data_dir.join("identity.key"))?;
    let local_peer = keypair.public().to_peer_id();
    let mut swarm = build_swarm(keypair, Role::Coordinator)?;
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
    let engine = Engine::new(&cfg)?;
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
    let adapter = blobs.put_bytes(&engine.adapter_bytes()?)?;
    let loss0 = engine.heldout_loss()?;
    say!("round 0: held-out loss {loss0:.4} (before training)");
    let data_len = count_examples(&cfg.data)?;
    let samples_per_shard = cfg
        .round
        .samples_per_shard
        .unwrap_or((data_len / cfg.round.shards as u64).max(1));
    let machine = RoundMachine::new(
        MachineConfig {
            shards: cfg.round.shards,
            quorum: cfg.quorum(),
            lease_ms: (cfg.round.lease_secs * 1000.0) as u64,
            rounds: cfg.rounds,
            data_len,
            samples_per_shard,
            seed: cfg.seed,
        },
        adapter,
    );

    let checkpoints_dir = cfg.data_dir.join("checkpoints");
    let (status_tx, status_rx) = watch::channel(Status {
        run: cfg.run.clone(),
        peer_id: local_peer.to_string(),
        rounds_total: cfg.rounds,
        heldout_loss: vec![loss0],
        ..Status::default()
    });
    let listener = tokio::net::TcpListener::bind(&cfg.http)
        .await
        .with_context(|| format!("binding HTTP on {}", cfg.http))?;
    say!("http: http://{}", listener.local_addr()?);
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = crate::http::router(status_rx, checkpoints_dir.clone());
    let http: JoinHandle<std::io::Result<()>> = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stop_rx.await;
            })
            .await
    });

    let mut shell = Shell {
        cfg,
        assets,
        layout,
        machine,
        blobs,
        engine: Some(engine),
        aggregation: None,
        deltas: HashMap::new(),
        status_tx,
        checkpoints_dir,
        peers: HashMap::new(),
        finished_at: None,
        topic,
    };
    let result = shell.run(&mut swarm, shutdown).await;
    let _ = http_stop_tx.send(());
    http.await.context("HTTP task")??;
    result?;
    let summary = shell.write_summary()?;
    say!("summary: {}", summary.display());
    Ok(())
}

/// The pieces of an aggregation running in `spawn_blocking`: the engine comes back with it.
type AggregationTask = JoinHandle<(Engine, Round, Result<RoundResult>)>;

struct Shell {
    cfg: RunConfig,
    assets: RunAssets,
    layout: DeltaLayout,
    machine: RoundMachine,
    blobs: BlobStore,
    /// `None` while an aggregation owns it.
    engine: Option<Engine>,
    aggregation: Option<AggregationTask>,
    /// Accepted deltas of the current round, with their token weights.
    deltas: HashMap<LeaseId, (Delta, u64)>,
    status_tx: watch::Sender<Status>,
    checkpoints_dir: std::path::PathBuf,
    peers: HashMap<PeerId, PeerStatus>,
    finished_at: Option<tokio::time::Instant>,
    topic: gossipsub::IdentTopic,
}

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
                joined = async { self.aggregation.as_mut().expect("guarded").await }, if self.aggregation.is_some() => {
                    self.aggregation = None;
                    let (engine, round, result) = joined.context("aggregation task panicked")?;
                    self.engine = Some(engine);
                    self.on_round_result(swarm, round, result?)?;
                }
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
                say!("listening: {address}/p2p/{}", swarm.local_peer_id());
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                let p = self.peers.entry(peer_id).or_insert_with(|| PeerStatus {
                    peer: peer_id.to_string(),
                    ..Default::default()
                });
                p.connected = true;
                self.publish_status();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if let Some(p) = self.peers.get_mut(&peer_id) {
                    p.connected = false;
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
            })) => {
                let response = match self.blobs.read_chunk(
                    &request.id,
                    request.offset,
                    request.len.min(BLOB_CHUNK_BYTES),
                ) {
                    Some(Ok((total, bytes))) => BlobResponse::Chunk { total, bytes },
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "reading a blob");
                        BlobResponse::NotFound
                    }
                    None => BlobResponse::NotFound,
                };
                let _ = swarm.behaviour_mut().blob.send_response(channel, response);
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

    fn on_rpc(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        request: RpcRequest,
        channel: ResponseChannel<RpcResponse>,
    ) {
        let key = peer.to_string();
        // A delta that passed the stateless checks; moved into the round's set if accepted.
        let (event, mut checked_delta) = match request {
            RpcRequest::Lease(req) => {
                if req.version != PROTOCOL_VERSION {
                    tracing::warn!(%peer, version = req.version, "refused a node speaking another protocol version");
                    let reason = format!(
                        "protocol version {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
                        req.version
                    );
                    let _ = swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, RpcResponse::Refused { reason });
                    return;
                }
                let p = self.peers.entry(peer).or_default();
                p.peer = key.clone();
                p.device = req.device.chars().take(MAX_TEXT_BYTES).collect();
                (Event::LeaseRequested { peer: key }, None)
            }
            RpcRequest::Return { lease } => (Event::Returned { peer: key, lease }, None),
            RpcRequest::Submit(sub) => {
                let checked = self.check_submission(&peer, &sub);
                let tokens = sub.tokens.min(self.max_tokens_per_shard());
                if let Ok(delta) = &checked {
                    self.status_tx.send_modify(|s| {
                        s.bytes_uploaded += sub.payload.len() as u64;
                        s.bytes_dense_fp32 += delta.dense_fp32_bytes();
                    });
                }
                let event = Event::Submitted {
                    peer: key,
                    lease: sub.lease,
                    round: sub.round,
                    shard: sub.shard,
                    base_adapter: sub.base_adapter,
                    tokens,
                    checked: checked.as_ref().map(|_| ()).map_err(Clone::clone),
                };
                (event, checked.ok().map(|d| (d, tokens)))
            }
        };
        let actions = self.machine.handle(event, now_ms());
        let mut channel = Some(channel);
        let mut rest = Vec::new();
        for action in actions {
            let response = match &action {
                Action::Grant { grant, .. } => {
                    Some(RpcResponse::Lease(Box::new(self.lease_message(grant))))
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
                Action::Verdict { lease, verdict, .. } => {
                    self.record_verdict(&peer, *lease, verdict, checked_delta.take());
                    Some(RpcResponse::Verdict(verdict.clone()))
                }
                Action::Returned { .. } => Some(RpcResponse::Returned),
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

    fn record_verdict(
        &mut self,
        peer: &PeerId,
        lease: LeaseId,
        verdict: &Verdict,
        accepted: Option<(Delta, u64)>,
    ) {
        let round = self.machine.round().0;
        let p = self.peers.entry(*peer).or_insert_with(|| PeerStatus {
            peer: peer.to_string(),
            ..Default::default()
        });
        match verdict {
            Verdict::Accepted => {
                let Some((delta, tokens)) = accepted else {
                    return;
                };
                p.accepted += 1;
                p.tokens += tokens;
                tracing::info!(%peer, %lease, round, tokens, "accepted delta");
                self.deltas.insert(lease, (delta, tokens));
            }
            Verdict::Rejected(reason) => {
                p.rejected += 1;
                tracing::warn!(%peer, %lease, round, reason = %reason, "rejected submission");
                self.status_tx.send_modify(|s| {
                    s.recent_rejects.push(RejectRecord {
                        peer: peer.to_string(),
                        round,
                        reason: reason.to_string(),
                    });
                    if s.recent_rejects.len() > RECENT_REJECTS {
                        s.recent_rejects.remove(0);
                    }
                });
            }
        }
        self.publish_status();
    }

    /// Stateless checks of a submission: signature by the sending peer's key, payload hash,
    /// and a payload that decodes to a delta of the run's layout.
    fn check_submission(&self, peer: &PeerId, sub: &Submission) -> Result<Delta, RejectReason> {
        if sub.run != self.cfg.run {
            return Err(RejectReason::LeaseMismatch);
        }
        let key = PublicKey::try_decode_protobuf(&sub.public_key)
            .map_err(|_| RejectReason::BadSignature)?;
        if key.to_peer_id() != *peer {
            return Err(RejectReason::BadSignature);
        }
        if ContentId::of(&sub.payload) != sub.payload_hash {
            return Err(RejectReason::PayloadHashMismatch);
        }
        let signed = submission_bytes(
            &sub.run,
            sub.round,
            sub.shard,
            &sub.base_adapter,
            &sub.payload_hash,
        );
        if !key.verify(&signed, &sub.signature) {
            return Err(RejectReason::BadSignature);
        }
        Delta::decode(&sub.payload, &self.layout)
            .map_err(|e| RejectReason::Malformed(e.to_string()))
    }

    /// The most tokens one shard can hold; claims above it are cut to it.
    fn max_tokens_per_shard(&self) -> u64 {
        let r = &self.cfg.round;
        r.inner_steps as u64 * r.batch_size as u64 * r.max_seq_len as u64
    }

    fn lease_message(&self, grant: &crate::round::Grant) -> Lease {
        let r = &self.cfg.round;
        Lease {
            id: grant.lease,
            run: self.cfg.run.clone(),
            round: grant.round,
            shard: grant.shard,
            ranges: grant.ranges.clone(),
            seed: grant.seed,
            inner_steps: r.inner_steps,
            lr: r.lr,
            batch_size: r.batch_size,
            max_seq_len: r.max_seq_len,
            expires_at_ms: grant.expires_at_ms,
            assets: self.assets.clone(),
            lora: lora_spec(&self.cfg),
            base_adapter: grant.base_adapter,
        }
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
                Action::Aggregate { round, accepted } => {
                    let deltas: Vec<(Delta, u64)> = accepted
                        .iter()
                        .filter_map(|a| self.deltas.remove(&a.lease))
                        .collect();
                    self.deltas.clear();
                    let mut engine = self.engine.take().expect("one aggregation at a time");
                    let dir = (round.0 + 1 == self.cfg.rounds
                        || (round.0 + 1) % self.cfg.checkpoint_every() == 0)
                        .then(|| self.checkpoints_dir.clone());
                    tracing::info!(round = round.0, deltas = deltas.len(), "aggregating");
                    self.aggregation = Some(tokio::task::spawn_blocking(move || {
                        let result = engine.finish_round(&deltas, round.0 + 1, dir.as_deref());
                        (engine, round, result)
                    }));
                }
                Action::RoundOpened { round, adapter } => {
                    let ann = RoundAnnouncement {
                        run: self.cfg.run.clone(),
                        round,
                        adapter,
                    };
                    if let Ok(bytes) = herd_protocol::framing::encode(&ann) {
                        // No subscribers yet is fine: nodes also learn rounds from their leases.
                        let _ = swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(self.topic.clone(), bytes);
                    }
                }
                Action::Finished { rounds } => {
                    say!("run finished after {rounds} rounds");
                    self.finished_at = Some(tokio::time::Instant::now());
                    self.status_tx.send_modify(|s| s.finished = true);
                }
                _ => {}
            }
        }
        self.publish_status();
    }

    fn on_round_result(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        round: Round,
        result: RoundResult,
    ) -> Result<()> {
        let adapter = self.blobs.put_bytes(&result.adapter_bytes)?;
        say!(
            "round {}: held-out loss {:.4}",
            round.0 + 1,
            result.heldout_loss
        );
        self.status_tx.send_modify(|s| {
            s.heldout_loss.push(result.heldout_loss);
            s.rounds_completed = round.0 + 1;
            if let Some(c) = result.checkpoint.clone() {
                s.checkpoints.push(c);
            }
        });
        let actions = self
            .machine
            .handle(Event::Aggregated { round, adapter }, now_ms());
        self.perform(swarm, actions);
        Ok(())
    }

    fn publish_status(&self) {
        let mut peers: Vec<PeerStatus> = self.peers.values().cloned().collect();
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
        let summary = json!({
            "run": s.run,
            "rounds_completed": s.rounds_completed,
            "heldout_loss": s.heldout_loss,
            "base_model": self.cfg.base_model,
            "final_adapter": final_adapter,
            "bytes_uploaded": s.bytes_uploaded,
            "bytes_dense_fp32": s.bytes_dense_fp32,
            "peers": s.peers,
            "checkpoints": s.checkpoints,
        });
        let path = self.cfg.data_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
        Ok(path)
    }
}
