//! The `[network]` and `[leases]` sections of `run.toml`: what a stranger may claim of the
//! coordinator (connections, streams, bytes in flight, requests, shards) and what a new
//! identity pays first. The reasoning and the measured costs: `docs/open-network.md`.

use anyhow::{Result, bail};
use herd_protocol::admission::MAX_ADMISSION_BITS;
use serde::Deserialize;

use crate::round::LeasePolicy;

/// Connections, requests and admission.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Proof of work a new identity pays before its first lease, in leading zero bits of a
    /// blake3 hash (each bit doubles it; 0: none).
    pub admission_bits: u8,
    /// Established inbound connections, all peers together.
    pub max_connections: u32,
    /// Inbound connections still in their handshake.
    pub max_pending_connections: u32,
    /// Connections with one peer.
    pub max_connections_per_peer: u32,
    /// Requests a connection may have open at once (a node needs one or two).
    pub rpc_streams_per_connection: usize,
    /// MiB that submissions being received may hold at once, over every connection (raised to
    /// the run's largest submission if smaller).
    pub inflight_submission_mib: usize,
    /// New connections are refused while the coordinator holds more than this many MiB
    /// (0: no such limit).
    pub max_memory_mib: usize,
    /// Lease requests, returns and queries a peer may send per second, and in a burst.
    pub requests_per_second: f64,
    pub request_burst: f64,
    /// A peer with verdicts gone this long leaves `/v1/status` (its credit stays in
    /// `/v1/contributors`); one without leaves it when it disconnects.
    pub forget_after_secs: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            admission_bits: 24,
            max_connections: 1024,
            max_pending_connections: 128,
            max_connections_per_peer: 2,
            rpc_streams_per_connection: 4,
            inflight_submission_mib: 32,
            max_memory_mib: 0,
            requests_per_second: 2.0,
            request_burst: 10.0,
            forget_after_secs: 600,
        }
    }
}

impl NetworkSection {
    pub fn check(&self) -> Result<()> {
        if self.admission_bits > MAX_ADMISSION_BITS {
            bail!("network.admission_bits must be at most {MAX_ADMISSION_BITS}");
        }
        if self.max_connections == 0
            || self.max_pending_connections == 0
            || self.max_connections_per_peer == 0
            || self.rpc_streams_per_connection == 0
        {
            bail!("network: connection and stream limits must be positive");
        }
        if !(self.requests_per_second > 0.0 && self.request_burst >= 1.0) {
            bail!("network.requests_per_second must be > 0 and request_burst >= 1");
        }
        Ok(())
    }
}

/// Fair shares of shards (see [`LeasePolicy`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeasesSection {
    /// Live leases one peer may hold at once.
    pub per_peer: u32,
    /// A shard free this long may go to a trusted peer past its `per_peer` limit.
    pub idle_grace_secs: f64,
    /// Share of a round's shards that peers not yet trusted may hold at once, together
    /// (rounded down, at least one).
    pub newcomer_share: f64,
    /// A trusted peer may back up a shard a newcomer has held this many times longer than
    /// the usual time to an accepted submission (0: no backups).
    pub backup_after: f64,
    /// Wait after a lease that ended without a submission, doubling with each one in a row.
    pub miss_backoff_secs: f64,
    pub max_backoff_secs: f64,
    /// Leases in a row expired without a submission that ban a peer (0: never).
    pub ban_after_expiries: u32,
}

impl Default for LeasesSection {
    fn default() -> Self {
        LeasesSection {
            per_peer: 1,
            idle_grace_secs: 2.0,
            newcomer_share: 0.5,
            backup_after: 2.0,
            miss_backoff_secs: 5.0,
            max_backoff_secs: 600.0,
            ban_after_expiries: 4,
        }
    }
}

impl LeasesSection {
    pub fn check(&self) -> Result<()> {
        if self.per_peer == 0
            || !(0.0..=1.0).contains(&self.newcomer_share)
            || self.idle_grace_secs < 0.0
            || self.backup_after < 0.0
            || self.miss_backoff_secs < 0.0
            || self.max_backoff_secs < self.miss_backoff_secs
        {
            bail!(
                "leases: per_peer > 0, newcomer_share in [0, 1], non-negative idle_grace_secs, backup_after and miss_backoff_secs, max_backoff_secs >= miss_backoff_secs"
            );
        }
        Ok(())
    }

    pub fn policy(&self) -> LeasePolicy {
        let ms = |secs: f64| (secs * 1000.0) as u64;
        LeasePolicy {
            per_peer: self.per_peer,
            idle_grace_ms: ms(self.idle_grace_secs),
            newcomer_share: self.newcomer_share,
            backup_after: self.backup_after,
            miss_backoff_ms: ms(self.miss_backoff_secs),
            max_backoff_ms: ms(self.max_backoff_secs),
            ban_after_expiries: self.ban_after_expiries,
        }
    }
}
