//! The libp2p side both node and coordinator run: TCP and QUIC with noise and yamux, identify,
//! ping, request-response for `/herd/rpc/4` and `/herd/blob/2` (length-prefixed bincode with
//! per-message caps), gossipsub for round announcements, a kademlia DHT of its own
//! (`/herd/kad/1`) where peers say which blobs they hold, and what lets peers behind NAT take
//! part: AutoNAT (am I reachable?), a circuit relay served by the coordinator, and DCUtR (hole
//! punching through it); plus persistent identities.

use std::io;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub,
    identify, kad, memory_connection_limits, noise, ping, relay, tcp, yamux,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::framing::{
    ByteBudget, ReadLimits, decode, encode, read_frame, read_frame_limited, write_frame,
};
use crate::messages::*;

/// Errors of setting up networking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("building the libp2p swarm: {0}")]
    Build(String),
    #[error("identity key {path}: {problem}")]
    Identity { path: String, problem: String },
    #[error("listen address `{addr}`: {problem}")]
    Listen { addr: String, problem: String },
}

/// Listens on each of `addrs` (multiaddrs as text); the first that does not parse or cannot be
/// listened on is the error.
pub fn listen_on_all(swarm: &mut Swarm<Behaviour>, addrs: &[String]) -> Result<(), NetError> {
    for addr in addrs {
        let err = |problem: String| NetError::Listen {
            addr: addr.clone(),
            problem,
        };
        let parsed: libp2p::Multiaddr = addr
            .parse()
            .map_err(|e| err(format!("not a multiaddr: {e}")))?;
        swarm
            .listen_on(parsed)
            .map_err(|e| err(format!("cannot listen: {e}")))?;
    }
    Ok(())
}

/// What an inbound request may be: `small` bytes, or `large` for the one kind whose bincode
/// tag is `large_tag` (a submission), or the cap of `medium` for its kind (a check report);
/// bodies being read hold at most `budget` together.
#[derive(Debug, Clone)]
pub struct RequestCaps {
    pub small: usize,
    pub large_tag: Option<u8>,
    pub large: usize,
    pub medium: Option<(u8, usize)>,
    pub budget: Option<Arc<ByteBudget>>,
}

impl RequestCaps {
    fn cap_for_tag(&self, tag: u8) -> usize {
        match self.medium {
            _ if self.large_tag == Some(tag) => self.large,
            Some((medium_tag, cap)) if medium_tag == tag => cap,
            _ => self.small,
        }
    }
}

/// A request-response codec: one length-prefixed bincode frame each way. Requests are capped by
/// [`RequestCaps`] (never over `REQ`), responses at `RESP` bytes; both are checked before the
/// body is read (see [`read_frame_limited`]).
pub struct FramedCodec<Req, Resp, const REQ: usize, const RESP: usize> {
    caps: RequestCaps,
    types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp, const REQ: usize, const RESP: usize> FramedCodec<Req, Resp, REQ, RESP> {
    pub fn new(caps: RequestCaps) -> Self {
        FramedCodec {
            caps,
            types: PhantomData,
        }
    }
}

impl<Req, Resp, const REQ: usize, const RESP: usize> Default for FramedCodec<Req, Resp, REQ, RESP> {
    fn default() -> Self {
        FramedCodec::new(RequestCaps {
            small: REQ,
            large_tag: None,
            large: REQ,
            medium: None,
            budget: None,
        })
    }
}

impl<Req, Resp, const REQ: usize, const RESP: usize> Clone for FramedCodec<Req, Resp, REQ, RESP> {
    fn clone(&self) -> Self {
        FramedCodec::new(self.caps.clone())
    }
}

impl<Req, Resp, const REQ: usize, const RESP: usize> std::fmt::Debug
    for FramedCodec<Req, Resp, REQ, RESP>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FramedCodec<{REQ}, {RESP}>({:?})", self.caps)
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
        let caps = &self.caps;
        let limits = ReadLimits {
            max: caps
                .small
                .max(caps.large)
                .max(caps.medium.map_or(0, |(_, cap)| cap))
                .min(REQ),
            cap_for_tag: &|tag| caps.cap_for_tag(tag),
            budget: caps.budget.as_deref(),
            prompt_start: true,
        };
        // Log refusals here: libp2p drops inbound read errors without an event.
        let request = match read_frame_limited(io, limits).await {
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
    /// Connection counts (first: a refused connection never reaches the others).
    pub limits: connection_limits::Behaviour,
    pub memory: Toggle<memory_connection_limits::Behaviour>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub rpc: request_response::Behaviour<RpcCodec>,
    pub blob: request_response::Behaviour<BlobCodec>,
    pub gossipsub: gossipsub::Behaviour,
    /// Who holds which blob (provider records keyed by content id).
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub autonat: autonat::Behaviour,
    /// Serves relayed connections: the coordinator only.
    pub relay: Toggle<relay::Behaviour>,
    /// Listens through a relay when AutoNAT says this peer is not reachable.
    pub relay_client: relay::client::Behaviour,
    pub dcutr: dcutr::Behaviour,
}

/// Herd's own DHT: it must not mix with the public IPFS one.
pub const KAD_PROTOCOL: &str = "/herd/kad/1";

/// Which side of `/herd/rpc/4` this peer is. Blobs are served by everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Node,
}

