"""Serving benchmark: many tenants in one batch (1-bit deltas) vs the base alone vs the naive way.

Drives the engine directly (no Ray). For T tenants, N requests (each a P-token prompt, G
greedy tokens) are submitted at once, tenants assigned `distinct` (round robin) or `zipf`
(popularity ∝ 1/rank^1.1). Compared in the same run, at the same batch size:
  - delta:        our engine, rows of different tenants share each batch (one kernel per layer)
  - base:         the same engine, every request to the base model (the speed ceiling)
  - naive-swap:   one merged model (W + α·sign) per tenant, merged into the weights per batch;
                  a batch holds one tenant's requests
  - naive-resident: the same, every tenant's merged model kept resident (no swap cost),
                  where memory allows
Also: time from adding a tenant to its first token (register -> verify -> device -> prefill).

    python bench/serving.py                 # small model on CPU (<= 8 min on 2 cores)
    python bench/serving.py --preset llama2-7b   # on a GPU: Llama-2-7B shapes, random weights
Writes bench/results/serving-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltafleet.compress.fingerprint import fingerprint_model
from deltafleet.compress.format import Delta, save_delta
from deltafleet.kernels import dense_delta_weight
from deltafleet.serving.engine import Engine
from deltafleet.serving.sampling import SamplingParams

PRESETS = {
    "cpu-small": dict(hidden=256, layers=4, heads=8, kv=4, inter=704, vocab=2048, dtype="float32",
                      tenants=[1, 4, 16, 64], requests=64, batch=16, prompt=16, gen=32),
    "llama2-7b": dict(hidden=4096, layers=32, heads=32, kv=32, inter=11008, vocab=32000, dtype="float16",
                      tenants=[1, 4, 16, 64], requests=128, batch=16, prompt=128, gen=64),
}


def build(tmp: Path, p: dict, n_tenants: int, device: str):
    """A random Llama base saved with a byte-level tokenizer, and n random 1-bit deltas."""
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
    deltas = {}
    for t in range(n_tenants):
        g = torch.Generator().manual_seed(1000 + t)
        d = Delta(base_model="bench", base_fingerprint=fp, finetuned_model=f"bench/t{t}")
        for n, (rows, cols) in linears.items():
            d.signs[n] = torch.randint(-(2**31), 2**31 - 1, (rows, cols // 32), generator=g, dtype=torch.int32)
            d.scales[n] = torch.tensor(2e-3)
        deltas[f"bench/t{t}"] = save_delta(d, tmp / "deltas" / f"t{t}.safetensors")
    return base, deltas


def assign(n_req: int, tenants: list[str], mix: str, seed: int = 0) -> list[str]:
    if mix == "distinct":
        return [tenants[i % len(tenants)] for i in range(n_req)]
    w = 1.0 / np.arange(1, len(tenants) + 1) ** 1.1
    return list(np.random.default_rng(seed).choice(tenants, size=n_req, p=w / w.sum()))


def run_engine(engine: Engine, models: list[str | None], prompts: list[list[int]], gen: int) -> dict:
    params = SamplingParams(max_tokens=gen, temperature=0)
    t0 = time.perf_counter()
    streams = [engine.submit(m, pr, params) for m, pr in zip(models, prompts)]
    lat, ttft, tokens = [], [], 0
    for s in streams:  # all were submitted at t0; each is read to its end
        first = None
        for ev in s:
            if ev.error:
                raise ev.error
            first = first or time.perf_counter()
            tokens += len(ev.token_ids)
        lat.append(time.perf_counter() - t0)
        ttft.append(first - t0)
    return _figures(time.perf_counter() - t0, tokens, lat, ttft)


def run_naive(base: LlamaForCausalLM, deltas: dict, models: list[str], prompts, gen: int, batch: int, resident: bool) -> dict:
    """One merged model per tenant; a batch holds one tenant's requests (FIFO by tenant)."""
    from deltafleet.compress.format import load_delta

    base_w = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    mods = dict(base.named_modules())
    merged = {}
    if resident:  # merge every tenant up front (not timed: models would be loaded at start)
        for name in set(models):
            d = load_delta(deltas[name])
            merged[name] = {n: dense_delta_weight(base_w[n], d.signs[n].to(base_w[n].device), d.scales[n]).to(base_w[n].dtype) for n in base_w}
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(m, []).append(i)
    lat, ttft, tokens = [0.0] * len(models), [0.0] * len(models), 0
    t0 = time.perf_counter()
    for name, idx in groups.items():
        weights = merged.get(name)
        if weights is None:  # swap: read the delta and merge it into dense weights now
            d = load_delta(deltas[name])
            weights = {n: dense_delta_weight(base_w[n], d.signs[n].to(base_w[n].device), d.scales[n]).to(base_w[n].dtype) for n in base_w}
        with torch.inference_mode():
            for n, w in weights.items():
                mods[n].weight.copy_(w)
            for b in range(0, len(idx), batch):
                rows = idx[b : b + batch]
                ids = torch.tensor([prompts[i] for i in rows], device=base.device)
                out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen, do_sample=False, pad_token_id=0)
                tokens += int((out[:, ids.shape[1]:] != 0).sum())
                now = time.perf_counter() - t0
                for i in rows:
                    lat[i] = ttft[i] = now  # the naive batch returns all at once (no streaming modelled)
    with torch.inference_mode():
        for n, w in base_w.items():
            mods[n].weight.copy_(w)
    return _figures(time.perf_counter() - t0, tokens, lat, ttft)


