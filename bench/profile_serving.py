"""Where a serving run's time goes: the engine on base only, 1 tenant, and 16 distinct tenants.

The bench's model, deltas and traffic (bench/serving.py, cpu-small by default), one warm engine,
each run twice: once with its engine steps timed through `on_step` (wall clock), once with the
engine's parts timed as a tree in the engine thread's CPU time (time.thread_time: what other
processes on a shared machine take does not count, so the tree is steadier than the wall figures). torch.profiler does not see the engine's own thread and
cProfile times one thread only, and the native bit kernel is a ctypes call neither would name, so
the parts are wrapped with timers (inclusive CPU time per path in the call tree): the
engine step, the model forward, each BatchedDeltaLinear (lm_head apart), inside it the base GEMM
(F.linear), the native 1-bit kernel, the whole-matrix rows (a tenant's own lm_head), the row
grouping, and the per-tenant norm and embedding hooks.

    python bench/profile_serving.py                   # ~1 min on 2 cores
Writes bench/results/profile-serving-<device>.txt (the summary) and .json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as bench  # noqa: E402

from deltafleet.kernels import cpu_native  # noqa: E402
from deltafleet.serving import engine as engine_mod  # noqa: E402
from deltafleet.serving import layers  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)  # "step > forward > ..." -> seconds, inclusive
CALLS: dict[str, int] = defaultdict(int)
_stack = threading.local()
ON = [False]  # timing only in the timed run


class timed:
    """Adds the block's CPU time (its thread's: other processes on a shared machine do not count) to its
    path in the call tree."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self.path = getattr(_stack, "path", ())
        _stack.path = self.path + (self.label,)
        self.t = time.thread_time()

    def __exit__(self, *exc):
        if ON[0]:
            key = " > ".join(_stack.path)
            TIMES[key] += time.thread_time() - self.t
            CALLS[key] += 1
        _stack.path = self.path


def wrap(owner, attr: str, label) -> None:
    """Time every call of owner.attr; label is a string or a function of the call's arguments."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        with timed(label(*a) if callable(label) else label):
            return fn(*a, **kw)

    setattr(owner, attr, wrapped)


def wrap_hooks(owner, attr: str, label: str) -> None:
    """Time the forward hooks that owner.attr(module, ...) registers (the norm and embedding hooks)."""
    add = getattr(owner, attr)

    @functools.wraps(add)
    def adding(module, *a, **kw):
        real = module.register_forward_hook

        def register(hook, **k):
            def timed_hook(*ha, **hk):
                with timed(label):
                    return hook(*ha, **hk)
            return real(timed_hook, **k)

        module.register_forward_hook = register
        try:
            return add(module, *a, **kw)
        finally:
            del module.register_forward_hook

    setattr(owner, attr, adding)


def name_parts() -> None:
    """Wrap the engine's parts; before the engine is built, so its patched model uses them."""
    wrap(engine_mod.Engine, "_step", "step")
    wrap(engine_mod.Engine, "_forward", "forward (+ sampling)")
    wrap(layers.BatchedDeltaLinear, "forward", lambda self, x: "lm_head" if self.name == "lm_head" else "block linears")
    wrap(F, "linear", "F.linear (base GEMM)")
    wrap(cpu_native, "delta_accumulate", "native 1-bit kernel")
    wrap(layers, "_whole_rows", "whole-matrix rows")
    wrap(layers, "group_rows", "row grouping")
    wrap_hooks(layers, "add_norm_hook", "per-tenant norm hook")
    wrap_hooks(layers, "add_embedding_hook", "embedding hook")


