//! Helpers for herd's workspace-level integration tests: find the real binaries that
//! `cargo xtask test` built, copy fixtures, and damage files in controlled ways.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};
use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A command for a workspace binary in the same profile dir as this test binary
/// (`target/<profile>/deps/<test>` → `target/<profile>/<name>`).
pub fn bin(name: &str) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (cargo xtask test does)",
        path.display()
    );
    Command::new(path)
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The embedded default (`model/default/<name>`).
pub fn default_asset(name: &str) -> PathBuf {
    root().join("model/default").join(name)
}

/// Copies the files of `src` (not sub-dirs) into a new dir `dst`.
pub fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Runs a command, returning its output (stdout and stderr as text).
pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("start command");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stdout, stderr)
}

/// Rewrites a safetensors file, letting `edit` change the header (name → {dtype, shape,
/// data_offsets}); tensors it removes are dropped and offsets recomputed.
pub fn edit_safetensors(
    path: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<()> {
    let bytes = std::fs::read(path)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    let data = &bytes[8 + n..];
    let original = header.clone();
    edit(&mut header);
    let mut names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort_by_key(|k| original[k]["data_offsets"][0].as_u64());
    let mut body = Vec::new();
    for name in names {
        let offsets = &original[&name]["data_offsets"];
        let (s, e) = (
            offsets[0].as_u64().context("offset")? as usize,
            offsets[1].as_u64().context("offset")? as usize,
        );
        let start = body.len();
        body.extend_from_slice(&data[s..e]);
        header.get_mut(&name).unwrap()["data_offsets"] = serde_json::json!([start, body.len()]);
    }
    let mut head = serde_json::to_vec(&header)?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend(head);
    out.extend(body);
    std::fs::write(path, out)?;
    Ok(())
}
