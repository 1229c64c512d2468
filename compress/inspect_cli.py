"""`deltafleet inspect DELTA`: metadata, sizes and ratio of a delta file (verified before printing)."""

from __future__ import annotations

import argparse
import json
import os

PROG = "deltafleet inspect"


def summary(path: str) -> dict:
    from .format import load_delta

    delta = load_delta(path)  # checks format, content hash and structure
    path = delta.path or path  # the file, also when given the folder compress wrote
    file_bytes = os.path.getsize(path)
    ft_bytes = delta.sizes.get("finetuned_bytes")
    return {
        "path": path,
        "base_model": delta.base_model,
        "base_fingerprint": delta.base_fingerprint,
        "finetuned_model": delta.finetuned_model,
        "file_bytes": file_bytes,
        "compressed_matrices": len(delta.signs),
        "sign_bytes": sum(t.numel() * t.element_size() for t in delta.signs.values()),
        "scale_bytes": sum(t.numel() * t.element_size() for t in delta.scales.values()),
        "per_row_scales": any(t.dim() == 1 for t in delta.scales.values()),
        "whole_params": sorted(delta.whole),
        "whole_bytes": sum(t.numel() * t.element_size() for t in delta.whole.values()),
        "finetuned_bytes": ft_bytes,
        "compression_ratio": ft_bytes / file_bytes if ft_bytes else None,
        "settings": delta.settings,
        "fidelity": delta.fidelity,
    }


def main(argv: list[str]) -> int:
    from .errors import run_cli

    p = argparse.ArgumentParser(prog=PROG, description="Print a delta file's metadata, sizes and ratio.")
    p.add_argument("delta", help="delta.safetensors, or the folder compress wrote it to")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)

    def body() -> int:
        s = summary(args.delta)
        if args.json:
            print(json.dumps(s, indent=2))
            return 0
        print(f"{s['path']}")
        print(f"  base          {s['base_model']}  (fingerprint {s['base_fingerprint']})")
        print(f"  fine-tune     {s['finetuned_model']}")
        print(f"  1-bit         {s['compressed_matrices']} matrices, {s['sign_bytes']:,} sign bytes, "
              f"{'per-row' if s['per_row_scales'] else 'per-matrix'} scales ({s['scale_bytes']:,} bytes)")
        print(f"  whole         {len(s['whole_params'])} parameters, {s['whole_bytes']:,} bytes")
        ratio = f"{s['compression_ratio']:.1f}x" if s["compression_ratio"] else "?"
        ft = f"{s['finetuned_bytes']:,}" if s["finetuned_bytes"] else "?"
        print(f"  size          {s['file_bytes']:,} bytes on disk; fine-tune {ft} bytes; ratio {ratio}")
        f = s["fidelity"]
        if f:
            print(f"  fidelity      loss base {f['loss_base']:.4f}  fine-tune {f['loss_finetuned']:.4f}  "
                  f"stage 1 {f['loss_initial']:.4f}  distilled {f['loss_delta']:.4f}")
            print(f"                retained {f['retained_improvement']:.1%} (stage 1 {f['retained_improvement_initial']:.1%}), "
                  f"KL {f['kl']:.4f} (stage 1 {f['kl_initial']:.4f}) over {f['eval_tokens']} tokens")
        return 0

    return run_cli(PROG, body)
