//! Downloading a blob from whichever peers hold it: the DHT names the providers, one of them
//! sends the outline (checked against the blob's id), then groups come from several peers at
//! once, each checked against the outline on arrival. A peer that sends bad bytes or fails is
//! dropped; the coordinator is asked only when no other peer can serve. What has arrived stays
//! in a partial file, so an interrupted download resumes where it stopped.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use futures::stream::{FuturesUnordered, StreamExt};
use herd_protocol::ContentId;
use herd_protocol::messages::{BlobRequest, BlobResponse, NamedBlob, OUTLINE_PAGE};
use herd_protocol::outline::{MAX_BLOB_BYTES, Outline, group_count, group_range};
use libp2p::PeerId;
use rand::seq::SliceRandom;

use super::network::{Client, SharedStore};
use crate::progress::ByteProgress;

/// Group requests in flight at once, spread over the providers.
pub const PARALLEL_GROUPS: usize = 4;

/// A blob in the store, and who sent how many of its bytes (empty if it was already there).
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes_from: BTreeMap<PeerId, u64>,
}

/// The local path of blob `id`, downloading it first if the store lacks it; `what` names it
/// in progress reports. The downloaded blob is then announced in the DHT.
pub async fn fetch(
    client: &Client,
    store: &SharedStore,
    id: ContentId,
    what: &str,
) -> Result<Fetched> {
    if let Some(path) = store.lock().expect("blob store lock").path(&id) {
        return Ok(Fetched {
            path: path.to_path_buf(),
            bytes_from: BTreeMap::new(),
        });
    }
    let coordinator = client.coordinator();
    let mut peers: Vec<PeerId> = client.providers(id).await;
    peers.retain(|p| *p != coordinator);
    peers.shuffle(&mut rand::rng());
    tracing::debug!(%id, providers = peers.len(), "fetching a blob");
    // The coordinator holds everything it publishes, but its bandwidth is the run's
    // bottleneck: it is the last resort.
    peers.push(coordinator);

    let mut outline = None;
    while outline.is_none() && !peers.is_empty() {
        let peer = peers[0];
        match fetch_outline(client, peer, &id).await {
            Ok(o) => outline = Some((peer, o)),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "no outline from this peer");
                peers.remove(0);
            }
        }
    }
    let Some((outline_peer, (outline, last_group))) = outline else {
        bail!("no peer could serve {what} (blob {id})");
    };

    let partial = store.lock().expect("blob store lock").partial_path(&id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let resumed = file.metadata()?.len() == outline.total();
    file.set_len(outline.total())?;
    let mut missing: VecDeque<u64> = VecDeque::new();
    let last = outline.groups() - 1;
    let last_start = group_range(outline.total(), last).start;
    file.write_all_at(&last_group, last_start)
        .with_context(|| format!("writing {}", partial.display()))?;
    let mut have = last_group.len() as u64;
    let mut bytes_from = BTreeMap::from([(outline_peer, have)]);
    for index in 0..last {
        let range = group_range(outline.total(), index);
        if resumed {
            let mut bytes = vec![0u8; (range.end - range.start) as usize];
            if file.read_exact_at(&mut bytes, range.start).is_ok()
                && outline.check_group(index, &bytes).is_ok()
            {
                have += bytes.len() as u64;
                continue;
            }
        }
        missing.push_back(index);
    }
    if have > 0 {
        tracing::info!(what, bytes = have, "resuming a download");
    }

    let mut progress = ByteProgress::new(outline.total(), have, what);
    let mut in_flight = FuturesUnordered::new();
    let mut turn = 0usize;
    loop {
        // Other peers first; the coordinator only when no one else is left.
        let others: Vec<PeerId> = peers
            .iter()
            .copied()
            .filter(|p| *p != coordinator)
            .collect();
        let serving = if others.is_empty() { &peers } else { &others };
        while in_flight.len() < PARALLEL_GROUPS && !serving.is_empty() {
            let Some(index) = missing.pop_front() else {
                break;
            };
            let peer = serving[turn % serving.len()];
            turn += 1;
            let client = client.clone();
            in_flight.push(async move {
                let answer = client.blob(peer, BlobRequest::Group { id, index }).await;
                (peer, index, answer)
            });
        }
        let Some((peer, index, answer)) = in_flight.next().await else {
            break; // nothing missing, nothing in flight: done, or no peer left
        };
        let verdict = match answer {
            Ok(BlobResponse::Group(bytes)) => outline
                .check_group(index, &bytes)
                .map(|()| bytes)
                .map_err(|e| format!("sent a bad group: {e}")),
            Ok(BlobResponse::NotFound) => Err("does not have it".to_string()),
            Ok(other) => Err(format!("answered {other:?}")),
            Err(e) => Err(e.to_string()),
        };
        match verdict {
            Ok(bytes) => {
                let start = group_range(outline.total(), index).start;
                file.write_all_at(&bytes, start)
                    .with_context(|| format!("writing {}", partial.display()))?;
                *bytes_from.entry(peer).or_default() += bytes.len() as u64;
                progress.add(bytes.len() as u64);
            }
            Err(why) => {
                if peers.contains(&peer) {
                    tracing::warn!(%peer, what, %why, "dropping a peer from this download");
                    peers.retain(|p| *p != peer);
                }
                missing.push_back(index);
            }
        }
        if peers.is_empty() && in_flight.is_empty() {
            break;
        }
    }
    progress.finish();
    if !missing.is_empty() {
        bail!(
            "no peer left to serve {what} (blob {id}); {} of {} groups kept for a resume",
            outline.groups() - missing.len() as u64,
            outline.groups()
        );
    }
    file.sync_all()?;
    drop(file);
    let path = store
        .lock()
        .expect("blob store lock")
        .adopt(&partial, outline)?;
    client.provide(id).await;
    Ok(Fetched { path, bytes_from })
}

