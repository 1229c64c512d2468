"""A low-rank baseline at BitDelta's byte budget: Δ ≈ U_r·diag(S_r)·V_rᵀ with fp16 factors.

For an [N, K] matrix BitDelta spends N·K/8 bytes of signs plus its scale(s); the baseline
takes the largest rank r with r·(N + K)·2 bytes within that budget (at least 1). Everything
the delta stores whole stays the fine-tune's value in both, so the comparison is only about
how the block linears are compressed.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .format import Delta

FACTOR_BYTES = 2  # fp16 factors


def rank_for_budget(n: int, k: int, budget_bytes: int) -> int:
    return max(1, min(n, k, budget_bytes // ((n + k) * FACTOR_BYTES)))


def low_rank(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    a = (u[:, :rank] * s[:rank]).half()
    b = vh[:rank].half()
    return a.float() @ b.float()


@torch.no_grad()
def apply_low_rank(model, base: Checkpoint, ft: Checkpoint, bitdelta: Delta) -> int:
    """Replace each 1-bit-compressed weight of `model` (loaded from the fine-tune) by
    W_base + low-rank(Δ) at the same byte budget. Returns the baseline's bytes for those matrices."""
    total = 0
    for name, packed in bitdelta.signs.items():
        w = model.get_submodule(name).weight
        n, k = w.shape
        budget = packed.numel() * packed.element_size() + bitdelta.scales[name].numel() * 4
        r = rank_for_budget(n, k, budget)
        wb = base.param(f"{name}.weight").float()
        wf = ft.param(f"{name}.weight").float()
        w.copy_((wb + low_rank(wf - wb, r)).to(w.device, w.dtype))
        total += r * (n + k) * FACTOR_BYTES
    return total


def evaluate_low_rank(base: str, finetuned: str, bitdelta: Delta, samples: torch.Tensor, batch_size: int,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(EvalStats, bytes) of the low-rank baseline at `bitdelta`'s budget, against the fine-tune."""
    from .api import load_model
    from .fidelity import evaluate

    base_ck, ft_ck = Checkpoint(base, "base"), Checkpoint(finetuned, "fine-tune")
    teacher = load_model(ft_ck.dir, torch.device(device), dtype)
    model = load_model(ft_ck.dir, torch.device(device), dtype)
    nbytes = apply_low_rank(model, base_ck, ft_ck, bitdelta)
    return evaluate(model, teacher, samples, batch_size), nbytes
