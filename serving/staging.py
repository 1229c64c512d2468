"""A step's host-decided inputs reach the device in ONE copy.

Token ids, positions, KV indices, `slot_of_row` and sampling parameters are decided on the host.
Sent one `torch.tensor(..., device=...)` at a time they cost a blocking copy each (15-20 per
mixed step), and a pageable source makes even `non_blocking=True` wait. Here a step writes
every field with numpy into one host byte buffer (`Pack`), sends it with a single
`copy_(non_blocking=True)`, and reads device views into that copy (one per field).

On CUDA the host buffer is pinned, so the copy is truly asynchronous, and two buffers
alternate (`Staging`): the host fills one while the previous step's copy may still read the
other; before reusing a buffer it waits for that buffer's own copy (normally long done).
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN = 8  # bytes: every field starts where an int64 view may start
NUMPY = {torch.int64: np.int64, torch.float32: np.float32, torch.bool: np.bool_, torch.int32: np.int32}


class Staging:
    """Two alternating host buffers (pinned on CUDA) and the one copy each step sends."""

    def __init__(self, device: torch.device, pinned: bool | None = None) -> None:
        self.device = device
        self.pinned = device.type == "cuda" if pinned is None else pinned  # pin_memory fails on a CPU-only torch
        self._host = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._sent: list[torch.cuda.Event | None] = [None, None]  # each buffer's last copy
        self._turn = 0
        self.copies = 0  # sends: one host -> device copy per step (none on CPU without a dst; tests count them)

    def host(self, nbytes: int) -> torch.Tensor:
        """The next host buffer ([nbytes] uint8), free to overwrite: its previous copy has finished."""
        self._turn ^= 1
        k = self._turn
        if self._sent[k] is not None:
            self._sent[k].synchronize()  # the step two back: already read by the engine, so already done
            self._sent[k] = None
        if self._host[k].numel() < nbytes:
            size = max(nbytes, 2 * self._host[k].numel())
            self._host[k] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        return self._host[k][:nbytes]

    def send(self, host: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """host [N] uint8 -> dst [N] uint8 on the device (a new tensor unless given), not waited for.
        On CPU without dst the host buffer is the step's input itself: nothing to copy (it is
        rewritten two sends later, when the step that read it has long finished)."""
        self.copies += 1
        if dst is None and self.device.type == "cpu":
            return host
        if dst is None:
            dst = torch.empty(host.shape, dtype=torch.uint8, device=self.device)
        dst.copy_(host, non_blocking=True)
        if self.pinned:
            self._sent[self._turn] = torch.cuda.Event()
            self._sent[self._turn].record()
        return dst


class Pack:
    """The fields of one copy: `add` each (host values), then `send` -> their device views, in add order."""

    def __init__(self) -> None:
        self.fields: list[tuple[np.ndarray, torch.dtype]] = []

    def add(self, values, dtype: torch.dtype) -> int:
        """values: a list or numpy array of any shape; returns the field's index in `send`'s list."""
        self.fields.append((np.ascontiguousarray(values, dtype=NUMPY[dtype]), dtype))
        return len(self.fields) - 1

    def nbytes(self) -> int:
        return self._offsets()[-1]

    def send(self, staging: Staging | None, device: torch.device,
             dst: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Write every field into a host buffer, copy it once; (the device buffer, a view per field).
        staging None: a one-off pageable buffer (still one copy). dst: a device buffer to refill
        in place (a captured graph reads its address); it must have this pack's size."""
        offsets = self._offsets()
        staging = staging or Staging(device, pinned=False)  # pinning a one-off buffer costs more than it saves
        host = staging.host(offsets[-1])
        buf = host.numpy()  # [N] uint8, the same memory
        for (a, _), off in zip(self.fields, offsets):
            buf[off: off + a.nbytes] = a.reshape(-1).view(np.uint8)
        if dst is not None and dst.numel() != offsets[-1]:
            raise ValueError(f"staged buffer holds {dst.numel()} bytes, this step packs {offsets[-1]}")
        dev = staging.send(host, dst)
        return dev, [dev[off: off + a.nbytes].view(dt).view(a.shape) for (a, dt), off in zip(self.fields, offsets)]

    def _offsets(self) -> list[int]:
        """Start of each field (aligned), then the total size."""
        out, end = [], 0
        for a, _ in self.fields:
            out.append(end)
            end += -(-a.nbytes // ALIGN) * ALIGN
        return out + [max(end, ALIGN)]
