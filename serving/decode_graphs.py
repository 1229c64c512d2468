"""Decode steps at fixed shapes, captured once per bucket as CUDA graphs and replayed.

A decode-only step (every row adds one token and samples the next) runs at a bucket's
shape: B rows (the batch padded up to 1, 2, 4, 8, …) × L context positions (the longest
context padded up to a power of two of KV blocks). Everything the forward reads lives in
buffers allocated once per bucket and refilled in place — token ids, positions, the
`slot_of_row`, the KV write and read indices (paged_kv.DecodeLayout), per-row sampling
parameters — and every op runs whatever the tenant mix (layers.BatchContext.set_static),
sampling included (sampling.sample: no host sync). So on CUDA the step is warmed up once,
captured into a graph, and each later step of the bucket is one `replay()`: the ~2,000
kernel launches of a 32-layer step become one, and the host only fills buffers.

A graph holds raw addresses. Every per-tenant path the bank has room for runs in it
(`reserve_stacks` allocates every slot stack at start; every stacked norm reruns per row), so
tenants arriving or leaving change only buffer contents; it is recaptured only if a slot stack's
tensors move (or, for OPT's learned position tables, when the tenants holding one change),
and keeps the tensors it captured alive until then. Every input of a step reaches the device
in one asynchronous copy from a pinned buffer (`staging`). On CPU, and with `graphs=False`, the
same buffers and the same function run eagerly (tests check there that the step neither
syncs with the host nor changes its ops with the mix). Steps with prefill chunks or
penalized rows run the engine's dynamic path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from deltafleet.kernels import BASE_SLOT

from .layers import BatchContext
from .paged_kv import DecodeLayout, PagedContext, PagedKVCache
from .sampling import SamplingParams, sample
from .staging import Pack, Staging

log = logging.getLogger("deltafleet.serving")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FIELDS = ("input_ids", "slot_of_row", "temperature", "top_p", "top_k", "seed", "position", "previous")  # staged, in order


def row_bucket(n: int) -> int:
    """The smallest bucket holding n rows (powers of two past the table)."""
    return next((b for b in ROW_BUCKETS if b >= n), 1 << (n - 1).bit_length())


def block_bucket(n: int, most: int) -> int:
    """Context blocks padded up to a power of two, at most `most` (a sequence's block table length)."""
    return min(1 << max(0, n - 1).bit_length(), most)


def reserve_stacks(bank) -> None:
    """Allocate every slot stack of the bank whole (n_slots entries, zeroed), once, before the
    first capture: a fixed-shape step runs every allocated stack (BatchContext.uses), so its
    graphs then never change as tenants arrive, leave or fill a stack. On a GPU the memory plan
    already counts these bytes (stacks there allocate whole at their first entry anyway)."""
    for stack in bank.slot_stacks():
        stack.reserve()


@dataclass
class DecodeRow:
    """One row of a decode step: what the buffers need to know about its sequence."""

    blocks: list[int]  # its KV block table
    cached: int  # tokens whose K/V are already in the cache; the new token goes at this position
    token: int  # the token added this step
    slot: int  # its bank slot, BASE_SLOT = the base
    params: SamplingParams
    seed: int  # int64
    previous: int = -1  # >= 0: `token` is still on the device, row `previous` of the previous step's output


@dataclass
class Bucket:
    """The buffers of one (rows, blocks) shape, and its graph once captured. Every input is a
    view into `staged`, one device buffer that one host copy refills per step (`_fill`)."""

    layout: DecodeLayout
    input_ids: torch.Tensor  # [1, B]
    slot_of_row: torch.Tensor  # [B] slot per row, BASE_SLOT = the base (padding rows too)
    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    seed: torch.Tensor  # [B] int64
    position: torch.Tensor  # [B] int64: index of the token being drawn
    previous: torch.Tensor  # [B] int64: row of the previous step's output holding the input token, -1 = input_ids has it
    next_ids: torch.Tensor  # [B] int64: the step's output
    staged: torch.Tensor  # [N] uint8 on the device: every input above, refilled by one copy
    staging: Staging  # its two host buffers (pinned on CUDA)
    graph: torch.cuda.CUDAGraph | None = None
    signature: tuple | None = None  # the bank paths it was captured with
    keepalive: list = field(default_factory=list)  # tensors the graph reads by address
    failed: tuple | None = None  # the signature whose capture failed: this bucket runs eagerly until it changes


class DecodeGraphs:
    def __init__(self, model: nn.Module, ctx: BatchContext, paged: PagedContext, kv: PagedKVCache,
                 device: torch.device, max_blocks_per_row: int, graphs: bool) -> None:
        self.model, self.ctx, self.paged, self.kv, self.device = model, ctx, paged, kv, device
        self.max_blocks = max_blocks_per_row
        self.graphs = graphs and device.type == "cuda"
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.captures = 0  # graphs captured so far (a metric; recaptures included)
        self.capture_error: str | None = None  # the last failed capture (its bucket runs eagerly)
        self.capture_failures = 0
        self._graph_memory = torch.cuda.graph_pool_handle() if self.graphs else None  # torch's graph memory, shared by all

    def run(self, rows: list[DecodeRow], previous_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row: [len(rows)] int64 on the device, not waited for.
        previous_ids: the previous step's output, for rows whose input token is still there."""
        n = len(rows)
        key = (row_bucket(n), block_bucket(max(len(r.blocks) for r in rows), self.max_blocks))
        b = self.buckets.get(key) or self._new_bucket(*key)
        self._fill(b, rows)
        if any(r.previous >= 0 for r in rows):  # device to device, in stream order: nothing waits for the previous step
            got = previous_ids.index_select(0, b.previous.clamp(min=0))  # [B]; rows at -1 keep their staged token
            b.input_ids[0].copy_(torch.where(b.previous >= 0, got, b.input_ids[0]))
        return self._run(b)[:n]

    def warm_up(self, max_rows: int) -> None:
        """Run every row bucket up to max_rows once (on CUDA: compile its Triton kernels and
        capture its graph) before serving, so no request waits for that: padding rows only
        (the base, the scratch block), at the smallest context bucket. Longer contexts and
        new bank paths are captured when first met (the kernels are compiled by then)."""
        for rows in (r for r in ROW_BUCKETS if r <= row_bucket(max_rows)):
            b = self.buckets.get((rows, 1)) or self._new_bucket(rows, 1)
            self._fill(b, [])
            self._run(b)

    def _run(self, b: Bucket) -> torch.Tensor:
        """The bucket's step over its filled buffers: replayed, captured first, or eager."""
        self.ctx.set_static(b.slot_of_row)
        self.paged.layout = b.layout.step_layout()
        try:
            signature = self.ctx.static_signature() if self.graphs else None
            replay = self.graphs and b.failed != signature
            if replay and (b.graph is None or b.signature != signature):
                try:
                    self._capture(b, signature)
                    b.failed = None
                except Exception as e:  # this bucket serves on eagerly (slower, still correct); the others keep theirs
                    b.failed, b.graph, replay = signature, None, False
                    self.capture_error = f"{tuple(b.slot_of_row.shape)} rows: {type(e).__name__}: {e}"  # the last one
                    self.capture_failures += 1
                    log.exception("CUDA graph capture failed for %d rows; that bucket runs eagerly until the bank's "
                                  "paths change", b.slot_of_row.shape[0])
                    self.paged.layout = b.layout.step_layout()  # a fresh mask cache for the eager run
            if replay:
                b.graph.replay()
            else:
                self._forward(b)
        finally:
            self.paged.layout = None
        return b.next_ids

    def _new_bucket(self, rows: int, blocks: int) -> Bucket:
        layout = DecodeLayout(rows, blocks, self.kv, self.device)
        staging = Staging(self.device)
        pack = self._pack(layout, rows, [])
        staged = torch.empty(pack.nbytes(), dtype=torch.uint8, device=self.device)  # its own: graphs read it by address
        _, views = pack.send(staging, self.device, dst=staged)
        named = dict(zip(FIELDS + DecodeLayout.FIELDS, views))
        layout.bind(named)
        b = Bucket(layout, staged=staged, staging=staging,
                   next_ids=torch.zeros(rows, dtype=torch.int64, device=self.device),
                   **{name: named[name] for name in FIELDS})
        self.buckets[(rows, blocks)] = b
        return b

    def _fill(self, b: Bucket, rows: list[DecodeRow]) -> None:
        """Write this step's rows into the bucket's buffers with one host -> device copy (no wait);
        padding rows are the base, greedy, at the scratch block."""
        self._pack(b.layout, b.slot_of_row.shape[0], rows).send(b.staging, self.device, dst=b.staged)

    @staticmethod
    def _pack(layout: DecodeLayout, size: int, rows: list[DecodeRow]) -> Pack:
        """The bucket's inputs for these rows, on the host, in FIELDS + DecodeLayout.FIELDS order."""
        pad = size - len(rows)
        pack = Pack()
        pack.add([[r.token for r in rows] + [0] * pad], torch.int64)  # input_ids [1, B]
        pack.add([r.slot for r in rows] + [BASE_SLOT] * pad, torch.int64)  # slot_of_row
        pack.add([r.params.temperature for r in rows] + [0.0] * pad, torch.float32)
        pack.add([r.params.top_p for r in rows] + [1.0] * pad, torch.float32)
        pack.add([r.params.top_k for r in rows] + [0] * pad, torch.int64)
        pack.add([r.seed for r in rows] + [0] * pad, torch.int64)
        pack.add([r.cached + 1 for r in rows] + [0] * pad, torch.int64)  # position
        pack.add([r.previous for r in rows] + [-1] * pad, torch.int64)  # previous
        for name, values in layout.host_fields([(r.blocks, r.cached) for r in rows]).items():  # rows=[]: all padding
            pack.add(values, torch.int64)
        return pack

    def _forward(self, b: Bucket) -> None:
        """The step itself: fixed shapes in, next ids written into b.next_ids; no host sync."""
        out = self.model(input_ids=b.input_ids, position_ids=b.layout.positions, logits_to_keep=0, use_cache=False)
        logits = out.logits[0]  # [B, V]
        b.next_ids.copy_(sample(logits, b.temperature, b.top_p, b.top_k, b.seed, b.position))

    def _capture(self, b: Bucket, signature: tuple) -> None:
        """Warm up on a side stream (Triton compiles, lazy state settles), then capture."""
        if b.graph is not None:
            log.info("decode graph %s: the bank's paths changed, recapturing", tuple(b.slot_of_row.shape))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(b)  # the warm-up computes this step's real output too
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.paged.layout = b.layout.step_layout()  # a fresh mask cache: the capture must compute the mask itself
        # thread_local: the bank's loader thread keeps copying tenants (and syncing its copy
        # stream) meanwhile; the default "global" mode would make those calls fail the capture.
        with torch.cuda.graph(graph, pool=self._graph_memory, stream=stream, capture_error_mode="thread_local"):
            self._forward(b)
        b.graph, b.signature = graph, signature
        b.keepalive = [t for stack in self.ctx.bank.slot_stacks() for t in stack.entries.values()]
        self.captures += 1
        log.info("decode graph captured: %d rows x %d context positions", b.slot_of_row.shape[0],
                 b.layout.kv_index.shape[1])
