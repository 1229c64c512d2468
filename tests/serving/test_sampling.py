"""next_tokens: penalties, top-k and top-p as OpenAI and vLLM define them (pure)."""

from __future__ import annotations

import torch

from deltafleet.serving.sampling import SamplingParams, next_tokens

LOGITS = torch.tensor([[0.0, 3.0, 2.5, 0.0, 1.0]])


def pick(params: SamplingParams, history: list[int], seed: int = 0) -> int:
    gen = torch.Generator().manual_seed(seed)
    return next_tokens(LOGITS.clone(), [params], [gen], [history])[0]


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
