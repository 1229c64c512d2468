"""Decode kernel: y[m] = x[m]·(W_base + α_t·sign(Δ_t))ᵀ for a few rows, base and delta in one launch.

Decode is memory-bound, so the kernel is shaped by the bytes it moves:

* **W once for the batch.** Program (r, j, s) owns row block r (ROWS rows), output columns
  tile j and K split s. With the batch's rows in one block (ROWS ≥ M, the usual decode
  case) every W tile is read by exactly one program; with several row blocks the blocks of
  one W tile are launched next to each other (row blocks vary fastest) and share it in L2.
* **Each row's signs once, as whole words.** Rows are indexed by their own slot, read on
  the device: the metadata is the caller's `slot_of_row` tensor as is (nothing to build,
  nothing to sync, any mix replays in a CUDA graph). A thread owns whole 8-column chunks:
  one 16-byte load of fp16/bf16 x or W, one byte of an int32 sign word (the 4 chunks of a
  word sit in 4 neighbouring lanes: one transaction).
* **Bits expanded in registers by sign insertion.** The tenant's weight is never stored:
  per element W + α·s with s = ±1 is W + (α with its sign bit XORed by the negated sign
  bit). A shift by a compile-time amount moves the bit into bit 31, the AND+XOR is one
  LOP3, then one FADD and the FMA with x: ~4 instructions per element per row, no
  int→float conversion, no rowsum correction, and no padding of one row to a 16-row
  tl.dot (elementwise multiply + tl.sum).
* **Split-K** when N / BLOCK_N alone cannot fill the GPU (launch_table.split_k_for): the K
  range is cut in SPLIT_K parts whose fp32 partials are added atomically into a zeroed
  fp32 output.
* **Absent deltas skipped.** Rows with slot -1 (the base) or a zero per-matrix scale load
  no sign words (masked off); a program none of whose rows has a delta runs the base-only
  loop, so an all-base batch costs what the base GEMV costs.

The register tile is [8, ROWS, BLOCK_N, CHUNKS]: each x and W chunk is loaded and converted
once per program and reused across the block's columns and rows. Its axis order is what
makes Triton's default layout right: chunks on the lanes (last axis), warps on the row and
column axes, the 8 columns of a chunk (the in-thread sum) first. Other orders put warps or
lanes on the summed axis, and every K step then pays shuffles and shared-memory barriers.
Sums are fp32: per 8-column chunk in registers, across chunks once after the K loop.
Bit layout: packing.py (bit j of word w of row n is column 32·w + j), unchanged.
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import torch
import triton
import triton.language as tl

SIGN = tl.constexpr(-2147483648)  # 0x80000000 as int32


@triton.jit
def _k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's K range: whole BLOCK_K tiles, the last split takes the tail."""
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    return k_lo, tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)


