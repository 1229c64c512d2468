"""CPU delta term x·sign(Δ)ᵀ: every formulation tried for kernels/cpu.py, same run, same shapes.

One tenant (rows 1 and 16) and a whole layer (16 tenants × 1 row: decode across a fleet), at
the serving benchmark's cpu-small shapes and at 7B-like 4096×4096, fp32 activations:

  native        cpu_native.py: the packed bits read in place, masked adds (what cpu.py runs)
  fp32-cached   ±1 signs unpacked once and kept (the old SignCache path): 4 bytes per weight
  lut-gather    byte LUT [K/8, 256] per row + gather with the packed bytes (cpu.py's fallback)
  lut-ebag      the LUT through embedding_bag(mode="sum") over int32 indices g·256 + byte
  int8pack      int8 ±1 signs through torch._weight_int8pack_mm (scales fused)
  int8-planes   x split exactly into 4 int8 planes, torch._int_mm with int8 signs, recombined
  grouped-fp32  (layer only) every tenant in one F.grouped_mm over cached fp32 signs

Each row also states the bytes a tenant costs beyond its packed signs (N·K/8). Prints a table,
writes bench/results/cpu-delta-<device>.json. About a minute on 2 cores.

    python bench/cpu_delta.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deltafleet.kernels import group_rows, pack_signs, unpack_signs
from deltafleet.kernels import cpu_native
from deltafleet.kernels.cpu import _BITS, sign_bytes, signed_dot_lut

SHAPES = [(256, 256), (704, 256), (256, 704), (4096, 4096)]


def best_ms(fn, reps: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


def int8_planes(x: torch.Tensor, planes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> q [M * planes, K] int8 and scale [M], x = scale·Σ_i q_i·2^(-7i) to ~2^-27 of max|x|."""
    e = torch.frexp(x.abs().amax(1)).exponent
    scale = torch.ldexp(torch.ones_like(x[:, 0]), e - 7)
    u, qs = x / scale[:, None], []
    for _ in range(planes):
        q = u.trunc()
        qs.append(q)
        u = (u - q) * 128
    return torch.stack(qs, 1).to(torch.int8).flatten(0, 1), scale


