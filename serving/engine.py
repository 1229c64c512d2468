"""The engine: one base model, a DeltaBank of tenants, continuous batching across tenants.

A background thread runs the loop. Each step: admit waiting requests whose tenant is on the
device (up to `max_batch_size` sequences), plan the step (serving/scheduler.py: decode rows
first, then prefill chunks, within a token budget and the free KV blocks, preempting the
youngest sequence when blocks run out), run ONE forward pass over all scheduled tokens
packed into one row — rows of different tenants, one kernel launch per linear — with K/V in
a paged KV cache (serving/paged_kv.py), sample where a sequence reached its last token, hand the
new tokens to the output thread (serving/output.py: detokenization, stop strings,
streaming), drop rows that finished or were cancelled.
Requests wait in a bounded queue; a request whose tenant is still loading waits up to
`load_timeout_s`. Framework-free: Ray is not needed.

A step whose rows all decode (one token each, none penalized) runs at a fixed bucket shape
through serving/decode_graphs.py: on CUDA a captured graph replayed per step (`decode_mode`
"graphs", the default there), elsewhere the same fixed-shape code eagerly ("static") or the
packed dynamic forward ("dynamic", the CPU default: no padding). Such a step is read back
one step late: when the next step decodes the same rows, it is launched first (its input
tokens copied on the device from this step's output) and this step's tokens are read,
checked and handed to the output thread while the device runs it.

A packed step's inputs (token ids, slot_of_row, the KV layout, sampling settings) are written on the
host and sent in one asynchronous copy (serving/staging.py). Full KV blocks are cached per
tenant (serving/paged_kv.py); a new sequence, or one preempted, takes its cached blocks back.

From HTTP to the kernel, one name per link of the chain:

    request `model` -> tenant (str; BASE_TENANT = None: the base model itself)
    tenant -> slot (int): `DeltaBank.acquire(tenant)` pins the slot holding the tenant's delta
              (`Sequence.slot`; BASE_SLOT = -1 for the base)
    step   -> `slot_of_row` [rows]: each packed row's (token's) slot, staged with the step's
              inputs (`BatchContext.set_packed` / `set_static`) and passed as is to
              `delta_linear(x, W, signs, scales, slot_of_row)`; signs/scales are stacks over slots.

`Engine.from_args(AppArgs)` builds an engine from a pool's `args`: a serving knob added to
AppArgs under the name of an Engine parameter reaches the engine with no other change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltafleet.kernels import BASE_SLOT

from .bank import FAILED, READY
from .config import DECODE_MODES, AppArgs
from .decode_graphs import DecodeGraphs, DecodeRow, reserve_stacks
from .detokenize import IncrementalText
from .output import Emission, End, Event, OutputThread, Token
from .paged_kv import PagedContext, PagedKVCache, StepLayout, attach
from .sampling import SamplingParams, as_int64, next_tokens, stage_sampling
from .scheduler import SeqView, admission_order, blocks_to_finish, plan_step
from .served import build_served_model
from .staging import Pack, Staging

log = logging.getLogger("deltafleet.serving")
BASE_TENANT = None  # the tenant value meaning "the base model itself"
# AppArgs fields that configure the Ray application, not the engine (every other field is an
# Engine parameter of the same name: `Engine.from_args`).
APP_ONLY_ARGS = frozenset({"pool", "store_root", "max_request_bytes", "auth", "placement", "max_tenants_per_replica"})
# Admission reserves KV blocks for up to this many more tokens of each admitted sequence, so
# sequences admitted together can decode that far without preempting each other.
KV_GROWTH_HORIZON = 256


class EngineError(Exception):
    """A request the engine cannot serve; `status` is the HTTP status the API answers with."""

    status, type = 500, "server_error"


class BadRequest(EngineError):
    status, type = 400, "invalid_request_error"


class UnknownTenant(EngineError):
    status, type = 404, "model_not_found"


class Overloaded(EngineError):
    status, type = 429, "overloaded"


class TenantUnavailable(EngineError):
    status, type = 503, "tenant_unavailable"


class EngineStopped(EngineError):
    """The engine's own failure (a thread died on an unexpected error): Ray's health check then
    replaces the replica; until it does, every request gets this."""

    status, type = 503, "engine_unavailable"


class RequestStream:
    """What `submit` returns: iterate (sync or async) over Events; `cancel()` when the client leaves."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._q: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.cancelled = False

    def put(self, ev: Event) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._q.put_nowait, ev)
        else:
            self._q.put(ev)

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self):
        while True:
            ev = self._q.get()
            yield ev
            if ev.finish_reason or ev.error:
                return

    async def __aiter__(self):
        while True:
            ev = await self._q.get()
            yield ev
            if ev.finish_reason or ev.error:
                return


