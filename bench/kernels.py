"""Benchmark of the batched 1-bit delta linear against the baselines it replaces.

GPU (bf16, Llama-2-7B linear shapes, T tenants x {1 (decode), 128 (prefill)} rows each):
  ours        delta_linear as dispatched (fused for one tenant, else cuBLAS base + delta kernel)
  ours-delta  cuBLAS base GEMM + the delta-only Triton kernel
  ours-fused  the fused Triton kernel
  dequant     per tenant: W + α·unpack(signs) materialized, then matmul (torch only)
  bmm-fp16    cuBLAS bmm over T materialized fp16 weights ("one full model per tenant")
  base        the base GEMM alone (F.linear), the floor
with time, bytes moved / time (GB/s), that as a fraction of the device's copy bandwidth
measured in the same run, TFLOP/s (base + delta), and the ratio to the base GEMM.

CPU (fp32, small shapes, so it always runs, < 5 min on 2 cores): the CPU path cold and
with a sign cache against the same torch baselines, plus the byte-LUT/unpack crossover
that sets kernels/cpu.py's LUT_MAX_ROWS.

Writes bench/results/kernels-<device>.json and prints a markdown table.
Usage: python bench/kernels.py [--quick]
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

from deltafleet.kernels import SignCache, delta_linear, group_rows, pack_signs, unpack_signs
from deltafleet.kernels import cpu as cpu_path

GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in): qkvo, gate/up, down
GPU_TENANTS = [1, 4, 16, 64]
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

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs(device: str) -> float:
    """Device copy bandwidth (read + write bytes per second), measured now."""
    n = (1 << 30) if device == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = time_gpu if device == "cuda" else time_cpu
    ms = timer(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def make_problem(t: int, rows_per_tenant: int, n: int, k: int, dtype, device: str):
    gen = torch.Generator(device="cpu").manual_seed(0)
    m = t * rows_per_tenant
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    one = pack_signs(torch.randn(n, k, generator=gen))  # packing 64 random matrices is slow:
    signs = torch.stack([one.roll(i, 0) for i in range(t)]).to(device)  # distinct rolls instead
    scales = torch.full((t,), 0.01).to(device)
    rows = torch.arange(t, device=device).repeat_interleave(rows_per_tenant)
    return x, w, signs, scales, rows


def dequant_then_matmul(x, w, signs, scales, groups):
    y = F.linear(x, w)
    for s, t in enumerate(groups.tenants):
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
        "ours-delta": lambda: delta_linear(x, w, signs, scales, rows, groups=groups, fused=False),
        "ours-fused": lambda: delta_linear(x, w, signs, scales, rows, groups=groups, fused=True),
        "ours-cached": lambda: delta_linear(x, w, signs, scales, rows, groups=groups, sign_cache=cache),
        "dequant": lambda: dequant_then_matmul(x, w, signs, scales, groups),
        "bmm-fp16": lambda: torch.bmm(xt, wt.transpose(1, 2)),
        "bmm-fp32": lambda: torch.bmm(xt, wt.transpose(1, 2)),
    }
    cache = SignCache(1 << 40)
    el = x.element_size()
    ours_bytes = n * k * el + t * n * k // 8 + m * k * el + m * n * el + t * 4
    bytes_of = {"base": n * k * el + m * (k + n) * el, "bmm-fp16": t * n * k * 2 + m * (k + n) * 2, "bmm-fp32": t * n * k * 4 + m * (k + n) * 4}
    out = []
    base_ms = None
    for name in methods:
        ms = timer(calls[name])
        base_ms = ms if name == "base" else base_ms
        moved = bytes_of.get(name, ours_bytes)
        flops = 2 * m * n * k * (1 if name == "base" or name.startswith("bmm") else 2)
        out.append({
            "shape": f"{n}x{k}", "tenants": t, "rows_per_tenant": rows_per_tenant, "method": name,
            "ms": round(ms, 4), "GB/s": round(moved / (ms * 1e-3) / 1e9, 1),
            "frac_copy_bw": round(moved / (ms * 1e-3) / 1e9 / bandwidth, 3),
            "TFLOP/s": round(flops / (ms * 1e-3) / 1e12, 3),
            "x_base": round(ms / base_ms, 2) if base_ms else None,
        })
    return out


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
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()) + " CPU"


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
        dtype, timer = torch.bfloat16, time_gpu
        shapes, tenants, per_tenant = GPU_SHAPES, GPU_TENANTS, (1, 128)
        methods = ["base", "ours", "ours-delta", "ours-fused", "dequant", "bmm-fp16"]
    else:
        dtype, timer = torch.float32, time_cpu
        shapes, tenants, per_tenant = CPU_SHAPES, CPU_TENANTS, (1, 16)
        methods = ["base", "ours", "ours-cached", "dequant", "bmm-fp32"]
    if args.quick:
        shapes, tenants = shapes[:1], tenants[:2]
    load = os.getloadavg()[0]
    bandwidth = copy_bandwidth_gbs(device)
    results = []
    for n, k in shapes:
        for t in tenants:
            for r in per_tenant:
                results += bench_case(device, n, k, t, r, dtype, methods, bandwidth, timer)
                print(f"done {n}x{k} T={t} rows/tenant={r}", file=sys.stderr, flush=True)
    report = {
        "device": device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "triton": _triton_version(), "torch_threads": torch.get_num_threads()},
        "settings": {"dtype": str(dtype).removeprefix("torch."), "shapes": shapes, "tenants": tenants,
                     "rows_per_tenant": per_tenant, "methods": methods,
                     "timing": "triton do_bench median" if device == "cuda" else "best of 5 (perf_counter)",
                     "load_average_at_start": load,
                     "scales": "per matrix", "grouping": "precomputed once (as serving does per step)"},
        "copy_bandwidth_GBs": round(bandwidth, 1),
        "results": results,
    }
    if device == "cpu":
        report["cpu_lut_crossover"] = lut_crossover()
        report["cpu_lut_max_rows"] = cpu_path.LUT_MAX_ROWS
    path = Path(args.out or Path(__file__).parent / "results" / f"kernels-{'cpu' if device == 'cpu' else slug(device_name(device))}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\nwrote {path}")
    return 0


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def print_table(report) -> None:
    print(f"\n{report['device']}, copy bandwidth {report['copy_bandwidth_GBs']} GB/s, {report['settings']['dtype']}, "
          f"{report['versions']['torch_threads']} threads, load average {report['settings']['load_average_at_start']:.1f}\n")
    cols = ["shape", "tenants", "rows_per_tenant", "method", "ms", "GB/s", "frac_copy_bw", "TFLOP/s", "x_base"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in report["results"]:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if "cpu_lut_crossover" in report:
        print(f"\nCPU byte-LUT vs unpack+GEMM, one tenant, 2048x2048 (LUT used up to {report['cpu_lut_max_rows']} rows):\n")
        print("| rows | lut ms | unpack ms | faster |\n|---|---|---|---|")
        for r in report["cpu_lut_crossover"]:
            print(f"| {r['rows']} | {r['lut_ms']} | {r['unpack_ms']} | {r['faster']} |")


if __name__ == "__main__":
    sys.exit(main())
