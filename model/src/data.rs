//! Training data: `{"text"}` and Alpaca `{"instruction","input","output"}` records from JSONL or a
//! JSON array, tokenized into examples with labels, deterministic shards and padded batches.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::Tensor;

use crate::error::{ModelError, Result};
use crate::llama::IGNORE_INDEX;
use crate::tokenizer::TextTokenizer;

/// One line of a data file.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text; loss on every next-token prediction.
    Text(String),
    /// An instruction example; loss on the response only.
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
}

/// The Stanford Alpaca prompt template, with or without the input section.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// Reads every record of a JSONL file, or of a file holding one JSON array of the same objects.
/// Errors name the file and the 1-based line (or array element) that is wrong.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        return items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                parse_record(v)
                    .map_err(|problem| ModelError::invalid(path, format!("element {i}: {problem}")))
            })
            .collect();
    }
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_error = |problem: String| ModelError::DataLine {
            path: path.to_path_buf(),
            line: i + 1,
            problem,
        };
        let value: Value =
            serde_json::from_str(line).map_err(|e| line_error(format!("invalid JSON: {e}")))?;
        records.push(parse_record(&value).map_err(line_error)?);
    }
    if records.is_empty() {
        return Err(ModelError::invalid(path, "holds no records"));
    }
    Ok(records)
}

fn parse_record(value: &Value) -> std::result::Result<Record, String> {
    const EXPECTED: &str =
        r#"expected an object {"text": ...} or {"instruction": ..., "input": ..., "output": ...}"#;
    let Some(obj) = value.as_object() else {
        return Err(EXPECTED.to_string());
    };
    let field = |name: &str| -> std::result::Result<Option<String>, String> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("field `{name}` must be a string, found {other}")),
        }
    };
    if let Some(text) = field("text")? {
        return Ok(Record::Text(text));
    }
    match (field("instruction")?, field("output")?) {
        (Some(instruction), Some(output)) => Ok(Record::Alpaca {
            instruction,
            input: field("input")?.unwrap_or_default(),
            output,
        }),
        (Some(_), None) => Err("Alpaca record without `output`".to_string()),
        _ => Err(EXPECTED.to_string()),
    }
}

/// A tokenized sequence and its labels (HF convention: unshifted, -100 = no loss).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl Example {
    /// Positions that contribute to the loss (each predicts its label from the tokens before).
    pub fn targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Tokenizes one record. Alpaca: `ids(prompt + output) + EOS`, prompt positions masked, as
/// Stanford Alpaca does; text: the post-processor's special tokens, every position a target.
pub fn encode_record(
    record: &Record,
    tok: &TextTokenizer,
    max_len: usize,
    eos: Option<i64>,
) -> Result<Example> {
    let (mut ids, prompt_len) = match record {
        Record::Text(text) => (tok.encode(text, true)?, 0),
        Record::Alpaca {
            instruction,
            input,
            output,
        } => {
            let prompt = alpaca_prompt(instruction, input);
            let prompt_len = tok.encode(&prompt, true)?.len();
            let mut ids = tok.encode(&format!("{prompt}{output}"), true)?;
            if let Some(eos) = eos
                && ids.last() != Some(&eos)
            {
                ids.push(eos);
            }
            (ids, prompt_len)
        }
    };
    ids.truncate(max_len);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i < prompt_len { IGNORE_INDEX } else { id })
        .collect();
    Ok(Example { ids, labels })
}

/// A data file, tokenized.
#[derive(Debug)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Reads and tokenizes `path`; sequences are cut at `max_len` tokens. Ids outside the
    /// model's vocabulary are an error here rather than a crash in the embedding.
    pub fn load(
        path: &Path,
        tok: &TextTokenizer,
        max_len: usize,
        eos: Option<i64>,
        vocab_size: i64,
    ) -> Result<Self> {
        let records = read_records(path)?;
        let examples = records
            .iter()
            .map(|r| encode_record(r, tok, max_len, eos))
            .collect::<Result<Vec<_>>>()?;
        if let Some(bad) = examples
            .iter()
            .flat_map(|e| &e.ids)
            .find(|&&id| id < 0 || id >= vocab_size)
        {
            return Err(ModelError::invalid(
                path,
                format!(
                    "tokenizes to id {bad}, outside the model's vocab_size {vocab_size} (tokenizer and model do not match)"
                ),
            ));
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            examples,
        })
    }

    /// Reads `path` for `cfg`'s model: sequences capped at `max_len` or, when absent or
    /// longer, the model's context; EOS and vocabulary from the config.
    pub fn for_model(
        path: &Path,
        tok: &TextTokenizer,
        cfg: &crate::LlamaConfig,
        max_len: Option<usize>,
    ) -> Result<Self> {
        let context = cfg.max_position_embeddings as usize;
        let max_len = max_len.unwrap_or(context).min(context);
        Self::load(path, tok, max_len, cfg.eos_id(), cfg.vocab_size)
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Loss targets over all examples.
    pub fn targets(&self) -> usize {
        self.examples.iter().map(Example::targets).sum()
    }
}

