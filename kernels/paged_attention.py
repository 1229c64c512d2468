"""Paged attention: queries attend to K/V read in place from the paged KV cache, flash-attention style.

    q        [b, Q, H, D]    the group's queries (b sequences, Q queries each, padding included)
    k_cache  [P, KVH, D]     one layer's cache of flat positions (serving/paged_kv.py PagedKVCache.k[layer])
    v_cache  [P, KVH, D]
    kv_index [b, L]          flat cache position of each context position of each sequence
    q_pos    [b, Q]          position of each query in its sequence
    o        [b, Q, H, D]    in q's dtype

Key position j of sequence i is seen by query (i, t) iff j <= q_pos[i, t] (and, with a sliding
window w, q_pos[i, t] - j < w): the causal mask also keeps a query inside its own context, so
kv_index past it may point anywhere valid (padding rows point at the cache's scratch block).

* **One program per (sequence, KV head, block of query rows).** Its rows are the sequence's
  (query t, head g) pairs of that KV head's group, row = t * G + g (G = H / KVH), so a K/V
  tile is loaded once for all the query heads that share it (GQA; G = 1 is MHA) and a decode
  step (Q = 1) still fills the tl.dot M of 16 with G heads plus masked rows.
* **Blocks read in place.** Each BLOCK_N tile of context positions loads its kv_index entries
  and then the K/V rows at those cache positions: no gathered copy of the context.
* **Online softmax** over the tiles (running max and sum in fp32, exp2 with log2(e) folded
  into the scale), fp32 accumulators, one rescale per tile; the output is cast once.
* **Only the tiles a program's rows can see:** from the window's first tile (0 without a
  window) to its largest q_pos + 1, read on the device, so the grid depends only on shapes
  (graph-safe: nothing is read on the host) and a short context costs only its own tiles.
* fp16/bf16 on the tensor cores; fp32 inputs (the interpreter's tests) with
  input_precision="ieee", exact products as the fp32 reference, not TF32. The interpreter's
  tl.dot is broken for bf16 (see triton_decode.py), so there bf16 operands go in as fp32
  (exact products of bf16 values).
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Read when this module is imported, as triton.jit reads it (tests/kernels/conftest.py sets it before).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a·b with fp32 accumulation; FP32: operands in fp32 with exact (IEEE) products, not TF32."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _paged_attention_kernel(
    o_ptr, q_ptr, k_ptr, v_ptr, kv_index_ptr, q_pos_ptr,
    Q, L, qk_scale, window,
    s_ob, s_oq, s_oh, s_od,
    s_qb, s_qq, s_qh, s_qd,
    s_kp, s_kh, s_kd,
    s_vp, s_vh, s_vd,
    s_ib, s_il, s_pb, s_pq,
    G: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq, kvh, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row = query t * G + head g
    row_ok = rows < Q * G
    t, head = rows // G, kvh * G + rows % G  # [BLOCK_M]
    d = tl.arange(0, D)  # [D]

    pos = tl.load(q_pos_ptr + seq * s_pb + t * s_pq, mask=row_ok, other=0)  # [BLOCK_M]
    q = tl.load(q_ptr + seq * s_qb + t[:, None] * s_qq + head[:, None] * s_qh + d[None, :] * s_qd,
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    # The tiles these rows see: [lo, hi) positions, hi clamped to the context's padded length.
    hi = tl.minimum(tl.max(tl.where(row_ok, pos, 0)) + 1, L)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(row_ok, pos, L)) - window + 1, 0) // BLOCK_N * BLOCK_N

    # Finite start for the running max: a row whose first tiles are all masked (window) gets
    # exp2(-inf - (-1e30)) = 0 for them, not the NaN of -inf - -inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        j_ok = j < hi
        idx = tl.load(kv_index_ptr + seq * s_ib + j * s_il, mask=j_ok, other=0).to(tl.int64)  # [BLOCK_N] cache positions
        kt = tl.load(k_ptr + idx[None, :] * s_kp + kvh * s_kh + d[:, None] * s_kd,
                     mask=j_ok[None, :], other=0.0).to(q.dtype)  # [D, BLOCK_N]
        v = tl.load(v_ptr + idx[:, None] * s_vp + kvh * s_vh + d[None, :] * s_vd,
                    mask=j_ok[:, None], other=0.0).to(q.dtype)  # [BLOCK_N, D]

        s = _dot(q, kt, FP32) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        seen = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        if HAS_WINDOW:
            seen = seen & (pos[:, None] - j[None, :] < window)
        s = tl.where(seen, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_new)  # [BLOCK_M] rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows past Q * G saw nothing; they are not stored
    tl.store(o_ptr + seq * s_ob + t[:, None] * s_oq + head[:, None] * s_oh + d[None, :] * s_od,
             o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"paged attention: head_dim {d} is not supported (a power of two >= 16)")


def paged_attention_triton(q, k_cache, v_cache, kv_index, q_pos, scale, sliding_window=None,
                           block_m=None, block_n=None):
    """q [b, Q, H, D], k_cache/v_cache [P, KVH, D], kv_index [b, L], q_pos [b, Q] -> o [b, Q, H, D].

    Shapes and the mask: module docstring. scale multiplies q·k (None: 1/sqrt(D)). The grid
    depends only on shapes, so the call replays in a CUDA graph with any kv_index/q_pos."""
    b, nq, h, d = q.shape
    kvh = k_cache.shape[1]
    check_head_dim(d)
    if h % kvh:
        raise ValueError(f"paged attention: {h} query heads are not a multiple of {kvh} KV heads")
    if k_cache.shape[2] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged attention: caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit head_dim {d}")
    if kv_index.shape[0] != b or tuple(q_pos.shape) != (b, nq):
        raise ValueError(f"paged attention: kv_index {tuple(kv_index.shape)} / q_pos {tuple(q_pos.shape)} do not fit q {tuple(q.shape)}")
    g = h // kvh
    length = kv_index.shape[1]
    block_m = block_m or (16 if nq * g <= 16 else 64)  # 16: tl.dot's smallest M
    block_n = block_n or 64
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device)
    grid = (b, kvh, triton.cdiv(nq * g, block_m))
    _paged_attention_kernel[grid](
        o, q, k_cache, v_cache, kv_index, q_pos,
        nq, length, scale * LOG2E, sliding_window or 0,
        *o.stride(), *q.stride(), *k_cache.stride(), *v_cache.stride(), *kv_index.stride(), *q_pos.stride(),
        G=g, D=d, HAS_WINDOW=sliding_window is not None, FP32=q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2,
    )
    return o
