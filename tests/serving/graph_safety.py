"""What a CUDA graph needs of a step, checked on CPU: no host sync, and the same ops whatever the data.

`NoHostSync` fails any op that reads a tensor's value on the host (`.item()`, `.tolist()`,
`bool(t)`, `torch.equal`) or whose output shape depends on values (`nonzero`, boolean-mask
indexing): on CUDA each is a device sync, and inside graph capture an error or a frozen value.
`OpTrace` records every op with its input shapes: two runs of one bucket with different
tenant mixes must record the same list — a CUDA graph replays exactly what it captured.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default, aten.item.default, aten.equal.default, aten.is_nonzero.default,
    aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
    aten._unique2.default, aten.unique_dim.default,
}


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "numpy", "cpu")


class NoHostSync(TorchDispatchMode):
    """Also forbids the Tensor methods that read values on the host (on CPU, `.tolist()` and
    `bool(t)` read memory without dispatching an op).

    `cuda_rules`: also fail the ops that are syncs on CUDA though not on CPU, for a CPU run of
    a step as CUDA would compute it: `aten._grouped_mm` off bf16 (torch's fallback copies the
    offsets to the host; bf16 is sync-free on sm90/sm100 only; CPU tests run fp32 through it
    legitimately, hence opt-in)."""

    saved: dict = {}  # the real Tensor methods while one is active

    def __init__(self, cuda_rules: bool = False) -> None:
        super().__init__()
        self.cuda_rules = cuda_rules

    def __enter__(self):
        NoHostSync.saved = self._saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name in HOST_READS:
            setattr(torch.Tensor, name, _forbidden(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        NoHostSync.saved = {}
        return super().__exit__(*exc)


    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or func.overloadpacket in {aten.nonzero, aten.masked_select}:
            raise AssertionError(f"{func} reads device values on the host (a sync; not capturable in a CUDA graph)")
        if func.overloadpacket is aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])):
            raise AssertionError("boolean-mask indexing has a data-dependent shape (a sync)")
        if self.cuda_rules and func.overloadpacket is aten._grouped_mm and args[0].dtype != torch.bfloat16:
            raise AssertionError(f"_grouped_mm on {args[0].dtype} copies its offsets to the host on CUDA (a sync)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _host_reads_allowed():
    forbidden = {name: getattr(torch.Tensor, name) for name in NoHostSync.saved}
    for name, fn in NoHostSync.saved.items():
        setattr(torch.Tensor, name, fn)
    try:
        yield
    finally:
        for name, fn in forbidden.items():
            setattr(torch.Tensor, name, fn)


def _forbidden(name: str):
    def read(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name}() reads device values on the host (a sync; not capturable in a CUDA graph)")
    return read


class OpTrace(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cpu_kernel_as_one_op(trace: OpTrace | None = None):
    """Treat the CPU bit kernel as what CUDA runs in its place: one opaque op over tensors.

    Its host-side grouping (SlotGroups) exists only on CPU, where nothing is captured; on
    CUDA the custom op reads each row's slot on the device. Inside this context the CPU
    kernel runs outside the dispatch modes, recorded (if `trace`) as one op with its shapes."""
    from deltafleet.kernels import dispatch

    original = dispatch.delta_linear_cpu

    def opaque(x, w, signs, scales, groups, sign_cache=None):
        if trace is not None:
            trace.ops.append(("deltafleet.delta_linear", (tuple(x.shape), tuple(w.shape), tuple(signs.shape), tuple(scales.shape))))
        with _disable_current_modes(), _host_reads_allowed():
            return original(x, w, signs, scales, groups, sign_cache)

    dispatch.delta_linear_cpu = opaque
    try:
        yield
    finally:
        dispatch.delta_linear_cpu = original


@contextlib.contextmanager
def triton_launch_as_one_op(module, trace: OpTrace | None = None):
    """Run a Triton kernel module's `_launch` as what CUDA runs: one opaque op over tensors.

    Under the interpreter a launch copies its tensors to host memory (reads forbidden inside
    NoHostSync); on a GPU it is one kernel that reads its arguments on the device. The host
    code around the launch (allocation, checks) still runs inside the dispatch modes."""
    original = module._launch

    def opaque(grid, *args, **meta):
        if trace is not None:
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            trace.ops.append((f"{module.__name__}._launch", (tuple(grid), *shapes)))
        with _disable_current_modes(), _host_reads_allowed():
            return original(grid, *args, **meta)

    module._launch = opaque
    try:
        yield
    finally:
        module._launch = original
