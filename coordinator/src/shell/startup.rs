//! Opening a run, or picking it up where a stopped coordinator left it: identity and swarm,
//! the run's assets in the blob store, the engine on θ_r, the round machine and ledger from
//! the store, then the HTTP server; then the event loop until the run ends.

use std::sync::Arc;

use anyhow::{Context, Result};
use herd_protocol::Round;
use herd_protocol::blob_server::BlobServer;
use herd_protocol::blobs::BlobStore;
use herd_protocol::delta::DeltaLayout;
use herd_protocol::messages::{ANNOUNCE_TOPIC, RunAssets, now_ms};
use herd_protocol::net::{
    Behaviour, Limits, NetOptions, Role, build_swarm, listen_on_all, load_or_create_identity,
};
use libp2p::{Swarm, gossipsub};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::engine_slot::EngineSlot;
use super::rate_limit::RateLimits;
use super::submissions::Verifications;
use super::{Coordinator, PeerPresence, RoundOpened, say};
use crate::checkpoint::Publisher;
use crate::config::RunConfig;
use crate::engine::Engine;
use crate::lease::lease_for;
use crate::ledger::Ledger;
use crate::round::{Action, RoundMachine};
use crate::status::Status;
use crate::store::{RunState, Snapshot, Store, resume};
use crate::verify::log::VerdictLog;
use crate::verify::reputation::Reputation;

/// Runs the coordinator until the run finishes (and, with `serve_after_finish`, until
/// `shutdown` resolves) or `shutdown` resolves.
pub async fn serve(cfg: RunConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let keypair = load_or_create_identity(&cfg.data_dir.join("identity.key"))?;
    let topic = gossipsub::IdentTopic::new(ANNOUNCE_TOPIC);
    let (mut coordinator, due) = Coordinator::open(cfg, keypair.clone(), topic.clone())?;
    // Listening waits for the run's layout: it sets the largest submission taken.
    let mut swarm = listen(&coordinator.cfg, keypair, coordinator.layout.payload_cap())?;
    swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
    // The restored totals and credit, before anyone can ask.
    coordinator.publish_totals();
    coordinator.publish_status();
    coordinator.publish_peers();
    let http = HttpServer::start(&coordinator.cfg, &coordinator).await?;
    // A round that reached quorum before a stop aggregates now; a finished run says so.
    coordinator.carry_out(&mut swarm, due);
    let result = coordinator.run(&mut swarm, shutdown).await;
    if let Some(http) = http {
        http.stop().await?;
    }
    result?;
    let summary = coordinator.write_summary()?;
    say!("summary: {}", summary.display());
    Ok(())
}

impl Coordinator {
    /// A fresh run, or a stored one where it stopped: the engine on θ_r, the run's assets in
    /// the blob store, the round machine and the ledger from the store. Returns the actions due
    /// at once (an aggregation or the end of the run).
    fn open(
        cfg: RunConfig,
        identity: libp2p::identity::Keypair,
        topic: gossipsub::IdentTopic,
    ) -> Result<(Self, Vec<Action>)> {
        tracing::info!(model = %cfg.base_model.display(), "loading the base model");
        let mut engine = Engine::new(&cfg)?;
        let layout = engine.layout();
        let mut blobs = BlobStore::open(&cfg.data_dir.join("blobs"))?;
        let publisher = Publisher {
            dir: cfg.data_dir.join("checkpoints"),
            run: cfg.run.clone(),
            assets: put_assets(&cfg, &mut blobs)?,
            identity,
        };
        let store = Store::open(&cfg.data_dir.join("state.redb"))?;
        let snapshot = store.load()?;
        let run_state = match snapshot.run.clone() {
            Some(run) => resume_engine(&mut engine, &blobs, run)?,
            None => start_engine(&mut engine, &mut blobs)?,
        };
        store.set_run(&run_state)?;
        for c in &run_state.checkpoints {
            publisher.register(&mut blobs, c)?;
        }
        let (machine, due, open_round) =
            resume_round(&cfg, &snapshot, &run_state, &layout, &blobs)?;
        let ledger = Ledger::restore(
            reputation(&cfg),
            layout.numel() as u64 * 4,
            &snapshot.verdicts,
        )?;
        let known: Vec<_> = ledger.peers().copied().collect();
        let net = cfg.network.clone();
        let leases = open_round
            .live
            .iter()
            .map(|(g, _)| (g.lease, lease_for(&cfg, &publisher.assets, g)))
            .collect();
        let status = Status {
            run: cfg.run.clone(),
            peer_id: publisher.identity.public().to_peer_id().to_string(),
            rounds_total: cfg.rounds,
            round: run_state.round,
            rounds_completed: run_state.round,
            shards: cfg.round.shards as u64,
            quorum: cfg.quorum() as u64,
            heldout_loss: run_state.heldout_loss.clone(),
            checkpoints: run_state.checkpoints.clone(),
            ..Status::default()
        };
        let opened = RoundOpened::now(ledger.totals());
        let book = crate::checks::CheckBook::new(cfg.check_policy(), cfg.seed);
        let coordinator = Coordinator {
            round_opened: opened,
            verdict_log: VerdictLog::open(&cfg.data_dir.join("verdicts.jsonl"))?,
            cfg,
            layout,
            machine,
            ledger,
            engine: EngineSlot::new(engine),
            verifications: Verifications::default(),
            checking: super::checking::Checking::new(book),
            waiting_aggregation: None,
            round_deltas: open_round.deltas,
            leases,
            store,
            run_state,
            blobs,
            blob_server: BlobServer::default(),
            publisher,
            status_tx: watch::Sender::new(status),
            contributors_tx: watch::Sender::new(Arc::new(Vec::new())),
            // Peers with credit show in the live status until they are forgotten.
            peers: known
                .into_iter()
                .map(|p| {
                    let presence = PeerPresence {
                        last_seen_ms: now_ms(),
                        ..PeerPresence::default()
                    };
                    (p, presence)
                })
                .collect(),
            next_forget_ms: 0,
            rate_limits: RateLimits::new(net.requests_per_second, net.request_burst),
            finished_at: None,
            topic,
        };
        Ok((coordinator, due))
    }
}

