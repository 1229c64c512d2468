"""Paged KV cache: fixed-size blocks of K/V, and attention over them for a packed step.

The cache (`PagedKVCache`) holds every layer's keys and values in blocks of `block_size` token positions,

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
in the cache until a new block is needed: the least recently released goes first.

Attention runs through transformers' attention interface (`ATTENTION = "deltafleet_paged"`):
the model's own layers compute q/k/v and RoPE; `paged_attention` writes the new K/V into
the cache and attends each group with a causal (and sliding-window) mask. On CUDA a Triton
kernel of ours (kernels/paged_attention.py) reads the K/V blocks in place through kv_index
(flash-attention style, one launch per group). On CPU each sequence's context is gathered
into a padded [B, kv_heads, L, head_dim] and `scaled_dot_product_attention` runs on it: a
copy of the batch's context per layer, fast there (the Triton interpreter is far too slow
to serve with).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from deltafleet.compress.support import attention_modules

from .staging import Pack

ATTENTION = "deltafleet_paged"


class PagedKVCache:
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
            raise RuntimeError(f"KV cache: {n} blocks asked, {self.num_free} free")  # the scheduler checks first
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
    kv_index: torch.Tensor  # [b, L] flat cache position of each context position (padding -> a real one, masked)
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

    write_index: torch.Tensor  # [T] flat cache position of each new token's K/V
    positions: torch.Tensor  # [1, T] position ids of the packed tokens
    groups: list[AttnGroup]

    @classmethod
    def build(cls, chunks: list[tuple[list[int], int, int]], block_size: int, device: torch.device) -> "StepLayout":
        """chunks: per sequence, in packed order: (block table, tokens already cached, new tokens).
        Its tensors reach the device in one copy (see `stage` to share that copy with more fields)."""
        pack = Pack()
        make = cls.stage(chunks, block_size, pack)
        return make(pack.send(None, device)[1])

    @classmethod
    def stage(cls, chunks: list[tuple[list[int], int, int]], block_size: int,
              pack: Pack) -> Callable[[list[torch.Tensor]], "StepLayout"]:
        """Add the layout's fields to a step's pack (computed on the host with numpy: no device
        op, no copy yet); the returned function builds the layout from the pack's device views."""
        offsets, positions, write = [], [], []
        total = 0
        for blocks, start, n in chunks:
            offsets.append(total)
            total += n
            pos = np.arange(start, start + n)  # [n]
            positions.append(pos)
            write.append(np.asarray(blocks, dtype=np.int64)[pos // block_size] * block_size + pos % block_size)
        decode = [i for i, c in enumerate(chunks) if c[2] == 1]
        prefill = [[i] for i, c in enumerate(chunks) if c[2] > 1]
        groups = [_group([chunks[i] for i in g], [offsets[i] for i in g], block_size, pack)
                  for g in ([decode] if decode else []) + prefill]
        k_write = pack.add(np.concatenate(write), torch.int64)  # [T]
        k_pos = pack.add(np.concatenate(positions)[None], torch.int64)  # [1, T]
        return lambda views: cls(write_index=views[k_write], positions=views[k_pos], groups=[g(views) for g in groups])


def _group(chunks: list[tuple[list[int], int, int]], offsets: list[int], block_size: int,
           pack: Pack) -> Callable[[list[torch.Tensor]], AttnGroup]:
    """One attention group's fields, added to the pack; the function builds it from the device views."""
    b = len(chunks)
    starts = np.array([c[1] for c in chunks], dtype=np.int64)  # [b]
    counts = np.array([c[2] for c in chunks], dtype=np.int64)  # [b]
    q, lmax, nb = int(counts.max()), int((starts + counts).max()), max(len(c[0]) for c in chunks)
    table = np.zeros((b, nb), dtype=np.int64)  # [b, blocks]; padding block 0 is only read masked
    for i, (blocks, _, _) in enumerate(chunks):
        table[i, : len(blocks)] = blocks
    kv_pos = np.arange(lmax)  # [L]
    kv_index = table[:, np.minimum(kv_pos // block_size, nb - 1)] * block_size + kv_pos % block_size  # [b, L]
    qi = np.arange(q)[None]  # [1, Q]
    valid = qi < counts[:, None]  # [b, Q]
    q_index = np.where(valid, np.asarray(offsets, dtype=np.int64)[:, None] + qi, 0)  # [b, Q]
    keys = {
        "q_index": pack.add(q_index.reshape(-1), torch.int64),  # [b * Q]
        "valid": pack.add(valid.reshape(-1), torch.bool),  # [b * Q]
        "tokens": pack.add(q_index[valid], torch.int64),  # [n]
        "q_pos": pack.add(np.where(valid, starts[:, None] + qi, 0), torch.int64),  # [b, Q]
        "kv_index": pack.add(kv_index, torch.int64),  # [b, L]
        "valid_rows": pack.add(np.flatnonzero(valid.reshape(-1)), torch.int64),  # [n]; on the host: no device sync
    }
    return lambda views: AttnGroup(_masks={}, **{name: views[k] for name, k in keys.items()})


class DecodeLayout:
    """A decode step of fixed shape: B rows (one new token each; padding rows included) whose
    context fits in L = blocks × block_size positions. Its tensors are allocated once and
    refilled in place every step, so a CUDA graph captured over them replays any later step
    of the same bucket: nothing in it depends on a host value.

    Padding rows write their K/V into the cache's scratch block and attend only to it."""

    def __init__(self, rows: int, blocks: int, cache: PagedKVCache, device: torch.device) -> None:
        self.rows, self.blocks, self.block_size = rows, blocks, cache.block_size
        self.scratch = cache.scratch_block * cache.block_size  # flat position of the scratch block's first position
        length = blocks * cache.block_size
        # Zeros until `bind` points them into the decoder's staged buffer (one copy per step fills them all).
        self.write_index = torch.zeros(rows, dtype=torch.int64, device=device)  # [B]
        self.positions = torch.zeros(1, rows, dtype=torch.int64, device=device)  # [1, B]
        self.kv_index = torch.zeros(rows, length, dtype=torch.int64, device=device)  # [B, L]
        self.q_pos = torch.zeros(rows, 1, dtype=torch.int64, device=device)  # [B, 1]
        self.row_index = torch.arange(rows, device=device)  # [B]

    FIELDS = ("write_index", "positions", "kv_index", "q_pos")

    def host_fields(self, chunks: list[tuple[list[int], int]]) -> dict[str, np.ndarray]:
        """chunks: per real row, in order: (block table, tokens already cached); each adds one token.
        The step's values of FIELDS, computed on the host (numpy): the caller stages them."""
        n, bs, length = len(chunks), self.block_size, self.blocks * self.block_size
        pos = np.zeros(self.rows, dtype=np.int64)  # [B]; padding rows sit at position 0
        table = np.full((self.rows, self.blocks), self.scratch // bs, dtype=np.int64)  # [B, blocks]
        for i, (blocks, start) in enumerate(chunks):
            pos[i] = start
            table[i, : len(blocks)] = blocks
        j = np.arange(length)  # [L]
        kv_index = table[:, j // bs] * bs + j % bs  # [B, L]; past a row's context: masked (j > its position)
        write = kv_index[np.arange(self.rows), pos]  # [B]
        write[n:] = self.scratch
        return {"write_index": write, "positions": pos[None], "kv_index": kv_index, "q_pos": pos[:, None]}

    def bind(self, views: dict[str, torch.Tensor]) -> None:
        """Read FIELDS from these device tensors (views into a staged buffer refilled in place)."""
        for name in self.FIELDS:
            setattr(self, name, views[name])

    def step_layout(self) -> StepLayout:
        """The StepLayout the attention modules read: one group of B one-token queries (no mask
        indexing, so nothing depends on values), with a fresh mask cache for this forward."""
        group = AttnGroup(q_index=self.row_index, valid=None, tokens=self.row_index, q_pos=self.q_pos,
                          kv_index=self.kv_index, _masks={})
        return StepLayout(write_index=self.write_index, positions=self.positions, groups=[group])


class PagedContext:
    """What the attention modules of one served model read: the KV cache and the current step."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.layout: StepLayout | None = None


def paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """query [1, H, T, D], key/value [1, KVH, T, D] of the packed new tokens -> ([1, T, H, D], None).

    CUDA: the Triton paged kernel reads each group's K/V in place from the cache. CPU (and a
    head_dim the kernel does not take): gather + SDPA (module docstring)."""
    ctx: PagedContext = module.deltafleet_paged
    cache, lay, layer = ctx.cache, ctx.layout, module.layer_idx
    if lay is None:
        raise RuntimeError("paged attention called outside an engine step (this model is the engine's)")
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by the paged engine")
    cache.k[layer].index_copy_(0, lay.write_index, key[0].transpose(0, 1).to(cache.k.dtype))  # [T, KVH, D]
    cache.v[layer].index_copy_(0, lay.write_index, value[0].transpose(0, 1).to(cache.v.dtype))
    _, h, t, d = query.shape
    kvh = key.shape[1]
    q_all = query[0].transpose(0, 1)  # [T, H, D]
    out = q_all.new_empty(t, h, d)
    # the kernel's head dims (powers of two from 16); other models keep the gather path on CUDA too
    fused = q_all.is_cuda and d >= 16 and d & (d - 1) == 0
    for g in lay.groups:  # decode rows together, each prefill chunk alone
        b, l = g.kv_index.shape
        q = q_all.index_select(0, g.q_index).view(b, -1, h, d)  # [b, Q, H, D]
        if fused:
            from deltafleet.kernels.paged_attention import paged_attention_triton  # imports Triton on first use

            o = paged_attention_triton(q, cache.k[layer], cache.v[layer], g.kv_index, g.q_pos, scaling,
                                       sliding_window)  # [b, Q, H, D]
        else:
            k = cache.k[layer].index_select(0, g.kv_index.reshape(-1)).view(b, l, kvh, d).transpose(1, 2)  # [b, KVH, L, D]
            v = cache.v[layer].index_select(0, g.kv_index.reshape(-1)).view(b, l, kvh, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=g.mask(sliding_window),
                                               scale=scaling, enable_gqa=kvh != h).transpose(1, 2)  # [b, Q, H, D]
        o = o.reshape(-1, h, d)  # [b * Q, H, D]
        # index_select, not o[g.valid]: a boolean mask has a data-dependent shape (a host sync per layer)
        out.index_copy_(0, g.tokens, o if g.valid_rows is None else o.index_select(0, g.valid_rows))
    return out[None], None


AttentionInterface.register(ATTENTION, paged_attention)


def attach(model: nn.Module, ctx: PagedContext) -> int:
    """Point every attention module of the model at the paged KV cache; returns how many were found."""
    found = attention_modules(model)
    for mod in found:
        mod.deltafleet_paged = ctx
    model.set_attn_implementation(ATTENTION)
    return len(found)
