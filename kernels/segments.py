"""Slot-segment metadata built on the device, without a host sync (graph-safe).

The prefill delta kernel (triton_delta.py) walks rows grouped by slot, Punica-SGMV style,
in row tiles of BLOCK_M rows. `SegmentMeta.fill(slot_of_row)` computes, with device ops only
(stable sort, cumsum, scatter, searchsorted — no torch.unique, no .item()/.tolist()):

    order     [M]    int32  row indices sorted by slot (ties keep batch order)
    tile_slot [CAP]  int32  the slot of row tile i (BASE_SLOT = -1: no work — base rows or past the end)
    tile_lo   [CAP]  int32  tile i covers order[tile_lo[i] : tile_hi[i]] (<= BLOCK_M rows)
    tile_hi   [CAP]  int32

CAP = ceil(M / BLOCK_M) + min(M, num_slots + 1) bounds the tile count of any mix (each
segment adds at most one partial tile), so the grid is a function of M alone, and a CUDA
graph captured for one mix replays correctly with any other mix of the same M: the
buffers are persistent, allocated once per (batch bucket, num_slots, BLOCK_M, device) —
at most ~log2(max M) sets, never freed, so a captured graph can never point at freed
memory — and `fill` writes them in place and returns views of their first M / CAP
entries. This is vLLM's LoRAKernelMeta pattern.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from .grouping import BASE_SLOT


def tile_cap(m: int, num_slots: int, block_m: int) -> int:
    return -(-m // block_m) + min(m, num_slots + 1)


class Segments(NamedTuple):
    """Views of a SegmentMeta's buffers for one batch of M rows (what the kernel reads)."""

    order: torch.Tensor  # [M] int32
    tile_slot: torch.Tensor  # [CAP] int32
    tile_lo: torch.Tensor  # [CAP] int32
    tile_hi: torch.Tensor  # [CAP] int32
    cap: int


class SegmentMeta:
    """Persistent device buffers for batches of up to `max_rows` rows on one device."""

    def __init__(self, max_rows: int, num_slots: int, block_m: int, device: torch.device) -> None:
        self.max_rows, self.num_slots, self.block_m = max_rows, num_slots, block_m
        cap = tile_cap(max_rows, num_slots, block_m)
        self.order = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.tile_slot = torch.full((cap,), BASE_SLOT, dtype=torch.int32, device=device)
        self.tile_lo = torch.zeros(cap, dtype=torch.int32, device=device)
        self.tile_hi = torch.zeros(cap, dtype=torch.int32, device=device)

    def fill(self, slot_of_row: torch.Tensor) -> Segments:
        """Write the metadata of `slot_of_row` [M] (values in [BASE_SLOT, num_slots)) in place; no host sync."""
        m, bm, dev = slot_of_row.shape[0], self.block_m, slot_of_row.device
        if not 0 < m <= self.max_rows:
            raise ValueError(f"{m} rows do not fit segment buffers for 1..{self.max_rows} rows")
        cap = tile_cap(m, self.num_slots, bm)
        key = slot_of_row.to(torch.int64)  # [M]
        order = torch.sort(key, stable=True).indices  # [M]
        keys = key.index_select(0, order)  # [M] sorted slots
        pos = torch.arange(m, device=dev)  # [M]
        is_first = torch.ones(m, dtype=torch.bool, device=dev)
        is_first[1:] = keys[1:] != keys[:-1]
        seg = torch.cumsum(is_first.to(torch.int64), 0) - 1  # [M] segment of each sorted position
        # Segment s spans sorted positions [seg_lo[s], seg_hi[s]); unused segments are empty (lo = hi = M).
        seg_lo = torch.full((m,), m, dtype=torch.int64, device=dev).scatter_reduce(0, seg, pos, "amin", include_self=False)
        seg_hi = torch.full((m,), m, dtype=torch.int64, device=dev).scatter_reduce(0, seg, pos + 1, "amax", include_self=False)
        seg_slot = torch.full((m,), BASE_SLOT, dtype=torch.int64, device=dev).scatter(0, seg, keys)  # one value per segment
        # Base-only segments (BASE_SLOT) get no tiles: the delta kernel has nothing to add there.
        tiles = torch.where(seg_slot != BASE_SLOT, (seg_hi - seg_lo + bm - 1) // bm, 0)  # [M]
        tile_end = torch.cumsum(tiles, 0)  # [M]
        i = torch.arange(cap, device=dev)  # [CAP]
        s = torch.searchsorted(tile_end, i, right=True).clamp_(max=m - 1)  # [CAP] segment of tile i
        first_tile = tile_end.index_select(0, s) - tiles.index_select(0, s)
        lo = seg_lo.index_select(0, s) + (i - first_tile) * bm
        valid = i < tile_end[-1]
        hi = torch.minimum(lo + bm, seg_hi.index_select(0, s))
        out = Segments(self.order[:m], self.tile_slot[:cap], self.tile_lo[:cap], self.tile_hi[:cap], cap)
        out.order.copy_(order)
        out.tile_slot.copy_(torch.where(valid, seg_slot.index_select(0, s), BASE_SLOT))
        out.tile_lo.copy_(torch.where(valid, lo, 0))
        out.tile_hi.copy_(torch.where(valid, hi, 0))
        return out


_CACHE: dict[tuple, SegmentMeta] = {}
# The slot map the buffers of each key were last filled from: every linear of a step passes the
# same `slot_of_row`, so only the first of ~225 rebuilds the metadata (~45 kernels each) in an
# eager step. A new tensor is a new object (never matched by address); one changed in place is
# caught by its version where it has one, and the serving layers call `forget_fills()` at every
# step (inference tensors keep no version). Inside CUDA-graph capture every call fills: the
# graph must record the fill (replays then recompute it from the refilled slot buffer).
_FILLED: dict[tuple, tuple[weakref.ref, int | None, Segments]] = {}


def forget_fills() -> None:
    """A new step: slot maps may have been refilled in place since the last fill."""
    _FILLED.clear()


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def segment_meta(slot_of_row: torch.Tensor, num_slots: int, block_m: int) -> Segments:
    """Fill the persistent buffers of M's bucket (next power of two) for `slot_of_row` [M]."""
    m = slot_of_row.shape[0]
    bucket = 1 << (max(m, 1) - 1).bit_length()
    key = (bucket, num_slots, block_m, slot_of_row.device)
    meta = _CACHE.get(key)
    if meta is None:
        meta = _CACHE[key] = SegmentMeta(*key)
    capturing = slot_of_row.is_cuda and torch.cuda.is_current_stream_capturing()
    last = _FILLED.get(key)
    if not capturing and last is not None and last[0]() is slot_of_row and last[1] == _version(slot_of_row):
        return last[2]
    out = meta.fill(slot_of_row)
    _FILLED[key] = (weakref.ref(slot_of_row), _version(slot_of_row), out)
    return out
