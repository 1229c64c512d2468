"""Per-request sampling parameters and the next-token choice for a batch of rows."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field


MAX_STOP = 8  # stop strings per request (each is checked against the text every step)


class SamplingParams(BaseModel):
    max_tokens: int | None = Field(16, ge=1)  # None: what the context leaves after the prompt
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # subtracted once from tokens already generated
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)  # subtracted per occurrence in the completion
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    seed: int | None = None


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                histories: list[list[int]] | None = None) -> list[int]:
    """logits [B, V] -> one token per row: penalties (OpenAI's definition, over each row's
    completion so far), then argmax for greedy rows, top-k / top-p sampling for the rest."""
    for i, p in enumerate(params):
        if (p.presence_penalty or p.frequency_penalty) and histories and histories[i]:
            ids, counts = torch.tensor(histories[i], device=logits.device).unique(return_counts=True)  # [U], [U]
            logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    out = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        row = logits[i].float() / p.temperature  # [V]
        if 0 < p.top_k < row.shape[0]:
            row = row.masked_fill(row < row.topk(p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out.tolist()
