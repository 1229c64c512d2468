"""The CPU path of `delta_linear`: no Triton; the delta term straight from the packed bits.

Base: one `F.linear` for the whole batch. Deltas, all segments (grouping.py) in one call:

* **native** (the default): `cpu_native.py`, a small C kernel compiled once per machine, reads
  the packed sign words in place and expands them in registers (one AVX-512 masked add per 16
  weights, S·x = 2·B·x − Σx), up to 4 rows of a segment per pass over a slot's bits. Nothing
  is cached per slot: the bank's packed stack (N·K/8 bytes) is all it reads.

Without a C compiler (or DELTAFLEET_CPU_KERNEL=torch), per slot segment, one of:

* **byte LUT** (few rows, cold slot): x·bᵀ with bits b ∈ {0,1} is a sum over the K/8
  sign bytes of "sum of the x entries whose bits are set in this byte". Build that table
  per row, lut[p, v] = Σ_j bit_j(v)·x[8p + j]  ([K/8, 256], a small matmul), then gather
  it with the packed bytes and sum: N·K/8 gathers instead of unpacking N·K signs. Then
  x·sᵀ = 2·x·bᵀ − rowsum(x). (The T-MAC idea, in torch.)
* **unpack + matmul** (many rows): expand the packed bytes to ±1 through a [256, 8] table
  (one gather, ~3× faster than shift-and-mask) and run one GEMM for the segment.
* **cached signs** (hot slots, optional `SignCache`): keep the unpacked ±1 matrix and
  just run the GEMM. 32× (fp32) or 16× (bf16) the packed bytes, so it is bounded and LRU.

Measured by bench/cpu_delta.py (results/cpu-delta-cpu.json; 2 shared cores, AVX-512, 1 torch
thread, fp32, best of 5, load average 1.2, still a shared machine), ms:

    whole layer, base GEMM included     base    torch loop, fp32 cached   one grouped_mm, fp32   native
    256×256, 16 tenants × 1 row         0.020   0.46                      0.26                   0.060
    256×704, 16 tenants × 1 row         0.049   0.82                      0.59                   0.133
    4096×4096, 4 tenants × 1 row        4.8     27.4                      25.8                   7.0

    one tenant's delta term             native  fp32 cached  LUT gather  LUT embedding_bag  int8pack_mm  int8 planes + _int_mm
    4096×4096, 1 row                    0.34    2.41         4.10        27.6               8.75         1.45
    4096×4096, 16 rows                  3.29    8.62         -           -                  -            2.81
    256×704, 16 rows                    0.049   0.051        0.88        0.71               1.49         0.110

fp32 cached signs win only while one tenant's matrix sits in L2; int8 planes (x split exactly
into four int8 planes, AMX) need 1 byte per weight cached and cost ~9 µs a call at serving
shapes. The torch fallback below keeps the byte LUT up to LUT_MAX_ROWS rows and unpack above.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import cpu_native
from .grouping import BASE_SLOT, SlotGroups

LUT_MAX_ROWS = 4

if sys.byteorder != "little":  # the uint8 view of the int32 words below assumes it
    raise ImportError("deltafleet.kernels.cpu assumes a little-endian host")

_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float()  # [256, 8]: bit j of byte v
_SIGNS = _BITS * 2 - 1


def sign_bytes(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/32] int32 -> [N, K/8] uint8; byte p holds the signs of columns 8p..8p+7 (bit j = column 8p+j)."""
    return packed.contiguous().view(torch.uint8)


def unpack_signs_fast(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same result as packing.unpack_signs for one [N, K/32] matrix, through a byte table."""
    n = packed.shape[0]
    return _SIGNS.to(dtype)[sign_bytes(packed).long()].reshape(n, -1)


def signed_dot_lut(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [m, K] fp32 · sign(Δ)ᵀ for one packed [N, K/32] matrix -> [m, N] fp32, via byte tables."""
    m, k = x.shape
    idx = sign_bytes(packed).long()  # [N, K/8]
    lut = (x.view(m, k // 8, 8) @ _BITS.t()).transpose(1, 2)  # [m, 256, K/8]: lut[i, v, p]
    out = torch.stack([lut[i].gather(0, idx).sum(1) for i in range(m)])  # [m, N] = x·bᵀ
    return 2 * out - x.sum(1, keepdim=True)


class SignCache:
    """Unpacked ±1 sign matrices of hot (layer, slot) pairs, LRU-bounded by bytes.

    Keyed by the packed stack's storage, version counter, shape and slot: writing a new
    delta into a slot of a stack in place bumps its version, so a stale entry can never be hit. An
    entry holds a reference to its stack, so the storage cannot be freed and reused."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, signs: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
        key = (signs.data_ptr(), signs._version, tuple(signs.shape), tuple(signs.stride()), slot, dtype)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[1]
        self.misses += 1
        dense = unpack_signs_fast(signs[slot], dtype)
        size = dense.numel() * dense.element_size()
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            self._entries[key] = (signs, dense)
            self.bytes += size
        return dense

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def delta_linear_cpu(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    signs: torch.Tensor,
    scales: torch.Tensor,
    groups: SlotGroups,
    sign_cache: SignCache | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + α_t·(x·sign(Δ_t)ᵀ) per row on CPU; fp32 accumulation, returned in x's dtype."""
    y = F.linear(x, base_weight).float()
    x32 = x.float()
    # The C kernel writes y in place, outside autograd: a call that needs gradients takes torch ops.
    grad = torch.is_grad_enabled() and (x.requires_grad or scales.requires_grad or base_weight.requires_grad)
    lib = None if grad else cpu_native.load()
    if lib is not None:  # every segment in one call, from the packed bits (sign_cache unused)
        if not y.is_contiguous():
            y = y.contiguous()
        cpu_native.delta_accumulate(
            lib, y, x32 if x32.stride(1) == 1 else x32.contiguous(),
            signs if signs.stride(2) == 1 else signs.contiguous(), scales.float(),
            groups,
        )
        return y.to(x.dtype)
    # bf16 activations lose nothing to a bf16 sign GEMM (signs are exact); fp16/fp32 use fp32.
    gemm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    for s, slot in enumerate(groups.slots):
        if slot == BASE_SLOT:
            continue
        rows = groups.rows_of(s).long()
        xs = x32.index_select(0, rows)
        if sign_cache is not None:
            dense = sign_cache.get(signs, slot, gemm_dtype)
            d = (xs.to(gemm_dtype) @ dense.t()).float()
        elif rows.numel() <= LUT_MAX_ROWS:
            d = signed_dot_lut(xs, signs[slot])
        else:
            d = (xs.to(gemm_dtype) @ unpack_signs_fast(signs[slot], gemm_dtype).t()).float()
        alpha = scales[slot].float()
        y.index_add_(0, rows, d * alpha)  # alpha: scalar, or [N] broadcast over rows
    return y.to(x.dtype)
