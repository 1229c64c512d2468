"""Choose the launch table of this GPU model ahead of time (never on the serving path).

On a CUDA machine: for every decode batch bucket (1..16 rows, each row its own tenant — the
mix that moves the most sign bytes) times a small grid of decode tiles (rows per program,
columns, BLOCK_K, warps, stages, split-K or not) at the Llama-2-7B shapes and keeps the
fastest (summed over shapes); times the prefill delta kernel's tiles;
then sets decode_max_rows to the largest bucket where the decode kernel still beats the
prefill path (cuBLAS + delta kernel) summed over a distinct mix and a one-tenant batch. Writes kernels/tuned/<gpu-slug>.json, which
launch_table.table_for() loads for that GPU model (unknown GPUs use launch_table.DEFAULT).

    python bench/tune_kernels.py [--quick]          # a few minutes on an H100
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from deltafleet.kernels.launch_table import (BUCKETS, TUNED_DIR, DecodeConfig, LaunchTable, PrefillConfig, device_facts,
                                             slug, split_k_for)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def problem(m, n, k, dtype):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    signs = torch.randint(-(2**31), 2**31 - 1, (m, n, k // 32), dtype=torch.int32, device="cuda")
    scales = torch.full((m,), 0.01, device="cuda")
    return x, w, signs, scales, torch.arange(m, device="cuda")


def ms(fn) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # a tile that does not compile or fit: never chosen
        print(f"  skipped: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        return float("inf")


def decode_candidates(b: int, quick: bool):
    for rows in sorted({1, min(b, 4), b}):
        for bn in (8, 16, 32):  # the base part is a tl.dot over rows padded to 16: BN >= 8 whatever the rows
            for bk in ((256,) if quick else (128, 256, 512)):
                for warps in ((2, 4) if quick else (2, 4, 8)):
                    for stages in ((3,) if quick else (2, 3, 4)):
                        for split in (0, 1):  # 0: split_k_for's choice; 1: never split
                            yield DecodeConfig(rows=rows, block_n=bn, block_k=bk, num_warps=warps,
                                               num_stages=stages, split_k=split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    from deltafleet.kernels.segments import segment_meta
    from deltafleet.kernels.triton_decode import decode_delta_linear
    from deltafleet.kernels.triton_delta import prefill_delta_accumulate

    dtype = getattr(torch, args.dtype)
    gpu, sms = device_facts(torch.device("cuda", torch.cuda.current_device()))
    decode, decode_ms = {}, {}
    for b in (bb for bb in BUCKETS if bb <= 16):
        probs = [problem(b, n, k, dtype) for n, k in SHAPES]
        best = None
        for cfg in decode_candidates(b, args.quick):
            total = sum(ms(lambda: decode_delta_linear(x, w, s, a, r, cfg, split_k_for(cfg, b, w.shape[0], w.shape[1], sms)))
                        for x, w, s, a, r in probs)
            if best is None or total < best[0]:
                best = (total, cfg)
        decode[b], decode_ms[b] = best[1], best[0]
        print(f"decode bucket {b}: {best[1]} ({best[0]:.3f} ms over the shapes)", flush=True)
    prefill_best = None
    x, w, s, a, r = problem(64, 4096, 4096, dtype)
    for bm, bn, bk, warps in ((16, 64, 64, 4), (32, 64, 64, 4), (64, 64, 64, 4), (64, 128, 64, 4), (16, 128, 128, 4)):
        cfg = PrefillConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=warps)
        t = ms(lambda: prefill_delta_accumulate(F.linear(x, w), x, s, a, segment_meta(r, 64, bm), cfg))
        if prefill_best is None or t < prefill_best[0]:
            prefill_best = (t, cfg)
    print(f"prefill: {prefill_best[1]}", flush=True)
    # The decode kernel's cost grows with rows whatever the mix; the prefill path's with
    # distinct tenants only. Judge both on a distinct mix and on one tenant for all rows.
    max_rows = 1
    for b in (2, 4, 8, 16):
        x, w, s, a, r = problem(b, 4096, 4096, dtype)
        cfg, pre = decode[b], prefill_best[1]
        t_dec = t_pre = 0.0
        for slots in (r, torch.zeros_like(r)):
            t_dec += ms(lambda: decode_delta_linear(x, w, s, a, slots, cfg, split_k_for(cfg, b, 4096, 4096, sms)))
            t_pre += ms(lambda: prefill_delta_accumulate(F.linear(x, w), x, s, a, segment_meta(slots, b, pre.block_m), pre))
        if t_dec <= t_pre:
            max_rows = b
    table = LaunchTable(gpu=gpu, decode=decode, prefill=prefill_best[1], decode_max_rows=max_rows)
    TUNED_DIR.mkdir(parents=True, exist_ok=True)
    path = TUNED_DIR / f"{slug(gpu)}.json"
    path.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    print(f"wrote {path} (decode up to {max_rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
