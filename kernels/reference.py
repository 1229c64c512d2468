"""The definition of `delta_linear`, in plain fp32 torch. Every fast path is tested against it.

For every row m of x, with t = slot_of_row[m] (a slot: an index into the stacked deltas):

    y[m] = x[m] · W_baseᵀ + scales[t] · (x[m] · sign(Δ_t)ᵀ)        (t >= 0)
    y[m] = x[m] · W_baseᵀ                                          (t == BASE_SLOT == -1: the base itself)

Shapes: x [M, K]; base_weight [N, K]; signs [T, N, K // 32] int32 (layout in packing.py),
T slots; scales [T] (one per matrix, as in the paper) or [T, N] (one per output row);
slot_of_row [M] integer in [BASE_SLOT, T). Returns fp32 [M, N].
"""

from __future__ import annotations

import torch

from .grouping import BASE_SLOT
from .packing import unpack_signs


def delta_linear_reference(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    slot_of_row: torch.Tensor,
) -> torch.Tensor:
    x32 = x.float()
    y = x32 @ base_weight.float().t()
    for t in torch.unique(slot_of_row).tolist():
        if t == BASE_SLOT:
            continue
        rows = slot_of_row == t
        s = unpack_signs(signs[t], torch.float32)  # [N, K]
        y[rows] += (x32[rows] @ s.t()) * scales[t].float()
    return y


def dense_delta_weight(base_weight: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W_base + α·sign(Δ) as one dense fp32 matrix (what `merge` writes, and what tests compare to)."""
    s = unpack_signs(packed, torch.float32)
    scale = scale.float()
    if scale.dim() == 1:
        scale = scale[:, None]
    return base_weight.float() + scale * s
