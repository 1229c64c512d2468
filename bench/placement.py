"""Placement benchmark: tenant-routed replicas against every-replica-holds-all, on real Ray Serve (CPU).

One local Ray, one toy base (bench/serving.py's "tiny" widths), N tenants (default 256) whose
deltas are the same files in both runs, 4 DeltaServer replicas whose device tier fits 16
tenants and host tier 64. The same pool is deployed twice, one placement after the other:

  - all:    every replica registers every tenant (the old layout): each replica's bank cycles
            all N tenants through its 64-delta host tier and 16 device slots;
  - routed: Serve's multiplexing sends a tenant to the replicas holding it, each holding at
            most 64 (`max_tenants_per_replica`), so the pool holds 4 x 64.

Each run: wait until the TenantDirectory reports every tenant ready, a warm-up (not measured),
then the same Zipf-distributed requests (popularity of rank r ∝ 1/r^s, fixed seed) from C
closed-loop clients over HTTP, streamed, so each request's time to first token (TTFT) is
measured at the client. Reported per placement:

  - delta loads per 1,000 requests from the replicas' bank counters (read from the directory
    before and after the measured traffic): disk loads (delta reads + verifications) and
    device misses (copies into a device slot), and their sum;
  - tokens/s (completion tokens / wall time of the measured traffic);
  - TTFT p50/p99 for warm tenants (the 16 most popular) and cold tenants (rank > 64);
  - memory per replica: the bank's device-tier and host-tier bytes, and the replica's RSS.

Also, on the routed pool, the cost of the extra hop (p50 of sequential requests): an HTTP
completion of the base model with max_tokens=1 (proxy -> ingress -> engine replica), the same
request straight to the engine through a handle from the driver, and GET /v1/models (proxy ->
ingress alone). And projections for Llama-2-7B on H100 (bank arithmetic plus the delta
read + verify throughput measured here, on a delta of one 7B layer's signs), labelled as such.

    .venv/bin/python bench/placement.py                    # ~10 min on 2 busy cores
    .venv/bin/python bench/placement.py --requests 300     # a quicker look
Writes bench/results/placement-cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving as bench  # noqa: E402  (bench/serving.py: the toy model, the deltas, git state)

from deltafleet.compress.format import Delta, load_delta, save_delta  # noqa: E402
from deltafleet.kernels import cpu_native  # noqa: E402

REPLICAS = 4
DEVICE_TENANTS = 16  # each replica's device tier fits this many tenants
HOST_TENANTS = 64  # ... and its host tier this many (routed: also the most a replica holds)
WARM_RANKS = 16  # "warm" tenants: the 16 most popular
COLD_FROM_RANK = 65  # "cold" tenants: rank 65 and below (1-based), beyond what one replica's host tier holds
MODES = ("all", "routed")


def log(msg: str) -> None:
    """Progress for a person watching; quiet when stderr is a file or a pipe."""
    if sys.stderr.isatty():
        print(f"[placement] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- sizing ---------------------------------------------------------------------------------------
def bank_sizes(base_model: str, delta_path: Path) -> dict:
    """The bank's per-tenant bytes for this base, from an engine built once here (cheap for the toy):
    a device slot costs its signs + scales and the whole tensors it reserves; a host-tier delta
    costs Delta.nbytes()."""
    from deltafleet.serving.engine import Engine

    eng = Engine(base_model, device="cpu", dtype="float32", gpu_bank_bytes=0, cpu_bank_bytes=0, kv_cache_bytes=1 << 20)
    try:
        slot = eng.bank.slot_bytes + eng.bank.slot_whole_bytes
        sizes = {"slot_bytes": eng.bank.slot_bytes, "slot_whole_bytes": eng.bank.slot_whole_bytes}
    finally:
        eng.close()
    delta = load_delta(delta_path).nbytes()
    return {**sizes, "delta_bytes": delta, "gpu_bank_bytes": DEVICE_TENANTS * slot, "cpu_bank_bytes": HOST_TENANTS * delta}


# ---- traffic --------------------------------------------------------------------------------------
def zipf_ranks(n_requests: int, n_tenants: int, s: float, seed: int) -> list[int]:
    """0-based popularity ranks, P(rank r) ∝ 1/(r+1)^s: the same sequence for both placements."""
    w = 1.0 / np.arange(1, n_tenants + 1) ** s
    return np.random.default_rng(seed).choice(n_tenants, size=n_requests, p=w / w.sum()).tolist()


def prompts(n: int, vocab: int, seed: int) -> list[str]:
    """Short prompts of the toy tokenizer's words (t3 .. t<vocab-1>; t1 is EOS)."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"t{i}" for i in rng.integers(3, vocab, int(rng.integers(4, 9)))) for _ in range(n)]


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: TTFT = send -> first SSE data line, total = send -> [DONE]."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens, done, error = None, 0, False, None
    try:
        with client.stream("POST", url, json=body, timeout=600) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                first = first or time.perf_counter()
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = f"stream error: {chunk['error']}"
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if error or not done:
        return {"error": error or "stream ended without [DONE]"}
    return {"ttft_s": first - t0, "total_s": end - t0, "tokens": tokens}


