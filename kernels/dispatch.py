"""`delta_linear`: the one entry point layers call. Picks the fastest path for the device.

(Placeholder until the kernels issue lands: every device uses the reference, cast back to x's dtype.)
"""

from __future__ import annotations

import torch

from .reference import delta_linear_reference


def delta_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    tenant_of_row: torch.Tensor,
) -> torch.Tensor:
    return delta_linear_reference(x, base_weight, signs, scales, tenant_of_row).to(x.dtype)
