"""Admission under pressure (issue: the engine under pressure, points 1 and 2): free batch rows
go to tenants by fair share, one tenant cannot take the whole queue, a request that only waited
for a row is told so (not "tenant not ready"), and new work waits for KV room instead of being
admitted to be preempted."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from deltafleet.serving.engine import Engine, Overloaded
from deltafleet.serving.sampling import SamplingParams
from deltafleet.serving.scheduler import admission_order, blocks_to_finish

ORDER_CASES = [
    # (sentence, waiting (id, tenant) oldest first, running rows per tenant, expected order)
    ("with nothing running, requests go oldest first",
     [(1, "a"), (2, "b"), (3, "a")], {}, [1, 2, 3]),
    ("a tenant without rows goes before a busy tenant's older backlog",
     [(1, "a"), (2, "a"), (3, "a"), (4, "b")], {"a": 2}, [4, 1, 2, 3]),
    ("rows alternate between tenants with equal shares, oldest head first",
     [(1, "a"), (2, "a"), (3, "b"), (4, "b")], {}, [1, 3, 2, 4]),
    ("the base model is a tenant like any other",
     [(1, None), (2, None), (3, "a")], {None: 1}, [3, 1, 2]),
    ("a tenant's own requests stay in arrival order",
     [(5, "a"), (2, "b"), (9, "a"), (1, "a")], {"b": 3}, [5, 9, 1, 2]),
]


@pytest.mark.parametrize("sentence, waiting, running, expected", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_admission_order(sentence, waiting, running, expected):
    assert admission_order(waiting, running) == expected


def test_under_a_saturating_feeder_the_busy_tenant_never_takes_a_row_another_tenant_waits_for():
    """Property: R rows, one freed per step, a feeder keeping tenant 'hot' with a deep backlog,
    others arriving at random. A freed row never goes to 'hot' while a tenant holding fewer
    rows has a request queued (so no backlog of one tenant delays another's by more than the
    rows other light tenants take first, oldest first).

    And a bound on the wait: a tenant holding no row gets one within k + 1 freed rows, k = the
    requests (any tenant's) queued before its oldest one when it began to wait. While it holds
    none, a row goes to it or to a tenant also holding none whose oldest request is older, and
    every such row takes one of those k requests; later arrivals never go first. With the
    feeder, k <= 5 (hot's backlog) + the light requests queued then: never R x hot's backlog."""
    rng = random.Random(0)
    for trial in range(300):
        rows_total, tenants = rng.randint(2, 8), [f"t{i}" for i in range(rng.randint(1, 5))]
        running = ["hot"] * rows_total
        queue, next_id = [], 0
        waiting: dict[str, tuple[int, int]] = {}  # tenant holding no row -> (step it began to wait, k)
        for step in range(80):
            while sum(1 for _, t in queue if t == "hot") < 5:  # the feeder
                queue.append((next_id, "hot"))
                next_id += 1
            if rng.random() < 0.4:
                queue.append((next_id, rng.choice(tenants)))
                next_id += 1
            running.pop(rng.randrange(len(running)))  # one row frees
            counts = {t: running.count(t) for t in set(running)}
            for t in {t for _, t in queue if t != "hot" and counts.get(t, 0) == 0} - set(waiting):
                head = next(i for i, u in queue if u == t)
                waiting[t] = (step, sum(1 for i, _ in queue if i < head))
            first = admission_order(queue, counts)[0]
            winner = next(t for i, t in queue if i == first)
            if winner == "hot":
                lighter = {t for _, t in queue if t != "hot" and counts.get(t, 0) < counts.get("hot", 0)}
                assert not lighter, (trial, step, counts, lighter)
            waiting.pop(winner, None)
            for t, (since, k) in waiting.items():
                assert step - since + 1 <= k, (trial, step, t, since, k)  # its (k + 1)-th row at the latest is its own
            queue = [q for q in queue if q[0] != first]
            running.append(winner)


def test_blocks_to_finish_reserves_the_growth_up_to_the_horizon():
    assert blocks_to_finish(tokens=17, remaining=20, held=0, block_size=4, horizon=256) == 10  # ceil(37 / 4)
    assert blocks_to_finish(tokens=17, remaining=20, held=5, block_size=4, horizon=256) == 5
    assert blocks_to_finish(tokens=17, remaining=1000, held=0, block_size=4, horizon=8) == 7  # ceil(25 / 4)
    assert blocks_to_finish(tokens=17, remaining=20, held=12, block_size=4, horizon=256) == 0


GREEDY = SamplingParams(max_tokens=6, temperature=0)


class Stepper:
    """Runs the engine's loop one iteration (admission + step) per `step()`: the test decides
    when rows free, not the machine's speed."""

    def __init__(self, eng: Engine, monkeypatch) -> None:
        self.eng, self.admit = eng, eng._admit
        self.gate, self.parked, self.free = threading.Semaphore(0), threading.Semaphore(0), False
        monkeypatch.setattr(eng, "_admit", self._one_iteration)
        assert self.parked.acquire(timeout=30)  # the loop waits at the gate

    def _one_iteration(self, waiting) -> None:
        if not self.free:
            self.parked.release()
            self.gate.acquire()
        with self.eng._cv:
            waiting = list(self.eng.pending)  # what is queued now, not when the loop last looked
        self.admit(waiting)

    def step(self) -> None:
        self.gate.release()
        assert self.parked.acquire(timeout=30), "the loop did not come back"

    def run_free(self) -> None:
        self.free = True
        self.gate.release()


def test_a_busy_tenants_backlog_does_not_starve_another_tenant(toy, monkeypatch):
    """The issue's reproduction, step by step: 2 rows, five requests of tenant A always
    queued, then one of tenant B: the first admission after B arrives admits B (both of A's
    rows free together: one each), although A's five waited longer (B used to wait behind A's
    backlog, and get a 503 'did not become ready')."""
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=2)
    eng.set_tenants(toy.deltas)
    eng.wait_ready()
    a, b = sorted(toy.deltas)[:2]
    eng.generate(b, "def add(a, b):", GREEDY)  # B's delta in a device slot: its admission never waits for a copy
    stepper, admitted, seen, streams = Stepper(eng, monkeypatch), [], set(), []

    def step():
        while sum(1 for s in eng.pending if s.tenant == a) < 5:  # the feeder
            streams.append(eng.submit(a, "def add(a, b):", GREEDY))
        stepper.step()
        admitted.append([s.tenant for s in eng.running if s.id not in seen])  # this step's admissions
        seen.update(s.id for s in eng.running)

    try:
        for _ in range(10):
            step()
        assert [s.tenant for s in eng.running] == [a, a]
        before = len(admitted)
        stream_b = eng.submit(b, "def add(a, b):", GREEDY)
        for _ in range(GREEDY.max_tokens + 2):  # a row frees within one request's length
            step()
        first = next((new for new in admitted[before:] if new), [])
        assert b in first, admitted[before:]
        stepper.run_free()
        events = list(stream_b)
        for s in streams:
            s.cancel()
    finally:
        stepper.run_free()
        eng.close()
    assert events[-1].error is None and events[-1].finish_reason, events[-1]


def test_one_tenant_cannot_fill_the_queue_and_a_slot_wait_says_so(toy):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=1, max_queue=4, queue_timeout_s=0.3)
    eng.set_tenants(toy.deltas)
    eng.wait_ready()
    a, b = sorted(toy.deltas)[:2]
    long = SamplingParams(max_tokens=200, temperature=0)
    try:
        streams = [eng.submit(a, "def add(a, b):", long)]
        while not eng.running:  # it holds the one row
            time.sleep(0.01)
        streams += [eng.submit(a, "def add(a, b):", long) for _ in range(2)]  # two wait: A's share of a 4-deep queue
        with pytest.raises(Overloaded, match="already has 2 requests waiting"):
            eng.submit(a, "def add(a, b):", long)
        waiting_b = eng.submit(b, "def add(a, b):", GREEDY)  # B still has room in the queue
        events = list(waiting_b)
        assert isinstance(events[-1].error, Overloaded) and "for a batch row" in str(events[-1].error)
        assert "ready" not in str(events[-1].error)
        for s in streams:
            s.cancel()
    finally:
        eng.close()


