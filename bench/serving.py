"""Serving benchmark: traffic like real traffic, deltas like real fine-tunes, every baseline in the same run.

Traffic (seeded): requests arrive over time (Poisson, `rate` per second), prompt and output
lengths drawn uniformly from a range, tenants assigned `distinct` (round robin) or `zipf`
(popularity ∝ 1/rank^1.1). Deltas are shaped like compress's output for a full fine-tune: 1-bit
block linears plus whole norms, input embeddings and lm_head.

Methods, same model, same requests, same run:
  - engine:        our engine, rows of different tenants share each step (T tenants)
  - engine-base:   the same engine, every request to the base (its own ceiling)
  - cb-manager:    transformers' continuous batching, persistent manager, base model, streamed;
                   swept over its own settings (rows and tokens per step, page size, scheduler:
                   CB_SWEEP, all kept under "cb_sweep"): its best run, and the run with the
                   engine's settings (rows, tokens per step, KV block size and blocks)
  - generate:      static batches of `batch` requests through `generate`, base model
                   (= a merged model's speed); a batch runs to its longest output
  - naive:         one merged model per tenant, merged into the weights per batch, batches of
                   one tenant's requests through `generate` (the way without deltas); every
                   delta is read from its file before the clock starts (the merges are timed)
Tokens/s counts generated tokens over the wall time from the first arrival to the last token.
TTFT and latency are measured the same way for every method: from a request's arrival to the
time its first / last token reaches the host (engine and cb-manager streams; `generate` through
a streamer timing each step's tokens). A request's tokens run to its first EOS, at most its length.

The table's engine runs have prefix caching off: its traffic is random (no prefix is shared)
and each run repeats the same requests, which a cache would answer from the run before. A
second comparison measures it where it matters: every tenant's requests start with that
tenant's system prompt (`system` tokens), 16 distinct tenants, the engine with prefix caching
on (steady state: one request per tenant first) and off, in the same run.

Also: the bandwidth limit of a decode step — bytes it must read (base weights, the distinct
tenants' deltas and whole tensors, the KV cache) over the measured copy bandwidth — and our
fraction of it; how many 7B-sized tenants fit beside the base with KV for batch 64 × 2k tokens;
the time from adding a tenant to its first token.

    python bench/serving.py                    # cpu-small on CPU (~1.5 min on 2 cores)
    python bench/serving.py --repeat 3         # each method best of 3 (a shared machine: ~10 min)
    python bench/serving.py --preset llama2-7b # on a GPU: Llama-2-7B shapes, random weights
Writes bench/results/serving-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.generation.streamers import BaseStreamer

from deltafleet.compress.fingerprint import fingerprint_model
from deltafleet.compress.format import Delta, load_delta, save_delta
from deltafleet.kernels import cpu_native, dense_delta_weight
from deltafleet.serving.config import DECODE_MODES
from deltafleet.serving.engine import Engine
from deltafleet.serving.sampling import SamplingParams

PRESETS = {
    "cpu-small": dict(hidden=256, layers=4, heads=8, kv=4, inter=704, vocab=2048, dtype="float32",
                      tenants=[1, 4, 16, 64], batches=[16], requests=64, prompt=(8, 128), gen=(8, 64), rate=200.0,
                      system=256),
    # A smoke run (seconds); "fit" as in gpu-fit, so the GPU check's rehearsal runs that arithmetic too.
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=256, dtype="float32",
                 tenants=[1, 16, "fit"], batches=[8], requests=24, prompt=(4, 24), gen=(2, 12), rate=500.0, system=32),
    # What the GPU check runs in its ~2 minutes: Llama-2-7B widths and vocabulary, 8 of its 32 layers
    # (per-step figures scale with depth; the fraction of the bandwidth limit is what to compare),
    # deltas storing norms whole but not embeddings/lm_head (~200 MB of signs per tenant); tenants
    # 1, 16 and as many as fit on the device (tenants_that_fit, capped by FIT_CAP).
    "gpu-fit": dict(hidden=4096, layers=8, heads=32, kv=32, inter=11008, vocab=32000, dtype="float16", whole="norms",
                    tenants=[1, 16, "fit"], batches=[16], requests=64, prompt=(8, 256), gen=(8, 64), rate=100.0,
                    system=256),
    "llama2-7b": dict(hidden=4096, layers=32, heads=32, kv=32, inter=11008, vocab=32000, dtype="float16",
                      tenants=[1, 4, 16, 64], batches=[16, 64], requests=256, prompt=(8, 512), gen=(8, 256), rate=50.0,
                      system=1024),
}
LLAMA2_7B = dict(params=6.74e9, layers=32, hidden=4096, vocab=32000, linear_params=6.48e9)


# ---- the model, the deltas, the traffic ---------------------------------------------------------
# The most tenants a "fit" run builds: each is written to disk and read back by the engine (it
# takes delta files), ~200 MB at gpu-fit's widths, which the check's step limit must cover.
FIT_CAP = {"cuda": 32, "cpu": 20}


def tenants_that_fit(p: dict, device: str, free_bytes: float | None = None) -> dict:
    """How many of this preset's tenants the device's bank holds beside the base and the KV cache.

    Bank arithmetic: a tenant is its block linears' signs (1 bit a weight) plus its whole tensors;
    the base is every parameter; KV holds max batch x the longest request; 10% is left for the
    activations, CUDA graphs and the allocator. Free memory: cudaMemGetInfo now on CUDA, the host's
    available memory on CPU. The count run is capped by FIT_CAP (disk and build time)."""
    size = torch.tensor([], dtype=getattr(torch, p["dtype"])).element_size()
    h, layers, head_dim = p["hidden"], p["layers"], p["hidden"] // p["heads"]
    linears = layers * (2 * h * h + 2 * h * p["kv"] * head_dim + 3 * h * p["inter"])  # q, o; k, v; gate, up, down
    norms = (2 * layers + 1) * h
    tables = 2 * p["vocab"] * h
    whole = norms + (tables if p.get("whole", "all") == "all" else 0)
    tenant = linears // 8 + whole * size
    base = (linears + norms + tables) * size
    kv = 2 * layers * p["kv"] * head_dim * size * max(p["batches"]) * (p["system"] + 32 + p["prompt"][1] + p["gen"][1])
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info()[0] if device == "cuda" else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fit = max(1, int((0.9 * free_bytes - base - kv) // tenant))
    return {"free_bytes": int(free_bytes), "base_bytes": base, "kv_bytes": kv, "tenant_bytes": tenant, "fit": fit,
            "run": min(fit, FIT_CAP[device])}


def resolve_tenants(p: dict, device: str) -> dict:
    """The preset with "fit" in its tenant counts replaced by tenants_that_fit's (recorded in the settings)."""
    if "fit" not in p["tenants"]:
        return p
    fit = tenants_that_fit(p, device)
    return {**p, "tenants": sorted({fit["run"] if t == "fit" else t for t in p["tenants"]}), "tenants_fit": fit}


