//! herd's coordinator: round state machine, verification, aggregation, storage, HTTP and
//! dashboard. It arrives with the walking-network issue; today the crate only fixes its place
//! in the dependency graph (`protocol ← model ← coordinator`) so the workspace has its final shape.

pub use herd_protocol::ContentId;
