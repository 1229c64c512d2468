"""Tenants placed by Serve's routing on real Ray (CPU, loopback): a two-replica pool where each
replica holds one tenant. Each tenant's requests land on the replica holding it (a request
routed elsewhere would load it there and, at one tenant per replica, push the other out, which
the directory's report would show), and a tenant whose replica goes away moves to another."""

from __future__ import annotations

import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deltafleet.serving.cli import deploy  # noqa: E402
from deltafleet.serving.config import DEPLOYMENT, serve_application  # noqa: E402
from ports import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
POOL = "placed"
TENANTS = ["team-a/alpha", "team-a/beta"]


@pytest.fixture(scope="module")
def url(toy):
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="deltafleet-test")
    try:
        args = dict(pool=POOL, base_model=str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=4,
                    store_root=str(toy.base_dir.parent), auth="none", max_tenants_per_replica=1)
        tenants = {"tenants": {n: {"uri": toy.deltas[n].as_uri()} for n in TENANTS}}
        deploy({"applications": [serve_application(args, tenants, num_replicas=2, ray_actor_options={"num_cpus": 0})]},
               port=port)
        yield f"http://127.0.0.1:{port}/{POOL}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _states(url: str) -> dict:
    r = httpx.get(f"{url}/-/tenants", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _until(url: str, ok, what: str, timeout: float = 300) -> dict:
    deadline, states = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:  # a 404 until the application's route is up, then a wait while its replicas start
            r = httpx.get(f"{url}/-/tenants", timeout=30)
            if r.status_code == 200 and ok(states := r.json()):
                return states
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}; last report: {states}")


def _holders(states: dict) -> dict[str, list[str]]:
    return {n: t["replicas"] for n, t in states["tenants"].items()}


def _complete(url: str, model: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "one base", "max_tokens": 4, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _complete_after_503s(url: str, model: str, timeout: float = 120) -> str:
    """What a client does with a 503 and Retry-After (a request caught on the replica that died)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "one base", "max_tokens": 4,
                                                      "temperature": 0}, timeout=120)
        if r.status_code != 503 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        assert r.json()["error"]["type"] == "engine_unavailable" and r.headers["retry-after"] == "1"
        time.sleep(1)


def test_each_tenant_lands_on_the_replica_holding_it_and_moves_when_that_replica_goes(url):
    _until(url, lambda s: len(s["replicas"]) == 2 and all(t["state"] == "ready" for t in s["tenants"].values()),
           "both replicas up and both deltas checked")
    # One request each, one after the other: a tenant no replica holds goes to the replica holding
    # the fewest (the load checks ran concurrently and may have put both on one, which holds one).
    answers = {}
    for n in TENANTS:
        answers[n] = _complete(url, n)
        _until(url, lambda s, n=n: len(s["tenants"][n]["replicas"]) == 1, f"{n} held by one replica")
    placed = _holders(_until(url, lambda s: all(len(t["replicas"]) == 1 for t in s["tenants"].values()),
                             "each tenant held by one of the two replicas"))
    assert placed["team-a/alpha"] != placed["team-a/beta"]

    for _ in range(5):  # interleaved: a request routed to the wrong replica would swap a tenant there
        for n in TENANTS:
            assert _complete(url, n) == answers[n]
    time.sleep(3)  # a replica reports within REPORT_EVERY_S of a change
    assert _holders(_states(url)) == placed

    # The replica holding alpha goes away: Serve starts another, and alpha is loaded where it is routed next.
    gone = placed["team-a/alpha"][0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{POOL}#{DEPLOYMENT}#{gone}", namespace="serve"), no_restart=True)
    assert _complete_after_503s(url, "team-a/alpha") == answers["team-a/alpha"]
    moved = _until(url, lambda s: gone not in s["replicas"] and s["tenants"]["team-a/alpha"]["replicas"]
                   and gone not in s["tenants"]["team-a/alpha"]["replicas"], "alpha held by a replica that is not the gone one")
    assert moved["tenants"]["team-a/alpha"]["state"] == "ready"
    assert _complete(url, "team-a/beta") == answers["team-a/beta"]
