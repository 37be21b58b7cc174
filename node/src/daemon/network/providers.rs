//! Blob providers in the DHT: announcing what this node holds, and provider lookups. A lookup
//! dials the providers its query finds and answers once the query is over and each of them is
//! connected (or failed to be), or at its deadline with those that are.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use herd_protocol::ContentId;
use herd_protocol::net::{Behaviour, blob_key};
use libp2p::kad::store::RecordStore;
use libp2p::{PeerId, Swarm, kad};
use tokio::sync::oneshot;

use super::reachability::Reachability;

/// How long a provider lookup may take before it answers with what it found.
const PROVIDER_LOOKUP: Duration = Duration::from_secs(5);

/// A provider lookup in flight.
struct Lookup {
    reply: oneshot::Sender<Vec<PeerId>>,
    /// Providers connected directly, ready to ask.
    ready: Vec<PeerId>,
    /// Providers being dialled, or reached only through the relay so far.
    dialing: HashSet<PeerId>,
    query_done: bool,
    deadline: Instant,
}

/// The provider lookups in flight, by DHT query.
#[derive(Default)]
pub(super) struct Lookups(HashMap<kad::QueryId, Lookup>);

impl Lookups {
    /// Starts looking for the providers of blob `id`; `reply` gets them.
    pub(super) fn start(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        id: &ContentId,
        reply: oneshot::Sender<Vec<PeerId>>,
    ) {
        let query = swarm.behaviour_mut().kad.get_providers(blob_key(id));
        self.0.insert(
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

    /// A direct connection to `peer` is open: lookups waiting for it have it ready.
    pub(super) fn connected(&mut self, peer: PeerId) {
        for lookup in self.0.values_mut() {
            if lookup.dialing.remove(&peer) {
                lookup.ready.push(peer);
            }
        }
    }

    /// `peer` cannot be reached: lookups stop waiting for it.
    pub(super) fn unreachable(&mut self, peer: &PeerId) {
        for lookup in self.0.values_mut() {
            lookup.dialing.remove(peer);
        }
    }

    /// A DHT query moved on: the providers it found are ready if directly connected, else
    /// dialled; `last` ends the query.
    pub(super) fn on_query(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        reachability: &Reachability,
        id: kad::QueryId,
        result: kad::QueryResult,
        last: bool,
    ) {
        let local = *swarm.local_peer_id();
        if let kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
            providers,
            ..
        })) = &result
            && let Some(lookup) = self.0.get_mut(&id)
        {
            for peer in providers.iter().filter(|p| **p != local) {
                if lookup.ready.contains(peer) || lookup.dialing.contains(peer) {
                    continue;
                }
                let ready = reachability.has_direct(peer);
                // Dialled now, while the query still knows the addresses it was told; a peer
                // reached only through the relay waits for a direct connection.
                let waiting =
                    !ready && (reachability.has_relayed(peer) || swarm.dial(*peer).is_ok());
                if ready {
                    lookup.ready.push(*peer);
                } else if waiting {
                    lookup.dialing.insert(*peer);
                }
            }
        }
        if last && let Some(lookup) = self.0.get_mut(&id) {
            lookup.query_done = true;
        }
        if let kad::QueryResult::StartProviding(Err(e)) = &result {
            tracing::debug!(error = %e, "announcing a blob reached no DHT peer");
        }
        self.answer_finished(swarm);
    }

    /// Answers the lookups that are complete or out of time.
    pub(super) fn answer_finished(&mut self, swarm: &mut Swarm<Behaviour>) {
        let now = Instant::now();
        let done: Vec<kad::QueryId> = self
            .0
            .iter()
            .filter(|(_, l)| (l.query_done && l.dialing.is_empty()) || now >= l.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let lookup = self.0.remove(&id).expect("listed above");
            if let Some(mut query) = swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
            let _ = lookup.reply.send(lookup.ready);
        }
    }
}

/// Tells the DHT this node provides blob `id`.
pub(super) fn provide(swarm: &mut Swarm<Behaviour>, id: &ContentId) {
    if let Err(e) = swarm.behaviour_mut().kad.start_providing(blob_key(id)) {
        tracing::warn!(%id, error = %e, "cannot announce a blob in the DHT");
    }
}

/// Sends this node's provider records again, with the addresses it now has.
pub(super) fn provide_again(swarm: &mut Swarm<Behaviour>) {
    let kad = &mut swarm.behaviour_mut().kad;
    let keys: Vec<kad::RecordKey> = kad.store_mut().provided().map(|r| r.key.clone()).collect();
    for key in keys {
        let _ = kad.start_providing(key);
    }
}
