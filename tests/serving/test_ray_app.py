"""The pool on real Ray Serve (CPU, loopback): OpenAI API, streaming, hot-added tenants."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deltafleet.serving.cli import deploy  # noqa: E402
from deltafleet.serving.config import key_digest, serve_application  # noqa: E402
from ports import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
POOL = "toy"


def _deploy(toy, tenants: list[str], port: int, keys: dict[str, list[str]] | None = None, status_key: str | None = None,
            uris: dict[str, str] | None = None):
    """Deploy the pool the way the operator and `deltafleet serve --config` do: a Serve config.
    Ray versions a config's deployments by import path and args, so a redeploy that changes
    only user_config reconfigures the running replica (test_tenant_hot_added_... checks its pid).
    uris: tenants whose delta URI is given (e.g. a file that does not exist)."""
    args = dict(pool=POOL, base_model=str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8,
                store_root=str(toy.base_dir.parent), auth="keys" if keys is not None else "none")
    all_uris = {**{n: toy.deltas[n].as_uri() for n in tenants}, **(uris or {})}
    user_config = {"tenants": {n: {"uri": uri, "key_sha256": [key_digest(k) for k in (keys or {}).get(n, [])]}
                               for n, uri in all_uris.items()}}
    if status_key is not None:
        user_config["status_key_sha256"] = key_digest(status_key)
    deploy({"applications": [serve_application(args, user_config, ray_actor_options={"num_cpus": 0})]}, port=port)


@pytest.fixture(scope="module")
def url(toy):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="deltafleet-test")
    try:
        _deploy(toy, ["team-a/alpha", "team-a/beta"], port)
        base = f"http://127.0.0.1:{port}/{POOL}"
        _wait_ready(base, ["team-a/alpha", "team-a/beta"])
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(base: str, names: list[str], timeout: float = 300) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # ready: loaded by the pool's load check on the replica they are routed to
        try:
            r = httpx.get(f"{base}/-/tenants", timeout=10)
            if r.status_code == 200 and all(r.json()["tenants"].get(n, {}).get("state") == "ready" for n in names):
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tenants {names} not ready at {base}")


def _complete(base: str, model: str, prompt: str) -> dict:
    r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_tenants_match_the_engine_alone(url, toy, reference_greedy):
    models = ["team-a/alpha", "team-a/beta", POOL, "base"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: _complete(url, m, "The quick brown fox"), models * 2))
    ids = toy.tokenizer("The quick brown fox").input_ids
    dirs = {"team-a/alpha": toy.merged_dirs["team-a/alpha"], "team-a/beta": toy.merged_dirs["team-a/beta"],
            POOL: toy.base_dir, "base": toy.base_dir}
    for model, ans in zip(models * 2, answers):
        want = toy.tokenizer.decode(reference_greedy(dirs[model], ids, 12), skip_special_tokens=True)
        assert ans["model"] == model and ans["choices"][0]["text"] == want
        assert ans["usage"]["prompt_tokens"] == len(ids)


def test_streaming_sse(url):
    whole = _complete(url, "team-a/beta", "def add(a, b):")["choices"][0]["text"]
    body = {"model": "team-a/beta", "prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    parts = [json.loads(c)["choices"][0] for c in chunks[:-1]]
    assert len(parts) > 2 and "".join(p["text"] for p in parts) == whole
    assert parts[-1]["finish_reason"] in ("length", "stop")


def test_models_errors_and_openai_client(url):
    ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert {"team-a/alpha", "team-a/beta", POOL, "base"} <= set(ids)
    r = httpx.post(f"{url}/v1/completions", json={"model": "nobody/here", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", json={"model": "team-a/alpha", "prompt": "hi", "temperature": 9})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="team-a/alpha", messages=[{"role": "user", "content": "Serving many"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    streamed = client.chat.completions.create(
        model="team-a/alpha", messages=[{"role": "user", "content": "Serving many"}], max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody/here", prompt="hi", max_tokens=4)


def test_tenant_states_are_open_on_a_pool_without_keys(url):
    r = httpx.get(f"{url}/-/tenants")
    assert r.status_code == 200, r.text
    body = r.json()
    assert {n: (t["state"], t["error"]) for n, t in body["tenants"].items()} == {"team-a/alpha": ("ready", None),
                                                                                  "team-a/beta": ("ready", None)}
    assert body["replica"] and len(body["replicas"]) == 1  # the ingress that answered; the one engine replica
    for t in body["tenants"].values():  # the load check left each on the pool's one replica
        assert t["replicas"] == body["replicas"]
    # the real route's body is what the operator's parser accepts (one model on both sides)
    from deltafleet.operator.backend import TenantState
    from deltafleet.operator.replica_status import parse_report

    report = parse_report(body, url)
    assert report.error == "" and report.replica == body["replica"]
    assert report.tenants == {"team-a/alpha": TenantState("ready", replicas=1), "team-a/beta": TenantState("ready", replicas=1)}


def _error(r: httpx.Response, status: int) -> dict:
    """OpenAI's error shape, whatever went wrong."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_every_error_has_openais_shape(url):
    assert _error(httpx.get(f"{url}/v1/nothing-here"), 404)["type"] == "not_found_error"
    _error(httpx.get(f"{url}/v1/completions"), 405)
    bad_json = _error(httpx.post(f"{url}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in bad_json["message"] and bad_json["param"] is None
    _error(httpx.post(f"{url}/v1/completions", content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"}), 400)
    surrogate = b'{"model": "team-a/alpha", "prompt": "\\ud800x"}'
    assert "prompt is not valid Unicode" in _error(httpx.post(f"{url}/v1/completions", content=surrogate,
                                                              headers={"content-type": "application/json"}), 400)["message"]
    stops = {"model": "team-a/alpha", "prompt": "hi", "stop": [str(i) for i in range(9)]}
    assert "at most 8 stop strings" in _error(httpx.post(f"{url}/v1/completions", json=stops), 400)["message"]
    seed = {"model": "team-a/alpha", "prompt": "hi", "seed": 2**64}
    assert _error(httpx.post(f"{url}/v1/completions", json=seed), 400)["param"] == "seed"
    for field, value in (("echo", True), ("logprobs", 1), ("best_of", 2)):
        err = _error(httpx.post(f"{url}/v1/completions", json={"model": "team-a/alpha", "prompt": "hi", field: value}), 400)
        assert f"{field} is not supported" in err["message"]


def test_a_huge_request_is_refused_while_a_small_one_is_answered(url):
    huge = {"model": "team-a/alpha", "prompt": "x " * (5 << 20), "max_tokens": 1}  # ~10 MB
    small = {"model": "team-a/alpha", "prompt": "one base", "max_tokens": 1, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(httpx.post, f"{url}/v1/completions", json=huge, timeout=120)
        ok = pool.submit(httpx.post, f"{url}/v1/completions", json=small, timeout=120)
        assert ok.result().status_code == 200
        assert "larger than 4194304 bytes" in _error(big.result(), 413)["message"]


def test_tenant_hot_added_without_restarting_the_replica(url, toy):
    before = httpx.get(f"{url}/debug/replica").json()
    assert "team-b/gamma" not in before["bank"]["tenants"]
    _deploy(toy, ["team-a/alpha", "team-b/gamma"], urlparse(url).port)  # beta removed, gamma added
    states = _wait_ready(url, ["team-b/gamma"])
    assert set(states["tenants"]) == {"team-a/alpha", "team-b/gamma"}
    after = httpx.get(f"{url}/debug/replica").json()
    assert after["pid"] == before["pid"]
    assert "team-a/beta" not in after["bank"]["tenants"] and after["bank"]["tenants"]["team-b/gamma"] == "ready"
    assert _complete(url, "team-b/gamma", "one base saves")["choices"][0]["text"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "team-a/beta", "prompt": "hi"})
    assert r.status_code == 404


def _post(url, model, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0},
                      headers=headers, timeout=120)


def _wait_status(url, model, key, status, timeout=300):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = _post(url, model, key)
            if r.status_code == status:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{model} with key {key!r} never answered {status}")


def _states(url, key):
    return httpx.get(f"{url}/-/tenants", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def test_api_keys_confine_each_caller_to_its_tenants_and_rotate_without_a_restart(url, toy):
    """Runs last in this module: it switches the pool to API keys."""
    import time

    port = urlparse(url).port
    missing = toy.base_dir.parent / "deltas" / "team-c-gone" / "delta.safetensors"  # inside store_root, never written
    _deploy(toy, ["team-a/alpha", "team-b/gamma"], port, keys={"team-a/alpha": ["key-a"], "team-b/gamma": ["key-b"],
                                                              "team-c/gone": ["key-c"]},
            status_key="status-key", uris={"team-c/gone": missing.as_uri()})
    _wait_status(url, "team-a/alpha", None, 401)  # the new args start a new replica; the old one had no keys
    _wait_status(url, "team-a/alpha", "key-a", 200)

    r = _post(url, "team-a/alpha")  # no key
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    assert _post(url, "team-a/alpha", "not-a-key").status_code == 401
    # B's key cannot reach A's model, and cannot tell it from one that does not exist
    other, missing = _post(url, "team-a/alpha", "key-b"), _post(url, "team-x/none", "key-b")
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["message"].replace("team-a/alpha", "X") == missing.json()["error"]["message"].replace("team-x/none", "X")
    assert _post(url, "team-b/gamma", "key-b").status_code == 200
    assert _post(url, POOL, "key-b").status_code == 200  # any valid key may use the base
    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer key-a"}).json()
    assert {m["id"] for m in listed["data"]} == {POOL, "base", "team-a/alpha"}
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/debug/replica").status_code == 404  # it would name every tenant

    # Tenant states: only the pool status key reads them; anyone else (no key, a tenant's key,
    # a wrong one) gets exactly an unknown route's 404, so the route does not even show it exists.
    unknown = httpx.get(f"{url}/-/nothing-here")
    assert unknown.status_code == 404
    for key in (None, "key-a", "not-a-key"):
        r = _states(url, key)
        assert (r.status_code, r.json()) == (404, unknown.json()), key
    assert _states(url, "status-key").status_code == 200
    deadline = time.monotonic() + 60
    tenants = _states(url, "status-key").json()["tenants"]
    while any(t["state"] == "loading" for t in tenants.values()):
        assert time.monotonic() < deadline, tenants
        time.sleep(0.5)
        tenants = _states(url, "status-key").json()["tenants"]
    assert set(tenants) == {"team-a/alpha", "team-b/gamma", "team-c/gone"}
    for name in ("team-a/alpha", "team-b/gamma"):
        assert (tenants[name]["state"], tenants[name]["error"]) == ("ready", None), tenants
    assert tenants["team-c/gone"]["state"] == "failed" and "team-c-gone" in tenants["team-c/gone"]["error"], tenants
    assert _post(url, "team-c/gone", "key-c").status_code == 503  # what the failed state means to its callers

    # Rotation: a new config that changes only user_config reconfigures the running replica
    # (test_tenant_hot_added_without_restarting_the_replica shows the pid stays).
    _deploy(toy, ["team-a/alpha", "team-b/gamma"], port, keys={"team-a/alpha": ["key-a2"], "team-b/gamma": ["key-b"]},
            status_key="status-key-2")
    _wait_status(url, "team-a/alpha", "key-a2", 200)
    assert _states(url, "status-key").status_code == 404 and _states(url, "status-key-2").status_code == 200  # rotated too
    assert _post(url, "team-a/alpha", "key-a").status_code == 401
    assert _post(url, "team-b/gamma", "key-b").status_code == 200
