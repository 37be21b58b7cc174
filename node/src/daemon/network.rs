//! The node's libp2p side, after rust-libp2p's file-sharing example: a cloneable [`Client`]
//! sends commands over a bounded channel to the [`EventLoop`], which owns the swarm and
//! answers each command through a oneshot. The loop ends when the last client is dropped.

use std::collections::HashMap;

use futures::StreamExt;
use herd_protocol::messages::{
    BlobRequest, BlobResponse, MAX_ANNOUNCE_BYTES, RoundAnnouncement, RpcRequest, RpcResponse,
};
use herd_protocol::net::{Behaviour, BehaviourEvent};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

/// Why a request to the coordinator did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetFailure {
    #[error("cannot connect: {0}")]
    Unreachable(String),
    #[error("request failed: {0}")]
    Failed(String),
    #[error("the network task has stopped")]
    Stopped,
}

type Reply<T> = oneshot::Sender<Result<T, NetFailure>>;

enum Command {
    Rpc {
        request: RpcRequest,
        reply: Reply<RpcResponse>,
    },
    Blob {
        request: BlobRequest,
        reply: Reply<BlobResponse>,
    },
}

/// Sends requests to the coordinator.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
}

impl Client {
    pub async fn rpc(&self, request: RpcRequest) -> Result<RpcResponse, NetFailure> {
        self.request(|reply| Command::Rpc { request, reply }).await
    }

    pub async fn blob(&self, request: BlobRequest) -> Result<BlobResponse, NetFailure> {
        self.request(|reply| Command::Blob { request, reply }).await
    }

    /// Hands the event loop a command carrying a reply channel and waits for the answer.
    async fn request<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetFailure> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| NetFailure::Stopped)?;
        rx.await.map_err(|_| NetFailure::Stopped)?
    }
}

/// Owns the swarm; see the module docs.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    coordinator: PeerId,
    /// Where the coordinator is (sent along with every request).
    coordinator_addr: Multiaddr,
    rx: mpsc::Receiver<Command>,
    pending_rpc: HashMap<OutboundRequestId, Reply<RpcResponse>>,
    pending_blob: HashMap<OutboundRequestId, Reply<BlobResponse>>,
    /// The last reason a dial to the coordinator failed, for a useful error message.
    last_dial_error: Option<String>,
}

/// Wires a client to an event loop for `swarm` that talks to `coordinator` at
/// `coordinator_addr`.
pub fn new(
    swarm: Swarm<Behaviour>,
    coordinator: PeerId,
    coordinator_addr: Multiaddr,
) -> (Client, EventLoop) {
    let (tx, rx) = mpsc::channel(16);
    (
        Client { tx },
        EventLoop {
            swarm,
            coordinator,
            coordinator_addr,
            rx,
            pending_rpc: HashMap::new(),
            pending_blob: HashMap::new(),
            last_dial_error: None,
        },
    )
}

impl EventLoop {
    /// Runs until every [`Client`] is dropped. Cancel-safe only as a whole.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                command = self.rx.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        // The address goes with every request: request-response drops an address whose dial
        // failed, so a node that once found the coordinator down would never dial it again.
        let addr = vec![self.coordinator_addr.clone()];
        match command {
            Command::Rpc { request, reply } => {
                let id = self.swarm.behaviour_mut().rpc.send_request_with_addresses(
                    &self.coordinator,
                    request,
                    addr,
                );
                self.pending_rpc.insert(id, reply);
            }
            Command::Blob { request, reply } => {
                let id = self.swarm.behaviour_mut().blob.send_request_with_addresses(
                    &self.coordinator,
                    request,
                    addr,
                );
                self.pending_blob.insert(id, reply);
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == self.coordinator => {
                tracing::info!(peer = %peer_id, "connected to the coordinator");
                self.last_dial_error = None;
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } if peer_id == self.coordinator => {
                tracing::warn!("disconnected from the coordinator");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(
                libp2p::gossipsub::Event::Message { message, .. },
            )) => {
                match herd_protocol::framing::decode::<RoundAnnouncement, MAX_ANNOUNCE_BYTES>(
                    &message.data,
                ) {
                    Ok(ann) => {
                        tracing::info!(run = %ann.run, round = %ann.round, adapter = %ann.adapter, "round announced")
                    }
                    Err(e) => tracing::debug!(error = %e, "ignored a malformed announcement"),
                }
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                ..
            } if peer == self.coordinator => {
                self.last_dial_error = None; // a failure now is this dial's, not an old one's
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                self.last_dial_error = Some(error.to_string());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rpc(event)) => {
                let dial = self.last_dial_error.clone();
                let failure =
                    |e: &request_response::OutboundFailure| outbound_failure(dial.as_deref(), e);
                let _ = settle(&mut self.pending_rpc, event, failure);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Blob(event)) => {
                let dial = self.last_dial_error.clone();
                let failure =
                    |e: &request_response::OutboundFailure| outbound_failure(dial.as_deref(), e);
                if let Some(channel) = settle(&mut self.pending_blob, event, failure) {
                    // Serving blobs to other nodes comes with peer-to-peer downloads.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .blob
                        .send_response(channel, BlobResponse::NotFound);
                }
            }
            _ => {}
        }
    }
}

/// A request failure as the node reports it; a failed dial says why the dial failed.
fn outbound_failure(
    last_dial_error: Option<&str>,
    error: &request_response::OutboundFailure,
) -> NetFailure {
    match error {
        request_response::OutboundFailure::DialFailure => {
            NetFailure::Unreachable(last_dial_error.unwrap_or("dial failed").to_string())
        }
        other => NetFailure::Failed(other.to_string()),
    }
}

/// Hands a response (or failure) to whoever waits for it; returns the channel of an inbound
/// request, which the caller must answer.
fn settle<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, Reply<Resp>>,
    event: request_response::Event<Req, Resp>,
    failure: impl Fn(&request_response::OutboundFailure) -> NetFailure,
) -> Option<request_response::ResponseChannel<Resp>> {
    match event {
        request_response::Event::Message {
            message:
                request_response::Message::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Ok(response));
            }
            None
        }
        request_response::Event::OutboundFailure {
            request_id, error, ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Err(failure(&error)));
            }
            None
        }
        request_response::Event::Message {
            message: request_response::Message::Request { channel, .. },
            ..
        } => Some(channel),
        _ => None,
    }
}
