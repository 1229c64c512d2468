"""A request is cancelled at every stage with no work beyond the step in flight (issue: the
engine under pressure, point 3): queued, prefilling (a chunked prompt), decoding. Tokenizing
is tests/serving/test_engine_failures.py (the API's `submitted`)."""

from __future__ import annotations

import time

import pytest

from deltafleet.serving.engine import Engine
from deltafleet.serving.sampling import SamplingParams

LONG = SamplingParams(max_tokens=100, temperature=0)
CHUNK = 8  # max_step_tokens: a prefill step computes up to 8 of the prompt's tokens


@pytest.fixture
def engine_steps(toy):
    steps = []
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=1, max_step_tokens=8,
                 on_step=steps.append)
    assert eng.decode_mode == "dynamic"  # CPU: no step is launched ahead, one at most is in flight at the cancel
    yield eng, steps
    eng.close()


def _computed(eng) -> int:
    """Tokens the engine has computed so far (prefill and decode, every request)."""
    return eng.counters["prefill_tokens"] + eng.counters["decode_tokens"]


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_cancelled_while_decoding_it_generates_no_token_beyond_the_step_in_flight(engine_steps):
    eng, steps = engine_steps
    stream = eng.submit(None, "def add(a, b):", LONG)
    it = iter(stream)
    for _ in range(3):
        next(it)
    seq = eng.running[0]
    stream.cancel()
    at_cancel, generated = _computed(eng), len(seq.out_ids)
    rest = list(it)
    assert rest and rest[-1].finish_reason == "cancelled"
    _wait(lambda: not eng.running)
    assert _computed(eng) - at_cancel <= 1, steps[-3:]  # the decode step in flight: one token
    assert len(seq.out_ids) - generated <= 1


def test_cancelled_while_its_prompt_is_prefilled_in_chunks_it_computes_no_token_beyond_the_chunk_in_flight(engine_steps):
    eng, steps = engine_steps
    stream = eng.submit(None, "x " * 60, LONG)  # ~60 tokens: 8 per step
    _wait(lambda: steps and steps[-1].prefill_tokens > 0)
    stream.cancel()
    at_cancel = _computed(eng)
    assert list(stream)[-1].finish_reason == "cancelled"
    _wait(lambda: not eng.running)
    assert _computed(eng) - at_cancel <= CHUNK, steps[-3:]  # the prefill chunk in flight
    assert sum(s.prefill_tokens for s in steps) < len(eng.encode("x " * 60)), "the whole prompt was prefilled"
    assert eng.counters["decode_tokens"] == 0


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
