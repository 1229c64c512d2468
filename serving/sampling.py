"""Per-request sampling parameters and the next-token choice for a batch of rows, on the device.

`sample` draws every row's next token with tensor ops only: no host sync, no generator
state, fixed shapes — so it runs inside a captured CUDA graph as well as eagerly, and a
request's draw is the same whichever path, batch or step it lands in. Randomness comes from
a counter-based hash of (the request's seed, the position being sampled, the token id) fed
to the Gumbel-max trick: argmax(logits / T + Gumbel noise) is an exact draw from
softmax(logits / T), restricted to the top-k / top-p set.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from .staging import Pack


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

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def as_int64(seed: int) -> int:
    """Any Python int (OpenAI's seed may be negative or up to 2**64 - 1) as a signed 64-bit value."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer (int64, wrapping multiplication): a well-spread 64-bit hash."""
    x = x ^ _shr(x, 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ _shr(x, 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ _shr(x, 31)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """seed, position [B] int64 -> [B, V] float32 in (0, 1), a pure function of (seed, position, token)."""
    token = torch.arange(vocab, device=seed.device, dtype=torch.int64)  # [V]
    h = _mix(_mix(seed[:, None] ^ _mix(position[:, None])) + token[None, :])  # [B, V]
    return (_shr(h, 40).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; temperature, top_p [B] float32; top_k, seed, position [B] int64 -> [B] int64.

    Greedy rows (temperature 0) take the argmax. Others: top-k (0 = off) first, then top-p on
    what is left (the smallest set of most likely tokens whose mass reaches top_p), as vLLM does."""
    b, v = logits.shape
    greedy = temperature <= 0  # [B]
    z = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]  # [B, V]
    sorted_z = z.sort(dim=-1, descending=True).values  # [B, V]
    rank = torch.arange(v, device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k.clamp(max=v), v)[:, None]  # [B, 1]
    p_sorted = torch.softmax(sorted_z.masked_fill(rank >= k, float("-inf")), dim=-1)  # [B, V]
    keep = (rank < k) & (p_sorted.cumsum(-1) - p_sorted < top_p[:, None])  # [B, V], a prefix of the sorted order
    cutoff = sorted_z.gather(1, keep.sum(-1, keepdim=True) - 1)  # [B, 1] the least likely kept value
    gumbel = -torch.log(-torch.log(uniform_noise(seed, position, v)))  # [B, V]
    drawn = torch.where(z >= cutoff, z + gumbel, float("-inf")).argmax(-1)  # [B]
    return torch.where(greedy, logits.argmax(-1), drawn)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]]) -> None:
    """OpenAI's presence/frequency penalties over each row's completion so far, in place (eager steps only)."""
    for i, p in enumerate(params):
        if p.penalized and histories[i]:
            ids, counts = torch.tensor(histories[i], device=logits.device).unique(return_counts=True)  # [U], [U]
            logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)


def sampling_tensors(params: list[SamplingParams], seeds: list[int], positions: list[int],
                     device: torch.device) -> tuple[torch.Tensor, ...]:
    """The per-row tensors `sample` takes: temperature, top_p, top_k, seed, position (one host -> device copy)."""
    pack = Pack()
    stage_sampling(pack, params, seeds, positions)
    return tuple(pack.send(None, device)[1])


def stage_sampling(pack: Pack, params: list[SamplingParams], seeds: list[int], positions: list[int]) -> list[int]:
    """Add `sample`'s five per-row tensors to a step's pack (so they share its one copy); their indices."""
    return [
        pack.add([p.temperature for p in params], torch.float32),
        pack.add([p.top_p for p in params], torch.float32),
        pack.add([p.top_k for p in params], torch.int64),
        pack.add(seeds, torch.int64),
        pack.add(positions, torch.int64),
    ]


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
                histories: list[list[int]] | None = None, tensors: tuple[torch.Tensor, ...] | None = None) -> list[int]:
    """logits [B, V] -> one token per row: penalties, then `sample`. seeds: int64 per row;
    positions: the index of the token being drawn in its sequence (prompt + completion).
    tensors: `sampling_tensors`' five, already on the device (staged with the step's inputs)."""
    if histories is not None:
        apply_penalties(logits, params, histories)
    if all(p.temperature == 0 for p in params):  # eager steps only: a graph always runs the whole sampler
        return logits.argmax(-1).tolist()
    return sample(logits, *(tensors or sampling_tensors(params, seeds, positions, logits.device))).tolist()
