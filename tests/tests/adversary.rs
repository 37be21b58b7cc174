//! Hostile input against a real coordinator process: an adversarial client built on
//! herd-protocol and real libp2p sends what an honest node never would. Each message is
//! refused with the right reason, and the coordinator keeps running.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use herd_protocol::LeaseId;
use herd_protocol::delta::{Codec as DeltaCodec, Delta, DeltaTensor};
use herd_protocol::framing::{decode, encode};
use herd_protocol::messages::*;
use herd_tests::Coordinator;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundFailure, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, noise, tcp, yamux};

/// Writes requests as raw bytes (framing included, or not), reads responses as herd frames.
#[derive(Debug, Clone, Default)]
struct RawCodec;

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

/// A client speaking `protocol` with its own key.
struct Adversary {
    swarm: Swarm<request_response::Behaviour<RawCodec>>,
    coordinator: PeerId,
    key: Keypair,
}

impl Adversary {
    fn new(addr: &str, protocol: &'static str) -> Self {
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
            .build();
        swarm.add_peer_address(coordinator, addr);
        Adversary {
            swarm,
            coordinator,
            key,
        }
    }

    /// Sends raw bytes; returns the decoded response or the failure.
    async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<RpcResponse, OutboundFailure> {
        let id = self
            .swarm
            .behaviour_mut()
            .send_request(&self.coordinator, bytes);
        loop {
            let event =
                tokio::time::timeout(Duration::from_secs(60), self.swarm.select_next_some())
                    .await
                    .expect("an answer in time");
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

    async fn send(&mut self, request: &RpcRequest) -> RpcResponse {
        let body = encode(request).unwrap();
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend(body);
        self.send_raw(frame).await.expect("a response")
    }

    async fn lease(&mut self) -> Lease {
        match self
            .send(&RpcRequest::Lease(LeaseRequest {
                version: PROTOCOL_VERSION,
                device: "adversary".into(),
            }))
            .await
        {
            RpcResponse::Lease(l) => *l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    /// A correctly encoded, zero delta for `lease`, signed by this adversary (or not).
    fn submission(&self, lease: &Lease, sign_correctly: bool) -> Submission {
        let mut tensors = Vec::new();
        for layer in 0..4 {
            for (t, out) in [
                ("q_proj", 64),
                ("k_proj", 32),
                ("v_proj", 32),
                ("o_proj", 64),
            ] {
                tensors.push(DeltaTensor {
                    name: format!("model.layers.{layer}.self_attn.{t}.lora_B.weight"),
                    shape: vec![out, 8],
                    values: vec![0.0; out as usize * 8],
                });
            }
        }
        let payload = Delta {
            codec: DeltaCodec::RawF32,
            tensors,
        }
        .encode()
        .unwrap();
        let mut sub = Submission::signed(lease, payload, 1.0, 0.5, 100, &self.key).unwrap();
        if !sign_correctly {
            sub.signature = self.key.sign(b"something else").unwrap();
        }
        sub
    }

    async fn submit(&mut self, sub: Submission) -> Verdict {
        match self.send(&RpcRequest::Submit(Box::new(sub))).await {
            RpcResponse::Verdict(v) => v,
            other => panic!("expected a verdict, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_refused_with_reasons_and_the_coordinator_keeps_running() {
    let tmp = tempfile::tempdir().unwrap();
    let round = "[round]\nshards = 8\ninner_steps = 10\nlr = 1e-3\nbatch_size = 4\nmax_seq_len = 128\n\
                 lease_secs = 3\nouter_lr = 1.0\nouter_momentum = 0.0\ncheckpoint_every = 1\n";
    let mut coordinator = Coordinator::start(tmp.path(), &format!("rounds = 1\n{round}"));
    let mut mallory = Adversary::new(&coordinator.addr, RPC_PROTOCOL);
    let mut eve = Adversary::new(&coordinator.addr, RPC_PROTOCOL);

    // Over the cap: a frame claiming ~2 GiB is refused on its length, before allocation.
    let failure = mallory
        .send_raw(vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .await;
    assert!(
        failure.is_err(),
        "an oversized frame must not be answered: {failure:?}"
    );
    // Garbage inside a well-sized frame is refused too.
    assert!(
        mallory
            .send_raw(vec![3, 0, 0, 0, 0xfe, 0xfe, 0xfe])
            .await
            .is_err()
    );

    // An unknown protocol version: in the message, and in the protocol name.
    let refused = mallory
        .send(&RpcRequest::Lease(LeaseRequest {
            version: 99,
            device: String::new(),
        }))
        .await;
    assert!(
        matches!(&refused, RpcResponse::Refused { reason } if reason.contains("version 99")),
        "{refused:?}"
    );
    let mut future = Adversary::new(&coordinator.addr, "/herd/rpc/2");
    let unsupported = future.send_raw(vec![0, 0, 0, 0]).await;
    assert!(
        matches!(unsupported, Err(OutboundFailure::UnsupportedProtocols)),
        "{unsupported:?}"
    );

    // Lease binding.
    let lease = mallory.lease().await;
    let unknown = Lease {
        id: LeaseId(424_242),
        ..lease.clone()
    };
    assert_eq!(
        mallory.submit(mallory.submission(&unknown, true)).await,
        Verdict::Rejected(RejectReason::UnknownLease)
    );
    assert_eq!(
        eve.submit(eve.submission(&lease, true)).await,
        Verdict::Rejected(RejectReason::NotYourLease)
    );
    assert_eq!(
        mallory.submit(mallory.submission(&lease, false)).await,
        Verdict::Rejected(RejectReason::BadSignature)
    );
    // Someone else's key on my lease: the signature is valid, but not by the sending peer.
    let mut forged = eve.submission(&lease, true);
    forged.lease = lease.id;
    assert_eq!(
        mallory.submit(forged).await,
        Verdict::Rejected(RejectReason::BadSignature)
    );
    let mut tampered = mallory.submission(&lease, true);
    tampered.payload[10] ^= 0xff;
    assert_eq!(
        mallory.submit(tampered).await,
        Verdict::Rejected(RejectReason::PayloadHashMismatch)
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        mallory.submit(mallory.submission(&lease, true)).await,
        Verdict::Rejected(RejectReason::ExpiredLease)
    );

    // Still alive and serving.
    assert!(
        coordinator.child.try_wait().unwrap().is_none(),
        "the coordinator must keep running"
    );
    let status = tokio::task::spawn_blocking({
        let url = coordinator.http.clone();
        move || herd_tests::get_json(&format!("{url}/v1/status"))
    })
    .await
    .unwrap()
    .expect("status still answers");
    let rejects = status["recent_rejects"].as_array().unwrap();
    assert!(rejects.len() >= 6, "{status}");
    let log = std::fs::read_to_string(&coordinator.log).unwrap();
    assert!(
        log.contains("exceeds the cap"),
        "oversized frames are logged: {log}"
    );
    let _ = coordinator.child.kill();
}
