"""`make gpu-check`: every GPU figure in one command, each step under its own time limit.

Steps (seconds are the limits; 8 minutes in all on one H100/H200):
  env       device, driver, CUDA, torch, triton versions                    (30 s)
  tests     pytest -m gpu tests/kernels                                       (100 s)
  tests-core pytest -m gpu tests/core (compression on CUDA)                  (45 s)
  tests-serving pytest -m gpu tests/serving (CUDA-graph decode replay)        (45 s)
  compiled  bench/compiled_kernels.py for this GPU's architecture            (45 s)
  kernels   bench/kernels.py: copy bandwidth, base, ours, dequant, bmm,
            gemlite (if importable) at Llama-2-7B shapes                      (125 s)
  serving   bench/serving.py --preset llama2-7b (random weights)              (90 s, --no-serving skips)
The install (make install, from uv.lock) comes before and is not in the 8 minutes.

Writes bench/results/gpu-check-<gpu>.json (and everything into $OUT when set), prints one
summary table, exits 1 if a test failed or a step failed or ran out of time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def run(name: str, cmd: list[str], limit: int) -> dict:
    print(f"\n=== {name}: {' '.join(cmd)} (limit {limit} s)", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=limit, capture_output=True, text=True)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, ((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")) + "\n[timed out]"
    print(out[-6000:], flush=True)
    return {"step": name, "rc": rc, "seconds": round(time.monotonic() - t0, 1), "tail": out[-3000:]}


def environment() -> dict:
    import torch
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_GiB=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        env["nvidia_smi"] = smi
        env["driver"] = smi.split(",")[1].strip() if smi else None
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    return env


def summary(steps: list[dict], kernels: dict | None) -> None:
    print("\n| step | rc | seconds |\n|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['rc']} | {s['seconds']} |")
    if not kernels:
        return
    bw = kernels["copy_bandwidth_GBs"]
    print(f"\nKernels (copy bandwidth {bw} GB/s): ours vs base, bmm-fp16, gemlite; fraction of copy bandwidth\n")
    print("| shape | dtype | T | rows/T | ours ms | ours-graph ms | x base | frac bw | bmm / ours | gemlite / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by = {}
    for r in kernels["results"]:
        by.setdefault((r["shape"], r.get("dtype"), r["tenants"], r["rows_per_tenant"]), {})[r["method"]] = r
    for (shape, dt, t, rpt), m in by.items():
        ours = m.get("ours-graph") or m.get("ours")
        if not ours:
            continue
        ratio = lambda other: round(m[other]["ms"] / ours["ms"], 2) if other in m else "-"
        print(f"| {shape} | {dt} | {t} | {rpt} | {m['ours']['ms']} | {m.get('ours-graph', {}).get('ms', '-')} | "
              f"{ours['x_base']} | {ours['frac_copy_bw']} | {ratio('bmm-fp16')} | {ratio('gemlite')} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-serving", action="store_true", help="skip the serving benchmark")
    args = ap.parse_args(argv)
    py = sys.executable
    started = time.monotonic()
    print("=== env", flush=True)
    env = environment()
    print(json.dumps(env, indent=1), flush=True)
    if not env["cuda_available"]:
        print("gpu-check needs a CUDA GPU: none visible", file=sys.stderr)
        return 2
    import torch

    arch = int(env["capability"].replace(".", ""))
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    steps = [
        run("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider"], 100),
        run("tests-core", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/core", "-p", "no:cacheprovider"], 45),
        run("tests-serving", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/serving", "-p", "no:cacheprovider"], 45),
        run("compiled", [py, "bench/compiled_kernels.py", "--arch", str(arch),
                         "--out", str(RESULTS / f"kernels-compiled-sm{arch}.json")], 45),
        run("kernels", [py, "bench/kernels.py", "--out", str(RESULTS / f"kernels-{slug}.json")], 125),
    ]
    if not args.no_serving:
        steps.append(run("serving", [py, "bench/serving.py", "--preset", "llama2-7b"], 90))
    kernels_path = RESULTS / f"kernels-{slug}.json"
    kernels_step = next(s for s in steps if s["step"] == "kernels")
    kernels = json.loads(kernels_path.read_text()) if kernels_path.is_file() and kernels_step["rc"] == 0 else None
    report = {"env": env, "steps": steps, "total_seconds": round(time.monotonic() - started, 1),
              "settings": {"tests": "pytest -m gpu tests/kernels; pytest -m gpu tests/core", "kernel_bench": "bench/kernels.py (GPU defaults)",
                           "serving_bench": None if args.no_serving else "bench/serving.py --preset llama2-7b"}}
    out = RESULTS / f"gpu-check-{slug}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        for p in [out, kernels_path, RESULTS / f"kernels-compiled-sm{arch}.json", *RESULTS.glob(f"serving-*{slug}*.json")]:
            if p.is_file():
                (dest / p.name).write_bytes(p.read_bytes())
    summary(steps, kernels)
    print(f"\nwrote {out} ({report['total_seconds']} s)")
    failed = [s["step"] for s in steps if s["rc"] != 0]
    if failed:
        print(f"FAILED steps: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