/// Blob `id`'s outline from `peer`, page by page, checked against the id, and its last group
/// from the same peer, checked against the outline: the root alone does not pin the size to
/// the byte (see `herd_protocol::outline`).
async fn fetch_outline(
    client: &Client,
    peer: PeerId,
    id: &ContentId,
) -> Result<(Outline, Vec<u8>)> {
    let mut cvs = Vec::new();
    let mut total = None;
    let outline = loop {
        let first = cvs.len() as u64;
        let (size, page) = match client
            .blob(peer, BlobRequest::Outline { id: *id, first })
            .await?
        {
            BlobResponse::Outline { total, cvs } => (total, cvs),
            BlobResponse::NotFound => bail!("not found"),
            other => bail!("answered {other:?}"),
        };
        if size > MAX_BLOB_BYTES || total.is_some_and(|t| t != size) {
            bail!("inconsistent or oversized size {size}");
        }
        total = Some(size);
        let groups = group_count(size);
        if page.is_empty() || page.len() > OUTLINE_PAGE || first + page.len() as u64 > groups {
            bail!("an outline page of {} entries at {first}", page.len());
        }
        cvs.extend(page);
        if cvs.len() as u64 == groups {
            break Outline::verify(id, size, cvs)?;
        }
    };
    let index = outline.groups() - 1;
    match client
        .blob(peer, BlobRequest::Group { id: *id, index })
        .await?
    {
        BlobResponse::Group(bytes) => {
            outline.check_group(index, &bytes)?;
            Ok((outline, bytes))
        }
        other => bail!("no last group: {other:?}"),
    }
}

/// Fetches each named blob in turn; returns where each is, by name, and who sent what.
pub async fn fetch_all(
    client: &Client,
    store: &SharedStore,
    files: &[NamedBlob],
) -> Result<(Vec<(String, PathBuf)>, BTreeMap<PeerId, u64>)> {
    let mut paths = Vec::with_capacity(files.len());
    let mut bytes_from: BTreeMap<PeerId, u64> = BTreeMap::new();
    for f in files {
        let fetched = fetch(client, store, f.id, &f.name).await?;
        for (peer, n) in fetched.bytes_from {
            *bytes_from.entry(peer).or_default() += n;
        }
        paths.push((f.name.clone(), fetched.path));
    }
    Ok((paths, bytes_from))
}

#[cfg(test)]
mod tests {
    //! Real libp2p on 127.0.0.1 inside one process: an honest peer serving its store, and a
    //! liar that corrupts one group.

    use std::sync::{Arc, Mutex};