def run_traffic(url: str, names: list[str], ranks: list[int], texts: list[str], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """Closed loop: `clients` threads, each sending its next request when its last one ended."""
    local = threading.local()

    def send(i: int) -> dict:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        return {"rank": ranks[i] + 1, **one_request(local.client, url, names[ranks[i]], texts[i], max_tokens)}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:  # map hands out requests in order as threads free up
        out = list(pool.map(send, range(len(ranks))))
    return out, time.perf_counter() - t0


# ---- the pool -------------------------------------------------------------------------------------
def deploy_pool(pool: str, mode: str, base_model: str, root: Path, deltas: dict[str, Path], sizes: dict, port: int,
                batch: int) -> None:
    """Deploy this placement's application (replacing any other: Serve's config is declarative)."""
    from deltafleet.serving.cli import deploy, wait_running
    from deltafleet.serving.config import serve_application

    args = dict(pool=pool, base_model=base_model, device="cpu", dtype="float32", max_batch_size=batch,
                gpu_bank_bytes=sizes["gpu_bank_bytes"], cpu_bank_bytes=sizes["cpu_bank_bytes"], store_root=str(root),
                auth="none", placement=mode, kv_cache_bytes=64 << 20)  # the toy's KV: 64 MiB is ~130k tokens
    if mode == "routed":
        args["max_tenants_per_replica"] = HOST_TENANTS
    tenants = {"tenants": {n: {"uri": p.as_uri()} for n, p in deltas.items()}}
    app = serve_application(args, tenants, num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0})
    deploy({"applications": [app]}, port=port)
    wait_running([pool], timeout=900)


def wait_gone(pool: str, timeout: float = 300) -> None:
    """Until the previous placement's application is deleted (its replicas would share the CPUs)."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while pool in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {pool} still present after {timeout:.0f}s")
        time.sleep(1)


def wait_ready(base: str, names: list[str], timeout: float) -> float:
    """Until the directory reports every tenant ready; a failed one stops the bench with its reason."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            r = httpx.get(f"{base}/-/tenants", timeout=30)
            if r.status_code == 200:
                tenants = r.json()["tenants"]
                failed = {n: t["error"] for n, t in tenants.items() if t["state"] == "failed"}
                if failed:
                    raise RuntimeError(f"{len(failed)} tenants failed to load, e.g. {next(iter(failed.items()))}")
                ready = sum(1 for n in names if tenants.get(n, {}).get("state") == "ready")
                if ready != last:
                    log(f"{ready}/{len(names)} tenants ready")
                    last = ready
                if ready == len(names):
                    return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"not every tenant ready at {base} after {timeout:.0f}s (last count {last})")


