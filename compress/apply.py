"""Put a delta onto a base model: as live 1-bit modules (distillation, eval) or merged dense (merge).

Live: each compressed nn.Linear becomes `DeltaLinear`, computing x·W_baseᵀ + α·(x·sign(Δ)ᵀ)
from the packed bits (the same sum the serving kernel computes), so only 1 bit per weight
is added to the base and α can be trained. Merged: W ← W_base + α·sign(Δ) in place, which is
what `deltafleet merge` writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltafleet.kernels.packing import unpack_signs
from deltafleet.kernels.reference import dense_delta_weight

from .format import Delta, check_against_model


class DeltaModule(nn.Module):
    """A frozen base module plus a 1-bit delta: packed signs (a buffer) and a trainable scale α."""

    def __init__(self, base: nn.Linear | nn.Embedding, packed: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("packed", packed.to(base.weight.device), persistent=False)
        self.scale = nn.Parameter(scale.detach().float().clone().to(base.weight.device))
        self.enabled = True


class DeltaLinear(DeltaModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        signs = unpack_signs(self.packed, x.dtype)
        return y + F.linear(x, signs) * self.scale.to(x.dtype)  # [] or [N]: broadcasts over the output dim


class DeltaEmbedding(DeltaModule):
    @property
    def weight(self) -> torch.Tensor:  # HF code reads embed_tokens.weight.dtype/device
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        if not self.enabled:
            return y
        signs = unpack_signs(self.packed[ids], y.dtype)  # only the looked-up rows
        scale = self.scale[ids].unsqueeze(-1) if self.scale.dim() == 1 else self.scale
        return y + signs * scale.to(y.dtype)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def copy_whole(model: nn.Module, delta: Delta) -> None:
    """Overwrite the parameters the delta stores whole (embeddings, norms, ...) with the fine-tune's."""
    params = dict(model.named_parameters())
    for name, t in delta.whole.items():
        params[name].copy_(t.to(params[name].device, params[name].dtype))


def attach_delta(model: nn.Module, delta: Delta) -> dict[str, DeltaModule]:
    """Wrap every compressed module of `model` (in place) and copy whole params; returns the wrappers."""
    check_against_model(delta, model)
    copy_whole(model, delta)
    wrappers: dict[str, DeltaModule] = {}
    for name, packed in delta.signs.items():
        mod = model.get_submodule(name)
        cls = DeltaEmbedding if isinstance(mod, nn.Embedding) else DeltaLinear
        wrappers[name] = cls(mod, packed, delta.scales[name])
        _set_module(model, name, wrappers[name])
    return wrappers


def read_scales(wrappers: dict[str, DeltaModule]) -> dict[str, torch.Tensor]:
    return {name: w.scale.detach().float().cpu().clone() for name, w in wrappers.items()}


def set_enabled(wrappers: dict[str, DeltaModule], enabled: bool) -> None:
    for w in wrappers.values():
        w.enabled = enabled


@torch.no_grad()
def merge_delta(model: nn.Module, delta: Delta) -> None:
    """W ← W_base + α·sign(Δ) for every compressed module, and whole params copied, in place."""
    check_against_model(delta, model)
    copy_whole(model, delta)
    for name, packed in delta.signs.items():
        w = model.get_submodule(name).weight
        w.copy_(dense_delta_weight(w, packed.to(w.device), delta.scales[name].to(w.device)).to(w.dtype))
