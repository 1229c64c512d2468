"""`deltafleet merge`: base + delta → a full Hugging Face checkpoint (W_base + α·sign(Δ))."""

from __future__ import annotations

import argparse
from pathlib import Path

PROG = "deltafleet merge"


def merge(base: str, delta_path: str, out: str | Path, dtype: str = "auto") -> Path:
    import torch

    from .api import load_tokenizer
    from .apply import merge_delta
    from .checkpoint import InputError, resolve_model_dir
    from .fingerprint import fingerprint_model
    from .format import load_delta

    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a folder that is not empty"
        raise InputError(f"--out {out}: is {what}; give a new or empty folder for the merged checkpoint")
    from .api import check_output_dir

    check_output_dir(out)
    base_dir = resolve_model_dir(base, "base")
    if not (base_dir / "config.json").is_file():
        raise InputError(f"base {base_dir}: no config.json (not a Hugging Face model folder)")
    load_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=load_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"base {base_dir}: cannot load it as a causal LM ({' '.join(str(e).split())[:160]})") from None
    delta = load_delta(delta_path, expected_fingerprint=fingerprint_model(model))
    merge_delta(model, delta)
    model.save_pretrained(out, safe_serialization=True)
    try:
        load_tokenizer(base_dir).save_pretrained(out)
    except InputError:
        pass  # a base without a tokenizer: the merged weights are still complete
    return out


def main(argv: list[str]) -> int:
    from .errors import run_cli

    p = argparse.ArgumentParser(prog=PROG, description="Merge a delta into its base and save a full checkpoint.")
    p.add_argument("--base", required=True, help="base model the delta was built on: folder or Hugging Face id")
    p.add_argument("--delta", required=True, help="delta.safetensors")
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout, tokenizer copied from the base)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged checkpoint (default auto: the base's)")
    args = p.parse_args(argv)

    def body() -> int:
        out = merge(args.base, args.delta, args.out, args.dtype)
        print(f"merged {args.delta} into {args.base} -> {out}")
        return 0

    return run_cli(PROG, body)
