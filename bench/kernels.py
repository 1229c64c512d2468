"""Benchmark of the batched 1-bit delta linear against the baselines it replaces.

GPU (fp16 and bf16, Llama-2-7B linear shapes 4096x4096, 11008x4096, 4096x11008; T in
{1, 4, 16, 64} tenants, 1-64 rows in all):
  ours        delta_linear as dispatched (decode kernel up to the table's row limit, else
              cuBLAS base + prefill delta kernel), one eager call
  ours-graph  the same call replayed from a CUDA graph (as the engine runs decode steps)
  dequant     per tenant: W + α·unpack(signs) materialized, then matmul (torch only; T <= 16)
  bmm-fp16    cuBLAS bmm over T materialized fp16 weights ("one full model per tenant")
  gemlite     gemlite's A16W1 GEMV (W = 2α·(b − ½)), one launch per tenant, if importable
  base        the base GEMV/GEMM alone (F.linear), the floor
with time, bytes moved / time (GB/s), that as a fraction of the device's copy bandwidth
measured in the same run, TFLOP/s (base + delta), and the ratio to the base GEMM. The
bytes of ours: W once + every tenant's signs + x + y (the section 6 model).

CPU (fp32, small shapes, so it always runs, < 5 min on 2 cores): the CPU path cold and
with a sign cache against the same torch baselines, plus the byte-LUT/unpack crossover
that sets kernels/cpu.py's LUT_MAX_ROWS.

Writes bench/results/kernels-<device>.json (and $OUT/ when set) and prints a markdown table.
Usage: python bench/kernels.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deltafleet.kernels import SignCache, delta_linear, group_rows, pack_signs, unpack_bits, unpack_signs
from deltafleet.kernels import cpu as cpu_path
from deltafleet.kernels import cpu_native

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in): qkvo, gate/up, down
GPU_TENANTS = [1, 4, 16, 64]
GPU_ROWS_PER_TENANT = [1, 4, 16, 64]  # cases with at most GPU_MAX_ROWS rows in all
GPU_MAX_ROWS = 64
CPU_SHAPES = [(1024, 1024), (2048, 2048)]
CPU_TENANTS = [1, 4, 16]


def time_cpu(fn, reps: int = 5) -> float:
    """Best of `reps` (ms): on a shared CPU the minimum is the least disturbed run."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def time_gpu(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=50, return_mode="median")


