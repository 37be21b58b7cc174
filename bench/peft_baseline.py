#!/usr/bin/env python3
"""PEFT's LoRA training throughput: the baseline `herd-node bench-train` is compared with.

Same work as the node's trainer, step for step: a LLaMA of the shape in --config (an HF
config.json) with random weights (normal, std 0.02), frozen; LoRA of rank r, alpha 2r, no
dropout, on the same target modules, A frozen at its init unless --train-a (herd trains B
only); AdamW at 1e-3 without weight decay, gradients clipped to norm 1; batches of random
tokens, the first `seq - round(seq * loss_fraction)` (halves rounded up) positions of each a prompt without loss (label
-100; 1 = every position a target), as herd-node bench-train masks them; bf16 weights on CUDA (adapters in fp32, PEFT's default),
fp32 on CPU. Each step ends by reading its loss, as herd's does. One JSON line on stdout.

Needs torch 2.11.0 (the torch herd links), transformers and peft:

    python3 -m pip install torch==2.11.0 transformers peft

or, to keep them out of the system python, `--target DIR` and PYTHONPATH=DIR. Exits with
status 3 when they are missing, which `cargo xtask bench` reports as a skipped comparison.
"""

import argparse
import json
import sys
import time

MISSING = 3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="HF config.json giving the shape of a random model")
    p.add_argument("--model", help="instead of --config: an HF model dir trained on --data")
    p.add_argument("--data", help="with --model: Alpaca JSONL; the first batch*(warmup+steps) records")
    p.add_argument("--max-seq-len", type=int, default=128, help="with --model: tokens per example at most")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--loss-fraction",
        type=float,
        default=1.0,
        help="share of each sequence's positions that carry loss; the rest, at its start, is prompt",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--train-a", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if bool(args.config) == bool(args.model) or bool(args.model) != bool(args.data):
        p.error("give --config, or --model with --data")

    try:
        import torch
        import transformers
        import peft
    except ImportError as e:
        print(
            f"peft_baseline: {e.name} is not installed; "
            "python3 -m pip install torch==2.11.0 transformers peft",
            file=sys.stderr,
        )
        return MISSING

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.model:
        model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        config = model.config
        batches = real_batches(args, config)
    else:
        with open(args.config) as f:
            shape = json.load(f)
        config = transformers.LlamaConfig(**shape, initializer_range=0.02)
        model = transformers.LlamaForCausalLM(config)
        batches = random_batches(args, config, torch)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    if not args.train_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)

    tokens = 0
    started = time.perf_counter()
    for step, (ids, labels, real_tokens) in enumerate(batches):
        ids, labels = ids.to(device), labels.to(device)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        value = loss.item()
        if step + 1 == args.warmup:
            started = time.perf_counter()
        elif step >= args.warmup:
            tokens += real_tokens
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "impl": "peft",
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
                "device": str(device),
                "threads": torch.get_num_threads(),
                "data": "real" if args.model else "random",
                "seq": None if args.model else args.seq,
                "batch": args.batch,
                "loss_fraction": args.loss_fraction,
                "steps": args.steps,
                "train_a": args.train_a,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_second": tokens / max(seconds, 1e-9),
                "final_loss": value,
            }
        )
    )
    return 0


def random_batches(args, config, torch):
    """Random tokens, the first positions of each sequence a prompt without loss."""
    prompt = args.seq - int(args.seq * args.loss_fraction + 0.5)  # half away from zero, as Rust
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = -100
        yield ids, labels, ids.numel()


def real_batches(args, config):
    """The first batch*(warmup+steps) Alpaca records, tokenized as herd's encode_record does
    (prompt masked, EOS appended, cut at --max-seq-len), in consecutive batches right-padded to
    their longest. Right padding under a causal mask needs no attention mask: no real token
    sees a pad, as in herd."""
    import os

    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = config.pad_token_id if config.pad_token_id is not None else (eos or 0)
    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    needed = args.batch * (args.warmup + args.steps)
    if len(rows) < needed:
        sys.exit(f"{args.data} has {len(rows)} records; {needed} are needed")
    examples = []
    for row in rows[:needed]:
        prompt = alpaca_prompt(row["instruction"], row.get("input", ""))
        prompt_len = len(tok.encode(prompt).ids)
        ids = tok.encode(prompt + row["output"]).ids
        if eos is not None and ids[-1] != eos:
            ids.append(eos)
        ids = ids[: args.max_seq_len]
        labels = [-100 if i < prompt_len else t for i, t in enumerate(ids)]
        examples.append((ids, labels))
    for b in range(args.warmup + args.steps):
        chunk = examples[b * args.batch : (b + 1) * args.batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in chunk])
        yield ids, labels, sum(len(i) for i, _ in chunk)


def alpaca_prompt(instruction, input_):
    if input_.strip():
        return (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input_}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


if __name__ == "__main__":
    sys.exit(main())
