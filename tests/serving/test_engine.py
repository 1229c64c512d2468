"""Engine: cross-tenant batches give exactly what each merged fine-tune gives alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from deltafleet.serving.engine import BadRequest, Engine, TenantUnavailable, UnknownTenant
from deltafleet.serving.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "def add(a, b):", "Serving many fine-tuned", "one base saves"]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module", params=["dynamic", "static"])
def engine(toy, request):
    """Both decode paths: the packed dynamic forward, and the fixed-shape bucketed step that
    CUDA replays as a graph (run eagerly here: the same code)."""
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode=request.param)
    eng.set_tenants(toy.deltas)
    assert eng.wait_ready() == {n: "ready" for n in toy.deltas}
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def expected(toy, engine, reference_greedy):
    """Reference ids per (model, prompt): merged fine-tunes and the base, each run alone."""
    dirs = {None: toy.base_dir, **toy.merged_dirs}
    return {
        (name, p): reference_greedy(d, engine.encode(p), GREEDY.max_tokens) for name, d in dirs.items() for p in PROMPTS
    }


def test_mixed_batch_matches_each_merged_finetune_alone(engine, expected):
    jobs = [(name, p) for p in PROMPTS for name in [None, *sorted(n for n in {k[0] for k in expected} if n)]]
    streams = [(job, engine.submit(job[0], job[1], GREEDY)) for job in jobs]
    for job, stream in streams:
        ids = [t for ev in stream for t in ev.token_ids]
        assert ids == expected[job], f"{job}: batched output differs from the merged model run alone"
    # the tenants really differ from each other and from the base, so the check has teeth
    for p in PROMPTS[:1]:
        outs = {tuple(expected[(n, p)]) for n in [None, *{k[0] for k in expected if k[0]}]}
        assert len(outs) == 4


def test_request_admitted_mid_generation_leaves_others_unchanged(engine, expected):
    long = SamplingParams(max_tokens=24, temperature=0)
    first = [engine.submit(n, PROMPTS[0], long) for n in ("team-a/alpha", "team-b/gamma")]
    # wait until the first two are decoding, then add a third
    got = [[t for t in next(iter(first[0])).token_ids]]
    steps_before = engine.steps
    late = engine.submit("team-a/beta", PROMPTS[1], long)
    got[0] += [t for ev in first[0] for t in ev.token_ids]
    rest = [t for ev in first[1] for t in ev.token_ids]
    late_ids = [t for ev in late for t in ev.token_ids]
    assert got[0] == expected[("team-a/alpha", PROMPTS[0])]
    assert rest == expected[("team-b/gamma", PROMPTS[0])]
    assert late_ids == expected[("team-a/beta", PROMPTS[1])]
    assert engine.steps > steps_before


def test_streaming_text_and_stop_strings(engine):
    full = engine.generate("team-a/alpha", PROMPTS[0], GREEDY)
    assert full.finish_reason in ("length", "stop") and full.completion_tokens > 0
    pieces = [ev.text for ev in engine.submit("team-a/alpha", PROMPTS[0], GREEDY)]
    assert "".join(pieces) == full.text and len([p for p in pieces if p]) > 1
    stop = full.text.strip()[3:6]
    assert stop and stop in full.text
    cut = engine.generate("team-a/alpha", PROMPTS[0], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    a, b = engine.generate("team-a/beta", PROMPTS[2], p), engine.generate("team-a/beta", PROMPTS[2], p)
    assert a.token_ids == b.token_ids
    c = engine.generate("team-a/beta", PROMPTS[2], SamplingParams(max_tokens=16, temperature=1.0, seed=99))
    assert c.token_ids != a.token_ids


def test_cancelled_request_leaves_the_batch(engine, expected):
    s = engine.submit("team-a/alpha", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0))
    other = engine.submit("team-b/gamma", PROMPTS[0], GREEDY)
    next(iter(s))
    s.cancel()
    reasons = [ev.finish_reason for ev in s]
    assert reasons[-1] == "cancelled"
    assert [t for ev in other for t in ev.token_ids] == expected[("team-b/gamma", PROMPTS[0])]


def test_bad_deltas_are_refused_while_others_serve(toy, engine, expected):
    engine.add_tenant("bad/corrupt", toy.corrupt)
    engine.add_tenant("bad/wrong-base", toy.wrong_base)
    st = engine.wait_ready(["bad/corrupt", "bad/wrong-base"])
    assert st == {"bad/corrupt": "failed", "bad/wrong-base": "failed"}
    assert "content hash mismatch" in engine.bank.status("bad/corrupt").error
    assert "wrong base model" in engine.bank.status("bad/wrong-base").error
    with pytest.raises(TenantUnavailable, match="wrong base model"):
        engine.submit("bad/wrong-base", "hi")
    with pytest.raises(UnknownTenant):
        engine.submit("nobody/here", "hi")
    assert engine.generate("team-b/gamma", PROMPTS[3], GREEDY).token_ids == expected[("team-b/gamma", PROMPTS[3])]
    engine.remove_tenant("bad/corrupt")
    engine.remove_tenant("bad/wrong-base")


def test_lru_eviction_under_small_budget_reloads_correctly(toy, expected):
    probe = Engine(str(toy.base_dir), device="cpu", dtype="float32", gpu_bank_bytes=0, cpu_bank_bytes=0)
    try:
        assert probe.bank.n_slots == 1  # one slot, nothing warm: every switch evicts and re-reads from disk
        probe.set_tenants(toy.deltas)
        probe.wait_ready()
        order = ["team-a/alpha", "team-a/beta", "team-b/gamma"]
        streams = [(n, probe.submit(n, PROMPTS[1], GREEDY)) for n in order]  # all at once: must take turns
        for n, s in streams:
            assert [t for ev in s for t in ev.token_ids] == expected[(n, PROMPTS[1])]
        again = probe.generate("team-a/alpha", PROMPTS[1], GREEDY)  # evicted twice over: back from disk
        assert again.token_ids == expected[("team-a/alpha", PROMPTS[1])]
        st = probe.bank.stats()
        assert st["evictions"] >= 3 and st["disk_loads"] >= 3 + 4 and st["cpu_tenants"] == 0
    finally:
        probe.close()


def test_bad_token_ids_are_refused_and_a_failing_prefill_fails_only_its_request(engine, expected):
    oov = engine.vocab_size + 5
    with pytest.raises(BadRequest, match=f"token id {oov} is outside"):
        engine.submit("team-a/alpha", [5, oov])
    # Past the check (as any prefill error would be): that request gets an error, nothing hangs,
    # its slot is unpinned and a request running beside it finishes unchanged.
    other = engine.submit("team-b/gamma", PROMPTS[0], GREEDY)
    engine.vocab_size, vocab = 1 << 30, engine.vocab_size
    try:
        bad = engine.submit("team-a/alpha", [5, oov], GREEDY)
    finally:
        engine.vocab_size = vocab
    events = list(bad)
    assert len(events) == 1 and "prefill failed: IndexError" in str(events[0].error)
    assert [t for ev in other for t in ev.token_ids] == expected[("team-b/gamma", PROMPTS[0])]
    assert engine.bank.slot_refs == [0] * engine.bank.n_slots


def test_re_registering_a_tenant_with_requests_in_flight_leaks_no_slot(toy, tmp_path):
    """One device slot. Re-register a tenant (a new file: a new compression) twice while its
    request runs; once that request ends, its old slot must come back — else every later
    tenant waits for a slot forever."""
    import shutil

    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=4, gpu_bank_bytes=1, load_timeout_s=20)
    try:
        assert eng.bank.n_slots == 1
        eng.set_tenants({"team-a/alpha": toy.deltas["team-a/alpha"]})
        eng.wait_ready()
        running = eng.submit("team-a/alpha", PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))
        first = next(iter(running))  # decoding: its slot is pinned
        assert first.error is None
        for i in range(2):
            copy = tmp_path / f"alpha-{i}.safetensors"
            shutil.copy(toy.deltas["team-a/alpha"], copy)
            eng.add_tenant("team-a/alpha", copy)
        assert [ev.error for ev in running if ev.error] == []
        eng.add_tenant("team-b/gamma", toy.deltas["team-b/gamma"])
        eng.wait_ready()
        for name in ("team-b/gamma", "team-a/alpha"):
            out = eng.generate(name, PROMPTS[1], GREEDY)
            assert out.finish_reason in ("length", "stop"), name
    finally:
        eng.close()


def test_a_tenant_removed_while_its_request_waits_fails_only_that_request(toy):
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=4, gpu_bank_bytes=1, load_timeout_s=20)
    try:
        eng.set_tenants({n: toy.deltas[n] for n in ("team-a/alpha", "team-b/gamma")})
        eng.wait_ready()
        busy = eng.submit("team-a/alpha", PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))  # holds the one slot
        next(iter(busy))
        waiting = eng.submit("team-b/gamma", PROMPTS[1], GREEDY)  # waits for a slot
        eng.remove_tenant("team-b/gamma")
        errors = [ev.error for ev in waiting if ev.error]
        assert len(errors) == 1 and errors[0].status == 404 and "removed" in str(errors[0])
        assert [ev.error for ev in busy if ev.error] == [], "the running request is unaffected"
        assert eng.generate(None, PROMPTS[2], GREEDY).finish_reason in ("length", "stop")
    finally:
        eng.close()


def test_without_max_tokens_a_request_may_use_the_context_the_prompt_leaves(engine):
    # Chat's OpenAI default: no max_tokens means until the model stops or the context is full.
    ids = engine.encode(PROMPTS[0])
    out = engine.generate("team-a/alpha", ids, SamplingParams(max_tokens=None, temperature=0))
    assert out.completion_tokens <= engine.max_len - len(ids)
    assert out.finish_reason == "stop" or out.completion_tokens == engine.max_len - len(ids)
    assert out.completion_tokens > GREEDY.max_tokens or out.finish_reason == "stop"


@pytest.mark.parametrize("decode_mode", ["dynamic", "static"])
@pytest.mark.parametrize("kv_blocks,step_tokens", [(64, 3), (9, 512), (9, 5)], ids=["chunked-prefill", "preemption", "both"])
def test_outputs_equal_the_merged_models_with_chunked_prefill_and_preemption_under_load(toy, expected, kv_blocks, step_tokens,
                                                                                      decode_mode):
    """A tiny KV cache (9 blocks of 4 positions: 36 tokens for 16 requests of ~30) forces
    preemption by recompute; a 3-token step budget forces every prompt through several
    prefill chunks beside decode rows. Each request is sent twice, so later ones may start
    from blocks the prefix cache kept (shared blocks, evicted ones). Every request still gets
    exactly its merged model's greedy tokens."""
    from deltafleet.serving.paged_kv import PagedKVCache

    cfg = (2, 4, 2, 16)  # layers, block size, kv heads, head dim of the toy base
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, kv_block_size=4,
                 kv_cache_bytes=kv_blocks * PagedKVCache.bytes_per_block(*cfg, torch.float32), max_step_tokens=step_tokens,
                 decode_mode=decode_mode, kv_growth_horizon=0)  # admit by prompt alone: the KV cache must run out
    try:
        assert eng.kv.n_blocks == kv_blocks
        eng.set_tenants(toy.deltas)
        eng.wait_ready()
        jobs = [(name, p) for p in PROMPTS for name in [None, *sorted(toy.deltas)]] * 2
        streams = [(job, eng.submit(job[0], job[1], GREEDY)) for job in jobs]
        for job, stream in streams:
            assert [t for ev in stream for t in ev.token_ids] == expected[job], job
        stats = eng.stats()
        if kv_blocks < 16:
            assert stats["preemptions"] > 0, "the KV cache was meant to run out"
        assert stats["kv_blocks_free"] == kv_blocks  # every block came back
        assert eng.bank.slot_refs == [0] * eng.bank.n_slots
    finally:
        eng.close()


