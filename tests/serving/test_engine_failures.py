"""No engine thread dies silently (issue: the engine under pressure, point 5): an unexpected
error outside a step's own handling fails every open request with an OpenAI-shaped error,
makes the replica's health check fail (so Ray replaces it), and makes `submit` refuse."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from deltafleet.serving.engine import Engine, EngineStopped
from deltafleet.serving.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _events(stream, timeout=30.0):
    """Every event of a stream, failing the test instead of hanging if it never ends."""
    out, done = [], threading.Event()

    def read():
        out.extend(stream)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"the stream never ended ({len(out)} events)"
    return out


@pytest.fixture
def engine(toy):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=4)
    eng.set_tenants(toy.deltas)
    eng.wait_ready()
    yield eng
    eng.close()


def test_an_error_in_the_step_callback_fails_open_requests_the_health_check_and_new_submits(engine):
    def broken(stats):
        raise ValueError("metrics backend is down")

    engine.on_step = broken
    events = _events(engine.submit("team-a/alpha", "def add(a, b):", GREEDY))
    assert isinstance(events[-1].error, EngineStopped) and "metrics backend is down" in str(events[-1].error)
    assert events[-1].error.status == 503
    assert "decode loop stopped: ValueError" in engine.problem()
    with pytest.raises(EngineStopped, match="cannot serve"):
        engine.submit(None, "x", GREEDY)


def test_an_error_in_admission_fails_the_waiting_request_instead_of_hanging_it(engine, monkeypatch):
    def broken(waiting):
        raise KeyError("scheduler bookkeeping")

    monkeypatch.setattr(engine, "_admit", broken)
    events = _events(engine.submit(None, "def add(a, b):", GREEDY))
    assert isinstance(events[-1].error, EngineStopped)
    assert engine.problem()


def test_the_output_thread_stopping_fails_streams_and_the_health_check(engine, monkeypatch):
    def token_fails(item):
        raise ValueError("tokenizer exploded")

    def end_fails(out, event):  # ... and so does ending that request: outside any one item's handling
        raise RuntimeError("queue broken")

    monkeypatch.setattr(engine.output, "_token", token_fails)
    monkeypatch.setattr(engine.output, "_end", end_fails)
    events = _events(engine.submit("team-b/gamma", "Serving many fine-tuned", GREEDY))
    assert events[-1].error is not None
    assert "output thread stopped: RuntimeError: queue broken" in engine.problem()
    with pytest.raises(EngineStopped):
        engine.submit(None, "x", GREEDY)


def test_a_sticky_device_error_fails_the_health_check(toy, monkeypatch):
    from deltafleet.serving.replica import DeltaServer

    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=4)
    try:
        def illegal(*args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(eng.model, "forward", illegal)
        events = _events(eng.submit(None, "def add(a, b):", GREEDY))
        assert events[-1].error is not None
        assert "device error" in eng.problem()
        from types import SimpleNamespace

        replica = SimpleNamespace(engine=eng)  # the deployment's own health check, on this engine
        with pytest.raises(RuntimeError, match="illegal memory access"):
            DeltaServer.func_or_class.check_health(replica)
    finally:
        eng.close()


def test_a_client_who_leaves_while_its_prompt_is_tokenized_costs_no_step(engine, monkeypatch):
    """The API tokenizes on a worker thread (`submitted`); a client gone meanwhile must not leave
    a request generating for nobody (before: 247 tokens for a chat nobody read)."""
    import asyncio

    from deltafleet.serving.replica import submitted

    steps, original = [], engine.encode

    def slow_encode(prompt):
        time.sleep(0.5)  # a long prompt's tokenization
        return original(prompt)

    monkeypatch.setattr(engine, "encode", slow_encode)
    engine.on_step = steps.append

    async def client_leaves():
        task = asyncio.ensure_future(submitted(lambda gone: engine.submit(None, "def add(a, b):", GREEDY, abandoned=gone)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # the worker thread finishes submitting; the engine would run it now

    asyncio.run(client_leaves())
    assert sum(s.sequences for s in steps) == 0, steps
    assert not engine.running and not engine.pending


def test_an_errored_stream_ends_with_the_error_event_and_no_done(engine):
    """SSE: a request that fails mid-stream gets an OpenAI error object as its last event, and
    no `[DONE]` (a client must not read a cut answer as complete); it is counted as that error."""
    import asyncio
    import json
    from types import SimpleNamespace

    from deltafleet.serving.app import Ingress
    from deltafleet.serving.engine import TenantUnavailable
    from deltafleet.serving.openai_api import completion_body
    from deltafleet.serving.output import Event

    recorded = []
    ingress = SimpleNamespace(_record=lambda *a: recorded.append(a))
    stream = _Streamed([Event("b", [5]), Event("", [], error=TenantUnavailable("model 'm' was removed"))])
    body = SimpleNamespace(model="m", include_usage=False)

    async def collect():
        gen = Ingress.func_or_class._sse(ingress, stream, Event("a", [4]), "id", body, completion_body, 0.0, 0.1)
        return [chunk async for chunk in gen]

    chunks = asyncio.run(collect())
    assert "[DONE]" not in "".join(chunks)
    last = json.loads(chunks[-1].removeprefix("data: "))
    assert last["error"]["type"] == "tenant_unavailable" and "removed" in last["error"]["message"]
    assert recorded and recorded[-1][1] == "tenant_unavailable"


def test_a_delta_briefly_missing_is_retried_and_served_a_corrupt_one_fails_at_once(toy, engine, tmp_path, monkeypatch):
    """A read that may pass (a file not yet visible on a network volume) is retried with backoff
    and shown in the status; after a few failed reads the tenant is reported failed while the
    retries go on, and a file that comes back is served. A delta that fails verification is
    FAILED at once."""
    import shutil

    from deltafleet.serving import bank as bank_module
    from deltafleet.serving.bank import FAILED, LOADING, READY

    monkeypatch.setattr(bank_module, "READ_FAILS_BEFORE_FAILED", 3)  # 0.5 + 1 s of blips, then reported

    late = tmp_path / "late.safetensors"
    engine.bank.register("team-c/late", late)
    deadline = time.monotonic() + 10
    while "retrying" not in (engine.bank.status("team-c/late").error or ""):
        assert time.monotonic() < deadline, engine.bank.status("team-c/late")
        time.sleep(0.05)
    t = engine.bank.status("team-c/late")
    assert t.status == LOADING and "no such delta file" in t.error
    while engine.bank.status("team-c/late").status != FAILED:  # still missing: reported, and retried
        assert time.monotonic() < deadline, engine.bank.status("team-c/late")
        time.sleep(0.05)
    assert "retrying" in engine.bank.status("team-c/late").error
    shutil.copyfile(toy.deltas["team-a/alpha"], late)  # the file appears
    while engine.bank.status("team-c/late").status != READY:
        assert time.monotonic() < deadline + 20, engine.bank.status("team-c/late")
        time.sleep(0.05)
    assert engine.bank.status("team-c/late").error is None
    out = engine.generate("team-c/late", "def add(a, b):", GREEDY)
    assert out.text == engine.generate("team-a/alpha", "def add(a, b):", GREEDY).text  # same delta, same answer

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(late.read_bytes()[:-100])
    engine.bank.register("team-c/corrupt", corrupt)
    while engine.bank.status("team-c/corrupt").status == LOADING:
        assert time.monotonic() < deadline + 30
        time.sleep(0.05)
    assert engine.bank.status("team-c/corrupt").status == FAILED
    assert engine.bank.status("team-c/corrupt").attempts == 0


def test_when_the_output_thread_dies_ending_a_finished_request_its_stream_gets_the_error(engine, monkeypatch):
    """max_tokens=1: the row is finished and dropped when its one token goes to the output
    thread; that thread then dies ending it. The request is neither running nor queued any
    more, yet its stream must end with the error (it used to hang for ever)."""
    def end_fails(out, event):  # every ending raises, the fallback ending of a failed item too: the thread dies
        raise RuntimeError("queue broken")

    monkeypatch.setattr(engine.output, "_end", end_fails)
    events = _events(engine.submit(None, "def add(a, b):", SamplingParams(max_tokens=1, temperature=0)), timeout=10)
    assert isinstance(events[-1].error, EngineStopped) and "output thread stopped" in str(events[-1].error)
    assert "output thread stopped: RuntimeError: queue broken" in engine.problem()


def test_a_non_streaming_request_that_fails_mid_generation_is_recorded_with_its_error():
    """The non-streaming path: the first token came, then the engine failed: the client gets the
    error's status and the request metrics count it as that error, with the tokens so far."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from deltafleet.serving.app import Ingress
    from deltafleet.serving.engine import TenantUnavailable
    from deltafleet.serving.openai_api import CompletionRequest, completion_body
    from deltafleet.serving.output import Event

    # What the engine replica streams back through the handle: a token, then the failure.
    events = [Event("a", [4], prompt_tokens=3, completion_tokens=1), Event("", [], error=TenantUnavailable("model 'm' was removed"))]
    recorded = []
    ingress = SimpleNamespace(_caller=lambda request: None, _may_call=lambda allowed, model: True, base_names=("pool",),
                              _call=lambda tenant, body: _Streamed(events), _record=lambda *a: recorded.append(a))
    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    response = asyncio.run(Ingress.func_or_class._serve(ingress, body, completion_body, "cmpl",
                                                        Request({"type": "http", "headers": []})))
    assert response.status_code == 503
    assert json.loads(response.body)["error"]["type"] == "tenant_unavailable"
    assert [r[:4] for r in recorded] == [("m", "tenant_unavailable", 3, 1)]