def step_figures(steps) -> dict:
    """Engine steps of one run: count and total seconds, split into decode-only and prefill steps."""
    decode = [s for s in steps if s.prefill_tokens == 0]
    prefill = [s for s in steps if s.prefill_tokens > 0]
    return {"steps": len(steps), "step_s_total": sum(s.seconds for s in steps),
            "decode_steps": len(decode), "decode_step_s_mean": statistics.mean(s.seconds for s in decode) if decode else None,
            "decode_rows_mean": statistics.mean(s.sequences for s in decode) if decode else None,
            "prefill_steps": len(prefill), "prefill_s_total": sum(s.seconds for s in prefill),
            "tenants_per_decode_step": statistics.mean(s.tenants for s in decode) if decode else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=bench.PRESETS, default="cpu-small")
    ap.add_argument("--out", default=None, help="path without suffix (default bench/results/profile-serving-<device>)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each kind; the fastest is kept (a shared machine)")
    opts = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = bench.PRESETS[opts.preset]
    torch.set_num_threads(1)  # as the bench on CPU
    traffic = bench.make_traffic(p)
    name_parts()
    report: dict = {"preset": opts.preset, "device": device, "git": bench.git_state(), "repeat": opts.repeat,
                    "load_average_before": os.getloadavg(), "runs": {}}
    lines = []
    with tempfile.TemporaryDirectory(prefix="deltafleet-profile-") as tmp:
        tmp = Path(tmp)
        _, deltas = bench.build(tmp, p, 16, device)
        names = sorted(deltas, key=lambda n: int(n.split("t")[-1]))
        steps = []
        batch = p["batches"][0]
        engine = bench.bench_engine(tmp, p, device, "auto", batch, prefix_caching=False, on_step=steps.append)
        try:
            engine.set_tenants({n: deltas[n] for n in names})
            engine.wait_ready(timeout=600)
            bench.run_engine(engine, [names[0]] * 4, traffic[:4])  # warm-up
            runs = {"base only": [None] * len(traffic), "1 tenant": [names[0]] * len(traffic),
                    "16 distinct tenants": bench.assign(len(traffic), names[:16], "distinct")}
            for label, models in runs.items():
                bench.run_engine(engine, models, traffic)  # warm: the norm-path check, allocator
                best_fig, best_tree = None, None
                for _ in range(opts.repeat):  # the fastest untimed run, and the fastest timed run's tree
                    steps.clear()
                    fig = bench.run_engine(engine, models, traffic)
                    if best_fig is None or fig["tokens_per_s"] > best_fig[0]["tokens_per_s"]:
                        best_fig = (fig, step_figures(steps))
                    TIMES.clear(), CALLS.clear()
                    ON[0] = True
                    timed_fig = bench.run_engine(engine, models, traffic)
                    ON[0] = False
                    if best_tree is None or TIMES["step"] < best_tree[1]["step"]:
                        best_tree = (timed_fig, dict(TIMES), dict(CALLS))
                fig, stepfig = best_fig
                report["runs"][label] = {**fig, **stepfig, "timed_run_tokens_per_s": best_tree[0]["tokens_per_s"],
                                         "tree_s": dict(sorted(best_tree[1].items())),
                                         "tree_calls": dict(sorted(best_tree[2].items()))}
                print(f"[profile] {label}: {fig['tokens_per_s']:.0f} tok/s", file=sys.stderr)
        finally:
            engine.close()
    base = report["runs"]["base only"]
    report["cpu"] = cpu_native.cpu_description() if device == "cpu" else torch.cuda.get_device_name()
    lines.append(f"{opts.preset} on {report['cpu']} ({device}), {len(traffic)} requests, batch {batch}, 1 thread; "
                 f"git {report['git']}")
    lines.append("")
    lines.append("Wall clock (each the fastest of --repeat runs; on a shared machine these move with its load: the CPU-time "
                 "tree below is the steady measure):")
    lines.append("")
    lines.append("| run | tok/s | vs base | steps | decode steps | decode step ms | rows/decode step | prefill steps s | all steps s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for label, r in report["runs"].items():
        lines.append(f"| {label} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['steps']} | "
                     f"{r['decode_steps']} | {1e3 * (r['decode_step_s_mean'] or 0):.2f} | {r['decode_rows_mean'] or 0:.1f} | "
                     f"{r['prefill_s_total']:.2f} | {r['step_s_total']:.2f} |")
    lines.append("")
    lines.append("Timed run (the same traffic again, its parts timed): the engine thread's CPU seconds, inclusive, per "
                 "path of the call tree, summed over the run's steps; a parent's time includes its children's; "
                 "(rest) = the parent's own time, not in a named child.")
    lines.append("")
    runs = report["runs"]
    lines.append("| path | " + " | ".join(runs) + " |")
    lines.append("|---|" + "---|" * len(runs))
    for r in runs.values():  # what no wrapper names: attention, RoPE, residuals, sampling, BatchedDeltaLinear's own glue
        tree = r["tree_s"]
        for parent in [k for k in list(tree) if not k.endswith(" (rest)")]:
            kids = [v for k, v in tree.items() if k.startswith(parent + " > ") and k.count(" > ") == parent.count(" > ") + 1]
            if kids:
                tree[parent + " > (rest)"] = tree[parent] - sum(kids)
    for key in sorted({k for r in runs.values() for k in r["tree_s"]}):
        lines.append(f"| {key} | " + " | ".join(f"{r['tree_s'].get(key, 0):.3f}" for r in runs.values()) + " |")
    lines.append("")
    lines.append("The gap: each run's CPU time over the base-only run's, by part (leaves of the tree; share of the extra):")
    lines.append("")
    base_tree = base["tree_s"]
    leaves = sorted(k for k in {k for r in runs.values() for k in r["tree_s"]}
                    if not any(o.startswith(k + " > ") for r in runs.values() for o in r["tree_s"]))
    others = [label for label in runs if label != "base only"]
    lines.append("| part | " + " | ".join(others) + " |")
    lines.append("|---|" + "---|" * len(others))
    for key in leaves:
        cells = []
        for label in others:
            extra = runs[label]["tree_s"].get(key, 0) - base_tree.get(key, 0)
            cells.append(f"{extra:+.3f} s ({extra / (runs[label]['tree_s']['step'] - base_tree['step']):.0%})")
        lines.append(f"| {key.replace('step > forward (+ sampling) > ', '')} | " + " | ".join(cells) + " |")
    lines.append("| all (step) | " + " | ".join(f"{runs[label]['tree_s']['step'] - base_tree['step']:+.3f} s "
                                               f"({runs[label]['tree_s']['step'] / base_tree['step']:.2f}x base)" for label in others) + " |")
    report["load_average_after"] = os.getloadavg()
    lines.append("")
    lines.append(f"load average before {report['load_average_before']}, after {report['load_average_after']}, "
                 f"{os.cpu_count()} CPUs; each run the fastest of {opts.repeat}")
    text = "\n".join(lines) + "\n"
    out = Path(opts.out or Path(__file__).parent / "results" / f"profile-serving-{device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    print(f"wrote {out.with_suffix('.txt')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
