"""Paged KV cache: a pool of fixed-size blocks, and attention over it for a packed step.

The pool holds every layer's keys and values in blocks of `block_size` token positions,

    k, v  [layers, n_blocks * block_size, kv_heads, head_dim]   (a position's flat index is
                                                                 block * block_size + offset)

and a sequence owns a list of blocks (its block table). Admitting or finishing a sequence
moves no cache bytes: blocks are handed out and returned. A step packs the new tokens of
every scheduled sequence (decode rows: 1 token; prefill chunks: many) into one row [1, T];
`StepLayout` says where each token's K/V goes and which positions each sequence attends to;
decode rows are attended together, each prefill chunk on its own (no padding to the longest).

**Prefix caching, per tenant.** A full block whose K/V is computed is remembered under a
content key: sha256 of (the key of the block before it, or the tenant's key for the first
block, and the block's token ids). The tenant's key names the registration whose delta is in
the slot (engine: `prefix_root`), so one tenant's K/V is never served to another, nor to
the same tenant after its delta changed; transformers' continuous batching hashes tokens
only, which would. A sequence admitted with a prompt whose first blocks are cached takes
them (reference counted) instead of computing them. A cached block no sequence holds stays
in the pool until a new block is needed: the least recently released goes first.

Attention runs through transformers' attention interface (`ATTENTION = "deltafleet_paged"`):
the model's own layers compute q/k/v and RoPE; `paged_attention` writes the new K/V into
the pool, gathers each sequence's context into a padded [B, kv_heads, L, head_dim] and calls
`scaled_dot_product_attention` with a causal (and sliding-window) mask. The gather is a
copy of the batch's context per layer: the portable path (CPU, any GPU). A fused paged
kernel on GPU (flashinfer / FlashAttention's paged decode) reads blocks in place; that is the
GPU engine's next step, see docs/serving.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from deltafleet.compress.support import attention_modules

ATTENTION = "deltafleet_paged"


class KVPool:
    def __init__(self, n_layers: int, n_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.n_blocks, self.block_size = n_blocks, block_size
        # One more block than is handed out: the padding rows of a fixed-shape decode step
        # write their K/V there and attend only to it, so they never touch a sequence's blocks.
        self.scratch_block = n_blocks
        shape = (n_layers, (n_blocks + 1) * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self._refs = [0] * n_blocks  # sequences holding each block
        self._shared = 0  # blocks held by more than one sequence
        self._by_key: dict[bytes, int] = {}  # prefix cache: content key -> block
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no one holds, least recently released first

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never used, or cached with no one holding them."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"KV pool: {n} blocks asked, {self.num_free} free")  # the scheduler checks first
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:  # the cached block released longest ago: forget its content
                b, _ = self._evictable.popitem(last=False)
                del self._by_key[self._key_of.pop(b)]
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a chain's last blocks become the first to go
            self._refs[b] -= 1
            self._shared -= self._refs[b] == 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    def exclusive(self, blocks: list[int]) -> int:
        """How many of these blocks no one else holds: what releasing them frees."""
        if not self._shared:  # the common case, checked every step: no need to look
            return len(blocks)
        return sum(1 for b in blocks if self._refs[b] == 1)

    # ---- prefix cache -----------------------------------------------------------------------
    @staticmethod
    def block_key(previous: bytes, tokens: list[int]) -> bytes:
        """The content key of a full block: its tokens after `previous` (the key of the block
        before it, or the tenant's key for a sequence's first block)."""
        return hashlib.sha256(previous + struct.pack(f"<{len(tokens)}q", *tokens)).digest()

    def remember(self, block: int, key: bytes) -> None:
        """A held block is full and its K/V computed: later sequences may take it by key."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key], self._key_of[block] = block, key

    def take_cached(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the first, each now held once more."""
        out = []
        for key in keys:
            b = self._by_key.get(key)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            self._shared += self._refs[b] == 2
            out.append(b)
        return out


@dataclass
class AttnGroup:
    """Sequences whose queries are padded together: all decode rows (1 query each) in one
    group, each prefill chunk in its own, so a decode row never pads to a prompt's length.
    b sequences, Q = the group's longest chunk, L = its longest context after this step."""

    q_index: torch.Tensor  # [b * Q] packed index of each sequence's i-th new token (padding -> 0)
    valid: torch.Tensor | None  # [b * Q] bool: real queries (None: all are, as in a fixed-shape decode step)
    tokens: torch.Tensor  # [n] packed indices of the real queries, in the order `valid` selects them
    q_pos: torch.Tensor  # [b, Q] position of each query (padding -> 0, it attends to position 0)
    kv_index: torch.Tensor  # [b, L] flat pool position of each context position (padding -> a real one, masked)
    _masks: dict
    valid_rows: torch.Tensor | None = None  # [n] positions of the real queries in [b * Q] (built on the host)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[b, 1, Q, L] bool: causal (which also keeps each query inside its context), windowed if asked."""
        if sliding_window not in self._masks:
            j = torch.arange(self.kv_index.shape[1], device=self.kv_index.device)[None, None]  # [1, 1, L]
            p = self.q_pos[:, :, None]  # [b, Q, 1]
            ok = j <= p
            if sliding_window is not None:
                ok = ok & (p - j < sliding_window)
            self._masks[sliding_window] = ok[:, None]
        return self._masks[sliding_window]


@dataclass
class StepLayout:
    """Where a packed step's T new tokens go, and the attention groups that read them."""

    write_index: torch.Tensor  # [T] flat pool position of each new token's K/V
    positions: torch.Tensor  # [1, T] position ids of the packed tokens
    groups: list[AttnGroup]

    @classmethod
    def build(cls, chunks: list[tuple[list[int], int, int]], block_size: int, device: torch.device) -> "StepLayout":
        """chunks: per sequence, in packed order: (block table, tokens already cached, new tokens)."""
        offsets, positions, write = [], [], []
        total = 0
        for blocks, start, n in chunks:
            offsets.append(total)
            total += n
            pos = torch.arange(start, start + n)
            positions.append(pos)
            write.append(torch.tensor(blocks, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size)
        decode = [i for i, c in enumerate(chunks) if c[2] == 1]
        prefill = [[i] for i, c in enumerate(chunks) if c[2] > 1]
        groups = [_group([chunks[i] for i in g], [offsets[i] for i in g], block_size, device) for g in ([decode] if decode else []) + prefill]
        return cls(write_index=torch.cat(write).to(device), positions=torch.cat(positions)[None].to(device), groups=groups)


def _group(chunks: list[tuple[list[int], int, int]], offsets: list[int], block_size: int, device: torch.device) -> AttnGroup:
    b = len(chunks)
    starts = torch.tensor([c[1] for c in chunks])  # [b]
    counts = torch.tensor([c[2] for c in chunks])  # [b]
    q, lmax, nb = int(counts.max()), int((starts + counts).max()), max(len(c[0]) for c in chunks)
    table = torch.zeros(b, nb, dtype=torch.int64)  # [b, blocks]; padding block 0 is only read masked
    for i, (blocks, _, _) in enumerate(chunks):
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
    kv_pos = torch.arange(lmax)[None].expand(b, lmax)  # [b, L]
    kv_index = table.gather(1, (kv_pos // block_size).clamp(max=nb - 1)) * block_size + kv_pos % block_size
    qi = torch.arange(q)[None].expand(b, q)  # [b, Q]
    valid = qi < counts[:, None]
    q_index = torch.where(valid, torch.tensor(offsets)[:, None] + qi, 0)
    return AttnGroup(
        q_index=q_index.reshape(-1).to(device), valid=valid.reshape(-1).to(device), tokens=q_index[valid].to(device),
        q_pos=torch.where(valid, starts[:, None] + qi, 0).to(device), kv_index=kv_index.to(device), _masks={},
        valid_rows=valid.reshape(-1).nonzero()[:, 0].to(device),  # on the host here: no device sync
    )


class DecodeLayout:
    """A decode step of fixed shape: B rows (one new token each; padding rows included) whose
    context fits in L = blocks × block_size positions. Its tensors are allocated once and
    refilled in place every step, so a CUDA graph captured over them replays any later step
    of the same bucket: nothing in it depends on a host value.

    Padding rows write their K/V into the pool's scratch block and attend only to it."""

    def __init__(self, rows: int, blocks: int, pool: KVPool, device: torch.device) -> None:
        self.rows, self.blocks, self.block_size = rows, blocks, pool.block_size
        self.scratch = pool.scratch_block * pool.block_size  # flat position of the scratch block's first slot
        length = blocks * pool.block_size
        self.write_index = torch.zeros(rows, dtype=torch.int64, device=device)  # [B]
        self.positions = torch.zeros(1, rows, dtype=torch.int64, device=device)  # [1, B]
        self.kv_index = torch.zeros(rows, length, dtype=torch.int64, device=device)  # [B, L]
        self.q_pos = torch.zeros(rows, 1, dtype=torch.int64, device=device)  # [B, 1]
        self.row_index = torch.arange(rows, device=device)  # [B]

    def fill(self, chunks: list[tuple[list[int], int]]) -> None:
        """chunks: per real row, in order: (block table, tokens already cached); each adds one token."""
        n, bs, length = len(chunks), self.block_size, self.blocks * self.block_size
        pos = torch.zeros(self.rows, dtype=torch.int64)  # [B]; padding rows sit at position 0
        table = torch.full((self.rows, self.blocks), self.scratch // bs, dtype=torch.int64)  # [B, blocks]
        for i, (blocks, start) in enumerate(chunks):
            pos[i] = start
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        j = torch.arange(length)  # [L]
        kv_index = table[:, j // bs] * bs + j % bs  # [B, L]; past a row's context: masked (j > its position)
        write = kv_index.gather(1, pos[:, None])[:, 0]  # [B]
        if n < self.rows:
            write[n:] = self.scratch
        for dst, src in ((self.write_index, write), (self.positions[0], pos), (self.kv_index, kv_index), (self.q_pos[:, 0], pos)):
            dst.copy_(src, non_blocking=True)

    def step_layout(self) -> StepLayout:
        """The StepLayout the attention modules read: one group of B one-token queries (no mask
        indexing, so nothing depends on values), with a fresh mask cache for this forward."""
        group = AttnGroup(q_index=self.row_index, valid=None, tokens=self.row_index, q_pos=self.q_pos,
                          kv_index=self.kv_index, _masks={})
        return StepLayout(write_index=self.write_index, positions=self.positions, groups=[group])


class PagedContext:
    """What the attention modules of one served model read: the pool and the current step."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.layout: StepLayout | None = None


def paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """query [1, H, T, D], key/value [1, KVH, T, D] of the packed new tokens -> ([1, T, H, D], None)."""
    ctx: PagedContext = module.deltafleet_paged
    pool, lay, layer = ctx.pool, ctx.layout, module.layer_idx
    if lay is None:
        raise RuntimeError("paged attention called outside an engine step (this model is the engine's)")
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the paged engine")
    pool.k[layer].index_copy_(0, lay.write_index, key[0].transpose(0, 1).to(pool.k.dtype))  # [T, KVH, D]
    pool.v[layer].index_copy_(0, lay.write_index, value[0].transpose(0, 1).to(pool.v.dtype))
    _, h, t, d = query.shape
    kvh = key.shape[1]
    q_all = query[0].transpose(0, 1)  # [T, H, D]
    out = q_all.new_empty(t, h, d)
    for g in lay.groups:  # decode rows together, each prefill chunk alone
        b, l = g.kv_index.shape
        k = pool.k[layer].index_select(0, g.kv_index.reshape(-1)).view(b, l, kvh, d).transpose(1, 2)  # [b, KVH, L, D]
        v = pool.v[layer].index_select(0, g.kv_index.reshape(-1)).view(b, l, kvh, d).transpose(1, 2)
        q = q_all.index_select(0, g.q_index).view(b, -1, h, d).transpose(1, 2)  # [b, H, Q, D]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=g.mask(sliding_window),
                                           scale=scaling, enable_gqa=kvh != h)  # [b, H, Q, D]
        o = o.transpose(1, 2).reshape(-1, h, d)  # [b * Q, H, D]
        # index_select, not o[g.valid]: a boolean mask has a data-dependent shape (a host sync per layer)
        out.index_copy_(0, g.tokens, o if g.valid_rows is None else o.index_select(0, g.valid_rows))
    return out[None], None


AttentionInterface.register(ATTENTION, paged_attention)


def attach(model: nn.Module, ctx: PagedContext) -> int:
    """Point every attention module of the model at the pool; returns how many were found."""
    found = attention_modules(model)
    for mod in found:
        mod.deltafleet_paged = ctx
    model.set_attn_implementation(ATTENTION)
    return len(found)
