//! Requests on `/herd/rpc/4`: leases asked for and returned, and what is published. A
//! submission is handed to [`super::submissions`], a check report to [`super::checking`].

use herd_protocol::messages::{
    LeaseRequest, MAX_TEXT_BYTES, PROTOCOL_VERSION, RpcRequest, RpcResponse, now_ms,
};
use herd_protocol::net::Behaviour;
use libp2p::Swarm;
use libp2p::request_response::ResponseChannel;

use super::Coordinator;
use crate::lease::lease_for;
use crate::round::{Action, Event, PeerKey};
use crate::store::GrantRecord;
use crate::verify::reputation::Standing;
use herd_protocol::admission::Challenge;

/// When a node that asked only for checks asks again if none was waiting.
const CHECK_POLL_MS: u64 = 1_000;

/// Takes the one action that answers the request just handled out of `actions` (the first
/// that `answers` picks); the rest are the machine's other work, carried out as usual.
pub(super) fn split_answer(
    actions: Vec<Action>,
    answers: impl Fn(&Action) -> bool,
) -> (Option<Action>, Vec<Action>) {
    let mut answer = None;
    let rest = actions
        .into_iter()
        .filter_map(|a| {
            if answer.is_none() && answers(&a) {
                answer = Some(a);
                None
            } else {
                Some(a)
            }
        })
        .collect();
    (answer, rest)
}

