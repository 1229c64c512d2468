"""A fingerprint of a base model's weights, so a delta is never applied to the wrong base.

Hashing every byte of a 7B model costs tens of seconds on each replica start, so the
fingerprint hashes each tensor's name, shape and up to SAMPLE evenly strided values.
Values are rounded to bf16 first, so the same checkpoint loaded in fp32, bf16 or on
another device gives the same fingerprint. Two different bases (or a base and its
fine-tune) differ in sampled values with overwhelming probability.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

SAMPLE = 4096


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    tensors = dict(named)
    return fingerprint_lazy(tensors, tensors.__getitem__)


def fingerprint_lazy(names: Iterable[str], get: Callable[[str], torch.Tensor]) -> str:
    """The same fingerprint, reading one tensor at a time (e.g. from a safetensors checkpoint)."""
    h = hashlib.sha256()
    for name in sorted(names):
        t = get(name)
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def fingerprint_model(model: torch.nn.Module) -> str:
    """Fingerprint of a model's parameters (tied weights count once, by first name)."""
    return fingerprint_tensors(model.named_parameters())