def build(tmp: Path, p: dict, n_tenants: int, device: str):
    """A random Llama base saved with a word-level tokenizer, and n deltas shaped like real ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(p["vocab"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", unk_token="t0")
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                      max_position_embeddings=4096, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(getattr(torch, p["dtype"])).eval()
    base.save_pretrained(tmp / "base", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "base")
    fp = fingerprint_model(LlamaForCausalLM.from_pretrained(tmp / "base", dtype=getattr(torch, p["dtype"])))
    linears = {n: m.weight.shape for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    tables = ("model.embed_tokens.weight", "lm_head.weight") if p.get("whole", "all") == "all" else ()
    whole = {n: t for n, t in base.state_dict().items() if n.endswith("norm.weight") or n in tables}
    deltas = {}
    for t in range(n_tenants):
        g = torch.Generator().manual_seed(1000 + t)
        # Random words are random signs, drawn where the engine will hold them: 64 tenants' ~200 MB
        # each take seconds on a GPU and minutes with one host thread. (Files still: Engine takes paths.)
        gd = g if device == "cpu" else torch.Generator(device=device).manual_seed(1000 + t)  # CPU: as before
        d = Delta(base_model="bench", base_fingerprint=fp, finetuned_model=f"bench/t{t}")
        for n, (rows, cols) in linears.items():
            d.signs[n] = torch.randint(-(2**31), 2**31 - 1, (rows, cols // 32), generator=gd, dtype=torch.int32,
                                       device=device).cpu()
            d.scales[n] = torch.tensor(2e-3)
        for n, w in whole.items():  # a full fine-tune moves these a little too
            w = w.detach().cpu()
            d.whole[n] = (w.float() + 1e-3 * torch.randn(w.shape, generator=g)).to(w.dtype)
        deltas[f"bench/t{t}"] = save_delta(d, tmp / "deltas" / f"t{t}.safetensors")
    return base, deltas


def make_traffic(p: dict, seed: int = 0) -> list[tuple[float, list[int], int]]:
    """(arrival time s, prompt ids, output tokens) per request, arrival-ordered."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / p["rate"], p["requests"])
    arrivals = np.cumsum(gaps) - gaps[0]
    return [(float(a), rng.integers(3, p["vocab"], int(rng.integers(*p["prompt"], endpoint=True))).tolist(),
             int(rng.integers(*p["gen"], endpoint=True))) for a in arrivals]


