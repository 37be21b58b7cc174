#!/usr/bin/env python3
"""transformers' greedy generation speed: the baseline `herd-node bench-generate` is compared with.

Same work: the first --limit Alpaca records of --data, each instruction in the Stanford
Alpaca template, tokenized by the model dir's tokenizer, then `generate(do_sample=False)` up
to --max-new-tokens (stopping at the config's EOS) with transformers' KV cache, fp32 on CPU,
one prompt at a time. Loading is timed apart. One JSON line on stdout with the generated ids.

Needs torch 2.11.0, transformers (`cargo xtask fetch-model` puts both in .venv). Exits with
status 3 when they are missing.
"""

import argparse
import json
import sys
import time

MISSING = 3
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        print(f"missing Python package: {e.name}", file=sys.stderr)
        return MISSING
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in open(args.data) if line.strip()][: args.limit]
    prompts = []
    for row in rows:
        template = WITH_INPUT if row.get("input", "").strip() else NO_INPUT
        prompts.append(tokenizer.encode(template.format(**{"input": "", **row})))
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=args.max_new_tokens,
        eos_token_id=eos, pad_token_id=eos,
    )
    outputs = []
    timed = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            outputs.append(out[0, len(ids):].tolist())
    seconds = time.perf_counter() - timed
    new_tokens = sum(len(o) for o in outputs)
    print(json.dumps({
        "impl": "transformers",
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / max(seconds, 1e-9),
        "load_seconds": load_seconds,
        "outputs": outputs,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
