//! The node's handle on the network loop: a cloneable [`Client`] whose every request is a
//! [`Command`] sent over a bounded channel, answered by the loop through a oneshot.

use herd_protocol::ContentId;
use herd_protocol::messages::{BlobRequest, BlobResponse, RpcRequest, RpcResponse};
use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot, watch};

use super::NetFailure;

/// Where the loop sends the answer to one request.
pub(super) type Reply<T> = oneshot::Sender<Result<T, NetFailure>>;

/// What a [`Client`] asks of the loop.
pub(super) enum Command {
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
    pub(super) fn new(
        tx: mpsc::Sender<Command>,
        coordinator: PeerId,
        reachability: watch::Receiver<String>,
    ) -> Self {
        Client {
            tx,
            coordinator,
            reachability,
        }
    }

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
