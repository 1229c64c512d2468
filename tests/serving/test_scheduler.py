"""plan_step: which tokens one engine step computes, as a pure function (table tests)."""

from __future__ import annotations

import pytest

from deltafleet.serving.scheduler import Plan, SeqView, plan_step

BS = 4  # block size


def seq(id, n_tokens, computed, n_blocks=None, exclusive=None):
    return SeqView(id, n_tokens, computed, -(-computed // BS) if n_blocks is None else n_blocks, exclusive)


CASES = [
    # (sentence, seqs oldest first, free blocks, token budget, max chunk, expected chunks, expected preempted)
    ("decode rows each get one token",
     [seq(1, 9, 8), seq(2, 5, 4, 1)], 4, 512, 512, {1: 1, 2: 1}, []),
    ("a new prompt is prefilled beside running decode rows",
     [seq(1, 9, 8), seq(2, 6, 0, 0)], 4, 512, 512, {1: 1, 2: 6}, []),
    ("a long prompt is chunked to the token budget left after the decode rows",
     [seq(1, 9, 8), seq(2, 40, 0, 0)], 20, 8, 512, {1: 1, 2: 7}, []),
    ("a long prompt is chunked to the chunk size",
     [seq(2, 40, 0, 0)], 20, 512, 16, {2: 16}, []),
    ("a half-prefilled prompt continues where it stopped",
     [seq(2, 40, 16, 4)], 20, 512, 16, {2: 16}, []),
    ("several prompts prefill in one step",
     [seq(1, 5, 0, 0), seq(2, 7, 0, 0), seq(3, 3, 0, 0)], 10, 512, 512, {1: 5, 2: 7, 3: 3}, []),
    ("a prefill takes only what the free blocks hold",
     [seq(1, 40, 0, 0)], 2, 512, 512, {1: 8}, []),
    ("a decode row that needs a block preempts the youngest sequence",
     [seq(1, 9, 8, 2), seq(2, 7, 6, 2), seq(3, 5, 4, 1)], 0, 512, 512, {1: 1, 2: 1}, [3]),
    ("an older sequence is never preempted for a younger one",
     [seq(1, 9, 8, 2), seq(2, 9, 8, 2)], 0, 512, 512, {1: 1}, [2]),
    ("the oldest decode row waits when nothing younger holds blocks",
     [seq(1, 9, 8, 2)], 0, 512, 512, {}, []),
    ("a sequence preempted this step is not prefilled again in the same step",
     [seq(1, 9, 8, 2), seq(2, 3, 2, 1)], 0, 512, 512, {1: 1}, [2]),
    ("a preempted sequence is recomputed from its first token",
     [seq(1, 13, 0, 0)], 10, 512, 512, {1: 13}, []),
    ("a decode row within its last block needs no new block",
     [seq(1, 7, 6, 2)], 0, 512, 512, {1: 1}, []),
    ("blocks a preempted sequence shares through the prefix cache free nothing, so a younger one goes too",
     [seq(1, 9, 8, 2), seq(2, 7, 6, 2), seq(3, 5, 4, 1, 0)], 0, 512, 512, {1: 1}, [3, 2]),
    ("a preempted sequence frees the blocks only it holds",
     [seq(1, 9, 8, 2), seq(2, 9, 8, 3, 1)], 0, 512, 512, {1: 1}, [2]),
    ("decode rows stop at the token budget",
     [seq(1, 9, 8), seq(2, 9, 8), seq(3, 9, 8)], 9, 2, 512, {1: 1, 2: 1}, []),
]


@pytest.mark.parametrize("sentence,seqs,free,budget,chunk,chunks,preempt", CASES, ids=[c[0] for c in CASES])
def test_plan(sentence, seqs, free, budget, chunk, chunks, preempt):
    plan = plan_step(seqs, free, BS, budget, chunk)
    assert plan.chunks == chunks
    assert plan.preempt == preempt


def test_a_plan_never_uses_more_blocks_than_are_free_plus_preempted():
    import random

    rng = random.Random(0)
    for _ in range(500):
        seqs = []
        for i in range(rng.randint(1, 8)):
            n = rng.randint(1, 60)
            computed = rng.choice([0, n - 1, rng.randint(0, n - 1)])
            blocks = -(-computed // BS)
            seqs.append(seq(i, n, computed, blocks, rng.choice([None, rng.randint(0, blocks)])))
        free = rng.randint(0, 20)
        plan = plan_step(seqs, free, BS, rng.randint(1, 64), rng.randint(1, 32))
        by_id = {s.id: s for s in seqs}
        freed = sum(by_id[i].n_blocks if by_id[i].exclusive is None else by_id[i].exclusive for i in plan.preempt)
        used = sum(max(0, -(-(by_id[i].computed + n) // BS) - by_id[i].n_blocks) for i, n in plan.chunks.items())
        assert used <= free + freed
        assert not set(plan.chunks) & set(plan.preempt)
        assert all(0 < n <= by_id[i].n_tokens - by_id[i].computed for i, n in plan.chunks.items())
        assert isinstance(plan, Plan)
