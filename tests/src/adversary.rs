//! An adversarial client for the attack suite: real libp2p (TCP, noise, yamux) and the herd
//! protocol, but it sends whatever a test asks, byte for byte. It can also train honestly
//! (through herd-model, like a node) so attacks start from a realistic delta.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use herd_model::Llama;
use herd_model::data::Dataset;
use herd_model::lora::{Lora, LoraConfig};
use herd_model::peft::load_adapter_weights;
use herd_model::shard::{ShardOutcome, train_shard};
use herd_model::tokenizer::TextTokenizer;
use herd_protocol::delta::{Delta, Payload};
use herd_protocol::framing::{decode, encode};
use herd_protocol::messages::*;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundFailure, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};

/// Writes requests as raw bytes (framing included, or not), reads responses as herd frames.
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        io.take(MAX_RPC_RESPONSE_BYTES as u64 + 4)
            .read_to_end(&mut out)
            .await?;
        if out.len() < 4 {
            // The coordinator closed the stream without answering: the request was refused.
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(out)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// A client speaking `protocol` with its own key (a fresh identity each time).
#[allow(missing_debug_implementations)] // holds a Swarm, which has no Debug
pub struct Adversary {
    swarm: Swarm<request_response::Behaviour<RawCodec>>,
    coordinator: PeerId,
    pub key: Keypair,
    admission: Option<herd_protocol::admission::AdmissionProof>,
}

impl Adversary {
    pub fn new(addr: &str, protocol: &'static str) -> Self {
        let key = Keypair::generate_ed25519();
        let addr: Multiaddr = addr.parse().unwrap();
        let coordinator = herd_protocol::net::pinned_peer(&addr).unwrap();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| {
                request_response::Behaviour::new(
                    [(StreamProtocol::new(protocol), ProtocolSupport::Outbound)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(30)),
                )
            })
            .unwrap()
            // As long as a node's (herd_protocol::net): a test blocks the thread between
            // requests while it trains, and with libp2p's default (10 s) the connection would
            // close under it, failing its next request with `ConnectionClosed`.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        swarm.add_peer_address(coordinator, addr);
        Adversary {
            swarm,
            coordinator,
            key,
            admission: None,
        }
    }

    /// Dials the coordinator and waits (bounded) for the connection: whether it was
    /// established. The connection stays while this client lives.
    pub async fn connect(&mut self) -> bool {
        if self.swarm.dial(self.coordinator).is_err() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(SwarmEvent::ConnectionEstablished { .. }) => return true,
                Ok(SwarmEvent::OutgoingConnectionError { .. }) | Err(_) => return false,
                Ok(_) => {}
            }
        }
    }

    /// Keeps the client's connection served (pings, identify) until `deadline`; false if it
    /// closed before.
    pub async fn hold(&mut self, deadline: tokio::time::Instant) -> bool {
        loop {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Err(_) => return true,
                Ok(SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                }) => return false,
                Ok(_) => {}
            }
        }
    }

    /// Sends raw bytes; returns the decoded response or the failure.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<RpcResponse, OutboundFailure> {
        let id = self
            .swarm
            .behaviour_mut()
            .send_request(&self.coordinator, bytes);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let Ok(event) = tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await
            else {
                return Err(OutboundFailure::Timeout);
            };
            match event {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => {
                    let len = u32::from_le_bytes(response[..4].try_into().unwrap()) as usize;
                    return Ok(decode::<RpcResponse, MAX_RPC_RESPONSE_BYTES>(
                        &response[4..4 + len],
                    )
                    .unwrap());
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) if request_id == id => {
                    return Err(error);
                }
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, request: &RpcRequest) -> RpcResponse {
        self.request(request).await.expect("a response")
    }

    /// Sends `request` framed as a node would; the answer, or why there is none.
    pub async fn request(&mut self, request: &RpcRequest) -> Result<RpcResponse, OutboundFailure> {
        let body = encode(request).unwrap();
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend(body);
        self.send_raw(frame).await
    }

    pub async fn lease(&mut self) -> Lease {
        match self.try_lease().await {
            Ok(l) => l,
            Err(other) => panic!("expected a lease, got {other:?}"),
        }
    }

    /// Asks for a lease (paying the admission proof first when asked); `Err` with the
    /// answer when there is none.
    pub async fn try_lease(&mut self) -> Result<Lease, RpcResponse> {
        self.ask_for_lease().await.expect("a response")
    }

    /// [`Adversary::try_lease`] that also survives a lost exchange (`Err` outside).
    pub async fn ask_for_lease(&mut self) -> Result<Result<Lease, RpcResponse>, OutboundFailure> {
        let mut answer = self.ask_lease().await?;
        if let RpcResponse::AdmissionRequired { run, bits } = &answer {
            let me = self.key.public().to_peer_id();
            let challenge = herd_protocol::admission::Challenge {
                run,
                coordinator: &self.coordinator,
                peer: &me,
            };
            self.admission = challenge.solve(*bits, || true);
            answer = self.ask_lease().await?;
        }
        Ok(match answer {
            RpcResponse::Lease(l) => Ok(*l),
            other => Err(other),
        })
    }

    async fn ask_lease(&mut self) -> Result<RpcResponse, OutboundFailure> {
        let request = RpcRequest::Lease(LeaseRequest {
            version: PROTOCOL_VERSION,
            device: "adversary".into(),
            admission: self.admission,
            checks_only: false,
        });
        self.request(&request).await
    }

    /// `payload` for `lease`, signed with this client's key, claiming `outcome`'s losses.
    pub fn sign(&self, lease: &Lease, payload: Vec<u8>, claim: &Claim) -> Submission {
        Submission::signed(
            lease,
            payload,
            claim.loss_before,
            claim.loss_after,
            claim.tokens,
            &self.key,
        )
        .unwrap()
    }

    pub async fn submit(&mut self, sub: Submission) -> Verdict {
        match self.send(&RpcRequest::Submit(Box::new(sub))).await {
            RpcResponse::Verdict(v) => v,
            other => panic!("expected a verdict, got {other:?}"),
        }
    }

    /// Reports `sketch` for the check `lease`: the coordinator's answer.
    pub async fn report(&mut self, lease: &Lease, sketch: Vec<f32>) -> Verdict {
        let request = RpcRequest::Report(Box::new(CheckReport {
            lease: lease.id,
            run: lease.run.clone(),
            round: lease.round,
            shard: lease.shard,
            base_adapter: lease.base_adapter,
            sketch,
        }));
        match self.send(&request).await {
            RpcResponse::Verdict(v) => v,
            other => panic!("expected a verdict on a report, got {other:?}"),
        }
    }
}

