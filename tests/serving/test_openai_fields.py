"""Every field of OpenAI's request schemas (as the `openai` SDK types them) is implemented,
ignored because it cannot change the answer, or refused with a 400 whose `param` names it —
none is silently dropped. A field the SDK adds fails here until it is classified."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")  # the app's side (not on the GPU machine, where only the gpu tests run)
pytest.importorskip("ray")
from fastapi.exceptions import RequestValidationError  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from deltafleet.serving.app import _bad_request  # noqa: E402
from deltafleet.serving.openai_api import HARMLESS, ChatRequest, CompletionRequest  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]
# field -> (a value that is not its no-op, how it is handled)
CHAT = {
    "model": ("t", "required"), "messages": (MESSAGES, "required"),
    "temperature": (0.5, "implemented"), "top_p": (0.5, "implemented"), "seed": (3, "implemented"),
    "stop": (["x"], "implemented"), "presence_penalty": (0.5, "implemented"), "frequency_penalty": (0.5, "implemented"),
    "max_tokens": (5, "implemented"), "max_completion_tokens": (6, "implemented"),
    "stream_options": ({"include_usage": True}, "implemented"),
    "user": ("u", "ignored"), "metadata": ({"a": "b"}, "ignored"), "store": (True, "ignored"),
    "service_tier": ("auto", "ignored"), "prompt_cache_key": ("k", "ignored"), "prompt_cache_options": ({}, "ignored"),
    "prompt_cache_retention": ("24h", "ignored"), "safety_identifier": ("s", "ignored"),
    "parallel_tool_calls": (False, "ignored"),
    "n": (2, "refused"), "logprobs": (True, "refused"), "top_logprobs": (2, "refused"), "logit_bias": ({"1": 5}, "refused"),
    "tools": ([{"type": "function", "function": {"name": "f"}}], "refused"), "tool_choice": ("auto", "refused"),
    "functions": ([{"name": "f"}], "refused"), "function_call": ("auto", "refused"),
    "response_format": ({"type": "json_object"}, "refused"), "modalities": (["text", "audio"], "refused"),
    "audio": ({"voice": "alloy", "format": "wav"}, "refused"), "prediction": ({"type": "content", "content": "x"}, "refused"),
    "web_search_options": ({}, "refused"), "reasoning_effort": ("high", "refused"), "verbosity": ("low", "refused"),
    "moderation": ({"x": 1}, "refused"),
}
COMPLETIONS = {
    "model": ("t", "required"), "prompt": ("hi", "required"),
    "temperature": (0.5, "implemented"), "top_p": (0.5, "implemented"), "seed": (3, "implemented"),
    "stop": (["x"], "implemented"), "presence_penalty": (0.5, "implemented"), "frequency_penalty": (0.5, "implemented"),
    "max_tokens": (5, "implemented"), "stream_options": ({"include_usage": True}, "implemented"), "user": ("u", "ignored"),
    "n": (2, "refused"), "logprobs": (2, "refused"), "logit_bias": ({"1": 5}, "refused"), "echo": (True, "refused"),
    "best_of": (3, "refused"), "suffix": ("x", "refused"),
}


def _sdk_fields(kind: str) -> set[str]:
    if kind == "chat":
        from openai.types.chat.completion_create_params import CompletionCreateParamsBase
    else:
        from openai.types.completion_create_params import CompletionCreateParamsBase
    return set(CompletionCreateParamsBase.__annotations__)


@pytest.mark.parametrize("kind, table", [("chat", CHAT), ("completions", COMPLETIONS)])
def test_every_field_of_the_sdk_is_classified(kind, table):
    assert _sdk_fields(kind) - set(table) == set(), "new OpenAI fields: implement, ignore (HARMLESS) or refuse them"


def _param_of(model, body) -> str | None:
    """What the API answers: the 400's `param`, or None when the request is accepted."""
    try:
        model.model_validate(body)
    except ValidationError as e:
        response = asyncio.run(_bad_request(None, RequestValidationError(e.errors())))
        assert response.status_code == 400
        error = json.loads(response.body)["error"]
        assert error["type"] == "invalid_request_error"
        return error["param"]
    return None


@pytest.mark.parametrize("kind, model, table", [("chat", ChatRequest, CHAT), ("completions", CompletionRequest, COMPLETIONS)])
def test_each_field_is_honoured_ignored_or_refused_by_name(kind, model, table):
    base = {k: v for k, (v, how) in table.items() if how == "required"}
    for field, (value, how) in table.items():
        if how == "required":
            continue
        param = _param_of(model, {**base, field: value, **({"stream": True} if field == "stream_options" else {})})
        if how == "refused":
            assert param == field, f"{kind}.{field}={value!r}: answered param {param!r}"
        else:
            assert param is None, f"{kind}.{field}={value!r} was refused"
            if how == "ignored":
                assert field in HARMLESS


def test_implemented_fields_reach_the_sampler():
    chat = ChatRequest.model_validate({"model": "t", "messages": MESSAGES, "max_completion_tokens": 7})
    assert chat.sampling(100).max_tokens == 7
    assert ChatRequest.model_validate({"model": "t", "messages": MESSAGES, "max_tokens": 7,
                                       "max_completion_tokens": 7}).sampling(100).max_tokens == 7
    assert _param_of(ChatRequest, {"model": "t", "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}) == "max_tokens"
    assert ChatRequest.model_validate({"model": "t", "messages": MESSAGES, "response_format": {"type": "text"},
                                       "tools": [], "tool_choice": "none", "modalities": ["text"]})


def test_an_unknown_field_and_a_non_text_content_part_are_refused_by_name():
    assert _param_of(ChatRequest, {"model": "t", "messages": MESSAGES, "guided_json": {}}) == "guided_json"
    image = [{"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert _param_of(ChatRequest, {"model": "t", "messages": image}) == "messages.0.content.1"
