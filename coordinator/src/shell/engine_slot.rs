//! The engine's slot: free, or away on a blocking thread with one job. Tensor work never runs
//! on the async runtime, and the engine does one job at a time.

use anyhow::{Context, Result};
use herd_protocol::{LeaseId, Round};
use tokio::task::JoinHandle;

use crate::checkpoint::Checkpoint;
use crate::engine::{Engine, RoundResult, VerifyOutcome};

/// What a job of the engine's produced.
pub enum EngineDone {
    Verified(LeaseId, Box<VerifyOutcome>),
    /// The coordinator's own replay of a checked submission: its sketch, and the seconds it
    /// took.
    Replayed(LeaseId, Result<Vec<f32>>, f64),
    /// A round aggregated, and the checkpoint saved with it on a checkpoint round.
    Aggregated(Round, Result<(RoundResult, Option<Checkpoint>)>),
}

pub enum EngineSlot {
    Free(Box<Engine>),
    /// On a blocking thread; the engine comes back with the job's result.
    Working(JoinHandle<(Box<Engine>, EngineDone)>),
    /// Only while a job is being handed over (never seen between events).
    HandingOver,
}

impl EngineSlot {
    pub fn new(engine: Engine) -> Self {
        EngineSlot::Free(Box::new(engine))
    }

    pub fn is_working(&self) -> bool {
        matches!(self, EngineSlot::Working(_))
    }

    /// Runs `job` on a blocking thread if the engine is free; `false` if it is busy.
    pub fn start(&mut self, job: impl FnOnce(&mut Engine) -> EngineDone + Send + 'static) -> bool {
        match std::mem::replace(self, EngineSlot::HandingOver) {
            EngineSlot::Free(mut engine) => {
                *self = EngineSlot::Working(tokio::task::spawn_blocking(move || {
                    let done = job(&mut engine);
                    (engine, done)
                }));
                true
            }
            busy => {
                *self = busy;
                false
            }
        }
    }

    /// Waits for the job to finish and takes the engine back (pending while it is free).
    /// Cancel-safe: dropped before the job ends, the job goes on and is awaited next time.
    pub async fn done(&mut self) -> Result<EngineDone> {
        let EngineSlot::Working(task) = self else {
            return std::future::pending().await;
        };
        let (engine, done) = task.await.context("engine task panicked")?;
        *self = EngineSlot::Free(engine);
        Ok(done)
    }
}
