//! One lease's life: ask the coordinator for a shard, fetch what it needs and train it (or hand
//! it back when the daemon must stop first), submit the delta, count the verdict in the status
//! file and the lease journal, and keep the error-feedback residual for the next delta.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use herd_protocol::LeaseId;
use herd_protocol::messages::{
    Lease, LeaseRequest, PROTOCOL_VERSION, RpcRequest, RpcResponse, Submission, Verdict, now_ms,
};
use libp2p::identity::Keypair;

use super::MAX_BACKOFF;
use super::admission::Admission;
use super::availability::Availability;
use super::journal::{self, LeaseRecord};
use super::network::{Client, NetFailure};
use super::status::NodeStatus;
use super::worker::{Outcome, Worker};

/// Deliveries of one submission tried while the coordinator is unreachable.
const SUBMIT_ATTEMPTS: u32 = 8;

/// The coordinator's answer to a request for work.
pub enum Offer {
    /// A shard to train.
    Lease(Box<Lease>),
    /// No work yet: ask again after `retry_after_ms`.
    Wait { reason: String, retry_after_ms: u64 },
    /// The run is over.
    Finished { reason: String },
    /// This identity must first prove work for `run` at `bits`.
    Admission { run: String, bits: u8 },
    /// The request did not get through.
    Unreachable(NetFailure),
}

/// How a lease ended.
pub enum Ended {
    /// Its delta was sent (accepted, rejected, or lost on the way).
    Submitted,
    /// Handed back: the machine is no longer available to the daemon.
    HandedBack,
    /// Handed back on Ctrl-C: the daemon stops.
    Interrupted,
}

/// What working leases takes: the node's identity and link to the coordinator, the trainer,
/// and the status file it reports to.
pub struct Contributor {
    pub client: Client,
    pub keypair: Keypair,
    pub worker: Worker,
    pub status: NodeStatus,
    pub data_dir: PathBuf,
    /// This node's device, in words, sent with each lease request.
    pub device: String,
    /// Its admission proof, once it has one.
    pub admission: Admission,
}

impl Contributor {
    /// Says in the status file what the daemon does now.
    pub fn report(&mut self, doing: impl Into<String>) {
        self.status.set(&self.data_dir, doing);
    }

    /// Asks the coordinator for a shard; a refusal, or an answer that is not about work, is an
    /// error.
    pub async fn ask(&self) -> Result<Offer> {
        let request = RpcRequest::Lease(LeaseRequest {
            version: PROTOCOL_VERSION,
            device: self.device.clone(),
            admission: self.admission.proof(),
        });
        Ok(match self.client.rpc(request).await {
            Ok(RpcResponse::Lease(lease)) => Offer::Lease(lease),
            Ok(RpcResponse::NoWork {
                finished: true,
                reason,
                ..
            }) => Offer::Finished { reason },
            Ok(RpcResponse::NoWork {
                retry_after_ms,
                reason,
                ..
            }) => Offer::Wait {
                reason,
                retry_after_ms,
            },
            Ok(RpcResponse::Refused { reason }) => {
                bail!("the coordinator refused this node: {reason}")
            }
            Ok(RpcResponse::AdmissionRequired { run, bits }) => Offer::Admission { run, bits },
            Ok(other) => bail!("unexpected answer to a lease request: {other:?}"),
            Err(e) => Offer::Unreachable(e),
        })
    }

    /// Trains `lease` and submits its delta, unless Ctrl-C or `availability` stops it first:
    /// then the lease goes back to the coordinator.
    pub async fn work(&mut self, lease: &Lease, availability: &Availability) -> Result<Ended> {
        tracing::info!(lease = %lease.id, round = %lease.round, shard = %lease.shard, steps = lease.inner_steps, "training shard");
        self.report(format!(
            "training round {}, shard {}",
            lease.round, lease.shard
        ));
        let outcome = tokio::select! {
            o = self.worker.work(&self.client, &self.keypair, lease) => o?,
            _ = tokio::signal::ctrl_c() => {
                tracing::info!(lease = %lease.id, "interrupted: returning the lease");
                return_lease(&self.client, lease.id).await;
                return Ok(Ended::Interrupted);
            }
            why = availability.stopped() => {
                tracing::info!(lease = %lease.id, %why, "stopping: returning the lease");
                return_lease(&self.client, lease.id).await;
                return Ok(Ended::HandedBack);
            }
        };
        self.hand_in(lease, outcome).await;
        Ok(Ended::Submitted)
    }

