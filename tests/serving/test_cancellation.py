"""A request is cancelled at every stage with no work beyond the step in flight (issue: the
engine under pressure, point 3): queued, prefilling (a chunked prompt), decoding. Tokenizing
is tests/serving/test_engine_failures.py (the API's `submitted`)."""

from __future__ import annotations

import time

import pytest

from deltafleet.serving.engine import Engine
from deltafleet.serving.sampling import SamplingParams

LONG = SamplingParams(max_tokens=100, temperature=0)
IN_FLIGHT = 2  # steps that may already be launched when the cancel is seen (host/device overlap)


@pytest.fixture
def engine_steps(toy):
    steps = []
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=1, max_step_tokens=8,
                 on_step=steps.append)
    yield eng, steps
    eng.close()


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_cancelled_while_decoding_it_stops_within_the_steps_in_flight(engine_steps):
    eng, steps = engine_steps
    stream = eng.submit(None, "def add(a, b):", LONG)
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.cancel()
    at_cancel = len(steps)
    rest = list(it)
    assert rest and rest[-1].finish_reason == "cancelled"
    _wait(lambda: not eng.running)
    assert len(steps) - at_cancel <= IN_FLIGHT, steps[at_cancel:]


def test_cancelled_while_its_prompt_is_prefilled_in_chunks_it_stops_within_the_steps_in_flight(engine_steps):
    eng, steps = engine_steps
    stream = eng.submit(None, "x " * 60, LONG)  # ~60 tokens: 8 per step
    _wait(lambda: steps and steps[-1].prefill_tokens > 0)
    stream.cancel()
    at_cancel = len(steps)
    assert list(stream)[-1].finish_reason == "cancelled"
    _wait(lambda: not eng.running)
    assert len(steps) - at_cancel <= IN_FLIGHT
    assert sum(s.prefill_tokens for s in steps) < len(eng.encode("x " * 60)), "the whole prompt was prefilled"


def test_cancelled_while_queued_it_is_never_run(engine_steps):
    eng, steps = engine_steps
    first = eng.submit(None, "def add(a, b):", SamplingParams(max_tokens=30, temperature=0))
    _wait(lambda: eng.running)
    queued = eng.submit(None, "x " * 40, LONG)  # waits: the one row is taken
    queued.cancel()
    list(first)
    assert list(queued)[-1].finish_reason == "cancelled"
    _wait(lambda: not eng.running and not eng.pending)
    assert sum(s.prefill_tokens for s in steps) == len(eng.encode("def add(a, b):"))  # only the first's prompt