def copy_bandwidth_gbs(device: str) -> float:
    """Device copy bandwidth (read + write bytes per second), measured now."""
    n = (1 << 30) if device == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = time_gpu if device == "cuda" else time_cpu
    ms = timer(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def make_problem(t: int, rows_per_tenant: int, n: int, k: int, dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(0)  # generated where used: host randn of 7B shapes takes seconds
    m = t * rows_per_tenant
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype)
    if device == "cuda":  # random words are random signs; packing 64 matrices on the host would take minutes
        signs = torch.randint(-(2**31), 2**31 - 1, (t, n, k // 32), dtype=torch.int32, device=device, generator=gen)
    else:
        one = pack_signs(torch.randn(n, k, generator=gen))  # packing many random matrices is slow:
        signs = torch.stack([one.roll(i, 0) for i in range(t)]).to(device)  # distinct rolls instead
    scales = torch.full((t,), 0.01).to(device)
    rows = torch.arange(t, device=device).repeat_interleave(rows_per_tenant)
    return x, w, signs, scales, rows


def dequant_then_matmul(x, w, signs, scales, groups):
    y = F.linear(x, w)
    for s, t in enumerate(groups.slots):
        if t >= 0:
            r = groups.rows_of(s).long()
            wt = w + scales[t].to(w.dtype) * unpack_signs(signs[t], w.dtype)
            y[r] = F.linear(x[r], wt)
    return y


def materialized(w, signs, scales, dtype):
    """T full weights, as if each tenant's fine-tune were served as its own model."""
    return torch.stack([(w.float() + scales[t].float() * unpack_signs(signs[t])).to(dtype) for t in range(signs.shape[0])])


def bench_case(device, n, k, t, rows_per_tenant, dtype, methods, bandwidth, timer):
    x, w, signs, scales, rows = make_problem(t, rows_per_tenant, n, k, dtype, device)
    groups = group_rows(rows, t)
    m = x.shape[0]
    wt = materialized(w, signs, scales, torch.float16 if device == "cuda" else dtype) if "bmm" in " ".join(methods) else None
    xt = x.view(t, rows_per_tenant, k).to(wt.dtype) if wt is not None else None
    calls = {
        "base": lambda: F.linear(x, w),
        "ours": lambda: delta_linear(x, w, signs, scales, rows, groups=groups),
        "ours-graph": graphed(lambda: delta_linear(x, w, signs, scales, rows)) if "ours-graph" in methods else None,
        "gemlite": gemlite_call(x, w, signs, scales, groups) if "gemlite" in methods else None,
        "ours-cached": lambda: delta_linear(x, w, signs, scales, rows, groups=groups, sign_cache=cache),
        "dequant": lambda: dequant_then_matmul(x, w, signs, scales, groups),
        "bmm-fp16": lambda: torch.bmm(xt, wt.transpose(1, 2)),
        "bmm-fp32": lambda: torch.bmm(xt, wt.transpose(1, 2)),
    }
    cache = SignCache(1 << 40)
    el = x.element_size()
    ours_bytes = n * k * el + t * n * k // 8 + m * k * el + m * n * el + t * 4
    bytes_of = {"base": n * k * el + m * (k + n) * el, "bmm-fp16": t * n * k * 2 + m * (k + n) * 2, "bmm-fp32": t * n * k * 4 + m * (k + n) * 4,
                "gemlite": n * k * el + t * n * k // 8 + t * n * 4 + m * (k + n) * el}  # base GEMM + T 1-bit GEMVs
    out = []
    base_ms = None
    for name in methods:
        if calls.get(name) is None or (name == "dequant" and device == "cuda" and t > 16):
            continue  # gemlite not importable / dequant of 64 tenants takes minutes
        ms = timer(calls[name])
        base_ms = ms if name == "base" else base_ms
        moved = bytes_of.get(name, ours_bytes)
        flops = 2 * m * n * k * (1 if name == "base" or name.startswith("bmm") else 2)
        out.append({
            "shape": f"{n}x{k}", "dtype": str(dtype).removeprefix("torch."), "tenants": t, "rows_per_tenant": rows_per_tenant, "method": name,
            "ms": round(ms, 4), "GB/s": round(moved / (ms * 1e-3) / 1e9, 1),
            "frac_copy_bw": round(moved / (ms * 1e-3) / 1e9 / bandwidth, 3),
            "TFLOP/s": round(flops / (ms * 1e-3) / 1e12, 3),
            "x_base": round(ms / base_ms, 2) if base_ms else None,
        })
    return out


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up that compiles the kernels); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


GEMLITE_NOTE = None


def gemlite_call(x, w, signs, scales, groups):
    """gemlite's A16W1 GEMV per tenant (W = 2α·(b − ½), then + base) if gemlite is installed."""
    global GEMLITE_NOTE
    try:
        from gemlite.core import DType, GemLiteLinearTriton
    except Exception as e:  # optional peer: not a dependency of deltafleet
        GEMLITE_NOTE = f"gemlite not importable ({type(e).__name__}: {e}); pip install gemlite to compare"
        return None
    try:
        n, k = w.shape
        layers = {}
        for s, t in enumerate(groups.slots):
            if t < 0:
                continue
            layer = GemLiteLinearTriton(W_nbits=1, group_size=k, in_features=k, out_features=n,
                                        input_dtype=DType.FP16, output_dtype=DType.FP16)
            bits = unpack_bits(signs[t]).to(torch.uint8)  # [N, K] in {0, 1}
            scale = (2 * scales[t].float()).expand(n, 1).to(torch.float16).contiguous()
            zero = torch.full((n, 1), 0.5, dtype=torch.float16, device=w.device)
            layer.pack(bits, scale, zero, bias=None)
            layers[t] = (layer, groups.rows_of(s).long())
        xh = x.to(torch.float16)

        def run():
            y = F.linear(x, w)
            for layer, r in layers.values():
                y.index_add_(0, r, layer(xh.index_select(0, r)).to(y.dtype))
            return y

        run()
        GEMLITE_NOTE = "gemlite A16W1: one GEMV launch per tenant, plus the base GEMM and an index_add"
        return run
    except Exception as e:
        GEMLITE_NOTE = f"gemlite failed ({type(e).__name__}: {e})"
        return None


def lut_crossover(n=2048, k=2048):
    """ms per tenant segment of m rows: byte LUT vs unpack+GEMM (sets cpu.LUT_MAX_ROWS)."""
    packed = pack_signs(torch.randn(n, k))
    rows = []
    for m in (1, 2, 4, 8, 16):
        x = torch.randn(m, k)
        lut = time_cpu(lambda: cpu_path.signed_dot_lut(x, packed))
        unpack = time_cpu(lambda: x @ cpu_path.unpack_signs_fast(packed).t())
        rows.append({"rows": m, "lut_ms": round(lut, 3), "unpack_ms": round(unpack, 3), "faster": "lut" if lut < unpack else "unpack"})
    return rows


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_native.cpu_description()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, fewer tenant counts")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dtypes, timer = (torch.float16, torch.bfloat16), time_gpu
        shapes, tenants, per_tenant = GPU_SHAPES, GPU_TENANTS, GPU_ROWS_PER_TENANT
        methods = ["base", "ours", "ours-graph", "dequant", "bmm-fp16", "gemlite"]
    else:
        dtypes, timer = (torch.float32,), time_cpu
        shapes, tenants, per_tenant = CPU_SHAPES, CPU_TENANTS, (1, 16)
        methods = ["base", "ours", "ours-cached", "dequant", "bmm-fp32"]
    if args.quick:
        shapes, tenants = shapes[:1], tenants[:2]
    load = os.getloadavg()[0]
    bandwidth = copy_bandwidth_gbs(device)
    results = []
    report = {
        "device": device_name(device),
        "driver": _driver(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "triton": _triton_version(), "torch_threads": torch.get_num_threads()},
        "settings": {"dtype": ", ".join(str(d).removeprefix("torch.") for d in dtypes), "shapes": shapes, "tenants": tenants,
                     "rows_per_tenant": per_tenant, "methods": methods,
                     "timing": "triton do_bench median" if device == "cuda" else "best of 5 (perf_counter)",
                     "load_average_at_start": load, "order": "the target cases (16 x 1, 1 x 1) first, then the sweep",
                     "scales": "per matrix", "grouping": "precomputed once (as serving does per step)"},
        "copy_bandwidth_GBs": round(bandwidth, 1),
        "notes": [],
        "complete": False,
        "results": results,
    }
    path = Path(args.out or Path(__file__).parent / "results" / f"kernels-{'cpu' if device == 'cpu' else slug(device_name(device))}.json")
    for n, k, t, r, dt in cases(device, shapes, tenants, per_tenant, dtypes):
        results += bench_case(device, n, k, t, r, dt, methods, bandwidth, timer)
        print(f"done {n}x{k} {dt} T={t} rows/tenant={r}", file=sys.stderr, flush=True)
        report["notes"] = [note for note in (GEMLITE_NOTE,) if note]
        write(report, path)  # after every case: a run killed at its step limit keeps what it measured
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cpu":
        report["cpu_lut_crossover"] = lut_crossover()
        report["cpu_lut_max_rows"] = cpu_path.LUT_MAX_ROWS
    report["complete"] = True
    write(report, path)
    print_table(report)
    print(f"\nwrote {path}")
    return 0


TARGETS = [(16, 1), (1, 1)]  # (tenants, rows per tenant): 16 distinct tenants at batch 16, one tenant at batch 1


def cases(device, shapes, tenants, per_tenant, dtypes) -> list[tuple]:
    """(N, K, tenants, rows per tenant, dtype) in the order run: every shape and dtype at the two
    target cases first (what the GPU visit must not lose), then the sweep at the first dtype."""
    first = [(n, k, t, r, dt) for t, r in TARGETS if t in tenants and r in per_tenant for n, k in shapes for dt in dtypes]
    rest = [(n, k, t, r, dtypes[0]) for n, k in shapes for t in tenants for r in per_tenant
            if (t, r) not in TARGETS and not (device == "cuda" and t * r > GPU_MAX_ROWS)]
    return first + rest


def write(report: dict, path: Path) -> None:
    """The JSON at `path` and in $OUT (the GPU machine's collection folder), replaced whole."""
    text = json.dumps(report, indent=1) + "\n"
    for folder in [path.parent] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (path.name + ".partial")
        tmp.write_text(text)
        os.replace(tmp, folder / path.name)


def _driver():
    if not torch.cuda.is_available():
        return None
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return {"driver": out.splitlines()[0] if out else None, "cuda_runtime": torch.version.cuda}
    except (OSError, subprocess.SubprocessError):
        return {"driver": None, "cuda_runtime": torch.version.cuda}


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def print_table(report) -> None:
    print(f"\n{report['device']}, copy bandwidth {report['copy_bandwidth_GBs']} GB/s, {report['settings']['dtype']}, "
          f"{report['versions']['torch_threads']} threads, load average {report['settings']['load_average_at_start']:.1f}\n")
    for note in report.get("notes", []):
        print(f"note: {note}")
    cols = ["shape", "dtype", "tenants", "rows_per_tenant", "method", "ms", "GB/s", "frac_copy_bw", "TFLOP/s", "x_base"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in report["results"]:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    if "cpu_lut_crossover" in report:
        print(f"\nCPU byte-LUT vs unpack+GEMM, one tenant, 2048x2048 (LUT used up to {report['cpu_lut_max_rows']} rows):\n")
        print("| rows | lut ms | unpack ms | faster |\n|---|---|---|---|")
        for r in report["cpu_lut_crossover"]:
            print(f"| {r['rows']} | {r['lut_ms']} | {r['unpack_ms']} | {r['faster']} |")


if __name__ == "__main__":
    sys.exit(main())
