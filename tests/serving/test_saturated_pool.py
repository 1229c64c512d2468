"""A saturated pool answers every case with its status and an OpenAI-shaped body (issue 23,
point 8): the real FastAPI app, driven in-process over ASGI, on one replica built by its own
__init__ and reconfigure, its ingress calling it in-process (Serve's replica context and the
handle between the two are the only things stood in for; placement: all, so no Serve
multiplexing is needed). Batch 1, a 4-deep queue (2 per tenant); no API key ever reaches a
log record or an answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")  # the app's side (not on the GPU machine, where only the gpu tests run)
pytest.importorskip("ray")
import httpx  # noqa: E402
from ray import serve  # noqa: E402

from deltafleet.serving import app as app_module  # noqa: E402
from deltafleet.serving.config import AppArgs, key_digest  # noqa: E402

KEY = "sk-team-a-0123456789abcdef0123456789abcdef"
WRONG = "sk-wrong-fedcba9876543210fedcba9876543210"
GOOD = {"Authorization": f"Bearer {KEY}"}
POOL = "toy"


class InProcessHandle:
    """The DeploymentHandle from the ingress to one engine replica, in this process:
    `.options(...).generate.remote(...)` streams the replica's own generator; `cancel()` closes it
    (as Serve cancels the replica's call when the client leaves)."""

    def __init__(self, replica):
        self.replica = replica

    def options(self, **kw):
        return self

    @property
    def generate(self):
        replica = self.replica

        class Call:
            @staticmethod
            def remote(tenant, body):
                agen = replica.generate(tenant, body)

                class Streamed:
                    __anext__ = agen.__anext__

                    @staticmethod
                    def cancel():
                        asyncio.ensure_future(agen.aclose())

                return Streamed()

        return Call


def _ingress(*args):
    cls = app_module.Ingress.func_or_class.__mro__[1]  # the class as written (serve.ingress wraps it)
    obj = cls.__new__(cls)
    cls.__init__(obj, *args)
    return obj


@pytest.fixture
def replica(toy, monkeypatch, tmp_path):
    args = {"pool": POOL, "base_model": str(toy.base_dir), "device": "cpu", "dtype": "float32", "max_batch_size": 1,
            "max_queue": 4, "max_queue_per_tenant": 2, "queue_timeout_s": 600, "load_timeout_s": 1, "placement": "all"}
    r = app_module.DeltaServer.func_or_class(args)
    ingress = _ingress(args, InProcessHandle(r), None)
    tenants = {"team-a/alpha": toy.deltas["team-a/alpha"], "team-a/beta": toy.deltas["team-a/beta"], "team-a/broken": toy.corrupt,
               "team-a/late": tmp_path / "not-there-yet.safetensors"}  # retried for ~30 s before it counts as failed
    user_config = {"tenants": {n: {"uri": str(p), "key_sha256": [key_digest(KEY)]} for n, p in tenants.items()}}
    r.reconfigure(user_config)
    ingress.reconfigure(user_config)
    r.engine.wait_ready(["team-a/alpha", "team-a/beta", "team-a/broken"])
    # Serve's class-based routes get `self` from the replica context: the ingress.
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    yield r
    r.engine.close()


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app_module.api), base_url="http://pool", timeout=60)


def _post(client, model: str, headers=GOOD, **fields):
    return client.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):", **fields}, headers=headers)


async def _until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def _error(response, status: int, type_: str, says: str, param: str | None = None) -> None:
    """An OpenAI error: the status, {"error": {message, type, param, code}}, Retry-After on 429/503."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}, response.text
    assert error["type"] == type_ and says in error["message"] and error["param"] == param, error
    assert ("retry-after" in response.headers) == (status in (429, 503)), response.headers


def test_a_saturated_pool_answers_each_case_with_its_status_and_an_openai_error(replica):
    engine = replica.engine
    slow_step = engine.on_step

    def slow(stats):  # the row stays taken while the queue is probed: ~20 ms a token
        slow_step(stats)
        time.sleep(0.02)

    async def run():
        async with _client() as client:
            ok = await _post(client, "team-a/alpha", max_tokens=3)
            assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
            _error(await _post(client, "team-a/late"), 503, "tenant_unavailable", "did not become ready within 1s")
            engine.on_step = slow
            hold = asyncio.ensure_future(_post(client, "team-a/alpha", max_tokens=240))  # takes the one row
            await _until(lambda: engine.running)
            queued = [asyncio.ensure_future(_post(client, "team-a/alpha")) for _ in range(2)]  # alpha's share
            await _until(lambda: len(engine.pending) == 2)
            _error(await _post(client, "team-a/alpha"), 429, "overloaded", "(its share of the queue)")
            queued += [asyncio.ensure_future(_post(client, "team-a/beta")) for _ in range(2)]
            await _until(lambda: len(engine.pending) == 4)
            _error(await _post(client, POOL), 429, "overloaded", "queue is full")
            _error(await _post(client, "team-a/broken"), 503, "tenant_unavailable", "failed to load")
            _error(await _post(client, "team-a/alpha", headers={"Authorization": f"Bearer {WRONG}"}), 401,
                   "invalid_request_error", "invalid API key")
            _error(await _post(client, "team-a/alpha", headers={}), 401, "invalid_request_error", "no API key")
            _error(await _post(client, "nope/model"), 404, "model_not_found", "not served by this pool")
            _error(await _post(client, "team-a/alpha", n=2), 400, "invalid_request_error", "n:", param="n")
            engine.queue_timeout_s = 0  # the queued four have waited long enough: told at the next admission
            for response in await asyncio.gather(*queued):
                _error(response, 429, "overloaded", "for a batch row")
            hold.cancel()
            engine.device_error = "CUDAError: CUDA error: an illegal memory access was encountered"
            _error(await _post(client, POOL), 503, "engine_unavailable", "cannot serve")

    asyncio.run(run())


def test_no_api_key_reaches_a_log_record_or_an_answer(replica, caplog):
    two = httpx.Headers([("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {WRONG}")])
    headers = [GOOD, {"Authorization": f"Bearer {WRONG}"}, two, {"Authorization": KEY}]  # the last: no "Bearer"

    async def run():
        async with _client() as client:
            answers = [await _post(client, model, h, max_tokens=2) for h in headers for model in ("team-a/alpha", "nope/m")]
            answers.append(await client.get("/v1/models", headers=two))
            return answers

    with caplog.at_level(logging.DEBUG):
        answers = asyncio.run(run())
    assert answers[0].status_code == 200 and {a.status_code for a in answers[2:]} <= {401, 404}
    seen = [r.getMessage() + repr(r.args) + (r.exc_text or "") for r in caplog.records] + [a.text for a in answers]
    seen += [json.dumps(dict(a.headers)) for a in answers]
    for secret in (KEY, WRONG):
        leaks = [s for s in seen if secret in s or secret[:16] in s]
        assert not leaks, leaks


def test_serves_own_request_limit_is_above_what_the_engine_runs_and_queues():
    """Serve rejects over max_ongoing_requests with its own non-OpenAI error: at the defaults,
    the engine's 429 (queue full) must come first."""
    defaults = AppArgs.model_fields
    assert app_module.DeltaServer.max_ongoing_requests > defaults["max_batch_size"].default + defaults["max_queue"].default
