//! The node's libp2p side, after rust-libp2p's file-sharing example: a cloneable [`Client`]
//! sends commands over a bounded channel to the [`EventLoop`], which owns the swarm and
//! answers each command through a oneshot. The loop ends when the last client is dropped.
//!
//! Besides talking to the coordinator, the loop serves the node's blob store to other peers,
//! finds and announces blob providers in the DHT ([`providers`]), forwards the coordinator's
//! round announcements, and keeps the node reachable ([`reachability`]).

mod client;
mod providers;
mod reachability;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use herd_protocol::blob_server::BlobServer;
use herd_protocol::blobs::BlobStore;
use herd_protocol::messages::{BlobResponse, MAX_ANNOUNCE_BYTES, RoundAnnouncement, RpcResponse};
use herd_protocol::net::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, autonat, identify, kad};
use tokio::sync::{mpsc, watch};

pub use client::Client;
use client::{Command, Reply};
use providers::Lookups;
use reachability::Reachability;

/// The blob store the loop serves from and downloads land in.
pub type SharedStore = Arc<Mutex<BlobStore>>;

/// Why a request did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetFailure {
    #[error("cannot connect: {0}")]
    Unreachable(String),
    #[error("request failed: {0}")]
    Failed(String),
    #[error("the network task has stopped")]
    Stopped,
}

/// Owns the swarm; see the module docs.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    coordinator: PeerId,
    /// Where the coordinator is (sent along with every request to it).
    coordinator_addr: Multiaddr,
    rx: mpsc::Receiver<Command>,
    store: SharedStore,
    announcements: mpsc::Sender<RoundAnnouncement>,
    pending_rpc: HashMap<OutboundRequestId, Reply<RpcResponse>>,
    pending_blob: HashMap<OutboundRequestId, Reply<BlobResponse>>,
    /// Provider lookups in flight.
    lookups: Lookups,
    /// Where other peers were last reached, to dial them again.
    addresses: HashMap<PeerId, Multiaddr>,
    /// The last reason a dial to the coordinator failed, for a useful error message.
    last_dial_error: Option<String>,
    /// Connections by kind (relayed or direct), and what AutoNAT said of this node.
    reachability: Reachability,
    /// Answers blob requests, reading groups off the loop.
    blob_server: BlobServer,
}

/// Wires a client to an event loop for `swarm` that talks to `coordinator` at
/// `coordinator_addr`, serves `store`, and forwards round announcements to the returned
/// receiver.
pub fn new(
    mut swarm: Swarm<Behaviour>,
    coordinator: PeerId,
    coordinator_addr: Multiaddr,
    store: SharedStore,
) -> (Client, EventLoop, mpsc::Receiver<RoundAnnouncement>) {
    let (tx, rx) = mpsc::channel(16);
    let (announcements, announced) = mpsc::channel(16);
    let (reachability_tx, reachability_rx) = watch::channel(String::new());
    let behaviour = swarm.behaviour_mut();
    // The coordinator is the DHT's entry point and the judge of this node's reachability.
    behaviour
        .kad
        .add_address(&coordinator, coordinator_addr.clone());
    behaviour
        .autonat
        .add_server(coordinator, Some(coordinator_addr.clone()));
    (
        Client::new(tx, coordinator, reachability_rx),
        EventLoop {
            swarm,
            coordinator,
            coordinator_addr,
            rx,
            store,
            announcements,
            pending_rpc: HashMap::new(),
            pending_blob: HashMap::new(),
            lookups: Lookups::default(),
            addresses: HashMap::new(),
            last_dial_error: None,
            reachability: Reachability::new(reachability_tx),
            blob_server: BlobServer::default(),
        },
        announced,
    )
}

