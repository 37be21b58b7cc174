//! The node's libp2p side, after rust-libp2p's file-sharing example: a cloneable [`Client`]
//! sends commands over a bounded channel to the [`EventLoop`], which owns the swarm and
//! answers each command through a oneshot. The loop ends when the last client is dropped.
//!
//! Besides talking to the coordinator, the loop serves the node's blob store to other peers,
//! finds and announces blob providers in the DHT, forwards the coordinator's round
//! announcements, and keeps the node reachable: AutoNAT asks the coordinator whether this node
//! can be dialed, and if not, the node listens through the coordinator's relay.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use herd_protocol::ContentId;
use herd_protocol::blobs::{Answer, BlobStore};
use herd_protocol::messages::{
    BlobRequest, BlobResponse, MAX_ANNOUNCE_BYTES, RoundAnnouncement, RpcRequest, RpcResponse,
};
use herd_protocol::net::{Behaviour, BehaviourEvent, KAD_PROTOCOL, blob_key};
use libp2p::kad::store::RecordStore;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::ConnectionId;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, relay};
use tokio::sync::{mpsc, oneshot, watch};

/// The blob store the loop serves from and downloads land in.
pub type SharedStore = Arc<Mutex<BlobStore>>;

/// How long a provider lookup may take before it answers with what it found.
const PROVIDER_LOOKUP: Duration = Duration::from_secs(5);

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

type Reply<T> = oneshot::Sender<Result<T, NetFailure>>;

enum Command {
    Rpc {
        request: RpcRequest,
        reply: Reply<RpcResponse>,
    },
    Blob {
        peer: PeerId,
        request: BlobRequest,
        reply: Reply<BlobResponse>,
    },
    Providers {
        id: ContentId,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Provide {
        id: ContentId,
    },
}

/// Sends requests to the coordinator and to other peers.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    coordinator: PeerId,
    /// What AutoNAT found out about this node, in words (empty until it has).
    reachability: watch::Receiver<String>,
}

impl Client {
    /// Whether other peers can reach this node, in plain words; empty while AutoNAT probes.
    pub fn reachability(&self) -> String {
        self.reachability.borrow().clone()
    }

    pub fn coordinator(&self) -> PeerId {
        self.coordinator
    }

    pub async fn rpc(&self, request: RpcRequest) -> Result<RpcResponse, NetFailure> {
        self.request(|reply| Command::Rpc { request, reply }).await
    }

    pub async fn blob(
        &self,
        peer: PeerId,
        request: BlobRequest,
    ) -> Result<BlobResponse, NetFailure> {
        self.request(|reply| Command::Blob {
            peer,
            request,
            reply,
        })
        .await
    }