/// What a submission claims about its training.
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    pub loss_before: f64,
    pub loss_after: f64,
    pub tokens: u64,
}

impl From<&ShardOutcome> for Claim {
    fn from(o: &ShardOutcome) -> Self {
        Claim {
            loss_before: o.loss_before,
            loss_after: o.loss_after,
            tokens: o.tokens,
        }
    }
}

/// The embedded default model and data, for honest (or dishonest) training in round 0.
#[derive(Debug)]
pub struct World {
    pub model: Llama,
    pub data: Dataset,
}

impl World {
    pub fn load(max_seq_len: usize) -> World {
        let base = crate::default_asset("base");
        let model = Llama::load(&base, tch::Device::Cpu).unwrap();
        let tok = TextTokenizer::from_dir(&base).unwrap();
        let data = Dataset::for_model(
            &crate::default_asset("data/train.jsonl"),
            &tok,
            model.config(),
            Some(max_seq_len),
        )
        .unwrap();
        World { model, data }
    }

    /// Trains `lease` from θ_0 (round 0's adapter: B = 0, A from the run's seed) as a node
    /// would; `lease.ranges` may be changed first to train on other data.
    pub fn train(&self, lease: &Lease) -> ShardOutcome {
        self.train_from(lease, None)
    }

    /// Trains `lease` from `adapter` (the round's θ_r as a node fetched it; `None`: θ_0).
    pub fn train_from(&self, lease: &Lease, adapter: Option<&Path>) -> ShardOutcome {
        let config = self.model.config();
        let mut lora = Lora::new(
            config,
            LoraConfig::try_from(&lease.lora).unwrap(),
            tch::Device::Cpu,
        )
        .unwrap();
        if let Some(adapter) = adapter {
            load_adapter_weights(&mut lora, adapter, config.num_hidden_layers).unwrap();
        }
        train_shard(&self.model, &lora, &self.data, lease, true, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
    }
}

/// `delta` encoded for `lease` (its codec, its seed for the sketch), no residual.
pub fn encode_for(lease: &Lease, delta: &Delta) -> Vec<u8> {
    delta.encode(lease.codec, None, lease.seed).unwrap().payload
}

/// The payload of `sent` for `lease` carrying the sketch of `sketched`: a forger's honest
/// sketch (which a replay agrees with) on another payload.
pub fn payload_with_sketch_of(lease: &Lease, sent: &Delta, sketched: &Delta) -> Vec<u8> {
    let cap = herd_protocol::delta::MAX_DELTA_BYTES;
    let open = |delta: &Delta| -> Payload {
        const CAP: usize = herd_protocol::delta::MAX_DELTA_BYTES;
        let payload: Payload = decode::<_, CAP>(&encode_for(lease, delta)).unwrap();
        payload
    };
    let mut payload = open(sent);
    payload.sketch = open(sketched).sketch;
    let bytes = encode(&payload).unwrap();
    assert!(bytes.len() <= cap);
    bytes
}

/// Where the coordinator in `coordinator_dir` keeps blob `id` (a round's adapter): what a
/// node would fetch, read off the disk.
pub fn blob_path(coordinator_dir: &Path, id: &herd_protocol::ContentId) -> PathBuf {
    let blobs = herd_protocol::blobs::BlobStore::open(&coordinator_dir.join("blobs")).unwrap();
    blobs
        .path(id)
        .expect("the coordinator has the blob")
        .to_path_buf()
}

/// Seeded Gaussian-ish noise shaped like `like`, with the same global norm.
pub fn noise_like(like: &Delta, seed: u64) -> Delta {
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift; the sum of four uniforms is close enough to a Gaussian for this.
        let mut u = 0.0f32;
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            u += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        u
    };
    let mut noise = like.clone();
    for t in &mut noise.tensors {
        for v in &mut t.values {
            *v = next();
        }
    }
    let scale = (like.norm() / noise.norm()) as f32;
    noise.scaled(scale)
}

/// How long until `lease` has expired, plus a margin.
pub fn wait_for_lease_expiry(lease: &Lease) -> Duration {
    let now = herd_protocol::messages::now_ms();
    Duration::from_millis(lease.expires_at_ms.saturating_sub(now) + 500)
}
