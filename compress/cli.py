"""`deltafleet compress`: the command a compression Job runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PROG = "deltafleet compress"


def parser() -> argparse.ArgumentParser:
    from .api import CompressSettings

    d = CompressSettings()
    p = argparse.ArgumentParser(prog=PROG, description="Compress a fine-tune into a 1-bit BitDelta delta against its base.")
    p.add_argument("--base", required=True, help="base model: local folder or Hugging Face id")
    p.add_argument("--finetuned", required=True, help="fine-tuned model: local folder or Hugging Face id")
    p.add_argument("--out", required=True, help="output folder for delta.safetensors and result.json")
    p.add_argument("--steps", type=int, default=d.steps, help=f"scale-distillation steps (default {d.steps}; 0 = stage 1 only)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate for the scales (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"samples per step (default {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sample (default {d.seq_len})")
    p.add_argument("--samples", type=int, default=d.samples, help=f"calibration samples (default {d.samples})")
    p.add_argument("--calibration", help="calibration text: .txt/.jsonl file or folder (default: sample the fine-tune)")
    p.add_argument("--eval-data", help="held-out text for the fidelity report (default: split of --calibration, or fresh samples)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help=f"eval samples (default {d.eval_samples})")
    p.add_argument("--loss", choices=["mse", "kl"], default=d.loss, help="distillation loss on logits (default mse, as in the paper)")
    p.add_argument("--scale-per-row", action="store_true", help="one scale per output row instead of per matrix")
    p.add_argument("--compress-embeddings", action="store_true", help="1-bit compress untied embeddings / lm_head too")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"], help="model dtype during distillation")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of calibration sampling and distillation (default {d.seed})")
    p.add_argument("--base-store", help="when --base is a Hugging Face id: copy its resolved snapshot into "
                   "DIR/<org>--<name>/<commit>/ (once per commit) and record that folder in result.json")
    p.add_argument("--termination-log", default=os.environ.get("DELTAFLEET_TERMINATION_LOG"),
                   help="also write the compact result here (default: $DELTAFLEET_TERMINATION_LOG)")
    return p


def main(argv: list[str]) -> int:
    from .api import CompressSettings, compress
    from .errors import run_cli

    args = parser().parse_args(argv)
    # Group-writable outputs: the store is shared by a group (compression pods, serving pods,
    # the operator), and the operator must be able to delete a deleted FineTune's files.
    os.umask(0o002)
    settings = CompressSettings(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len, samples=args.samples,
        calibration=args.calibration, eval_data=args.eval_data, eval_samples=args.eval_samples, loss=args.loss,
        scale_per_row=args.scale_per_row, compress_embeddings=args.compress_embeddings, device=args.device,
        dtype=args.dtype, seed=args.seed,
    )

    def body() -> int:
        if args.termination_log:  # checked now: a missing folder must not fail after the whole run
            from .checkpoint import InputError

            log = Path(args.termination_log)
            # A kubelet mounts the file itself (mode 0666) into a /dev only root may write:
            # the file must be writable, or be creatable in its folder.
            writable = os.access(log, os.W_OK) if log.exists() else log.parent.is_dir() and os.access(log.parent, os.W_OK)
            if not writable:
                raise InputError(f"--termination-log {log}: not writable (nor creatable in {log.parent})")
        result = compress(args.base, args.finetuned, args.out, settings, base_store=args.base_store)
        if args.termination_log:
            Path(args.termination_log).write_text(result.termination_message())
        f = result.fidelity
        print(f"{result.delta_uri}: {result.sizes.delta_bytes} bytes, {result.sizes.compression_ratio:.1f}x smaller; "
              f"retained {f.retained_improvement:.1%} of the fine-tune's improvement, KL {f.kl:.4f}")
        return 0

    return run_cli(PROG, body)
