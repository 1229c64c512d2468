"""Counting what a step sends from the host, checked on CPU (where the device is the host too).

A tensor built from Python values (`torch.tensor(list)`: `aten.lift_fresh`) is, on CUDA, one
more copy from pageable memory that blocks the host; a step's host-decided inputs should
instead travel together in the step's one staged copy (`serving.staging`). `Transfers`
counts both kinds, outside the model's own forward (whose ops are not step preparation)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
FROM_PYTHON = {aten.lift_fresh, aten.lift_fresh_copy}


class Transfers(TorchDispatchMode):
    """Ops outside `model`'s forward: tensors made from Python values, and every copy_/_to_copy."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.from_python = 0
        self.copies = 0
        self._in_forward = 0

    @contextlib.contextmanager
    def counting(self):
        handles = [self.model.register_forward_pre_hook(lambda *a: self._enter()),
                   self.model.register_forward_hook(lambda *a: self._leave())]
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self) -> None:
        self._in_forward += 1

    def _leave(self) -> None:
        self._in_forward -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_forward:
            if func.overloadpacket in FROM_PYTHON:
                self.from_python += 1
            elif func.overloadpacket in (aten.copy_, aten._to_copy):
                self.copies += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cpu_grouping_outside_modes():
    """The CPU kernel's host-side row grouping (`group_rows`: CPU only, on CUDA the kernels read
    each row's slot on the device) runs outside the dispatch modes (not counted, not a sync)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from deltafleet.serving import layers
    from graph_safety import _host_reads_allowed

    original = layers.group_rows

    def opaque(*args, **kwargs):
        with _disable_current_modes(), _host_reads_allowed():
            return original(*args, **kwargs)

    layers.group_rows = opaque
    try:
        yield
    finally:
        layers.group_rows = original