def with_system_prompts(traffic, models: list[str], system: int, vocab: int, seed: int = 1):
    """The same arrivals and output lengths; each prompt = its tenant's system prompt (`system`
    tokens, one per tenant) + the first up-to-32 tokens of the original prompt (the user turn)."""
    rng = np.random.default_rng(seed)
    systems = {m: rng.integers(3, vocab, system).tolist() for m in sorted(set(models))}
    return [(a, systems[m] + prompt[:32], gen) for (a, prompt, gen), m in zip(traffic, models)]


def assign(n_req: int, tenants: list[str], mix: str, seed: int = 0) -> list[str]:
    if mix == "distinct":
        return [tenants[i % len(tenants)] for i in range(n_req)]
    w = 1.0 / np.arange(1, len(tenants) + 1) ** 1.1
    return list(np.random.default_rng(seed).choice(tenants, size=n_req, p=w / w.sum()))


# ---- methods --------------------------------------------------------------------------------------
def run_engine(engine: Engine, models: list[str | None], traffic) -> dict:
    """Each request submitted at its arrival time by a client thread; streams read as they come."""
    results: list[tuple[float, float, float, int]] = [None] * len(traffic)  # (arrival, first, last, tokens)
    t0 = time.perf_counter()

    def client(i: int, model, prompt: list[int], gen: int, arrival: float) -> None:
        time.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
        sent = time.perf_counter() - t0
        first, n = None, 0
        for ev in engine.submit(model, prompt, SamplingParams(max_tokens=gen, temperature=0)):
            if ev.error:
                raise ev.error
            first = first or time.perf_counter() - t0
            n += len(ev.token_ids)
        results[i] = (sent, first, time.perf_counter() - t0, n)

    threads = [threading.Thread(target=client, args=(i, m, pr, g, a)) for i, (m, (a, pr, g)) in enumerate(zip(models, traffic))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _figures(results)


def bench_engine(tmp: Path, p: dict, device: str, decode_mode: str, batch: int, **kw) -> Engine:
    """The engine as every run here makes it: every tenant on the device, an unbounded queue."""
    return Engine(str(tmp / "base"), device=device, dtype=p["dtype"], max_batch_size=batch, max_queue=100_000,
                  gpu_bank_bytes=1 << 40, cpu_bank_bytes=1 << 40, decode_mode=decode_mode, **kw)


def run_system_prompts(tmp: Path, p: dict, device: str, decode_mode: str, batch: int, deltas: dict, models: list[str],
                       traffic, caching: bool) -> dict:
    """A fresh engine whose cache holds each tenant's system prompt (one earlier request per
    tenant, with another user turn: a steady state), then the traffic."""
    eng = bench_engine(tmp, p, device, decode_mode, batch, prefix_caching=caching)
    try:
        eng.set_tenants({m: deltas[m] for m in set(models)})
        eng.wait_ready(timeout=600)
        first = {m: i for i, m in reversed(list(enumerate(models)))}
        run_engine(eng, list(first), [(0.0, traffic[i][1][: p["system"]] + [3, 4, 5], 2) for i in first.values()])
        before = eng.stats()["prefix_cached_tokens"]
        fig = run_engine(eng, models, traffic)
        fig["prefix_cached_tokens_per_request"] = (eng.stats()["prefix_cached_tokens"] - before) / len(traffic)
        return fig
    finally:
        eng.close()


# transformers' continuous batching, swept over its own settings (ContinuousBatchingConfig fields): rows per step x
# tokens per step x page size (the engine's KV block size, and transformers' default) x scheduler, each with the
# engine's KV memory (cb_sweep). Its best is the row "cb-manager (best of sweep)"; CB_DEFAULT is ContinuousBatchingConfig()
# as transformers makes it (KV sized from memory).
CB_SWEEP = [dict(max_requests_per_batch=r, max_batch_tokens=t, page_size=ps, scheduler_type=s)
            for r in (16, 32, 64) for t in (512, 2048) for ps in (16, 256) for s in ("fifo", "prefill_first")]
CB_DEFAULT: dict = {}


def cb_sweep(engine: Engine) -> list[tuple[str, dict]]:
    """(label, ContinuousBatchingConfig fields): the engine's own settings first, then transformers' default, then
    the sweep, whose KV cache holds as many tokens as the engine's."""
    kv_tokens = engine.kv.n_blocks * engine.kv.block_size
    return ([("engine's settings", cb_equal_settings(engine)), ("default", CB_DEFAULT)]
            + [("sweep", {**s, "num_blocks": kv_tokens // s["page_size"]}) for s in CB_SWEEP])


def cb_equal_settings(engine: Engine) -> dict:
    """The ContinuousBatchingConfig matching the engine: rows per step, tokens per step, KV block size and blocks."""
    return dict(max_requests_per_batch=engine.max_batch_size, max_batch_tokens=engine.max_step_tokens,
                page_size=engine.kv.block_size, num_blocks=engine.kv.n_blocks, scheduler_type="fifo")


def run_cb_manager(model: LlamaForCausalLM, traffic, settings: dict) -> dict:
    """transformers' continuous batching: a persistent manager with these ContinuousBatchingConfig
    settings, requests added at arrival, streamed (the first streamed output is the first token)."""
    from transformers import ContinuousBatchingConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=max(g for _, _, g in traffic), eos_token_id=model.config.eos_token_id,
                          pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=ContinuousBatchingConfig(**settings))
    manager.start()
    try:
        warm = manager.add_request(traffic[0][1], max_new_tokens=2)  # warm-up, not timed
        while manager.get_result(warm, timeout=60) is None:
            pass
        t0 = time.perf_counter()
        sent: dict[str, int] = {}
        arrived = [0.0] * len(traffic)
        first: list[float | None] = [None] * len(traffic)
        results = [None] * len(traffic)
        done = 0

        def drain(timeout: float) -> bool:  # read every streamed output there is; False when none came
            nonlocal done
            out = manager.get_result(timeout=timeout)
            if out is None:
                return False
            while out is not None:
                i = sent.get(out.request_id)
                if i is not None and results[i] is None:
                    now = time.perf_counter() - t0
                    if first[i] is None and out.generated_tokens:
                        first[i] = now
                    if out.is_finished():
                        results[i] = (arrived[i], first[i] or now, now, len(out.generated_tokens))
                        done += 1
                out = manager.get_result(timeout=0)
            return True

        for i, (a, prompt, gen) in enumerate(traffic):
            while (wait := a - (time.perf_counter() - t0)) > 0:  # read the streams while waiting for the arrival
                drain(min(wait, 0.002))
            arrived[i] = time.perf_counter() - t0
            sent[manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=gen, streaming=True)] = i
        while done < len(traffic):
            if not drain(120):
                raise RuntimeError("transformers' manager returned no result within 120 s")
        return _figures(results)
    finally:
        manager.stop(block=True)


class TokenTimes(BaseStreamer):
    """When each generated token reaches the host: `generate` puts the prompt first, then each step's tokens."""

    def __init__(self, t0: float):
        self.t0, self.prompt_seen, self.times = t0, False, []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter() - self.t0)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def generated_count(row: list[int], eos: int, wanted: int) -> int:
    """Tokens a request got: up to and including its first EOS (generate pads after it), at most `wanted`.
    Counting non-pad ids would drop real tokens equal to the pad id."""
    return min(wanted, row.index(eos) + 1 if eos in row else len(row))


def run_generate(model: LlamaForCausalLM, traffic, batch: int, groups: list[list[int]] | None = None,
                 before_group=None) -> dict:
    """Static batches in arrival order (optionally within groups); a batch starts when its last
    request has arrived and the previous batch is done, and runs to its longest output. Streamed:
    a request's first and last tokens are timed when they reach the host, as the engine's are."""
    groups = groups or [list(range(len(traffic)))]
    eos = model.config.eos_token_id
    results = [None] * len(traffic)
    t0 = time.perf_counter()
    for g, idx in enumerate(groups):
        if before_group is not None:
            before_group(g)
        for b in range(0, len(idx), batch):
            rows = idx[b : b + batch]
            time.sleep(max(0.0, max(traffic[i][0] for i in rows) - (time.perf_counter() - t0)))
            width = max(len(traffic[i][1]) for i in rows)
            ids = torch.tensor([[0] * (width - len(traffic[i][1])) + traffic[i][1] for i in rows], device=model.device)
            mask = torch.tensor([[0] * (width - len(traffic[i][1])) + [1] * len(traffic[i][1]) for i in rows], device=model.device)
            times = TokenTimes(t0)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max(traffic[i][2] for i in rows),
                                     do_sample=False, pad_token_id=0, streamer=times)
            for k, i in enumerate(rows):
                n = generated_count(out[k, width:].tolist(), eos, traffic[i][2])
                results[i] = (traffic[i][0], times.times[0], times.times[max(n, 1) - 1], n)
    return _figures(results)


def run_naive(model: LlamaForCausalLM, deltas: dict, models: list[str], traffic, batch: int) -> dict:
    """One merged model per tenant: its requests batched, its weights merged in before them."""
    base_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    base_whole = {n: t.detach().clone() for n, t in model.state_dict().items() if n.endswith("norm.weight") or "embed" in n or "lm_head" in n}
    mods, params = dict(model.named_modules()), dict(model.named_parameters())
    order = sorted(set(models), key=models.index)
    groups = [[i for i, m in enumerate(models) if m == name] for name in order]
    loaded = [load_delta(deltas[name]) for name in order]  # read before the clock starts: a file read is not the method

    def merge(g: int) -> None:  # write W + α·sign and the whole tensors: timed, it is the naive cost
        d = loaded[g]
        with torch.inference_mode():
            for n, w in base_w.items():
                mods[n].weight.copy_(dense_delta_weight(w, d.signs[n].to(w.device), d.scales[n]).to(w.dtype))
            for n, t in d.whole.items():
                params[n].copy_(t)

    try:
        return run_generate(model, traffic, batch, groups, merge)
    finally:
        with torch.inference_mode():
            for n, w in base_w.items():
                mods[n].weight.copy_(w)
            for n, t in base_whole.items():
                params[n].copy_(t)


def _figures(results) -> dict:
    arrival = [r[0] for r in results]
    wall = max(r[2] for r in results) - min(arrival)
    tokens = sum(r[3] for r in results)
    q = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    lat = [r[2] - r[0] for r in results]
    ttft = [r[1] - r[0] for r in results]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_p50_s": q(lat, 50), "latency_p99_s": q(lat, 99), "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99)}


