//! Seeding checkpoints: when the coordinator announces one, the node fetches its files into
//! its cache (from other peers where it can) and announces them in the DHT, so downloaders get
//! checkpoints from many peers instead of from the coordinator alone.

use std::collections::HashSet;

use herd_protocol::messages::RoundAnnouncement;
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
        if seeded.contains(&c.name) {
            continue;
        }
        if !c.is_well_formed() {
            tracing::warn!("ignored an announced checkpoint with unusable file names");
            continue;
        }
        match fetch_all(&client, &store, &c.files).await {
            Ok(_) => {
                tracing::info!(checkpoint = %c.name, files = c.files.len(), "seeding checkpoint");
                seeded.insert(c.name);
            }
            Err(e) => tracing::warn!(checkpoint = %c.name, error = %e, "cannot seed checkpoint"),
        }
    }
}
