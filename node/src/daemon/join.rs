//! Joining a run's network as a peer, for the daemon and for `herd-node pull`: where the node
//! keeps its state, its identity and blob cache there, and the network loop that talks to the
//! coordinator and serves the cache.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use herd_protocol::messages::RoundAnnouncement;
use herd_protocol::net::{
    NetOptions, Role, build_swarm, listen_on_all, load_or_create_identity, pinned_peer,
};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::cache::BlobCache;
use super::network::{self, Client, NetFailure};

/// Where this node keeps its state and listens: shared by `run` and `pull`.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// A TOML file of settings: the long flags as keys (default: ~/.config/herd/node.toml, if
    /// it exists); the command line and the environment win over it.
    #[arg(long, env = "HERD_CONFIG")]
    config: Option<PathBuf>,
    /// Where the identity key and the blob cache live (default: $XDG_DATA_HOME/herd-node).
    #[arg(long, env = "HERD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Addresses to listen on, so other peers can fetch blobs from this node (repeatable).
    #[arg(
        long,
        env = "HERD_LISTEN",
        value_delimiter = ',',
        default_values_t = ["/ip4/0.0.0.0/tcp/0".to_string(), "/ip4/0.0.0.0/udp/0/quic-v1".to_string()]
    )]
    listen: Vec<String>,
}

/// `$XDG_DATA_HOME/herd-node`, or `~/.local/share/herd-node`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("herd-node")
}

/// A node's link to a run: its identity, its blob cache, and the network loop.
pub struct Joined {
    pub data_dir: PathBuf,
    pub keypair: Keypair,
    pub addr: Multiaddr,
    pub coordinator: PeerId,
    pub cache: BlobCache,
    pub client: Client,
    /// The network loop; it ends once every [`Client`] is dropped.
    pub net: JoinHandle<()>,
    pub announced: mpsc::Receiver<RoundAnnouncement>,
}

/// Checks the coordinator's address, loads (or makes) this node's identity and cache, and
/// starts the network loop; blobs already cached are announced in the DHT.
pub async fn join(coordinator: &str, args: &PeerArgs) -> Result<Joined> {
    let addr: Multiaddr = coordinator
        .parse()
        .with_context(|| format!("--coordinator `{coordinator}` is not a multiaddr"))?;
    let Some(peer) = pinned_peer(&addr) else {
        bail!(
            "--coordinator must end with /p2p/<PeerId> so the node knows whom it talks to (the coordinator prints its full address at start)"
        );
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let keypair = load_or_create_identity(&data_dir.join("identity.key"))?;
    tracing::info!(peer = %keypair.public().to_peer_id(), data_dir = %data_dir.display(), "herd node starting");
    let mut swarm = build_swarm(keypair.clone(), Role::Node, NetOptions::default())?;
    // Listening lets other peers fetch blobs from this node (AutoNAT tells whether they can).
    listen_on_all(&mut swarm, &args.listen).context("--listen")?;
    let topic = libp2p::gossipsub::IdentTopic::new(herd_protocol::messages::ANNOUNCE_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
    let cache = BlobCache::open(data_dir.join("cache"))?;
    let (client, event_loop, announced) = network::new(swarm, peer, addr.clone(), cache.shared());
    let net = tokio::spawn(event_loop.run());
    for id in cache.ids() {
        client.provide(id).await;
    }
    Ok(Joined {
        data_dir,
        keypair,
        addr,
        coordinator: peer,
        cache,
        client,
        net,
        announced,
    })
}

/// Why the coordinator at `addr` could not be reached, and what to check.
pub fn unreachable_message(addr: &Multiaddr, e: &NetFailure) -> String {
    let detail = e.to_string();
    if detail.contains("WrongPeerId") || detail.to_lowercase().contains("peer id") {
        format!(
            "the peer at {addr} is not the coordinator named in the address ({detail}). Copy the full address the coordinator prints at start."
        )
    } else {
        format!(
            "cannot reach the coordinator at {addr} ({detail}). Is it running, and are the address and port right?"
        )
    }
}