class _Streamed:
    """An engine call's answer as the ingress sees it (a DeploymentResponseGenerator): Events, then the end."""

    def __init__(self, events):
        self.events, self.cancelled = list(events), False

    async def __anext__(self):
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def cancel(self):
        self.cancelled = True


def test_a_delta_read_while_a_step_swaps_a_norm_weight_for_its_per_token_stack_is_accepted(toy, engine):
    """The per-token norm hook runs the norm under torch.func.functional_call, which swaps its
    weight for the step's [B, S, H] stack; a delta read on the loader thread meanwhile must be
    checked against the base's shapes, not the swapped ones (before: 'model.norm.weight has
    shape (64,), the base has (1, 2, 64)', and a good delta FAILED for good)."""
    norm = engine.model.model.norm
    hidden = norm.weight.shape[0]
    seen = []
    hook = norm.register_forward_hook(lambda mod, args, out: seen.append(engine.bank._read(toy.deltas["team-a/alpha"])))
    try:
        torch.func.functional_call(norm, {"weight": torch.ones(1, 2, hidden)}, (torch.randn(1, 2, hidden),))
    finally:
        hook.remove()
    assert seen and "model.norm.weight" in seen[0].whole  # read, verified and checked while swapped


def test_an_engine_call_that_fails_in_ray_is_an_openai_error_with_retry_after():
    """Between the ingress and an engine replica: Serve's queue full is a 429, a replica gone
    (or any other failure of the call) a 503 engine_unavailable; never a bare 500."""
    from ray.serve.exceptions import BackPressureError

    from deltafleet.serving.app import _error, _next

    class Failing:
        def __init__(self, e):
            self.e = e

        async def __anext__(self):
            raise self.e

    full = asyncio.run(_next(Failing(BackPressureError(num_queued_requests=128, max_queued_requests=128)))).error
    gone = asyncio.run(_next(Failing(RuntimeError("The actor died unexpectedly")))).error
    assert (full.status, full.type) == (429, "overloaded") and "at capacity" in str(full)
    assert (gone.status, gone.type) == (503, "engine_unavailable") and "The actor died unexpectedly" in str(gone)
    for e in (full, gone):
        assert _error(e).headers["retry-after"] == "1"
