//! Seeding checkpoints: when the coordinator announces one, the node fetches its files into
//! its cache (from other peers where it can) and announces them in the DHT, so downloaders get
//! checkpoints from many peers instead of from the coordinator alone.

use std::collections::HashSet;

use herd_protocol::messages::{CheckpointRef, RoundAnnouncement, RpcRequest, RpcResponse};
use tokio::sync::mpsc;

use super::fetch::fetch_all;
use super::network::{Client, SharedStore};

/// Seeds the checkpoint of each announcement, once each, until the announcements stop.
pub async fn seed_announced(
    client: Client,
    store: SharedStore,
    mut announced: mpsc::Receiver<RoundAnnouncement>,
) {
    let mut seeded = HashSet::new();
    while let Some(ann) = announced.recv().await {
        let Some(c) = ann.checkpoint else { continue };
        if !seeded.contains(&c.name) && seed(&client, &store, &c).await {
            seeded.insert(c.name);
        }
    }
}

/// Seeds the run's latest checkpoint, asked of the coordinator: what a node that stays to
/// seed after the run does, whether or not the last announcement reached it (gossip does not
/// promise delivery, least of all while the mesh is still forming).
pub async fn seed_latest(client: &Client, store: &SharedStore) {
    let request = RpcRequest::Published { checkpoint: None };
    match client.rpc(request).await {
        Ok(RpcResponse::Published(published)) => {
            if let Some(c) = published.checkpoint {
                seed(client, store, &c).await;
            }
        }
        Ok(other) => tracing::warn!(
            ?other,
            "unexpected answer when asking for the last checkpoint"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot ask for the last checkpoint"),
    }
}

/// Fetches checkpoint `c`'s files into the store (which serves them); `true` if it did.
async fn seed(client: &Client, store: &SharedStore, c: &CheckpointRef) -> bool {
    if !c.is_well_formed() {
        tracing::warn!("ignored an announced checkpoint with unusable file names");
        return false;
    }
    match fetch_all(client, store, &c.files).await {
        Ok(_) => {
            tracing::info!(checkpoint = %c.name, files = c.files.len(), "seeding checkpoint");
            true
        }
        Err(e) => {
            tracing::warn!(checkpoint = %c.name, error = %e, "cannot seed checkpoint");
            false
        }
    }
}
