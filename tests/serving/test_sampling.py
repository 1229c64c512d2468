"""Sampling: penalties, top-k and top-p as OpenAI and vLLM define them; draws that depend only on
(seed, position), never on the batch; and no host sync, so it can run inside a CUDA graph."""

from __future__ import annotations

import math

import pytest
import torch

from deltafleet.serving.sampling import SamplingParams, as_int64, next_tokens, sample, sampling_tensors
from graph_safety import NoHostSync

LOGITS = torch.tensor([[0.0, 3.0, 2.5, 0.0, 1.0]])


def pick(params: SamplingParams, history: list[int], seed: int = 0, position: int = 0) -> int:
    return next_tokens(LOGITS.clone(), [params], [seed], [position], [history])[0]


def test_a_frequency_penalty_counts_every_occurrence_in_the_completion():
    pen = SamplingParams(temperature=0, frequency_penalty=0.3)
    assert pick(pen, [1]) == 1  # 3.0 - 0.3 = 2.7 > 2.5
    assert pick(pen, [1, 1]) == 2  # 3.0 - 0.6 = 2.4 < 2.5


def test_a_presence_penalty_counts_a_token_once():
    assert pick(SamplingParams(temperature=0, presence_penalty=0.4), [1, 1, 1]) == 1  # 2.6 > 2.5
    assert pick(SamplingParams(temperature=0, presence_penalty=0.6), [1]) == 2  # 2.4 < 2.5


def test_no_penalty_leaves_greedy_alone():
    assert pick(SamplingParams(temperature=0), [1, 1, 1]) == 1


def test_top_k_samples_only_among_the_k_best():
    assert {pick(SamplingParams(temperature=2.0, top_k=1), [], seed) for seed in range(50)} == {1}
    assert {pick(SamplingParams(temperature=2.0, top_k=2), [], seed) for seed in range(200)} == {1, 2}
    assert len({pick(SamplingParams(temperature=2.0), [], seed) for seed in range(200)}) > 2  # without it: others too


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.softmax(LOGITS[0], -1)  # 1: 0.50, 2: 0.30, 4: 0.11, 0/3: 0.04 each
    assert probs[1] < 0.6 < probs[1] + probs[2]
    assert {pick(SamplingParams(temperature=1.0, top_p=0.45), [], seed) for seed in range(100)} == {1}
    assert {pick(SamplingParams(temperature=1.0, top_p=0.6), [], seed) for seed in range(300)} == {1, 2}


def test_draws_follow_the_softmax_of_logits_over_temperature():
    """Gumbel-max over hashed noise is an exact sampler: 20,000 draws (seed varies) match
    softmax(logits / T) within 4 standard errors for every token."""
    n, t = 20_000, 0.7
    logits = LOGITS.expand(n, -1)
    tensors = sampling_tensors([SamplingParams(temperature=t)] * n, list(range(n)), [5] * n, torch.device("cpu"))
    counts = torch.bincount(sample(logits, *tensors), minlength=5).double() / n
    want = torch.softmax(LOGITS[0].double() / t, -1)
    for p, q in zip(counts.tolist(), want.tolist()):
        assert abs(p - q) < 4 * math.sqrt(q * (1 - q) / n), (counts, want)


def test_a_draw_depends_on_seed_and_position_not_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=7)] * 2
    seeds, positions = [11, 0, 12, 13, 0, 14], [3, 4, 5, 6, 7, 8]
    together = next_tokens(logits.clone(), params, seeds, positions)
    alone = [next_tokens(logits[i:i + 1].clone(), params[i:i + 1], seeds[i:i + 1], positions[i:i + 1])[0] for i in range(6)]
    assert together == alone
    later = [next_tokens(logits[:1].clone(), params[:1], [11], [p])[0] for p in range(3, 60)]
    assert len(set(later)) > 3  # the position moves the draw: not one token forever


@pytest.mark.parametrize("seed", [0, -1, 2**63, 2**64 - 1, -(2**63)])
def test_every_openai_seed_maps_to_an_int64(seed):
    s = as_int64(seed)
    assert -(2**63) <= s < 2**63 and as_int64(s) == s
    assert as_int64(2**64 - 1) == -1


def test_sampling_reads_nothing_on_the_host():
    torch.manual_seed(1)
    logits = torch.randn(4, 64)
    tensors = sampling_tensors([SamplingParams(temperature=0), SamplingParams(top_p=0.5, top_k=3),
                                SamplingParams(temperature=0.5), SamplingParams()], [1, 2, 3, 4], [9, 9, 9, 9], logits.device)
    want = sample(logits, *tensors)
    with NoHostSync():
        got = sample(logits, *tensors)
    assert torch.equal(got, want)
    with pytest.raises(AssertionError, match="host"):  # the detector has teeth
        with NoHostSync():
            got.tolist()