def test_a_request_larger_than_the_kv_cache_is_refused_before_any_work(toy):
    from deltafleet.serving.paged_kv import PagedKVCache

    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", kv_block_size=4,
                 kv_cache_bytes=4 * PagedKVCache.bytes_per_block(2, 4, 2, 16, torch.float32))
    try:
        with pytest.raises(BadRequest, match="exceeds this replica's KV cache of 16 tokens"):
            eng.submit(None, PROMPTS[0], SamplingParams(max_tokens=20, temperature=0))
    finally:
        eng.close()


def test_a_request_cancelled_before_its_first_token_frees_its_blocks_and_slot(engine):
    stream = engine.submit("team-a/alpha", "x " * 40, SamplingParams(max_tokens=100, temperature=0))
    stream.cancel()
    events = list(stream)
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].completion_tokens <= 1
    deadline = time.monotonic() + 5
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv.num_free == engine.kv.n_blocks


def test_whole_tensors_count_in_the_device_budget(toy):
    from deltafleet.serving.served import build_served_model

    probe = build_served_model(str(toy.base_dir), device="cpu", dtype="float32", gpu_bank_bytes=1)
    per_slot = probe.bank.slot_bytes + probe.bank.slot_whole_bytes
    assert probe.bank.slot_whole_bytes > probe.bank.slot_bytes  # the toy's embeddings outweigh its 1-bit linears
    served = build_served_model(str(toy.base_dir), device="cpu", dtype="float32", gpu_bank_bytes=3 * per_slot - 1)
    bank = served.bank
    assert bank.n_slots == 2
    for name, path in toy.deltas.items():
        bank.register(name, path)
    deadline = time.monotonic() + 20
    while any(bank.status(n).status == "loading" for n in toy.deltas) and time.monotonic() < deadline:
        time.sleep(0.01)
    for name in sorted(toy.deltas)[:2]:  # fill both slots, with whole embeddings and heads
        while bank.acquire(name) is None and time.monotonic() < deadline:
            time.sleep(0.01)
    stats = bank.stats()
    assert stats["device_tenants"] == 2
    assert stats["device_bytes"] <= stats["device_capacity_bytes"] <= 3 * per_slot - 1


