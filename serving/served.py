"""The served model of a replica: the base with delta-aware layers, and its DeltaBank.

The engine decodes with it; `TenantScorer` runs it teacher-forced for one tenant, so the
fidelity figures that bench/fidelity.py and the served = merged tests report are computed by
exactly the layers, bank and kernels that answer requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from deltafleet.compress.fingerprint import fingerprint_model
from deltafleet.kernels import SignCache

from .bank import FAILED, LOADING, DeltaBank
from .layers import CPU_SIGN_CACHE_BYTES, BatchContext, patch_model, small_param_modules
from .model import load_base, pick_device, pick_dtype


@dataclass
class ServedModel:
    model: nn.Module
    tokenizer: object
    ctx: BatchContext
    bank: DeltaBank
    device: torch.device
    dtype: torch.dtype
    fingerprint: str


def build_served_model(
    base_model: str, device: str = "auto", dtype: str = "auto", gpu_bank_bytes: int = 4 << 30,
    cpu_bank_bytes: int = 16 << 30, on_change: Callable[[], None] = lambda: None,
) -> ServedModel:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    model, tokenizer = load_base(base_model, dev, dt)
    fingerprint = fingerprint_model(model)
    ctx = BatchContext(bank=None, sign_cache=SignCache(CPU_SIGN_CACHE_BYTES) if dev.type == "cpu" else None)
    linears = patch_model(model, ctx, set(small_param_modules(model)))
    ctx.bank = DeltaBank(model, linears, fingerprint, dev, dt, gpu_bank_bytes, cpu_bank_bytes, on_change=on_change)
    return ServedModel(model, tokenizer, ctx, ctx.bank, dev, dt, fingerprint)


class TenantScorer:
    """One tenant of a served model, called like a Hugging Face model: `scorer(input_ids=ids).logits`.

    Teacher-forced forward passes for evaluation (no decode loop, no KV cache)."""

    def __init__(self, served: ServedModel, name: str, path: Path, timeout_s: float = 120.0) -> None:
        self.served = served
        served.bank.register(name, Path(path))
        deadline = time.monotonic() + timeout_s
        self.slot = None
        while self.slot is None:
            status = served.bank.status(name)
            if status.status == FAILED:
                raise ValueError(f"tenant {name!r}: {status.error}")
            if status.status != LOADING:
                self.slot = served.bank.acquire(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"tenant {name!r} not on the device after {timeout_s:.0f}s")
            if self.slot is None:
                time.sleep(0.01)

    def parameters(self):  # compress.fidelity.evaluate reads the device from here
        return self.served.model.parameters()

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        ids = input_ids.to(self.served.device)  # [B, L]
        self.served.ctx.set([self.slot] * ids.shape[0], self.served.device)
        logits = self.served.model(input_ids=ids, use_cache=False).logits  # [B, L, V]
        return SimpleNamespace(logits=logits)
