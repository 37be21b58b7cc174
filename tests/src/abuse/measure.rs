//! What an attack costs either side: a process's resident memory (now and at its peak) and
//! the CPU price of minting an identity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_protocol::admission::Challenge;
use libp2p::PeerId;

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
