//! Whether other peers can reach this node, and the connections that make it so. AutoNAT asks
//! the coordinator whether this node can be dialled; if not, the node listens through the
//! coordinator's relay. A peer that arrives through the relay is dialled back directly
//! (connection reversal: no hole to punch when one side is public) while DCUtR punches a hole
//! when both are behind NAT; once a direct connection is open, the relayed ones are closed (the
//! relay caps what a circuit may carry, and request-response spreads requests over every
//! connection to a peer).

use std::collections::{HashMap, HashSet};

use herd_protocol::net::Behaviour;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, relay};
use tokio::sync::watch;

/// This node's connections by kind, and what AutoNAT said of it.
pub(super) struct Reachability {
    /// Where [`super::Client::reachability`] reads from.
    words: watch::Sender<String>,
    listening_via_relay: bool,
    /// Connections through the relay, by peer: closed once a direct one opens.
    relayed: HashMap<PeerId, Vec<ConnectionId>>,
    /// Direct (not relayed) connections open, by peer.
    direct: HashMap<PeerId, usize>,
    /// Peers that reached this node through the relay, to dial back directly once identify
    /// says where they listen.
    dial_back: HashSet<PeerId>,
}

impl Reachability {
    pub(super) fn new(words: watch::Sender<String>) -> Self {
        Reachability {
            words,
            listening_via_relay: false,
            relayed: HashMap::new(),
            direct: HashMap::new(),
            dial_back: HashSet::new(),
        }
    }

    /// Notes a new connection; returns whether it is direct. A relayed one is closed at once if
    /// a direct one is open, else kept until a direct one follows (reversal or hole punching);
    /// a direct one closes the peer's relayed ones.
    pub(super) fn established(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        endpoint: &ConnectedPoint,
        connection: ConnectionId,
    ) -> bool {
        if endpoint.is_relayed() {
            if self.has_direct(&peer) {
                swarm.close_connection(connection);
            } else {
                self.relayed.entry(peer).or_default().push(connection);
                if !endpoint.is_dialer() {
                    self.dial_back.insert(peer);
                }
            }
            return false;
        }
        *self.direct.entry(peer).or_default() += 1;
        for id in self.relayed.remove(&peer).unwrap_or_default() {
            swarm.close_connection(id);
        }
        true
    }

    /// Notes a closed connection; `remaining` is how many the peer still has.
    pub(super) fn closed(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        endpoint: &ConnectedPoint,
        remaining: u32,
    ) {
        if endpoint.is_relayed() {
            if let Some(ids) = self.relayed.get_mut(&peer) {
                ids.retain(|c| *c != connection);
            }
        } else if let Some(n) = self.direct.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        if remaining == 0 {
            self.dial_back.remove(&peer);
        }
    }

    /// Whether a connection to `peer` through the relay is open.
    pub(super) fn has_relayed(&self, peer: &PeerId) -> bool {
        self.relayed.get(peer).is_some_and(|c| !c.is_empty())
    }

    /// Whether a direct (not relayed) connection to `peer` is open.
    pub(super) fn has_direct(&self, peer: &PeerId) -> bool {
        self.direct.get(peer).is_some_and(|n| *n > 0)
    }

    /// Identify said where `peer` listens: if it reached this node only through the relay, it
    /// may itself be reachable, so it is dialled directly.
    pub(super) fn dial_back(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerId,
        listen_addrs: &[Multiaddr],
    ) {
        if !self.dial_back.remove(&peer) || listen_addrs.is_empty() {
            return;
        }
        let direct = DialOpts::peer_id(peer)
            .addresses(
                listen_addrs
                    .iter()
                    .filter(|a| !is_relayed(a))
                    .cloned()
                    .collect(),
            )
            // Hole punching may be dialling it at the same moment, to no avail when this side
            // is behind NAT and the other is not.
            .condition(PeerCondition::Always)
            .build();
        tracing::debug!(peer = %peer, "reached through the relay: dialling it directly");
        if let Err(e) = swarm.dial(direct) {
            tracing::debug!(peer = %peer, error = %e, "cannot dial it directly");
        }
    }

    /// Says in plain words whether other peers can reach this node, and if they cannot,
    /// listens through the coordinator's relay (at `coordinator_addr`).
    pub(super) fn on_nat_status(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        coordinator_addr: &Multiaddr,
        status: autonat::NatStatus,
    ) {
        match status {
            autonat::NatStatus::Public(addr) => {
                let words = "public: other peers can download checkpoints from this node";
                tracing::info!(%addr, "reachability: {words}");
                self.words.send_replace(words.to_string());
            }
            autonat::NatStatus::Private if !self.listening_via_relay => {
                let words = "behind NAT or a firewall: listening through the coordinator's relay (no port forwarding needed)";
                tracing::info!("reachability: {words}");
                self.words.send_replace(words.to_string());
                let circuit = coordinator_addr.clone().with(Protocol::P2pCircuit);
                match swarm.listen_on(circuit) {
                    Ok(_) => self.listening_via_relay = true,
                    Err(e) => tracing::warn!(error = %e, "cannot listen through the relay"),
                }
            }
            _ => {}
        }
    }
}

/// Logs how hole punching went. A punched hole arrives as a direct connection; a failure leaves
/// a provider lookup waiting for the other side's reversal dial until its deadline.
pub(super) fn on_hole_punch(event: dcutr::Event) {
    let dcutr::Event {
        remote_peer_id,
        result,
    } = event;
    match result {
        Ok(_) => tracing::debug!(peer = %remote_peer_id, "hole punched"),
        Err(e) => tracing::debug!(peer = %remote_peer_id, error = %e, "hole punching failed"),
    }
}

/// Logs the relay's acceptance of this node's reservation.
pub(super) fn on_relay_client(event: relay::client::Event) {
    if let relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } = event {
        tracing::debug!(relay = %relay_peer_id, "relay reservation accepted");
    }
}

/// Whether `addr` goes through a relay.
pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}
