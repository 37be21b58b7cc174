//! `herd-coordinator calibrate`: how far apart honest trainings of the same shard land when
//! only the machine differs (thread count, CPU or CUDA): the noise the replay tolerance must
//! allow. Each sample trains one shard of the run twice from θ_0 (through the node's own code
//! path), once per side, and compares the two deltas raw, and as a replay does: the second
//! side's sketch as it arrives in a payload (int8) against the first side's exact sketch. The
//! first side plays the coordinator's replay, the second the contributor.

use std::path::Path;

use anyhow::{Result, ensure};
use herd_model::Llama;
use herd_model::data::Dataset;
use herd_model::delta::delta_layout;
use herd_model::device::DeviceChoice;
use herd_model::lora::{Lora, LoraConfig};
use herd_model::shard::train_shard;
use herd_model::tokenizer::TextTokenizer;
use herd_protocol::delta::Delta;
use herd_protocol::sketch::{Agreement, agreement};
use herd_protocol::{LeaseId, Round, ShardId};
use serde::Serialize;

use crate::config::RunConfig;
use crate::lease::{in_process_lease, lora_spec};

/// The tolerance is this many times wider than the worst honest disagreement seen.
pub const MARGIN: f64 = 10.0;

/// Where one of the two trainings runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Side {
    #[serde(serialize_with = "device_name")]
    pub device: DeviceChoice,
    pub threads: i32,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} with {} threads",
            device_label(&self.device),
            self.threads
        )
    }
}

fn device_label(d: &DeviceChoice) -> String {
    match d {
        DeviceChoice::Auto => "auto".into(),
        DeviceChoice::Cpu => "cpu".into(),
        DeviceChoice::Cuda(n) => format!("cuda:{n}"),
    }
}

fn device_name<S: serde::Serializer>(d: &DeviceChoice, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&device_label(d))
}

/// One shard trained twice.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub round: u64,
    pub shard: u32,
    pub raw: Agreement,
    pub sketch: Agreement,
}

/// The calibration of one run config on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// The replay's side, then the contributor's.
    pub sides: [Side; 2],
    pub samples: Vec<Sample>,
    pub sketch_min_cosine: f64,
    pub sketch_max_rel_error: f64,
    pub raw_min_cosine: f64,
    pub raw_max_rel_error: f64,
    /// `MARGIN` × the worst honest disagreement (cosine floor 0.9, error cap 0.5).
    pub suggested_min_cosine: f64,
    pub suggested_max_rel_error: f64,
    /// The tolerance in the config, and how many honest samples it would reject.
    pub configured_min_cosine: f64,
    pub configured_max_rel_error: f64,
    pub false_rejects: usize,
}

/// Trains `replays` shards of `cfg` twice each, once on each of `sides`.
pub fn calibrate(
    cfg: &RunConfig,
    replays: usize,
    sides: [Side; 2],
    mut progress: impl FnMut(usize, &Sample),
) -> Result<Calibration> {
    ensure!(replays > 0, "at least one replay");
    let devices = [sides[0].device.resolve()?, sides[1].device.resolve()?];
    // On CUDA the base weights are bf16 (as on a contributor's GPU), so each side loads its own.
    let models = [
        Llama::load(&cfg.base_model, devices[0])?,
        Llama::load(&cfg.base_model, devices[1])?,
    ];
    let model = &models[0];
    let tok = TextTokenizer::from_dir(&cfg.base_model)?;
    let data = Dataset::for_model(
        &cfg.data,
        &tok,
        model.config(),
        Some(cfg.round.max_seq_len as usize),
    )?;
    let machine = cfg.machine_config(cfg.training_examples()?);
    let lora_cfg = LoraConfig::try_from(&lora_spec(cfg))?;
    let layout = delta_layout(&Lora::new(
        model.config(),
        lora_cfg.clone(),
        tch::Device::Cpu,
    )?);
    let mut samples = Vec::with_capacity(replays);
    for i in 0..replays {
        let (round, shard) = (
            Round((i / cfg.round.shards as usize) as u64),
            ShardId((i % cfg.round.shards as usize) as u32),
        );
        let lease = in_process_lease(cfg, &machine, LeaseId(i as u64), round, shard);
        let mut deltas = Vec::with_capacity(2);
        for ((side, device), model) in sides.iter().zip(devices).zip(&models) {
            tch::set_num_threads(side.threads);
            let lora = Lora::new(model.config(), lora_cfg.clone(), device)?;
            deltas.push(
                train_shard(model, &lora, &data, &lease, false, |_| {
                    std::ops::ControlFlow::Continue(())
                })?
                .delta,
            );
        }
        let flat =
            |d: &Delta| -> Vec<f32> { d.tensors.iter().flat_map(|t| t.values.clone()).collect() };
        let payload = deltas[1].encode(lease.codec, None, lease.seed)?.payload;
        let sent = Delta::decode(&payload, &layout, lease.codec, lease.seed)?;
        let sample = Sample {
            round: round.0,
            shard: shard.0,
            raw: agreement(&flat(&deltas[1]), &flat(&deltas[0])),
            sketch: agreement(&sent.sketch, &deltas[0].sketch(lease.seed)),
        };
        progress(i, &sample);
        samples.push(sample);
    }
    let min = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(f64::INFINITY, f64::min);
    let max = |f: fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    let (sketch_min_cosine, sketch_max_rel_error) =
        (min(|s| s.sketch.cosine), max(|s| s.sketch.rel_error));
    let v = &cfg.verify;
    let false_rejects = samples
        .iter()
        .filter(|s| {
            s.sketch.cosine < v.replay_min_cosine || s.sketch.rel_error > v.replay_max_rel_error
        })
        .count();
    Ok(Calibration {
        sides,
        sketch_min_cosine,
        sketch_max_rel_error,
        raw_min_cosine: min(|s| s.raw.cosine),
        raw_max_rel_error: max(|s| s.raw.rel_error),
        suggested_min_cosine: (1.0 - MARGIN * (1.0 - sketch_min_cosine)).max(0.9),
        suggested_max_rel_error: (MARGIN * sketch_max_rel_error).min(0.5),
        configured_min_cosine: v.replay_min_cosine,
        configured_max_rel_error: v.replay_max_rel_error,
        false_rejects,
        samples,
    })
}

/// Writes `c` as JSON to `path`.
pub fn write(c: &Calibration, path: &Path) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(c)?)?;
    Ok(())
}