def one_tenant(n: int, k: int, rows: int, lib) -> dict:
    g = torch.Generator().manual_seed(n + k + rows)
    packed = pack_signs(torch.randn(n, k, generator=g))
    x = torch.randn(rows, k, generator=g)
    dense = unpack_signs(packed)
    s8 = dense.to(torch.int8)
    idx = (sign_bytes(packed).long() + torch.arange(k // 8) * 256).to(torch.int32)
    ones = torch.ones(n)
    groups = group_rows(torch.zeros(rows, dtype=torch.long), 1)
    y = torch.zeros(rows, n)
    plane_w = 2.0 ** (-7 * torch.arange(4.0))

    def ebag():
        tab = (x.view(rows, k // 8, 8) @ _BITS.t()).permute(1, 2, 0).reshape(-1, rows)
        return 2 * F.embedding_bag(idx, tab, mode="sum").t() - x.sum(1, keepdim=True)

    def planes():
        q, sc = int8_planes(x)
        return (torch._int_mm(q, s8.t()).view(rows, 4, n).float() * plane_w[:, None]).sum(1) * sc[:, None]

    methods = {
        "fp32-cached": (lambda: x @ dense.t(), 4 * n * k),
        "lut-gather": (lambda: signed_dot_lut(x, packed), 0),
        "lut-ebag": (ebag, 4 * n * k // 8),
        "int8pack": (lambda: torch._weight_int8pack_mm(x, s8, ones), n * k),
        "int8-planes": (planes, n * k),
    }
    if lib is not None:
        methods["native"] = (lambda: cpu_native.delta_accumulate(lib, y, x, packed[None], torch.ones(1), groups), 0)
    exact = (x.double() @ dense.double().t())
    out = {}
    for name, (fn, extra) in methods.items():
        if n * k >= 1 << 24 and rows > 1 and name in ("lut-gather", "lut-ebag", "int8pack"):
            continue  # minutes at 4096² × 16 rows; their 1-row figures already lose
        if name == "native":
            y.zero_()
            fn()
            err = (y.double() - exact).abs().max().item()
        else:
            err = (fn().double() - exact).abs().max().item()
        out[name] = {"ms": best_ms(fn), "extra_bytes_per_tenant": extra, "max_abs_err": err}
    return out


def layer(n: int, k: int, tenants: int, lib) -> dict:
    """16 tenants × 1 row through the whole delta_linear CPU path, base GEMM included."""
    from deltafleet.kernels import SignCache, delta_linear
    from deltafleet.kernels import cpu as cpu_mod

    g = torch.Generator().manual_seed(n * k)
    x, w = torch.randn(tenants, k, generator=g), torch.randn(n, k, generator=g)
    signs = torch.stack([pack_signs(torch.randn(n, k, generator=g)) for _ in range(tenants)])
    scales = torch.rand(tenants, generator=g) * 0.01
    rows = torch.arange(tenants)
    groups = group_rows(rows, tenants)
    dense = unpack_signs(signs)
    order, offs = groups.order.long(), torch.tensor(groups.starts[1:], dtype=torch.int32)

    def grouped():
        y = F.linear(x, w)
        d = F.grouped_mm(x.index_select(0, order), dense.transpose(1, 2), offs=offs)
        return y.index_add_(0, order, d * scales.index_select(0, rows.index_select(0, order))[:, None])

    out = {"base": best_ms(lambda: F.linear(x, w))}
    load = cpu_mod.cpu_native.load
    try:
        cpu_mod.cpu_native.load = lambda: None
        cache = SignCache(1 << 40)
        out["torch-loop-fp32-cached"] = best_ms(lambda: delta_linear(x, w, signs, scales, rows, groups=groups, sign_cache=cache))
        out["torch-loop-lut"] = best_ms(lambda: delta_linear(x, w, signs, scales, rows, groups=groups))
    finally:
        cpu_mod.cpu_native.load = load
    out["grouped-fp32"] = best_ms(grouped)
    if lib is not None:
        out["native"] = best_ms(lambda: delta_linear(x, w, signs, scales, rows, groups=groups))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu-delta-cpu.json"))
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    lib = cpu_native.load()
    result = {"benchmark": "cpu-delta", "device": cpu_native.cpu_description(), "threads": opts.threads,
              "load_average": os.getloadavg(), "native_kernel": lib is not None,
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "one_tenant": [], "layer_16_tenants_1_row": []}
    print("| N×K | rows | " + " | ".join(["native", "fp32-cached", "lut-gather", "lut-ebag", "int8pack", "int8-planes"]) + " | (ms) |")
    for n, k in SHAPES:
        for rows in (1, 16):
            r = one_tenant(n, k, rows, lib)
            result["one_tenant"].append({"n": n, "k": k, "rows": rows, "packed_bytes_per_tenant": n * k // 8, **r})
            cells = [f"{r[m]['ms']:.3f}" if m in r else "-" for m in ("native", "fp32-cached", "lut-gather", "lut-ebag", "int8pack", "int8-planes")]
            print(f"| {n}×{k} | {rows} | " + " | ".join(cells) + " |", flush=True)
    print("\n| layer N×K, 16 tenants × 1 row | " + " | ".join(["base", "torch-loop-fp32-cached", "torch-loop-lut", "grouped-fp32", "native"]) + " |")
    for n, k in SHAPES:
        r = layer(n, k, 16 if n * k < 1 << 24 else 4, lib)
        result["layer_16_tenants_1_row"].append({"n": n, "k": k, "tenants": 16 if n * k < 1 << 24 else 4, **r})
        print(f"| {n}×{k} ({16 if n * k < 1 << 24 else 4} tenants) | " + " | ".join(f"{r.get(m, float('nan')):.3f}" for m in
              ("base", "torch-loop-fp32-cached", "torch-loop-lut", "grouped-fp32", "native")) + " |", flush=True)
    result["load_average_after"] = os.getloadavg()
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
