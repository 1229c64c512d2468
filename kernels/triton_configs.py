"""Autotune configs shared by the Triton delta kernels, keyed on decode vs prefill shapes.

Decode (1-16 rows per tenant) is a memory-bound GEMV: BLOCK_M stays at tl.dot's minimum of
16 and small BLOCK_N keeps enough programs in flight when only one tenant is active
(N=4096 / 32 = 128 tiles for 132 SMs). Prefill (up to hundreds of rows per tenant) is a
GEMM: larger BLOCK_M/BLOCK_N for reuse. `prune` drops configs whose BLOCK_M does not fit
the longest segment, so a decode launch never benchmarks 128-row tiles.

Under TRITON_INTERPRET=1 (CPU tests) there is one small config: the autotuner then skips
benchmarking (which needs CUDA events), and small tiles make the K loop run several times.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def delta_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    configs = []
    for bn in (16, 32, 64, 128):  # decode
        for bk in (128, 256, 512):
            for stages in (2, 3, 4):
                configs.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=stages))
    for bm, bn, bk, warps in ((32, 64, 128, 4), (64, 64, 64, 4), (64, 128, 64, 4), (128, 64, 64, 4), (128, 128, 64, 8), (64, 128, 128, 8)):
        for stages in (3, 4):  # prefill
            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return configs


def rows_bucket(max_rows: int) -> int:
    """Autotune key for the row count: powers of two up to 128, so decode and prefill tune apart."""
    return min(1 << (max(max_rows, 1) - 1).bit_length(), 128)


def prune(configs, named_args, **kwargs):
    bucket = named_args["ROWS_BUCKET"] if "ROWS_BUCKET" in named_args else kwargs["ROWS_BUCKET"]
    want_small = bucket <= 16
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == want_small and c.kwargs["BLOCK_M"] <= max(bucket, 16)]
    return kept or configs


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division for launch grids (plain ints: the interpreter patches triton.cdiv)."""
    return -(-a // b)
