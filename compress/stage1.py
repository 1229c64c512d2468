"""Stage 1 of BitDelta: Δ = W_ft − W_base → packed sign(Δ) and α = mean|Δ|, one tensor at a time.

Base and fine-tune are streamed from their safetensors files tensor by tensor (only the
pair being compared is ever in memory, on `device`). Parameters that are not 1-bit
compressed are stored whole where they differ from the base.
"""

from __future__ import annotations

import torch

from deltafleet.kernels.packing import pack_signs

from .checkpoint import Checkpoint, InputError, empty_model
from .fingerprint import fingerprint_samples, tensor_sample
from .format import Delta
from .linears import compressed_modules
from .progress import progress


def sign_and_scale(delta: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sign(Δ) and the L2-optimal scale for it: mean|Δ| (per matrix, or per output row)."""
    d = delta.float()
    scale = d.abs().mean(dim=1) if per_row else d.abs().mean()
    return pack_signs(d), scale.float().cpu()


def extract(
    base: Checkpoint,
    ft: Checkpoint,
    per_row: bool = False,
    compress_embeddings: bool = False,
    device: str | torch.device = "cpu",
) -> Delta:
    """The stage-1 delta of `ft` against `base` (both already checked compatible)."""
    skeleton = empty_model(base.dir)
    try:
        compressed = compressed_modules(skeleton, compress_embeddings)
    except ValueError as e:
        raise InputError(f"base {base.dir}: {e}") from None
    param_names = [n for n, _ in skeleton.named_parameters()]  # tied weights once, by first name
    missing = [n for n in param_names if n not in base.model_keys()]
    if missing:
        raise InputError(f"base {base.dir}: checkpoint has no tensor for parameter {missing[0]!r} of {base.architecture} "
                         f"({len(missing)} missing; keys read as transformers maps them on load)")
    delta = Delta(base_model=base.source, base_fingerprint="", finetuned_model=ft.source)
    weight_of = {f"{m}.weight": m for m in compressed}
    samples = {}  # the base fingerprint, collected from the reads stage 1 makes anyway
    for name in progress(param_names, "stage 1: sign + scale", unit="tensor"):
        b = base.param(name)
        samples[name] = tensor_sample(name, b)
        b = b.to(device)
        f = ft.param(name).to(device)
        for what, t in (("base", b), ("fine-tune", f)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise InputError(f"{what} {(base if what == 'base' else ft).dir}: tensor for {name!r} holds NaN or inf values")
        if name in weight_of:
            module = weight_of[name]
            delta.signs[module], delta.scales[module] = sign_and_scale(f.float() - b.float(), per_row)
            delta.signs[module] = delta.signs[module].cpu()
        elif not torch.equal(b, f):
            delta.whole[name] = f.cpu()
        del b, f
    delta.base_fingerprint = fingerprint_samples(samples)
    return delta
