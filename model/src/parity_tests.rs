//! Parity with transformers and PEFT on the fixtures written by `tests/fixtures/make_fixtures.py`:
//! logits, losses, tokenization, adapter import/export, merge and the gradient of one step.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::data::{Example, collate};
use crate::llama::Llama;
use crate::lora::Lora;
use crate::merge::merge_adapter;
use crate::peft::{load_adapter, save_adapter};
use crate::safetensors_io::SafetensorsFiles;
use crate::tokenizer::TextTokenizer;

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn reference(model: &str, file: &str) -> SafetensorsFiles {
    SafetensorsFiles::open(&[fixture(model).join(file)]).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().to_kind(Kind::Double).double_value(&[])
}

fn mean_loss(model: &Llama, lora: Option<&Lora>, ids: &Tensor, labels: &Tensor) -> (Tensor, f64) {
    let (sum, count) = model.loss_sum(ids, labels, lora).unwrap();
    let loss = sum / count as f64;
    let value = loss.double_value(&[]);
    (loss, value)
}

#[test]
fn logits_and_loss_match_transformers() {
    for name in ["gqa", "bias", "tied"] {
        let model = Llama::load(&fixture(name), Device::Cpu).unwrap();
        let r = reference(name, "reference.safetensors");
        let ids = r.tensor("input_ids", None).unwrap();
        let labels = r.tensor("labels", None).unwrap();
        let logits = model.forward(&ids, None).unwrap();
        let diff = max_abs_diff(&logits, &r.tensor("logits", None).unwrap());
        assert!(diff < TOL, "{name}: logits differ by {diff}");
        let (_, loss) = mean_loss(&model, None, &ids, &labels);
        let expected = r.tensor("loss", None).unwrap().double_value(&[]);
        assert!(
            (loss - expected).abs() < TOL,
            "{name}: loss {loss} vs {expected}"
        );
    }
}

#[test]
fn tokenizer_matches_transformers() {
    let r = reference("gqa", "reference.safetensors");
    let text = r.metadata().unwrap()["text"].clone();
    let tok = TextTokenizer::from_dir(&fixture("gqa")).unwrap();
    let expected = Vec::<i64>::try_from(&r.tensor("text_ids", None).unwrap()).unwrap();
    assert_eq!(tok.encode(&text, true).unwrap(), expected);
}

#[test]
fn peft_adapter_matches_and_gradients_of_one_step_match() {
    let model = Llama::load(&fixture("gqa"), Device::Cpu).unwrap();
    let lora = load_adapter(&fixture("gqa/adapter"), model.config(), Device::Cpu).unwrap();
    let base = reference("gqa", "reference.safetensors");
    let r = reference("gqa", "reference_adapter.safetensors");
    let ids = base.tensor("input_ids", None).unwrap();
    let labels = base.tensor("labels", None).unwrap();
    let logits = model.forward(&ids, Some(&lora)).unwrap();
    let diff = max_abs_diff(&logits, &r.tensor("logits", None).unwrap());
    assert!(diff < TOL, "adapter logits differ by {diff}");

    let (loss, value) = mean_loss(&model, Some(&lora), &ids, &labels);
    let expected = r.tensor("loss", None).unwrap().double_value(&[]);
    assert!(
        (value - expected).abs() < TOL,
        "adapter loss {value} vs {expected}"
    );
    loss.backward();
    let mut checked = 0;
    for (name, factor) in lora.named_factors() {
        if !name.contains("lora_B") {
            assert!(!factor.requires_grad(), "{name}: A is frozen by default");
            continue;
        }
        let expected = r
            .tensor(&format!("grad.base_model.model.{name}"), None)
            .unwrap();
        let diff = max_abs_diff(&factor.grad(), &expected);
        assert!(diff < TOL, "{name}: gradient differs by {diff}");
        checked += 1;
    }
    assert_eq!(checked, 8, "2 layers x 4 targets");
}

#[test]
fn exported_adapter_reloads_and_merge_matches_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = Llama::load(&fixture("gqa"), Device::Cpu).unwrap();
    let lora = load_adapter(&fixture("gqa/adapter"), model.config(), Device::Cpu).unwrap();
    let ids = reference("gqa", "reference.safetensors")
        .tensor("input_ids", None)
        .unwrap();
    let with_adapter = model.forward(&ids, Some(&lora)).unwrap();

    let exported = dir.path().join("adapter");
    save_adapter(&exported, &lora, Some("gqa")).unwrap();
    let reloaded = load_adapter(&exported, model.config(), Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &model.forward(&ids, Some(&reloaded)).unwrap(),
        &with_adapter,
    );
    assert_eq!(diff, 0.0, "export/import must be lossless");

    let merged_dir = dir.path().join("merged");
    let report = merge_adapter(&fixture("gqa"), &exported, &merged_dir).unwrap();
    assert_eq!(report.merged_layers, 8);
    let merged = Llama::load(&merged_dir, Device::Cpu).unwrap();
    let diff = max_abs_diff(&merged.forward(&ids, None).unwrap(), &with_adapter);
    assert!(
        diff < TOL,
        "merged model differs from base + adapter by {diff}"
    );
    assert!(merged_dir.join("tokenizer.json").exists());
}

#[test]
fn padded_batches_give_the_same_loss_as_single_sequences() {
    let model = Llama::load(&fixture("gqa"), Device::Cpu).unwrap();
    let long = Example {
        ids: vec![1, 5, 9, 20, 33, 7],
        labels: vec![-100, -100, 9, 20, 33, 7],
    };
    let short = Example {
        ids: vec![1, 8, 14],
        labels: vec![1, 8, 14],
    };
    let batch = collate(&[&long, &short], model.config().pad_id()).unwrap();
    let (sum, count) = model
        .loss_sum(&batch.input_ids, &batch.labels, None)
        .unwrap();
    let mut single_sum = 0.0;
    let mut single_count = 0;
    for e in [&long, &short] {
        let b = collate(&[e], 0).unwrap();
        let (s, c) = model.loss_sum(&b.input_ids, &b.labels, None).unwrap();
        single_sum += s.double_value(&[]);
        single_count += c;
    }
    assert_eq!(count, single_count);
    assert_eq!(count as usize, long.targets() + short.targets());
    assert!((sum.double_value(&[]) - single_sum).abs() < 1e-4);
}

#[test]
fn sharded_weights_load_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = SafetensorsFiles::open_model_dir(&fixture("gqa")).unwrap();
    let mut names: Vec<String> = single.names().map(str::to_string).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<(String, Tensor)> = chunk
            .iter()
            .map(|n| (n.clone(), single.tensor(n, None).unwrap()))
            .collect();
        crate::safetensors_io::write_safetensors(&dir.path().join(&file), &tensors, &[]).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(fixture("gqa/config.json"), dir.path().join("config.json")).unwrap();
    let sharded = Llama::load(dir.path(), Device::Cpu).unwrap();
    let model = Llama::load(&fixture("gqa"), Device::Cpu).unwrap();
    let ids = reference("gqa", "reference.safetensors")
        .tensor("input_ids", None)
        .unwrap();
    let diff = max_abs_diff(
        &sharded.forward(&ids, None).unwrap(),
        &model.forward(&ids, None).unwrap(),
    );
    assert_eq!(diff, 0.0);
}
