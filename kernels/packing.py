"""Sign packing: the one bit layout every kernel, the delta file and the loader share.

Layout (the contract — change it only together with every kernel):

    A sign matrix S of shape [N, K] (out_features, in_features), S in {-1, +1},
    is stored as int32 words P of shape [N, K // 32], row-major, where

        bit j of P[n, w]  ==  1  iff  S[n, 32*w + j] == +1        (j = 0 is the LSB)

Why this layout: a decode GEMV reads x[K] once and streams the sign rows; packing along
K keeps each output row's bits contiguous, so a kernel tile of [BLOCK_N, BLOCK_K // 32]
words is one coalesced 2-D load, and the reduction over K stays inside a program.
int32 (not uint32) because torch and Triton both do full bitwise arithmetic on it.
Δ == 0 maps to +1: the scale makes its contribution small either way, and a fixed
rule keeps packing deterministic. Stacks of tenants are [T, N, K // 32].
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def check_packable(shape: tuple[int, ...]) -> None:
    """Refuse shapes that cannot be packed, with a message that says why."""
    if len(shape) != 2:
        raise ValueError(f"sign packing needs a 2-D [out, in] matrix, got shape {tuple(shape)}")
    n, k = shape
    if n == 0 or k == 0:
        raise ValueError(f"sign packing needs a non-empty matrix, got shape {tuple(shape)}")
    if k % WORD_BITS:
        raise ValueError(
            f"in_features K={k} is not a multiple of {WORD_BITS}: the 1-bit layout packs "
            f"{WORD_BITS} columns per int32 word (shape {tuple(shape)})"
        )


def pack_signs(delta: torch.Tensor) -> torch.Tensor:
    """Pack sign(delta) of shape [N, K] into int32 words of shape [N, K // 32]."""
    check_packable(tuple(delta.shape))
    n, k = delta.shape
    bits = (delta >= 0).reshape(n, k // WORD_BITS, WORD_BITS).to(torch.int64)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=delta.device) << torch.arange(
        WORD_BITS, device=delta.device
    )
    words = (bits * weights).sum(-1)  # in [0, 2^32): reinterpret as int32 below
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """[..., N, K // 32] int32 -> [..., N, K] uint8 bits in {0, 1}."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed signs must be int32, got {packed.dtype}")
    shifts = torch.arange(WORD_BITS, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * WORD_BITS).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K // 32] int32 -> [..., N, K] signs in {-1, +1} of `dtype`."""
    return unpack_bits(packed).to(dtype) * 2 - 1
