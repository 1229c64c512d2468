"""DeltaBank: which tenants' deltas live where — device slots (hot), CPU memory (warm), disk.

The device tier is a fixed stack of `n_slots` slots per delta-aware linear:
signs [n_slots, N, K // 32] int32 and scales [n_slots, N] float32, so a batch passes the
stack to the kernel as is and each row names its slot (no per-step gathering). A slot's
scales are zero for modules its delta does not compress (zero contribution). Linear biases
are a stack too, [n_slots + 1, N] with row 0 the base's and row s + 1 slot s's (the
fine-tune's bias where the delta stores it, else the base's), gathered per row. Norm
weights are stacks the same way. Embedding tables, output heads and 1-bit embeddings live in
`SlotStack`s that grow with the slots using them (serving/slot_stack.py), gathered per row or
applied in one grouped GEMM. A delta storing whole parameters of any other kind of module
is refused when read (there is no per-token path for it).
n_slots = gpu_bank_bytes // (bytes of one slot's signs and scales), at least one, at most MAX_SLOTS.

A slot holding a tenant with running sequences is pinned (refcount); others are evicted
least-recently-used. Warm deltas stay in CPU memory (pinned on CUDA) within cpu_bank_bytes,
LRU; the rest are re-read from disk (and re-verified) when needed. Every read from disk is
verified: content hash, base fingerprint, shapes against the model. All loading and copying
runs on one background thread, so decoding of other tenants never waits for it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deltafleet.compress.format import Delta, DeltaError, DeltaMissing, ModelShapes, check_against_model, load_delta
from deltafleet.compress.linears import block_lists

from .layers import BatchedDeltaLinear, embedding_supports_1bit, small_param_modules
from .slot_stack import SlotStack

LOADING, READY, FAILED = "loading", "ready", "failed"
MAX_SLOTS = 256
MAX_HELD = 4096  # tenants a replica holds at most by default (placement: routed)
log = logging.getLogger("deltafleet.serving")


@dataclass
class BankEntry:
    """One registered tenant's delta in the bank: its file, load state and device slot (if any)."""

    name: str
    path: Path
    status: str = LOADING
    error: str | None = None
    slot: int | None = None
    registered_at: float = field(default_factory=time.monotonic)
    # Unique per registration in this process: a tenant re-registered under its name (a new
    # delta) gets a new one, so K/V computed with the old delta is never reused for the new.
    registration: int = field(default_factory=itertools.count(1).__next__)
    attempts: int = 0  # failed reads or device copies in a row (transient: retried with backoff)
    retry_at: float = 0.0  # no device copy before this time (after a failed one)


# A read or device copy that fails for a reason that may pass (a file briefly missing on a
# network volume, an I/O error, CUDA out of memory while tables grow) is retried with backoff,
# for as long as the tenant is registered; the tenant stays LOADING, with the reason, for the
# first READ_FAILS_BEFORE_FAILED failed reads (~15 s), then is reported FAILED — with the reason
# — while the retries go on, and turns READY if a retry succeeds. A delta that fails
# verification (format, hash, base fingerprint, shapes) is FAILED at once: retrying cannot help.
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 30.0
READ_FAILS_BEFORE_FAILED = 6


def retry_delay(attempts: int) -> float:
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (attempts - 1))


