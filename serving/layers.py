"""How one batch applies many tenants' deltas: a delta-aware linear and per-row whole tensors.

Every nn.Linear of the base (in_features a multiple of 32) is swapped for `BatchedDeltaLinear`,
which calls the batched kernel with the step's `slot_of_row`, so all tenants in a batch
share one launch per layer, and adds each row's bias from the bank's bias stack (the
fine-tune's bias where its delta stores one: served = merged, 1-bit term included). A
tenant that stores the whole matrix (an output head) gets its rows from one grouped GEMM
over the rows sorted by slot-stack entry (`_whole_rows`).
Norm weights come from the bank's per-slot stacks too: when a tenant in the batch changes
a norm, a forward hook reruns the module once over all rows with each row's weights
(torch.func.vmap over functional_call: the module's own code, no Python loop over slots).
Embeddings gather each token's row from its tenant's table in a slot stack, and add a 1-bit
embedding delta's α·sign(Δ) rows the same way (`add_embedding_hook`); a table that computes its
own indices (OPT's learned positions) is rerun per tenant in the batch (`add_table_hook`). Only modules of no
other kind (none in the supported families) fall back to recomputing each slot's rows.
Rows are sequences: every module sees batch-first inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltafleet.compress.support import reruns_per_token
from deltafleet.kernels import BASE_SLOT, SignCache, SlotGroups, delta_linear, group_rows
from deltafleet.kernels.segments import forget_fills
from deltafleet.kernels.packing import unpack_signs

from .staging import Pack


# Unpacked signs of hot (layer, tenant) pairs on CPU, used only by the torch-ops fallback
# (no C compiler): the native kernel reads the packed bits and caches nothing.
CPU_SIGN_CACHE_BYTES = 1 << 30


class BatchContext:
    """Which bank slot each row of the current forward uses (`slot_of_row`; BASE_SLOT = the base).

    Two layouts: batch-first sequences (`set`: inputs [B, S], a slot per sequence; the
    teacher-forced scorer) and a packed engine step (`set_packed`: inputs [1, T] holding every
    scheduled sequence's new tokens, a slot per token, and the K positions whose logits are
    kept, which is all the output head sees). Row grouping (a host sync on GPU) is computed
    once per step and row count, and shared by every layer of the forward pass."""

    def __init__(self, bank, sign_cache: SignCache | None = None) -> None:
        self.bank = bank
        self.sign_cache = sign_cache
        self.slots: list[int] = []  # distinct non-negative slots in the batch
        self._slot_of_seq: torch.Tensor | None = None  # [B] (batch-first layout)
        self._slot_of_row: dict[int, torch.Tensor] = {}  # row count m -> [m] slot of each row
        self._grouped: dict[int, tuple[torch.Tensor, SlotGroups | None]] = {}
        self.static = False  # a fixed-shape step (set_static): every path the bank has room for runs
        self.tables: set[str] = set()  # modules `add_table_hook` reruns once per tenant holding a table

    def set(self, slot_of_seq: list[int], device: torch.device) -> None:
        forget_fills()  # a new step: the kernels' segment metadata is rebuilt once, then shared
        self.static = False
        self._slot_of_seq = torch.tensor(slot_of_seq, dtype=torch.int64, device=device)
        self.slots = sorted({s for s in slot_of_seq if s != BASE_SLOT})
        self._slot_of_row, self._grouped = {}, {}

    def set_packed(self, slot_of_row: list[int], kept: list[int], device: torch.device,
                   staged: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """slot_of_row [T]: the slot of each packed row (one new token each); kept: the packed
        indices whose logits are computed. staged: (slot of each row [T], slot of each kept row
        [K]) already on the device, sent with the step's other inputs in one copy; without it
        they are sent here (one copy)."""
        forget_fills()  # a new step: the kernels' segment metadata is rebuilt once, then shared
        self.static = False
        if staged is None:
            pack = Pack()
            pack.add(slot_of_row, torch.int64)
            pack.add([slot_of_row[i] for i in kept], torch.int64)
            staged = tuple(pack.send(None, device)[1])
        every, kept_only = staged  # [T], [K]
        self._slot_of_seq = None
        self.slots = sorted({s for s in slot_of_row if s != BASE_SLOT})
        # T == K only when every token is kept, and then both maps are the same.
        self._slot_of_row = {len(slot_of_row): every, len(kept): kept_only}
        self._grouped = {}
        if every.device.type == "cpu":  # the CPU kernel's host-side grouping, before the forward
            for m in self._slot_of_row:
                self.grouped_rows(m)

    def set_static(self, slot_of_row: torch.Tensor) -> None:
        """A fixed-shape decode step: slot_of_row [B] (one token per row, every logit kept) is a
        device buffer refilled in place. Every slot counts as in the batch, and every per-tenant
        path the bank has room for runs whatever the tenants (`uses`, `overrides`): each allocated
        slot stack (base rows and rows without an entry keep their base result) and each stacked
        norm (base rows take the base's row of each stack). So the ops, and a CUDA graph captured
        over them, depend neither on the rows' slots nor on which tenants are loaded."""
        forget_fills()  # a new step: the kernels' segment metadata is rebuilt once, then shared
        self.static = True
        self._slot_of_seq = None
        self.slots = list(range(self.bank.n_slots))
        self._slot_of_row = {slot_of_row.shape[0]: slot_of_row}
        self._grouped = {}
        if slot_of_row.device.type == "cpu":  # the CPU kernel's host-side grouping, before the forward
            self.grouped_rows(slot_of_row.shape[0])

    def uses(self, stack) -> bool:
        """Whether this step runs a slot stack's per-row path: a fixed-shape step whenever the
        stack is allocated (its ops must not depend on which tenants hold entries), else only
        when a row's tenant holds an entry."""
        return stack.capacity > 0 if self.static else stack.in_batch(self.slots)

    def overrides(self, name: str) -> bool:
        """Whether this step reruns a stacked module (a norm) with per-row parameters: a
        fixed-shape step always does, else only when a tenant in the batch changes it."""
        return self.static or any(name in self.bank.slot_overrides[s] for s in self.slots)

    def static_signature(self) -> tuple:
        """What a fixed-shape step's ops depend on: the slot stacks allocated and the tensors they
        read (a growth replaces them; engines that decode at fixed shapes allocate every stack
        once, at start: `reserve_stacks`), and the slots of the tables rerun once per tenant
        (`add_table_hook`, OPT's learned positions). Tenants arriving or leaving change neither."""
        bank = self.bank
        stacks = tuple((kind, name, tuple(t.data_ptr() for t in stack.entries.values()))
                       for kind, by_name in (("whole", bank.whole_stacks), ("embed", bank.embed_stacks))
                       for name, stack in sorted(by_name.items()) if stack.capacity > 0)
        tables = tuple((name, tuple(sorted(bank.whole_stacks[name].slots))) for name in sorted(self.tables))
        return stacks, tables

    def slot_of_row(self, m: int) -> torch.Tensor:
        """[m] slot of each of m flattened rows ([B, S, ...] -> B*S rows, batch first)."""
        if m not in self._slot_of_row:
            if self._slot_of_seq is None:
                raise RuntimeError(f"packed step: no slot_of_row for {m} rows")
            b = self._slot_of_seq.shape[0]
            self._slot_of_row[m] = self._slot_of_seq.repeat_interleave(m // b)
        return self._slot_of_row[m]

    def grouped_rows(self, m: int) -> tuple[torch.Tensor, SlotGroups | None]:
        """Slot of each of m flattened rows, and (CPU only) their grouping. On CUDA the kernels
        read each row's slot on the device: grouping there would cost a host sync per step."""
        if m not in self._grouped:
            slot_of_row = self.slot_of_row(m)
            groups = group_rows(slot_of_row, self.bank.n_slots) if slot_of_row.device.type == "cpu" else None
            self._grouped[m] = (slot_of_row, groups)
        return self._grouped[m]


class BatchedDeltaLinear(nn.Module):
    """y = x·Wᵀ + α_t·(x·sign(Δ_t)ᵀ) (+ bias) for each row's slot t: many tenants' deltas in one
    batch, one `delta_linear` call. (compress/apply.py's DeltaLinear applies one delta.)"""

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
        slot_of_row, groups = ctx.grouped_rows(x2.shape[0])
        y = delta_linear(x2, self.weight, signs, scales, slot_of_row, groups=groups, sign_cache=ctx.sign_cache)  # [M, N]
        bias = None
        if self.bias is not None:
            stack_row = (slot_of_row + 1).long()  # [M]; stack row 0 (BASE_SLOT + 1) = the base's
            bias = ctx.bank.bias_stacks[self.name].index_select(0, stack_row)  # [M, N]
            y = y + bias
        stack = ctx.bank.whole_stacks.get(self.name)
        if stack is not None and ctx.uses(stack):  # a tenant that stores this whole matrix
            y = _whole_rows(x2, y, stack, slot_of_row, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.name}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def whole_rows_path(device_type: str) -> str:
    """Which grouped GEMM computes the whole-matrix rows: "triton" on CUDA, "torch" elsewhere.

    On CUDA, F.grouped_mm is sync-free only for bf16 on sm90/sm100 (CUTLASS); fp16, fp32 and
    bf16 on other GPUs take torch's fallback, which copies offs to the host (a sync: a CUDA
    graph of the decode step could not be captured). The Triton kernel reads offs on the
    device for every dtype and GPU, so one path serves all. On CPU F.grouped_mm loops over
    the groups in C++ on host memory: nothing to sync, and no Triton needed."""
    return "triton" if device_type == "cuda" else "torch"


def _whole_rows(x: torch.Tensor, y: torch.Tensor, stack, slot_of_row: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """y with the rows of tenants that store this matrix whole replaced by x·W_tᵀ (+ b_t).

    x [M, K], y [M, N], slot_of_row [M] (BASE_SLOT = the base). One grouped GEMM over the rows
    sorted by slot-stack entry: each tenant's matrix is read once, however many rows it has.
    Rows without an entry sort first and fall in entry 0's group; their results are dropped."""
    weight = stack.entries["weight"]  # [E, N, K], read once: a concurrent growth swaps in a new tensor
    entry = stack.entry_of_slot.index_select(0, slot_of_row.long() + 1)  # [M], NO_ENTRY (-1) = no whole matrix
    order = torch.argsort(entry, stable=True)  # [M]
    counts = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=x.device)
    counts.index_add_(0, entry + 1, torch.ones_like(entry))  # [E + 1], bucket 0 = rows without one
    offs = counts.cumsum(0)[1:].to(torch.int32)  # [E], end of each entry's rows in `order`
    x_sorted = x.index_select(0, order)  # [M, K]
    if whole_rows_path(x.device.type) == "triton":
        from deltafleet.kernels.triton_grouped import grouped_mm_triton  # imported on first use, as the other Triton kernels

        y_sorted = grouped_mm_triton(x_sorted, weight, offs)  # [M, N]
    else:
        y_sorted = F.grouped_mm(x_sorted, weight.transpose(1, 2), offs=offs)  # [M, N]
    whole = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to batch order
    if bias is not None:
        whole = whole + bias
    return torch.where((entry >= 0)[:, None], whole.to(y.dtype), y)


def add_embedding_hook(module: nn.Embedding, name: str, ctx: BatchContext) -> None:
    """Each token's embedding from its tenant's table: the slot-stack entry of a tenant that stores
    the table whole, else the base's, plus α·sign(Δ) of a 1-bit embedding delta."""

    def hook(mod, args, output):
        if not ctx.slots:
            return None
        ids = args[0]  # [B, S]
        stack_row = ctx.slot_of_row(ids.numel()).view_as(ids) + 1  # [B, S]; 0 (BASE_SLOT + 1) = the base
        vocab, scale = mod.num_embeddings, getattr(mod, "embed_scale", None)
        stack = ctx.bank.whole_stacks[name]
        if ctx.uses(stack):
            table = stack.entries["weight"]  # [E, V, H]
            entry = stack.entry_of_slot[stack_row]  # [B, S], NO_ENTRY (-1) = the base's table
            rows = F.embedding(entry.clamp(min=0) * vocab + ids, table.view(-1, table.shape[-1]))  # [B, S, H]
            if scale is not None:
                rows = rows * scale.to(rows.dtype)
            output = torch.where((entry >= 0)[..., None], rows.to(output.dtype), output)
        one_bit = ctx.bank.embed_stacks.get(name)
        if one_bit is not None and ctx.uses(one_bit):
            signs, alphas = one_bit.entries["signs"], one_bit.entries["scales"]  # [E, V, H // 32], [E, V]
            entry = one_bit.entry_of_slot[stack_row]  # [B, S]
            flat = (entry.clamp(min=0) * vocab + ids).reshape(-1)  # [B*S]
            packed = signs.view(-1, signs.shape[-1]).index_select(0, flat)  # [B*S, H // 32]
            alpha = alphas.view(-1).index_select(0, flat) * (entry.reshape(-1) >= 0)  # [B*S], 0 = no delta
            delta = (unpack_signs(packed, torch.float32) * alpha[:, None]).to(output.dtype)  # [B*S, H]
            if scale is not None:  # Gemma-style scaled embeddings multiply inside the module
                delta = delta * scale.to(output.dtype)
            output = output + delta.view_as(output)
        return output

    module.register_forward_hook(hook)


def add_table_hook(module: nn.Embedding, name: str, ctx: BatchContext) -> None:
    """A table that computes its own indices (OPT's learned positions, looked up from the
    attention mask): rerun the module with the table of each tenant in the batch that stores
    one whole, and keep that tenant's rows. One call per such tenant (a Python loop over the
    batch's slots, host-known, no sync): these tables are small, and only such modules take it."""
    busy = [False]
    ctx.tables.add(name)  # its ops follow the tenants holding a table: part of the static signature

    def hook(mod, args, kwargs, output):
        stack = ctx.bank.whole_stacks[name]
        if busy[0] or not ctx.slots or not stack.in_batch(ctx.slots):
            return None
        lead = output.shape[:-1]  # [B, S] or [1, T]: one row of the table per token
        slot_of_row = ctx.slot_of_row(math.prod(lead)).view(lead)  # [B, S]
        table = stack.entries["weight"]  # [E, V, H]
        busy[0] = True
        try:
            for s in ctx.slots:
                if s in stack.slots:
                    y = torch.func.functional_call(mod, {"weight": table[stack.slot_of_entry.index(s)]}, args, kwargs)
                    output = torch.where((slot_of_row == s)[..., None], y.to(output.dtype), output)
        finally:
            busy[0] = False
        return output

    module.register_forward_hook(hook, with_kwargs=True)


def add_norm_hook(module: nn.Module, name: str, ctx: BatchContext, heads_first: bool = False) -> None:
    """Rerun a small module (a norm) with each token's parameters when a tenant in the batch
    changes them, in one call over the bank's stacks — no Python loop over slots.

    Norms use their weight elementwise (`weight * x`, `x * (1 + weight)`), so the module's own
    forward run once with per-token weights [B, S, ..., H] computes every token exactly as
    that token's tenant would. A module for which that is not so (it raises, or differs) is
    run under torch.func.vmap over functional_call instead: exact for any module, slower.
    Which one holds is checked on the first batch that needs it, against vmap.
    `heads_first`: the module sees [B, H, S, D] (a per-head norm after the head transpose,
    Gemma 3's q/k norms; found by `heads_first_modules`), so tokens are dim 2, not dim 1."""
    busy = [False]
    broadcasts: list[bool] = []  # decided once: [True] = per-token weights broadcast exactly

    def call(mod, params, x):
        busy[0] = True
        try:
            return torch.func.functional_call(mod, params, (x,))
        finally:
            busy[0] = False

    def by_vmap(mod, params, x, m):
        return torch.func.vmap(lambda p, xi: call(mod, p, xi))(params, x.reshape(m, 1, *x.shape[2:]))  # [m, 1, ...]

    def by_broadcast(mod, params, x):
        lead = x.shape[:2]  # [B, S]
        shaped = {p: t.reshape(*lead, *([1] * (x.dim() - 2 - (t.dim() - 1))), *t.shape[1:]) for p, t in params.items()}
        return call(mod, shaped, x)

    def hook(mod, args, output):
        if busy[0] or not ctx.slots or not isinstance(output, torch.Tensor):
            return None
        if not ctx.overrides(name):
            return None
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
            raise RuntimeError(f"{name}: a per-tenant norm must take one batch-first tensor [B, S, ...] or [tokens, H]")
        x = args[0]  # [B, S, *rest]
        if x.dim() == 2:  # tokens flattened by the model (OPT's MLP): one token per row
            x = x[:, None]  # [tokens, 1, H]
        if heads_first:  # a per-head norm after the head transpose (Gemma 3's q/k norms): [B, H, S, D]
            x = x.transpose(1, 2)  # [B, S, H, D]
        m = x.shape[0] * x.shape[1]  # tokens
        stack_row = ctx.slot_of_row(m) + 1  # [m]; stack row 0 (BASE_SLOT + 1) is the base's
        params = {p: t.index_select(0, stack_row) for p, t in ctx.bank.param_stacks[name].items()}  # [m, *shape]
        shape = (output.transpose(1, 2) if heads_first else output).shape
        if not broadcasts:
            want = by_vmap(mod, params, x, m).reshape(shape)
            try:
                got = by_broadcast(mod, params, x)
                broadcasts.append(got.shape == shape and bool(torch.equal(got, want)))
            except RuntimeError:
                broadcasts.append(False)
            mod.deltafleet_norm_path = "broadcast" if broadcasts[0] else "vmap"  # for tests and debugging
            y = want
        else:
            y = by_broadcast(mod, params, x) if broadcasts[0] else by_vmap(mod, params, x, m)
        y = y.reshape(shape)
        return (y.transpose(1, 2) if heads_first else y).to(output.dtype)

    module.register_forward_hook(hook)


def embedding_supports_1bit(mod: nn.Module) -> bool:
    """Embeddings `add_embedding_hook` serves: plain, or scaled by `embed_scale` inside the module."""
    return isinstance(mod, nn.Embedding) and (type(mod) is nn.Embedding or hasattr(mod, "embed_scale"))


def heads_first_modules(model: nn.Module, names: set[str]) -> set[str]:
    """Which of these modules take [B, H, S, D] rather than [B, S, ...]: one base forward of a
    7-token prompt (7: no head count or hidden size is 7) records each module's input shape."""
    device = next(model.parameters()).device
    if device.type == "meta" or not names:  # nothing will run (memory planning), or nothing to learn
        return set()
    seen: dict[str, torch.Size] = {}

    def record(name):
        def hook(mod, args):
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(name, args[0].shape)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 7, dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n for n, shape in seen.items() if len(shape) == 4 and shape[1] != 7 and shape[2] == 7}


def patch_model(model: nn.Module, ctx: BatchContext, small_modules: set[str]) -> dict[str, tuple[int, int]]:
    """Swap linears for BatchedDeltaLinear, hook embeddings and the small modules (norms) whose
    parameters the bank stacks per slot. A delta that stores whole parameters of any other
    module is refused by the bank (there is no per-token path for it).

    Returns {module name: (out_features, in_features)} of the delta-aware linears."""
    linears: dict[str, tuple[int, int]] = {}
    heads_first = heads_first_modules(model, small_modules)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.in_features % 32 == 0:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, BatchedDeltaLinear(mod, name, ctx))
            linears[name] = (mod.out_features, mod.in_features)
        elif embedding_supports_1bit(mod):
            add_embedding_hook(mod, name, ctx)
        elif isinstance(mod, nn.Embedding):
            add_table_hook(mod, name, ctx)
        elif name in small_modules:
            add_norm_hook(mod, name, ctx, name in heads_first)
    return linears




def small_param_modules(model: nn.Module, linears: set[str] = frozenset()) -> dict[str, dict[str, torch.Tensor]]:
    """Modules rerun per token with each tenant's parameters (norms: `reruns_per_token`, the
    rule compress checks too), other than delta-aware linears (by name, or nn.Linear with
    in_features % 32 == 0 before patching) and embeddings."""
    out = {}
    for name, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        if not params or name in linears or isinstance(mod, (nn.Embedding, BatchedDeltaLinear)):
            continue
        if isinstance(mod, nn.Linear) and mod.in_features % 32 == 0:
            continue
        if reruns_per_token(mod):
            out[name] = params
    return out
