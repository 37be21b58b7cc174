//! `herd-node pause` and `herd-node resume`: a `paused` file in the daemon's data dir, which
//! the daemon's availability check sees within a second: it hands back its shard and takes no
//! work until the file is gone.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::daemon::availability::pause_file;
use crate::daemon::default_data_dir;

#[derive(Debug, clap::Args)]
pub struct PauseArgs {
    /// The daemon's data dir (default: $XDG_DATA_HOME/herd-node).
    #[arg(long, env = "HERD_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// `herd-node pause`: the daemon hands back its shard within a second and waits.
pub fn pause(args: PauseArgs) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    if !dir.is_dir() {
        bail!(
            "{} is not a node's data dir: pass the --data-dir the daemon runs with",
            dir.display()
        );
    }
    let file = pause_file(&dir);
    std::fs::write(&file, b"paused by herd-node pause\n")
        .with_context(|| format!("writing {}", file.display()))?;
    println!("paused: the daemon hands back its shard and takes no work until `herd-node resume`");
    Ok(())
}

/// `herd-node resume`: the daemon takes work again.
pub fn resume(args: PauseArgs) -> Result<()> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    let file = pause_file(&dir);
    match std::fs::remove_file(&file) {
        Ok(()) => println!("resumed: the daemon asks for work again"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("not paused: nothing to resume")
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::availability::Availability;

    #[test]
    fn pause_blocks_the_daemon_until_resume() {
        let dir = tempfile::tempdir().unwrap();
        let any_time = Availability::new(vec![], dir.path());
        assert_eq!(any_time.blocked(), None);
        let args = || PauseArgs {
            data_dir: Some(dir.path().to_path_buf()),
        };
        pause(args()).unwrap();
        assert!(any_time.blocked().unwrap().contains("paused"));
        resume(args()).unwrap();
        assert_eq!(any_time.blocked(), None);
        resume(args()).unwrap(); // not paused: fine
    }
}
