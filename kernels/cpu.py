"""The CPU path of `delta_linear`: no Triton; the delta term straight from the packed bits.

Base: one `F.linear` for the whole batch. Deltas, all segments (grouping.py) in one call:

* **native** (the default): `cpu_native.py`, a small C kernel compiled once per machine, reads
  the packed sign words in place and expands them in registers (one AVX-512 masked add per 16
  weights, S·x = 2·B·x − Σx), up to 4 rows of a segment per pass over a tenant's bits. Nothing
  is cached per tenant: the bank's packed stack (N·K/8 bytes) is all it reads.

Without a C compiler (or DELTAFLEET_CPU_KERNEL=torch), per tenant segment, one of:

* **byte LUT** (few rows, cold tenant): x·bᵀ with bits b ∈ {0,1} is a sum over the K/8
  sign bytes of "sum of the x entries whose bits are set in this byte". Build that table
  per row, lut[p, v] = Σ_j bit_j(v)·x[8p + j]  ([K/8, 256], a small matmul), then gather
  it with the packed bytes and sum: N·K/8 gathers instead of unpacking N·K signs. Then
  x·sᵀ = 2·x·bᵀ − rowsum(x). (The T-MAC idea, in torch.)
* **unpack + matmul** (many rows): expand the packed bytes to ±1 through a [256, 8] table
  (one gather, ~3× faster than shift-and-mask) and run one GEMM for the segment.
* **cached signs** (hot tenants, optional `SignCache`): keep the unpacked ±1 matrix and
  just run the GEMM. 32× (fp32) or 16× (bf16) the packed bytes, so it is bounded and LRU.

Measured on the 2-core build machine (AVX-512, 1 torch thread, fp32, best of 7, ms for the
whole layer, base GEMM included; the machine was shared, load 2-5, so treat as rough;
alternatives re-measured by bench/cpu_delta.py):

    layer N×K, tenants × rows        base    torch fp32-cached   native
    256×256, 16 × 1 (decode)         0.023   0.49                0.09
    256×704, 16 × 1                  0.060   1.67 (0.79 idle)    0.17
    256×704, 64 × 1                  0.16    3.6                 0.60
    4096×4096, 1 × 1                 2.5     15.4                2.9
    4096×4096, 4 × 1                 5.2     27.6                7.8
    4096×4096, 1 × 16 (prefill)      9.6     25.0                18.7

Torch-only alternatives that lost (same machine, one 256×256 tenant, 1 row, ms): fp32 cached
GEMV 0.008, byte-LUT gather 0.035, LUT through embedding_bag(mode="sum") 0.13, int8 signs
through _weight_int8pack_mm 0.037 (and 12 ms at 4096², vs 2.4 fp32), int8 `_int_mm` with x
split exactly into four int8 planes ~9 µs a call (it re-lays out its weights every call);
all tenants in one grouped_mm/bmm over cached fp32 signs halves the per-tenant overhead
but stays bound by reading 4 bytes per weight (0.25 ms for 16 × 256×256).
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import cpu_native
from .grouping import TenantGroups

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
    """Unpacked ±1 sign matrices of hot (layer, tenant) pairs, LRU-bounded by bytes.

    Keyed by the packed stack's storage, version counter, shape and tenant: writing a new
    tenant into a stack in place bumps its version, so a stale entry can never be hit. An
    entry holds a reference to its stack, so the storage cannot be freed and reused."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, signs: torch.Tensor, tenant: int, dtype: torch.dtype) -> torch.Tensor:
        key = (signs.data_ptr(), signs._version, tuple(signs.shape), tuple(signs.stride()), tenant, dtype)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[1]
        self.misses += 1
        dense = unpack_signs_fast(signs[tenant], dtype)
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
    groups: TenantGroups,
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
            groups.order.contiguous(), groups.seg_start.contiguous(), groups.seg_tenant.contiguous(),
        )
        return y.to(x.dtype)
    # bf16 activations lose nothing to a bf16 sign GEMM (signs are exact); fp16/fp32 use fp32.
    gemm_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    for s, tenant in enumerate(groups.tenants):
        if tenant < 0:
            continue
        rows = groups.rows_of(s).long()
        xs = x32.index_select(0, rows)
        if sign_cache is not None:
            dense = sign_cache.get(signs, tenant, gemm_dtype)
            d = (xs.to(gemm_dtype) @ dense.t()).float()
        elif rows.numel() <= LUT_MAX_ROWS:
            d = signed_dot_lut(xs, signs[tenant])
        else:
            d = (xs.to(gemm_dtype) @ unpack_signs_fast(signs[tenant], gemm_dtype).t()).float()
        alpha = scales[tenant].float()
        y.index_add_(0, rows, d * alpha)  # alpha: scalar, or [N] broadcast over rows
    return y.to(x.dtype)