    /// Peers (other than this one) that say they hold blob `id`, connected and ready to ask;
    /// empty when the DHT knows none.
    pub async fn providers(&self, id: ContentId) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Providers { id, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Tells the DHT this node holds blob `id` (and serves it).
    pub async fn provide(&self, id: ContentId) {
        let _ = self.tx.send(Command::Provide { id }).await;
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

/// A provider lookup in flight: it answers once the query is over and the providers it found
/// are connected (or failed to be), or at its deadline with those that are.
struct Lookup {
    reply: oneshot::Sender<Vec<PeerId>>,
    ready: Vec<PeerId>,
    dialing: HashSet<PeerId>,
    query_done: bool,
    deadline: Instant,
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
    lookups: HashMap<kad::QueryId, Lookup>,
    /// Where other peers were last reached, to dial them again.
    addresses: HashMap<PeerId, Multiaddr>,
    /// The last reason a dial to the coordinator failed, for a useful error message.
    last_dial_error: Option<String>,
    listening_via_relay: bool,
    /// Where [`Client::reachability`] reads from.
    reachability: watch::Sender<String>,
    /// Connections through the relay, by peer: closed once hole punching gives a direct one
    /// (the relay caps what a circuit may carry, and request-response spreads requests over
    /// every connection to a peer).
    relayed: HashMap<PeerId, Vec<ConnectionId>>,
    /// Direct (not relayed) connections open, by peer.
    direct: HashMap<PeerId, usize>,
    /// Peers that reached this node through the relay, to dial back directly once identify
    /// says where they listen.
    dial_back: HashSet<PeerId>,
    /// Blob answers read off the loop, on their way back to be sent.
    served_tx: mpsc::UnboundedSender<Served>,
    served_rx: mpsc::UnboundedReceiver<Served>,
}

/// A blob request's channel and its answer.
type Served = (ResponseChannel<BlobResponse>, BlobResponse);

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
    let (reachability, reachability_rx) = watch::channel(String::new());
    let (served_tx, served_rx) = mpsc::unbounded_channel();
    let behaviour = swarm.behaviour_mut();
    // The coordinator is the DHT's entry point and the judge of this node's reachability.
    behaviour
        .kad
        .add_address(&coordinator, coordinator_addr.clone());
    behaviour
        .autonat
        .add_server(coordinator, Some(coordinator_addr.clone()));
    (
        Client {
            tx,
            coordinator,
            reachability: reachability_rx,
        },
        EventLoop {
            swarm,
            coordinator,
            coordinator_addr,
            rx,
            store,
            announcements,
            pending_rpc: HashMap::new(),
            pending_blob: HashMap::new(),
            lookups: HashMap::new(),
            addresses: HashMap::new(),
            last_dial_error: None,
            listening_via_relay: false,
            reachability,
            relayed: HashMap::new(),
            direct: HashMap::new(),
            dial_back: HashSet::new(),
            served_tx,
            served_rx,
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
                _ = tick.tick() => self.settle_lookups(),
                Some((channel, response)) = self.served_rx.recv() => {
                    self.respond(channel, response)
                }
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
            Command::Providers { id, reply } => {
                let query = self.swarm.behaviour_mut().kad.get_providers(blob_key(&id));
                self.lookups.insert(
                    query,
                    Lookup {
                        reply,
                        ready: Vec::new(),
                        dialing: HashSet::new(),
                        query_done: false,
                        deadline: Instant::now() + PROVIDER_LOOKUP,
                    },
                );
            }
            Command::Provide { id } => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(blob_key(&id))
                {
                    tracing::warn!(%id, error = %e, "cannot announce a blob in the DHT");
                }
            }
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
                if endpoint.is_relayed() {
                    // Ready once a direct connection follows (reversal or hole punching).
                    if self.has_direct(&peer_id) {
                        self.swarm.close_connection(connection_id);
                    } else {
                        self.relayed.entry(peer_id).or_default().push(connection_id);
                        if !endpoint.is_dialer() {
                            self.dial_back.insert(peer_id);
                        }
                    }
                    return;
                }
                *self.direct.entry(peer_id).or_default() += 1;
                // A direct connection makes the relayed ones redundant.
                for id in self.relayed.remove(&peer_id).unwrap_or_default() {
                    self.swarm.close_connection(id);
                }
                if peer_id == self.coordinator {
                    tracing::info!(peer = %peer_id, "connected to the coordinator");
                    self.last_dial_error = None;
                } else if endpoint.is_dialer() {
                    self.addresses
                        .insert(peer_id, endpoint.get_remote_address().clone());
                }
                for lookup in self.lookups.values_mut() {
                    if lookup.dialing.remove(&peer_id) {
                        lookup.ready.push(peer_id);
                    }
                }
                self.settle_lookups();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if endpoint.is_relayed() {
                    if let Some(ids) = self.relayed.get_mut(&peer_id) {
                        ids.retain(|c| *c != connection_id);
                    }
                } else if let Some(n) = self.direct.get_mut(&peer_id) {
                    *n = n.saturating_sub(1);
                }
                if num_established == 0 {
                    self.dial_back.remove(&peer_id);
                    if peer_id == self.coordinator {
                        tracing::warn!("disconnected from the coordinator");
                    }
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
                    && !self.has_relayed(&peer)
                {
                    for lookup in self.lookups.values_mut() {
                        lookup.dialing.remove(&peer);
                    }
                    self.settle_lookups();
                }
            }
            // A relayed address is how peers behind NAT are reached: tell the DHT about it.
            SwarmEvent::NewListenAddr { address, .. } if is_relayed(&address) => {
                tracing::info!(%address, "reachable through the coordinator's relay");
                self.swarm.add_external_address(address);
                self.provide_again();
            }
            // Provider records carry the addresses known when they were sent.
            SwarmEvent::ExternalAddrConfirmed { .. } => self.provide_again(),
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            _ => {}
        }
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
                let _ = settle(&mut self.pending_rpc, event, failure);
            }
            BehaviourEvent::Blob(event) => {
                let failure = |e: &request_response::OutboundFailure| outbound_failure(None, e);
                if let Some((request, channel)) = settle(&mut self.pending_blob, event, failure) {
                    let answer = self.store.lock().expect("blob store lock").answer(&request);
                    match answer {
                        Answer::Ready(response) => self.respond(channel, response),
                        Answer::Read(group) => {
                            // Reading and hashing a MiB would keep the loop from every
                            // connection meanwhile; the answer comes back through `served`.
                            let served = self.served_tx.clone();
                            tokio::task::spawn_blocking(move || {
                                let _ = served.send((channel, Answer::Read(group).finish()));
                            });
                        }
                    }
                }
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                // A peer that reached this one only through the relay may itself be reachable:
                // dial it directly (connection reversal: no hole to punch when one side is
                // public; DCUtR covers both sides behind NAT).
                if self.dial_back.remove(&peer_id) && !info.listen_addrs.is_empty() {
                    let direct = DialOpts::peer_id(peer_id)
                        .addresses(
                            info.listen_addrs
                                .iter()
                                .filter(|a| !is_relayed(a))
                                .cloned()
                                .collect(),
                        )
                        // Hole punching may be dialling it at the same moment, to no avail when
                        // this side is behind NAT and the other is not.
                        .condition(PeerCondition::Always)
                        .build();
                    tracing::debug!(peer = %peer_id, "reached through the relay: dialling it directly");
                    if let Err(e) = self.swarm.dial(direct) {
                        tracing::debug!(peer = %peer_id, error = %e, "cannot dial it directly");
                    }
                }
                // Peers that answer DHT queries go into the routing table.
                if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_query(id, result, step.last),
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.on_reachability(new)
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                // A punched hole arrives as a direct ConnectionEstablished; a failure leaves the
                // lookup waiting for the other side's reversal dial until its deadline.
                match result {
                    Ok(_) => tracing::debug!(peer = %remote_peer_id, "hole punched"),
                    Err(e) => {
                        tracing::debug!(peer = %remote_peer_id, error = %e, "hole punching failed")
                    }
                }
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            }) => {
                tracing::debug!(relay = %relay_peer_id, "relay reservation accepted");
            }
            _ => {}
        }
    }

    fn on_query(&mut self, id: kad::QueryId, result: kad::QueryResult, last: bool) {
        let local = *self.swarm.local_peer_id();
        if let kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
            providers,
            ..
        })) = &result
            && self.lookups.contains_key(&id)
        {
            for peer in providers.iter().filter(|p| **p != local) {
                let lookup = &self.lookups[&id];
                if lookup.ready.contains(peer) || lookup.dialing.contains(peer) {
                    continue;
                }
                let ready = self.has_direct(peer);
                // Dialled now, while the query still knows the addresses it was told; a peer
                // reached only through the relay waits for a direct connection.
                let waiting = !ready && (self.has_relayed(peer) || self.swarm.dial(*peer).is_ok());
                let lookup = self.lookups.get_mut(&id).expect("checked above");
                if ready {
                    lookup.ready.push(*peer);
                } else if waiting {
                    lookup.dialing.insert(*peer);
                }
            }
        }
        if last && let Some(lookup) = self.lookups.get_mut(&id) {
            lookup.query_done = true;
        }
        if let kad::QueryResult::StartProviding(Err(e)) = &result {
            tracing::debug!(error = %e, "announcing a blob reached no DHT peer");
        }
        self.settle_lookups();
    }

    /// Whether a connection to `peer` through the relay is open.
    fn has_relayed(&self, peer: &PeerId) -> bool {
        self.relayed.get(peer).is_some_and(|c| !c.is_empty())
    }

    /// Whether a direct (not relayed) connection to `peer` is open.
    fn has_direct(&self, peer: &PeerId) -> bool {
        self.direct.get(peer).is_some_and(|n| *n > 0)
    }

    /// Sends this node's provider records again, with the addresses it now has.
    fn provide_again(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let keys: Vec<kad::RecordKey> = kad.store_mut().provided().map(|r| r.key.clone()).collect();
        for key in keys {
            let _ = kad.start_providing(key);
        }
    }

    /// Answers the lookups that are complete or out of time.
    fn settle_lookups(&mut self) {
        let now = Instant::now();
        let done: Vec<kad::QueryId> = self
            .lookups
            .iter()
            .filter(|(_, l)| (l.query_done && l.dialing.is_empty()) || now >= l.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let lookup = self.lookups.remove(&id).expect("listed above");
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
            let _ = lookup.reply.send(lookup.ready);
        }
    }

    /// Says in plain words whether other peers can reach this node, and if they cannot,
    /// listens through the coordinator's relay.
    fn on_reachability(&mut self, status: autonat::NatStatus) {
        match status {
            autonat::NatStatus::Public(addr) => {
                let words = "public: other peers can download checkpoints from this node";
                tracing::info!(%addr, "reachability: {words}");
                self.reachability.send_replace(words.to_string());
            }
            autonat::NatStatus::Private if !self.listening_via_relay => {
                let words = "behind NAT or a firewall: listening through the coordinator's relay (no port forwarding needed)";
                tracing::info!("reachability: {words}");
                self.reachability.send_replace(words.to_string());
                let circuit = self.coordinator_addr.clone().with(Protocol::P2pCircuit);
                match self.swarm.listen_on(circuit) {
                    Ok(_) => self.listening_via_relay = true,
                    Err(e) => tracing::warn!(error = %e, "cannot listen through the relay"),
                }
            }
            _ => {}
        }
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
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
fn settle<Req, Resp>(
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
