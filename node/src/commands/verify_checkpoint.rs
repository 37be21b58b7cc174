//! `herd-node verify-checkpoint`: checks a downloaded checkpoint dir against its signed
//! manifest (who signed it, what built it, every file's size and blake3).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};
use herd_protocol::manifest::verify_checkpoint;
use libp2p::PeerId;

#[derive(Debug, clap::Args)]
pub struct VerifyCheckpointArgs {
    /// The checkpoint dir (as downloaded: the adapter files, manifest.json, manifest.sig.json).
    dir: PathBuf,
    /// The coordinator that must have signed it (its PeerId, as in its address).
    #[arg(long)]
    coordinator: Option<String>,
}

pub fn run(args: VerifyCheckpointArgs) -> Result<()> {
    let expected: Option<PeerId> = args
        .coordinator
        .as_deref()
        .map(|c| {
            c.parse()
                .with_context(|| format!("--coordinator `{c}` is not a PeerId"))
        })
        .transpose()?;
    let m = verify_checkpoint(&args.dir, expected.as_ref())?;
    let peers: BTreeSet<&str> = m.deltas.iter().map(|d| d.peer.as_str()).collect();
    println!(
        "ok: checkpoint {} of run `{}` after round {}, signed by coordinator {}",
        m.checkpoint, m.run, m.round, m.coordinator
    );
    println!(
        "built from {} verified deltas of {} peers over rounds {}..{}, on {}",
        m.deltas.len(),
        peers.len(),
        m.rounds.from,
        m.rounds.to,
        m.parent
            .as_ref()
            .map_or("the base model".to_string(), |p| format!(
                "parent {} (manifest blake3 {})",
                p.checkpoint, p.manifest_blake3
            ))
    );
    for f in &m.files {
        println!("  {}  {} bytes  blake3 {}", f.name, f.size, f.blake3);
    }
    Ok(())
}
