"""Decode kernel: y[m] = x[m]·(W_base + α_t·sign(Δ_t))ᵀ for a few rows, base and delta in one launch.

y = x·W_baseᵀ + α_t·(x·S_tᵀ) with S = ±1, split by what each part costs:

* **Base on tensor cores, W once for the batch.** Program (r, j, s) owns row block r (ROWS
  rows), output columns tile j and K split s, and adds x·Wᵀ for its rows with tl.dot
  (fp32 accumulation; W and x are staged through shared memory by the software pipeliner,
  num_stages deep). ROWS < 16 are padded to the mma M of 16 with masked zero rows (no
  bytes read for them; W is read once either way). With the batch's rows in one block
  every W tile is read by exactly one program; with several row blocks the blocks of one
  W tile run next to each other (row blocks vary fastest) and share it in L2.
* **Delta on the CUDA cores, as signed sums of x.** S·x is Σ_k ±x_k: no W + α·s per
  element, no multiply; α is applied once per (row, column) after the K loop. For fp16 and
  bf16, columns c and c + 16 of a sign word (c < 16) travel as one int32 pair of 16-bit x
  values (built once per program and K step, shared by the block's columns), so their
  sign bits c and c + 16 reach the pair's two sign bits (15, 31) with one shift by a
  compile-time amount; one LOP3 flips them where the bit is clear (bit set = +1), and one
  packed add (HADD2 for fp16, HFMA2 by 1.0 for bf16: one rounding, as an add) accumulates
  two columns: ~3 instructions per two elements per row. The 16-bit partial sums go to
  fp32 once per sign word for fp16 (16 terms per half) and every 8 terms for bf16 (8
  significant bits); the sums over words and K are fp32. (A 16-bit partial can overflow
  only if 16 of x's entries in one word sum past 65504 in fp16.) fp32 x (the
  interpreter's tests; refused on CUDA) flips fp32 sign bits and sums in fp32.
* **Inline PTX only for the packed add**, behind the constexpr INTERPRETED: the Triton
  interpreter cannot run PTX, so there `_add_pairs` does the same per-half sums in fp32
  and rounds to nearest even in the 16-bit type (the same result: the fp32 sum of two
  16-bit values rounds to the same 16-bit value). Everything else (pairing, shifts, sign
  flips, the bit layout) is the same Triton code on both. The interpreter's tl.dot is
  broken for bf16 (garbage), so there the base tile goes in as fp32 (exact products).
* **Each row's signs once, as whole words, a K step ahead.** Rows are indexed by their
  own slot, read on the device: the metadata is the caller's `slot_of_row` tensor as is
  (nothing to build, nothing to sync, any mix replays in a CUDA graph). The delta tiles
  are [BLOCK_N, ROWS, W, ...] (W = BLOCK_K / 32 words): that axis order gives each thread
  whole words and the x of one row for several columns; the words' order along W is
  reversed only so their load is not vectorized across words, which would give it a
  layout of its own (and a shared-memory round trip per add). The pipeliner stages only
  tl.dot's operands, so the next K step's words are loaded before this step's sums.
* **Split-K** when N / BLOCK_N alone cannot fill the GPU (launch_table.split_k_for): the K
  range is cut in SPLIT_K parts whose fp32 partials are added atomically into a zeroed
  fp32 output.
* **Absent deltas skipped.** Rows with slot BASE_SLOT (-1: the base) or a zero per-matrix scale load
  no sign words (masked off); a program none of whose rows has a delta runs the base-only
  loop (tl.dot alone), so an all-base batch costs what a tensor-core GEMV costs.

Bit layout: packing.py (bit j of word w of row n is column 32·w + j), unchanged.
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import os

import torch
import triton
import triton.language as tl

SIGN = tl.constexpr(-2147483648)  # 0x80000000 as int32
PAIR_SIGNS = tl.constexpr(-2147450880)  # 0x80008000: the sign bits of both halves of a 16-bit pair
# Read when this module is imported, as triton.jit reads it (tests/kernels/conftest.py sets it before).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _k_range(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's K range: whole BLOCK_K tiles, the last split takes the tail."""
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    return k_lo, tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)