@dataclass
class StepStats:
    """One engine step, for metrics."""

    seconds: float
    sequences: int  # rows in the step
    tenants: int  # distinct tenants among them (the base counts as one)
    prefill_tokens: int
    decode_tokens: int
    kv_blocks_used: int
    kv_blocks_free: int  # never used, or cached with no sequence holding them
    kv_blocks_cached: int = 0  # in the prefix cache, held or not
    prefix_cached_tokens: int = 0  # prompt tokens taken from the prefix cache since the step before


@dataclass
class Sequence:
    id: int
    tenant: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    created: float = field(default_factory=time.monotonic)
    slot: int = BASE_SLOT  # its bank slot while running (acquired at admission)
    seed: int = 0  # int64; with the position, it decides every draw (sampling.sample)
    out_ids: list[int] = field(default_factory=list)
    out: Emission | None = None  # the output thread's side: detokenizer, text streamed so far
    first_token_at: float | None = None
    computed: int = 0  # tokens (prompt + generated) whose K/V are in the cache
    pending: int = 0  # its newest tokens still on the device: outputs of launched steps not yet read back
    blocks: list[int] = field(default_factory=list)  # KV cache blocks, in position order
    prefix_root: bytes = b""  # the prefix cache's key for this sequence's model: the base, or its tenant's registration
    block_keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks, as far as computed
    remembered: int = 0  # its first blocks that are in the prefix cache

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids) + self.pending

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.out_ids[i - n]


@dataclass
class InFlight:
    """A fixed-shape step launched and not yet read back: its rows, and where their tokens land."""

    seqs: list[Sequence]
    ids: torch.Tensor  # [n] int64 on the device: the bucket's output rows (the next step may read them there)
    host: torch.Tensor  # [n] int64 on the host (pinned on CUDA), filled by an async copy
    ready: torch.cuda.Event | None  # recorded after that copy (None on CPU: nothing is async)


