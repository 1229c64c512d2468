"""Delta-only batched 1-bit kernel: y[m] += α_t · (x[m] · sign(Δ_t)ᵀ), added onto a base GEMM.

The dispatcher computes the base part once for the whole batch with cuBLAS
(`F.linear(x, W_base)`, W read once whatever the tenant mix) and this kernel adds every
tenant's delta in one launch. Rows come grouped by tenant (grouping.py, SGMV-style):
program (s, i, j) takes row tile i of segment s and output columns tile j, streams that
tenant's packed sign words for the tile once and applies them to the tile's rows.

The bits trick: with b = (S + 1) / 2 in {0, 1},  x·Sᵀ = 2·(x·bᵀ) − rowsum(x), so a sign
tile is expanded with one shift-and-mask into 0/1 values in x's dtype, fed to tl.dot
(tensor cores for prefill), and rowsum(x) is accumulated on the side for free.

Bytes at decode (why this form is kept for many tenants): per layer the batch moves
W once (2·N·K bytes, cuBLAS) + T·N·K/8 bytes of signs; a fused kernel that walks tenant
segments re-reads W per segment (T·2·N·K unless L2 catches it), 16× the base bytes at 16
tenants. The fused kernel (triton_fused.py) is used only for a single tenant segment,
where it saves the second launch and the y round trip. Unmeasured on a GPU here (no GPU
in the build session): run bench/kernels.py on one to confirm the crossover.
"""

# No `from __future__ import annotations`: the interpreter must see `tl.constexpr` objects, not strings.

import torch
import triton
import triton.language as tl

from .grouping import TenantGroups
from .triton_configs import cdiv, delta_configs, prune, rows_bucket
from .validation import check_delta_args


@triton.autotune(
    configs=delta_configs(),
    key=["ROWS_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": prune},
    restore_value=["y_ptr"],  # the kernel adds into y: benchmarking must not accumulate
)
@triton.jit
def _delta_kernel(
    y_ptr, x_ptr, sign_ptr, scale_ptr, order_ptr, seg_start_ptr, seg_tenant_ptr,
    N, K, ROWS_BUCKET,
    stride_ym, stride_yn, stride_xm, stride_xk,
    stride_st, stride_sn, stride_sw, stride_at, stride_an,
    SCALE_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_s = tl.program_id(0)  # segments vary fastest: neighbouring programs share x tiles
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    tenant = tl.load(seg_tenant_ptr + pid_s)
    seg_lo = tl.load(seg_start_ptr + pid_s)
    seg_hi = tl.load(seg_start_ptr + pid_s + 1)
    row0 = seg_lo + pid_m * BLOCK_M
    if (tenant < 0) | (row0 >= seg_hi):  # base-only rows, or a row tile past a short segment
        return

    offs_r = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_r < seg_hi
    rows = tl.load(order_ptr + offs_r, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    shift = offs_k % 32

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Each word is addressed once per bit it holds; the repeats hit the same cache line.
    s_ptrs = (sign_ptr + tenant.to(tl.int64) * stride_st + offs_n[:, None].to(tl.int64) * stride_sn
              + (offs_k[None, :] // 32) * stride_sw)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        words = tl.load(s_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        bits = ((words >> shift[None, :]) & 1).to(xt.dtype)  # [BLOCK_N, BLOCK_K] in {0, 1}
        acc = tl.dot(xt, tl.trans(bits), acc, input_precision="ieee")
        xsum += tl.sum(xt.to(tl.float32), axis=1)
        x_ptrs += BLOCK_K * stride_xk
        s_ptrs += (BLOCK_K // 32) * stride_sw

    delta = 2.0 * acc - xsum[:, None]
    if SCALE_PER_ROW:
        alpha = tl.load(scale_ptr + tenant * stride_at + offs_n * stride_an, mask=n_mask, other=0.0)[None, :]
    else:
        alpha = tl.load(scale_ptr + tenant * stride_at)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + alpha * delta).to(y_ptr.dtype.element_ty), mask=mask)


def delta_accumulate(
    y: torch.Tensor, x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, groups: TenantGroups
) -> torch.Tensor:
    """Add α_t·(x[m]·sign(Δ_t)ᵀ) into y[m] for every row with a tenant (in place; returns y).

    y [M, N] holds the base output (any strides, x's dtype); x [M, K] any strides;
    signs [T, N, K/32] int32; scales [T] or [T, N]; groups from `group_rows`."""
    m, k, _ = check_delta_args(x, signs, scales)
    n = signs.shape[1]
    if tuple(y.shape) != (m, n) or y.device != x.device:
        raise ValueError(f"y must be [M={m}, N={n}] on {x.device}, got {tuple(y.shape)} on {y.device}")
    if groups.num_rows != m:
        raise ValueError(f"groups cover {groups.num_rows} rows but x has M={m}")
    if m == 0 or all(t < 0 for t in groups.tenants):
        return y
    scales32 = scales.float()
    per_row = scales32.dim() == 2
    grid = lambda meta: (groups.num_segments, cdiv(groups.max_rows, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]))
    _delta_kernel[grid](
        y, x, signs, scales32, groups.order, groups.seg_start, groups.seg_tenant,
        n, k, rows_bucket(groups.max_rows),
        y.stride(0), y.stride(1), x.stride(0), x.stride(1),
        signs.stride(0), signs.stride(1), signs.stride(2),
        scales32.stride(0), scales32.stride(1) if per_row else 0,
        SCALE_PER_ROW=per_row,
    )
    return y
