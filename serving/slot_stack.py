"""SlotStack: per-slot device copies of one large tensor, for only the slots whose delta has it.

Embedding tables and output heads are too large to reserve for every slot up front (a 7B
model's lm_head is 262 MB in fp16, one bank slot of 1-bit linears about 800 MB), yet a full
fine-tune usually changes them. A slot stack keeps them in one stacked tensor per field,

    entries[field]  [E, *shape]   E = entries allocated, grown by doubling, at most n_slots
    entry_of_slot   [n_slots + 1] int64 on the device: slot s at s + 1 -> its entry, NO_ENTRY (-1) = none

so a forward pass gathers each row's tensor by index (embedding lookups) or runs one grouped
GEMM over the rows sorted by entry (linears) — no Python loop over slots. Row 0 of
`entry_of_slot` is the base's (BASE_SLOT + 1) and always NO_ENTRY, so `entry_of_slot[slot_of_row + 1]`
works for base rows too. On CPU memory follows the tenants that use the stack (grown by doubling); on a
GPU the first entry allocates all n_slots at once, which the engine reserved before sizing its
KV cache (`grow="full"`).

Writes come from the bank's loader thread (under the bank's lock); forwards read `entries`
and `entry_of_slot` once per call, so a growth that swaps in a larger tensor never changes
what a running forward reads. Tensors are allocated on the device's current stream and
filled on the loader's copy stream after waiting on it (see `put`).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

NO_ENTRY = -1  # entry_of_slot's value for a slot (or the base) without an entry


class SlotStack:
    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]], n_slots: int, device: torch.device,
                 grow: str = "double") -> None:
        self.fields = fields  # {field: (shape of one entry, dtype)}
        self.n_slots, self.device = n_slots, device
        # "double": memory follows the tenants using the stack (CPU). "full": the first entry
        # allocates all n_slots entries, once (GPU): the engine planned that memory before sizing
        # its KV cache, growth never needs old + new at once, and the tensors never move.
        self.grow = grow
        self.entries = {f: torch.empty(0, *shape, dtype=dt, device=device) for f, (shape, dt) in fields.items()}
        self.entry_of_slot = torch.full((n_slots + 1,), NO_ENTRY, dtype=torch.int64, device=device)
        self.slot_of_entry: list[int | None] = []  # host mirror: which slot holds each entry
        self.slots: set[int] = set()  # host mirror: slots with an entry (forwards skip the stack when none is in the batch)
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return len(self.slot_of_entry)

    def entry_bytes(self) -> int:
        """Bytes of one entry (all fields)."""
        return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for shape, dt in self.fields.values())

    def unallocated_bytes(self) -> int:
        """What the stack may still allocate: up to n_slots entries."""
        return (self.n_slots - self.capacity) * self.entry_bytes()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def in_batch(self, slots: list[int]) -> bool:
        return bool(self.slots) and any(s in self.slots for s in slots)

    def put(self, slot: int, tensors: dict[str, torch.Tensor], copy_stream: torch.cuda.Stream | None = None) -> None:
        """Copy one slot's tensors into a free entry (growing the stack if none is free).

        Called by one thread only (the bank's loader); `drop` may run on any thread meanwhile."""
        self.drop(slot)
        with self._lock:
            full = None not in self.slot_of_entry
        if full:
            self._grow(copy_stream)
        with self._lock:
            e = self.slot_of_entry.index(None)
            self.slot_of_entry[e] = slot  # reserved; rows are pointed at it only once its bytes land
            entries = self.entries
        if copy_stream is not None:  # work already queued may still read the entry's previous tenant
            copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with _on(copy_stream):
            for f, t in tensors.items():
                entries[f][e].copy_(t.expand(self.fields[f][0]), non_blocking=True)
        if copy_stream is not None:
            copy_stream.synchronize()
        with self._lock:
            if self.slot_of_entry[e] == slot:  # not dropped while we copied
                self.entry_of_slot[slot + 1] = e
                self.slots.add(slot)

    def drop(self, slot: int) -> None:
        with self._lock:
            if slot not in self.slot_of_entry:
                return
            e = self.slot_of_entry.index(slot)
            self.slot_of_entry[e] = None
            self.entry_of_slot[slot + 1] = NO_ENTRY
            self.slots.discard(slot)

    def reserve(self) -> None:
        """Allocate every slot's entry now, zeroed, and never grow again: the tensors keep their
        addresses (a captured CUDA graph reads them), and entries no tenant wrote read as zeros."""
        old = self.capacity
        self.grow = "full"
        if old < self.n_slots:
            self._grow(None)
            for t in self.entries.values():
                t[old:].zero_()

    def _grow(self, copy_stream: torch.cuda.Stream | None) -> None:
        old_cap = self.capacity
        cap = self.n_slots if self.grow == "full" else min(self.n_slots, max(1, 2 * old_cap))
        if cap == old_cap:  # cannot happen: each slot holds at most one entry and put drops first
            raise RuntimeError(f"slot stack full at {cap} entries")
        # Allocated on the current stream, so the caching allocator never hands this memory to
        # the copy stream while the compute stream may still read an older tensor there.
        grown = {f: torch.empty(cap, *shape, dtype=dt, device=self.device) for f, (shape, dt) in self.fields.items()}
        if copy_stream is not None:
            copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with _on(copy_stream):
            for f, t in grown.items():
                t[:old_cap].copy_(self.entries[f], non_blocking=True)
        if copy_stream is not None:
            copy_stream.synchronize()
        with self._lock:
            self.entries = grown
            self.slot_of_entry += [None] * (cap - old_cap)


def _on(stream: torch.cuda.Stream | None):
    """`torch.cuda.stream(s)`, or nothing on CPU."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