def test_every_step_reports_its_rows_tenants_prefill_and_kv_blocks(engine, expected):
    seen = []
    engine.on_step = seen.append
    try:
        streams = [engine.submit(n, PROMPTS[1], GREEDY) for n in ("team-a/alpha", "team-b/gamma", None)]
        for s in streams:
            list(s)
    finally:
        engine.on_step = None
    assert sum(st.prefill_tokens for st in seen) == 3 * len(engine.encode(PROMPTS[1]))
    assert sum(st.decode_tokens for st in seen) > 0
    assert max(st.tenants for st in seen) == 3 and max(st.sequences for st in seen) == 3
    assert all(st.kv_blocks_used + st.kv_blocks_free == engine.kv.n_blocks and st.seconds > 0 for st in seen)


def test_detokenization_runs_on_the_output_thread_not_the_decode_thread(engine, monkeypatch):
    from deltafleet.serving.detokenize import IncrementalText

    threads, original = set(), IncrementalText.add

    def add(self, token):
        threads.add(threading.current_thread().name)
        return original(self, token)

    monkeypatch.setattr(IncrementalText, "add", add)
    out = engine.generate("team-a/alpha", PROMPTS[0], GREEDY)
    assert out.completion_tokens > 0 and out.text
    assert threads == {"deltafleet-output"}


