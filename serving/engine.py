"""The engine: one base model, a DeltaBank of tenants, and continuous batching across tenants.

A background thread runs the loop: admit waiting requests whose tenant is on the device
(each is prefilled alone, then joins the running batch), run one decode step for the whole
batch (rows of different tenants, one kernel launch per layer), stream each row's new text,
drop rows that finished or were cancelled. Requests wait in a bounded queue; a request whose
tenant is still loading waits up to `load_timeout_s`. Framework-free: Ray is not needed.

Left for later (correct but simple): prefill runs one request at a time (no chunked or
batched prefill); the KV cache is a padded DynamicCache (no paging); stop strings decode
the whole completion each step.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from .bank import FAILED, READY
from .batch_cache import BatchCache
from .served import build_served_model
from .sampling import SamplingParams, next_tokens

log = logging.getLogger("deltafleet.serving")
BASE_TENANT = None  # the tenant value meaning "the base model itself"


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


@dataclass
class Event:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None while running
    error: EngineError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
class Sequence:
    id: int
    tenant: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    created: float = field(default_factory=time.monotonic)
    slot: int = -1
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the completion text already streamed
    first_token_at: float | None = None


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
    ) -> None:
        served = build_served_model(base_model, device, dtype, gpu_bank_bytes, cpu_bank_bytes, on_change=self._wake)
        self.device, self.dtype = served.device, served.dtype
        self.model, self.tokenizer, self.ctx, self.bank = served.model, served.tokenizer, served.ctx, served.bank
        self.fingerprint = served.fingerprint
        self.max_batch_size, self.max_queue, self.load_timeout_s = max_batch_size, max_queue, load_timeout_s
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.max_len = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pending: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache = BatchCache()
        self.steps = 0
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deltafleet-decode", daemon=True)
        self._thread.start()

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
    ) -> RequestStream:
        params = params or SamplingParams()
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
        if params.max_tokens is None:  # chat's default: whatever context the prompt leaves
            params = params.model_copy(update={"max_tokens": max(1, self.max_len - len(ids))})
        if len(ids) + params.max_tokens > self.max_len:
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of {self.max_len}")
        stream = RequestStream(loop)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        seq = Sequence(next(self._ids), tenant, ids, params, stream, generator=gen)
        with self._cv:
            if len(self.pending) >= self.max_queue:
                raise Overloaded(f"queue is full ({self.max_queue} waiting requests); retry later")
            self.pending.append(seq)
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
            return {"running": len(self.running), "waiting": len(self.pending), "steps": self.steps, "bank": self.bank.stats()}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)
        self.bank.close()

    # ---- the loop ---------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    break
                if not self.running:
                    self._cv.wait(timeout=0.05 if self.pending else 0.5)
                waiting = list(self.pending)
            try:
                with torch.inference_mode():
                    self._admit(waiting)
                    if self.running:
                        self._step()
            except Exception as e:  # never let one bad batch kill the replica's loop
                log.exception("decode step failed")
                self._fail_all(EngineError(f"generation failed: {type(e).__name__}: {e}"), pending=False)
        self._fail_all(TenantUnavailable("engine is shutting down"))

    def _admit(self, waiting: list[Sequence]) -> None:
        now = time.monotonic()
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
                elif now - seq.created > self.load_timeout_s:
                    error = TenantUnavailable(f"model {seq.tenant!r} did not become ready within {self.load_timeout_s:.0f}s")
            if error is not None:
                self._dequeue(seq)
                seq.stream.put(Event("", [], "cancelled") if error == "cancelled" else Event("", [], error=error))
                continue
            if len(self.running) >= self.max_batch_size:
                continue
            if seq.tenant is not BASE_TENANT:
                if t.status != READY:  # t from the lookup above: the tenant may be gone by now
                    continue
                slot = self.bank.acquire(seq.tenant)
                if slot is None:
                    continue  # being copied to the device (or all slots pinned): others go ahead
                seq.slot = slot
            self._dequeue(seq)
            self._prefill(seq)

    def _dequeue(self, seq: Sequence) -> None:
        with self._cv:
            self.pending.remove(seq)

    def _prefill(self, seq: Sequence) -> None:
        n = len(seq.prompt_ids)
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        cache = DynamicCache()
        self.ctx.set([seq.slot], self.device)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(n, device=self.device)[None],
                cache=cache,
                use_cache=True,
            )
            token = next_tokens(out.logits[:, -1], [seq.params], [seq.generator])[0]
        except Exception as e:  # e.g. out of memory: this request fails alone, its slot unpinned, the batch goes on
            log.exception("prefill failed")
            if seq.slot >= 0:
                self.bank.release(seq.slot)
            seq.stream.put(Event("", [], error=EngineError(f"prefill failed: {type(e).__name__}: {e}")))
            return
        self.cache.add(out.cache, n)
        self.running.append(seq)
        if not self._take(seq, token):
            self._drop([len(self.running) - 1])

    def _step(self) -> None:
        batch = self.running
        ids = torch.tensor([[s.out_ids[-1]] for s in batch], device=self.device)
        mask = torch.cat([self.cache.mask, self.cache.mask.new_ones(len(batch), 1)], dim=1)
        self.ctx.set([s.slot for s in batch], self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.tensor([[p] for p in self.cache.positions], device=self.device),
            cache=self.cache.as_dynamic(),
            use_cache=True,
        )
        self.cache.update_from(out.cache)
        tokens = next_tokens(out.logits[:, -1], [s.params for s in batch], [s.generator for s in batch])
        self.steps += 1
        done = [i for i, (s, tok) in enumerate(zip(batch, tokens)) if not self._take(s, tok)]
        self._drop(done)

    def _take(self, seq: Sequence, token: int) -> bool:
        """Record a new token, stream new text; False when the sequence is finished."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if seq.stream.cancelled:
            seq.stream.put(self._final(seq, "", [], "cancelled"))
            return False
        if token in self.eos_ids:
            return self._finish(seq, "stop")
        seq.out_ids.append(token)
        text = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)
        stops = seq.params.stop
        for stop in stops:
            at = text.find(stop, max(0, seq.emitted - len(stop)))
            if at >= 0:
                return self._finish(seq, "stop", text[:at])
        if len(seq.out_ids) >= seq.params.max_tokens:
            return self._finish(seq, "length", text)
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        end = len(text) - hold
        while end > seq.emitted and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
            end -= 1
        if end > seq.emitted:
            seq.stream.put(Event(text[seq.emitted:end], [token], None))
            seq.emitted = end
        else:
            seq.stream.put(Event("", [token], None))
        return True

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> bool:
        if text is None:
            text = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)
        last = [seq.out_ids[-1]] if reason == "length" else []
        seq.stream.put(self._final(seq, text[seq.emitted:], last, reason))
        return False

    def _final(self, seq: Sequence, text: str, ids: list[int], reason: str) -> Event:
        return Event(text, ids, reason, None, len(seq.prompt_ids), len(seq.out_ids))

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        for i in rows:
            if self.running[i].slot >= 0:
                self.bank.release(self.running[i].slot)
        keep = [i for i in range(len(self.running)) if i not in set(rows)]
        self.running = [self.running[i] for i in keep]
        self.cache.keep(keep)

    def _fail_all(self, error: EngineError, pending: bool = True) -> None:
        for seq in self.running:
            seq.stream.put(Event("", [], error=error))
            if seq.slot >= 0:
                self.bank.release(seq.slot)
        self.running, self.cache = [], BatchCache()
        if not pending:
            return
        with self._cv:
            waiting, self.pending = list(self.pending), deque()
        for seq in waiting:
            seq.stream.put(Event("", [], error=error))
