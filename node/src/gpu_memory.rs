//! `--max-gpu-mem`: a cap on the share of the GPU that libtorch's caching allocator may take,
//! so a contributor can keep using the card (a game, a desktop) while the node trains.
//!
//! tch has no binding for `setMemoryFraction`, but libtorch 2.11's CUDA allocator reads
//! `per_process_memory_fraction:F` from `PYTORCH_CUDA_ALLOC_CONF` (checked: the key and its
//! range error are in the 2.11.0 wheel's libc10_cuda.so). libtorch may read that variable as
//! early as library load, before `main`, so the node sets it and executes itself once more:
//! the new image reads it from its first instruction. An allocation past the cap fails as a
//! CUDA out-of-memory error, which fails that shard and nothing else.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use anyhow::{Context, Result, bail};

/// The variable libtorch's CUDA allocator takes its settings from.
const ALLOC_CONF: &str = "PYTORCH_CUDA_ALLOC_CONF";
const FRACTION_KEY: &str = "per_process_memory_fraction";

/// A share of the device's memory, in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuMemoryShare(f64);

impl std::str::FromStr for GpuMemoryShare {
    type Err = String;

    /// `60%` or `0.6`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, scale) = match s.strip_suffix('%') {
            Some(percent) => (percent.trim(), 100.0),
            None => (s, 1.0),
        };
        let share = number
            .parse::<f64>()
            .ok()
            .map(|n| n / scale)
            .filter(|f| *f > 0.0 && *f <= 1.0)
            .ok_or_else(|| {
                format!("`{s}`: expected a share of the GPU's memory, like 60% or 0.6 (above 0, at most 100%)")
            })?;
        Ok(GpuMemoryShare(share))
    }
}

impl std::fmt::Display for GpuMemoryShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

/// `existing` allocator settings with the fraction set to `share`: other settings are kept in
/// their order, an earlier fraction is replaced. Entries are split at top-level commas only,
/// since values such as `roundup_power2_divisions:[256:1,512:2]` hold commas of their own.
pub fn alloc_conf_with(existing: Option<&str>, share: GpuMemoryShare) -> String {
    let mut entries: Vec<&str> = Vec::new();
    if let Some(conf) = existing {
        let (mut depth, mut start) = (0usize, 0);
        for (i, c) in conf.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    entries.push(&conf[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        entries.push(&conf[start..]);
    }
    let ours = format!("{FRACTION_KEY}:{}", share.0);
    entries
        .into_iter()
        .map(str::trim)
        .filter(|e| !e.is_empty() && e.split(':').next().map(str::trim) != Some(FRACTION_KEY))
        .chain([ours.as_str()])
        .collect::<Vec<_>>()
        .join(",")
}

/// Makes sure this process runs with the cap in libtorch's allocator settings: returns at once
/// when it already does, otherwise replaces the process with itself (same arguments, the cap
/// added to the environment) and does not return unless that fails.
pub fn ensure_cap(share: GpuMemoryShare) -> Result<()> {
    let existing = std::env::var(ALLOC_CONF).ok();
    let wanted = alloc_conf_with(existing.as_deref(), share);
    if existing.as_deref() == Some(wanted.as_str()) {
        tracing::debug!("{ALLOC_CONF}={wanted}");
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding this program to apply --max-gpu-mem")?;
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let arg0 = if args.is_empty() {
        exe.clone().into_os_string()
    } else {
        args.remove(0)
    };
    let error = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(ALLOC_CONF, &wanted)
        .exec();
    bail!(
        "could not restart {} with {ALLOC_CONF}={wanted} for --max-gpu-mem: {error}",
        exe.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(s: &str) -> GpuMemoryShare {
        s.parse().unwrap()
    }

    #[test]
    fn shares_parse_as_percent_or_fraction_and_refuse_the_rest() {
        assert_eq!(share("60%"), GpuMemoryShare(0.6));
        assert_eq!(share(" 0.25 "), GpuMemoryShare(0.25));
        assert_eq!(share("100%"), GpuMemoryShare(1.0));
        for bad in ["0", "0%", "150%", "1.5", "-0.1", "six", "8GiB", "", "NaN"] {
            let err = bad.parse::<GpuMemoryShare>().unwrap_err();
            assert!(err.contains("like 60% or 0.6"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_fraction_joins_other_settings_and_replaces_an_earlier_one() {
        let half = share("50%");
        assert_eq!(
            alloc_conf_with(None, half),
            "per_process_memory_fraction:0.5"
        );
        assert_eq!(
            alloc_conf_with(Some(""), half),
            "per_process_memory_fraction:0.5"
        );
        assert_eq!(
            alloc_conf_with(Some("expandable_segments:True"), half),
            "expandable_segments:True,per_process_memory_fraction:0.5"
        );
        assert_eq!(
            alloc_conf_with(
                Some("per_process_memory_fraction:0.9, roundup_power2_divisions:[256:1,512:2]"),
                half
            ),
            "roundup_power2_divisions:[256:1,512:2],per_process_memory_fraction:0.5"
        );
        // Already in place: composing again changes nothing, so the re-exec happens once.
        let once = alloc_conf_with(Some("expandable_segments:True"), half);
        assert_eq!(alloc_conf_with(Some(&once), half), once);
    }
}