# ---- physical limits --------------------------------------------------------------------------------
def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Bytes moved per second by a device copy (read + write counted), best of 5."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def decode_step_bytes(base: LlamaForCausalLM, p: dict, tenants: float, kv_tokens: float) -> float:
    """Bytes a decode step must read: the base's weights, each distinct tenant's 1-bit linears,
    lm_head and norms (embedding rows are gathered: negligible), and the K/V of every context."""
    size = torch.tensor([], dtype=getattr(torch, p["dtype"])).element_size()
    weights = sum(t.numel() for t in base.parameters()) * size
    linears = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    head = base.lm_head.weight.numel() * size if p.get("whole", "all") == "all" else 0  # a whole lm_head per tenant
    per_tenant = linears / 8 + head + 2 * p["layers"] * p["hidden"] * size
    kv_per_token = 2 * p["layers"] * p["kv"] * (p["hidden"] // p["heads"]) * size
    return weights + tenants * per_tenant + kv_tokens * kv_per_token


def tenants_that_fit_7b(device_bytes: float, batch: int = 64) -> dict:
    """7B-sized tenants beside a Llama-2-7B base (fp16) with KV for `batch` x 2k tokens."""
    base = LLAMA2_7B["params"] * 2
    delta = LLAMA2_7B["linear_params"] / 8 + 2 * LLAMA2_7B["vocab"] * LLAMA2_7B["hidden"] * 2  # + whole embed, lm_head
    kv = 2 * LLAMA2_7B["layers"] * LLAMA2_7B["hidden"] * 2 * batch * 2048
    return {"device_bytes": device_bytes, "base_bytes": base, "delta_bytes": delta, "kv_bytes": kv,
            "tenants": max(0, int((device_bytes - base - kv) // delta))}


# ---- driver -------------------------------------------------------------------------------------------
def time_to_first_token_of_new_tenant(engine: Engine, path: Path, prompt: list[int], n: int = 3) -> list[float]:
    out = []
    for k in range(n):
        name = f"bench/hot-added-{k}"
        t0 = time.perf_counter()
        engine.add_tenant(name, path)
        next(iter(engine.submit(name, prompt, SamplingParams(max_tokens=1, temperature=0))))
        out.append(time.perf_counter() - t0)
        engine.remove_tenant(name)
    return out


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:  # CPU-only installs may lack it
        return None


def git_state() -> dict:
    """The commit measured, and whether the working tree had changes on top of it."""
    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: llama2-7b on CUDA, cpu-small otherwise")
    ap.add_argument("--out", default=None)
    ap.add_argument("--decode-mode", choices=DECODE_MODES, default="auto",
                    help="the engine's decode-only steps (default auto: CUDA graphs on CUDA, dynamic on CPU)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every method this many times and keep its fastest run (a shared machine's noise)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on CPU: 1, what Ray gives a 1-CPU replica through OMP_NUM_THREADS)")
    opts = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = opts.preset or ("llama2-7b" if device == "cuda" else "cpu-small")
    p = resolve_tenants(PRESETS[preset], device)
    torch.set_num_threads(opts.threads or (1 if device == "cpu" else torch.get_num_threads()))
    traffic = make_traffic(p)
    rows, limits, cb_runs = [], [], {}
    load_before = os.getloadavg()  # a shared machine: the figures are only as good as the load was low
    with tempfile.TemporaryDirectory(prefix="deltafleet-bench-") as tmp:
        tmp = Path(tmp)
        t_build = time.perf_counter()
        base, deltas = build(tmp, p, max(p["tenants"]), device)
        print(f"[bench] built {preset} base + {len(deltas)} deltas in {time.perf_counter() - t_build:.0f}s", file=sys.stderr)
        names = sorted(deltas, key=lambda n: int(n.split("t")[-1]))
        bw = copy_bandwidth(device)
        for batch in p["batches"]:
            steps = []
            engine = bench_engine(tmp, p, device, opts.decode_mode, batch, prefix_caching=False, on_step=steps.append)
            engine.set_tenants({n: deltas[n] for n in names})
            engine.wait_ready(timeout=600)
            run_engine(engine, [names[0]] * 4, traffic[:4])  # warm-up: slot copies, allocator

            def measured(label, tenants, mix, fig, decode_steps=None):
                row = {"batch": batch, "tenants": tenants, "mix": mix, "method": label, **fig}
                if decode_steps:  # decode-only steps: their mean time against the bandwidth limit
                    mean_t = statistics.mean(s.seconds for s in decode_steps)
                    kv_tokens = statistics.mean(s.kv_blocks_used * engine.kv.block_size for s in decode_steps)
                    n_t = statistics.mean(s.tenants - (1 if label == "engine-base" else 0) for s in decode_steps)
                    ideal = decode_step_bytes(base, p, n_t, kv_tokens) / bw
                    row.update(decode_step_s=mean_t, decode_step_limit_s=ideal, fraction_of_limit=ideal / mean_t)
                rows.append(row)
                print(f"[bench] batch {batch} T={tenants} {mix} {label}: {fig['tokens_per_s']:.0f} tok/s", file=sys.stderr)

            def engine_best(models):  # (figures, decode-only steps) of the fastest of --repeat runs
                runs = []
                for _ in range(opts.repeat):
                    steps.clear()
                    runs.append((run_engine(engine, models, traffic), [s for s in steps if s.prefill_tokens == 0]))
                return max(runs, key=lambda r: r[0]["tokens_per_s"])

            def best(run):
                return max((run() for _ in range(opts.repeat)), key=lambda f: f["tokens_per_s"])

            measured("engine-base", 0, "-", *engine_best([None] * len(traffic)))
            for T in p["tenants"]:
                for mix in ("distinct", "zipf") if T > 1 else ("distinct",):
                    models = assign(len(traffic), names[:T], mix)
                    measured("engine", T, mix, *engine_best(models))
                    if T in (1, 16) and mix == "distinct":
                        measured("naive", T, mix, best(lambda: run_naive(base, deltas, models, traffic, batch)))
            hot = time_to_first_token_of_new_tenant(engine, deltas[names[-1]], traffic[0][1])
            cb_settings = cb_sweep(engine)
            stats = engine.stats()
            engine.close()
            models = assign(len(traffic), names[:16], "distinct")
            shared = with_system_prompts(traffic, models, p["system"], p["vocab"])
            for caching in (True, False):  # a system prompt per tenant: prefix caching on and off
                fig = best(lambda: run_system_prompts(tmp, p, device, opts.decode_mode, batch, deltas, models, shared, caching))
                measured("engine, system prompts, prefix cache " + ("on" if caching else "off"), 16, "distinct", fig)
            measured("generate", 0, "-", best(lambda: run_generate(base, traffic, batch)))
            cb_runs[f"batch{batch}"] = sweep = []
            for label, settings in cb_settings:  # the sweep's settings once each, then its best 3 to --repeat
                try:
                    fig = run_cb_manager(base, traffic, settings) if label == "sweep" else best(lambda: run_cb_manager(base, traffic, settings))
                    sweep.append({"label": label, "settings": settings, **fig})
                except Exception as e:  # reported, not hidden: the sweep says why a setting is missing
                    print(f"[bench] cb-manager {settings} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    sweep.append({"label": label, "settings": settings, "error": f"{type(e).__name__}: {e}"})
            ran = [s for s in sweep if "error" not in s]
            for s in sorted((s for s in ran if s["label"] == "sweep"), key=lambda s: -s["tokens_per_s"])[:3]:
                for _ in range(opts.repeat - 1):
                    fig = run_cb_manager(base, traffic, s["settings"])
                    if fig["tokens_per_s"] > s["tokens_per_s"]:
                        s.update(fig)
            for label, fig in [("cb-manager (engine's settings)", sweep[0]),
                               ("cb-manager (best of sweep)", max(ran, key=lambda s: s["tokens_per_s"]) if ran else sweep[0])]:
                if "error" in fig:
                    rows.append({"batch": batch, "tenants": 0, "mix": "-", "method": label, "error": fig["error"]})
                else:
                    measured(label, 0, "-", {k: v for k, v in fig.items() if k != "label"})
    by = {(r["batch"], r["method"], r["tenants"], r["mix"]): r for r in rows}
    for r in rows:
        b = by.get((r["batch"], "engine-base", 0, "-"))
        if "tokens_per_s" in r and b:
            r["vs_engine_base"] = r["tokens_per_s"] / b["tokens_per_s"]
    ratios = {}
    for batch in p["batches"]:
        def tps(*k):
            return by.get((batch, *k), {}).get("tokens_per_s")
        pairs = {
            "engine_base_vs_cb_manager_best": (tps("engine-base", 0, "-"), tps("cb-manager (best of sweep)", 0, "-")),
            "engine_base_vs_cb_manager_equal_settings": (tps("engine-base", 0, "-"), tps("cb-manager (engine's settings)", 0, "-")),
            "engine_base_vs_generate": (tps("engine-base", 0, "-"), tps("generate", 0, "-")),
            "engine_16_distinct_vs_naive": (tps("engine", 16, "distinct"), tps("naive", 16, "distinct")),
            "engine_16_distinct_vs_engine_base": (tps("engine", 16, "distinct"), tps("engine-base", 0, "-")),
            "system_prompts_prefix_cache_on_vs_off": (tps("engine, system prompts, prefix cache on", 16, "distinct"),
                                                      tps("engine, system prompts, prefix cache off", 16, "distinct")),
        }
        ratios[f"batch{batch}"] = {k: (a / b if a and b else None) for k, (a, b) in pairs.items()}
    device_bytes = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 80 * 2**30
    result = {
        "benchmark": "serving", "device": torch.cuda.get_device_name() if device == "cuda" else cpu_native.cpu_description(),
        "device_type": device, "preset": preset, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "threads": torch.get_num_threads(), "repeat": opts.repeat, "decode_mode": opts.decode_mode, "copy_bandwidth_bytes_per_s": bw,
        "load_average": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
        "cpu_delta_kernel": "native" if device == "cpu" and cpu_native.load() is not None else "torch" if device == "cpu" else "triton",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "triton": _triton_version()},
        "git": git_state(), "rows": rows, "ratios": ratios, "cb_sweep": cb_runs, "new_tenant_time_to_first_token_s": hot,
        "tenants_that_fit_7b": {**tenants_that_fit_7b(device_bytes), "note": "on this device" if device == "cuda" else "for an 80 GiB GPU"},
        "engine": {k: v for k, v in stats.items() if k != "bank"},
    }
    out = Path(opts.out or Path(__file__).parent / "results" / f"serving-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lo, hi = p["prompt"], p["gen"]
    print(f"\n{preset} on {result['device']} ({device}): {p['requests']} requests arriving at {p['rate']:.0f}/s, "
          f"prompts {lo[0]}-{lo[1]} tokens, outputs {hi[0]}-{hi[1]} tokens\n")
    print("| batch | tenants | mix | method | tok/s | vs engine-base | p50 latency s | p99 latency s | p50 TTFT s | decode step / limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | - | - | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        frac = f"{r['fraction_of_limit']:.2f}" if "fraction_of_limit" in r else ""
        print(f"| {r['batch']} | {r['tenants']} | {r['mix']} | {r['method']} | {r['tokens_per_s']:.0f} | "
              f"{r.get('vs_engine_base', float('nan')):.2f} | {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | "
              f"{r['ttft_p50_s']:.2f} | {frac} |")
    print(f"\nratios: {json.dumps(ratios)}")
    for key, sweep in cb_runs.items():  # transformers' continuous batching over its own settings, fastest first
        print(f"cb-manager sweep, {key} (tok/s, p50 TTFT s, settings):")
        for s in sorted(sweep, key=lambda s: -s.get("tokens_per_s", 0)):
            print(f"  {s.get('tokens_per_s', 0):6.0f}  {s.get('ttft_p50_s', float('nan')):.3f}  {s['label']}: {s['settings']}"
                  + (f"  failed: {s['error']}" if "error" in s else ""))
    print(f"new tenant (add -> first token): median {statistics.median(hot):.3f}s over {len(hot)}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {result['load_average']['after']} on {os.cpu_count()} CPUs")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
