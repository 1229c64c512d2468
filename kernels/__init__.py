"""1-bit delta kernels: packing layout, fp32 reference, Triton kernels, the CPU path and the dispatcher.

The Triton modules (triton_decode, triton_delta; triton_grouped for whole matrices per slot,
paged_attention for the paged KV cache) are imported on first use of the Triton path,
so importing this package never compiles or interprets a kernel. Importing it registers the
`deltafleet::delta_linear` custom op (dispatch.py)."""

from .cpu import SignCache, delta_linear_cpu
from .dispatch import delta_linear
from .grouping import BASE_SLOT, SlotGroups, group_rows
from .packing import pack_signs, unpack_bits, unpack_signs
from .reference import delta_linear_reference, dense_delta_weight

__all__ = [
    "BASE_SLOT",
    "SignCache",
    "SlotGroups",
    "delta_linear",
    "delta_linear_cpu",
    "delta_linear_reference",
    "dense_delta_weight",
    "group_rows",
    "pack_signs",
    "unpack_bits",
    "unpack_signs",
]
