"""Fused batched kernel: y[m] = x[m]·W_baseᵀ + α_t·(x[m]·sign(Δ_t)ᵀ) in one pass over x.

Same segment walk and bits trick as triton_delta.py, plus the base tile: per K step a
program loads x [BLOCK_M, BLOCK_K] once and feeds two tl.dot's, W_base [BLOCK_N, BLOCK_K]
and the 0/1 sign bits. Rows of tenant -1 load no sign words (masked) and get α = 0.

When it wins (bytes, decode): for one tenant segment it moves W (2·N·K) + signs (N·K/8)
+ x + y in ONE launch, against cuBLAS GEMV (2·N·K) followed by the delta launch (N·K/8,
plus reading and writing y). At 4096×4096 bf16 that is 1.0625× the base bytes; the saved
launch (~3-5 µs against a ~10 µs GEMV on an H100) is what puts a 1.15× target in reach.
With S tenant segments it reads W once per segment: S× the base bytes unless the S
programs of an output tile meet in L2 (segments vary fastest in the grid to help that),
so the dispatcher uses it only for a single segment. Unmeasured on a GPU here.
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import torch
import triton
import triton.language as tl

from .grouping import TenantGroups
from .triton_configs import cdiv, delta_configs, prune, rows_bucket
from .validation import check_delta_linear_args


@triton.autotune(configs=delta_configs(), key=["ROWS_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": prune})
@triton.jit
def _fused_kernel(
    y_ptr, x_ptr, w_ptr, sign_ptr, scale_ptr, order_ptr, seg_start_ptr, seg_tenant_ptr,
    N, K, ROWS_BUCKET,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_st, stride_sn, stride_sw, stride_at, stride_an,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(0)  # segments vary fastest: the S programs of one W tile run together
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    tenant = tl.load(seg_tenant_ptr + pid_s)
    seg_lo = tl.load(seg_start_ptr + pid_s)
    seg_hi = tl.load(seg_start_ptr + pid_s + 1)
    row0 = seg_lo + pid_m * BLOCK_M
    if row0 >= seg_hi:
        return
    tenant_safe = tl.maximum(tenant, 0).to(tl.int64)

    offs_r = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_r < seg_hi
    rows = tl.load(order_ptr + offs_r, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows of tenant -1 (the base alone) read no sign words or scales. A [BLOCK_N] vector, not a
    # scalar: Triton 3.9's interpreter refuses a scalar bool inside a block mask.
    n_mask = offs_n < N
    delta_n_mask = n_mask & (tenant + tl.zeros_like(offs_n) >= 0)
    offs_k = tl.arange(0, BLOCK_K)
    shift = offs_k % 32

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    s_ptrs = (sign_ptr + tenant_safe * stride_st + offs_n[:, None].to(tl.int64) * stride_sn
              + (offs_k[None, :] // 32) * stride_sw)

    acc_base = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_bits = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        words = tl.load(s_ptrs, mask=delta_n_mask[:, None] & k_mask[None, :], other=0)
        bits = ((words >> shift[None, :]) & 1).to(xt.dtype)
        acc_base = tl.dot(xt, tl.trans(wt), acc_base, input_precision="ieee")
        acc_bits = tl.dot(xt, tl.trans(bits), acc_bits, input_precision="ieee")
        xsum += tl.sum(xt.to(tl.float32), axis=1)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        s_ptrs += (BLOCK_K // 32) * stride_sw

    if SCALE_PER_ROW:
        alpha = tl.load(scale_ptr + tenant_safe * stride_at + offs_n * stride_an, mask=delta_n_mask, other=0.0)[None, :]
    else:
        alpha = tl.load(scale_ptr + tenant_safe * stride_at, mask=tenant >= 0, other=0.0)
    y = acc_base + alpha * (2.0 * acc_bits - xsum[:, None])
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fused_delta_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    groups: TenantGroups,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·W_baseᵀ + α_t·(x·sign(Δ_t)ᵀ) per row, in x's dtype (out: optional [M, N] to write into)."""
    m, n, k, _ = check_delta_linear_args(x, base_weight, signs, scales)
    if groups.num_rows != m:
        raise ValueError(f"groups cover {groups.num_rows} rows but x has M={m}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be [M={m}, N={n}] {x.dtype} on {x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if m == 0:
        return out
    scales32 = scales.float()
    per_row = scales32.dim() == 2
    grid = lambda meta: (groups.num_segments, cdiv(groups.max_rows, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))
    _fused_kernel[grid](
        out, x, base_weight, signs, scales32, groups.order, groups.seg_start, groups.seg_tenant,
        n, k, rows_bucket(groups.max_rows),
        out.stride(0), out.stride(1), x.stride(0), x.stride(1), base_weight.stride(0), base_weight.stride(1),
        signs.stride(0), signs.stride(1), signs.stride(2),
        scales32.stride(0), scales32.stride(1) if per_row else 0,
        SCALE_PER_ROW=per_row,
    )
    return out
