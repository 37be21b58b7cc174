//! `cargo xtask make-data`: the instruction set for real-model runs (`deploy/data/`): Alpaca
//! records whose answers can be checked exactly, in ten kinds of task, generated from a
//! fixed seed. Held-out records use words and numbers no training record uses, so a right
//! answer there is the skill, not a memory.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::json;

const NOUNS: &[&str] = &[
    "apple", "river", "garden", "window", "pencil", "candle", "mountain", "bottle", "forest",
    "basket", "ladder", "mirror", "rabbit", "pocket", "castle", "button", "carpet", "dragon",
    "island", "jacket", "kettle", "lemon", "marble", "needle", "orange", "parrot", "rocket",
    "saddle", "tunnel", "violin", "wallet", "anchor", "bridge", "cookie", "desert", "engine",
    "feather", "guitar", "helmet", "insect", "jungle", "kitten", "lantern", "monkey", "napkin",
    "ocean", "planet", "quilt", "ribbon", "shadow", "tomato", "umbrella", "valley", "wagon",
    "yogurt", "zipper", "blanket", "cabin", "daisy", "eagle", "fountain", "giraffe", "harbor",
];

/// Nouns whose plural is not just `+s` / `+es`.
const PLURALS: &[(&str, &str)] = &[
    ("child", "children"),
    ("mouse", "mice"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("goose", "geese"),
    ("man", "men"),
    ("woman", "women"),
    ("person", "people"),
    ("box", "boxes"),
    ("city", "cities"),
    ("baby", "babies"),
    ("knife", "knives"),
    ("leaf", "leaves"),
    ("wolf", "wolves"),
    ("bus", "buses"),
    ("dish", "dishes"),
    ("glass", "glasses"),
    ("story", "stories"),
    ("party", "parties"),
    ("potato", "potatoes"),
    ("hero", "heroes"),
    ("church", "churches"),
    ("fox", "foxes"),
    ("lady", "ladies"),
    ("cat", "cats"),
    ("dog", "dogs"),
    ("tree", "trees"),
    ("house", "houses"),
];

const OPPOSITES: &[(&str, &str)] = &[
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("old", "young"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("up", "down"),
    ("wet", "dry"),
    ("win", "lose"),
    ("day", "night"),
    ("black", "white"),
    ("loud", "quiet"),
    ("heavy", "light"),
    ("clean", "dirty"),
    ("near", "far"),
    ("true", "false"),
    ("first", "last"),
    ("inside", "outside"),
    ("push", "pull"),
    ("buy", "sell"),
    ("give", "take"),
];

const CAPITALS: &[(&str, &str)] = &[
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Cuba", "Havana"),
    ("Thailand", "Bangkok"),
    ("Finland", "Helsinki"),
    ("Hungary", "Budapest"),
    ("Belgium", "Brussels"),
    ("Chile", "Santiago"),
];

/// A small deterministic generator (SplitMix64): the set must not change with a crate's version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Which half of every pool a record draws from.
#[derive(Clone, Copy, PartialEq)]
enum Split {
    Train,
    Heldout,
}

/// The items of `pool` that belong to `split`: every fifth is held out.
fn part<T: Copy>(pool: &[T], split: Split) -> Vec<T> {
    pool.iter()
        .enumerate()
        .filter(|(i, _)| (i % 5 == 4) == (split == Split::Heldout))
        .map(|(_, x)| *x)
        .collect()
}

/// Numbers 10..=99 of `split`: held-out ones are those ≡ 3 (mod 7).
fn number(rng: &mut Rng, split: Split) -> u32 {
    loop {
        let n = 10 + rng.below(90) as u32;
        if (n % 7 == 3) == (split == Split::Heldout) {
            return n;
        }
    }
}

/// One record of task kind `kind` (0..10): (instruction, input, output).
fn record(rng: &mut Rng, kind: usize, split: Split) -> (String, String, String) {
    let nouns = part(NOUNS, split);
    match kind {
        0 => {
            let (a, b) = (number(rng, split), number(rng, split));
            (
                "Add the two numbers.".into(),
                format!("{a} and {b}"),
                (a + b).to_string(),
            )
        }
        1 => {
            let (a, b) = (number(rng, split), number(rng, split));
            let (a, b) = (a.max(b), a.min(b));
            (
                "Subtract the second number from the first.".into(),
                format!("{a} and {b}"),
                (a - b).to_string(),
            )
        }
        2 => {
            let w = *rng.pick(&nouns);
            (
                "Write the word in capital letters.".into(),
                w.into(),
                w.to_uppercase(),
            )
        }
        3 => {
            let words: Vec<&str> = (0..3).map(|_| *rng.pick(&nouns)).collect();
            let reversed: Vec<&str> = words.iter().rev().copied().collect();
            (
                "Reverse the order of the words.".into(),
                words.join(" "),
                reversed.join(" "),
            )
        }
        4 => {
            let mut xs: Vec<u32> = (0..3).map(|_| number(rng, split)).collect();
            let input = xs.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            xs.sort_unstable();
            let output = xs.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            (
                "Sort the numbers from smallest to largest.".into(),
                input,
                output,
            )
        }
        5 => {
            let (w, o) = *rng.pick(&part(OPPOSITES, split));
            ("Give the opposite of the word.".into(), w.into(), o.into())
        }
        6 => {
            let w = *rng.pick(&nouns);
            (
                "Count the letters in the word.".into(),
                w.into(),
                w.len().to_string(),
            )
        }
        7 => {
            let (w, p) = *rng.pick(&part(PLURALS, split));
            ("Give the plural of the noun.".into(), w.into(), p.into())
        }
        8 => {
            let (c, k) = *rng.pick(&part(CAPITALS, split));
            (
                "Name the capital city of the country.".into(),
                c.into(),
                k.into(),
            )
        }
        _ => {
            let w = *rng.pick(&nouns);
            (
                "Repeat the word three times.".into(),
                w.into(),
                format!("{w} {w} {w}"),
            )
        }
    }
}

/// Up to `count` records of `split`, the ten kinds in turn, no record twice (a kind whose
/// pool is used up, like the held-out capitals, is skipped from then on).
fn records(seed: u64, count: usize, split: Split) -> Vec<serde_json::Value> {
    let mut rng = Rng(seed);
    let mut seen = std::collections::HashSet::new();
    let mut exhausted = [false; 10];
    let mut out = Vec::with_capacity(count);
    for kind in (0..10).cycle() {
        if out.len() >= count || exhausted.iter().all(|&e| e) {
            break;
        }
        if exhausted[kind] {
            continue;
        }
        let fresh = (0..100).find_map(|_| {
            let r = record(&mut rng, kind, split);
            seen.insert((r.0.clone(), r.1.clone())).then_some(r)
        });
        match fresh {
            Some((instruction, input, output)) => {
                out.push(json!({"instruction": instruction, "input": input, "output": output}));
            }
            None => exhausted[kind] = true,
        }
    }
    out
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        writeln!(text, "{row}")?;
    }
    std::fs::write(path, text)?;
    println!("{}: {} records", path.display(), rows.len());
    Ok(())
}

/// Writes `deploy/data/tasks-train.jsonl` (2,000) and `tasks-heldout.jsonl` (100).
pub fn make(root: &Path) -> Result<()> {
    let dir = root.join("deploy/data");
    std::fs::create_dir_all(&dir)?;
    write_jsonl(
        &dir.join("tasks-train.jsonl"),
        &records(1, 2000, Split::Train),
    )?;
    write_jsonl(
        &dir.join("tasks-heldout.jsonl"),
        &records(2, 100, Split::Heldout),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(rows: &[serde_json::Value]) -> Vec<(String, String, String)> {
        rows.iter()
            .map(|r| {
                let f = |k: &str| r[k].as_str().unwrap().to_string();
                (f("instruction"), f("input"), f("output"))
            })
            .collect()
    }

    #[test]
    fn held_out_records_share_no_input_with_training_and_every_answer_is_right() {
        let train = pairs(&records(1, 2000, Split::Train));
        let heldout = pairs(&records(2, 100, Split::Heldout));
        assert_eq!((train.len(), heldout.len()), (2000, 100));
        let train_inputs: std::collections::HashSet<&str> =
            train.iter().map(|(_, input, _)| input.as_str()).collect();
        for (instruction, input, output) in train.iter().chain(&heldout) {
            let numbers: Vec<u32> = input
                .split([' ', ','])
                .filter_map(|w| w.parse().ok())
                .collect();
            let want = match instruction.as_str() {
                "Add the two numbers." => (numbers[0] + numbers[1]).to_string(),
                "Subtract the second number from the first." => {
                    (numbers[0] - numbers[1]).to_string()
                }
                "Count the letters in the word." => input.len().to_string(),
                "Write the word in capital letters." => input.to_uppercase(),
                _ => output.clone(),
            };
            assert_eq!(output, &want, "{instruction} [{input}]");
        }
        for (instruction, input, _) in &heldout {
            assert!(
                !train_inputs.contains(input.as_str()),
                "held-out {instruction} [{input}] is in training"
            );
        }
    }

    #[test]
    fn the_set_is_the_same_every_time() {
        assert_eq!(records(1, 50, Split::Train), records(1, 50, Split::Train));
        assert_ne!(records(1, 50, Split::Train), records(3, 50, Split::Train));
    }
}