class Engine:
    def __init__(
        self,
        base_model: str,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        max_queue: int = 256,
        gpu_bank_bytes: int = 4 << 30,
        cpu_bank_bytes: int = 16 << 30,
        load_timeout_s: float = 120.0,
        queue_timeout_s: float = 300.0,
        max_queue_per_tenant: int | None = None,
        kv_growth_horizon: int = KV_GROWTH_HORIZON,
        kv_cache_bytes: int | None = None,
        kv_block_size: int = 16,
        max_step_tokens: int = 512,
        decode_mode: str = "auto",
        prefix_caching: bool = True,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {decode_mode!r}")
        served = build_served_model(base_model, device, dtype, gpu_bank_bytes, cpu_bank_bytes, on_change=self._wake)
        self.device, self.dtype = served.device, served.dtype
        self.model, self.tokenizer, self.ctx, self.bank = served.model, served.tokenizer, served.ctx, served.bank
        self.fingerprint = served.fingerprint
        self.max_batch_size, self.max_queue, self.load_timeout_s = max_batch_size, max_queue, load_timeout_s
        self.max_queue_per_tenant = max_queue_per_tenant or max(1, max_queue // 2)
        self.queue_timeout_s, self.prefix_caching = queue_timeout_s, prefix_caching
        self.kv_growth_horizon = kv_growth_horizon  # tokens of growth admission reserves per sequence
        self.max_step_tokens = max_step_tokens  # decode rows + prefill chunks per step
        self.on_step = on_step  # called on the decode thread after every step
        self.eos_ids = self._eos_ids()
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.kv = self._make_kv_cache(kv_cache_bytes, kv_block_size)
        self.paged = PagedContext(self.kv)
        if attach(self.model, self.paged) == 0:
            raise ValueError(f"{base_model}: no attention modules found for the paged KV cache")
        self.decode_mode = decode_mode if decode_mode != "auto" else "graphs" if self.device.type == "cuda" else "dynamic"
        self.decoder = self._make_decoder()
        self.staging = Staging(self.device)  # a packed step's inputs: one pinned copy per step
        self.pending: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.counters = {"preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0, "failed_steps": 0, "fixed_shape_steps": 0,
                         "overlapped_steps": 0, "prefix_cached_tokens": 0}
        self.device_error: str | None = None  # a sticky device error: the replica must be replaced
        self.failure: str | None = None  # the decode loop died on an unexpected error
        self._inflight: InFlight | None = None  # the last fixed-shape step, until its tokens are read
        self._cached_since_step = 0  # prompt tokens admissions took from the prefix cache, for StepStats
        self._ids = itertools.count()
        # Every request whose stream has not had its last Event (queued, running, or finished
        # with its last token still with the output thread): if that thread dies, these get the error.
        self._open: dict[int, Sequence] = {}
        self._cv = threading.Condition()
        self._stop = False
        self.output = OutputThread(EngineError)
        self._thread = threading.Thread(target=self._loop, name="deltafleet-decode", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: AppArgs, **extra) -> Engine:
        """The engine a pool's `args` describe: every AppArgs field but APP_ONLY_ARGS is the Engine
        parameter of the same name. `extra`: what AppArgs does not hold (e.g. on_step)."""
        return cls(**{k: v for k, v in args.model_dump().items() if k not in APP_ONLY_ARGS}, **extra)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _make_decoder(self) -> DecodeGraphs | None:
        """The fixed-shape decode steps (none in the "dynamic" mode), warmed up before any request."""
        if self.decode_mode == "dynamic":
            return None
        max_blocks = self.kv.blocks_for(min(self.max_len, self.kv.n_blocks * self.kv.block_size))
        decoder = DecodeGraphs(self.model, self.ctx, self.paged, self.kv, self.device, max_blocks,
                               graphs=self.decode_mode == "graphs")
        reserve_stacks(self.bank)  # every slot stack allocated before capture: tenants then change contents only
        with torch.inference_mode():
            decoder.warm_up(self.max_batch_size)  # kernels compiled, graphs captured: before any request
        return decoder

    def _make_kv_cache(self, kv_cache_bytes: int | None, block_size: int) -> PagedKVCache:
        """Size the cache from what the device has left after the base and the bank (GPU), or
        1 GiB (CPU), unless given; at least one sequence of the full context must fit."""
        cfg = self.model.config
        layers, kv_heads = cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if getattr(cfg, "multi_query", False):  # GPTBigCode (StarCoder 1): one K/V head, no num_key_value_heads
            kv_heads = 1
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_block = PagedKVCache.bytes_per_block(layers, block_size, kv_heads, head_dim, self.dtype)
        if kv_cache_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_bytes = kv_budget(free, self.bank.unallocated_bytes())
            else:
                kv_cache_bytes = 1 << 30
        n_blocks = kv_cache_bytes // per_block
        if n_blocks < 1:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds no KV block ({per_block} bytes each)")
        n_blocks = min(n_blocks, self.max_batch_size * -(-self.max_len // block_size))  # never more than the batch can use
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", n_blocks, block_size, n_blocks * per_block / 2**20)
        return PagedKVCache(layers, n_blocks, block_size, kv_heads, head_dim, self.dtype, self.device)

    # ---- tenant set ---------------------------------------------------------------------
    def set_tenants(self, tenants: dict[str, Path]) -> None:
        """Make the tenant set exactly this: new ones load in the background, removed ones unload."""
        for name in set(self.bank.names()) - set(tenants):
            self.bank.unregister(name)
        for name, path in tenants.items():
            self.bank.register(name, Path(path))

    def add_tenant(self, name: str, path: Path) -> None:
        self.bank.register(name, Path(path))

    def remove_tenant(self, name: str) -> None:
        self.bank.unregister(name)

    def wait_ready(self, names: list[str] | None = None, timeout: float = 60.0) -> dict[str, str]:
        """Block until the tenants are loaded or failed; their statuses."""
        deadline = time.monotonic() + timeout
        names = self.bank.names() if names is None else names
        while time.monotonic() < deadline:
            st = {n: getattr(self.bank.status(n), "status", "missing") for n in names}
            if all(s != "loading" for s in st.values()):
                return st
            time.sleep(0.02)
        raise TimeoutError(f"tenants still loading after {timeout}s: {[n for n, s in st.items() if s == 'loading']}")

    # ---- requests -------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt).input_ids

    def submit(
        self,
        tenant: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> RequestStream:
        """Tokenize and queue a request. `abandoned`: checked once the prompt is tokenized, before
        the request is queued — true when the caller no longer wants it (it is then never run)."""
        params = params or SamplingParams()
        problem = self.problem()
        if problem:
            raise EngineStopped(f"this replica cannot serve: {problem}")
        if tenant is not BASE_TENANT:
            t = self.bank.status(tenant)
            if t is None:
                raise UnknownTenant(f"model {tenant!r} is not served by this pool")
            if t.status == FAILED:
                raise TenantUnavailable(f"model {tenant!r} failed to load: {t.error}")
        ids = self.encode(prompt)
        if not ids:
            raise BadRequest("prompt is empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"prompt token id {bad} is outside the model's vocabulary [0, {self.vocab_size})")
        capacity = self.kv.n_blocks * self.kv.block_size
        if params.max_tokens is None:  # chat's default: whatever context the prompt leaves
            params = params.model_copy(update={"max_tokens": max(1, min(self.max_len, capacity) - len(ids))})
        if len(ids) + params.max_tokens > self.max_len:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of {self.max_len}")
        if len(ids) + params.max_tokens > capacity:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this replica's "
                             f"KV cache of {capacity} tokens")
        stream = RequestStream(loop)
        seed = as_int64(params.seed) if params.seed is not None else random.getrandbits(63)
        seq = Sequence(next(self._ids), tenant, ids, params, stream, seed=seed,
                       out=Emission(stream, params, len(ids), IncrementalText(self.tokenizer)))
        with self._cv:
            if abandoned is not None and abandoned():  # the client left while its prompt was tokenized
                stream.cancel()
                return stream
            if self._stop or self.failure:  # the loop already failed what was queued: this would wait for ever
                raise EngineStopped(f"this replica cannot serve: {self.failure or 'engine is shutting down'}")
            if len(self.pending) >= self.max_queue:
                raise Overloaded(f"queue is full ({self.max_queue} waiting requests); retry later")
            mine = sum(1 for s in self.pending if s.tenant == tenant)
            if mine >= self.max_queue_per_tenant:  # one tenant never locks the others out of the queue
                who = "the base model" if tenant is BASE_TENANT else f"model {tenant!r}"
                raise Overloaded(f"{who} already has {mine} requests waiting (its share of the queue); retry later")
            self.pending.append(seq)
            self._open[seq.id] = seq
            self._cv.notify()
        return stream

    def generate(self, tenant: str | None, prompt: str | list[int], params: SamplingParams | None = None) -> Event:
        """Blocking convenience: the whole completion as one Event (text, token ids, finish reason)."""
        text, ids, last = [], [], None
        for ev in self.submit(tenant, prompt, params):
            if ev.error:
                raise ev.error
            text.append(ev.text)
            ids += ev.token_ids
            last = ev
        return Event("".join(text), ids, last.finish_reason, None, last.prompt_tokens, last.completion_tokens)

    def stats(self) -> dict:
        with self._cv:
            return {
                "running": len(self.running), "waiting": len(self.pending), "steps": self.steps, **self.counters,
                "kv_blocks_free": self.kv.num_free, "kv_blocks_total": self.kv.n_blocks,
                "kv_blocks_cached": self.kv.num_cached, "bank": self.bank.stats(),
                "decode_mode": self.decode_mode,
                "graph_capture_failures": self.decoder.capture_failures if self.decoder else 0,
                "graph_capture_error": self.decoder.capture_error if self.decoder else None,
                "graphs_captured": self.decoder.captures if self.decoder else 0,
            }

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.output.close()
        self.bank.close()

    # ---- the loop ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stop:
                        break
                    if not self.running:
                        self._cv.wait(timeout=0.05 if self.pending else 0.5)
                    waiting = list(self.pending)
                    self._open = {i: s for i, s in self._open.items() if not s.out.ended}
                if self.output.failure:  # its streams would never end: stop serving, say why
                    raise RuntimeError(self.output.failure)
                with torch.inference_mode():
                    self._admit(waiting)
                    if self.running:
                        self._step()
        except Exception as e:  # noqa: BLE001 - admission, planning, bookkeeping: the loop must not die silently
            log.exception("decode loop: unexpected error; failing every request and the health check")
            self.failure = f"decode loop stopped: {type(e).__name__}: {e}"
            self._fail_all(EngineStopped(self.failure))
            return
        self._fail_all(TenantUnavailable("engine is shutting down"))

    def problem(self) -> str | None:
        """Why this engine cannot serve (the health check's answer), or None."""
        if self.failure:
            return self.failure
        if not self._thread.is_alive() and not self._stop:
            return "the decode loop has stopped"
        if self.output.failure:
            return self.output.failure
        if self.device_error:
            return f"device error, the replica must be replaced: {self.device_error}"
        return None

    def _admit(self, waiting: list[Sequence]) -> None:
        """Queued requests -> batch rows: in fair-share order across tenants (scheduler.admission_order),
        and only while the KV cache holds what the admitted sequences may grow to (up to
        KV_GROWTH_HORIZON tokens each): new work waits rather than preempting running work."""
        now = time.monotonic()
        rows: dict = {}
        for s in self.running:
            rows[s.tenant] = rows.get(s.tenant, 0) + 1
        by_id = {id(s): s for s in waiting}
        waiting = [by_id[i] for i in admission_order([(id(s), s.tenant) for s in waiting], rows)]
        reserved = sum(self._growth_blocks(s) for s in self.running)
        kv_full = False
        for seq in waiting:
            error = None
            if seq.stream.cancelled:
                error = "cancelled"
            elif seq.tenant is not BASE_TENANT:
                t = self.bank.status(seq.tenant)
                if t is None:
                    error = UnknownTenant(f"model {seq.tenant!r} was removed from this pool")
                elif t.status == FAILED:
                    error = TenantUnavailable(f"model {seq.tenant!r} failed to load: {t.error}")
                elif t.status != READY and now - seq.created > self.load_timeout_s:
                    error = TenantUnavailable(f"model {seq.tenant!r} did not become ready within {self.load_timeout_s:.0f}s")
            if error is None and now - seq.created > self.queue_timeout_s:
                error = Overloaded(f"waited {now - seq.created:.0f}s for a batch row: the pool is saturated; retry later")
            if error is not None:
                self._dequeue(seq)
                _end_here(seq, Event("", [], "cancelled") if error == "cancelled" else Event("", [], error=error))
                continue
            if len(self.running) >= self.max_batch_size or kv_full:
                continue
            need = self._growth_blocks(seq)
            if self.running and reserved + need > self.kv.num_free:
                kv_full = True  # strict order from here: a large prompt is not overtaken for ever
                continue
            if seq.tenant is not BASE_TENANT:
                if t.status != READY:  # t from the lookup above: the tenant may be gone by now
                    continue
                slot = self.bank.acquire(seq.tenant)
                if slot is None:
                    continue  # being copied to the device (or all slots pinned): others go ahead
                seq.slot = slot
            self._dequeue(seq)
            self._reuse_prefix(seq)
            reserved += need
            self.running.append(seq)  # the rest of its prompt is prefilled in chunks by the coming steps

    def _growth_blocks(self, seq: Sequence) -> int:
        remaining = seq.params.max_tokens - len(seq.out_ids) - seq.pending
        return blocks_to_finish(seq.n_tokens, remaining, len(seq.blocks), self.kv.block_size, self.kv_growth_horizon)

    # ---- prefix cache -----------------------------------------------------------------------
    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a new sequence from the cached blocks of its prompt's longest cached prefix.
        Keyed by the delta in its slot (BankEntry.registration), never by tokens alone."""
        seq.prefix_root = b"base" if seq.tenant is BASE_TENANT else b"tenant:%d" % self.bank.registration(seq.slot)
        self._take_cached(seq, len(seq.prompt_ids))  # the prompt's last token is always computed: it gives the first token

    def _take_cached(self, seq: Sequence, end: int) -> int:
        """A sequence with nothing computed (new, or preempted) takes the cached blocks of the
        longest cached run of its tokens before `end`, leaving at least the token at end - 1 to
        compute. Its generated tokens count too: a preempted sequence finds its own blocks.
        Returns the tokens taken."""
        if not self.prefix_caching:
            return 0
        seq.blocks = self.kv.take_cached(self._block_keys(seq, (end - 1) // self.kv.block_size))
        seq.remembered = len(seq.blocks)
        seq.computed = len(seq.blocks) * self.kv.block_size
        self.counters["prefix_cached_tokens"] += seq.computed
        self._cached_since_step += seq.computed
        return seq.computed

    def _block_keys(self, seq: Sequence, n: int) -> list[bytes]:
        """The content keys of the sequence's first n full blocks (computed once each)."""
        bs = self.kv.block_size
        while len(seq.block_keys) < n:
            i = len(seq.block_keys)
            previous = seq.block_keys[-1] if seq.block_keys else seq.prefix_root
            seq.block_keys.append(PagedKVCache.block_key(previous, [seq.token(j) for j in range(i * bs, (i + 1) * bs)]))
        return seq.block_keys[:n]

    def _remember(self, batch: list[tuple[Sequence, int]]) -> None:
        """After a step: the blocks it filled go into the prefix cache. Only tokens known on the
        host count (a token still on the device, in the overlap, waits for the next step)."""
        if not self.prefix_caching:
            return
        for s, _ in batch:
            full = min(s.computed, len(s.prompt_ids) + len(s.out_ids)) // self.kv.block_size
            if full > s.remembered:
                for i, key in enumerate(self._block_keys(s, full)[s.remembered:], s.remembered):
                    self.kv.remember(s.blocks[i], key)
                s.remembered = full

    def _dequeue(self, seq: Sequence) -> None:
        with self._cv:
            self.pending.remove(seq)

    def _step(self) -> None:
        """Plan and run one step. A fixed-shape decode step is launched and read back one step
        later: when the next step decodes exactly the same rows, it is launched first — its
        input tokens taken on the device from this step's output — and this step's tokens are
        read and streamed while the device runs it (host/device overlap)."""
        if self._inflight is not None and not self._may_overlap():
            self._resolve()
        # Rows a stop string ended (their last Event is out) and rows whose client left.
        stopped = [s for s in self.running if s.out.stopped]
        cancelled = [s for s in self.running if s.stream.cancelled and not s.out.stopped]
        self.output.put([End(s.out, self._final(s, "cancelled")) for s in cancelled])
        self._drop(stopped + cancelled)
        if not self.running:
            return
        views = [SeqView(s.id, s.n_tokens, s.computed, len(s.blocks), self.kv.exclusive(s.blocks)) for s in self.running]
        plan = plan_step(views, self.kv.num_free, self.kv.block_size, self.max_step_tokens, self.max_step_tokens)
        by_id = {s.id: s for s in self.running}
        if self._inflight is not None and (plan.preempt or set(plan.chunks) != {s.id for s in self._inflight.seqs}
                                           or not self._fixed_shape([(by_id[i], n) for i, n in plan.chunks.items()])):
            self._resolve()  # the plan needs the tokens on the host: read them, plan again next iteration
            return
        for sid in plan.preempt:  # recomputed later from its tokens
            self.kv.release(by_id[sid].blocks)
            by_id[sid].computed = by_id[sid].remembered = 0
            self.counters["preemptions"] += 1
        for sid, n in plan.chunks.items():  # a preempted sequence's blocks may still be cached: take them back
            s = by_id[sid]
            if s.computed == 0 and not s.blocks:  # chunk [0, n) -> [taken, n): the same end, so no more blocks than planned
                plan.chunks[sid] = n - self._take_cached(s, n)
        if not plan.chunks:
            return
        batch = [(by_id[sid], n) for sid, n in plan.chunks.items()]
        t0 = time.perf_counter()
        previous, tokens = self._inflight, []
        try:
            if self._fixed_shape(batch):
                self._inflight = self._launch(batch, previous)
            else:
                tokens = self._forward(batch)
        except Exception as e:
            log.exception("engine step failed")
            self.counters["failed_steps"] += 1
            if previous is not None:  # read the step before first; the next step runs without overlap
                self._resolve()
                return
            if _is_sticky_device_error(e) or len(batch) == 1:
                if _is_sticky_device_error(e):
                    self.device_error = f"{type(e).__name__}: {e}"
                self._fail([s for s, _ in batch], e)
                return
            tokens = []  # find the culprit: each row alone (the failed pass advanced nothing)
            for s, n in batch:
                try:
                    tokens += self._forward([(s, n)])
                except Exception as e1:
                    self._fail([s], e1)
        if previous is not None:  # the device runs the step just launched meanwhile
            self.counters["overlapped_steps"] += 1
            self._resolve(previous)
        self.steps += 1
        cached, self._cached_since_step = self._cached_since_step, 0
        if self.on_step is not None:
            decode = sum(1 for s, n in batch if _is_decode(s, n))
            self.on_step(StepStats(
                time.perf_counter() - t0, len(batch), len({s.tenant for s, _ in batch}), plan.tokens - decode, decode,
                self.kv.n_blocks - self.kv.num_free, self.kv.num_free, self.kv.num_cached, cached,
            ))
        self._take_all(tokens)

    def _take_all(self, tokens: list[tuple[Sequence, int]]) -> None:
        taken = [(s, self._take(s, tok)) for s, tok in tokens]
        self.output.put([item for _, item in taken])
        self._drop([s for s, item in taken if isinstance(item, End) or item.finish])

    def _may_overlap(self) -> bool:
        """The in-flight step's rows are exactly the running ones, and each goes on after its pending token."""
        inflight = {id(s) for s in self._inflight.seqs}
        return len(self.running) == len(inflight) and all(
            id(s) in inflight and not s.stream.cancelled and not s.out.stopped
            and len(s.out_ids) + s.pending < s.params.max_tokens for s in self.running)

    def _resolve(self, inflight: InFlight | None = None) -> None:
        """Read an in-flight step's tokens back and take them (rows dropped meanwhile are skipped)."""
        inflight = inflight or self._inflight
        if inflight is self._inflight:
            self._inflight = None
        for s in inflight.seqs:
            s.pending -= 1
        try:
            if inflight.ready is not None:
                inflight.ready.synchronize()
            ids = inflight.host.tolist()
        except Exception as e:  # the step itself failed on the device
            log.exception("engine step failed on the device")
            self.counters["failed_steps"] += 1
            if _is_sticky_device_error(e):
                self.device_error = f"{type(e).__name__}: {e}"
            running = {id(s) for s in self.running}
            self._fail([s for s in inflight.seqs if id(s) in running], e)
            return
        running = {id(s) for s in self.running}
        self._take_all([(s, tok) for s, tok in zip(inflight.seqs, ids) if id(s) in running])

    def _fail(self, seqs: list[Sequence], e: Exception) -> None:
        """These rows end with an error event; their blocks and slots are freed."""
        ends = []
        for s in seqs:
            what = "prefill" if s.computed < len(s.prompt_ids) else "generation"
            ends.append(End(s.out, Event("", [], error=EngineError(f"{what} failed: {type(e).__name__}: {e}"))))
        self.output.put(ends)
        self._drop(seqs)

    def _fixed_shape(self, batch: list[tuple[Sequence, int]]) -> bool:
        """Every row decodes one token and samples without penalties: the bucketed step can run it."""
        return self.decoder is not None and all(
            n == 1 and s.computed + 1 == s.n_tokens and not s.params.penalized for s, n in batch)

    def _launch(self, batch: list[tuple[Sequence, int]], previous: InFlight | None) -> InFlight:
        """A decode-only step at a bucket's fixed shape (a graph replay on CUDA), not waited for.
        A row whose input token is still on the device reads it from `previous`'s output."""
        for s, _ in batch:
            s.blocks += self.kv.allocate(self.kv.blocks_for(s.computed + 1) - len(s.blocks))
        row_of = {id(s): i for i, s in enumerate(previous.seqs)} if previous is not None else {}
        rows = [DecodeRow(s.blocks, s.computed, 0 if s.pending else s.token(s.computed), s.slot, s.params, s.seed,
                          row_of[id(s)] if s.pending else -1) for s, _ in batch]
        ids = self.decoder.run(rows, previous.ids if previous is not None else None)  # [n] on the device
        cuda = ids.is_cuda
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=cuda)
        host.copy_(ids, non_blocking=cuda)
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        self.counters["fixed_shape_steps"] += 1
        for s, _ in batch:
            s.computed += 1
            s.pending += 1
            self.counters["decode_tokens" if _is_decode(s, 1) else "prefill_tokens"] += 1
        self._remember(batch)
        return InFlight([s for s, _ in batch], ids, host, ready)

    def _forward(self, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """One forward pass over the batch's chunks, packed into one row; the sampled tokens."""
        for s, n in batch:
            s.blocks += self.kv.allocate(self.kv.blocks_for(s.computed + n) - len(s.blocks))
        ids, slot_of_row, kept, sampled = [], [], [], []
        for s, n in batch:
            ids += [s.token(i) for i in range(s.computed, s.computed + n)]
            slot_of_row += [s.slot] * n
            if s.computed + n == s.n_tokens:  # its last token is in this chunk: sample the next one
                kept.append(len(ids) - 1)
                sampled.append(s)
        keep = kept or [len(ids) - 1]  # every chunk mid-prompt: one position's logits, unused
        input_ids, keep_index, sampling = self._stage(batch, ids, slot_of_row, keep, sampled)
        try:
            out = self.model(input_ids=input_ids, position_ids=self.paged.layout.positions,  # [1, T], [1, T]
                             logits_to_keep=keep_index, use_cache=False)
        finally:
            self.paged.layout = None
        for s, n in batch:
            s.computed += n
            self.counters["decode_tokens" if _is_decode(s, n) else "prefill_tokens"] += n
        self._remember(batch)
        if not sampled:
            return []
        logits = out.logits[0, : len(sampled)]  # [K, V]
        chosen = next_tokens(logits, [s.params for s in sampled], [s.seed for s in sampled],
                             [s.n_tokens for s in sampled], [s.out_ids for s in sampled], sampling)
        return list(zip(sampled, chosen))

    def _stage(self, batch: list[tuple[Sequence, int]], ids: list[int], slot_of_row: list[int], keep: list[int],
               sampled: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """Set the packed step's layout and `slot_of_row`; its input ids [1, T], kept positions [K] and
        (if some row samples) `sample`'s tensors: every one written on the host and sent in ONE
        asynchronous copy (pinned on CUDA), so preparing the step never waits for the device."""
        pack = Pack()
        make_layout = StepLayout.stage([(s.blocks, s.computed, n) for s, n in batch], self.kv.block_size, pack)
        k_ids, k_keep = pack.add([ids], torch.int64), pack.add(keep, torch.int64)
        k_slot_of_row = pack.add(slot_of_row, torch.int64), pack.add([slot_of_row[i] for i in keep], torch.int64)
        k_sampling = None
        if any(s.params.temperature != 0 for s in sampled):
            k_sampling = stage_sampling(pack, [s.params for s in sampled], [s.seed for s in sampled],
                                        [s.n_tokens for s in sampled])
        _, views = pack.send(self.staging, self.device)  # the step's one host -> device copy
        self.paged.layout = make_layout(views)
        self.ctx.set_packed(slot_of_row, keep, self.device, staged=tuple(views[k] for k in k_slot_of_row))
        return views[k_ids], views[k_keep], k_sampling and tuple(views[k] for k in k_sampling)

    def _take(self, seq: Sequence, token: int) -> Token | End:
        """Record a new token; what the output thread streams for it. A token that ends the
        sequence (end of sequence, max_tokens) or a client that left finishes it here."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if seq.stream.cancelled:
            return End(seq.out, self._final(seq, "cancelled"))
        if token in self.eos_ids:
            return Token(seq.out, token, len(seq.out_ids), "stop")
        seq.out_ids.append(token)
        return Token(seq.out, token, len(seq.out_ids), "length" if len(seq.out_ids) >= seq.params.max_tokens else None)

    def _final(self, seq: Sequence, reason: str) -> Event:
        return Event("", [], reason, None, len(seq.prompt_ids), len(seq.out_ids))

    def _drop(self, seqs: list[Sequence]) -> None:
        """Finished, failed or cancelled sequences leave: their KV blocks and slot are freed."""
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        for s in seqs:
            self.kv.release(s.blocks)
            if s.slot != BASE_SLOT:
                self.bank.release(s.slot)
                s.slot = BASE_SLOT
        self.running = [s for s in self.running if id(s) not in gone]

    def _fail_all(self, error: EngineError) -> None:
        """Every open request ends with the error: queued ones here, running ones through the
        output thread (after the tokens it holds for them). If that thread is dead, every
        stream not yet ended — a finished row whose last token it held included — ends here."""
        self._inflight = None
        if self.output.failure is None:
            self.output.put([End(seq.out, Event("", [], error=error)) for seq in self.running])
        self._drop(list(self.running))
        with self._cv:
            waiting, self.pending = list(self.pending), deque()
            left, self._open = list(self._open.values()), {}
        dead = self.output.failure is not None  # looked at after the put: it may have died with those endings queued
        for seq in left if dead else waiting:
            if not seq.out.ended:
                _end_here(seq, Event("", [], error=error))


KV_SHARE = 0.8  # of what is free once the base and the bank's whole budget are counted; the rest: activations


def kv_budget(free_bytes: int, bank_unallocated_bytes: int) -> int:
    """KV cache bytes on a GPU: a share of the memory left after the bank's declared budget,
    including the slot stacks' tables not allocated yet (they take it later, in one piece)."""
    return max(0, int((free_bytes - bank_unallocated_bytes) * KV_SHARE))


def _end_here(seq: Sequence, event: Event) -> None:
    """The request's last Event, put by the decode thread itself (the output thread never saw it, or is dead)."""
    seq.out.ended = True
    seq.stream.put(event)


def _is_decode(seq: Sequence, n: int) -> bool:
    """After a step: its chunk was one token past the prompt (a decode row, not a prefill)."""
    return n == 1 and seq.computed > len(seq.prompt_ids)


def _is_sticky_device_error(e: Exception) -> bool:
    """CUDA errors such as an illegal address poison the context: every later call fails too."""
    return isinstance(e, torch.AcceleratorError) or "CUDA error" in str(e)
