//! Attacks on an open coordinator as strangers would make them, over real libp2p to
//! 127.0.0.1: lease takers (one hoarder, a swarm of Sybils), stalled large frames, a
//! connection flood and a churn of identities. Each attack is a bounded loop that stops
//! itself and reports what it saw; judging is left to the caller: the abuse tests
//! (tests/tests/abuse.rs) and `cargo xtask bench`'s abuse section (the `herd-abuse` binary).

mod connections;
mod honest;
mod measure;
mod stall;
mod takers;

pub use connections::{ChurnReport, FloodReport, churn, flood};
pub use honest::{HonestUnderAttack, endless_run, honest_under_attack, rounds_completed};
pub use measure::{AdmissionCost, PeakRss, rss_bytes};
pub use stall::{StallReport, StarveCodec, Starved, stall};
pub use takers::{Held, TakersReport, take_leases};