/// A half-open range of example indices: the unit shards are made of (defined by the protocol).
pub use herd_protocol::SampleRange;

/// The example indices covered by `ranges`, checked against a data set of `len` examples.
pub fn indices_of(ranges: &[SampleRange], len: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for r in ranges {
        if r.start >= r.end || r.end > len as u64 {
            return Err(ModelError::Argument(format!(
                "sample range {}..{} is empty or outside the data set of {len} examples",
                r.start, r.end
            )));
        }
        out.extend(r.start as usize..r.end as usize);
    }
    Ok(out)
}

/// An endless, seeded order over `indices`: reshuffled each epoch, identical for the same seed
/// on every machine (ChaCha, not the platform RNG).
#[derive(Debug)]
pub struct BatchOrder {
    indices: Vec<usize>,
    order: Vec<usize>,
    pos: usize,
    rng: ChaCha8Rng,
}

impl BatchOrder {
    pub fn new(indices: Vec<usize>, seed: u64) -> Self {
        BatchOrder {
            order: Vec::new(),
            pos: 0,
            indices,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `n` indices (fewer only when there are fewer indices than `n` in all).
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let n = n.min(self.indices.len());
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pos == self.order.len() {
                self.order = self.indices.clone();
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// Right-padded tensors of a batch.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// Real (non-pad) tokens.
    pub tokens: usize,
    /// Positions that contribute to the loss.
    pub targets: usize,
}

/// Pads `examples` to the longest with `pad_id` (labels -100 there).
pub fn collate(examples: &[&Example], pad_id: i64) -> Result<Batch> {
    let t = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let mut ids = Vec::with_capacity(examples.len() * t);
    let mut labels = Vec::with_capacity(examples.len() * t);
    for e in examples {
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, t - e.ids.len()));
        labels.extend(&e.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, t - e.labels.len()));
    }
    let b = examples.len() as i64;
    Ok(Batch {
        input_ids: Tensor::f_from_slice(&ids)?.f_view([b, t as i64])?,
        labels: Tensor::f_from_slice(&labels)?.f_view([b, t as i64])?,
        tokens: examples.iter().map(|e| e.ids.len()).sum(),
        targets: examples.iter().map(|e| e.targets()).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(content: &str, suffix: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(suffix).tempfile().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_jsonl_and_json_arrays() {
        let f = write(
            "{\"text\": \"hello\"}\n\n{\"instruction\": \"i\", \"input\": null, \"output\": \"o\"}\n",
            ".jsonl",
        );
        let recs = read_records(f.path()).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0], Record::Text("hello".into()));
        let f = write(
            r#"[{"instruction": "i", "input": "x", "output": "o"}]"#,
            ".json",
        );
        assert!(
            matches!(&read_records(f.path()).unwrap()[0], Record::Alpaca { input, .. } if input == "x")
        );
    }

    #[test]
    fn malformed_lines_are_named_by_number() {
        let f = write("{\"text\": \"ok\"}\n{\"text\": 3}\n", ".jsonl");
        let err = read_records(f.path()).unwrap_err().to_string();
        assert!(err.contains(":2: field `text` must be a string"), "{err}");
        let f = write("{\"text\": \"ok\"}\n\n{oops\n", ".jsonl");
        let err = read_records(f.path()).unwrap_err().to_string();
        assert!(err.contains(":3: invalid JSON"), "{err}");
        let f = write("{\"prompt\": \"x\"}\n", ".jsonl");
        let err = read_records(f.path()).unwrap_err().to_string();
        assert!(err.contains(":1: expected an object"), "{err}");
    }

    #[test]
    fn batch_order_is_seeded_and_covers_each_epoch() {
        let mut a = BatchOrder::new((0..10).collect(), 7);
        let mut b = BatchOrder::new((0..10).collect(), 7);
        let first: Vec<usize> = (0..5).flat_map(|_| a.next_batch(2)).collect();
        assert_eq!(
            first,
            (0..5).flat_map(|_| b.next_batch(2)).collect::<Vec<_>>()
        );
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let mut c = BatchOrder::new((0..10).collect(), 8);
        assert_ne!(
            first,
            (0..5).flat_map(|_| c.next_batch(2)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn ranges_are_checked() {
        let r = |start, end| SampleRange { start, end };
        assert_eq!(indices_of(&[r(0, 2), r(5, 6)], 6).unwrap(), vec![0, 1, 5]);
        assert!(indices_of(&[r(4, 7)], 6).is_err());
        assert!(indices_of(&[r(3, 3)], 6).is_err());
    }
}
