//! Lease takers: one hoarder or a swarm of Sybils, each asking whenever it may and sitting on
//! what it gets until it expires.

use std::time::Duration;

use herd_protocol::messages::{RPC_PROTOCOL, RpcResponse, now_ms};
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
