"""How one batch applies many tenants' deltas: a delta-aware linear and per-row whole tensors.

Every nn.Linear of the base (in_features a multiple of 32) is swapped for `DeltaLinear`,
which calls the batched kernel with the batch's row -> slot map, so all tenants in a batch
share one launch per layer, and adds each row's bias from the bank's bias stack (the
fine-tune's bias where its delta stores one: served = merged, 1-bit term included). A
tenant that stores the whole matrix (an output head) gets its rows from one grouped GEMM
over the rows sorted by pool entry (`_whole_rows`).
Norm weights come from the bank's per-slot stacks too: when a tenant in the batch changes
a norm, a forward hook reruns the module once over all rows with each row's weights
(torch.func.vmap over functional_call: the module's own code, no Python loop over slots).
Embeddings gather each token's row from the pool of its tenant's table, and add a 1-bit
embedding delta's α·sign(Δ) rows the same way (`add_embedding_hook`). Only modules of no
other kind (none in the supported families) fall back to recomputing each slot's rows.
Rows are sequences: every module sees batch-first inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltafleet.kernels import SignCache, TenantGroups, delta_linear, group_rows
from deltafleet.kernels.packing import unpack_signs


# Unpacked signs of hot (layer, tenant) pairs on CPU: the unpack is most of the CPU delta cost.
CPU_SIGN_CACHE_BYTES = 1 << 30


class BatchContext:
    """Which bank slot each sequence of the current forward uses (-1 = the base).

    Row grouping (a host sync on GPU) is computed once per step and row count, and shared by
    every layer of the forward pass: the kernels' segments and the whole-tensor overrides'
    row indices both come from it."""

    def __init__(self, bank, sign_cache: SignCache | None = None) -> None:
        self.bank = bank
        self.sign_cache = sign_cache
        self.slot_of_seq: torch.Tensor | None = None  # [B] int64 on the model's device
        self.slots: list[int] = []  # distinct non-negative slots in the batch
        self._rows: dict[int, tuple[torch.Tensor, TenantGroups]] = {}
        self._slot_rows: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def set(self, slot_of_seq: list[int], device: torch.device) -> None:
        self.slot_of_seq = torch.tensor(slot_of_seq, dtype=torch.int64, device=device)
        self.slots = sorted({s for s in slot_of_seq if s >= 0})
        self._rows, self._slot_rows = {}, {}

    def rows(self, m: int) -> tuple[torch.Tensor, TenantGroups]:
        """Slot of each of m flattened rows ([B, S, K] -> [B*S] rows, S = m // B), and their grouping."""
        if m not in self._rows:
            b = self.slot_of_seq.shape[0]
            rows = self.slot_of_seq.repeat_interleave(m // b) if m != b else self.slot_of_seq
            self._rows[m] = (rows, group_rows(rows, self.bank.n_slots))
        return self._rows[m]

    def slot_rows(self, m: int) -> list[tuple[int, torch.Tensor]]:
        """(slot, int64 indices of its rows among m flattened rows) for every slot in the batch."""
        if m not in self._slot_rows:
            groups = self.rows(m)[1]
            order = groups.order.long()
            self._slot_rows[m] = [
                (t, order[groups.starts[i] : groups.starts[i + 1]]) for i, t in enumerate(groups.tenants) if t >= 0
            ]
        return self._slot_rows[m]


class DeltaLinear(nn.Module):
    """y = x·Wᵀ + α_t·(x·sign(Δ_t)ᵀ) (+ bias) for each row's tenant t, via `delta_linear`."""

    def __init__(self, base: nn.Linear, name: str, ctx: BatchContext) -> None:
        super().__init__()
        self.weight = base.weight  # same Parameter: tied weights stay tied
        self.bias = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.name = name
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if not ctx.slots:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        signs, scales = ctx.bank.stacks[self.name]
        rows, groups = ctx.rows(x2.shape[0])
        y = delta_linear(x2, self.weight, signs, scales, rows, groups=groups, sign_cache=ctx.sign_cache)  # [M, N]
        bias = None
        if self.bias is not None:
            bias = ctx.bank.bias_stacks[self.name].index_select(0, (rows + 1).long())  # [M, N]; stack row 0 = the base's
            y = y + bias
        pool = ctx.bank.whole_pools.get(self.name)
        if pool is not None and pool.in_batch(ctx.slots):  # a tenant that stores this whole matrix
            y = _whole_rows(x2, y, pool, rows, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.name}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def _whole_rows(x: torch.Tensor, y: torch.Tensor, pool, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y with the rows of tenants that store this matrix whole replaced by x·W_tᵀ (+ b_t).

    x [M, K], y [M, N], rows [M] (slot of each row, -1 = the base). One grouped GEMM over the
    rows sorted by pool entry: each tenant's matrix is read once, however many rows it has.
    Rows without an entry sort first and fall in entry 0's group; their results are dropped."""
    weight = pool.entries["weight"]  # [E, N, K], read once: a concurrent growth swaps in a new tensor
    entry = pool.entry_of_slot.index_select(0, rows.long() + 1)  # [M], -1 = no whole matrix
    order = torch.argsort(entry, stable=True)  # [M]
    counts = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=x.device)
    counts.index_add_(0, entry + 1, torch.ones_like(entry))  # [E + 1], bucket 0 = rows without one
    offs = counts.cumsum(0)[1:].to(torch.int32)  # [E], end of each entry's rows in `order`
    y_sorted = F.grouped_mm(x.index_select(0, order), weight.transpose(1, 2), offs=offs)  # [M, N]
    whole = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to batch order
    if bias is not None:
        whole = whole + bias
    return torch.where((entry >= 0)[:, None], whole.to(y.dtype), y)


def add_embedding_hook(module: nn.Embedding, name: str, ctx: BatchContext) -> None:
    """Each token's embedding from its tenant's table: the pool entry of a tenant that stores
    the table whole, else the base's, plus α·sign(Δ) of a 1-bit embedding delta."""

    def hook(mod, args, output):
        if not ctx.slots:
            return None
        ids = args[0]  # [B, S]
        slot = ctx.slot_of_seq[:, None].expand_as(ids) + 1  # [B, S]; 0 = the base
        vocab, scale = mod.num_embeddings, getattr(mod, "embed_scale", None)
        pool = ctx.bank.whole_pools[name]
        if pool.in_batch(ctx.slots):
            table = pool.entries["weight"]  # [E, V, H]
            entry = pool.entry_of_slot[slot]  # [B, S], -1 = the base's table
            rows = F.embedding(entry.clamp(min=0) * vocab + ids, table.view(-1, table.shape[-1]))  # [B, S, H]
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            output = torch.where((entry >= 0)[..., None], rows.to(output.dtype), output)
        one_bit = ctx.bank.embed_pools.get(name)
        if one_bit is not None and one_bit.in_batch(ctx.slots):
            signs, alphas = one_bit.entries["signs"], one_bit.entries["scales"]  # [E, V, H // 32], [E, V]
            entry = one_bit.entry_of_slot[slot]  # [B, S]
            flat = (entry.clamp(min=0) * vocab + ids).reshape(-1)  # [B*S]
            packed = signs.view(-1, signs.shape[-1]).index_select(0, flat)  # [B*S, H // 32]
            alpha = alphas.view(-1).index_select(0, flat) * (entry.reshape(-1) >= 0)  # [B*S], 0 = no delta
            delta = (unpack_signs(packed, torch.float32) * alpha[:, None]).to(output.dtype)  # [B*S, H]
            if scale is not None:  # Gemma-style scaled embeddings multiply inside the module
                delta = delta * scale.to(output.dtype)
            output = output + delta.view_as(output)
        return output

    module.register_forward_hook(hook)


def add_whole_hook(module: nn.Module, name: str, ctx: BatchContext) -> None:
    """Recompute this module's output rows for tenants that store its parameters whole: norms
    in one vectorized call over the bank's stacks, any other module per slot."""
    busy = [False]

    def call(mod, params, args):
        busy[0] = True
        try:
            return torch.func.functional_call(mod, params, args)
        finally:
            busy[0] = False

    def per_row(mod, stacks, x):
        """The module over each row with that row's parameters, in one vectorized call."""
        sel = ctx.slot_of_seq + 1  # [B]; row 0 of a stack is the base's
        params = {p: t.index_select(0, sel) for p, t in stacks.items()}  # [B, *shape]
        return torch.func.vmap(lambda p, xi: call(mod, p, (xi,)))(params, x)

    def hook(mod, args, output):
        if busy[0] or not ctx.slots or not isinstance(output, torch.Tensor):
            return None
        stacks = ctx.bank.param_stacks.get(name)
        if stacks is not None:  # norms: no Python loop over slots
            if not any(name in ctx.bank.slot_overrides[s] for s in ctx.slots):
                return None
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                return per_row(mod, stacks, args[0]).to(output.dtype)
            for s, idx in ctx.slot_rows(ctx.slot_of_seq.shape[0]):  # a module called with other arguments
                sub = tuple(a.index_select(0, idx) if isinstance(a, torch.Tensor) else a for a in args)
                output.index_copy_(0, idx, call(mod, {p: t[s + 1] for p, t in stacks.items()}, sub).to(output.dtype))
            return output
        for s, idx in ctx.slot_rows(ctx.slot_of_seq.shape[0]):  # a module of no other kind; rows are sequences
            params = ctx.bank.whole_of_slot(s, name)
            if params:
                sub = tuple(a.index_select(0, idx) if isinstance(a, torch.Tensor) else a for a in args)
                output.index_copy_(0, idx, call(mod, params, sub).to(output.dtype))
        return output

    module.register_forward_hook(hook)


def embedding_supports_1bit(mod: nn.Module) -> bool:
    """Embeddings `add_embedding_hook` serves: plain, or scaled by `embed_scale` inside the module."""
    return isinstance(mod, nn.Embedding) and (type(mod) is nn.Embedding or hasattr(mod, "embed_scale"))


def patch_model(model: nn.Module, ctx: BatchContext) -> dict[str, tuple[int, int]]:
    """Swap linears for DeltaLinear and hook every other module that owns parameters.

    Returns {module name: (out_features, in_features)} of the delta-aware linears."""
    linears: dict[str, tuple[int, int]] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.in_features % 32 == 0:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, DeltaLinear(mod, name, ctx))
            linears[name] = (mod.out_features, mod.in_features)
        elif embedding_supports_1bit(mod):
            add_embedding_hook(mod, name, ctx)
        elif any(True for _ in mod.parameters(recurse=False)):
            add_whole_hook(mod, name, ctx)
    return linears
