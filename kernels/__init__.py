"""1-bit delta kernels: packing layout, fp32 reference, Triton kernels and the dispatcher."""

from .dispatch import delta_linear
from .packing import pack_signs, unpack_bits, unpack_signs
from .reference import delta_linear_reference, dense_delta_weight

__all__ = ["delta_linear", "delta_linear_reference", "dense_delta_weight", "pack_signs", "unpack_bits", "unpack_signs"]
