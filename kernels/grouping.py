"""Rows grouped by tenant: the CPU path's host-side segment layout (Punica's SGMV); on CUDA
the prefill op builds its own row-tile form of it on the device (segments.py) and only
checks these.

`tenant_of_row[m]` says which tenant row m belongs to (-1 = the base model alone). The
kernels do not want rows in batch order; they want, per tenant, the list of its rows, so
one program reads a tenant's sign tile once and applies it to all of that tenant's rows.
`group_rows` returns that as a stable sort of the row indices plus segment boundaries:

    order      [M]      row indices sorted by tenant (ties keep batch order)
    seg_start  [S + 1]  segment s is order[seg_start[s] : seg_start[s + 1]]
    seg_tenant [S]      the tenant of segment s (-1 for base-only rows)

Why segments and not a per-row tenant index inside the kernel: with a row index every
row would fetch its tenant's signs again (zipf / identical mixes re-read one tenant's
bits once per row); with segments each tenant's bits are read once per output tile,
whatever the popularity mix. x rows are gathered through `order` (no copy of x).

On the host, grouping is computed once per forward step and passed to every layer's
`delta_linear(..., groups=...)` (serving/layers.py does so for CPU rows only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class TenantGroups:
    order: torch.Tensor  # [M] int32
    seg_start: torch.Tensor  # [S + 1] int32
    seg_tenant: torch.Tensor  # [S] int32
    tenants: tuple[int, ...]  # host copy of seg_tenant
    starts: tuple[int, ...]  # host copy of seg_start
    num_rows: int

    @property
    def num_segments(self) -> int:
        return len(self.tenants)

    @cached_property  # every layer's launch reads it; the groups are built once per step
    def max_rows(self) -> int:
        """Rows in the longest segment (sizes the kernels' row-tile grid)."""
        return max((b - a for a, b in zip(self.starts, self.starts[1:])), default=0)

    @cached_property
    def problem(self) -> str | None:
        """Why these groups could not index a batch of `num_rows` rows, or None. Code that
        indexes memory with them unchecked (the CPU bit kernel) asks first; computed once."""
        order = self.order
        if order.dim() != 1 or order.numel() != self.num_rows:
            return f"order has {order.numel()} rows, the batch {self.num_rows}"
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= self.num_rows):
            return f"a row index in order is outside [0, {self.num_rows})"
        if len(self.starts) != len(self.tenants) + 1 or self.starts[0] != 0 or self.starts[-1] != self.num_rows \
                or any(b < a for a, b in zip(self.starts, self.starts[1:])):
            return f"segment starts {list(self.starts)} do not split {self.num_rows} rows"
        if tuple(self.seg_start.tolist()) != self.starts or tuple(self.seg_tenant.tolist()) != self.tenants:
            return "the device copies of the segments differ from the host copies"
        if any(t < -1 for t in self.tenants):
            return "a segment's tenant is below -1"
        return None

    def rows_of(self, s: int) -> torch.Tensor:
        return self.order[self.starts[s] : self.starts[s + 1]]


def group_rows(tenant_of_row: torch.Tensor, num_tenants: int) -> TenantGroups:
    """Sort rows by tenant into segments; checks every index is in [-1, num_tenants)."""
    if tenant_of_row.dim() != 1:
        raise ValueError(f"tenant_of_row must be 1-D [M], got shape {tuple(tenant_of_row.shape)}")
    if tenant_of_row.dtype.is_floating_point or tenant_of_row.dtype == torch.bool:
        raise TypeError(f"tenant_of_row must be an integer tensor, got {tenant_of_row.dtype}")
    device = tenant_of_row.device
    tenants, counts = torch.unique(tenant_of_row, sorted=True, return_counts=True)
    tenant_list = [int(t) for t in tenants.tolist()]
    if tenant_list and (tenant_list[0] < -1 or tenant_list[-1] >= num_tenants):
        bad = tenant_list[0] if tenant_list[0] < -1 else tenant_list[-1]
        raise IndexError(
            f"tenant_of_row holds tenant {bad}, outside [-1, {num_tenants}) "
            f"(signs stack has {num_tenants} tenants; -1 means base only)"
        )
    order = torch.sort(tenant_of_row, stable=True).indices.to(torch.int32)
    starts = [0]
    for c in counts.tolist():
        starts.append(starts[-1] + int(c))
    return TenantGroups(
        order=order,
        seg_start=torch.tensor(starts, dtype=torch.int32, device=device),
        seg_tenant=torch.tensor(tenant_list, dtype=torch.int32, device=device),
        tenants=tuple(tenant_list),
        starts=tuple(starts),
        num_rows=tenant_of_row.shape[0],
    )
