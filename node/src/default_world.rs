//! The small world behind the embedded default: facts the base model reads as plain text during
//! pretraining, and instruction tasks (Alpaca format) that ask for the same facts.
//!
//! The base model learns the facts but never sees an instruction; LoRA fine-tuning then has to
//! teach it to answer one. Held-out instructions ask about items whose facts the base knows but
//! whose instructions were never trained on, so a falling held-out loss means the model learned
//! the *task*, not the answers. Dictionary-style lines ("cold : the opposite of cold is hot .")
//! give the base the skill of restating a topic word, which the task builds on.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

const OPPOSITES: &[(&str, &str)] = &[
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("old", "young"),
    ("tall", "short"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("early", "late"),
    ("full", "empty"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("open", "closed"),
    ("strong", "weak"),
    ("clean", "dirty"),
    ("thick", "thin"),
    ("high", "low"),
    ("near", "far"),
    ("good", "bad"),
    ("day", "night"),
    ("left", "right"),
    ("black", "white"),
    ("first", "last"),
    ("push", "pull"),
    ("sweet", "sour"),
    ("brave", "afraid"),
];

const SOUNDS: &[(&str, &str)] = &[
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("pig", "oink"),
    ("horse", "neigh"),
    ("lion", "roar"),
    ("owl", "hoot"),
    ("bee", "buzz"),
    ("snake", "hiss"),
    ("frog", "croak"),
    ("mouse", "squeak"),
    ("wolf", "howl"),
    ("crow", "caw"),
    ("hen", "cluck"),
];

const COLORS: &[(&str, &str)] = &[
    ("sky", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("blood", "red"),
    ("sun", "yellow"),
    ("banana", "yellow"),
    ("leaf", "green"),
    ("cherry", "red"),
    ("sea", "blue"),
    ("milk", "white"),
    ("crow", "black"),
    ("carrot", "orange"),
    ("plum", "purple"),
    ("tomato", "red"),
    ("lemon", "yellow"),
    ("frog", "green"),
    ("chocolate", "brown"),
];

const NUMBERS: &[&str] = &[
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// One fact, as the instruction task that asks for it.
#[derive(Debug, Clone)]
struct Fact {
    instruction: &'static str,
    input: String,
    /// Plain-text statements of the fact for pretraining; the first is also the instruction's answer.
    statements: Vec<String>,
}

fn facts() -> Vec<Vec<Fact>> {
    let opposites = OPPOSITES
        .iter()
        .flat_map(|&(a, b)| [(a, b), (b, a)])
        .map(|(a, b)| Fact {
            instruction: "Give the opposite of the word.",
            input: a.into(),
            statements: vec![
                format!("the opposite of {a} is {b} ."),
                format!("{b} is the opposite of {a} ."),
                format!("{a} and {b} are opposites ."),
                format!("{a} : the opposite of {a} is {b} ."),
            ],
        })
        .collect();
    let sounds = SOUNDS
        .iter()
        .map(|&(animal, sound)| Fact {
            instruction: "What sound does this animal make?",
            input: animal.into(),
            statements: vec![
                format!("the {animal} says {sound} ."),
                format!("a {animal} makes the sound {sound} ."),
                format!("you hear {sound} from a {animal} ."),
                format!("{animal} : the {animal} says {sound} ."),
            ],
        })
        .collect();
    let colors = COLORS
        .iter()
        .map(|&(thing, color)| Fact {
            instruction: "What color is this?",
            input: thing.into(),
            statements: vec![
                format!("the {thing} is {color} ."),
                format!("the color of the {thing} is {color} ."),
                format!("a {thing} looks {color} ."),
                format!("{thing} : the {thing} is {color} ."),
            ],
        })
        .collect();
    let mut sums = Vec::new();
    for a in 0..NUMBERS.len() {
        for b in 0..NUMBERS.len() - a {
            let (x, y, z) = (NUMBERS[a], NUMBERS[b], NUMBERS[a + b]);
            sums.push(Fact {
                instruction: "Add the two numbers.",
                input: format!("{x} and {y}"),
                statements: vec![
                    format!("{x} plus {y} is {z} ."),
                    format!("{x} and {y} make {z} ."),
                    format!("{x} and {y} : {x} plus {y} is {z} ."),
                ],
            });
        }
    }
    vec![opposites, sounds, colors, sums]
}

/// The generated files of the embedded default.
#[derive(Debug)]
pub struct World {
    /// Pretraining corpus: `{"text"}` records.
    pub corpus: Vec<Value>,
    /// Alpaca records for fine-tuning.
    pub train: Vec<Value>,
    /// Alpaca records about items never in `train`.
    pub heldout: Vec<Value>,
}

/// Builds the world deterministically from `seed`; a fifth of each task's items is held out.
pub fn build(seed: u64) -> World {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut corpus, mut train, mut heldout) = (Vec::new(), Vec::new(), Vec::new());
    for mut task in facts() {
        task.shuffle(&mut rng);
        let held = task.len() / 5;
        for (i, fact) in task.iter().enumerate() {
            // The answer is the fact's first plain-text statement: the base model knows the
            // sentence, so fine-tuning has to teach it to start the right one from the input.
            let record = json!({"instruction": fact.instruction, "input": fact.input, "output": fact.statements[0]});
            if i < held {
                heldout.push(record);
            } else {
                train.push(record);
            }
            for s in &fact.statements {
                corpus.push(json!({ "text": s }));
            }
        }
    }
    // A little connective text so the base model is not only a lookup table.
    let fillers = [
        "we like to read about the world .",
        "this is a fact .",
        "the answer is simple .",
        "here is a word .",
        "an animal makes a sound .",
        "every thing has a color .",
        "we add two numbers to make a new number .",
        "a word can have an opposite .",
    ];
    for f in fillers {
        corpus.push(json!({ "text": f }));
    }
    corpus.shuffle(&mut rng);
    train.shuffle(&mut rng);
    // Keep held-out order stable but mixed across tasks.
    heldout.shuffle(&mut rng);
    World {
        corpus,
        train,
        heldout,
    }
}

/// Splits text as the `Whitespace` pre-tokenizer does: runs of word characters, runs of other
/// non-space characters.
pub fn pre_tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut current_is_word = false;
    for c in text.chars() {
        if c.is_whitespace() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        let is_word = c.is_alphanumeric() || c == '_';
        if !current.is_empty() && is_word != current_is_word {
            out.push(std::mem::take(&mut current));
        }
        current_is_word = is_word;
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_is_deterministic_and_heldout_items_are_not_trained() {
        let a = build(3);
        let b = build(3);
        assert_eq!(a.train, b.train);
        assert_eq!(a.heldout, b.heldout);
        for h in &a.heldout {
            assert!(!a.train.contains(h));
        }
        assert!(a.heldout.len() >= 20 && a.train.len() > 4 * a.heldout.len() - 10);
    }

    #[test]
    fn pre_tokenizer_splits_like_whitespace() {
        assert_eq!(
            pre_tokenize("### Input:\nhot."),
            ["###", "Input", ":", "hot", "."]
        );
    }
}
