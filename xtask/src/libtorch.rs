//! `cargo xtask setup`: libtorch 2.11.0 from PyPI's torch wheel (the pinned recipe of
//! `../shared/LIBTORCH.md`, beside the repository). libtorch's own download site is
//! unreachable from our machines; PyPI is not.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util;

/// tch 0.24 is built against this torch; change both together.
pub const TORCH_VERSION: &str = "2.11.0";
/// `libtorch_cpu.so` needs libcudart and libcupti to load even on CPU; these wheels carry them.
const CPU_EXTRA_WHEELS: &[&str] = &["nvidia-cuda-runtime==13.0.96", "nvidia-cuda-cupti==13.0.85"];
/// CUDA libraries removed from a CPU install: left in, linking succeeds and the binary dies at
/// start looking for the rest of CUDA.
const CUDA_ONLY_LIBS: &[&str] = &[
    "libtorch_cuda.so",
    "libtorch_cuda_linalg.so",
    "libc10_cuda.so",
    "libtorch_nvshmem.so",
    "libcaffe2_nvrtc.so",
    "libtorch_python.so",
];

/// Installs libtorch unless the right version is already there; returns `<dir>/torch`.
pub fn setup(root: &Path, cuda: bool) -> Result<PathBuf> {
    let dir = root.join(if cuda { ".libtorch-cuda" } else { ".libtorch" });
    let torch = dir.join("torch");
    if is_installed(&torch, cuda) {
        eprintln!(
            "xtask: libtorch {TORCH_VERSION} already in {}",
            dir.display()
        );
        return Ok(torch);
    }
    let staging = root.join(if cuda {
        ".libtorch-cuda.partial"
    } else {
        ".libtorch.partial"
    });
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let python = find_python()?;
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
    ])
    .arg(&staging)
    .arg(format!("torch=={TORCH_VERSION}"));
    if cuda {
        eprintln!("xtask: installing libtorch {TORCH_VERSION} with CUDA from PyPI (~2.7 GB)");
    } else {
        eprintln!("xtask: installing libtorch {TORCH_VERSION} (CPU) from PyPI (~540 MB)");
        pip.arg("--no-deps").args(CPU_EXTRA_WHEELS);
    }
    util::run(&mut pip).context("pip could not install the torch wheel (is PyPI reachable?)")?;
    if !cuda {
        for lib in CUDA_ONLY_LIBS {
            let path = staging.join("torch/lib").join(lib);
            if path.exists() {
                std::fs::remove_file(&path)?;
            }
        }
    }
    // torch-sys checks this file's version when LIBTORCH points at a non-standard layout.
    std::fs::write(
        staging.join("torch/build-version"),
        format!("{TORCH_VERSION}\n"),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
        // A different libtorch under the same path: torch-sys must rebuild against it.
        let _ = util::cargo(&["clean", "-p", "torch-sys"]);
    }
    std::fs::rename(&staging, &dir)?;
    if !is_installed(&torch, cuda) {
        bail!("libtorch install in {} is incomplete", dir.display());
    }
    eprintln!(
        "xtask: libtorch {TORCH_VERSION} installed in {}",
        dir.display()
    );
    Ok(torch)
}

fn is_installed(torch: &Path, cuda: bool) -> bool {
    let version = std::fs::read_to_string(torch.join("build-version")).unwrap_or_default();
    let lib = torch.join("lib");
    version.trim() == TORCH_VERSION
        && lib.join("libtorch_cpu.so").exists()
        && lib.join("libtorch_cuda.so").exists() == cuda
}

pub fn find_python() -> Result<String> {
    for candidate in ["python3", "python"] {
        let ok = Command::new(candidate)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(candidate.to_string());
        }
    }
    bail!("no python3 with pip found; install it (Debian: apt-get install python3-pip) and rerun")
}
