"""The fixed-shape decode step that CUDA replays as a graph: on CPU, it must not sync with the
host, must run the same ops whatever the tenant mix of its bucket, and must give each row what
the packed dynamic forward gives; on a GPU, a graph captured with one mix replays another."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from deltafleet.serving.decode_graphs import DecodeGraphs, DecodeRow, block_bucket, row_bucket
from deltafleet.serving.engine import Engine
from deltafleet.serving.sampling import SamplingParams
from graph_safety import NoHostSync, OpTrace, cpu_kernel_as_one_op
from transfers import Transfers, cpu_grouping_outside_modes

GREEDY = SamplingParams(max_tokens=8, temperature=0)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20)


@pytest.fixture(scope="module")
def engine(toy):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode="static")
    eng.set_tenants(toy.deltas)
    assert eng.wait_ready() == {n: "ready" for n in toy.deltas}
    yield eng
    eng.close()


def test_buckets_pad_rows_and_context_to_powers_of_two():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 16, 17, 300)] == [1, 2, 4, 8, 16, 32, 512]
    assert [block_bucket(n, 64) for n in (1, 2, 3, 9, 64, 65)] == [1, 2, 4, 16, 64, 64]


def test_every_row_bucket_runs_once_before_the_first_request(engine):
    """Start-up warm-up: each row bucket up to max_batch_size (8) has run (on CUDA: its
    kernels compiled and its graph captured) at the smallest context bucket."""
    assert {(1, 1), (2, 1), (4, 1), (8, 1)} <= set(engine.decoder.buckets)
    assert not any(r > 8 for r, _ in engine.decoder.buckets)


def rows_for(engine, tenants: list[str | None], params=GREEDY) -> list[DecodeRow]:
    """Decode rows over blocks borrowed from the engine's KV cache (released by the caller): each
    row's context (its prompt) is already cached, as after a prefill."""
    rows = []
    for i, t in enumerate(tenants):
        cached = 5 + 3 * i
        blocks = engine.kv.allocate(engine.kv.blocks_for(cached + 1))
        slot = -1 if t is None else acquire(engine, t)
        rows.append(DecodeRow(blocks, cached, 7 + i, slot, params, seed=100 + i))
    return rows


def acquire(engine, tenant: str) -> int:
    """The tenant's slot, once it is on the device (the first acquire starts the copy)."""
    for _ in range(500):
        slot = engine.bank.acquire(tenant)
        if slot is not None:
            return slot
        time.sleep(0.01)
    raise TimeoutError(f"{tenant} never reached the device")


def release(engine, rows):
    for r in rows:
        engine.kv.release(r.blocks)
        if r.slot >= 0:
            engine.bank.release(r.slot)


def prepared(engine, rows) -> tuple[DecodeGraphs, object]:
    """The decoder's bucket for these rows, filled, the context set: what capture or replay sees."""
    dec = engine.decoder
    key = (row_bucket(len(rows)), block_bucket(max(len(r.blocks) for r in rows), dec.max_blocks))
    b = dec.buckets.get(key) or dec._new_bucket(*key)
    dec._fill(b, rows)
    engine.ctx.set_static(b.slot_of_row)
    engine.paged.layout = b.layout.step_layout()
    return dec, b


MIXES = {
    "all base": [None, None, None],
    "three tenants": ["team-a/alpha", "team-a/beta", "team-b/gamma"],
    "one tenant and the base": ["team-a/beta", None, "team-a/beta"],
}


def test_the_step_reads_nothing_on_the_host(engine):
    with torch.inference_mode():  # the engine is idle (no request runs): its context is ours
        rows = rows_for(engine, MIXES["three tenants"], SAMPLED)
        try:
            dec, b = prepared(engine, rows)
            dec._forward(b)  # first call: the norm hook decides its path (a one-time host check)
            dec, b = prepared(engine, rows)
            with NoHostSync(), cpu_kernel_as_one_op():
                dec._forward(b)
        finally:
            engine.paged.layout = None
            release(engine, rows)


