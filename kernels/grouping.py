"""Rows grouped by slot: the CPU path's host-side segment layout (Punica's SGMV); on CUDA
the prefill op builds its own row-tile form of it on the device (segments.py) and only
checks these.

A slot is an index into the stacked deltas (signs [num_slots, N, K/32]); the serving bank
puts one tenant's delta in each slot. `slot_of_row[m]` says which slot row m reads
(`BASE_SLOT` = -1: the base model alone). The kernels do not want rows in batch order;
they want, per slot, the list of its rows, so one program reads a slot's sign tile once
and applies it to all of that slot's rows. `group_rows` returns that as a stable sort of
the row indices plus segment boundaries:

    order      [M]      row indices sorted by slot (ties keep batch order)
    seg_start  [S + 1]  segment s is order[seg_start[s] : seg_start[s + 1]]
    seg_slot   [S]      the slot of segment s (BASE_SLOT for base-only rows)

Why segments and not a per-row slot index inside the kernel: with a row index every
row would fetch its slot's signs again (zipf / identical mixes re-read one slot's
bits once per row); with segments each slot's bits are read once per output tile,
whatever the popularity mix. x rows are gathered through `order` (no copy of x).

On the host, grouping is computed once per forward step and passed to every layer's
`delta_linear(..., groups=...)` (serving/layers.py does so for CPU rows only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

BASE_SLOT = -1  # the slot of a row that reads no delta: the base model alone


@dataclass(frozen=True)
class SlotGroups:
    order: torch.Tensor  # [M] int32
    seg_start: torch.Tensor  # [S + 1] int32
    seg_slot: torch.Tensor  # [S] int32
    slots: tuple[int, ...]  # host copy of seg_slot
    starts: tuple[int, ...]  # host copy of seg_start
    num_rows: int

    @property
    def num_segments(self) -> int:
        return len(self.slots)

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
        if len(self.starts) != len(self.slots) + 1 or self.starts[0] != 0 or self.starts[-1] != self.num_rows \
                or any(b < a for a, b in zip(self.starts, self.starts[1:])):
            return f"segment starts {list(self.starts)} do not split {self.num_rows} rows"
        if tuple(self.seg_start.tolist()) != self.starts or tuple(self.seg_slot.tolist()) != self.slots:
            return "the device copies of the segments differ from the host copies"
        if any(s < BASE_SLOT for s in self.slots):
            return f"a segment's slot is below BASE_SLOT ({BASE_SLOT})"
        return None

    def rows_of(self, s: int) -> torch.Tensor:
        return self.order[self.starts[s] : self.starts[s + 1]]


def group_rows(slot_of_row: torch.Tensor, num_slots: int) -> SlotGroups:
    """Sort rows by slot into segments; checks every slot is in [BASE_SLOT, num_slots)."""
    if slot_of_row.dim() != 1:
        raise ValueError(f"slot_of_row must be 1-D [M], got shape {tuple(slot_of_row.shape)}")
    if slot_of_row.dtype.is_floating_point or slot_of_row.dtype == torch.bool:
        raise TypeError(f"slot_of_row must be an integer tensor, got {slot_of_row.dtype}")
    device = slot_of_row.device
    slots, counts = torch.unique(slot_of_row, sorted=True, return_counts=True)
    slot_list = [int(s) for s in slots.tolist()]
    if slot_list and (slot_list[0] < BASE_SLOT or slot_list[-1] >= num_slots):
        bad = slot_list[0] if slot_list[0] < BASE_SLOT else slot_list[-1]
        raise IndexError(
            f"slot_of_row holds slot {bad}, outside [{BASE_SLOT}, {num_slots}) "
            f"(signs stack has {num_slots} slots; {BASE_SLOT} means base only)"
        )
    order = torch.sort(slot_of_row, stable=True).indices.to(torch.int32)
    starts = [0]
    for c in counts.tolist():
        starts.append(starts[-1] + int(c))
    return SlotGroups(
        order=order,
        seg_start=torch.tensor(starts, dtype=torch.int32, device=device),
        seg_slot=torch.tensor(slot_list, dtype=torch.int32, device=device),
        slots=tuple(slot_list),
        starts=tuple(starts),
        num_rows=slot_of_row.shape[0],
    )
