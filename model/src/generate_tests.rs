//! Generation with the KV cache against a full forward pass, the uncached path, and
//! transformers' greedy output (`tests/fixtures/generate.json`, written by
//! `tests/fixtures/greedy_reference.py fixtures`; SmolLM2's by `cargo xtask fetch-model`).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::generate::{generate_greedy, generate_greedy_uncached};
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The models the cache is checked on: GQA, biases, MQA with tied embeddings, and the
/// embedded default (trained, so its greedy choices are not near-ties of random weights).
const MODELS: [&str; 4] = [
    "tests/fixtures/gqa",
    "tests/fixtures/bias",
    "tests/fixtures/tied",
    "model/default/base",
];

fn ids(vocab: i64, n: i64, seed: i64) -> Vec<i64> {
    (0..n)
        .map(|i| (i * 7919 + seed * 104_729) % vocab)
        .collect()
}

#[test]
fn cached_logits_match_a_full_forward_pass() {
    let _guard = tch::no_grad_guard();
    for dir in MODELS {
        let model = Llama::load(&repo(dir), Device::Cpu).unwrap();
        let seq = ids(model.config().vocab_size, 12, 1);
        let full = model
            .forward(&Tensor::from_slice(&seq).unsqueeze(0), None)
            .unwrap();
        let mut cache = model.new_cache();
        // A prompt of 4, a chunk of 3 after it (the explicit mask), then one at a time.
        let mut at = 0;
        for chunk in [4, 3, 1, 1, 1, 1, 1] {
            let input = Tensor::from_slice(&seq[at..at + chunk]).unsqueeze(0);
            let got = model.next_token_logits(&input, None, &mut cache).unwrap();
            at += chunk;
            let want = full.select(1, at as i64 - 1);
            let diff = (got - want)
                .abs()
                .max()
                .to_kind(Kind::Double)
                .double_value(&[]);
            assert!(diff < 1e-4, "{dir}: position {at}: logits differ by {diff}");
            assert_eq!(cache.len(), at as i64);
        }
    }
}

#[test]
fn cached_generation_equals_the_uncached_one_past_the_window() {
    let model = Llama::load(&repo("model/default/base"), Device::Cpu).unwrap();
    let window = model.config().max_position_embeddings;
    let prompt = ids(model.config().vocab_size, window - 20, 2);
    // 40 new tokens: the last 20 are made from a window that slid past the prompt's start.
    let cached = generate_greedy(&model, None, &prompt, 40, None).unwrap();
    let uncached = generate_greedy_uncached(&model, None, &prompt, 40, None).unwrap();
    assert_eq!(cached.len(), 40);
    assert_eq!(cached, uncached);
}

#[test]
fn a_cache_refuses_positions_past_the_window() {
    let model = Llama::load(&repo("tests/fixtures/gqa"), Device::Cpu).unwrap();
    let window = model.config().max_position_embeddings;
    let mut cache = model.new_cache();
    let input = Tensor::from_slice(&ids(model.config().vocab_size, window, 3)).unsqueeze(0);
    let logits = model.next_token_logits(&input, None, &mut cache).unwrap();
    assert_eq!(logits.size(), [1, model.config().vocab_size]);
    let one_more = Tensor::from_slice(&[1i64]).unsqueeze(0);
    let err = model
        .next_token_logits(&one_more, None, &mut cache)
        .unwrap_err();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
}

/// One reference generation: transformers' `generate(do_sample=False)` on `prompt_ids`.
#[derive(serde::Deserialize)]
struct Reference {
    model: String,
    prompt_ids: Vec<i64>,
    max_new_tokens: usize,
    eos: Option<i64>,
    new_ids: Vec<i64>,
    /// The prompt's text, where it was tokenized by transformers' tokenizer.
    prompt: Option<String>,
    /// `new_ids` decoded without special tokens.
    text: Option<String>,
}

fn check_references(file: &Path, model_dir: impl Fn(&str) -> PathBuf) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    let references: Vec<Reference> = serde_json::from_str(&text).unwrap();
    // Each model once, however many references it has (SmolLM2 is 540 MB).
    let mut models = std::collections::HashMap::new();
    for r in &references {
        let dir = model_dir(&r.model);
        let model = models
            .entry(r.model.clone())
            .or_insert_with(|| Llama::load(&dir, Device::Cpu).unwrap());
        let got = generate_greedy(model, None, &r.prompt_ids, r.max_new_tokens, r.eos).unwrap();
        assert_eq!(
            got, r.new_ids,
            "{}: greedy output differs from transformers' for prompt {:?}",
            r.model, r.prompt_ids
        );
        let tokenizer = || TextTokenizer::from_dir(&dir).unwrap();
        if let Some(prompt) = &r.prompt {
            assert_eq!(tokenizer().encode(prompt, true).unwrap(), r.prompt_ids);
        }
        if let Some(text) = &r.text {
            assert_eq!(&tokenizer().decode(&got).unwrap(), text);
        }
    }
    references.len()
}

#[test]
fn greedy_generation_matches_transformers() {
    let checked = check_references(&repo("tests/fixtures/generate.json"), repo);
    assert!(checked >= 4, "only {checked} reference generations");
}

/// SmolLM2-135M-Instruct, when `cargo xtask fetch-model smollm2-135m` has put it in `.models/`.
#[test]
fn greedy_generation_matches_transformers_on_smollm2() {
    let dir = repo(".models/smollm2-135m");
    let file = dir.join("reference_generate.json");
    if !file.exists() {
        eprintln!(
            "skipped: {} is absent (cargo xtask fetch-model smollm2-135m writes it)",
            file.display()
        );
        return;
    }
    let checked = check_references(&file, |_| dir.clone());
    assert!(checked >= 4, "only {checked} reference generations");
}
