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
    return fingerprint_samples({name: tensor_sample(name, get(name)) for name in names})


def tensor_sample(name: str, t: torch.Tensor) -> bytes:
    """What the fingerprint keeps of one tensor (a few KiB), so a caller that reads every
    tensor anyway can collect these on the way instead of reading the checkpoint twice."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step][:SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
    return f"{name}:{tuple(t.shape)}\n".encode() + sample.numpy().tobytes()


def fingerprint_samples(samples: dict[str, bytes]) -> str:
    """The fingerprint from every tensor's `tensor_sample`, keyed by name."""
    h = hashlib.sha256()
    for name in sorted(samples):
        h.update(samples[name])
    return h.hexdigest()[:32]


def fingerprint_model(model: torch.nn.Module) -> str:
    """Fingerprint of a model's parameters (tied weights count once, by first name)."""
    return fingerprint_tensors(model.named_parameters())
