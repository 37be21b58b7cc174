//! Requests per peer: a token bucket each, fed the time (pure; the shell passes the clock).
//! A peer's bucket goes when its last connection closes, so the map holds connected peers only.

use std::collections::HashMap;

use crate::round::PeerKey;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// `per_second` requests per peer on average, `burst` at once.
#[derive(Debug)]
pub(super) struct RateLimits {
    per_second: f64,
    burst: f64,
    buckets: HashMap<PeerKey, Bucket>,
}

impl RateLimits {
    pub(super) fn new(per_second: f64, burst: f64) -> Self {
        RateLimits {
            per_second,
            burst,
            buckets: HashMap::new(),
        }
    }

    /// Takes one request's token from `peer`'s bucket at `now_ms`, or says how many
    /// milliseconds until it has one.
    pub(super) fn take(&mut self, peer: PeerKey, now_ms: u64) -> Result<(), u64> {
        let (rate, burst) = (self.per_second, self.burst);
        let b = self.buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - b.tokens) / rate) * 1000.0).ceil() as u64)
        }
    }

    /// `peer` is gone: its bucket too.
    pub(super) fn forget(&mut self, peer: &PeerKey) {
        self.buckets.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let mut limits = RateLimits::new(2.0, 3.0);
        let (a, b) = (PeerKey::random(), PeerKey::random());
        for _ in 0..3 {
            assert_eq!(limits.take(a, 1000), Ok(()));
        }
        assert_eq!(limits.take(a, 1000), Err(500), "empty: one token in 500 ms");
        assert_eq!(limits.take(b, 1000), Ok(()), "peers do not share a bucket");
        assert_eq!(limits.take(a, 1500), Ok(()));
        assert!(limits.take(a, 1600).is_err());
        // A long pause refills the burst, no more.
        for _ in 0..3 {
            assert_eq!(limits.take(a, 100_000), Ok(()));
        }
        assert!(limits.take(a, 100_000).is_err());
        limits.forget(&a);
        assert_eq!(limits.take(a, 100_000), Ok(()), "a new bucket");
    }
}
