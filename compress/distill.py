"""Stage 2 of BitDelta: scale distillation.

Everything is frozen except the per-matrix (or per-row) scales α. They are trained with
Adam so the compressed model's logits match the fine-tune's on calibration samples: MSE on
logits as in the paper, or KL(fine-tune ‖ compressed) as an option. The teacher's logits
are computed batch by batch, never stored for the whole calibration set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .progress import progress


def logit_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "kl":
        logp = F.log_softmax(student.float(), dim=-1)
        logq = F.log_softmax(teacher.float(), dim=-1)
        return (logq.exp() * (logq - logp)).sum(-1).mean()
    raise ValueError(f"unknown distillation loss {kind!r} (mse or kl)")


def distill_scales(student, teacher, scales: list[torch.nn.Parameter], samples: torch.Tensor,
                   steps: int, lr: float, batch_size: int, loss: str = "mse", seed: int = 0) -> list[float]:
    """Train `scales` in place; returns the loss of every step (NaN for a step skipped because
    its loss or gradient was not finite)."""
    for p in student.parameters():
        p.requires_grad_(False)
    for s in scales:
        s.requires_grad_(True)
    opt = torch.optim.Adam(scales, lr=lr)
    device = next(teacher.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=gen)
    pos, history = 0, []
    bar = progress(range(steps), f"stage 2: scale distillation ({loss})")
    for _ in bar:
        if pos + batch_size > len(order):  # next epoch over the calibration samples
            order, pos = torch.randperm(len(samples), generator=gen), 0
        ids = samples[order[pos : pos + batch_size]].to(device)
        pos += batch_size
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
        value = logit_loss(student(input_ids=ids).logits, target, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        # A non-finite loss or gradient (an activation's backward overflowing) would make every
        # scale NaN from this step on: skip the step, keep the last finite scales.
        if torch.isfinite(value) and all(torch.isfinite(s.grad).all() for s in scales if s.grad is not None):
            opt.step()
        else:
            value = torch.tensor(float("nan"))
        history.append(value.item())
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    for s in scales:
        s.requires_grad_(False)
    return history
