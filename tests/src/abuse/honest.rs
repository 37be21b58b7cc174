//! An honest node's pace alone and under a lease-taking attack, on one coordinator.

use std::time::Duration;

use tokio::time::Instant;

use super::TakersReport;
use super::take_leases;

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