@pytest.mark.parametrize("blocks", [12, 24])
def test_tight_kv_admits_what_fits_instead_of_recomputing_prefills(toy, blocks):
    """The issue's scenario: 8 requests of 16-18 prompt tokens and 20 output tokens, blocks of
    4 positions. Admitted by batch size alone, the engine computed 4.1x (12 blocks) and 3.1x
    (24 blocks) the prompt tokens in prefill. Target: at most 1.25x."""
    from deltafleet.serving.paged_kv import PagedKVCache

    steps = []
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, kv_block_size=4,
                 kv_cache_bytes=blocks * PagedKVCache.bytes_per_block(2, 4, 2, 16, torch.float32), on_step=steps.append)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(16, 18))] for _ in range(8)]
    try:
        streams = [eng.submit(None, p, SamplingParams(max_tokens=20, temperature=0)) for p in prompts]
        outs = [list(s) for s in streams]
        assert all(o[-1].error is None for o in outs)
    finally:
        eng.close()
    computed, prompt_tokens = sum(s.prefill_tokens for s in steps), sum(map(len, prompts))
    assert computed <= 1.25 * prompt_tokens, f"{computed} prefill tokens for {prompt_tokens} prompt tokens"


def _eight_requests(base_dir, blocks: int, horizon: int, prefix_caching: bool):
    """The scenario above (8 prompts of 16-18 tokens, 20 output tokens, blocks of 4 positions):
    (token ids of each request, prefill tokens computed, engine counters)."""
    from deltafleet.serving.paged_kv import PagedKVCache

    steps = []
    eng = Engine(str(base_dir), device="cpu", dtype="float32", max_batch_size=8, kv_block_size=4, kv_growth_horizon=horizon,
                 prefix_caching=prefix_caching, kv_cache_bytes=blocks * PagedKVCache.bytes_per_block(2, 4, 2, 16, torch.float32),
                 on_step=steps.append)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(16, 18))] for _ in range(8)]
    try:
        outs = [list(s) for s in [eng.submit(None, p, SamplingParams(max_tokens=20, temperature=0)) for p in prompts]]
        assert all(o[-1].error is None for o in outs)
        counters = dict(eng.counters)
    finally:
        eng.close()
    return [sum((e.token_ids for e in o), []) for o in outs], sum(s.prefill_tokens for s in steps), counters



def test_a_preempted_sequence_takes_back_its_own_cached_blocks_instead_of_recomputing_them(toy):
    """No growth reserve, 12 blocks: all 8 are admitted and preempted in turn. The blocks a
    preempted sequence computed (prompt and generated tokens) stay in the prefix cache until
    reused: it takes them back, so its recompute is shorter than without the cache, and its
    tokens are those of a run under no pressure."""
    unpressured, _, _ = _eight_requests(toy.base_dir, blocks=400, horizon=256, prefix_caching=True)
    without_cache, prefill_without, _ = _eight_requests(toy.base_dir, blocks=12, horizon=0, prefix_caching=False)
    tokens, prefill, counters = _eight_requests(toy.base_dir, blocks=12, horizon=0, prefix_caching=True)
    assert counters["preemptions"] > 0
    assert counters["prefix_cached_tokens"] > 0  # the prompts share nothing: every cached token is a preempted one's own
    assert prefill < prefill_without, (prefill, prefill_without)
    print(f"prefill tokens: {prefill} (cache) vs {prefill_without} (no cache); {counters['preemptions']} preemptions, "
          f"{counters['prefix_cached_tokens']} tokens taken back")
    assert tokens == unpressured and without_cache == unpressured
