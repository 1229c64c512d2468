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
    assert _param_of(ChatRequest, {"model": "t", "messages": image}) == "messages[0].content[1]"


# Message fields, per role as the SDK's ChatCompletionMessageParam variants type them:
# field -> (a value that is not its no-op, how it is handled). `name` is part of the prompt.
MESSAGE = {
    "role": ("user", "required"), "content": ("hi", "required"), "name": ("alice", "implemented"),
    "tool_calls": ([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "refused"),
    "tool_call_id": ("c", "refused"), "function_call": ({"name": "f", "arguments": "{}"}, "refused"),
    "refusal": ("no", "refused"), "audio": ({"id": "a"}, "refused"),
}
REFUSED_ROLES = {"function"}  # deprecated by OpenAI: its messages are refused whole (param messages[0].role)
STREAM_OPTIONS = {"include_usage": (True, "implemented"), "include_obfuscation": (True, "refused")}


def _sdk_message_fields() -> dict[str, set[str]]:
    """role -> the fields of its message type in the SDK."""
    from typing import get_args, get_type_hints

    from openai.types.chat import ChatCompletionMessageParam

    out = {}
    for variant in get_args(ChatCompletionMessageParam):
        (role,) = get_args(get_type_hints(variant)["role"])  # Literal["user"] -> "user"
        out[role] = set(variant.__annotations__)
    return out


def test_every_message_field_and_stream_option_of_the_sdk_is_classified():
    from openai.types.chat import ChatCompletionStreamOptionsParam

    fields = _sdk_message_fields()
    assert set(fields) >= {"system", "user", "assistant", "tool", "developer", "function"}
    assert set().union(*fields.values()) - set(MESSAGE) == set(), "new message fields: implement or refuse them"
    assert set(ChatCompletionStreamOptionsParam.__annotations__) - set(STREAM_OPTIONS) == set()


def test_each_message_field_is_taken_or_refused_as_messages_i_field():
    for role, fields in _sdk_message_fields().items():
        for field in sorted(fields - {"role", "content"}):
            value, how = MESSAGE[field]
            message = {"role": role, "content": "hi", field: value}
            param = _param_of(ChatRequest, {"model": "t", "messages": [MESSAGES[0], message]})
            if role in REFUSED_ROLES:
                assert param == "messages[1].role", (role, field, param)
            elif how == "refused":
                assert param == f"messages[1].{field}", (role, field, param)
            else:
                assert param is None, (role, field, param)
    assert _param_of(ChatRequest, {"model": "t", "messages": [{**MESSAGES[0], "weight": 1}]}) == "messages[0].weight"
    tool = {"role": "tool", "content": "42", "name": "f"}  # OpenAI's tool messages have no name
    assert _param_of(ChatRequest, {"model": "t", "messages": [MESSAGES[0], tool]}) == "messages[1].name"
    assert _param_of(ChatRequest, {"model": "t", "messages": [{**MESSAGES[0], "tool_calls": []}]}) is None  # the no-op value


def test_a_messages_name_reaches_the_prompt():
    from deltafleet.serving.openai_api import chat_prompt

    chat = ChatRequest.model_validate({"model": "t", "messages": [{"role": "user", "content": "hi", "name": "alice"}]})
    assert chat_prompt(object(), chat.messages) == "user (alice): hi\nassistant:"


@pytest.mark.parametrize("kind, model, base", [("chat", ChatRequest, {"messages": MESSAGES}), ("completions", CompletionRequest, {"prompt": "hi"})])
def test_each_stream_option_is_honoured_or_refused_as_stream_options_field(kind, model, base):
    body = {"model": "t", "stream": True, **base}
    for field, (value, how) in STREAM_OPTIONS.items():
        param = _param_of(model, {**body, "stream_options": {field: value}})
        assert param == (f"stream_options.{field}" if how == "refused" else None), (kind, field, param)
    assert _param_of(model, {**body, "stream_options": {"include_obfuscation": False}}) is None
    assert _param_of(model, {**body, "stream_options": {"chunk_size": 4}}) == "stream_options.chunk_size"
