"""Argument checks shared by the dispatcher and the kernel wrappers: one clear line per mistake."""

from __future__ import annotations

import torch

from .packing import WORD_BITS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_delta_linear_args(
    x: torch.Tensor, base_weight: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; returns (M, N, K, T), T = slots in the stack."""
    if base_weight.dim() != 2:
        raise ValueError(f"base_weight must be 2-D [N, K], got shape {tuple(base_weight.shape)}")
    n, kw = base_weight.shape
    m, k, t = check_delta_args(x, signs, scales)
    if kw != k or signs.shape[1] != n:
        raise ValueError(f"base_weight is [N={n}, K={kw}] but x has K={k} and signs N={signs.shape[1]}")
    if base_weight.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but base_weight is {base_weight.dtype}")
    if base_weight.device != x.device:
        raise ValueError(f"device mismatch: x is on {x.device} but base_weight is on {base_weight.device}")
    return m, n, k, t


def check_delta_args(x: torch.Tensor, signs: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, int]:
    """The checks of the delta part alone (N comes from signs); returns (M, K, T)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    if k % WORD_BITS:
        raise ValueError(f"K={k} is not a multiple of {WORD_BITS}: signs pack {WORD_BITS} columns per int32 word")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if signs.dtype != torch.int32:
        raise TypeError(f"signs must be packed int32 words, got {signs.dtype}")
    if signs.dim() != 3 or signs.shape[2] != k // WORD_BITS:
        raise ValueError(f"signs must be [T, N, K/32={k // WORD_BITS}] int32, got shape {tuple(signs.shape)}")
    t, n = signs.shape[0], signs.shape[1]
    if not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be floating point, got {scales.dtype}")
    if tuple(scales.shape) not in ((t,), (t, n)):
        raise ValueError(f"scales must be [T={t}] or [T={t}, N={n}], got shape {tuple(scales.shape)}")
    for name, tensor in (("signs", signs), ("scales", scales)):
        if tensor.device != x.device:
            raise ValueError(f"device mismatch: x is on {x.device} but {name} is on {tensor.device}")
    return m, k, t


def check_rows(slot_of_row: torch.Tensor, m: int, device: torch.device) -> None:
    if slot_of_row.dim() != 1 or slot_of_row.shape[0] != m:
        raise ValueError(f"slot_of_row must be [M={m}], got shape {tuple(slot_of_row.shape)}")
    if slot_of_row.device != device:
        raise ValueError(f"device mismatch: x is on {device} but slot_of_row is on {slot_of_row.device}")
