"""Grouped GEMM for whole matrices: y[r] = x[r]·W_gᵀ for each row r of group g, offsets read on the device.

The rows come sorted by group; offs[g] is the end of group g's rows (cumulative), so group g
owns rows [offs[g - 1], offs[g]) and group 0 starts at row 0 — the semantics of
torch.nn.functional.grouped_mm with a 2-D x and a 3-D weight. Rows past offs[-1] belong to no
group and are left unwritten (grouped_mm leaves them undefined too).

Why not F.grouped_mm on CUDA: torch's sync-free grouped GEMM (CUTLASS) takes only bf16 on
sm90/sm100; every other dtype or GPU goes to `_grouped_mm_fallback`, which copies offs to the
host (`offs.cpu()`, a device sync) and loops over the groups. A sync cannot be captured in a
CUDA graph, so a decode step with a tenant's whole lm_head would run eagerly.

* **Grid fixed by shapes.** Program (j, i) owns output columns tile j of the i-th group that
  has rows: the grid is (cdiv(N, BLOCK_N), min(E, M)) whatever the rows' mix (M rows fill at
  most M groups; on a GPU a slot stack holds all n_slots entries, mostly idle in a decode step). Each
  program finds its group from offs on the device (a cumsum over the E groups' sizes); one
  left without a group exits without reading W. So a CUDA graph captured with one mix
  replays with any other.
* **W once per group, on tensor cores.** The program walks its group's rows in tiles of
  BLOCK_M (decode groups are small: usually one tile) and adds x·Wᵀ with tl.dot, fp32
  accumulation, output rounded once to its dtype. Row tiles are padded with the group's last
  row (clamped loads: no masks on x rows) and masked at the store.
* **Interpreter.** Its tl.dot is broken for bf16 (as in triton_decode), so there the tiles go
  in as fp32 (exact products); fp32 inputs on a GPU use IEEE fp32 products (no TF32).
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import os

import torch
import triton
import triton.language as tl

# Read when this module is imported, as triton.jit reads it (tests/kernels/conftest.py sets it before).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _busy_group(offs_ptr, E, i, BLOCK_E: tl.constexpr):
    """The i-th non-empty group g and its rows [start, end), read from offs on the device;
    no such group: start = end = 0 (the program has nothing to do)."""
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    ends = tl.load(offs_ptr + offs_e, mask=e_ok, other=0)  # [BLOCK_E]
    starts = tl.load(offs_ptr + offs_e - 1, mask=e_ok & (offs_e > 0), other=0)  # [BLOCK_E]: group 0 starts at row 0
    busy = e_ok & (ends > starts)
    pick = busy & (tl.cumsum(busy.to(tl.int32), axis=0) == i + 1)  # [BLOCK_E]: at most one set
    g = tl.sum(tl.where(pick, offs_e, 0), axis=0)
    return g, tl.sum(tl.where(pick, starts, 0), axis=0), tl.sum(tl.where(pick, ends, 0), axis=0)


@triton.jit
def _grouped_kernel(
    y_ptr, x_ptr, w_ptr, offs_ptr,
    N, K, E,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g, start, end = _busy_group(offs_ptr, E, tl.program_id(1), BLOCK_E)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped: W loads need no column mask
    w_cols = w_ptr + g.to(tl.int64) * stride_we + cols[None, :] * stride_wn  # [1, BLOCK_N]: Wᵀ's columns
    for m0 in range(start, end, BLOCK_M):  # a program left without a group runs no iteration: W is not read
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = tl.minimum(offs_m, end - 1).to(tl.int64)  # [BLOCK_M]: the tile's padding repeats the last row
        x_rows = x_ptr + rows[:, None] * stride_xm  # [BLOCK_M, 1]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_FP32:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < end)[:, None] & n_ok[None, :])


def _launch(grid, *args, **meta) -> None:
    """The kernel launch alone (tests run it outside their dispatch modes, as one device op)."""
    _grouped_kernel[grid](*args, **meta)


def rows_per_tile(m: int) -> int:
    """BLOCK_M from the row count alone (16 = the mma M; decode groups rarely exceed one tile)."""
    return min(max(16, triton.next_power_of_2(m)), 64)


def grouped_mm_triton(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype | None = None,
                      block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """x [M, K] (rows sorted by group), weight [E, N, K], offs [E] int32 (cumulative end of each
    group's rows) -> y [M, N] in out_dtype (x's by default), y[r] = x[r]·weight[g]ᵀ.

    Reads nothing on the host: the launch depends only on the shapes."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_mm_triton: need x [M, K] and weight [E, N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if offs.shape != (weight.shape[0],) or offs.dtype != torch.int32:
        raise ValueError(f"grouped_mm_triton: offs must be int32 [E={weight.shape[0]}], got {offs.dtype} {tuple(offs.shape)}")
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise TypeError(f"grouped_mm_triton: x and weight must share one of fp16/bf16/fp32, got {x.dtype} and {weight.dtype}")
    if not (x.device == weight.device == offs.device):
        raise ValueError(f"grouped_mm_triton: x, weight, offs on {x.device}, {weight.device}, {offs.device}")
    m, k = x.shape
    e, n, _ = weight.shape
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)  # [M, N]
    if m == 0 or e == 0 or n == 0:
        return y
    grid = (triton.cdiv(n, block_n), min(e, m))  # at most M groups have rows
    fp32 = x.dtype == torch.float32
    _launch(grid, y, x, weight, offs, n, k, e,
            y.stride(0), y.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
            BLOCK_M=rows_per_tile(m), BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=max(16, triton.next_power_of_2(e)),
            DOT_FP32=INTERPRETED and not fp32, IEEE=fp32 and not INTERPRETED,
            num_warps=4, num_stages=1 if INTERPRETED else 3)
    return y