@triton.jit
def _decode_loop(
    acc, x_rows, w_cols, s_tile, alpha_bits, s_ok, k_lo, k_hi, stride_xk, stride_wk, stride_sw,
    DELTA: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc [ROWS, BLOCK_N, CHUNKS] += x[r]·(W + α_r·sign(Δ_r)) over K in [k_lo, k_hi), per 8-column chunk."""
    CHUNKS: tl.constexpr = BLOCK_K // 8
    offs_c = tl.arange(0, CHUNKS)  # [CHUNKS]
    offs_i = tl.arange(0, 8)  # [8]
    offs_k = offs_i[:, None] + offs_c[None, :] * 8  # [8, CHUNKS]: column 8·c + i = bit 8·(c % 4) + i of word c // 4
    byte_up = 24 - 8 * (offs_c % 4)  # [CHUNKS] left shift that puts the chunk's byte on top of its word
    bit_up = 7 - offs_i  # [8] then moves bit i of that byte into the sign bit
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c_ok = (k0 // 8 + offs_c) < k_hi // 8  # [CHUNKS]
        if EVEN_K:
            xt = tl.load(x_rows + (k0 + offs_k)[:, None, :] * stride_xk)
            wt = tl.load(w_cols + (k0 + offs_k)[:, None, :] * stride_wk)
        else:  # K is a multiple of 32: a tail is whole chunks, and a per-chunk mask keeps 16-byte loads
            k_ok = ((offs_i[:, None] < 8) & c_ok[None, :])[:, None, :]  # [8, 1, CHUNKS]
            xt = tl.load(x_rows + (k0 + offs_k)[:, None, :] * stride_xk, mask=k_ok, other=0.0)
            wt = tl.load(w_cols + (k0 + offs_k)[:, None, :] * stride_wk, mask=k_ok, other=0.0)
        xt = xt.to(tl.float32)[:, :, None, :]  # [8, ROWS, 1, CHUNKS]: once per program
        wt = wt.to(tl.float32)[:, None, :, :]  # [8, 1, BLOCK_N, CHUNKS]: once per program
        if DELTA:
            words = tl.load(s_tile + ((k0 // 32) + offs_c // 4)[None, None, :] * stride_sw,
                            mask=s_ok[:, :, None] & c_ok[None, None, :], other=0)  # [ROWS, BLOCK_N, CHUNKS]
            # bit set means +1: the NEGATED bit, moved into bit 31, flips the sign of α
            flip = ((~words) << byte_up[None, None, :])[None, :, :, :] << bit_up[:, None, None, None]  # [8, ROWS, BLOCK_N, CHUNKS]
            wt = wt + (alpha_bits ^ (flip & SIGN)).to(tl.float32, bitcast=True)  # W + α_r·s per row, never stored
        acc += tl.sum(xt * wt, axis=0)  # [ROWS, BLOCK_N, CHUNKS]
    return acc


@triton.jit
def _decode_kernel(
    y_ptr, x_ptr, w_ptr, sign_ptr, scale_ptr, slot_ptr,
    M, N, K,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_st, stride_sn, stride_sw, stride_at, stride_an,
    SCALE_PER_ROW: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_r = tl.program_id(0)  # row blocks vary fastest: the blocks sharing a W tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_r = pid_r * ROWS + tl.arange(0, ROWS)  # [ROWS]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_ok = offs_r < M
    n_ok = offs_n < N
    rows = tl.minimum(offs_r, M - 1).to(tl.int64)  # clamped: x and W loads need no row/column masks
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    slot = tl.load(slot_ptr + offs_r, mask=m_ok, other=-1).to(tl.int64)  # [ROWS], -1 = the base
    slot_safe = tl.maximum(slot, 0)
    has = (slot >= 0)[:, None] & n_ok[None, :]  # [ROWS, BLOCK_N]
    if SCALE_PER_ROW:
        alpha = tl.load(scale_ptr + slot_safe[:, None] * stride_at + offs_n[None, :] * stride_an, mask=has, other=0.0)
    else:
        alpha = tl.load(scale_ptr + slot_safe[:, None] * stride_at + 0 * offs_n[None, :], mask=has, other=0.0)
    s_ok = has & (alpha != 0.0)  # [ROWS, BLOCK_N]: no delta, or a zero scale: no sign bytes read
    alpha_bits = alpha.to(tl.int32, bitcast=True)[None, :, :, None]  # [1, ROWS, BLOCK_N, 1]
    k_lo, k_hi = _k_range(pid_k, K, BLOCK_K, SPLIT_K)

    x_rows = x_ptr + rows[None, :, None] * stride_xm  # [1, ROWS, 1]
    w_cols = w_ptr + cols[None, :, None] * stride_wn  # [1, BLOCK_N, 1]
    s_tile = sign_ptr + slot_safe[:, None, None] * stride_st + cols[None, :, None] * stride_sn  # [ROWS, BLOCK_N, 1]
    acc = tl.zeros((ROWS, BLOCK_N, BLOCK_K // 8), dtype=tl.float32)  # per-chunk partial sums
    if tl.max(tl.max(s_ok.to(tl.int32), axis=1), axis=0) > 0:
        acc = _decode_loop(acc, x_rows, w_cols, s_tile, alpha_bits, s_ok, k_lo, k_hi, stride_xk, stride_wk,
                           stride_sw, DELTA=True, EVEN_K=EVEN_K, BLOCK_K=BLOCK_K)
    else:  # every row of the block is the base: the plain GEMV loop
        acc = _decode_loop(acc, x_rows, w_cols, s_tile, alpha_bits, s_ok, k_lo, k_hi, stride_xk, stride_wk,
                           stride_sw, DELTA=False, EVEN_K=EVEN_K, BLOCK_K=BLOCK_K)
    y = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    y_ptrs = y_ptr + offs_r[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:  # y is a zeroed fp32 buffer; the K splits add their partials
        tl.atomic_add(y_ptrs, y, mask=mask, sem="relaxed")


def decode_delta_linear(x, base_weight, signs, scales, slot_of_row, config, split_k: int = 1) -> torch.Tensor:
    """[M, K] x -> [M, N] in x's dtype through one decode launch (shapes: reference.py).

    `config`: a launch_table.DecodeConfig; the caller checked the arguments. The grid depends
    only on (M, N, K, config, split_k): a CUDA graph captured for one batch bucket replays
    with any slot mix, because the slots are read on the device."""
    m, k = x.shape
    n = base_weight.shape[0]
    rows = config.rows_per_program(m)
    grid = (triton.cdiv(m, rows), triton.cdiv(n, config.block_n), split_k)
    scales32 = scales if scales.dtype == torch.float32 else scales.float()
    per_row = scales32.dim() == 2
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    args = (
        y, x, base_weight, signs, scales32, slot_of_row,
        m, n, k,
        y.stride(0), y.stride(1), x.stride(0), x.stride(1), base_weight.stride(0), base_weight.stride(1),
        signs.stride(0), signs.stride(1), signs.stride(2),
        scales32.stride(0), scales32.stride(1) if per_row else 0,
    )
    meta = dict(SCALE_PER_ROW=per_row, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split_k,
                EVEN_K=k % config.block_k == 0, num_warps=config.num_warps, num_stages=config.num_stages)
    _decode_kernel[grid](*args, ROWS=rows, **meta)
    return y if split_k == 1 else y.to(x.dtype)
