//! Serving blob requests without holding up the network loop with group reads: an answer
//! that needs no group read (a missing blob, a page of an outline) goes back at once; a group
//! is read and hash-checked on a blocking thread and its answer comes back through
//! [`BlobServer::next`]. An outline the store has not computed yet (a blob stored with
//! `put_bytes`, or found on disk at open) is hashed from the file on the loop, once. The node
//! and the coordinator serve blobs through this one type.

use libp2p::request_response::ResponseChannel;
use tokio::sync::mpsc;

use crate::blobs::{Answer, BlobStore};
use crate::messages::{BlobRequest, BlobResponse};

/// A blob request's channel and its answer, ready to send.
pub type Served = (ResponseChannel<BlobResponse>, BlobResponse);

/// Answers read off the loop, on their way back to it.
#[derive(Debug)]
pub struct BlobServer {
    tx: mpsc::UnboundedSender<Served>,
    rx: mpsc::UnboundedReceiver<Served>,
}

impl Default for BlobServer {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        BlobServer { tx, rx }
    }
}

impl BlobServer {
    /// Answers `request` from `store`: returns the answer when it is ready now; otherwise the
    /// group is read on a blocking thread (the store's lock is not held meanwhile) and its
    /// answer comes out of [`BlobServer::next`]. Must run inside a tokio runtime.
    pub fn answer(
        &self,
        store: &mut BlobStore,
        request: &BlobRequest,
        channel: ResponseChannel<BlobResponse>,
    ) -> Option<Served> {
        match store.answer(request) {
            Answer::Ready(response) => Some((channel, response)),
            read @ Answer::Read(_) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || {
                    // The loop may have ended meanwhile: then nobody waits for the answer.
                    let _ = tx.send((channel, read.finish()));
                });
                None
            }
        }
    }

    /// The next answer read off the loop (pending until there is one).
    pub async fn next(&mut self) -> Served {
        // `self` holds a sender, so the channel never closes.
        self.rx.recv().await.expect("the server holds a sender")
    }
}
