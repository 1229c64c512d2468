"""Prefill delta kernel: y[m] += α_t · (x[m] · sign(Δ_t)ᵀ) for many rows per tenant, added onto a base GEMM.

For batches above the decode kernel's row range the base part is one cuBLAS GEMM for the
whole batch (W read once, tensor cores) and this kernel adds every tenant's delta in one
launch, on tensor cores too: program (i, j) takes row tile i of the device-built tile map
(segments.py: slot, rows order[lo:hi], at most BLOCK_M of them) and output columns tile j,
and per K step

* loads the tile's sign words once as a [BLOCK_N, BLOCK_K/32] int32 tile (contiguous
  runs of BLOCK_K/8 bytes per output row, not one load per bit),
* expands them in registers into ±1.0 by sign insertion — the negated bit shifted into
  the sign bit of 1.0 (one shift, one AND/OR per bit), no int→float conversion,
* feeds tl.dot with the gathered x rows (rows of one slot share the tile: Punica SGMV).

Graph-safe: the grid is (CAP, N / BLOCK_N) with CAP from segments.tile_cap (host ints);
tiles past the batch's real tile count read slot BASE_SLOT (-1) and exit at once.
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_delta_kernel(
    y_ptr, x_ptr, sign_ptr, scale_ptr, order_ptr, tile_slot_ptr, tile_lo_ptr, tile_hi_ptr,
    N, K,
    stride_ym, stride_yn, stride_xm, stride_xk,
    stride_st, stride_sn, stride_sw, stride_at, stride_an,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)  # row tiles vary fastest: neighbouring programs share x tiles
    pid_n = tl.program_id(1)
    slot = tl.load(tile_slot_ptr + pid_t)
    if slot < 0:  # BASE_SLOT: base-only rows, or a tile past the end of this batch's map
        return
    lo = tl.load(tile_lo_ptr + pid_t)
    hi = tl.load(tile_hi_ptr + pid_t)

    WORDS: tl.constexpr = BLOCK_K // 32
    offs_r = lo + tl.arange(0, BLOCK_M)
    m_mask = offs_r < hi
    rows = tl.load(order_ptr + offs_r, mask=m_mask, other=0).to(tl.int64)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    bit = tl.arange(0, 32)
    insert = 31 - bit  # [32] left shift that moves bit j into the sign bit
    SIGN: tl.constexpr = -2147483648  # 0x80000000 as int32
    ONE: tl.constexpr = 0x3F800000  # 1.0f

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    s_ptrs = (sign_ptr + slot.to(tl.int64) * stride_st + offs_n[:, None].to(tl.int64) * stride_sn
              + offs_w[None, :] * stride_sw)  # [BLOCK_N, WORDS]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        w_mask = offs_w < (K - k0) // 32  # K is a multiple of 32: tails are whole words
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        words = tl.load(s_ptrs, mask=n_mask[:, None] & w_mask[None, :], other=0)  # [BLOCK_N, WORDS]
        flip = ((~words)[:, :, None] << insert[None, None, :]) & SIGN  # [BLOCK_N, WORDS, 32]
        signs = (flip | ONE).to(tl.float32, bitcast=True)  # ±1.0
        signs = tl.reshape(signs, (BLOCK_N, BLOCK_K)).to(xt.dtype)  # column 32·w + j
        acc = tl.dot(xt, tl.trans(signs), acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        s_ptrs += WORDS * stride_sw

    if SCALE_PER_ROW:
        alpha = tl.load(scale_ptr + slot * stride_at + offs_n * stride_an, mask=n_mask, other=0.0)[None, :]
    else:
        alpha = tl.load(scale_ptr + slot * stride_at)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + alpha * acc).to(y_ptr.dtype.element_ty), mask=mask)


def prefill_delta_accumulate(y, x, signs, scales, meta, config) -> torch.Tensor:
    """Add α_t·(x[m]·sign(Δ_t)ᵀ) into y [M, N] (in place; returns y). `meta`: the segments.Segments
    of this batch, built with BLOCK_M = config.block_m; `config`: launch_table.PrefillConfig.
    The caller checked the arguments."""
    n, k = signs.shape[1], x.shape[1]
    scales32 = scales if scales.dtype == torch.float32 else scales.float()
    per_row = scales32.dim() == 2
    grid = (meta.cap, triton.cdiv(n, config.block_n))
    _prefill_delta_kernel[grid](
        y, x, signs, scales32, meta.order, meta.tile_slot, meta.tile_lo, meta.tile_hi,
        n, k,
        y.stride(0), y.stride(1), x.stride(0), x.stride(1),
        signs.stride(0), signs.stride(1), signs.stride(2),
        scales32.stride(0), scales32.stride(1) if per_row else 0,
        SCALE_PER_ROW=per_row, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
