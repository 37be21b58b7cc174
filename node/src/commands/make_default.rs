//! `herd-node make-default` (hidden; run through `cargo xtask make-default`): rebuilds the
//! embedded default from nothing — the synthetic world, a word-level tokenizer, a tiny LLaMA
//! pretrained on the world's plain-text facts, and the Alpaca train / held-out files.
//!
//! Deterministic for the same seed and thread count (`--threads 1` is what produced the
//! committed files).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use herd_model::config::{LlamaConfig, RopeParameters, TokenIds};
use herd_model::data::{Dataset, alpaca_prompt};
use herd_model::eval::evaluate;
use herd_model::tokenizer::TextTokenizer;
use herd_model::train::{LrSchedule, TrainConfig, pretrain};
use herd_model::{Llama, WeightInit};
use serde_json::{Value, json};

use crate::default_world::{self, World};
use crate::progress::StepProgress;

const SPECIALS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];

#[derive(Debug, clap::Args)]
pub struct MakeDefaultArgs {
    /// Output dir; `base/` and `data/` are written inside.
    #[arg(long, default_value = "model/default")]
    out: PathBuf,
    #[arg(long, default_value_t = 4000)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    threads: i32,
}

pub fn run(args: MakeDefaultArgs) -> Result<()> {
    tch::set_num_threads(args.threads);
    tch::manual_seed(args.seed as i64);
    let world = default_world::build(args.seed);
    let base = args.out.join("base");
    let data = args.out.join("data");
    for dir in [&base, &data] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_jsonl(&args.out.join("corpus.jsonl"), &world.corpus)?;
    write_jsonl(&data.join("train.jsonl"), &world.train)?;
    write_jsonl(&data.join("heldout.jsonl"), &world.heldout)?;
    let vocab = vocabulary(&world);
    std::fs::write(
        base.join("tokenizer.json"),
        serde_json::to_string_pretty(&tokenizer_json(&vocab))?,
    )?;
    let cfg = model_config(vocab.len() as i64);

    let tokenizer = TextTokenizer::from_dir(&base)?;
    let corpus = Dataset::load(
        &args.out.join("corpus.jsonl"),
        &tokenizer,
        128,
        cfg.eos_id(),
        cfg.vocab_size,
    )?;
    let model = Llama::new(
        cfg,
        tch::Device::Cpu,
        WeightInit::Random { std: 0.02 },
        true,
    )?;
    let train_cfg = TrainConfig {
        steps: args.steps,
        batch_size: 32,
        lr: 3e-3,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        seed: args.seed,
        schedule: LrSchedule::Cosine { warmup_steps: 100 },
        measure_loss: true,
    };
    let mut progress = StepProgress::new(train_cfg.steps, "pretrain");
    let indices: Vec<usize> = (0..corpus.len()).collect();
    let report = pretrain(&model, &corpus, &indices, &train_cfg, |s| {
        progress.step(s.step, s.loss, s.tokens)
    })?;
    progress.finish();
    model.save(&base)?;

    let heldout = Dataset::load(
        &data.join("heldout.jsonl"),
        &tokenizer,
        128,
        model.config().eos_id(),
        model.config().vocab_size,
    )?;
    let ex: Vec<_> = heldout.examples.iter().collect();
    let heldout_loss = evaluate(&model, None, &ex, 32)?.loss;
    println!(
        "pretrained {} params: corpus loss {:.4} -> {:.4}; held-out instruction loss of the base {:.4}; vocab {}; {} corpus lines, {} train / {} held-out instructions; written to {}",
        model
            .var_store()
            .variables()
            .values()
            .map(|t| t.numel())
            .sum::<usize>(),
        report.loss_before,
        report.loss_after,
        heldout_loss,
        vocab.len(),
        world.corpus.len(),
        world.train.len(),
        world.heldout.len(),
        args.out.display()
    );
    Ok(())
}

fn write_jsonl(path: &Path, records: &[Value]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Special tokens first, then every word and punctuation run of the world, sorted.
fn vocabulary(world: &World) -> Vec<String> {
    let mut words = BTreeSet::new();
    let mut add = |text: &str| words.extend(default_world::pre_tokenize(text));
    for r in &world.corpus {
        add(r["text"].as_str().unwrap_or_default());
    }
    for r in world.train.iter().chain(&world.heldout) {
        let field = |k: &str| r[k].as_str().unwrap_or_default().to_string();
        add(&alpaca_prompt(&field("instruction"), &field("input")));
        add(&alpaca_prompt(&field("instruction"), ""));
        add(&field("output"));
    }
    SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(words)
        .collect()
}

/// A HF `tokenizer.json`: word-level model, `Whitespace` pre-tokenizer, `<s>` prepended.
fn tokenizer_json(vocab: &[String]) -> Value {
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab_map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), json!(i)))
        .collect();
    let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "<unk>"}
    })
}

fn model_config(vocab_size: i64) -> LlamaConfig {
    LlamaConfig {
        architectures: Some(vec!["LlamaForCausalLM".into()]),
        model_type: "llama".into(),
        vocab_size,
        hidden_size: 64,
        intermediate_size: 192,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: None,
        rope_parameters: Some(RopeParameters {
            rope_theta: Some(10_000.0),
            rope_type: Some("default".into()),
        }),
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        bos_token_id: Some(TokenIds::One(1)),
        eos_token_id: Some(TokenIds::One(2)),
        pad_token_id: Some(TokenIds::One(3)),
    }
}