    /// Submits what `lease` produced, counts the verdict, and keeps what did not reach the model
    /// as the residual for the next delta (error feedback).
    async fn hand_in(&mut self, lease: &Lease, outcome: Outcome) {
        let bytes = outcome.submission.payload.len();
        let tokens = outcome.submission.tokens;
        let sent = std::time::Instant::now();
        let verdict = submit(&self.client, outcome.submission, lease.expires_at_ms).await;
        let accepted = matches!(verdict, Ok(RpcResponse::Verdict(Verdict::Accepted)));
        journal::append(
            &self.data_dir,
            &LeaseRecord {
                run: lease.run.clone(),
                round: lease.round.0,
                shard: lease.shard.0,
                at_ms: now_ms(),
                fetch_seconds: outcome.fetch_seconds,
                train_seconds: outcome.seconds,
                submit_seconds: sent.elapsed().as_secs_f64(),
                verdict: match &verdict {
                    Ok(RpcResponse::Verdict(Verdict::Accepted)) => "accepted".into(),
                    Ok(RpcResponse::Verdict(Verdict::Rejected(reason))) => reason.to_string(),
                    Ok(_) => "unexpected answer".into(),
                    Err(e) => format!("not delivered: {e}"),
                },
                bytes: bytes as u64,
                tokens,
            },
        );
        match verdict {
            Ok(RpcResponse::Verdict(Verdict::Accepted)) => {
                self.status
                    .verdict(&self.data_dir, None, tokens, bytes as u64);
                tracing::info!(
                    lease = %lease.id, loss_before = format!("{:.4}", outcome.loss_before),
                    loss_after = format!("{:.4}", outcome.loss_after), bytes, seconds = format!("{:.1}", outcome.seconds),
                    "delta accepted"
                )
            }
            Ok(RpcResponse::Verdict(Verdict::Rejected(reason))) => {
                self.status
                    .verdict(&self.data_dir, Some(&reason), tokens, bytes as u64);
                tracing::warn!(lease = %lease.id, reason = %reason, "delta rejected")
            }
            Ok(other) => tracing::warn!(?other, "unexpected answer to a submission"),
            Err(e) => {
                tracing::warn!(error = %e, "submission lost; the lease will expire and be reissued")
            }
        }
        let residual = if accepted {
            outcome.feedback.residual_if_accepted()
        } else {
            outcome.feedback.residual_if_rejected()
        };
        if let Err(e) = self.worker.residuals.save(&lease.run, residual) {
            tracing::warn!(error = %e, "could not keep the error-feedback residual");
        }
    }
}

/// Hands a lease back so the coordinator reissues its shard at once rather than at expiry.
async fn return_lease(client: &Client, lease: LeaseId) {
    let back = tokio::time::timeout(
        Duration::from_secs(5),
        client.rpc(RpcRequest::Return { lease }),
    )
    .await;
    if !matches!(back, Ok(Ok(RpcResponse::Returned))) {
        tracing::warn!(%lease, "could not return the lease; it will expire");
    }
}

/// Sends `submission`, and again while the coordinator cannot be reached (it may be
/// restarting) and its lease is not over: the coordinator answers a repeated submission with
/// the verdict it already gave, so a retry never counts twice.
async fn submit(
    client: &Client,
    submission: Submission,
    expires_at_ms: u64,
) -> Result<RpcResponse, NetFailure> {
    let mut wait = Duration::from_millis(500);
    for attempt in 1.. {
        match client
            .rpc(RpcRequest::Submit(Box::new(submission.clone())))
            .await
        {
            Err(NetFailure::Stopped) => return Err(NetFailure::Stopped),
            Err(e)
                if now_ms() + wait.as_millis() as u64 <= expires_at_ms
                    && attempt < SUBMIT_ATTEMPTS =>
            {
                tracing::warn!(error = %e, attempt, retry_in = ?wait, "submission not delivered; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}