def figures(pool: str) -> dict[str, dict]:
    """Each replica's bank counters and bytes, as last pushed to the directory (every ~2 s)."""
    from ray import serve

    return serve.get_deployment_handle("TenantDirectory", app_name=pool).figures.remote().result(timeout_s=60)


def rss_bytes(pid: int) -> int | None:
    """A replica process's resident memory (all replicas run on this machine)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


COUNTERS = ("disk_loads", "device_misses", "device_hits", "cpu_hits", "evictions")


def summarize(results: list[dict], wall: float, before: dict, after: dict) -> dict:
    """One placement's figures (see the module docstring)."""
    errors = [r for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    n = len(results)
    counts = {c: sum(f.get(c, 0) - before.get(rid, {}).get(c, 0) for rid, f in after.items()) for c in COUNTERS}
    per_1k = {c: 1000 * v / n for c, v in counts.items()}
    per_1k["delta_loads"] = per_1k["disk_loads"] + per_1k["device_misses"]

    def q(rs: list[dict], p: float) -> float | None:
        return float(np.percentile([r["ttft_s"] for r in rs], p)) if rs else None

    warm = [r for r in ok if r["rank"] <= WARM_RANKS]
    cold = [r for r in ok if r["rank"] >= COLD_FROM_RANK]
    tokens = sum(r["tokens"] for r in ok)
    replicas = {rid: {"device_bytes": f["device_bytes"], "cpu_bytes": f["cpu_bytes"], "device_tenants": f["device_tenants"],
                      "cpu_tenants": f["cpu_tenants"], "held": f["held"], "capacity": f["capacity"], "n_slots": f["n_slots"],
                      "rss_bytes": rss_bytes(f["pid"]),
                      **{c: f.get(c, 0) - before.get(rid, {}).get(c, 0) for c in COUNTERS}}
                for rid, f in sorted(after.items())}

    def mean_max(key: str) -> dict:
        vals = [r[key] for r in replicas.values() if r[key] is not None]
        return {"mean": float(np.mean(vals)) if vals else None, "max": max(vals) if vals else None}

    return {
        "requests": n, "errors": len(errors), "error_examples": [e["error"] for e in errors[:3]],
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "loads": counts, "loads_per_1k_requests": per_1k,
        "ttft_s": {"all": {"p50": q(ok, 50), "p99": q(ok, 99), "n": len(ok)},
                   "warm": {"p50": q(warm, 50), "p99": q(warm, 99), "n": len(warm)},
                   "cold": {"p50": q(cold, 50), "p99": q(cold, 99), "n": len(cold)}},
        "latency_s": {"p50": float(np.percentile([r["total_s"] for r in ok], 50)) if ok else None,
                      "p99": float(np.percentile([r["total_s"] for r in ok], 99)) if ok else None},
        "memory_per_replica": {k: mean_max(k) for k in ("device_bytes", "cpu_bytes", "rss_bytes")},
        "replicas": replicas,
    }


def run_mode(mode: str, opts, base_model: str, root: Path, deltas: dict[str, Path], names: list[str], sizes: dict,
             port: int, previous: str | None) -> tuple[dict, str]:
    pool = f"placement-{mode}"
    t0 = time.monotonic()
    deploy_pool(pool, mode, base_model, root, deltas, sizes, port, opts.batch)
    if previous:
        wait_gone(previous)
    deploy_s = time.monotonic() - t0
    log(f"{mode}: deployed in {deploy_s:.0f}s")
    base = f"http://127.0.0.1:{port}/{pool}"
    ready_s = wait_ready(base, names, opts.ready_timeout)
    log(f"{mode}: {len(names)} tenants ready after {ready_s:.0f}s")
    url = f"{base}/v1/completions"
    warm_ranks = zipf_ranks(opts.warmup, len(names), opts.zipf, opts.seed + 1)
    warm, _ = run_traffic(url, names, warm_ranks, prompts(opts.warmup, opts.vocab, opts.seed + 1), opts.clients, opts.max_tokens)
    if any("error" in r for r in warm):
        raise RuntimeError(f"{mode}: warm-up errors, e.g. {next(r['error'] for r in warm if 'error' in r)}")
    time.sleep(4)  # the replicas push their figures every ~2 s
    before = figures(pool)
    ranks = zipf_ranks(opts.requests, len(names), opts.zipf, opts.seed)
    log(f"{mode}: {opts.requests} measured requests from {opts.clients} clients")
    results, wall = run_traffic(url, names, ranks, prompts(opts.requests, opts.vocab, opts.seed), opts.clients, opts.max_tokens)
    time.sleep(4)
    after = figures(pool)
    out = {"pool": pool, "deploy_s": deploy_s, "tenants_ready_s": ready_s, **summarize(results, wall, before, after)}
    log(f"{mode}: {out['tokens_per_s']:.0f} tok/s, {out['loads_per_1k_requests']['delta_loads']:.0f} loads/1k")
    return out, pool


# ---- the extra hop --------------------------------------------------------------------------------
def hop_overhead(pool: str, port: int, n: int) -> dict:
    """p50 of n sequential requests each way, on an idle pool (after a few unmeasured ones)."""
    from ray import serve

    from deltafleet.serving.openai_api import CompletionRequest

    base = f"http://127.0.0.1:{port}/{pool}"
    handle = serve.get_deployment_handle("DeltaServer", app_name=pool).options(stream=True)
    client = httpx.Client(timeout=120)
    prompt = "t5 t17 t42 t9"

    def http_completion() -> None:
        r = client.post(f"{base}/v1/completions", json={"model": pool, "prompt": prompt, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text

    def handle_completion() -> None:
        req = CompletionRequest(model=pool, prompt=prompt, max_tokens=1, temperature=0)
        for ev in handle.generate.remote(None, req):
            assert ev.error is None, ev.error

    def http_models() -> None:
        r = client.get(f"{base}/v1/models")
        assert r.status_code == 200, r.text

    def p50(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    a, b, c = p50(http_completion), p50(handle_completion), p50(http_models)
    return {"requests_each": n,
            "http_completion_p50_s": a, "handle_completion_p50_s": b, "http_models_p50_s": c,
            "proxy_ingress_and_hop_s": a - b, "proxy_and_ingress_s": c,
            "note": "a = HTTP completion of the base, max_tokens=1 (proxy -> ingress -> engine replica); "
                    "b = the same request through a DeltaServer handle from the driver (driver -> engine replica); "
                    "c = GET /v1/models (proxy -> ingress alone). a - b = proxy + ingress + the ingress's hop to the engine."}


# ---- projections ----------------------------------------------------------------------------------
def read_verify_throughput(tmp: Path) -> dict:
    """Bytes/s of load_delta (read + content hash + checks) on one Llama-2-7B layer's 1-bit linears
    (~25 MB of signs), best of 3. The file was just written: the page cache serves it, so this is
    the verification's speed, not a network store's."""
    h, inter = 4096, 11008
    shapes = {f"model.layers.0.self_attn.{p}_proj": (h, h) for p in "qkvo"}
    shapes |= {"model.layers.0.mlp.gate_proj": (inter, h), "model.layers.0.mlp.up_proj": (inter, h),
               "model.layers.0.mlp.down_proj": (h, inter)}
    g = torch.Generator().manual_seed(7)
    d = Delta(base_model="bench", base_fingerprint="bench-7b-layer", finetuned_model="bench/7b-layer")
    for name, (rows, cols) in shapes.items():
        d.signs[name] = torch.randint(-(2**31), 2**31 - 1, (rows, cols // 32), generator=g, dtype=torch.int32)
        d.scales[name] = torch.tensor(2e-3)
    path = save_delta(d, tmp / "7b-layer.safetensors")
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        load_delta(path, expected_fingerprint="bench-7b-layer")
        best = min(best, time.perf_counter() - t)
    size = path.stat().st_size
    return {"file_bytes": size, "best_s": best, "bytes_per_s": size / best, "threads": torch.get_num_threads()}


def projections(store_bps: float, h2d_bps: float, host_bank_bytes: float, gpu_bytes: float, pool_gpus: int) -> dict:
    """Llama-2-7B on H100: the bank's arithmetic with measured and stated-as-assumed rates."""
    fit = bench.tenants_that_fit_7b(gpu_bytes, batch=16)  # device tier beside the fp16 base and KV for batch 16 x 2k
    m = bench.LLAMA2_7B
    linears_only = m["linear_params"] / 8
    delta = fit["delta_bytes"]  # 1-bit linears + whole embeddings and lm_head (fp16)
    host = int(host_bank_bytes // delta)
    per_replica = max(fit["tenants"], host)  # a tenant in a device slot is in the host tier too (LRU permitting)
    return {
        "label": "projection (not measured): Llama-2-7B deltas on 8 x H100 80GB, from the bank's arithmetic",
        "delta_bytes_linears_only": linears_only, "delta_bytes_with_embeddings_and_lm_head": delta,
        "device_tier_tenants_per_replica": fit["tenants"], "device_tier": fit,
        "host_tier_bytes_per_replica": host_bank_bytes, "host_tier_tenants_per_replica": host,
        "tenants_per_replica": per_replica,
        "tenants_per_pool": {"gpus": pool_gpus, "routed": pool_gpus * per_replica, "all": per_replica},
        "cold_ttft_from_host_s": delta / h2d_bps,
        "cold_ttft_from_store_s": delta / store_bps + delta / h2d_bps,
        "cold_ttft_from_store_linears_only_s": linears_only / store_bps + linears_only / h2d_bps,
        "assumptions": {
            "host_bank": f"{host_bank_bytes / 2**30:.0f} GiB per replica (assumed: 1 TiB host per 8-GPU node, 75% for the bank)",
            "h2d_bytes_per_s": f"{h2d_bps:.3g} (assumed: pinned PCIe Gen5 host-to-device copy)",
            "store_bytes_per_s": f"{store_bps:.3g} (measured here: load_delta read + verify from the page cache, one "
                                 "CPU thread; a network store's read rate is not included)",
            "gpu_bytes": f"{gpu_bytes:.4g} per H100, base fp16 + KV for batch 16 x 2k tokens (the default max_batch_size) beside the bank",
            "ttft": "the delta's transfer only; the first prefill step comes on top",
        },
    }


# ---- driver ---------------------------------------------------------------------------------------
def table(modes: dict) -> str:
    mb = lambda v: f"{v / 1e6:.2f}" if v is not None else "-"  # noqa: E731
    ms = lambda v: f"{1000 * v:.0f}" if v is not None else "-"  # noqa: E731
    lines = ["| placement | delta loads / 1k req (disk + device) | tok/s | TTFT p50 / p99 warm (ms) | TTFT p50 / p99 cold (ms) "
             "| device MB / replica (mean, max) | host MB / replica (mean, max) |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in modes.items():
        l, t, mem = r["loads_per_1k_requests"], r["ttft_s"], r["memory_per_replica"]
        lines.append(f"| {mode} | {l['delta_loads']:.0f} ({l['disk_loads']:.0f} + {l['device_misses']:.0f}) | {r['tokens_per_s']:.0f} "
                     f"| {ms(t['warm']['p50'])} / {ms(t['warm']['p99'])} | {ms(t['cold']['p50'])} / {ms(t['cold']['p99'])} "
                     f"| {mb(mem['device_bytes']['mean'])}, {mb(mem['device_bytes']['max'])} "
                     f"| {mb(mem['cpu_bytes']['mean'])}, {mb(mem['cpu_bytes']['max'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=256, help="tenants in the pool (default 256)")
    ap.add_argument("--requests", type=int, default=1000, help="measured requests per placement (default 1000)")
    ap.add_argument("--warmup", type=int, default=100, help="unmeasured requests per placement before the counters are read (default 100)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients (default 16)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s: P(rank r) ∝ 1/r^s (default 1.1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tenant sequence and prompts (default 0)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per completion (default 8)")
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size of each engine replica (default 16)")
    ap.add_argument("--hop-requests", type=int, default=50, help="sequential requests per way of the hop measurement (default 50)")
    ap.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for every tenant to be ready (default 900)")
    ap.add_argument("--h2d-gbps", type=float, default=25.0, help="assumed host-to-device GB/s for the projection (default 25)")
    ap.add_argument("--host-bank-gib", type=float, default=96.0,
                    help="assumed host-tier GiB per 7B replica for the projection (default 96: 1 TiB x 75%% / 8 GPUs)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/placement-cpu.json)")
    opts = ap.parse_args(argv)

    import ray
    from ray import serve

    p = bench.PRESETS["tiny"]
    opts.vocab = p["vocab"]
    load_before = os.getloadavg()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="deltafleet-placement-") as tmp:
        tmp = Path(tmp)
        _, deltas = bench.build(tmp, p, opts.tenants, "cpu")
        names = sorted(deltas, key=lambda n: int(n.split("t")[-1]))  # rank 1 = bench/t0, ...
        base_model = str(tmp / "base")
        sizes = bank_sizes(base_model, deltas[names[0]])
        log(f"built base + {len(names)} deltas; sizes {sizes}")
        store = read_verify_throughput(tmp)
        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="deltafleet-bench-placement")
        modes, previous = {}, None
        try:
            for mode in MODES:
                modes[mode], previous = run_mode(mode, opts, base_model, tmp, deltas, names, sizes, port, previous)
            hop = hop_overhead(previous, port, opts.hop_requests)  # the routed pool (the last deployed)
        finally:
            serve.shutdown()
            ray.shutdown()
    wall = time.monotonic() - t_start

    errors = {m: r["errors"] for m, r in modes.items() if r["errors"]}
    a, r = modes["all"], modes["routed"]
    loads_ratio = r["loads_per_1k_requests"]["delta_loads"] / a["loads_per_1k_requests"]["delta_loads"] if a["loads_per_1k_requests"]["delta_loads"] else None
    disk_ratio = r["loads_per_1k_requests"]["disk_loads"] / a["loads_per_1k_requests"]["disk_loads"] if a["loads_per_1k_requests"]["disk_loads"] else None
    tps_ratio = r["tokens_per_s"] / a["tokens_per_s"]
    proj = projections(store["bytes_per_s"], opts.h2d_gbps * 1e9, opts.host_bank_gib * 2**30, 80 * 2**30, 8)
    result = {
        "benchmark": "placement", "device": cpu_native.cpu_description(), "device_type": "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "triton": bench._triton_version()},
        "git": bench.git_state(),
        "load_average": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
        "wall_s": wall,
        "settings": {"model": {k: v for k, v in p.items() if k in ("hidden", "layers", "heads", "kv", "inter", "vocab", "dtype")},
                     "replicas": REPLICAS, "tenants": opts.tenants, "requests": opts.requests, "warmup": opts.warmup,
                     "clients": opts.clients, "zipf_s": opts.zipf, "seed": opts.seed, "max_tokens": opts.max_tokens,
                     "max_batch_size": opts.batch, "device_tier_tenants": DEVICE_TENANTS, "host_tier_tenants": HOST_TENANTS,
                     "max_tenants_per_replica_routed": HOST_TENANTS, "ray_actor_options": {"num_cpus": 0},
                     "ray_num_cpus": 2, **sizes},
        "definitions": {
            "warm": f"requests to the {WARM_RANKS} most popular tenants (ranks 1-{WARM_RANKS})",
            "cold": f"requests to tenants ranked {COLD_FROM_RANK} or lower (beyond one replica's {HOST_TENANTS}-delta host tier)",
            "disk_loads": "delta reads + verifications from disk (bank counter), summed over replicas",
            "device_misses": "copies of a delta into a device slot (bank counter), summed over replicas",
            "device_hits": "admissions of a tenant's request on a replica whose slot was ready: per replica, about the "
                           "requests it served (how routing spread the load)",
            "delta_loads": "disk_loads + device_misses",
            "tokens_per_s": "completion tokens of the measured requests / their wall time (closed loop)",
            "ttft": "client-side: request sent -> first SSE data line, through Ray Serve's HTTP proxy",
            "memory": "bank device-tier bytes (slots in use + slot stacks) and host-tier bytes from each replica's "
                      "figures after the traffic; rss_bytes = the replica process's VmRSS",
        },
        "modes": modes,
        "routed_vs_all": {"delta_loads": loads_ratio, "disk_loads": disk_ratio, "tokens_per_s": tps_ratio},
        "target": {"rule": "routed delta loads <= 0.25 x all's and routed tok/s >= 1.0 x all's",
                   "met": bool(loads_ratio is not None and loads_ratio <= 0.25 and tps_ratio >= 1.0)},
        "hop": hop,
        "store_read_verify": store,
        "projection_7b_h100": proj,
    }
    out = Path(opts.out or Path(__file__).parent / "results" / "placement-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{opts.tenants} tenants, {REPLICAS} replicas (device tier {DEVICE_TENANTS} tenants, host tier {HOST_TENANTS}), "
          f"{opts.requests} requests Zipf s={opts.zipf}, {opts.clients} clients, {opts.max_tokens} tokens each, "
          f"on {result['device']}\n")
    print(table(modes))
    print(f"\nrouted / all: delta loads {loads_ratio if loads_ratio is None else round(loads_ratio, 3)}, "
          f"disk loads {disk_ratio if disk_ratio is None else round(disk_ratio, 3)}, tok/s {tps_ratio:.2f}; "
          f"target (loads <= 0.25x, tok/s >= 1.0x) {'met' if result['target']['met'] else 'NOT met'}")
    print(f"hop (p50 of {hop['requests_each']}): HTTP completion {1000 * hop['http_completion_p50_s']:.1f} ms, "
          f"handle to engine {1000 * hop['handle_completion_p50_s']:.1f} ms, GET /v1/models {1000 * hop['http_models_p50_s']:.1f} ms "
          f"-> proxy + ingress + hop {1000 * hop['proxy_ingress_and_hop_s']:.1f} ms, proxy + ingress alone {1000 * hop['proxy_and_ingress_s']:.1f} ms")
    print(f"store read + verify (measured, page cache): {store['bytes_per_s'] / 1e6:.0f} MB/s on {store['file_bytes'] / 1e6:.1f} MB")
    print(f"PROJECTION (not measured), Llama-2-7B on H100 80GB: delta {proj['delta_bytes_with_embeddings_and_lm_head'] / 1e9:.2f} GB "
          f"({proj['delta_bytes_linears_only'] / 1e9:.2f} GB linears only); per replica {proj['device_tier_tenants_per_replica']} on the device, "
          f"{proj['host_tier_tenants_per_replica']} in {opts.host_bank_gib:.0f} GiB host (assumed); pool of 8: routed "
          f"{proj['tenants_per_pool']['routed']} vs all {proj['tenants_per_pool']['all']} tenants; cold TTFT from host "
          f"{proj['cold_ttft_from_host_s'] * 1000:.0f} ms (assumed {opts.h2d_gbps:.0f} GB/s), from the store {proj['cold_ttft_from_store_s']:.2f} s")
    print(f"wall {wall:.0f}s; load average before {load_before}, after {result['load_average']['after']}; wrote {out}")
    if errors:
        print(f"ERRORS: {errors}; e.g. {[modes[m]['error_examples'] for m in errors]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
