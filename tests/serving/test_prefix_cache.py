"""Prefix caching: a prompt prefix's K/V is computed once per tenant registration and reused,
and never across tenants (the KV cache's bookkeeping alone, then the engine end to end)."""

from __future__ import annotations

import shutil

import pytest
import torch

from deltafleet.serving.engine import Engine
from deltafleet.serving.paged_kv import PagedKVCache
from deltafleet.serving.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0)
ALPHA, BETA = "team-a/alpha", "team-a/beta"


def kv_cache(n_blocks: int = 4) -> PagedKVCache:
    return PagedKVCache(n_layers=1, n_blocks=n_blocks, block_size=2, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


def keys(root: bytes, tokens: list[int], block_size: int = 2) -> list[bytes]:
    out, previous = [], root
    for i in range(0, len(tokens) - len(tokens) % block_size, block_size):
        previous = PagedKVCache.block_key(previous, tokens[i : i + block_size])
        out.append(previous)
    return out


# ---- the cache's bookkeeping (pure logic) ------------------------------------------------
def test_a_remembered_block_is_taken_by_the_next_sequence_with_the_same_prefix():
    kv = kv_cache()
    first = kv.allocate(2)
    for b, k in zip(first, keys(b"tenant:1", [5, 6, 7, 8])):
        kv.remember(b, k)
    taken = kv.take_cached(keys(b"tenant:1", [5, 6, 7, 8, 9, 10]))
    assert taken == first  # the third key was never computed: the run stops there
    assert kv.exclusive(first) == 0 and kv.exclusive(taken) == 0  # both sequences hold both blocks
    kv.release(first)
    assert kv.num_free == 2 and kv.exclusive(taken) == 2  # still held by the second sequence


def test_the_same_tokens_under_another_tenant_or_after_another_prefix_take_nothing():
    kv = kv_cache()
    blocks = kv.allocate(2)
    for b, k in zip(blocks, keys(b"tenant:1", [5, 6, 7, 8])):
        kv.remember(b, k)
    assert kv.take_cached(keys(b"tenant:2", [5, 6, 7, 8])) == []
    assert kv.take_cached(keys(b"base", [5, 6, 7, 8])) == []
    assert kv.take_cached(keys(b"tenant:1", [9, 9, 7, 8])) == []  # same second block, other first: another key


def test_a_cached_block_no_one_holds_counts_as_free_and_is_reused_least_recently_released_first():
    kv = kv_cache(n_blocks=3)
    a, b = kv.allocate(1), kv.allocate(1)
    ka, kb = keys(b"base", [1, 2]), keys(b"base", [3, 4])
    kv.remember(a[0], ka[0])
    kv.remember(b[0], kb[0])
    a_block, b_block = a[0], b[0]
    kv.release(a)
    kv.release(b)
    assert kv.num_free == 3 and kv.num_cached == 2
    kv.allocate(1)  # the never-used block goes first
    assert kv.num_cached == 2
    assert kv.allocate(1) == [a_block]  # then the cached block released longest ago, its content forgotten
    assert kv.num_cached == 1 and kv.take_cached(ka) == [] and kv.take_cached(kb) == [b_block]
    with pytest.raises(RuntimeError, match="1 blocks asked, 0 free"):
        kv.allocate(1)


# ---- the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(toy):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=4, kv_block_size=4, decode_mode="dynamic")
    eng.set_tenants({n: toy.deltas[n] for n in (ALPHA, BETA)})
    assert eng.wait_ready() == {ALPHA: "ready", BETA: "ready"}
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt(engine):
    ids = engine.encode("A long shared system prompt: you answer questions about serving fine-tuned models. Q:")
    assert len(ids) > 12
    return ids


def cached(engine) -> int:
    return engine.stats()["prefix_cached_tokens"]


def test_a_tenants_second_request_reuses_its_prompt_prefix_and_gets_the_same_tokens(engine, toy, prompt, reference_greedy):
    want = reference_greedy(toy.merged_dirs[ALPHA], prompt, GREEDY.max_tokens)
    before = cached(engine)
    assert engine.generate(ALPHA, prompt, GREEDY).token_ids == want
    first = cached(engine) - before
    assert engine.generate(ALPHA, prompt, GREEDY).token_ids == want
    assert cached(engine) - before - first == (len(prompt) - 1) // 4 * 4  # every full block before the last token
    seen = []
    engine.on_step = seen.append
    try:
        assert engine.generate(ALPHA, prompt, GREEDY).token_ids == want
    finally:
        engine.on_step = None
    assert sum(st.prefix_cached_tokens for st in seen) == (len(prompt) - 1) // 4 * 4  # what the metrics count
    assert all(st.kv_blocks_cached >= (len(prompt) - 1) // 4 for st in seen)
    longer = prompt + engine.encode(" And what is a delta?")
    assert engine.generate(ALPHA, longer, GREEDY).token_ids == reference_greedy(toy.merged_dirs[ALPHA], longer, GREEDY.max_tokens)
    assert engine.stats()["kv_blocks_free"] == engine.kv.n_blocks  # cached blocks no one holds are free


def test_another_tenant_or_the_base_never_reuses_a_tenants_prefix(engine, toy, prompt, reference_greedy):
    engine.generate(ALPHA, prompt, GREEDY)  # alpha's prefix is cached
    before = cached(engine)
    assert engine.generate(BETA, prompt, GREEDY).token_ids == reference_greedy(toy.merged_dirs[BETA], prompt, GREEDY.max_tokens)
    assert engine.generate(None, prompt, GREEDY).token_ids == reference_greedy(toy.base_dir, prompt, GREEDY.max_tokens)
    assert cached(engine) == before


def test_a_tenant_re_registered_with_another_delta_does_not_reuse_the_old_ones_prefix(engine, toy, prompt, reference_greedy,
                                                                                      tmp_path):
    engine.generate(ALPHA, prompt, GREEDY)  # alpha's prefix is cached
    replacement = tmp_path / "alpha-v2.safetensors"
    shutil.copy(toy.deltas["team-b/gamma"], replacement)  # alpha's name, gamma's weights
    engine.add_tenant(ALPHA, replacement)
    assert engine.wait_ready([ALPHA]) == {ALPHA: "ready"}
    before = cached(engine)
    got = engine.generate(ALPHA, prompt, GREEDY).token_ids
    assert got == reference_greedy(toy.merged_dirs["team-b/gamma"], prompt, GREEDY.max_tokens)
    assert cached(engine) == before
    engine.add_tenant(ALPHA, toy.deltas[ALPHA])  # back as it was, for the module's other tests
    engine.wait_ready([ALPHA])


def test_prefix_caching_can_be_turned_off(toy, prompt):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", kv_block_size=4, prefix_caching=False)
    try:
        a = eng.generate(None, prompt, GREEDY).token_ids
        assert eng.generate(None, prompt, GREEDY).token_ids == a
        assert eng.stats()["prefix_cached_tokens"] == 0 and eng.stats()["kv_blocks_cached"] == 0
    finally:
        eng.close()