impl Coordinator {
    pub(super) fn on_rpc(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer: PeerKey,
        request: RpcRequest,
        channel: ResponseChannel<RpcResponse>,
    ) {
        let now = now_ms();
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_seen_ms = now;
        }
        // Submissions and check reports are answers to work this coordinator handed out, at
        // most one per lease or check held (anything else is refused after a lookup); a
        // limited one would be work thrown away.
        let answers_work = matches!(request, RpcRequest::Submit(_) | RpcRequest::Report(_));
        if !answers_work && let Err(wait_ms) = self.rate_limits.take(peer, now) {
            let response = match request {
                RpcRequest::Lease(_) => RpcResponse::NoWork {
                    retry_after_ms: wait_ms,
                    finished: false,
                    reason: "too many requests".into(),
                },
                _ => RpcResponse::Refused {
                    reason: format!("too many requests: ask again in {wait_ms} ms"),
                },
            };
            let _ = swarm.behaviour_mut().rpc.send_response(channel, response);
            return;
        }
        let event = match request {
            RpcRequest::Lease(req) => match self.admit(swarm.local_peer_id(), &peer, &req) {
                Ok(trusted) => {
                    // A waiting check goes first: a round waits on it.
                    let answer = match trusted.then(|| self.check_lease_for(peer, now)) {
                        Some(Some(lease)) => Some(RpcResponse::Lease(Box::new(lease))),
                        // Its last submission still waits for a verdict: no shard yet.
                        _ if req.checks_only => Some(RpcResponse::NoWork {
                            retry_after_ms: CHECK_POLL_MS,
                            finished: self.machine.is_finished(),
                            reason: "no check waiting".into(),
                        }),
                        _ => None,
                    };
                    if let Some(answer) = answer {
                        let _ = swarm.behaviour_mut().rpc.send_response(channel, answer);
                        return;
                    }
                    Event::LeaseRequested { peer, trusted }
                }
                Err(response) => {
                    let _ = swarm.behaviour_mut().rpc.send_response(channel, response);
                    return;
                }
            },
            RpcRequest::Return { lease } => Event::Returned { peer, lease },
            RpcRequest::Submit(sub) => return self.on_submission(swarm, peer, *sub, channel),
            RpcRequest::Published { checkpoint } => {
                let response = self.published(checkpoint);
                let _ = swarm.behaviour_mut().rpc.send_response(channel, response);
                return;
            }
            RpcRequest::Report(report) => return self.on_report(swarm, peer, *report, channel),
        };
        let actions = self.machine.handle(event, now_ms());
        let (answer, rest) = split_answer(actions, |a| {
            matches!(
                a,
                Action::Grant { .. } | Action::NoWork { .. } | Action::Returned { .. }
            )
        });
        if let Some(response) = answer.and_then(|a| self.lease_answer(a)) {
            let _ = swarm.behaviour_mut().rpc.send_response(channel, response);
        }
        self.carry_out(swarm, rest);
        self.publish_status(); // a grant or return changed the leases even without other actions
    }

    /// Whether `peer` may ask for work: it speaks this protocol version, its request is
    /// within the caps, it is not banned, and it has paid its admission. Remembers the device
    /// it says it trains on. `Ok(trusted)`: whether it is in good standing.
    fn admit(
        &mut self,
        coordinator: &PeerKey,
        peer: &PeerKey,
        req: &LeaseRequest,
    ) -> Result<bool, RpcResponse> {
        let refuse = |reason: String| Err(RpcResponse::Refused { reason });
        if req.version != PROTOCOL_VERSION {
            tracing::warn!(%peer, version = req.version, "refused a node speaking another protocol version");
            return refuse(format!(
                "protocol version {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
                req.version
            ));
        }
        if !req.is_well_formed() {
            return refuse(format!(
                "the device description is longer than {MAX_TEXT_BYTES} bytes"
            ));
        }
        let reputation = self.ledger.reputation();
        if let Some(why) = reputation.banned(peer) {
            return refuse(format!("this node is banned from the run: {why}"));
        }
        let bits = self.cfg.network.admission_bits;
        let challenge = Challenge {
            run: &self.cfg.run,
            coordinator,
            peer,
        };
        if !req
            .admission
            .is_some_and(|proof| challenge.accepts(&proof, bits))
        {
            return Err(RpcResponse::AdmissionRequired {
                run: self.cfg.run.clone(),
                bits,
            });
        }
        let trusted = reputation.standing(peer) == Standing::Trusted;
        let presence = self.peers.entry(*peer).or_default();
        if presence.device != req.device {
            presence.device = req.device.clone();
            self.publish_peer(peer);
        }
        Ok(trusted)
    }

    /// The answer to a lease request or return. A grant is committed to the store first;
    /// if that fails there is no answer: the node asks again, and the lease expires here.
    fn lease_answer(&mut self, action: Action) -> Option<RpcResponse> {
        match action {
            Action::Grant { grant, peer } => {
                let record = GrantRecord {
                    peer: peer.to_string(),
                    round: grant.round.0,
                    shard: grant.shard.0,
                    expires_at_ms: grant.expires_at_ms,
                };
                if let Err(e) = self.store.record_lease(grant.lease.0, &record) {
                    tracing::error!(error = %e, "cannot record a lease; not answering");
                    return None;
                }
                let lease = lease_for(&self.cfg, &self.publisher.assets, &grant);
                self.leases.insert(lease.id, lease.clone());
                self.status_tx.send_modify(|s| s.leases_granted += 1);
                Some(RpcResponse::Lease(Box::new(lease)))
            }
            Action::NoWork {
                retry_after_ms,
                finished,
                reason,
                ..
            } => Some(RpcResponse::NoWork {
                retry_after_ms,
                finished,
                reason,
            }),
            Action::Returned {
                lease, released, ..
            } => {
                if released {
                    tracing::info!(%lease, "lease returned; its shard goes to the next node that asks");
                    self.end_lease_record(lease);
                }
                Some(RpcResponse::Returned)
            }
            _ => None,
        }
    }

    /// What `herd-node pull` is told: the base model and checkpoint `name` (the latest when
    /// `None`), or why not.
    fn published(&self, name: Option<String>) -> RpcResponse {
        match self
            .publisher
            .published(&self.run_state.checkpoints, name.as_deref())
        {
            Some(published) => RpcResponse::Published(Box::new(published)),
            None => RpcResponse::Refused {
                reason: format!(
                    "run `{}` has no checkpoint {:?}",
                    self.cfg.run,
                    name.unwrap_or_default()
                ),
            },
        }
    }
}
