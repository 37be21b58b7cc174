//! The `[checks]` section of `run.toml`: how many peers check a drawn submission, and how much
//! of that the coordinator still does itself (spot checks, canaries, the wait before it falls
//! back to its own replay). The design and the trust model: `docs/checking.md`.

use anyhow::{Result, bail};
use serde::Deserialize;

use crate::checks::CheckPolicy;
use crate::verify::replay::ReplayTolerance;

/// Check leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksSection {
    /// Hand replays to trusted peers (off: the coordinator replays every drawn submission).
    pub enabled: bool,
    /// Checkers per drawn submission of a new or suspect peer, and of a trusted one.
    pub checkers_new: u32,
    pub checkers_trusted: u32,
    /// Share of submissions whose checks all agreed that the coordinator replays as well: what
    /// catches a forger whose accomplice was drawn as its checker.
    pub spot_rate: f64,
    /// Share of check requests with no real check waiting that get a canary (a check whose
    /// answer the coordinator already knows).
    pub canary_rate: f64,
    /// Seconds a drawn submission waits for checkers to take its checks before the
    /// coordinator replays it itself.
    pub take_secs: f64,
}

impl Default for ChecksSection {
    fn default() -> Self {
        ChecksSection {
            enabled: true,
            checkers_new: 2,
            checkers_trusted: 1,
            spot_rate: 0.05,
            canary_rate: 0.1,
            take_secs: 30.0,
        }
    }
}

impl ChecksSection {
    pub fn check(&self) -> Result<()> {
        if !(self.checkers_new >= 1
            && self.checkers_trusted >= 1
            && (0.0..=1.0).contains(&self.spot_rate)
            && (0.0..=1.0).contains(&self.canary_rate)
            && self.take_secs > 0.0)
        {
            bail!(
                "checks: checkers_new and checkers_trusted >= 1, spot_rate and canary_rate in [0, 1], take_secs > 0"
            );
        }
        Ok(())
    }

    /// The check book's rules: checks last as long as a training lease, and agree within the
    /// replay tolerance.
    pub fn policy(&self, lease_secs: f64, tolerance: ReplayTolerance) -> CheckPolicy {
        CheckPolicy {
            checkers_new: self.checkers_new,
            checkers_trusted: self.checkers_trusted,
            spot_rate: self.spot_rate,
            canary_rate: self.canary_rate,
            take_ms: (self.take_secs * 1000.0) as u64,
            lease_ms: (lease_secs * 1000.0) as u64,
            tolerance,
        }
    }
}