def _figures(wall: float, tokens: int, lat: list[float], ttft: list[float]) -> dict:
    q = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_p50_s": q(lat, 50), "latency_p90_s": q(lat, 90), "latency_p99_s": q(lat, 99),
            "ttft_p50_s": q(ttft, 50), "ttft_p90_s": q(ttft, 90)}


def time_to_first_token_of_new_tenant(engine: Engine, path: Path, prompt: list[int], n: int = 3) -> list[float]:
    out = []
    for k in range(n):
        name = f"bench/hot-added-{k}"
        t0 = time.perf_counter()
        engine.add_tenant(name, path)
        s = engine.submit(name, prompt, SamplingParams(max_tokens=1, temperature=0))
        next(iter(s))
        out.append(time.perf_counter() - t0)
        engine.remove_tenant(name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: llama2-7b on CUDA, cpu-small otherwise")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on CPU: 1, what Ray gives a 1-CPU replica through OMP_NUM_THREADS)")
    opts = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = opts.preset or ("llama2-7b" if device == "cuda" else "cpu-small")
    p = PRESETS[preset]
    # Decode-sized ops are too small to split: on the 2-core build machine two OpenMP threads
    # spinning against the engine and client threads made every method 1.7-2.4x slower.
    torch.set_num_threads(opts.threads or (1 if device == "cpu" else torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="deltafleet-bench-") as tmp:
        tmp = Path(tmp)
        t_build = time.perf_counter()
        base, deltas = build(tmp, p, max(p["tenants"]), device)
        print(f"[bench] built {preset} base + {len(deltas)} deltas in {time.perf_counter() - t_build:.0f}s", file=sys.stderr)
        slot = sum(n * k // 8 + n * 4 for n, k in (m.weight.shape for nm, m in base.named_modules()
                                                    if isinstance(m, torch.nn.Linear) and ".layers." in nm))
        engine = Engine(str(tmp / "base"), device=device, dtype=p["dtype"], max_batch_size=p["batch"],
                        max_queue=10_000, gpu_bank_bytes=max(p["tenants"]) * slot, cpu_bank_bytes=1 << 40)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, p["vocab"], p["prompt"]).tolist() for _ in range(p["requests"])]
        names = sorted(deltas, key=lambda n: int(n.split("t")[-1]))
        engine.set_tenants({n: deltas[n] for n in names})
        engine.wait_ready(timeout=600)
        run_engine(engine, [names[0]] * 4, prompts[:4], 4)  # warm-up: first slot copy, allocator
        rows = []
        base_fig = run_engine(engine, [None] * p["requests"], prompts, p["gen"])
        rows.append({"tenants": 0, "mix": "-", "method": "base", **base_fig})
        ref = base.to(device)
        for T in p["tenants"]:
            for mix in ("distinct", "zipf"):
                models = assign(p["requests"], names[:T], mix)
                fig = run_engine(engine, models, prompts, p["gen"])
                rows.append({"tenants": T, "mix": mix, "method": "delta", **fig})
                rows.append({"tenants": T, "mix": mix, "method": "naive-swap",
                             **run_naive(ref, deltas, models, prompts, p["gen"], p["batch"], resident=False)})
                rows.append({"tenants": T, "mix": mix, "method": "naive-resident",
                             **run_naive(ref, deltas, models, prompts, p["gen"], p["batch"], resident=True)})
                print(f"[bench] T={T} {mix}: delta {fig['tokens_per_s']:.0f} tok/s", file=sys.stderr)
        hot = time_to_first_token_of_new_tenant(engine, deltas[names[-1]], prompts[0])
        stats = engine.bank.stats()
        engine.close()
    for r in rows:
        r["vs_base"] = r["tokens_per_s"] / base_fig["tokens_per_s"]
    for r in rows:
        if r["method"] == "delta":
            for naive in ("naive-swap", "naive-resident"):
                other = next(x for x in rows if x["method"] == naive and x["tenants"] == r["tenants"] and x["mix"] == r["mix"])
                r[f"speedup_vs_{naive}"] = r["tokens_per_s"] / other["tokens_per_s"]
    result = {
        "benchmark": "serving", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "device_type": device, "preset": preset, "settings": p, "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "rows": rows, "new_tenant_time_to_first_token_s": hot, "bank": {k: v for k, v in stats.items() if k != "tenants"},
    }
    out = Path(opts.out or Path(__file__).parent / "results" / f"serving-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{preset} on {result['device']} ({device}), batch {p['batch']}, {p['requests']} requests x "
          f"{p['prompt']} prompt + {p['gen']} generated tokens\n")
    print("| tenants | mix | method | tok/s | vs base | p50 latency s | p99 latency s | p50 TTFT s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tenants']} | {r['mix']} | {r['method']} | {r['tokens_per_s']:.0f} | {r['vs_base']:.2f} | "
              f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.2f} |")
    print(f"\nnew tenant (add -> first token): median {statistics.median(hot):.3f}s over {len(hot)}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
