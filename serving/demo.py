"""`run_serving_demo`: one pool with the given tenants on a local Ray, queried over HTTP with
the official `openai` client, then shut down. `deltafleet demo` calls it."""

from __future__ import annotations

import socket
from pathlib import Path

from .config import serve_application

PROMPT = "def fibonacci(n):"


def pool_config(pool: str, base_dir: Path, deltas: dict[str, Path], **args) -> dict:
    """The serve config of one pool, built as the operator builds it (serving.config.serve_application)."""
    # a local demo: no API keys (a pool the operator generates requires them)
    app_args = {"pool": pool, "base_model": str(base_dir), "device": "auto", "dtype": "auto", "auth": "none", **args}
    tenants = {"tenants": {n: {"uri": Path(p).resolve().as_uri()} for n, p in deltas.items()}}
    return {"applications": [serve_application(app_args, tenants, num_replicas=1, ray_actor_options={"num_cpus": 0})]}


def run_serving_demo(base_dir: Path, deltas: dict[str, Path], pool: str = "demo", max_tokens: int = 24) -> dict[str, str]:
    """Serve base + tenants, ask each the same prompt (greedy), print and return the answers."""
    import openai
    import ray
    from ray import serve

    from .cli import deploy, validate, wait_running

    cfg = pool_config(pool, Path(base_dir), deltas)
    validate(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        (url,) = deploy(cfg, port=port)
        wait_running([pool])
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        print(f"pool {pool!r} at {url}; models: {[m.id for m in client.models.list().data]}")
        answers = {}
        for model in [pool, *deltas]:
            out = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0)
            answers[model] = out.choices[0].text
            print(f"--- {model}\n{PROMPT}{answers[model]}")
        return answers
    finally:
        serve.shutdown()
        ray.shutdown()
