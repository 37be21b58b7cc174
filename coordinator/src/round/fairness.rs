//! What the round machine remembers of a peer between its leases: leases in a row that ended
//! without a submission, and the backoff and ban they earn. A hoarder that takes shards and
//! never delivers waits longer after each, then is banned; a peer that delivers starts clean.

use std::collections::HashMap;

use super::{LeasePolicy, PeerKey};

/// How long a peer's misses are remembered after its backoff ends.
const FORGET_AFTER_MS: u64 = 3600 * 1000;

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Misses {
    /// Leases in a row that expired or were handed back.
    in_a_row: u32,
    /// Of those, the ones that expired.
    expired: u32,
    barred_until_ms: u64,
    banned: bool,
}

/// Why a peer gets no lease now.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Barred {
    BackingOff { until_ms: u64, misses: u32 },
    Banned,
}

#[derive(Debug, Default)]
pub(super) struct Fairness {
    peers: HashMap<PeerKey, Misses>,
}

impl Fairness {
    /// Whether `peer` is kept from new leases at `now_ms`.
    pub(super) fn barred(&self, peer: &PeerKey, now_ms: u64) -> Option<Barred> {
        let m = self.peers.get(peer)?;
        if m.banned {
            Some(Barred::Banned)
        } else if now_ms < m.barred_until_ms {
            Some(Barred::BackingOff {
                until_ms: m.barred_until_ms,
                misses: m.in_a_row,
            })
        } else {
            None
        }
    }

    /// A lease of `peer` ended without a submission at `now_ms` (`expired`, or handed back).
    /// Returns why the peer is banned if this miss bans it.
    pub(super) fn missed(
        &mut self,
        policy: &LeasePolicy,
        peer: PeerKey,
        expired: bool,
        now_ms: u64,
    ) -> Option<String> {
        let m = self.peers.entry(peer).or_default();
        if m.banned {
            return None;
        }
        m.in_a_row += 1;
        m.expired += u32::from(expired);
        m.barred_until_ms = now_ms + policy.backoff_ms(m.in_a_row);
        if policy.ban_after_expiries > 0 && m.expired >= policy.ban_after_expiries {
            m.banned = true;
            return Some(format!(
                "{} leases in a row expired without a submission",
                m.expired
            ));
        }
        None
    }

    /// `peer` delivered an accepted shard: its record is clean again.
    pub(super) fn delivered(&mut self, peer: &PeerKey) {
        self.peers.remove(peer);
    }

    /// Forgets peers whose backoff ended long ago (banned ones are kept): identities that
    /// came, missed once and left do not pile up.
    pub(super) fn forget_old(&mut self, now_ms: u64) {
        self.peers
            .retain(|_, m| m.banned || m.barred_until_ms + FORGET_AFTER_MS > now_ms);
    }

    /// Peers remembered now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.peers.len()
    }
}
