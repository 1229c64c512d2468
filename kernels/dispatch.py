"""`delta_linear`: the one entry point layers call. Picks the fastest path for the device.

    y[m] = x[m]·W_baseᵀ + scales[t]·(x[m]·sign(Δ_t)ᵀ),  t = tenant_of_row[m]  (-1: base only)

* CUDA, one tenant segment (e.g. a single tenant's batch): the fused Triton kernel, base and
  delta in one pass over x (triton_fused.py).
* CUDA, several segments: cuBLAS base GEMM for the whole batch (W read once), then one
  launch of the delta-only Triton kernel over all tenant segments (triton_delta.py). The
  byte argument for this split is in those docstrings.
* CPU: torch (cpu.py): byte-LUT for few rows, unpack+GEMM for many, optional sign cache.

Optional keywords: `groups` (from `group_rows`, computed once per step and shared by all
layers: it costs a host sync), `sign_cache` (CPU only), `fused` (force a CUDA form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import SignCache, delta_linear_cpu
from .grouping import TenantGroups, group_rows
from .validation import check_delta_linear_args, check_rows


def delta_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    tenant_of_row: torch.Tensor,
    *,
    groups: TenantGroups | None = None,
    sign_cache: SignCache | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """[M, K] x -> [M, N] in x's dtype. Shapes and the packing layout: reference.py, packing.py."""
    m, _, _, t = check_delta_linear_args(x, base_weight, signs, scales)
    check_rows(tenant_of_row, m, x.device)
    if groups is None:
        groups = group_rows(tenant_of_row, t)
    elif groups.num_rows != m:
        raise ValueError(f"groups cover {groups.num_rows} rows but x has M={m}")
    elif groups.tenants and groups.tenants[-1] >= t:  # tenants are sorted; a kernel would read past the stack
        raise ValueError(f"groups name tenant {groups.tenants[-1]}, but the signs stack has {t} tenants")
    if not x.is_cuda:
        return delta_linear_cpu(x, base_weight, signs, scales, groups, sign_cache)

    from .triton_delta import delta_accumulate  # Triton only where it can run
    from .triton_fused import fused_delta_linear

    if fused is None:
        fused = groups.num_segments == 1 and groups.tenants[0] >= 0
    if fused:
        return fused_delta_linear(x, base_weight, signs, scales, groups)
    y = F.linear(x, base_weight)
    return delta_accumulate(y, x, signs, scales, groups)
