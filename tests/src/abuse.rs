//! Attacks on an open coordinator as strangers would make them, over real libp2p to
//! 127.0.0.1: lease takers (one hoarder, a swarm of Sybils), stalled large frames, a
//! connection flood and a churn of identities. Each attack is a bounded loop that stops
//! itself and reports what it saw; judging is left to the caller: the abuse tests
//! (tests/tests/abuse.rs) and `cargo xtask bench`'s abuse section (the `herd-abuse` binary).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt, StreamExt};
use herd_protocol::admission::Challenge;
use herd_protocol::messages::{RPC_PROTOCOL, RpcRequest, RpcResponse, now_ms};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::adversary::Adversary;

/// A lease as a taker held it: from when it arrived to its expiry (the taker never submits).
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub round: u64,
    pub from_ms: u64,
    pub until_ms: u64,
}

/// What a group of lease takers got.
#[derive(Debug, Default)]
pub struct TakersReport {
    pub identities: usize,
    pub held: Vec<Held>,
    /// Identities told they are banned (they stop asking).
    pub banned: usize,
    /// Exchanges that got no answer (refused streams, closed connections, timeouts).
    pub lost: usize,
}

impl TakersReport {
    /// The most leases of one round that these takers (and `others`) held at the same moment.
    pub fn most_held_at_once(&self, others: &[&TakersReport]) -> usize {
        let mut all: Vec<Held> = self.held.clone();
        for o in others {
            all.extend(&o.held);
        }
        all.iter()
            .map(|h| {
                all.iter()
                    .filter(|o| {
                        o.round == h.round && o.from_ms <= h.from_ms && h.from_ms < o.until_ms
                    })
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    fn merge(&mut self, other: TakersReport) {
        self.identities += other.identities;
        self.held.extend(other.held);
        self.banned += other.banned;
        self.lost += other.lost;
    }
}

/// `identities` fresh identities, arriving evenly over `arrival`, each asking for a lease
/// whenever it may (paying admission, obeying `retry_after`) and sitting on what it gets
/// until it expires, never submitting, until `until`. One identity is a hoarder; hundreds a
/// Sybil swarm.
pub async fn take_leases(
    addr: &str,
    identities: usize,
    arrival: Duration,
    until: Instant,
) -> TakersReport {
    let mut tasks = JoinSet::new();
    for i in 0..identities {
        let addr = addr.to_string();
        let start = Instant::now() + arrival.mul_f64(i as f64 / identities.max(1) as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            one_taker(&addr, until).await
        });
    }
    let mut report = TakersReport::default();
    while let Some(done) = tasks.join_next().await {
        report.merge(done.expect("a taker task"));
    }
    report
}

async fn one_taker(addr: &str, until: Instant) -> TakersReport {
    let mut me = Adversary::new(addr, RPC_PROTOCOL);
    let mut report = TakersReport {
        identities: 1,
        ..Default::default()
    };
    while Instant::now() < until {
        let wait_ms = match tokio::time::timeout_at(until, me.ask_for_lease()).await {
            Err(_) => break,
            Ok(Ok(Ok(lease))) => {
                let held = Held {
                    round: lease.round.0,
                    from_ms: now_ms(),
                    until_ms: lease.expires_at_ms,
                };
                report.held.push(held);
                held.until_ms.saturating_sub(now_ms())
            }
            Ok(Ok(Err(RpcResponse::NoWork { retry_after_ms, .. }))) => retry_after_ms,
            Ok(Ok(Err(RpcResponse::Refused { reason }))) if reason.contains("banned") => {
                report.banned += 1;
                break;
            }
            // Too many requests, or anything else: ask again a little later.
            Ok(Ok(Err(_))) => 1_000,
            Ok(Err(_)) => {
                report.lost += 1;
                1_000
            }
        };
        let next = Instant::now() + Duration::from_millis(wait_ms.clamp(100, 60_000));
        tokio::time::sleep_until(next.min(until)).await;
    }
    report
}

/// What a connection flood got.
#[derive(Debug, Default)]
pub struct FloodReport {
    pub attempted: usize,
    pub established: usize,
    /// Connections still open when the flood ended.
    pub held_to_end: usize,
}

/// `connections` fresh identities dialing at once, each holding its connection (doing
/// nothing) until `until`; one refused dials again (up to 10 times, 200 ms apart), as a
/// flooder would.
pub async fn flood(addr: &str, connections: usize, until: Instant) -> FloodReport {
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let addr = addr.to_string();
        tasks.spawn(async move {
            for _ in 0..10 {
                let mut me = Adversary::new(&addr, RPC_PROTOCOL);
                if me.connect().await {
                    return (true, me.hold(until).await);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (false, false)
        });
    }
    let mut report = FloodReport {
        attempted: connections,
        ..Default::default()
    };
    while let Some(done) = tasks.join_next().await {
        let (established, held) = done.expect("a flood task");
        report.established += usize::from(established);
        report.held_to_end += usize::from(held);
    }
    report
}

/// What a churn of identities got.
#[derive(Debug, Default)]
pub struct ChurnReport {
    pub identities: usize,
    pub leased: usize,
    pub returned: usize,
    /// Identities that got no lease (no work for a newcomer just then, or a lost exchange).
    pub without_lease: usize,
}

/// `identities` fresh identities, `concurrency` at a time: each connects, pays admission,
/// takes a lease if there is one, returns it at once and leaves.
pub async fn churn(addr: &str, identities: usize, concurrency: usize) -> ChurnReport {
    let mut tasks = JoinSet::new();
    let mut report = ChurnReport::default();
    let mut started = 0;
    while started < identities || !tasks.is_empty() {
        while started < identities && tasks.len() < concurrency {
            let addr = addr.to_string();
            tasks.spawn(async move {
                let mut me = Adversary::new(&addr, RPC_PROTOCOL);
                match me.ask_for_lease().await {
                    Ok(Ok(lease)) => {
                        let back = me.request(&RpcRequest::Return { lease: lease.id }).await;
                        (true, matches!(back, Ok(RpcResponse::Returned)))
                    }
                    _ => (false, false),
                }
            });
            started += 1;
        }
        if let Some(done) = tasks.join_next().await {
            let (leased, returned) = done.expect("a churn task");
            report.identities += 1;
            report.leased += usize::from(leased);
            report.returned += usize::from(returned);
            report.without_lease += usize::from(!leased);
        }
    }
    report
}

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

/// Resident memory of process `pid` (VmRSS), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples a process's RSS every 100 ms on a thread of its own, keeping the peak.
#[derive(Debug)]
pub struct PeakRss {
    peak: Arc<Mutex<u64>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    pub fn start(pid: u32) -> PeakRss {
        let peak = Arc::new(Mutex::new(rss_bytes(pid)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let now = rss_bytes(pid);
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(now);
                    drop(p);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        PeakRss {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak seen, and stop sampling.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.peak.lock().unwrap()
    }
}

/// What minting identities costs: blake3 proof hashes per second on one core, measured by
/// solving `identities` challenges of `bits` (2^bits tries each, on average).
#[derive(Debug, Clone, Copy)]
pub struct AdmissionCost {
    pub hashes: u64,
    pub seconds: f64,
}

impl AdmissionCost {
    pub fn measure(identities: usize, bits: u8) -> AdmissionCost {
        let coordinator = PeerId::random();
        let start = std::time::Instant::now();
        let mut hashes = 0;
        for _ in 0..identities {
            let peer = PeerId::random();
            let challenge = Challenge {
                run: "abuse-bench",
                coordinator: &coordinator,
                peer: &peer,
            };
            let proof = challenge.solve(bits, || true).expect("never stopped");
            hashes += proof.nonce + 1;
        }
        AdmissionCost {
            hashes,
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    pub fn hashes_per_second(&self) -> f64 {
        self.hashes as f64 / self.seconds
    }

    /// Expected seconds of one core to admit one identity at `bits`.
    pub fn seconds_per_identity(&self, bits: u8) -> f64 {
        2f64.powi(i32::from(bits)) / self.hashes_per_second()
    }
}

/// An endless run on the demo's shards (3 of the whole data set, 5 inner steps) under the
/// open network's default rules, but for the `[network]` keys in `network`.
pub fn endless_run(network: &str) -> String {
    format!(
        "rounds = 1000000\n[round]\nshards = 3\nsamples_per_shard = 126\ninner_steps = 5\nlr = 3e-3\n\
         batch_size = 16\nmax_seq_len = 128\nlease_secs = 60\nouter_lr = 0.7\nouter_momentum = 0.5\n\
         checkpoint_every = 1000000\n[network]\n{network}\n[leases]\n"
    )
}

/// Rounds the coordinator has closed, as `/v1/status` says (`None` while it does not answer).
pub fn rounds_completed(coordinator: &crate::Coordinator) -> Option<u64> {
    coordinator.status()?["rounds_completed"].as_u64()
}

/// An honest node's pace alone and under attack, on one coordinator, one after the other.
#[derive(Debug)]
pub struct HonestUnderAttack {
    pub alone_seconds: f64,
    pub alone_rounds: u64,
    pub attacked_seconds: f64,
    pub attacked_rounds: u64,
    pub hoarder: TakersReport,
    pub sybils: TakersReport,
}

impl HonestUnderAttack {
    pub fn alone_per_minute(&self) -> f64 {
        self.alone_rounds as f64 * 60.0 / self.alone_seconds
    }

    pub fn attacked_per_minute(&self) -> f64 {
        self.attacked_rounds as f64 * 60.0 / self.attacked_seconds
    }
}

/// One honest node (a real `herd-node`) trains with a coordinator in `dir` (admission at
/// `admission_bits`, every other open-network rule at its default) until it is in good
/// standing; then its pace is measured for `alone`, and again for `attacked` while one
/// hoarder and `sybils` fresh identities (arriving within 3.6 s) take every lease they can.
pub fn honest_under_attack(
    dir: &std::path::Path,
    admission_bits: u8,
    sybils: usize,
    (alone, attacked): (Duration, Duration),
) -> HonestUnderAttack {
    let coordinator = crate::Coordinator::start(
        dir,
        &endless_run(&format!("admission_bits = {admission_bits}")),
    );
    let _node = crate::Reaper(vec![coordinator.start_node(&dir.join("honest"))]);
    // Two rounds: its first delta was replayed and passed, so it is in good standing.
    crate::wait_until(
        Duration::from_secs(300),
        "the honest node's first rounds",
        || rounds_completed(&coordinator).filter(|&r| r >= 2),
    );
    let rounds = || rounds_completed(&coordinator).expect("the coordinator answers");
    let (t0, r0) = (std::time::Instant::now(), rounds());
    std::thread::sleep(alone);
    let (t1, r1) = (std::time::Instant::now(), rounds());
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let until = Instant::now() + attacked;
    let (hoarder, sybils) = runtime.block_on(async {
        let addr = coordinator.addr.as_str();
        tokio::join!(
            take_leases(addr, 1, Duration::ZERO, until),
            take_leases(addr, sybils, Duration::from_millis(3600), until),
        )
    });
    let (t2, r2) = (std::time::Instant::now(), rounds());
    HonestUnderAttack {
        alone_seconds: (t1 - t0).as_secs_f64(),
        alone_rounds: r1 - r0,
        attacked_seconds: (t2 - t1).as_secs_f64(),
        attacked_rounds: r2 - r1,
        hoarder,
        sybils,
    }
}