def test_a_stop_string_found_on_the_output_thread_frees_the_row(engine):
    full = engine.generate("team-b/gamma", PROMPTS[1], GREEDY)
    stop = full.text.strip()[2:4]
    assert stop and stop in full.text
    cut = engine.generate("team-b/gamma", PROMPTS[1], GREEDY.model_copy(update={"stop": [stop]}))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert cut.completion_tokens < full.completion_tokens
    deadline = time.monotonic() + 5
    while engine.stats()["running"] and time.monotonic() < deadline:  # dropped at the decode thread's next step
        time.sleep(0.01)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_decode_steps_overlap_and_a_row_ending_meanwhile_streams_nothing_past_its_end(toy, expected):
    """With fixed-shape steps, step t+1 is launched (its input tokens taken on the device) before
    step t's tokens are read back. A row whose step-t token ends it has had one more token
    computed by then: it must not be streamed, and every block and slot must come back."""
    eng = Engine(str(toy.base_dir), device="cpu", dtype="float32", max_batch_size=8, decode_mode="static")
    try:
        eng.set_tenants(toy.deltas)
        eng.wait_ready()
        jobs = [(name, p) for p in PROMPTS[:2] for name in [None, *sorted(toy.deltas)]]
        eos = expected[jobs[1]][6]  # pretend a token some rows generate mid-way is end-of-sequence
        eng.eos_ids = {eos}
        streams = [(job, eng.submit(job[0], job[1], GREEDY)) for job in jobs]
        ended_early = 0
        for job, stream in streams:
            events = list(stream)
            want = expected[job][: expected[job].index(eos)] if eos in expected[job] else expected[job]
            assert [t for ev in events for t in ev.token_ids] == want, job
            if eos in expected[job]:
                ended_early += 1
                assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == len(want)
        assert ended_early >= 1
        assert eng.counters["overlapped_steps"] > 0  # the steady decode really overlapped
        deadline = time.monotonic() + 5
        while eng.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.stats()["kv_blocks_free"] == eng.kv.n_blocks
        assert eng.bank.slot_refs == [0] * eng.bank.n_slots
    finally:
        eng.close()
