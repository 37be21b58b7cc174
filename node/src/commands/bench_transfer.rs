//! `herd-node bench-transfer` (hidden; run by `cargo xtask bench`): one blob moved between two
//! node network loops on loopback over libp2p TCP or QUIC, against a plain TCP copy of the same
//! bytes in the same process. Into memory, the transports alone: the blob protocol's 1 MiB
//! groups, as many in flight as a download keeps, bytes dropped on arrival (plain TCP: read into
//! a buffer). Into the cache, what a node's pull does: hash-check each group, write it, fsync
//! (plain TCP: write the file, fsync).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herd_protocol::ContentId;
use herd_protocol::messages::{BlobRequest, BlobResponse};
use herd_protocol::net::{Behaviour, NetOptions, Role, build_swarm};
use herd_protocol::outline::group_count;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use rand::RngCore;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::cache::BlobCache;
use crate::daemon::fetch::{PARALLEL_GROUPS, fetch};
use crate::daemon::network;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// herd's blob protocol over libp2p TCP (noise, yamux).
    Tcp,
    /// herd's blob protocol over libp2p QUIC.
    Quic,
    /// The baseline: the same bytes over one plain TCP connection.
    Plain,
}

/// Where the received bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    Memory,
    Cache,
}

#[derive(Debug, clap::Args)]
pub struct BenchTransferArgs {
    #[arg(long, value_enum)]
    transport: Transport,
    #[arg(long, value_enum, default_value_t = Sink::Memory)]
    sink: Sink,
    /// Blob size in MiB.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Where to make a scratch dir for the two blob caches (removed afterwards).
    #[arg(long)]
    dir: PathBuf,
}

pub fn run(args: BenchTransferArgs) -> Result<()> {
    ensure!(args.mib > 0, "--mib must be positive");
    let runtime = tokio::runtime::Runtime::new()?;
    let bytes = args.mib << 20;
    // A dir of its own inside --dir: only what this run made is removed.
    let dir = args
        .dir
        .join(format!("bench-transfer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let seconds = runtime.block_on(async {
        match args.transport {
            Transport::Plain => plain_tcp(&dir, bytes, args.sink).await,
            Transport::Tcp => herd(&dir, bytes, args.sink, "/ip4/127.0.0.1/tcp/0").await,
            Transport::Quic => herd(&dir, bytes, args.sink, "/ip4/127.0.0.1/udp/0/quic-v1").await,
        }
    });
    std::fs::remove_dir_all(&dir).ok();
    let seconds = seconds?;
    println!(
        "{}",
        json!({
            "transport": format!("{:?}", args.transport).to_lowercase(),
            "sink": format!("{:?}", args.sink).to_lowercase(),
            "bytes": bytes,
            "seconds": seconds,
            "mib_per_second": args.mib as f64 / seconds.max(1e-9),
        })
    );
    Ok(())
}

/// Seconds for `bytes` sent over one loopback TCP connection, read into memory or written to a
/// file in `dir` and fsynced.
async fn plain_tcp(dir: &std::path::Path, bytes: usize, sink: Sink) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let payload = random_bytes(bytes);
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&payload).await?;
        stream.shutdown().await
    });
    let (mut stream, _) = listener.accept().await?;
    let received = match sink {
        Sink::Memory => {
            let mut received = Vec::with_capacity(bytes);
            stream.read_to_end(&mut received).await?;
            received.len()
        }
        Sink::Cache => {
            // Blocking reads and writes of up to 1 MiB, as a pull writes its groups:
            // tokio::fs would hand every 8 KiB write to another thread, a baseline slower
            // than the thing measured against it.
            let mut stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            let path = dir.join("plain");
            tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
                use std::io::{Read, Write};
                let mut file = std::fs::File::create(path)?;
                let mut buf = vec![0u8; 1 << 20];
                let mut received = 0;
                loop {
                    let n = stream.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buf[..n])?;
                    received += n;
                }
                file.sync_all()?;
                Ok(received)
            })
            .await??
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    sender.await??;
    ensure!(received == bytes, "received {received} of {bytes} bytes");
    Ok(seconds)
}

/// Seconds for a node to get a `bytes` blob from another node listening on `listen`, through
/// the daemon's own network loop (the connection is made before timing starts).
async fn herd(dir: &std::path::Path, bytes: usize, sink: Sink, listen: &str) -> Result<f64> {
    let listen: Multiaddr = listen.parse()?;
    let (server_key, client_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let server_peer = server_key.public().to_peer_id();
    let client_peer = client_key.public().to_peer_id();
    let mut server_swarm = build_swarm(
        server_key,
        Role::Node,
        NetOptions {
            lan: true,
            ..NetOptions::default()
        },
    )?;
    let mut client_swarm = build_swarm(
        client_key,
        Role::Node,
        NetOptions {
            lan: true,
            ..NetOptions::default()
        },
    )?;
    let server_addr = listen_addr(&mut server_swarm, listen.clone()).await?;
    let client_addr = listen_addr(&mut client_swarm, listen).await?;

    let server_cache = BlobCache::open(dir.join("server"))?;
    let (warmup, id) = {
        let store = server_cache.shared();
        let mut store = store.lock().expect("blob store lock");
        (
            store.put_bytes(&random_bytes(4096))?,
            store.put_bytes(&random_bytes(bytes))?,
        )
    };
    let client_cache = BlobCache::open(dir.join("client"))?;
    // Each loop takes the other for its coordinator: the one peer it dials and asks.
    let (server, server_loop, _) = network::new(
        server_swarm,
        client_peer,
        client_addr,
        server_cache.shared(),
    );
    let (client, client_loop, _) = network::new(
        client_swarm,
        server_peer,
        server_addr,
        client_cache.shared(),
    );
    let loops = [
        tokio::spawn(server_loop.run()),
        tokio::spawn(client_loop.run()),
    ];
    // A small blob first, untimed: dialling and the handshake are not transfer.
    fetch(&client, &client_cache.shared(), warmup, "warm-up blob").await?;
    let started = Instant::now();
    let got = match sink {
        Sink::Cache => {
            let fetched = fetch(&client, &client_cache.shared(), id, "bench blob").await?;
            fetched.bytes_from.get(&server_peer).copied().unwrap_or(0)
        }
        Sink::Memory => groups_into_memory(&client, server_peer, id, bytes as u64).await?,
    };
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        got == bytes as u64,
        "got {got} of {bytes} bytes from the serving node"
    );
    drop((client, server));
    for l in loops {
        l.abort();
    }
    Ok(seconds)
}

/// Every group of blob `id` from `peer`, [`PARALLEL_GROUPS`] in flight as a download keeps
/// them; returns the bytes received.
async fn groups_into_memory(
    client: &network::Client,
    peer: libp2p::PeerId,
    id: ContentId,
    total: u64,
) -> Result<u64> {
    let mut next = 0..group_count(total);
    let mut in_flight = FuturesUnordered::new();
    let mut received = 0u64;
    loop {
        while in_flight.len() < PARALLEL_GROUPS {
            let Some(index) = next.next() else { break };
            in_flight.push(client.blob(peer, BlobRequest::Group { id, index }));
        }
        let Some(answer) = in_flight.next().await else {
            return Ok(received);
        };
        match answer? {
            BlobResponse::Group(bytes) => received += bytes.len() as u64,
            other => bail!("the serving node answered {other:?}"),
        }
    }
}

/// Starts `swarm` listening on `listen` and returns the address it got.
async fn listen_addr(swarm: &mut Swarm<Behaviour>, listen: Multiaddr) -> Result<Multiaddr> {
    swarm.listen_on(listen)?;
    loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            return Ok(address);
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}
