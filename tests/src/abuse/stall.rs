//! Stalled frames: request streams that announce a large frame and starve it, a byte at a
//! time, to pin the coordinator's buffers.

use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use herd_protocol::messages::RPC_PROTOCOL;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What a stalled-frames attack got.
#[derive(Debug, Default)]
pub struct StallReport {
    pub connections: usize,
    pub streams: usize,
    /// Streams the coordinator cut before the attack ended (over the per-connection stream
    /// limit, over the in-flight budget, or too slow).
    pub cut: usize,
    /// Streams still open, holding their unfinished frame, when the attack ended.
    pub held_to_end: usize,
}

/// A request stream that announces a frame and then starves it: `head` (the length and all
/// but the body's last bytes) at once, then one byte every `trickle` (so no single read
/// stalls), until `hold` has passed.
#[derive(Debug, Clone)]
pub struct Starved {
    head: Vec<u8>,
    trickle: Duration,
    hold: Duration,
}

/// Writes [`Starved`] requests; never reads a response.
#[derive(Debug, Clone, Default)]
pub struct StarveCodec;

impl request_response::Codec for StarveCodec {
    type Protocol = StreamProtocol;
    type Request = Starved;
    type Response = ();

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> std::io::Result<Starved> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Starved,
    ) -> std::io::Result<()> {
        let end = Instant::now() + req.hold;
        io.write_all(&req.head).await?;
        io.flush().await?;
        while Instant::now() + req.trickle < end {
            tokio::time::sleep(req.trickle).await;
            io.write_all(&[0]).await?;
            io.flush().await?;
        }
        tokio::time::sleep_until(end).await;
        // Held to the end: give up without finishing the frame.
        Err(std::io::ErrorKind::TimedOut.into())
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: (),
    ) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// `connections` identities, each opening `streams` request streams on one connection, every
/// stream announcing a frame of `announce` bytes whose first byte is `tag` and sending all but
/// its last 64 bytes, then a byte every 5 s, for `hold`.
pub async fn stall(
    addr: &str,
    connections: usize,
    streams: usize,
    (announce, tag): (u32, u8),
    hold: Duration,
) -> StallReport {
    let mut head = announce.to_le_bytes().to_vec();
    head.push(tag);
    head.resize(4 + (announce as usize).saturating_sub(64), 0);
    let request = Starved {
        head,
        trickle: Duration::from_secs(5),
        hold,
    };
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let addr = addr.to_string();
        let request = request.clone();
        tasks.spawn(async move { starve_on_one_connection(&addr, streams, request).await });
    }
    let mut report = StallReport {
        connections,
        streams: connections * streams,
        ..Default::default()
    };
    while let Some(done) = tasks.join_next().await {
        let (cut, held) = done.expect("a stall task");
        report.cut += cut;
        report.held_to_end += held;
    }
    report
}

/// (streams cut early, streams held to the end) of one connection.
async fn starve_on_one_connection(addr: &str, streams: usize, request: Starved) -> (usize, usize) {
    let addr: Multiaddr = addr.parse().expect("a multiaddr");
    let coordinator: PeerId = herd_protocol::net::pinned_peer(&addr).expect("a /p2p/ address");
    let hold = request.hold;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::<StarveCodec>::new(
                [(StreamProtocol::new(RPC_PROTOCOL), ProtocolSupport::Outbound)],
                request_response::Config::default()
                    .with_request_timeout(hold + Duration::from_secs(30))
                    .with_max_concurrent_streams(streams),
            )
        })
        .expect("a behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    swarm.add_peer_address(coordinator, addr);
    let started = Instant::now();
    for _ in 0..streams {
        swarm
            .behaviour_mut()
            .send_request(&coordinator, request.clone());
    }
    let (mut cut, mut held) = (0, 0);
    let deadline = started + hold + Duration::from_secs(20);
    while cut + held < streams {
        let Ok(event) = tokio::time::timeout_at(deadline, swarm.select_next_some()).await else {
            break;
        };
        if let SwarmEvent::Behaviour(request_response::Event::OutboundFailure { .. }) = event {
            // A stream that lived its whole hold failed by its own hand, at the end.
            if started.elapsed() + Duration::from_millis(500) >= hold {
                held += 1;
            } else {
                cut += 1;
            }
        }
    }
    (cut, held)
}
