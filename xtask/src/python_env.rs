//! The project's own Python environment (`.venv`): the reference side of herd's comparisons
//! (transformers, PEFT) and the GGUF converter, pinned to the torch herd links.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{libtorch, util};

/// What `.venv` holds: the versions the fixtures were made with (tests/fixtures).
pub const PACKAGES: &[&str] = &[
    "torch==2.11.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "gguf==0.19.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
];

/// The line that proves an environment has them all.
const CHECK: &str = "import torch, transformers, peft, gguf, safetensors, tokenizers; \
                     assert torch.__version__.split('+')[0] == '2.11.0', torch.__version__";

/// `.venv/bin/python`, created and filled first if it is missing or incomplete.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    if works(&python) {
        return Ok(python);
    }
    if !python.exists() {
        eprintln!("xtask: creating a Python environment in {}", venv.display());
        util::run(
            Command::new(libtorch::find_python()?)
                .args(["-m", "venv"])
                .arg(&venv),
        )
        .context("python3 -m venv failed (Debian: apt-get install python3-venv)")?;
    }
    eprintln!(
        "xtask: installing {} into {} (torch's PyPI wheel brings CUDA libraries: ~3 GB, a few \
         minutes; only the CPU is used)",
        PACKAGES.join(" "),
        venv.display()
    );
    util::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(PACKAGES),
    )
    .context("pip could not install the reference packages (is PyPI reachable?)")?;
    anyhow::ensure!(
        works(&python),
        "{} still lacks one of {}",
        python.display(),
        PACKAGES.join(" ")
    );
    Ok(python)
}

/// `.venv/bin/python` if it has every package, without installing anything.
pub fn existing(root: &Path) -> Option<PathBuf> {
    let python = root.join(".venv/bin/python");
    works(&python).then_some(python)
}

/// The Python the reference sides of the benchmarks run with: `HERD_PYTHON` if set, else
/// `.venv`'s if it has every package (`cargo xtask fetch-model` makes it), else `python3`.
pub fn reference_python(root: &Path) -> String {
    if let Ok(python) = std::env::var("HERD_PYTHON") {
        return python;
    }
    let venv = root.join(".venv/bin/python");
    if works(&venv) {
        return venv.display().to_string();
    }
    "python3".into()
}

fn works(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", CHECK])
            .output()
            .is_ok_and(|o| o.status.success())
}
