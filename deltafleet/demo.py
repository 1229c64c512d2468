"""`deltafleet demo`: build (or reuse) the toy base + fine-tune, compress the fine-tune to a
1-bit delta, print the fidelity table and what base, fine-tune and base + delta generate,
then serve the base and two tenants from one pool on a local Ray and query them over HTTP.

Each step is a small function so other parts (serving) can extend the demo.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPTS = ["def read_config(path):\n", "import os\n\nclass", "The for statement"]


def build_pair(family: str = "llama") -> tuple[Path, Path]:
    from deltafleet.toymodels import toy_pair

    return toy_pair(family)


def compress_pair(family: str, base: Path, finetuned: Path, out: Path, steps: int = 40, **options):
    """Small settings; calibration from the fine-tune's training text so the demo takes seconds."""
    from deltafleet.compress import compress
    from deltafleet.toymodels import toy_compress_settings

    return compress(str(base), str(finetuned), out, toy_compress_settings(family, steps=steps, **options))


def fidelity_table(result) -> str:
    f, s = result.fidelity, result.sizes
    rows = [
        ("base", f.loss_base, 0.0, None),
        ("fine-tune", f.loss_finetuned, 1.0, 0.0),
        ("BitDelta stage 1", f.loss_initial, f.retained_improvement_initial, f.kl_initial),
        ("BitDelta distilled", f.loss_delta, f.retained_improvement, f.kl),
    ]
    lines = [f"{'model':<20} {'eval loss':>9} {'retained':>9} {'KL(ft||m)':>10}"]
    for name, loss, kept, kl in rows:
        kl_text = "" if kl is None else f"{kl:10.4f}"
        lines.append(f"{name:<20} {loss:9.4f} {kept:9.1%} {kl_text}")
    lines.append(f"delta {s.delta_bytes:,} bytes vs fine-tune {s.finetuned_bytes:,} bytes: {s.compression_ratio:.1f}x smaller "
                 f"({f.eval_tokens} held-out tokens of stdlib code)")
    if f.top1_agreement is not None:
        lines.append(f"top-1 agreement with the fine-tune's next token: base {f.top1_agreement_base:.1%}, "
                     f"base + delta {f.top1_agreement:.1%} (greedy text of tiny models drifts apart after the first "
                     "disagreement, so compare these, not the texts)")
    return "\n".join(lines)


def load_models(base: Path, finetuned: Path, delta_path: Path) -> dict:
    """base, fine-tune, and base + delta (live 1-bit modules, as serving computes it), on CPU."""
    import torch

    from deltafleet.compress.api import load_model
    from deltafleet.compress.apply import attach_delta
    from deltafleet.compress.format import load_delta

    cpu = torch.device("cpu")
    with_delta = load_model(base, cpu, torch.float32)
    attach_delta(with_delta, load_delta(delta_path))
    return {"base": load_model(base, cpu, torch.float32), "fine-tune": load_model(finetuned, cpu, torch.float32),
            "base + delta": with_delta}


def generate(models: dict, tokenizer, prompt: str, max_new_tokens: int = 32) -> dict[str, str]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = {}
    for name, model in models.items():
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[name] = tokenizer.decode(gen[0, ids.shape[1]:])
    return out


def show_generations(base: Path, finetuned: Path, delta_path: Path, prompts: list[str] = PROMPTS) -> None:
    from transformers import AutoTokenizer

    models = load_models(base, finetuned, delta_path)
    tokenizer = AutoTokenizer.from_pretrained(finetuned)
    for prompt in prompts:
        print(f"\nprompt {prompt!r} (greedy)")
        for name, text in generate(models, tokenizer, prompt).items():
            print(f"  {name:<13} {text!r}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deltafleet demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--family", default="llama", choices=["llama", "qwen2"],
                   help="model family of the toy pair (default llama)")
    p.add_argument("--out", help="where to write the delta (default: a temporary folder)")
    p.add_argument("--steps", type=_positive_int, default=40, help="scale-distillation steps")
    p.add_argument("--no-serve", action="store_true", help="stop after the generations (no local Ray pool)")
    args = p.parse_args(argv)

    from deltafleet.compress.errors import run_cli

    return run_cli("deltafleet demo", lambda: _run(args))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    from deltafleet.compress.checkpoint import InputError

    out = Path(args.out or tempfile.mkdtemp(prefix="deltafleet-demo-"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create the output folder ({e.strerror})") from None
    print(f"1. toy {args.family} base (English prose) + fine-tune (Python code): building or reusing the cache")
    base, finetuned = build_pair(args.family)
    print(f"2. compressing the fine-tune into {out}")
    result = compress_pair(args.family, base, finetuned, out, args.steps)
    print("\n" + fidelity_table(result))
    print("\n3. generations")
    show_generations(base, finetuned, Path(result.delta_uri))
    if args.no_serve:
        return 0

    # Two tenants over one base: the same fine-tune compressed with a scale per matrix (the
    # paper) and a scale per output row, served side by side from one replica.
    print(f"\n4. compressing a second tenant (scale per output row) into {out / 'rowscale'}")
    rowscale = compress_pair(args.family, base, finetuned, out / "rowscale", args.steps, scale_per_row=True)
    print(f"   retained improvement {rowscale.fidelity.retained_improvement:.1%}")
    print("\n5. serving base + 2 tenants from one pool on a local Ray (OpenAI-compatible API)")
    from deltafleet.serving.demo import run_serving_demo

    run_serving_demo(base, {"demo/code": Path(result.delta_uri), "demo/code-rowscale": Path(rowscale.delta_uri)})
    return 0
