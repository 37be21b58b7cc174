#!/usr/bin/env python3
"""A GGUF LLaMA-family model as an HF model dir, for `cargo xtask fetch-model`.

transformers (with the `gguf` package) reads the file and dequantizes its weights into an
ordinary `LlamaForCausalLM`; this saves it in fp32 safetensors with its tokenizer, drops the
`quantization_config` the loader leaves in the config (the weights are no longer quantized),
and checks the saved dir: it reloads, has the expected shape, and its logits on a short text
are finite and match the model it was saved from.

    .venv/bin/python xtask/python/convert_gguf.py --gguf FILE --out DIR \
        [--expect hidden_size=576 --expect num_hidden_layers=30 ...]

Prints one JSON line (the config's shape and the check's figures).
"""

import argparse
import json
import os
import shutil
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--expect", action="append", default=[], help="KEY=VALUE the config must have")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder, name = os.path.split(os.path.abspath(args.gguf))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized; what says otherwise would stop save_pretrained and make
    # every loader of the dir look for a GGUF quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.eval()

    partial = args.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)

    config = json.load(open(os.path.join(partial, "config.json")))
    if "quantization_config" in config:
        sys.exit("the saved config still carries a quantization_config")
    for expect in args.expect:
        key, value = expect.split("=", 1)
        if str(config.get(key)) != value:
            sys.exit(f"{key} is {config.get(key)!r} in the converted config, expected {value}")

    text = "The capital of France is"
    ids = torch.tensor([tokenizer.encode(text)])
    reloaded = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(ids).logits
        after = reloaded(ids).logits
    if not torch.isfinite(after).all():
        sys.exit("the converted model's logits are not finite")
    diff = (before - after).abs().max().item()
    if diff > 1e-5:
        sys.exit(f"the saved model's logits differ from the loaded one's by {diff}")
    next_token = tokenizer.decode([int(after[0, -1].argmax())])

    shutil.rmtree(args.out, ignore_errors=True)
    os.rename(partial, args.out)
    print(json.dumps({
        "architectures": config.get("architectures"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "num_attention_heads": config.get("num_attention_heads"),
        "num_key_value_heads": config.get("num_key_value_heads"),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "check": {"text": text, "next_token": next_token, "reload_max_abs_diff": diff},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
