//! Small helpers: where the workspace is, running cargo and other commands loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// libtorch in place, then every binary built the way `cargo xtask test` builds them (one
/// feature set, so nothing is built twice): what the tasks that run the binaries need first.
pub fn build_bins(root: &Path) -> Result<()> {
    crate::libtorch::setup(root, false)?;
    cargo(&["build", "--workspace", "--bins"])
}

/// Runs `cargo <args>` with the cargo that runs us, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    run(&mut cargo_command(args))
}

/// `cargo <args>` with the cargo that runs us, to add to before running.
///
/// Without the variables `cargo run` set for us: ring's build script declares
/// `rerun-if-env-changed` on `CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR` and friends, so a cargo
/// started with xtask's values would rebuild ring and everything above it (rustls, quinn,
/// libp2p) instead of sharing the artifacts of a plain `cargo build`.
pub fn cargo_command(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `name` is one of the variables cargo sets for the crate it runs (its own
/// `CARGO`, which says which cargo to use, stays).
fn set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "CARGO_TARGET_TMPDIR"
        )
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs and returns stdout, failing (with stderr shown) on a non-zero exit.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The debug-profile binary `name` of this workspace.
pub fn bin(root: &Path, name: &str) -> Command {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Command::new(target.join("debug").join(name))
}
