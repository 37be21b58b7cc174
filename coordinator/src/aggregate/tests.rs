//! Exact aggregation: with A frozen, the applied update of every adapted layer equals the mean
//! of the nodes' `scale·B·A` updates; training A too breaks that, and we measure by how much.

use std::path::Path;

use herd_model::Llama;
use herd_model::data::Dataset;
use herd_model::delta::lora_delta;
use herd_model::lora::{Lora, LoraConfig, Target};
use herd_model::tokenizer::TextTokenizer;
use herd_model::train::{TrainConfig, train_lora};

use super::*;

fn default_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/default")
}

/// The effective weight update `scale·(B·A)` of every adapted layer.
fn effective(lora: &Lora) -> Vec<Tensor> {
    let scale = lora.config().scale();
    let mut out = Vec::new();
    for layer in 0..4 {
        for &t in &lora.config().targets {
            let p = lora.pair(layer, t).unwrap();
            out.push(p.b.detach().matmul(&p.a.detach()) * scale);
        }
    }
    out
}

/// Trains three nodes from the same adapter on three shards, aggregates with plain averaging
/// (outer lr 1, momentum 0), and returns the largest gap between the applied update and the
/// mean of the nodes' updates, relative to the largest update.
fn aggregation_error(train_a: bool) -> (f64, f64) {
    let base = default_dir().join("base");
    let model = Llama::load(&base, tch::Device::Cpu).unwrap();
    let tok = TextTokenizer::from_dir(&base).unwrap();
    let cfg = model.config();
    let data = Dataset::load(
        &default_dir().join("data/train.jsonl"),
        &tok,
        128,
        cfg.eos_id(),
        cfg.vocab_size,
    )
    .unwrap();
    let lora_cfg = LoraConfig {
        train_a,
        targets: Target::DEFAULT.to_vec(),
        ..LoraConfig::default()
    };
    let train = TrainConfig {
        steps: 15,
        lr: 5e-3,
        measure_loss: false,
        ..TrainConfig::default()
    };

    // θ_r: a global adapter that has already moved away from B = 0.
    let global = Lora::new(cfg, lora_cfg.clone(), tch::Device::Cpu).unwrap();
    train_lora(
        &model,
        &global,
        &data,
        &(0..40).collect::<Vec<_>>(),
        &train,
        |_| {},
    )
    .unwrap();
    let start = global.snapshot().unwrap();
    let before = effective(&global);

    let mut deltas = Vec::new();
    let mut node_updates: Vec<Vec<Tensor>> = Vec::new();
    for shard in 0..3usize {
        let mut node = Lora::new(cfg, lora_cfg.clone(), tch::Device::Cpu).unwrap();
        node.load_factors(|name, _| Ok(start.iter().find(|(n, _)| n == name).unwrap().1.copy()))
            .unwrap();
        let indices: Vec<usize> = (shard * 40..shard * 40 + 40).collect();
        train_lora(
            &model,
            &node,
            &data,
            &indices,
            &TrainConfig {
                seed: shard as u64,
                ..train.clone()
            },
            |_| {},
        )
        .unwrap();
        node_updates.push(
            effective(&node)
                .iter()
                .zip(&before)
                .map(|(a, b)| a - b)
                .collect(),
        );
        deltas.push(lora_delta(&start, &node).unwrap());
    }
    let weighted: Vec<(&Delta, u64)> = deltas.iter().map(|d| (d, 1)).collect();
    let mean = weighted_mean(&weighted).unwrap();
    OuterOptimizer::new(1.0, 0.0).step(&global, &mean).unwrap();
    let applied: Vec<Tensor> = effective(&global)
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();

    let (mut gap, mut size) = (0f64, 0f64);
    for (i, applied) in applied.iter().enumerate() {
        let mean_update = (&node_updates[0][i] + &node_updates[1][i] + &node_updates[2][i]) / 3.0;
        gap = gap.max((applied - &mean_update).abs().max().double_value(&[]));
        size = size.max(mean_update.abs().max().double_value(&[]));
    }
    (gap, gap / size)
}

