"""The OpenAI-compatible surface: request models, response/chunk shapes and the error shape.

Pure functions and pydantic models (no Ray), so they are testable on their own. No field is
silently ignored unless ignoring it leaves the answer unchanged (HARMLESS: user, metadata,
store, cache and routing hints). Every other field the engine does not implement is refused
with a 400 whose `param` names it, when set to anything but its no-op value (n > 1, echo,
logprobs, top_logprobs, best_of, logit_bias, suffix, tools, tool_choice, functions,
response_format other than text, audio, modalities other than text, non-text content parts,
a message's tool_calls, tool_call_id, function_call, refusal or audio (param
`messages[i].<field>`), stream_options.include_obfuscation, and any field this server does not
know, in the request, a message or stream_options): OpenAI's own rule is to refuse what it
cannot honour. A message's `name` is part of the prompt (chat template, or the fallback). Implemented: temperature, top_p, top_k (vLLM's extension), presence and frequency
penalties, stop, seed, max_tokens and chat's max_completion_tokens, stream with
stream_options.include_usage.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .sampling import MAX_STOP, SamplingParams

SEED_RANGE = (-(2**63), 2**64 - 1)  # signed or unsigned 64-bit; sampling.as_int64 maps both onto one int64


def _valid_unicode(text: str, where: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode: refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name, not dropped
    include_usage: bool = False
    # Padding chunks against length side channels: not done here, so asking for it is refused
    # (a client that wants the mitigation must not believe it has it).
    include_obfuscation: bool | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.include_obfuscation:
            raise unsupported("stream_options.include_obfuscation", " (stream chunks are not padded)")
        unknown = sorted(self.model_extra or {})
        if unknown:
            raise unsupported(f"stream_options.{unknown[0]}", " (unknown field)")
        return self


# Fields whose value cannot change the answer here: accepted and ignored.
HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_options",
                      "prompt_cache_retention", "safety_identifier", "parallel_tool_calls"})


def unsupported(field: str, detail: str = "") -> PydanticCustomError:
    """A refusal whose `param` is the field (a model validator's error has no location of its own)."""
    return PydanticCustomError("unsupported", "{field} is not supported by this server" + detail, {"field": field})


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name below, not dropped

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension: -1, 0 or None = off")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    # Accepted only at the values that leave the answer unchanged.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        for s in stops:
            _valid_unicode(s, "a stop string")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        for name, bad in (
            ("logprobs", self.logprobs not in (None, False, 0)),
            ("top_logprobs", self.top_logprobs not in (None, 0)),
            ("logit_bias", bool(self.logit_bias)),
        ):
            if bad:
                raise unsupported(name)
        unknown = sorted(set(self.model_extra or {}) - HARMLESS - self._refused_here())
        if unknown:
            raise unsupported(unknown[0], " (unknown field)")
        return self

    @classmethod
    def _refused_here(cls) -> set[str]:
        """Extra fields a subclass refuses itself, with a better message."""
        return set()

    def token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.token_limit() or default_max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=max(0, self.top_k or 0), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=[s for s in stop if s], seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            v = v[0]
        return _valid_unicode(v, "prompt") if isinstance(v, str) else v

    @model_validator(mode="after")
    def _unsupported_completion(self):
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", bool(self.suffix))):
            if bad:
                raise unsupported(name)
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by name in ChatRequest, which knows the message's index
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]
    # A participant's name: part of the prompt (handed to the chat template, written in the
    # fallback format), never dropped. Tool messages have none in OpenAI's schema.
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")

    @field_validator("content")
    @classmethod
    def _unicode(cls, v):
        _valid_unicode(v if isinstance(v, str) else "".join(str(p.get("text", "")) for p in v), "message content")
        return v


# Message fields that change the prompt (tool calls and results, refusals, audio), refused unless at their no-op value.
_MESSAGE_NOOP = {"tool_calls": (None, []), "tool_call_id": (None,), "function_call": (None,), "refusal": (None,), "audio": (None,)}

# Chat fields that change the answer, refused unless at their no-op value.
_CHAT_NOOP = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
              "audio": (None,), "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
              "verbosity": (None,), "moderation": (None,)}


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None

    @classmethod
    def _refused_here(cls) -> set[str]:
        return set(_CHAT_NOOP)

    @model_validator(mode="after")
    def _unsupported_chat(self):
        extra = self.model_extra or {}
        for name, noop in _CHAT_NOOP.items():
            if name in extra and extra[name] not in noop:
                raise unsupported(name)
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise unsupported("response_format", " (only {\"type\": \"text\"})")
        if self.modalities not in (None, ["text"]):
            raise unsupported("modalities", " (only [\"text\"])")
        for i, m in enumerate(self.messages):
            _refuse_message_fields(i, m)
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                if part.get("type") != "text":
                    raise unsupported(f"messages[{i}].content[{j}]", f" (a {part.get('type')!r} part: only text parts)")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise unsupported("max_tokens", " together with a different max_completion_tokens (which replaces it: send one)")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _refuse_message_fields(i: int, m: ChatMessage) -> None:
    """A message field the prompt cannot carry is refused with OpenAI's `messages[i].field` param."""
    if m.name is not None and m.role == "tool":
        raise unsupported(f"messages[{i}].name", " (tool messages have no name)")
    for name in sorted(m.model_extra or {}):
        if name not in _MESSAGE_NOOP:
            raise unsupported(f"messages[{i}].{name}", " (unknown field)")
        if m.model_extra[name] not in _MESSAGE_NOOP[name]:
            raise unsupported(f"messages[{i}].{name}")


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str | list[int]:
    """The tokenizer's chat template when it has one (a message's `name` goes with it);
    otherwise a plain documented fallback: one "<role>: <content>" line per message (a named
    one "<role> (<name>): <content>"), then "assistant:" for the model to continue."""
    msgs = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name is not None else {})} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    return "".join(f"{m['role']}{' (' + m['name'] + ')' if 'name' in m else ''}: {m['content']}\n" for m in msgs) + "assistant:"


def error_body(message: str, type_: str, code: int | str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None, chunk: bool = False) -> dict:
    body = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str | None, use: dict | None, chunk: bool = False, first: bool = False) -> dict:
    if chunk:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": [choice]}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    """The last streamed chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def models_body(names: list[tuple[str, str]]) -> dict:
    """names: (id, owned_by) pairs."""
    now = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": o} for n, o in names]}
