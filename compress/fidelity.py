"""How much of the fine-tune a delta keeps, measured on held-out text of the fine-tune's domain.

retained improvement = (L_base − L_delta) / (L_base − L_ft): 1.0 means the delta is as good
as the fine-tune on its domain, 0.0 means no better than the base.
KL is the mean over predicted tokens of KL(p_ft ‖ p_delta). Top-1 agreement is the share of
positions where a model's most likely next token is the fine-tune's: what greedy text follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class EvalStats:
    loss: float  # mean next-token cross-entropy of the model under test
    teacher_loss: float  # the same for the fine-tune
    kl: float  # mean per-token KL(fine-tune ‖ model)
    tokens: int
    top1_agreement: float = 0.0  # share of positions whose argmax equals the fine-tune's


def token_loss_and_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor):
    """Summed next-token CE of both models and summed KL(teacher ‖ model) over the predicted tokens."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:].unsqueeze(-1)
    ce = -logp.gather(-1, target).sum()
    ce_teacher = -logq.gather(-1, target).sum()
    kl = (logq.exp() * (logq - logp)).sum()
    return ce, ce_teacher, kl


@torch.no_grad()
def evaluate(model, teacher, samples: torch.Tensor, batch_size: int) -> EvalStats:
    device = next(teacher.parameters()).device
    ce = ce_t = kl = 0.0
    tokens = agree = 0
    for lo in range(0, len(samples), batch_size):
        ids = samples[lo : lo + batch_size].to(device)  # [b, L]
        logits, teacher_logits = model(input_ids=ids).logits, teacher(input_ids=ids).logits  # [b, L, V]
        a, b, c = token_loss_and_kl(logits, teacher_logits, ids)
        ce, ce_t, kl = ce + a.item(), ce_t + b.item(), kl + c.item()
        agree += (logits[:, :-1].argmax(-1) == teacher_logits[:, :-1].argmax(-1)).sum().item()
        tokens += ids[:, 1:].numel()
    return EvalStats(loss=ce / tokens, teacher_loss=ce_t / tokens, kl=kl / tokens, tokens=tokens, top1_agreement=agree / tokens)


def retained(loss_base: float, loss_ft: float, loss: float) -> float:
    """(L_base − L) / (L_base − L_ft); 0.0 when the fine-tune is no better than the base there
    (nothing to retain; JSON readers get a number, and the caller warns)."""
    gap = loss_base - loss_ft
    return (loss_base - loss) / gap if gap > 0 else 0.0
