//! The libp2p side both node and coordinator run: TCP and QUIC with noise and yamux, identify,
//! ping, request-response for `/herd/rpc/1` and `/herd/blob/1` (length-prefixed bincode with
//! per-message caps), gossipsub for round announcements; plus persistent identities.

use std::io;
use std::marker::PhantomData;
use std::path::Path;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, noise, ping, tcp, yamux,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::framing::{decode, encode, read_frame, write_frame};
use crate::messages::*;

/// Errors of setting up networking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("building the libp2p swarm: {0}")]
    Build(String),
    #[error("identity key {path}: {problem}")]
    Identity { path: String, problem: String },
}

/// A request-response codec: one length-prefixed bincode frame each way, capped at `REQ` and
/// `RESP` bytes (checked before allocating).
pub struct FramedCodec<Req, Resp, const REQ: usize, const RESP: usize>(
    PhantomData<fn() -> (Req, Resp)>,
);

impl<Req, Resp, const REQ: usize, const RESP: usize> Default for FramedCodec<Req, Resp, REQ, RESP> {
    fn default() -> Self {
        FramedCodec(PhantomData)
    }
}

impl<Req, Resp, const REQ: usize, const RESP: usize> Clone for FramedCodec<Req, Resp, REQ, RESP> {
    fn clone(&self) -> Self {
        FramedCodec(PhantomData)
    }
}

impl<Req, Resp, const REQ: usize, const RESP: usize> std::fmt::Debug
    for FramedCodec<Req, Resp, REQ, RESP>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FramedCodec<{REQ}, {RESP}>")
    }
}

impl<Req, Resp, const REQ: usize, const RESP: usize> request_response::Codec
    for FramedCodec<Req, Resp, REQ, RESP>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        // Log refusals here: libp2p drops inbound read errors without an event.
        let request = match read_frame(io, REQ).await {
            Ok(body) => decode::<Req, REQ>(&body).map_err(std::io::Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = &request {
            tracing::warn!(error = %e, "refused an inbound request");
        }
        request
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, RESP).await?;
        Ok(decode::<Resp, RESP>(&body)?)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &encode(&req)?, REQ).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &encode(&res)?, RESP).await
    }
}

pub type RpcCodec =
    FramedCodec<RpcRequest, RpcResponse, MAX_RPC_REQUEST_BYTES, MAX_RPC_RESPONSE_BYTES>;
pub type BlobCodec =
    FramedCodec<BlobRequest, BlobResponse, MAX_BLOB_REQUEST_BYTES, MAX_BLOB_RESPONSE_BYTES>;

/// Every protocol herd speaks, one field each.
#[allow(missing_debug_implementations)] // the derive also generates the event enum
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub rpc: request_response::Behaviour<RpcCodec>,
    pub blob: request_response::Behaviour<BlobCodec>,
    pub gossipsub: gossipsub::Behaviour,
}

/// Which side of `/herd/rpc/1` this peer is. Blobs are served by everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Node,
}

/// How long a request may take before it fails; a delta upload on a slow home line included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the swarm: TCP and QUIC, noise, yamux, and [`Behaviour`].
pub fn build_swarm(keypair: Keypair, role: Role) -> Result<Swarm<Behaviour>, NetError> {
    let build = |e: &dyn std::fmt::Display| NetError::Build(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| build(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let rpc_support = match role {
                Role::Coordinator => ProtocolSupport::Inbound,
                Role::Node => ProtocolSupport::Outbound,
            };
            let rr_config =
                request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT);
            let gossip_config = gossipsub::ConfigBuilder::default()
                .max_transmit_size(MAX_ANNOUNCE_BYTES)
                .validation_mode(gossipsub::ValidationMode::Strict)
                .heartbeat_interval(Duration::from_millis(500))
                .build()?;
            Ok(Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    format!("/herd/{PROTOCOL_VERSION}"),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                rpc: request_response::Behaviour::new(
                    [(StreamProtocol::new(RPC_PROTOCOL), rpc_support)],
                    rr_config.clone(),
                ),
                blob: request_response::Behaviour::new(
                    [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Full)],
                    rr_config,
                ),
                gossipsub: gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                )?,
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

/// The PeerId a multiaddr pins with its trailing `/p2p/<id>`, if any.
pub fn pinned_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Loads the ed25519 identity at `path`, or creates one there (mode 0600) if absent.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, NetError> {
    let err = |problem: String| NetError::Identity {
        path: path.display().to_string(),
        problem,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| err(format!("not a libp2p key: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
            write_private(path, &bytes).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let a = load_or_create_identity(&path).unwrap();
        let b = load_or_create_identity(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(
            load_or_create_identity(&path)
                .unwrap_err()
                .to_string()
                .contains("not a libp2p key")
        );
    }

    #[test]
    fn pinned_peer_is_read_from_the_multiaddr() {
        let key = Keypair::generate_ed25519();
        let id = key.public().to_peer_id();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}").parse().unwrap();
        assert_eq!(pinned_peer(&addr), Some(id));
        assert_eq!(
            pinned_peer(&"/ip4/127.0.0.1/tcp/4001".parse().unwrap()),
            None
        );
    }
}
