"""`delta_linear`: the one entry point layers call. Picks the path for the device.

    y[m] = x[m]·W_baseᵀ + scales[t]·(x[m]·sign(Δ_t)ᵀ),  t = slot_of_row[m]  (BASE_SLOT: base only)

* CUDA: the `deltafleet::delta_linear` custom op (torch.library), so torch.compile and
  CUDA-graph capture see one opaque op with a fake (meta) implementation. Inside it:
  - M <= table.decode_max_rows (decode): triton_decode.py, base and deltas in one launch,
    W read once for the batch, slots read on the device (no metadata to build);
  - more rows (prefill): cuBLAS base GEMM + triton_delta.py over the device-built segment
    map (segments.py). No host sync on either path; launch configs from launch_table.py.
  The device is taken from x (`torch.cuda.device(x.device)`): a replica on cuda:1 launches
  on cuda:1. fp16/bf16 only: fp32 activations on CUDA are refused (cast the model).
* CPU (cpu.py): the native bit kernel (cpu_native.py, every segment in one call, packed bits
  read in place); without a C compiler, torch ops: byte-LUT for few rows, unpack+GEMM for
  many, optional sign cache.

Optional keywords: `groups` (from `group_rows`: the CPU path's host-side segments; on CUDA
it is only checked, the op builds what it needs on the device), `sign_cache` (CPU only),
`backend="triton"` runs the Triton op on CPU tensors (the interpreter; tests).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .cpu import SignCache, delta_linear_cpu
from .grouping import SlotGroups, group_rows
from .validation import check_delta_linear_args, check_rows


def delta_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    slot_of_row: torch.Tensor,
    *,
    groups: SlotGroups | None = None,
    sign_cache: SignCache | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """[M, K] x -> [M, N] in x's dtype. Shapes and the packing layout: reference.py, packing.py."""
    m, _, _, t = check_delta_linear_args(x, base_weight, signs, scales)
    check_rows(slot_of_row, m, x.device)
    if groups is not None:
        if groups.num_rows != m:
            raise ValueError(f"groups cover {groups.num_rows} rows but x has M={m}")
        if groups.slots and groups.slots[-1] >= t:  # slots are sorted; a kernel would read past the stack
            raise ValueError(f"groups name slot {groups.slots[-1]}, but the signs stack has {t} slots")
    backend = backend or ("triton" if x.is_cuda else "cpu")
    if backend == "cpu":
        return delta_linear_cpu(x, base_weight, signs, scales, groups or group_rows(slot_of_row, t), sign_cache)
    if backend != "triton":
        raise ValueError(f"backend must be 'cpu' or 'triton', got {backend!r}")
    if x.is_cuda and x.dtype == torch.float32:
        raise TypeError(
            "fp32 activations on CUDA are not supported by the Triton delta kernels (fp32 tiles double "
            "the registers and bytes of the fp16/bf16 ones): run the model in float16 or bfloat16"
        )
    return torch.ops.deltafleet.delta_linear(x, base_weight, signs, scales, slot_of_row)


@torch.library.custom_op("deltafleet::delta_linear", mutates_args=())
def _delta_linear_op(
    x: torch.Tensor, base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor, slot_of_row: torch.Tensor
) -> torch.Tensor:
    """The Triton path (arguments already checked by `delta_linear`)."""
    from .launch_table import device_facts, split_k_for, table_for
    from .segments import segment_meta
    from .triton_decode import decode_delta_linear
    from .triton_delta import prefill_delta_accumulate

    m, k = x.shape
    n, t = base_weight.shape[0], signs.shape[0]
    if m == 0:
        return x.new_empty((0, n))
    gpu, sms = device_facts(x.device)
    table = table_for(gpu)
    on_device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with on_device:
        if m <= table.decode_max_rows:
            config = table.decode_config(m)
            return decode_delta_linear(x, base_weight, signs, scales, slot_of_row, config,
                                       split_k_for(config, m, n, k, sms))
        y = F.linear(x, base_weight)  # [M, N]: cuBLAS, W read once for the batch
        meta = segment_meta(slot_of_row, t, table.prefill.block_m)
        return prefill_delta_accumulate(y, x, signs, scales, meta, table.prefill)


@_delta_linear_op.register_fake
def _(x, base_weight, signs, scales, slot_of_row):
    return x.new_empty((x.shape[0], base_weight.shape[0]))
