"""A mixed engine step (decode rows + a prefill chunk, several tenants): its forward reads no
device value on the host, and its host-decided inputs (layout, slot maps, token ids, kept
positions, sampling parameters) reach the device in ONE staged copy (issue 22, point 3:
before, ~20 separate blocking `torch.tensor(...)` copies per step)."""

from __future__ import annotations

import pytest
import torch

from deltafleet.serving.engine import Engine, Sequence
from deltafleet.serving.sampling import SamplingParams
from graph_safety import NoHostSync, cpu_kernel_as_one_op
from test_decode_graphs import acquire
from transfers import Transfers, cpu_grouping_outside_modes

GREEDY = SamplingParams(max_tokens=8, temperature=0)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=20)


@pytest.fixture(scope="module")
def engine(toy):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode="dynamic",
                 prefix_caching=False)
    eng.set_tenants(toy.deltas)
    assert eng.wait_ready() == {n: "ready" for n in toy.deltas}
    yield eng
    eng.close()


def sequence(engine, i: int, tenant: str | None, prompt: list[int], params: SamplingParams) -> Sequence:
    """A sequence the test steps itself (the engine is idle: nothing else runs)."""
    slot = -1 if tenant is None else acquire(engine, tenant)
    return Sequence(1000 + i, tenant, prompt, params, stream=None, slot=slot, seed=50 + i)


def prefilled(engine) -> tuple[list[Sequence], Sequence]:
    """Two sequences (two tenants, one of them a whole lm_head and a norm) with their prompts
    cached and a first token drawn, and a fresh prompt of a third tenant: the mixed step's rows."""
    decoding = [sequence(engine, 0, "team-a/beta", [5, 9, 14, 3, 8, 21], GREEDY),
                sequence(engine, 1, "team-a/alpha", [7, 7, 2, 30, 11], SAMPLED)]
    with torch.inference_mode():
        for s in decoding:  # also warms up the norm hook's one-time path check (a host read)
            [(_, token)] = engine._forward([(s, len(s.prompt_ids))])
            s.out_ids.append(token)
    fresh = sequence(engine, 2, "team-b/gamma", [4, 12, 19, 6, 25, 2, 10], SAMPLED)
    return decoding, fresh


def release(engine, seqs: list[Sequence]) -> None:
    for s in seqs:
        engine.kv.release(s.blocks)
        engine.bank.release(s.slot)


def test_a_mixed_step_of_three_tenants_runs_its_forward_without_host_syncs(engine):
    """Decode rows of two tenants and a third tenant's prefill chunk in one packed step: the
    model's forward reads nothing on the host, and each row gets what it gets stepped alone."""
    decoding, fresh = prefilled(engine)
    batch = [(decoding[0], 1), (decoding[1], 1), (fresh, len(fresh.prompt_ids))]
    guard, active = NoHostSync(), []

    def enter(*_):  # the model's forward only: sampling reads its tokens on the host after it, by design
        active.append(guard.__enter__())

    def leave(*_):
        guard.__exit__(None, None, None)
        active.pop()

    handles = [engine.model.register_forward_pre_hook(enter), engine.model.register_forward_hook(leave)]
    try:
        with torch.inference_mode(), cpu_kernel_as_one_op(), cpu_grouping_outside_modes():
            mixed = engine._forward(batch)  # [(sequence, token)] for all three rows
    finally:
        for h in handles:
            h.remove()
        if active:  # the forward raised: leave the mode anyway
            leave()
    try:
        assert [s.id for s, _ in mixed] == [s.id for s, _ in batch]
        with torch.inference_mode():
            for (s, n), (_, token) in zip(batch, mixed):  # the same row alone, from the same cache state
                s.computed -= n
                assert [t for _, t in engine._forward([(s, n)])] == [token], s.tenant
    finally:
        release(engine, decoding + [fresh])


def test_a_mixed_step_sends_its_inputs_in_one_staged_copy(engine):
    """Outside the model's forward, the step builds no tensor from Python values and sends one
    copy (before: a `torch.tensor(...)` per layout field, slot map, token list and sampling
    parameter, each a blocking copy from pageable memory on CUDA)."""
    decoding, fresh = prefilled(engine)
    batch = [(decoding[0], 1), (decoding[1], 1), (fresh, len(fresh.prompt_ids))]
    try:
        sent = engine.staging.copies if hasattr(engine, "staging") else 0
        with torch.inference_mode(), cpu_grouping_outside_modes(), Transfers(engine.model).counting() as count:
            tokens = engine._forward(batch)
        assert len(tokens) == 3
        assert count.from_python == 0, f"{count.from_python} tensors built from Python values (one copy each on CUDA)"
        assert engine.staging.copies - sent == 1
        assert count.copies == 0  # nothing else moved outside the forward (on CPU the staged buffer is used in place)
    finally:
        release(engine, decoding + [fresh])
