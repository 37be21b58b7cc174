//! One lease's life: ask the coordinator for a shard, fetch what it needs and train it (or hand
//! it back when the daemon must stop first), submit the delta, count the verdict in the status
//! file and the lease journal, and keep the error-feedback residual for the next delta. A check
//! lease is trained the same way and answered with its sketch (docs/checking.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use herd_protocol::LeaseId;
use herd_protocol::messages::{
    Lease, LeaseRequest, LeaseTask, PROTOCOL_VERSION, RpcRequest, RpcResponse, Submission, Verdict,
    now_ms,
};
use libp2p::identity::Keypair;

use super::MAX_BACKOFF;
use super::admission::Admission;
use super::availability::Availability;
use super::journal::{self, LeaseRecord};
use super::network::{Client, NetFailure};
use super::status::NodeStatus;
use super::worker::{CheckOutcome, Outcome, Worker};

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
    /// Its delta was sent; its verdict comes while the node goes on (see
    /// [`Contributor::settle`]).
    Submitted,
    /// A check's sketch was reported.
    Checked,
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
    /// The last submission, while its verdict is out: the node takes checks meanwhile, and
    /// settles it (residual, journal, status) before it trains its next delta.
    pub pending: Option<HandIn>,
}

/// A submission on its way: the task that delivers it and brings its verdict back.
pub struct HandIn {
    sent: Sent,
    verdict: tokio::task::JoinHandle<Result<RpcResponse, NetFailure>>,
}

/// What settling a submission's verdict needs.
struct Sent {
    lease: Lease,
    feedback: herd_protocol::delta::Feedback,
    loss_before: f64,
    loss_after: f64,
    fetch_seconds: f64,
    train_seconds: f64,
    bytes: usize,
    tokens: u64,
    at: std::time::Instant,
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
            checks_only: self.pending.is_some(),
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

    /// Trains `lease` and submits its delta (or, for a check, reports its sketch), unless
    /// Ctrl-C or `availability` stops it first: then the lease goes back to the coordinator.
    pub async fn work(&mut self, lease: &Lease, availability: &Availability) -> Result<Ended> {
        let doing = match lease.task {
            LeaseTask::Train => "training",
            LeaseTask::Check => "checking",
        };
        tracing::info!(lease = %lease.id, round = %lease.round, shard = %lease.shard, steps = lease.inner_steps, "{doing} shard");
        self.report(format!(
            "{doing} round {}, shard {}",
            lease.round, lease.shard
        ));
        let client = self.client.clone();
        match lease.task {
            LeaseTask::Train => {
                // The residual this delta is encoded with is what the last verdict left. (A
                // node asks only for checks while a verdict is out, so it is in already.)
                self.settle().await;
                let work = self.worker.work(&self.client, &self.keypair, lease);
                match unless_stopped(&client, lease, availability, work).await? {
                    Ok(outcome) => self.pending = Some(self.send(lease, outcome)),
                    Err(ended) => return Ok(ended),
                }
                Ok(Ended::Submitted)
            }
            LeaseTask::Check => {
                let work = self.worker.check(&self.client, lease);
                match unless_stopped(&client, lease, availability, work).await? {
                    Ok(outcome) => self.report_check(lease, outcome).await,
                    Err(ended) => return Ok(ended),
                }
                Ok(Ended::Checked)
            }
        }
    }