@triton.jit
def _half_lo(p, BF16: tl.constexpr):
    """The low 16-bit float of each int32 pair, as fp32 (exact)."""
    if BF16:
        return (p << 16).to(tl.float32, bitcast=True)
    return (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half_hi(p, BF16: tl.constexpr):
    """The high 16-bit float of each int32 pair, as fp32 (exact)."""
    if BF16:
        return (p & -65536).to(tl.float32, bitcast=True)
    return (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round_half(f, BF16: tl.constexpr):
    """fp32 -> the 16 bits of fp16/bf16, rounded to nearest even, in the low half of an int32."""
    if BF16:
        b = f.to(tl.int32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _add_pairs(a, b, BF16: tl.constexpr, ASM: tl.constexpr):
    """a + b per half of packed 16-bit pairs (int32), each half rounded to nearest even in its type.

    On the GPU one HADD2 (fp16) or HFMA2 with 1.0 (bf16, sm_80+: the same single rounding);
    the interpreter, which cannot run inline PTX, does the same sums in fp32 and rounds."""
    if ASM:
        if BF16:
            return tl.inline_asm_elementwise(
                "{.reg .b32 one; mov.b32 one, 1065369472; fma.rn.bf16x2 $0, $1, one, $2;}",  # one = 0x3F803F80
                "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    lo = _round_half(_half_lo(a, BF16) + _half_lo(b, BF16), BF16)
    hi = _round_half(_half_hi(a, BF16) + _half_hi(b, BF16), BF16)
    return (hi << 16) | lo


@triton.jit
def _flip(pair, u, SHIFT: tl.constexpr):
    """The pair with each half's sign flipped where its sign bit (moved by SHIFT to bits 15 and 31) is clear."""
    return pair ^ (~(u << SHIFT) & PAIR_SIGNS)


@triton.jit
def _pack_pairs(xl, xh):
    """16-bit xl[j], xh[j] -> one int32 pair each (xh in the high half)."""
    return (xh.to(tl.int16, bitcast=True).to(tl.int32) << 16) | (xl.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)


@triton.jit
def _split8(t):
    """[..., 8] -> its 8 slices along the last (in-thread) axis, j = 0..7."""
    shape: tl.constexpr = (t.shape[0], t.shape[1], t.shape[2])
    p0, p1 = tl.split(tl.reshape(t, shape + (4, 2)))  # j = 2·a + b
    p00, p10 = tl.split(tl.reshape(p0, shape + (2, 2)))  # j = 4·a + 2·b
    p01, p11 = tl.split(tl.reshape(p1, shape + (2, 2)))  # j = 4·a + 2·b + 1
    t0, t4 = tl.split(p00)
    t2, t6 = tl.split(p10)
    t1, t5 = tl.split(p01)
    t3, t7 = tl.split(p11)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _signed_sum8(s, u, xl, xh, LOW: tl.constexpr, FIRST: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """s + Σ_j ±(xl[j], xh[j]) over j < 8 (the in-thread last axis) in packed pairs: (xl[j], xh[j])'s signs are the
    bits LOW + j and LOW + j + 16 of the words u. FIRST: there is no s yet."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(_pack_pairs(xl, xh))
    if FIRST:
        s = _flip(x0, u, 15 - LOW)
    else:
        s = _add_pairs(s, _flip(x0, u, 15 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x1, u, 14 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x2, u, 13 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x3, u, 12 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x4, u, 11 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x5, u, 10 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x6, u, 9 - LOW), BF16, ASM)
    s = _add_pairs(s, _flip(x7, u, 8 - LOW), BF16, ASM)
    return s


@triton.jit
def _signed_sum8_flip_first(s, u, xl, xh, LOW: tl.constexpr, FIRST: tl.constexpr, BF16: tl.constexpr,
                            ASM: tl.constexpr):
    """_signed_sum8 with the 8 pairs flipped at once, in the [BLOCK_N, ROWS, W, 8] layout, before
    they are split: every split result then shares one layout and the running sum never changes
    layout. For 8 and 16 rows Triton 3.6 otherwise converts the sum through shared memory once
    per pair (807 instructions per K step at 16 rows vs 578; 3.9 compiles both forms to the
    same 578). For fewer rows the pair-by-pair form compiles better on both."""
    shifts = 15 - LOW - tl.arange(0, 8)  # [8]: bit LOW + j moved to 15 (and LOW + 16 + j to 31)
    flipped = _pack_pairs(xl, xh) ^ (~(u[:, :, :, None] << shifts[None, None, None, :]) & PAIR_SIGNS)  # [BLOCK_N, ROWS, W, 8]
    f0, f1, f2, f3, f4, f5, f6, f7 = _split8(flipped)
    if FIRST:
        s = f0
    else:
        s = _add_pairs(s, f0, BF16, ASM)
    s = _add_pairs(s, f1, BF16, ASM)
    s = _add_pairs(s, f2, BF16, ASM)
    s = _add_pairs(s, f3, BF16, ASM)
    s = _add_pairs(s, f4, BF16, ASM)
    s = _add_pairs(s, f5, BF16, ASM)
    s = _add_pairs(s, f6, BF16, ASM)
    s = _add_pairs(s, f7, BF16, ASM)
    return s


@triton.jit
def _signed_sum8_rows(s, u, xl, xh, LOW: tl.constexpr, FIRST: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr,
                      ROWS: tl.constexpr):
    """The packed signed sum in the form that compiles best for this many rows (see _signed_sum8_flip_first)."""
    if ROWS >= 8:
        return _signed_sum8_flip_first(s, u, xl, xh, LOW, FIRST, BF16, ASM)
    return _signed_sum8(s, u, xl, xh, LOW, FIRST, BF16, ASM)


@triton.jit
def _signed_sum8_fp32(u, xl, xh, LOW: tl.constexpr):
    """Σ_j ±xl[j] ± xh[j] in fp32 (the interpreter's fp32 tests): xl[j]'s sign is bit LOW + j of u, xh[j]'s
    bit LOW + 16 + j."""
    offs_j = tl.arange(0, 8)
    v = u[:, :, :, None] << (15 - LOW - offs_j)[None, None, None, :]  # [BLOCK_N, ROWS, W, 8]: the pair's bits at 15, 31
    lo = (xl.to(tl.int32, bitcast=True) ^ (~(v << 16) & SIGN)).to(tl.float32, bitcast=True)
    hi = (xh.to(tl.int32, bitcast=True) ^ (~v & SIGN)).to(tl.float32, bitcast=True)
    return tl.sum(lo + hi, axis=3)


@triton.jit
def _decode_loop(
    acc, dacc, x_dot, pad_ok, x_rows, w_tile, s_tile, s_ok, k_lo, k_hi, stride_xk, stride_wk, stride_sw,
    DELTA: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr, BF16: tl.constexpr,
    INTERPRETED: tl.constexpr, ROWS: tl.constexpr, MMA_M: tl.constexpr,
):
    """acc [MMA_M, BLOCK_N] += x·Wᵀ on tensor cores; dacc [BLOCK_N, ROWS, W] += x·sign(Δ)ᵀ per sign word."""
    offs_kk = tl.arange(0, BLOCK_K)
    W: tl.constexpr = BLOCK_K // 32
    offs_w = W - 1 - tl.arange(0, W)  # reversed: the words load is not vectorized along W, so its layout is x's
    k_of = (offs_w * 32)[:, None] + tl.arange(0, 8)[None, :]  # [W, 8]: columns 32·w + j
    if DELTA:  # sign words are loaded one K step ahead (the pipeliner only stages tl.dot's operands)
        words = tl.load(s_tile + ((k_lo // 32) + offs_w)[None, None, :] * stride_sw,
                        mask=s_ok[:, :, None] & ((k_lo + offs_w * 32) < k_hi)[None, None, :], other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            if MMA_M == ROWS:
                xa = tl.load(x_dot + (k0 + offs_kk)[None, :] * stride_xk)  # [MMA_M, BLOCK_K]
            else:  # padding rows are zeros (masked: no bytes moved)
                xa = tl.load(x_dot + (k0 + offs_kk)[None, :] * stride_xk, mask=pad_ok, other=0.0)
            wb = tl.load(w_tile + (k0 + offs_kk)[:, None] * stride_wk)  # [BLOCK_K, BLOCK_N]
        else:  # K is a multiple of 32: a tail is whole words
            kk_ok = (k0 + offs_kk) < k_hi
            xa = tl.load(x_dot + (k0 + offs_kk)[None, :] * stride_xk, mask=pad_ok & kk_ok[None, :], other=0.0)
            wb = tl.load(w_tile + (k0 + offs_kk)[:, None] * stride_wk, mask=kk_ok[:, None], other=0.0)
        if INTERPRETED:  # the interpreter's tl.dot of bf16 is broken; fp32 products of 16-bit inputs are exact
            acc = tl.dot(xa.to(tl.float32), wb.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xa, wb, acc, input_precision="ieee")
        if DELTA:
            w_ok = (k0 + offs_w * 32) < k_hi  # [W]
            k1 = k0 + BLOCK_K
            ahead = tl.load(s_tile + ((k1 // 32) + offs_w)[None, None, :] * stride_sw,
                            mask=s_ok[:, :, None] & ((k1 + offs_w * 32) < k_hi)[None, None, :], other=0)
            xp = x_rows + (k0 + k_of)[None, None, :, :] * stride_xk  # [1, ROWS, W, 8]: columns 32·w + j
            if EVEN_K:
                x00 = tl.load(xp)
                x08 = tl.load(xp + 8 * stride_xk)
                x16 = tl.load(xp + 16 * stride_xk)
                x24 = tl.load(xp + 24 * stride_xk)
            else:
                x_ok = w_ok[None, None, :, None]
                x00 = tl.load(xp, mask=x_ok, other=0.0)
                x08 = tl.load(xp + 8 * stride_xk, mask=x_ok, other=0.0)
                x16 = tl.load(xp + 16 * stride_xk, mask=x_ok, other=0.0)
                x24 = tl.load(xp + 24 * stride_xk, mask=x_ok, other=0.0)
            if PAIRED:  # fp16/bf16: columns (c, c + 16) in one int32 pair, whose sign bits c, c + 16 one shift moves
                s = _signed_sum8_rows(words, words, x00, x16, 0, True, BF16, not INTERPRETED, ROWS)
                if BF16:  # 8 significant bits: to fp32 every 8 pairs
                    dacc += _half_lo(s, BF16) + _half_hi(s, BF16)
                    s = _signed_sum8_rows(words, words, x08, x24, 8, True, BF16, not INTERPRETED, ROWS)
                else:  # fp16: to fp32 once per word (16 pairs)
                    s = _signed_sum8_rows(s, words, x08, x24, 8, False, BF16, not INTERPRETED, ROWS)
                dacc += _half_lo(s, BF16) + _half_hi(s, BF16)
            else:
                dacc += _signed_sum8_fp32(words, x00, x16, 0) + _signed_sum8_fp32(words, x08, x24, 8)
            words = ahead  # [BLOCK_N, ROWS, W]
    return acc, dacc


@triton.jit
def _decode_kernel(
    y_ptr, x_ptr, w_ptr, sign_ptr, scale_ptr, slot_ptr,
    M, N, K,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_st, stride_sn, stride_sw, stride_at, stride_an,
    SCALE_PER_ROW: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr,
):
    MMA_M: tl.constexpr = ROWS if ROWS >= 16 else 16  # tl.dot's M: fewer rows are padded (W is read once either way)
    PAIRED: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    pid_r = tl.program_id(0)  # row blocks vary fastest: the blocks sharing a W tile run together
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_r = pid_r * ROWS + tl.arange(0, ROWS)  # [ROWS]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_ok = offs_r < M
    n_ok = offs_n < N
    rows = tl.minimum(offs_r, M - 1).to(tl.int64)  # clamped: x and W loads need no row/column masks
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    slot = tl.load(slot_ptr + offs_r, mask=m_ok, other=-1).to(tl.int64)  # [ROWS]; -1 = BASE_SLOT (grouping.py): the base
    slot_safe = tl.maximum(slot, 0)
    has = (slot >= 0)[:, None] & n_ok[None, :]  # [ROWS, BLOCK_N]
    if SCALE_PER_ROW:
        alpha = tl.load(scale_ptr + slot_safe[:, None] * stride_at + offs_n[None, :] * stride_an, mask=has, other=0.0)
    else:
        alpha = tl.load(scale_ptr + slot_safe[:, None] * stride_at + 0 * offs_n[None, :], mask=has, other=0.0)
    s_ok = has & (alpha != 0.0)  # [ROWS, BLOCK_N]: no delta, or a zero scale: no sign bytes read
    s_ok_t = tl.trans(s_ok)  # [BLOCK_N, ROWS]
    k_lo, k_hi = _k_range(pid_k, K, BLOCK_K, SPLIT_K)

    offs_p = tl.arange(0, MMA_M)
    x_dot = x_ptr + tl.minimum(pid_r * ROWS + offs_p, M - 1).to(tl.int64)[:, None] * stride_xm  # [MMA_M, 1]
    pad_ok = (offs_p < ROWS)[:, None]  # [MMA_M, 1]: rows past ROWS pad the mma tile with zeros
    w_tile = w_ptr + cols[None, :] * stride_wn  # [1, BLOCK_N]
    # delta tiles are [BLOCK_N, ROWS, W, ...]: this axis order puts a thread's columns of one row in its registers
    x_rows = x_ptr + rows[None, :, None, None] * stride_xm  # [1, ROWS, 1, 1]
    s_tile = sign_ptr + slot_safe[None, :, None] * stride_st + cols[:, None, None] * stride_sn  # [BLOCK_N, ROWS, 1]
    acc = tl.zeros((MMA_M, BLOCK_N), dtype=tl.float32)
    dacc = tl.zeros((BLOCK_N, ROWS, BLOCK_K // 32), dtype=tl.float32)
    if tl.max(tl.max(s_ok.to(tl.int32), axis=1), axis=0) > 0:
        acc, dacc = _decode_loop(acc, dacc, x_dot, pad_ok, x_rows, w_tile, s_tile, s_ok_t, k_lo, k_hi, stride_xk,
                                 stride_wk, stride_sw, DELTA=True, EVEN_K=EVEN_K, BLOCK_K=BLOCK_K, PAIRED=PAIRED,
                                 BF16=BF16, INTERPRETED=INTERPRETED, ROWS=ROWS, MMA_M=MMA_M)
    else:  # every row of the block is the base: the plain GEMV loop
        acc, dacc = _decode_loop(acc, dacc, x_dot, pad_ok, x_rows, w_tile, s_tile, s_ok_t, k_lo, k_hi, stride_xk,
                                 stride_wk, stride_sw, DELTA=False, EVEN_K=EVEN_K, BLOCK_K=BLOCK_K, PAIRED=PAIRED,
                                 BF16=BF16, INTERPRETED=INTERPRETED, ROWS=ROWS, MMA_M=MMA_M)
    base = tl.sum(tl.reshape(acc, (MMA_M // ROWS, ROWS, BLOCK_N)), axis=0)  # [ROWS, BLOCK_N]: + the zero padding rows
    y = base + alpha * tl.trans(tl.sum(dacc, axis=2))  # α once per (row, column)
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
                EVEN_K=k % config.block_k == 0, INTERPRETED=INTERPRETED, num_warps=config.num_warps,
                num_stages=config.num_stages)
    _decode_kernel[grid](*args, ROWS=rows, **meta)
    return y if split_k == 1 else y.to(x.dtype)