def test_an_overlapped_step_takes_its_tokens_on_the_device_and_sends_one_staged_copy(engine):
    """Rows whose input token is still in the previous step's output read it there (one
    index_select whose indices come with the step's staged copy); the step builds no tensor
    from Python values (before: 7 buffer copies, 4 layout copies and 2 index tensors, each a
    blocking copy from pageable memory on CUDA) and gives what the same rows with their
    tokens on the host give."""
    dec = engine.decoder
    with torch.inference_mode():
        rows = rows_for(engine, MIXES["one tenant and the base"], SAMPLED)  # input tokens 7, 8, 9
        try:
            want = dec.run(rows).clone()  # [3]
            previous = torch.tensor([0, 9, 7, 8])  # [4] the previous step's output: 7 at 2, 8 at 3
            overlapped = [replace(rows[0], token=0, previous=2), replace(rows[1], token=0, previous=3), rows[2]]
            sent = sum(b.staging.copies for b in dec.buckets.values())
            with cpu_grouping_outside_modes(), Transfers(engine.model).counting() as count:
                got = dec.run(overlapped, previous).clone()
        finally:
            release(engine, rows)
    assert torch.equal(got, want)
    assert count.from_python == 0, f"{count.from_python} tensors built from Python values (one copy each on CUDA)"
    assert sum(b.staging.copies for b in dec.buckets.values()) - sent == 1


def on_device(engine) -> tuple:
    """Every tenant copied into a device slot (then released, still resident); the bank's paths."""
    for t in MIXES["three tenants"]:
        engine.bank.release(acquire(engine, t))
    return engine.ctx.static_signature()


def test_the_step_runs_the_same_ops_for_every_tenant_mix(engine):
    """With the bank's paths fixed (its static signature), the mix changes no op and no shape."""
    traces = {}
    signature = on_device(engine)
    with torch.inference_mode():
        for name, tenants in MIXES.items():
            rows = rows_for(engine, tenants)
            try:
                dec, b = prepared(engine, rows)
                dec._forward(b)
                dec, b = prepared(engine, rows)
                with OpTrace() as trace, cpu_kernel_as_one_op(trace):
                    dec._forward(b)
                traces[name] = trace.ops
            finally:
                engine.paged.layout = None
                release(engine, rows)
    assert engine.ctx.static_signature() == signature
    first = traces["all base"]
    assert len(first) > 100
    for name, ops in traces.items():
        assert ops == first, f"{name}: the ops differ from the all-base batch's — a graph captured with one would be wrong for the other"


def test_tenants_arriving_and_leaving_never_change_the_signature(toy):
    """Graphs are captured at start, before any tenant: the first tenant with a whole lm_head
    (and a norm), a second one in the same slot stack, and a tenant leaving change only buffer
    contents, never the static signature (before, each one recaptured every bucket)."""
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode="static")
    dynamic = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode="dynamic")
    head = eng.bank.whole_stacks["lm_head"]
    try:
        at_start = eng.ctx.static_signature()
        arrivals = [("team-b/gamma", toy.deltas["team-b/gamma"]),  # 1-bit linears only
                    ("team-a/beta", toy.deltas["team-a/beta"]),  # the first whole lm_head, and a norm
                    ("team-a/beta-2", toy.deltas["team-a/beta"])]  # a second whole lm_head in the same slot stack
        for name, path in arrivals:
            eng.add_tenant(name, path)
            dynamic.add_tenant(name, path)
            eng.wait_ready()
            eng.bank.release(acquire(eng, name))
            assert eng.ctx.static_signature() == at_start, f"{name} arriving changed the signature"
        assert len(head.slots) == 2  # both whole heads are really in the slot stack
        eng.remove_tenant("team-a/beta")
        assert len(head.slots) == 1
        assert eng.ctx.static_signature() == at_start, "a tenant leaving changed the signature"
        dynamic.remove_tenant("team-a/beta")
        dynamic.wait_ready()
        steps = eng.counters["fixed_shape_steps"]
        jobs = [(t, p) for t in [None, "team-a/beta-2", "team-b/gamma"] for p in ("def add(a, b):", "one base")]
        got = [eng.submit(t, p, SAMPLED.model_copy(update={"seed": i})) for i, (t, p) in enumerate(jobs)]
        want = [dynamic.submit(t, p, SAMPLED.model_copy(update={"seed": i})) for i, (t, p) in enumerate(jobs)]
        for job, a, b in zip(jobs, got, want):
            assert [x for ev in a for x in ev.token_ids] == [x for ev in b for x in ev.token_ids], job
        assert eng.counters["fixed_shape_steps"] > steps
        assert eng.ctx.static_signature() == at_start
    finally:
        eng.close()
        dynamic.close()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_fixed_shape_decoding_gives_what_the_dynamic_forward_gives(toy, engine, params):
    """Same requests through the packed dynamic engine and the bucketed one: same tokens
    (sampling too: the draw depends on seed and position only)."""
    dynamic = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode="dynamic")
    try:
        dynamic.set_tenants(toy.deltas)
        dynamic.wait_ready()
        jobs = [(t, p) for t in [None, "team-a/alpha", "team-a/beta", "team-b/gamma"] for p in ("def add(a, b):", "one base")]
        seeded = [params.model_copy(update={"seed": 7 + i}) for i in range(len(jobs))]
        steps = engine.counters["fixed_shape_steps"]
        got = [engine.submit(t, p, s) for (t, p), s in zip(jobs, seeded)]
        want = [dynamic.submit(t, p, s) for (t, p), s in zip(jobs, seeded)]
        for job, a, b in zip(jobs, got, want):
            assert [x for ev in a for x in ev.token_ids] == [x for ev in b for x in ev.token_ids], job
        assert engine.counters["fixed_shape_steps"] > steps  # the bucketed path really ran
        assert dynamic.counters["fixed_shape_steps"] == 0
    finally:
        dynamic.close()