#[test]
fn frozen_a_makes_aggregation_exact_and_training_a_does_not() {
    let (gap, relative) = aggregation_error(false);
    eprintln!("A frozen: max |applied - mean(B·A updates)| = {gap:.3e} (relative {relative:.3e})");
    assert!(
        gap < 1e-6,
        "with A frozen the applied update must equal the mean update: {gap}"
    );
    let (gap_a, relative_a) = aggregation_error(true);
    eprintln!(
        "A trained: max |applied - mean(B·A updates)| = {gap_a:.3e} (relative {relative_a:.3e})"
    );
    assert!(
        gap_a > 100.0 * gap.max(1e-9),
        "training A should make averaging inexact: {gap_a}"
    );
}

#[test]
fn weighted_mean_weighs_by_tokens() {
    use herd_protocol::delta::DeltaTensor;
    let d = |v: f32| Delta {
        tensors: vec![DeltaTensor {
            name: "x".into(),
            shape: vec![2],
            values: vec![v, 2.0 * v],
        }],
    };
    let (a, b) = (d(1.0), d(4.0));
    let mean = weighted_mean(&[(&a, 3), (&b, 1)]).unwrap();
    assert_eq!(Vec::<f32>::try_from(&mean[0].1).unwrap(), vec![1.75, 3.5]);
    assert!(weighted_mean(&[]).is_err());
}

#[test]
fn robust_mean_clips_trims_and_reduces_to_the_weighted_mean() {
    use herd_protocol::delta::DeltaTensor;
    let make = |values: Vec<f32>| Delta {
        tensors: vec![DeltaTensor {
            name: "t".into(),
            shape: vec![values.len() as u32],
            values,
        }],
    };
    let honest: Vec<Delta> = (0..9)
        .map(|i| make(vec![1.0 + i as f32 * 0.01, -1.0, 0.0, 0.5]))
        .collect();
    let attacker = make(vec![1000.0, 1000.0, 0.0, 0.5]);
    let mut all: Vec<(&Delta, u64)> = honest.iter().map(|d| (d, 10)).collect();
    // Plain settings reproduce the weighted mean.
    let plain = Robustness {
        clip_multiple: f64::INFINITY,
        trim_fraction: 0.0,
    };
    let (a, _) = robust_mean(&all, plain).unwrap();
    let (b, _) = (weighted_mean(&all).unwrap(), ());
    assert!(a[0].1.allclose(&b[0].1, 1e-6, 1e-6, false));
    all.push((&attacker, 10));
    let (mean, report) = robust_mean(
        &all,
        Robustness {
            clip_multiple: 2.0,
            trim_fraction: 0.1,
        },
    )
    .unwrap();
    assert_eq!(report.clipped, 1);
    assert_eq!(report.trimmed, 2 * 3); // one from each end of the three sent coordinates
    let m = Vec::<f32>::try_from(&mean[0].1).unwrap();
    // The attacker's values were clipped, then trimmed away: the mean stays honest.
    assert!((m[0] - 1.04).abs() < 0.05, "{m:?}");
    assert!((m[1] + 1.0).abs() < 0.05, "{m:?}");
    assert_eq!(m[2], 0.0);
    assert!((m[3] - 0.5).abs() < 1e-6);
    // Sparse: a coordinate one peer of ten sent is averaged over all ten, not trimmed away.
    let mut sparse: Vec<Delta> = (0..9).map(|_| make(vec![0.0; 4])).collect();
    sparse.push(make(vec![0.0, 0.0, 5.0, 0.0]));
    let weighted: Vec<(&Delta, u64)> = sparse.iter().map(|d| (d, 1)).collect();
    let (mean, _) = robust_mean(
        &weighted,
        Robustness {
            clip_multiple: f64::INFINITY,
            trim_fraction: 0.1,
        },
    )
    .unwrap();
    let m = Vec::<f32>::try_from(&mean[0].1).unwrap();
    assert!((m[2] - 0.5).abs() < 1e-6, "{m:?}");
    assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
}
