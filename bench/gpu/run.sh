#!/usr/bin/env bash
# On a GPU machine (no network needed): the CUDA herd-node's LoRA training throughput against
# PyTorch + PEFT in that machine's python3 (torch 2.11, transformers, peft), bf16, two shapes,
# alternating (PEFT with A frozen, as herd trains, and PEFT's default), two runs each; SmolLM
# also with the prompt half of each sequence masked, as in instruction tuning. JSON lines to
# ${OUT:-.}/gpu.jsonl, which `cargo xtask bench --only gpu --gpu-results gpu.jsonl` folds into
# bench/RESULTS.md.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out_dir=${OUT:-$here}
out="$out_dir/gpu.jsonl"
: > "$out"
torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$out_dir/gpu.txt" 2>&1 || true

# shape-name config seq batch steps loss-fraction (of positions carrying loss; 0.5: the
# prompt half masked, as in instruction tuning)
measure() {
    for rep in 1 2; do
        if line=$(LD_LIBRARY_PATH="$torch_lib" HERD_LOG=warn timeout 240 "$here/herd-node" \
            bench-train --device cuda --config "$here/shapes/$2.json" \
            --seq "$3" --batch "$4" --steps "$5" --loss-fraction "$6" --warmup 2); then
            echo "{\"shape\":\"$1\",\"result\":$line}" >> "$out"
        else
            echo "herd-node bench-train failed on $1 (run $rep)" >&2
        fi
        # PEFT doing herd's work (A frozen), then as a user would run it (A and B trained).
        for train_a in "" --train-a; do
            if line=$(timeout 240 python3 "$here/peft_baseline.py" --device cuda $train_a \
                --config "$here/shapes/$2.json" --seq "$3" --batch "$4" --steps "$5" \
                --loss-fraction "$6" --warmup 2); then
                echo "{\"shape\":\"$1\",\"result\":$line}" >> "$out"
            else
                echo "peft_baseline.py $train_a failed on $1 (run $rep)" >&2
            fi
        done
    done
}

measure "SmolLM-135M shape" smollm-135m 1024 16 10 1
measure "SmolLM-135M shape" smollm-135m 1024 16 10 0.5
# The LM head is a fifth of SmolLM-135M (vocabulary 49,152 at hidden 576) and a seventeenth of
# TinyLlama, so the masked prompt is measured where it matters, keeping the call short.
measure "TinyLlama-1.1B shape" tinyllama-1.1b 1024 8 5 1
cat "$out"

# --max-gpu-mem: 1% of the card is less than TinyLlama's bf16 weights (2.2 GB), so training
# must fail with out-of-memory under the cap, and the log must say the cap was applied.
LD_LIBRARY_PATH="$torch_lib" HERD_LOG=info timeout 120 "$here/herd-node" bench-train \
    --device cuda --max-gpu-mem 1% --config "$here/shapes/tinyllama-1.1b.json" \
    --seq 128 --batch 1 --steps 1 > "$out_dir/max-gpu-mem.txt" 2>&1
echo "exit status $?" >> "$out_dir/max-gpu-mem.txt"
tail -3 "$out_dir/max-gpu-mem.txt"
