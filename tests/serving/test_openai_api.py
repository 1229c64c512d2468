"""The OpenAI request models: fields that would change the answer are refused, not ignored;
text a tokenizer cannot take is refused with the field named (pure, no servers)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deltafleet.serving.openai_api import ChatRequest, CompletionRequest


def completion(**kw):
    return CompletionRequest.model_validate({"model": "t", "prompt": "hi", **kw})


@pytest.mark.parametrize("field, value", [
    ("echo", True), ("logprobs", 2), ("best_of", 3), ("suffix", "x"), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("logit_bias", {"50256": -100}), ("top_logprobs", 2), ("n", 2), ("top_k", -2),
])
def test_fields_that_change_the_answer_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        completion(**{field: value})


def test_penalties_top_k_and_usage_streaming_reach_the_sampler():
    r = completion(presence_penalty=0.5, frequency_penalty=-1.0, top_k=40, stream=True, stream_options={"include_usage": True})
    p = r.sampling(16)
    assert (p.presence_penalty, p.frequency_penalty, p.top_k) == (0.5, -1.0, 40)
    assert r.include_usage
    assert completion(top_k=-1).sampling(16).top_k == 0  # vLLM's "off"
    assert not completion(stream_options={"include_usage": True}).include_usage  # only for streams


def test_fields_at_harmless_values_are_accepted():
    r = completion(echo=False, logprobs=None, best_of=1, presence_penalty=0, logit_bias={}, user="u", n=1)
    assert r.prompt == "hi"
    assert ChatRequest.model_validate({"model": "t", "messages": [{"role": "user", "content": "hi"}], "logprobs": False})


def test_stop_and_seed_limits():
    assert completion(stop=["a"] * 8).sampling(16).stop == ["a"] * 8
    with pytest.raises(ValidationError, match="at most 8 stop strings, got 9"):
        completion(stop=["a"] * 9)
    assert completion(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(ValidationError, match="seed"):
        completion(seed=2**64)


def test_lone_surrogates_are_refused_where_they_are():
    body = json.loads('{"model": "t", "prompt": "\\ud800x"}')  # what a JSON body can carry
    with pytest.raises(ValidationError, match="prompt is not valid Unicode"):
        CompletionRequest.model_validate(body)
    with pytest.raises(ValidationError, match="message content is not valid Unicode"):
        ChatRequest.model_validate(json.loads('{"model": "t", "messages": [{"role": "user", "content": "a\\udfffb"}]}'))
    with pytest.raises(ValidationError, match="a stop string is not valid Unicode"):
        completion(stop=["\ud800"])
