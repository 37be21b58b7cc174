//! Identities by the thousand: a flood that dials and holds, a churn that comes, takes a
//! lease, returns it and leaves.

use std::time::Duration;

use herd_protocol::messages::{RPC_PROTOCOL, RpcRequest, RpcResponse};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::adversary::Adversary;

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