/// How a swarm is set up beyond its role.
#[derive(Debug, Clone, Default)]
pub struct NetOptions {
    /// Treat private and loopback addresses as reachable when answering AutoNAT dial-back
    /// requests: for a LAN, containers, or a test on one machine. Off on the internet, where a
    /// private address says nothing about reachability.
    pub lan: bool,
    pub limits: Limits,
}

/// What strangers may hold of this peer: connections, streams and bytes in flight.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Established inbound connections, all peers together.
    pub max_incoming: u32,
    /// Inbound connections still in their handshake.
    pub max_pending_incoming: u32,
    /// Established connections with any one peer.
    pub max_per_peer: u32,
    /// Inbound `/herd/rpc` requests a connection may have open at once.
    pub rpc_streams_per_connection: usize,
    /// Largest submission this peer takes (a coordinator: its run's largest honest one).
    pub submission_bytes: usize,
    /// Bytes that inbound submission bodies may hold at once, over every connection.
    pub inflight_bytes: usize,
    /// Refuse new connections while the process holds more than this (0: no such limit).
    pub max_process_memory_bytes: usize,
}

impl Default for Limits {
    /// A node's limits: it serves blobs and answers dial-backs, and takes no submissions.
    fn default() -> Self {
        Limits {
            max_incoming: 256,
            max_pending_incoming: 64,
            max_per_peer: 4,
            rpc_streams_per_connection: 8,
            submission_bytes: MAX_SMALL_REQUEST_BYTES,
            inflight_bytes: 16 << 20,
            max_process_memory_bytes: 0,
        }
    }
}

impl Limits {
    fn rpc_caps(&self) -> RequestCaps {
        RequestCaps {
            small: MAX_SMALL_REQUEST_BYTES,
            large_tag: Some(SUBMIT_TAG),
            medium: Some((REPORT_TAG, MAX_REPORT_REQUEST_BYTES)),
            large: self
                .submission_bytes
                .clamp(MAX_SMALL_REQUEST_BYTES, MAX_RPC_REQUEST_BYTES),
            budget: Some(ByteBudget::new(self.inflight_bytes)),
        }
    }

    fn connection_limits(&self) -> connection_limits::ConnectionLimits {
        connection_limits::ConnectionLimits::default()
            .with_max_established_incoming(Some(self.max_incoming))
            .with_max_pending_incoming(Some(self.max_pending_incoming))
            .with_max_established_per_peer(Some(self.max_per_peer))
    }
}

/// How long a request may take before it fails; a delta upload on a slow home line included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds the swarm: TCP and QUIC, noise, yamux, a relay client transport, and [`Behaviour`].
pub fn build_swarm(
    keypair: Keypair,
    role: Role,
    options: NetOptions,
) -> Result<Swarm<Behaviour>, NetError> {
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
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?
        .with_behaviour(|key, relay_client| {
            let local = key.public().to_peer_id();
            let rpc_support = match role {
                Role::Coordinator => ProtocolSupport::Inbound,
                Role::Node => ProtocolSupport::Outbound,
            };
            let rr_config =
                request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT);
            let rpc_config = rr_config
                .clone()
                .with_max_concurrent_streams(options.limits.rpc_streams_per_connection);
            let gossip_config = gossipsub::ConfigBuilder::default()
                .max_transmit_size(MAX_ANNOUNCE_BYTES)
                .validation_mode(gossipsub::ValidationMode::Strict)
                .heartbeat_interval(Duration::from_millis(500))
                .build()?;
            let limits = &options.limits;
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits.connection_limits()),
                memory: Toggle::from((limits.max_process_memory_bytes > 0).then(|| {
                    memory_connection_limits::Behaviour::with_max_bytes(
                        limits.max_process_memory_bytes,
                    )
                })),
                identify: identify::Behaviour::new(identify::Config::new(
                    format!("/herd/{PROTOCOL_VERSION}"),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                rpc: request_response::Behaviour::with_codec(
                    RpcCodec::new(options.limits.rpc_caps()),
                    [(StreamProtocol::new(RPC_PROTOCOL), rpc_support)],
                    rpc_config,
                ),
                blob: request_response::Behaviour::new(
                    [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Full)],
                    rr_config,
                ),
                gossipsub: gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                )?,
                kad: kademlia(local),
                autonat: autonat::Behaviour::new(
                    local,
                    autonat::Config {
                        // Nodes ask the coordinator (added as a server), not whoever they meet.
                        use_connected: false,
                        boot_delay: Duration::from_secs(1),
                        only_global_ips: !options.lan,
                        ..Default::default()
                    },
                ),
                relay: Toggle::from(
                    (role == Role::Coordinator)
                        .then(|| relay::Behaviour::new(local, relay::Config::default())),
                ),
                relay_client,
                dcutr: dcutr::Behaviour::new(local),
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

/// A kademlia behaviour on herd's own protocol. Provider records are re-published hourly and
/// live a day (libp2p's defaults are for the IPFS network's churn; a run's peers are fewer).
fn kademlia(local: PeerId) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    config.set_query_timeout(Duration::from_secs(10));
    config.set_provider_publication_interval(Some(Duration::from_secs(3600)));
    config.set_provider_record_ttl(Some(Duration::from_secs(24 * 3600)));
    kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), config)
}

/// The content id as a DHT key.
pub fn blob_key(id: &crate::ContentId) -> kad::RecordKey {
    kad::RecordKey::new(&id.0)
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
