"""The running batch's KV cache: one left-padded transformers DynamicCache for all sequences.

Sequences join after their own prefill (their cache is left-padded to the batch length, or the
batch is padded to theirs) and leave by index; columns that are padding for every remaining
sequence are trimmed. The attention mask (1 = real token) and per-sequence position ids
make padding invisible to attention, as in transformers' batched generation.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class BatchCache:
    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (k, v) [B, H, L, D]
        self.mask: torch.Tensor | None = None  # [B, L] long
        self.positions: list[int] = []  # next position id of each sequence

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def as_dynamic(self) -> DynamicCache:
        return DynamicCache(ddp_cache_data=self.layers)

    def add(self, cache: DynamicCache, n_tokens: int) -> None:
        """Append one sequence whose prefill produced `cache` (batch 1, no padding)."""
        new = _tensors(cache)
        mask = torch.ones(1, n_tokens, dtype=torch.long, device=new[0][0].device)
        if not self.positions:
            self.layers, self.mask = [(k, v) for k, v in new], mask
        else:
            length = max(self.length, n_tokens)
            self.layers = [
                (torch.cat([_lpad(k0, length), _lpad(k1, length)]), torch.cat([_lpad(v0, length), _lpad(v1, length)]))
                for (k0, v0), (k1, v1) in zip(self.layers, new)
            ]
            self.mask = torch.cat([_lpad_mask(self.mask, length), _lpad_mask(mask, length)])
        self.positions.append(n_tokens)

    def update_from(self, cache: DynamicCache) -> None:
        """After a decode step: take the grown cache and extend the mask by one real column."""
        self.layers = _tensors(cache)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.positions = [p + 1 for p in self.positions]

    def keep(self, rows: list[int]) -> None:
        """Keep only these sequences (in this order) and drop all-padding columns."""
        if not rows:
            self.layers, self.mask, self.positions = [], None, []
            return
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column any remaining sequence uses
        self.mask = mask[:, start:]
        self.layers = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in self.layers]
        self.positions = [self.positions[i] for i in rows]


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) [B, H, L, D] of a transformers 5 cache (its layers hold .keys/.values)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _lpad(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[2]
    return t if pad == 0 else torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)


def _lpad_mask(m: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - m.shape[1]
    return m if pad == 0 else torch.cat([m.new_zeros(m.shape[0], pad), m], dim=1)