class DeltaBank:
    def __init__(
        self,
        model: nn.Module,
        linears: dict[str, tuple[int, int]],
        fingerprint: str,
        device: torch.device,
        dtype: torch.dtype,
        gpu_bank_bytes: int,
        cpu_bank_bytes: int,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.model, self.fingerprint, self.device, self.dtype = model, fingerprint, device, dtype
        self.shapes = ModelShapes.of(model)  # now, before any step swaps a parameter for a per-token stack
        self.cpu_bank_bytes = cpu_bank_bytes
        self.on_change = on_change
        self.slot_bytes = sum(n * (k // 32) * 4 + n * 4 for n, k in linears.values())
        # Whole tensors count in the budget: each slot reserves room for the largest whole
        # tensors a delta may carry (its embedding table, head and 1-bit embeddings, in the
        # slot stacks, which grow only as tenants use them) and for its norm and bias rows.
        self.slot_whole_bytes = _whole_bytes_per_slot(model, linears, dtype)
        # The stack is allocated up front, so the budget is reserved; MAX_SLOTS keeps a large
        # budget over a tiny model from allocating thousands of slots nobody will fill.
        self.n_slots = min(MAX_SLOTS, max(1, gpu_bank_bytes // max(1, self.slot_bytes + self.slot_whole_bytes)))
        self.stacks = _sign_stacks(linears, self.n_slots, device)  # {linear: (signs, scales)}
        self.base_biases = {name: model.get_submodule(name).bias for name in linears if model.get_submodule(name).bias is not None}
        self.bias_stacks = {  # [n_slots + 1, N]: row 0 the base's bias, row s + 1 slot s's
            name: b.detach().to(device, dtype).expand(self.n_slots + 1, -1).clone() for name, b in self.base_biases.items()
        }
        # Embeddings a delta may carry as 1-bit signs (the compress_embeddings option).
        self.embeddings = {name for name, m in model.named_modules() if embedding_supports_1bit(m) and m.embedding_dim % 32 == 0}
        self.embed_stacks = _embed_stacks(model, self.embeddings, self.n_slots, device)
        # Embedding tables and linears' weights a delta stores whole (output heads): one stack per
        # tensor of the model, so tied modules share theirs.
        self.whole_stacks = _whole_stacks(model, linears, self.n_slots, device, dtype)
        # Small modules' parameters (norms): stacks [n_slots + 1, *shape], row 0 the base's, row
        # s + 1 slot s's, gathered per row in one vectorized call (layers.add_whole_hook).
        self.param_stacks: dict[str, dict[str, torch.Tensor]] = {
            name: {p: t.detach().to(device, dtype).unsqueeze(0).repeat(self.n_slots + 1, *([1] * t.dim())) for p, t in params.items()}
            for name, params in small_param_modules(model, set(linears)).items()
        }
        self.slot_overrides: list[set[str]] = [set() for _ in range(self.n_slots)]  # stacked modules a slot changes
        self.slot_tenant: list[str | None] = [None] * self.n_slots
        # The registration a slot was filled for: a tenant re-registered under the same name
        # while its old slot is pinned is another object, so the old slot is freed on release.
        self.slot_owner: list[BankEntry | None] = [None] * self.n_slots
        self.slot_ready = [False] * self.n_slots
        self.slot_refs = [0] * self.n_slots
        self.entries: dict[str, BankEntry] = {}  # tenant name -> its entry
        self.warm: OrderedDict[str, Delta] = OrderedDict()  # CPU tier, LRU order
        self.device_lru: OrderedDict[str, int] = OrderedDict()
        self.counters = {"device_hits": 0, "device_misses": 0, "cpu_hits": 0, "disk_loads": 0, "evictions": 0}
        self._tied = _tied_groups(model)
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="deltabank-loader")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # ---- tenant set -------------------------------------------------------------------
    def register(self, name: str, path: Path) -> None:
        """Start loading (and verifying) a tenant in the background; a no-op if unchanged."""
        with self._lock:
            old = self.entries.get(name)
            if old is not None and old.path == Path(path) and old.status != FAILED:
                return
            if old is not None:
                self.unregister(name)
            self.entries[name] = BankEntry(name, Path(path))
        self._loader.submit(self._verify_into_cpu, name)

    def unregister(self, name: str) -> None:
        with self._lock:
            entry = self.entries.pop(name, None)
            self.warm.pop(name, None)
            self.device_lru.pop(name, None)
            if entry is not None and entry.slot is not None and self.slot_refs[entry.slot] == 0:
                self._free_slot(entry.slot)
        self.on_change()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.entries)

    def status(self, name: str) -> BankEntry | None:
        with self._lock:
            return self.entries.get(name)

    # ---- device slots (called by the decode loop) --------------------------------------
    def acquire(self, name: str) -> int | None:
        """The tenant's ready slot (pinned until `release`), or None while it is being brought in."""
        with self._lock:
            entry = self.entries.get(name)
            if entry is None or entry.status != READY:
                return None
            if entry.slot is not None:
                if not self.slot_ready[entry.slot]:
                    return None
                self.slot_refs[entry.slot] += 1
                self.device_lru.move_to_end(name)
                self.counters["device_hits"] += 1
                return entry.slot
            if time.monotonic() < entry.retry_at:  # its last device copy failed: not yet
                return None
            slot = self._free_or_evictable_slot()
            if slot is None:
                return None  # every slot is pinned by running sequences: wait for one to finish
            self.counters["device_misses"] += 1
            self.slot_tenant[slot], self.slot_ready[slot], entry.slot = name, False, slot
            self.slot_owner[slot] = entry
            self._loader.submit(self._copy_to_slot, name, slot)
            return None

    def registration(self, slot: int) -> int:
        """Which registration's delta fills this acquired slot (BankEntry.registration)."""
        with self._lock:
            return self.slot_owner[slot].registration

    def release(self, slot: int) -> None:
        with self._lock:
            self.slot_refs[slot] -= 1
            owner = self.slot_owner[slot]
            if self.slot_refs[slot] == 0 and (owner is None or self.entries.get(owner.name) is not owner):
                self._free_slot(slot)  # removed or re-registered while its sequences ran

    # ---- figures ------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            on_device = sum(1 for s in range(self.n_slots) if self.slot_ready[s] and self.slot_tenant[s])
            return {
                **self.counters,
                "n_slots": self.n_slots,
                "device_tenants": on_device,
                "device_bytes": on_device * self.slot_bytes + self._stack_bytes(),
                "device_capacity_bytes": self.n_slots * (self.slot_bytes + self.slot_whole_bytes),
                "cpu_tenants": len(self.warm),
                "cpu_bytes": sum(d.nbytes() for d in self.warm.values()),
                "tenants": {n: e.status for n, e in self.entries.items()},
            }

    def capacity(self) -> int:
        """Tenants this bank holds without re-reading one from disk: its device slots, or as many
        deltas of signs and scales as the host tier fits if that is more (MAX_HELD at most)."""
        return min(MAX_HELD, max(self.n_slots, self.cpu_bank_bytes // max(1, self.slot_bytes)))

    def unallocated_bytes(self) -> int:
        """Device bytes of the bank's declared budget not allocated yet (slot stacks fill lazily):
        what the engine keeps free when it sizes its KV cache."""
        return sum(st.unallocated_bytes() for st in self.slot_stacks())

    def slot_stacks(self) -> list[SlotStack]:
        """Every SlotStack once (tied modules share theirs)."""
        return list({id(st): st for st in [*self.whole_stacks.values(), *self.embed_stacks.values()]}.values())

    def _stack_bytes(self) -> int:
        return sum(st.nbytes() for st in self.slot_stacks())

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---- background work ---------------------------------------------------------------
    def _read(self, path: Path) -> Delta:
        delta = load_delta(path, expected_fingerprint=self.fingerprint)
        check_against_model(delta, self.shapes)
        missing = sorted(set(delta.signs) - set(self.stacks) - self.embeddings)
        if missing:
            raise DeltaError(f"{path}: compressed module {missing[0]!r} is not a linear or embedding this engine applies 1-bit deltas to")
        for pname in delta.whole:
            module, _, short = pname.rpartition(".")
            if not ((module in self.bias_stacks and short == "bias") or module in self.param_stacks
                    or (module in self.whole_stacks and short == "weight")):
                kind = type(self.model.get_submodule(module)).__name__ if module else "model"
                raise DeltaError(f"{path}: stores {pname!r} whole, but this engine cannot apply a whole {kind} "
                                 f"parameter per tenant (supported: linear weights and biases, embeddings, norms)")
        for group in self._tied:  # a tied fine-tune stores the shared tensor once
            have = [n for n in group if n in delta.whole]
            for n in group:
                if have and n not in delta.whole:
                    delta.whole[n] = delta.whole[have[0]]
        self.counters["disk_loads"] += 1
        return delta

    def _verify_into_cpu(self, name: str) -> None:
        with self._lock:
            entry = self.entries.get(name)
        if entry is None:
            return
        try:
            delta = self._read(entry.path)
        except DeltaMissing as e:  # not there (yet): as transient as an I/O error
            self._retry_read(entry, name, e)
            return
        except (DeltaError, ValueError) as e:  # the file is read and wrong: retrying cannot help
            with self._lock:
                if self.entries.get(name) is entry:
                    entry.status, entry.error = FAILED, str(e)
            self.on_change()
            return
        except (OSError, RuntimeError) as e:  # may pass: stay LOADING, say why, try again later
            self._retry_read(entry, name, e)
            return
        with self._lock:
            if self.entries.get(name) is not entry:
                return
            self._put_warm(name, delta)
            entry.status, entry.error, entry.attempts = READY, None, 0
        self.on_change()

    def _retry_read(self, entry: BankEntry, name: str, e: Exception) -> None:
        with self._lock:
            if self.entries.get(name) is not entry:
                return
            entry.attempts += 1
            delay = retry_delay(entry.attempts)
            entry.error = f"{e} (read attempt {entry.attempts}; retrying in {delay:.1f}s)"
            if entry.attempts >= READ_FAILS_BEFORE_FAILED:  # not a blip: say so, and keep trying
                entry.status = FAILED
        log.warning("tenant %s: %s", name, entry.error)
        self._later(delay, self._verify_into_cpu, name)
        self.on_change()

    def _later(self, delay: float, fn, *args) -> None:
        """Run fn on the loader thread after `delay` (nothing once the bank is closed)."""
        def submit():
            with contextlib.suppress(RuntimeError):  # the loader was shut down meanwhile
                self._loader.submit(fn, *args)

        timer = threading.Timer(delay, submit)
        timer.daemon = True
        timer.start()

    def _put_warm(self, name: str, delta: Delta) -> None:
        if self.device.type == "cuda":
            delta = Delta(**{**delta.__dict__, **{k: {n: v.pin_memory() for n, v in getattr(delta, k).items()} for k in ("signs", "scales", "whole")}})
        self.warm[name] = delta
        self.warm.move_to_end(name)
        while len(self.warm) > 1 and sum(d.nbytes() for d in self.warm.values()) > self.cpu_bank_bytes:
            self.warm.popitem(last=False)  # stays registered: re-read from disk when needed
        if sum(d.nbytes() for d in self.warm.values()) > self.cpu_bank_bytes:
            self.warm.pop(name)

    def _copy_to_slot(self, name: str, slot: int) -> None:
        with self._lock:
            entry = self.entries.get(name)
            delta = self.warm.get(name)
            if delta is not None:
                self.warm.move_to_end(name)
                self.counters["cpu_hits"] += 1
        try:
            if entry is None:
                raise DeltaError(f"tenant {name!r} was removed")
            if delta is None:
                delta = self._read(entry.path)
                with self._lock:
                    self._put_warm(name, delta)
            self._fill_slot(slot, delta)
        except (DeltaError, ValueError) as e:
            with self._lock:
                if entry is not None and self.entries.get(name) is entry:
                    entry.status, entry.error = FAILED, str(e)
                if self.slot_owner[slot] is entry:
                    self._free_slot(slot)
            self.on_change()
            return
        except (OSError, RuntimeError) as e:  # e.g. CUDA OOM, a re-read failing: copied again later
            with self._lock:
                if self.slot_owner[slot] is entry:
                    self._free_slot(slot)
                if entry is not None and self.entries.get(name) is entry:
                    entry.attempts += 1
                    delay = retry_delay(entry.attempts)
                    entry.retry_at = time.monotonic() + delay
                    entry.error = f"device copy failed (attempt {entry.attempts}), retrying in {delay:.1f}s: {e}"
                    log.warning("tenant %s: %s", name, entry.error)
            self.on_change()
            return
        with self._lock:
            if self.slot_owner[slot] is not entry:
                return  # the slot was taken back (tenant removed or re-registered) while we copied
            if self.entries.get(name) is not entry:
                self._free_slot(slot)
                return
            self.slot_overrides[slot] = {n.rpartition(".")[0] for n in delta.whole} & set(self.param_stacks)
            self.slot_ready[slot] = True
            self.device_lru[name] = slot
            entry.attempts, entry.error = 0, None
        self.on_change()

    @torch.inference_mode()
    def _fill_slot(self, slot: int, delta: Delta) -> None:
        """Copy a delta into a slot's stacks and slot stacks (`_read` checked every tensor has one)."""
        stream = torch.cuda.stream(self._copy_stream) if self._copy_stream is not None else contextlib.nullcontext()
        with stream:
            for name, (signs, scales) in self.stacks.items():
                if name in delta.signs:
                    signs[slot].copy_(delta.signs[name], non_blocking=True)
                    scales[slot].copy_(delta.scales[name].expand(scales.shape[1]), non_blocking=True)
                else:
                    scales[slot].zero_()
            for name, stack in self.bias_stacks.items():  # the fine-tune's bias, or the base's
                stack[slot + 1].copy_(delta.whole.get(name + ".bias", self.base_biases[name]), non_blocking=True)
            for name, stacks in self.param_stacks.items():  # the fine-tune's norm weights, or the base's
                for pname, stack in stacks.items():
                    stack[slot + 1].copy_(delta.whole.get(f"{name}.{pname}", stack[0]), non_blocking=True)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # the slot is used only once its bytes have landed
        # Slot stacks: the delta's tensor, or none (the base's). Tied modules share one: filled once.
        for stack, tensor in {id(st): (st, delta.whole.get(f"{m}.weight")) for m, st in self.whole_stacks.items()}.values():
            if tensor is not None:
                stack.put(slot, {"weight": tensor}, self._copy_stream)
            else:
                stack.drop(slot)
        for name, stack in self.embed_stacks.items():
            if name in delta.signs:
                stack.put(slot, {"signs": delta.signs[name], "scales": delta.scales[name].float()}, self._copy_stream)
            else:
                stack.drop(slot)

    def _free_or_evictable_slot(self) -> int | None:
        for s in range(self.n_slots):
            if self.slot_tenant[s] is None:
                return s
        for name, s in self.device_lru.items():  # least recently used first
            if self.slot_refs[s] == 0 and self.slot_ready[s]:
                self.counters["evictions"] += 1
                self._free_slot(s)
                return s
        return None

    def _free_slot(self, slot: int) -> None:
        name = self.slot_tenant[slot]
        if name is not None:
            if self.device_lru.get(name) == slot:  # a re-registered tenant may hold another slot
                self.device_lru.pop(name)
            entry = self.entries.get(name)
            if entry is not None and entry.slot == slot:
                entry.slot = None
        self.slot_tenant[slot], self.slot_ready[slot], self.slot_owner[slot] = None, False, None
        self.slot_overrides[slot] = set()
        for stack in self.slot_stacks():
            stack.drop(slot)


def _whole_linears(model: nn.Module, linears: dict[str, tuple[int, int]]) -> set[str]:
    """Delta-aware linears a delta may store whole: those outside the transformer blocks (the
    output head; BERT-style heads' transforms) — compress gives every linear inside the blocks
    a 1-bit delta. A model whose blocks cannot be found serves its output head only."""
    try:
        prefixes = tuple(f"{name}." for name in block_lists(model, (nn.Linear, BatchedDeltaLinear)))
    except ValueError:
        head = model.get_output_embeddings()
        return {name for name, m in model.named_modules() if m is head and name in linears}
    return {name for name in linears if not name.startswith(prefixes)}


def _whole_bytes_per_slot(model: nn.Module, linears: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    """Device bytes one slot may need beyond its 1-bit stacks: a whole copy of each large
    weight (one per tied group), 1-bit embedding signs and scales, norm and bias rows."""
    size = torch.tensor([], dtype=dtype).element_size()
    total, seen = 0, set()
    heads = _whole_linears(model, linears)
    for name, m in model.named_modules():
        if name in linears and m.bias is not None:
            total += m.bias.numel() * size
        if name in heads or isinstance(m, nn.Embedding):
            if id(m.weight) not in seen:
                seen.add(id(m.weight))
                total += m.weight.numel() * size
            if embedding_supports_1bit(m) and m.embedding_dim % 32 == 0:
                total += m.num_embeddings * (m.embedding_dim // 32 * 4 + 4)
    for params in small_param_modules(model, set(linears)).values():
        total += sum(p.numel() for p in params.values()) * size
    return total


def _sign_stacks(linears: dict[str, tuple[int, int]], n_slots: int,
                 device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per delta-aware linear [N, K]: signs [n_slots, N, K // 32] int32 and scales [n_slots, N] float32."""
    return {
        name: (torch.zeros(n_slots, n, k // 32, dtype=torch.int32, device=device),
               torch.zeros(n_slots, n, dtype=torch.float32, device=device))
        for name, (n, k) in linears.items()
    }


def _embed_stacks(model: nn.Module, embeddings: set[str], n_slots: int, device: torch.device) -> dict[str, SlotStack]:
    """A slot stack per embedding a delta may carry at 1 bit: signs [V, H // 32], per-row scales [V]."""
    return {
        name: SlotStack({"signs": ((m.num_embeddings, m.embedding_dim // 32), torch.int32),
                         "scales": ((m.num_embeddings,), torch.float32)}, n_slots, device, _grow_mode(device))
        for name, m in model.named_modules() if name in embeddings
    }


def _whole_stacks(model: nn.Module, linears: dict[str, tuple[int, int]], n_slots: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, SlotStack]:
    """A slot stack per weight of the linears outside the blocks (output heads) and of servable
    embeddings, shared by tied modules."""
    by_tensor: dict[int, SlotStack] = {}
    stacks = {}
    heads = _whole_linears(model, linears)
    for name, m in model.named_modules():
        if name in heads or isinstance(m, nn.Embedding):  # any table: ids (embeddings) or positions
            w = m.weight
            if id(w) not in by_tensor:
                by_tensor[id(w)] = SlotStack({"weight": (tuple(w.shape), dtype)}, n_slots, device, _grow_mode(device))
            stacks[name] = by_tensor[id(w)]
    return stacks


def _grow_mode(device: torch.device) -> str:
    return "full" if device.type == "cuda" else "double"


def _tied_groups(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