def test_a_failed_capture_falls_back_to_eager_decoding(engine):
    """A capture that fails (here for real: there is no CUDA) leaves the replica serving, eagerly."""
    dec = engine.decoder
    with torch.inference_mode():
        rows = rows_for(engine, MIXES["one tenant and the base"], SAMPLED)
        try:
            d, b = prepared(engine, rows)
            d._forward(b)
            want = b.next_ids[: len(rows)].clone()
            engine.paged.layout = None
            dec.graphs = True
            got = dec.run(rows)
        finally:
            dec.graphs, error, dec.capture_error = False, dec.capture_error, None
            release(engine, rows)
    assert torch.equal(got, want)
    assert error and engine.paged.layout is None


@pytest.mark.gpu
def test_a_graph_captured_with_one_mix_replays_another(toy):
    """On CUDA: graphs captured at start, before any tenant, replay three tenants, the base and
    one tenant, and back, never recaptured; each replay equals the same bucket run eagerly
    (same kernels, so the same tokens)."""
    eng = Engine(str(toy.base_dir), device="cuda", dtype="float16", max_batch_size=8, decode_mode="graphs")
    try:
        at_start = eng.decoder.captures
        assert at_start == 4  # start-up, before any tenant: the row buckets 1, 2, 4 and 8
        eng.set_tenants(toy.deltas)
        eng.wait_ready()
        with torch.inference_mode():
            for name in ("three tenants", "one tenant and the base", "three tenants"):
                rows = rows_for(eng, MIXES[name], SAMPLED)
                try:
                    graphed = eng.decoder.run(rows).clone()
                    dec, b = prepared(eng, rows)
                    dec._forward(b)
                    eager = b.next_ids[: len(rows)].clone()
                    eng.paged.layout = None
                finally:
                    release(eng, rows)
                assert torch.equal(graphed, eager), name
            assert eng.decoder.capture_error is None and eng.decoder.graphs  # no fallback to eager
            assert eng.decoder.captures == at_start  # the start-up graphs served every tenant and mix
    finally:
        eng.close()


def test_a_capture_that_fails_for_one_bucket_leaves_the_other_buckets_graphed(engine, monkeypatch):
    """Before, one failed capture turned graphs off for every bucket until restart. Now the
    failing bucket runs eagerly (until the bank's paths change) and the others replay."""
    dec = engine.decoder
    replays = []

    class Replayed:  # stands in for a CUDA graph here: "replaying" runs the captured step
        def __init__(self, b):
            self.b = b

        def replay(self):
            replays.append(self.b.slot_of_row.shape[0])
            dec._forward(self.b)

    def capture(b, signature):
        if b.slot_of_row.shape[0] == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        b.graph, b.signature = Replayed(b), signature

    monkeypatch.setattr(dec, "_capture", capture)
    with torch.inference_mode():
        try:
            dec.graphs = True
            for tenants in ([None], ["team-a/alpha", None], [None]):  # buckets of 1, 2, then 1 again
                rows = rows_for(engine, tenants)
                try:
                    dec.run(rows)
                finally:
                    release(engine, rows)
        finally:
            dec.graphs = False
            for b in dec.buckets.values():
                b.graph = b.signature = b.failed = None
    assert replays == [1, 1]  # the 1-row bucket replayed before and after the 2-row bucket failed
    assert dec.capture_failures >= 1 and dec.capture_error.startswith("(2,) rows: RuntimeError")