impl EventLoop {
    /// Runs until every [`Client`] is dropped. Cancel-safe only as a whole.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                command = self.rx.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => return,
                },
                _ = tick.tick() => self.lookups.answer_finished(&mut self.swarm),
                (channel, response) = self.blob_server.next() => self.respond(channel, response),
            }
        }
    }

    /// Sends a blob answer; a peer that went away meanwhile just misses it.
    fn respond(&mut self, channel: ResponseChannel<BlobResponse>, response: BlobResponse) {
        let _ = self
            .swarm
            .behaviour_mut()
            .blob
            .send_response(channel, response);
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Rpc { request, reply } => {
                // The address goes with every request: request-response drops an address whose
                // dial failed, so a node that once found the coordinator down would never dial
                // it again.
                let addr = vec![self.coordinator_addr.clone()];
                let id = self.swarm.behaviour_mut().rpc.send_request_with_addresses(
                    &self.coordinator,
                    request,
                    addr,
                );
                self.pending_rpc.insert(id, reply);
            }
            Command::Blob {
                peer,
                request,
                reply,
            } => {
                let addr = if peer == self.coordinator {
                    Some(self.coordinator_addr.clone())
                } else {
                    self.addresses.get(&peer).cloned()
                };
                let id = self.swarm.behaviour_mut().blob.send_request_with_addresses(
                    &peer,
                    request,
                    addr.into_iter().collect(),
                );
                self.pending_blob.insert(id, reply);
            }
            Command::Providers { id, reply } => self.lookups.start(&mut self.swarm, &id, reply),
            Command::Provide { id } => providers::provide(&mut self.swarm, &id),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                let direct = self.reachability.established(
                    &mut self.swarm,
                    peer_id,
                    &endpoint,
                    connection_id,
                );
                if direct {
                    self.on_direct_connection(peer_id, &endpoint);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.reachability
                    .closed(peer_id, connection_id, &endpoint, num_established);
                if num_established == 0 && peer_id == self.coordinator {
                    tracing::warn!("disconnected from the coordinator");
                }
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                ..
            } if peer == self.coordinator => {
                self.last_dial_error = None; // a failure now is this dial's, not an old one's
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if peer_id == Some(self.coordinator) {
                    self.last_dial_error = Some(error.to_string());
                }
                // A peer reached through the relay may still dial back directly.
                if let Some(peer) = peer_id
                    && !self.reachability.has_relayed(&peer)
                {
                    self.lookups.unreachable(&peer);
                    self.lookups.answer_finished(&mut self.swarm);
                }
            }
            // A relayed address is how peers behind NAT are reached: tell the DHT about it.
            SwarmEvent::NewListenAddr { address, .. } if reachability::is_relayed(&address) => {
                tracing::info!(%address, "reachable through the coordinator's relay");
                self.swarm.add_external_address(address);
                providers::provide_again(&mut self.swarm);
            }
            // Provider records carry the addresses known when they were sent.
            SwarmEvent::ExternalAddrConfirmed { .. } => providers::provide_again(&mut self.swarm),
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            _ => {}
        }
    }

    /// A direct connection to `peer` is open: note where a dialled peer was reached, and hand
    /// it to the provider lookups waiting for it.
    fn on_direct_connection(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        if peer == self.coordinator {
            tracing::info!(peer = %peer, "connected to the coordinator");
            self.last_dial_error = None;
        } else if endpoint.is_dialer() {
            self.addresses
                .insert(peer, endpoint.get_remote_address().clone());
        }
        self.lookups.connected(peer);
        self.lookups.answer_finished(&mut self.swarm);
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(libp2p::gossipsub::Event::Message { message, .. }) => {
                // Only the coordinator's word counts (gossipsub checked the signature).
                if message.source != Some(self.coordinator) {
                    return;
                }
                match herd_protocol::framing::decode::<RoundAnnouncement, MAX_ANNOUNCE_BYTES>(
                    &message.data,
                ) {
                    Ok(ann) => {
                        tracing::info!(run = %ann.run, round = %ann.round, adapter = %ann.adapter, "round announced");
                        let _ = self.announcements.try_send(ann);
                    }
                    Err(e) => tracing::debug!(error = %e, "ignored a malformed announcement"),
                }
            }
            BehaviourEvent::Rpc(event) => {
                let dial = self.last_dial_error.clone();
                let failure =
                    |e: &request_response::OutboundFailure| outbound_failure(dial.as_deref(), e);
                let _ = route_response(&mut self.pending_rpc, event, failure);
            }
            BehaviourEvent::Blob(event) => {
                let failure = |e: &request_response::OutboundFailure| outbound_failure(None, e);
                if let Some((request, channel)) =
                    route_response(&mut self.pending_blob, event, failure)
                {
                    let mut store = self.store.lock().expect("blob store lock");
                    let ready = self.blob_server.answer(&mut store, &request, channel);
                    drop(store);
                    if let Some((channel, response)) = ready {
                        self.respond(channel, response);
                    }
                }
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.reachability
                    .dial_back(&mut self.swarm, peer_id, &info.listen_addrs);
                // Peers that answer DHT queries go into the routing table.
                if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self
                .lookups
                .on_query(&mut self.swarm, &self.reachability, id, result, step.last),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => self
                .reachability
                .on_nat_status(&mut self.swarm, &self.coordinator_addr, new),
            BehaviourEvent::Dcutr(event) => reachability::on_hole_punch(event),
            BehaviourEvent::RelayClient(event) => reachability::on_relay_client(event),
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

/// Hands a response (or failure) to whoever waits for it; returns an inbound request with its
/// channel, which the caller must answer.
fn route_response<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, Reply<Resp>>,
    event: request_response::Event<Req, Resp>,
    failure: impl Fn(&request_response::OutboundFailure) -> NetFailure,
) -> Option<(Req, request_response::ResponseChannel<Resp>)> {
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
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        } => Some((request, channel)),
        _ => None,
    }
}