    use herd_protocol::blobs::BlobStore;
    use herd_protocol::net::{Behaviour, BehaviourEvent, NetOptions, Role, build_swarm};
    use herd_protocol::outline::GROUP_BYTES;
    use libp2p::identity::Keypair;
    use libp2p::request_response;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, Swarm};

    use super::*;
    use crate::daemon::network;

    /// A swarm listening on loopback, and its full address.
    async fn listening() -> (Swarm<Behaviour>, Multiaddr) {
        let key = Keypair::generate_ed25519();
        let mut swarm = build_swarm(key, Role::Node, NetOptions::default()).unwrap();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                let peer = *swarm.local_peer_id();
                return (swarm, address.with_p2p(peer).unwrap());
            }
        }
    }

    fn store_with(dir: &std::path::Path, data: &[u8]) -> (SharedStore, ContentId) {
        let mut store = BlobStore::open(dir).unwrap();
        let id = store.put_bytes(data).unwrap();
        (Arc::new(Mutex::new(store)), id)
    }

    /// A client whose "coordinator" (last-resort provider) is `peer` at `addr`.
    async fn client_of(
        addr: &Multiaddr,
        store: SharedStore,
    ) -> (Client, tokio::task::JoinHandle<()>) {
        let key = Keypair::generate_ed25519();
        let swarm = build_swarm(key, Role::Node, NetOptions::default()).unwrap();
        let peer = herd_protocol::net::pinned_peer(addr).unwrap();
        let (client, event_loop, _announced) = network::new(swarm, peer, addr.clone(), store);
        (client, tokio::spawn(event_loop.run()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_group_drops_its_sender_and_the_download_resumes_from_an_honest_peer() {
        let data: Vec<u8> = (0..(3 * GROUP_BYTES + GROUP_BYTES / 2))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let tmp = tempfile::tempdir().unwrap();

        // The honest peer: a node's own network loop, serving its store.
        let (honest_store, id) = store_with(&tmp.path().join("honest"), &data);
        let (swarm, honest_addr) = listening().await;
        let nowhere: Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().unwrap();
        let (honest_client, honest_loop, _) =
            network::new(swarm, PeerId::random(), nowhere, honest_store);
        let honest = tokio::spawn(honest_loop.run());

        // The liar: a true outline, but group 1 with one bit flipped.
        let (liar_store, _) = store_with(&tmp.path().join("liar"), &data);
        let (mut swarm, liar_addr) = listening().await;
        let liar = tokio::spawn(async move {
            loop {
                if let SwarmEvent::Behaviour(BehaviourEvent::Blob(
                    request_response::Event::Message {
                        message:
                            request_response::Message::Request {
                                request, channel, ..
                            },
                        ..
                    },
                )) = swarm.select_next_some().await
                {
                    let mut response = liar_store.lock().unwrap().serve(&request);
                    if let (BlobRequest::Group { index: 1, .. }, BlobResponse::Group(bytes)) =
                        (&request, &mut response)
                    {
                        bytes[100] ^= 1;
                    }
                    let _ = swarm.behaviour_mut().blob.send_response(channel, response);
                }
            }
        });

        let mine = Arc::new(Mutex::new(
            BlobStore::open(&tmp.path().join("mine")).unwrap(),
        ));
        let (client, net) = client_of(&liar_addr, mine.clone()).await;
        let err = fetch(&client, &mine, id, "test blob").await.unwrap_err();
        assert!(err.to_string().contains("3 of 4 groups kept"), "{err:#}");
        assert!(!mine.lock().unwrap().contains(&id));
        drop(client);
        net.abort();

        // The honest peer sends only the group that is missing, and the last one (which
        // vouches for its outline).
        let (client, net) = client_of(&honest_addr, mine.clone()).await;
        let got = fetch(&client, &mine, id, "test blob").await.unwrap();
        assert_eq!(std::fs::read(&got.path).unwrap(), data);
        let honest_peer = herd_protocol::net::pinned_peer(&honest_addr).unwrap();
        assert_eq!(
            got.bytes_from.get(&honest_peer),
            Some(&(GROUP_BYTES + GROUP_BYTES / 2))
        );
        assert_eq!(got.bytes_from.len(), 1);
        // And now it is a cache hit.
        let again = fetch(&client, &mine, id, "test blob").await.unwrap();
        assert!(again.bytes_from.is_empty());
        drop((client, honest_client));
        net.abort();
        honest.abort();
        liar.abort();
    }
}
