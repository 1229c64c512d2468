"""Fidelity benchmark: BitDelta vs a low-rank (SVD) delta at the same byte budget.

Builds a pair larger than the test models with the toy recipe (base: English prose of
Python's docs; fine-tune: all weights trained further on stdlib code), compresses it with
the paper's stage-2 settings (Adam, lr 1e-4, 200 steps, batch 4, 800 samples of 128 tokens,
here cut from the fine-tune's training text), and evaluates on held-out stdlib files: base,
fine-tune, BitDelta stage 1, BitDelta distilled, SVD at BitDelta's bytes per matrix, and
BitDelta with the embeddings/lm_head also at 1 bit. "bytes" counts the block matrices plus
what is stored whole (the delta file's tensors; the last row is its file size).

Served = measured: for each family the distilled delta's eval loss is reported three ways —
(a) what compress wrote in result.json (the figure the operator's quality gate reads),
(b) the `deltafleet merge` checkpoint, (c) the tenant as the serving engine computes it
(its delta-aware layers, DeltaBank and kernels, teacher-forced). Prints tables and writes
bench/results/fidelity.json.

    .venv/bin/python bench/fidelity.py                         (llama; ≤ 10 min on a 2-core CPU)
    .venv/bin/python bench/fidelity.py --families llama,qwen2,mistral,gemma,gpt_neox --recipe test
        (every family on the test suite's smaller pairs and fast settings: a few minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from deltafleet.compress import CompressSettings, compress
from deltafleet.compress.api import load_tokenizer
from deltafleet.compress.calibration import pick, windows_from_text
from deltafleet.compress.format import load_delta
from deltafleet.compress.result import DELTA_FILE
from deltafleet.compress.svd import evaluate_low_rank
from deltafleet.toymodels import ToyRecipe, toy_eval_text, toy_pair, toy_train_text

RECIPES = {
    "bench": ToyRecipe(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512, vocab=1024,
                       base_steps=300, ft_steps=120),
    "test": ToyRecipe(),  # the test suite's pairs (cached by `make test`)
}
RECIPE = RECIPES["bench"]
RESULTS = Path(__file__).parent / "results" / "fidelity.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def served_vs_merged(base: Path, ft: Path, delta_path: Path, eval_: torch.Tensor, batch_size: int) -> dict:
    """Eval loss and KL(ft ‖ ·) of the merged checkpoint and of the tenant as served."""
    from transformers import AutoModelForCausalLM

    from deltafleet.compress.fidelity import evaluate
    from deltafleet.compress.merge_cli import merge
    from deltafleet.serving.served import TenantScorer, build_served_model

    teacher = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    merged_dir = merge(str(base), str(delta_path), Path(tempfile.mkdtemp(prefix="deltafleet-merged-")), dtype="float32")
    merged = evaluate(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), teacher, eval_, batch_size)
    scorer = TenantScorer(build_served_model(str(base), device="cpu", dtype="float32"), "bench", delta_path)
    served = evaluate(scorer, teacher, eval_, batch_size)
    return {"merged": {"eval_loss": merged.loss, "kl": merged.kl}, "served": {"eval_loss": served.loss, "kl": served.kl}}


def run(family: str, steps: int, samples: int) -> dict:
    t0 = time.time()
    base, ft = toy_pair(family, RECIPE)
    build_s = time.time() - t0
    settings = CompressSettings(steps=steps, samples=samples, eval_samples=64, device="cpu",
                                calibration=str(toy_train_text(family, RECIPE)), eval_data=str(toy_eval_text(family, RECIPE)))
    out = Path(tempfile.mkdtemp(prefix="deltafleet-bench-"))
    t1 = time.time()
    result = compress(str(base), str(ft), out, settings)
    compress_s = time.time() - t1

    delta = load_delta(out / DELTA_FILE)
    tok = load_tokenizer(ft)
    eval_ = pick(windows_from_text(settings.eval_data, tok, settings.seq_len), settings.eval_samples, settings.seed + 1)
    svd, svd_matrix_bytes = evaluate_low_rank(str(base), str(ft), delta, eval_, settings.batch_size)

    # The same, with embeddings and lm_head also at 1 bit (the option that trades fidelity for size).
    emb = compress(str(base), str(ft), Path(tempfile.mkdtemp(prefix="deltafleet-bench-")),
                   dataclasses.replace(settings, compress_embeddings=True))

    f = result.fidelity
    gap = f.loss_base - f.loss_finetuned
    three = served_vs_merged(base, ft, out / DELTA_FILE, eval_, settings.batch_size)
    served_measured = {
        "result_json": {"eval_loss": f.loss_delta, "retained": f.retained_improvement, "kl": f.kl},
        **{k: {**v, "retained": (f.loss_base - v["eval_loss"]) / gap} for k, v in three.items()},
    }
    served_measured["served_vs_merged_rel"] = abs(three["served"]["eval_loss"] - three["merged"]["eval_loss"]) / three["merged"]["eval_loss"]
    matrix_bytes = sum(t.numel() * 4 for t in delta.signs.values()) + sum(t.numel() * 4 for t in delta.scales.values())
    whole_bytes = sum(t.numel() * t.element_size() for t in delta.whole.values())
    rows = [
        {"model": "base", "eval_loss": f.loss_base, "retained": 0.0, "kl": None, "delta_bytes": 0},
        {"model": "fine-tune", "eval_loss": f.loss_finetuned, "retained": 1.0, "kl": 0.0, "delta_bytes": result.sizes.finetuned_bytes},
        {"model": "BitDelta stage 1", "eval_loss": f.loss_initial, "retained": f.retained_improvement_initial,
         "kl": f.kl_initial, "delta_bytes": matrix_bytes + whole_bytes},
        {"model": "BitDelta distilled", "eval_loss": f.loss_delta, "retained": f.retained_improvement,
         "kl": f.kl, "delta_bytes": matrix_bytes + whole_bytes},
        {"model": "SVD low-rank (same bytes)", "eval_loss": svd.loss, "retained": (f.loss_base - svd.loss) / gap,
         "kl": svd.kl, "delta_bytes": svd_matrix_bytes + whole_bytes},
        {"model": "BitDelta + 1-bit embeddings", "eval_loss": emb.fidelity.loss_delta,
         "retained": emb.fidelity.retained_improvement, "kl": emb.fidelity.kl, "delta_bytes": emb.sizes.delta_bytes},
    ]
    return {
        "family": family,
        "recipe": dataclasses.asdict(RECIPE),
        "settings": dataclasses.asdict(settings),
        "rows": rows,
        "served_measured": served_measured,
        "block_matrix_bytes": {"bitdelta": matrix_bytes, "svd": svd_matrix_bytes},
        "whole_param_bytes": whole_bytes,
        "delta_file_bytes": result.sizes.delta_bytes,
        "finetuned_bytes": result.sizes.finetuned_bytes,
        "compression_ratio": result.sizes.compression_ratio,
        "compression_ratio_1bit_embeddings": emb.sizes.compression_ratio,
        "eval_tokens": f.eval_tokens,
        "seconds": {"build_pair": round(build_s, 1), "compress": round(compress_s, 1)},
    }


def table(r: dict) -> str:
    lines = [f"{r['family']} (hidden {r['recipe']['hidden']}, {r['recipe']['layers']} layers), "
             f"{r['eval_tokens']} held-out tokens of stdlib code",
             f"{'model':<28} {'eval loss':>9} {'retained':>9} {'KL(ft||m)':>10} {'bytes':>11}"]
    for row in r["rows"]:
        kl = "" if row["kl"] is None else f"{row['kl']:10.4f}"
        lines.append(f"{row['model']:<28} {row['eval_loss']:9.4f} {row['retained']:9.1%} {kl:>10} {row['delta_bytes']:11,}")
    sm = r["served_measured"]
    lines.append("distilled delta, three ways: " + ", ".join(
        f"{k.replace('_', '.')} {sm[k]['eval_loss']:.4f} ({sm[k]['retained']:.1%})" for k in ("result_json", "merged", "served"))
        + f"; served vs merged {sm['served_vs_merged_rel']:.1e} relative")
    lines.append(f"block matrices: BitDelta {r['block_matrix_bytes']['bitdelta']:,} B vs SVD {r['block_matrix_bytes']['svd']:,} B; "
                 f"delta file {r['delta_file_bytes']:,} B = {r['compression_ratio']:.1f}x smaller than the fine-tune")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="llama", help="comma-separated: llama,qwen2,mistral,gemma,gpt_neox")
    p.add_argument("--recipe", default="bench", choices=sorted(RECIPES),
                   help="bench: the larger pair (default); test: the test suite's pairs")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=800)
    args = p.parse_args()
    global RECIPE
    RECIPE = RECIPES[args.recipe]
    from deltafleet.compress.progress import quiet_library_bars

    quiet_library_bars()
    t0 = time.time()
    runs = [run(f, args.steps, args.samples) for f in args.families.split(",")]
    for r in runs:
        print(table(r) + "\n")
    report = {
        "bench": "fidelity",
        "device": {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
        "runs": runs,
        "seconds": round(time.time() - t0, 1),
    }
    results = RESULTS if args.recipe == "bench" else RESULTS.with_name(f"fidelity-{args.recipe}-recipe.json")
    report["recipe"] = args.recipe
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {results} ({report['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