    /// Settles the last submission if its verdict is in (without waiting).
    pub async fn settle_if_answered(&mut self) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.verdict.is_finished())
        {
            self.settle().await;
        }
    }

    /// Until the last submission's verdict is in (at once if none is out). Cancel-safe: it
    /// only looks.
    pub async fn answered(&self) {
        while self
            .pending
            .as_ref()
            .is_some_and(|p| !p.verdict.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the last submission's verdict, if one is out, and settles it.
    pub async fn settle(&mut self) {
        let Some(HandIn { sent, verdict }) = self.pending.take() else {
            return;
        };
        let verdict = match verdict.await {
            Ok(verdict) => verdict,
            Err(e) => Err(NetFailure::Failed(format!(
                "the submission task failed: {e}"
            ))),
        };
        self.count_verdict(sent, verdict);
    }

    /// Starts delivering what `lease` produced; the verdict is waited for by [`Self::settle`].
    fn send(&self, lease: &Lease, outcome: Outcome) -> HandIn {
        let sent = Sent {
            lease: lease.clone(),
            feedback: outcome.feedback,
            loss_before: outcome.loss_before,
            loss_after: outcome.loss_after,
            fetch_seconds: outcome.fetch_seconds,
            train_seconds: outcome.seconds,
            bytes: outcome.submission.payload.len(),
            tokens: outcome.submission.tokens,
            at: std::time::Instant::now(),
        };
        let client = self.client.clone();
        let expires_at_ms = lease.expires_at_ms;
        let verdict =
            tokio::spawn(async move { submit(&client, outcome.submission, expires_at_ms).await });
        HandIn { sent, verdict }
    }

    /// Sends a check's sketch and writes its answer in the lease journal.
    async fn report_check(&mut self, lease: &Lease, outcome: CheckOutcome) {
        let sent = std::time::Instant::now();
        let answer = self
            .client
            .rpc(RpcRequest::Report(Box::new(outcome.report)))
            .await;
        let verdict = match &answer {
            Ok(RpcResponse::Verdict(Verdict::Accepted)) => "check accepted".to_string(),
            Ok(RpcResponse::Verdict(Verdict::Rejected(reason))) => format!("check: {reason}"),
            Ok(other) => format!("check: unexpected answer {other:?}"),
            Err(e) => format!("check not delivered: {e}"),
        };
        tracing::info!(lease = %lease.id, seconds = format!("{:.1}", outcome.seconds), %verdict, "check reported");
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
                verdict,
                bytes: 0,
                tokens: outcome.tokens,
            },
        );
    }

    /// Counts a submission's verdict in the journal and the status file, and keeps what did
    /// not reach the model as the residual for the next delta (error feedback).
    fn count_verdict(&mut self, sent: Sent, verdict: Result<RpcResponse, NetFailure>) {
        let Sent {
            lease,
            feedback,
            loss_before,
            loss_after,
            fetch_seconds,
            train_seconds,
            bytes,
            tokens,
            at,
        } = sent;
        let lease = &lease;
        let accepted = matches!(verdict, Ok(RpcResponse::Verdict(Verdict::Accepted)));
        journal::append(
            &self.data_dir,
            &LeaseRecord {
                run: lease.run.clone(),
                round: lease.round.0,
                shard: lease.shard.0,
                at_ms: now_ms(),
                fetch_seconds,
                train_seconds,
                submit_seconds: at.elapsed().as_secs_f64(),
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
                    lease = %lease.id, loss_before = format!("{loss_before:.4}"),
                    loss_after = format!("{loss_after:.4}"), bytes, seconds = format!("{train_seconds:.1}"),
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
            feedback.residual_if_accepted()
        } else {
            feedback.residual_if_rejected()
        };
        if let Err(e) = self.worker.residuals.save(&lease.run, residual) {
            tracing::warn!(error = %e, "could not keep the error-feedback residual");
        }
    }
}

/// Runs `work` unless Ctrl-C or `availability` stops the daemon first: then hands `lease`
/// back and says how it ended.
async fn unless_stopped<T>(
    client: &Client,
    lease: &Lease,
    availability: &Availability,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<Result<T, Ended>> {
    tokio::select! {
        done = work => Ok(Ok(done?)),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!(lease = %lease.id, "interrupted: returning the lease");
            return_lease(client, lease.id).await;
            Ok(Err(Ended::Interrupted))
        }
        why = availability.stopped() => {
            tracing::info!(lease = %lease.id, %why, "stopping: returning the lease");
            return_lease(client, lease.id).await;
            Ok(Err(Ended::HandedBack))
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