/// The round machine on the stored run's open round, the actions due at once, and that round
/// as stored (accepted deltas, live leases).
fn resume_round(
    cfg: &RunConfig,
    snapshot: &Snapshot,
    run_state: &RunState,
    layout: &DeltaLayout,
    blobs: &BlobStore,
) -> Result<(RoundMachine, Vec<Action>, resume::OpenRound)> {
    let machine_cfg = cfg.machine_config(cfg.training_examples()?);
    let round = Round(run_state.round);
    let mut open_round = resume::open_round(
        snapshot,
        round,
        run_state.adapter,
        &machine_cfg,
        (layout, cfg.round.codec),
        blobs,
    )?;
    let live = open_round
        .live
        .iter()
        .map(|(g, peer)| (g.lease, *peer, g.shard, g.expires_at_ms))
        .collect();
    let (machine, due) = RoundMachine::resume(
        machine_cfg,
        round,
        run_state.adapter,
        std::mem::take(&mut open_round.accepted),
        live,
        (run_state.epoch as u64) << 32 | 1,
    );
    Ok((machine, due, open_round))
}

/// The swarm, listening where the run says, within the run's limits (a submission frame:
/// `payload_cap` plus room for its other fields). The coordinator is every run's DHT
/// bootstrap, so it answers DHT queries from the start.
fn listen(
    cfg: &RunConfig,
    keypair: libp2p::identity::Keypair,
    payload_cap: usize,
) -> Result<Swarm<Behaviour>> {
    let n = &cfg.network;
    // At least 1 MiB: a payload somewhat over the cap still arrives and gets a verdict that
    // names the cap (a clear error for a misconfigured node); the shared budget bounds memory.
    let submission_bytes = (payload_cap + SUBMISSION_FIELDS_BYTES).max(MIN_SUBMISSION_FRAME);
    let inflight_bytes = (n.inflight_submission_mib << 20).max(submission_bytes);
    let limits = Limits {
        max_incoming: n.max_connections,
        max_pending_incoming: n.max_pending_connections,
        max_per_peer: n.max_connections_per_peer,
        rpc_streams_per_connection: n.rpc_streams_per_connection,
        submission_bytes,
        inflight_bytes,
        max_process_memory_bytes: n.max_memory_mib << 20,
    };
    tracing::info!(?limits, "network limits");
    let options = NetOptions {
        lan: cfg.lan,
        limits,
    };
    let mut swarm = build_swarm(keypair, Role::Coordinator, options)?;
    swarm
        .behaviour_mut()
        .kad
        .set_mode(Some(libp2p::kad::Mode::Server));
    listen_on_all(&mut swarm, &cfg.listen)?;
    Ok(swarm)
}

/// A submission's fields besides its payload: run name (≤ 256 bytes), ids, hashes, losses,
/// public key and signature, with room to spare.
const SUBMISSION_FIELDS_BYTES: usize = 4096;
const MIN_SUBMISSION_FRAME: usize = 1 << 20;

/// The base model's files and the training data, in the blob store for nodes to fetch.
fn put_assets(cfg: &RunConfig, blobs: &mut BlobStore) -> Result<RunAssets> {
    let weights = cfg.base_model.join("model.safetensors");
    anyhow::ensure!(
        weights.exists(),
        "{}: herd serves single-file base models for now",
        weights.display()
    );
    Ok(RunAssets {
        config: blobs.put_file(&cfg.base_model.join("config.json"))?,
        weights: blobs.put_file(&weights)?,
        tokenizer: blobs.put_file(&cfg.base_model.join("tokenizer.json"))?,
        data: blobs.put_file(&cfg.data)?,
    })
}

/// A fresh run: θ_0 and its held-out loss.
fn start_engine(engine: &mut Engine, blobs: &mut BlobStore) -> Result<RunState> {
    engine.start()?;
    let loss0 = engine.heldout_loss();
    say!("round 0: held-out loss {loss0:.4} (before training)");
    Ok(RunState {
        round: 0,
        adapter: blobs.put_bytes(&engine.adapter_bytes()?)?,
        outer_state: None,
        heldout_loss: vec![loss0],
        checkpoints: Vec::new(),
        epoch: 1,
    })
}

/// A stored run: the engine back on its θ_r and outer momentum, in a new epoch.
fn resume_engine(engine: &mut Engine, blobs: &BlobStore, mut run: RunState) -> Result<RunState> {
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
    Ok(run)
}

fn reputation(cfg: &RunConfig) -> Reputation {
    Reputation::new(cfg.verify.reputation(), cfg.seed)
}

/// The HTTP API, serving `/v1/status` and the checkpoints until stopped.
struct HttpServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl HttpServer {
    /// Starts it where the run says (`None` when it is off).
    async fn start(cfg: &RunConfig, coordinator: &Coordinator) -> Result<Option<Self>> {
        let Some(addr) = cfg.http_addr() else {
            say!("http: off (checkpoints are served over libp2p only)");
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding HTTP on {addr}"))?;
        say!("http: http://{}", listener.local_addr()?);
        let app = crate::http::router(
            coordinator.status_tx.subscribe(),
            coordinator.contributors_tx.subscribe(),
            coordinator.publisher.dir.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Some(HttpServer { stop, task }))
    }

    /// Tells it to stop and waits until it has.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        Ok(self.task.await.context("HTTP task")??)
    }
}
