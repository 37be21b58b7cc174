#!/usr/bin/env bash
# Builds the CUDA herd-node here (the ../shared/LIBTORCH.md recipe: libtorch from the full
# torch 2.11.0 wheel set in .libtorch-cuda, its own target dir) and stages what the GPU machine
# needs in target-cuda/gpu-bench/: the stripped binary, the PEFT baseline, the shapes, run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo xtask setup --cuda
CARGO_TARGET_DIR=target-cuda LIBTORCH="$PWD/.libtorch-cuda/torch" \
    cargo build --release -p herd-node
stage=target-cuda/gpu-bench
rm -rf "$stage"
mkdir -p "$stage"
cp target-cuda/release/herd-node "$stage/"
strip "$stage/herd-node"
cp bench/peft_baseline.py bench/gpu/run.sh "$stage/"
cp -r bench/shapes "$stage/"
du -sh "$stage"
echo "staged: $stage (carry it to the GPU machine and run: bash $stage/run.sh)"
